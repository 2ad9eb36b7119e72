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
