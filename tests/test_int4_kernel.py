"""The Triton int4 linear (LoRA fused) and int4 dequantization of quantize="int4" on CUDA, interpreted on the CPU.

Against references written here, sharing nothing with the kernel module or engine/model: the weights are random
integers q in [-8, 7] with random bf16 group scales, packed by the test's own reading of the layout (a group's byte j
= (q[j] + 8) + 16 (q[16 + j] + 8)). The linear is held to at most 2x the error of torch's product with the fp32
weight fl32(q · s) in the same dtype, plus one rounding, against the fp64 product (test_kernels' rule); the
dequantized weight to fl32(q · s) rounded by torch, bit for bit. Outputs are poisoned with NaN.
"""

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
from triton_util import skip_module_without_triton  # noqa: E402

skip_module_without_triton()

import importlib  # noqa: E402

mod = importlib.import_module("pllava.kernels.int4_linear")  # (pllava.kernels.int4_linear is also the op's name)
from pllava.kernels.int4_linear import (CONFIGS, int4_dequant, int4_dequant_triton, int4_linear,  # noqa: E402
                                        int4_linear_triton, pick_config)
from test_kernels import DEV, _rand, assert_within_torch  # noqa: E402


def _weights(n, k, g):
    """Random int4 groups: q (N, K) int64 in [-8, 7], s (N, K / 32) bf16 of either sign (the format's scales are
    negative where a group's largest weight is positive), |s| around k ** -0.5 / 4, and their packing."""
    q = torch.randint(-8, 8, (n, k), generator=g)
    sign = torch.randint(0, 2, (n, k // 32), generator=g).double() * 2 - 1
    s = (torch.rand(n, k // 32, generator=g, dtype=torch.float64) + 0.5).mul(sign * k ** -0.5 / 4).to(torch.bfloat16)
    u = (q + 8).reshape(n, k // 32, 2, 16)  # per group: the low nibbles' 16 weights, then the high nibbles'
    packed = (u[:, :, 0] + 16 * u[:, :, 1]).reshape(n, k // 2).to(torch.uint8)
    return q, s, packed


def _fl32_weight(q, s):
    n, k = q.shape
    return (q.double().reshape(n, k // 32, 32) * s.double()[..., None]).float().reshape(n, k)  # exact: 3 x 8 bits


def _run(m, k, n, r, bias, per_row, dtype, config=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x64 = _rand(m, k, g=g)
    q, s, packed = _weights(n, k, g)
    w32 = _fl32_weight(q, s)
    b64 = _rand(n, std=0.5, g=g) if bias else None
    a64 = bb64 = sc = None
    if r:
        a64, bb64 = _rand(r, k, std=k ** -0.5, g=g), _rand(n, r, std=r ** -0.5, g=g)
        sc = torch.rand(m, generator=g, dtype=torch.float64) if per_row else torch.tensor(0.75, dtype=torch.float64)
    ref64 = F.linear(x64, w32.double(), b64)
    if r:
        ref64 = ref64 + (sc[:, None] if per_row else sc) * ((x64 @ a64.T) @ bb64.T)
    cast = (lambda t: None if t is None else t.to(dtype))
    x, b, a, bb = cast(x64), cast(b64), cast(a64), cast(bb64)
    # torch in the dtype: the fp32 weight's product in fp32, rounded once; PEFT's order for the LoRA
    torch_out = F.linear(x.float(), w32).to(dtype)
    if bias:
        torch_out = torch_out + b
    if r:
        s32 = sc.float()
        torch_out = torch_out + (F.linear(F.linear(x, a), bb) * (s32[:, None] if per_row else s32)).to(dtype)
    out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
    dev = (lambda t: None if t is None else t.to(DEV))
    int4_linear_triton(x.to(DEV), packed.to(DEV), s.to(DEV), dev(b), dev(a), dev(bb),
                       None if sc is None else sc.to(DEV, torch.float32), out=out, config=config)
    return out.cpu(), torch_out, ref64


CASES = [  # (M, K, N, r, bias, per_row scale)
    (1, 96, 72, 8, False, False),      # decode; 3 groups: the 4-group K step's last group is out of range
    (5, 64, 40, 0, True, False),       # no LoRA (k/o_proj, the MLP), bias
    (16, 160, 24, 128, False, True),   # the last decode M, a batch with its own alpha per row; r = 2 rank steps
    (17, 32, 72, 8, True, True),       # a second row tile, one group
    (64, 288, 48, 0, False, False),    # FUSED_MAX_M: four row tiles of one weight tile
    (70, 96, 40, 8, True, False),      # past it (the engine dequantizes there, but the launcher takes any M)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,r,bias,per_row", CASES)
def test_int4_linear_matches_exact_int4(m, k, n, r, bias, per_row, dtype):
    out, torch_out, ref64 = _run(m, k, n, r, bias, per_row, dtype, seed=m + k + n)
    assert_within_torch(out, torch_out, ref64, dtype, f"int4_linear M={m} K={k} N={n} r={r}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("arch,cfg", [pytest.param(a, c, id=f"{a}-{'x'.join(map(str, c))}")
                                      for a, cs in CONFIGS.items() for c in cs])
def test_every_config_with_a_long_k(arch, cfg, dtype):
    """Every table config forced: K = 3 steps + 2 groups (the K loop 4 times, its last step half out of range),
    rows in two tiles and N mid-tile, a rank whose expand loop runs twice."""
    bm, bn, groups = cfg[:3]
    k, n = (3 * groups + 2) * 32, bn + 7
    out, torch_out, ref64 = _run(bm + 3, k, n, 72, True, True, dtype, config=(cfg,), seed=bn + groups)
    assert_within_torch(out, torch_out, ref64, dtype, f"int4_linear {arch} {cfg} K={k}")


@pytest.mark.parametrize("split", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_split_k_adds_the_ranges(split, dtype):
    """6 K steps split in 3 ranges of 2, or in 4 whose last is empty (its partial must be zero); the bias and the
    LoRA's expand once, per-row alphas."""
    cfg = CONFIGS["sm90"][-1]
    k = 6 * cfg[2] * 32
    out, torch_out, ref64 = _run(5, k, cfg[1] * 3 + 7, 24, True, True, dtype, config=(cfg, split), seed=split)
    assert_within_torch(out, torch_out, ref64, dtype, f"int4_linear split {split} K={k}")


def test_a_grid_short_of_the_sms_splits_k(monkeypatch):
    from pllava.kernels import _common

    launched = []
    real = _common.LaunchSpec.launch
    monkeypatch.setattr(_common.LaunchSpec, "launch", lambda self: launched.append(self) or real(self))
    out, torch_out, ref64 = _run(1, 64 * 32, 40, 8, True, False, torch.bfloat16, seed=7)  # 3 N tiles of 16
    assert launched[-1].grid == (3, 2) and launched[-1].post is not None  # 16 steps: 2 ranges of 8
    assert_within_torch(out, torch_out, ref64, torch.bfloat16, "int4_linear automatic split")
    # 7B's q_proj decodes on 256 CTAs (N tiles of 16), 34B's v_proj (N = 1024) splits K to cover 132 SMs
    assert pick_config(1, 4096, "sm90")[1] == 16
    meta = dict(device="meta", dtype=torch.bfloat16)
    spec = mod.int4_linear_spec(torch.empty(1, 7168, **meta), torch.empty(1024, 3584, device="meta",
                                dtype=torch.uint8), torch.empty(1024, 224, **meta), None, None, None, None,
                                torch.empty(1, 1024, **meta), None, "sm90")
    assert spec.ctas >= 132 and spec.grid[1] > 1


def test_alpha_is_live():
    """The LoRA scale is a device tensor read by the launch: changing it in place changes the next output by the
    LoRA's delta, with nothing rebuilt."""
    g = torch.Generator().manual_seed(3)
    _, s, packed = _weights(24, 64, g)
    x, a, bb = (_rand(*sh, g=g).float().to(DEV) for sh in ((3, 64), (8, 64), (24, 8)))
    scale = torch.tensor(0.25, device=DEV)
    y1 = int4_linear(x, packed.to(DEV), s.to(DEV), None, a, bb, scale)
    scale.fill_(4.0)
    y2 = int4_linear(x, packed.to(DEV), s.to(DEV), None, a, bb, scale)
    delta = (x.double() @ a.double().T @ bb.double().T) * 3.75
    torch.testing.assert_close((y2 - y1).double(), delta, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,k", [(1, 32), (33, 96), (40, 4096 + 64)])
def test_the_dequantized_weight_is_fl32_q_times_s_rounded_once(dtype, n, k):
    """Bit for bit torch's rounding of the exact fl32(q · s) (bf16: to nearest even, ties included; the products
    have up to 11 significant bits, bf16 keeps 8). N and K off the kernel's blocks; through the custom op too."""
    g = torch.Generator().manual_seed(n + k)
    q, s, packed = _weights(n, k, g)
    want = _fl32_weight(q, s).to(dtype)
    out = torch.full((n, k), float("nan"), device=DEV, dtype=dtype)
    got = int4_dequant_triton(packed.to(DEV), s.to(DEV), dtype, out=out)
    assert got is out and torch.equal(got.cpu(), want)
    assert torch.equal(int4_dequant(packed.to(DEV), s.to(DEV), dtype).cpu(), want)
    if dtype == torch.bfloat16:  # the rounding is tested: some products were not bf16 values, some were ties
        exact = _fl32_weight(q, s)
        assert not torch.equal(exact, want.float())


def test_validation_names_the_argument():
    g = torch.Generator().manual_seed(0)
    _, s, packed = _weights(8, 64, g)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="not a multiple of the int4 group"):
        int4_linear_triton(torch.randn(2, 48), packed[:, :24], s[:, :1])
    with pytest.raises(ValueError, match="qweight dtype torch.int8"):
        int4_linear_triton(x, packed.view(torch.int8), s)
    with pytest.raises(ValueError, match=r"qweight shape \(8, 64\)"):
        int4_linear_triton(x, torch.zeros(8, 64, dtype=torch.uint8), s)
    with pytest.raises(ValueError, match=r"qscale shape \(8,\) must be \(8, 2\)"):
        int4_linear_triton(x, packed, torch.ones(8))
    with pytest.raises(ValueError, match="come together"):
        int4_linear_triton(x, packed, s, None, torch.randn(4, 64), None, None)
    with pytest.raises(ValueError, match=r"lora_b shape"):
        int4_linear_triton(x, packed, s, None, torch.randn(4, 64), torch.randn(8, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match="int4_dequant"):
        int4_dequant_triton(packed, torch.ones(8), torch.bfloat16)


def test_fake_implementations_give_the_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.pllava.int4_linear(torch.empty(3, 64), torch.empty(24, 32, dtype=torch.uint8),
                                         torch.empty(24, 2), None, torch.empty(8, 64), torch.empty(24, 8),
                                         torch.empty(()))
        w = torch.ops.pllava.int4_dequant(torch.empty(24, 32, dtype=torch.uint8), torch.empty(24, 2),
                                          torch.bfloat16)
    assert tuple(y.shape) == (3, 24) and tuple(w.shape) == (24, 64) and w.dtype == torch.bfloat16
