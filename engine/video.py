"""Decoding and frame sampling. Every decoder call goes through `read_frames` / `stream_frames`.

The uniform sampler is PLLaVA's `get_index`: seg = (N-1)/n; idx_i = int(seg/2) + round(seg*i) (round half to
even, as numpy's), over the N frames of a full sequential decode.
"""
from __future__ import annotations

import io
import os
from typing import Iterator

import numpy as np
import torch

from .errors import VideoError


def uniform_indices(num_total: int, num_frames: int) -> list[int]:
    """PLLaVA's middle-of-segment indices; with fewer frames than asked, indices repeat as PLLaVA's do."""
    seg = float(num_total - 1) / num_frames
    start = int(seg / 2)
    return [start + int(round(seg * i)) for i in range(num_frames)]


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _open(source, what: str):
    import av

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise VideoError(f"{what}: zero bytes, not a video")
        f = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise VideoError(f"{what}: no such file")
        if os.path.getsize(path) == 0:
            raise VideoError(f"{what}: zero bytes, not a video")
        f = path
    elif hasattr(source, "read"):
        f = source
    else:
        raise VideoError(f"{what}: unsupported source type {type(source).__name__} (path, bytes or file-like)")
    try:
        container = av.open(f, mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoError(f"{what}: not a decodable video: {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoError(f"{what}: no video stream (audio-only or not a video)")
    return container


def _count_frames(source, what: str) -> int:
    """Frames of the first video stream, counted by demuxing packets (no decoding)."""
    import av

    container = _open(source, what)
    try:
        stream = container.streams.video[0]
        n = 0
        for packet in container.demux(stream):
            if packet.size:
                n += 1
        return n
    except av.FFmpegError as e:
        raise VideoError(f"{what}: corrupt container: {e}") from e
    finally:
        container.close()


def stream_frames(source, num_frames: int = 16, **kw) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield (index, timestamp_seconds, uint8 RGB frame (H, W, 3)) of the sampled frames in presentation order."""
    import av

    sampler = kw.get("sampler", "uniform")
    if sampler != "uniform" or any(kw.get(k) is not None for k in ("fps", "start", "end", "short_side")):
        raise ValueError(f"sampler {sampler!r} with fps/start/end/short_side is not supported yet; use 'uniform'")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    what = _describe(source)
    if hasattr(source, "read") and hasattr(source, "seek"):
        start_pos = source.tell()
    total = _count_frames(source, what)
    if total == 0:
        raise VideoError(f"{what}: the video stream holds no frames")
    if hasattr(source, "read"):
        source.seek(start_pos)
    wanted = uniform_indices(total, num_frames)
    want_set = set(wanted)
    last = max(wanted)
    container = _open(source, what)
    got: dict[int, tuple[float, np.ndarray]] = {}
    i = -1
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            i += 1
            if i in want_set:
                ts = float(frame.time) if frame.time is not None else float("nan")
                got[i] = (ts, frame.to_ndarray(format="rgb24"))
            if i >= last:
                break
    except av.FFmpegError as e:
        if not got:
            raise VideoError(f"{what}: decoding failed: {e}") from e
    finally:
        container.close()
    if not got:
        raise VideoError(f"{what}: no frame could be decoded")
    # Frames lost to corrupt packets: the nearest earlier decoded frame stands in (then the nearest later).
    have = sorted(got)
    for idx in wanted:
        src = max((h for h in have if h <= idx), default=have[0])
        ts, fr = got[src]
        yield idx, ts, fr


def read_frames(source, num_frames: int = 16, *, sampler: str = "uniform", fps=None, start=None, end=None,
                short_side=None) -> torch.Tensor:
    """Decode `num_frames` frames sampled from `source` -> uint8 tensor (N, H, W, 3)."""
    frames = [f for _, _, f in stream_frames(source, num_frames, sampler=sampler, fps=fps, start=start, end=end,
                                              short_side=short_side)]
    return torch.from_numpy(np.stack(frames))
