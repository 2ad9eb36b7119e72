"""Live sources: a pipe, a growing file, an RTSP URL or a device, read as a sliding window of frames every few
seconds of stream time (`live_windows`; Engine.live and `pllava live` use it). A silent source ends after
limits.timeout_s instead of hanging the stream.
"""
from __future__ import annotations

import io
import os
import select
import stat
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from .errors import VideoError
from .sources import DEFAULT_LIMITS, DecodeLimits, describe
from .video import _OneSize, _check_args, _decode_iter, _open_kwargs, _scaled_size, uniform_indices


class _PatientReader(io.RawIOBase):
    """A non-seekable reader over a growing file or a pipe: at EOF it waits for more data up to `idle_s`
    seconds (then ends), so a live source that stops ends the stream instead of hanging it."""

    def __init__(self, f, idle_s: float, poll_s: float = 0.05):
        self.f, self.idle_s, self.poll_s = f, idle_s, poll_s

    def readable(self):
        return True

    def readinto(self, b):
        t0 = time.monotonic()
        fd = _pipe_fd(self.f)
        while True:
            if fd is not None:  # a pipe/FIFO/socket blocks while its writer is silent: wait with a deadline
                left = self.idle_s - (time.monotonic() - t0)
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    return 0
                data = os.read(fd, len(b))
                b[:len(data)] = data
                return len(data)
            n = self.f.readinto(b) if hasattr(self.f, "readinto") else _readinto(self.f, b)
            if n:
                return n
            if time.monotonic() - t0 > self.idle_s:
                return 0
            time.sleep(self.poll_s)


def _pipe_fd(f):
    try:
        fd = f.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    mode = os.fstat(fd).st_mode
    return fd if (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)) else None


def _readinto(f, b):
    data = f.read(len(b))
    b[:len(data)] = data
    return len(data)


@dataclass
class LiveWindow:
    frames: torch.Tensor  # uint8 (N, H, W, 3)
    timestamps: list[float] = field(default_factory=list)  # seconds from the stream's first frame
    end_time: float = 0.0


def live_windows(source, num_frames: int = 16, *, window_s: float = 8.0, every_s: float = 2.0, short_side=None,
                 limits: DecodeLimits = DEFAULT_LIMITS, growing: bool = False) -> Iterator[LiveWindow]:
    """A sliding window over a live source: every `every_s` seconds of stream time, `num_frames` frames spread
    uniformly over the last `window_s` seconds. `source`: a pipe/file object, a growing file's path (with
    growing=True), or an FFmpeg URL such as rtsp://... or a device. A source silent for limits.timeout_s ends."""
    import av

    _check_args(num_frames, "uniform", None, limits)
    if not (window_s > 0 and every_s > 0):
        raise ValueError(f"window_s and every_s must be > 0, got {window_s}, {every_s}")
    what = describe(source)
    owned = None
    if isinstance(source, (str, os.PathLike)) and growing:
        owned = open(os.fspath(source), "rb")
        src = _PatientReader(owned, limits.timeout_s)
    elif hasattr(source, "read"):
        src = _PatientReader(source, limits.timeout_s)
    else:
        src = os.fspath(source)
    try:
        try:
            kw = _open_kwargs()
            if isinstance(src, str):
                kw["timeout"] = limits.timeout_s
            c = av.open(src, mode="r", **kw)
        except (av.FFmpegError, OSError, ValueError) as e:
            raise VideoError(f"{what}: live source could not be opened (stopped or not a video): "
                             f"{getattr(e, 'strerror', None) or e}") from e
        with c:
            if not c.streams.video:
                raise VideoError(f"{what}: no video stream")
            st = c.streams.video[0]
            tb = float(st.time_base) if st.time_base else 1.0
            buf: list[tuple[float, np.ndarray]] = []
            one_size = _OneSize(what)  # a window's frames stack
            t0 = None
            next_emit = None
            got_any = False
            for fr in _decode_iter(c, st, what):
                if fr.pts is None:
                    continue
                if fr.width * fr.height > limits.max_pixels:
                    raise VideoError(f"{what}: {fr.width}x{fr.height} frames exceed max_pixels={limits.max_pixels}")
                t = fr.pts * tb
                t0 = t if t0 is None else t0
                t -= t0
                buf.append((t, one_size.rgb(fr, _scaled_size(fr.width, fr.height, short_side))))
                while buf and buf[0][0] < t - window_s:
                    buf.pop(0)
                next_emit = window_s if next_emit is None else next_emit
                if t + 1e-9 >= next_emit:
                    idx = uniform_indices(len(buf), num_frames)
                    got_any = True
                    yield LiveWindow(torch.from_numpy(np.stack([buf[i][1] for i in idx])),
                                     [buf[i][0] for i in idx], t)
                    next_emit += every_s
            if not got_any:
                if not buf:
                    raise VideoError(f"{what}: live source stopped before any frame arrived")
                idx = uniform_indices(len(buf), num_frames)  # shorter than one window: what there is
                yield LiveWindow(torch.from_numpy(np.stack([buf[i][1] for i in idx])), [buf[i][0] for i in idx],
                                 buf[-1][0])
    finally:
        if owned is not None:
            owned.close()
