"""quantize="int8": weight-only int8 LLM linears with bf16 activations, the LoRA unmerged at the live alpha.
Quality yardstick: top-1 agreement with the fp32 model on teacher-forced positions (the prompt's) at least
transformers' own bf16 agreement with the same fp32 reference, less one position."""
import glob
import os

import pytest
import torch

import pllava
from oracle import load_oracle, oracle_embeds, oracle_inputs, oracle_logits, read_lora
from pllava.errors import ConfigError, InputError
from pllava.model.quant import int8_linear, quantize_weight

Q = "What is happening in the video?"


def test_int8_linear_is_the_dequantized_product():
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(72, 64, generator=g), torch.randn(5, 64, generator=g), torch.randn(72, generator=g)
    q, s = quantize_weight(w.bfloat16())
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    deq = q.double() * s.double()[:, None]
    assert float((deq - w.double()).abs().max()) <= float(s.double().max()) / 2 + 1e-2  # half a step (+ bf16 of w)
    got = int8_linear(x.bfloat16(), q, s, b.bfloat16()).double()
    want = x.bfloat16().double() @ deq.T + b.bfloat16().double()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-2  # bf16 output rounding only


@pytest.fixture(scope="module")
def fp32_logits(ckpts):
    """fp32 logits of transformers' model (the reference both are held to) and its own bf16 logits."""
    lora = read_lora(sorted(glob.glob(os.path.join(ckpts["pllava"], "*.safetensors"))))
    ids, image_token, pooling, frames, _ = oracle_inputs(ckpts["current"])
    px = torch.randn(frames, 3, 42, 42, generator=torch.Generator().manual_seed(21))
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        m = load_oracle(ckpts["current"], lora, 4.0).to(dt)
        with torch.no_grad():
            out[dt] = oracle_logits(m, oracle_embeds(m, px.to(dt), ids, image_token, pooling, frames)).float()
    return px, out


def test_bf16_int8_agrees_with_fp32_as_well_as_transformers_bf16(ckpts, fp32_logits):
    px, ref = fp32_logits
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int8")
    lin = eng.model.language_model.layers[0].mlp.gate_proj
    assert lin.qweight.dtype == torch.int8 and eng.model.language_model.layers[0].self_attn.q_proj.weight is None
    got = eng.prompt_logits(px, Q).float()
    top = ref[torch.float32].argmax(-1)
    agree_q, agree_hf = int((got.argmax(-1) == top).sum()), int((ref[torch.bfloat16].argmax(-1) == top).sum())
    print(f"\nint8 agreement {agree_q}, transformers bf16 {agree_hf}, of {top.numel()}")
    assert agree_q >= agree_hf - 1, (agree_q, agree_hf, top.numel())


def test_alpha_stays_live_and_merge_is_refused(ckpts):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int8")
    px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(22))
    at4 = eng.prompt_logits(px, Q)
    eng.set_lora_alpha(32)
    at32 = eng.prompt_logits(px, Q)
    assert not torch.allclose(at4, at32, atol=1e-2)
    ref32 = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, lora_alpha=32).prompt_logits(px, Q)
    assert float((at32.float() - ref32.float()).abs().max() / ref32.float().abs().max()) < 0.05  # int8 error only
    with pytest.raises(InputError, match="merge_lora"):
        eng.merge_lora()
    out = eng.generate_many([dict(video=px, prompt=Q, max_new_tokens=4, lora_alpha=a) for a in (0.0, 32.0)])
    assert [len(o.token_ids) for o in out] == [4, 4]
    with pytest.raises(ConfigError, match="quantize"):
        pllava.Engine.from_pretrained(ckpts["pllava"], quantize="int4")


def test_int8_halves_the_llm_weight_bytes(ckpts):
    full = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16)
    q = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int8")

    def linear_bytes(lm):
        n = 0
        for name, t in list(lm.named_parameters()) + list(lm.named_buffers()):
            if "embed_tokens" in name or "norm" in name or "lora_" in name or "kv_cache" in name:
                continue
            n += t.numel() * t.element_size()
        return n

    a, b = linear_bytes(full.model.language_model), linear_bytes(q.model.language_model)
    assert b <= 0.52 * a, (a, b)  # int8 + one bf16 scale a row
