"""Sampling 16 frames from a 5-minute 1080p30 h264 clip (2 s GOP): the seek sampler against decoding everything,
transformers' load_video and decord (when installed); and time to the first visual token on the tiny model with
and without the decode/encode overlap.

    pytest benchmarks/bench_decode.py --benchmark-only -s

The clip (9000 frames) is encoded once with libx264 and cached in benchmarks/results. Target (printed, not
asserted): seek sampler >= 10x faster than decode-everything.
"""
import os
import time

import numpy as np
import pytest

from pllava.video import read_frames, uniform_indices

SECONDS, FPS, W, H = 300, 30, 1920, 1080
TABLE = []


@pytest.fixture(scope="module")
def clip(results_dir):
    import av

    path = os.path.join(results_dir, "bench_5min_1080p30_gop2s.mp4")
    if os.path.exists(path):
        return path
    tmp = path + ".part"
    yy, xx = np.mgrid[0:H, 0:W]
    base = ((xx // 8 + yy // 8) % 256).astype(np.uint8)
    with av.open(tmp, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"preset": "ultrafast", "x264-params": f"keyint={2 * FPS}:min-keyint={2 * FPS}:scenecut=0"}
        for i in range(SECONDS * FPS):
            img = np.empty((H, W, 3), np.uint8)
            img[..., 0] = base + np.uint8(i % 256)
            img[..., 1] = base[::-1] + np.uint8((2 * i) % 256)
            img[..., 2] = (i * 3) % 256
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    os.replace(tmp, path)
    return path


def _time(fn, rounds=1):
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def test_seek_sampler(benchmark, clip):
    t, frames = _time(lambda: read_frames(clip, 16), rounds=3)
    TABLE.append(("pllava seek sampler (read_frames)", t))
    assert frames.shape == (16, H, W, 3)
    benchmark.pedantic(lambda: read_frames(clip, 16), rounds=3, iterations=1)


def test_seek_sampler_scaled(benchmark, clip):
    t, frames = _time(lambda: read_frames(clip, 16, short_side=336), rounds=3)
    TABLE.append(("pllava seek sampler, short_side=336 in the scaler", t))
    assert frames.shape == (16, 336, 597, 3)
    benchmark.pedantic(lambda: read_frames(clip, 16, short_side=336), rounds=3, iterations=1)


def _decode_everything_keep(path, n):
    """Decode every frame in order (threaded, as PyAV allows) and keep the n sampled ones as RGB: the cost of a
    decode-everything loader, without holding 9000 1080p frames (56 GB) in memory."""
    import av

    with av.open(path) as c:
        st = c.streams.video[0]
        st.thread_type = "AUTO"
        total = st.frames
        want = set(uniform_indices(total, n))
        kept = {}
        for i, fr in enumerate(c.decode(st)):
            if i in want:
                kept[i] = fr.to_ndarray(format="rgb24")
    return [kept[i] for i in uniform_indices(total, n)]


def test_decode_everything(benchmark, clip):
    t, kept = _time(lambda: _decode_everything_keep(clip, 16))
    TABLE.append(("decode everything (PyAV, sequential)", t))
    seek = read_frames(clip, 16)
    assert all(np.array_equal(seek[k].numpy(), f) for k, f in enumerate(kept)), "seek frames differ"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_transformers_load_video(benchmark, clip):
    from transformers.video_utils import load_video

    t, _ = _time(lambda: load_video(clip, num_frames=16, backend="pyav"))
    TABLE.append(("transformers load_video (pyav)", t))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_decord(benchmark, clip):
    decord = pytest.importorskip("decord")

    def run():
        vr = decord.VideoReader(clip)
        return vr.get_batch(uniform_indices(len(vr), 16)).asnumpy()

    t, _ = _time(run)
    TABLE.append(("decord get_batch", t))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def test_time_to_first_visual_token(benchmark, clip):
    """Decode 16 frames of the 1080p clip and encode them with the `small` preset (CLIP at 336 px, 4 layers of width
    384), overlapped (frame k encodes while k+1 decodes) or decode-then-encode."""
    import pllava
    from pllava.bench import make_preset_checkpoint

    _, adapter = make_preset_checkpoint("small", dtype=__import__("torch").float32)
    eng = pllava.Engine.from_pretrained(adapter)
    eng.encode(clip)  # warm-up
    t_seq, _ = _time(lambda: eng.encode(clip, overlap=False), rounds=2)
    t_ovl, _ = _time(lambda: eng.encode(clip, overlap=True), rounds=2)
    TABLE.append(("first visual token (small preset), decode then encode", t_seq))
    TABLE.append(("first visual token (small preset), decode overlapped with encode", t_ovl))
    benchmark.pedantic(lambda: eng.encode(clip), rounds=2, iterations=1)


def test_print_table(benchmark):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # so --benchmark-only runs it
    d = dict(TABLE)
    everything = d.get("decode everything (PyAV, sequential)")
    seek = d.get("pllava seek sampler (read_frames)")
    print(f"\n### 16 frames from a {SECONDS // 60}-minute {H}p{FPS} h264 clip (2 s GOP), {os.cpu_count()} CPU cores\n")
    print("| method | seconds | vs decode-everything |\n|---|---:|---:|")
    for name, t in TABLE:
        ratio = f"{everything / t:.1f}x" if everything and "visual token" not in name else ""
        print(f"| {name} | {t:.3f} | {ratio} |")
    if everything and seek:
        print(f"\nseek sampler speed-up: {everything / seek:.1f}x (target >= 10x)")
