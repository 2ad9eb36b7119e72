"""Engine.chat (the demo's ChatPllava flow) and the recipes on a real (tiny) engine: what reaches the model is the
tokenizer applied to the literal prompt the authors' code renders (tests/fixtures/prompts_pllava.json)."""
import json
from pathlib import Path

import pytest

import pllava
from pllava.errors import PromptError
from pllava.prompt import DEMO_SYSTEM

FIX = json.loads((Path(__file__).parent / "fixtures" / "prompts_pllava.json").read_text())


def _fixture(kind, conv_mode, n_turns=None):
    for c in FIX[kind]:
        if c["conv_mode"] == conv_mode and (n_turns is None or len(c["turns"]) == n_turns):
            return c
    raise KeyError(conv_mode)



def _n_prompt(engine, literal):
    ids = engine.tokenizer(literal)["input_ids"]
    return len(ids) - 1 + engine.config.num_visual_tokens


def test_chat_sends_the_demos_prompt_and_reuses_the_clip(engine, video_path):
    case = _fixture("chats", "demo", 3)
    chat = engine.chat(video_path, max_new_tokens=5)
    assert chat.conv_mode == "demo" and chat.prompt(case["turns"][0][1]) == _fixture("chats", "demo", 1)["prompt"]
    first = chat.ask(case["turns"][0][1])
    assert first.num_prompt_tokens == _n_prompt(engine, _fixture("chats", "demo", 1)["prompt"])
    chat.history[-1] = ("assistant", case["turns"][1][1])  # the fixture's answer, to compare its prompt
    assert chat.prompt(case["turns"][2][1]) == case["prompt"]
    second = chat.ask(case["turns"][2][1])
    assert second.num_prompt_tokens == _n_prompt(engine, case["prompt"])
    assert second.timings.get("prefix_cache_hit") == 1  # the system + video message head is shared by every turn
    cold = pllava.Engine.from_pretrained(engine.model_dir)
    cold.prefix_cache = False
    want = cold.generate(video_path, case["prompt"], conv_mode="raw", max_new_tokens=5)
    assert second.token_ids == want.token_ids
    assert [r for r, _ in chat.history] == ["user", "assistant"] * 2 and chat.history[-1][1] == second.text
    chat.reset()
    assert chat.history == []


def test_chat_with_a_template_and_history(engine, video_path):
    case = _fixture("chats", "eval_vcgbench", 3)
    chat = engine.chat(video_path, conv_mode="eval_vcgbench", history=case["turns"][:2])
    assert chat.prompt(case["turns"][2][1]) == case["prompt"]
    # a chat's first question already has the clip in a message of its own (the demo's upload_video)
    assert engine.chat(video_path, conv_mode="plain").prompt("q") == "USER:<image>  USER:q ASSISTANT:"
    assert engine.chat(video_path, system="S.").prompt("q").startswith("S. USER:<image>  USER:q")
    assert DEMO_SYSTEM in engine.chat(video_path).prompt("q")
    with pytest.raises(PromptError, match="conv_mode 'nope'"):
        engine.chat(video_path, conv_mode="nope")
    with pytest.raises(PromptError, match="prompt\\[1\\]"):
        engine.chat(video_path, history=[("user", "a"), ("robot", "b")])


def test_generate_turns_and_recipes_reach_the_model_as_the_literal_prompt(engine, video_path):
    case = _fixture("chats", "eval_mvbench", 3)
    out = engine.generate(video_path, [tuple(t) for t in case["turns"]], conv_mode="eval_mvbench", max_new_tokens=3)
    assert out.num_prompt_tokens == _n_prompt(engine, case["prompt"])
    raw = engine.generate(video_path, case["prompt"], conv_mode="raw", max_new_tokens=3)
    assert out.token_ids == raw.token_ids
    for name in ("mvbench", "videoqabench", "vcgbench"):
        c = next(c for c in FIX["recipes"] if c["conv_mode"] == name)
        got = engine.generate(video_path, c["question"], conv_mode=name, max_new_tokens=2)
        assert got.num_prompt_tokens == _n_prompt(engine, c["prompt"]), name


def test_caption_uses_the_recaption_recipes_query(engine, video_path):
    c = _fixture("recipes", "recaption")
    # The recaption query is ~900 tokens for the tiny checkpoint's tokenizer, over its 512 context: the prompt
    # length the refusal names is the literal prompt's.
    with pytest.raises(PromptError, match=f"the prompt is {_n_prompt(engine, c['prompt'])} tokens"):
        engine.caption(video_path, conv_mode="recaption", max_new_tokens=4)
    plain = engine.generate(video_path, "Describe the video in details.", max_new_tokens=4).text
    assert engine.caption(video_path, max_new_tokens=4) == plain
