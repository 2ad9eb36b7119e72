"""`pllava serve` end to end: the real uvicorn server on loopback, driven by httpx and the openai client."""
import base64
import json
import os
import threading
import time

import httpx
import pytest

import pllava
from pllava.media import MediaError, check_ip, fetch_http
from pllava.server import ServerConfig
from pllava.testing import make_video
from server_util import LiveServer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")



@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    clip = make_video(str(d / "clip.mp4"), num_frames=30, size=(80, 60), codec="libx264", gop=10)
    return d, clip, open(clip, "rb").read()


@pytest.fixture(scope="module")
def server(engine, media):
    d, _, _ = media
    cfg = ServerConfig(model_name="tiny-pllava", allowed_local_media_path=str(d), max_frames=32,
                       max_new_tokens_limit=64, max_video_bytes=2 << 20, max_queue=64, max_concurrency=2)
    with LiveServer(engine, cfg) as s:
        yield s


def data_url(b: bytes, mime="video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(b).decode()


def chat_body(url, text="What is happening?", **kw):
    return {"model": "tiny-pllava", "messages": [{"role": "user", "content": [
        {"type": "text", "text": text}, {"type": "video_url", "video_url": {"url": url}}]}], **kw}


def post(server, body, **kw):
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120, **kw)


def sse(resp_text: str):
    events = []
    for block in resp_text.strip().split("\n\n"):
        data = "".join(line[6:] for line in block.split("\n") if line.startswith("data: "))
        events.append(data)
    return events


