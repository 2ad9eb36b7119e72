"""`pllava serve`: an OpenAI-compatible captioning server for one model on one device (FastAPI + uvicorn).

Requests are admitted into a bounded set (max_concurrency running + max_queue waiting); beyond it the answer is
503 with Retry-After. Media is fetched and decoded in worker threads (never on the event loop), then the model
runs under one lock (one device). A client that disconnects sets its request's cancel event: generation stops
at the next token and the slot is freed. Errors use vLLM's shape {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from .errors import PllavaError, PromptError, VideoError
from .media import MediaError, decode_data_url, fetch_http, local_path
from .video import DecodeLimits, read_frames

log = logging.getLogger("pllava.server")
STATIC = os.path.join(os.path.dirname(__file__), "static")


@dataclass
class ServerConfig:
    model_name: str = "pllava"
    api_key: str | None = None
    max_concurrency: int = 1
    max_queue: int = 16
    allowed_local_media_path: str | None = None
    max_video_bytes: int = 200 << 20
    max_frames: int = 64
    max_new_tokens_limit: int = 1024
    default_max_tokens: int = 256
    lora_alpha: float = 4.0
    fetch_timeout_s: float = 20.0
    allowed_fetch_hosts: frozenset = field(default_factory=frozenset)  # "host:port" an operator trusts


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


def bad(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    return APIError(400, message, "BadRequestError", param, code)


# ---------------------------------------------------------------------------------------------- metrics
class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.ttft_sum = self.ttft_count = 0.0
        self.tokens = 0
        self.decode_seconds = 0.0

    def request(self, endpoint: str, status: int):
        with self.lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def error(self, kind: str):
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def generation(self, timings: dict, n_tokens: int):
        with self.lock:
            if "ttft" in timings:
                self.ttft_sum += timings["ttft"]
                self.ttft_count += 1
            self.tokens += n_tokens
            self.decode_seconds += timings.get("decode", 0.0)

    def render(self, sched: "Scheduler") -> str:
        out = ["# HELP pllava_requests_total Requests by endpoint and status.", "# TYPE pllava_requests_total counter"]
        with self.lock:
            for (ep, st), n in sorted(self.requests.items()):
                out.append(f'pllava_requests_total{{endpoint="{ep}",status="{st}"}} {n}')
            out += ["# HELP pllava_errors_total Errors by kind.", "# TYPE pllava_errors_total counter"]
            for k, n in sorted(self.errors.items()):
                out.append(f'pllava_errors_total{{kind="{k}"}} {n}')
            out += ["# HELP pllava_time_to_first_token_seconds Time to first token.",
                    "# TYPE pllava_time_to_first_token_seconds summary",
                    f"pllava_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                    f"pllava_time_to_first_token_seconds_count {int(self.ttft_count)}",
                    "# HELP pllava_generated_tokens_total Tokens generated.", "# TYPE pllava_generated_tokens_total counter",
                    f"pllava_generated_tokens_total {self.tokens}",
                    "# HELP pllava_decode_tokens_per_second Mean decode speed over all requests.",
                    "# TYPE pllava_decode_tokens_per_second gauge",
                    f"pllava_decode_tokens_per_second {self.tokens / self.decode_seconds if self.decode_seconds else 0:.3f}"]
        out += ["# HELP pllava_queue_depth Admitted requests waiting for a slot.", "# TYPE pllava_queue_depth gauge",
                f"pllava_queue_depth {sched.waiting}", "# HELP pllava_running Requests being served.",
                "# TYPE pllava_running gauge", f"pllava_running {sched.running}",
                "# HELP pllava_gpu_memory_bytes CUDA memory allocated.", "# TYPE pllava_gpu_memory_bytes gauge",
                f"pllava_gpu_memory_bytes {torch.cuda.memory_allocated() if torch.cuda.is_available() else 0}"]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- scheduling
class Scheduler:
    """At most max_concurrency requests run and max_queue wait; the model itself runs under one lock."""

    def __init__(self, max_concurrency: int, max_queue: int):
        self.capacity = max_concurrency + max_queue
        self.admitted = 0
        self.running = 0
        self.sem = asyncio.Semaphore(max_concurrency)
        self.model_lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def admit(self):
        if self.admitted >= self.capacity:
            raise APIError(503, "server overloaded: the request queue is full; retry later", "ServiceUnavailableError",
                           None, "overloaded", {"Retry-After": "1"})
        self.admitted += 1

    def release(self):
        self.admitted -= 1


# ---------------------------------------------------------------------------------------------- requests
@dataclass
class Job:
    turns: list  # [(role, text)]
    system: str | None
    media: tuple[str, str] | None  # (kind, reference) kind: url | bytes
    media_bytes: bytes | None
    num_frames: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: int | None
    lora_alpha: float
    return_frames: bool = False
    video_key: str | None = None


def _number(body, name, lo, hi, default, integer=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if not (lo <= v <= hi):
        raise bad(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return int(v) if integer else float(v)


def parse_chat(body: dict, cfg: ServerConfig) -> Job:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    turns, system, media = [], None, None
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}] needs a role of system, user or assistant", f"messages[{i}].role")
        content = m.get("content")
        texts = []
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                p = f"messages[{i}].content[{j}]"
                t = part.get("type") if isinstance(part, dict) else None
                if t == "text":
                    if not isinstance(part.get("text"), str):
                        raise bad(f"{p}.text must be a string", p)
                    texts.append(part["text"])
                elif t in ("video_url", "image_url"):
                    ref = part.get(t)
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str) or not url:
                        raise bad(f"{p}.{t}.url must be a non-empty string", p)
                    if media is not None:
                        raise bad("only one video or image per request is supported", p)
                    if m["role"] != "user":
                        raise bad("media must be in a user message", p)
                    media = (t, url, p)
                else:
                    raise bad(f"{p}.type must be text, video_url or image_url, got {t!r}", p)
        elif content is not None:
            raise bad(f"messages[{i}].content must be a string or a list of parts", f"messages[{i}].content")
        text = "\n".join(texts)
        if m["role"] == "system":
            system = text
        else:
            turns.append((m["role"], text))
    if not turns or turns[-1][0] != "user":
        raise bad("the last message must come from the user", "messages")
    if media is None:
        raise bad("a video_url or image_url part is required (this model answers about a video)", "messages")
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": mt}, "max_tokens", 1, cfg.max_new_tokens_limit, cfg.default_max_tokens, True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 8:
        raise bad("'stop' must be a string or a list of up to 8 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("'seed' must be an integer", "seed")
    return Job(turns=turns, system=system, media=(media[0], media[1]), media_bytes=None,
               num_frames=_number(body, "num_frames", 1, 10 ** 9, 0, True),
               max_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 2.0, 0.0),
               top_p=_number(body, "top_p", 1e-6, 1.0, 1.0), stop=stop, seed=seed,
               lora_alpha=_number(body, "lora_alpha", -1e4, 1e4, cfg.lora_alpha),
               return_frames=bool(body.get("return_frames", False)))


def load_media(job: Job, cfg: ServerConfig, engine) -> torch.Tensor:
    """Fetch / read and decode the request's media -> uint8 frames (N, H, W, 3). Runs in a worker thread."""
    n = job.num_frames or engine.config.num_frames
    if n > cfg.max_frames:
        raise APIError(400, f"num_frames={n} exceeds the server's limit of {cfg.max_frames}", "BadRequestError",
                       "num_frames", "too_many_frames")
    limits = DecodeLimits(max_bytes=cfg.max_video_bytes, max_frames=cfg.max_frames)
    param = "messages"
    if job.media_bytes is not None:
        src = job.media_bytes
    else:
        _kind, url = job.media
        if url.startswith("data:"):
            src = decode_data_url(url, cfg.max_video_bytes, param)
        elif url.startswith(("http://", "https://")):
            src = fetch_http(url, max_bytes=cfg.max_video_bytes, timeout_s=cfg.fetch_timeout_s, param=param,
                             allowed_hosts=cfg.allowed_fetch_hosts)
        elif url.startswith("file://") or "://" not in url:
            src = local_path(url, cfg.allowed_local_media_path, param)
        else:
            raise MediaError(f"unsupported URL scheme in {url[:40]!r} (data:, http(s):, file://)", param)
    try:  # every bytes source was size-checked (413) as it arrived: what fails here is the video itself
        frames = read_frames(src, n, limits=limits)
    except VideoError as e:
        raise MediaError(f"undecodable video: {e}", param, 400, "invalid_video") from e
    job.video_key = f"{_content_id(src)}/{n}"  # a follow-up question on the same clip reuses its KV prefix
    return frames


