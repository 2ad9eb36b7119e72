"""Config parsing: llava-hf defaults, RoPE scaling, GQA, tied heads and Mistral configs against transformers."""
import json
import os

import pytest
import torch

import pllava
from pllava.config import parse_config
from pllava.errors import ConfigError
from pllava.testing import make_tiny_checkpoint


def _base(ckpts):
    with open(os.path.join(ckpts["current"], "config.json")) as f:
        return json.load(f)


def test_llava_hf_config_gets_pllava_defaults(ckpts):
    d = _base(ckpts)
    for k in ("pooling_shape", "num_frames", "frame_shape"):
        d.pop(k)
    cfg = parse_config(d)
    assert cfg.pooling_shape == (16, 12, 12) and cfg.num_frames == 16 and cfg.frame_shape == (6, 6)
    assert cfg.vision_layers_run == 2  # layer -2 of 3: the last layer is never built


def test_frame_shape_must_match_vision_grid(ckpts):
    d = dict(_base(ckpts), frame_shape=[24, 24])
    with pytest.raises(ConfigError, match="frame_shape"):
        parse_config(d)


def test_unsupported_rope_type_is_named(ckpts):
    d = _base(ckpts)
    d["text_config"] = dict(d["text_config"], rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="dynamic"):
        parse_config(d)


@pytest.mark.parametrize("name,text", [
    ("linear", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 50000.0}),
    ("llama3", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("tied_mha", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
    ("mistral", {"model_type": "mistral", "sliding_window": 4096, "rope_theta": 1e6}),
    ("mistral_window", {"model_type": "mistral", "sliding_window": 40}),
])
def test_text_variants_match_transformers(tmp_path, name, text):
    from transformers import AutoModelForCausalLM

    d = make_tiny_checkpoint(str(tmp_path / name), "current", text=text, shards=1)
    eng = pllava.Engine.from_pretrained(d)
    ref = AutoModelForCausalLM.from_config(eng.config.text.hf, dtype=torch.float32)
    from safetensors.torch import load_file

    sd = load_file(os.path.join(d, "model.safetensors"))
    lm_sd = {k.replace("model.language_model.", "model."): v for k, v in sd.items() if "language_model" in k}
    if "lm_head.weight" in sd:
        lm_sd["lm_head.weight"] = sd["lm_head.weight"]
    missing, unexpected = ref.load_state_dict(lm_sd, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    ref.tie_weights()
    ref.eval()
    ids = torch.randint(3, 200, (1, 300))
    lm = eng.model.language_model
    lm.setup_cache(1, 300, torch.float32, "cpu")
    with torch.no_grad():
        got = lm(lm.embed_tokens(ids), torch.arange(300), all_logits=True, start=0)
        want = ref(input_ids=ids).logits
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-4