# ------------------------------------------------------------------------------------------ the happy paths
def test_health_models_metrics(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    m = httpx.get(server.url + "/v1/models").json()
    assert m["data"][0]["id"] == "tiny-pllava"
    txt = httpx.get(server.url + "/metrics").text
    assert "pllava_queue_depth" in txt and "pllava_requests_total" in txt


def test_non_streaming_matches_engine(server, engine, media):
    _, clip, raw = media
    r = post(server, chat_body(data_url(raw), max_tokens=12, lora_alpha=4))
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "chat.completion" and j["choices"][0]["finish_reason"] in ("stop", "length")
    frames = pllava.read_frames(clip, engine.config.num_frames)
    engine.set_lora_alpha(4)
    want = engine.generate(frames, [("user", "What is happening?")], max_new_tokens=12)
    assert j["choices"][0]["message"]["content"] == want.text
    assert j["usage"]["completion_tokens"] == len(want.token_ids)
    assert j["usage"]["prompt_tokens"] == want.num_prompt_tokens


def test_per_request_lora_alpha_changes_output_as_the_engine_does(server, engine, media):
    _, clip, raw = media
    frames = pllava.read_frames(clip, engine.config.num_frames)
    got = {}
    before = engine.lora_alpha
    try:
        for alpha in (0.0, 32.0):
            got[alpha] = post(server, chat_body(data_url(raw), max_tokens=12, lora_alpha=alpha)).json()
            engine.set_lora_alpha(alpha)
            want = engine.generate(frames, [("user", "What is happening?")], max_new_tokens=12).text
            assert got[alpha]["choices"][0]["message"]["content"] == want
    finally:  # the module's engine is shared with the server and the later tests
        engine.set_lora_alpha(before)
    assert got[0.0]["choices"][0]["message"]["content"] != got[32.0]["choices"][0]["message"]["content"]


def test_streaming_with_usage(server, media):
    _, _, raw = media
    r = post(server, chat_body(data_url(raw), max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    fins = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert fins == ["length"] or fins == ["stop"]
    usage = chunks[-1]["usage"]
    assert not any(k.startswith("_") for k in chunks[-1]["pllava"]["timings"])
    assert usage["completion_tokens"] <= 10 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    nonstream = post(server, chat_body(data_url(raw), max_tokens=10)).json()
    assert text == nonstream["choices"][0]["message"]["content"]


def test_openai_client(server, media, engine):
    openai = pytest.importorskip("openai")
    _, _, raw = media
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    msgs = chat_body(data_url(raw))["messages"]
    r = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=8)
    assert r.choices[0].message.content and r.usage.completion_tokens <= 8
    parts, usage = [], None
    for ch in client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=8, stream=True,
                                             stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
        if ch.usage:
            usage = ch.usage
    assert "".join(parts) == r.choices[0].message.content and usage.completion_tokens == r.usage.completion_tokens
    r2 = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=8,
                                        extra_body={"lora_alpha": 32, "num_frames": 8})
    # the per-request fields reach the model: 8 frames of the clip at alpha 32, as the engine answers them
    _, clip, _ = media
    want = {n: pllava.Engine.generate_many(engine, [dict(video=pllava.read_frames(clip, n), lora_alpha=32.0,
                                                         prompt=[("user", "What is happening?")], max_new_tokens=8)])[0]
            for n in (8, 4)}
    assert r2.choices[0].message.content == want[8].text
    assert want[8].token_ids != want[4].token_ids, "num_frames must matter on this clip, or this proves nothing"


def test_captions_upload_and_url(server, media):
    d, clip, raw = media
    r = httpx.post(server.url + "/v1/captions", files={"file": ("clip.mp4", raw, "video/mp4")},
                   data={"max_tokens": "6"}, timeout=60)
    assert r.status_code == 200, r.text
    t = r.json()["timings"]
    assert r.json()["caption"] and ("vision" in t or t.get("prefix_cache_hit") == 1)  # earlier tests sent this clip
    r2 = httpx.post(server.url + "/v1/captions", json={"url": "file://" + clip, "max_tokens": 6}, timeout=60)
    assert r2.status_code == 200 and r2.json()["caption"] == r.json()["caption"]


def test_captions_without_a_prompt_ask_the_recipes_own_query(tmp_path, media):
    """A server whose --conv-mode is a recipe with its own query (recaption) captions with that query, as
    engine.caption() does (it sent "Describe the video in details." instead)."""
    from pllava.testing import make_tiny_checkpoint

    _, clip, raw = media  # the recaption query is ~900 tokens here: a checkpoint with a 2048-token context
    ck = make_tiny_checkpoint(str(tmp_path / "m"), "pllava", shards=1, seed=1, text={"max_position_embeddings": 2048})
    eng = pllava.Engine.from_pretrained(ck, conv_mode="recaption")
    want = eng.caption(clip, max_new_tokens=12)
    assert want != eng.generate(clip, "Describe the video in details.", max_new_tokens=12).text  # or it proves nothing
    with LiveServer(eng, ServerConfig(model_name="t")) as s:
        r = httpx.post(s.url + "/v1/captions", files={"file": ("clip.mp4", raw, "video/mp4")},
                       data={"max_tokens": "12"}, timeout=60)
    assert r.status_code == 200 and r.json()["caption"] == want, r.text


def test_image_url_and_multi_turn(server, media, engine):
    from PIL import Image
    import io

    buf = io.BytesIO()
    img = Image.new("RGB", (50, 40), (200, 30, 30))
    img.save(buf, format="PNG")
    body = {"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(
                             buf.getvalue(), "image/png")}}, {"type": "text", "text": "What color?"}]},
                         {"role": "assistant", "content": "Red."},
                         {"role": "user", "content": "Are you sure?"}], "max_tokens": 5}
    r = post(server, body)
    assert r.status_code == 200, r.text
    # The demo's ChatPllava flow (the clip its own user message), with the system message as the system prompt:
    literal = "Answer briefly. USER:<image>  USER:What color? ASSISTANT:Red.</s>USER:Are you sure? ASSISTANT:"
    want = engine.generate(img, literal, conv_mode="raw", max_new_tokens=5)
    j = r.json()
    assert j["usage"]["prompt_tokens"] == want.num_prompt_tokens
    assert j["choices"][0]["message"]["content"] == want.text


