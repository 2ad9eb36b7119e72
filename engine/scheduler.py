"""Continuous batching: one scheduler owns admission, KV slots, and the interleaving of prefill and decode.

`Engine.generate_many` drives it synchronously (`run`); the server runs it in a background thread (`start` +
`submit`). Each iteration (`step`):
  1. admit the oldest waiting request into a free slot (one at a time): its clip, decoded and preprocessed ahead
     by media workers, goes through the vision tower and projector now, between decode steps;
  2. prefill one chunk of the request being admitted (the whole prompt unless `prefill_chunk` is set);
  3. one batched decode step over every running request: one token each, each at its own position of its own
     slot, each with its own LoRA scale, sampler, stop rules and cancel event.
Requests join and leave the batch at step boundaries. A request waits while every slot is busy; one that can
never fit a slot is refused when added, with the numbers.

Slots remember the video prefix they hold (clip, prompt head, frame sampling, alpha): a follow-up question
about a clip prefills only the question, in the same slot when it is free, else after copying the prefix over.

A request and its validation: sequence.py. How many slots fit the memory: slots.py.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout  # the builtin TimeoutError from 3.11 on
from dataclasses import replace

import torch

from . import ops
from .errors import DeviceMemoryError, InputError, MemoryBudgetError, NumericalError, PllavaError, error_line
from .generate import GenerationOutput, SequenceState, StopRequested, greedy_rows
from .batch_graphs import BatchDecodeGraphs
from .model.llm import SlotKVCache, SlotRows
from .prompt import splice, text_ids
from .sequence import Request, Sequence, prepare_sequence
from .slots import plan_slots

log = logging.getLogger("pllava")


def _device_memory_error(s: Sequence, stage: str, err: BaseException) -> DeviceMemoryError:
    """A typed error for a request whose `stage` ran out of device memory, logged: it alone ends (Scheduler._fail
    frees its slot; a prefix it was writing is not marked reusable) and the batch goes on. The torch error is not
    chained: its traceback's frames hold the failed step's tensors, which must be freed now, not when the
    request's error is dropped (a server's client may read it late)."""
    e = DeviceMemoryError.of(stage, err, "this request alone ended, the others go on: retry when the load is "
                             "lower, or lower --max-num-seqs, the frames or the prompt")
    log.warning("%s: %s", s.where, e)
    return e


class _MediaFailure(Exception):
    """Carries an untyped error of one request's media worker out of Scheduler._pixels (see there)."""

    def __init__(self, err: Exception):
        super().__init__(str(err))
        self.err = err


