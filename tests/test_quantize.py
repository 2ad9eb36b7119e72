"""quantize="int8": weight-only int8 LLM linears (bf16 or fp32 prefill, fp32 decode rows on the CPU), the LoRA
unmerged at the live alpha, against an independent int8 reference (transformers in fp64 on weights the test
quantizes itself)."""
import glob
import importlib
import os

import pytest
import torch

import pllava
from oracle import load_oracle, oracle_embeds, oracle_inputs, oracle_logits, read_lora
from pllava.errors import ConfigError, InputError
from pllava.model.head import HEAD_RESCORE
from pllava.model.quant import Int8Head, int8_linear, quantize_weight
from triton_util import TRITON_DEVICE, needs_triton

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_prefill_rows_widen_into_a_reused_buffer_with_the_same_bits(dtype):
    """Prefill rows (M > 16) widen q into a per-thread buffer that is reused, and grows, across weights: each
    product equals the one over a freshly widened weight (bf16: the GEMM on q, then the scale; fp16 / fp32: the
    dequantized weight) bit for bit, whatever weight the buffer held before (small, large, small again)."""
    from pllava.model import quant

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 96, generator=g).to(dtype)
    outs = []
    for n in (24, 200, 24, 136):  # the buffer grows at 200, then serves smaller weights from its start
        q, s = quantize_weight(torch.randn(n, 96, generator=g), dtype)
        got = int8_linear(x, q, s, None)
        if dtype == torch.bfloat16:
            want = torch.nn.functional.linear(x, q.to(dtype)).mul_(s)
        else:
            want = torch.nn.functional.linear(x, q.to(dtype) * s.to(dtype)[:, None])
        assert got.dtype == dtype and torch.equal(got, want), n
        outs.append((got, want))
    buf = quant._SCRATCH.widened
    assert buf.numel() >= 200 * 96 and buf.dtype == dtype
    assert all(torch.equal(got, want) for got, want in outs)  # no output is a view of the reused buffer


def _round_trip(w, step_dtype=torch.bfloat16):
    """The test's own per-row symmetric int8 round trip (shares nothing with quant.py), in the format's terms: the
    step max|w_row| / 127 stored in the activation dtype, the int8 values fitted to that stored step."""
    w = w.double()
    step = (w.abs().amax(dim=1, keepdim=True) / 127.0).to(step_dtype).double()
    return torch.round(w / step).clamp(-127, 127) * step


def _fake_quant_(lin, step_dtype=torch.bfloat16):
    lin.weight.data = _round_trip(lin.weight.data, step_dtype).to(lin.weight.dtype)


