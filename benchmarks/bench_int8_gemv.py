"""pllava._C's int8 GEMV as a decode step runs it: `python benchmarks/bench_int8_gemv.py [reps]` (default 15).

In a decode step every weight comes from DRAM (the step streams more than the L3 holds: the small preset's int8
linears are 82 MB with lm_head, its fp32 KV cache 114 MB at 2330 positions), so this streams a whole step's set of
distinct weights in model order, one row (M = 1), on the threads torch uses, with the kernel's software prefetch
off and at its default distance, interleaved rep by rep (one noisy machine, one run). References in the same run:
the bandwidth of a 1 GiB read (torch.sum), the kernel's portable loop (what a CPU without AVX-512 ran before it
had an AVX2 path) and torch's _weight_int8pack_mm with bf16 activations on the same weights; and the int4 GEMV
(quantize="int4") on the same shapes in int4 groups of 32.
Then the bf16 GEMV on a step's LoRA factors against torch's bf16 GEMMs. Prints tables of median ms and GB/s;
asserts nothing (speed lives here, not in the tests).
"""
import os
import statistics
import sys
import time

import torch

from pllava.model.int4 import gemv_int4
from pllava.model.quant import _gemv, _native
from timing import interleaved_medians


def shapes(hidden, inter, layers, vocab):
    """One decode step's LLM linears (q, k, v, o, gate, up, down a layer) and lm_head, as (N, K)."""
    layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)]
    return layer * layers + ([(vocab, hidden)] if vocab else [])


SETS = {  # the small preset's whole step; two of pllava-7b's 32 layers (404 MB, past any L3); one of pllava-34b's 60
    "small (K 768 / 2048)": shapes(768, 2048, 8, 32064),
    "pllava-7b x2 layers (K 4096 / 11008)": shapes(4096, 11008, 2, 0),
    "pllava-34b x1 layer (K 7168 / 20480)": shapes(7168, 20480, 1, 0),
}


def read_bandwidth():
    x = torch.ones(2 ** 28)  # 1 GiB
    x.sum()
    t = []
    for _ in range(5):
        a = time.perf_counter()
        x.sum()
        t.append(time.perf_counter() - a)
    return x.numel() * 4 / statistics.median(t) / 1e9


def main(reps=15):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    C, isa = _native()
    if C is None:
        sys.exit("pllava._C is not built (pip install --no-build-isolation -e .)")
    g = torch.Generator().manual_seed(0)
    bw = read_bandwidth()
    print(f"\n### int8 GEMV, M = 1, {torch.get_num_threads()} threads, {isa}; 1 GiB read: {bw:.1f} GB/s\n")
    print(f"| weights | MB | prefetch off | prefetch default | speedup | portable loop | {isa} vs portable | "
          "_weight_int8pack_mm (bf16 x) | int4 (groups of 32; MB) | int8 / int4 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, sh in SETS.items():
        ws = [(torch.randn(1, k, generator=g), torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
               torch.rand(n, generator=g) * 0.01) for n, k in sh]
        wb = [(x.bfloat16(), q, s.bfloat16()) for x, q, s in ws]
        w4 = [(x, torch.randint(0, 256, (q.shape[0], q.shape[1] // 2), generator=g, dtype=torch.uint8),
               (torch.rand(q.shape[0], q.shape[1] // 32, generator=g) * 0.01).bfloat16()) for x, q, _ in ws]
        bytes4 = sum(q.numel() + s.numel() * 2 for _, q, s in w4)
        ys = [torch.empty(1, n) for n, _ in sh]
        nbytes = sum(n * k for n, k in sh)
        def raw(generic, prefetch, ws=ws, ys=ys):  # the kernel called directly with these two knobs
            return lambda: [C.int8_gemv(x.data_ptr(), x.shape[1], q.data_ptr(), s.data_ptr(), y.data_ptr(),
                                        y.shape[1], 1, y.shape[1], x.shape[1], torch.get_num_threads(), generic,
                                        prefetch) for (x, q, s), y in zip(ws, ys)]

        runs = {
            "off": raw(False, 0),
            "default": lambda: [_gemv(C, x, q, s) for x, q, s in ws],
            "generic": raw(True, -1),
            "torch": lambda: [torch._weight_int8pack_mm(x, q, s) for x, q, s in wb],
            "int4": lambda: [gemv_int4(C, x, q, s) for x, q, s in w4],
        }
        ms = interleaved_medians(runs, reps)

        def cell(k):
            return f"{ms[k]:.2f} ms ({nbytes / ms[k] / 1e6:.1f} GB/s)"

        print(f"| {name} | {nbytes / 1e6:.0f} | {cell('off')} | {cell('default')} | "
              f"{ms['off'] / ms['default']:.2f}x | {cell('generic')} | {ms['generic'] / ms['default']:.2f}x | "
              f"{cell('torch')} | {ms['int4']:.2f} ms ({bytes4 / 1e6:.0f}; {bytes4 / ms['int4'] / 1e6:.1f} GB/s) | "
              f"{ms['default'] / ms['int4']:.2f}x |")
    lora(C, g, reps)


def lora(C, g, reps, layers=8, r=128, d=768):
    """The small preset's q/v LoRA factors of one decode step (bf16 A (r, d) and B (d, r), 2 a layer): torch's bf16
    GEMMs on a bf16-rounded x (what int8_linear ran before), against pllava._C's bf16 GEMV on the fp32 x, the delta
    added into y at the live scale (quant._gemv_bf16)."""
    from pllava.model.quant import _gemv_bf16

    fs = [((torch.randn(r, d, generator=g) * 0.02).bfloat16(), (torch.randn(d, r, generator=g) * 0.02).bfloat16())
          for _ in range(2 * layers)]
    x, y = torch.randn(1, d, generator=g), torch.zeros(1, d)
    runs = {
        "torch": lambda: [torch.nn.functional.linear(torch.nn.functional.linear(x.bfloat16(), a), b) * 0.03
                          for a, b in fs],
        "native": lambda: [_gemv_bf16(C, _gemv_bf16(C, x, a, 1.0), b, 0.03, out=y) for a, b in fs],
    }
    ms = interleaved_medians(runs, reps)
    nbytes = sum(a.numel() * 2 + b.numel() * 2 for a, b in fs)
    print(f"\n| LoRA factors, one step (bf16) | MB | torch bf16 GEMMs (x in bf16) | pllava._C bf16 GEMV (x in fp32) "
          f"| speedup |\n|---|---:|---:|---:|---:|\n| small preset: {2 * layers} x (A {r}x{d}, B {d}x{r}) | "
          f"{nbytes / 1e6:.1f} | {ms['torch']:.2f} ms | {ms['native']:.2f} ms | {ms['torch'] / ms['native']:.2f}x |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
