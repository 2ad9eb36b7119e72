"""pllava._C's int8 GEMV (fp32 activations, the CPU's int8 decode rows) against references computed here: integer
inputs whose products and sums fp32 holds exactly (so every output is exact, whatever the summation order), and
random floats against fp64 within twice torch's own fp32 error."""
import os
import shutil

import pytest
import torch

import pllava
from asan_util import run_under_asan
from pllava.model.quant import int8_linear, native_int8_available, quantize_weight

native = pytest.mark.skipif(not native_int8_available(), reason="pllava._C is not built")

# M up to DECODE_ROWS (16), with row counts off the kernel's 4-row tile; K off its 16-wide vector (tails of 1 and
# 15), N off its 4-row tile; a row past 2048 bytes (the default prefetch, one 4-row tile ahead, is then past 8 KB)
SHAPES = [(1, 1, 1), (1, 5, 17), (3, 4, 16), (4, 9, 31), (5, 13, 64), (13, 7, 100), (16, 33, 257), (2, 130, 15),
          (3, 6, 2100)]


def _c():
    from pllava import _C

    return _C


def _run(x, q, s, generic, ldy=None, out=None, prefetch=-1):
    """Calls the kernel on x's own row stride, writing into `out` (rows of ldy) when given."""
    m, k = x.shape
    n = q.shape[0]
    y = torch.full((m, ldy or n), float("nan")) if out is None else out
    _c().int8_gemv(x.data_ptr(), x.stride(0), q.data_ptr(), s.data_ptr(), y.data_ptr(), y.stride(0), m, n, k, 2,
                   generic, prefetch)
    return y


def _bf16_run(x, w, generic, alpha=0.5, accumulate=False, out=None, prefetch=-1):
    """bf16_gemv on x's own row stride: alpha * x . w^T written (or added, accumulate) into `out` when given."""
    m, k = x.shape
    y = torch.full((m, w.shape[0]), float("nan")) if out is None else out
    _c().bf16_gemv(x.data_ptr(), x.stride(0), w.data_ptr(), alpha, accumulate, y.data_ptr(), y.stride(0), m,
                   w.shape[0], k, 2, generic, prefetch)
    return y


@native
@pytest.mark.parametrize("prefetch", [-1, 0, 64, 1 << 20])  # the default for K, none, one line, past q's end
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_gemv_is_exact_on_integer_inputs(m, n, k, native_isa, prefetch):
    generic = native_isa == "generic"
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    wide = torch.randint(-8, 9, (m, k + 3), generator=g).float()
    x = wide[:, 1:k + 1]  # a row stride of k + 3: the kernel must honour ldx
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = 2.0 ** torch.randint(-6, 3, (n,), generator=g).float()  # powers of two: the scaling is exact too
    want = (x.long() @ q.long().T).double() * s.double()  # |sums| <= 257 * 8 * 127 < 2^24: exact in fp32
    y = _run(x, q, s, generic, ldy=n + 2, prefetch=prefetch)  # two columns past N that must stay untouched
    assert torch.equal(y[:, :n].double(), want), (y[:, :n] - want).abs().max()
    assert torch.isnan(y[:, n:]).all(), "wrote past N"


@native
@pytest.mark.parametrize("prefetch", [-1, 0, 1 << 20])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_bf16_gemv_is_exact_on_integer_inputs(m, n, k, native_isa, prefetch):
    """bf16 weights (integers to 127: exact in bf16) widened, times fp32 x, times a power-of-two alpha, written or
    added onto y: every output exact, so any lane, tail, row or accumulate slip shows."""
    generic = native_isa == "generic"
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k + 1)
    x = torch.randint(-8, 9, (m, k + 3), generator=g).float()[:, 1:k + 1]  # row stride k + 3
    w = torch.randint(-127, 128, (n, k), generator=g).bfloat16()
    prod = (x.long() @ w.long().T).double()
    for alpha, accumulate in ((1.0, False), (0.25, True), (-4.0, False)):
        y = torch.full((m, n + 2), float("nan"))
        if accumulate:
            y[:, :n] = torch.randint(-50, 50, (m, n), generator=g).float()
        before = y[:, :n].double().clone()
        _bf16_run(x, w, generic, alpha, accumulate, y, prefetch)
        want = alpha * prod + (before if accumulate else 0)
        assert torch.equal(y[:, :n].double(), want), (alpha, accumulate, (y[:, :n] - want).abs().max())
        assert torch.isnan(y[:, n:]).all(), "wrote past N"