def test_int8_head_rescores_its_best_logits_exactly():
    """Int8Head against fp64: every logit within the int8 error of the exact product; at least HEAD_RESCORE a row,
    and always the exact best 8, within the second level's far smaller error; the argmax exact."""
    g = torch.Generator().manual_seed(3)
    V, D = 3000, 96
    lin = torch.nn.Linear(D, V, bias=False).bfloat16().requires_grad_(False)
    lin.weight.copy_(torch.randn(V, D, generator=g) * 0.3)
    head = Int8Head(lin)
    assert head.qweight.dtype == head.rweight.dtype == torch.int8
    assert sum(b.numel() * b.element_size() for b in head.buffers()) <= V * D * 2 + V * 6  # as bf16, plus scales
    for rows in (1, 5, 70):  # decode rows (_weight_int8pack_mm), and past DECODE_ROWS and RESCORE_ROWS (chunked)
        h = torch.randn(rows, D, generator=g).bfloat16()
        got = head(h).double()
        assert got.dtype == torch.float64 and got.shape == (rows, V)
        exact = h.double() @ lin.weight.double().T  # (rows, V)
        int8 = h.double() @ _round_trip(lin.weight).T  # only to show the first pass is not already exact
        w_max = lin.weight.double().abs().amax(dim=1)[None]  # (1, V)
        h1 = h.double().abs().sum(-1, keepdim=True)  # (rows, 1)
        # rescored: the second level leaves at most half its step a weight; the residual is under one first-level
        # step (half a step, or 127 x 2^-9 steps where the clamp cut q at 127), so that step is <= max|w_row|/127^2
        tol_exact = h1 * w_max / 127 ** 2 / 2 + 1e-6 * exact.abs()
        # the first pass: half an int8 step a weight (whichever way a tie rounds), then three roundings of 2^-9:
        # the scale to bf16, x·q to bf16 before the scale (CPU's _weight_int8pack_mm; checked: -737.59 became
        # -736), the output to bf16
        step_err = h1 * w_max / 127 / 2
        tol_int8 = step_err + 3 * 2 ** -9 * (exact.abs() + step_err) + 1e-6 * float(exact.abs().max())
        err = (got - exact).abs()
        is_exact = err <= tol_exact
        assert bool((err <= tol_int8).all()), f"{rows} rows: a logit is off by more than the int8 error"
        assert int(is_exact.sum()) >= rows * HEAD_RESCORE, "fewer logits rescored than HEAD_RESCORE a row"
        best = exact.topk(8, dim=-1).indices
        assert bool(is_exact.gather(-1, best).all()), "one of a row's best 8 logits was not rescored"
        assert torch.equal(got.argmax(-1), exact.argmax(-1))
        print(f"{rows} rows: int8 vs exact max {float((int8 - exact).abs().max()):.2e}, best 8's error max "
              f"{float(err.gather(-1, best).max()):.2e} (bound max {float(tol_exact.max()):.2e})")
        assert float((int8 - exact).abs().max()) > 5 * float(tol_exact.max())  # the first pass is int8: not vacuous


def _oracle(ckpts, lora, dtype, quantized, step_dtype=torch.bfloat16):
    m = load_oracle(ckpts["current"]).to(torch.float64 if quantized else dtype)
    lm = m.model.language_model
    with torch.no_grad():
        if quantized:  # the checkpoint's own (fp32) base weights through int8, its step stored in step_dtype: the
            # engine quantizes each weight as it loads, before any rounding to its dtype
            for layer in lm.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                            layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                    _fake_quant_(lin, step_dtype)  # lm_head: see _head_logits
        for (i, proj), ab in lora.items():  # the LoRA on top of the (quantized) base, as the engine runs it
            lin = getattr(lm.layers[i].self_attn, proj)
            lin.weight += ((4.0 / ab["A"].shape[0]) * ab["B"] @ ab["A"]).to(lin.weight.dtype)
    return m


