"""One dataclass tree parsed from a checkpoint's config.json (PLLaVA's `llava` config or a plain llava-hf one).

transformers' config classes fill the defaults of the text and vision sub-configs (PLLaVA's config.json stores
only the fields that differ from LlamaConfig / CLIPVisionConfig), so a field missing from the file means exactly
what it means to the reference implementation.
"""
from __future__ import annotations

import math

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ConfigError

# PLLaVA's defaults for an image LLaVA turned into a video model (paper §3; scripts/demo.sh).
DEFAULT_NUM_FRAMES = 16
DEFAULT_POOLING_SHAPE = (16, 12, 12)
DEFAULT_LORA_ALPHA = 4.0  # PLLaVA's demo and eval scripts: alpha 4 for captions

SUPPORTED_TEXT_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SUPPORTED_ACTS = ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "silu", "relu")


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_parameters: dict
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: Any = None
    hf: Any = field(default=None, repr=False, compare=False)  # the transformers config, for RoPE init


@dataclass(frozen=True)
class LoraConfig:
    r: int = 0  # 0: the checkpoint carries no LoRA
    alpha: float = DEFAULT_LORA_ALPHA
    use_rslora: bool = False
    target_modules: tuple = ("q_proj", "v_proj")

    @property
    def scale(self) -> float:
        return self.scale_for(self.alpha)

    def scale_for(self, alpha: float) -> float:
        """alpha / r (alpha / sqrt(r) for rsLoRA); 0 without a LoRA."""
        if self.r == 0:
            return 0.0
        return float(alpha) / (self.r ** 0.5 if self.use_rslora else self.r)


