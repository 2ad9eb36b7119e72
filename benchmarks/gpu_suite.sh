#!/usr/bin/env bash
# One command for a lent GPU: the GPU tests, the kernel benchmarks and the pllava-7b end-to-end benchmark, in
# under 10 minutes, ending with one table. Run from the repository root after installing the package with a CUDA
# torch (pip install -e ".[dev]").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
echo "== GPU tests (kernels on CUDA, the engine's triton path)"
python -m pytest -q tests/test_gpu.py tests/test_kernels.py tests/test_slot_attention.py tests/test_triton_engine.py tests/test_parity.py tests/test_batching.py 2>&1 | tail -5 | tee "$OUT/gpu_tests.txt"
echo "== kernel benchmarks"
python -m pytest -q -s benchmarks/bench_kernels.py --benchmark-disable 2>&1 | grep -E '^\||^###|speed-up|vs merged' | tee "$OUT/kernels.md"
echo "== copy bandwidth"
python - <<'PY' | tee "$OUT/bandwidth.txt"
import torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True)
s.record(); [y.copy_(x) for _ in range(10)]; e.record(); torch.cuda.synchronize()
print(f"device copy bandwidth: {2 * 10 * (1 << 30) / (s.elapsed_time(e) / 1e3) / 1e9:.0f} GB/s (read + write)")
PY
echo "== pllava-7b end to end (decode steps as CUDA graph replays: PLLAVA_CUDA_GRAPHS=${PLLAVA_CUDA_GRAPHS:-1})"
PLLAVA_CUDA_GRAPHS=${PLLAVA_CUDA_GRAPHS:-1} PLLAVA_BENCH_PRESET=pllava-7b PLLAVA_BENCH_FRAMES=${FRAMES:-1,4,16,32} PLLAVA_BENCH_RUNS=3 \
  python -m pytest -q -s benchmarks/bench_e2e.py --benchmark-disable 2>&1 | grep -E '^\||^###|ratio|TTFT|end to end' | tee "$OUT/e2e_7b.md"
echo "== pllava-7b continuous batching: batch 1,2,4,8,16 at 16 frames vs sequential vs transformers batched"
PLLAVA_CUDA_GRAPHS=${PLLAVA_CUDA_GRAPHS:-1} pllava bench --preset pllava-7b --batch ${BATCHES:-1,2,4,8,16} --frames 16 \
  --runs 2 --new-tokens 64 --out "$OUT" 2>&1 | grep -E '^\||^###|Speed-up' | tee "$OUT/batch_7b.md"
python - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
bw = float(re.search(r"(\d+) GB/s", open(f"{out}/bandwidth.txt").read()).group(1))
rows = json.load(open(f"{out}/bench_pllava-7b.json"))["rows"]
weights_gb = 7.06e9 * 2 / 1e9  # bf16 bytes read per decoded token (LLM + LoRA, KV cache aside)
print("\n### summary (one table)\n\n| system | frames | TTFT ms | decode tok/s | decode GB/s | of copy bandwidth | e2e ms |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    st = r["stages"]; gbs = st["decode_tok_s"] * weights_gb
    print(f"| {r['system']} | {r['frames']} | {st['ttft']*1e3:.1f} | {st['decode_tok_s']:.1f} | {gbs:.0f} | {gbs / (bw / 2) * 100:.0f} % | {st['e2e']*1e3:.0f} |")
PY
