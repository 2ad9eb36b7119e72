"""Triton kernels against their torch references, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1).

Tolerance, per dtype, derived from the precision (flash-attention's rule): against an fp64 reference, the
kernel's error (max and RMS) is at most 2x that of torch running the same op in the same dtype, plus the error of
rounding the exact result to that dtype once (the least any implementation can have; at fp32 the interpreter's
numpy GEMM and torch's sum in different orders, and on 72 outputs that alone moves the ratio around 2).
Outputs are poisoned with NaN before the launch, so an element the kernel never writes fails.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
from triton_util import TRITON_DEVICE as DEV, skip_module_without_triton  # noqa: E402

skip_module_without_triton()

from pllava.kernels.lora_linear import (lora_linear, lora_linear_reference, lora_linear_triton, merge,  # noqa: E402
                                        unmerge)
from pllava.kernels.pool_projector import (pool_gelu, pool_projector, pool_projector_reference,  # noqa: E402
                                           pool_projector_torch)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _errs(got, ref64):
    d = (got.double() - ref64).abs()
    return float(d.max()), float(d.pow(2).mean().sqrt())


def assert_within_torch(got, torch_out, ref64, dtype, what):
    assert not torch.isnan(got).any(), f"{what}: unwritten (NaN) elements"
    k_max, k_rms = _errs(got, ref64)
    t_max, t_rms = _errs(torch_out, ref64)
    r_max, r_rms = _errs(ref64.to(dtype), ref64)  # one correct rounding of the exact result
    report = (f"{what} {dtype}: kernel max {k_max:.3e} rms {k_rms:.3e} | torch max {t_max:.3e} rms {t_rms:.3e} | "
              f"rounding max {r_max:.3e} rms {r_rms:.3e}")
    assert k_rms <= 2 * t_rms + r_rms, report
    assert k_max <= 2 * t_max + r_max, report


def _rand(*shape, std=1.0, g):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * std)


POOL_CASES = [  # (T, frame, pooling, c, d)
    (1, (24, 24), (1, 12, 12), 40, 72),
    (3, (24, 24), (3, 7, 7), 40, 72),
    (3, (5, 5), (3, 3, 3), 40, 72),
    (16, (6, 6), (16, 3, 3), 24, 40),
    (32, (4, 4), (16, 2, 2), 16, 32),
    (2, (6, 6), (1, 1, 1), 16, 32),  # global pooling: windows of 72 rows loop over chunks
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,frame,pool,c,d", POOL_CASES)
def test_pool_projector_matches_reference(t, frame, pool, c, d, dtype):
    g = torch.Generator().manual_seed(t * 1000 + frame[0] + pool[1])
    x64 = _rand(t, frame[0] * frame[1], c, g=g)
    w1, b1 = _rand(d, c, std=c ** -0.5, g=g), _rand(d, std=0.5, g=g)
    w2, b2 = _rand(d, d, std=d ** -0.5, g=g), _rand(d, std=0.5, g=g)
    ref64 = pool_projector_reference(x64, w1, b1, w2, b2, frame, pool)
    args = [a.to(DEV, dtype) for a in (x64, w1, b1, w2, b2)]
    torch_out = pool_projector_reference(*args, frame, pool)
    # the fused stage alone (poisoned output), then the whole op through the custom op
    p_rows = pool[0] * pool[1] * pool[2]
    out = torch.full((p_rows, d), float("nan"), device=DEV, dtype=dtype)
    pool_gelu(args[0], args[1], args[2], frame, pool, out=out)
    h64 = torch.nn.functional.gelu(torch.nn.functional.linear(x64, w1, b1))
    from pllava.kernels.pool_projector import _pool

    pooled64 = _pool(h64, frame, pool)
    pooled_torch = _pool(torch.nn.functional.gelu(torch.nn.functional.linear(args[0], args[1], args[2])), frame, pool)
    assert_within_torch(out.cpu(), pooled_torch.cpu(), pooled64, dtype, "pool_gelu")
    got = pool_projector(*args, frame, pool)
    assert_within_torch(got.cpu(), torch_out.cpu(), ref64, dtype, "pool_projector")


def test_pool_projector_torch_path_is_the_same_math():
    g = torch.Generator().manual_seed(0)
    x, w1, b1, w2, b2 = (_rand(*s, g=g) for s in ((5, 36, 12), (20, 12), (20,), (20, 20), (20,)))
    torch.testing.assert_close(pool_projector_torch(x, w1, b1, w2, b2, (6, 6), (3, 4, 5)),
                               pool_projector_reference(x, w1, b1, w2, b2, (6, 6), (3, 4, 5)), rtol=1e-12, atol=1e-12)


LORA_CASES = [  # (M, K, N, r)
    (1, 64, 72, 8), (7, 40, 72, 128), (300, 40, 72, 8), (300, 64, 48, 128), (17, 40, 24, 8),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n,r", LORA_CASES)
@pytest.mark.parametrize("scale", ["0", "0.25", "per_row"])
def test_lora_linear_matches_reference(m, k, n, r, dtype, scale):
    g = torch.Generator().manual_seed(m * 7 + r)
    x64, w, b = _rand(m, k, g=g), _rand(n, k, std=k ** -0.5, g=g), _rand(n, std=0.5, g=g)
    a, bb = _rand(r, k, std=k ** -0.5, g=g), _rand(n, r, std=r ** -0.5, g=g)
    s = {"0": torch.tensor(0.0), "0.25": torch.tensor(0.25),
         "per_row": torch.rand(m, generator=g, dtype=torch.float64) * 2}[scale]
    ref64 = lora_linear_reference(x64, w, b, a, bb, s)
    args = [t.to(DEV, dtype) for t in (x64, w, b, a, bb)]
    s_dev = s.to(DEV, torch.float32)
    torch_out = lora_linear_reference(*args, s_dev)
    if dtype == torch.float32 and DEV == "cpu":
        # Under the interpreter a fp32 tl.dot is np.matmul(a, b, dtype=float32) on the zero-padded tiles: numpy's
        # ufunc loop, not BLAS, whose summation alone errs ~3x torch's on M=1, K=64. The baseline is whichever of
        # torch and that same platform arithmetic (emulated on the kernel's tiles) errs more.
        torch_out = max((torch_out, _numpy_lora(*args, s_dev)), key=lambda o: _errs(o, ref64)[1])
    out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
    lora_linear_triton(*args, s_dev, out=out)
    assert_within_torch(out.cpu(), torch_out.cpu(), ref64, dtype, f"lora_linear M={m} r={r} s={scale}")
    # the custom op (what the engine calls) on a 3-D input: the same kernel, so the same numbers and shape
    got = lora_linear(args[0].reshape(1, m, k), *args[1:], s_dev)
    assert got.shape == (1, m, n) and torch.equal(got[0].cpu(), out.cpu())


def _numpy_lora(x, w, b, a, bb, s):
    """The interpreter's fp32 arithmetic for this op: per K chunk, np.matmul(dtype=float32) on padded tiles."""
    import numpy as np

    from pllava.kernels.lora_linear import pick_config

    m, k = x.shape
    _, (bm, _, bk, _, _, _) = pick_config(m, w.shape[0], "sm90")
    f32 = np.float32
    mp, kp = -(-m // bm) * bm, -(-k // bk) * bk
    xp = np.zeros((mp, kp), f32)
    xp[:m, :k] = x.numpy()
    wt = np.zeros((kp, w.shape[0]), f32)
    wt[:k] = w.numpy().T
    at = np.zeros((kp, a.shape[0]), f32)
    at[:k] = a.numpy().T
    acc = np.zeros((mp, w.shape[0]), f32)
    xa = np.zeros((mp, a.shape[0]), f32)
    for k0 in range(0, kp, bk):
        acc = np.matmul(xp[:, k0:k0 + bk], wt[k0:k0 + bk], dtype=f32) + acc
        xa = np.matmul(xp[:, k0:k0 + bk], at[k0:k0 + bk], dtype=f32) + xa
    y = acc[:m] + np.matmul(xa[:m], bb.numpy().T, dtype=f32) * s.numpy().reshape(-1, 1) + b.numpy()
    return torch.from_numpy(y.astype(f32))


def test_lora_linear_without_bias_and_3d_input():
    g = torch.Generator().manual_seed(3)
    x, w, a, bb = _rand(2, 3, 32, g=g), _rand(24, 32, g=g), _rand(8, 32, g=g), _rand(24, 8, g=g)
    s = torch.tensor(0.5, dtype=torch.float64)
    ref = lora_linear_reference(x, w, None, a, bb, s)
    got = lora_linear(*(t.float().to(DEV) for t in (x, w)), None, *(t.float().to(DEV) for t in (a, bb)),
                      s.float().to(DEV))
    assert got.shape == (2, 3, 24)
    torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-4)


