"""Pixels: uint8 RGB frames (T, H, W, 3) -> the vision tower's input (T, 3, S, S), as CLIPImageProcessor does:
resize the shortest edge to S (bicubic with antialiasing), center crop, rescale, normalize.

This is the torch path (CPU, or the GPU from uploaded uint8 frames). A native path (pllava._C) may take over
where it is built; `native_available()` says whether it is.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def native_available() -> bool:
    try:
        from pllava import _C  # noqa: F401
    except ImportError:
        return False
    return hasattr(_C, "preprocess")


def clip_defaults(image_size: int) -> dict:
    return {"do_resize": True, "size": {"shortest_edge": image_size}, "do_center_crop": True,
            "crop_size": {"height": image_size, "width": image_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "resample": 3}


def load_processor_config(cfg) -> dict:
    """A dict, a path to preprocessor_config.json, or a model directory holding one."""
    if isinstance(cfg, dict):
        return cfg
    path = os.fspath(cfg)
    if os.path.isdir(path):
        path = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read JSON: {e}") from e


def _size(cfg: dict, key: str, sub: str) -> tuple[int, int] | int:
    v = cfg.get(key)
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        if sub in v:
            return int(v[sub])
        if "height" in v and "width" in v:
            return int(v["height"]), int(v["width"])
    raise ConfigError(f"preprocessor config: field '{key}' = {v!r} is not understood")


def _as_frames(frames) -> torch.Tensor:
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if not isinstance(frames, torch.Tensor):
        raise InputError(f"frames: expected a uint8 array or tensor (T, H, W, 3), got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise InputError(f"frames: dtype must be uint8, got {frames.dtype}")
    if frames.dim() == 3:
        frames = frames.unsqueeze(0)
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames: shape must be (T, H, W, 3), got {tuple(frames.shape)}")
    if min(frames.shape[:3]) == 0:
        raise InputError(f"frames: zero-size frames {tuple(frames.shape)}")
    return frames


def preprocess(frames, processor_config, *, dtype=torch.float32, out: torch.Tensor | None = None,
               device=None) -> torch.Tensor:
    """uint8 RGB frames (T, H, W, 3) -> (T, 3, S, S) in `dtype`, following preprocessor_config.json."""
    cfg = load_processor_config(processor_config)
    x = _as_frames(frames)
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float()  # (T, 3, H, W) in [0, 255]
    if cfg.get("do_resize", True):
        se = _size(cfg, "size", "shortest_edge")
        h, w = x.shape[-2:]
        if isinstance(se, tuple):
            nh, nw = se
        else:  # shortest edge -> se, the other edge scaled and floored (transformers' get_resize_output_image_size)
            short, long = (h, w) if h <= w else (w, h)
            ns, nl = se, int(se * long / short)
            nh, nw = (ns, nl) if h <= w else (nl, ns)
        # PIL (what CLIPImageProcessor runs) resizes horizontally, rounds to uint8, then vertically: two separable
        # passes with rounding match it within 1/255 (one 2-D pass is off by up to 23/255 on an upscale).
        if nw != w:
            x = F.interpolate(x, size=(h, nw), mode="bicubic", antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)
        if nh != h:
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
            x = x.round_().clamp_(0, 255)
    if cfg.get("do_center_crop", True):
        cs = _size(cfg, "crop_size", "height")
        ch, cw = cs if isinstance(cs, tuple) else (cs, cs)
        h, w = x.shape[-2:]
        if ch > h or cw > w:
            raise InputError(f"frames: {h}x{w} after resize is smaller than the {ch}x{cw} crop")
        top, left = (h - ch) // 2, (w - cw) // 2
        x = x[..., top:top + ch, left:left + cw]
    if cfg.get("do_rescale", True):
        x = x * float(cfg.get("rescale_factor", 1 / 255))
    if cfg.get("do_normalize", True):
        mean = torch.tensor(cfg.get("image_mean", CLIP_MEAN), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("image_std", CLIP_STD), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    x = x.to(dtype)
    if out is not None:
        if out.shape != x.shape or out.dtype != x.dtype:
            raise InputError(f"out: expected shape {tuple(x.shape)} and dtype {x.dtype}, got {tuple(out.shape)} "
                             f"and {out.dtype}")
        out.copy_(x)
        return out
    return x.contiguous()
