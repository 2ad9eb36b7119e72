"""quantize="int4": the LLM's linears as symmetric int4 groups of 32 with bf16 scales (model/int4.py), decode rows by
pllava._C's int4 GEMV, prefill rows by the dequantized weight's GEMM. Against references written here: the group
quantization and its byte layout, the product in fp64, the dequantized weight's bits, and the exact int4 model
(transformers' modules in fp64 with each decoder linear put through the test's own int4 round trip)."""
import glob
import os

import pytest
import torch

import pllava
from oracle import load_oracle, oracle_embeds, oracle_inputs, read_lora
from pllava.errors import ConfigError, MemoryBudgetError
from pllava.model.int4 import dequantize_int4
from pllava.model.quant import DECODE_ROWS, int8_linear, quantize_weight_int4
from pllava.ops import native_extension
from triton_util import TRITON_DEVICE, needs_triton

Q = "What is happening in the video?"
C = native_extension("int4_gemv")
native = pytest.mark.skipif(C is None, reason="pllava._C is not built")


def _bf16(t):
    """fp32 -> bf16, round to nearest even, by its bits (finite values): the test's own rounding."""
    u = t.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.to(torch.int64).to(torch.int32).view(torch.float32)  # (r fits: finite values stay below 2^32)


DIVISORS = (8.0, 7.0, 8.5, 9.0)  # the candidate steps max|w| / t, in the rule's order (ties: the first wins)


def _q40_scale(g):
    """llama.cpp's Q4_0 scale of each group (..., 32) as fp32 values of bf16: m = the weight of largest magnitude
    (the positive one where +|m| and -|m| both occur), s = bf16(-m / 8) (a group of zeros: -1e-12)."""
    a = g.abs().amax(-1)
    m = torch.where((g == a[..., None]).any(-1), a, -a)
    return _bf16(-torch.sign(m + (m == 0)) * torch.clamp(a / 8.0, min=1e-12))


