#!/usr/bin/env bash
# On a CUDA machine: run the gpu-marked tests and the GPU benchmarks, and write everything to one file.
#   bash scripts/gpu_check.sh [OUT]      (default OUT: gpu_check_<UTC time>.txt; QUICK=1 for fewer shapes)
# Needs the gpu extra: pip install -e '.[dev,gpu]'. Copy the numbers into benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check_$(date -u +%Y%m%dT%H%M%SZ).txt}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')"
python -c "import triton" || { echo "gpu_check: triton is missing (pip install -e '.[gpu]')" >&2; exit 1; }
{
  echo "# scripts/gpu_check.sh, $(date -u), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  echo "## pytest -m gpu"
} > "$out"
status=0
python -m pytest -q -p no:cacheprovider -m gpu -rs 2>&1 | tee -a "$out" || status=$?
echo "## benchmarks/sae_kernels.py ${QUICK:+--quick}" >> "$out"
python benchmarks/sae_kernels.py ${QUICK:+--quick} --out "$out.part" || status=$?
cat "$out.part" >> "$out" 2>/dev/null && rm -f "$out.part"
echo "gpu_check: wrote $out (exit status $status)"
exit "$status"
