"""pllava._C's decode attention (fp32 and bf16 caches) against torch's SDPA as a decode step runs them:
`python benchmarks/bench_decode_attention.py [reps]` (default 15).

One query a head attends the used positions of a static cache, for every layer of a step (distinct caches, so K
and V come from DRAM as in a real step, not from the L3): the masked SDPA that generate() ran before over an fp32
cache (mask true on the used positions), the kernel over the same fp32 cache, and over a bf16 copy (what a bf16
engine's cache is now), interleaved rep by rep in one run. Shapes: the small preset (8 layers, 12
heads of 64) and two of pllava-34b's 60 layers (56 query heads on 8 KV heads of 128: GQA), at a 16-frame prompt's
length. Prints median ms and GB/s (K and V bytes read); asserts nothing.
"""
import os
import sys

import torch
import torch.nn.functional as F

from pllava import ops
from timing import interleaved_medians

SETS = {  # name: (layers, query heads, kv heads, head dim, used positions)
    "small preset, 8 layers": (8, 12, 12, 64, 2330),
    "pllava-34b, 2 layers (GQA 56/8)": (2, 56, 8, 128, 2330),
}


def main(reps=15):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    C = ops.native_decode_attention()
    if C is None:
        sys.exit("pllava._C is not built (pip install --no-build-isolation -e .)")
    print(f"\n### decode attention, one query a head, {torch.get_num_threads()} threads\n")
    print("| caches | MB read (fp32) | torch SDPA (masked, fp32) | pllava._C, fp32 cache | speedup | pllava._C, bf16 "
          "cache | speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for name, (layers, h, kv, d, s) in SETS.items():
        size = s + 64  # the static cache's spare slots, never read
        caches = [(torch.randn(1, kv, size, d, generator=g), torch.randn(1, kv, size, d, generator=g))
                  for _ in range(layers)]
        caches16 = [(k.bfloat16(), v.bfloat16()) for k, v in caches]
        q = torch.randn(1, h, 1, d, generator=g)
        mask = torch.zeros(1, s, dtype=torch.bool)
        mask[:] = True
        runs = {
            "sdpa": lambda: [F.scaled_dot_product_attention(q, k[:, :, :s], v[:, :, :s], attn_mask=mask,
                                                            enable_gqa=kv != h) for k, v in caches],
            "native": lambda: [ops.cpu_decode_attention(C, q, k, v, 0, s) for k, v in caches],
            "bf16": lambda: [ops.cpu_decode_attention(C, q, k, v, 0, s) for k, v in caches16],
        }
        ms = interleaved_medians(runs, reps)
        nbytes = 2 * layers * kv * s * d * 4
        print(f"| {name} | {nbytes / 1e6:.0f} | {ms['sdpa']:.2f} ms ({nbytes / ms['sdpa'] / 1e6:.1f} GB/s) | "
              f"{ms['native']:.2f} ms ({nbytes / ms['native'] / 1e6:.1f} GB/s) | {ms['sdpa'] / ms['native']:.2f}x | "
              f"{ms['bf16']:.2f} ms ({nbytes / 2 / ms['bf16'] / 1e6:.1f} GB/s) | {ms['sdpa'] / ms['bf16']:.2f}x |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