def _ref_quant(w):
    """The test's own int4 groups: (q (N, K) in [-8, 7] as int64, s (N, K / 32) as fp32 values of bf16), in IEEE
    fp32 divisions. Candidate steps s_t = bf16(-m / t) for t in DIVISORS (Q4_0's sign and m; t = 8 is Q4_0's
    scale), each one's q_t = round half to even (w / s_t) clamped to [-8, 7], its least-squares scale
    a / b (a = sum w q_t, b = sum q_t^2, in fp64) and score a^2 / b (the squared error it removes); the first best
    score wins (a group whose every q_t is 0 keeps Q4_0's), s = bf16(fp32(a / b)), then q fitted to s."""
    n, k = w.shape
    g = w.float().reshape(n, k // 32, 32)
    a = g.abs().amax(-1)
    sign = torch.where((g == a[..., None]).any(-1), -1.0, 1.0)
    st = torch.stack([_bf16(sign * torch.clamp(a / t, min=1e-12)) for t in DIVISORS])  # (C, N, G)
    qt = torch.round(g[None] / st[..., None]).clamp(-8, 7).double()  # (C, N, G, 32)
    num, den = (g.double()[None] * qt).sum(-1), (qt * qt).sum(-1)
    score = torch.where(den > 0, num * num / den.clamp(min=1), torch.full_like(num, -1.0))
    pick = score.argmax(0, keepdim=True)  # (the first of equal maxima)
    fit = (num.gather(0, pick) / den.gather(0, pick).clamp(min=1))[0]
    s = torch.where(score.amax(0) > 0, _bf16(fit.float()), _q40_scale(g))
    q = torch.round(g / s[..., None]).clamp(-8, 7)
    return q.reshape(n, k).long(), s


def _ref_weight(w):
    q, s = _ref_quant(w)
    n, k = w.shape
    return (q.double().reshape(n, k // 32, 32) * s.double()[..., None]).float().reshape(n, k)  # fl32(q * s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k", [(1, 32), (7, 96), (33, 256)])
def test_groups_are_the_reference_quantization_in_its_byte_layout(dtype, n, k):
    w = (torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) * 0.05).to(dtype)
    w[0, :32] = 0.0  # a group of zeros: the smallest scale, q = 0
    if k >= 96:
        w[-1, 32:64] *= 0.5
        w[-1, 40], w[-1, 41] = 0.3, -0.3  # a tie in magnitude: the positive weight maps to -8, the other to +7
        w[-1, 64] = -0.5  # a negative weight of largest magnitude: a positive scale
    q, s = quantize_weight_int4(w)
    rq, rs = _ref_quant(w)
    assert q.dtype == torch.uint8 and q.shape == (n, k // 2) and s.dtype == torch.bfloat16 and s.shape == (n, k // 32)
    assert torch.equal(s.float(), rs)
    # byte 16g + j of a row: q + 8 of weight 32g + j (low nibble), of 32g + 16 + j (high nibble)
    u = (rq + 8).reshape(n, k // 32, 32)
    want = (u[..., :16] | (u[..., 16:] << 4)).reshape(n, k // 2)
    assert torch.equal(q.long(), want)
    assert int(rq.min()) >= -8 and int(rq.max()) <= 7
    if k >= 96:  # the tie: a negative scale (the positive weight's q below 0); a negative m: a positive scale
        assert rq[-1, 40] < 0 < rq[-1, 41] and rs[-1, 1] < 0 and rq[-1, 64] < 0 < rs[-1, 2]


@native
@pytest.mark.parametrize("isa", ["best", "avx2", "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_native_quantization_is_the_torch_formula(monkeypatch, isa, dtype):
    from pllava.model import int4

    w = torch.randn(45, 4096, generator=torch.Generator().manual_seed(3)) * 0.02
    w = torch.cat([w, w.bfloat16().float(), w * 1e-11]).to(dtype)  # (bf16 values: ties in magnitude, both signs;
    # groups under the 1e-12 floor of the step)
    w[0, :32] = 0.0
    w[1, :32] = -0.0
    C.set_isa_cap("best" if isa == "generic" else isa)
    try:
        fast = quantize_weight_int4(w, generic=isa == "generic")
    finally:
        C.set_isa_cap("best")
    monkeypatch.setattr(int4, "native_extension", lambda entry: None)
    slow = quantize_weight_int4(w)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


def test_the_chosen_fit_is_exact_rational_arithmetics_choice():
    """The rule's fp64 sums are exact (csrc/int8_quantize.cpp says why): against Fractions, on fp32 and bf16 groups
    and groups of a few distinct magnitudes (ties between candidates' fits)."""
    from fractions import Fraction

    gen = torch.Generator().manual_seed(9)
    w = torch.cat([torch.randn(8, 256, generator=gen) * 0.03,
                   (torch.randn(8, 256, generator=gen) * 3).bfloat16().float(),
                   torch.randint(-3, 4, (4, 256), generator=gen).float() * 0.25])
    q, s = quantize_weight_int4(w)
    n, k = w.shape
    got = s.float().reshape(-1)
    for i, g in enumerate(w.reshape(-1, 32)):
        a = float(g.abs().max())
        sign = -1.0 if bool((g == a).any()) else 1.0
        best = None
        for t in DIVISORS:
            st = _bf16(torch.tensor([sign * max(a / t, 1e-12)]))
            qt = torch.round(g / st).clamp(-8, 7)
            num = sum(Fraction(float(x)) * int(v) for x, v in zip(g, qt))
            den = int((qt * qt).sum())
            assert float((g.double() * qt.double()).sum()) == num  # exact in fp64, whatever the order
            if den and (best is None or num * num / den > best[0]):
                best = (num * num / den, num / den)
        want = _bf16(torch.tensor([float(best[1])]))[0] if best else _q40_scale(g)
        assert got[i] == want, (i, float(got[i]), float(want))


def test_the_fitted_scales_leave_less_error_than_q4_0():
    """What the search is for: squared error against Q4_0's scale (the test's own) on Gaussian and Student-t(4)
    weights, 0.895x and 0.924x in a 200k-group simulation; and no group worse, but by the scale's bf16 rounding."""
    gen = torch.Generator().manual_seed(4)
    gauss = torch.randn(2048, 1024, generator=gen)
    t4 = torch.distributions.StudentT(4.0).sample((2048, 1024))
    for w, bound in ((gauss, 0.90), (t4, 0.93)):
        q, s = quantize_weight_int4(w)
        g = w.reshape(-1, 32).double()
        err = ((g - dequantize_int4(q, s, torch.float32).reshape(-1, 32).double()) ** 2).sum(-1)
        s0 = _q40_scale(w.reshape(-1, 32)).double()
        err0 = ((g - torch.round(g / s0[:, None]).clamp(-8, 7) * s0[:, None]) ** 2).sum(-1)
        assert float(err.sum() / err0.sum()) < bound
        assert int((err > err0 * (1 + 1e-9)).sum()) < 1e-3 * g.shape[0]


def test_a_width_off_the_group_is_refused_by_name(tmp_path):
    from pllava.testing import make_tiny_checkpoint

    with pytest.raises(ConfigError, match="layers.0.mlp.up_proj.weight.*multiple of 32"):
        quantize_weight_int4(torch.randn(8, 48), "layers.0.mlp.up_proj.weight")
    ck = make_tiny_checkpoint(str(tmp_path / "c"), "pllava", shards=1, text=dict(intermediate_size=112))
    with pytest.raises(ConfigError, match=r"language_model\.layers\.0\.mlp\.down_proj\.weight has shape \(64, 112\)"
                                          r".*multiple of 32.*quantize='int8'"):
        pllava.Engine.from_pretrained(ck, dtype=torch.bfloat16, quantize="int4")


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("generic", [False, True])
def test_the_dequantized_weight_is_fl32_q_times_s(dtype, generic):
    w = torch.randn(37, 160, generator=torch.Generator().manual_seed(5)) * 0.1
    q, s = quantize_weight_int4(w)
    ref = _ref_weight(w)
    out = torch.empty(37, 160, dtype=dtype)
    C.int4_dequant(q.data_ptr(), s.data_ptr(), 37, 160, out.data_ptr(), dtype == torch.bfloat16, 160, 2, generic)
    assert torch.equal(out, ref if dtype == torch.float32 else _bf16(ref).to(dtype))
    assert torch.equal(dequantize_int4(q, s, dtype), out)


def _gemv(x, q, s, isa="best", generic=False):
    C.set_isa_cap(isa)
    try:
        (m, k), n = x.shape, q.shape[0]
        y = torch.empty(m, n)
        C.int4_gemv(x.data_ptr(), k, q.data_ptr(), s.data_ptr(), y.data_ptr(), n, m, n, k, 2, generic)
        return y
    finally:
        C.set_isa_cap("best")


@native
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (1, 33, 4096), (3, 4096, 96), (5, 11, 352), (16, 37, 1024)])
def test_the_gemv_is_the_fp64_product_within_fp32_summation_error(m, n, k):
    g = torch.Generator().manual_seed(m * 7 + n)
    w = torch.randn(n, k, generator=g) * 0.02
    x = torch.randn(m, k, generator=g)
    q, s = quantize_weight_int4(w)
    wr = _ref_weight(w).double()
    ref = x.double() @ wr.T
    bound = (k / 16 + 5) * 2.0 ** -24 * (x.double().abs() @ wr.abs().T)  # 16 lanes of k/16 FMAs, then 16 lanes
    names = ["best", "avx2"] if C.cpu_isa_supported() == "avx512" else ["best"]
    got = {isa: _gemv(x, q, s, isa) for isa in names}
    got["generic"] = _gemv(x, q, s, generic=True)
    for isa, y in got.items():
        err = (y.double() - ref).abs()
        assert bool((err <= bound).all()), (isa, float(err.max()), float(bound.max()))
    if "avx2" in got:  # the AVX2 halves reduced in the AVX-512 lanes' order: the same bits
        assert torch.equal(got["best"], got["avx2"])
    # a row's result is that row's alone: the same bits in a batch of m as alone
    for i in range(m):
        assert torch.equal(_gemv(x[i:i + 1].contiguous(), q, s)[0], got["best"][i])


@native
@torch.no_grad()
def test_decode_rows_and_prefill_rows_are_the_same_product_lora_included():
    """int8_linear on int4 weights: decode rows (the GEMV, LoRA by the bf16 GEMV) and prefill rows (the dequantized
    weight's GEMM) agree to fp32 roundoff in fp32, and the LoRA adds its delta at the live scale."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(48, 96, generator=g) * 0.05
    q, s = quantize_weight_int4(w)
    x = torch.randn(DECODE_ROWS + 4, 96, generator=g)
    a, b = torch.randn(8, 96, generator=g) * 0.1, torch.randn(48, 8, generator=g) * 0.1
    scale = torch.tensor(0.5)
    wr = _ref_weight(w).double()

    def check(y, a, b, rows):
        """y against the fp64 product, within fp32's summation bound: the base's K products and the LoRA's r + K
        (its (M, r) product rounded once more), each at most (terms + 16) units of 2^-24 of its absolute sum."""
        xd, ad, bd = x[rows].double(), a.double(), b.double()
        ref = xd @ wr.T + 0.5 * (xd @ ad.T) @ bd.T
        u = 2.0 ** -24
        bound = (96 + 16) * u * (xd.abs() @ wr.abs().T) + (96 + 8 + 32) * u * 0.5 * (xd.abs() @ ad.abs().T) @ bd.abs().T
        err = (y.double() - ref).abs()
        assert y.dtype == torch.float32 and bool((err <= bound).all()), (float(err.max()), float(bound.max()))

    prefill = int8_linear(x, q, s, None, lora=(a, b, scale))
    decode = torch.cat([int8_linear(x[i:i + 4], q, s, None, lora=(a, b, scale)) for i in range(0, x.shape[0], 4)])
    check(prefill, a, b, slice(None))
    check(decode, a, b, slice(None))
    ab = (a.to(torch.bfloat16), b.to(torch.bfloat16))  # the bf16 factors of a bf16 engine: the bf16 GEMV
    check(int8_linear(x[:3], q, s, None, lora=(*ab, scale)), *ab, slice(0, 3))


def _int4_oracle(current_dir, lora):
    """transformers' model in fp64 as the exact int4 model: each decoder linear's base weight through the test's
    own int4 round trip, the LoRA on it at alpha 4."""
    m = load_oracle(current_dir).to(torch.float64)
    lm = m.model.language_model
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            for mod, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                               (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):
                for name in names:
                    lin = getattr(mod, name)
                    exact = lin.weight.data.clone()
                    lin.weight.copy_(_ref_weight(lin.weight.data.float()).double())
                    ab = lora.get((i, name))
                    if ab is not None:
                        lin.weight += (4.0 / ab["A"].shape[0]) * ab["B"].double() @ ab["A"].double()
                        exact += (4.0 / ab["A"].shape[0]) * ab["B"].double() @ ab["A"].double()
                    lin.exact = exact
    return m


def _swap(m):
    """Swap each decoder linear's weight with its unquantized one (the exact int4 model <-> the fp64 one)."""
    for layer in m.model.language_model.layers:
        for mod in (layer.self_attn, layer.mlp):
            for lin in mod.children():
                if hasattr(lin, "exact"):
                    lin.weight, lin.exact = torch.nn.Parameter(lin.exact), lin.weight.data


@torch.no_grad()
def test_an_int4_engine_is_the_exact_int4_model(ckpts):
    """fp32 engine, prompt logits, against the exact int4 model (fp64): within 2x the fp32 engine's own error against
    the unquantized fp64 model (fp32 roundoff; quantizing adds only exact weights), while int4 itself moves the
    logits ~4 orders of magnitude more. lm_head (an Int8Head) is compared through the exact model's hidden states,
    at its two levels' logits (rescored) or its first level's."""
    lora = read_lora(sorted(glob.glob(os.path.join(ckpts["pllava"], "*.safetensors"))))
    ids, image_token, pooling, frames, _ = oracle_inputs(ckpts["current"])
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.float32, quantize="int4")
    fp32 = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.float32)
    ref = _int4_oracle(ckpts["current"], lora)
    w = ref.lm_head.weight
    # the head's two int8 levels by the test's own formula: w8 = q · s (its first pass), w2 = w8 + q2 · s2 (each
    # row's best, rescored), the steps in fp32
    step = (w.abs().amax(dim=1, keepdim=True) / 127.0).float().double()
    w8 = torch.round(w / step).clamp(-127, 127) * step
    step2 = ((w - w8).abs().amax(dim=1, keepdim=True) / 127.0).float().double()
    w2 = w8 + torch.round((w - w8).float().double() / step2).clamp(-127, 127) * step2

    def hidden(px):
        e = oracle_embeds(ref, px.double(), ids, image_token, pooling, frames)
        return ref.model.language_model(inputs_embeds=e[None]).last_hidden_state[0]

    for seed in range(2):
        px = torch.randn(frames, 3, 42, 42, generator=torch.Generator().manual_seed(80 + seed))
        got = eng.prompt_logits(px, Q).double()
        h = hidden(px)
        exact = h @ w.T
        err = torch.minimum((got - h @ w2.T).abs(), (got - h @ w8.T).abs())
        _swap(ref)  # the unquantized model: what int4 changes
        unq = hidden(px) @ w.T
        _swap(ref)
        moved = (unq - exact).abs()
        floor = (fp32.prompt_logits(px, Q).double() - unq).abs()  # the fp32 engine's own roundoff
        print(f"\nseed {seed}: int4 engine vs exact int4 mean {float(err.mean()):.2e} max {float(err.max()):.2e}; "
              f"fp32 engine vs fp64 mean {float(floor.mean()):.2e} max {float(floor.max()):.2e}; int4 vs "
              f"unquantized mean {float(moved.mean()):.2e}")
        assert float(err.mean()) <= 2 * float(floor.mean()) and float(err.max()) <= 2 * float(floor.max())
        assert float(moved.mean()) > 1e3 * float(floor.mean())  # what the comparison can tell apart


def test_int4_is_refused_off_cpu_and_cuda_logged_sized_and_keeps_alpha_live(ckpts, caplog):
    from pllava.loading import load, weight_bytes
    from pllava.model import PllavaModel
    from pllava.model.quant import quantized_bytes

    with pytest.raises(ConfigError, match="int4.*CPU.*CUDA.*not on meta"):
        load(ckpts["pllava"], device="meta", quantize="int4")
    with caplog.at_level("INFO", logger="pllava"):
        eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int4")
    assert "quantize=int4" in caplog.text and "int4 groups of 32" in caplog.text
    lm = eng.model.language_model
    kinds = {(m.qweight.dtype, m.qscale.dtype) for m in lm.layers.modules()
             if getattr(m, "qweight", None) is not None}
    assert kinds == {(torch.uint8, torch.bfloat16)}
    assert lm.lm_head.qweight.dtype == torch.int8  # lm_head stays two-level int8
    # the memory check's count is what the load holds
    with torch.device("meta"):
        net = PllavaModel(eng.config)
    held = sum(t.numel() * t.element_size() for t in list(eng.model.parameters()) + [
        b for n, b in eng.model.named_buffers() if n.endswith(("qweight", "qscale", "rweight", "rscale"))])
    assert weight_bytes(net, torch.bfloat16, "int4", torch.device("cpu")) == held
    linears = sum(m.qweight.numel() + m.qscale.numel() * 2 for m in lm.layers.modules()
                  if getattr(m, "qweight", None) is not None)
    assert linears < 0.6 * quantized_bytes(pllava.Engine.from_pretrained(
        ckpts["pllava"], dtype=torch.bfloat16, quantize="int8").model.language_model.layers)
    # the LoRA's alpha is live: set at run time, the logits of an engine loaded at that alpha, bit for bit
    px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(70))
    at4 = eng.prompt_logits(px, Q)
    loaded32 = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int4", lora_alpha=32)
    eng.set_lora_alpha(32)
    at32 = eng.prompt_logits(px, Q)
    assert torch.equal(at32, loaded32.prompt_logits(px, Q)) and not torch.allclose(at32, at4, atol=1e-2)
    eng.set_lora_alpha(4)
    out = eng.generate(px, Q, max_new_tokens=6)
    assert len(out.token_ids) >= 1


def test_the_memory_check_offers_int4_on_the_cpu(ckpts, monkeypatch):
    from pllava import memory
    from pllava.loading import check_weights_fit, weight_bytes
    from pllava.model import PllavaModel

    cfg = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.float32).config
    with torch.device("meta"):
        net = PllavaModel(cfg)
    cpu = torch.device("cpu")
    int8 = weight_bytes(net, torch.bfloat16, "int8", cpu)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (int8 - 1, "MemAvailable"))
    with pytest.raises(MemoryBudgetError, match="quantize='int4'") as e:
        check_weights_fit(net, torch.float32, None, cpu, "tiny")
    assert "dtype=bfloat16, quantize='int4': " in str(e.value)


