"""`neuron-fleet status` as a user types it: a bare HOST:PORT, and piped into `head`."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import cli
from supervisor.status_cli import format_table, normalize_url

REPO = Path(__file__).resolve().parent.parent
STATUS = {
    "ready_replicas": 3,
    "replicas": [
        {"name": f"replica-{i}", "state": "ready", "cores": "0-7", "note": "x" * 200}
        for i in range(2000)  # ~0.5 MB of JSON: more than a pipe holds
    ],
}


@pytest.fixture
def status_server() -> Iterator[int]:
    body = json.dumps(STATUS).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/fleet/status" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_url_forms() -> None:
    assert normalize_url("127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert normalize_url("[::1]:8080/") == "http://[::1]:8080"
    assert normalize_url("8080") == "http://127.0.0.1:8080"
    assert normalize_url("https://fleet.example:443") == "https://fleet.example:443"


def test_status_with_a_bare_host_and_port(
    status_server: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["status", "--url", f"127.0.0.1:{status_server}"]) == 0
    assert "3/2000 replicas ready" in capsys.readouterr().out


def test_status_json_into_head_ends_quietly(status_server: int) -> None:
    argv = [sys.executable, "-m", "supervisor", "status", "--json"]
    proc = subprocess.Popen(
        [*argv, "--url", f"127.0.0.1:{status_server}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # what `head -1` reads before it exits
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=30) == 1
    assert first.strip() == b"{"
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_the_forecast_line_shows_the_fixed_prefill_cost_and_the_per_token_one() -> None:
    """Prompts of one length teach only the fixed part (the slope stays 0): the line must
    not read "prefill 0.000 s" when every prefill took 80 ms."""

    forecast = {
        "prefill_base_s": 0.08,
        "prefill_s_per_1k_tokens": 0.0,
        "decode_step_s": 0.0295,
        "streams_seen": 12,
    }
    status = {"replicas": [{"name": "replica-0", "state": "ready", "forecast": forecast}]}
    line = next(x for x in format_table(status).splitlines() if x.startswith("forecast:"))
    assert line == "forecast: replica-0 prefill 80 ms + 0.000 s/1k tokens, step 29.5 ms"
