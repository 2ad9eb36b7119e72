"""A battery of hostile and careless inputs (issue: hardening): each case must end within its timeout in a typed
error (PllavaError; the server: a 4xx in vLLM's error shape), and a valid request after it must get exactly the
answer it got before the battery (nothing lost, nothing carried over). The summary line counts them.
"""
import base64
import json
import threading

import numpy as np
import pytest
import torch

import pllava
from pllava.errors import PllavaError

CASE_TIMEOUT_S = 30
MAX_MESSAGE = 1000  # an error message quotes what it was sent in part: a 100 MB model name came back whole
NAN, INF = float("nan"), float("inf")


def run_with_timeout(fn, timeout=CASE_TIMEOUT_S):
    """-> ('ok', value) | ('error', exception) | ('hang', None)."""
    box = {}

    def target():
        try:
            box["v"] = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - the battery classifies whatever comes out
            box["v"] = ("error", e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    return box.get("v", ("hang", None))


def _px(n=4, s=42, fill=None):
    x = torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1))
    if fill is not None:
        x[0, 0, 0, 0] = fill
    return x


# (name, keyword overrides of a valid generate() call)
ENGINE_CASES = [
    ("video None, raw prompt with <image>", dict(video=None, prompt="a <image> b", conv_mode="raw")), ("video int", dict(video=5)), ("video dict", dict(video={"a": 1})),
    ("video missing path", dict(video="/nonexistent/clip.mp4")), ("video empty bytes", dict(video=b"")),
    ("video garbage bytes", dict(video=bytes(range(256)) * 8)), ("video text bytes", dict(video=b"hello world" * 50)),
    ("video float wrong shape", dict(video=torch.zeros(2, 3, 10, 10))),
    ("video float 3-d", dict(video=torch.zeros(3, 42, 42))), ("video NaN pixels", dict(video=_px(fill=NAN))),
    ("video inf pixels", dict(video=_px(fill=INF))), ("video -inf pixels", dict(video=_px(fill=-INF))),
    ("video uint8 3-d", dict(video=torch.zeros(4, 10, 10, dtype=torch.uint8))),
    ("video uint8 4 channels", dict(video=torch.zeros(2, 10, 10, 4, dtype=torch.uint8))),
    ("video zero frames", dict(video=torch.zeros(0, 10, 10, 3, dtype=torch.uint8))),
    ("video too many frames", dict(video=torch.zeros(2000, 2, 2, 3, dtype=torch.uint8))),
    ("video int64 array", dict(video=np.zeros((2, 10, 10, 3), dtype=np.int64))),
    ("video float64 array", dict(video=np.zeros((2, 10, 10, 3), dtype=np.float64))),
    ("video empty list", dict(video=[])), ("video list of ints", dict(video=[1, 2])),
    ("video zero-size frames", dict(video=torch.zeros(2, 0, 10, 3, dtype=torch.uint8))),
    ("prompt None", dict(prompt=None)), ("prompt int", dict(prompt=5)), ("prompt bytes", dict(prompt=b"hi")),
    ("prompt lone surrogate", dict(prompt="hi \ud800")), ("prompt too long", dict(prompt="word " * 3000)),
    ("prompt of 20 MB", dict(prompt="word " * 4_000_000)),  # tokenizing it took 60 s before the length bound
    ("raw prompt without image", dict(prompt="hello", conv_mode="raw")),
    ("raw prompt with two images", dict(prompt="<image> and <image>", conv_mode="raw")),
    ("chat turn of one item", dict(prompt=[("user",)])), ("chat unknown role", dict(prompt=[("robot", "hi")])),
    ("chat text int", dict(prompt=[("user", 5)])), ("chat empty", dict(prompt=[])),
    ("chat ends with assistant", dict(prompt=[("user", "hi"), ("assistant", "x")])),
    ("chat turn a string", dict(prompt=["user: hi"])), ("chat surrogate", dict(prompt=[("user", "\udc00")])),
    ("system int", dict(system=5)), ("system surrogate", dict(system="\udc00x")), ("system list", dict(system=["a"])),
    ("conv_mode unknown", dict(conv_mode="nope")), ("conv_mode int", dict(conv_mode=3)),
    ("max_new_tokens 0", dict(max_new_tokens=0)), ("max_new_tokens -1", dict(max_new_tokens=-1)),
    ("max_new_tokens 2.5", dict(max_new_tokens=2.5)), ("max_new_tokens str", dict(max_new_tokens="5")),
    ("max_new_tokens bool", dict(max_new_tokens=True)), ("max_new_tokens None", dict(max_new_tokens=None)),
    ("temperature -1", dict(temperature=-1.0)), ("temperature NaN", dict(temperature=NAN)),
    ("temperature inf", dict(temperature=INF)), ("temperature str", dict(temperature="hot")),
    ("temperature None", dict(temperature=None)),
    ("top_p 0", dict(top_p=0.0)), ("top_p 2", dict(top_p=2.0)), ("top_p NaN", dict(top_p=NAN)),
    ("top_p str", dict(top_p="x")), ("top_k -1", dict(top_k=-1)), ("top_k 1.5", dict(top_k=1.5)),
    ("top_k str", dict(top_k="5")), ("repetition_penalty 0", dict(repetition_penalty=0.0)),
    ("repetition_penalty -1", dict(repetition_penalty=-1.0)), ("repetition_penalty NaN", dict(repetition_penalty=NAN)),
    ("repetition_penalty inf", dict(repetition_penalty=INF)),
    ("seed 1.5", dict(seed=1.5)), ("seed -1", dict(seed=-1)), ("seed 2**64", dict(seed=2 ** 64)),
    ("seed str", dict(seed="1")), ("seed bool", dict(seed=True)),
    ("stop int", dict(stop=5)), ("stop empty string", dict(stop=[""])), ("stop list of ints", dict(stop=[1])),
    ("stop surrogate", dict(stop=["\ud800"])), ("stop dict", dict(stop={"a": 1})),
    ("stop of 1 MB", dict(stop=["ab" * 500_000])),  # its matching held the thread for minutes before the limit
    ("stop of 10 kB with a surrogate", dict(stop=["a" * 10_000 + "\ud800"])),  # was quoted whole
    ("stop_token_ids strings", dict(stop_token_ids=["a"])), ("stop_token_ids negative", dict(stop_token_ids=[-1])),
    ("stop_token_ids huge", dict(stop_token_ids=[10 ** 9])), ("stop_token_ids float", dict(stop_token_ids=[1.5])),
    ("stop_token_ids int", dict(stop_token_ids=5)), ("stop_token_ids bool", dict(stop_token_ids=[True])),
    ("logit_bias str key", dict(logit_bias={"7": 1.0})), ("logit_bias id past the vocabulary", dict(logit_bias={10 ** 9: 1.0})),
    ("logit_bias negative id", dict(logit_bias={-1: 1.0})), ("logit_bias bool key", dict(logit_bias={True: 1.0})),
    ("logit_bias NaN", dict(logit_bias={3: NAN})), ("logit_bias inf", dict(logit_bias={3: -INF})),
    ("logit_bias str value", dict(logit_bias={3: "1"})), ("logit_bias list", dict(logit_bias=[1, 2])),
    ("logprobs 21", dict(logprobs=21)), ("logprobs -1", dict(logprobs=-1)), ("logprobs str", dict(logprobs="5")),
    ("logprobs bool", dict(logprobs=True)), ("logprobs 1.5", dict(logprobs=1.5)),
    ("frequency_penalty NaN", dict(frequency_penalty=NAN)), ("frequency_penalty str", dict(frequency_penalty="1")),
    ("presence_penalty inf", dict(presence_penalty=INF)), ("presence_penalty None", dict(presence_penalty=None)),
    ("temperature 10**400", dict(temperature=10 ** 400)), ("logit_bias 10**400", dict(logit_bias={3: 10 ** 400})),
]
BATCH_ONLY_CASES = [("lora_alpha NaN", dict(lora_alpha=NAN)), ("lora_alpha inf", dict(lora_alpha=-INF)),
                    ("lora_alpha str", dict(lora_alpha="4")), ("lora_alpha bool", dict(lora_alpha=True)),
                    ("lora_alpha overflowing", dict(lora_alpha=3e38)), ("unknown key", dict(max_tokens=3)),
                    ("request not a dict", "clip.mp4")]



