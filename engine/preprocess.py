"""Pixels: uint8 RGB frames (T, H, W, 3) -> the vision tower's input (T, 3, S, S), as CLIPImageProcessor does:
resize the shortest edge to S (PIL bicubic with its antialiasing support), center crop, rescale, normalize.

Two paths, both pixel-exact with PIL: pllava._C (C++, threaded, GIL released; `native_available()`) for frames
in host memory, and torch (CPU or GPU) for everything else and for configs the native path does not cover.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .config import read_json_object
from .errors import ConfigError, InputError
from .ops import log_once, native_extension


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def native_available() -> bool:
    """Whether the native extension pllava._C (PIL-exact, threaded, GIL released) is built and importable."""
    return native_extension("preprocess") is not None


_NATIVE_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
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
    return read_json_object(path)  # not UTF-8, not JSON or not an object (a list, null): a ConfigError naming it


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


def _check_frames_array(frames):
    """Validate a uint8 (T, H, W, 3) / (H, W, 3) numpy array or tensor without copying it."""
    if not isinstance(frames, (np.ndarray, torch.Tensor)):
        raise InputError(f"frames: expected a uint8 array or tensor (T, H, W, 3), got {type(frames).__name__}")
    if frames.dtype not in (np.uint8, torch.uint8):
        raise InputError(f"frames: dtype must be uint8, got {frames.dtype}")
    shape = tuple(frames.shape)
    if len(shape) == 3:
        shape = (1,) + shape
    if len(shape) != 4 or shape[-1] != 3:
        raise InputError(f"frames: shape must be (T, H, W, 3), got {tuple(frames.shape)}")
    if min(shape[:3]) == 0:
        raise InputError(f"frames: zero-size frames {tuple(frames.shape)}")
    return shape


def _as_frames(frames) -> torch.Tensor:
    """Validated frames as a (T, H, W, 3) uint8 tensor (numpy is wrapped, copied only if it has negative strides)."""
    shape = _check_frames_array(frames)
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames) if min(frames.strides) < 0 else frames)
    return frames.reshape(shape)


def native_params(cfg: dict) -> dict | None:
    """The native path's parameters for a preprocessor config, or None when it does not cover the config (those go
    to the torch path, never to a wrong answer): it does PIL bicubic (resample 3), shortest-edge resize, center
    crop to a fixed size, rescale and a 3-channel normalize."""
    if cfg.get("resample", 3) != 3:
        return None
    size = cfg.get("size")
    do_resize = bool(cfg.get("do_resize", True))
    se = size.get("shortest_edge") if isinstance(size, dict) else size if isinstance(size, int) else None
    if do_resize and not isinstance(se, int):
        return None
    crop = cfg.get("crop_size")
    if not cfg.get("do_center_crop", True):
        return None
    if isinstance(crop, int):
        ch = cw = crop
    elif isinstance(crop, dict) and "height" in crop and "width" in crop:
        ch, cw = int(crop["height"]), int(crop["width"])
    else:
        return None
    mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
    if not (isinstance(mean, (list, tuple)) and len(mean) == 3 and isinstance(std, (list, tuple)) and len(std) == 3):
        return None
    return {"do_resize": do_resize, "shortest_edge": int(se or 0), "crop_h": ch, "crop_w": cw,
            "do_rescale": bool(cfg.get("do_rescale", True)), "rescale": float(cfg.get("rescale_factor", 1 / 255)),
            "do_normalize": bool(cfg.get("do_normalize", True)), "mean": [float(m) for m in mean],
            "std": [float(v) for v in std]}


def _native(frames, params: dict, dtype, out):
    _C = native_extension("preprocess")

    shape = _check_frames_array(frames)
    if isinstance(frames, np.ndarray):
        arr = frames if frames.ndim == 4 else frames[None]
        ptr, strides = arr.__array_interface__["data"][0], list(arr.strides)  # uint8: bytes == elements
    else:
        arr = frames if frames.dim() == 4 else frames.unsqueeze(0)
        ptr, strides = arr.data_ptr(), list(arr.stride())
    want = (shape[0], 3, params["crop_h"], params["crop_w"])
    if params["do_resize"]:
        h, w = shape[1], shape[2]
        nh, nw = _C.output_size(h, w, params["shortest_edge"])
    else:
        nh, nw = shape[1], shape[2]
    if params["crop_h"] > nh or params["crop_w"] > nw:
        raise InputError(f"frames: {nh}x{nw} after resize is smaller than the {params['crop_h']}x{params['crop_w']} crop")
    if out is None:
        out = torch.empty(want, dtype=dtype)
    else:
        _check_out(out, want, dtype)
        if out.device.type != "cpu":
            raise InputError(f"out: the native path writes host memory; got a tensor on {out.device}")
    _C.preprocess(ptr, list(arr.shape), strides, params, out.data_ptr(), _NATIVE_DTYPES[dtype], 0)
    return out


def _check_out(out, want, dtype):
    if not isinstance(out, torch.Tensor):
        raise InputError(f"out: expected a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(want) or out.dtype != dtype:
        raise InputError(f"out: expected shape {tuple(want)} and dtype {dtype}, got {tuple(out.shape)} and {out.dtype}")
    if not out.is_contiguous():
        raise InputError("out: must be contiguous")


def preprocess(frames, processor_config, *, dtype=torch.float32, out: torch.Tensor | None = None,
               device=None) -> torch.Tensor:
    """uint8 RGB frames (T, H, W, 3) -> (T, 3, S, S) in `dtype`, following preprocessor_config.json.

    Runs pllava._C (pixel-exact with transformers' CLIPImageProcessor) for CPU frames when it is built and covers
    the config, else torch (on `device`, e.g. on the GPU from uploaded uint8 frames). `out` receives the result
    (e.g. a pinned host buffer). PLLAVA_PREPROCESS=torch|native forces a path.
    """
    cfg = load_processor_config(processor_config)
    if dtype not in _NATIVE_DTYPES:
        raise InputError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
    forced = os.environ.get("PLLAVA_PREPROCESS", "").strip().lower()
    if forced not in ("", "torch", "native"):
        raise ValueError(f"PLLAVA_PREPROCESS={forced!r}: expected 'torch' or 'native'")
    on_cpu = not (isinstance(frames, torch.Tensor) and frames.device.type != "cpu")
    params = native_params(cfg) if forced != "torch" and on_cpu else None
    if params is not None and native_available():
        log_once("pllava preprocess: native path (pllava._C)")
        px = _native(frames, params, dtype, out if (out is not None and out.device.type == "cpu") else None)
        if device is not None and torch.device(device) != px.device:
            px = px.to(device, non_blocking=True)
        if out is not None and out is not px:
            _check_out(out, px.shape, dtype)
            out.copy_(px)
            return out
        return px
    if forced == "native":
        raise RuntimeError("PLLAVA_PREPROCESS=native but " + ("pllava._C is not built" if not native_available()
                           else "the native path does not cover this config or these frames"))
    log_once("pllava preprocess: torch path" + ("" if native_available() else " (pllava._C not built)"))
    return preprocess_torch(frames, cfg, dtype=dtype, out=out, device=device)


def _pil_filter(resample: int):
    """PIL's filters as libImaging/Resample.c defines them: (function, support)."""
    if resample == 3:
        def bicubic(x, a=-0.5):
            x = abs(x)
            if x < 1.0:
                return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
            if x < 2.0:
                return (((x - 5) * x + 8) * x - 4) * a
            return 0.0
        return bicubic, 2.0
    if resample == 2:
        return (lambda x: 1.0 - abs(x) if abs(x) < 1.0 else 0.0), 1.0
    raise ConfigError(f"preprocessor config: field 'resample' = {resample!r} is not supported (2 = bilinear, "
                      "3 = bicubic)")


def pil_weights(in_size: int, out_size: int, out0: int, n: int, resample: int = 3) -> torch.Tensor:
    """PIL's fixed-point resampling weights for output pixels [out0, out0+n) of an in_size -> out_size resize, as a
    dense (n, in_size) float64 matrix of integers (22-bit fixed point). Python floats are IEEE doubles, so every
    step below rounds exactly as precompute_coeffs / normalize_coeffs_8bpc do in C."""
    fn, fsupport = _pil_filter(resample)
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = fsupport * filterscale
    ss = 1.0 / filterscale
    m = np.zeros((n, in_size), np.float64)
    for i in range(n):
        center = (out0 + i + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        k = [fn((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for v in k:
            ww += v
        for x, v in enumerate(k):
            w = v / ww if ww != 0.0 else v
            m[i, xmin + x] = int(-0.5 + w * (1 << 22)) if w < 0 else int(0.5 + w * (1 << 22))
    return torch.from_numpy(m)


def _pil_pass(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One PIL resampling pass along the last dim of x (float64 integers 0..255): the int32 sums of PIL are exact in
    float64 (|sum| < 2^31 < 2^53), then + 2^21, >> 22 and clamp, as clip8."""
    acc = torch.matmul(x, weights.to(x.device).T) + float(1 << 21)
    return torch.floor(acc / float(1 << 22)).clamp_(0, 255)


def preprocess_torch(frames, processor_config, *, dtype=torch.float32, out: torch.Tensor | None = None,
                     device=None) -> torch.Tensor:
    """The torch path (CPU, or the GPU from uploaded uint8 frames): PIL's two fixed-point passes reproduced with
    float64 matmuls over only the rows and columns that survive the crop, so it is pixel-exact too."""
    cfg = load_processor_config(processor_config)
    x = _as_frames(frames)
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2)  # (T, 3, H, W) uint8
    h, w = x.shape[-2:]
    nh, nw = h, w
    if cfg.get("do_resize", True):
        se = _size(cfg, "size", "shortest_edge")
        if isinstance(se, tuple):
            nh, nw = se
        else:  # shortest edge -> se, the other edge scaled and floored (transformers' get_resize_output_image_size)
            short, long = (h, w) if h <= w else (w, h)
            ns, nl = se, int(se * long / short)
            nh, nw = (ns, nl) if h <= w else (nl, ns)
    ch, cw, top, left = nh, nw, 0, 0
    if cfg.get("do_center_crop", True):
        cs = _size(cfg, "crop_size", "height")
        ch, cw = cs if isinstance(cs, tuple) else (cs, cs)
        if ch > nh or cw > nw:
            raise InputError(f"frames: {nh}x{nw} after resize is smaller than the {ch}x{cw} crop")
        top, left = (nh - ch) // 2, (nw - cw) // 2
    resample = int(cfg.get("resample", 3))
    if nw != w:  # horizontal first, as PIL, on the rows the vertical pass will read
        rows = slice(None) if nh != h else slice(top, top + ch)
        x = _pil_pass(x[..., rows, :].double(), pil_weights(w, nw, left, cw, resample))
    else:
        x = x[..., left:left + cw].double()
        if nh == h:
            x = x[..., top:top + ch, :]
    if nh != h:
        x = _pil_pass(x.transpose(-1, -2), pil_weights(h, nh, top, ch, resample)).transpose(-1, -2)
    x = x.float()
    if cfg.get("do_rescale", True):
        x = x * float(cfg.get("rescale_factor", 1 / 255))
    if cfg.get("do_normalize", True):
        mean = torch.tensor(cfg.get("image_mean", CLIP_MEAN), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("image_std", CLIP_STD), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
    x = x.to(dtype)
    if out is not None:
        _check_out(out, x.shape, x.dtype)
        out.copy_(x)
        return out
    return x.contiguous()
