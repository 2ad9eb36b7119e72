"""pllava._C's fp32 decode attention (the CPU's eager decode steps) against an fp64 masked softmax written here:
within twice torch's own fp32 error (its SDPA against the same fp64), both ISAs, MHA and GQA, odd head sizes, a
sliding window's lower bound; every position outside [lo, hi) holds NaN, so a kernel that reads one fails."""
import shutil

import pytest
import torch
import torch.nn.functional as F

import pllava
from asan_util import run_native, run_under_asan
from pllava import ops
from pllava.generate import decode_one_token

C = ops.native_decode_attention()
native = pytest.mark.skipif(C is None, reason="pllava._C is not built")

CASES = [  # (B, H, KV, D, S cache slots, lo, hi)
    (1, 12, 12, 64, 300, 0, 257),  # the small preset's heads
    (2, 8, 2, 128, 90, 0, 90),  # GQA, 4 query heads a KV head, two rows
    (1, 8, 2, 64, 50, 3, 45),  # GQA at D = 64: AVX-512's blocks of 8 positions (5) and a tail of 2 past them
    (1, 7, 1, 80, 40, 5, 33),  # D an odd number of 16-wide vectors, a window's lower bound
    (1, 6, 3, 24, 30, 2, 29),  # D of three 8-wide vectors: AVX2 even on an AVX-512 CPU
    (1, 2, 1, 20, 12, 0, 12),  # D off the 8-wide vector: the portable loops everywhere
    (1, 4, 2, 16, 20, 19, 20),  # one position
    (1, 2, 2, 64, 2400, 0, 2330),  # a 16-frame prompt's length
]


def _case(b, h, kv, d, s, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, 1, d, generator=g)
    k, v = torch.randn(b, kv, s, d, generator=g) * 2, torch.randn(b, kv, s, d, generator=g)
    return q, k, v


def _oracle(q, k, v, lo, hi):
    rep = q.shape[1] // k.shape[1]
    kk, vv = k[:, :, lo:hi].double().repeat_interleave(rep, 1), v[:, :, lo:hi].double().repeat_interleave(rep, 1)
    w = torch.softmax(q.double() @ kk.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return w @ vv


@native
@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_decode_attention_is_the_masked_softmax_to_fp32s_error(case, native_isa, cache):
    """A bf16 cache: the softmax over its values (widened exactly) in fp64 is the oracle, torch's SDPA over the
    same values in fp32 the error to stay within twice of."""
    b, h, kv, d, s, lo, hi = case
    generic = native_isa == "generic"
    q, k, v = _case(*case, seed=sum(case))
    k, v = k.to(cache), v.to(cache)
    want = _oracle(q, k, v, lo, hi)
    mask = torch.zeros(1, s, dtype=torch.bool)
    mask[:, lo:hi] = True
    e_torch = float((F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=mask,
                                                    enable_gqa=kv != h).double() - want).abs().max())
    k[:, :, :lo], k[:, :, hi:], v[:, :, :lo], v[:, :, hi:] = (float("nan"),) * 4  # never to be read
    o = torch.full((b, h, 1, d), float("nan"))
    C.decode_attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
                       k.stride(2), o.data_ptr(), o.stride(0), o.stride(1), b, h, kv, d, lo, hi, d ** -0.5, 2,
                       generic, cache == torch.bfloat16)
    e = float((o.double() - want).abs().max())
    print(f"\n{case} {native_isa} {cache}: {e:.2e} against torch SDPA fp32's {e_torch:.2e}")
    assert e <= 2 * e_torch + 2 ** -23, (e, e_torch)