@pytest.fixture(scope="module")
def reference(engine):
    px = _px()
    return px, engine.generate(px, "What is happening?", max_new_tokens=12).token_ids


COUNTS = {"cases": 0, "typed": 0, "hangs": 0, "silent": 0, "lost": 0}


@pytest.fixture(scope="module", autouse=True)
def _summary():
    """The engine battery's counts, printed after the module (for the README)."""
    yield
    if COUNTS["cases"]:
        print(f"\nhostile-input battery (engine): {COUNTS['cases']} cases, {COUNTS['typed']} typed errors, "
              f"{COUNTS['hangs']} hangs, {COUNTS['silent']} silently accepted, {COUNTS['lost']} lost follow-ups")


def _check(engine, reference, outcome, name):
    COUNTS["cases"] += 1
    kind, val = outcome
    if kind == "hang":
        COUNTS["hangs"] += 1
        pytest.fail(f"{name}: no answer within {CASE_TIMEOUT_S} s")
    if kind == "ok":
        COUNTS["silent"] += 1
        pytest.fail(f"{name}: silently accepted, returned {val!r:.200}")
    if not isinstance(val, PllavaError):
        pytest.fail(f"{name}: untyped {type(val).__name__}: {val}")
    if len(str(val)) > MAX_MESSAGE:
        pytest.fail(f"{name}: a {len(str(val))}-character message: {str(val)[:200]}")
    COUNTS["typed"] += 1
    px, want = reference
    follow = run_with_timeout(lambda: engine.generate(px, "What is happening?", max_new_tokens=12).token_ids)
    if follow != ("ok", want):
        COUNTS["lost"] += 1
        pytest.fail(f"{name}: the next valid request got {follow}")
    return val


