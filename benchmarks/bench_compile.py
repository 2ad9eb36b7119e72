"""Eager vs torch.compile'd decode step, in one run: `python benchmarks/bench_compile.py [preset] [runs]`.

The preset's seeded checkpoint (pllava bench writes it once), 16 random frames, 48 new tokens, greedy; decode
tok/s is the median of `runs`; the compile's one-time cost is timed on its first call. Also checks that the two
give the same tokens and that after set_lora_alpha(20) the compiled step still matches eager."""
import statistics
import sys
import time

import torch

import pllava
from pllava.bench import make_preset_checkpoint


def main(preset="small", runs=3):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    _, adapter = make_preset_checkpoint(preset, dtype=dt, device=device.type)
    e = pllava.Engine.from_pretrained(adapter, device=device, dtype=dt)
    e.prefix_cache = False
    e.cuda_graphs = False  # eager vs compiled: CUDA graph replay is a third mode, measured by the e2e bench
    s = e.config.vision.image_size
    px = torch.rand(16, 3, s, s, generator=torch.Generator().manual_seed(0))

    def rate(n):
        r, toks = [], None
        for _ in range(n):
            out = e.generate(px, "Describe the video in details.", max_new_tokens=48)
            r.append(out.timings["decode_tokens"] / out.timings["decode"])
            toks = out.token_ids
        return statistics.median(r), toks

    eager, t_e = rate(runs)
    e.compile_decode = True
    t0 = time.perf_counter()
    e.generate(px, "Describe the video in details.", max_new_tokens=4)
    first = time.perf_counter() - t0
    comp, t_c = rate(runs)
    e.set_lora_alpha(20)
    _, c20 = rate(1)
    e.compile_decode = False
    _, e20 = rate(1)
    print(f"| {preset} | {device.type} {str(dt).split('.')[-1]} | eager {eager:.2f} tok/s | compiled {comp:.2f} tok/s "
          f"| {comp / eager:.2f}x | first call {first:.1f} s | same tokens {t_e == t_c} | alpha 20 matches eager "
          f"{c20 == e20} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "small", int(sys.argv[2]) if len(sys.argv) > 2 else 3)
