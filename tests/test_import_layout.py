"""The repository's kernels/ (pllava.kernels) must not stand in for HF's `kernels` package when Python runs from
the repository root (python -m / -c put the current directory first on sys.path): transformers >= 5.25 requires
that package and imports it whenever it builds a model config, so the shadowing broke every load from the root."""
import importlib.machinery
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_in_root(code: str, *flags: str):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def _installed_kernels_origin():
    """Where HF's `kernels` is installed, found on sys.path without the repository root (None: not installed)."""
    spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT])
    return None if spec is None else spec.origin


def test_the_root_is_first_on_sys_path_in_these_runs():
    # the control: what the other tests rely on, that -c from the root finds the repository's kernels/ first
    r = _run_in_root("import importlib.util; print(importlib.util.find_spec('kernels').origin)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == os.path.join(ROOT, "kernels", "__init__.py")


def test_top_level_kernels_from_the_root_is_the_installed_package():
    origin = _installed_kernels_origin()
    if origin is None:  # HF's kernels is not installed: the name reads as missing (as with -S, below)
        _assert_absent(_run_in_root(ABSENT))
    else:
        r = _run_in_root("import kernels; print(kernels.__file__)")
        assert r.returncode == 0, r.stderr
        assert os.path.realpath(r.stdout.strip()) == os.path.realpath(origin)


ABSENT = ("import importlib.util\n"
          "import kernels\n"
          "print(kernels, importlib.util.find_spec('kernels'))\n"
          "import kernels\n")


def _assert_absent(r):
    """What ABSENT printed and raised: Python's mark of a missing module, None, and then ModuleNotFoundError."""
    assert r.stdout.split() == ["None", "None"], (r.stdout, r.stderr)
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr and "None in sys.modules" in r.stderr, r.stderr


def test_without_site_packages_the_top_level_name_is_missing_not_ours():
    # -S: no site-packages, so no HF kernels; the name must then be missing, not this repository's package: the
    # first import gives None, find_spec finds nothing, and a later import raises ModuleNotFoundError
    _assert_absent(_run_in_root(ABSENT, "-S"))


def test_an_availability_probe_that_imports_reads_it_as_not_installed():
    """transformers 5.17 (the lent GPU machine's) probes an optional package by find_spec, then its metadata, and,
    finding none, imports it and lets any error through; it reads a module with no __version__ and no __file__
    as not installed. That probe, written out here, ran in every LlamaConfig import: with kernels/ raising
    ModuleNotFoundError every config build from the root failed. -S: HF's kernels is not there to hand over to."""
    code = ("import importlib, importlib.util, importlib.metadata\n"
            "assert importlib.util.find_spec('kernels') is not None\n"  # the folder is found first
            "try:\n"
            "    importlib.metadata.version('kernels')\n"
            "    raise SystemExit('metadata found: the probe would not import')\n"
            "except importlib.metadata.PackageNotFoundError:\n"
            "    pass\n"
            "package = importlib.import_module('kernels')\n"
            "exists = not (getattr(package, '__version__', 'N/A') == 'N/A' and getattr(package, '__file__', None) is None)\n"
            "print(exists, importlib.util.find_spec('kernels'))\n")
    r = _run_in_root(code, "-S")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "None"], r.stdout


def test_transformers_config_and_pllava_kernels_load_from_the_root():
    pytest.importorskip("transformers")
    code = ("import pllava.kernels as k\n"
            "from transformers import CONFIG_MAPPING\n"
            "print(CONFIG_MAPPING['llama'].__name__, k.__name__, k.lora_linear.__name__)")
    r = _run_in_root(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["LlamaConfig", "pllava.kernels", "lora_linear"]


def test_every_docstring_is_utf8_text():
    """Python 3.13 dedents docstrings as it compiles them, through UTF-8: a docstring holding a lone surrogate (the
    escape '\\udce9' written unescaped in one) made `import pllava.captioning` raise UnicodeEncodeError there, and
    with it `pllava caption`, while 3.11 (CI's) compiles it silently. Every module, class and function docstring
    of the package, its kernels, tests and benchmarks must encode."""
    import ast

    bad = []
    for top in ("engine", "kernels", "tests", "benchmarks"):
        for root, _, files in os.walk(os.path.join(ROOT, top)):
            for f in sorted(files):
                if not f.endswith(".py"):
                    continue
                path = os.path.join(root, f)
                tree = ast.parse(open(path, encoding="utf-8").read(), path)
                for node in [tree] + [n for n in ast.walk(tree) if isinstance(
                        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]:
                    doc = ast.get_docstring(node, clean=False)
                    try:
                        (doc or "").encode("utf-8")
                    except UnicodeEncodeError:
                        bad.append(f"{os.path.relpath(path, ROOT)}:{getattr(node, 'lineno', 1)}")
    assert not bad, f"docstrings that are not UTF-8 text (a lone surrogate): {bad}"
