"""The decode step a CUDA graph captures (no host length: kv_len None) attends through the slot kernel over the
positions in use only, with the position on the device (on the GPU, else in Triton's interpreter): the same logits
as the eager step that slices the cache to its used length, and NaN left in unused cache positions cannot reach it
(the masked whole-cache SDPA it replaces turns 0 x NaN into NaN). On the CPU the same step without Triton (the
compiled step's) goes through pllava._C's decode-attention op, which must be as careful."""

import pytest
import torch

import pllava
from pllava import ops
from pllava.generate import decode_one_token
from triton_util import TRITON_DEVICE, skip_module_without_triton

pytest.importorskip("triton")
skip_module_without_triton()


def _mistral(tmp_path):
    from pllava.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path / "mistral"), "current", shards=1,
                                text={"model_type": "mistral", "sliding_window": 24, "head_dim": 16})


@pytest.mark.parametrize("model", ["llama", "mistral-window-24"])
def test_graph_step_reads_only_used_positions(ckpts, tmp_path, monkeypatch, model):
    """Llama: [0, pos]. Mistral with a 24-position window under a ~60-position prompt: (pos - 24, pos] only, so
    NaN is also put into the used positions older than the window, which the step must not read either."""
    eng = pllava.Engine.from_pretrained(ckpts["pllava"] if model == "llama" else _mistral(tmp_path),
                                        device=TRITON_DEVICE, dtype=torch.float32)
    win = eng.config.text.sliding_window
    lm = eng.model.language_model
    px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        lm.setup_cache(1, 300, eng.kv_dtype, eng.device)
        eng.prompt_logits(px, "What is happening?")  # fills [0, n)
        n = int(eng._prompt_ids("What is happening?", None, None)[2])
        tok, pos = torch.tensor([[5]], device=eng.device), torch.tensor([n], device=eng.device)
        want = decode_one_token(lm, tok, pos, kv_len=n + 1)  # eager: the cache sliced to its used length
        for layer in lm.layers:  # unused positions hold garbage a later request must never see
            layer.self_attn.kv_cache.k_cache[:, :, n + 1:] = float("nan")
            layer.self_attn.kv_cache.v_cache[:, :, n + 1:] = float("nan")
            if win is not None:
                assert n + 1 > win + 8  # the window cuts into the prompt
                layer.self_attn.kv_cache.k_cache[:, :, :n + 1 - win] = float("nan")
                layer.self_attn.kv_cache.v_cache[:, :, :n + 1 - win] = float("nan")
        eng.model.set_kernel_path("triton")
        got = decode_one_token(lm, tok, pos)  # kv_len None: the graph step, through the slot kernel
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        eng.model.set_kernel_path("torch")
        if eng.device.type == "cpu" and ops.native_decode_attention() is not None:  # the CPU's compiled step:
            # pllava._C's op, as careful
            assert torch.equal(decode_one_token(lm, tok, pos), want)  # the same op body, the same range
        monkeypatch.setattr(ops, "native_decode_attention", lambda: None)
        old = decode_one_token(lm, tok, pos)  # the masked whole-cache SDPA: poisoned by the stale NaN
    assert not torch.isfinite(old).all()