@native
@pytest.mark.parametrize("m,n,k", [(1, 300, 4096), (7, 64, 1000), (16, 40, 513)])
def test_int8_gemv_float_error_is_fp32s(m, n, k, native_isa):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g)
    q, s = quantize_weight(torch.randn(n, k, generator=g) * 0.02)
    s = s.float()
    w = q.float() * s[:, None]
    exact = x.double() @ (q.double() * s.double()[:, None]).T
    peak = float(exact.abs().max())
    e_torch = float((torch.nn.functional.linear(x, w).double() - exact).abs().max()) / peak
    e = float((_run(x.contiguous(), q, s, native_isa == "generic").double() - exact).abs().max()) / peak
    print(f"\n{m}x{n}x{k} {native_isa}: {e:.2e} against torch fp32's {e_torch:.2e}")
    assert e <= 2 * e_torch + 2 ** -23, (native_isa, e, e_torch)  # + an ulp: torch's may round to 0 on a shape


@native
def test_the_custom_op_is_consistent_and_refuses_bad_arguments():
    q, s = quantize_weight(torch.randn(12, 40))
    x = torch.randn(3, 40)
    torch.library.opcheck(torch.ops.pllava.int8_gemv_cpu, (x, q, s.float()))
    with pytest.raises(ValueError, match="x must be a 2-D float32"):
        torch.ops.pllava.int8_gemv_cpu(x.bfloat16(), q, s.float())
    with pytest.raises(ValueError, match=r"q must be an int8 CPU \(N, 40\)"):
        torch.ops.pllava.int8_gemv_cpu(x, q[:, :39], s.float())
    with pytest.raises(ValueError, match=r"scale must be a float \(12,\)"):
        torch.ops.pllava.int8_gemv_cpu(x, q, s.float()[:11])
    with pytest.raises(ValueError, match="ldx >= K"):
        _c().int8_gemv(x.data_ptr(), 39, q.data_ptr(), s.data_ptr(), x.data_ptr(), 12, 3, 12, 40, 1, False)


@native
@pytest.mark.parametrize("lora_dtype", [torch.bfloat16, torch.float32])
def test_the_op_with_bias_and_lora_is_the_fp64_product(lora_dtype):
    """pllava::int8_gemv_cpu with the bias and the LoRA (what the compiled step calls, one op a linear): the fp64
    x · (q · s)ᵀ + bias + alpha · x · Aᵀ · Bᵀ of the stored factors within fp32's error for a 0-dim scale (bf16
    factors: pllava._C's bf16 GEMV where AVX-512 runs, else torch's bf16 GEMM within bf16's error), a per-row scale
    too; opcheck's fake and schema checks; a half-given LoRA refused by name."""
    g = torch.Generator().manual_seed(6)
    q, s = quantize_weight(torch.randn(20, 72, generator=g), torch.bfloat16)
    bias = torch.randn(20, generator=g)
    a_, b_ = torch.randn(8, 72, generator=g).to(lora_dtype), torch.randn(20, 8, generator=g).to(lora_dtype)
    x = torch.randn(3, 72, generator=g)
    deq = q.double() * s.double()[:, None]
    prod = x.double() @ a_.double().T @ b_.double().T
    fast = lora_dtype == torch.float32 or native_int8_available(torch.bfloat16)
    for sc in (torch.tensor(0.75), torch.tensor([0.25, 1.5, 3.0])):
        delta = sc.double().reshape(-1, 1) * prod
        want = x.double() @ deq.T + bias.double() + delta
        got = torch.ops.pllava.int8_gemv_cpu(x, q, s, bias, a_, b_, sc)
        err = float((got.double() - want).abs().max() / delta.abs().max())
        # fp32 throughout: fp32's error (0.9-1.1e-7 of the delta measured, every case); a bf16 path rounds x, each
        # product and the delta (2^-9 each), which only a CPU without AVX-512 or AVX2 takes for bf16 factors
        bound = 1e-6 if fast else 4 * 2 ** -9
        assert got.dtype == torch.float32 and err < bound, (sc, err)
        torch.library.opcheck(torch.ops.pllava.int8_gemv_cpu, (x, q, s, bias, a_, b_, sc))
    with pytest.raises(ValueError, match="lora_a, lora_b and lora_scale together"):
        torch.ops.pllava.int8_gemv_cpu(x, q, s, None, a_, None, torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"LoRA factors must be \(r, 72\) and \(20, r\)"):
        torch.ops.pllava.int8_gemv_cpu(x, q, s, None, a_, b_[:, :7], torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"bias must be \(20,\)"):
        torch.ops.pllava.int8_gemv_cpu(x, q, s, bias[:19])


