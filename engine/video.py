"""Decoding and frame sampling: 16 frames from any clip without decoding the whole clip, in a background thread.

Index i always means the i-th frame of a full sequential decode in presentation order. For seekable sources the
frame timestamps come from one demux pass (packets only, no decoding): sorted packet pts = presentation order.
Each wanted frame is then reached by seeking to the keyframe before it and decoding forward; wanted frames in the
same GOP share one seek. The uniform sampler is PLLaVA's `get_index`: seg = (N-1)/n; idx_i = int(seg/2) +
round(seg*i) (round half to even, as numpy's), so a clip with fewer frames than asked repeats frames as PLLaVA's do.

Backends sit behind `DecoderBackend`; PyAV (bundled FFmpeg) is the one shipped. Where the bytes come from (paths,
bytes, file objects, URLs) and the limits checked first: `sources.py`. Live sources (pipes, growing files, RTSP,
devices) go through `live.live_windows`.
"""
from __future__ import annotations

import bisect
import functools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .errors import VideoError
# DecodeLimits, DEFAULT_LIMITS, describe and is_source live in sources.py; pllava.video is their public spelling
from .sources import DEFAULT_LIMITS, DecodeLimits, as_input, describe, is_source  # noqa: F401

log = logging.getLogger("pllava")

SAMPLERS = ("uniform", "fps")


def uniform_indices(num_total: int, num_frames: int) -> list[int]:
    """PLLaVA's middle-of-segment indices over num_total frames."""
    seg = float(num_total - 1) / num_frames
    start = int(seg / 2)
    return [start + int(round(seg * i)) for i in range(num_frames)]



@dataclass
class VideoInfo:
    pts: list[int]  # presentation timestamps of every frame, sorted (frame i has pts[i])
    keyframe_pts: list[int]  # sorted
    time_base: float
    width: int
    height: int
    codec: str
    indexed_by: str = "demux"  # "index": the container's sample index; "demux": one pass over the packets

    @property
    def num_frames(self) -> int:
        return len(self.pts)

    def seconds(self, i: int) -> float:
        return (self.pts[i] - self.pts[0]) * self.time_base


