"""Continuous batching (pllava.scheduler via Engine.generate_many) against one-at-a-time Engine.generate().

The oracle is the single-request path: its own static cache, masked attention over the whole cache, the shared
0-dim LoRA scale and its own decode loop. The batched path has slots, per-row lengths and per-row scales.
"""
import os
import threading

import pytest
import torch

import pllava
from pllava.errors import InputError, MemoryBudgetError, VideoError
from pllava.sequence import Request
from pllava.slots import plan_slots
from triton_util import needs_triton


def one_at_a_time(engine, reqs):
    outs = []
    saved = engine.lora_alpha
    try:
        for r in reqs:
            r = dict(r)
            engine.set_lora_alpha(r.pop("lora_alpha", saved))
            video, prompt = r.pop("video"), r.pop("prompt")
            outs.append(engine.generate(video, prompt, **r))
    finally:
        engine.set_lora_alpha(saved)
    return outs


def assert_same(seq, got):
    for i, (a, b) in enumerate(zip(seq, got)):
        assert b.token_ids == a.token_ids, f"request {i}: batched {b.token_ids} != sequential {a.token_ids}"
        assert b.text == a.text and b.finish_reason == a.finish_reason, i
        assert b.num_prompt_tokens == a.num_prompt_tokens, i
    assert len(seq) == len(got)


def mixed(pxs, video_path):
    prompts = ["hello", "What is happening in the video?", "Describe the video in details.", "a",
               [("user", "Who is there?"), ("assistant", "A man."), ("user", "What does he do?")]]
    out = []
    for i in range(9):
        out.append(dict(video=video_path if i in (2, 6) else pxs[i % 4], prompt=prompts[i % 5],
                        max_new_tokens=[20, 7, 33, 12, 26][i % 5], lora_alpha=[4, 20, 0, 8, 4.5][i % 5]))
    return out


@pytest.mark.parametrize("batch,chunk", [(3, None), (16, None), (4, 7)])
def test_greedy_batched_equals_sequential(engine, pxs, video_path, batch, chunk):
    reqs = mixed(pxs, video_path)
    seq = one_at_a_time(engine, reqs)
    got = engine.generate_many(reqs, max_batch_size=batch, prefill_chunk=chunk)
    assert_same(seq, got)
    assert len({len(o.token_ids) for o in got}) > 2  # requests really leave the batch at different steps
    assert {o.finish_reason for o in got} == {"length"}


def test_stop_string_and_eos_in_a_batch(engine, pxs):
    base = engine.generate(pxs[0], "hello", max_new_tokens=24)
    k = next(i for i in range(3, 24) if base.token_ids[i] not in base.token_ids[:i])
    stop = base.text[4:7]
    reqs = [dict(video=pxs[0], prompt="hello", max_new_tokens=24, stop=[stop]),
            dict(video=pxs[1], prompt="hello", max_new_tokens=24),
            dict(video=pxs[0], prompt="hello", max_new_tokens=24, stop_token_ids=[base.token_ids[k]]),
            dict(video=pxs[2], prompt="a", max_new_tokens=18)]
    saved = set(engine.eos_ids)
    engine.eos_ids = saved | {base.token_ids[k]}  # EOS for every request: the stop row and the others
    try:
        seq = one_at_a_time(engine, reqs)
        got = engine.generate_many(reqs, max_batch_size=4)
    finally:
        engine.eos_ids = saved
    assert_same(seq, got)
    assert got[0].finish_reason == "stop" and stop not in got[0].text
    assert got[2].token_ids[-1] == base.token_ids[k] and got[2].finish_reason == "stop"


