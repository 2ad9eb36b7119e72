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
