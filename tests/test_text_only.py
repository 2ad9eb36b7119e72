"""video=None: the LLM alone answers a text-only prompt (the authors' user_query(q) without is_mm), in
generate(), generate_many() and Engine.chat, against transformers' model on the tokenizer's ids of the literal
prompt."""
import glob
import os

import pytest
import torch

from oracle import load_oracle, oracle_greedy, read_lora
from pllava.errors import PromptError



@pytest.fixture(scope="module")
def oracle(ckpts):
    return load_oracle(ckpts["current"], read_lora(sorted(glob.glob(os.path.join(ckpts["pllava"], "*.safetensors")))),
                       4.0)


def _want(engine, oracle, literal, n):
    ids = torch.tensor(engine.tokenizer(literal)["input_ids"])
    with torch.no_grad():
        emb = oracle.model.language_model.embed_tokens(ids)
    return len(ids), oracle_greedy(oracle, emb, n, engine.eos_ids)


def test_text_only_generate_matches_transformers(engine, oracle):
    literal = "USER:What is a video? ASSISTANT:"  # conv_plain_v1 after user_query(q) (no is_mm)
    n_prompt, want = _want(engine, oracle, literal, 8)
    out = engine.generate(None, "What is a video?", max_new_tokens=8)
    assert out.num_prompt_tokens == n_prompt and out.token_ids == want
    assert "vision" not in out.timings and "video_decode" not in out.timings
    raw = engine.generate(None, literal, conv_mode="raw", max_new_tokens=8)
    assert raw.token_ids == want
    turns = [("user", "Hi."), ("assistant", "Hello."), ("user", "What is a video?")]
    n2, want2 = _want(engine, oracle, "USER:Hi. ASSISTANT:Hello.</s>USER:What is a video? ASSISTANT:", 6)
    two = engine.generate(None, turns, max_new_tokens=6)
    assert two.num_prompt_tokens == n2 and two.token_ids == want2


def test_text_only_in_a_batch_beside_videos(engine):
    px = torch.rand(4, 3, 42, 42, generator=torch.Generator().manual_seed(5))
    reqs = [dict(video=None, prompt="What is a video?", max_new_tokens=8),
            dict(video=px, prompt="What is it?", max_new_tokens=8),
            dict(video=None, prompt=[("user", "Hi."), ("assistant", "Hello."), ("user", "Why?")], max_new_tokens=5)]
    got = engine.generate_many(reqs, max_batch_size=3)
    for r, o in zip(reqs, got):
        want = engine.generate(r["video"], r["prompt"], max_new_tokens=r["max_new_tokens"])
        assert o.token_ids == want.token_ids and o.num_prompt_tokens == want.num_prompt_tokens


def test_text_only_refuses_an_image_token(engine):
    with pytest.raises(PromptError, match="no video was given"):
        engine.generate(None, "look: <image>", conv_mode="raw", max_new_tokens=2)
    with pytest.raises(PromptError, match="no video was given"):
        engine.generate_many([dict(video=None, prompt="USER: <image> x", conv_mode="raw")])
