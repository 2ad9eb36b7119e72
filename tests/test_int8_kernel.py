"""The Triton weight-only int8 linear (LoRA fused) against an fp64 reference, interpreted on the CPU.

Tolerance as in test_kernels.py: at most 2x torch's own error in the same dtype, plus one rounding of the exact
result. The exact result is the fp64 product with the dequantized weight q·s; the torch baseline is the
dequantized product in the dtype (fp32 accumulation, PEFT's order for the LoRA). Outputs are poisoned with NaN.
"""

import pytest
import torch

triton = pytest.importorskip("triton")
from triton_util import skip_module_without_triton  # noqa: E402

skip_module_without_triton()

from pllava.kernels.int8_linear import (CONFIGS, int8_linear, int8_linear_reference,  # noqa: E402
                                        int8_linear_triton, pick_config)
from test_kernels import DEV, _rand, assert_within_torch  # noqa: E402


def _quant(w64):
    """The test's own symmetric per-row int8 (shares nothing with engine/model/quant.py)."""
    step = w64.abs().amax(dim=1) / 127.0
    return torch.round(w64 / step[:, None]).clamp(-127, 127).to(torch.int8), step


def _case(m, k, n, r, bias, per_row, g):
    x64 = _rand(m, k, g=g)
    q, s = _quant(_rand(n, k, std=k ** -0.5, g=g))
    b = _rand(n, std=0.5, g=g) if bias else None
    lora = None
    if r:
        a, bb = _rand(r, k, std=k ** -0.5, g=g), _rand(n, r, std=r ** -0.5, g=g)
        sc = torch.rand(m, generator=g, dtype=torch.float64) if per_row else torch.tensor(0.75, dtype=torch.float64)
        lora = (a, bb, sc)
    return x64, q, s, b, lora


