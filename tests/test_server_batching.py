"""The server on the batch scheduler: concurrent requests (streaming and not, each with its own lora_alpha) get
exactly what one-at-a-time generate() gives; a disconnect cancels only that request; metrics show the batch."""
import base64
import contextlib
import json
import re
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


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("bclips")
    out = []
    for i in range(3):
        p = make_video(str(d / f"c{i}.mp4"), num_frames=12 + 4 * i, size=(64 + 16 * i, 48), codec="libx264", gop=6)
        out.append(open(p, "rb").read())
    return out


def body(raw, text, **kw):
    url = "data:video/mp4;base64," + base64.b64encode(raw).decode()
    return {"model": "tiny-pllava", "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "video_url", "video_url": {"url": url}}]}], **kw}


def metric(text, name):
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def stream_text(resp_text):
    text, usage = "", None
    for block in resp_text.strip().split("\n\n"):
        data = "".join(line[6:] for line in block.split("\n") if line.startswith("data: "))
        if not data or data == "[DONE]":
            continue
        c = json.loads(data)
        assert "error" not in c, c
        if c.get("usage"):
            usage = c["usage"]
        for ch in c.get("choices", []):
            text += ch["delta"].get("content") or ""
    return text, usage


def test_concurrent_requests_equal_sequential_generate(ckpts, clips):
    engine = pllava.Engine.from_pretrained(ckpts["pllava"])
    ref_engine = pllava.Engine.from_pretrained(ckpts["pllava"])
    qs = ["What is happening?", "Describe the video in details.", "Who is there?", "a"]
    jobs = [dict(raw=clips[i % 3], text=qs[i % 4], max_tokens=[12, 30, 21, 40][i % 4], lora_alpha=[4, 20, 0, 9][i % 4],
                 stream=i % 2 == 1) for i in range(8)]
    expect = []
    for j in jobs:
        frames = read_frames(j["raw"], engine.config.num_frames)
        ref_engine.set_lora_alpha(j["lora_alpha"])
        expect.append(ref_engine.generate(frames, [("user", j["text"])], max_new_tokens=j["max_tokens"]))
    cfg = ServerConfig(model_name="tiny-pllava", max_num_seqs=4, max_queue=16, max_new_tokens_limit=64)
    results = [None] * len(jobs)
    with LiveServer(engine, cfg) as s:
        def go(i):
            j = jobs[i]
            b = body(j["raw"], j["text"], max_tokens=j["max_tokens"], lora_alpha=j["lora_alpha"], stream=j["stream"],
                     stream_options={"include_usage": True})
            r = httpx.post(s.url + "/v1/chat/completions", json=b, timeout=120)
            assert r.status_code == 200, r.text
            if j["stream"]:
                results[i] = stream_text(r.text)
            else:
                d = r.json()
                results[i] = d["choices"][0]["message"]["content"], d["usage"]

        threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        m = httpx.get(s.url + "/metrics").text
    for i, (exp, got) in enumerate(zip(expect, results)):
        assert got is not None, i
        text, usage = got
        assert text == exp.text, (i, text, exp.text)
        assert usage["completion_tokens"] == len(exp.token_ids) and usage["prompt_tokens"] == exp.num_prompt_tokens
    assert "pllava_batch_slots 4" in m and "pllava_batch_running 0" in m
    mean = metric(m, "pllava_batch_size_mean")
    assert mean > 1.0, m  # decode steps really ran several requests at once


def test_disconnect_cancels_only_that_request(ckpts, clips):
    engine = pllava.Engine.from_pretrained(ckpts["pllava"])
    cfg = ServerConfig(model_name="tiny-pllava", max_num_seqs=2, max_new_tokens_limit=400)
    frames = read_frames(clips[1], engine.config.num_frames)
    with LiveServer(engine, cfg) as s:
        got = {}

        def other():
            time.sleep(0.2)
            r = httpx.post(s.url + "/v1/chat/completions", json=body(clips[1], "Who is there?", max_tokens=30),
                           timeout=120)
            got["other"] = r.json()["choices"][0]["message"]["content"]

        t = threading.Thread(target=other)
        t.start()
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=120,
                          json=body(clips[0], "Describe the video in details.", max_tokens=400, stream=True)) as r:
            n = 0
            for line in r.iter_lines():
                n += line.startswith("data: ")
                if n >= 4:
                    break  # leave mid-stream
        t.join()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = httpx.get(s.url + "/metrics").text
            if "pllava_batch_running 0" in m and 'kind="client_disconnected"' in m:
                break
            time.sleep(0.05)
        assert "pllava_batch_running 0" in m and 'kind="client_disconnected"' in m, m
        toks = metric(m, "pllava_batch_tokens_total")
    ref = pllava.Engine.from_pretrained(ckpts["pllava"]).generate(frames, [("user", "Who is there?")],
                                                                  max_new_tokens=30)
    assert got["other"] == ref.text
    assert toks < 200 + 30 + 2  # the abandoned stream stopped long before its 400 tokens (+ warm-up's 2)


