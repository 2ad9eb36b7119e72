"""A request that runs the device out of memory (its clip's preprocessing, vision tower or prefill) ends alone with
a typed DeviceMemoryError naming the stage and the allocator's message; the others in its batch get exactly their
one-at-a-time tokens, its slot is freed (a prefix it was writing is not reused), the failed step's tensors are
freed at once (the torch error, whose traceback holds them, is not kept), and the server answers 503.

The out-of-memory errors are planted: torch.OutOfMemoryError as CUDA raises it, and the CPU allocator's refusal."""
import gc
import weakref

import pytest
import torch

from pllava import ops
from pllava.errors import DeviceMemoryError, MemoryBudgetError
from pllava.sequence import Request

CUDA_OOM = ("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
            "1.02 GiB is free.\nIncluding non-PyTorch memory, this process has 78.06 GiB memory in use.")
CPU_OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
           "allocate 281474976710656 bytes. Error code 12 (Cannot allocate memory)")


def _alone(engine, reqs):
    return [engine.generate(r["video"], r["prompt"], max_new_tokens=r["max_new_tokens"]).token_ids for r in reqs]


def test_what_counts_as_out_of_memory():
    assert ops.out_of_memory(torch.OutOfMemoryError(CUDA_OOM))
    assert ops.out_of_memory(RuntimeError(CPU_OOM))
    assert not ops.out_of_memory(RuntimeError("shape mismatch")) and not ops.out_of_memory(MemoryError())
    with pytest.raises(RuntimeError) as real:  # the CPU allocator's real refusal (2^48 bytes), as the check reads it
        torch.empty(1 << 48, dtype=torch.uint8)
    assert ops.out_of_memory(real.value), real.value
    assert issubclass(DeviceMemoryError, MemoryBudgetError)


@pytest.mark.parametrize("message", [CUDA_OOM, CPU_OOM], ids=["cuda", "cpu"])
def test_a_vision_tower_out_of_memory_ends_that_request_alone(engine, pxs, monkeypatch, message):
    reqs = [dict(video=pxs[i], prompt="hello", max_new_tokens=8) for i in range(3)]
    want = _alone(engine, reqs)
    real = engine.encode

    def encode(px, *a, **k):
        if torch.equal(px, pxs[1]):
            activations = torch.empty(1 << 16)  # the failed step's tensor: its frame (the traceback's) alone holds it
            encode.ref = weakref.ref(activations)
            raise (torch.OutOfMemoryError(message) if message is CUDA_OOM else RuntimeError(message))
        return real(px, *a, **k)

    monkeypatch.setattr(engine, "encode", encode)
    outs = engine.generate_many(reqs, return_errors=True)
    first = message.splitlines()[0]
    assert outs[1].finish_reason == "error" and outs[1].token_ids == []
    assert outs[1].error.startswith("DeviceMemoryError: out of memory in the vision tower and projector (" + first[:40])
    assert [outs[0].token_ids, outs[2].token_ids] == [want[0], want[2]]
    kept = engine._sched
    assert all(o is None for o in kept.owner) and kept.prefilling is None and not kept.running
    # the failed step's tensor is freed while its request's error is still held (a server's client may read it
    # late): the torch error, whose traceback's frames hold that tensor, is not kept with it
    from pllava.scheduler import Scheduler

    sched = Scheduler(engine, max_num_seqs=2)
    try:
        seqs = [sched.make_sequence(Request(**r), i) for i, r in enumerate(reqs)]
        sched.run(seqs)
    finally:
        sched.stop()
    gc.collect()
    assert isinstance(seqs[1].error, DeviceMemoryError) and encode.ref() is None
    assert [seqs[0].tokens, seqs[2].tokens] == [want[0], want[2]]
    with pytest.raises(DeviceMemoryError, match=r"requests\[1\]: out of memory in the vision tower"):
        engine.generate_many(reqs)
    monkeypatch.setattr(engine, "encode", real)
    assert [o.token_ids for o in engine.generate_many(reqs)] == want  # nothing carried into the next call


def test_a_prefill_out_of_memory_ends_that_request_alone_and_its_slot_is_clean(engine, pxs, monkeypatch):
    """The long request's prefill runs out of memory after its video prefix [0, n_pre) went in and garbage was left in
    its slot: it ends, the short ones run, and its prefix is not marked reusable, so a follow-up on the same clip
    (the same video_key: a prefix hit, were it marked) gets its one-at-a-time tokens, not the garbage's."""
    question = "Describe every detail of the video, frame by frame. " * 4
    reqs = [dict(video=pxs[0], prompt="hello", max_new_tokens=8),
            dict(video=pxs[1], prompt=question, max_new_tokens=8, video_key="clip-1"),
            dict(video=pxs[2], prompt="a", max_new_tokens=8)]
    want = _alone(engine, reqs)
    lm = engine.model.language_model
    real = type(lm).forward_slots
    seen = []

    def forward_slots(self, x, rows, cache, stop=None):
        if rows.starts[0] > 0 and x.shape[1] > 30:  # the long question, after its video prefix
            seen.append(rows.slots[0])
            for k, v in zip(cache.k, cache.v):  # as if layers had run before the allocation failed
                k[rows.slots[0]].fill_(7.0)
                v[rows.slots[0]].fill_(-7.0)
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(self, x, rows, cache, stop=stop)

    monkeypatch.setattr(type(lm), "forward_slots", forward_slots)
    outs = engine.generate_many(reqs, max_batch_size=2, return_errors=True)
    assert len(seen) == 1
    assert outs[1].finish_reason == "error"
    assert outs[1].error.startswith("DeviceMemoryError: out of memory in prefill (positions "), outs[1].error
    assert [outs[0].token_ids, outs[2].token_ids] == [want[0], want[2]]
    sched = engine._sched
    assert all(o is None for o in sched.owner) and sched.prefix[seen[0]] is None
    monkeypatch.setattr(type(lm), "forward_slots", real)
    follow = dict(reqs[1], prompt="hello")
    got = engine.generate_many([reqs[1], follow], max_batch_size=1)
    assert [o.token_ids for o in got] == [want[1], _alone(engine, [follow])[0]]
    assert got[1].timings.get("prefix_cache_hit") == 1  # the follow-up reused the clean prefix the retry wrote