@pytest.mark.parametrize("name,kw", ENGINE_CASES, ids=[c[0] for c in ENGINE_CASES])
def test_engine_generate(engine, reference, name, kw):
    args = dict(video=reference[0], prompt="What is happening?", max_new_tokens=4)
    args.update(kw)
    _check(engine, reference, run_with_timeout(lambda: engine.generate(**args)), name)


@pytest.mark.parametrize("name,kw", ENGINE_CASES + BATCH_ONLY_CASES, ids=[c[0] for c in ENGINE_CASES + BATCH_ONLY_CASES])
def test_engine_generate_many(engine, reference, name, kw):
    """The same inputs as one request of a batch beside a valid one: typed (raised, or its own error output when
    return_errors=True), and the valid neighbour's answer is unchanged."""
    good = dict(video=reference[0], prompt="What is happening?", max_new_tokens=12)
    bad = kw if isinstance(kw, str) else {**good, "max_new_tokens": 4, **kw}
    _check(engine, reference, run_with_timeout(lambda: engine.generate_many([good, bad])), name)
    if isinstance(kw, str) or "max_tokens" in kw:
        return  # refused before any request ran
    outcome = run_with_timeout(lambda: engine.generate_many([good, bad], return_errors=True))
    if outcome[0] == "ok":  # failing at run time (its clip, its logits): its own output says so
        outs = outcome[1]
        assert outs[0].token_ids == reference[1], f"{name}: the neighbour's answer changed"
        assert outs[1].finish_reason == "error" and outs[1].error.split(":")[0].endswith("Error")


def _mutate(rng, data: bytes, donors: list) -> bytes:
    """One damaged copy of a clip: bytes overwritten, then a cut, a zeroed run, a splice or a repeated run."""
    d = bytearray(data)
    for _ in range(rng.randint(1, 20)):
        d[rng.randrange(len(d))] = rng.randrange(256)
    kind, p = rng.choice(["flip", "cut", "zero", "splice", "repeat"]), rng.randrange(len(d))
    if kind == "cut":
        d = d[:p]
    elif kind == "zero":
        d[p:p + 400] = bytes(len(d[p:p + 400]))
    elif kind == "splice":
        o = rng.choice(donors)
        q = rng.randrange(len(o))
        d = d[:p] + o[q:q + rng.randint(10, 2000)] + d[p:]
    elif kind == "repeat":
        d = d[:p] + d[p:p + 500] * rng.randint(2, 8) + d[p:]
    return bytes(d)


