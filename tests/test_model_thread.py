"""A CPU engine's model work runs on one thread whichever threads call it (ops.ModelThread): generate(),
stream(), generate_many() and generate_iter() give what they gave on the caller's thread, run on that one thread,
and a caller that stops waiting (Ctrl-C, a stream closed early) gets control back while the work stops. Why one
thread: each live thread that has run parallel torch ops keeps an OpenMP team, and a second team slows every
decode step (README, "fast CPU mode"; benchmarks/bench_threads.py)."""
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pllava import ops


def _where(engine, monkeypatch):
    """The threads _prompt_ids (inside every generation path) runs on."""
    seen = []
    real = engine._prompt_ids

    def spy(*a, **k):
        seen.append(threading.current_thread())
        return real(*a, **k)

    monkeypatch.setattr(engine, "_prompt_ids", spy)
    return seen


def test_every_entry_point_runs_on_the_one_model_thread(engine, video_path, monkeypatch):
    ref = [engine.generate(video_path, q, max_new_tokens=6) for q in ("What is it?", "Describe it.")]
    seen = _where(engine, monkeypatch)
    with ThreadPoolExecutor(2) as pool:  # two callers in turn, as a web framework's workers
        outs = [pool.submit(engine.generate, video_path, q, max_new_tokens=6).result()
                for q in ("What is it?", "Describe it.")]
        streamed = pool.submit(lambda: "".join(engine.stream(video_path, "What is it?", max_new_tokens=6))).result()
    many = engine.generate_many([{"video": video_path, "prompt": "Describe it.", "max_new_tokens": 6}])
    it = dict(engine.generate_iter([{"video": video_path, "prompt": "What is it?", "max_new_tokens": 6}]))
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
    assert streamed == ref[0].text and it[0].text == ref[0].text and many[0].token_ids == ref[1].token_ids
    model = {t for t in seen}
    assert len(model) == 1 and next(iter(model)).name == "pllava-model"
    assert threading.current_thread() not in model


def test_a_started_scheduler_steps_on_the_model_thread_and_generate_runs_between_its_steps(engine, video_path,
                                                                                          monkeypatch):
    """Scheduler.start() (the server's loop) runs each step on the engine's model thread, so a generate() called
    from another thread while the scheduler has a request in flight runs on that same thread, between two steps
    (one OpenMP team, never two computations on one model at once), and each gives what it gives alone. The
    control: the scheduler's loop thread itself (where the steps ran before) is not the model thread."""
    from pllava.sequence import Request

    long_req = dict(video=video_path, prompt="Describe it.", max_new_tokens=40)
    ref_long = engine.generate_many([long_req])[0]
    ref_short = engine.generate(video_path, "What is it?", max_new_tokens=6)
    sched = engine.scheduler(max_num_seqs=2)
    steps, real_step = [], sched.step

    def step():
        steps.append(threading.current_thread())
        return real_step()

    monkeypatch.setattr(sched, "step", step)
    gen_threads = _where(engine, monkeypatch)
    sched.start()
    try:
        seq = sched.submit(Request(**long_req))
        while len(steps) < 3 and not seq.done.is_set():  # the long request is decoding
            time.sleep(0.005)
        assert not seq.done.is_set(), "the scheduler's request ended before generate() was called beside it"
        with ThreadPoolExecutor(1) as pool:
            short = pool.submit(engine.generate, video_path, "What is it?", max_new_tokens=6).result()
        assert seq.done.wait(60)
    finally:
        sched.stop()
    assert seq.error is None and seq.output.token_ids == ref_long.token_ids
    assert short.token_ids == ref_short.token_ids
    model = set(steps) | set(gen_threads[-1:])
    assert len(model) == 1 and next(iter(model)).name == "pllava-model"
    assert sched.thread is not None and sched.thread not in model


def test_a_stream_closed_early_has_cleaned_up_when_close_returns(engine, video_path):
    ref = engine.generate(video_path, "Describe it.", max_new_tokens=12)
    it = engine.stream(video_path, "Describe it.", max_new_tokens=400)
    next(it)
    it.close()  # returns once the generation on the model thread has stopped (at its next token)
    assert engine.generate(video_path, "Describe it.", max_new_tokens=12).token_ids == ref.token_ids