def test_seeded_sampling_independent_of_batch_and_order(engine, pxs):
    target = dict(video=pxs[1], prompt="What is happening?", max_new_tokens=16, temperature=0.9, top_p=0.9,
                  top_k=40, repetition_penalty=1.2, seed=1234, lora_alpha=20)
    alone = engine.generate_many([target])[0]
    ref = one_at_a_time(engine, [target])[0]
    assert alone.token_ids == ref.token_ids
    others = [dict(video=pxs[i], prompt="hello", max_new_tokens=5 + 3 * i, temperature=1.0, seed=i) for i in range(3)]
    for batch in ([others[0], target, others[1]], [others[2], others[1], others[0], target], [target] + others):
        outs = engine.generate_many(batch, max_batch_size=len(batch))
        got = outs[batch.index(target)]
        assert got.token_ids == ref.token_ids
    # an unseeded neighbour changes nothing either
    outs = engine.generate_many([dict(video=pxs[3], prompt="a", max_new_tokens=9, temperature=1.0), target])
    assert outs[1].token_ids == ref.token_ids


def test_cancel_one_request_leaves_the_others(engine, pxs):
    reqs = [Request(video=pxs[i], prompt="hello", max_new_tokens=20, lora_alpha=4 + i) for i in range(3)]
    seq = one_at_a_time(engine, [dict(video=r.video, prompt=r.prompt, max_new_tokens=20, lora_alpha=r.lora_alpha)
                                 for r in reqs])
    sched = engine.scheduler(max_num_seqs=3, max_seq_len=256)
    reqs[1].cancel = threading.Event()

    def on_event(s, ev):
        if s.index == 1 and len(s.tokens) == 4:
            s.req.cancel.set()

    seqs = [sched.make_sequence(r, i, on_event=on_event) for i, r in enumerate(reqs)]
    sched.run(seqs)
    assert seqs[1].output.finish_reason == "cancelled" and seqs[1].output.token_ids == seq[1].token_ids[:4]
    for i in (0, 2):
        assert seqs[i].output.token_ids == seq[i].token_ids and seqs[i].output.finish_reason == "length"
    assert sched.owner == [None, None, None] and not sched.running
    # a request cancelled before it is admitted never runs
    r = Request(video=pxs[0], prompt="hello", max_new_tokens=5, cancel=threading.Event())
    r.cancel.set()
    s = sched.make_sequence(r, 0)
    sched.run([s])
    assert s.output.finish_reason == "cancelled" and s.output.token_ids == []
    engine._sched = None


def test_stale_slot_contents_never_reach_a_later_request(engine, pxs):
    reqs = [dict(video=pxs[i], prompt="hello", max_new_tokens=12) for i in range(2)]
    seq = one_at_a_time(engine, reqs)
    engine.generate_many(reqs + reqs)  # the slots now hold these requests' KV
    for k, v in zip(engine._sched.cache.k, engine._sched.cache.v):
        k.fill_(float("nan"))  # as if an earlier request had produced NaN everywhere
        v.fill_(float("nan"))
    engine._sched.clear_prefixes()
    got = engine.generate_many(reqs)
    assert_same(seq, got)


def test_prefix_cache_per_slot(engine, video_path):
    first = dict(video=video_path, prompt="Describe the video in details.", max_new_tokens=10)
    follow = [dict(video=video_path, prompt=q, max_new_tokens=10) for q in ("What is he doing?", "Is it day?")]
    engine.prefix_cache = False
    try:
        seq = [engine.generate(video_path, r["prompt"], max_new_tokens=10) for r in [first] + follow]
    finally:
        engine.prefix_cache = True
    engine._sched = None
    got = engine.generate_many([first])
    assert "prefix_cache_hit" not in got[0].timings
    # two follow-ups at once: one reuses the free slot holding the clip, the other copies it to another slot
    more = engine.generate_many(follow, max_batch_size=2)
    assert [o.timings.get("prefix_cache_hit") for o in more] == [1, 1]
    assert "video_decode" not in more[0].timings and "vision" not in more[1].timings
    assert_same(seq, got + more)
    # another alpha shaped other values: no reuse
    other = engine.generate_many([dict(follow[0], lora_alpha=20)])
    assert "prefix_cache_hit" not in other[0].timings