@native
def test_the_wrapper_matches_sdpa_and_refuses_bad_arguments():
    q, k, v = _case(1, 4, 2, 32, 50, 0, 31, seed=9)
    mask = torch.zeros(1, 50, dtype=torch.bool)
    mask[:, 3:31] = True
    got = ops.cpu_decode_attention(C, q, k, v, 3, 31)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert got.shape == want.shape and float((got - want).abs().max()) < 1e-5
    got16 = ops.cpu_decode_attention(C, q, k.bfloat16(), v.bfloat16(), 3, 31)  # the bf16 cache, by its dtype
    want16 = F.scaled_dot_product_attention(q, k.bfloat16().float(), v.bfloat16().float(), attn_mask=mask,
                                            enable_gqa=True)
    assert float((got16 - want16).abs().max()) < 1e-5 < float((got16 - want).abs().max())
    with pytest.raises(ValueError, match="one dtype and layout"):
        ops.cpu_decode_attention(C, q, k, v.bfloat16(), 0, 31)
    with pytest.raises(ValueError, match="one dtype and layout"):
        ops.cpu_decode_attention(C, q, k, v.contiguous().transpose(2, 3).contiguous().transpose(2, 3), 0, 31)
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        ops.cpu_decode_attention(C, q, k, v, 5, 5)
    with pytest.raises(ValueError, match="multiple of KV"):
        ops.cpu_decode_attention(C, q[:, :3], k, v, 0, 4)
    with pytest.raises(ValueError, match="past the cache's 50"):
        ops.cpu_decode_attention(C, q, k, v, 0, 51)
    with pytest.raises(ValueError, match="q must be fp32"):
        ops.cpu_decode_attention(C, q.double(), k, v, 0, 4)
    with pytest.raises(ValueError, match=r"q has 2 rows but the cache .* has 1"):
        ops.cpu_decode_attention(C, torch.cat([q, q]), k, v, 0, 4)


@native
@pytest.mark.parametrize("window", [0, 9])
def test_the_op_reads_its_position_from_the_tensor(window):
    """pllava::decode_attention_cpu (the compiled step's attention): position pos = input_pos[0] read at run time,
    so one graph serves every step; it attends [pos + 1 - window, pos] (all of [0, pos] without a window) of a
    cache whose other slots hold NaN, to the fp64 oracle within twice torch's fp32 error."""
    q, k, v = _case(1, 6, 3, 32, 64, 0, 64, seed=11)
    for pos in (0, 20, 63):
        lo, hi = (max(0, pos + 1 - window) if window else 0), pos + 1
        want = _oracle(q, k, v, lo, hi)
        mask = torch.zeros(1, 64, dtype=torch.bool)
        mask[:, lo:hi] = True
        e_torch = float((F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).double()
                         - want).abs().max())
        kn, vn = k.clone(), v.clone()
        kn[:, :, :lo], kn[:, :, hi:], vn[:, :, :lo], vn[:, :, hi:] = (float("nan"),) * 4
        got = torch.ops.pllava.decode_attention_cpu(q, kn, vn, torch.tensor([pos]), window)
        assert float((got.double() - want).abs().max()) <= 2 * e_torch + 2 ** -23, pos
    torch.library.opcheck(torch.ops.pllava.decode_attention_cpu, (q, k, v, torch.tensor([5]), window))
    with pytest.raises(ValueError, match="one CPU position"):
        torch.ops.pllava.decode_attention_cpu(q, k, v, torch.tensor([1, 2]), window)
    with pytest.raises(ValueError, match="position -1 is negative"):
        torch.ops.pllava.decode_attention_cpu(q, k, v, torch.tensor([-1]), window)
    with pytest.raises(ValueError, match="past the cache's 64"):
        torch.ops.pllava.decode_attention_cpu(q, k, v, torch.tensor([64]), window)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_decode_steps_with_the_kernel_are_sdpas(ckpts, monkeypatch, caplog, dtype):
    """The eager decode steps of generate() (an fp32 KV cache on the CPU, in fp32 and bf16 engines): the kernel's
    logits are the masked SDPA's within fp32's error (bf16's where the engine is bf16), step after step, and the
    log names the path."""
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=dtype)
    lm, px = eng.model.language_model, torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(5))

    def steps():
        lm.setup_cache(1, 400, eng.kv_dtype, eng.device)
        with torch.no_grad():
            pos = eng.prompt_logits(px, "What is happening?").shape[0]
            out = [decode_one_token(lm, torch.tensor([[7 + i]]), torch.tensor([pos + i]), kv_len=pos + i + 1)[0, -1]
                   for i in range(4)]
        return torch.stack(out).float()

    monkeypatch.setattr(ops, "_logged", set())
    with caplog.at_level("INFO", logger="pllava"):
        got = steps()
    assert "decode attention: pllava._C's kernel over the used positions" in caplog.text
    monkeypatch.setattr(ops, "native_decode_attention", lambda: None)
    want = steps()
    # fp32: the two kernels' own rounding (3.5e-7 measured). bf16: the attention output is rounded to bf16 before the
    # next linear, so the two may differ by one bf16 step (2^-8 relative; 0.0 measured); a kernel that misses the
    # newest position is off by 5.3e-2 in both (checked), so either bound catches it
    assert float((got - want).abs().max() / want.abs().max()) < (1e-5 if dtype == torch.float32 else 2 ** -8)


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_decode_attention_under_address_sanitizer(tmp_path):
    run_under_asan(tmp_path, "decode_attention.cpp", "asan_decode_attention.cpp", "asan decode attention: ok")


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")
def test_the_vector_exp_is_within_one_ulp_of_the_correctly_rounded_exp(tmp_path):
    """The AVX2 softmax's exp (the AVX-512 path takes it too) against libm's double exp rounded once, at every 5th
    float of [-87.3, 0], and NaN / -inf / underflow at the edges (tests/native/exp_accuracy.cpp)."""
    if C is None or pllava._C.cpu_isa() == "generic":
        pytest.skip("no AVX2 here (the portable loop takes std::exp)" if C is not None else "pllava._C is not built")
    print(run_native(tmp_path, "exp_accuracy.cpp", "exp accuracy: ok", sanitize=False))  # it includes the kernel