def test_a_decode_step_out_of_memory_still_fails_the_batch(engine, pxs, monkeypatch):
    """A batched decode step serves every running request at once: its failure is not one request's, so every
    request of the call ends with it, as for any failed step, and nothing is left behind."""
    reqs = [dict(video=pxs[i], prompt="hello", max_new_tokens=6) for i in range(2)]
    engine.generate_many(reqs)
    sched = engine._sched
    real = sched._decode

    def decode():
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(sched, "_decode", decode)
    with pytest.raises(torch.OutOfMemoryError):
        engine.generate_many(reqs)
    assert all(o is None for o in sched.owner) and not sched.running and sched.prefilling is None
    monkeypatch.setattr(sched, "_decode", real)
    assert [o.token_ids for o in engine.generate_many(reqs)] == _alone(engine, reqs)


def test_a_preprocessing_out_of_memory_is_typed_not_a_bug(engine, pxs, monkeypatch, caplog):
    real = engine.pixels

    def pixels(video, timings=None):
        if isinstance(video, torch.Tensor) and torch.equal(video, pxs[0]):
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(video, timings)

    monkeypatch.setattr(engine, "pixels", pixels)
    reqs = [dict(video=pxs[0], prompt="hi", max_new_tokens=5), dict(video=pxs[1], prompt="hi", max_new_tokens=5)]
    with caplog.at_level("WARNING", logger="pllava"):
        outs = engine.generate_many(reqs, return_errors=True)
    assert outs[0].error.startswith("DeviceMemoryError: out of memory in preprocessing its clip (CUDA out of memory")
    assert "(a bug)" not in caplog.text and "requests[0]: out of memory in preprocessing its clip" in caplog.text
    monkeypatch.setattr(engine, "pixels", real)
    assert outs[1].token_ids == _alone(engine, reqs[1:])[0]


def test_the_server_answers_503_with_retry_after():
    from pllava.protocol import to_api

    e = to_api(DeviceMemoryError("out of memory in prefill (CUDA out of memory. Tried to allocate 2.00 GiB)"))
    assert (e.status, e.type, e.code, e.headers) == (503, "ServiceUnavailableError", "out_of_memory",
                                                     {"Retry-After": "1"})
    assert "Tried to allocate 2.00 GiB" in e.message
    assert to_api(MemoryBudgetError("the prompt is 9000 tokens")).status == 400  # a request too long stays a 400



def test_generate_alone_raises_it_typed_and_the_next_call_is_clean(engine, pxs, monkeypatch):
    """The single-request path: the same DeviceMemoryError (the allocator's message kept), and neither the cache
    nor the prefix cache carries anything into the next call (a follow-up on the same clip prefills it afresh)."""
    want = engine.generate(pxs[0], "hello", max_new_tokens=8, video_key="c0").token_ids
    lm = engine.model.language_model
    real = type(lm).forward

    def forward(self, x, *a, **k):
        if x.shape[1] > 1:  # a prefill
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(self, x, *a, **k)

    monkeypatch.setattr(type(lm), "forward", forward)
    with pytest.raises(DeviceMemoryError, match=r"out of memory in generate\(\) \(CUDA out of memory\. Tried to "
                                                r"allocate 20\.00 GiB"):
        engine.generate(pxs[1], "hello", max_new_tokens=8, video_key="c1")
    monkeypatch.setattr(type(lm), "forward", real)
    got = engine.generate(pxs[0], "hello", max_new_tokens=8, video_key="c0")
    assert got.token_ids == want and "prefix_cache_hit" not in got.timings  # c1's failed prefill replaced c0's


def test_the_server_answers_503_and_serves_the_next_request(ckpts):
    """End to end over HTTP: the request whose vision tower runs out of memory gets 503 with Retry-After and
    code out_of_memory; the next one gets 200 and exactly generate()'s answer."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import base64

    import httpx

    import pllava
    from pllava.server import ServerConfig
    from pllava.testing import make_video
    from server_util import LiveServer

    engine = pllava.Engine.from_pretrained(ckpts["pllava"])
    path = make_video(str(ckpts["pllava"]) + "-oom.mp4", num_frames=12, size=(64, 48))
    raw = open(path, "rb").read()
    want = pllava.Engine.from_pretrained(ckpts["pllava"]).generate(path, [("user", "What is it?")], max_new_tokens=9)
    real, armed = engine.encode, []

    def encode(*a, **k):
        if armed and armed.pop():  # once, for the first request after the server is up (not its warm-up)
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(*a, **k)

    engine.encode = encode
    body = {"model": "tiny-pllava", "max_tokens": 9, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is it?"},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(raw).decode()}}]}]}
    with LiveServer(engine, ServerConfig(model_name="tiny-pllava", max_num_seqs=2)) as s:
        armed.append(True)
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 503 and r.headers.get("retry-after") == "1", r.text
        err = r.json()["error"]
        assert err["code"] == "out_of_memory" and err["type"] == "ServiceUnavailableError"
        assert "out of memory in the vision tower and projector (CUDA out of memory" in err["message"]
        ok = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == want.text
