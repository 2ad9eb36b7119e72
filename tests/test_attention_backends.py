"""The optional flash-attn / xformers paths: the layout and GQA handling are checked against SDPA with stand-ins
that implement each library's documented contract ((B, L, H, hd) tensors; flash-attn's native GQA;
xformers' LowerTriangularMask; flash_attn_with_kvcache's (batch, seqlen, heads, hd) cache with per-row
cache_seqlens, cache_batch_idx and window_size). The real libraries need CUDA (none has run here); the choice
itself is validated everywhere."""
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from pllava import ops
from triton_util import TRITON_DEVICE, needs_triton


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

    def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, cache_batch_idx=None, causal=False,
                                window_size=(-1, -1)):
        """flash-attn's documented contract: q (B, Lq, H, hd); caches (B_cache, S, KV, hd), last dim contiguous;
        row b reads cache row cache_batch_idx[b] up to cache_seqlens[b] keys; causal aligns the queries to the end
        (bottom right); window_size (left, right) keeps keys in [i - left, i + right] of query position i."""
        assert q.dim() == 4 and k_cache.dim() == 4 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
        assert cache_seqlens.dtype == torch.int32 and cache_batch_idx.dtype == torch.int32 and causal
        assert k_cache.shape[2] == v_cache.shape[2] and q.shape[2] % k_cache.shape[2] == 0
        calls.append("flash_attn_with_kvcache")
        left = window_size[0]
        outs = []
        for b in range(q.shape[0]):
            n, c, lq = int(cache_seqlens[b]), int(cache_batch_idx[b]), q.shape[1]
            pos = torch.arange(n - lq, n, device=q.device)[:, None]
            kpos = torch.arange(n, device=q.device)[None, :]
            mask = (kpos <= pos) & ((kpos >= pos - left) if left >= 0 else True)
            rep = q.shape[2] // k_cache.shape[2]
            k = k_cache[c, :n].repeat_interleave(rep, dim=1).transpose(0, 1)  # (H, n, hd)
            v = v_cache[c, :n].repeat_interleave(rep, dim=1).transpose(0, 1)
            o = F.scaled_dot_product_attention(q[b].transpose(0, 1), k, v, attn_mask=mask)  # (H, Lq, hd)
            outs.append(o.transpose(0, 1))
        return torch.stack(outs)

    fa.flash_attn_func, fa.flash_attn_with_kvcache = flash_attn_func, flash_attn_with_kvcache
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
    # a layer set to the backend by hand reaches the same guard at its first call, never a bare ImportError
    q, kc = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"pllava-engine\[gpu\]"):
        ops.slot_decode_attention(q, kc, kc, torch.tensor([0]), torch.tensor([2]), None, backend="flash_attn")
    with pytest.raises(ValueError, match=r"pllava-engine\[gpu\]"):
        ops.causal_attention(q, kc[:, :, :1], kc[:, :, :1], "flash_attn")


def test_engine_rejects_an_unusable_backend(ckpts):
    import pllava

    with pytest.raises(ValueError, match="attn_backend"):
        pllava.Engine.from_pretrained(ckpts["pllava"], attn_backend="xformers")


@needs_triton
@pytest.mark.parametrize("window", [None, 5])
def test_decode_through_flash_attn_with_kvcache_matches_the_slot_kernel(fakes, window):
    """Rows in other slots at other lengths (GQA 8/2), NaN in every unused position: flash_attn_with_kvcache
    (per-row cache_seqlens = pos + 1, cache_batch_idx = slot) gives the slot kernel's output."""
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(4, 2, 40, 16, generator=g), torch.randn(4, 2, 40, 16, generator=g)
    slot, pos = torch.tensor([2, 0, 3]), torch.tensor([7, 31, 0])
    for s_, p in zip(slot.tolist(), pos.tolist()):
        kc[s_, :, p + 1:], vc[s_, :, p + 1:] = float("nan"), float("nan")
    kc[1], vc[1] = float("nan"), float("nan")  # a slot no row owns
    q = torch.randn(3, 8, 1, 16, generator=g)
    q, kc, vc, slot, pos = (t.to(TRITON_DEVICE) for t in (q, kc, vc, slot, pos))  # the slot kernel's device
    want = ops.slot_decode_attention(q, kc, vc, slot, pos, window)
    got = ops.slot_decode_attention(q, kc, vc, slot, pos, window, backend="flash_attn")
    assert fakes == ["flash_attn_with_kvcache"] and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_triton
def test_batched_decode_steps_go_through_flash_attn_with_kvcache(fakes, ckpts):
    """The scheduler's device-addressed decode step with attn_backend flash_attn (set on the layers: the real
    check wants CUDA): the same tokens as the default, and every decode step went through the library call."""
    import pllava

    eng = pllava.Engine.from_pretrained(ckpts["pllava"], device=TRITON_DEVICE, dtype=torch.float32)
    eng.model.set_kernel_path("triton")
    s = eng.config.vision.image_size
    reqs = [dict(video=torch.randn(eng.config.num_frames, 3, s, s, generator=torch.Generator().manual_seed(i)),
                 prompt="What happens?", max_new_tokens=6) for i in range(2)]
    want = [o.token_ids for o in eng.generate_many(reqs)]
    assert "flash_attn_with_kvcache" not in fakes
    for layer in eng.model.language_model.layers:
        layer.self_attn.attn_backend = "flash_attn"
    got = [o.token_ids for o in eng.generate_many(reqs)]
    assert got == want
    n_layers = len(eng.model.language_model.layers)
    assert fakes.count("flash_attn_with_kvcache") >= 5 * n_layers  # every layer of every decode step