@pytest.mark.parametrize("path", ["torch", pytest.param("triton", marks=needs_triton)])
def test_bf16_int8_is_int8_within_twice_transformers_bf16_error(ckpts, monkeypatch, caplog, path):
    """The reference is the same int8 model computed exactly: transformers' modules in fp64 with the base weights
    put through the test's own int8 round trip. The engine (bf16 activations, int8 kernels) may err against it at
    most 2x what transformers' bf16 errs against its fp64 self (the half-precision rule). Both paths: the CPU's
    torch kernels, and the Triton int8 kernel with the LoRA fused (on the GPU, else interpreted), every int8 linear
    through it."""
    lora = read_lora(sorted(glob.glob(os.path.join(ckpts["pllava"], "*.safetensors"))))
    ids, image_token, pooling, frames, _ = oracle_inputs(ckpts["current"])
    monkeypatch.setenv("PLLAVA_KERNELS", path)
    with caplog.at_level("INFO", logger="pllava"):
        eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int8",
                                            device=TRITON_DEVICE if path == "triton" else "cpu")
    assert ("Triton int8 kernel" in caplog.text) == (path == "triton"), caplog.text
    calls = []
    if path == "triton":
        mod = importlib.import_module("pllava.kernels.int8_linear")  # the body of torch.ops.pllava.int8_linear
        real = mod.int8_linear_triton
        monkeypatch.setattr(mod, "int8_linear_triton", lambda *a: calls.append(a[4] is not None) or real(*a))
    lin = eng.model.language_model.layers[0].mlp.gate_proj
    assert lin.qweight.dtype == torch.int8 and eng.model.language_model.layers[0].self_attn.q_proj.weight is None
    q64 = _oracle(ckpts, lora, None, True)
    f64, bf16 = _oracle(ckpts, lora, torch.float64, False), _oracle(ckpts, lora, torch.bfloat16, False)

    def logits(m, px):
        dt = next(m.parameters()).dtype
        with torch.no_grad():
            return oracle_logits(m, oracle_embeds(m, px.to(dt), ids, image_token, pooling, frames)).double()

    def head_logits(px):  # the exact int8 model's last hidden states through lm_head: unquantized, and int8
        with torch.no_grad():
            e = oracle_embeds(q64, px.double(), ids, image_token, pooling, frames)
            hid = q64.model.language_model(inputs_embeds=e[None]).last_hidden_state[0]
            return hid @ q64.lm_head.weight.T, hid @ _round_trip(q64.lm_head.weight).T

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    for seed in range(2):  # lm_head is an Int8Head: each logit is the exact or the int8 head's, the best exact
        px = torch.randn(frames, 3, 42, 42, generator=torch.Generator().manual_seed(21 + seed))
        got = eng.prompt_logits(px, Q).double().cpu()
        exact, int8 = head_logits(px)
        scale = float(exact.abs().max())
        err = torch.minimum((got - exact).abs(), (got - int8).abs())
        e_eng, e_best = float(err.max()) / scale, float((got - exact).gather(-1, exact.topk(8).indices).abs().max()) / scale
        e_hf = rel(logits(bf16, px), logits(f64, px))
        print(f"\nseed {seed}: engine vs exact int8 {e_eng:.2e} (best 8: {e_best:.2e}), "
              f"transformers bf16 vs fp64 {e_hf:.2e}, the head's own int8 {rel(int8, exact):.2e}")
        assert 0 < e_eng <= 2 * e_hf and e_best <= 2 * e_hf, (seed, e_eng, e_best, e_hf)
    assert rel(logits(q64, px), logits(f64, px)) > e_hf / 10  # the int8 reference differs from fp32: not a no-op
    if path == "triton":  # 7 int8 linears a layer a call, 2 of them (q/v) with the LoRA fused, and lm_head
        n_layers = len(eng.model.language_model.layers)
        assert len(calls) == 2 * (7 * n_layers + 1) and sum(calls) == 2 * 2 * n_layers, (len(calls), sum(calls))


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
        pllava.Engine.from_pretrained(ckpts["pllava"], quantize="nf4")


def test_int8_halves_the_llm_weight_bytes(ckpts):
    full = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16)
    q = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int8")

    def linear_bytes(lm):  # the decoder layers' linears
        n = 0
        for name, t in list(lm.named_parameters()) + list(lm.named_buffers()):
            if not name.startswith("layers.") or "norm" in name or "lora_" in name or "kv_cache" in name:
                continue
            n += t.numel() * t.element_size()
        return n

    a, b = linear_bytes(full.model.language_model), linear_bytes(q.model.language_model)
    assert b <= 0.52 * a, (a, b)  # int8 + one bf16 scale a row
    head, bf16_head = q.model.language_model.lm_head, full.model.language_model.lm_head
    assert isinstance(head, Int8Head)  # two int8 levels: the bytes of the bf16 head, plus a scale pair a row
    head_bytes = sum(b.numel() * b.element_size() for b in head.buffers())
    assert head_bytes <= bf16_head.weight.numel() * 2 + head.out_features * 6, head_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()  # the fp64 oracles are plain modules (parameters require grad): no graphs, no warnings
