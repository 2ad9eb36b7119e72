"""Eager vs torch.compile'd decode step, in one run: `python benchmarks/bench_compile.py [preset] [runs] [int8]`.

The preset's seeded checkpoint (pllava bench writes it once), 16 random frames, 48 new tokens, greedy; decode
tok/s is the median of `runs`, eager and compiled runs interleaved; the compile's one-time cost is timed on its
first call. Also checks that the two give the same tokens and that after set_lora_alpha(20) the compiled step
still matches eager. `int8`: the engine in bf16 with int8 weights (the fast CPU mode), else fp32 on the CPU and
bf16 on CUDA."""
import statistics
import sys
import time

import torch

import pllava
from pllava.bench import make_preset_checkpoint


def main(preset="small", runs=3, quantize=None):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if device.type == "cuda" or quantize else torch.float32
    _, adapter = make_preset_checkpoint(preset, dtype=dt, device=device.type)
    e = pllava.Engine.from_pretrained(adapter, device=device, dtype=dt, quantize=quantize)
    e.prefix_cache = False
    e.cuda_graphs = False  # eager vs compiled: CUDA graph replay is a third mode, measured by the e2e bench
    s = e.config.vision.image_size
    px = torch.rand(16, 3, s, s, generator=torch.Generator().manual_seed(0))

    def run(compiled: bool, n=48):
        e.compile_decode = compiled  # the step object is rebuilt; dynamo's cache keeps the compiled graph
        out = e.generate(px, "Describe the video in details.", max_new_tokens=n)
        return out.timings["decode_tokens"] / out.timings["decode"], out.token_ids

    run(False)  # warm-up
    t0 = time.perf_counter()
    run(True, 4)
    first = time.perf_counter() - t0
    e_r, c_r = [], []
    for _ in range(runs):  # interleaved, so the machine's drift falls on both alike
        e_r.append(run(False))
        c_r.append(run(True))
    eager, t_e = statistics.median(x for x, _ in e_r), e_r[-1][1]
    comp, t_c = statistics.median(x for x, _ in c_r), c_r[-1][1]
    e.set_lora_alpha(20)
    _, c20 = run(True)
    _, e20 = run(False)
    mode = f"{device.type} {str(dt).split('.')[-1]}" + (f" + {quantize}" if quantize else "")
    print(f"| {preset} | {mode} | eager {eager:.2f} tok/s | compiled {comp:.2f} tok/s "
          f"| {comp / eager:.2f}x | first call {first:.1f} s | same tokens {t_e == t_c} | alpha 20 matches eager "
          f"{c20 == e20} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "small", int(sys.argv[2]) if len(sys.argv) > 2 else 3,
         sys.argv[3] if len(sys.argv) > 3 else None)
