"""A replica program for bench/containment.py (and tests/test_containment.py) that fails the
way TGI and vLLM fail.

Run by ``neuron-fleet serve`` through the ``command`` launcher (the tests: ``script_fleet``)
as ``python containment_replica.py PORT NAME FOLDER``. A word in the request body picks the
form; every POST leaves a ``seen-*`` mark in FOLDER, every death a ``died-*``, every hang a
``hung-*``, so the bench counts what happened to the processes, not what the balancer says:

- ``answer-then-exit``: 424 ``generation`` error, then the process exits 50-200 ms later
  (TGI when a shard crashes under the batch);
- ``late-exit``: 424, then the exit 1.5 s later (after the default 1 s window);
- ``slow-424-exit``: the 424 after 1.5 s, then the exit 50-200 ms later;
- ``harmless-424``: 424, and the process lives on;
- ``event-then-exit``: a 200 stream whose first event is that error, then the exit;
- ``mid-event``: one token event, half of the next, then the exit;
- ``hang``: no answer ever, and nothing else (``/health`` included) is answered after it;
- ``popular``: a long healthy stream (100 tokens, 50 ms apart);
- anything else: ``{"generated_text": "ok"}``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

port, name, folder = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
HUNG = threading.Event()
ERROR = {
    "error": "Request failed during generation: Server error: shard died",
    "error_type": "generation",
}
TOKEN = b'data:{"token":{"id":1,"text":"a","logprob":0,"special":false}}\n\n'


def mark(kind: str) -> None:
    (folder / f"{kind}-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}").touch()


def die_soon() -> None:
    time.sleep(random.uniform(0.05, 0.2))  # the launcher sees the shard crash
    mark("died")
    os._exit(1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if HUNG.is_set():  # a wedged engine answers nothing, /health included
            time.sleep(3600)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def send_json(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
        self.wfile.flush()

    def start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        mark("seen")
        if b"answer-then-exit" in body:
            self.send_json(424, json.dumps(ERROR).encode())
            die_soon()
        if b"late-exit" in body:  # the exit comes 1.5 s later: after the 1 s window
            self.send_json(424, json.dumps(ERROR).encode())
            time.sleep(1.5)
            mark("died")
            os._exit(1)
        if b"slow-424-exit" in body:  # the 424 takes 1.5 s, then the exit
            time.sleep(1.5)
            self.send_json(424, json.dumps(ERROR).encode())
            die_soon()
        if b"harmless-424" in body:  # a failure the process lives through
            self.send_json(424, json.dumps(ERROR).encode())
            return
        if b"event-then-exit" in body:
            self.start_stream()
            self.chunk(b"data:" + json.dumps(ERROR).encode() + b"\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            die_soon()
        if HUNG.is_set():  # wedged: nothing is answered any more
            time.sleep(3600)
        if b"hang" in body:
            HUNG.set()
            mark("hung")
            time.sleep(3600)
        if b"mid-event" in body:
            self.start_stream()
            self.chunk(TOKEN)
            self.chunk(b'data:{"token":{"id":2,"te')
            time.sleep(0.05)
            mark("died")
            os._exit(1)
        if b"popular" in body:
            self.start_stream()
            for _ in range(100):
                self.chunk(TOKEN)
                time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_json(200, b'{"generated_text":"ok"}')


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