def test_int8_decode_steps_are_the_exact_int8_model(ckpts, caplog, dtype):
    """The positions generation runs: random text tokens fed one cached decode step each after a clip's prompt.
    With pllava._C those decode rows run in fp32 (the int8 GEMV, fp32 norms and residual): in fp32 the engine is
    the exact int8 model within 2x transformers' own fp32 error against fp64; in bf16 (a bf16 prefill before
    them) within 2x transformers' bf16 error. lm_head is an Int8Head: each logit the int8 head's or, for a row's
    best, its two-level one (w = q·s + q2·s2, the test's own round trip twice; in bf16 that is exact enough)."""
    from pllava.generate import decode_one_token
    from pllava.model.quant import native_int8_available

    lora = read_lora(sorted(glob.glob(os.path.join(ckpts["pllava"], "*.safetensors"))))
    ids, image_token, pooling, frames, _ = oracle_inputs(ckpts["current"])
    with caplog.at_level("INFO", logger="pllava"):
        eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=dtype, quantize="int8")
    native = native_int8_available(dtype)
    assert ("decode rows in fp32 through pllava._C" in caplog.text) == native, caplog.text
    norms = [m.fp32_rows for m in eng.model.language_model.modules() if hasattr(m, "fp32_rows")]
    assert len(norms) == 2 * len(eng.model.language_model.layers) + 1 and set(norms) == {16 if native else 0}
    q64 = _oracle(ckpts, lora, None, True, step_dtype=dtype)
    ref, f64 = _oracle(ckpts, lora, dtype, False), _oracle(ckpts, lora, torch.float64, False)
    lm, n = eng.model.language_model, ids.numel() + pooling[0] * pooling[1] * pooling[2] - 1
    steps = 6

    def hidden(m, px, feed):  # last hidden states at the fed positions: prompt + feed in one forward
        dt = next(m.parameters()).dtype
        with torch.no_grad():
            e = oracle_embeds(m, px.to(dt), ids, image_token, pooling, frames)
            seq = torch.cat([e, m.model.language_model.embed_tokens(feed)])
            return m.model.language_model(inputs_embeds=seq[None]).last_hidden_state[0, n - 1:n - 1 + steps]

    for seed in range(2):
        g = torch.Generator().manual_seed(40 + seed)
        px = torch.randn(frames, 3, 42, 42, generator=g)
        feed = torch.randint(0, eng.config.text.vocab_size, (steps,), generator=g)
        feed[feed == image_token] = 0
        lm.setup_cache(1, n + steps, eng.kv_dtype, eng.device)
        with torch.no_grad():
            eng.prompt_logits(px, Q)  # fills positions [0, n)
            got = torch.stack([decode_one_token(lm, t.view(1, 1), torch.tensor([n + i]), kv_len=n + i + 1)[0, -1]
                               for i, t in enumerate(feed[:steps - 1])]).double()  # predictions at n .. n+steps-2
        h = hidden(q64, px, feed)[1:]  # the same positions in the exact int8 model
        w = q64.lm_head.weight  # the checkpoint's, which the engine's two levels are fitted to
        level1 = _round_trip(w, dtype)
        two, int8 = h @ (level1 + _round_trip(w - level1, torch.float32)).T, h @ level1.T
        scale = float(two.abs().max())
        err = torch.minimum((got - two).abs(), (got - int8).abs())
        e_eng = float(err.max()) / scale
        e_best = float((got - two).gather(-1, two.topk(8).indices).abs().max()) / scale
        hr, hf = hidden(ref, px, feed)[1:].double(), hidden(f64, px, feed)[1:]
        e_hf = float((hr @ ref.lm_head.weight.double().T - hf @ f64.lm_head.weight.T).abs().max()) / scale
        print(f"\n{dtype} seed {seed}: engine decode vs exact int8 {e_eng:.2e} (best 8: {e_best:.2e}), "
              f"transformers {dtype} vs fp64 {e_hf:.2e}")
        assert 0 < e_eng <= 2 * e_hf and e_best <= 2 * e_hf, (seed, e_eng, e_best, e_hf)


def _stored(ckpt, suffix):
    """The checkpoint's own tensor whose key ends with `suffix`, read straight from its safetensors shards."""
    from safetensors import safe_open

    for f in sorted(glob.glob(os.path.join(ckpt, "*.safetensors"))):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                if k.endswith(suffix):
                    return h.get_tensor(k)
    raise KeyError(suffix)