def _sigint_soon(s: float = 0.3):
    timer = threading.Timer(s, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    return timer


def test_ctrl_c_returns_at_once_and_the_job_stops_at_its_next_check():
    """A real SIGINT to the waiting caller, as a terminal sends it: call() raises KeyboardInterrupt at once; the
    job sees abandoned() and ends; the thread takes the next job."""
    mt = ops.ModelThread("pllava-model-test")
    steps, ended = [], threading.Event()

    def work():
        try:
            for i in range(500):  # 5 s if never stopped
                if ops.abandoned():
                    return "stopped"
                steps.append(i)
                time.sleep(0.01)
        finally:
            ended.set()

    _sigint_soon()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        mt.call(work)
    assert time.perf_counter() - t0 < 3
    assert ended.wait(5) and 0 < len(steps) < 500
    assert mt.call(lambda: (threading.current_thread().name, ops.abandoned())) == ("pllava-model-test", False)
    mt.close()


def test_iterate_relays_items_errors_and_closes_the_generator_on_the_thread():
    from pllava.errors import VideoError

    mt = ops.ModelThread("pllava-model-test")
    closed = []

    def gen(n, fail=False):
        try:
            for i in range(n):
                yield i, threading.current_thread().name
            if fail:
                raise VideoError("clip.mp4: not decodable")
        finally:
            closed.append(threading.current_thread().name)

    assert list(mt.iterate(gen, 3)) == [(i, "pllava-model-test") for i in range(3)]
    with pytest.raises(VideoError, match="clip.mp4: not decodable"):
        list(mt.iterate(gen, 2, fail=True))
    endless = mt.iterate(gen, 10 ** 9)
    assert next(endless)[0] == 0
    endless.close()  # the generator is closed on the model thread before close() returns
    assert closed == ["pllava-model-test"] * 3
    # a call from the model thread itself runs inline (no deadlock): a job that generates
    assert mt.call(lambda: mt.call(lambda: 7) + sum(i for i, _ in mt.iterate(gen, 3))) == 10
    mt.close()


_THREADS_AFTER = """
import os, sys, time
from concurrent.futures import ThreadPoolExecutor
import torch
from pllava.generate import SamplingParams
from pllava.runtime import Engine
n = lambda: len(os.listdir("/proc/self/task"))
e = Engine.from_pretrained(sys.argv[1], device="cpu")
ask = (None, "Describe it.")  # text only: no media threads in the count

def work():
    if sys.argv[2] == "engine":
        return e.generate(*ask, max_new_tokens=4)
    return list(e._run(*ask, SamplingParams(max_new_tokens=4), None, None, {}))  # the control: on the caller

pools = [ThreadPoolExecutor(1) for _ in range(2)]
pools[1].submit(lambda: None).result()  # started, idle
pools[0].submit(work).result()  # the first call starts what is started once (the tokenizer's pool, a team)
time.sleep(0.3)
before = n()
pools[1].submit(work).result()  # the second caller
time.sleep(0.3)
print(before, n(), torch.get_num_threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_generate_from_two_pool_threads_leaves_one_openmp_team(ckpts):
    """Counted in a fresh process: generate() from a second pool thread starts no thread (its work joins the model
    thread's team), where the same work on each caller starts a second team (omp - 1 more workers)."""
    def threads(how):
        r = subprocess.run([sys.executable, "-c", _THREADS_AFTER, ckpts["pllava"], how],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return [int(x) for x in r.stdout.split()[-3:]]

    before, after, omp = threads("direct")
    if omp < 2 or ops._libgomp() is None:
        pytest.skip(f"torch runs {omp} OpenMP thread(s) here{'' if omp < 2 else ' (not libgomp)'}: no team to see")
    assert after == before + omp - 1, "the control: the second calling thread keeps a team of its own"
    before, after, _ = threads("engine")
    assert after == before
