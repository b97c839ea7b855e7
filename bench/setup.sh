#!/usr/bin/env bash
# Benchmark set-up (NOT the product's dependencies): Debian's nginx + haproxy, and
# bench/.venv with neuron-fleet installed editable plus the benchmark-only tools:
# guidellm 0.8.x, matplotlib, vllm-router, sglang-router, py-spy, pyinstrument, tokenizers.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if ((${#missing[@]})); then
    echo "installing Debian packages: ${missing[*]}" >&2
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
fi
# The Debian packages start a system nginx/haproxy on port 80: the benchmark runs its own
# copies on loopback ports with temp configs, so stop the system services if they run.
for svc in nginx haproxy; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
        as_root systemctl stop "$svc" || true
    fi
done

if [ ! -x bench/.venv/bin/python ]; then
    "$PYTHON" -m venv bench/.venv
fi
PIP="bench/.venv/bin/python -m pip install -q --disable-pip-version-check"
# Bump the stamp when the project gains a dependency: the block reinstalls everything
# (neuron-fleet first; guidellm then moves transformers to the 5.x its datasets needs).
stamp=bench/.venv/.bench-deps-v2
if [ ! -f "$stamp" ]; then
    $PIP -e .
    $PIP "guidellm>=0.8,<0.9" "matplotlib>=3.8" "tokenizers>=0.21" psutil \
        py-spy pyinstrument
    # The Rust routers are optional peers: a wheel that does not install here is reported
    # by the benchmark ("could not run"), it does not stop the set-up.
    $PIP vllm-router || echo "setup: vllm-router did not install (peer skipped)" >&2
    $PIP sglang-router || echo "setup: sglang-router did not install (peer skipped)" >&2
    touch "$stamp"
fi
bench/.venv/bin/python - <<'PY'
import importlib.metadata as md
for name in ("neuron-fleet", "guidellm", "matplotlib", "vllm-router", "sglang-router", "py-spy"):
    try:
        print(f"  {name:14s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name:14s} (not installed)")
PY