def test_without_a_vector_gemv_a_bf16_int4_engine_says_it_dequantizes_its_decode_rows(ckpts):
    """Capped to the portable loop (PLLAVA_CPU_ISA=generic, as on a CPU without AVX2), a bf16 engine's int4 decode
    rows are not the fp32 GEMV's (its portable loop is for fp32 engines): they take the dequantized weight's bf16
    GEMM, and the log says so, never silently."""
    import subprocess
    import sys

    # (logit_bias bans the tiny tokenizer's EOS, id 2, so that 4 decode steps run)
    code = ("import logging, torch, pllava\nlogging.basicConfig(level=logging.INFO)\n"
            f"e = pllava.Engine.from_pretrained({ckpts['pllava']!r}, dtype=torch.bfloat16, quantize='int4')\n"
            "px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(3))\n"
            "o = e.generate(px, 'What is happening in the video?', max_new_tokens=4, logit_bias={2: -100})\n"
            "print(len(o.token_ids), bool(torch.isfinite(e.prompt_logits(px, 'Hi')).all()))")
    env = dict(os.environ, PLLAVA_CPU_ISA="generic")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["4", "True"], r.stdout
    assert "decode rows too: no fp32 int4 GEMV here" in r.stderr, r.stderr[-2000:]


@needs_triton
def test_the_triton_int4_path_is_the_cpu_int4_path(ckpts, monkeypatch, caplog):
    """PLLAVA_KERNELS=triton (the GPU's path; interpreted on the CPU), fp32: a prompt of up to 64 rows through the
    fused int4 kernel, a longer one through the Triton-dequantized weight's GEMM, each decoder linear once a
    forward; the logits those of the CPU's int4 path (pllava._C's GEMV and dequantization) and the greedy tokens
    equal, at two alphas."""
    import importlib

    monkeypatch.setenv("PLLAVA_KERNELS", "torch")
    ref = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.float32, quantize="int4", lora_alpha=20)
    monkeypatch.setenv("PLLAVA_KERNELS", "triton")
    with caplog.at_level("INFO", logger="pllava"):
        eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.float32, quantize="int4", lora_alpha=20,
                                            device=TRITON_DEVICE)
    assert "the Triton int4 kernel" in caplog.text
    km = importlib.import_module("pllava.kernels.int4_linear")  # the custom ops' bodies call these
    calls = {"fused": 0, "dequant": 0}

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(km, "int4_linear_triton", count("fused", km.int4_linear_triton))
    monkeypatch.setattr(km, "int4_dequant_triton", count("dequant", km.int4_dequant_triton))
    layers = len(eng.model.language_model.layers)
    px = torch.randn(4, 3, 42, 42, generator=torch.Generator().manual_seed(9))
    long = Q + " Describe the people, the place and every object, one by one, in detail." * 3
    for prompt, fused in ((Q, True), (long, False)):
        n = len(eng.tokenizer(prompt).input_ids)
        calls.update(fused=0, dequant=0)
        got = eng.prompt_logits(px, prompt).cpu()
        want = ref.prompt_logits(px, prompt)
        rows = calls["fused"] + calls["dequant"]
        assert calls["fused" if fused else "dequant"] == rows == 7 * layers, (n, calls)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    for alpha in (20.0, 0.0):
        eng.set_lora_alpha(alpha)
        ref.set_lora_alpha(alpha)
        a = eng.generate(px, Q, max_new_tokens=6, logit_bias={2: -100})
        b = ref.generate(px, Q, max_new_tokens=6, logit_bias={2: -100})
        assert a.token_ids == b.token_ids and len(a.token_ids) == 6
