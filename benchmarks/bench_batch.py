"""Continuous batching against one request at a time, in the same run (issue: continuous batching).

    pytest benchmarks/bench_batch.py --benchmark-only -s            # CPU: preset small, 4 frames
    PLLAVA_BENCH_PRESET=pllava-7b PLLAVA_BENCH_FRAMES=16 pytest benchmarks/bench_batch.py -s      # GPU

1. Engine: 8 mixed requests (4 questions, 4 LoRA alphas, 64-160 new tokens: caption lengths) through
   generate_many against 8 generate() calls. CPU target (printed, not asserted): >= 2x faster.
2. Server: the same 8 requests sent at once against one after another. CPU target: <= 0.6x the time.
3. The batch-size sweep of `pllava bench --batch` (clips/s, tokens/s, TTFT and ITL percentiles, vs transformers).
Each timing is the median of PLLAVA_BENCH_RUNS runs (default 3).
"""
import base64
import os
import threading
import time

import numpy as np
import pytest
import torch

import pllava
from pllava.bench import bench_video, make_preset_checkpoint

PRESET = os.environ.get("PLLAVA_BENCH_PRESET", "small")
FRAMES = int(os.environ.get("PLLAVA_BENCH_FRAMES", "4"))
RUNS = int(os.environ.get("PLLAVA_BENCH_RUNS", "3"))
BATCHES = tuple(int(x) for x in os.environ.get("PLLAVA_BENCH_BATCHES", "1,2,4,8").split(","))
QUESTIONS = ["Describe the video in details.", "What is happening?", "What does the person do next?",
             "Where is this?"]


def _skip_big():
    if PRESET != "small" and not torch.cuda.is_available():
        pytest.skip(f"preset {PRESET} needs a GPU")


def mixed_requests(video):
    return [dict(video=video, prompt=QUESTIONS[i % 4], max_new_tokens=[64, 160, 96, 128][i % 4],
                 lora_alpha=[4, 20, 4, 10][i % 4]) for i in range(8)]


@pytest.fixture(scope="module")
def engine():
    _skip_big()
    dt = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    _, adapter = make_preset_checkpoint(PRESET, dtype=dt, device="cuda" if torch.cuda.is_available() else "cpu")
    e = pllava.Engine.from_pretrained(adapter, dtype=dt)
    e.set_frames(FRAMES, (FRAMES, 12, 12))
    e.prefix_cache = False  # every request pays for its clip
    return e


def _median_time(fn, runs):
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), ts


def test_generate_many_vs_sequential(benchmark, engine):
    video = bench_video()
    reqs = mixed_requests(video)

    def sequential():
        saved = engine.lora_alpha
        for r in reqs:
            engine.set_lora_alpha(r["lora_alpha"])
            engine.generate(r["video"], r["prompt"], max_new_tokens=r["max_new_tokens"])
        engine.set_lora_alpha(saved)

    engine.generate(video, "hi", max_new_tokens=4)
    engine.generate_many(reqs[:2], max_batch_size=8)  # warm-up; the scheduler is sized for 8
    seq, seq_all = _median_time(sequential, RUNS)
    bat, bat_all = benchmark.pedantic(lambda: _median_time(lambda: engine.generate_many(reqs), RUNS), rounds=1,
                                      iterations=1)
    tokens = sum(r["max_new_tokens"] for r in reqs)
    print(f"\n### generate_many vs sequential generate(): {PRESET}, {FRAMES} frames, 8 mixed requests "
          f"({tokens} new tokens), {engine.dtype}, {engine.device}, median of {RUNS}\n")
    print("| system | seconds | tokens/s | runs (s) |\n|---|---:|---:|---|")
    print(f"| 8 x generate() | {seq:.2f} | {tokens / seq:.1f} | {', '.join(f'{t:.2f}' for t in seq_all)} |")
    print(f"| generate_many(8) | {bat:.2f} | {tokens / bat:.1f} | {', '.join(f'{t:.2f}' for t in bat_all)} |")
    print(f"\nspeed-up {seq / bat:.2f}x (CPU target >= 2x)")


def test_server_concurrent_vs_sequential(benchmark, engine):
    pytest.importorskip("fastapi")
    import httpx

    import sys

    from pllava.server import ServerConfig

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from server_util import LiveServer

    raw = open(bench_video(), "rb").read()
    url = "data:video/mp4;base64," + base64.b64encode(raw).decode()
    bodies = [{"model": "m", "max_tokens": r["max_new_tokens"], "lora_alpha": r["lora_alpha"],
               "messages": [{"role": "user", "content": [{"type": "text", "text": r["prompt"]},
                                                         {"type": "video_url", "video_url": {"url": url}}]}]}
              for r in mixed_requests(None)]
    cfg = ServerConfig(max_num_seqs=8, max_queue=16, max_video_bytes=len(raw) + (1 << 20), max_model_len=1024
                       if FRAMES * 144 + 200 < 1024 else None)

    def send(s, b):
        r = httpx.post(s.url + "/v1/chat/completions", json=b, timeout=600)
        assert r.status_code == 200, r.text

    with LiveServer(engine, cfg) as s:
        send(s, dict(bodies[0], max_tokens=4))

        def one_by_one():
            for b in bodies:
                send(s, b)

        def at_once():
            ts = [threading.Thread(target=send, args=(s, b)) for b in bodies]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

        seq, seq_all = _median_time(one_by_one, RUNS)
        conc, conc_all = benchmark.pedantic(lambda: _median_time(at_once, RUNS), rounds=1, iterations=1)
    print(f"\n### server: 8 requests at once vs one after another: {PRESET}, {FRAMES} frames, --max-num-seqs 8, "
          f"median of {RUNS}\n")
    print("| clients | seconds | runs (s) |\n|---|---:|---|")
    print(f"| one after another | {seq:.2f} | {', '.join(f'{t:.2f}' for t in seq_all)} |")
    print(f"| 8 at once | {conc:.2f} | {', '.join(f'{t:.2f}' for t in conc_all)} |")
    print(f"\nconcurrent / sequential = {conc / seq:.2f} (CPU target <= 0.6)")


def test_batch_sweep(benchmark, engine, results_dir):
    from pllava.bench_batch import run_batch_bench

    res = benchmark.pedantic(lambda: run_batch_bench(PRESET, batches=BATCHES, frames=(FRAMES,), new_tokens=64,
                                                     runs=max(1, RUNS - 1), out_dir=results_dir),
                             rounds=1, iterations=1)
    assert os.path.exists(res["plot"]) and os.path.exists(res["json"])
