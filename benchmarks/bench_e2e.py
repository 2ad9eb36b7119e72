"""End to end per frame count, the engine against transformers in the same run (issue: benchmarks).

    pytest benchmarks/bench_e2e.py --benchmark-only -s        # CPU: preset small, frames 1, 4, 16
    PLLAVA_BENCH_PRESET=pllava-7b PLLAVA_BENCH_FRAMES=1,4,8,16,32,64 pytest benchmarks/bench_e2e.py -s   # GPU

Prints the markdown table with the ratio engine/baseline per stage, writes results/bench_<preset>.json and the
two PNG plots. Targets (printed, not asserted): CPU small at 16 frames, 64 new tokens: end to end <= 0.5x the
baseline; H100 pllava-7b, 16 preprocessed frames: TTFT <= 80 ms, decode >= 170 tokens/s.
"""
import os

import pytest
import torch

from pllava.bench import run_bench

PRESET = os.environ.get("PLLAVA_BENCH_PRESET", "small")
FRAMES = tuple(int(x) for x in os.environ.get("PLLAVA_BENCH_FRAMES", "1,4,16").split(","))
RUNS = int(os.environ.get("PLLAVA_BENCH_RUNS", "2"))


def test_e2e_per_frame_count(benchmark, results_dir):
    if PRESET != "small" and not torch.cuda.is_available():
        pytest.skip(f"preset {PRESET} needs a GPU")
    res = benchmark.pedantic(lambda: run_bench(PRESET, frames=FRAMES, new_tokens=64, runs=RUNS, out_dir=results_dir),
                             rounds=1, iterations=1)
    rows = {(r.system, r.frames): r for r in res["rows"]}
    f = 16 if 16 in FRAMES else max(FRAMES)
    e, b = rows[("pllava-engine", f)], rows[("transformers", f)]
    ratio = e.stages["e2e"] / b.stages["e2e"]
    print(f"end to end at {f} frames: engine {e.stages['e2e'] * 1000:.0f} ms, transformers "
          f"{b.stages['e2e'] * 1000:.0f} ms, ratio {ratio:.2f}" + (" (CPU target <= 0.5)" if PRESET == "small" else ""))
    if PRESET == "pllava-7b":
        print(f"TTFT {e.stages['ttft'] * 1000:.0f} ms (target <= 80 ms), decode {e.stages['decode_tok_s']:.0f} "
              "tokens/s (target >= 170)")
    assert all(os.path.exists(p) for p in res["plots"]) and os.path.exists(res["json"])
