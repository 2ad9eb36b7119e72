"""Eager vs torch.compile'd decode step (and, on CUDA, CUDA-graph replay), in one run:
`python benchmarks/bench_compile.py [preset] [runs] [int8]`.

The preset's seeded checkpoint (pllava bench writes it once), 16 random frames, 48 new tokens, greedy; decode
tok/s is the median of `runs`, the modes' runs interleaved (the machine's drift falls on each alike); the
compile's one-time cost is timed on its first call. Also checks that every mode gives eager's tokens, and still
does after set_lora_alpha(20) (a frozen graph would keep the old alpha). The graph column is what decides whether
CUDA graphs become the default (engine.cuda_graphs, PLLAVA_CUDA_GRAPHS). `int8`: the engine in bf16 with int8
weights (the fast CPU mode), else fp32 on the CPU and bf16 on CUDA."""
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
    s = e.config.vision.image_size
    px = torch.rand(16, 3, s, s, generator=torch.Generator().manual_seed(0))
    modes = ("eager", "compiled") + (("graphs",) if device.type == "cuda" else ())

    def run(mode: str, n=48):
        # the step object is rebuilt on a switch; dynamo's cache keeps the compiled graph, a CUDA graph is recaptured
        e.compile_decode, e.cuda_graphs = mode == "compiled", mode == "graphs"
        out = e.generate(px, "Describe the video in details.", max_new_tokens=n)
        return out.timings["decode_tokens"] / out.timings["decode"], out.token_ids

    first = {}
    for m in modes:  # warm-up; the compile is timed here
        t0 = time.perf_counter()
        run(m, 4)
        first[m] = time.perf_counter() - t0
    rates, toks = {m: [] for m in modes}, {}
    for _ in range(runs):
        for m in modes:
            r, toks[m] = run(m)
            rates[m].append(r)
    med = {m: statistics.median(v) for m, v in rates.items()}
    e.set_lora_alpha(20)
    at20 = {m: run(m)[1] for m in modes}
    label = f"{device.type} {str(dt).split('.')[-1]}" + (f" + {quantize}" if quantize else "")
    cells = " | ".join(f"{m} {med[m]:.2f} tok/s ({med[m] / med['eager']:.2f}x)" for m in modes)
    same = all(toks[m] == toks["eager"] for m in modes)
    same20 = all(at20[m] == at20["eager"] for m in modes)
    print(f"| {preset} | {label} | {cells} | first call: compiled {first['compiled']:.1f} s"
          + (f", graphs {first['graphs']:.1f} s" if "graphs" in first else "")
          + f" | same tokens {same} | alpha 20 matches eager {same20} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "small", int(sys.argv[2]) if len(sys.argv) > 2 else 3,
         sys.argv[3] if len(sys.argv) > 3 else None)
