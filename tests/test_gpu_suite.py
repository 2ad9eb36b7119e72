"""benchmarks/gpu_suite.sh on a machine without a GPU: with stand-in commands that fail, the suite must still run
every part, exit 1 and name each failed part (a failing pytest behind `| tee` must not pass for success)."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake(bin_dir: Path, name: str, body: str):
    p = bin_dir / name
    p.write_text("#!/usr/bin/env bash\n" + body + "\n")
    p.chmod(0o755)


def _suite(tmp_path, python_body):
    b = tmp_path / "bin"
    b.mkdir()
    _fake(b, "nvidia-smi", 'echo "name, memory.total, driver_version"; echo "FakeGPU, 1 MiB, 0"')
    _fake(b, "fakepython", python_body)
    env = dict(os.environ, PATH=f"{b}:{os.environ['PATH']}", PYTHON=str(b / "fakepython"), OUT=str(tmp_path / "out"))
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True,
                          env=env, timeout=120, stdin=subprocess.DEVNULL)


def test_failing_parts_fail_the_suite_by_name(tmp_path):
    # pytest-like stand-in: the GPU tests fail (exit 1 after printing a failure); everything else succeeds
    r = _suite(tmp_path, 'cat >/dev/null 2>&1 || true\n'
                         'if [[ "$*" == *tests/test_gpu.py* ]]; then echo "1 failed, 3 passed"; exit 1; fi\n'
                         'if [[ "$*" == *bench_kernels* ]]; then echo "| k | 1 |"; exit 0; fi\n'
                         'echo "device copy bandwidth: 100 GB/s"; exit 0')
    assert r.returncode == 1, r.stdout[-2000:]
    assert "GPU suite: " in r.stdout and "part(s) failed" in r.stdout
    failed = r.stdout.split("part(s) failed:")[1]
    assert "GPU tests" in failed and "exit 1" in failed
    assert "kernel benchmarks" not in failed  # a part that passed is not blamed
    assert "== pllava-7b continuous batching" in r.stdout  # later parts still ran


def test_all_parts_passing_exits_zero(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench_pllava-7b.json").write_text('{"rows": []}')
    r = _suite(tmp_path, 'cat >/dev/null 2>&1 || true\necho "device copy bandwidth: 100 GB/s"; exit 0')
    assert r.returncode == 0, r.stdout[-3000:]
    assert "every part passed" in r.stdout


def test_a_budget_kills_the_part_that_overruns_and_names_what_did_not_run(tmp_path):
    """SUITE_BUDGET_S (a lent machine's per-call limit): the part that runs past it is killed and named "timed out",
    the parts after it are named "not run", the summary still runs, and the suite ends within the budget."""
    import time

    b = tmp_path / "bin"
    b.mkdir()
    _fake(b, "nvidia-smi", 'echo "FakeGPU"')
    _fake(b, "fakepython", 'cat >/dev/null 2>&1 || true\n'
                           'if [[ "$*" == *tests/test_gpu.py* ]]; then echo "collecting"; exec sleep 60; fi\n'
                           'echo "ok"; exit 0')
    env = dict(os.environ, PATH=f"{b}:{os.environ['PATH']}", PYTHON=str(b / "fakepython"), OUT=str(tmp_path / "out"),
               SUITE_BUDGET_S="4", SUITE_RESERVE_S="1")
    t = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True, env=env,
                       timeout=60, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t
    assert r.returncode == 1, r.stdout[-2000:]
    failed = r.stdout.split("part(s) failed:")[1]
    assert "GPU tests" in failed and "timed out at the suite's 4 s budget" in failed
    assert "kernel benchmarks (not run: the suite's 4 s budget was spent)" in failed
    assert "== summary" in r.stdout  # the reserve is the summary's
    assert "GPU info" not in failed
    assert took < 4 + 5 + 3, took  # the budget, timeout's kill-after, slack for a loaded machine


def test_the_device_command_refuses_to_start_without_wheels(tmp_path):
    """benchmarks/device_suite.sh on a checkout without .whl/: one line that says what to run, exit 2, nothing run."""
    import shutil

    work = tmp_path / "repo"
    (work / "benchmarks").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "device_suite.sh", work / "benchmarks")
    r = subprocess.run(["bash", str(work / "benchmarks" / "device_suite.sh")], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "no wheels in .whl/" in r.stdout and "device-wheels.sh" in r.stdout
