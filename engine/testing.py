"""Factories for tests and `pllava demo`: tiny random PLLaVA checkpoints in the real on-disk layouts, an offline
tokenizer, and synthetic videos. Nothing here touches the network.

Key names are written out literally per layout (not through pllava.checkpoint), so a mapping bug in the loader
cannot be mirrored by the writer.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

LAYOUTS = ("pllava", "legacy", "current", "adapter")
_CORPUS = ("USER: ASSISTANT: Describe the video in details. The video shows a person cooking in a kitchen. "
           "What is happening? A man is dancing on a stage while the crowd watches. Answer the question. "
           "Only give the best option. Best option:( In the video, a dog runs across the grass. ") * 4


def make_tokenizer(path: str, vocab_size: int = 320, chatml: bool = False):
    """A byte-level BPE tokenizer trained offline; ids 0,1,2 = <unk>,<s>,</s> as Llama's; then <image>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([_CORPUS], trainer=trainer)
    extra = ["<image>", "<pad>"] + (["<|im_start|>", "<|im_end|>"] if chatml else [])
    tk.add_special_tokens(extra)
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)
    return fast


def tiny_config(vocab_size: int, image_token_index: int, pad_token_id: int, *, num_frames: int = 4,
                pooling_shape=(4, 3, 3), image_size: int = 42, patch_size: int = 7, text: dict | None = None,
                vision: dict | None = None, pllava_fields: bool = True) -> dict:
    t = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-5,
             bos_token_id=1, eos_token_id=2, pad_token_id=pad_token_id, tie_word_embeddings=False)
    t.update(text or {})
    v = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=32)
    v.update(vision or {})
    cfg = dict(model_type="llava", architectures=["LlavaForConditionalGeneration"], image_token_index=image_token_index,
               projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
               vocab_size=t["vocab_size"], pad_token_id=pad_token_id, text_config=t, vision_config=v,
               torch_dtype="float32")
    if pllava_fields:
        g = image_size // patch_size
        cfg.update(num_frames=num_frames, pooling_shape=list(pooling_shape), frame_shape=[g, g],
                   pooling_method="avg", use_pooling=True)
    return cfg


def random_weights(cfg: dict, seed: int = 0, lora_r: int = 8):
    """(base state dict in transformers >= 4.52 key names, LoRA {layer: {proj: (A, B)}}), fp32, seeded."""
    g = torch.Generator().manual_seed(seed)
    t, v = cfg["text_config"], cfg["vision_config"]

    def rnd(*shape, std=0.08):
        return torch.randn(*shape, generator=g) * std

    def ln(n):
        return 1 + rnd(n, std=0.1)

    sd = {}
    D, I, H = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"]
    kv = t.get("num_key_value_heads", H)
    hd = t.get("head_dim") or D // H
    V = t["vocab_size"]
    sd["model.language_model.embed_tokens.weight"] = rnd(V, D, std=0.5)
    for i in range(t["num_hidden_layers"]):
        p = f"model.language_model.layers.{i}."
        sd[p + "input_layernorm.weight"] = ln(D)
        sd[p + "post_attention_layernorm.weight"] = ln(D)
        sd[p + "self_attn.q_proj.weight"] = rnd(H * hd, D, std=0.15)
        sd[p + "self_attn.k_proj.weight"] = rnd(kv * hd, D, std=0.15)
        sd[p + "self_attn.v_proj.weight"] = rnd(kv * hd, D)
        sd[p + "self_attn.o_proj.weight"] = rnd(D, H * hd)
        sd[p + "mlp.gate_proj.weight"] = rnd(I, D)
        sd[p + "mlp.up_proj.weight"] = rnd(I, D)
        sd[p + "mlp.down_proj.weight"] = rnd(D, I)
    sd["model.language_model.norm.weight"] = ln(D)
    if not t.get("tie_word_embeddings", False):
        sd["lm_head.weight"] = rnd(V, D, std=0.3)
    vd, vi = v["hidden_size"], v["intermediate_size"]
    g_ = v["image_size"] // v["patch_size"]
    p = "model.vision_tower.vision_model."
    sd[p + "embeddings.class_embedding"] = rnd(vd, std=0.5)
    sd[p + "embeddings.patch_embedding.weight"] = rnd(vd, 3, v["patch_size"], v["patch_size"], std=0.1)
    sd[p + "embeddings.position_embedding.weight"] = rnd(g_ * g_ + 1, vd, std=0.3)
    sd[p + "pre_layrnorm.weight"], sd[p + "pre_layrnorm.bias"] = ln(vd), rnd(vd)
    for i in range(v["num_hidden_layers"]):
        q = f"{p}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[q + f"self_attn.{n}.weight"], sd[q + f"self_attn.{n}.bias"] = rnd(vd, vd, std=0.15), rnd(vd)
        sd[q + "layer_norm1.weight"], sd[q + "layer_norm1.bias"] = ln(vd), rnd(vd)
        sd[q + "layer_norm2.weight"], sd[q + "layer_norm2.bias"] = ln(vd), rnd(vd)
        sd[q + "mlp.fc1.weight"], sd[q + "mlp.fc1.bias"] = rnd(vi, vd, std=0.15), rnd(vi)
        sd[q + "mlp.fc2.weight"], sd[q + "mlp.fc2.bias"] = rnd(vd, vi, std=0.15), rnd(vd)
    sd[p + "post_layernorm.weight"], sd[p + "post_layernorm.bias"] = ln(vd), rnd(vd)
    sd["model.multi_modal_projector.linear_1.weight"] = rnd(D, vd, std=0.3)
    sd["model.multi_modal_projector.linear_1.bias"] = rnd(D)
    sd["model.multi_modal_projector.linear_2.weight"] = rnd(D, D, std=0.2)
    sd["model.multi_modal_projector.linear_2.bias"] = rnd(D)
    lora = {}
    for i in range(t["num_hidden_layers"]):
        lora[i] = {}
        for proj, out in (("q_proj", H * hd), ("v_proj", kv * hd)):
            lora[i][proj] = (rnd(lora_r, D, std=0.2), rnd(out, lora_r, std=0.2))
    return sd, lora


