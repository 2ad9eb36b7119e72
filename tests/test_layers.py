"""Imports point one way (ARCHITECTURE.md): kernels <- model <- generate / scheduler <- runtime <- CLI, server,
captioning. Read from the source with `ast` (top-level and in-function imports alike), so a module that reaches up a
layer fails here, not as an import cycle some day; a new module must be placed in LAYERS. Also: the engine never
imports Triton itself (the kernels do, behind pllava.kernels), and pllava.kernels imports nothing of the engine."""
import ast
import glob
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first; a module may import its own layer and the ones below it
LAYERS = [
    {"errors", "config", "testing", "_C"},
    {"kernels", "ops", "memory"},
    {"checkpoint", "model", "preprocess", "prompt", "sources", "chat"},
    {"video", "live", "media", "generate", "loading", "slots", "batch_graphs"},
    {"sequence", "scheduler", "batch_driver", "protocol"},
    {"runtime"},
    {"bench", "bench_batch", "captioning", "distributed", "server", "cli", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules():
    """{dotted name under pllava: path}: engine/ is the package pllava, kernels/ is pllava.kernels."""
    out = {}
    for path in glob.glob(os.path.join(ROOT, "engine", "**", "*.py"), recursive=True):
        rel = os.path.relpath(path, os.path.join(ROOT, "engine"))[:-3].replace(os.sep, ".")
        out["pllava" if rel == "__init__" else "pllava." + rel.removesuffix(".__init__")] = path
    for path in glob.glob(os.path.join(ROOT, "kernels", "*.py")):
        rel = os.path.basename(path)[:-3]
        out["pllava.kernels" if rel == "__init__" else "pllava.kernels." + rel] = path
    return out


MODULES = _modules()


def _imports(name: str, path: str):
    """Absolute names of what a module imports (a `from X import y` counts y when X.y is a module)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES or a.name == "_C"]
            yield from subs or [base]


def _layer_of(mod: str) -> str:
    """pllava.model.llm -> model, pllava.kernels.lora_linear -> kernels, pllava -> __init__."""
    parts = mod.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_module_is_placed_in_a_layer():
    missing = sorted({_layer_of(m) for m in MODULES} - set(RANK))
    assert not missing, f"modules in no layer of tests/test_layers.py: {missing}"
    assert len(MODULES) > 30 and "pllava.model.llm" in MODULES and "pllava.kernels.lora_linear" in MODULES


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    mine = RANK[_layer_of(name)]
    up = sorted({m for m in _imports(name, MODULES[name])
                 if m.split(".")[0] == "pllava" and RANK.get(_layer_of(m), -1) > mine})
    assert not up, f"{name} (layer {mine}) imports {up}, a layer above it"


def test_the_engine_never_imports_triton_and_the_kernels_nothing_of_the_engine():
    for name, path in MODULES.items():
        deps = set(_imports(name, path))
        if name.startswith("pllava.kernels"):
            engine = sorted(m for m in deps if m.startswith("pllava.") and not m.startswith("pllava.kernels"))
            assert not engine, f"{name} imports {engine}"
        else:
            assert not any(m.split(".")[0] == "triton" for m in deps), f"{name} imports triton"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The control: a model module importing the runtime is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from ..runtime import Engine\n\ndef f():\n    from pllava import server\n")
    monkeypatch.setitem(MODULES, "pllava.model.bad", str(bad))
    deps = set(_imports("pllava.model.bad", str(bad)))
    assert {"pllava.runtime", "pllava.server"} <= deps
    with pytest.raises(AssertionError, match=r"pllava.model.bad \(layer 2\) imports \['pllava.runtime', "
                                             r"'pllava.server'\]"):
        test_imports_point_down("pllava.model.bad")
