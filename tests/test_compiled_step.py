"""The torch.compile'd decode step (engine.compile_decode / PLLAVA_COMPILE=1): the same greedy tokens as eager
steps, and the LoRA scale stays a live input: after set_lora_alpha the compiled step follows the new alpha (a
frozen graph would keep the old one; measured 0.11 logit error that way) without recompiling."""
import pytest
import torch

import pllava


@pytest.fixture(scope="module")
def engines(ckpts):
    eager = pllava.Engine.from_pretrained(ckpts["pllava"])
    comp = pllava.Engine.from_pretrained(ckpts["pllava"])
    comp.compile_decode = True
    return eager, comp


def test_compiled_step_follows_a_live_alpha(engines):
    import torch._dynamo

    eager, comp = engines
    px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(2))
    q = "What is happening in the video?"
    torch._dynamo.utils.counters.clear()
    at4 = comp.generate(px, q, max_new_tokens=12)
    assert comp._step.compiled is not None  # the compiled step is what ran
    assert at4.token_ids == eager.generate(px, q, max_new_tokens=12).token_ids
    frames_after_first = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for alpha in (32.0, 0.0):
        comp.set_lora_alpha(alpha)
        eager.set_lora_alpha(alpha)
        got = comp.generate(px, q, max_new_tokens=12)
        assert got.token_ids == eager.generate(px, q, max_new_tokens=12).token_ids, alpha
        assert got.token_ids != at4.token_ids or alpha == 4.0
    # alpha is data, not a constant: no new graph was compiled for it
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames_after_first
    comp.set_lora_alpha(4)
    eager.set_lora_alpha(4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_int8_step_gives_the_eager_tokens(ckpts, dtype):
    """quantize="int8" on the CPU: the decode rows' int8 GEMV traces as the custom op pllava::int8_gemv_cpu
    (fullgraph: the extension is not called, nor asked its ISA, inside the graph)."""
    px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(5))
    q = "What is happening in the video?"
    eager = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=dtype, quantize="int8")
    comp = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=dtype, quantize="int8")
    comp.compile_decode = True
    got = comp.generate(px, q, max_new_tokens=8)
    assert comp._step.compiled is not None
    assert got.token_ids == eager.generate(px, q, max_new_tokens=8).token_ids