def test_memory_budget(engine, pxs):
    bpt = 2 * 2 * 2 * 16 * 4  # layers x (K, V) x kv heads x head_dim x fp32 bytes of the tiny model
    plan = plan_slots(engine.config.text, torch.float32, "cpu", 8, 256, kv_cache_bytes=3 * 256 * bpt + 5)
    assert (plan.num_slots, plan.bytes_per_token) == (3, bpt)
    with pytest.raises(MemoryBudgetError, match=r"1000 bytes .* 256 positions x 512 bytes"):
        plan_slots(engine.config.text, torch.float32, "cpu", 8, 256, kv_cache_bytes=1000)
    sched = engine.scheduler(max_num_seqs=8, max_seq_len=64, kv_cache_bytes=2 * 64 * bpt)
    assert sched.plan.num_slots == 2
    with pytest.raises(MemoryBudgetError, match=r"requests\[0\]: the prompt is \d+ tokens .* holds 64 positions"):
        sched.make_sequence(Request(video=pxs[0], prompt="hello " * 40, max_new_tokens=4), 0)
    n = sched.make_sequence(Request(video=pxs[0], prompt="hello", max_new_tokens=4), None).n_prompt
    with pytest.raises(MemoryBudgetError, match=rf"{n} prompt tokens \+ max_new_tokens 60 = {n + 60} positions"):
        sched.make_sequence(Request(video=pxs[0], prompt="hello", max_new_tokens=60), 1)
    # more requests than slots: the rest wait, and all finish as if run alone
    reqs = [Request(video=pxs[i % 4], prompt="hello", max_new_tokens=6 + i) for i in range(5)]
    seqs = [sched.make_sequence(r, i) for i, r in enumerate(reqs)]
    peak = []
    for s in seqs:
        sched.add(s)
    while sched.has_work():
        sched.step()
        peak.append(sched.num_running)
    assert max(peak) == 2
    ref = one_at_a_time(engine, [dict(video=r.video, prompt=r.prompt, max_new_tokens=r.max_new_tokens) for r in reqs])
    assert_same(ref, [s.output for s in seqs])
    engine._sched = None


def test_requests_are_validated_before_any_compute(engine, pxs):
    with pytest.raises(InputError, match=r"requests\[1\]: unknown key\(s\) \['max_tokens'\]"):
        engine.generate_many([dict(video=pxs[0], prompt="a"), dict(video=pxs[0], prompt="a", max_tokens=3)])
    with pytest.raises(InputError, match=r"requests\[0\]: lora_alpha must be a finite number, got nan"):
        engine.generate_many([dict(video=pxs[0], prompt="a", lora_alpha=float("nan"))])
    with pytest.raises(InputError, match=r"requests\[0\]: top_p"):
        engine.generate_many([dict(video=pxs[0], prompt="a", top_p=0)])
    with pytest.raises(InputError, match=r"requests\[2\]: a request is a dict"):
        engine.generate_many([dict(video=pxs[0], prompt="a")] * 2 + ["clip.mp4"])
    with pytest.raises(InputError, match="max_batch_size must be an integer"):
        engine.generate_many([dict(video=pxs[0], prompt="a")], max_batch_size=0)
    engine.merge_lora()
    try:
        with pytest.raises(InputError, match="merged"):
            engine.generate_many([dict(video=pxs[0], prompt="a", lora_alpha=20)])
        merged = engine.generate_many([dict(video=pxs[0], prompt="hello", max_new_tokens=8)])[0]
    finally:
        engine.unmerge_lora()
    assert merged.token_ids == engine.generate(pxs[0], "hello", max_new_tokens=8).token_ids


