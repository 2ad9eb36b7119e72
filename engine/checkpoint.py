"""safetensors shards -> our parameter names, for the three key layouts PLLaVA checkpoints come in, plus PEFT adapters.

Layouts, detected from the keys:
  pllava   the LLM wrapped by PEFT: language_model.base_model.model.model.layers.N.self_attn.q_proj.base_layer.weight,
           ...q_proj.lora_A.default.weight, language_model.base_model.model.lm_head.weight, vision_tower.vision_model.*
  legacy   llava-hf before transformers 4.52: language_model.model.*, language_model.lm_head.*, vision_tower.vision_model.*
  current  transformers >= 4.52: model.language_model.*, model.vision_tower.vision_model.*, lm_head.*
LLaVA-NeXT checkpoints come in the legacy and current layouts with one more tensor, (model.)image_newline, unused.
Our names ("canonical"): vision_tower.*, multi_modal_projector.*, language_model.{embed_tokens,layers,norm,lm_head}.*

The model is built on the meta device and each tensor is read through safetensors' mmap and placed as it is read,
so peak host memory stays near one copy of the weights.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from . import ops
from .config import LoraConfig, PllavaConfig, read_json_object
from .errors import CheckpointError, ConfigError

log = logging.getLogger("pllava")

LAYOUT_NAMES = {"pllava": "PLLaVA (PEFT-wrapped LLM)", "legacy": "legacy llava-hf", "current": "transformers >= 4.52"}

# (checkpoint prefix, canonical prefix) per layout, most specific first.
_PREFIXES = {
    "pllava": [("language_model.base_model.model.model.", "language_model."),
               ("language_model.base_model.model.lm_head.", "language_model.lm_head."),
               ("vision_tower.vision_model.", "vision_tower."), ("multi_modal_projector.", "multi_modal_projector."),
               ("image_newline", "image_newline")],
    "legacy": [("language_model.model.", "language_model."), ("language_model.lm_head.", "language_model.lm_head."),
               ("vision_tower.vision_model.", "vision_tower."), ("multi_modal_projector.", "multi_modal_projector."),
               ("image_newline", "image_newline")],
    "current": [("model.language_model.", "language_model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.vision_model.", "vision_tower."),
                ("model.multi_modal_projector.", "multi_modal_projector."), ("model.image_newline", "image_newline")],
}
_LORA_RE = re.compile(r"^(.*)\.lora_([AB])(?:\.default)?\.weight$")
_ADAPTER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([qkvo]_proj)\.lora_([AB])(?:\.default)?\.weight$")


@dataclass
class TensorRef:
    file: str
    name: str  # the checkpoint's own key
    shape: tuple


def weight_files(model_dir: str) -> list[str]:
    """The safetensors files of a model directory: the index's shards, or model.safetensors, or every *.safetensors."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        wm = read_json_object(index, CheckpointError).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
            raise CheckpointError(f"{index}: field 'weight_map' must be an object of tensor name -> file name, got "
                                  f"{type(wm).__name__}")
        files = sorted(set(wm.values()))
        for fn in files:
            if not os.path.isfile(os.path.join(model_dir, fn)):
                raise CheckpointError(f"{index}: shard '{fn}' is listed but missing from {model_dir}")
        return [os.path.join(model_dir, fn) for fn in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors") and not f.startswith("adapter_"))
    if not files:
        raise CheckpointError(f"{model_dir}: no safetensors weights (model.safetensors, or shards with "
                              "model.safetensors.index.json)")
    return [os.path.join(model_dir, f) for f in files]


def _open(path: str):
    from safetensors import safe_open
    from safetensors import SafetensorError

    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def read_index(files: list[str]) -> dict[str, TensorRef]:
    """Every tensor's checkpoint key -> where it lives and its shape, from the headers alone (no data read).
    Each header is parsed once, here: it gives the keys and shapes and, through the data offsets, catches a shard
    cut short (safetensors checks offsets only when a tensor is read, i.e. mid-load)."""
    refs: dict[str, TensorRef] = {}
    for path in files:
        for k, shape in _read_header(path).items():
            if k in refs:
                raise CheckpointError(f"{path}: key '{k}' is also in {refs[k].file}")
            refs[k] = TensorRef(path, k, shape)
    return refs


def _read_header(path: str) -> dict[str, tuple]:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (header of {n} bytes in a {size}-byte file)")
            header = json.loads(fh.read(n))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in entries.values()), default=0)
        shapes = {k: tuple(v["shape"]) for k, v in entries.items()}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: the header describes {8 + n + end} bytes, the file has {size}")
    return shapes


