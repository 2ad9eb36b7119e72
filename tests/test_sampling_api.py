"""logprobs, OpenAI's frequency / presence penalties and logit_bias, in the engine and over the server, against
transformers' model run from scratch in fp64 (tests/oracle.py) with the processors written here from OpenAI's
definitions; and the exact bytes of every token (byte-level BPE and Llama's SentencePiece with byte fallback)."""
import glob
import json

import httpx
import pytest
import torch

import pllava
from oracle import load_oracle, oracle_embeds, oracle_inputs, oracle_logits, read_lora

QUESTION = "What is happening in the video?"



@pytest.fixture(scope="module")
def px(engine):
    s = engine.config.vision.image_size
    return torch.randn(engine.config.num_frames, 3, s, s, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def oracle(ckpts, px):
    """-> step(tokens) -> the oracle's logits (V,) after the prompt + tokens, in fp32 and in fp64."""
    lora = read_lora(sorted(glob.glob(ckpts["pllava"] + "/*.safetensors")))
    ids, image_token, pooling, frames, _ = oracle_inputs(ckpts["current"])
    models = {dt: load_oracle(ckpts["current"], lora, 4.0).to(dt) for dt in (torch.float32, torch.float64)}
    embeds = {dt: oracle_embeds(m, px.to(dt), ids, image_token, pooling, frames) for dt, m in models.items()}

    def step(tokens, dt=torch.float64):
        m = models[dt]
        e = torch.cat([embeds[dt], m.model.language_model.embed_tokens(torch.tensor(tokens, dtype=torch.long))])
        return oracle_logits(m, e)[-1]

    return step


def test_logprobs_are_the_models_distribution_within_fp32_error(engine, px, oracle):
    """Each token's logprob and its 5 most likely tokens, from generate() and from generate_many() (the batched
    scheduler), within 2x the fp32 oracle's own error against the fp64 oracle (flash-attention's rule)."""
    out = engine.generate(px, QUESTION, max_new_tokens=10, logprobs=5)
    many = engine.generate_many([dict(video=px, prompt=QUESTION, max_new_tokens=10, logprobs=5)] * 2)
    assert all(m.token_ids == out.token_ids for m in many)
    ref64, err32 = [], 0.0
    for i in range(len(out.token_ids)):
        lp64 = oracle(out.token_ids[:i]).log_softmax(-1)
        lp32 = oracle(out.token_ids[:i], torch.float32).double().log_softmax(-1)
        err32 = max(err32, float((lp32 - lp64).abs().max()))
        ref64.append(lp64)
    tol = 2 * err32
    for got in (out, *many):
        assert len(got.logprobs) == len(got.token_ids)
        for t, lp, ref in zip(got.token_ids, got.logprobs, ref64):
            assert lp.token_id == t
            assert abs(lp.logprob - float(ref[t])) <= tol, (lp.logprob, float(ref[t]), tol)
            want = torch.topk(ref, 5)
            assert [i for i, _ in lp.top] == want.indices.tolist()
            assert max(abs(v - float(w)) for (_, v), w in zip(lp.top, want.values)) <= tol
    assert engine.generate(px, QUESTION, max_new_tokens=3).logprobs is None  # off unless asked
    assert [x.top for x in engine.generate(px, QUESTION, max_new_tokens=3, logprobs=0).logprobs] == [[], [], []]


def _reference_loop(oracle, n, bias=None, freq=0.0, pres=0.0):
    """Greedy decoding of the fp64 oracle with OpenAI's processors, as its docs define them: logit_bias added to
    the logits, then mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, c[j] the count of token j in
    the output so far."""
    toks = []
    for _ in range(n):
        mu = oracle(toks).clone()
        for t, b in (bias or {}).items():
            mu[t] += b
        for j in set(toks):
            c = toks.count(j)
            mu[j] -= c * freq + pres
        toks.append(int(mu.argmax()))
    return toks


@pytest.mark.parametrize("kw", [dict(frequency_penalty=1.5), dict(presence_penalty=2.0),
                                dict(frequency_penalty=0.7, presence_penalty=-0.5, logit_bias={7: 3.0, 11: -100.0}),
                                dict(logit_bias={5: 12.0})])
def test_penalties_and_logit_bias_equal_openais_definition(engine, px, oracle, kw):
    n = 10
    want = _reference_loop(oracle, n, kw.get("logit_bias"), kw.get("frequency_penalty", 0.0),
                           kw.get("presence_penalty", 0.0))
    assert want != _reference_loop(oracle, n)  # the settings change the answer: the test can tell them apart
    assert engine.generate(px, QUESTION, max_new_tokens=n, **kw).token_ids == want
    many = engine.generate_many([dict(video=px, prompt=QUESTION, max_new_tokens=n, **kw),
                                 dict(video=px, prompt=QUESTION, max_new_tokens=n)])
    assert many[0].token_ids == want and many[1].token_ids == _reference_loop(oracle, n)


def test_sampled_penalties_are_batch_invariant(engine, px):
    kw = dict(video=px, prompt=QUESTION, max_new_tokens=12, temperature=0.9, seed=5, frequency_penalty=1.0,
              presence_penalty=0.5, logit_bias={9: 4.0})
    alone = engine.generate(kw.pop("video"), kw.pop("prompt"), **kw).token_ids
    many = engine.generate_many([dict(video=px, prompt="hello", max_new_tokens=5),
                                 dict(video=px, prompt=QUESTION, **kw)])
    assert many[1].token_ids == alone


@pytest.mark.parametrize("kw,field", [
    (dict(logit_bias={"7": 1.0}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={10 ** 6: 1.0}), "logit_bias"), (dict(logit_bias={3: float("nan")}), "logit_bias[3]"),
    (dict(logit_bias=[1, 2]), "logit_bias"), (dict(logprobs=21), "logprobs"), (dict(logprobs=True), "logprobs"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty"), (dict(presence_penalty="1"), "presence_penalty")])
def test_bad_sampling_arguments_are_typed_errors_naming_the_field(engine, px, kw, field):
    with pytest.raises(pllava.InputError, match=rf"^{field.replace('[', '.').replace(']', '.')}"):
        engine.generate(px, QUESTION, max_new_tokens=2, **kw)


# ---------------------------------------------------------------------------------------------- token bytes
def test_token_bytes_of_a_byte_level_tokenizer_spell_its_decode(engine):
    """The tests' byte-level BPE: the bytes of a text's tokens, joined, are the UTF-8 of what transformers
    decodes, a character split across tokens included."""
    tok = engine.tokenizer
    for text in ("hello world, what is happening?", "caf\u00e9 \u4e2d\u6587 \U0001f600 done", " leading  spaces\n"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(engine.token_bytes(i) for i in ids) == tok.decode(ids).encode("utf-8")


def test_token_bytes_of_a_sentencepiece_tokenizer_with_byte_fallback(tmp_path):
    """Llama's layout (Metaspace pieces, <0xNN> byte tokens): b'\u2581the' is b' the', a character the
    vocabulary lacks is its UTF-8 bytes one token each, and a text's tokens spell ' ' + text (the dummy prefix)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pllava.prompt import token_bytes_table

    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tk.train_from_iterator(["the cat sat on the mat", "what is happening in the video"] * 50,
                           trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    table = token_bytes_table(fast)
    text = "the cat \u00e9t\u00e9 \u4e2d"  # é and 中 are not in the vocabulary: byte fallback
    ids = fast(text, add_special_tokens=False)["input_ids"]
    pieces = fast.convert_ids_to_tokens(ids)
    assert "<0xC3>" in pieces and "<0xE4>" in pieces  # the fallback really happened
    assert b"".join(table[i] for i in ids) == (" " + text).encode("utf-8")
    assert fast.decode(ids) == text  # and transformers agrees on the text
    assert table[fast.convert_tokens_to_ids("</s>")] == b"</s>"


# ---------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    pytest.importorskip("fastapi")
    from pllava.server import ServerConfig
    from pllava.testing import make_video
    from pllava.video import read_frames
    from server_util import LiveServer

    d = tmp_path_factory.mktemp("lp")
    clip = make_video(str(d / "clip.mp4"), num_frames=30, size=(80, 60))
    cfg = ServerConfig(model_name="tiny-pllava", allowed_local_media_path=str(d), max_new_tokens_limit=64,
                       max_num_seqs=4)
    with LiveServer(engine, cfg) as s:
        yield s, clip, read_frames(clip, engine.config.num_frames)


def _body(clip, **kw):
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "video_url", "video_url": {"url": clip}}]}],
            "max_tokens": 8, **kw}


def _entry(engine, tid, lp):
    b = engine.token_bytes(tid)
    return b.decode("utf-8", "replace"), lp, list(b)


def test_server_logprobs_in_openais_shape_streamed_or_not(engine, served):
    openai = pytest.importorskip("openai")
    s, clip, frames = served
    want = engine.generate(frames, [("user", "hi")], max_new_tokens=8, logprobs=3, frequency_penalty=0.5)
    client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
    msgs = _body(clip)["messages"]
    r = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=8, logprobs=True,
                                       top_logprobs=3, frequency_penalty=0.5)
    content = r.choices[0].logprobs.content  # parsed by the SDK's own types
    assert r.choices[0].message.content == want.text and len(content) == r.usage.completion_tokens
    for c, lp in zip(content, want.logprobs):
        assert (c.token, c.logprob, c.bytes) == _entry(engine, lp.token_id, lp.logprob)
        assert [(t.token, t.logprob, t.bytes) for t in c.top_logprobs] == [_entry(engine, i, v) for i, v in lp.top]
    streamed, text = [], ""
    for ch in client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=8, logprobs=True,
                                             top_logprobs=3, frequency_penalty=0.5, stream=True):
        if ch.choices and ch.choices[0].logprobs is not None:
            streamed += ch.choices[0].logprobs.content
        if ch.choices:
            text += ch.choices[0].delta.content or ""
    assert text == want.text
    assert [(c.token, c.logprob, c.bytes) for c in streamed] == [(c.token, c.logprob, c.bytes) for c in content]
    plain = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=4)
    assert plain.choices[0].logprobs is None


def test_server_sampling_fields_reach_the_engine(engine, served):
    s, clip, frames = served
    kw = dict(top_k=5, repetition_penalty=1.3, presence_penalty=1.0, logit_bias={"9": 5})
    want = engine.generate(frames, [("user", "hi")], max_new_tokens=8, top_k=5, repetition_penalty=1.3,
                           presence_penalty=1.0, logit_bias={9: 5.0}, temperature=0.8, seed=3)
    r = httpx.post(s.url + "/v1/chat/completions", json=_body(clip, temperature=0.8, seed=3, **kw), timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == want.text
    assert want.text != engine.generate(frames, [("user", "hi")], max_new_tokens=8, temperature=0.8, seed=3).text


@pytest.mark.parametrize("extra,status,param", [
    (dict(temprature=0.5), 400, "temprature"),  # a typo is named, never ignored
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    (dict(response_format={"type": "json_object"}), 400, "response_format"),
    (dict(top_logprobs=2), 400, "top_logprobs"), (dict(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (dict(logit_bias={"x": 1}), 400, "logit_bias"), (dict(logit_bias={"3": 101}), 400, "logit_bias"),
    (dict(logit_bias={str(i): 1 for i in range(1025)}), 400, "logit_bias"),
    (dict(frequency_penalty=2.5), 400, "frequency_penalty"), (dict(top_k=-2), 400, "top_k"),
    (dict(user="u1", metadata={"a": "b"}, response_format={"type": "text"}, tools=[], store=False), 200, None),
])
def test_server_fields_it_does_not_read_are_named(served, extra, status, param):
    s, clip, _ = served
    r = httpx.post(s.url + "/v1/chat/completions", json=_body(clip, max_tokens=2, **extra), timeout=60)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == param, r.text


def test_server_logit_bias_past_the_vocabulary_is_a_400(engine, served):
    s, clip, _ = served
    r = httpx.post(s.url + "/v1/chat/completions",
                   json=_body(clip, logit_bias={str(engine.config.text.vocab_size): 1}), timeout=60)
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"], r.text


def test_captions_fields_it_does_not_read_are_named(served):
    s, clip, _ = served
    r = httpx.post(s.url + "/v1/captions", content=json.dumps({"url": clip, "max_tokns": 3}),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokns", r.text
    r = httpx.post(s.url + "/v1/captions", files={"file": ("c.mp4", open(clip, "rb").read(), "video/mp4")},
                   data={"max_tokens": "2", "tempreature": "1"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tempreature", r.text
