"""Drivers of the scheduler for a caller's own thread: the kept scheduler of an Engine (grown when too small,
keeping its video prefixes) and the loop of Engine.generate_iter over any iterable of requests."""
from __future__ import annotations

import collections
import logging

from . import ops
from .errors import PllavaError, error_line
from .generate import GenerationOutput
from .scheduler import Scheduler
from .sequence import Request, prepare_sequence, slot_len_for

log = logging.getLogger("pllava")


def engine_scheduler(engine, want: int, slot_len: int, prefill_chunk=None, kv_cache_bytes=None,
                     media_workers: int = 2) -> Scheduler:
    """The scheduler the engine keeps for generate_many / generate_iter: reused while it fits, else replaced by
    a bigger one that inherits the video prefixes its slots held."""
    sched = engine._sched
    if (sched is None or sched.plan.slot_len < slot_len or sched.prefill_chunk != prefill_chunk
            or (sched.graphs is not None) != bool(engine.cuda_graphs) or sched.media_workers != media_workers
            or sched.plan.num_slots < want and sched.asked < want or kv_cache_bytes is not None):
        old, engine._sched = sched, None
        if old is not None:
            old.stop()
        sched = Scheduler(engine, want, slot_len, kv_cache_bytes, prefill_chunk, media_workers)
        if old is not None:
            sched.inherit_prefixes(old)
            del old
        engine._sched = sched
    return sched


def _error_output(err: Exception):
    return GenerationOutput("", [], 0, {}, "error", error=error_line(err))


def iter_outputs(engine, requests, max_batch_size: int = 16, *, max_seq_len=None, prefill_chunk=None,
                 kv_cache_bytes=None, media_workers: int = 2, stats: dict | None = None):
    """The loop of Engine.generate_iter: (index, GenerationOutput) in completion order."""
    it = enumerate(iter(requests))
    lookahead = max(2 * max_batch_size, 8)  # requests held (validated, clip decoding ahead) beyond the batch
    first = []
    for _ in range(lookahead):
        nxt = next(it, None)
        if nxt is None:
            break
        first.append(nxt)
    if not first:
        return
    ready: collections.deque = collections.deque()  # requests that failed validation, yielded in turn
    finished: collections.deque = collections.deque()
    on_done = finished.append

    def prepare(i, r):  # validated and tokenized once; None when invalid (its error output is queued)
        try:
            return prepare_sequence(engine, Request.coerce(r, f"requests[{i}]"), i, on_done=on_done)
        except PllavaError as err:
            ready.append((i, _error_output(err)))
            return None

    prepared = [s for s in (prepare(i, r) for i, r in first) if s is not None]
    ctx = engine.config.text.max_position_embeddings
    slot_len = max_seq_len or (slot_len_for(engine, prepared) if prepared else ctx)
    sched = engine_scheduler(engine, max_batch_size, slot_len, prefill_chunk, kv_cache_bytes, media_workers)
    sched.limit = max_batch_size
    pending = 0
    queued = iter(prepared)
    held = None  # a later request longer than the slots sized from the first ones: it waits for the batch to drain
    start = _counters(sched)
    totals = dict.fromkeys(start, 0)  # this call's counters (a kept scheduler's own run on across calls)

    def feed():
        nonlocal pending, held
        while held is None and len(sched.waiting) < lookahead:
            seq = next(queued, None)
            if seq is None:
                nxt = next(it, None)
                if nxt is None:
                    return
                seq = prepare(*nxt)
                if seq is None:
                    continue
            if max_seq_len is None and sched.plan.slot_len < min(ctx, seq.n_prompt + seq.params.max_new_tokens):
                held = seq  # no more requests join until it runs: the drain it waits for is bounded
                return
            try:
                sched.add(sched.fit(seq))
            except PllavaError as err:
                ready.append((seq.index, _error_output(err)))
                continue
            pending += 1

    def grow():
        """The batch has drained: a scheduler with slots long enough for `held` (engine_scheduler keeps the video
        prefixes), and `held` queued on it."""
        nonlocal sched, start, held, pending
        for k, v in _counters(sched).items():
            totals[k] += v - start[k]
        old_len, need = sched.plan.slot_len, held.n_prompt + held.params.max_new_tokens
        sched = engine_scheduler(engine, max_batch_size, slot_len_for(engine, [held]), prefill_chunk,
                                 kv_cache_bytes, media_workers)
        sched.limit = max_batch_size
        start = _counters(sched)
        log.info("generate_iter: requests[%d] needs %d positions; KV slots grown from %d to %d (%d slots)",
                 held.index, need, old_len, sched.plan.slot_len, sched.plan.num_slots)
        seq, held = held, None
        try:
            sched.add(sched.fit(seq))
            pending += 1
        except PllavaError as err:
            ready.append((seq.index, _error_output(err)))

    try:
        feed()
        while pending or ready or held is not None:
            while ready:
                yield ready.popleft()
            if not pending:
                if held is not None:
                    grow()
                feed()
                continue
            if ops.abandoned():  # on a CPU engine's model thread, and its consumer stopped waiting
                raise ops.Abandoned("generate_iter: its consumer stopped waiting")
            sched.step()
            while finished:
                s = finished.popleft()
                pending -= 1
                yield s.index, s.output
            feed()
    except BaseException as err:
        sched.abort_all(err if isinstance(err, Exception) else RuntimeError("interrupted"))
        raise
    finally:
        if stats is not None:
            stats.update({k: totals[k] + v - start[k] for k, v in _counters(sched).items()},
                         slots=sched.plan.num_slots, slot_len=sched.plan.slot_len)


def _counters(sched) -> dict:
    return dict(model_wait_s=sched.model_wait_s, decode_steps=sched.decode_steps, decode_rows=sched.decode_rows,
                tokens=sched.tokens_out)
