"""tests/fake_cuda.py, the CPU-backed CUDA stand-in, fails where a GPU would (a CPU tensor meeting a cuda one, a host
sync or upload inside a graph capture, a replay that does not re-run the captured work) and rounds where a GPU's
tensor cores would (TF32), and the GPU suite's test modules pass under it, tests/test_gpu.py's CUDA branches
included (Triton launches on cuda tensors, CUDA-graph capture and replay of the single and the batched decode step)
on this GPU-less machine. Each run is a subprocess: the stand-in patches torch process-wide."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.cpp_extension import is_ninja_available

TESTS = os.path.dirname(os.path.abspath(__file__))
pytestmark = [pytest.mark.skipif(torch.backends.cuda.is_built(), reason="the stand-in needs a CPU-only torch"),
              pytest.mark.skipif(not (is_ninja_available() and shutil.which("g++")),
                                 reason="the stand-in's device guard is built with g++ and ninja")]


def _env() -> dict:  # the stand-in is imported (or loaded as a pytest plugin) from tests/
    return {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=timeout)


def _ok(code: str, timeout: int = 300) -> str:
    r = _python(code, timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_a_cpu_tensor_meeting_a_cuda_one_raises_as_on_a_gpu():
    out = _ok("""
import fake_cuda, torch
x = torch.arange(4.0, device="cuda")
assert x.device.type == "cuda" and x.is_cuda
try:
    x + torch.ones(4)
    raise SystemExit("mixed devices were accepted")
except RuntimeError as e:
    assert "same device" in str(e), e
y = x * torch.tensor(2.0) + 1                        # a 0-dim CPU tensor is a scalar on a GPU too
z = x[torch.tensor([3, 0])]                         # CPU indices are allowed
w = torch.tensor([1.0, 2.0], device="cuda").to(torch.float16)
print(y.cpu().tolist(), z.cpu().tolist(), w.device, torch.ones(2).cuda().sum().item())
""")
    assert out.split() == ["[1.0,", "3.0,", "5.0,", "7.0]", "[3.0,", "0.0]", "cuda:0", "2.0"]


def test_a_capture_refuses_host_syncs_and_uploads_and_a_replay_reruns_the_work():
    out = _ok("""
import fake_cuda, torch
x = torch.zeros(3, device="cuda")
for name, bad in [("item", lambda: x.sum().item()), ("cpu", lambda: x.cpu()), ("tolist", lambda: x.tolist()),
                  ("upload", lambda: x.copy_(torch.ones(3))),
                  ("new tensor", lambda: torch.tensor([1.0], device="cuda")),
                  ("synchronize", lambda: torch.cuda.synchronize())]:
    g = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g):
            bad()
        raise SystemExit(name + " was allowed in a capture")
    except fake_cuda.CaptureError:
        pass
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    out = x * 2 + 1
    x.add_(1)                                        # in place: every replay adds again
x.copy_(torch.tensor([1.0, 2.0, 3.0]))
g.replay()
a = out.cpu().tolist(), x.cpu().tolist()
g.replay()
print(a, out.cpu().tolist(), x.cpu().tolist())
""")
    assert out.strip() == "([3.0, 5.0, 7.0], [2.0, 3.0, 4.0]) [5.0, 7.0, 9.0] [3.0, 4.0, 5.0]"


def test_a_captured_triton_launch_is_replayed():
    out = _ok("""
import fake_cuda, torch, triton, triton.language as tl

@triton.jit
def add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)

x, y = torch.zeros(5, device="cuda"), torch.empty(5, device="cuda")
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    add_one[(1,)](x, y, 5, BLOCK=8)
x.copy_(torch.arange(5.0))
g.replay()
print(y.cpu().tolist(), fake_cuda.STATS["triton_launches"])
""")
    assert out.strip() == "[1.0, 2.0, 3.0, 4.0, 5.0] 2"


def test_tf32_where_cuda_uses_it():
    """An fp32 conv on cuda has TF32's error (cuDNN's default), a GEMM fp32's unless matmul TF32 is allowed; the
    rounding is the tensor cores' (to nearest, ties away from zero)."""
    out = _ok("""
import fake_cuda, torch, torch.nn.functional as F
g = torch.Generator().manual_seed(0)
x, w = torch.randn(2, 3, 28, 28, generator=g), torch.randn(8, 3, 14, 14, generator=g) * 0.1
a, b = torch.randn(64, 256, generator=g), torch.randn(256, 32, generator=g)
err = lambda got, ref: float((got.cpu().double() - ref).abs().max())
conv64, mm64 = F.conv2d(x.double(), w.double(), stride=14), a.double() @ b.double()
print(err(F.conv2d(x, w, stride=14), conv64), err(F.conv2d(x.cuda(), w.cuda(), stride=14), conv64))
print(err(a @ b, mm64), err(a.cuda() @ b.cuda(), mm64))
torch.backends.cuda.matmul.allow_tf32 = True
print(err(a.cuda() @ b.cuda(), mm64), fake_cuda.STATS["tf32"])
print(fake_cuda.tf32(torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, -(1 + 2**-11), 1 + 2**-12, float("inf")])).tolist())
torch.backends.cudnn.conv.fp32_precision = "ieee"   # torch's newer API: a conv in IEEE fp32 again
print(err(F.conv2d(x.cuda(), w.cuda(), stride=14), conv64))
""")
    lines = out.split("\n")
    (cpu_conv, cuda_conv), (cpu_mm, cuda_mm), (cuda_mm_tf32, n_tf32) = (
        [float(v) for v in line.split()] for line in lines[:3])
    assert cuda_conv > 100 * cpu_conv and cuda_mm < 4 * cpu_mm + 1e-12 and cuda_mm_tf32 > 100 * cpu_mm, out
    assert n_tf32 == 2, out
    assert lines[3] == str([1 + 2**-10, 1 + 2**-9, -(1 + 2**-10), 1.0, float("inf")]), out
    assert float(lines[4]) < 4 * cpu_conv, out


