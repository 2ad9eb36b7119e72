"""pllava._C's bf16 prefill attention against torch's CPU SDPA: `python benchmarks/bench_prefill_attention.py [reps]`
(default 5).

The attention shapes of a 16-frame PLLaVA prompt (2350 positions) at pllava-7b's and pllava-34b's widths (one layer,
causal), and of CLIP ViT-L's frames as the CPU's vision tower runs them (4 frames a call, bidirectional), bf16, on
the threads torch uses, interleaved rep by rep (timing.py). Prints median ms, GFLOP/s (the causal half counted) and
the speed-up; asserts nothing (speed lives here, not in the tests).
"""
import sys

import torch
import torch.nn.functional as F

from pllava import ops
from timing import interleaved_medians

SHAPES = {  # name: (B, H, KV, L, hd, causal)
    "pllava-7b layer, 2350 positions": (1, 32, 32, 2350, 128, True),
    "pllava-34b layer (GQA 56 / 8), 2350 positions": (1, 56, 8, 2350, 128, True),
    "CLIP ViT-L layer, 4 frames x 577": (4, 16, 16, 577, 64, False),
}


def main(reps=5):
    if ops.native_prefill_attention() is None:
        sys.exit("pllava._C's AVX512-BF16 prefill attention does not run here (needs the extension and AVX512-BF16)")
    g = torch.Generator().manual_seed(0)
    print(f"\n### bf16 prefill attention, {torch.get_num_threads()} threads\n")
    print("| shape | torch SDPA ms | GFLOP/s | pllava._C ms | GFLOP/s | speed-up |\n|---|---:|---:|---:|---:|---:|")
    for name, (b, h, kv, n, d, causal) in SHAPES.items():
        x = torch.randn(b, n, (h + 2 * kv) * d, generator=g).bfloat16()
        q = x[..., :h * d].view(b, n, h, d).transpose(1, 2)
        k = x[..., h * d:(h + kv) * d].view(b, n, kv, d).transpose(1, 2)
        v = x[..., (h + kv) * d:].view(b, n, kv, d).transpose(1, 2)
        gqa = h != kv
        ms = interleaved_medians({
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa),
            "native": lambda: ops.cpu_attention_bf16(q, k, v, causal),
        }, reps)
        flop = 4 * b * h * n * n * d / (2 if causal else 1)
        print(f"| {name} | {ms['torch']:.1f} | {flop / ms['torch'] / 1e6:.0f} | {ms['native']:.1f} | "
              f"{flop / ms['native'] / 1e6:.0f} | {ms['torch'] / ms['native']:.2f}x |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
