"""pllava._C's int8 weight quantizer (csrc/int8_quantize.cpp; quant.quantize_weight and head_levels on CPU weights in
fp32 or bf16) against the format's formula written here in torch ops: the scale max|w_row| / 127 (at least 1e-12)
rounded to the engine's dtype, q = round half to even of the fp32 quotient w / scale, clamped to [-127, 127]; the
head's residual w - q * scale formed in fp64 and rounded to fp32. Bit for bit, on every vector path this CPU runs."""
import shutil

import pytest
import torch

from asan_util import run_under_asan
from pllava.model import quant

HALF = [torch.float32, torch.bfloat16, torch.float16]


def _formula(w, scale_dtype):
    w32 = w.float()
    step = torch.clamp(torch.amax(torch.abs(w32), dim=1) / 127.0, min=1e-12).to(scale_dtype)
    q = torch.clamp(torch.round(torch.div(w32, step.float().unsqueeze(1))), -127, 127).to(torch.int8)
    return q, step


def _weights(n, k, dtype, seed):
    """Random rows at different magnitudes, plus the rows that test the rounding: all zeros, exact ties (values
    (m + 1/2) / 128 against a step of exactly 1/128), subnormal fp32 values, and a row past 1e30."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-4, 1, n)[:, None]
    w[0] = 0
    ties = (torch.randint(-127, 127, (k,), generator=g).float() + 0.5) / 128
    ties[0] = 127 / 128  # the row's absmax: its step is 127/128 / 127 = 1/128, exact
    w[1] = ties
    w[2] = torch.randn(k, generator=g) * 1e-40  # fp32 subnormals (bf16 keeps them too)
    w[3] = torch.randn(k, generator=g) * 1e30
    return w.to(dtype)


@pytest.mark.parametrize("scale_dtype", HALF, ids=str)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k", [(4, 1), (5, 15), (9, 17), (6, 100), (40, 4096), (7, 1001)])
def test_native_quantizer_gives_the_formulas_bits(n, k, w_dtype, scale_dtype, native_isa):
    w = _weights(n, k, w_dtype, seed=n * 10000 + k)
    if scale_dtype == torch.float16:
        w[0] = w[2] = w[3] = 1  # a 1e-12 step is 0 in fp16, 1e30 / 127 inf: torch's formula's (the next test)
    got = quant._quantize_native(w, scale_dtype, generic=native_isa == "generic")
    assert got is not None, "pllava._C did not take this weight"
    q, s, r = got
    want_q, want_s = _formula(w, scale_dtype)
    assert r is None and s.dtype == scale_dtype and q.dtype == torch.int8
    assert torch.equal(s, want_s), (s - want_s).abs().max()
    bad = (q != want_q).nonzero()
    assert len(bad) == 0, f"{len(bad)} of {q.numel()} differ, first at {bad[:5].tolist()}"
    if k > 1:  # the tie row's quotients are m + 1/2 (but its absmax, 127): each rounds half to even
        assert int(want_q[1, 0]) == 127 and bool((want_q[1, 1:] % 2 == 0).all())
    assert torch.equal(quant.quantize_weight(w, scale_dtype)[0], want_q)


def test_rows_torch_must_answer_for_keep_its_formula(caplog):
    """A row holding inf or NaN, or whose step leaves fp16's range (an all-zero row's 1e-12), is not the kernel's:
    the weight goes through torch's formula and gets exactly its result."""
    w = _weights(6, 33, torch.float32, seed=1)
    assert quant._quantize_native(w, torch.float16) is None  # row 0 is all zeros
    q, s = quant.quantize_weight(w, torch.float16)
    wq, ws = _formula(w, torch.float16)
    assert torch.equal(s, ws) and torch.equal(q[1:], wq[1:])
    for bad in (float("inf"), float("nan")):
        v = _weights(6, 33, torch.float32, seed=2)
        v[4, 7] = bad
        assert quant._quantize_native(v, torch.bfloat16) is None
        q, s = quant.quantize_weight(v, torch.bfloat16)
        wq, ws = _formula(v, torch.bfloat16)
        assert torch.equal(s[:4], ws[:4]) and torch.equal(s[5:], ws[5:])
        assert torch.isinf(s[4]) if bad == float("inf") else torch.isnan(s[4])  # (row 4's q: whatever torch's is)
        assert torch.equal(q[:4], wq[:4]) and torch.equal(q[5:], wq[5:])


def test_strided_rows_and_other_kinds():
    """A row stride past K (a slice of a wider tensor) is read as such; an fp16 weight is widened first; a
    transposed view is not the kernel's (None) and keeps the formula."""
    wide = _weights(12, 70, torch.bfloat16, seed=3)
    w = wide[:, 3:60]
    assert w.stride(0) == 70 and not w.is_contiguous()
    q, s, _ = quant._quantize_native(w, torch.bfloat16)
    wq, ws = _formula(w, torch.bfloat16)
    assert torch.equal(q, wq) and torch.equal(s, ws)
    assert quant._quantize_native(wide.t(), torch.bfloat16) is None
    half = wide.half()
    half[0] = half[2] = half[3] = 1  # (steps in fp16's range)
    q, s, _ = quant._quantize_native(half, torch.float16)  # widened to fp32 first, as the formula does
    wq, ws = _formula(half, torch.float16)
    assert torch.equal(q, wq) and torch.equal(s, ws)
    assert torch.equal(quant.quantize_weight(wide.t(), torch.bfloat16)[0], _formula(wide.t(), torch.bfloat16)[0])


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_levels_residual_is_formed_in_fp64(w_dtype, native_isa):
    """lm_head's two levels: the residual w - q * s in fp64, rounded to fp32 once, then quantized with an fp32
    step; all four outputs equal the formula's."""
    w = _weights(37, 300, w_dtype, seed=4)
    q, s, q2, s2 = quant.head_levels(w, torch.bfloat16)  # (the portable loop: test_native_quantizer_...)
    wq, ws = _formula(w, torch.bfloat16)
    resid = (w.double() - wq.double() * ws.double()[:, None]).float()
    wq2, ws2 = _formula(resid, torch.float32)
    assert torch.equal(q, wq) and torch.equal(s, ws) and torch.equal(q2, wq2) and torch.equal(s2, ws2)
    assert quant._quantize_native(w, torch.bfloat16, resid=True)[2].dtype == torch.float32


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_int8_quantize_under_address_sanitizer(tmp_path):
    run_under_asan(tmp_path, "int8_quantize.cpp", "asan_int8_quantize.cpp", "asan int8 quantize: ok")