def test_a_triton_dot_at_its_default_precision_is_tf32_as_on_a_gpu():
    """The interpreter ignores tl.dot's input_precision; the stand-in rounds fp32 operands of a "tf32" dot (Triton's
    default) as the tensor cores do, and leaves "ieee" ones and bf16 ones alone."""
    out = _ok("""
import fake_cuda, torch, triton, triton.language as tl

@triton.jit
def dot(a_ptr, b_ptr, c_ptr, IEEE: tl.constexpr):
    i = tl.arange(0, 16)
    a, b = tl.load(a_ptr + i[:, None] * 16 + i[None, :]), tl.load(b_ptr + i[:, None] * 16 + i[None, :])
    acc = tl.zeros((16, 16), tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + i[:, None] * 16 + i[None, :], acc)

g = torch.Generator().manual_seed(0)
a, b = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
ref = a.double() @ b.double()
c = torch.empty(16, 16, device="cuda")
errs = []
for ieee in (True, False):
    dot[(1,)](a.cuda(), b.cuda(), c, IEEE=ieee)
    errs.append(float((c.cpu().double() - ref).abs().max()))
dot[(1,)](a.bfloat16().cuda(), b.bfloat16().cuda(), c, IEEE=False)
print(*errs, fake_cuda.STATS["tf32"])
""")
    ieee, tf32, n = (float(v) for v in out.split())
    assert tf32 > 100 * ieee and n == 1, out


def test_the_engine_on_the_stand_in_graphs_equal_eager_and_a_sync_in_the_step_is_caught(ckpts):
    out = _ok(f"""
import fake_cuda, torch, pllava, pllava.generate as G
px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(3))
eng = pllava.Engine.from_pretrained({ckpts["pllava"]!r}, device="cuda", dtype=torch.float32)
assert eng.device.type == "cuda" and eng.model.language_model.lm_head.weight.is_cuda
eager = eng.generate(px, "hi", max_new_tokens=6).token_ids
eng.cuda_graphs = True
graphs = eng.generate(px, "hi", max_new_tokens=6).token_ids
assert fake_cuda.STATS["captures"] == 1 and fake_cuda.STATS["replays"] == 5, fake_cuda.STATS
assert fake_cuda.STATS["tf32"] == 0, fake_cuda.STATS  # an fp32 engine is fp32 on CUDA: no op TF32 would round
real = G.decode_one_token
G.decode_one_token = lambda lm, tok, pos, kv_len=None: (int(pos[0]), real(lm, tok, pos, kv_len))[1]
eng._step = None
try:
    eng.generate(px, "hi", max_new_tokens=3)
    raise SystemExit("a host sync in the captured step went unseen")
except fake_cuda.CaptureError:
    pass
cpu = pllava.Engine.from_pretrained({ckpts["pllava"]!r}, device="cpu")
print(eager == graphs == cpu.generate(px, "hi", max_new_tokens=6).token_ids)
""")
    assert out.strip().endswith("True")


def test_the_gpu_suites_tests_pass_on_the_stand_in():
    """benchmarks/gpu_tests.txt, the GPU suite's test modules, on the stand-in: each is written for a GPU (no CPU
    tensor meets a cuda one, no Triton launch takes CPU tensors, no host sync in a capture), and test_gpu.py's
    CUDA branches run (6 tests that skip everywhere else)."""
    root = os.path.dirname(TESTS)
    with open(os.path.join(root, "benchmarks", "gpu_tests.txt")) as f:
        modules = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert "tests/test_gpu.py" in modules
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "fake_cuda", "-p", "no:cacheprovider", "-rfEs",
                        *modules], cwd=root, capture_output=True, text=True, timeout=1200, env=_env())
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail and "fake CUDA: ops" in tail, tail
    assert "captures 0" not in tail and "triton_launches 0" not in tail, tail  # the graphs and kernels ran


def test_the_gpu_suites_benchmark_runs_on_the_stand_in(tmp_path):
    """`pllava bench` as gpu_suite.sh runs it (CUDA graphs on, the transformers baseline beside), at the tiny
    preset: its CUDA branches (timing syncs, peak memory, the baseline on cuda, the graph-captured step) end in the
    table and the JSON, with the step captured and replayed."""
    out = _ok(f"""
import json, os, sys
os.environ["PLLAVA_CUDA_GRAPHS"] = "1"
import fake_cuda
from pllava.cli import main
rc = main(["bench", "--preset", "tiny", "--device", "cuda", "--frames", "1", "--runs", "1", "--new-tokens", "4",
           "--out", {str(tmp_path)!r}])
rows = json.load(open(os.path.join({str(tmp_path)!r}, "bench_tiny.json")))["rows"]
print("RESULT", rc, sorted(r["system"] for r in rows), fake_cuda.STATS["captures"], fake_cuda.STATS["replays"] >= 3)
""", timeout=600)
    assert "RESULT 0 ['pllava-engine', 'transformers'] 1 True" in out, out[-2000:]
