"""OpenAI-client conventions of `pllava serve`: models.list / models.retrieve, real `created`, unknown models as
404 in the error shape, `n` choices, text-only chats, the clip in an earlier message."""
import time

import httpx
import pytest

import pllava
from pllava.server import ServerConfig
from pllava.testing import make_video
from server_util import LiveServer

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")



@pytest.fixture(scope="module")
def served(engine, tmp_path_factory):
    d = tmp_path_factory.mktemp("oa")
    clip = make_video(str(d / "clip.mp4"), num_frames=30, size=(80, 60))
    cfg = ServerConfig(model_name="tiny-pllava", allowed_local_media_path=str(d), max_frames=32,
                       max_new_tokens_limit=64, max_num_seqs=4)
    t0 = int(time.time())
    with LiveServer(engine, cfg) as s:
        yield s, clip, t0


@pytest.fixture(scope="module")
def client(served):
    s, _, _ = served
    return openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)


def _video_part(clip):
    return {"type": "video_url", "video_url": {"url": clip}}


def test_models_list_and_retrieve(client, served):
    _, _, t0 = served
    listed = client.models.list().data
    assert [m.id for m in listed] == ["tiny-pllava"]
    got = client.models.retrieve("tiny-pllava")
    assert got.id == "tiny-pllava" and got.object == "model"
    assert t0 - 5 <= got.created <= int(time.time()) and listed[0].created == got.created  # when it was loaded
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.status_code == 404 and "The model `gpt-9` does not exist." in str(e.value)


def test_unknown_model_is_404_in_the_error_shape(served):
    s, clip, _ = served
    r = httpx.post(s.url + "/v1/chat/completions", timeout=60, json={
        "model": "nope", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, _video_part(clip)]}]})
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "The model `nope` does not exist.", "type": "NotFoundError",
                                 "param": "model", "code": "model_not_found"}


def test_chat_streamed_and_not_with_the_official_client(client, served, engine):
    _, clip, _ = served
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is happening?"}, _video_part(clip)]}]
    r = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=8)
    want = engine.generate(pllava.read_frames(clip, engine.config.num_frames), "What is happening?", max_new_tokens=8)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.num_prompt_tokens
    assert abs(r.created - time.time()) < 120
    parts = [c.choices[0].delta.content for c in client.chat.completions.create(
        model="tiny-pllava", messages=msgs, max_tokens=8, stream=True) if c.choices and c.choices[0].delta.content]
    assert "".join(parts) == want.text


def test_n_choices(client, served):
    _, clip, _ = served
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is happening?"}, _video_part(clip)]}]
    greedy = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=6, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1  # greedy: the same answer thrice
    one = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=6)
    assert greedy.choices[0].message.content == one.choices[0].message.content
    assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
    sampled = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=12, n=3,
                                             temperature=1.0, seed=7)
    texts = [c.message.content for c in sampled.choices]
    assert len(set(texts)) > 1  # seeds 7, 8, 9: different samples
    again = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=12, n=3, temperature=1.0,
                                           seed=7)
    assert [c.message.content for c in again.choices] == texts
    single = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=12, temperature=1.0,
                                            seed=8)
    assert single.choices[0].message.content == texts[1]  # choice i is the request with seed + i
    for bad_n, kw in ((0, {}), (5, {}), (2, {"stream": True})):  # 5 > --max-num-seqs 4
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=4, n=bad_n, **kw)
        assert "'n'" in str(e.value)


def test_text_only_chat_is_answered_by_the_llm(client, engine):
    r = client.chat.completions.create(model="tiny-pllava", max_tokens=6,
                                       messages=[{"role": "user", "content": "What is a video?"}])
    want = engine.generate(None, "What is a video?", max_new_tokens=6)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.num_prompt_tokens


def test_clip_in_an_earlier_message(client, served, engine):
    _, clip, _ = served
    msgs = [{"role": "user", "content": [_video_part(clip), {"type": "text", "text": "What is happening?"}]},
            {"role": "assistant", "content": "Shapes move."},
            {"role": "user", "content": "Which way?"}]
    r = client.chat.completions.create(model="tiny-pllava", messages=msgs, max_tokens=6)
    literal = "USER:<image>  USER:What is happening? ASSISTANT:Shapes move.</s>USER:Which way? ASSISTANT:"
    want = engine.generate(pllava.read_frames(clip, engine.config.num_frames), literal, conv_mode="raw",
                           max_new_tokens=6)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.num_prompt_tokens
