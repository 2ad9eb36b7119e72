"""Generation semantics: stop tokens, stop strings, streaming, sampling, the static cache against recompute."""
import pytest
import torch

import pllava
from pllava.errors import InputError
from pllava.generate import SamplingParams, TextStreamer, sample



@pytest.fixture(scope="module")
def px(engine):
    s = engine.config.vision.image_size
    return torch.randn(engine.config.num_frames, 3, s, s, generator=torch.Generator().manual_seed(5))


def test_stop_token_ends_generation_with_that_token(engine, px):
    full = engine.generate(px, "hello", max_new_tokens=20)
    assert len(full.token_ids) == 20 and full.finish_reason == "length"
    k = next(i for i in range(3, 20) if full.token_ids[i] not in full.token_ids[:i])
    out = engine.generate(px, "hello", max_new_tokens=20, stop_token_ids=[full.token_ids[k]])
    assert out.token_ids == full.token_ids[:k + 1] and out.finish_reason == "stop"


def test_eos_is_kept_last_like_transformers(engine, px):
    full = engine.generate(px, "hello", max_new_tokens=20)
    k = next(i for i in range(3, 20) if full.token_ids[i] not in full.token_ids[:i])
    saved = set(engine.eos_ids)
    engine.eos_ids = {full.token_ids[k]}
    try:
        out = engine.generate(px, "hello", max_new_tokens=20)
    finally:
        engine.eos_ids = saved
    assert out.token_ids[-1] == full.token_ids[k] and len(out.token_ids) == k + 1
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True,
                                               clean_up_tokenization_spaces=False)


def test_stop_string_cuts_text_and_stream_agrees(engine, px):
    full = engine.generate(px, "hello", max_new_tokens=24)
    text = full.text
    assert len(text) > 8
    stop = text[5:8]
    if stop in text[:5 + 2]:
        stop = text[5:9]
    out = engine.generate(px, "hello", max_new_tokens=24, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == text[:text.find(stop)]
    assert len(out.token_ids) < 24
    pieces = list(engine.stream(px, "hello", max_new_tokens=24, stop=[stop]))
    assert "".join(pieces) == out.text


def test_stream_joins_to_generate_text(engine, px):
    out = engine.generate(px, "hello", max_new_tokens=24)
    pieces = list(engine.stream(px, "hello", max_new_tokens=24))
    assert len(pieces) > 1 and "".join(pieces) == out.text


def test_seeded_sampling_is_reproducible(engine, px):
    a = engine.generate(px, "hello", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    b = engine.generate(px, "hello", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)
    c = engine.generate(px, "hello", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=4)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_sample_processors_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(50)
    seen = torch.tensor([3, 7, 7, 11])
    ids = seen[None]
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[None].clone())
    ref = TemperatureLogitsWarper(0.7)(ids, ref)
    ref = TopKLogitsWarper(10)(ids, ref)
    ref = TopPLogitsWarper(0.8)(ids, ref)
    allowed = set(torch.isfinite(ref[0]).nonzero().flatten().tolist())
    p = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3)
    drawn = {sample(logits, p, seen, torch.Generator().manual_seed(i)) for i in range(400)}
    assert drawn <= allowed and len(drawn) >= 2
    greedy = SamplingParams(repetition_penalty=1.3)
    assert sample(logits, greedy, seen, None) == int(RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[None].clone()).argmax())


def test_streamer_holds_back_partial_stop_string():
    class Tok:  # one character per token id
        def decode(self, ids, **kw):
            return "".join(chr(i) for i in ids)

    s = TextStreamer(Tok(), ["END"])
    out = [s.add(ord(c)) for c in "abcEN"]
    assert "".join(out) == "abc"  # "EN" may still become "END"
    out2 = [s.add(ord(c)) for c in "Xy"]
    assert "".join(out2) == "ENXy" and not s.stopped
    assert s.add(ord("E")) == "" and s.add(ord("N")) == "" and s.add(ord("D")) == ""
    assert s.stopped and s.text == "abcENXy"