def test_damaged_clips_give_frames_or_a_video_error(tmp_path):
    """200 seeded damaged copies of 5 small clips (MP4, MKV, MPEG-TS, WebM, AVI): each read ends within the
    timeout in frames or a typed error. A scratch fuzzer of this kind found an untyped AttributeError (a stream
    with no codec context) and an untyped av.error.PermissionError (a seek)."""
    import random

    from pllava.testing import make_video
    from pllava.video import read_frames

    seeds = [open(make_video(str(tmp_path / f"s{i}{ext}"), num_frames=20, size=(64, 48), codec=codec), "rb").read()
             for i, (ext, codec) in enumerate([(".mp4", "mpeg4"), (".mkv", "libx264"), (".ts", "libx264"),
                                               (".webm", "libvpx-vp9"), (".avi", "mpeg4")])]
    rng = random.Random(7)
    bad, counts = [], {"frames": 0, "typed": 0}
    for t in range(200):
        data = _mutate(rng, seeds[t % len(seeds)], seeds)
        kind, val = run_with_timeout(lambda: read_frames(data, 8))
        if kind == "ok" and val.shape[0] == 8 and val.dtype == torch.uint8:
            counts["frames"] += 1
        elif kind == "error" and isinstance(val, PllavaError):
            counts["typed"] += 1
        else:
            bad.append((t, kind, type(val).__name__, str(val)[:120]))
    print(f"\ndamaged clips: 200 reads, {counts['frames']} gave frames, {counts['typed']} typed errors, "
          f"{len(bad)} other")
    assert not bad, bad


