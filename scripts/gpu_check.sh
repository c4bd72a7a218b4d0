#!/usr/bin/env bash
# On a CUDA machine: run the gpu-marked tests and the GPU benchmarks, and write everything to one file.
#   bash scripts/gpu_check.sh [OUT]      (default OUT: gpu_check_<UTC time>.txt; QUICK=1 for fewer shapes)
# Needs the gpu extra: pip install -e '.[dev,gpu]'. Copy the numbers into benchmarks/RESULTS.md.
#
# Steps (each under its own time limit, so the whole check ends within 8 minutes; a step that fails or
# runs out of time is recorded in OUT and makes the exit status non-zero, and the next step still runs):
#   1. pytest -m gpu      every public entry point on the GPU (tests/mishax_py/test_device_check.py, cuda
#                         variants) and the Triton kernel tests                                   <= 200 s
#   2. benchmarks/sae_kernels.py [--quick]     Triton vs torch SAE kernels                         <= 150 s
#   3. benchmarks/scale.py --quick             memory estimates vs peaks, graph times (if present)  <= 110 s
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_$(date -u +%Y%m%dT%H%M%SZ).txt}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')" || exit 1
python -c "import triton" || { echo "gpu_check: triton is missing (pip install -e '.[gpu]')" >&2; exit 1; }
{
  echo "# scripts/gpu_check.sh, $(date -u), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"
} > "$out"
status=0

# step NAME LIMIT_S COMMAND...: run COMMAND under a time limit, its output appended to $out, and its wall time
step() {
  local name="$1" limit="$2"
  shift 2
  echo "## $name" | tee -a "$out"
  local t0=$SECONDS rc=0
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out" || rc=$?
  [ "$rc" = 124 ] && echo "gpu_check: $name ran out of its ${limit} s" | tee -a "$out"
  echo "## $name: exit status $rc, $((SECONDS - t0)) s" | tee -a "$out"
  [ "$rc" = 0 ] || status=1
}

step "pytest -m gpu" 200 python -m pytest -q -p no:cacheprovider -m gpu -rs
step "benchmarks/sae_kernels.py ${QUICK:+--quick}" 150 python benchmarks/sae_kernels.py ${QUICK:+--quick}
if [ -f benchmarks/scale.py ]; then
  step "benchmarks/scale.py --quick" 110 python benchmarks/scale.py --quick
fi
echo "gpu_check: wrote $out (exit status $status)"
exit "$status"
