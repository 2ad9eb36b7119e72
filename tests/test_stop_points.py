"""A cancel (a disconnected client) or a Ctrl-C seen before a request's first token stops it at the next stop
point - between the layers of the vision tower or of the prefill, between decoded frames, while its clip decodes in
a media worker - rather than after the whole prefill (~27 s for a 7B prompt on 2 CPU cores). The oracle for "nothing
carried over" is the same request run on the same engine before anything was cancelled."""
import threading

import pytest
import torch

from pllava import ops
from pllava.sequence import Request


@pytest.fixture(scope="module")
def px(engine):
    s = engine.config.vision.image_size
    return [torch.randn(engine.config.num_frames, 3, s, s, generator=torch.Generator().manual_seed(300 + i))
            for i in range(3)]


class LayerSpy:
    """Counts the calls of LLM layers (plain forward and forward_slots) and of vision layers; `on_first` runs in
    the first LLM layer of a prefill (more than one position) while armed: the test's cancel or abandon."""

    def __init__(self, engine, monkeypatch):
        self.lm = engine.model.language_model
        self.calls = {"llm_first": 0, "llm_last": 0, "vision_first": 0, "vision_last": 0}
        self.on_first = None
        self.on_vision = None
        self.handles = []
        first, last = self.lm.layers[0], self.lm.layers[-1]
        assert first is not last, "the tiny model needs two LLM layers for a stop point between them"
        vis = engine.model.vision_tower.encoder.layers
        assert len(vis) >= 2

        def pre(name, hook_attr):
            def hook(_mod, args):
                self.calls[name] += 1
                fn = getattr(self, hook_attr) if hook_attr else None
                if fn is not None and args[0].shape[1] > 1:
                    fn()
            return hook

        self.handles += [first.register_forward_pre_hook(pre("llm_first", "on_first")),
                         last.register_forward_pre_hook(pre("llm_last", None)),
                         vis[0].register_forward_pre_hook(pre("vision_first", "on_vision")),
                         vis[-1].register_forward_pre_hook(pre("vision_last", None))]
        for name, layer, attr in (("llm_first", first, "on_first"), ("llm_last", last, None)):
            orig = layer.forward_slots

            def wrapped(x, *a, _orig=orig, _name=name, _attr=attr, **k):
                self.calls[_name] += 1
                fn = getattr(self, _attr) if _attr else None
                if fn is not None and x.shape[1] > 1:
                    fn()
                return _orig(x, *a, **k)
            monkeypatch.setattr(layer, "forward_slots", wrapped)

    def reset(self):
        for k in self.calls:
            self.calls[k] = 0

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.fixture
def spy(engine, monkeypatch):
    s = LayerSpy(engine, monkeypatch)
    yield s
    s.remove()


def test_cancel_in_the_prefill_stops_before_the_next_layer(engine, px, spy):
    ref = engine.generate(px[0], "hello", max_new_tokens=8, video_key="a")
    engine._prefix = None  # the reference must not leave a prefix behind for the runs below
    cancel = threading.Event()
    spy.on_first = cancel.set
    spy.reset()
    out = engine.generate(px[0], "hello", max_new_tokens=8, video_key="a", cancel=cancel)
    assert out.finish_reason == "cancelled" and out.token_ids == [] and out.text == ""
    assert spy.calls["llm_first"] == 1 and spy.calls["llm_last"] == 0  # stopped before the second layer
    assert engine._prefix is None  # the half-written prefix is not offered to the next request
    spy.on_first = None
    again = engine.generate(px[0], "hello", max_new_tokens=8, video_key="a")
    assert "prefix_cache_hit" not in again.timings
    assert again.token_ids == ref.token_ids and again.text == ref.text


