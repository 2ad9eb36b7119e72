"""The README's claims, each with a test that fails if the claim is false: the default alpha of PEFT adapters,
rsLoRA, `adapter=`, RoPE yarn, sliding-window attention in cached decode, ChatML chosen for <|im_start|>
tokenizers, max_new_tokens cut to the context, `cancel`, and stop strings cut from text but kept in token_ids.
Oracles are transformers' own modules and config classes, the tokenizer on literal prompts, or arithmetic."""
import json
import logging
import os
import threading

import pytest
import torch

import pllava
from oracle import load_oracle, oracle_embeds, oracle_greedy, oracle_inputs, oracle_logits
from pllava.testing import make_tiny_checkpoint

Q = "What is happening in the video?"


def _px(seed=0, n=4):
    return torch.randn(n, 3, 42, 42, generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_peft_adapter_defaults_to_alpha_4_whatever_it_was_trained_with(tmp_path):
    adir = make_tiny_checkpoint(str(tmp_path / "a"), "adapter", adapter_alpha=32.0, shards=1)
    assert json.load(open(os.path.join(adir, "adapter_config.json")))["lora_alpha"] == 32.0
    eng = pllava.Engine.from_pretrained(adir)
    assert eng.lora_alpha == 4.0 and eng.config.lora.scale == pytest.approx(4.0 / 8)
    got = eng.prompt_logits(_px(), Q)
    at4 = pllava.Engine.from_pretrained(adir, lora_alpha=4).prompt_logits(_px(), Q)
    at32 = pllava.Engine.from_pretrained(adir, lora_alpha=32).prompt_logits(_px(), Q)
    assert torch.equal(got, at4) and not torch.allclose(got, at32, atol=1e-4)


def test_rslora_scales_by_alpha_over_sqrt_r(tmp_path):
    adir = make_tiny_checkpoint(str(tmp_path / "a"), "adapter", shards=1)
    rs = tmp_path / "rs"
    rs.mkdir()
    for f in os.listdir(adir):
        (rs / f).write_bytes(open(os.path.join(adir, f), "rb").read())
    cfg = json.load(open(rs / "adapter_config.json"))
    cfg["use_rslora"] = True
    (rs / "adapter_config.json").write_text(json.dumps(cfg))
    eng = pllava.Engine.from_pretrained(str(rs), lora_alpha=4)
    assert eng.config.lora.scale == pytest.approx(4 / 8 ** 0.5)
    # alpha / sqrt(r) == alpha' / r for alpha' = alpha * sqrt(r): the plain adapter at that alpha is the oracle
    plain = pllava.Engine.from_pretrained(adir, lora_alpha=4 * 8 ** 0.5)
    torch.testing.assert_close(eng.prompt_logits(_px(), Q), plain.prompt_logits(_px(), Q), rtol=0, atol=1e-5)
    assert not torch.allclose(eng.prompt_logits(_px(), Q),
                              pllava.Engine.from_pretrained(adir, lora_alpha=4).prompt_logits(_px(), Q), atol=1e-4)


def test_adapter_argument_over_a_base(ckpts):
    adir = ckpts["adapter"]
    base = os.path.dirname(adir)
    a = pllava.Engine.from_pretrained(base, adapter=adir)
    b = pllava.Engine.from_pretrained(adir)
    assert a.config.lora.r == 8 and torch.equal(a.prompt_logits(_px(), Q), b.prompt_logits(_px(), Q))
    plain = pllava.Engine.from_pretrained(base)
    assert plain.config.lora.r == 0 and not torch.allclose(plain.prompt_logits(_px(), Q), a.prompt_logits(_px(), Q),
                                                           atol=1e-4)


def _parity(model_dir, steps=16):
    """Engine vs transformers (prefill logits and greedy tokens, the oracle recomputing every step)."""
    eng = pllava.Engine.from_pretrained(model_dir)
    ref = load_oracle(model_dir)
    ids, image_token, pooling, frames, eos = oracle_inputs(model_dir)
    px = _px(3)
    emb = oracle_embeds(ref, px, ids, image_token, pooling, frames)
    with torch.no_grad():
        rel = _rel(eng.prompt_logits(px, Q), oracle_logits(ref, emb))
    return eng, rel, eng.generate(px, Q, max_new_tokens=steps).token_ids, oracle_greedy(ref, emb, steps, eos)


def test_rope_yarn_matches_transformers(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    d = make_tiny_checkpoint(str(tmp_path / "yarn"), "current", shards=1,
                             text={"rope_scaling": rope, "rope_theta": 10000.0})
    eng, rel, got, want = _parity(d)
    assert eng.model.language_model.config.rope_parameters.get("rope_type") == "yarn"
    assert rel <= 1e-4 and got == want
    plain = make_tiny_checkpoint(str(tmp_path / "plain"), "current", shards=1)
    assert not torch.allclose(eng.prompt_logits(_px(3), Q), pllava.Engine.from_pretrained(plain).prompt_logits(
        _px(3), Q), atol=1e-3), "yarn must change this model's logits, or the test proves nothing"


def test_sliding_window_in_cached_decode_matches_transformers(tmp_path):
    """Mistral with a 24-position window under a ~60-position prompt: every decode step must attend to the last 24
    positions only, as transformers' mask does on its full recompute."""
    d = make_tiny_checkpoint(str(tmp_path / "mistral"), "current", shards=1,
                             text={"model_type": "mistral", "sliding_window": 24, "head_dim": 16})
    eng, rel, got, want = _parity(d, steps=20)
    assert eng.config.text.sliding_window == 24
    assert rel <= 1e-4 and got == want
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["text_config"]["sliding_window"] = None
    wide = tmp_path / "wide"
    wide.mkdir()
    for f in os.listdir(d):
        (wide / f).write_bytes(open(os.path.join(d, f), "rb").read())
    (wide / "config.json").write_text(json.dumps(cfg))
    assert pllava.Engine.from_pretrained(str(wide)).generate(_px(3), Q, max_new_tokens=20).token_ids != got


def test_chatml_is_chosen_for_an_im_start_tokenizer(tmp_path):
    d = make_tiny_checkpoint(str(tmp_path / "yi"), "pllava", chatml=True, shards=1)
    eng = pllava.Engine.from_pretrained(d)
    assert eng.conv_mode == "eval_vcg_llavanext"
    literal = ("You are Video-ChatGPT, a large vision-language assistant. You are able to understand the video content "
               "that the user provides, and assist the user with a variety of tasks using natural language.Follow the "
               "instructions carefully and explain your answers in detail based on the provided video.<|im_end|>\n"
               "<|im_start|>user\n<image>\n<|im_end|>\n<|im_start|>user\nWhat?<|im_end|>\n<|im_start|>assistant\n")
    out = eng.generate(_px(), "What?", max_new_tokens=2)
    assert out.num_prompt_tokens == len(eng.tokenizer(literal)["input_ids"]) - 1 + eng.config.num_visual_tokens
    assert eng.generate(_px(), literal, conv_mode="raw", max_new_tokens=2).token_ids == out.token_ids


def test_max_new_tokens_is_cut_to_the_context(ckpts, caplog):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    eng.eos_ids = set()  # no EOS: generation runs to the cut
    ctx = eng.config.text.max_position_embeddings
    with caplog.at_level(logging.WARNING, logger="pllava"):
        out = eng.generate(_px(), Q, max_new_tokens=10_000)
    assert len(out.token_ids) == ctx - out.num_prompt_tokens and out.finish_reason == "length"
    assert any(f"cut to {ctx - out.num_prompt_tokens}" in r.getMessage() for r in caplog.records)


def test_cancel_stops_at_the_next_token(ckpts):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    eng.eos_ids = set()
    cancel = threading.Event()
    pieces = 0
    timings = {}
    for _ in eng.stream(_px(), Q, max_new_tokens=200, cancel=cancel, timings=timings):
        pieces += 1
        if pieces == 3:
            cancel.set()
    assert pieces == 3 and timings["decode_tokens"] < 10  # a few tokens, not 200
    cancel2 = threading.Event()
    cancel2.set()
    out = eng.generate(_px(), Q, max_new_tokens=200, cancel=cancel2)
    assert out.finish_reason == "cancelled" and out.token_ids == []  # stopped before the vision tower


def test_stop_string_is_cut_from_text_and_kept_in_token_ids(ckpts):
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    eng.eos_ids = set()
    full = eng.generate(_px(), Q, max_new_tokens=24)
    stop = full.text[6:9]
    assert len(stop) == 3 and stop in full.text
    out = eng.generate(_px(), Q, max_new_tokens=24, stop=[stop])
    assert out.finish_reason == "stop" and out.text == full.text[:full.text.index(stop)]
    assert stop in eng.tokenizer.decode(out.token_ids) and out.token_ids == full.token_ids[:len(out.token_ids)]