def _run(m, k, n, r, bias, per_row, dtype, config=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x64, q, s64, b64, lora64 = _case(m, k, n, r, bias, per_row, g)
    s = s64.to(dtype)  # the scale as the engine stores it (the weights' dtype); the exact result uses that scale
    ref64 = int8_linear_reference(x64, q, s.double(), b64, *(lora64 or (None, None, None)))
    cast = (lambda t: None if t is None else t.to(DEV, dtype))
    x, b = cast(x64), cast(b64)
    lora = (cast(lora64[0]), cast(lora64[1]), lora64[2].to(DEV, torch.float32)) if lora64 else (None, None, None)
    torch_out = int8_linear_reference(x, q.to(DEV), s.to(DEV), b, *lora)
    out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
    int8_linear_triton(x, q.to(DEV), s.to(DEV), b, *lora, out=out, config=config)
    return out, torch_out, ref64


CASES = [  # (M, K, N, r, bias, per_row scale)
    (1, 200, 72, 8, False, False),     # decode, K tail in the 128-wide tile, N mid-tile
    (5, 64, 40, 0, True, False),       # no LoRA (k/o_proj, the MLP), bias
    (16, 136, 24, 128, False, True),   # the last decode M, a batch with its own alpha per row
    (17, 40, 72, 8, True, True),       # the first prefill M
    (300, 96, 48, 128, False, False),  # prefill
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,k,n,r,bias,per_row", CASES)
def test_int8_linear_matches_exact_int8(m, k, n, r, bias, per_row, dtype):
    out, torch_out, ref64 = _run(m, k, n, r, bias, per_row, dtype, seed=m + k + n)
    assert_within_torch(out.cpu(), torch_out.cpu(), ref64, dtype, f"int8_linear M={m} K={k} N={n} r={r}")


def _table_cases():
    for arch, modes in CONFIGS.items():
        for mode, cfgs in modes.items():
            for cfg in cfgs:
                yield pytest.param(arch, mode, cfg, id=f"{arch}-{mode}-{'x'.join(map(str, cfg))}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("arch,mode,cfg", list(_table_cases()))
def test_int8_linear_every_config_with_long_k(arch, mode, cfg, dtype):
    """Every table config forced, K = 3 BLOCK_K + 5 (the K loop several times, an odd tail), N and M mid-tile, and a
    rank whose expand loop runs more than once."""
    bm, bn, bk = cfg[:3]
    m = 5 if mode == "decode" else bm + 3
    k, n = 3 * bk + 5, bn + 7
    r = min(3 * bk + 5, 200)
    out, torch_out, ref64 = _run(m, k, n, r, True, False, dtype, config=(mode, cfg), seed=bk + bn)
    assert_within_torch(out.cpu(), torch_out.cpu(), ref64, dtype, f"int8_linear {arch} {mode} {cfg} K={k} r={r}")


def test_int8_linear_alpha_is_live():
    """The LoRA scale is a device tensor read by the launch: changing it in place changes the next output by the
    LoRA's delta exactly, with nothing rebuilt."""
    g = torch.Generator().manual_seed(3)
    x64, q, s64, _, (a, bb, _) = _case(3, 40, 24, 8, False, False, g)
    x, a, bb, s = (t.to(DEV, torch.float32) for t in (x64, a, bb, s64))
    scale = torch.tensor(0.25, device=DEV)
    y1 = int8_linear(x, q.to(DEV), s, None, a, bb, scale)
    scale.fill_(4.0)
    y2 = int8_linear(x, q.to(DEV), s, None, a, bb, scale)
    delta = (x.double() @ a.double().T @ bb.double().T) * 3.75
    torch.testing.assert_close((y2 - y1).double(), delta, rtol=1e-4, atol=1e-4)


def test_int8_linear_validation_names_argument():
    x, q, s = torch.randn(2, 16), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8)
    with pytest.raises(ValueError, match="qweight dtype"):
        int8_linear_triton(x, q.float(), s)
    with pytest.raises(ValueError, match=r"qscale shape \(4,\)"):
        int8_linear_triton(x, q, torch.ones(4))
    with pytest.raises(ValueError, match="come together"):
        int8_linear_triton(x, q, s, None, torch.randn(4, 16), None, None)
    with pytest.raises(ValueError, match=r"lora_b shape"):
        int8_linear_triton(x, q, s, None, torch.randn(4, 16), torch.randn(8, 3), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"qweight shape"):
        int8_linear_triton(torch.randn(2, 12), q, s)


def test_int8_linear_fake_and_decode_grid():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = torch.ops.pllava.int8_linear(torch.empty(3, 16), torch.empty(24, 16, dtype=torch.int8), torch.empty(24),
                                         None, torch.empty(8, 16), torch.empty(24, 8), torch.empty(()))
    assert tuple(y.shape) == (3, 24)
    # decode at 7B's q_proj: the narrow N tile, 256 CTAs on 132 SMs (the wide one would leave 4 idle)
    mode, cfg = pick_config(1, 4096, "sm90")
    assert mode == "decode" and 4096 // cfg[1] == 256


@pytest.mark.parametrize("kernel", ["int8_linear", "lora_linear"])
@pytest.mark.parametrize("split", [3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_k_adds_the_ranges(kernel, split, dtype):
    """A split K forced on 6 K tiles: 3 ranges of 2 tiles, or 4 whose last is empty (its partial must be zero).
    The LoRA's expand and the bias are added once (in the first range), per-row alphas, rows and N mid-tile."""
    from pllava.kernels.lora_linear import CONFIGS as LCONFIGS, lora_linear_reference

    cfg = (CONFIGS if kernel == "int8_linear" else LCONFIGS)["sm90"]["decode"][-1]
    m, k, n, r = 5, 5 * cfg[2] + 5, cfg[1] * 3 + 7, 24
    if kernel == "int8_linear":
        out, torch_out, ref64 = _run(m, k, n, r, True, True, dtype, config=("decode", cfg, split), seed=split)
    else:
        g = torch.Generator().manual_seed(split)
        x64, w, b = _rand(m, k, g=g), _rand(n, k, std=k ** -0.5, g=g), _rand(n, std=0.5, g=g)
        a, bb, s = _rand(r, k, std=k ** -0.5, g=g), _rand(n, r, std=r ** -0.5, g=g), torch.rand(m, generator=g)
        ref64 = lora_linear_reference(x64, w, b, a, bb, s.double())
        args = [t.to(DEV, dtype) for t in (x64, w, b, a, bb)]
        torch_out = lora_linear_reference(*args, s.to(DEV))
        out = torch.full((m, n), float("nan"), device=DEV, dtype=dtype)
        from pllava.kernels.lora_linear import lora_linear_triton

        lora_linear_triton(*args, s.to(DEV), out=out, config=("decode", cfg, split))
    assert_within_torch(out.cpu(), torch_out.cpu(), ref64, dtype, f"{kernel} split {split} K={k}")


def test_split_k_is_chosen_where_the_grid_leaves_sms_idle(monkeypatch):
    from pllava.kernels import _common
    from pllava.kernels._common import split_k

    assert split_k(64, 7168, 128, "sm90") == 3  # 34B v_proj, int8 tiles: 192 CTAs on 132 SMs
    assert split_k(64, 7168, 64, "sm80") == 2  # 128 CTAs on 108
    assert split_k(256, 4096, 128, "sm90") == 1  # 7B q_proj already fills the SMs
    assert split_k(4, 512, 128, "sm90") == 1  # 4 K tiles: too few to split
    launched = []
    real = _common.LaunchSpec.launch
    monkeypatch.setattr(_common.LaunchSpec, "launch", lambda self: launched.append(self) or real(self))
    out, torch_out, ref64 = _run(1, 16 * 128 + 5, 40, 8, True, False, torch.bfloat16, seed=7)  # 3 tiles of 16
    assert launched[-1].grid == (3, 2) and launched[-1].post is not None
    assert_within_torch(out.cpu(), torch_out.cpu(), ref64, torch.bfloat16, "int8_linear automatic split")
