"""16 frames at 720p and 1080p -> (16, 3, 336, 336): native pllava._C vs the torch path vs transformers'
CLIPImageProcessor, in one run on this machine. Target (printed, not asserted): native >= 5x the processor.

    pytest benchmarks/bench_preprocess.py --benchmark-only -s
"""
import os
import time

import numpy as np
import pytest
import torch

import pllava
from pllava.preprocess import clip_defaults, preprocess, preprocess_torch

CFG = clip_defaults(336)
ROWS = {}


def _best(fn, rounds=5):
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@pytest.fixture(scope="module", params=[(720, 1280), (1080, 1920)], ids=["720p", "1080p"])
def frames(request):
    return request.param, np.random.default_rng(0).integers(0, 256, (16, *request.param, 3), dtype=np.uint8)


def test_transformers_processor(benchmark, frames):
    from transformers import CLIPImageProcessor

    hw, f = frames
    proc = CLIPImageProcessor(**CFG)
    run = lambda: proc(images=list(f), return_tensors="pt")["pixel_values"]  # noqa: E731
    ROWS[(hw, "transformers CLIPImageProcessor")] = _best(run, 3)
    benchmark.pedantic(run, rounds=3, iterations=1)


def test_torch_path(benchmark, frames):
    hw, f = frames
    run = lambda: preprocess_torch(f, CFG)  # noqa: E731
    ROWS[(hw, "pllava torch path")] = _best(run, 3)
    benchmark.pedantic(run, rounds=3, iterations=1)


def test_native(benchmark, frames):
    if not pllava.native_available():
        pytest.skip("pllava._C not built")
    hw, f = frames
    out = torch.empty(16, 3, 336, 336)
    run = lambda: preprocess(f, CFG, out=out)  # noqa: E731
    ROWS[(hw, "pllava native (pllava._C)")] = _best(run)
    benchmark.pedantic(run, rounds=10, iterations=1)


def test_print_table(benchmark):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # so --benchmark-only runs it
    print(f"\n### preprocess 16 frames -> (16, 3, 336, 336) fp32, {os.cpu_count()} CPU cores\n")
    print("| frames | path | ms | frames/s | vs transformers |\n|---|---|---:|---:|---:|")
    for (hw, name), t in sorted(ROWS.items()):
        base = ROWS.get((hw, "transformers CLIPImageProcessor"))
        print(f"| {hw[1]}x{hw[0]} | {name} | {t * 1000:.1f} | {16 / t:.0f} | {base / t:.1f}x |")
    print("\ntarget: native >= 5x transformers")
