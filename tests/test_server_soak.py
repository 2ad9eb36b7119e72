"""A mixed load on the real server: 8 clients at once, each sending a fixed, seeded sequence of requests (greedy and
sampled, streamed and not, n choices, each with its own alpha; clients that leave mid-stream; malformed requests)
through 4 slots with chunked prefill. Every answered request must be exactly what one-at-a-time Engine.generate()
gives (a sampled choice i: generate() with seed + i), every malformed one a 400 naming nothing it should not, no
request a 5xx, and afterwards no slot may be left running and the next request must still be answered exactly.

The draws are fixed (random.Random(client)), the interleaving is not: the scheduler sees a different mix on each
run, which is the point. A failure names the client, the request and what it sent. A scratch version of this,
run for 60-90 s at 10-14 clients (~3000 requests), found no fault (2026-12-07)."""
import base64
import json
import random
import threading
import time

import httpx
import pytest

import pllava
from pllava.server import ServerConfig
from pllava.testing import make_video
from pllava.video import read_frames
from server_util import LiveServer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CLIENTS, REQUESTS = 8, 8
QUESTIONS = ["What is happening?", "Describe the video in details.", "Who is there?", "a", "Tell me a story. " * 12]
ALPHAS = [4, 20, 0, 9]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("soak")
    return [open(make_video(str(d / f"c{i}.mp4"), num_frames=12 + 4 * i, size=(64 + 16 * i, 48), codec="libx264",
                            gop=6), "rb").read() for i in range(3)]


def _body(clip: bytes, text: str, **kw) -> dict:
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    return {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "video_url", "video_url": {"url": url}}]}], **kw}


def _malformed(clip: bytes, rng: random.Random) -> tuple[dict, str]:
    """A request the server must refuse with a 400, and a word its message must contain."""
    return rng.choice([
        ({"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]}]}, "video"),
        (_body(clip, "a", max_tokens=-3), "max_tokens"),
        (_body(clip, "a", temperature="hot"), "temperature"),
        (_body(clip, "a", lora_alpha=1e9), "lora_alpha"),
        ({"model": "tiny", "messages": "nope"}, "messages"),
        (_body(clip, "a", n=0), "n"),
        (_body(clip, "a", top_logprobs=99, logprobs=True), "top_logprobs"),
    ])


def _stream_text(r) -> str:
    text = ""
    for line in r.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for ch in chunk.get("choices", []):
                text += ch["delta"].get("content") or ""
    return text


def test_a_mixed_concurrent_load_gets_one_at_a_time_answers(ckpts, clips):
    engine = pllava.Engine.from_pretrained(ckpts["pllava"])
    ref = pllava.Engine.from_pretrained(ckpts["pllava"])
    frames = [read_frames(c, ref.config.num_frames) for c in clips]
    lock, refs = threading.Lock(), {}

    def reference(ci, q, max_tokens, alpha, **sampling):
        key = (ci, q, max_tokens, alpha, tuple(sorted(sampling.items())))
        with lock:  # the reference engine answers one request at a time
            if key not in refs:
                ref.set_lora_alpha(alpha)
                refs[key] = ref.generate(frames[ci], [("user", q)], max_new_tokens=max_tokens, **sampling).text
            return refs[key]

    failures, kinds = [], []
    cfg = ServerConfig(model_name="tiny", max_num_seqs=4, max_queue=64, prefill_chunk=16, max_new_tokens_limit=256)
    with LiveServer(engine, cfg) as s:
        url = s.url + "/v1/chat/completions"

        def client(c):
            rng = random.Random(c)
            for i in range(REQUESTS):
                kind = rng.choice(["greedy", "greedy", "stream", "stream", "sampled", "leave", "malformed"])
                ci, q = rng.randrange(3), rng.choice(QUESTIONS)
                mt, alpha = rng.choice([1, 5, 17, 40]), rng.choice(ALPHAS)
                what = (c, i, kind, ci, q[:24], mt, alpha)
                try:
                    if kind == "greedy":
                        r = httpx.post(url, json=_body(clips[ci], q, max_tokens=mt, lora_alpha=alpha), timeout=300)
                        assert r.status_code == 200, r.text
                        assert r.json()["choices"][0]["message"]["content"] == reference(ci, q, mt, alpha)
                    elif kind == "stream":
                        with httpx.stream("POST", url, timeout=300, json=_body(
                                clips[ci], q, max_tokens=mt, lora_alpha=alpha, stream=True)) as r:
                            assert r.status_code == 200
                            assert _stream_text(r) == reference(ci, q, mt, alpha)
                    elif kind == "sampled":
                        seed, n = rng.randrange(1000), rng.choice([1, 3])
                        r = httpx.post(url, timeout=300, json=_body(clips[ci], q, max_tokens=mt, lora_alpha=alpha,
                                                                    n=n, temperature=0.9, top_p=0.9, seed=seed))
                        assert r.status_code == 200, r.text
                        choices = sorted(r.json()["choices"], key=lambda ch: ch["index"])
                        got = [ch["message"]["content"] for ch in choices]
                        assert got == [reference(ci, q, mt, alpha, temperature=0.9, top_p=0.9, seed=seed + k)
                                       for k in range(n)]
                    elif kind == "leave":  # read a few events of a long answer, then hang up
                        with httpx.stream("POST", url, timeout=300,
                                          json=_body(clips[ci], q, max_tokens=200, stream=True)) as r:
                            assert r.status_code == 200
                            events, stop_at = 0, rng.randrange(1, 6)
                            for line in r.iter_lines():
                                events += line.startswith("data: ")
                                if events >= stop_at:
                                    break
                    else:
                        b, word = _malformed(clips[ci], rng)
                        r = httpx.post(url, json=b, timeout=300)
                        assert r.status_code == 400 and word in r.json()["error"]["message"], (r.status_code, r.text)
                    kinds.append(kind)
                except AssertionError as e:
                    failures.append((what, str(e)[:300]))
                except httpx.HTTPError as e:
                    failures.append((what, repr(e)[:300]))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 20  # the last hang-ups are noticed at the next token
        while time.monotonic() < deadline and "pllava_batch_running 0" not in (m := httpx.get(s.url + "/metrics").text):
            time.sleep(0.05)
        after = httpx.post(url, json=_body(clips[0], QUESTIONS[1], max_tokens=17, lora_alpha=4), timeout=300)
    assert not failures, failures
    assert len(kinds) == CLIENTS * REQUESTS and set(kinds) == {"greedy", "stream", "sampled", "leave", "malformed"}
    assert "pllava_batch_running 0" in m, m
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == reference(
        0, QUESTIONS[1], 17, 4)
