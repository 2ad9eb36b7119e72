"""Drivers of the scheduler for a caller's own thread: the kept scheduler of an Engine (grown when too small,
keeping its video prefixes) and the loop of Engine.generate_iter over any iterable of requests."""
from __future__ import annotations

import collections

from .errors import PllavaError, error_line
from .generate import GenerationOutput
from .scheduler import Request, Scheduler, prepare_sequence, slot_len_for


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
    slot_len = max_seq_len or (slot_len_for(engine, prepared) if prepared
                               else engine.config.text.max_position_embeddings)
    sched = engine_scheduler(engine, max_batch_size, slot_len, prefill_chunk, kv_cache_bytes, media_workers)
    sched.limit = max_batch_size
    pending = 0
    queued = iter(prepared)

    def feed():
        nonlocal pending
        while len(sched.waiting) < lookahead:
            seq = next(queued, None)
            if seq is None:
                nxt = next(it, None)
                if nxt is None:
                    return
                seq = prepare(*nxt)
                if seq is None:
                    continue
            try:
                sched.add(sched.fit(seq))
            except PllavaError as err:
                ready.append((seq.index, _error_output(err)))
                continue
            pending += 1

    try:
        feed()
        while pending or ready:
            while ready:
                yield ready.popleft()
            if not pending:
                feed()
                continue
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
            stats.update(model_wait_s=sched.model_wait_s, decode_steps=sched.decode_steps,
                         decode_rows=sched.decode_rows, tokens=sched.tokens_out, slots=sched.plan.num_slots)
