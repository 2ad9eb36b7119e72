#!/usr/bin/env bash
# One command for a lent GPU: the GPU tests, the kernel benchmarks and the pllava-7b end-to-end benchmark, in
# under 10 minutes, ending with one table. Run from the repository root after installing the package with a CUDA
# torch (pip install -e ".[dev]").
# Every part runs even when an earlier one fails; the suite then exits 1 and names each failed part (a pipe's
# status is its first failing command's: pytest's, not tee's).
# SUITE_BUDGET_S (default: none) bounds the whole suite, for a lent machine's per-call limit: each part runs under
# what is left of it less SUITE_RESERVE_S (default 20: the summary's), a part past it is killed and named "timed
# out", one with no time left "not run", and what the finished parts wrote stays in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
FAILED=()
BUDGET=${SUITE_BUDGET_S:-0}
DEADLINE=$(( $(date +%s) + BUDGET ))

part() {  # part NAME OUTFILE FILTER CMD...: run CMD, keep the lines FILTER matches in OUTFILE, record a failure
  local name=$1 out=$2 filter=$3
  shift 3
  local limit=()
  if [ "$BUDGET" -gt 0 ]; then
    local reserve=${SUITE_RESERVE_S:-20}
    [ "$name" = summary ] && reserve=0
    local left=$(( DEADLINE - $(date +%s) - reserve ))
    if [ "$left" -lt 1 ]; then
      echo "== $name: not run (the suite's ${BUDGET} s budget is spent)"
      FAILED+=("$name (not run: the suite's ${BUDGET} s budget was spent)")
      return
    fi
    limit=(timeout --kill-after=5 "$left")
  fi
  echo "== $name"
  ${limit[@]+"${limit[@]}"} "$@" 2>&1 | tee "$out.log" | grep -E "$filter" | tee "$out"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 124 ] && [ "${#limit[@]}" -gt 0 ]; then
    FAILED+=("$name (timed out at the suite's ${BUDGET} s budget; output so far in $out.log)")
    tail -20 "$out.log"
  elif [ "$rc" -ne 0 ]; then
    FAILED+=("$name (exit $rc; full output in $out.log)")
    tail -20 "$out.log"
  fi
}

part "GPU info" "$OUT/gpu.txt" '.' nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# Most telling first, should SUITE_BUDGET_S cut the tail: correctness, then the headline numbers
part "copy bandwidth" "$OUT/bandwidth.txt" 'GB/s|Error' "$PY" - <<'PYX'
import torch
x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True)
s.record(); [y.copy_(x) for _ in range(10)]; e.record(); torch.cuda.synchronize()
print(f"device copy bandwidth: {2 * 10 * (1 << 30) / (s.elapsed_time(e) / 1e3) / 1e9:.0f} GB/s (read + write)")
PYX
# (the list is benchmarks/gpu_tests.txt, which CI runs under tests/fake_cuda.py, a CPU-backed CUDA stand-in)
mapfile -t GPU_TESTS < <(grep -Ev '^[[:space:]]*(#|$)' benchmarks/gpu_tests.txt)
part "GPU tests (kernels on CUDA, the engine's triton path, CUDA graphs, bf16/fp16 parity)" "$OUT/gpu_tests.txt" \
  'passed|failed|error|FAILED|ERROR' "$PY" -m pytest -q -rfE "${GPU_TESTS[@]}"
export PLLAVA_CUDA_GRAPHS=${PLLAVA_CUDA_GRAPHS:-1}
part "pllava-7b end to end (CUDA graphs: $PLLAVA_CUDA_GRAPHS)" "$OUT/e2e_7b.md" '^\||^###|ratio|TTFT|end to end|FAILED|Error' \
  env PLLAVA_BENCH_PRESET=pllava-7b PLLAVA_BENCH_FRAMES="${FRAMES:-1,4,16,32}" PLLAVA_BENCH_RUNS=3 \
  "$PY" -m pytest -q -s benchmarks/bench_e2e.py --benchmark-disable
