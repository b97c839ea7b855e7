"""Bad input: a corpus of malformed requests and a property-based fuzzer over bodies and headers.

The balancer must never crash nor answer an unhandled 500, and must refuse bad input before
any replica is touched. Errors made by the balancer's handlers come in TGI's JSON shape
(``{"error": str, "error_type": str}``). Requests too broken to be HTTP (bad request line,
oversized or invalid headers, Content-Length + Transfer-Encoding) are refused by aiohttp's
HTTP parser before any handler runs: a plain-text 400 and a closed connection (TGI's hyper
answers those with a bare 400 too). Requests are sent over raw sockets so every byte is ours.

Complements tests/test_balancer_errors.py (invalid JSON, wrong content type, bodies over the
limit by Content-Length, negative max_new_tokens, unknown route, DELETE): nothing here
repeats those.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.upstreams import Script

pytestmark = pytest.mark.timeout(60)

LIMIT = 64 * 1024
"""max_body_bytes of the balancer under test."""


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""

    def json(self) -> object:
        return json.loads(self.body)


def build_request(
    method: str | bytes,
    target: bytes,
    headers: list[bytes] | tuple[bytes, ...] = (),
    body: bytes | None = b"",
    *,
    content_length: bool = True,
) -> bytes:
    """One HTTP/1.1 request as bytes; ``Connection: close`` so the answer ends with EOF."""
    m = method.encode() if isinstance(method, str) else method
    lines = [m + b" " + target + b" HTTP/1.1", b"Host: balancer", b"Connection: close"]
    lines += list(headers)
    if body is not None and content_length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def parse_response(raw: bytes) -> RawResponse:
    """The final response in ``raw`` (interim 100 Continue skipped); status 0: none at all."""
    rest = raw
    while True:
        head, sep, body = rest.partition(b"\r\n\r\n")
        if not sep or not head.startswith(b"HTTP/"):
            return RawResponse(0, raw=raw)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        if status == 100:
            rest = body
            continue
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
        return RawResponse(status, headers, body, raw)


def _complete(raw: bytes) -> bool:
    """A final response with all of its Content-Length body is in ``raw``."""
    resp = parse_response(raw)
    length = resp.headers.get("content-length")
    return resp.status != 0 and length is not None and len(resp.body) >= int(length)


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> RawResponse:
    """Send ``data``, read the answer (until EOF or its Content-Length); fails the test if
    none comes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            while not _complete(out) and (chunk := await reader.read(65536)):
                out += chunk
    except TimeoutError:
        raise AssertionError(f"no complete answer within {timeout} s; got {out[:300]!r}") from None
    except ConnectionResetError:
        pass  # the server may reset after answering a request whose body it did not read
    finally:
        writer.close()
    return parse_response(out)


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def assert_tgi_error(resp: RawResponse, status: int | None = None, error_type: str | None = None):
    if status is not None:
        assert resp.status == status, resp.raw[:400]
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.raw[:400]
    doc = resp.json()
    assert isinstance(doc, dict) and set(doc) == {"error", "error_type"}, doc
    assert isinstance(doc["error"], str) and doc["error"]
    assert isinstance(doc["error_type"], str) and doc["error_type"]
    if error_type is not None:
        assert doc["error_type"] == error_type, doc


def assert_parser_refusal(resp: RawResponse) -> None:
    """aiohttp's HTTP parser said no: plain-text 400, before any handler ran."""
    assert resp.status == 400, resp.raw[:400]
    assert resp.headers.get("content-type", "").startswith("text/plain"), resp.raw[:400]


# --------------------------------------------------------------------------- fixture


@pytest.fixture
async def target(scripted, balancer):
    replica, url = await scripted(Script(tokens=2))
    server = await balancer([url], max_body_bytes=LIMIT)
    return replica, server


@pytest.fixture
async def sim_target(simulator, balancer):
    """The balancer in front of a simulated TGI replica that keeps every answer short."""
    url = await simulator(
        speed=1000.0,
        batch_size=4,
        max_input_tokens=64,
        max_total_tokens=96,
        default_max_new_tokens=8,
    )
    return await balancer([url], max_body_bytes=LIMIT)


