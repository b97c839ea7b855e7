#!/usr/bin/env bash
# The README's test command, and what CI (.ci/run) calls. On a fresh Debian machine it
# installs what the tests drive for real (prometheus + promtool, systemd-analyze, haproxy), sets up
# .venv with the test extras, runs ruff and then pytest with any arguments given.
# pytest's "no tests collected" (exit 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-venv.sh

missing=()
command -v promtool >/dev/null || missing+=(prometheus)
command -v prometheus >/dev/null || missing+=(prometheus)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v haproxy >/dev/null || missing+=(haproxy)  # the multi-host rehearsal's front
if ((${#missing[@]})); then
    apt_install $(printf '%s\n' "${missing[@]}" | sort -u)
fi
setup_venv "[test]"

.venv/bin/ruff check .
.venv/bin/ruff format --check .
[ -n "${NEURON_FLEET_SKIP_WHEEL_CHECK:-}" ] || bash scripts/check-wheel.sh # the wheel, outside the checkout
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