def test_streamer_stop_strings_equal_a_from_scratch_search():
    """The stop matchers (KMP, fed each token's new text) against the plainest rule, recomputed from the whole
    text after every token: cut at the earliest-starting stop string if one occurs, else emit all but the
    longest tail that begins a stop string. 400 random token streams over a 3-letter alphabet (overlaps
    everywhere), multi-character tokens, up to 4 stops each."""
    import random

    pieces = ["a", "b", "c", "ab", "ba", "abc", "cab", "aa", "bb", "ca"]

    class Tok:  # token id i is pieces[i]
        def decode(self, ids, **kw):
            return "".join(pieces[i] for i in ids)

    def oracle(tokens, stops):
        text, emitted = "", []
        for t in tokens:
            text += pieces[t]
            hits = [i for i in (text.find(x) for x in stops) if i >= 0]
            if hits:
                emitted.append(text[:min(hits)])
                return emitted, True
            hold = max((k for x in stops for k in range(1, len(x)) if text.endswith(x[:k])), default=0)
            emitted.append(text[:len(text) - hold])
        return emitted, False

    rng = random.Random(0)
    for trial in range(400):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        tokens = [rng.randrange(len(pieces)) for _ in range(rng.randint(1, 30))]
        want, want_stopped = oracle(tokens, stops)
        st, got, shown = TextStreamer(Tok(), stops), [], ""
        for t in tokens:
            shown += st.add(t)
            got.append(shown)
            if st.stopped:
                break
        assert (got, st.stopped) == (want, want_stopped), (trial, stops, tokens)


def test_a_stop_string_over_the_limit_is_refused():
    from pllava.generate import MAX_STOP_CHARS

    SamplingParams(stop=["x" * MAX_STOP_CHARS]).validate()
    with pytest.raises(InputError, match=f"stop string of {MAX_STOP_CHARS + 1} characters is over the limit"):
        SamplingParams(stop=["ok", "x" * (MAX_STOP_CHARS + 1)]).validate()


def test_kv_cache_decode_equals_full_recompute(engine, px):
    """Each decode step's logits with the static cache equal a fresh prefill of the whole sequence."""
    out = engine.generate(px, "hello", max_new_tokens=6)
    lm = engine.model.language_model
    ids, pos, _ = engine._prompt_ids("hello", None, None)
    from pllava.prompt import splice

    emb = splice(lm.embed_tokens(ids), pos, engine.encode(px))
    seq = torch.cat([emb, lm.embed_tokens(torch.tensor(out.token_ids[:-1]))])[None]
    lm.setup_cache(1, seq.shape[1], engine.dtype, engine.device)
    with torch.no_grad():
        full = lm(seq, torch.arange(seq.shape[1]), all_logits=True, start=0)[0]
    assert full[emb.shape[0] - 1:].argmax(-1).tolist() == out.token_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_lora_gives_the_same_tokens_and_unmerges_exactly(ckpts, px, dtype):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"], lora_alpha=20, dtype=dtype)
    want = eng.generate(px, "hello", max_new_tokens=12).token_ids
    w0 = {n: m.weight.clone() for n, m in eng.model.named_modules() if getattr(m, "r", 0)}
    for cycle in range(2):  # twice: an unmerged engine merges again from exactly the loaded weights
        eng.merge_lora()
        got = eng.generate(px, "hello", max_new_tokens=12).token_ids
        assert eng.lora_merged and (got == want or dtype != torch.float32)  # merged bf16 rounds W + s·B·A once
        with pytest.raises(ValueError, match="unmerge_lora"):
            eng.set_lora_alpha(4)
        eng.unmerge_lora()
        for n, m in eng.model.named_modules():
            if n in w0:
                assert torch.equal(m.weight, w0[n]), f"cycle {cycle}: {n} is not the loaded weight"
    fresh = pllava.Engine.from_pretrained(ckpts["pllava"], lora_alpha=0, dtype=dtype)
    eng.set_lora_alpha(0)
    out = eng.generate(px, "hello", max_new_tokens=12).token_ids
    assert out == fresh.generate(px, "hello", max_new_tokens=12).token_ids and out != want