# ------------------------------------------------------------------------------------------ the server
def _data_url(raw, mime="video/mp4"):
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def server_cases(url):
    msg = lambda content: {"messages": [{"role": "user", "content": content}]}  # noqa: E731
    ok_content = [{"type": "text", "text": "hi"}, {"type": "video_url", "video_url": {"url": url}}]
    good = dict(msg(ok_content), max_tokens=4)
    cases = [
        ("body a list", []), ("body a string", "x"), ("body a number", 5), ("body null", None),
        ("no messages", {}), ("messages an object", {"messages": {"role": "user"}}),
        ("messages empty", {"messages": []}), ("message a string", {"messages": ["hi"]}),
        ("role missing", {"messages": [{"content": "hi"}]}), ("role unknown", {"messages": [{"role": "x", "content": "hi"}]}),
        ("content a number", msg(5)), ("content part a string", msg(["hi"])),
        ("part type unknown", msg([{"type": "audio"}])), ("text not a string", msg([{"type": "text", "text": 5}])),
        ("video_url missing url", msg([{"type": "video_url", "video_url": {}}])),
        ("video_url a number", msg([{"type": "video_url", "video_url": 5}])),
        ("two videos", msg(ok_content + [{"type": "video_url", "video_url": {"url": url}}])),
        ("no video, text holds <image>", msg([{"type": "text", "text": "look: <image>"}])),
        ("20 MB of text", msg("word " * 4_000_000)),  # it held the event loop for 60 s while it was tokenized
        ("model unknown", dict(good, model="gpt-9")), ("model a number", dict(good, model=5)),
        ("model name of 1 MB", dict(good, model="m" * 1_000_000)),
        ("media in assistant turn", {"messages": [{"role": "assistant", "content": ok_content},
                                                  {"role": "user", "content": "hi"}]}),
        ("last message assistant", {"messages": [{"role": "user", "content": ok_content},
                                                 {"role": "assistant", "content": "x"}]}),
        ("ftp url", msg([{"type": "video_url", "video_url": {"url": "ftp://x/y.mp4"}}])),
        ("file url outside", msg([{"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}])),
        ("loopback http", msg([{"type": "video_url", "video_url": {"url": "http://127.0.0.1:9/x.mp4"}}])),
        ("metadata http", msg([{"type": "video_url", "video_url": {"url": "http://169.254.169.254/x"}}])),
        ("6to4 of loopback", msg([{"type": "video_url", "video_url": {"url": "http://[2002:7f00:1::1]/x"}}])),
        ("data url not base64", msg([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,@@@"}}])),
        ("data url empty", msg([{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,"}}])),
        ("data url text mime", msg([{"type": "video_url", "video_url": {"url": _data_url(b"hi", "text/plain")}}])),
        ("data url garbage video", msg([{"type": "video_url", "video_url": {"url": _data_url(bytes(range(256)) * 9)}}])),
    ]
    for field, values in (("max_tokens", [0, -1, 2.5, "5", True, 10 ** 9, 10 ** 400]),
                          ("temperature", [-1, 5, "x", [1], 10 ** 400]), ("return_frames", ["false", 1]),
                          ("top_p", [0, 2, "x"]), ("num_frames", [0, -3, 10 ** 6, 1.5, "4"]),
                          ("lora_alpha", ["4", True, 1e9, [4]]), ("seed", [1.5, -1, 2 ** 70, "1", True]),
                          ("stop", [5, [""], [1], ["a"] * 9, {"a": 1}, ["ab" * 500_000]]), ("stream", ["yes", 1]),
                          ("stream_options", [[1], "x", {"include_usage": "yes"}]),
                          ("n", [0, -1, 1.5, "2", True, 10 ** 6]), ("logprobs", ["yes", 1]),
                          ("top_logprobs", [2, -1, 21, 1.5, "2"]), ("top_k", [-2, 1.5, "5", 2 ** 40]),
                          ("logit_bias", [[1], "x", {"x": 1}, {"3": 101}, {"3": "1"}, {"99999": 1}, {"\u00b2": 1},
                                          {"\u0663": 1}, {"1" * 40: 1}]),
                          ("frequency_penalty", [3, "x", float("nan")]), ("presence_penalty", [-3, [1]]),
                          ("repetition_penalty", [0, 11, "x"]), ("tools", [[{"type": "function"}]]),
                          ("response_format", [{"type": "json_object"}, "text"]), ("audio", [{"voice": "x"}]),
                          ("temprature", [0.5]), ("bogus_field", [1])):
        for v in values:
            cases.append((f"{field}={v!r:.20}", dict(good, **{field: v})))
    # raw bodies (bytes, sent as they are): json.dumps cannot write these
    cases.append(("an integer of 5000 digits", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": '
                  + b"9" * 5000 + b"}"))
    return cases


def caption_cases(raw):
    """/v1/captions: (name, httpx.post keyword arguments)."""
    js = lambda b: dict(content=b if isinstance(b, bytes) else json.dumps(b),  # noqa: E731
                        headers={"content-type": "application/json"})
    up = {"file": ("c.mp4", raw, "video/mp4")}
    return [
        ("json body a list", js([1])), ("json body a string", js(b'"x"')), ("json body null", js(b"null")),
        ("json no url", js({"max_tokens": 2})), ("json url a number", js({"url": 5})),
        ("json prompt a number", js({"url": "data:video/mp4;base64,AAAA", "prompt": 5})),
        ("json max_tokens 400 digits", js({"url": "data:video/mp4;base64,AAAA", "max_tokens": 10 ** 400})),
        ("multipart no file", dict(data={"max_tokens": "2"}, files={"other": ("a", b"b")})),
        ("multipart file a plain field", dict(data={"file": "abc"}, files={"other": ("a", b"b")})),
        ("multipart max_tokens a file", dict(files={**up, "max_tokens": ("m", b"3")})),
        ("multipart prompt a file", dict(files={**up, "prompt": ("p", b"hi")})),
        ("multipart max_tokens 1e3", dict(files=up, data={"max_tokens": "1e3"})),
        ("multipart max_tokens 5000 digits", dict(files=up, data={"max_tokens": "9" * 5000})),
        ("multipart lora_alpha nan", dict(files=up, data={"lora_alpha": "nan"})),
        ("multipart num_frames -1", dict(files=up, data={"num_frames": "-1"})),
        ("multipart garbage video", dict(files={"file": ("c.mp4", bytes(range(256)) * 9, "video/mp4")})),
    ]


def test_server_battery(ckpts, tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from pllava.server import ServerConfig
    from pllava.testing import make_video
    from pllava.video import read_frames
    from server_util import LiveServer

    engine = pllava.Engine.from_pretrained(ckpts["pllava"])
    clip = make_video(str(tmp_path / "c.mp4"), num_frames=12, size=(64, 48))
    raw = open(clip, "rb").read()
    url = _data_url(raw)
    want = pllava.Engine.from_pretrained(ckpts["pllava"]).generate(
        read_frames(raw, engine.config.num_frames), [("user", "hi")], max_new_tokens=8).text
    good = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "video_url", "video_url": {"url": url}}]}],
            "max_tokens": 8}
    counts = {"cases": 0, "4xx": 0, "hangs": 0, "silent": 0, "500": 0, "lost": 0}
    bad_cases = []
    cfg = ServerConfig(model_name="tiny-pllava", max_num_seqs=2, max_new_tokens_limit=64, max_frames=32)
    with LiveServer(engine, cfg) as s:
        def post(b, path="/v1/chat/completions"):
            kw = b if path == "/v1/captions" else dict(content=b if isinstance(b, bytes) else json.dumps(b),
                                                       headers={"content-type": "application/json"})
            return httpx.post(s.url + path, timeout=CASE_TIMEOUT_S, **kw)

        def caption_follow_up():
            r = post(dict(files={"file": ("c.mp4", raw, "video/mp4")}, data={"max_tokens": "8"}), "/v1/captions")
            return r.status_code, r.json().get("caption")

        want_caption = caption_follow_up()
        assert want_caption[0] == 200, want_caption
        cases = [(n, b, "/v1/chat/completions") for n, b in server_cases(url)]
        cases += [(n, kw, "/v1/captions") for n, kw in caption_cases(raw)]
        for name, b, path in cases:
            counts["cases"] += 1
            kind, r = run_with_timeout(lambda: post(b, path), CASE_TIMEOUT_S + 5)
            if kind != "ok":
                counts["hangs" if kind == "hang" else "500"] += 1
                bad_cases.append((name, kind, r))
                continue
            if r.status_code >= 500:
                counts["500"] += 1
                bad_cases.append((name, r.status_code, r.text[:200]))
            elif r.status_code < 400:
                counts["silent"] += 1
                bad_cases.append((name, r.status_code, r.text[:200]))
            else:
                e = r.json().get("error", {})
                assert set(e) == {"message", "type", "param", "code"}, (name, r.text[:300])
                assert len(e["message"]) <= MAX_MESSAGE, (name, len(e["message"]), e["message"][:200])
                counts["4xx"] += 1
            f = post(good)
            if f.status_code != 200 or f.json()["choices"][0]["message"]["content"] != want:
                counts["lost"] += 1
                bad_cases.append((name, "lost", f.text[:200]))
            if path == "/v1/captions" and caption_follow_up() != want_caption:
                counts["lost"] += 1
                bad_cases.append((name, "lost caption", caption_follow_up()))
    print(f"\nhostile-input battery (server): {counts['cases']} cases, {counts['4xx']} typed 4xx, {counts['hangs']} "
          f"hangs, {counts['silent']} silently accepted, {counts['500']} 500s, {counts['lost']} lost follow-ups")
    assert not bad_cases, bad_cases


def test_a_bug_in_a_route_is_a_logged_500_in_the_error_shape(ckpts, monkeypatch, caplog):
    """An exception no route maps (a bug) is answered in vLLM's error shape with its type named, and logged with
    its traceback; the server keeps serving."""
    pytest.importorskip("fastapi")
    import httpx

    import pllava.server
    from pllava.server import ServerConfig
    from server_util import LiveServer

    def broken(body, cfg):
        raise ZeroDivisionError("a planted bug")

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with LiveServer(pllava.Engine.from_pretrained(ckpts["pllava"]), ServerConfig(model_name="t")) as s:
        with monkeypatch.context() as m:
            m.setattr(pllava.server, "parse_chat", broken)
            with caplog.at_level("ERROR", logger="pllava.server"):
                r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 500
        e = r.json()["error"]
        assert e["code"] == "internal" and "ZeroDivisionError: a planted bug" in e["message"], e
        assert any(rec.exc_info and rec.exc_info[0] is ZeroDivisionError for rec in caplog.records)
        assert httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30).status_code == 200


# ------------------------------------------------------------------------------------------ checkpoints
CONFIG_CASES = [  # (name, section or None for the top level, key, value)
    ("hidden_size a string", "text_config", "hidden_size", "64"),
    ("heads not dividing hidden", "text_config", "num_attention_heads", 5),
    ("kv heads not dividing heads", "text_config", "num_key_value_heads", 3),
    ("vocab_size negative", "text_config", "vocab_size", -5), ("layers a float", "text_config", "num_hidden_layers", 2.5),
    ("rms_norm_eps a string", "text_config", "rms_norm_eps", "x"), ("rope_scaling a list", "text_config", "rope_scaling", [1]),
    ("rope_theta a string", "text_config", "rope_theta", "big"),
    ("max_position_embeddings 0", "text_config", "max_position_embeddings", 0),
    ("tie_word_embeddings a string", "text_config", "tie_word_embeddings", "yes"),
    ("head_dim odd", "text_config", "head_dim", 7), ("vision image_size a string", "vision_config", "image_size", "42"),
    ("vision patch not dividing", "vision_config", "patch_size", 5), ("text_config a list", None, "text_config", [1]),
    ("vision_config a string", None, "vision_config", "x"), ("image_token_index a string", None, "image_token_index", "x"),
    ("image_token_index off the tokenizer", None, "image_token_index", 10 ** 9),
    ("pooling_shape with 0", None, "pooling_shape", [0, 1, 1]), ("pooling_shape a string", None, "pooling_shape", "abc"),
    ("num_frames a string", None, "num_frames", "4"), ("frame_shape wrong", None, "frame_shape", [5, 5]),
    ("vision_feature_layer out of range", None, "vision_feature_layer", -99),
    ("projector act unknown", None, "projector_hidden_act", "swish9"), ("torch_dtype unknown", None, "torch_dtype", "float8"),
    ("select strategy unknown", None, "vision_feature_select_strategy", "all"),
]


@pytest.mark.parametrize("name,section,key,value", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_values(ckpts, tmp_path, name, section, key, value):
    """A config.json value of the wrong type or inconsistent with the rest: a typed error naming the file."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(ckpts["pllava"], d)
    cfg = json.loads((d / "config.json").read_text())
    (cfg[section] if section else cfg)[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    kind, val = run_with_timeout(lambda: pllava.Engine.from_pretrained(str(d)))
    assert kind == "error", f"{name}: {kind}"
    assert isinstance(val, PllavaError), f"{name}: untyped {type(val).__name__}: {val}"
    assert str(d) in str(val), f"{name}: the error does not name the model: {val}"



SIDE_FILE_CASES = [(f, kind, data) for f in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
                   for kind, data in (("empty", b""), ("not UTF-8", b"\xff\xfe{"), ("a list", b"[1, 2]"),
                                      ("null", b"null"))] + [
    ("tokenizer.json", "fields of the wrong type", b'{"model": 5, "added_tokens": 3}'),
    ("preprocessor_config.json", "fields of the wrong type", b'{"size": null}')]


@pytest.mark.parametrize("name,kind,data", SIDE_FILE_CASES, ids=[f"{c[0]} {c[1]}" for c in SIDE_FILE_CASES])
def test_tokenizer_and_processor_files(ckpts, tmp_path, name, kind, data):
    """A damaged tokenizer or preprocessor file: a typed error naming the folder or file (a list or null in the
    tokenizer's files raised AttributeError / TypeError from transformers, a non-UTF-8 preprocessor config
    UnicodeDecodeError; a list there loaded and failed at the first clip)."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(ckpts["pllava"], d)
    (d / name).write_bytes(data)
    kind_, val = run_with_timeout(lambda: pllava.Engine.from_pretrained(str(d)))
    assert kind_ == "error" and isinstance(val, PllavaError), f"{name} {kind}: {kind_} {type(val).__name__}: {val}"
    assert str(d) in str(val), val


# ------------------------------------------------------------------------------------------ the command line
def cli_cases(model, clip, out):
    return [
        ("caption no such input", ["caption", "/nonexistent.mp4", "--model", model]),
        ("caption empty glob", ["caption", "/nonexistent/*.mp4", "--model", model]),
        ("caption model dir without config", ["caption", clip, "--model", out]),
        ("caption batch-size 0", ["caption", clip, "--model", model, "--batch-size", "0"]),
        ("caption max-new-tokens 0", ["caption", clip, "--model", model, "--max-new-tokens", "0"]),
        ("caption max-new-tokens x", ["caption", clip, "--model", model, "--max-new-tokens", "x"]),
        ("caption num-frames -1", ["caption", clip, "--model", model, "--num-frames", "-1"]),
        ("caption lora-alpha nan", ["caption", clip, "--model", model, "--lora-alpha", "nan"]),
        ("caption lora-alpha word", ["caption", clip, "--model", model, "--lora-alpha", "four"]),
        ("caption dtype unknown", ["caption", clip, "--model", model, "--dtype", "float8"]),
        ("caption device unknown", ["caption", clip, "--model", model, "--device", "tpu9"]),
        ("caption resume without output", ["caption", clip, "--model", model, "--resume"]),
        ("caption output in a missing folder", ["caption", clip, "--model", model, "-o", "/nonexistent/o.jsonl"]),
        ("caption decode-workers 0", ["caption", clip, "--model", model, "--decode-workers", "0"]),
        ("chat empty question", ["chat", clip, "", "--model", model, "--conv-mode", "nope"]),
        ("serve max-num-seqs 0", ["serve", "--model", model, "--max-num-seqs", "0"]),
        ("serve max-queue word", ["serve", "--model", model, "--max-queue", "x"]),
        ("serve lora-alpha inf", ["serve", "--model", model, "--lora-alpha", "inf"]),
        ("serve max-new-tokens-limit 0", ["serve", "--model", model, "--max-new-tokens-limit", "0"]),
        ("serve max-queue -1", ["serve", "--model", model, "--max-queue", "-1"]),
        ("serve max-video-bytes 0", ["serve", "--model", model, "--max-video-bytes", "0"]),
        ("serve max-frames -3", ["serve", "--model", model, "--max-frames", "-3"]),
        ("serve max-frames under num_frames", ["serve", "--model", model, "--max-frames", "2"]),
        ("serve port 70000", ["serve", "--model", model, "--port", "70000"]),
        ("serve port 0", ["serve", "--model", model, "--port", "0"]),
        ("bench batch list bad", ["bench", "--preset", "tiny", "--batch", "1,x"]),
        ("bench frames 0", ["bench", "--preset", "tiny", "--frames", "0"]),
        ("bench preset unknown", ["bench", "--preset", "huge", "--no-baseline", "--frames", "1", "--runs", "1"]),
        ("bench runs 0", ["bench", "--preset", "tiny", "--runs", "0"]),
    ]


def test_cli_battery(ckpts, tmp_path, capsys, video_path):
    """Each case exits 2 (argparse or a typed error) with a one-line message and no traceback."""
    from pllava.cli import main

    bad = []
    cases = cli_cases(ckpts["pllava"], video_path, str(tmp_path))
    for name, argv in cases:
        kind, val = run_with_timeout(lambda: main(argv))
        if kind == "error" and isinstance(val, SystemExit):
            code = val.code
        elif kind == "ok":
            code = val
        else:
            bad.append((name, kind, repr(val)[:200]))
            continue
        err = capsys.readouterr().err
        if code != 2 or "Traceback" in err or not err.strip():
            bad.append((name, code, err[-300:]))
    print(f"\nhostile-input battery (CLI): {len(cases)} cases, {len(cases) - len(bad)} clear exits with status 2")
    assert not bad, bad
