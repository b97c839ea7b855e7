# Sourced by demo.sh and run-tests.sh. `setup_venv EXTRAS` makes sure .venv exists and has
# neuron-fleet installed with those extras (e.g. "[test]"). Debian's python3 lacks ensurepip
# until the python3-venv package is installed, so that is installed first when needed.
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {
    echo "installing Debian packages: $*" >&2
    as_root apt-get update -qq
    # Wait for another apt (a parallel install) rather than fail on its lock.
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -o DPkg::Lock::Timeout=600 -y -qq \
        --no-install-recommends "$@" >/dev/null
}

setup_venv() {
    if [ ! -x .venv/bin/python ]; then
        if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1; then
            apt_install python3-venv
        fi
        "$PYTHON" -m venv .venv
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${1:-}"
}
