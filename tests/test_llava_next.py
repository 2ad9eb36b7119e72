"""LLaVA-NeXT checkpoints as a training-free PLLaVA, and PLLaVA's <image>-as-pad embedding of generated ids."""
import json
import logging
import os

import pytest
import torch

import pllava
from pllava.errors import CheckpointError
from pllava.testing import make_tiny_checkpoint

SMALL = dict(num_frames=4, pooling_shape=(4, 3, 3))  # the tiny context cannot hold the default 16x12x12


@pytest.fixture(scope="module")
def next_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_next")
    return {lay: make_tiny_checkpoint(str(root / lay), lay, llava_next=True, shards=1) for lay in ("legacy", "current")}


def test_config_is_a_llava_next_config_to_transformers(next_ckpts):
    from transformers import AutoConfig, LlavaNextConfig

    hf = AutoConfig.from_pretrained(next_ckpts["legacy"])
    assert isinstance(hf, LlavaNextConfig) and hf.image_grid_pinpoints  # the fixture is a real LLaVA-NeXT config
    eng = pllava.Engine.from_pretrained(next_ckpts["legacy"], **SMALL)
    assert eng.config.image_token_index == hf.image_token_index
    assert eng.config.text.hidden_size == hf.text_config.hidden_size
    assert eng.config.pad_token_id == hf.pad_token_id


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_llava_next_runs_as_the_same_weights_llava(next_ckpts, ckpts, layout, caplog):
    """Same seed, same weights: the LLaVA-NeXT checkpoint answers as the llava-hf one (itself checked against
    transformers in test_parity), and says once that the anyres fields go unused."""
    with caplog.at_level(logging.INFO, logger="pllava"):
        eng = pllava.Engine.from_pretrained(next_ckpts[layout], **SMALL)
    notes = [r.getMessage() for r in caplog.records if "LLaVA-NeXT" in r.getMessage()]
    assert len(notes) == 1 and "image_grid_pinpoints" in notes[0] and "image_newline" in notes[0]
    ref = pllava.Engine.from_pretrained(ckpts["legacy"], **SMALL)
    px = torch.rand(4, 3, 42, 42, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(eng.prompt_logits(px, "What is it?"), ref.prompt_logits(px, "What is it?"),
                               rtol=0, atol=0)
    assert eng.generate(px, "What is it?", max_new_tokens=8).token_ids == \
        ref.generate(px, "What is it?", max_new_tokens=8).token_ids


def test_unknown_keys_are_still_refused(next_ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bad"
    d.mkdir()
    for f in os.listdir(next_ckpts["legacy"]):
        if not f.endswith(".safetensors"):
            (d / f).write_bytes(open(os.path.join(next_ckpts["legacy"], f), "rb").read())
    sd = load_file(os.path.join(next_ckpts["legacy"], "model.safetensors"))
    sd["image_newline_extra"] = torch.zeros(3)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected key 'image_newline_extra'"):
        pllava.Engine.from_pretrained(str(d), **SMALL)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llava_onevision"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(pllava.ConfigError, match="model_type"):
        pllava.Engine.from_pretrained(str(d), **SMALL)


def test_a_generated_image_token_is_fed_back_as_pad(ckpts):
    """PLLaVA's forward embeds input_ids with every <image> id replaced by pad_token_id. Make the model emit
    <image> first (its lm_head row is the favourite's, scaled up) and poison <image>'s own embedding with NaN: the
    next token must be the one that follows an explicit <pad> (teacher-forced), and nothing may turn NaN."""
    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    lm = eng.model.language_model
    img, pad = eng.config.image_token_index, eng.config.pad_token_id
    px = torch.rand(4, 3, 42, 42, generator=torch.Generator().manual_seed(4))
    prompt = "USER:<image> hi ASSISTANT:"
    with torch.no_grad():
        top = int(eng.prompt_logits(px, prompt, conv_mode="raw")[-1].argmax())
        lm.lm_head.weight[img] = lm.lm_head.weight[top] * 1.05
        lm.embed_tokens.weight[img] = float("nan")
        after_pad = int(eng.prompt_logits(px, prompt + "<pad>", conv_mode="raw")[-1].argmax())
    assert eng.tokenizer(prompt + "<pad>")["input_ids"][-1] == pad
    out = eng.generate(px, prompt, conv_mode="raw", max_new_tokens=2)
    assert out.token_ids == [img, after_pad] and after_pad != img
