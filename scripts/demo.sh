#!/usr/bin/env bash
# The README's demo command: set up .venv, then run `neuron-fleet demo` (three simulated TGI
# Neuron replicas behind the balancer on 127.0.0.1:8080) until Ctrl-C. Extra arguments go to
# `neuron-fleet demo` (e.g. --speed 10).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh
setup_venv ""
exec .venv/bin/neuron-fleet demo "$@"