def test_cancel_in_a_follow_up_keeps_the_cached_prefix(engine, px, spy):
    engine._prefix = None
    ref_first = engine.generate(px[1], "hello", max_new_tokens=6, video_key="b")
    ref = engine.generate(px[1], "and then?", max_new_tokens=6, video_key="b")
    assert ref.timings.get("prefix_cache_hit") == 1
    cancel = threading.Event()
    spy.on_first = cancel.set
    spy.reset()
    out = engine.generate(px[1], "and then?", max_new_tokens=6, video_key="b", cancel=cancel)
    assert out.finish_reason == "cancelled" and out.token_ids == []
    assert out.timings.get("prefix_cache_hit") == 1 and spy.calls["llm_last"] == 0
    spy.on_first = None
    again = engine.generate(px[1], "and then?", max_new_tokens=6, video_key="b")
    assert again.timings.get("prefix_cache_hit") == 1 and again.token_ids == ref.token_ids
    assert ref_first.token_ids  # (the prefix came from a real first request)


def test_cancel_in_the_vision_tower_never_reaches_the_llm(engine, px, spy):
    cancel = threading.Event()
    spy.on_vision = cancel.set
    spy.reset()
    pieces = list(engine.stream(px[2], "hello", max_new_tokens=8, cancel=cancel))
    assert pieces == []
    assert spy.calls["vision_first"] >= 1 and spy.calls["vision_last"] == 0
    assert spy.calls["llm_first"] == 0


def test_cancel_between_decoded_frames_closes_the_decoder(engine, video_path, spy):
    cancel = threading.Event()
    cancel.set()
    out = engine.generate(video_path, "hello", max_new_tokens=8, cancel=cancel)
    assert out.finish_reason == "cancelled" and out.token_ids == []
    assert spy.calls["vision_first"] == 0 and spy.calls["llm_first"] == 0
    assert not [t for t in threading.enumerate() if t.name == "pllava-decode"]
    assert engine.generate(video_path, "hello", max_new_tokens=4).finish_reason in ("length", "stop")


def test_scheduler_cancel_in_a_prefill_leaves_the_running_request(engine, px, spy):
    ra = dict(video=px[0], prompt="hello", max_new_tokens=12)
    rb = dict(video=px[1], prompt="what now?", max_new_tokens=12, video_key="sb")
    ref_a, ref_b = engine.generate(**ra), engine.generate(**rb)
    engine._prefix = None
    sched = engine.scheduler(max_num_seqs=2, max_seq_len=256)
    b = Request(**rb, cancel=threading.Event())
    armed = []

    def on_event(s, ev):
        if s.index == 0 and not armed:
            armed.append(1)  # A has prefilled and runs: the next prefill is B's
            spy.reset()
            spy.on_first = b.cancel.set

    seqs = [sched.make_sequence(Request(**ra), 0, on_event=on_event), sched.make_sequence(b, 1)]
    sched.run(seqs)
    assert seqs[1].output.finish_reason == "cancelled" and seqs[1].output.token_ids == []
    assert spy.calls["llm_last"] == len(ref_a.token_ids) - 1  # A's decode steps only: B's prefill stopped at layer 1
    assert seqs[0].output.token_ids == ref_a.token_ids and seqs[0].output.finish_reason == ref_a.finish_reason
    assert sched.owner == [None, None] and sched.prefilling is None and all(p is None or p[0][0][1] != "sb"
                                                                            for p in sched.prefix)
    spy.on_first = None
    again = sched.make_sequence(Request(**rb), 0)
    sched.run([again])
    assert "prefix_cache_hit" not in again.output.timings and again.output.token_ids == ref_b.token_ids


