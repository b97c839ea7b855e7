"""Behind real TGI a query of death is answered before its process goes: a shard dying under
a batch makes the router answer every request of it with a generation error (424
``error_type: generation``, or an error event when streaming), then the launcher shuts the
server down. Such an answered failure counts as a break once its process is seen to exit,
not stopped on purpose (balancer/fate.py, balancer/retry.py); and the request goes to no
other replica before that fate is known.

End to end with real supervised replica processes that answer like TGI and then exit; the
fate's bookkeeping is unit-tested in tests/test_fate.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from tests.script_fleet import ScriptFleet, replica_script, script_fleet
from tests.test_hardening_input import metric_sum

pytestmark = pytest.mark.timeout(60)

REPLICA = replica_script(
    """
    # Answers like TGI when a shard dies under the batch: "crash" gets a generation error
    # (424 JSON, or an error event when streaming; "crash-first" as the first event,
    # "crash" after a token), then the process exits. "fail" gets the same error from a
    # replica that lives on. Every POST leaves a file behind, every exit another.

    ERROR = {"error": "Request failed during generation: Server error: shard died",
             "error_type": "generation"}

    class Handler(Replica):
        protocol_version = "HTTP/1.1"

        def chunk(self, data):
            self.wfile.write(b"%x\\r\\n%b\\r\\n" % (len(data), data))

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            (folder / f"seen-{name}-{uuid.uuid4().hex}").touch()
            if b"crash" not in body and b"fail" not in body:
                answer = b'{"generated_text":"ok"}'
                self.send_json(200, answer)
                return
            if self.path == "/generate_stream":
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if b"crash-first" not in body:
                    self.chunk(b'data:{"token":{"id":1,"text":"a","logprob":0,"special":false}}\\n\\n')
                self.chunk(b"data:" + json.dumps(ERROR).encode() + b"\\n\\n")
                self.wfile.write(b"0\\r\\n\\r\\n")
            else:
                answer = json.dumps(ERROR).encode()
                self.send_json(424, answer)
            self.wfile.flush()
            if b"crash" in body:
                time.sleep(0.05)  # the answer is out: now the launcher shuts the server down
                (folder / f"exited-{name}-{os.getpid()}").touch()
                os._exit(1)

    """
)


@pytest.fixture
async def fleet3(tmp_path: Path) -> AsyncIterator[ScriptFleet]:
    """Three supervised replicas of REPLICA behind a balancer (one retry: two attempts)."""
    async with script_fleet(
        tmp_path,
        REPLICA,
        ("a", "b", "c"),
        slot_cap=4,
        retries=1,
        eject_after_failures=100,  # this is about the quarantine, not passive ejection
    ) as f:
        yield f


async def test_generation_errors_from_processes_that_then_exit_quarantine_the_resend(
    fleet3: ScriptFleet,
) -> None:
    crash = {"inputs": "crash", "parameters": {"max_new_tokens": 5}}
    status, text = await fleet3.post("/generate", crash)
    # The request waited for the process's fate before any retry: it exited, with this
    # request alone failing on it, so it was not handed to another replica; the client
    # gets TGI's answer.
    assert status == 424, text
    assert json.loads(text)["error_type"] == "generation"
    assert fleet3.count("seen") == 1 and fleet3.count("exited") == 1
    # The resend: its process exits too, one after the other: quarantined (not retried).
    status, text = await fleet3.post("/generate", crash)
    assert status == 422, text
    assert fleet3.count("exited") == 2 and len(fleet3.quarantine) == 1

    status, text = await fleet3.post("/generate", crash)
    assert status == 422, text
    assert json.loads(text)["error_type"] == "quarantined"
    assert fleet3.count("seen") == 2  # no replica saw the third send
    metrics = await fleet3.metrics()
    assert metric_sum(metrics, "neuron_fleet_quarantines_total") == 1
    assert metric_sum(metrics, "neuron_fleet_process_fates_total", fate="exited") == 2

    status, text = await fleet3.post("/generate", {"inputs": "hello"})
    assert status == 200, text


@pytest.mark.parametrize("prompt", ["crash", "crash-first"])
async def test_streamed_generation_error_events_count_once_the_process_exits(
    fleet3: ScriptFleet, prompt: str
) -> None:
    """``crash``: the error event follows a token (committed); ``crash-first``: it is the
    first event (the request waits for the fate, which says: not retried). One process per
    send either way, counted when its exit is seen."""
    doc = {"inputs": prompt, "parameters": {"max_new_tokens": 5}}
    status, text = await fleet3.post("/generate_stream", doc)
    assert status == 200 and '"error_type":"generation"' in text.replace(" ", ""), text
    await wait_until(lambda: fleet3.quarantine._suspects != {}, what="the first exit seen")
    assert len(fleet3.quarantine) == 0
    status, text = await fleet3.post("/generate_stream", doc)
    assert status in (200, 422), text
    assert fleet3.count("seen") == 2
    await wait_until(lambda: len(fleet3.quarantine) == 1, what="both exits seen")

    status, text = await fleet3.post("/generate_stream", doc)
    assert status == 422 and json.loads(text)["error_type"] == "quarantined", text
    assert fleet3.count("seen") == 2 and fleet3.count("exited") == 2


async def test_a_generation_error_from_a_process_that_lives_on_never_counts(
    fleet3: ScriptFleet,
) -> None:
    """Like a request TGI fails on a healthy replica: however often it is sent. Each
    process survives its confirmation window, so the request is retried (once: retries 1)."""
    for path in ("/generate", "/generate_stream", "/generate"):
        status, text = await fleet3.post(path, {"inputs": "fail"})
        assert status in (200, 424), text
    # Each 424 was retried after its process survived (2 + 2); the stream's error came
    # after a token (committed: 1).
    assert fleet3.count("seen") == 5
    # An unrelated crash of another process confirms nothing of these.
    victim = fleet3.replicas[0]
    fleet3.server.balancer.registry.process_exited(victim, 1)
    assert len(fleet3.quarantine) == 0 and fleet3.quarantine._suspects == {}
    status, text = await fleet3.post("/generate", {"inputs": "fail"})
    assert status == 424, text
    assert fleet3.count("exited") == 0
    metrics = await fleet3.metrics()
    assert metric_sum(metrics, "neuron_fleet_process_fates_total", fate="survived") >= 2


async def test_processes_stopped_on_purpose_after_a_generation_error_do_not_count(
    fleet3: ScriptFleet,
) -> None:
    for _ in range(2):  # two processes each time: every replica answered it at least once
        status, text = await fleet3.post("/generate", {"inputs": "fail"})
        assert status == 424, text
    pids = {r.pid for r in fleet3.replicas}
    await fleet3.fleet.stop(grace=1)
    assert all(r.stopping_pid in pids for r in fleet3.replicas)
    assert len(fleet3.quarantine) == 0 and fleet3.quarantine._suspects == {}
