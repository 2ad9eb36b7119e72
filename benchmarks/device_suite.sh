#!/usr/bin/env bash
# The one command for a lent GPU machine, which has no network and no PyAV or server stack: it installs their wheels
# from .whl/ (fetched beforehand, here, by ../shared/tools/device-wheels.sh), the project itself (editable, building
# pllava._C), then runs benchmarks/gpu_suite.sh with its results under $OUT/results, within SUITE_BUDGET_S (default
# 540 s: the device's 600 s a call, less the installs), so the suite ends with its table and names what it did not
# finish, rather than being killed mid-part. From the session, with the device tool:
#   run(command="bash benchmarks/device_suite.sh", carry=[".whl"], timeout_s=600)
# Parts can be narrowed for a rerun: FRAMES=16 BATCHES=1,8 bash benchmarks/device_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$(date +%s)
ls .whl/*.whl > /dev/null 2>&1 || { echo "device suite: no wheels in .whl/ (run ../shared/tools/device-wheels.sh here, and carry .whl)"; exit 2; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "device suite: installing .whl/ failed"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD
"$PY" -m pip install -q --no-deps --no-build-isolation -e . || { echo "device suite: installing the project failed"; exit 2; }
"$PY" - <<'PYX' || exit 2
import torch, triton, transformers, av
import pllava
from pllava import ops
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}), "
      f"triton {triton.__version__}, transformers {transformers.__version__}, av {av.__version__}; "
      f"pllava._C {'built' if ops.native_extension('preprocess') else 'NOT built'}")
PYX
export OUT=${OUT:-/tmp/device_out}/results PYTHON=$PY
export SUITE_BUDGET_S=$(( ${SUITE_BUDGET_S:-540} - ($(date +%s) - START) ))
echo "device suite: installs took $(( $(date +%s) - START )) s; the suite has ${SUITE_BUDGET_S} s"
bash benchmarks/gpu_suite.sh
