#!/usr/bin/env bash
# Issue 11's GPU figures, all of them, in ONE JSON file (see bench/gpu.py for what is measured and how).
#   bench/gpu.sh [OUT.json] [bench/gpu.py options...]
#   bench/gpu.sh                                  -> bench/results/gpu-HOST-UTCDATE.json, the full run (a GPU is required)
#   bench/gpu.sh /tmp/smoke.json --smoke          -> tiny sizes on any device (what tests/test_bench_gpu.py runs)
#   bench/gpu.sh out.json --compile none          -> skip torch.compile (each compiled size costs about a minute to compile)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ $# -gt 0 && "$1" != --* ]]; then out="$1"; shift
else out="$here/results/gpu-$(hostname)-$(date -u +%Y%m%dT%H%M%SZ).json"; fi
mkdir -p "$(dirname "$out")"
echo "== $(date -u) on $(hostname)"
uptime
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
else echo "nvidia-smi not found: no NVIDIA GPU here"; fi
export PYTHONUNBUFFERED=1
python "$here/gpu.py" --out "$out" "$@"
echo "== wrote $out"