JSON = b"Content-Type: application/json"
GOOD = b'{"inputs":"hello","parameters":{"max_new_tokens":2}}'


def _deep(depth: int) -> bytes:
    return b'{"inputs":"x","parameters":' + b"[" * depth + b"]" * depth + b"}"


# (id, request bytes, expected status, "json:<error_type>" | "parser" | "ok")
CORPUS: list[tuple[str, bytes, int, str]] = [
    # Content type and body framing
    ("no-content-type", build_request("POST", b"/generate", [], GOOD), 415, "json:validation"),
    (
        "form-content-type",
        build_request(
            "POST", b"/generate", [b"Content-Type: application/x-www-form-urlencoded"], b"a=1"
        ),
        415,
        "json:validation",
    ),
    (
        "json-suffix-content-type",
        build_request("POST", b"/generate", [b"Content-Type: application/vnd.x+json"], GOOD),
        200,
        "ok",
    ),
    ("empty-body", build_request("POST", b"/generate", [JSON], b""), 400, "json:validation"),
    ("json-null", build_request("POST", b"/generate", [JSON], b"null"), 422, "json:validation"),
    ("json-string", build_request("POST", b"/generate", [JSON], b'"x"'), 422, "json:validation"),
    ("json-number", build_request("POST", b"/generate", [JSON], b"42"), 422, "json:validation"),
    (
        "trailing-garbage",
        build_request("POST", b"/generate", [JSON], GOOD + b"}}"),
        400,
        "json:validation",
    ),
    (
        "utf16-garbage",
        build_request("POST", b"/generate", [JSON], b"\xff\xfe{\x00\xd8"),
        400,
        "json:validation",
    ),
    # Found by this suite: json.loads raised RecursionError, answered as a 500.
    ("deeply-nested", build_request("POST", b"/generate", [JSON], _deep(30_000)), 400, "json:"),
    (
        "huge-integer-literal",
        build_request(
            "POST", b"/generate", [JSON], b'{"inputs":"x","max_tokens":1' + b"0" * 5000 + b"}"
        ),
        400,
        "json:validation",
    ),
    (
        "chunked-over-limit",
        build_request(
            "POST",
            b"/generate",
            [JSON, b"Transfer-Encoding: chunked"],
            b"".join(b"400\r\n" + b" " * 1024 + b"\r\n" for _ in range(80)) + b"0\r\n\r\n",
            content_length=False,
        ),
        413,
        "json:validation",
    ),
    (
        "gzip-bomb",
        build_request(
            "POST",
            b"/generate",
            [JSON, b"Content-Encoding: gzip"],
            gzip.compress(b'{"inputs":"' + b"a" * 4_000_000 + b'"}'),
        ),
        413,
        "json:validation",
    ),
    # max tokens: negative, absurd, wrong types (a valid huge int is the replica's call)
    *[
        (
            f"max-tokens-{name}",
            build_request(
                "POST", b"/v1/completions", [JSON], b'{"prompt":"x","max_tokens":%s}' % v
            ),
            422,
            "json:validation",
        )
        for name, v in [
            ("negative", b"-1"),
            ("float", b"1.5"),
            ("bool", b"true"),
            ("nan", b"NaN"),
            ("infinity", b"Infinity"),
            ("overflow-float", b"1e400"),
            ("string", b'"10"'),
            ("object", b'{"n":1}'),
        ]
    ],
    (
        "max-new-tokens-negative-huge",
        build_request(
            "POST",
            b"/generate",
            [JSON],
            b'{"inputs":"x","parameters":{"max_new_tokens":-99999999999999999999}}',
        ),
        422,
        "json:validation",
    ),
    (
        "max-tokens-absurd-but-integer",
        build_request(
            "POST", b"/v1/completions", [JSON], b'{"prompt":"x","max_tokens":1000000000000}'
        ),
        200,
        "ok",
    ),
    # Routes and methods
    *[
        (f"unknown-route-{i}", build_request("POST", path, [JSON], GOOD), 404, "json:not_found")
        for i, path in enumerate(
            [
                b"/v2/generate",
                b"/generate/",
                b"/../../etc/passwd",
                b"/generate%00",
                b"/" + b"a" * 8000,
            ]
        )
    ],
    *[
        (
            f"method-{m}-{p.decode()}",
            build_request(m, p, [JSON], GOOD),
            405,
            "json:method_not_allowed",
        )
        for m, p in [
            ("PUT", b"/generate"),
            ("PATCH", b"/v1/chat/completions"),
            ("GET", b"/generate_stream"),
            ("OPTIONS", b"/generate"),
            ("POST", b"/health"),
            ("POST", b"/metrics"),
            ("DELETE", b"/fleet/status"),
        ]
    ],
    # Headers that are still HTTP: forwarded (or ignored) without harm
    (
        "header-utf8-value",
        build_request("POST", b"/generate", [JSON, "X-Name: café".encode()], GOOD),
        200,
        "ok",
    ),
    (
        "header-invalid-utf8-value",
        build_request("POST", b"/generate", [JSON, b"X-Name: \xff\xfe\x80"], GOOD),
        200,
        "ok",
    ),
    (
        "header-garbage-authorization",
        build_request("POST", b"/generate", [JSON, b"Authorization: \xff Bearer"], GOOD),
        200,
        "ok",
    ),
    (
        "header-bad-request-id",
        build_request("POST", b"/generate", [JSON, b"X-Request-Id: a b<script>"], GOOD),
        200,
        "ok",
    ),
    # Found by the fuzzer: aiohttp's default Expect handler answered an unknown expectation
    # in plain text, and crashed (500) when its value was not valid UTF-8.
    (
        "expect-unknown",
        build_request("POST", b"/generate", [JSON, b"Expect: 200-ok"], GOOD),
        417,
        "json:validation",
    ),
    (
        "expect-invalid-utf8",
        build_request("POST", b"/generate", [JSON, b"Expect: \x80\xff"], GOOD),
        417,
        "json:validation",
    ),
    (
        "expect-continue",
        build_request("POST", b"/generate", [JSON, b"Expect: 100-continue"], GOOD),
        200,
        "ok",
    ),
    (
        "query-string-junk",
        build_request("POST", b"/generate?a=%20b%00&&=&x&y=%zz", [JSON], GOOD),
        200,
        "ok",
    ),
    # Not HTTP any more: refused by the parser, no handler, no replica
    (
        "header-too-long",
        build_request("POST", b"/generate", [JSON, b"X-Big: " + b"a" * 20_000], GOOD),
        400,
        "parser",
    ),
    (
        "too-many-headers",
        build_request("POST", b"/generate", [JSON, *(b"X-H%d: v" % i for i in range(200))], GOOD),
        400,
        "parser",
    ),
    (
        "header-control-char",
        build_request("POST", b"/generate", [JSON, b"X-A: a\x01b"], GOOD),
        400,
        "parser",
    ),
    (
        "header-name-space",
        build_request("POST", b"/generate", [JSON, b"Bad Name: x"], GOOD),
        400,
        "parser",
    ),
    (
        "header-no-colon",
        build_request("POST", b"/generate", [JSON, b"NoColonHere"], GOOD),
        400,
        "parser",
    ),
    (
        "content-length-and-chunked",
        build_request("POST", b"/generate", [JSON, b"Transfer-Encoding: chunked"], GOOD),
        400,
        "parser",
    ),
    (
        "content-length-invalid",
        build_request(
            "POST", b"/generate", [JSON, b"Content-Length: 1x"], GOOD, content_length=False
        ),
        400,
        "parser",
    ),
    (
        "content-length-twice",
        build_request("POST", b"/generate", [JSON, b"Content-Length: 3"], GOOD),
        400,
        "parser",
    ),
    ("path-invalid-utf8", build_request("POST", b"/gen\xffrate", [JSON], GOOD), 400, "parser"),
    ("query-invalid-utf8", build_request("POST", b"/generate?a=\xff", [JSON], GOOD), 400, "parser"),
    ("request-line-garbage", b"GARBAGE\r\n\r\n", 400, "parser"),
    ("tls-client-hello", bytes.fromhex("16030100a5010000a10303") + bytes(60), 400, "parser"),
]


