"""GPU-only checks (skipped without CUDA; run by benchmarks/gpu_suite.sh on a lent GPU)."""
import pytest
import torch

import pllava

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def px():
    return torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(3))


def test_cuda_fp32_matches_cpu(ckpts, px, monkeypatch):
    monkeypatch.setenv("PLLAVA_KERNELS", "torch")
    cpu = pllava.Engine.from_pretrained(ckpts["pllava"], device="cpu")
    gpu = pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda", dtype=torch.float32)
    torch.testing.assert_close(gpu.prompt_logits(px, "hi").cpu(), cpu.prompt_logits(px, "hi"), rtol=1e-3, atol=1e-3)


def test_triton_path_on_cuda_matches_torch_path(ckpts, px, monkeypatch):
    monkeypatch.setenv("PLLAVA_KERNELS", "torch")
    ref = pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda", dtype=torch.float32)
    monkeypatch.setenv("PLLAVA_KERNELS", "triton")
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda", dtype=torch.float32)
    assert eng.generate(px, "hi", max_new_tokens=16).token_ids == ref.generate(px, "hi", max_new_tokens=16).token_ids


def test_cuda_graph_decode_matches_eager(ckpts, px):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda", dtype=torch.float32)
    eager = eng.generate(px, "hi", max_new_tokens=24).token_ids
    eng.cuda_graphs = True
    assert eng.generate(px, "hi", max_new_tokens=24).token_ids == eager
    assert eng.generate(px, "hello there", max_new_tokens=24).token_ids == \
        pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda", dtype=torch.float32).generate(
            px, "hello there", max_new_tokens=24).token_ids


def _mixed(px):
    return [dict(video=px, prompt=p, max_new_tokens=n, lora_alpha=a)
            for p, n, a in (("hi", 20, 4), ("what is this?", 9, 20), ("describe", 31, 0), ("a", 14, 8),
                            ("hello there", 26, 4))]


def test_batched_decode_on_cuda_matches_sequential(ckpts, px):
    """generate_many on CUDA (Triton slot attention + per-row LoRA scale) against one generate() at a time."""
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda", dtype=torch.float32)
    reqs = _mixed(px)
    seq = []
    for r in reqs:
        eng.set_lora_alpha(r["lora_alpha"])
        seq.append(eng.generate(px, r["prompt"], max_new_tokens=r["max_new_tokens"]).token_ids)
    eng.set_lora_alpha(4)
    assert [o.token_ids for o in eng.generate_many(reqs, max_batch_size=3)] == seq


def test_batched_cuda_graphs_match_eager(ckpts, px):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda", dtype=torch.float32)
    reqs = _mixed(px)
    eager = [o.token_ids for o in eng.generate_many(reqs, max_batch_size=5)]
    eng.cuda_graphs = True
    graphs = [o.token_ids for o in eng.generate_many(reqs, max_batch_size=5)]  # buckets 1, 2, 4, 8 replayed
    assert graphs == eager
    assert set(eng._sched.graphs.graphs) >= {4, 8}


def test_int4_on_cuda_batches_and_graphs_match_eager(ckpts, px):
    """quantize="int4" in bf16 on CUDA (the fused Triton int4 kernel for decode rows, per-row alphas in a batch; the
    Triton-dequantized weight for prefills): CUDA graphs replay the eager steps' tokens, alone and batched."""
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda", dtype=torch.bfloat16, quantize="int4")
    reqs = [dict(r, max_new_tokens=n) for r, n in zip(_mixed(px)[:3], (7, 4, 9))]  # (short: CI interprets it)
    eager = [o.token_ids for o in eng.generate_many(reqs, max_batch_size=3)]
    one = eng.generate(px, "hi", max_new_tokens=8).token_ids
    eng.cuda_graphs = True
    assert [o.token_ids for o in eng.generate_many(reqs, max_batch_size=3)] == eager
    assert eng.generate(px, "hi", max_new_tokens=8).token_ids == one
    assert len(one) > 1 and eng.model.language_model.layers[0].mlp.up_proj.qweight.dtype == torch.uint8


def test_prefix_hit_on_cuda_is_bit_equal_to_cold(ckpts, px, monkeypatch):
    """bf16 on CUDA: a follow-up that reuses the cached video prefix gets a cold engine's logits bit for bit at
    every step (both prefill the prefix, then the question: prompt.prefix_split)."""
    from pllava import generate as gen

    seen = []
    sample = gen.SequenceState.sample
    monkeypatch.setattr(gen.SequenceState, "sample", lambda self, logits: (seen.append(logits.float().cpu()),
                                                                           sample(self, logits))[1])
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda", dtype=torch.bfloat16)
    cold = pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda", dtype=torch.bfloat16)
    cold.prefix_cache = False
    eng.generate(px, "what is this?", max_new_tokens=3, video_key="clip")
    seen.clear()
    hit = eng.generate(px, "hello there", max_new_tokens=8, video_key="clip")
    got = list(seen)
    seen.clear()
    cold.generate(px, "hello there", max_new_tokens=8, video_key="clip")
    assert hit.timings.get("prefix_cache_hit") == 1 and len(got) == len(seen) == 8
    assert all(torch.equal(a, b) for a, b in zip(got, seen))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_int4_quantization_on_cuda_is_the_cpu_quantization(dtype):
    """A CUDA load quantizes int4 by the torch formula on the GPU (its divisions, roundings and fp64 sums), the CPU
    by pllava._C's pass: the same scales and bytes, bit for bit (7B's gate_proj shape, Gaussian and t(4) weights,
    a group of zeros)."""
    from pllava.model.int4 import quantize_weight_int4

    gen = torch.Generator().manual_seed(6)
    w = torch.cat([torch.randn(64, 4096, generator=gen) * 0.02,
                   torch.distributions.StudentT(4.0).sample((64, 4096)) * 0.01]).to(dtype)
    w[0, :32] = 0.0
    q_cpu, s_cpu = quantize_weight_int4(w)
    q_gpu, s_gpu = quantize_weight_int4(w.cuda())
    assert q_gpu.is_cuda and s_gpu.is_cuda
    assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.cpu().view(torch.int16), s_cpu.view(torch.int16))