def test_int8_is_fitted_to_the_checkpoints_own_weights(ckpts):
    """A bf16 engine over an fp32 checkpoint: the int8 values and their bf16 step come from the fp32 weights as
    stored, not from a copy first rounded to bf16 (which moves q by one step at many weights); with pllava._C's fp32
    decode rows the LLM's norm weights stay the checkpoint's fp32 values, and a prefill's norm output is bf16."""
    from pllava.model.quant import native_int8_available

    eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int8")
    lm = eng.model.language_model
    for i in range(len(lm.layers)):
        w = _stored(ckpts["pllava"], f"layers.{i}.mlp.gate_proj.weight")
        assert w.dtype == torch.float32
        w = w.double()
        step = (w.abs().amax(dim=1) / 127.0).to(torch.bfloat16)
        want = torch.round(w / step.double()[:, None]).clamp(-127, 127)
        lin = lm.layers[i].mlp.gate_proj
        assert torch.equal(lin.qscale, step) and torch.equal(lin.qweight.double(), want)
        rounded_first = torch.round(w.to(torch.bfloat16).double() / step.double()[:, None]).clamp(-127, 127)
        assert not torch.equal(rounded_first, want)  # the two fits differ on this checkpoint: the check can fail
    norm = lm.layers[0].input_layernorm
    stored = _stored(ckpts["pllava"], "layers.0.input_layernorm.weight")
    if native_int8_available(torch.bfloat16):
        assert norm.weight.dtype == torch.float32 and torch.equal(norm.weight, stored)
        x = torch.randn(40, stored.numel())  # a prefill's rows (past the 16 fp32 decode rows)
        assert norm(x).dtype == torch.bfloat16 and norm(x[:1]).dtype == torch.float32
    else:
        assert norm.weight.dtype == torch.bfloat16 and torch.equal(norm.weight, stored.bfloat16())


def test_a_weight_the_int8_loader_took_but_nothing_rebuilt_is_an_error(ckpts, monkeypatch):
    """The loader leaves the float parameters of int8 targets on the meta device; if quantize_lm_int8_ did not
    rebuild one, the engine must refuse to run on it, naming a weight, not fail later inside a matmul."""
    from pllava.errors import CheckpointError
    from pllava.model import quant

    monkeypatch.setattr(quant, "quantize_lm_int8_", lambda lm, pre=None, act_int8=False, int4=False: False)
    with pytest.raises(CheckpointError, match=r"left \d+ weights unloaded, e.g. 'language_model\.layers\.0\."):
        pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize="int8")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_an_int8_engine_keeps_no_mapping_of_its_checkpoint(tmp_path):
    """Quantizing reads every page of the checkpoint; a weight kept as stored (bf16 into a bf16 engine) was a view
    of its shard's mapping and kept those pages resident: pllava-7b held 12.8 GB of file pages beside its 6.7 GB
    of weights (RssFile / RssAnon after the load, bf16 + int8). After the load no tensor of the model may lie in a
    mapping of the checkpoint, and no such mapping may be left. (A plain bf16 engine keeps its views on purpose:
    there the mapped pages are the weights.)"""
    from pllava.testing import make_tiny_checkpoint

    d = make_tiny_checkpoint(str(tmp_path / "m"), "pllava", dtype=torch.bfloat16)

    def mapped():
        out = []
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith(d):
                    out.append(tuple(int(x, 16) for x in parts[0].split("-")))
        return out

    plain = pllava.Engine.from_pretrained(d, dtype=torch.bfloat16)
    ranges = mapped()
    inside = lambda eng: [n for n, t in list(eng.model.named_parameters()) + list(eng.model.named_buffers())  # noqa: E731
                          if any(a <= t.data_ptr() < b for a, b in mapped())]
    assert ranges and inside(plain)  # the check can see a view of the mapping
    del plain
    import gc
    gc.collect()
    eng = pllava.Engine.from_pretrained(d, dtype=torch.bfloat16, quantize="int8")
    assert inside(eng) == [] and mapped() == []
