"""pllava._C's bf16 prefill attention (csrc/prefill_attention.cpp; ops.cpu_attention_bf16, which the engine's bf16
prefill and CLIP's frames run on a CPU with AVX512-BF16) against softmax attention written here in fp64: within
twice the error of torch's own bf16 SDPA against the same reference, on odd lengths, GQA, batches, strided views
as the model makes them, every supported head size; its bits independent of the thread count and of the batch."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from asan_util import run_under_asan
from pllava import ops

native = pytest.mark.skipif(ops.native_prefill_attention() is None,
                            reason="pllava._C's AVX512-BF16 prefill attention does not run here")


def _reference(q, k, v, causal):
    """softmax(q k^T / sqrt(d)) v in fp64; causal: query i sees keys <= i + (Lk - L); GQA by repeating K / V."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        n, nk = q.shape[2], k.shape[2]
        seen = torch.arange(nk)[None, :] <= torch.arange(n)[:, None] + (nk - n)
        s = s.masked_fill(~seen, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def _qkv(b, h, kv, n, d, seed, nk=None):
    """bf16 q, k, v as the model makes them: views of one (B, L, (H + 2 KV) * hd) projection, transposed."""
    nk = nk or n
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, max(n, nk), (h + 2 * kv) * d, generator=g) * 1.5).bfloat16()
    q = x[:, :n, :h * d].view(b, n, h, d).transpose(1, 2)
    k = x[:, :nk, h * d:(h + kv) * d].view(b, nk, kv, d).transpose(1, 2)
    v = x[:, :nk, (h + kv) * d:].view(b, nk, kv, d).transpose(1, 2)
    return q, k, v