def check_lora_alpha(alpha, error=ConfigError) -> float:
    """lora_alpha must be a finite real number (not a bool): everywhere a user can set it."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise error(f"lora_alpha must be a finite number, got {alpha!r}")
    return float(alpha)


@dataclass(frozen=True)
class PllavaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"
    num_frames: int = DEFAULT_NUM_FRAMES
    pooling_shape: tuple = DEFAULT_POOLING_SHAPE
    frame_shape: tuple = (24, 24)
    torch_dtype: str | None = None
    lora: LoraConfig = field(default_factory=LoraConfig)
    source: str = ""  # the file it came from, for error messages
    # The id PLLaVA's modeling embeds in place of an <image> id anywhere but the spliced position (e.g. one the
    # model generates): config.pad_token_id, else text_config.pad_token_id; None when neither is set.
    pad_token_id: int | None = None
    model_type: str = "llava"

    @property
    def num_visual_tokens(self) -> int:
        t, h, w = self.pooling_shape
        return t * h * w

    @property
    def vision_layers_run(self) -> int:
        """How many encoder layers produce hidden_states[vision_feature_layer] (never run the ones after it)."""
        n = self.vision.num_hidden_layers
        k = self.vision_feature_layer
        return n + 1 + k if k < 0 else k

    def with_overrides(self, *, num_frames=None, pooling_shape=None, lora_alpha=None) -> "PllavaConfig":
        cfg = self
        if num_frames is not None:
            _check_positive_int(num_frames, "num_frames", self.source)
            cfg = replace(cfg, num_frames=int(num_frames))
        if pooling_shape is not None:
            cfg = replace(cfg, pooling_shape=_shape3(pooling_shape, "pooling_shape", self.source))
        if lora_alpha is not None:
            cfg = replace(cfg, lora=replace(cfg.lora, alpha=check_lora_alpha(lora_alpha)))
        return cfg


_DTYPE_NAMES = ("float32", "float16", "bfloat16", "float", "half", "fp32", "fp16", "bf16")


def _dtype_name(v, src):
    if v is None or v in _DTYPE_NAMES or v == "auto":
        return None if v == "auto" else v
    raise ConfigError(f"{src}: field 'torch_dtype' = {v!r} is not one of {_DTYPE_NAMES}")


def _check_positive_int(v, name, src):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"{src}: field '{name}' must be a positive integer, got {v!r}")


def _shape3(v, name, src) -> tuple:
    try:
        t = tuple(int(x) for x in v)
    except (TypeError, ValueError):
        raise ConfigError(f"{src}: field '{name}' must be 3 positive integers (T, h, w), got {v!r}") from None
    if len(t) != 3 or min(t) <= 0:
        raise ConfigError(f"{src}: field '{name}' must be 3 positive integers (T, h, w), got {v!r}")
    return t


def _hf_config(model_type: str, d: dict, src: str, what: str):
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ConfigError(f"{src}: {what}.model_type '{model_type}' is unknown to transformers")
    d = {k: v for k, v in d.items() if k != "model_type"}
    try:
        from huggingface_hub.errors import StrictDataclassError  # transformers >= 5 validates config fields
    except ImportError:
        StrictDataclassError = TypeError  # noqa: N806 - older hub versions: nothing extra to catch
    try:
        return CONFIG_MAPPING[model_type](**d)
    except (TypeError, ValueError, AttributeError, StrictDataclassError) as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{src}: cannot parse {what}: {msg[:400]}") from None


_POSITIVE_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings")


def parse_text_config(d: dict, src: str = "config.json") -> TextConfig:
    mt = d.get("model_type", "llama")
    if mt not in SUPPORTED_TEXT_TYPES:
        raise ConfigError(f"{src}: text_config.model_type '{mt}' is not supported (supported: {SUPPORTED_TEXT_TYPES})")
    hf = _hf_config(mt, d, src, "text_config")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if not rope:  # transformers < 5 keeps rope_theta / rope_scaling apart
        rope = dict(getattr(hf, "rope_scaling", None) or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = getattr(hf, "rope_theta", 10000.0)
    rt = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise ConfigError(f"{src}: field 'text_config.rope_theta' must be a positive number, got {theta!r}")
    if rt not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{src}: text_config rope type '{rt}' is not supported (supported: {SUPPORTED_ROPE_TYPES}); "
                          "'dynamic' and 'longrope' change the frequencies with the length and would break a static KV cache")
    if hf.hidden_act != "silu":
        raise ConfigError(f"{src}: text_config.hidden_act '{hf.hidden_act}' is not supported (SwiGLU with silu only)")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    n_kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    vals = dict(vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
                num_key_value_heads=n_kv, head_dim=head_dim, max_position_embeddings=hf.max_position_embeddings)
    for k in _POSITIVE_TEXT_FIELDS:
        v = vals[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if k == "max_position_embeddings" else 1):
            raise ConfigError(f"{src}: field 'text_config.{k}' must be a positive integer, got {v!r}")
    if hf.num_attention_heads % n_kv:
        raise ConfigError(f"{src}: field 'text_config.num_key_value_heads' = {n_kv} does not divide "
                          f"num_attention_heads = {hf.num_attention_heads}")
    if head_dim % 2:
        raise ConfigError(f"{src}: text_config head_dim = {head_dim} must be even (RoPE rotates pairs)")
    return TextConfig(
        model_type=mt, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        head_dim=head_dim, rms_norm_eps=hf.rms_norm_eps, max_position_embeddings=hf.max_position_embeddings,
        rope_parameters=rope, tie_word_embeddings=bool(d.get("tie_word_embeddings", hf.tie_word_embeddings)),
        attention_bias=bool(getattr(hf, "attention_bias", False)), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        hidden_act=hf.hidden_act, sliding_window=getattr(hf, "sliding_window", None),
        bos_token_id=getattr(hf, "bos_token_id", None), eos_token_id=getattr(hf, "eos_token_id", None), hf=hf,
    )


def parse_vision_config(d: dict, src: str = "config.json") -> VisionConfig:
    mt = d.get("model_type", "clip_vision_model")
    if mt != "clip_vision_model":
        raise ConfigError(f"{src}: vision_config.model_type '{mt}' is not supported (CLIP vision only)")
    hf = _hf_config(mt, d, src, "vision_config")
    if hf.hidden_act not in SUPPORTED_ACTS:
        raise ConfigError(f"{src}: vision_config.hidden_act '{hf.hidden_act}' is not supported")
    return VisionConfig(hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
                        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
                        image_size=hf.image_size, patch_size=hf.patch_size, num_channels=hf.num_channels,
                        layer_norm_eps=hf.layer_norm_eps, hidden_act=hf.hidden_act)


def parse_config(d: dict, src: str = "config.json") -> PllavaConfig:
    """A PLLaVA (`model_type: llava` with pooling fields), plain llava-hf or LLaVA-NeXT (`llava_next`, run as a
    training-free PLLaVA: its anyres fields are not used) config dict -> PllavaConfig."""
    if not isinstance(d, dict):
        raise ConfigError(f"{src}: expected a JSON object")
    mt = d.get("model_type")
    if mt not in ("llava", "pllava", "llava_next"):
        raise ConfigError(f"{src}: field 'model_type' is {mt!r}; expected 'llava' (PLLaVA or llava-hf) or "
                          "'llava_next'")
    for key in ("text_config", "vision_config"):
        if not isinstance(d.get(key), dict):
            raise ConfigError(f"{src}: field '{key}' is missing or not an object")
    text = parse_text_config(d["text_config"], src)
    vision = parse_vision_config(d["vision_config"], src)
    # A top-level vocab_size (PLLaVA's configs carry one) wins when the text config left it at the default.
    if "vocab_size" in d and "vocab_size" not in d["text_config"]:
        text = replace(text, vocab_size=int(d["vocab_size"]))
    vfl = d.get("vision_feature_layer", -2)
    if not isinstance(vfl, int) or isinstance(vfl, bool):
        raise ConfigError(f"{src}: field 'vision_feature_layer' must be one integer, got {vfl!r} (layer lists are not supported)")
    n = vision.num_hidden_layers
    if not (-n - 1 <= vfl <= n):
        raise ConfigError(f"{src}: field 'vision_feature_layer' = {vfl} is outside the {n}-layer vision tower")
    strategy = d.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ConfigError(f"{src}: field 'vision_feature_select_strategy' = {strategy!r}; PLLaVA pools a patch grid, "
                          "so only 'default' (CLS dropped) is supported")
    act = d.get("projector_hidden_act", "gelu")
    if act not in SUPPORTED_ACTS:
        raise ConfigError(f"{src}: field 'projector_hidden_act' = {act!r} is not supported ({SUPPORTED_ACTS})")
    grid = vision.grid
    frame_shape = tuple(int(x) for x in d.get("frame_shape") or (grid, grid))
    if frame_shape != (grid, grid):
        raise ConfigError(f"{src}: field 'frame_shape' = {list(frame_shape)} does not match the vision tower's "
                          f"{grid}x{grid} patch grid (image_size {vision.image_size} / patch_size {vision.patch_size})")
    pooling = d.get("pooling_shape") or DEFAULT_POOLING_SHAPE
    num_frames = d.get("num_frames") or DEFAULT_NUM_FRAMES
    if mt in ("llava", "llava_next") and "pooling_shape" not in d:
        num_frames = DEFAULT_NUM_FRAMES  # llava-hf image model: training-free PLLaVA with the paper's defaults
    _check_positive_int(num_frames, "num_frames", src)
    itok = d.get("image_token_index", d.get("image_token_id", 32000))
    _check_positive_int(itok, "image_token_index", src)
    pad = d.get("pad_token_id")
    if pad is None:
        pad = d["text_config"].get("pad_token_id")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad < text.vocab_size):
        raise ConfigError(f"{src}: field 'pad_token_id' = {pad!r} must be a token id in [0, {text.vocab_size})")
    return PllavaConfig(
        vision=vision, text=text, image_token_index=itok, projector_hidden_act=act, vision_feature_layer=vfl,
        vision_feature_select_strategy=strategy, num_frames=num_frames,
        pooling_shape=_shape3(pooling, "pooling_shape", src), frame_shape=frame_shape,
        torch_dtype=_dtype_name(d.get("torch_dtype") or d.get("dtype") or d["text_config"].get("torch_dtype"), src),
        source=src, pad_token_id=pad, model_type=mt,
    )


def read_json_object(path: str, error=ConfigError) -> dict:
    """A JSON file that must hold an object: unreadable, not JSON, nested past the recursion limit, or not an
    object is `error` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read JSON: {e}") from None
    except RecursionError:
        raise error(f"{path}: cannot read JSON: nested too deeply") from None
    if not isinstance(d, dict):
        raise error(f"{path}: must hold a JSON object, got {type(d).__name__}")
    return d