@pytest.mark.parametrize(
    ("request_bytes", "status", "kind"),
    [pytest.param(data, status, kind, id=name) for name, data, status, kind in CORPUS],
)
async def test_malformed_request_corpus(target, http, request_bytes, status, kind):
    replica, server = target
    before = len(replica.seen.requests)
    resp = await raw_exchange(server.bound_port, request_bytes)
    assert resp.status == status, resp.raw[:500]
    if kind == "ok":
        assert len(replica.seen.requests) == before + 1
        return
    if kind == "parser":
        assert_parser_refusal(resp)
    else:
        error_type = kind.partition(":")[2] or None
        if request_bytes.startswith(b"HEAD "):
            assert not resp.body
        else:
            assert_tgi_error(resp, status, error_type)
    assert len(replica.seen.requests) == before, "a refused request reached the replica"
    async with http.get(f"{server.url}/health") as health:
        assert health.status == 200  # still serving
    async with http.get(f"{server.url}/metrics") as m:
        assert metric_sum(await m.text(), "neuron_fleet_requests_total", code="500") == 0


async def test_oversized_body_is_refused_before_it_is_read(target):
    """A declared length over the limit is answered at once: the body never has to arrive."""
    replica, server = target
    head = build_request("POST", b"/generate", [JSON, b"Content-Length: %d" % (LIMIT * 100)], None)
    resp = await raw_exchange(server.bound_port, head, timeout=3)
    assert_tgi_error(resp, 413, "validation")
    assert replica.seen.requests == []