def _torch_sdpa(q, k, v, causal):
    if causal and k.shape[2] != q.shape[2]:  # torch's is_causal is top-left aligned: the mask, bottom-right
        n, nk = q.shape[2], k.shape[2]
        mask = torch.arange(nk)[None, :] <= torch.arange(n)[:, None] + (nk - n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


# (B, H, KV, L, hd, causal, Lk): one position; tails of the 16-row query block and the 64-key block; GQA; batches;
# every head size; a longer key range (a causal prompt after a cached prefix; at Lk = 76, L = 16 the last key block
# holds no key row 0 sees)
CASES = [(1, 4, 4, 1, 128, True, None), (1, 4, 2, 17, 128, True, None), (2, 3, 3, 77, 64, False, None),
         (1, 8, 2, 130, 128, True, None), (3, 2, 2, 65, 64, True, None), (1, 2, 1, 200, 16, True, None),
         (2, 2, 2, 33, 32, False, None), (1, 2, 2, 70, 256, True, None), (1, 4, 2, 10, 64, True, 75),
         (1, 2, 2, 16, 64, True, 76), (2, 6, 6, 577, 64, False, None)]


@native
@pytest.mark.parametrize("b,h,kv,n,d,causal,nk", CASES)
def test_within_twice_torchs_own_bf16_error(b, h, kv, n, d, causal, nk):
    q, k, v = _qkv(b, h, kv, n, d, seed=n * 100 + d, nk=nk)
    got = ops.cpu_attention_bf16(q, k, v, causal)
    assert got is not None and got.dtype == torch.bfloat16 and got.shape == q.shape
    ref = _reference(q, k, v, causal)
    own = _torch_sdpa(q, k, v, causal).double() - ref
    err = got.double() - ref
    for name, f in (("max", lambda e: e.abs().max()), ("mean", lambda e: e.abs().mean())):
        mine, torchs = float(f(err)), float(f(own))
        assert mine <= 2 * torchs + 1e-6, f"{name} |error| {mine:.3e} against torch bf16's {torchs:.3e}"
    assert got.transpose(1, 2).is_contiguous()  # (B, L, H, hd) beneath: the caller's reshape is free


@native
def test_bits_do_not_depend_on_threads_or_batch():
    q, k, v = _qkv(3, 4, 2, 150, 64, seed=9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.cpu_attention_bf16(q, k, v, True)
    finally:
        torch.set_num_threads(threads)
    many = ops.cpu_attention_bf16(q, k, v, True)
    assert torch.equal(one, many)
    alone = ops.cpu_attention_bf16(q[1:2], k[1:2], v[1:2], True)
    assert torch.equal(alone, many[1:2])
    shorter = ops.cpu_attention_bf16(q[:, :, :90], k[:, :, :90], v[:, :, :90], True)  # a causal row sees no later key
    assert torch.equal(shorter, many[:, :, :90])


def test_what_it_leaves_to_torch():
    """fp32, an unsupported head size, autograd: None (torch's SDPA runs); the engine's entry points still answer."""
    q, k, v = _qkv(1, 2, 2, 20, 64, seed=1)
    assert ops.cpu_attention_bf16(q.float(), k.float(), v.float(), True) is None
    q8, k8, v8 = _qkv(1, 2, 2, 20, 8, seed=2)
    assert ops.cpu_attention_bf16(q8, k8, v8, True) is None
    qg = q.detach().clone().requires_grad_()
    assert ops.cpu_attention_bf16(qg, k, v, True) is None
    for f, causal in ((lambda: ops.causal_attention(q8, k8, v8), True), (lambda: ops.attention(q8, k8, v8), False)):
        assert torch.equal(f(), _torch_sdpa(q8, k8, v8, causal))


@native
def test_engine_paths_use_it(caplog):
    """causal_attention (a bf16 prompt) and attention (CLIP's frames) run the kernel, and say so once."""
    import logging

    from pllava import ops as o

    o._logged.discard("bf16 prefill attention on the CPU: pllava._C (csrc/prefill_attention.cpp, AVX512-BF16)")
    q, k, v = _qkv(1, 4, 2, 40, 64, seed=3)
    with caplog.at_level(logging.INFO, logger="pllava"):
        assert torch.equal(ops.causal_attention(q, k, v), ops.cpu_attention_bf16(q, k, v, True))
    assert "pllava._C (csrc/prefill_attention.cpp" in caplog.text
    q, k, v = _qkv(2, 3, 3, 50, 32, seed=4)
    assert torch.equal(ops.attention(q, k, v), ops.cpu_attention_bf16(q, k, v, False))


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_prefill_attention_under_address_sanitizer(tmp_path):
    run_under_asan(tmp_path, "prefill_attention.cpp", "asan_prefill_attention.cpp", "asan prefill attention: ok")


@native
@pytest.mark.parametrize("quantize,chunks", [(None, (7, 17, 50)), ("int8", (45, 50)), ("w8a8", (45, 50)),
                                             ("int4", (45, 50))])
def test_a_chunked_prefill_attends_as_the_whole_prompt(ckpts, video_path, quantize, chunks):
    """A bf16 engine's prompt prefilled whole, in chunks (the scheduler's prefill_chunk) or by generate() (its video
    prefix, then the question over the cache) gives the same tokens and logprobs within fp32 roundoff: every pass
    attends through this kernel, whose rows do not depend on where the prompt was cut. What is left is the
    fp32 decode-row path of a last chunk of <= 16 rows, and the batch's other rows in the decode steps (2.4e-7 here;
    under int8 a chunk of <= 16 rows takes the fp32 int8 GEMV instead of the bf16 GEMM, so its chunks here are
    longer: 89 = 45 + 44 and 50 + 39 positions, and so under int4; under w8a8 every prefill row's linears are exact integer products
    of its own quantized row, so they do not depend on the cut either).
    With torch's SDPA a chunk attended in fp32 over the cache where a whole prompt attended in bf16: the text
    prompt's logprobs moved by up to 0.012."""
    import pllava

    engine = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize=quantize)
    reqs = [dict(video=video_path, prompt="Describe the video in details.", max_new_tokens=6, logprobs=3),
            dict(video=None, prompt="x " * 40, max_new_tokens=6, logprobs=3)]

    def check(outs, label):
        for i, (o, w) in enumerate(zip(outs, whole)):
            assert o.token_ids == w.token_ids, (label, i)
            gap = max(abs(a.logprob - b.logprob) for a, b in zip(o.logprobs, w.logprobs))
            assert gap <= 1e-5, f"{label}, request {i}: logprobs {gap:.2e} apart"

    whole = engine.generate_many(reqs)
    for chunk in chunks:
        check(engine.generate_many(reqs, prefill_chunk=chunk), f"prefill_chunk={chunk}")
    engine.prefix_cache = False
    check([engine.generate(r["video"], r["prompt"], max_new_tokens=6, logprobs=3) for r in reqs], "generate()")


@native
@pytest.mark.parametrize("causal", [True, False])
def test_a_nan_reaches_exactly_the_rows_that_see_it(causal):
    """A NaN in one key of one kv head makes NaN every output row of its query heads that sees that key, and no other
    (torch's softmax: a NaN score is a NaN row), never a finite weight of ~0 that hides it."""
    q, k, v = _qkv(1, 4, 2, 90, 64, seed=6)
    k = k.clone()
    k[0, 1, 70, 5] = float("nan")  # kv head 1 (query heads 2, 3); key 70 (in the second 64-key block)
    got = ops.cpu_attention_bf16(q, k, v, causal)
    want = _reference(q, k, v, causal)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    rows = torch.isnan(got).any(dim=-1)[0]  # (H, L)
    assert not rows[:2].any() and (rows[2:, 70:].all() if causal else rows[2:].all())
    assert not causal or not rows[2:, :70].any()
