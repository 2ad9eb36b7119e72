"""The engine with PLLAVA_KERNELS=triton (on the GPU, else interpreted on the CPU) gives the torch path's greedy
tokens, in fp32."""
import importlib

import pytest
import torch

import pllava
from triton_util import TRITON_DEVICE, skip_module_without_triton

pytest.importorskip("triton")
skip_module_without_triton()


@pytest.mark.parametrize("layout", ["pllava", "adapter"])
def test_triton_path_tokens_equal_torch_path(ckpts, monkeypatch, caplog, layout):
    s = 42
    px = torch.randn(4, 3, s, s, generator=torch.Generator().manual_seed(9))
    monkeypatch.setenv("PLLAVA_KERNELS", "torch")
    ref = pllava.Engine.from_pretrained(ckpts[layout], lora_alpha=20, device=TRITON_DEVICE, dtype=torch.float32)
    monkeypatch.setenv("PLLAVA_KERNELS", "triton")
    with caplog.at_level("INFO", logger="pllava"):
        eng = pllava.Engine.from_pretrained(ckpts[layout], lora_alpha=20, device=TRITON_DEVICE, dtype=torch.float32)
    assert "triton path" in caplog.text
    calls = {"lora": 0, "pool": 0}
    # counted in the custom ops' bodies (torch.ops.pllava.lora_linear / pool_gelu run these launchers)
    lora_mod, pool_mod = (importlib.import_module(f"pllava.kernels.{m}") for m in ("lora_linear", "pool_projector"))

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(lora_mod, "lora_linear_triton", count("lora", lora_mod.lora_linear_triton))
    monkeypatch.setattr(pool_mod, "pool_gelu", count("pool", pool_mod.pool_gelu))
    torch.testing.assert_close(eng.prompt_logits(px, "What is he doing?"), ref.prompt_logits(px, "What is he doing?"),
                               rtol=1e-4, atol=1e-4)
    a = eng.generate(px, "What is he doing?", max_new_tokens=16)
    b = ref.generate(px, "What is he doing?", max_new_tokens=16)
    assert a.token_ids == b.token_ids
    assert calls["pool"] == 2 and calls["lora"] > 0, calls
    eng.set_lora_alpha(0.0)  # the scale tensor changes in place; the kernels read it on the device
    ref.set_lora_alpha(0.0)
    assert eng.generate(px, "What is he doing?", max_new_tokens=8).token_ids == \
        ref.generate(px, "What is he doing?", max_new_tokens=8).token_ids


def test_forced_unknown_kernel_path_is_an_error(ckpts, monkeypatch):
    monkeypatch.setenv("PLLAVA_KERNELS", "cuda-magic")
    with pytest.raises(ValueError, match="PLLAVA_KERNELS"):
        pllava.Engine.from_pretrained(ckpts["pllava"])
