"""PLLaVA's conversation templates rendered exactly as its Conversation.get_prompt does."""
import pytest

from pllava.prompt import ALIASES, TEMPLATES, build_prompt


def test_plain_matches_pllava_demo_format():
    # conv_plain_v1: system "", roles ("USER:", "ASSISTANT:"), seps (" ", "</s>"), MM_INTERLEAF, mm_token "<image>"
    assert build_prompt("Describe the video.", "plain") == "USER:<image> Describe the video. ASSISTANT:"


def test_vcg_mm_alone_repeats_user_role():
    p = build_prompt("What is he doing?", "vcg")
    assert p.startswith("You are Video-ChatGPT, a large vision-language assistant. ")
    assert p.endswith(" USER: <image>\n USER: What is he doing? ASSISTANT:")


def test_mvbench_answer_prompt_and_post_query():
    p = build_prompt("Q?\n(A) x\n(B) y", "eval_mvbench")
    assert p.endswith("USER: <image>\n USER: Q?\n(A) x\n(B) y \nOnly give the best option. ASSISTANT:Best option:(")
    assert p.startswith("Carefully watch the video")


def test_videoqa_pre_post_and_answer():
    p = build_prompt("who?", "videoqa")
    assert p.startswith("USER: <image>\n The input consists of a sequence of key frames")
    assert p.endswith("Question: who? \n ASSISTANT:\nAnswer: In the video,")


def test_chatml_variants():
    p = build_prompt("hi", "vcg_chatml")
    assert p.endswith("<|im_end|>\n<|im_start|>user\n<image>\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                      "<|im_start|>assistant\n")
    q = build_prompt("who?", "eval_videoqa_llavanext")
    assert q.startswith("<|im_start|>system\nAnswer the question.<|im_end|>\n<|im_start|>user\n<image>\n The input")


def test_every_template_has_one_image_token_and_aliases_resolve():
    for name in list(TEMPLATES) + list(ALIASES):
        assert build_prompt("question", name).count("<image>") == 1, name
    assert build_prompt("a <image> b", "raw") == "a <image> b"
    with pytest.raises(ValueError):
        build_prompt("x", "unknown")