def test_prefix_cache_reuses_the_video_for_the_next_question(ckpts, video_path):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    cold = pllava.Engine.from_pretrained(ckpts["pllava"])
    cold.prefix_cache = False
    first = eng.generate(video_path, "What is happening?", max_new_tokens=10)
    assert "prefix_cache_hit" not in first.timings
    second = eng.generate(video_path, "Who is there?", max_new_tokens=10)
    assert second.timings.get("prefix_cache_hit") == 1 and "vision" not in second.timings
    assert second.token_ids == cold.generate(video_path, "Who is there?", max_new_tokens=10).token_ids
    assert second.num_prompt_tokens == cold.generate(video_path, "Who is there?", max_new_tokens=2).num_prompt_tokens
    eng.set_lora_alpha(20)  # v_proj's LoRA shaped the cached values: the prefix must not be reused
    cold.set_lora_alpha(20)
    third = eng.generate(video_path, "Who is there?", max_new_tokens=10)
    assert "prefix_cache_hit" not in third.timings
    assert third.token_ids == cold.generate(video_path, "Who is there?", max_new_tokens=10).token_ids
    data = open(video_path, "rb").read()
    eng.generate(data, "What is happening?", max_new_tokens=4)
    again = eng.generate(data, "And then?", max_new_tokens=10)
    assert again.timings.get("prefix_cache_hit") == 1
    assert again.token_ids == cold.generate(data, "And then?", max_new_tokens=10).token_ids


@pytest.mark.parametrize("dtype,quantize", [(torch.float32, None), (torch.bfloat16, None),
                                            (torch.bfloat16, "int8")])
def test_a_prefix_hit_gives_a_fresh_prompts_bits(ckpts, video_path, monkeypatch, dtype, quantize):
    """Asking about a clip again must not change the answer: a follow-up that reuses the cached video prefix gets,
    at every step, the logits (bit for bit) of the same prompt on an engine without a prefix cache, in generate()
    and in the scheduler. Each prefills the prefix, then the question (prompt.prefix_split); with one causal pass
    over the whole prompt, bf16's logits were 0.037 apart from the continuation's."""
    from pllava import generate as gen

    seen = []
    sample = gen.SequenceState.sample
    monkeypatch.setattr(gen.SequenceState, "sample", lambda self, logits: (seen.append(logits.float().clone()),
                                                                           sample(self, logits))[1])

    def logits_of(run):
        seen.clear()
        out = run()
        return out, list(seen)

    eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=dtype, quantize=quantize)
    cold = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=dtype, quantize=quantize)
    cold.prefix_cache = False
    q1, q2 = "What is happening?", [("user", "Who is there?"), ("assistant", "A man."), ("user", "What now?")]
    eng.generate(video_path, q1, max_new_tokens=3)
    hit, got = logits_of(lambda: eng.generate(video_path, q2, max_new_tokens=6))
    _, want = logits_of(lambda: cold.generate(video_path, q2, max_new_tokens=6))
    assert hit.timings.get("prefix_cache_hit") == 1 and len(got) == len(want) == 6
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"step {i}: {(a - b).abs().max():.3g} apart"
    _, want1 = logits_of(lambda: cold.generate(video_path, q1, max_new_tokens=6))
    reqs = [dict(video=video_path, prompt=q1, max_new_tokens=6), dict(video=video_path, prompt=q2, max_new_tokens=6)]
    outs, batched = logits_of(lambda: eng.generate_many(reqs, max_batch_size=1))  # one slot: the second reuses it
    assert outs[1].timings.get("prefix_cache_hit") == 1
    assert all(torch.equal(a, b) for a, b in zip(batched, want1 + want)) and len(batched) == 12


def test_static_buffer_decode_step_keeps_the_prefix(ckpts, video_path):
    """The DecodeStep protocol (static buffers; warm-up writes the cache's last slot) changes nothing: same
    tokens as plain decode steps, and a cached video prefix survives a re-setup of the step."""
    from pllava.generate import DecodeStep

    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    ref = pllava.Engine.from_pretrained(ckpts["pllava"])
    ref.prefix_cache = False
    a = eng.generate(video_path, "What is happening?", max_new_tokens=12)
    eng._step = DecodeStep(eng.model.language_model, use_graph=False)  # a fresh step re-creates its buffers
    b = eng.generate(video_path, "Who is there?", max_new_tokens=12)
    assert b.timings.get("prefix_cache_hit") == 1
    assert a.token_ids == ref.generate(video_path, "What is happening?", max_new_tokens=12).token_ids
    assert b.token_ids == ref.generate(video_path, "Who is there?", max_new_tokens=12).token_ids
    with pytest.raises(ValueError, match="CUDA"):
        eng.cuda_graphs = True
        eng.generate(video_path, "x", max_new_tokens=2)