@native
def test_decode_rows_come_back_in_fp32_with_the_lora_at_its_scale():
    """int8_linear for <= 16 rows on the CPU: fp32 out from bf16 or fp32 in, bias and LoRA added, the base product
    the fp32 one (not bf16-rounded)."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(24, 48, generator=g), torch.randn(24, generator=g)
    a_, b_ = torch.randn(4, 48, generator=g), torch.randn(24, 4, generator=g)
    q, s = quantize_weight(w)
    x = torch.randn(2, 3, 48, generator=g)  # 6 rows
    scale = torch.tensor(0.5)
    y = int8_linear(x, q, s, b, (a_, b_, scale))
    assert y.dtype == torch.float32 and y.shape == (2, 3, 24)
    deq = q.double() * s.double()[:, None]
    want = x.double() @ deq.T + b.double() + 0.5 * (x.double() @ a_.double().T @ b_.double().T)
    assert float((y - want).abs().max() / want.abs().max()) < 1e-5
    y16 = int8_linear(x.bfloat16(), q, s.bfloat16(), b.bfloat16())
    if not native_int8_available(torch.bfloat16):  # no vector path here: torch's bf16 GEMV keeps bf16 rows
        assert y16.dtype == torch.bfloat16
        return
    want16 = x.bfloat16().double() @ (q.double() * s.bfloat16().double()[:, None]).T + b.bfloat16().double()
    assert y16.dtype == torch.float32
    assert float((y16 - want16).abs().max() / want16.abs().max()) < 1e-5  # no bf16 rounding of the output


@native
@pytest.mark.skipif(not native_int8_available(torch.bfloat16), reason="the bf16 LoRA kernel runs with AVX-512")
def test_a_bf16_lora_on_decode_rows_is_exact_in_fp32():
    """A bf16 engine's LoRA (bf16 A and B) on fp32 decode rows: pllava._C's bf16 GEMV widens the factors exactly and
    keeps x in fp32, so the delta is the fp64 product of x and the bf16 factors to fp32's error, where torch's bf16
    GEMM rounded x (and the partial product) to bf16: ~1e-3. So does a per-row scale (a batch, one alpha a row)."""
    g = torch.Generator().manual_seed(4)
    q, s = quantize_weight(torch.randn(40, 96, generator=g), torch.bfloat16)
    a_, b_ = torch.randn(16, 96, generator=g).bfloat16(), torch.randn(40, 16, generator=g).bfloat16()
    x = torch.randn(3, 96, generator=g)  # fp32 rows, as the norms give them
    deq = q.double() * s.double()[:, None]

    def want(sc):
        return x.double() @ deq.T + sc * (x.double() @ a_.double().T @ b_.double().T)

    y = int8_linear(x, q, s, None, (a_, b_, torch.tensor(0.25)))
    ref = want(0.25)
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert y.dtype == torch.float32 and err < 1e-6, err
    rows = torch.tensor([0.25, 0.5, 2.0])  # one scale a row (the batched scheduler's rows): the same kernel
    yr = int8_linear(x, q, s, None, (a_, b_, rows))
    delta = rows.double()[:, None] * (x.double() @ a_.double().T @ b_.double().T)
    refr = x.double() @ deq.T + delta
    err = float((yr.double() - refr).abs().max() / delta.abs().max())
    assert err < 1e-6, err  # 8.8e-8 measured; torch's bf16 lora_delta, which this path replaced, gave 3.0e-3


def test_without_the_extension_decode_rows_use_torchs_int8_gemv_and_say_so(ckpts, monkeypatch, caplog):
    from pllava import ops
    from pllava.model import quant

    monkeypatch.setattr(quant, "_native", lambda: (None, None))
    monkeypatch.setattr(ops, "_logged", set())
    q, s = quantize_weight(torch.randn(24, 48).bfloat16())
    x = torch.randn(2, 48).bfloat16()
    with caplog.at_level("INFO", logger="pllava"):
        y = int8_linear(x, q, s, None)
        eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int8")
    assert y.dtype == torch.bfloat16  # _weight_int8pack_mm keeps the activations' dtype
    assert torch.equal(y, torch._weight_int8pack_mm(x, q, s))
    assert "torch._weight_int8pack_mm in the activations' dtype (pllava._C is not built)" in caplog.text
    assert "torch._weight_int8pack_mm for decode rows (pllava._C is not built)" in caplog.text
    assert all(m.fp32_rows == 0 for m in eng.model.language_model.modules() if hasattr(m, "fp32_rows"))


@native
def test_without_a_vector_path_bf16_decode_rows_keep_torchs_bf16_gemv(monkeypatch, caplog):
    """The portable loop is slower than torch's bf16 GEMV: a bf16 engine keeps bf16 decode rows there, an fp32 one
    (whose alternative is torch's slow fp32 int8 GEMV) still takes the extension."""
    from pllava import ops
    from pllava.model import quant

    C = quant._native()[0]

    class Portable:  # the extension on a CPU without AVX-512 or AVX2
        @staticmethod
        def int8_gemv(*a):
            return C.int8_gemv(*a[:10], True)

    monkeypatch.setattr(quant, "_native", lambda: (Portable, "generic"))
    monkeypatch.setattr(ops, "_logged", set())
    assert native_int8_available(torch.float32) and not native_int8_available(torch.bfloat16)
    q, s = quantize_weight(torch.randn(24, 48))
    x = torch.randn(2, 48)
    with caplog.at_level("INFO", logger="pllava"):
        y16 = int8_linear(x.bfloat16(), q, s.bfloat16(), None)
        y32 = int8_linear(x, q, s, None)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, torch._weight_int8pack_mm(x.bfloat16(), q, s.bfloat16()))
    want = x.double() @ (q.double() * s.double()[:, None]).T
    assert y32.dtype == torch.float32 and float((y32 - want).abs().max() / want.abs().max()) < 1e-6
    assert "pllava._C is built without AVX-512 or AVX2 here" in caplog.text and "int8 GEMV (generic)" in caplog.text


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_int8_gemv_under_address_sanitizer(tmp_path):
    run_under_asan(tmp_path, "int8_gemv.cpp", "asan_int8_gemv.cpp", "asan int8 gemv: ok")


