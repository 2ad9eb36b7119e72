"""Recaptioning throughput (issue: captioning at scale): clips/s of `pllava caption --output` at batch 1 and at the
default batch size (8), on the tiny and small presets, with the fraction of time the model waited on decoding.

    pytest benchmarks/bench_caption.py --benchmark-only -s
    PLLAVA_CAPTION_CLIPS=16 PLLAVA_BENCH_PRESETS=tiny,small ...

Clips: the two real videos of ../shared/videos (640x360 and 1280x720 h264) when present, else synthetic ones,
copied under distinct names; the prefix cache is off so every clip is decoded and encoded. Each figure is the
median of PLLAVA_BENCH_RUNS runs (default 2).
"""
import os
import shutil

import numpy as np
import pytest
import torch

import pllava
from pllava.bench import make_preset_checkpoint
from pllava.captioning import CaptionSettings, caption_to_jsonl

PRESETS = os.environ.get("PLLAVA_BENCH_PRESETS", "tiny,small").split(",")
CLIPS = int(os.environ.get("PLLAVA_CAPTION_CLIPS", "8"))
RUNS = int(os.environ.get("PLLAVA_BENCH_RUNS", "2"))
NEW_TOKENS = int(os.environ.get("PLLAVA_CAPTION_TOKENS", "128"))
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "videos")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    src = [os.path.join(SHARED, f) for f in ("cooking.mp4", "jesse_dance.mp4")]
    if not all(os.path.isfile(p) for p in src):
        from pllava.testing import make_video

        src = [make_video(str(d / "syn0.mp4"), num_frames=120, size=(640, 360), codec="libx264", gop=30),
               make_video(str(d / "syn1.mp4"), num_frames=120, size=(1280, 720), codec="libx264", gop=30)]
    out = d / "in"
    out.mkdir()
    for i in range(CLIPS):
        shutil.copy(src[i % 2], out / f"clip{i:03d}.mp4")
    return str(out), src


@pytest.mark.parametrize("preset", PRESETS)
def test_caption_throughput(benchmark, preset, clip_dir, tmp_path):
    d, src = clip_dir
    dt = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    _, adapter = make_preset_checkpoint(preset, dtype=dt, device="cuda" if torch.cuda.is_available() else "cpu")
    eng = pllava.Engine.from_pretrained(adapter, dtype=dt)
    eng.prefix_cache = False
    st = CaptionSettings("Describe the video in details.", max_new_tokens=NEW_TOKENS, model=preset)
    rows = []

    def run(bs):
        res = []
        for k in range(RUNS):
            out = str(tmp_path / f"{preset}-{bs}-{k}.jsonl")
            s = caption_to_jsonl(eng, [d], out, st, batch_size=bs, progress=False)
            assert s.captioned == CLIPS and s.failed == 0
            res.append(s)
        return res

    run(2)  # warm-up (first Triton/BLAS calls, page cache)
    for bs in (1, 8):
        res = benchmark.pedantic(run, args=(bs,), rounds=1, iterations=1) if bs == 8 else run(bs)
        rows.append((bs, float(np.median([r.clips_per_s for r in res])),
                     float(np.median([r.model_wait_s / r.elapsed_s for r in res])),
                     float(np.median([r.elapsed_s for r in res]))))
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n### pllava caption --output, preset {preset}, {CLIPS} clips ({', '.join(os.path.basename(s) for s in src)}), "
          f"{eng.config.num_frames} frames, {NEW_TOKENS} new tokens, {dev}, {dt}, median of {RUNS}\n")
    print("| --batch-size | clips/s | elapsed s | model waited on decoding |\n|---:|---:|---:|---:|")
    for bs, cps, wait, el in rows:
        print(f"| {bs} | {cps:.3f} | {el:.1f} | {wait * 100:.0f} % |")
    print(f"\nbatch 8 / batch 1 clips/s: {rows[1][1] / rows[0][1]:.2f}x")