def test_prefix_survives_a_bigger_follow_up(ckpts, video_path):
    """A follow-up that needs a larger cache (longer question, more new tokens) keeps the cached video prefix."""
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    cold = pllava.Engine.from_pretrained(ckpts["pllava"])
    cold.prefix_cache = False
    eng.generate(video_path, "Hi?", max_new_tokens=2)
    q = "Describe, in as much detail as you can manage, everything that happens in the video. " * 3
    before = eng.model.language_model.max_len
    out = eng.generate(video_path, q, max_new_tokens=300)
    assert eng.model.language_model.max_len > before  # the cache had to grow
    assert out.timings.get("prefix_cache_hit") == 1
    assert out.token_ids == cold.generate(video_path, q, max_new_tokens=300).token_ids


def test_decode_reads_only_used_cache_positions(engine, px):
    """Whatever sits past the positions in use (here NaN, as a poisoned earlier request could leave) never reaches
    the output: eager decode attends to [0, pos] only (a masked NaN would still give 0 x NaN = NaN)."""
    ref = engine.generate(px, "hello", max_new_tokens=16)
    engine.prefix_cache = False
    try:
        engine.generate(px, "hello " * 20, max_new_tokens=60)  # a longer request fills more of the cache
        for layer in engine.model.language_model.layers:
            layer.self_attn.kv_cache.k_cache.fill_(float("nan"))
            layer.self_attn.kv_cache.v_cache.fill_(float("nan"))
        got = engine.generate(px, "hello", max_new_tokens=16)
    finally:
        engine.prefix_cache = True
    assert got.token_ids == ref.token_ids


def test_the_static_cache_is_rebuilt_for_another_dtype(ckpts):
    """setup_cache reuses a big-enough cache only in the dtype asked for (Engine.kv_dtype is bf16 or fp32 on the
    CPU by whether pllava._C reads bf16): a bf16 request must not write into an fp32 cache left by another, and the
    kept prefix comes across converted."""
    lm = pllava.Engine.from_pretrained(ckpts["pllava"]).model.language_model  # its own: the fixture's prefix stays
    assert lm.setup_cache(1, 300, torch.float32, "cpu")
    lm.layers[0].self_attn.kv_cache.k_cache[:, :, :5] = 1.5
    assert not lm.setup_cache(1, 200, torch.float32, "cpu")  # fits: reused
    assert lm.setup_cache(1, 200, torch.bfloat16, "cpu", keep=5)  # another dtype: rebuilt
    k = lm.layers[0].self_attn.kv_cache.k_cache
    assert k.dtype == torch.bfloat16 and bool((k[:, :, :5] == 1.5).all())


def test_greedy_rows_equal_sample_a_row_at_a_time():
    """The scheduler's one-sync argmax of plain greedy rows gives sample()'s token for every row (ties: the first
    maximal index; fp16 / bf16 logits too) and None where sample() refuses non-finite logits."""
    from pllava.generate import greedy_rows

    g = torch.Generator().manual_seed(0)
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        lg = torch.randn(9, 300, generator=g).to(dt)
        lg[1, [5, 17, 200]] = 9.0  # a three-way tie
        lg[2] = 0.0  # all tied
        lg[3, 7] = float("nan")
        lg[4, 9] = float("inf")
        lg[5, 11] = float("-inf")  # finite best: fine
        want = []
        for row in lg:
            try:
                want.append(sample(row, SamplingParams(), None, None))
            except pllava.NumericalError:
                want.append(None)
        assert greedy_rows(lg) == want
        assert want[1] == 5 and want[2] == 0 and want[3] is None and want[4] is None and want[5] is not None

