"""Every bad input named in the engine-core issue gives a typed error naming what was wrong."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import pllava
from pllava.errors import CheckpointError, ConfigError, PromptError, TokenizerError


def _copy(src, tmp_path, name="m"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _single_file(d):
    return [f for f in os.listdir(d) if f.endswith(".safetensors")]


def _drop(sd):
    del sd["language_model.model.layers.1.mlp.up_proj.weight"]


def _add(sd):
    sd["language_model.model.layers.0.mlp.extra.weight"] = torch.zeros(3, 3)


def _reshape(sd):
    sd["multi_modal_projector.linear_2.weight"] = torch.zeros(64, 60)


@pytest.mark.parametrize("edit,message", [
    (_drop, r"missing key 'language_model\.model\.layers\.1\.mlp\.up_proj\.weight'.*\[128, 64\]"),
    (_add, r"unexpected key 'language_model\.model\.layers\.0\.mlp\.extra\.weight'"),
    (_reshape, r"multi_modal_projector\.linear_2\.weight' has shape \[64, 60\].*\[64, 64\]"),
], ids=["missing", "unexpected", "shape"])
def test_bad_keys_are_named(ckpts, tmp_path, edit, message):
    d = _copy(ckpts["legacy"], tmp_path)  # legacy is a single model.safetensors
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        pllava.Engine.from_pretrained(str(d))


def test_pllava_layout_missing_lora_key(ckpts, tmp_path):
    d = _copy(ckpts["pllava"], tmp_path)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    key = "language_model.base_model.model.model.layers.0.self_attn.v_proj.lora_B.default.weight"
    fn = idx["weight_map"].pop(key)
    sd = load_file(d / fn)
    del sd[key]
    save_file(sd, d / fn)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"missing key '" + key.replace(".", r"\.") + "'"):
        pllava.Engine.from_pretrained(str(d))


def test_truncated_shard_names_file(ckpts, tmp_path):
    d = _copy(ckpts["pllava"], tmp_path)
    shard = sorted(f for f in _single_file(d))[1]
    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=shard):
        pllava.Engine.from_pretrained(str(d))


def test_shard_listed_but_missing(ckpts, tmp_path):
    d = _copy(ckpts["pllava"], tmp_path)
    shard = sorted(_single_file(d))[0]
    os.remove(d / shard)
    with pytest.raises(CheckpointError, match=shard):
        pllava.Engine.from_pretrained(str(d))


def test_image_token_index_unknown_to_tokenizer(ckpts, tmp_path):
    d = _copy(ckpts["pllava"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["image_token_index"] = 7
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match="image_token_index"):
        pllava.Engine.from_pretrained(str(d))


def test_config_field_errors(ckpts, tmp_path):
    d = _copy(ckpts["pllava"], tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    bad = dict(cfg, pooling_shape=[4, 0, 3])
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="pooling_shape"):
        pllava.Engine.from_pretrained(str(d))
    bad = dict(cfg, model_type="bert")
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="model_type"):
        pllava.Engine.from_pretrained(str(d))
    (d / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        pllava.Engine.from_pretrained(str(d))



def _px(engine):
    s = engine.config.vision.image_size
    return torch.randn(engine.config.num_frames, 3, s, s)


def test_prompt_with_zero_or_two_image_tokens(engine):
    with pytest.raises(PromptError, match="exactly one '<image>'.*found 0"):
        engine.generate(_px(engine), "USER: hi ASSISTANT:", conv_mode="raw", max_new_tokens=2)
    with pytest.raises(PromptError, match="found 2"):
        engine.generate(_px(engine), "USER: <image> <image> hi ASSISTANT:", conv_mode="raw", max_new_tokens=2)
    with pytest.raises(PromptError, match="found 2"):  # vcg puts its own <image> in a message of its own
        engine.generate(_px(engine), "<image> what?", conv_mode="vcg", max_new_tokens=2)


def test_prompt_over_context_fails_before_compute(engine, monkeypatch):
    calls = []
    monkeypatch.setattr(engine.model.vision_tower, "forward", lambda *a: calls.append(1))
    long = "video " * 600  # ~600+ tokens against a 512-token context
    with pytest.raises(PromptError, match="max_position_embeddings.*512"):
        engine.generate(_px(engine), long, max_new_tokens=4)
    assert not calls, "the vision tower ran before the length check"


def test_unknown_conv_mode_and_bad_params(engine, ckpts):
    with pytest.raises(PromptError, match="conv_mode 'nope'"):
        engine.generate(_px(engine), "hi", conv_mode="nope")
    with pytest.raises(PromptError, match="conv_mode"):
        pllava.Engine.from_pretrained(ckpts["pllava"], conv_mode="nope")
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(_px(engine), "hi", top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(_px(engine), "hi", max_new_tokens=0)


def test_bad_video_arguments(engine, tmp_path):
    with pytest.raises(pllava.InputError, match=r"\(T, 3, 42, 42\)"):
        engine.generate(torch.randn(4, 3, 40, 40), "hi")
    with pytest.raises(pllava.InputError, match="unsupported type"):
        engine.generate(123, "hi")
    with pytest.raises(pllava.InputError, match="uint8"):
        engine.generate(torch.zeros(2, 30, 30, 3, dtype=torch.int32), "hi")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(pllava.VideoError, match="zero bytes"):
        engine.generate(str(tmp_path / "empty.mp4"), "hi")
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all" * 50)
    with pytest.raises(pllava.VideoError, match="junk.mp4"):
        engine.generate(str(tmp_path / "junk.mp4"), "hi")


def test_hub_repo_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not a local directory"):
        pllava.Engine.from_pretrained("nobody/no-such-pllava-model")


@pytest.mark.parametrize("path", ["/nonexistent/pllava-7b", "./no-such-model", "a/b/c", ""])
def test_a_missing_model_path_says_so_without_asking_the_hub(monkeypatch, path):
    """A path no hub repo id could be: the error says the directory is missing (it was the hub's complaint that
    the name is not a repo id), and the hub is never asked."""
    import huggingface_hub

    def never(*a, **kw):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    with pytest.raises(ConfigError, match="no such model directory"):
        pllava.Engine.from_pretrained(path)


@pytest.mark.parametrize("which,content,match", [
    ("config.json", "[1, 2]", r"config\.json: must hold a JSON object, got list"),
    ("config.json", "[" * 100_000 + "]" * 100_000, r"config\.json: cannot read JSON: nested too deeply"),
    ("generation_config.json", '"x"', r"generation_config\.json: must hold a JSON object, got str"),
    ("generation_config.json", '{"eos_token_id": "2"}', r"eos_token_id must be a token id"),
], ids=["config-list", "config-deep", "gencfg-str", "gencfg-eos-str"])
def test_json_files_that_are_not_objects(ckpts, tmp_path, which, content, match):
    d = _copy(ckpts["pllava"], tmp_path)
    (d / which).write_text(content)
    with pytest.raises(ConfigError, match=match):
        pllava.Engine.from_pretrained(str(d))


def test_index_and_adapter_config_that_are_not_objects(ckpts, tmp_path):
    d = _copy(ckpts["current"], tmp_path, "sharded")
    idx = d / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    idx.write_text(json.dumps({"metadata": {}, "weight_map": list(data["weight_map"])}))
    with pytest.raises(CheckpointError, match=r"index\.json: field 'weight_map' must be an object .* got list"):
        pllava.Engine.from_pretrained(str(d))
    a = _copy(ckpts["adapter"], tmp_path, "adapter")
    (a / "adapter_config.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"adapter_config\.json: must hold a JSON object"):
        pllava.Engine.from_pretrained(str(a))


def test_cuda_without_cuda_and_bad_devices(ckpts):
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device 'cuda': CUDA is not available here"):
            pllava.Engine.from_pretrained(ckpts["pllava"], device="cuda")
    with pytest.raises(ConfigError, match=r"device 'gpu0': not a torch device"):
        pllava.Engine.from_pretrained(ckpts["pllava"], device="gpu0")


def test_pllava_device_sets_the_default_device_only(monkeypatch):
    """PLLAVA_DEVICE (the suite sets cpu) is the default where no device is named; a bad one is named as such."""
    from pllava.loading import resolve_device

    monkeypatch.setenv("PLLAVA_DEVICE", "meta")
    assert resolve_device(None) == torch.device("meta")
    assert resolve_device("cpu") == torch.device("cpu")  # a named device wins
    monkeypatch.setenv("PLLAVA_DEVICE", "gpu0")
    with pytest.raises(ConfigError, match=r"PLLAVA_DEVICE 'gpu0': not a torch device"):
        resolve_device(None)
    if not torch.cuda.is_available():
        monkeypatch.setenv("PLLAVA_DEVICE", "cuda:0")
        with pytest.raises(ConfigError, match=r"PLLAVA_DEVICE 'cuda:0': CUDA is not available here"):
            resolve_device(None)
    monkeypatch.delenv("PLLAVA_DEVICE")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_frame_arrays_are_capped_like_files(ckpts):
    from dataclasses import replace

    from pllava.errors import InputError

    eng = pllava.Engine.from_pretrained(ckpts["pllava"])
    eng.limits = replace(eng.limits, max_frames=8)
    s = eng.config.vision.image_size
    with pytest.raises(InputError, match="9 frames exceed max_frames=8"):
        eng.generate(torch.zeros(9, 20, 20, 3, dtype=torch.uint8), "hi", max_new_tokens=2)
    with pytest.raises(InputError, match="9 frames exceed max_frames=8"):
        eng.generate(torch.zeros(9, 3, s, s), "hi", max_new_tokens=2)
    assert eng.generate(torch.zeros(8, 20, 20, 3, dtype=torch.uint8), "hi", max_new_tokens=2).token_ids