# ------------------------------------------------------------------------------------------ errors
def err(r, status, param=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if param is not None:
        assert e["param"] == param, e
    return e


def test_bad_videos_are_400(server, media):
    _, _, raw = media
    err(post(server, chat_body(data_url(os.urandom(3000)))), 400)
    err(post(server, chat_body("data:video/mp4;base64,")), 400)
    err(post(server, chat_body(data_url(raw[: len(raw) // 3]))), 400)  # truncated mp4
    e = err(post(server, chat_body(data_url(b"hello", "text/plain"))), 400)
    assert e["code"] == "unsupported_media_type"
    err(post(server, chat_body("ftp://example.invalid/x.mp4")), 400)


def test_streaming_request_with_a_bad_video_gets_its_status(server):
    r = post(server, chat_body(data_url(os.urandom(3000)), stream=True))
    e = err(r, 400)
    assert e["code"] == "invalid_video"
    assert "pllava_running 0" in httpx.get(server.url + "/metrics").text


def test_bad_parameters_name_the_field(server, media):
    _, _, raw = media
    u = data_url(raw)
    err(post(server, chat_body(u, num_frames=500)), 400, "num_frames")
    err(post(server, chat_body(u, temperature=5)), 400, "temperature")
    err(post(server, chat_body(u, max_tokens=10_000)), 400, "max_tokens")
    err(post(server, chat_body(u, top_p="x")), 400, "top_p")
    err(post(server, chat_body(u, stop=[""])), 400, "stop")
    err(post(server, {"messages": []}), 400, "messages")
    err(post(server, chat_body(u, n=0)), 400, "n")
    err(post(server, chat_body(u, model="other")), 404, "model")
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    err(r, 400)


def test_prompt_over_context(server, media):
    _, _, raw = media
    e = err(post(server, chat_body(data_url(raw), text="video " * 700)), 400)
    assert "context" in e["message"]


def test_error_after_streaming_started_is_an_sse_event(server, media):
    _, _, raw = media
    r = post(server, chat_body(data_url(raw), text="video " * 700, stream=True))
    assert r.status_code == 200
    events = sse(r.text)
    assert events[-1] == "[DONE]"
    assert "context" in json.loads(events[-2])["error"]["message"]


def test_body_too_large_is_413(server):
    big = "A" * (4 << 20)
    r = httpx.post(server.url + "/v1/chat/completions", content=json.dumps(chat_body("data:video/mp4;base64," + big)),
                   headers={"content-type": "application/json"}, timeout=30)
    err(r, 413)
    r = httpx.post(server.url + "/v1/captions", files={"file": ("x.mp4", b"0" * (3 << 20), "video/mp4")}, timeout=30)
    err(r, 413)


def test_api_key(engine, media):
    _, _, raw = media
    with LiveServer(engine, ServerConfig(model_name="tiny-pllava", api_key="sekrit")) as s:
        e = err(post(s, chat_body(data_url(raw), max_tokens=2)), 401)
        assert e["type"] == "AuthenticationError"
        err(post(s, chat_body(data_url(raw), max_tokens=2), headers={"Authorization": "Bearer nope"}), 401)
        assert post(s, chat_body(data_url(raw), max_tokens=2), headers={"Authorization": "Bearer sekrit"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key


def test_overload_is_503_with_retry_after(engine, media):
    _, _, raw = media
    cfg = ServerConfig(model_name="tiny-pllava", max_concurrency=1, max_queue=0, max_new_tokens_limit=400)
    with LiveServer(engine, cfg) as s:
        slow = threading.Thread(target=post, args=(s, chat_body(data_url(raw), max_tokens=400)))
        slow.start()
        deadline = time.monotonic() + 10
        while "pllava_running 1" not in httpx.get(s.url + "/metrics").text and time.monotonic() < deadline:
            time.sleep(0.01)
        r = post(s, chat_body(data_url(raw), max_tokens=2))
        e = err(r, 503)
        assert r.headers["retry-after"] == "1" and e["code"] == "overloaded"
        slow.join()


# ------------------------------------------------------------------------------------------ security
def test_local_files_only_under_the_allowed_dir(server, media, tmp_path):
    d, clip, _ = media
    assert post(server, chat_body("file://" + clip, max_tokens=2)).status_code == 200
    assert post(server, chat_body(clip, max_tokens=2)).status_code == 200  # a plain path
    err(post(server, chat_body("file:///etc/passwd")), 400)
    err(post(server, chat_body(str(d) + "/../../etc/passwd")), 400)
    outside = make_video(str(tmp_path / "outside.mp4"), num_frames=3)
    link = d / "link.mp4"
    if not link.exists():
        os.symlink(outside, link)
    e = err(post(server, chat_body("file://" + str(link))), 400)
    assert "outside" in e["message"]


def test_local_files_disabled_by_default(engine, media):
    _, clip, _ = media
    with LiveServer(engine, ServerConfig(model_name="tiny-pllava")) as s:
        e = err(post(s, chat_body("file://" + clip)), 400)
        assert "disabled" in e["message"]


def test_loopback_and_private_fetches_are_refused(server, media):
    import http.server

    d, _, _ = media

    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(d), **kw)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    hits = []
    H.do_GET_orig = H.do_GET

    def counting(self):
        hits.append(self.path)
        return H.do_GET_orig(self)

    H.do_GET = counting
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/clip.mp4"
        e = err(post(server, chat_body(url)), 400)
        assert "refusing" in e["message"]
        err(post(server, chat_body(f"http://localhost:{srv.server_address[1]}/clip.mp4")), 400)
        assert hits == [], "the server connected to a loopback address"
    finally:
        srv.shutdown()


def test_redirects_are_checked_on_every_hop(media):
    """An operator-allowed host redirects to a loopback port and to the metadata address: both refused."""
    import http.server

    d, _, _ = media
    hits = []

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", self.server.target)
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    allowed = frozenset({f"127.0.0.1:{srv.server_address[1]}"})
    try:
        for target in ("http://127.0.0.1:9/x.mp4", "http://169.254.169.254/latest/meta-data",
                       "http://[::1]:9/x.mp4", "http://10.1.2.3/x.mp4"):
            srv.target = target
            with pytest.raises(MediaError, match="refusing"):
                fetch_http(f"http://127.0.0.1:{srv.server_address[1]}/start", max_bytes=1 << 20, timeout_s=5,
                           allowed_hosts=allowed)
        assert len(hits) == 4  # only the allowed first hop was contacted
    finally:
        srv.shutdown()


@pytest.mark.parametrize("addr", ["127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
                                  "0.0.0.0", "::1", "fc00::1", "fe80::1", "100.64.0.1", "::ffff:127.0.0.1",
                                  "224.0.0.1",
                                  # IPv6 forms that carry a private or loopback IPv4 address: 6to4, NAT64, IPv4-compatible
                                  "2002:c0a8:101::1", "2002:7f00:1::1", "2002:a00:1::", "64:ff9b::7f00:1", "::7f00:1",
                                  "::a00:1", "::ffff:10.1.2.3"])
def test_address_validation_refuses(addr):
    with pytest.raises(MediaError, match="refusing"):
        check_ip(addr, "url", "messages")


def test_address_validation_allows_public():
    check_ip("8.8.8.8", "url", "messages")  # validation only: nothing is contacted
    check_ip("2606:4700:4700::1111", "url", "messages")
    check_ip("2002:808:808::1", "url", "messages")  # 6to4 of a public address


def test_a_6to4_address_is_judged_by_its_ipv4_on_every_python(monkeypatch):
    """Python 3.13's ipaddress calls all of 2002::/16 private (IANA's registry: not globally reachable) where 3.11
    calls none of it private, so the 6to4 form of a public address was refused on 3.13 only. Here 3.13's rule is
    put on 3.11's ipaddress: the public one still passes, the loopback one is still refused."""
    import ipaddress

    plain = ipaddress.IPv6Address.is_private.fget
    six = ipaddress.ip_network("2002::/16")
    monkeypatch.setattr(ipaddress.IPv6Address, "is_private", property(lambda self: self in six or plain(self)))
    assert ipaddress.ip_address("2002:808:808::1").is_private  # the rule is in force
    check_ip("2002:808:808::1", "url", "messages")
    with pytest.raises(MediaError, match="refusing to fetch from 127.0.0.1"):
        check_ip("2002:7f00:1::1", "url", "messages")


# ------------------------------------------------------------------------------------------ disconnects, load
def test_client_disconnect_stops_generation(engine, media):
    _, _, raw = media
    with LiveServer(engine, ServerConfig(model_name="tiny-pllava", max_new_tokens_limit=400)) as s:
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60,
                          json=chat_body(data_url(raw), max_tokens=400, stream=True)) as r:
            for _line in r.iter_lines():
                break  # read one event, then hang up
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = httpx.get(s.url + "/metrics").text
            if "pllava_running 0" in m and 'kind="client_disconnected"' in m:
                break
            time.sleep(0.05)
        assert 'kind="client_disconnected"' in m and "pllava_running 0" in m
        toks = float(next(line.split()[-1] for line in m.splitlines() if line.startswith("pllava_generated_tokens_total")))
        print(f"\ntokens generated before the disconnect stopped generation: {toks:.0f} of 400")
        assert toks < 400, "generation ran to the end after the client left"
        assert post(s, chat_body(data_url(raw), max_tokens=2)).status_code == 200  # the slot is free again


def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_bounded_load(engine, media):
    """200 requests from 50 concurrent clients: each gets a well-formed answer or a 503; none lost or hung."""
    import asyncio
    import gc

    _, _, raw = media
    body = chat_body(data_url(raw), max_tokens=4)
    with LiveServer(engine, ServerConfig(model_name="tiny-pllava", max_concurrency=2, max_queue=16)) as s:
        gc.collect()
        rss0 = _rss_mb()

        retries = []

        async def client(q, out, ac):
            while True:
                try:
                    q.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t = time.monotonic()
                for attempt in range(6):  # a polite client: back off on 503 (scaled-down Retry-After), then give up
                    r = await ac.post(s.url + "/v1/chat/completions", json=body, timeout=120)
                    if r.status_code != 503:
                        break
                    retries.append(1)
                    await asyncio.sleep(0.05 * float(r.headers["retry-after"]) * (attempt + 1))
                out.append((r.status_code, time.monotonic() - t, r))

        async def main():
            q = asyncio.Queue()
            for i in range(200):
                q.put_nowait(i)
            out = []
            limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
            async with httpx.AsyncClient(limits=limits) as ac:
                t = time.monotonic()
                await asyncio.wait_for(asyncio.gather(*(client(q, out, ac) for _ in range(50))), timeout=300)
                return out, time.monotonic() - t

        out, wall = asyncio.run(main())
        assert len(out) == 200
        codes = [c for c, _, _ in out]
        assert set(codes) <= {200, 503}, set(codes)
        for c, _, r in out:
            j = r.json()
            if c == 200:
                assert j["choices"][0]["message"]["content"] is not None
            else:
                assert j["error"]["code"] == "overloaded" and r.headers["retry-after"]
        ok = sorted(t for c, t, _ in out if c == 200)
        assert ok, "no request was served"
        p50, p99 = ok[len(ok) // 2], ok[min(len(ok) - 1, int(len(ok) * 0.99))]
        print(f"\nload: 200 requests / 50 clients in {wall:.1f} s: {codes.count(200)} served, {codes.count(503)} x 503 "
              f"after retries ({len(retries)} 503s answered on the way); "
              f"{codes.count(200) / wall:.1f} req/s; latency p50 {p50 * 1000:.0f} ms p99 {p99 * 1000:.0f} ms")
        m = httpx.get(s.url + "/metrics").text
        assert "pllava_running 0" in m and "pllava_queue_depth 0" in m
        gc.collect()
        assert _rss_mb() - rss0 < 300, f"memory grew by {_rss_mb() - rss0:.0f} MB"


def test_follow_up_question_reuses_the_video_prefix(server, media):
    _, _, raw = media
    u = data_url(raw)
    post(server, chat_body(u, text="What is happening?", max_tokens=4))
    r = post(server, chat_body(u, text="And who is there?", max_tokens=6)).json()
    assert r["pllava"]["timings"].get("prefix_cache_hit") == 1 and "vision" not in r["pllava"]["timings"]


def test_https_fetch_verifies_certificates(tmp_path):
    """TLS goes to the vetted address with the URL's host checked against the certificate: a self-signed
    loopback server (allowed by the operator) is refused by verification, not trusted."""
    import http.server
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl CLI to make a certificate")
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
                    "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(crt), str(key))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    port = srv.server_address[1]
    try:
        with pytest.raises(MediaError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            fetch_http(f"https://127.0.0.1:{port}/x.mp4", max_bytes=1 << 20, timeout_s=5,
                       allowed_hosts=frozenset({f"127.0.0.1:{port}"}))
    finally:
        srv.shutdown()


# ------------------------------------------------------------------------------------------ hostile bodies
def test_hostile_bodies_are_400_in_the_documented_shape(server, media):
    _, _, raw = media
    u = data_url(raw)
    deep = b"[" * 200_000 + b"]" * 200_000  # past the recursion limit of json.loads
    r = httpx.post(server.url + "/v1/chat/completions", content=deep, timeout=30,
                   headers={"content-type": "application/json"})
    assert "nested too deeply" in err(r, 400)["message"]
    err(post(server, chat_body(u, stream_options=[1])), 400, "stream_options")
    err(post(server, chat_body(u, stream=True, stream_options={"include_usage": "yes"})), 400,
        "stream_options.include_usage")
    err(post(server, chat_body(u, stream="true")), 400, "stream")
    err(post(server, chat_body(u, seed=2 ** 70)), 400, "seed")
    err(post(server, chat_body(u, seed=-1)), 400, "seed")
    r = httpx.post(server.url + "/v1/captions", content=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n",
                   headers={"content-type": "multipart/form-data; boundary=xyz"}, timeout=30)
    err(r, 400)
    assert post(server, chat_body(u, max_tokens=2)).status_code == 200  # and the server still answers


def test_a_chunked_body_is_cut_at_the_limit_as_it_arrives(server):
    """No Content-Length: the server answers 413 once the body passes its limit (~3.7 MB here), while the client
    is still sending (a raw socket sees the answer arrive mid-upload), not after buffering all of it."""
    import select
    import socket

    host, port = server.url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b" " * (1 << 20)
    sent, answer = 0, b""
    try:
        for sent in range(1, 41):  # up to 40 MiB
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            time.sleep(0.02)
            if select.select([sock], [], [], 0)[0]:
                answer = sock.recv(65536)
                break
    except (BrokenPipeError, ConnectionResetError):  # the server closed on us after answering
        answer = answer or sock.recv(65536)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent <= 8, f"the answer came only after {sent} MiB"


def test_a_request_body_is_parsed_off_the_event_loop(server, monkeypatch):
    """While one body's JSON is being parsed (0.67 s for a 200 MB data URL, here held until released), the server
    answers others: parsing ran on the event loop, so every client waited for it."""
    import pllava.server as S

    started, release, real = threading.Event(), threading.Event(), S.parse_json

    def slow(raw):
        started.set()
        release.wait(20)
        return real(raw)

    monkeypatch.setattr(S, "parse_json", slow)
    box = {}
    t = threading.Thread(target=lambda: box.update(r=post(server, {"messages": [{"role": "user", "content": "hi"}],
                                                                   "max_tokens": 2})))
    t.start()
    try:
        assert started.wait(20)
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200  # timed out with parsing on the loop
    finally:
        release.set()
        t.join(30)
    assert box["r"].status_code == 200, box["r"].text