def test_scheduler_cancel_while_the_clip_decodes(engine, px, monkeypatch):
    ra = dict(video=px[0], prompt="hello", max_new_tokens=6)
    ref_a = engine.generate(**ra)
    slow, release = px[2], threading.Event()
    waited_out = []
    real = engine.pixels

    def pixels(video, timings=None):
        if video is slow:  # a clip whose decode never ends on its own (a stalled network source)
            if not release.wait(20):
                waited_out.append(1)
        return real(video, timings)
    monkeypatch.setattr(engine, "pixels", pixels)
    sched = engine.scheduler(max_num_seqs=2, max_seq_len=256)
    b = Request(video=slow, prompt="hello", max_new_tokens=6, cancel=threading.Event())
    seqs = [sched.make_sequence(Request(**ra), 0), sched.make_sequence(b, 1)]
    timer = threading.Timer(0.3, b.cancel.set)
    timer.start()
    try:
        sched.run(seqs)
    finally:
        release.set()
        timer.cancel()
        sched.stop()
    assert seqs[1].output.finish_reason == "cancelled" and seqs[1].output.token_ids == []
    assert not waited_out  # run() returned while the decode still hung, not when it gave up after 20 s
    assert seqs[0].output.token_ids == ref_a.token_ids


def test_abandoned_generate_many_stops_in_the_prefill(engine, px, spy):
    assert engine._model_thread is not None  # a CPU engine: generate_many runs on the model thread
    reqs = [dict(video=px[0], prompt="hello", max_new_tokens=6), dict(video=px[1], prompt="hi", max_new_tokens=6)]
    ref = engine.generate_many(reqs)

    def abandon():  # what the caller's Ctrl-C does (ops.ModelThread.call sets the job's abandon event)
        threading.current_thread().pllava_abandon.set()
    spy.on_first = abandon
    spy.reset()
    with pytest.raises(ops.Abandoned):
        engine.generate_many(reqs)
    assert spy.calls["llm_first"] == 1 and spy.calls["llm_last"] == 0
    spy.on_first = None
    got = engine.generate_many(reqs)
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]


def test_abandoned_generate_stops_in_the_vision_tower(engine, px, spy):
    def abandon():
        threading.current_thread().pllava_abandon.set()
    spy.on_vision = abandon
    with pytest.raises(ops.Abandoned):
        engine.generate(px[2], "hello", max_new_tokens=4)
    assert spy.calls["vision_last"] == 0 and spy.calls["llm_first"] == 0
    spy.on_vision = None
    assert engine.generate(px[2], "hello", max_new_tokens=4).token_ids  # the engine serves the next request


def test_stop_check_raises_what_stopped_it(monkeypatch):
    from pllava.generate import StopRequested, stop_check

    ev = threading.Event()
    check = stop_check(ev)
    check()  # nothing set: no stop
    ev.set()
    with pytest.raises(StopRequested):
        check()
    stop_check(None)()
    monkeypatch.setattr(ops, "abandoned", lambda: True)
    with pytest.raises(ops.Abandoned):  # an abandoned job stops as abandoned even when also cancelled
        check()


def test_scheduler_cancel_in_a_follow_up_keeps_the_slots_prefix(engine, px, spy):
    first = dict(video=px[2], prompt="hello", max_new_tokens=6, video_key="sf")
    follow = dict(video=px[2], prompt="and then?", max_new_tokens=6, video_key="sf")
    sched = engine.scheduler(max_num_seqs=2, max_seq_len=256)
    a = sched.make_sequence(Request(**first), 0)
    sched.run([a])
    ref = sched.make_sequence(Request(**follow), 0)
    sched.run([ref])
    assert ref.output.timings.get("prefix_cache_hit") == 1
    b = Request(**follow, cancel=threading.Event())
    spy.on_first = b.cancel.set
    spy.reset()
    sb = sched.make_sequence(b, 0)
    sched.run([sb])
    assert sb.output.finish_reason == "cancelled" and spy.calls["llm_last"] == 0
    assert sb.output.timings.get("prefix_cache_hit") == 1
    spy.on_first = None
    again = sched.make_sequence(Request(**follow), 0)
    sched.run([again])
    assert again.output.timings.get("prefix_cache_hit") == 1  # the prefix outlived the cancelled follow-up
    assert again.output.token_ids == ref.output.token_ids