def test_slow_sources_do_not_stall_other_clients(ckpts, clips):
    """6 clients whose media URL trickles a byte every 0.1 s, then 4 normal clients: the normal ones are answered
    while the slow fetches are still running (each slow fetch ends at the fetch deadline with a 400)."""
    from server_util import trickle_server

    stack = contextlib.ExitStack()
    _, port = stack.enter_context(trickle_server())
    engine = pllava.Engine.from_pretrained(ckpts["pllava"])
    cfg = ServerConfig(model_name="tiny-pllava", max_num_seqs=2, max_queue=16, fetch_timeout_s=4.0,
                       allowed_fetch_hosts=frozenset({f"127.0.0.1:{port}"}))
    slow_status, fast_s = [], []
    try:
        with LiveServer(engine, cfg) as s:
            def slow():
                b = {"model": "tiny-pllava", "max_tokens": 4, "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "hi"},
                    {"type": "video_url", "video_url": {"url": f"http://127.0.0.1:{port}/v.mp4"}}]}]}
                t = time.monotonic()
                r = httpx.post(s.url + "/v1/chat/completions", json=b, timeout=60)
                slow_status.append((r.status_code, r.json()["error"]["code"], time.monotonic() - t))

            ts = [threading.Thread(target=slow) for _ in range(6)]
            for t in ts:
                t.start()
            time.sleep(0.5)  # the slow fetches are under way
            for _ in range(4):
                t0 = time.monotonic()
                r = httpx.post(s.url + "/v1/chat/completions", json=body(clips[0], "hi", max_tokens=8), timeout=60)
                assert r.status_code == 200, r.text
                fast_s.append(time.monotonic() - t0)
            for t in ts:
                t.join()
            # a client that gives up after 1 s: its fetch is cancelled, not left to run to the deadline
            b = {"model": "tiny-pllava", "max_tokens": 4, "messages": [{"role": "user", "content": [
                {"type": "text", "text": "hi"}, {"type": "video_url", "video_url": {"url": f"http://127.0.0.1:{port}/v"}}]}]}
            t_gone = time.monotonic()
            with pytest.raises(httpx.TimeoutException):
                httpx.post(s.url + "/v1/chat/completions", json=b, timeout=1.0)
            while time.monotonic() < t_gone + 6:  # the fetch thread returns once it sees the cancel
                if metric(httpx.get(s.url + "/metrics").text, "pllava_running") == 0:
                    break
                time.sleep(0.05)
            freed_after = time.monotonic() - t_gone
    finally:
        stack.close()
    assert freed_after < 3.0, freed_after  # cancelled ~1.5 s in, not left to run to the 4 s fetch deadline
    print(f"\nnormal requests beside 6 trickling fetches: {', '.join(f'{x:.2f}' for x in fast_s)} s; slow ones "
          f"ended after {', '.join(f'{x[2]:.1f}' for x in slow_status)} s; a fetch whose client left after 1 s "
          f"was freed {freed_after:.2f} s after it was sent")
    assert max(fast_s) < 3.0  # answered while the slow fetches (4 s deadline) were still running
    assert [x[:2] for x in slow_status] == [(400, "fetch_timeout")] * 6
    assert all(3.5 < x[2] < 8 for x in slow_status)
