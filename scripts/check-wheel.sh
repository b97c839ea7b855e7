#!/usr/bin/env bash
# The wheel is what users install, so the wheel is what CI runs: build it, install it in a
# fresh venv (no editable install, no checkout on sys.path) and, from a folder outside the
# checkout, run every subcommand's --help, `--version`, `plan` on a neuron-ls fixture,
# `predict` on the packaged calibration and `demo` with one streamed request, then
# SIGTERM: exit 0 and no replica process left.
# Called by scripts/run-tests.sh (skip with NEURON_FLEET_SKIP_WHEEL_CHECK=1). Uses pip's
# cache; nothing but loopback traffic once the dependencies are cached.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

WORK=$(mktemp -d /tmp/neuron-fleet-wheel.XXXXXX)
DEMO_PID=
cleanup() {
    if [ -n "$DEMO_PID" ] && kill -0 "$DEMO_PID" 2>/dev/null; then kill -KILL "$DEMO_PID"; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
fail() {
    echo "check-wheel: FAILED: $*" >&2
    exit 1
}
step() { echo "check-wheel: $*"; }

step "building the wheel"
"$PYTHON" -m pip wheel -q --disable-pip-version-check --no-deps "$REPO" -w "$WORK/dist" \
    >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; fail "pip wheel"; }
WHEEL=$(ls "$WORK"/dist/neuron_fleet-*.whl)

step "installing $(basename "$WHEEL") in a fresh venv"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --disable-pip-version-check "$WHEEL" \
    >"$WORK/install.log" 2>&1 || { cat "$WORK/install.log" >&2; fail "pip install"; }

mkdir "$WORK/outside"
cd "$WORK/outside" # nothing of the checkout is importable from here
NF=$WORK/venv/bin/neuron-fleet
"$WORK/venv/bin/python" -c "import supervisor, sys; sys.exit('$REPO' in supervisor.__file__)" ||
    fail "supervisor is imported from the checkout, not the wheel"

step "--help of every subcommand, and --version"
"$NF" --help >/dev/null || fail "neuron-fleet --help"
"$NF" --version | grep -q '^neuron-fleet [0-9]' || fail "neuron-fleet --version"
commands=$("$WORK/venv/bin/python" -c "from supervisor.cli import SUBCOMMANDS; print(*SUBCOMMANDS)")
for command in $commands; do
    "$NF" "$command" --help >/dev/null || fail "neuron-fleet $command --help"
done

step "plan on the inf2.48xlarge neuron-ls fixture"
cp "$REPO/tests/fixtures/neuron-ls/inf2.48xlarge.json" neuron-ls.json
"$NF" plan --neuron-ls neuron-ls.json --cores-per-replica 8 \
    --no-host-checks >plan.txt 2>&1 || { cat plan.txt >&2; fail "neuron-fleet plan"; }
grep -q "16-23" plan.txt || { cat plan.txt >&2; fail "plan does not show cores 16-23"; }

step "predict from the packaged calibration (its data and fit ship in the wheel)"
"$NF" predict --model-size 8 --model-family llama-3.1-8b --replicas 3 --tp 8 --batch-size 8 \
    --input-tokens 1500 --output-tokens 250 --rate 1 --json >predict.json 2>predict.err ||
    { cat predict.err >&2; fail "neuron-fleet predict"; }
"$WORK/venv/bin/python" -c '
import json, math, sys
out = json.load(open("predict.json"))
ok = out["layout"] == "3 x tp8 x batch 8" and 0 < out["ttft_p99_s"] < math.inf
sys.exit(0 if ok and out["output_tok_per_s"] > 0 and out["extrapolating"] == [] else out)
' || fail "predict printed no figures"

step "demo: one streamed request, then SIGTERM"
PORT=$("$WORK/venv/bin/python" - <<'EOF'
import socket

def free(port):  # the demo's replicas take the three ports after the balancer's
    for p in range(port, port + 4):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    start = s.getsockname()[1]
print(next(p for p in range(start, start + 200) if p + 3 < 65536 and free(p)))
EOF
)
"$NF" demo --listen "127.0.0.1:$PORT" --speed 20 --log-level warning >demo.log 2>&1 &
DEMO_PID=$!
"$WORK/venv/bin/python" - "$PORT" <<'EOF' || { cat demo.log >&2; fail "demo request"; }
import json, sys, time, urllib.request

url = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the demo did not become ready in 60 s")
    time.sleep(0.2)
body = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}],
        "stream": True, "max_tokens": 8}
request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
events = []
with urllib.request.urlopen(request, timeout=30) as r:
    for line in r:
        if line.startswith(b"data:"):
            events.append(line[5:].strip())
if events[-1:] != [b"[DONE]"] or len(events) < 2:
    sys.exit(f"unexpected stream: {events!r}")
print(f"check-wheel: streamed {len(events) - 1} chunks through the demo")
EOF
replicas=$(ps -o pid= --ppid "$DEMO_PID" | tr -d ' ')
[ -n "$replicas" ] || fail "the demo has no replica processes"
kill -TERM "$DEMO_PID"
rc=0
wait "$DEMO_PID" || rc=$?
DEMO_PID=
[ "$rc" -eq 0 ] || { cat demo.log >&2; fail "demo exited $rc after SIGTERM (want 0)"; }
for pid in $replicas; do
    if kill -0 "$pid" 2>/dev/null; then fail "replica process $pid outlived the demo"; fi
done
step "OK ($(basename "$WHEEL"))"