async def test_gzip_request_body_reaches_the_replica_decoded(target):
    """aiohttp decodes a compressed request body; the replica must not be told it is still
    gzip (found by this suite: it was, the replica failed to decode it, and the retry then
    waited for queue_timeout_s because no other replica was left to try)."""
    replica, server = target
    resp = await raw_exchange(
        server.bound_port,
        build_request("POST", b"/generate", [JSON, b"Content-Encoding: gzip"], gzip.compress(GOOD)),
    )
    assert resp.status == 200, resp.raw[:400]
    seen = {k.lower(): v for k, v in replica.seen.requests[-1]["headers"].items()}
    assert "content-encoding" not in seen
    assert replica.seen.requests[-1]["body"] == json.loads(GOOD)


@pytest.mark.xfail(
    strict=True,
    reason="aiohttp limitation, not worked around: on a path or method with no route (404 / "
    "405), aiohttp's own Expect handler runs before any handler or middleware, and a non-UTF-8 "
    "Expect value makes it fail with a plain-text 500 (the connection is closed, nothing "
    "reaches a replica, the balancer keeps serving)",
)
async def test_expect_with_invalid_utf8_on_a_path_without_route(target):
    _, server = target
    request = build_request("POST", b"/nope", [JSON, b"Expect: \x80"], GOOD)
    resp = await raw_exchange(server.bound_port, request)
    assert resp.status == 404


async def test_head_and_get_on_post_routes(target):
    _, server = target
    resp = await raw_exchange(server.bound_port, build_request("HEAD", b"/generate", [], None))
    assert resp.status == 405 and resp.headers.get("allow") == "POST"
    assert resp.body == b""


# --------------------------------------------------------------------------- fuzzer

