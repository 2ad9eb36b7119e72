"""`pllava serve`: an OpenAI-compatible captioning server for one model on one device (FastAPI + uvicorn).

Routes only: parsing and shapes live in pllava.protocol, media fetching in pllava.media, and generation in the
continuous-batching scheduler (pllava.scheduler), which runs in a background thread and serves up to
--max-num-seqs requests in one batch. Requests are admitted into a bounded set (max_concurrency past admission +
max_queue waiting); beyond it the answer is 503 with Retry-After. Media is fetched and decoded in worker threads
(never on the event loop) before a request reaches the scheduler. A client that disconnects sets its request's
cancel event: that request alone stops at the next token and its slot is freed.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.formparsers import MultiPartException

from . import ops
from .generate import StepEvent
from .media import load_media_timed, thumbnails
from .prompt import default_question
from .protocol import (CAPTION_FIELDS, APIError, Job, ServerConfig, bad, check_fields, check_model, finish_reason,
                       logprob_content, model_not_found, parse_chat, parse_json, parse_stream_flags, to_api)
from .sequence import Request as GenRequest

__all__ = ["ServerConfig", "create_app", "serve"]
log = logging.getLogger("pllava.server")
STATIC = os.path.join(os.path.dirname(__file__), "static")
_DONE = object()


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

    def render(self, sched: "Admission", batch) -> str:
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
        if batch is not None:
            steps = max(1, batch.decode_steps)
            out += ["# HELP pllava_batch_running Requests in the batch (decoding or being prefilled).",
                    "# TYPE pllava_batch_running gauge", f"pllava_batch_running {batch.num_running}",
                    "# HELP pllava_batch_waiting Requests waiting for a KV slot.", "# TYPE pllava_batch_waiting gauge",
                    f"pllava_batch_waiting {batch.num_waiting}",
                    "# HELP pllava_batch_size_mean Mean rows per decode step.", "# TYPE pllava_batch_size_mean gauge",
                    f"pllava_batch_size_mean {batch.decode_rows / steps:.3f}",
                    "# HELP pllava_batch_tokens_total Tokens the scheduler generated (cancelled requests included).",
                    "# TYPE pllava_batch_tokens_total counter", f"pllava_batch_tokens_total {batch.tokens_out}",
                    "# HELP pllava_batch_slots KV slots.", "# TYPE pllava_batch_slots gauge",
                    f"pllava_batch_slots {batch.plan.num_slots}",
                    "# HELP pllava_batch_tokens_per_second Tokens generated per second of decode steps.",
                    "# TYPE pllava_batch_tokens_per_second gauge",
                    f"pllava_batch_tokens_per_second {batch.decode_rows / batch.decode_seconds if batch.decode_seconds else 0:.3f}"]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- admission
class Admission:
    """At most max_concurrency requests are past admission (fetching media or in the batch) and max_queue wait."""

    def __init__(self, max_concurrency: int, max_queue: int):
        self.capacity = max_concurrency + max_queue
        self.admitted = 0
        self.running = 0
        self.sem = asyncio.Semaphore(max_concurrency)

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


# ---------------------------------------------------------------------------------------------- the app
def create_app(engine, cfg: ServerConfig, on_ready=None) -> FastAPI:
    from contextlib import asynccontextmanager

    metrics = Metrics()
    state = {"ready": False, "adm": None, "batch": None}
    created_at = int(time.time())  # the served model's `created`: when this server loaded it

    @asynccontextmanager
    async def lifespan(_app):
        adm = state["adm"] = Admission(cfg.max_concurrency or cfg.max_num_seqs, cfg.max_queue)
        # one media thread per admitted request: a slow fetch never waits for a thread another slow fetch holds
        state["media_pool"] = ThreadPoolExecutor(max(1, adm.capacity), thread_name_prefix="pllava-fetch",
                                                 initializer=ops.helper_thread_init)
        # on the CPU the scheduler's thread should be the only live one to have run a parallel op (ops.
        # in_fresh_thread; the scheduler zeroes its slot cache on a thread that ends): the event loop's helper
        # threads (tokenizing in submit) keep to one OpenMP thread
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(thread_name_prefix="pllava-loop",
                                                                            initializer=ops.helper_thread_init))
        batch = engine.scheduler(max_num_seqs=cfg.max_num_seqs, max_seq_len=cfg.max_model_len,
                                 prefill_chunk=cfg.prefill_chunk)
        batch.start()
        state["batch"] = batch
        await asyncio.to_thread(_warmup, engine, batch)
        state["ready"] = True
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            batch.stop()
            state["media_pool"].shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="pllava-engine", version="0.1.0", lifespan=lifespan)

    def sched() -> Admission:
        return state["adm"]

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        metrics.error(e.code or str(e.status))
        metrics.request(request.url.path, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        """A bug in a route: logged with its traceback (to_api), answered as a 500 in the same error shape."""
        return await _api_error(request, to_api(e))

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
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body without Content-Length is cut as it arrives
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", "RequestTooLarge", None,
                               "too_large")
            chunks.append(chunk)
        # in a thread: a body near the limit (a 200 MB data URL) took 0.67 s to parse, every other client waiting
        return await asyncio.to_thread(parse_json, b"".join(chunks))

    async def model_stream(job: Job, frames, cancel: threading.Event, choice: int = 0, events: bool = True):
        """Submit to the batch scheduler; yield its StepEvents as they are generated (those with text; all of them
        when the job wants logprobs; none with events=False, for an answer sent whole), then the GenerationOutput.
        Closing this generator early (the client went away) cancels this request alone. `choice` i of n gets
        seed + i (a seeded request's n choices are reproducible and differ when sampled)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        seed = None if job.seed is None else (job.seed + choice) % (2 ** 63)
        req = GenRequest(video=frames, prompt=job.turns, system=job.system, seed=seed, video_key=job.video_key,
                         lora_alpha=job.lora_alpha, cancel=cancel, **job.sampling())
        lps = job.logprobs is not None  # then every token's event goes out (its logprob), text or not
        # a whole answer reads the output alone: no event crosses to the loop (one call_soon_threadsafe a token)
        on_event = None if not events else lambda _s, ev: (ev.text or lps) and loop.call_soon_threadsafe(
            q.put_nowait, ev)
        # in a thread: submit tokenizes the prompt, which must not hold the event loop (every other client's)
        seq = await asyncio.to_thread(
            state["batch"].submit, req,
            on_event=on_event,
            on_done=lambda _s: loop.call_soon_threadsafe(q.put_nowait, _DONE))
        try:
            while (item := await q.get()) is not _DONE:
                yield item
        finally:
            if not seq.done.is_set():
                cancel.set()
        out = seq.output
        if seq.error is not None:
            raise seq.error
        metrics.generation(out.timings, len(out.token_ids))
        yield out

    def fetch_media(job: Job, cancel: threading.Event):
        """Fetch + decode in the media pool, before the request takes a place in the batch: a slow download
        holds a media thread (until the fetch deadline, or its client leaves), never the model or the event loop."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(state["media_pool"], load_media_timed, job, cfg, engine, cancel)

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
        """Admit, wait for a slot, fetch + decode the media in a thread (once), generate its job.n choices in the
        batch; a client that disconnects meanwhile cancels them. -> [(text, n_tokens, n_prompt, finish, timings)]
        one per choice, with its TokenLogprobs (None unless asked)."""
        sched().admit()
        cancel = threading.Event()

        async def collect(i):
            async for item in model_stream(job, frames, cancel, i, events=False):
                if not isinstance(item, StepEvent):
                    return item
            raise RuntimeError("the scheduler ended a request without an output")

        try:
            sched().running += 1
            try:
                frames, t_media = await until_disconnect(request, cancel, fetch_media(job, cancel))
                async with sched().sem:
                    outs = await until_disconnect(request, cancel,
                                                  asyncio.gather(*(collect(i) for i in range(job.n))))
                return [(o.text, len(o.token_ids), o.num_prompt_tokens, o.finish_reason, dict(o.timings, media=t_media),
                         o.logprobs) for o in outs]
            finally:
                sched().running -= 1
        except Exception as e:  # noqa: BLE001 - mapped to a typed API error (500 only for real bugs)
            raise to_api(e) from e
        finally:
            cancel.set()
            sched().release()

    @app.get("/health")
    async def health():
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok", "model": cfg.model_name}

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": created_at, "owned_by": "pllava-engine",
                "max_model_len": engine.config.text.max_position_embeddings}

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):  # client.models.retrieve
        auth(request)
        if model_id != cfg.model_name:
            raise model_not_found(model_id)
        return model_card()

    @app.get("/metrics")
    async def prom():
        return PlainTextResponse(metrics.render(sched(), state["batch"]), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        auth(request)
        body = await body_json(request)
        if isinstance(body, dict):
            check_model(body, cfg.model_name)
        job = parse_chat(body, cfg)
        stream, include_usage = parse_stream_flags(body)
        model = cfg.model_name
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not stream:
            outs = await run_blocking(request, job)
            metrics.request("/v1/chat/completions", 200)
            n_prompt, n_tok = outs[0][2], sum(o[1] for o in outs)
            return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                 "logprobs": None if lps is None else {"content": logprob_content(lps, engine.token_bytes)},
                                 "finish_reason": finish_reason(fin)} for i, (text, _, _, fin, _, lps) in enumerate(outs)],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_tok, "total_tokens": n_prompt + n_tok},
                    "pllava": {"timings": outs[0][4]} if len(outs) == 1 else
                    {"timings": outs[0][4], "choices_timings": [o[4] for o in outs]}}

        def chunk(delta: dict, fin=None, usage=None, extra=None, lps=None) -> str:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [] if usage is not None and delta is None else
                 [{"index": 0, "delta": delta, "finish_reason": fin}]}
            if job.logprobs is not None and c["choices"]:
                c["choices"][0]["logprobs"] = None if lps is None else {
                    "content": logprob_content(lps, engine.token_bytes)}
            if usage is not None:
                c["usage"] = usage
            if extra:
                c.update(extra)
            return f"data: {json.dumps(c)}\n\n"

        sched().admit()
        cancel = threading.Event()

        async def events():
            res = None
            try:
                sched().running += 1
                try:
                    # a media error here leaves the first __anext__ and is answered with its 4xx status
                    frames, t_media = await until_disconnect(request, cancel, fetch_media(job, cancel))
                    if job.return_frames and frames is not None:
                        yield f"event: frames\ndata: {json.dumps({'frames': thumbnails(frames)})}\n\n"
                    yield chunk({"role": "assistant", "content": ""})
                    async with sched().sem:
                        gen = model_stream(job, frames, cancel)
                        pending = []  # logprobs of tokens whose text is not out yet (held back, or none)
                        try:
                            async for item in gen:
                                if isinstance(item, StepEvent):
                                    if item.logprob is not None:
                                        pending.append(item.logprob)
                                    if item.text:
                                        yield chunk({"content": item.text}, lps=pending)
                                        pending = []
                                else:
                                    res = item
                        except (asyncio.CancelledError, GeneratorExit):  # the client went away: stop this request
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
                            await gen.aclose()
                finally:
                    sched().running -= 1
                if res is not None:
                    timings = dict(res.timings, media=t_media)
                    n_tok, n_prompt = len(res.token_ids), res.num_prompt_tokens
                    yield chunk({}, finish_reason(res.finish_reason), lps=pending)
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
            try:
                form = await request.form()
            except (MultiPartException, ValueError, KeyError) as e:
                raise bad(f"malformed multipart body: {e}", "file") from None
            up = form.get("file")
            if up is None or not hasattr(up, "read"):
                raise bad("multipart field 'file' (the video) is required", "file")
            data = await up.read()
            if len(data) > cfg.max_video_bytes:
                raise APIError(413, f"upload exceeds the {cfg.max_video_bytes}-byte limit", "RequestTooLarge", "file",
                               "too_large")
            check_fields({k: form.get(k) for k in form.keys() if k != "file"}, CAPTION_FIELDS)
            fields = {k: form.get(k) for k in ("prompt", "max_tokens", "num_frames", "lora_alpha")
                      if form.get(k) is not None}
            body = {}
            for k, v in fields.items():
                if not isinstance(v, str):  # a file part where a plain field belongs
                    raise bad(f"multipart field '{k}' must be a plain form field, not a file", k)
                try:
                    body[k] = v if k == "prompt" else (float(v) if k == "lora_alpha" else int(v))
                except ValueError:
                    raise bad(f"'{k}' must be {'a number' if k == 'lora_alpha' else 'an integer'}, got {v!r:.40}",
                              k) from None
            url = None
        else:
            body = await body_json(request)
            if not isinstance(body, dict):
                raise bad("the request body must be a JSON object (or a multipart upload with field 'file')")
            check_fields(body, CAPTION_FIELDS)
            check_model(body, cfg.model_name)
            url = body.get("url")
            if not isinstance(url, str) or not url:
                raise bad("'url' is required (or upload the video as multipart field 'file')", "url")
            data = None
        prompt = body.get("prompt") or default_question(engine.conv_mode)  # a recipe's own query (recaption)
        chat_body = {"messages": [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                               {"type": "video_url", "video_url": {"url": url or "-"}}]}],
                     **{k: body[k] for k in ("max_tokens", "num_frames", "lora_alpha") if k in body}}
        job = parse_chat(chat_body, cfg)
        job.media_bytes = data
        text, n_tok, _, _, timings, _ = (await run_blocking(request, job))[0]
        metrics.request("/v1/captions", 200)
        return {"caption": text, "num_tokens": n_tok, "timings": timings}

    return app


def _warmup(engine, batch):
    """One tiny generation through the batch so the first real request does not pay for lazy initialisation."""
    sz = engine.config.vision.image_size
    seq = batch.submit(GenRequest(video=torch.zeros(1, sz, sz, 3, dtype=torch.uint8), prompt="Describe the video.",
                                  max_new_tokens=2))
    seq.done.wait()
    if seq.error is not None:
        raise seq.error


def serve(engine, cfg: ServerConfig, host: str = "127.0.0.1", port: int = 8000):
    import uvicorn

    if host not in ("127.0.0.1", "::1", "localhost") and not cfg.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use the model", host)
    shown = f"[{host}]" if ":" in host else host

    def ready():  # after load and warm-up: the address answers from now on
        print(f"serving {cfg.model_name} at http://{shown}:{port} (page at /)", file=sys.stderr, flush=True)

    uvicorn.run(create_app(engine, cfg, ready), host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
