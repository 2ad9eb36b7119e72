"""The torch.compile'd decode step (engine.compile_decode / PLLAVA_COMPILE=1): the same greedy tokens as eager
steps, and the LoRA scale stays a live input: after set_lora_alpha the compiled step follows the new alpha (a
frozen graph would keep the old one; measured 0.11 logit error that way) without recompiling."""
import pytest
import torch

import pllava
from pllava import ops


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


@pytest.mark.parametrize("dtype,mode", [(torch.bfloat16, "int8"), (torch.float32, "int8"), (torch.bfloat16, "int4")])
def test_compiled_int8_step_gives_the_eager_tokens(ckpts, dtype, mode):
    """quantize="int8" (and "int4") on the CPU: each decode-row linear, its LoRA included, traces as the op
    pllava::int8_gemv_cpu (fullgraph: the extension is not called, nor asked its ISA, inside the graph). The same
    tokens as eager steps at alpha 4, and after set_lora_alpha(32): the op reads the live scale, no recompile."""
    import torch._dynamo

    px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(5))
    q = "What is happening in the video?"
    eager = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=dtype, quantize=mode)
    comp = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=dtype, quantize=mode)
    comp.compile_decode = True
    got = comp.generate(px, q, max_new_tokens=8)
    assert comp._step.compiled is not None
    assert got.token_ids == eager.generate(px, q, max_new_tokens=8).token_ids
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    comp.set_lora_alpha(32)
    eager.set_lora_alpha(32)
    at32 = comp.generate(px, q, max_new_tokens=8)
    assert at32.token_ids == eager.generate(px, q, max_new_tokens=8).token_ids
    assert at32.token_ids != got.token_ids  # alpha reached the op
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(ops.native_decode_attention() is None, reason="pllava._C is not built")
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_compiled_cpu_step_attends_the_used_positions_only(ckpts, quantize):
    """The compiled CPU step has static shapes (the whole cache), yet its attention (the op
    pllava::decode_attention_cpu, position read from the step's input tensor) reads only positions [0, pos]: with
    every other cache slot NaN, it gives the eager tokens, where a masked SDPA over the whole cache gives NaN
    (0 x NaN), which generate() refuses."""
    px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(8))
    q = "What is happening in the video?"
    eager = pllava.Engine.from_pretrained(ckpts["pllava"], quantize=quantize)
    comp = pllava.Engine.from_pretrained(ckpts["pllava"], quantize=quantize)
    comp.compile_decode, comp.prefix_cache = True, False
    want = eager.generate(px, q, max_new_tokens=8).token_ids
    assert comp.generate(px, q, max_new_tokens=8).token_ids == want
    for layer in comp.model.language_model.layers:  # the cache is reused as allocated: poison all of it
        layer.self_attn.kv_cache.k_cache.fill_(float("nan"))
        layer.self_attn.kv_cache.v_cache.fill_(float("nan"))
    assert comp.generate(px, q, max_new_tokens=8).token_ids == want


@pytest.mark.skipif(ops.native_decode_attention() is None, reason="pllava._C is not built")
def test_the_compiled_step_keeps_a_sliding_window(tmp_path):
    """Mistral, a 24-position window under a ~60-position prompt: the compiled step's attention op takes the window
    and gives the eager steps' tokens (which test_claims holds to transformers); without the window they differ."""
    from pllava.testing import make_tiny_checkpoint

    d = make_tiny_checkpoint(str(tmp_path / "mistral"), "current", shards=1,
                             text={"model_type": "mistral", "sliding_window": 24, "head_dim": 16})
    px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    q = "What is happening in the video?"
    eager = pllava.Engine.from_pretrained(d)
    comp = pllava.Engine.from_pretrained(d)
    comp.compile_decode = True
    want = eager.generate(px, q, max_new_tokens=20).token_ids
    assert comp.generate(px, q, max_new_tokens=20).token_ids == want
    for e in (eager, comp):
        for layer in e.model.language_model.layers:
            layer.self_attn.window = None
    wide = comp.generate(px, q, max_new_tokens=20).token_ids
    assert wide == eager.generate(px, q, max_new_tokens=20).token_ids and wide != want