def detect_layout(keys, where: str) -> str:
    ks = list(keys)
    if any(k.startswith("language_model.base_model.model.") for k in ks):
        return "pllava"
    if any(k.startswith(("model.language_model.", "model.vision_tower.")) for k in ks):
        return "current"
    if any(k.startswith("language_model.model.") for k in ks):
        return "legacy"
    raise CheckpointError(f"{where}: unrecognised key layout (first keys: {sorted(ks)[:3]}); expected PLLaVA's "
                          "'language_model.base_model.model.*', llava-hf's 'language_model.model.*' or "
                          "'model.language_model.*'")


def to_canonical(key: str, layout: str) -> str | None:
    for src, dst in _PREFIXES[layout]:
        if key.startswith(src):
            name = dst + key[len(src):]
            break
    else:
        return None
    m = _LORA_RE.match(name)
    if m:
        return f"{m.group(1)}.lora_{m.group(2)}"
    return name.replace(".base_layer.", ".")


def to_checkpoint_name(canonical: str, layout: str, lora: bool = False) -> str:
    """Our name -> the key the checkpoint would have in `layout` (for error messages)."""
    for src, dst in _PREFIXES[layout]:
        if canonical.startswith(dst):
            name = src + canonical[len(dst):]
            break
    else:
        name = canonical
    if layout == "pllava":
        m = re.match(r"^(.*)\.lora_([AB])$", name)
        if m:
            return f"{m.group(1)}.lora_{m.group(2)}.default.weight"
        if lora and re.search(r"\.(q_proj|v_proj)\.(weight|bias)$", name):
            return re.sub(r"\.(weight|bias)$", r".base_layer.\1", name)
    return name


def _unused(canonical: str, cfg: PllavaConfig) -> bool:
    """Keys a checkpoint holds that PLLaVA's computation never reads."""
    if canonical.startswith("vision_tower.post_layernorm.") or canonical.endswith((".position_ids", ".inv_freq")):
        return True
    if canonical == "image_newline":
        return True  # LLaVA-NeXT's anyres row separator: PLLaVA pools the patch grid instead
    m = re.match(r"^vision_tower\.encoder\.layers\.(\d+)\.", canonical)
    if m and int(m.group(1)) >= cfg.vision_layers_run:
        return True  # layers after vision_feature_layer are never computed
    return canonical == "language_model.lm_head.weight" and cfg.text.tie_word_embeddings


@dataclass
class CheckpointPlan:
    layout: str
    tensors: dict[str, TensorRef]  # canonical -> ref
    lora_r: int
    lora_targets: tuple


def plan_checkpoint(model_dir: str, cfg: PllavaConfig) -> CheckpointPlan:
    files = weight_files(model_dir)
    refs = read_index(files)
    layout = detect_layout(refs, model_dir)
    tensors: dict[str, TensorRef] = {}
    for key, ref in refs.items():
        can = to_canonical(key, layout)
        if can is None:
            raise CheckpointError(f"{ref.file}: unexpected key '{key}' (shape {list(ref.shape)}) for the "
                                  f"{LAYOUT_NAMES[layout]} layout")
        if _unused(can, cfg):
            continue
        tensors[can] = ref
    r, targets = lora_shape(tensors, model_dir)
    return CheckpointPlan(layout, tensors, r, targets)


def lora_shape(tensors: dict[str, TensorRef], where: str) -> tuple[int, tuple]:
    ranks, targets = {}, set()
    for can, ref in tensors.items():
        if can.endswith(".lora_A"):
            ranks[can] = ref.shape[0]
            targets.add(can.split(".")[-2])
    if len(set(ranks.values())) > 1:
        raise CheckpointError(f"{where}: LoRA ranks differ between modules: {sorted(set(ranks.values()))}")
    return (next(iter(ranks.values())) if ranks else 0), tuple(sorted(targets))