@native
def test_pllava_cpu_isa_caps_the_vector_path_and_names_a_bad_value():
    import subprocess
    import sys

    code = ("import torch\nfrom pllava.model.quant import _native, native_int8_available\n"
            "print(_native()[1], native_int8_available(torch.bfloat16))")
    env = dict(os.environ, PLLAVA_CPU_ISA="generic")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["generic", "False"], r.stderr
    env["PLLAVA_CPU_ISA"] = "sse9"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "ConfigError: PLLAVA_CPU_ISA='sse9'" in r.stderr, r.stderr


@native
@pytest.mark.parametrize("m,n,k", [(16, 9, 2100), (7, 5, 777), (5, 6, 33)])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(m, n, k, native_isa):
    """Random floats (rounding everywhere): each row of an M-row call has the bits of that row alone (M = 1, the
    1 x 4 tile) on every path, int8 and bf16 weights. This is what lets generate_many's batched decode rows give
    generate()'s tokens; a tile whose sum order depended on its rows (e.g. splitting K differently for M > 1)
    would break it while staying inside any fp32 tolerance."""
    generic = native_isa == "generic"
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g)
    q, s = quantize_weight(torch.randn(n, k, generator=g) * 0.02)
    s = s.float()
    w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
    batch, batch16 = _run(x, q, s, generic), _bf16_run(x, w, generic)
    for i in range(m):
        row = x[i:i + 1].clone()
        assert torch.equal(batch[i:i + 1], _run(row, q, s, generic)), (native_isa, "int8", i)
        assert torch.equal(batch16[i:i + 1], _bf16_run(row, w, generic)), (native_isa, "bf16", i)


@native
def test_the_avx2_and_avx512_paths_give_the_same_bits():
    """The AVX2 tiles keep each output's 16 lane sums (k mod 16) as two 8-lane halves and reduce them as AVX-512's
    _mm512_reduce_add_ps does (halves, then quarters, ...): the decode rows' linears give the same bits on a CPU
    with AVX-512 as on one with AVX2 only (other kernels, torch's and the decode attention, need not). Random
    floats, tails and row counts off the tiles."""
    C = _c()
    if C.cpu_isa_supported() != "avx512":
        pytest.skip(f"this CPU does not run avx512 (best: {C.cpu_isa_supported()})")
    g = torch.Generator().manual_seed(11)
    for m, n, k in [(1, 300, 4096), (16, 9, 2100), (3, 7, 31), (6, 13, 1000)]:
        x = torch.randn(m, k, generator=g)
        q, s = quantize_weight(torch.randn(n, k, generator=g) * 0.02)
        w = (torch.randn(n, k, generator=g) * 0.02).bfloat16()
        out = {}
        try:
            for isa in ("avx512", "avx2"):
                C.set_isa_cap(isa)
                out[isa] = (_run(x, q, s.float(), False), _bf16_run(x, w, False))
        finally:
            C.set_isa_cap("best")
        for a, b, kind in zip(out["avx512"], out["avx2"], ("int8", "bf16")):
            assert torch.equal(a, b), ((m, n, k), kind, (a - b).abs().max())


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
@pytest.mark.parametrize("source", ["int8_gemv.cpp", "decode_attention.cpp", "int8_quantize.cpp",
                                    "prefill_attention.cpp"])
def test_the_vector_kernels_compile_without_warnings(tmp_path, source):
    """Compiled as setup.py builds them, with -Wall on top, a build prints nothing: GCC 12's AVX-512 headers warned
    160 times (their undefined pass-through registers) until simd.h silenced that header alone. Our own code keeps
    the warnings (a mutation, an int64_t read before it is set, was reported)."""
    import subprocess

    src = os.path.join(os.path.dirname(__file__), "..", "csrc", source)
    r = subprocess.run(["g++", "-std=c++17", "-O3", "-fopenmp", "-Wall", "-c", src, "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr[-3000:]