@native
@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
def test_batched_slot_decode_uses_the_kernel_and_gives_sdpas_rows(monkeypatch, window, cache):
    """The scheduler's CPU decode (ops.slot_attention, one token a row, each row in its own slot at its own length):
    one kernel call a layer for every row, each row the per-row SDPA's over the cache's values within fp32 error,
    and stale positions past a row's length (NaN here) are never read. A slot or range outside the cache is
    refused, naming the row."""
    g = torch.Generator().manual_seed(12)
    kc, vc = torch.randn(4, 2, 30, 32, generator=g).to(cache), torch.randn(4, 2, 30, 32, generator=g).to(cache)
    slots, starts = [2, 0, 3], [9, 0, 20]  # the new token's position in each slot
    for s, a in zip(slots, starts):
        kc[s, :, a + 1:], vc[s, :, a + 1:] = float("nan"), float("nan")
    kc[1], vc[1] = float("nan"), float("nan")  # a slot no row owns
    q = torch.randn(3, 4, 1, 32, generator=g)
    calls = []
    real, C_rows = ops.cpu_decode_attention_rows, ops.native_decode_attention()
    monkeypatch.setattr(ops, "cpu_decode_attention_rows", lambda *a: calls.append(a[-3:]) or real(*a))
    got = ops.slot_attention(q, kc, vc, slots, starts, window)
    lo = [max(0, a - window + 1) if window else 0 for a in starts]
    assert calls == [(slots, lo, [a + 1 for a in starts])]
    monkeypatch.setattr(ops, "native_decode_attention", lambda: None)  # the per-row SDPA
    want = ops.slot_attention(q, kc, vc, slots, starts, window)
    assert torch.isfinite(got).all() and float((got - want).abs().max()) < 1e-5
    with pytest.raises(ValueError, match=r"row 1 wants slot 4 positions \[0, 3\) of 4 slots of 30"):
        real(C_rows, q, kc, vc, [0, 4, 1], [0, 0, 0], [1, 3, 1])
    with pytest.raises(ValueError, match=r"row 0 wants slot 0 positions \[0, 31\)"):
        real(C_rows, q, kc, vc, [0, 1, 2], [0, 0, 0], [31, 1, 1])
    with pytest.raises(ValueError, match="3 rows of q need 3 slots and ranges, got 2 / 2 / 2"):
        real(C_rows, q, kc, vc, [0, 1], [0, 0], [1, 1])