def _content_id(src) -> str:
    import hashlib

    if isinstance(src, (bytes, bytearray)):
        return hashlib.blake2b(bytes(src), digest_size=16).hexdigest()
    st = os.stat(src)
    return f"{os.path.realpath(src)}:{st.st_size}:{st.st_mtime_ns}"


def load_media_timed(job: Job, cfg: ServerConfig, engine):
    t = time.perf_counter()
    frames = load_media(job, cfg, engine)
    return frames, time.perf_counter() - t


def thumbnails(frames: torch.Tensor, height: int = 72) -> list[str]:
    from PIL import Image

    out = []
    for f in frames:
        im = Image.fromarray(f.numpy())
        im.thumbnail((height * 4, height))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
        out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


# ---------------------------------------------------------------------------------------------- the app
def create_app(engine, cfg: ServerConfig) -> FastAPI:
    from contextlib import asynccontextmanager

    metrics = Metrics()
    state = {"ready": False, "sched": None}

    @asynccontextmanager
    async def lifespan(_app):
        state["sched"] = Scheduler(cfg.max_concurrency, cfg.max_queue)
        await asyncio.to_thread(_warmup, engine)
        state["ready"] = True
        yield

    app = FastAPI(title="pllava-engine", version="0.1.0", lifespan=lifespan)

    def sched() -> Scheduler:
        return state["sched"]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.error(e.code or str(e.status))
        metrics.request(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def auth(request: Request):
        if cfg.api_key and request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
            raise APIError(401, "missing or wrong API key (Authorization: Bearer ...)", "AuthenticationError", None,
                           "invalid_api_key")

    async def body_json(request: Request) -> dict:
        n = request.headers.get("content-length")
        limit = cfg.max_video_bytes * 4 // 3 + (1 << 20)  # base64 media + the rest of the JSON
        if n is not None and n.isdigit() and int(n) > limit:
            raise APIError(413, f"request body of {n} bytes exceeds the limit of {limit}", "RequestTooLarge", None,
                           "too_large")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", "RequestTooLarge", None, "too_large")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"invalid JSON: {e}") from e

    def to_api(e: Exception) -> APIError:
        if isinstance(e, APIError):
            return e
        if isinstance(e, MediaError):
            return APIError(e.status, str(e), "BadRequestError" if e.status == 400 else "RequestTooLarge", e.param,
                            e.code)
        if isinstance(e, PromptError):
            return bad(str(e), "messages", "prompt_too_long" if "context" in str(e) else "invalid_prompt")
        if isinstance(e, (PllavaError, ValueError)):
            return bad(str(e))
        log.exception("internal error")
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "InternalServerError", None, "internal")

    def run_model(job: Job, frames, cancel: threading.Event, on_piece=None):
        """Under the model lock: alpha, then generation. Returns (text, n_tokens, n_prompt, finish, timings)."""
        with sched().model_lock:
            if cancel.is_set():
                return "", 0, 0, "cancelled", {}
            engine.set_lora_alpha(job.lora_alpha)
            timings: dict = {}
            kw = dict(max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p, stop=job.stop,
                      seed=job.seed, cancel=cancel, video_key=job.video_key)
            if on_piece is None:
                out = engine.generate(frames, job.turns, system=job.system, **kw)
                metrics.generation(out.timings, len(out.token_ids))
                return out.text, len(out.token_ids), out.num_prompt_tokens, out.finish_reason, out.timings
            pieces = []
            for piece in engine.stream(frames, job.turns, system=job.system, timings=timings, **kw):
                pieces.append(piece)
                on_piece(piece)
            n_tok = timings.get("decode_tokens", 0)
            metrics.generation(timings, n_tok)
            finish = timings.get("_finish", "length")
            public = {k: v for k, v in timings.items() if not k.startswith("_")}  # _text/_finish are internal
            return "".join(pieces), n_tok, timings.get("num_prompt_tokens", 0), finish, public

    async def until_disconnect(request: Request, cancel: threading.Event, coro):
        """Await `coro`; if the client disconnects meanwhile, set `cancel` so generation stops at the next token."""
        task = asyncio.ensure_future(coro)
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            if not task.done() and await request.is_disconnected():
                cancel.set()
                metrics.error("client_disconnected")
        return task.result()

    async def run_blocking(request: Request, job: Job):
        """Admit, wait for a slot, fetch + decode the media in a thread, generate under the model lock; a client
        that disconnects meanwhile cancels the generation. -> (text, n_tokens, n_prompt, finish, timings)."""
        sched().admit()
        cancel = threading.Event()
        try:
            async with sched().sem:
                sched().running += 1
                try:
                    frames, t_media = await asyncio.to_thread(load_media_timed, job, cfg, engine)
                    res = await until_disconnect(request, cancel, asyncio.to_thread(run_model, job, frames, cancel))
                    res[4]["media"] = t_media
                    return res
                finally:
                    sched().running -= 1
        except Exception as e:  # noqa: BLE001 - mapped to a typed API error (500 only for real bugs)
            raise to_api(e) from e
        finally:
            cancel.set()
            sched().release()

    def finish_reason(f: str) -> str:
        return {"stop": "stop", "length": "length"}.get(f, "stop")

    @app.get("/health")
    async def health():
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": cfg.model_name}

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": 0,
                                            "owned_by": "pllava-engine", "max_model_len":
                                            engine.config.text.max_position_embeddings}]}

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.render(sched()), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        auth(request)
        body = await body_json(request)
        job = parse_chat(body, cfg)
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        model = body.get("model") or cfg.model_name
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not stream:
            text, n_tok, n_prompt, fin, timings = await run_blocking(request, job)
            metrics.request("/v1/chat/completions", 200)
            return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish_reason(fin)}],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_tok, "total_tokens": n_prompt + n_tok},
                    "pllava": {"timings": timings}}

        def chunk(delta: dict, fin=None, usage=None, extra=None) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [] if usage is not None and delta is None else
                 [{"index": 0, "delta": delta, "finish_reason": fin}]}
            if usage is not None:
                c["usage"] = usage
            if extra:
                c.update(extra)
            return f"data: {json.dumps(c)}\n\n"

        sched().admit()
        cancel = threading.Event()

        async def events():
            loop = asyncio.get_running_loop()
            q: asyncio.Queue = asyncio.Queue()
            done = object()
            res = None
            try:
                async with sched().sem:
                    sched().running += 1
                    try:
                        # a media error here leaves the first __anext__ and is answered with its 4xx status
                        frames, t_media = await asyncio.to_thread(load_media_timed, job, cfg, engine)
                        if job.return_frames:
                            yield f"event: frames\ndata: {json.dumps({'frames': thumbnails(frames)})}\n\n"
                        yield chunk({"role": "assistant", "content": ""})

                        def work():
                            try:
                                out = run_model(job, frames, cancel,
                                                lambda p: loop.call_soon_threadsafe(q.put_nowait, p))
                                loop.call_soon_threadsafe(q.put_nowait, (done, out))
                            except Exception as e:  # noqa: BLE001 - handed to the event loop
                                loop.call_soon_threadsafe(q.put_nowait, (done, e))

                        try:
                            worker = asyncio.create_task(asyncio.to_thread(work))
                            while True:
                                item = await q.get()
                                if isinstance(item, tuple) and item and item[0] is done:
                                    res = item[1]
                                    break
                                yield chunk({"content": item})
                            await worker
                            if isinstance(res, Exception):
                                raise res
                        except asyncio.CancelledError:  # the client went away: stop generating, free the slot
                            cancel.set()
                            metrics.error("client_disconnected")
                            raise
                        except Exception as e:  # noqa: BLE001 - reported in-band once streaming has started
                            res = None
                            err = to_api(e)
                            metrics.error(err.code or str(err.status))
                            metrics.request("/v1/chat/completions", err.status)
                            yield f"data: {json.dumps(err.body())}\n\n"
                    finally:
                        sched().running -= 1
                if res is not None:
                    text, n_tok, n_prompt, fin, timings = res
                    timings["media"] = t_media
                    yield chunk({}, finish_reason(fin))
                    if include_usage:
                        yield chunk(None, usage={"prompt_tokens": n_prompt, "completion_tokens": n_tok,
                                                 "total_tokens": n_prompt + n_tok}, extra={"pllava": {"timings": timings}})
                    metrics.request("/v1/chat/completions", 200)
            finally:
                cancel.set()
                sched().release()
            yield "data: [DONE]\n\n"

        gen = events()
        try:
            first = await gen.__anext__()  # waits for a slot and the media; nothing is sent before this succeeds
        except Exception as e:  # noqa: BLE001 - mapped to a typed API error with its status
            raise to_api(e) from e

        async def body():
            yield first
            async for piece in gen:
                yield piece

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/captions")
    async def captions(request: Request):
        """Multipart upload (field 'file') or JSON {"url": ...}; optional prompt, max_tokens, num_frames, lora_alpha."""
        auth(request)
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            n = request.headers.get("content-length")
            if n is not None and n.isdigit() and int(n) > cfg.max_video_bytes + (1 << 20):
                raise APIError(413, f"upload of {n} bytes exceeds the {cfg.max_video_bytes}-byte limit",
                               "RequestTooLarge", "file", "too_large")
            form = await request.form()
            up = form.get("file")
            if up is None or not hasattr(up, "read"):
                raise bad("multipart field 'file' (the video) is required", "file")
            data = await up.read()
            if len(data) > cfg.max_video_bytes:
                raise APIError(413, f"upload exceeds the {cfg.max_video_bytes}-byte limit", "RequestTooLarge", "file",
                               "too_large")
            fields = {k: form.get(k) for k in ("prompt", "max_tokens", "num_frames", "lora_alpha")
                      if form.get(k) is not None}
            body = {}
            for k, v in fields.items():
                try:
                    body[k] = v if k == "prompt" else (float(v) if k == "lora_alpha" else int(v))
                except ValueError:
                    raise bad(f"'{k}' must be a number, got {v!r}", k) from None
            url = None
        else:
            body = await body_json(request)
            url = body.get("url")
            if not isinstance(url, str) or not url:
                raise bad("'url' is required (or upload the video as multipart field 'file')", "url")
            data = None
        prompt = body.get("prompt") or "Describe the video in details."
        chat_body = {"messages": [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                               {"type": "video_url", "video_url": {"url": url or "-"}}]}],
                     **{k: body[k] for k in ("max_tokens", "num_frames", "lora_alpha") if k in body}}
        job = parse_chat(chat_body, cfg)
        job.media_bytes = data
        text, n_tok, _, _, timings = await run_blocking(request, job)
        metrics.request("/v1/captions", 200)
        return {"caption": text, "num_tokens": n_tok, "timings": timings}

    return app


def _warmup(engine):
    """One tiny generation so the first real request does not pay for lazy initialisation."""
    s = engine.config.vision.image_size
    frames = torch.zeros(1, s, s, 3, dtype=torch.uint8)
    engine.generate(frames, "Describe the video.", max_new_tokens=2)


def serve(engine, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000):
    import uvicorn

    if host not in ("127.0.0.1", "::1", "localhost") and not cfg.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    uvicorn.run(create_app(engine, cfg), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