ROUTES = (
    "/generate",
    "/generate_stream",
    "/v1/chat/completions",
    "/v1/completions",
    "/",
    "/invocations",
    "/info",
    "/health",
    "/metrics",
    "/fleet/status",
    "/nope",
)
ROUTED = {
    "POST": {"/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions", "/"}
    | {"/invocations"},
    "GET": {"/info", "/health", "/metrics", "/fleet/status", "/"},
}
KEYS = (
    "inputs",
    "parameters",
    "max_new_tokens",
    "max_tokens",
    "max_completion_tokens",
    "messages",
    "role",
    "content",
    "text",
    "prompt",
    "stream",
    "model",
    "details",
)
HEADER_NAMES = (
    "Content-Type",
    "Accept",
    "Authorization",
    "X-Request-Id",
    "X-Forwarded-For",
    "Forwarded",
    "Connection",
    "Keep-Alive",
    "TE",
    "Upgrade",
    "Expect",
    "Proxy-Authorization",
    "Accept-Encoding",
    "Cookie",
    "Traceparent",
)
CONTENT_TYPES = (
    b"application/json",
    b"application/json; charset=utf-8",
    b"text/plain",
    b"application/problem+json",
    b"multipart/form-data; boundary=x",
    b"",
)

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
request_doc = st.fixed_dictionaries(
    {},
    optional={
        "inputs": json_value,
        "prompt": json_value,
        "messages": st.lists(
            st.dictionaries(st.sampled_from(("role", "content", "name")), json_value, max_size=3)
            | json_value,
            max_size=3,
        ),
        "parameters": st.dictionaries(st.sampled_from(KEYS), json_value, max_size=3) | json_value,
        "max_tokens": json_value,
        "max_completion_tokens": json_value,
        "stream": json_value,
    },
)
body_bytes = st.one_of(
    request_doc.map(lambda d: json.dumps(d, allow_nan=True).encode()),
    json_value.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=300),
)
token = st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,24}", fullmatch=True)
header_value = st.binary(max_size=80).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").strip(b" \t")
)
headers = st.lists(
    st.tuples(st.sampled_from(HEADER_NAMES) | token, header_value), max_size=6
).filter(
    # Framing headers are exercised by the corpus; fuzzed, they just make the server wait.
    lambda hs: not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in hs)
)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(("POST", "POST", "POST", "POST", "GET", "PUT", "HEAD", "OPTIONS")),
    path=st.sampled_from(ROUTES),
    content_type=st.sampled_from(CONTENT_TYPES),
    extra=headers,
    body=body_bytes,
)
async def test_fuzzed_requests_never_crash_the_balancer(
    sim_target, method, path, content_type, extra, body
):
    server = sim_target
    lines = [b"Content-Type: " + content_type] if content_type else []
    routed = path in ROUTED.get(method, ())
    lines += [
        n.encode() + b": " + v
        for n, v in extra
        # (Expect on an unrouted request: see the xfail test above)
        if n.lower() != "content-type" and (routed or n.lower() != "expect")
    ]
    resp = await raw_exchange(server.bound_port, build_request(method, path.encode(), lines, body))
    assert resp.status != 0, f"no HTTP answer: {resp.raw[:300]!r}"
    assert resp.status != 500 and resp.status < 600, resp.raw[:500]
    if resp.status >= 400 and method != "HEAD":
        if resp.headers.get("content-type", "").startswith("text/plain"):
            assert_parser_refusal(resp)  # invalid header bytes: refused before any handler
        else:
            assert_tgi_error(resp)


async def test_fuzzing_left_no_state_behind(target, http):
    """After a burst of junk (run in the same balancer), counters are clean and it serves."""
    _replica, server = target
    for body in (b"{", b"[]", b"\xff", _deep(5000), b'{"inputs":"x","max_tokens":-1}'):
        await raw_exchange(server.bound_port, build_request("POST", b"/generate", [JSON], body))
    assert server.balancer.inflight == 0 and server.balancer.admission.queue_depth == 0
    assert server.balancer.relay.active == 0
    async with http.post(
        f"{server.url}/generate", data=GOOD, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200
    async with http.get(f"{server.url}/metrics") as m:
        text = await m.text()
    assert metric_sum(text, "neuron_fleet_requests_total", code="500") == 0
    assert metric_sum(text, "neuron_fleet_rejected_requests_total") >= 5


async def test_an_empty_prompt_list_is_a_422_from_the_simulated_replica(sim_target) -> None:
    """Found by the fuzzer above: ``"prompt": []`` made the simulated replica answer 500."""
    body = b'{"prompt":[],"max_tokens":2}'
    resp = await raw_exchange(
        sim_target.bound_port, build_request("POST", b"/v1/completions", [JSON], body)
    )
    assert resp.status == 422, resp.raw[:300]
    assert b"cannot be empty" in resp.raw