def load_config(model_dir: str) -> PllavaConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found (a PLLaVA model directory holds config.json)")
    return parse_config(read_json_object(path), path)


# Real model shapes for benchmarks (random weights; performance does not depend on values).
_CLIP_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, model_type="clip_vision_model")
PRESETS: dict[str, dict] = {
    "pllava-7b": dict(model_type="llava", vision_config=_CLIP_L336, pooling_shape=[16, 12, 12], num_frames=16,
                      text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                       num_hidden_layers=32, num_attention_heads=32, vocab_size=32064,
                                       max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "pllava-13b": dict(model_type="llava", vision_config=_CLIP_L336, pooling_shape=[16, 12, 12], num_frames=16,
                       text_config=dict(model_type="llama", hidden_size=5120, intermediate_size=13824,
                                        num_hidden_layers=40, num_attention_heads=40, vocab_size=32064,
                                        max_position_embeddings=4096, rms_norm_eps=1e-5)),
    "pllava-34b": dict(model_type="llava", vision_config=_CLIP_L336, pooling_shape=[16, 12, 12], num_frames=16,
                       text_config=dict(model_type="llama", hidden_size=7168, intermediate_size=20480,
                                        num_hidden_layers=60, num_attention_heads=56, num_key_value_heads=8,
                                        vocab_size=64064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                        rope_theta=5000000.0)),
    # Runs on a 2-core CPU in seconds but keeps the 24x24 patch grid (336 / 14).
    "small": dict(model_type="llava", pooling_shape=[16, 12, 12], num_frames=16,
                  vision_config=dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4,
                                     num_attention_heads=6, image_size=336, patch_size=14,
                                     model_type="clip_vision_model"),
                  text_config=dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                                   num_attention_heads=12, vocab_size=32064, max_position_embeddings=4096,
                                   rms_norm_eps=1e-5)),
    # For tests of the benchmark machinery: the real 24x24 patch grid at toy widths (seconds on a CPU).
    "tiny": dict(model_type="llava", pooling_shape=[16, 12, 12], num_frames=16,
                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=336, patch_size=14, model_type="clip_vision_model"),
                 text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=512, max_position_embeddings=4096,
                                  rms_norm_eps=1e-5)),
}