def _rename(key: str, layout: str) -> str:
    """transformers >= 4.52 name -> the name in `layout` (written out, not derived from the loader's tables)."""
    if layout == "current":
        return key
    if key.startswith("model.language_model."):
        rest = key[len("model.language_model."):]
        return ("language_model.base_model.model.model." if layout == "pllava" else "language_model.model.") + rest
    if key == "lm_head.weight":
        return "language_model.base_model.model.lm_head.weight" if layout == "pllava" else "language_model.lm_head.weight"
    if key.startswith("model."):
        return key[len("model."):]  # vision_tower.vision_model.*, multi_modal_projector.*
    raise KeyError(key)


def save_sharded(tensors: dict, path: str, shards: int):
    from safetensors.torch import save_file

    keys = sorted(tensors)
    if shards <= 1:
        save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(path, "model.safetensors"),
                  metadata={"format": "pt"})
        return
    parts = [keys[i::shards] for i in range(shards)]
    wm = {}
    for n, part in enumerate(parts, 1):
        fn = f"model-{n:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in part}, os.path.join(path, fn), metadata={"format": "pt"})
        wm.update({k: fn for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=1)


def make_tiny_checkpoint(path: str, layout: str = "pllava", lora: bool = True, *, seed: int = 0, lora_r: int = 8,
                         shards: int = 2, chatml: bool = False, dtype=torch.float32, adapter_alpha: float = 32.0,
                         llava_next: bool = False, **config_kw) -> str:
    """Write a tiny random PLLaVA checkpoint and return the directory to load.

    layout: 'pllava' (PEFT-wrapped LLM keys, LoRA inside when lora=True), 'legacy' or 'current' llava-hf keys (no
    LoRA: an image LLaVA), or 'adapter' (a legacy base in `path` plus a PEFT adapter in `path`/adapter, whose
    directory is returned). Weights depend on `seed` only, so every layout of one seed holds the same model.
    llava_next: a LLaVA-NeXT checkpoint (model_type llava_next, anyres fields, an `image_newline` tensor, no
    PLLaVA fields) in the legacy or current layout.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    os.makedirs(path, exist_ok=True)
    tok = make_tokenizer(path, chatml=chatml)
    image_id = tok.convert_tokens_to_ids("<image>")
    vocab = (len(tok) + 15) // 16 * 16  # padded like PLLaVA's 32064
    if llava_next:
        config_kw.setdefault("pllava_fields", False)
    cfg = tiny_config(vocab, image_id, tok.pad_token_id, **config_kw)
    if llava_next:
        s = cfg["vision_config"]["image_size"]
        cfg.update(model_type="llava_next", architectures=["LlavaNextForConditionalGeneration"],
                   image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s]], image_seq_length=(s // 7) ** 2,
                   multimodal_projector_bias=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    g = cfg["vision_config"]["image_size"]
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": {"height": g, "width": g}, "do_center_crop": True, "do_normalize": True,
                   "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "resample": 3, "size": {"shortest_edge": g}, "image_processor_type": "CLIPImageProcessor"}, f)
    sd, lora_t = random_weights(cfg, seed, lora_r)
    base_layout = "legacy" if layout == "adapter" else layout
    out = {}
    for k, t in sd.items():
        name = _rename(k, base_layout)
        if layout == "pllava" and lora and (".self_attn.q_proj." in k or ".self_attn.v_proj." in k) \
                and "language_model" in k:
            name = name.replace(".weight", ".base_layer.weight")
        out[name] = t.to(dtype)
    if layout == "pllava" and lora:
        for i, projs in lora_t.items():
            for proj, (a, b) in projs.items():
                p = f"language_model.base_model.model.model.layers.{i}.self_attn.{proj}."
                out[p + "lora_A.default.weight"], out[p + "lora_B.default.weight"] = a.to(dtype), b.to(dtype)
    if llava_next:
        g = torch.Generator().manual_seed(seed + 1)
        out[_rename("model.image_newline", base_layout)] = torch.randn(
            cfg["text_config"]["hidden_size"], generator=g).to(dtype)
    save_sharded(out, path, shards)
    if layout != "adapter":
        return path
    from safetensors.torch import save_file

    adir = os.path.join(path, "adapter")
    os.makedirs(adir, exist_ok=True)
    ad = {}
    for i, projs in lora_t.items():
        for proj, (a, b) in projs.items():
            p = f"base_model.model.model.layers.{i}.self_attn.{proj}."
            ad[p + "lora_A.weight"], ad[p + "lora_B.weight"] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    save_file(ad, os.path.join(adir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(adir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_r, "lora_alpha": adapter_alpha,
                   "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "bias": "none",
                   "base_model_name_or_path": os.path.abspath(path)}, f, indent=1)
    return adir


def make_video(path: str, num_frames: int = 24, size=(64, 48), fps: int = 12, codec: str = "mpeg4",
               audio: bool = False, gop: int | None = None, vfr: bool = False, bframes: int | None = None,
               container_format: str | None = None, rotation: int = 0) -> str:
    """A synthetic clip whose frames all differ (moving gradient + a bright block at a per-frame position).

    gop: keyframe interval (small values make the seek sampler really seek); vfr: irregular frame durations
    (pts in milliseconds); bframes: B-frames between references (h264, mpeg4); rotation: a display matrix
    (degrees counter-clockwise, as a phone writes for portrait video)."""
    import av
    from fractions import Fraction

    w, h = size
    with av.open(path, mode="w", format=container_format) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        if rotation:
            s.set_display_rotation(rotation)
        opts = {}
        if gop is not None:
            s.codec_context.gop_size = gop
            if codec == "libx264":
                opts.update({"keyint": str(gop), "min-keyint": str(gop), "scenecut": "0"})
        if bframes is not None:
            s.codec_context.max_b_frames = bframes
            if codec == "libx264":
                opts["bframes"] = str(bframes)
        if codec == "libx264":
            s.options = {"preset": "ultrafast" if bframes is None else "fast", **(
                {"x264-params": ":".join(f"{k}={v}" for k, v in opts.items())} if opts else {})}
        if vfr:
            s.codec_context.time_base = Fraction(1, 1000)
            s.time_base = Fraction(1, 1000)
        a = c.add_stream("aac", rate=16000) if audio else None
        yy, xx = np.mgrid[0:h, 0:w]
        t_ms = 0
        for i in range(num_frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = (xx * 255 // max(w - 1, 1) + 10 * i) % 256
            img[..., 1] = (yy * 255 // max(h - 1, 1)) % 256
            img[..., 2] = (40 * i) % 256
            bx = (i * 5) % max(w - 8, 1)
            img[h // 3:h // 3 + 8, bx:bx + 8] = 255
            fr = av.VideoFrame.from_ndarray(img, format="rgb24")
            if vfr:
                fr.pts, fr.time_base = t_ms, Fraction(1, 1000)
                t_ms += (40, 90, 15, 200)[i % 4]  # irregular durations
            for pkt in s.encode(fr):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
        if a is not None:
            n = int(16000 * num_frames / fps)
            fr = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32), format="fltp", layout="mono")
            fr.sample_rate = 16000
            for pkt in a.encode(fr):
                c.mux(pkt)
            for pkt in a.encode():
                c.mux(pkt)
    return path
