#!/usr/bin/env bash
# Debian packages that the deploy tests drive for real (tests/test_deploy.py,
# tests/test_install.py, tests/test_prometheus_live.py):
#   prometheus       prometheus + promtool: check config/rules/metrics, rule unit tests, and a
#                    live server scraping `neuron-fleet demo`
#   systemd          systemd-analyze: verify / security --offline on the unit
#   haproxy          the front load balancer of the multi-host rehearsal (tests/test_multihost.py)
# Without them those tests skip locally, and fail under CI=true.
# Usage (as root, or with sudo available): bash deploy/ci-requirements.sh
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
if ((${#need[@]} == 0)); then
    exit 0
fi

sudo_=()
if [ "$(id -u)" -ne 0 ]; then sudo_=(sudo); fi
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
echo "deploy/ci-requirements.sh: installing ${need[*]}" >&2
"${sudo_[@]}" apt-get update -qq
# --no-upgrade: never upgrade a package that is already there (only install what is missing).
"${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -o DPkg::Lock::Timeout=600 -y -qq \
    --no-install-recommends --no-upgrade "${need[@]}" >/dev/null
