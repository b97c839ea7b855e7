"""``neuron-fleet serve`` (not only ``balance``) ends streams still running when its drain
timeout runs out with an explicit error event in the route's format, then a clean close."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import free_ports
from tests.test_serve import CHAT, demo_config, start_serve, wait_for
from tests.test_shutdown import _open_stream, _status

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate_stream", {"inputs": "Hello", "parameters": {"max_new_tokens": 4000}}),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 4000, "stream": True}),
    ],
)
def test_serve_drain_timeout_ends_a_stream_with_an_error_event(
    tmp_path: Path, path: str, body: dict[str, object]
) -> None:
    listen, base_port = free_ports(2)
    config = demo_config(tmp_path, base_port, drain_timeout_s=1)
    config.write_text(config.read_text().replace("speed = 100.0", "speed = 1.0", 1))
    proc = start_serve(config, listen, None, "--log-stream", "stdout")
    base = f"http://127.0.0.1:{listen}"
    stream = None
    try:
        wait_for(lambda: _status(base) == 200, seconds=30, what="ready")
        stream = _open_stream(f"{base}{path}", body)
        proc.send_signal(signal.SIGTERM)
        text = stream.read().decode()  # http.client.IncompleteRead on a cut chunked body
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err[-3000:]
        events = [e for e in text.split("\n\n") if e.strip()]
        last = events[-2 if path.startswith("/v1") else -1].replace(" ", "")
        assert "draintimeout" in last, events[-3:]
        if path.startswith("/v1"):
            assert events[-1].replace(" ", "") == "data:[DONE]"
        else:
            assert '"error_type":"incomplete_generation_stream"' in last
    finally:
        if stream is not None:
            stream.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=5)