def test_a_failing_clip_fails_alone(engine, pxs, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video" * 10)
    reqs = [dict(video=pxs[0], prompt="hello", max_new_tokens=6), dict(video=str(bad), prompt="hello"),
            dict(video=pxs[1], prompt="hello", max_new_tokens=6)]
    outs = engine.generate_many(reqs, return_errors=True)
    assert outs[1].finish_reason == "error" and outs[1].error.startswith("VideoError: ") and str(bad) in outs[1].error
    assert_same(one_at_a_time(engine, [reqs[0], reqs[2]]), [outs[0], outs[2]])
    with pytest.raises(VideoError, match=r"requests\[1\]: "):
        engine.generate_many(reqs)
    assert all(o is None for o in engine._sched.owner)  # nothing left holding a slot


@needs_triton
def test_triton_per_row_scale_in_a_batch(ckpts, pxs, monkeypatch):
    """The Triton LoRA kernel's per-row scale path (one alpha a row) gives the torch path's tokens."""
    pytest.importorskip("triton")
    reqs = [dict(video=pxs[0], prompt="hello", max_new_tokens=6, lora_alpha=20),
            dict(video=pxs[1], prompt="hello", max_new_tokens=6, lora_alpha=0)]
    from triton_util import TRITON_DEVICE

    monkeypatch.setenv("PLLAVA_KERNELS", "torch")
    ref = pllava.Engine.from_pretrained(ckpts["pllava"], device=TRITON_DEVICE, dtype=torch.float32).generate_many(reqs)
    monkeypatch.setenv("PLLAVA_KERNELS", "triton")
    got = pllava.Engine.from_pretrained(ckpts["pllava"], device=TRITON_DEVICE, dtype=torch.float32).generate_many(reqs)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


def test_a_failing_step_leaves_nothing_behind(engine, pxs, monkeypatch):
    """A bug mid-batch (here: the model raising on the 5th decode step) fails every request of the call with that
    error, frees their slots and leaves nothing queued; the next call is unaffected."""
    reqs = [dict(video=pxs[i], prompt="hello", max_new_tokens=12) for i in range(3)]
    ref = one_at_a_time(engine, reqs)
    engine.generate_many(reqs)
    sched = engine._sched
    real = sched._decode
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected failure")
        real()

    monkeypatch.setattr(sched, "_decode", flaky)
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.generate_many(reqs + reqs, max_batch_size=3)  # 3 wait while 3 run
    assert engine._sched is sched
    assert all(o is None for o in sched.owner) and not sched.waiting and not sched.running
    assert sched.prefilling is None
    monkeypatch.setattr(sched, "_decode", real)
    assert_same(ref, engine.generate_many(reqs))


def test_one_request_with_exploding_logits_ends_alone(engine, pxs):
    """alpha = 3e38 (finite) overflows the LoRA term to inf: that request ends with NumericalError (typed), the
    others in its batch get exactly their sequential tokens, and its slot serves later requests cleanly."""
    from pllava.errors import NumericalError

    reqs = [dict(video=pxs[0], prompt="hello", max_new_tokens=10),
            dict(video=pxs[1], prompt="hello", max_new_tokens=10, lora_alpha=3e38),
            dict(video=pxs[2], prompt="a", max_new_tokens=14, lora_alpha=20)]
    engine.set_lora_alpha(3e38)
    try:
        with pytest.raises(NumericalError, match="non-finite logits"):
            engine.generate(pxs[1], "hello", max_new_tokens=10)
    finally:
        engine.set_lora_alpha(4)
    outs = engine.generate_many(reqs, return_errors=True)
    assert outs[1].finish_reason == "error" and outs[1].error.startswith("NumericalError: ")
    assert_same(one_at_a_time(engine, [reqs[0], reqs[2]]), [outs[0], outs[2]])
    assert_same(one_at_a_time(engine, reqs[:1] * 3), engine.generate_many(reqs[:1] * 3))


def test_a_tiny_temperature_samples_the_top_token(engine, pxs):
    greedy = engine.generate(pxs[0], "hello", max_new_tokens=12).token_ids
    assert engine.generate(pxs[0], "hello", max_new_tokens=12, temperature=1e-30, seed=3).token_ids == greedy
    got = engine.generate_many([dict(video=pxs[0], prompt="hello", max_new_tokens=12, temperature=1e-30, seed=3)])
    assert got[0].token_ids == greedy


@pytest.mark.parametrize("field,value,match", [
    ("seed", 1.5, "seed: must be an integer"), ("seed", True, "seed: must be an integer"),
    ("seed", -1, r"seed: must be an integer in \[0, 2\*\*63\)"), ("seed", 2 ** 64, "seed"),
    ("stop_token_ids", ["a"], "stop_token_ids: must be a list of token ids"),
    ("stop_token_ids", [10 ** 9], "stop_token_ids: 1000000000 is not a token id"),
    ("stop", ["\ud800"], "stop: holds a lone surrogate"), ("temperature", "hot", "temperature: must be a number"),
    ("temperature", float("inf"), "temperature: must be finite"), ("prompt", "hi \udc80", "lone surrogate"),
    ("video", None, "NaN or inf"),
])
def test_bad_values_are_typed_errors_in_both_paths(engine, pxs, field, value, match):
    from pllava.errors import PllavaError

    r = dict(video=pxs[0], prompt="hello", max_new_tokens=4)
    if field == "video":
        value = pxs[0].clone()
        value[0, 0, 0, 0] = float("nan")
    r[field] = value
    with pytest.raises(PllavaError, match=match):
        engine.generate(**r)
    with pytest.raises(PllavaError, match=match):
        engine.generate_many([r])


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_bf16_on_the_cpu_batches_with_generates_cache(ckpts, pxs, video_path, monkeypatch, quantize):
    """Under bf16 weights on the CPU, generate()'s KV cache is bf16 where pllava._C's decode attention reads it
    (fp32 sums), else fp32 (the CPU's bf16 SDPA is 7x slower); the residual stream is fp32 either way. The
    scheduler's slot cache has generate()'s dtype, so the batched tokens equal one-at-a-time generate()'s (with the
    two caches in different dtypes the rounding of K and V differed). A file goes through the vision tower in
    groups of frames in generate() (overlapped with decoding) and all at once in the scheduler: the features must be the
    same bits (the strided CLS-dropped features once made torch's bf16 linear_1 round differently, 0.047 apart)."""
    from pllava import ops
    from pllava.scheduler import Scheduler

    native = ops.native_decode_attention() is not None
    for built in (native, False) if native else (False,):
        if not built:
            monkeypatch.setattr(ops, "native_decode_attention", lambda: None)
        eng = pllava.Engine.from_pretrained(ckpts["pllava"], dtype=torch.bfloat16, quantize=quantize)
        assert eng.kv_dtype == (torch.bfloat16 if built else torch.float32)
        assert eng.model.language_model.residual_dtype == torch.float32
        reqs = [dict(video=p, prompt=f"Question {i}: what happens?", max_new_tokens=12) for i, p in enumerate(pxs[:3])]
        reqs.append(dict(video=video_path, prompt="What is happening in the video?", max_new_tokens=12))
        assert torch.equal(eng.encode(video_path), eng.encode(video_path, overlap=False))
        want = [o.token_ids for o in one_at_a_time(eng, reqs)]
        got = eng.generate_many(reqs, max_batch_size=3)
        assert [o.token_ids for o in got] == want, built
        assert Scheduler(eng, max_num_seqs=2).cache.k[0].dtype == eng.kv_dtype



def test_generate_iter_grows_its_slots_for_a_later_longer_request(ckpts, pxs, caplog):
    """generate_iter sizes its KV slots from the requests in its look-ahead; a later one needing more positions
    waits for the batch to drain, runs on longer slots and gets generate()'s answer, as do those after it (it
    failed with a MemoryBudgetError naming max_seq_len, which the caller never set)."""
    engine = pllava.Engine.from_pretrained(ckpts["pllava"])  # no kept scheduler with long slots from another test
    reqs = [dict(video=pxs[i % 4], prompt="hi", max_new_tokens=3 + i % 4) for i in range(12)]
    reqs.insert(10, dict(video=pxs[1], prompt="Describe the video in details.", max_new_tokens=300))
    stats = {}
    with caplog.at_level("INFO", logger="pllava"):
        got = dict(engine.generate_iter(reqs, 2, stats=stats))
    assert_same(one_at_a_time(engine, reqs), [got[i] for i in range(len(reqs))])
    assert "requests[10] needs" in caplog.text and "KV slots grown from 256" in caplog.text
    assert stats["slot_len"] >= got[10].num_prompt_tokens + 300


def test_generate_iter_stats_are_the_calls_own(engine, pxs):
    """The engine keeps its scheduler between calls; each call's stats count that call's work only."""
    reqs = [dict(video=pxs[i], prompt="hi", max_new_tokens=4 + i) for i in range(3)]
    for _ in range(2):
        stats = {}
        outs = dict(engine.generate_iter(reqs, 2, stats=stats))
        assert stats["tokens"] == sum(len(o.token_ids) for o in outs.values()) > 0
        assert stats["decode_rows"] <= stats["tokens"] and stats["decode_steps"] <= stats["decode_rows"]


def test_an_untyped_error_of_one_clip_fails_that_request_alone(ckpts, pxs, video_path, monkeypatch, caplog):
    """A bug in decoding or preprocessing one request's clip (it runs in a media worker, touching nothing
    shared) ends that request, logged with its traceback; the batch goes on (it failed every request before)."""
    engine = pllava.Engine.from_pretrained(ckpts["pllava"])
    real = engine.pixels

    def pixels(video, timings=None):
        if isinstance(video, str) and video.endswith("poison.mp4"):
            raise ZeroDivisionError("a planted bug")
        return real(video, timings)

    monkeypatch.setattr(engine, "pixels", pixels)
    reqs = [dict(video=pxs[0], prompt="hi", max_new_tokens=9), dict(video="/x/poison.mp4", prompt="hi"),
            dict(video=video_path, prompt="What is it?", max_new_tokens=7), dict(video=pxs[2], prompt="a")]
    with caplog.at_level("ERROR", logger="pllava"):
        outs = engine.generate_many(reqs, 2, return_errors=True)
    assert outs[1].finish_reason == "error" and outs[1].error == "ZeroDivisionError: a planted bug"
    assert "requests[1]: its clip failed with an untyped ZeroDivisionError" in caplog.text
    good = [r for i, r in enumerate(reqs) if i != 1]
    assert_same(one_at_a_time(engine, good), [o for i, o in enumerate(outs) if i != 1])


def test_media_workers_run_one_openmp_thread_and_leave_the_models(engine):
    """The scheduler's media workers set their own OpenMP thread count to 1 (libgomp's barriers stop spinning once
    a helper's team puts it over the CPU count: README, "fast CPU mode"); the calling thread's count, which the
    model's kernels read, is untouched, and so is a later scheduler's."""
    from pllava.scheduler import Scheduler

    before = torch.get_num_threads()
    sched = Scheduler(engine, max_num_seqs=1)
    try:
        counts = [sched.pool.submit(torch.get_num_threads).result() for _ in range(3)]
    finally:
        sched.stop()
    if pllava.ops._libgomp() is not None:
        assert counts == [1, 1, 1]
    else:  # torch on another OpenMP runtime: the workers keep torch's count, and the log says so
        assert counts == [before] * 3
    assert torch.get_num_threads() == before


def test_in_fresh_thread_returns_or_raises_from_a_thread_that_ends():
    """ops.in_fresh_thread (a CPU engine loads and a scheduler zeroes its slot cache with it): the
    call's value, or its own exception (type and message) re-raised in the caller, from a thread that has ended
    by the time it returns, so no OpenMP team of its outlives it."""
    from pllava.errors import ConfigError
    from pllava.ops import in_fresh_thread

    seen = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return torch.ones(1 << 16).add_(a).sum().item() + b  # a parallel op, on that thread

    assert in_fresh_thread(work, 1, b=2) == 2 * (1 << 16) + 2
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail():
        raise ConfigError("model/config.json: no 'text_config'")

    with pytest.raises(ConfigError, match="no 'text_config'"):
        in_fresh_thread(fail)


def test_in_fresh_thread_stops_the_work_its_caller_gave_up_on():
    """Ctrl-C while a CPU engine loads on its thread that ends (ops.in_fresh_thread): the caller gets its
    KeyboardInterrupt at once and the work stops at its next ops.abandoned() check, instead of finishing a load
    nobody takes (a real SIGINT to this thread, as a terminal sends it, while it waits)."""
    import signal
    import time

    from pllava import ops

    steps, ended = [], threading.Event()

    def work():
        try:
            for i in range(500):  # 5 s if never stopped
                if ops.abandoned():
                    return
                steps.append(i)
                time.sleep(0.01)
        finally:
            ended.set()

    assert not ops.abandoned()  # outside in_fresh_thread: never
    timer = threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        ops.in_fresh_thread(work)
    assert time.perf_counter() - t0 < 3
    assert ended.wait(5) and 0 < len(steps) < 500


def test_an_abandoned_load_stops_between_tensors(ckpts, monkeypatch):
    """The checkpoint loader checks ops.abandoned() before each tensor: an abandoned load ends (typed, naming the
    checkpoint) rather than reading the rest."""
    from pllava import checkpoint, ops
    from pllava.loading import load

    read = []
    real = checkpoint._set_tensor
    monkeypatch.setattr(checkpoint, "_set_tensor", lambda m, n, t: (read.append(n), real(m, n, t)))
    monkeypatch.setattr(ops, "abandoned", lambda: len(read) >= 3)
    with pytest.raises(ops.Abandoned, match="the load was abandoned by its caller"):
        load(ckpts["pllava"], device="cpu")
    assert len(read) == 3

_THREADS_AFTER = """
import os, sys, time
import torch
from pllava.loading import load
from pllava.runtime import Engine
from pllava.scheduler import Scheduler
n = lambda: len(os.listdir("/proc/self/task"))
before = n()
if sys.argv[2] == "direct":
    load(sys.argv[1], device="cpu")
else:
    Scheduler(Engine.from_pretrained(sys.argv[1], device="cpu"), max_num_seqs=2)
time.sleep(0.3)  # an ended thread's OpenMP workers leave as it exits
print(before, n(), torch.get_num_threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_from_pretrained_and_a_scheduler_leave_the_caller_no_openmp_team(ckpts):
    """On the CPU, Engine.from_pretrained loads and a Scheduler zeroes its slots on threads that end: the caller's
    thread (which may never decode: Scheduler.start() decodes on its own) gains no OpenMP team, whose live workers
    would slow every decode step of the thread that does (README, "fast CPU mode"). Counted in a fresh process
    against the control: the same load on the calling thread leaves one worker per extra OpenMP thread alive."""
    import subprocess
    import sys

    def threads(how):
        r = subprocess.run([sys.executable, "-c", _THREADS_AFTER, ckpts["pllava"], how], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return [int(x) for x in r.stdout.split()[-3:]]

    before, after, omp = threads("direct")
    if omp < 2 or pllava.ops._libgomp() is None:
        pytest.skip(f"torch runs {omp} OpenMP thread(s) here{'' if omp < 2 else ' (not libgomp)'}: no team to see")
    assert after == before + omp - 1, "the control: a load on the calling thread leaves its team's workers"
    before, after, _ = threads("engine")
    assert after == before
