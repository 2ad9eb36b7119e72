"""The optional flash-attn / xformers prefill paths: the layout and GQA handling are checked against SDPA with
stand-ins that implement each library's documented contract ((B, L, H, hd) tensors; flash-attn's native GQA;
xformers' LowerTriangularMask). The real libraries need CUDA; the choice itself is validated everywhere."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from pllava import ops


def _ref_blhd(q, k, v):  # (B, L, H, hd) causal attention with GQA
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


@pytest.fixture()
def fakes(monkeypatch):
    calls = []
    fa = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, causal=False):
        assert causal and q.dim() == 4 and q.shape[2] % k.shape[2] == 0 and q.stride(-1) == 1
        calls.append("flash_attn")
        return _ref_blhd(q, k, v)

    fa.flash_attn_func = flash_attn_func
    xo = types.ModuleType("xformers.ops")

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None):
        assert isinstance(attn_bias, LowerTriangularMask) and q.shape == k.shape == v.shape
        calls.append("xformers")
        return _ref_blhd(q, k, v)

    xo.LowerTriangularMask, xo.memory_efficient_attention = LowerTriangularMask, memory_efficient_attention
    xf = types.ModuleType("xformers")
    xf.ops = xo
    monkeypatch.setitem(sys.modules, "flash_attn", fa)
    monkeypatch.setitem(sys.modules, "xformers", xf)
    monkeypatch.setitem(sys.modules, "xformers.ops", xo)
    return calls


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_backends_match_sdpa(fakes, backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 8, 37, 16), torch.randn(1, 2, 37, 16), torch.randn(1, 2, 37, 16)
    want = ops.causal_attention(q, k, v, "sdpa")
    torch.testing.assert_close(ops.causal_attention(q, k, v, backend), want)
    assert fakes == [backend]


def test_backend_choice_is_validated(fakes, monkeypatch):
    assert ops.check_attn_backend("sdpa", "cpu", torch.float32) == "sdpa"
    with pytest.raises(ValueError, match="expected one of"):
        ops.check_attn_backend("magic", "cpu", torch.float32)
    with pytest.raises(ValueError, match="runs on CUDA"):
        ops.check_attn_backend("flash_attn", "cpu", torch.float32)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # not installed
    with pytest.raises(ValueError, match="not installed"):
        ops.check_attn_backend("flash_attn", "cuda", torch.bfloat16)


def test_engine_rejects_an_unusable_backend(ckpts):
    import pllava

    with pytest.raises(ValueError, match="attn_backend"):
        pllava.Engine.from_pretrained(ckpts["pllava"], attn_backend="xformers")