# ---------------------------------------------------------------------------------------------- PEFT adapters
def plan_adapter(adapter_dir: str) -> tuple[dict[str, TensorRef], LoraConfig, dict]:
    """A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) -> canonical LoRA tensors."""
    cpath = os.path.join(adapter_dir, "adapter_config.json")
    wpath = os.path.join(adapter_dir, "adapter_model.safetensors")
    for p in (cpath, wpath):
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: not found (a PEFT adapter directory holds adapter_config.json and "
                                  "adapter_model.safetensors)")
    acfg = read_json_object(cpath)
    ptype = acfg.get("peft_type", "LORA")
    if ptype != "LORA":
        raise ConfigError(f"{cpath}: field 'peft_type' = {ptype!r}; only LORA adapters are supported")
    refs = read_index([wpath])
    out: dict[str, TensorRef] = {}
    for key, ref in refs.items():
        m = _ADAPTER_RE.search(key)
        if m is None or "vision" in key:
            raise CheckpointError(f"{wpath}: unexpected key '{key}': only LoRA on the LLM's attention projections "
                                  "(q/k/v/o_proj) is supported")
        out[f"language_model.layers.{m.group(1)}.self_attn.{m.group(2)}.lora_{m.group(3)}"] = ref
    r, targets = lora_shape(out, wpath)
    if "r" in acfg and int(acfg["r"]) != r:
        raise CheckpointError(f"{cpath}: field 'r' = {acfg['r']} but the weights in {wpath} have rank {r}")
    lcfg = LoraConfig(r=r, use_rslora=bool(acfg.get("use_rslora", False)), target_modules=targets)
    return out, lcfg, acfg


# ---------------------------------------------------------------------------------------------- loading
def _set_tensor(model: nn.Module, name: str, t: torch.Tensor):
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, nn.Parameter(t, requires_grad=False))


def load_weights(model: nn.Module, tensors: dict[str, TensorRef], layout: str, dtype, device, where: str,
                 convert=None):
    """Fill a meta-device model from the planned tensors; every key checked for presence and shape first.
    convert(name, tensor) -> tensor | None: what to make of each tensor as stored (its own dtype, on the CPU)
    instead of moving it to (device, dtype): the tensor to set, or None where convert took it itself (quantize=
    "int8" quantizes the LLM's linears from the checkpoint's own precision as they load; the module is then
    rebuilt around the int8 weight, and its float parameter stays on the meta device)."""
    expected = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    tied = model.config.text.tie_word_embeddings
    if tied:
        expected.pop("language_model.lm_head.weight", None)
    lora = model.config.lora.r > 0
    for can, ref in tensors.items():
        if can not in expected:
            raise CheckpointError(f"{ref.file}: unexpected key '{ref.name}' (shape {list(ref.shape)})")
        if tuple(ref.shape) != expected[can]:
            raise CheckpointError(f"{ref.file}: key '{ref.name}' has shape {list(ref.shape)}, the config "
                                  f"expects {list(expected[can])}")
    missing = [n for n in expected if n not in tensors]
    if missing:
        n = missing[0]
        raise CheckpointError(f"{where}: missing key '{to_checkpoint_name(n, layout, lora)}' (shape "
                              f"{list(expected[n])}; {len(missing)} missing in all, layout {LAYOUT_NAMES[layout]})")
    by_file: dict[str, list[tuple[str, TensorRef]]] = {}
    for can, ref in tensors.items():
        by_file.setdefault(ref.file, []).append((can, ref))
    for path, items in by_file.items():
        with _open(path) as f:
            for can, ref in items:
                if ops.abandoned():  # loading on a thread that ends (CPU engines) and its caller gave up
                    raise ops.Abandoned(f"{where}: the load was abandoned by its caller")
                # LoRA factors stay in the compute dtype too: PEFT keeps them in the base layer's dtype.
                t = f.get_tensor(ref.name)
                t = t.to(device=device, dtype=dtype) if convert is None else convert(can, t)
                if t is not None:
                    _set_tensor(model, can, t)
    if tied:
        model.language_model.lm_head.weight = model.language_model.embed_tokens.weight


def attach_adapter_config(cfg: PllavaConfig, plan: CheckpointPlan, lcfg: LoraConfig | None) -> PllavaConfig:
    lora = lcfg if lcfg is not None else LoraConfig(r=plan.lora_r, target_modules=plan.lora_targets or ("q_proj", "v_proj"))
    return replace(cfg, lora=replace(lora, alpha=cfg.lora.alpha))