class DecoderBackend:
    """The interface a decoder implements (PyAV here; torchcodec can be registered with `register_backend`)."""

    name = "abstract"

    def probe(self, src, what: str, limits: DecodeLimits) -> VideoInfo:
        raise NotImplementedError

    def frames(self, src, what: str, info: VideoInfo, wanted: list[int], size, stop: threading.Event
               ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index, RGB uint8 frame) for the sorted distinct wanted indices."""
        raise NotImplementedError


@functools.cache
def _av_major() -> int:
    import av

    try:
        return int(av.__version__.split(".")[0])
    except ValueError:  # a version string this cannot read: take the newer API
        return 19


def _open_kwargs() -> dict:
    """What av.open needs so that a container whose metadata is not UTF-8 (a title in Latin-1) opens: PyAV < 19
    decodes it strictly unless told `metadata_errors="ignore"` (else UnicodeDecodeError, and the clip fails);
    PyAV 19 decodes it with surrogateescape itself and refuses that argument (TypeError on every open)."""
    return {"metadata_errors": "ignore"} if _av_major() < 19 else {}


@functools.cache
def _convert_kwargs() -> dict:
    """Single-threaded colour conversion (PyAV >= 17 takes `threads`; before it, conversion had no threads). PyAV 19
    keeps one scaler a thread, in thread-local storage, threaded by default: when a process forked while a thread
    that had converted frames was alive (subprocess with a preexec_fn, as Ray starts its daemons; a fork-started
    multiprocessing child), Python freed that thread's storage in the child, and the scaler joined slice threads
    that do not exist after a fork: the child hung before exec (Python 3.12 and 3.13). One thread has nothing to
    join, and cost nothing measurable: 235 720p frames converted in 361 ms against 394 (a scratch timer, Zen 5)."""
    return {"threads": 1} if _av_major() >= 17 else {}


class PyAVBackend(DecoderBackend):
    name = "pyav"

    def _open(self, src, what):
        import av

        if hasattr(src, "seek"):
            src.seek(0)
        try:
            c = av.open(src, mode="r", **_open_kwargs())
        except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
            raise VideoError(f"{what}: not a decodable video (corrupt, truncated, or not a video): "
                             f"{getattr(e, 'strerror', None) or e}") from e
        if not c.streams.video:
            c.close()
            raise VideoError(f"{what}: no video stream (audio-only or not a video)")
        return c

    def probe(self, src, what, limits):
        import av

        c = self._open(src, what)
        try:
            st = c.streams.video[0]
            cc = st.codec_context
            if cc is None:  # a stream header FFmpeg could not set a decoder up from (a fuzzed clip did this)
                raise VideoError(f"{what}: the video stream's codec could not be read (corrupt header)")
            w, h = int(cc.width or 0), int(cc.height or 0)
            if w * h > limits.max_pixels:
                raise VideoError(f"{what}: {w}x{h} frames exceed max_pixels={limits.max_pixels}")
            if not _has_decoder(cc.name):
                raise VideoError(f"{what}: unsupported codec '{cc.name}' (no decoder in this FFmpeg build)")
            tb = float(st.time_base) if st.time_base else 1.0
            dur = (st.duration * tb) if st.duration else ((c.duration or 0) / 1e6)
            if dur > limits.max_duration_s:
                raise VideoError(f"{what}: {dur:.0f} s exceeds max_duration_s={limits.max_duration_s:.0f}")
            pts, keys = _index_timestamps(c, st)
            if pts:  # the container's own index: no pass over the file
                return VideoInfo(pts, keys, tb, w, h, cc.name, "index")
            try:
                for p in c.demux(st):
                    if p.size == 0:
                        continue
                    t = p.pts if p.pts is not None else p.dts
                    if t is None:
                        raise VideoError(f"{what}: packets without timestamps; cannot index frames")
                    pts.append(int(t))
                    if p.is_keyframe:
                        keys.append(int(t))
            except av.FFmpegError as e:  # a damaged tail: index what was read
                log.warning("%s: demux stopped early (%s); using the first %d frames", what, e, len(pts))
            if not pts:
                raise VideoError(f"{what}: the video stream holds no frames")
            pts.sort()
            keys.sort()
            if not keys or keys[0] > pts[0]:
                keys.insert(0, pts[0])  # streams that start mid-GOP: the first frame decodes after a seek to 0
            return VideoInfo(pts, keys, tb, w, h, cc.name, "demux")
        finally:
            c.close()

    def frames(self, src, what, info, wanted, size, stop):
        c, st, damage = _open_decoder(self, src, what, threads="AUTO")
        threaded = True  # frame threads, until the first sign of damage
        one_size = _OneSize(what)
        try:
            i_want = 0
            pos_key = None  # keyframe pts the decoder last started from
            last = None  # (index, frame) of the latest decoded frame at or before the target
            it = None
            while i_want < len(wanted):
                if stop.is_set():
                    return
                if threaded and damage:  # damage under frame threads: see _open_decoder
                    log.info("%s: %s; decoding on without frame threads", what, damage[0])
                    c.close()
                    c, st, damage = _open_decoder(self, src, what, threads="SLICE")
                    threaded, it = False, None
                idx = wanted[i_want]
                target = info.pts[idx]
                key = info.keyframe_pts[bisect.bisect_right(info.keyframe_pts, target) - 1]
                # decoding on from where we are is cheaper than a seek once we are past the target's keyframe
                # (wanted frames closer together than a GOP); seek when the target lies beyond the next keyframe
                ahead = last is not None and info.pts[last[0]] >= key and last[0] <= idx
                if it is None or (key > pos_key and not ahead) or (last is not None and last[0] > idx):
                    c.seek(key, backward=True, any_frame=False, stream=st)
                    it = _decode_iter(c, st, what, damage)
                    pos_key, last = key, None
                got = None
                for fr in it:
                    if threaded and damage:
                        break  # nothing decoded after the damage is used: this target is decoded again
                    if fr.pts is None:
                        continue
                    if fr.pts > target:
                        # the wanted frame was lost (corrupt packet): the nearest earlier one stands in, else this
                        cur = (_index_at(info, fr.pts), fr)
                        got, last = (last or cur), cur
                        break
                    last = (_index_at(info, fr.pts), fr)
                    if fr.pts == target:
                        got = last
                        break
                else:
                    got = last
                    it = None
                if threaded and damage:
                    continue
                if got is None:
                    raise VideoError(f"{what}: frame {idx} (pts {target}) could not be decoded")
                arr = one_size.rgb(got[1], size)
                while i_want < len(wanted) and wanted[i_want] <= idx:
                    yield wanted[i_want], arr
                    i_want += 1
        finally:
            c.close()


def _index_at(info: VideoInfo, pts: int) -> int:
    """The index of the first indexed frame at or after `pts`. A damaged clip can decode a frame whose pts lies
    past every indexed one (a fuzzed MKV did: an IndexError before); it counts as the last."""
    return min(bisect.bisect_left(info.pts, pts), len(info.pts) - 1)


def _index_timestamps(c, st) -> tuple[list[int], list[int]]:
    """Frame timestamps from an MP4/MOV sample index (read with the header), when they are the presentation
    timestamps: the index holds decode timestamps, equal to presentation ones only without B-frames. ([], [])
    otherwise, and the caller demuxes."""
    if not c.format.name.startswith("mov") or st.codec_context.has_b_frames or not st.frames:
        return [], []
    try:
        entries = [e for e in st.index_entries if e.size > 0 and not e.is_discard]
    except AttributeError:  # PyAV without index_entries
        return [], []
    ts = [int(e.timestamp) for e in entries]
    if len(ts) != st.frames or any(b <= a for a, b in zip(ts, ts[1:])):
        return [], []
    keys = [int(e.timestamp) for e in entries if e.is_keyframe]
    if not keys or keys[0] > ts[0]:
        keys.insert(0, ts[0])
    return ts, keys


def _has_decoder(name: str) -> bool:
    import av

    try:
        av.codec.Codec(name, "r")
        return True
    except (av.FFmpegError, ValueError):  # UnknownCodecError is both
        return False


def _open_decoder(backend, src, what, threads: str):
    """(container, its video stream, the list of damage seen) with FFmpeg's `threads` type. 'AUTO' (frame threads)
    is 13-15 % faster on 2 cores (16 frames of 720p: 0.49 against 0.57 s), but frame threads conceal damaged data
    depending on timing: a garbled MPEG-TS clip gave another frame in 8 of 300 decodes under load (0 of 300
    without frame threads), with no decode error raised. So a reader starts with 'AUTO' and, at the first sign of
    damage (a packet the demuxer flags corrupt, a frame the decoder flags corrupt, a packet that fails), reopens
    with 'SLICE' (the slices of one frame in parallel: deterministic) and decodes again every frame it has not
    handed out, so a damaged clip gives the same frames on every run."""
    c = backend._open(src, what)
    st = c.streams.video[0]
    st.thread_type = threads
    return c, st, []


def _decode_iter(c, st, what, damage: list | None = None):
    """Frames in presentation order; a packet that fails to decode is skipped (the rest of the clip survives).
    Each sign of damage (a failed packet, a packet or frame flagged corrupt) is appended to `damage` before the
    next frame is yielded."""
    import av

    bad = 0
    for pkt in c.demux(st):
        if pkt.is_corrupt and damage is not None:
            damage.append(f"corrupt packet at pts {pkt.pts}")
        try:
            for fr in pkt.decode():
                if fr.is_corrupt and damage is not None:
                    damage.append(f"corrupt frame at pts {fr.pts}")
                yield fr
        except av.FFmpegError as e:
            bad += 1
            if damage is not None:
                damage.append(str(e))
            if bad == 1:
                log.warning("%s: skipping undecodable packet(s): %s", what, e)


class _OneSize:
    """Every frame of one read at one size: a stream whose resolution changes part-way (spliced recordings, or
    damage: a fuzzed MPEG-2 clip did this) gave frames that do not stack (an untyped ValueError). The first
    frame's output size holds; a later frame of another size is scaled to it by FFmpeg's scaler, logged once."""

    def __init__(self, what: str):
        self.what, self.first, self.warned = what, None, False

    def rgb(self, frame, size) -> np.ndarray:
        """`size`: what the caller scales this frame to (None: as stored)."""
        natural = size or (frame.width, frame.height)
        if self.first is None:
            self.first = natural
        elif natural != self.first:
            if not self.warned:
                log.warning("%s: frames change size part-way (%dx%d after %dx%d); scaled to the first frames' size",
                            self.what, natural[0], natural[1], *self.first)
                self.warned = True
            size = self.first
        return _to_rgb(frame, size)


def _to_rgb(frame, size) -> np.ndarray:
    if size is None:
        arr = frame.to_ndarray(format="rgb24", **_convert_kwargs())
    else:  # FFmpeg's scaler resizes during the colour conversion: no full-resolution RGB is materialised
        arr = frame.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="BICUBIC",
                               **_convert_kwargs())
    return upright(arr, frame)


def upright(arr: np.ndarray, frame) -> np.ndarray:
    """Apply the display matrix (phones record portrait video as landscape frames plus a rotation): rotate by
    the frame's rotation, counter-clockwise in degrees as FFmpeg's av_display_rotation_get gives it, in steps
    of 90 (other angles are rare and left alone, logged)."""
    rot = getattr(frame, "rotation", 0) or 0
    k = int(round(rot / 90.0))
    if abs(rot - 90 * k) > 1:
        log.warning("display rotation %.1f degrees is not a multiple of 90; frames are left as stored", rot)
        return arr
    return np.ascontiguousarray(np.rot90(arr, k % 4)) if k % 4 else arr


BACKENDS: dict[str, DecoderBackend] = {"pyav": PyAVBackend()}


def register_backend(name: str, backend: DecoderBackend):
    """Plug in another decoder (e.g. torchcodec) under `name`; select it with backend=name."""
    BACKENDS[name] = backend


def _scaled_size(w: int, h: int, short_side: int | None):
    if short_side is None or min(w, h) == short_side:
        return None
    if short_side <= 0:
        raise ValueError(f"short_side must be positive, got {short_side}")
    if w <= h:
        return short_side, max(1, int(round(h * short_side / w)))
    return max(1, int(round(w * short_side / h))), short_side


def select_indices(info: VideoInfo, num_frames: int, sampler: str, fps, start, end) -> list[int]:
    """The sampled frame indices (sorted, repeats allowed) for a probed clip."""
    t = [info.seconds(i) for i in range(info.num_frames)]
    lo = 0 if start is None else bisect.bisect_left(t, float(start))
    hi = info.num_frames if end is None else bisect.bisect_left(t, float(end))
    if hi <= lo:
        raise VideoError(f"time range [{start}, {end}) s holds no frame (clip spans 0 to {t[-1]:.3f} s)")
    if sampler == "uniform":
        return [lo + i for i in uniform_indices(hi - lo, num_frames)]
    # fps: the frame showing at each tick start + k/fps (the latest frame at or before it), at most num_frames
    t0 = t[lo]
    ticks = []
    k = 0
    while True:
        tk = t0 + k / float(fps)
        if tk > t[hi - 1] + 1e-9:
            break
        ticks.append(max(lo, bisect.bisect_right(t, tk + 1e-9, lo, hi) - 1))
        k += 1
    if len(ticks) > num_frames:  # thin evenly to the cap
        ticks = [ticks[i] for i in uniform_indices(len(ticks), num_frames)]
    return ticks


def _check_args(num_frames, sampler, fps, limits):
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames <= 0:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if num_frames > limits.max_frames:
        raise ValueError(f"num_frames={num_frames} exceeds max_frames={limits.max_frames}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if sampler == "fps" and not (isinstance(fps, (int, float)) and fps > 0):
        raise ValueError(f"sampler='fps' needs fps > 0, got {fps!r}")


def _iter_frames(source, num_frames, sampler, fps, start, end, short_side, limits, backend, stop):
    import av

    src, what = as_input(source, limits)
    be = BACKENDS[backend]
    try:
        info = be.probe(src, what, limits)
        idx = select_indices(info, num_frames, sampler, fps, start, end)
        size = _scaled_size(info.width, info.height, short_side)
        distinct = sorted(set(idx))
        pos = {i: [] for i in distinct}
        for k, i in enumerate(idx):
            pos[i].append(k)
        for i, arr in be.frames(src, what, info, distinct, size, stop):
            for _ in pos[i]:
                yield i, info.seconds(i), arr
    except av.FFmpegError as e:  # one the backend did not map (a damaged clip's seek gave EPERM): typed, named
        raise VideoError(f"{what}: not decodable (corrupt or truncated): {type(e).__name__}: "
                         f"{getattr(e, 'strerror', None) or e}") from e


def stream_frames(source, num_frames: int = 16, *, sampler: str = "uniform", fps=None, start=None, end=None,
                  short_side=None, limits: DecodeLimits = DEFAULT_LIMITS, backend: str = "pyav",
                  prefetch: int = 4) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield (index, timestamp_seconds, uint8 RGB frame (H, W, 3)) of the sampled frames in presentation order,
    decoded in a background thread `prefetch` frames ahead (so the caller can encode frame k while k+1 decodes).
    A repeated index (a clip shorter than num_frames) is yielded once per repeat."""
    _check_args(num_frames, sampler, fps, limits)
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()
    done = object()

    def put(item):
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in _iter_frames(source, num_frames, sampler, fps, start, end, short_side, limits, backend, stop):
                if not put(item):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread, re-raised there
            put(e)

    th = threading.Thread(target=work, name="pllava-decode", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        th.join(timeout=5)


def read_frames(source, num_frames: int = 16, *, sampler: str = "uniform", fps=None, start=None, end=None,
                short_side=None, limits: DecodeLimits = DEFAULT_LIMITS, backend: str = "pyav") -> torch.Tensor:
    """Decode `num_frames` frames sampled from `source` -> uint8 tensor (N, H, W, 3)."""
    _check_args(num_frames, sampler, fps, limits)
    stop = threading.Event()
    frames = [f for _, _, f in _iter_frames(source, num_frames, sampler, fps, start, end, short_side, limits,
                                             backend, stop)]
    return torch.from_numpy(np.stack(frames))


def decode_all(source, limits: DecodeLimits = DEFAULT_LIMITS) -> list[np.ndarray]:
    """Every frame of a full sequential decode (the reference the samplers are tested against; and the baseline
    the decode benchmark measures)."""
    src, what = as_input(source, limits)
    be = PyAVBackend()
    for threads in ("AUTO", "SLICE"):  # damage under frame threads: once more without them (_open_decoder)
        c, st, damage = _open_decoder(be, src, what, threads)
        try:
            frames = [upright(f.to_ndarray(format="rgb24", **_convert_kwargs()), f)
                      for f in _decode_iter(c, st, what, damage)]
        finally:
            c.close()
        if not damage:
            break
    return frames



def __getattr__(name):  # pllava.video.live_windows, as the README spells it; live.py imports this module, so lazily
    if name in ("live_windows", "LiveWindow"):
        from . import live
        return getattr(live, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