def test_lora_linear_validation_names_argument():
    x, w, a, b = torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(ValueError, match="lora_b shape"):
        lora_linear_triton(x, w, None, a, torch.randn(4, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="weight dtype"):
        lora_linear_triton(x, w.double(), None, a, b, torch.tensor(1.0))
    with pytest.raises(ValueError, match="scale must be 0-dim or"):
        lora_linear_triton(x, w, None, a, b, torch.ones(3))
    with pytest.raises(ValueError, match="frame_shape"):
        pool_gelu(torch.randn(2, 30, 8), torch.randn(4, 8), torch.randn(4), (5, 5), (2, 2, 2))


def test_merge_unmerge_round_trip():
    g = torch.Generator().manual_seed(4)
    x, w, b, a, bb = (_rand(*s, g=g) for s in ((5, 16), (12, 16), (12,), (4, 16), (12, 4)))
    s = torch.tensor(0.75, dtype=torch.float64)
    merged = merge(w, a, bb, 0.75)
    torch.testing.assert_close(torch.nn.functional.linear(x, merged, b), lora_linear_reference(x, w, b, a, bb, s))
    torch.testing.assert_close(unmerge(merged, a, bb, 0.75), w)


def test_custom_ops_trace_with_fake_tensors():
    """The fake implementations give shapes without running Triton (what torch.compile and graphs rely on)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.pllava.lora_linear(torch.empty(3, 16), torch.empty(24, 16), None, torch.empty(8, 16),
                                         torch.empty(24, 8), torch.empty(()))
        p = torch.ops.pllava.pool_gelu(torch.empty(4, 36, 16), torch.empty(20, 16), torch.empty(20), 6, 6, 2, 3, 3)
    assert tuple(y.shape) == (3, 24) and tuple(p.shape) == (18, 20)


@pytest.mark.parametrize("mode", ["fused", "decode", "prefill"])
def test_lora_linear_both_designs_at_m1(mode):
    """Fused shrink (every CTA) and shrink-once-then-expand (decode and prefill tiles) give the reference at M = 1."""
    from pllava.kernels.lora_linear import CONFIGS

    g = torch.Generator().manual_seed(11)
    x, w, b, a, bb = (_rand(*s, g=g) for s in ((1, 64), (72, 64), (72,), (16, 64), (72, 16)))
    s = torch.tensor(0.3, dtype=torch.float64)
    ref = lora_linear_reference(x, w, b, a, bb, s)
    out = torch.full((1, 72), float("nan"), device=DEV)
    lora_linear_triton(*(t.float().to(DEV) for t in (x, w, b, a, bb)), s.float().to(DEV), out=out,
                       config=(mode, CONFIGS["sm90"]["decode"][0]))
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


# Every config of every arch's table, forced, on shapes whose K loop runs several times with an odd tail (K = 3
# BLOCK_K + 5) and whose M / N end mid-tile: the main loops, the masks of the last chunk and the sm_80 configs
# that a CPU run would otherwise never launch.
def _table_cases_lora():
    from pllava.kernels.lora_linear import CONFIGS

    for arch, modes in CONFIGS.items():
        for mode, cfgs in dict(modes, fused=modes["decode"]).items():  # the fused design on the decode tiles too
            for cfg in cfgs:
                yield pytest.param(arch, mode, cfg, id=f"{arch}-{mode}-{'x'.join(map(str, cfg))}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("arch,mode,cfg", list(_table_cases_lora()))
def test_lora_linear_every_config_with_long_k(arch, mode, cfg, dtype):
    bm, bn, bk = cfg[:3]
    m = 5 if mode in ("decode", "fused") else bm + 3
    k, n, r = 3 * bk + 5, bn + 7, 3 * bk + 5 if 3 * bk + 5 <= 256 else 200  # the rank loop runs several times too
    g = torch.Generator().manual_seed(bk + bn)
    x64, w, b = _rand(m, k, g=g), _rand(n, k, std=k ** -0.5, g=g), _rand(n, std=0.5, g=g)
    a, bb = _rand(r, k, std=k ** -0.5, g=g), _rand(n, r, std=r ** -0.5, g=g)
    s = torch.tensor(0.5, dtype=torch.float64)
    ref64 = lora_linear_reference(x64, w, b, a, bb, s)
    args = [t.to(DEV, dtype) for t in (x64, w, b, a, bb)]
    torch_out = lora_linear_reference(*args, s.to(DEV, torch.float32))
    out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
    lora_linear_triton(*args, s.to(DEV, torch.float32), out=out, config=(mode, cfg))
    assert_within_torch(out.cpu(), torch_out.cpu(), ref64, dtype, f"lora_linear {arch} {mode} {cfg} K={k} r={r}")


def _table_cases_pool():
    from pllava.kernels.pool_projector import CONFIGS

    for arch, cfgs in CONFIGS.items():
        for cfg in cfgs:
            yield pytest.param(arch, cfg, id=f"{arch}-{'x'.join(map(str, cfg))}")


@pytest.mark.parametrize("arch,cfg", list(_table_cases_pool()))
def test_pool_gelu_every_config_with_long_k(arch, cfg):
    bp, bn, bk = cfg[:3]
    dtype = torch.bfloat16
    t, frame, pool = 3, (6, 6), (3, 3, 3)
    c, d = 3 * bk + 5, bn + 7
    g = torch.Generator().manual_seed(bk + bn + bp)
    x64 = _rand(t, frame[0] * frame[1], c, g=g)
    w1, b1 = _rand(d, c, std=c ** -0.5, g=g), _rand(d, std=0.5, g=g)
    from pllava.kernels.pool_projector import _pool

    pooled64 = _pool(torch.nn.functional.gelu(torch.nn.functional.linear(x64, w1, b1)), frame, pool)
    args = [a.to(DEV, dtype) for a in (x64, w1, b1)]
    pooled_torch = _pool(torch.nn.functional.gelu(torch.nn.functional.linear(*args)), frame, pool)
    out = torch.full((27, d), float("nan"), device=DEV, dtype=dtype)
    pool_gelu(*args, frame, pool, out=out, config=cfg)
    assert_within_torch(out.cpu(), pooled_torch.cpu(), pooled64, dtype, f"pool_gelu {arch} {cfg} K={c}")