part "pllava-7b decode step: eager, torch.compile'd, CUDA graphs (live alpha; decides the graphs default)" \
  "$OUT/step_modes.md" '^\||Error' "$PY" benchmarks/bench_compile.py pllava-7b 3
part "pllava-7b bf16 + int8 weights (the Triton int8 kernel, LoRA fused), 16 frames" "$OUT/int8_7b.md" \
  '^\||^###|ratio|TTFT|FAILED|Error' \
  "$PY" -m pllava.cli bench --preset pllava-7b --frames 16 --dtype bfloat16 --quantize int8 --runs 2 --new-tokens 64 \
  --out "$OUT/int8"
part "pllava-7b continuous batching (batch ${BATCHES:-1,2,4,8,16}, 16 frames)" "$OUT/batch_7b.md" \
  '^\||^###|Speed-up|error' \
  "$PY" -m pllava.cli bench --preset pllava-7b --batch "${BATCHES:-1,2,4,8,16}" --frames 16 --runs 2 --new-tokens 64 --out "$OUT"
part "kernel benchmarks" "$OUT/kernels.md" '^\||^###|speed-up|vs merged|FAILED|Error' \
  "$PY" -m pytest -q -s benchmarks/bench_kernels.py --benchmark-disable
part "pllava-7b bf16 + int4 weights (the Triton int4 kernel, LoRA fused), 16 frames" "$OUT/int4_7b.md" \
  '^\||^###|ratio|TTFT|FAILED|Error' \
  "$PY" -m pllava.cli bench --preset pllava-7b --frames 16 --dtype bfloat16 --quantize int4 --runs 2 \
  --new-tokens 64 --no-baseline --out "$OUT/int4"
part "summary" "$OUT/summary.md" '.' "$PY" - "$OUT" <<'PYX'
import json, os, re, sys
out = sys.argv[1]
bw = float(re.search(r"(\d+) GB/s", open(f"{out}/bandwidth.txt").read()).group(1))
# weight bytes a decoded token reads (KV cache aside): pllava-7b's decoder linears 6.476e9 weights, lm_head 0.131e9,
# the q/v LoRA 0.067e9 (bf16); int8: 1 byte a linear weight and lm_head's first pass, int4: 0.5625 a linear weight
forms = [("", f"{out}/bench_pllava-7b.json", 7.06e9 * 2),
         (" (bf16 + int8)", f"{out}/int8/bench_pllava-7b.json", 6.476e9 + 0.131e9 + 0.067e9 * 2),
         (" (bf16 + int4)", f"{out}/int4/bench_pllava-7b.json", 6.476e9 * 0.5625 + 0.131e9 + 0.067e9 * 2)]
print("\n### summary (one table)\n\n| system | frames | TTFT ms | decode tok/s | decode GB/s | of copy bandwidth | e2e ms |")
print("|---|---:|---:|---:|---:|---:|---:|")
for label, path, nbytes in forms:
    if not os.path.exists(path):
        print(f"| (no {os.path.relpath(path, out)}: that part did not run) | | | | | | |")
        continue
    for r in json.load(open(path))["rows"]:
        if label and not r["system"].startswith("pllava"):
            continue  # a quantized part's baseline is transformers in bf16: the first table's
        st = r["stages"]; gbs = st["decode_tok_s"] * nbytes / 1e9
        print(f"| {r['system']}{label} | {r['frames']} | {st['ttft']*1e3:.1f} | {st['decode_tok_s']:.1f} | {gbs:.0f} | "
              f"{gbs / (bw / 2) * 100:.0f} % | {st['e2e']*1e3:.0f} |")
PYX

if [ ${#FAILED[@]} -ne 0 ]; then
  echo
  echo "GPU suite: ${#FAILED[@]} part(s) failed:"
  printf '  - %s\n' "${FAILED[@]}"
  exit 1
fi
echo
echo "GPU suite: every part passed"
