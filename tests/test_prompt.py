"""Prompts against strings the PLLaVA authors' own code renders (tests/fixtures/prompts_pllava.json, written by
tests/fixtures/make_prompt_fixtures.py running their Conversation, ChatPllava.ask and the scripts' flows), plus
a few literals typed from their code for reading."""
import json
from pathlib import Path

import pytest

from pllava.errors import PromptError
from pllava.prompt import CONV_MODES, RECIPES, TEMPLATES, build_chat_prompt, build_prompt, recipe

FIX = json.loads((Path(__file__).parent / "fixtures" / "prompts_pllava.json").read_text())


def _ids(cases):
    return [f"{c['conv_mode']}:{i}" for i, c in enumerate(cases)]


def test_fixture_covers_every_name():
    assert {c["conv_mode"] for c in FIX["templates"]} == set(TEMPLATES)  # all of their conv_templates
    assert {c["conv_mode"] for c in FIX["recipes"] + FIX["chats"]} >= set(RECIPES)


@pytest.mark.parametrize("case", FIX["templates"], ids=_ids(FIX["templates"]))
def test_template_renders_authors_single_question(case):
    assert build_prompt(case["question"], case["conv_mode"]) == case["prompt"]
    assert build_chat_prompt([("user", case["question"])], case["conv_mode"]) == case["prompt"]


@pytest.mark.parametrize("case", FIX["recipes"], ids=_ids(FIX["recipes"]))
def test_recipe_renders_benchmark_script(case):
    assert build_prompt(case["question"], case["conv_mode"]) == case["prompt"]


@pytest.mark.parametrize("case", FIX["chats"], ids=_ids(FIX["chats"]))
def test_chat_renders_demo_flow(case):
    turns = [tuple(t) for t in case["turns"]]
    assert build_chat_prompt(turns, case["conv_mode"]) == case["prompt"]
    if len(turns) == 1:  # the demo recipes: a single question is the demo's first question too
        assert build_prompt(turns[0][1], case["conv_mode"]) == case["prompt"]


def test_literals():
    # conv_plain_v1: roles ("USER:", "ASSISTANT:"), MM_INTERLEAF with '<image>' and a space
    assert build_prompt("Describe the video.", "plain") == "USER:<image> Describe the video. ASSISTANT:"
    # bare eval_mvbench: no post query, no pre-filled answer
    assert build_prompt("Q?", "eval_mvbench").endswith(" USER: <image>\n USER: Q? ASSISTANT:")
    assert build_prompt("Q?", "mvbench").endswith(" USER: Q? \nOnly give the best option. ASSISTANT:Best option:(")
    # bare eval_videoqabench: its pre/post prompts are fields user_query does not apply
    assert build_prompt("who?", "eval_videoqabench") == "USER: <image>\n who? ASSISTANT:"
    assert build_prompt("who?", "videoqa").endswith("Question: who? \n ASSISTANT:\nAnswer: In the video,")
    # the demo's chat: the upload is its own (empty-question) user message
    assert build_chat_prompt([("user", "a"), ("assistant", "b"), ("user", "c")], "plain") == \
        "USER:<image>  USER:a ASSISTANT:b</s>USER:c ASSISTANT:"


def test_recipe_answer_postprocessing_as_scripts_record_it():
    assert recipe("mvbench").answer("A) cooking") == "(A) cooking"  # return_prompt '(' put back
    assert recipe("mvbench").answer("B) x  \n") == "(B) x"
    assert recipe("videoqabench").answer(" he cooks. ") == "he cooks."
    assert recipe("vcgbench").answer(" text ") == "text"  # pllava_answer's strip
    assert recipe("eval_vcgbench") is None and recipe("vcg") is RECIPES["vcgbench"]
    assert RECIPES["vcgbench"].sampling == {"max_new_tokens": 100, "stop": ["###", "USER"]}


def test_every_name_has_one_image_token_and_errors_are_typed():
    for name in CONV_MODES:
        if name != "raw":
            assert build_prompt("question", name).count("<image>") == 1, name
            assert build_chat_prompt([("user", "q"), ("assistant", "a"), ("user", "q2")], name).count("<image>") == 1
    assert build_prompt("a <image> b", "raw") == "a <image> b"
    with pytest.raises(PromptError, match="conv_mode 'unknown'"):
        build_prompt("x", "unknown")
    with pytest.raises(PromptError, match="raw"):
        build_chat_prompt([("user", "a <image>")], "raw")
    with pytest.raises(PromptError, match="conv_mode must be a str"):
        build_prompt("x", 3)


def test_default_question_per_mode():
    from pllava.prompt import CAPTION_QUESTION, RECAPTION_QUERY, default_question

    assert default_question("recaption") == default_question("recaption_chatml") == RECAPTION_QUERY
    assert default_question(None) == default_question("mvbench") == default_question("raw") == CAPTION_QUESTION
    assert RECAPTION_QUERY in next(c["prompt"] for c in FIX["recipes"] if c["conv_mode"] == "recaption")
