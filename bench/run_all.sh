#!/usr/bin/env bash
# One command: set-up, then neuron-fleet against the peers (workloads 1-3), GuideLLM against
# neuron-fleet next to the blog's figures, then plots + BENCHMARKS.md.
#   bash bench/run_all.sh            # full run (~26 min on 2 cores after the first set-up)
#   bash bench/run_all.sh --quick    # smoke run (~5 min), writes to bench/results/quick/
# Every process is started and stopped by PID by the Python drivers; loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash bench/setup.sh
PY=bench/.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONDONTWRITEBYTECODE=1
if [ "${1:-}" = "--quick" ]; then
    OUT=bench/results/quick
    mkdir -p "$OUT"
    $PY bench/compare.py --quick --out "$OUT"
    $PY bench/guidellm_blog.py --speed 10 --out "$OUT"
    $PY bench/slo_gate.py --quick --out "$OUT"
    echo "quick results in $OUT (BENCHMARKS.md is only written by a full run)"
    exit 0
fi
rm -f bench/results/meta_*.json
$PY bench/compare.py --workloads blog,mixed,relay
$PY bench/slo_gate.py            # the TTFT SLO gate vs HAProxy/nginx at 130 % load (~10 min)
$PY bench/profile_balancer.py --seconds 8
$PY bench/guidellm_blog.py --speed 3
$PY bench/report.py