class Scheduler:
    """Continuous batching over `max_num_seqs` KV slots (fewer when the memory budget says so)."""

    def __init__(self, engine, max_num_seqs: int = 8, max_seq_len: int | None = None,
                 kv_cache_bytes: int | None = None, prefill_chunk: int | None = None, media_workers: int = 2):
        self.engine = engine
        lm = engine.model.language_model
        ctx = engine.config.text.max_position_embeddings
        slot_len = ctx if max_seq_len is None else int(max_seq_len)
        if not 1 < slot_len <= ctx:
            raise InputError(f"max_seq_len must be in [2, {ctx}] (the model's context), got {max_seq_len!r}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise InputError(f"prefill_chunk must be an integer >= 1 or None, got {prefill_chunk!r}")
        lm.free_cache()  # generate()'s single-sequence cache: allocated again if generate() runs later
        engine._prefix = None
        # the cache in generate()'s dtype: fp32 under bf16/fp16 weights on the CPU (Engine.kv_dtype), as fast to
        # attend there and without rounding K and V; the plan counts its bytes
        self.plan = plan_slots(engine.config.text, engine.kv_dtype, engine.device, max_num_seqs, slot_len,
                               kv_cache_bytes)
        # the slots are zeroed by parallel ops: on the CPU on a thread that ends, not on the caller's, which may
        # not be the one that decodes (start() runs the loop on its own thread; ops.in_fresh_thread)
        alloc = ops.in_fresh_thread if engine.device.type == "cpu" else (lambda f, *a: f(*a))
        self.cache = alloc(SlotKVCache, engine.config.text, self.plan.num_slots, slot_len, engine.kv_dtype,
                           engine.device)
        self.prefill_chunk = prefill_chunk
        attn_path = lm.layers[0].self_attn.kernel_path
        self.graphs = None
        if engine.cuda_graphs:
            if engine.device.type != "cuda" or attn_path != "triton":
                raise InputError("cuda_graphs for batched decode need a CUDA device and the Triton kernels "
                                 f"(device {engine.device}, kernel path {attn_path})")
            self.graphs = BatchDecodeGraphs(lm, self.cache, engine.device)
        n = self.plan.num_slots
        self.asked = max_num_seqs
        self.limit = n  # the most requests in flight (generate_many's max_batch_size may ask fewer than n)
        self.owner: list[Sequence | None] = [None] * n
        self.prefix: list[tuple | None] = [None] * n  # (key, n_pre) of the video prefix each slot holds
        self.last_used = [0] * n
        self.tick = 0
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.prefilling: Sequence | None = None
        self.running: list[Sequence] = []
        self.media_workers = media_workers
        self.pool = ThreadPoolExecutor(max(1, media_workers), thread_name_prefix="pllava-media",
                                       initializer=ops.helper_thread_init)
        self.prefetch_depth = max(2, 2 * media_workers)
        self.lock = threading.Condition()
        self.inbox: list[Sequence] = []
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.decode_rows = self.decode_steps = self.tokens_out = 0
        self.decode_seconds = self.model_wait_s = 0.0
        log.info("pllava scheduler: %d slots x %d positions (%.1f MiB of KV; budget %s), prefill chunk %s; "
                 "decode attention: %s; decode steps: %s", n, slot_len,
                 n * slot_len * self.plan.bytes_per_token / 2**20, self.plan.budget_source, prefill_chunk or "whole",
                 "Triton slot kernel" if attn_path == "triton" else "torch SDPA per row over its used positions",
                 "CUDA graph replay per batch bucket" if self.graphs is not None else "eager")

    # ------------------------------------------------------------------------------------------ intake
    def make_sequence(self, req: Request, index=None, on_event=None, on_done=None) -> Sequence:
        """Validate a request into a Sequence that fits this scheduler's slots; not yet queued."""
        return self.fit(prepare_sequence(self.engine, req, index, on_event, on_done))

    def fit(self, seq: Sequence) -> Sequence:
        """A request that can never fit a slot fails here with the numbers; one longer than the context has its
        max_new_tokens cut to fit (as generate() does)."""
        ctx, slot_len = self.engine.config.text.max_position_embeddings, self.plan.slot_len
        where = seq.where
        n_prompt, n_new = seq.n_prompt, seq.params.max_new_tokens
        if n_prompt + 1 > slot_len:
            raise MemoryBudgetError(f"{where}: the prompt is {n_prompt} tokens "
                                    f"({self.engine.config.num_visual_tokens} visual) but a KV slot holds "
                                    f"{slot_len} positions")
        if n_prompt + n_new > slot_len:
            if slot_len < ctx:
                raise MemoryBudgetError(
                    f"{where}: {n_prompt} prompt tokens + max_new_tokens {n_new} = {n_prompt + n_new} positions, "
                    f"but a KV slot holds {slot_len} (max_seq_len; the model's context is {ctx})")
            log.warning("%s: max_new_tokens %d cut to %d to fit the %d-token context", where, n_new, ctx - n_prompt,
                        ctx)
            seq.params = replace(seq.params, max_new_tokens=ctx - n_prompt)
        return seq

    def add(self, seq: Sequence):
        """Queue a validated sequence (from the thread that drives `step`)."""
        seq.t_add = self.engine._clock()
        self.waiting.append(seq)

    def submit(self, req: Request, on_event=None, on_done=None) -> Sequence:
        """Thread-safe: validate and queue for the background loop (`start`). Raises typed errors at once."""
        seq = self.make_sequence(req, None, on_event, on_done)
        with self.lock:
            if self.stopping:
                raise RuntimeError("the scheduler is stopped")
            self.inbox.append(seq)
            self.lock.notify()
        return seq

    # ------------------------------------------------------------------------------------------ state
    @property
    def num_running(self) -> int:
        return len(self.running) + (self.prefilling is not None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.inbox)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling is not None or self.inbox)

    def inherit_prefixes(self, old: "Scheduler"):
        """Copy the video prefixes an outgrown scheduler's slots hold (most recently used first) into this one's."""
        held = sorted((i for i, p in enumerate(old.prefix) if p is not None and p[1] <= self.plan.slot_len),
                      key=lambda i: -old.last_used[i])
        for dst, src in enumerate(held[:self.plan.num_slots]):
            self.cache.copy_prefix(src, dst, old.prefix[src][1], old.cache)
            self.prefix[dst] = old.prefix[src]

    def clear_prefixes(self):
        """Forget every cached video prefix (the weights or the frame sampling changed), and the captured
        decode graphs (they hold the old weight tensors)."""
        self.prefix = [None] * self.plan.num_slots
        if self.graphs is not None:
            self.graphs.graphs.clear()

    # ------------------------------------------------------------------------------------------ the loop
    def step(self):
        """One iteration: admit + prefill (a chunk of) one request, then one decode step over the batch."""
        self._reap_cancelled()
        self._prefetch()
        if self.prefilling is None:
            self._admit()
        if self.prefilling is not None:
            self._prefill_chunk()
        if self.running:
            self._decode()

    def run(self, seqs: list[Sequence], progress=None):
        """Drive the loop in this thread until every one of `seqs` is done. If a step raises (or the caller is
        interrupted), every request in the scheduler ends with that error before it propagates."""
        for s in seqs:
            self.add(s)
        try:
            while any(not s.done.is_set() for s in seqs):
                if ops.abandoned():  # on a CPU engine's model thread, and its caller stopped waiting (Ctrl-C)
                    raise ops.Abandoned("generate_many: its caller stopped waiting")
                before = sum(s.done.is_set() for s in seqs)
                self.step()
                if progress is not None:
                    progress.update(sum(s.done.is_set() for s in seqs) - before)
        except BaseException as err:
            self.abort_all(err)
            raise

    def _prefetch(self):
        """Start decoding + preprocessing the clips of the next few waiting requests in media workers."""
        held = {p[0] for p in self.prefix if p is not None}
        if self.prefilling is not None and self.prefilling.key is not None:
            held.add(self.prefilling.key)
        pending = 0
        for s in self.waiting:
            if pending >= self.prefetch_depth:
                break
            if s.future is not None:
                pending += 1
                continue
            if s.key is not None and s.key in held:
                continue  # likely a prefix-cache hit: its clip need not be decoded at all
            if s.img_pos is None:
                continue  # text only: nothing to decode
            if s.key is not None:
                held.add(s.key)  # a later request on the same clip waits for this one's prefix
            s.future = self.pool.submit(self.engine.pixels, s.req.video, s.pixel_timings)
            pending += 1

    def _free_slot(self) -> int | None:
        free = [i for i, o in enumerate(self.owner) if o is None]
        if not free:
            return None
        return min(free, key=lambda i: (self.prefix[i] is not None, self.last_used[i]))  # empty, then LRU

    def _admit(self):
        e = self.engine
        lm = e.model.language_model
        while self.waiting and self.prefilling is None:
            if sum(o is not None for o in self.owner) >= min(self.limit, len(self.owner)):
                return  # every slot (or the batch limit) taken: the request waits
            s = self.waiting.popleft()
            if s.req.cancel is not None and s.req.cancel.is_set():
                self._finish(s, "cancelled")
                continue
            t0 = e._clock()
            s.timings["queue"] = t0 - s.t_add
            want = (s.key, s.n_pre) if s.key is not None else None
            hit = next((i for i, p in enumerate(self.prefix) if want is not None and p == want), None)
            if hit is not None and self.owner[hit] is None:
                slot = hit
            else:
                slot = self._free_slot()
                if hit is not None:
                    self.cache.copy_prefix(hit, slot, s.n_pre)  # the prefix's slot is busy: copy, then reuse
            self._take(s, slot)
            try:
                if hit is not None:
                    s.timings["prefix_cache_hit"] = 1
                    if s.future is not None:
                        s.future.cancel()
                    s.start, s.embeds = s.n_pre, lm.embed(s.ids[s.img_pos + 1:].to(e.device)).unsqueeze(0)
                    self.prefix[slot] = want
                elif s.img_pos is None:
                    self.prefix[slot] = None
                    s.start, s.embeds = 0, lm.embed(s.ids.to(e.device)).unsqueeze(0)
                else:
                    self.prefix[slot] = None  # overwritten from position 0
                    if s.future is None:
                        s.future = self.pool.submit(e.pixels, s.req.video, s.pixel_timings)
                    px = self._pixels(s)
                    s.timings.update(s.pixel_timings)
                    vis = e.encode(px, s.timings, overlap=False, stop=s.stop)
                    s.start = 0
                    s.embeds = splice(lm.embed(s.ids.to(e.device)), s.img_pos, vis).unsqueeze(0)
            except StopRequested:  # cancelled while its clip decoded or went through the vision tower
                if s.future is not None:
                    s.future.cancel()
                s.future = None
                self._finish(s, "cancelled")
                continue
            except (PllavaError, OSError, _MediaFailure) as err:  # this request's media failed: it alone ends
                s.future = None
                self._fail(s, err.err if isinstance(err, _MediaFailure) else err)
                continue
            except BaseException as err:  # a bug (or Ctrl-C) mid-admission: this request ends too, then re-raise
                if ops.out_of_memory(err):  # its clip's vision tower did not fit: it alone ends
                    s.future = None
                    self._fail(s, _device_memory_error(s, "the vision tower and projector", err))
                    continue
                self._fail(s, err)
                raise
            s.future = None
            s.state = SequenceState(s.params, e.tokenizer, e.eos_ids, text_ids(s.ids, s.img_pos), e.device,
                                    s.req.cancel)
            s.prefilled = 0
            s.timings["prefill"] = 0.0
            self.prefilling = s

    def _pixels(self, s: Sequence):
        """The request's pixels from its media worker (the model waits here only when decoding is slower than it).
        Whatever that raised is the request's own: a worker touches nothing another request uses, so an untyped
        error (a bug in decoding or preprocessing this clip) ends this request alone, logged with its traceback,
        as a typed one does, rather than the whole batch."""
        tw = time.perf_counter()
        try:
            while True:
                try:
                    return s.future.result(timeout=0.05)
                except FutureTimeout:  # still decoding: a cancel (or Ctrl-C of generate_many) is seen within 50 ms
                    s.stop()
        except (PllavaError, OSError, StopRequested, ops.Abandoned):
            raise
        except Exception as err:  # noqa: BLE001 - re-raised as this request's own failure, logged
            if not ops.out_of_memory(err):
                log.error("%s: its clip failed with an untyped %s (a bug): %s", s.where, type(err).__name__, err,
                          exc_info=err)
                raise _MediaFailure(err) from err
            oom = _device_memory_error(s, "preprocessing its clip", err)  # on the device: it did not fit, no bug
        finally:
            self.model_wait_s += time.perf_counter() - tw
        raise oom  # outside the handler, so it carries no __context__ (whose frames hold the failed step's tensors)

    def _take(self, s: Sequence, slot: int):
        self.tick += 1
        self.owner[slot], self.last_used[slot], s.slot = s, self.tick, slot

    def _prefill_chunk(self):
        """The admitted request's next `prefill_chunk` tokens (or all the rest), never across the end of its video
        prefix: like generate(), a fresh prompt prefills [0, n_pre) and then the rest (prompt.prefix_split), so a
        follow-up question that reuses the prefix gets the same bits; without a chunk size both go in this step."""
        e, s = self.engine, self.prefilling
        lm = e.model.language_model
        t0 = e._clock()
        total = s.embeds.shape[1]
        cut = s.n_pre - s.start  # the prefix's end in s.embeds: <= 0 when it is cached or there is none
        while True:
            a = s.prefilled
            b = total if self.prefill_chunk is None else min(total, a + self.prefill_chunk)
            b = cut if a < cut < b else b
            p0 = s.start + a
            rows = SlotRows([s.slot], [p0], torch.arange(p0, s.start + b, device=e.device)[None],
                            torch.tensor([s.slot], device=e.device),
                            torch.tensor(s.scale, dtype=torch.float32, device=e.device))
            try:
                with torch.no_grad():
                    logits = lm.forward_slots(s.embeds[:, a:b], rows, self.cache, stop=s.stop)
            except StopRequested:  # between two layers: the slot's positions from p0 on are half written
                s.timings["prefill"] += e._clock() - t0
                self._finish(s, "cancelled")  # (frees the slot; a prefix it was writing is not marked reusable)
                return
            except Exception as err:
                if not ops.out_of_memory(err):
                    raise
                s.timings["prefill"] += e._clock() - t0
                self._fail(s, _device_memory_error(s, f"prefill (positions {p0} to {s.start + b} of its slot)", err))
                return
            s.prefilled = b
            if b == total or self.prefill_chunk is not None:
                break
        if b < total:
            s.timings["prefill"] += e._clock() - t0
            return
        s.pos = s.start + total
        s.embeds = None
        self.prefilling = None
        tok = self._sample(s, logits[0, -1])
        s.timings["prefill"] += e._clock() - t0
        if tok is None:
            self._fail(s, s.error)  # its slot's prefix is not marked reusable: NaN came out of it
            return
        if s.key is not None:
            self.prefix[s.slot] = (s.key, s.n_pre)  # positions [0, n_pre) now hold this clip's prefix
        self.running.append(s)
        self._emit(s, tok)

    def _decode(self):
        e = self.engine
        lm = e.model.language_model
        rows_seqs = list(self.running)
        dev = e.device
        t0 = time.perf_counter()
        if self.graphs is not None:
            logits = self.graphs([s.last for s in rows_seqs], [s.slot for s in rows_seqs],
                                 [s.pos for s in rows_seqs], [s.scale for s in rows_seqs])
        else:
            toks = torch.tensor([[s.last] for s in rows_seqs], device=dev)  # (B, 1)
            rows = SlotRows([s.slot for s in rows_seqs], [s.pos for s in rows_seqs],
                            torch.tensor([[s.pos] for s in rows_seqs], device=dev),
                            torch.tensor([s.slot for s in rows_seqs], device=dev),
                            torch.tensor([s.scale for s in rows_seqs], dtype=torch.float32, device=dev))
            if len(rows_seqs) == 1:
                rows.scale = rows.scale[0]
            with torch.no_grad():
                logits = lm.forward_slots(lm.embed(toks), rows, self.cache)  # (B, 1, V)
        nxt = self._sample_rows(rows_seqs, logits)  # syncs with the device
        self.decode_seconds += time.perf_counter() - t0
        self.decode_rows += len(rows_seqs)
        self.decode_steps += 1
        for s, tok in zip(rows_seqs, nxt):
            s.pos += 1
            if tok is None:
                self._fail(s, s.error)
            else:
                self._emit(s, tok)

    def _sample_rows(self, rows_seqs: list[Sequence], logits) -> list[int | None]:
        """logits (B, 1, V) -> each row's next token. The plain greedy rows (the captioning job's) take one argmax
        over all of them and one sync, not two syncs and ~5 ops a row; the others sample a row at a time."""
        greedy = [b for b, s in enumerate(rows_seqs) if s.state.plain_greedy]
        if len(greedy) < 2:
            greedy = []
        sel = logits[:, -1] if len(greedy) == len(rows_seqs) else logits[greedy, -1]  # all rows: no copy
        toks = dict(zip(greedy, greedy_rows(sel))) if greedy else {}
        # a row not greedy, or whose best logit is not finite (None): sample() takes it, and says why
        return [toks.get(b) if toks.get(b) is not None else self._sample(s, logits[b, -1])
                for b, s in enumerate(rows_seqs)]

    @staticmethod
    def _sample(s: Sequence, logits) -> int | None:
        """One row's next token; a row whose logits are not finite ends alone (typed), the batch goes on."""
        try:
            return s.state.sample(logits)
        except NumericalError as err:
            s.error = err
            return None

    def _emit(self, s: Sequence, tok: int):
        if s.t_first is None:
            s.t_first = self.engine._clock()
            s.timings["ttft"] = s.t_first - s.t_add
        s.last = tok
        s.tokens.append(tok)
        self.tokens_out += 1
        ev = s.state.accept(tok)
        if s.on_event is not None:
            s.on_event(s, ev)
        if s.state.finish is not None or s.state.cancelled():
            self._finish(s, s.state.finish)

    def _reap_cancelled(self):
        for s in list(self.running):
            if s.state.cancelled():
                self._finish(s, "cancelled")
        s = self.prefilling
        if s is not None and s.req.cancel is not None and s.req.cancel.is_set():
            self._finish(s, "cancelled")  # between two prefill chunks

    def _release(self, s: Sequence):
        if s in self.running:
            self.running.remove(s)
        if self.prefilling is s:
            self.prefilling = None
            if s.start == 0:  # it was writing the slot from position 0: the prefix there is half written
                self.prefix[s.slot] = None
            # else it reused the slot's cached prefix and wrote only past it: [0, n_pre) still holds that prefix
        if s.slot is not None and self.owner[s.slot] is s:
            self.owner[s.slot] = None

    def _finish(self, s: Sequence, reason: str):
        self._release(s)
        now = self.engine._clock()
        if s.t_add is not None:
            s.timings["total"] = now - s.t_add
        if s.t_first is not None:
            s.timings["decode"] = now - s.t_first
        s.timings["decode_tokens"] = len(s.tokens)
        text = s.state.streamer.text if s.state is not None else ""
        s.output = GenerationOutput(text, list(s.tokens), s.n_prompt, s.timings, reason,
                                    error=None if s.error is None else error_line(s.error),
                                    logprobs=None if s.state is None else s.state.logprobs)
        s.done.set()
        if s.on_done is not None:
            s.on_done(s)

    def _fail(self, s: Sequence, err: Exception):
        s.error = err
        self._finish(s, "error")

    def abort_all(self, err: BaseException):
        """End every request in flight or waiting with `err` and free their slots (after a failed step, or when
        the caller of `run` is interrupted): nothing is left to run into the next call."""
        for s in list(self.running) + ([self.prefilling] if self.prefilling is not None else []) + list(self.waiting):
            if not s.done.is_set():
                if s.future is not None:
                    s.future.cancel()
                    s.future = None
                self._fail(s, err)
        self.waiting.clear()

    # ------------------------------------------------------------------------------------------ background
    def start(self):
        """Run the loop in a background thread (the server); `submit` feeds it. On the CPU each step runs on the
        engine's model thread (Engine._on_model), where generate() and stream() run too: one OpenMP team for
        all of them (a second live team costs this 2-core EPYC ~2x a decode step, benchmarks/bench_threads.py),
        and a generate() called beside a started scheduler runs between its steps, never beside one on the
        same modules."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="pllava-scheduler", daemon=True)
            self.thread.start()

    def stop(self):
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self):
        while True:
            with self.lock:
                while not self.inbox and not self.has_work() and not self.stopping:
                    self.lock.wait()
                if self.stopping:
                    pending = list(self.inbox)
                    self.inbox.clear()
                    break
                for s in self.inbox:
                    self.add(s)
                self.inbox.clear()
            if not threading.main_thread().is_alive():  # the interpreter is exiting: the model thread ends too
                pending = []
                break
            try:
                self.engine._on_model(self.step)
            except Exception as err:  # noqa: BLE001 - a bug in a batched step: every request fails, the loop lives
                log.exception("scheduler step failed; failing the %d requests in flight and %d waiting",
                              self.num_running, len(self.waiting))
                self.abort_all(err)
        for s in pending + list(self.waiting) + list(self.running):
            self._fail(s, RuntimeError("the server is shutting down"))
