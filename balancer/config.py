"""The balancer's settings: one frozen dataclass, filled from the CLI or a fleet.toml.

Defaults are sized for TGI on Neuron: a 16k-token prefill takes ~1.6 s and a request can
wait tens of seconds for a static batch slot, so timeouts are generous where a replica is
legitimately silent and short where a socket is simply dead.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ENGINES = ("tgi", "vllm")
"""The replicas' serving engine: it decides the shape of the balancer's own error bodies
and error events (balancer/errors.py), so clients parse ours like a replica's."""


@dataclass(frozen=True)
class UpstreamSpec:
    """A replica given to the balancer: where it is and how many slots it has."""

    url: str
    name: str | None = None
    slot_cap: int | None = None
    """None: take ``BalancerConfig.max_inflight_per_replica``."""
    cores: str | None = None


@dataclass(frozen=True)
class BalancerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    metrics_listen: str | None = None
    """``HOST:PORT`` of a second listener that serves only ``/metrics``; the main one then
    has no ``/metrics``, so a load balancer forwarding the main port (an ALB) never exposes
    it, and Prometheus scrapes this port directly. None: ``/metrics`` on the main port."""
    upstreams: tuple[UpstreamSpec, ...] = ()

    engine: str = "tgi"
    """``tgi`` | ``vllm``: what the replicas are (``ENGINES``)."""
    policy: str = "least-outstanding"
    """``least-outstanding`` | ``round-robin`` | ``least-work``."""
    max_inflight_per_replica: int = 8
    """Default slot cap per replica (the compiled batch size); 0 = no cap."""
    max_queue: int = 1024
    """Requests waiting at the balancer for a free slot; beyond it: 429."""
    queue_timeout_s: float = 120.0
    """Longest wait for a slot; beyond it: 503 + Retry-After."""
    queue_order: str = "fifo"
    """``fifo`` | ``deadline`` | ``shortest``: earliest arrival + ``queue_ageing`` x
    estimated (``deadline``) or learned (``shortest``) slot time first; short requests stop
    waiting behind long ones (see balancer/queue_order.py)."""
    queue_ageing: float = 0.3
    queue_long_tokens: int = 4096
    """Prompts of at least this many tokens are *long*: the class the floor protects."""
    queue_long_share: float = 0.25
    """``shortest`` order: the share of granted slots long prompts get while one waits."""
    ttft_slo_s: float | None = None
    """Refuse on arrival (429) a request whose predicted TTFT exceeds this, and drop a
    queued one once it can no longer make it (503); None: off (see balancer/slo.py)."""

    retries: int = 2
    """Extra attempts on another replica when nothing was sent to the client yet."""
    connect_timeout_s: float = 5.0
    """TCP connect to a replica."""
    first_byte_timeout_s: float = 300.0
    """Streams: until the replica's response head *and* first event (a 16k-token prefill
    behind a full batch takes tens of seconds on Neuron). Retried on another replica."""
    response_timeout_s: float = 900.0
    """Non-streaming requests: the whole response, head to last byte (the replica sends
    nothing until the generation is done: 4k tokens at ~40 ms each behind a queue)."""
    idle_timeout_s: float = 120.0
    """Longest silence between two pieces of a started response (TGI sends a keep-alive
    comment after 15 s idle; a long prefill pauses every stream of the batch)."""
    client_timeout_s: float = 60.0
    """Longest a client may take to send its request headers (aiohttp's keep-alive timer,
    also the idle keep-alive limit), and to take a chunk we wrote."""
    body_timeout_s: float = 10.0
    """Longest a client may take to send a request body, first byte to last (slowloris: a
    body announced and sent too slowly or never); beyond it: 408 and the connection closed.
    10 s is 2 MB at 1.6 Mbit/s."""
    max_body_bytes: int = 2_000_000
    """Larger request bodies: 413 in TGI's shape. TGI refuses them too, in plain text
    (text-generation-inference v3.3.7 launcher ``--payload-limit``, default 2000000)."""

    shutdown_delay_s: float = 0.0
    """On SIGTERM, keep accepting and serving this long with ``/health`` already 503, before
    refusing new requests: a front load balancer (ALB, HAProxy, a Kubernetes Service) only
    stops sending after its health checks or endpoint update notice. Set it above the
    front's detection time (interval x unhealthy threshold); 0: refuse at once (one host,
    clients connect directly). See docs/scale-out.md."""

    health_interval_s: float = 5.0
    health_timeout_s: float = 5.0
    health_rise: int = 2
    health_fall: int = 3
    eject_after_failures: int = 3
    """Consecutive failed requests seen by the relay before a replica is ejected."""
    max_ejected_fraction: float = 0.34
    """Most replicas passive ejection may hold out at once, as a fraction of the fleet
    (Envoy's max_ejection_percent); at least one. 0.34: one of three."""
    quarantine_after: int = 2
    """Distinct replica processes a request may break (die or cut the response while
    serving it) before identical requests (same route and body) are refused with 422 for
    ``quarantine_ttl_s``, without reaching a replica (balancer/quarantine.py); 0: off."""
    quarantine_ttl_s: float = 600.0
    """How long a poison request stays quarantined; also how long a break is remembered."""
    confirm_window_s: float = 1.0
    """After a failure that may be the request's own (an error answer, a cut, a timeout), how
    long its replica process must stay alive and answer ``/health`` before the request goes
    to another replica (balancer/retry.py). TGI exits 50-200 ms after answering a request
    that crashed a shard."""

    max_input_tokens: int | None = None
    """Refuse longer prompts with 422 before they take a slot (None: let replicas judge)."""
    max_total_tokens: int | None = None
    """The replicas' MAX_TOTAL_TOKENS: no request's work estimate exceeds it (a replica
    never runs prompt + new tokens beyond it, whatever ``max_tokens`` says)."""
    tokenizer_path: str | None = None
    """Local model folder to count prompt tokens with; None: estimate (4 chars/token)."""

    admin_token: str | None = field(default=None, repr=False)
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    replica_api_key: str | None = field(default=None, repr=False)
    """Sent to every replica as ``Authorization: Bearer <key>`` in place of whatever the
    client sent. A TGI replica started with ``API_KEY`` (``--api-key``) refuses generation
    requests without it, so another local user cannot reach its port around the balancer's
    API keys and queue. ``serve`` makes one per run unless ``[fleet] replica_auth = false``."""
    admin_from_any_host: bool = False
    """Admin routes (/fleet/*) answer loopback clients only unless this is set."""
    admin_hosts: tuple[str, ...] = ()
    """Host names (besides IP addresses and localhost) admin requests may be addressed to;
    any other name is refused, so a DNS name pointed at 127.0.0.1 cannot reach /fleet/*."""
    allow_public_without_api_keys: bool = False
    """Start on a non-loopback address with no API keys (e.g. behind an authenticating
    proxy); without it the balancer refuses to start."""

    max_connections: int = 2048
    """Open client connections; beyond it a new one gets 503 and is closed. Each may also
    hold a replica connection: at start the open-file limit is raised to fit, or the cap
    lowered (balancer/connections.py); 0 = no cap."""
    max_connections_per_client: int = 512
    """Open connections from one socket address, so one address cannot hold them all;
    beyond it a new one gets 503 and is closed. Peers in ``trusted_proxies`` are exempt (a
    front proxy carries many clients). Above the default per-client request limit (slots +
    ``max_queued_per_client``). 0 = no cap."""
    max_queued_per_client: int = 256
    """Requests one client (API key, else address) may have outstanding beyond the fleet's
    slot count; beyond it: 429 + Retry-After, so one client cannot fill the queue."""
    trusted_proxies: tuple[str, ...] = ()
    """Front proxies (IP addresses or CIDR ranges, e.g. the VPC's for an ALB) whose
    ``X-Forwarded-For`` names the client for per-client quotas (balancer/client_address.py).
    Empty: the socket peer is the client. Never used for the admin loopback check."""
    max_buffered_body_bytes: int = 256 * 1024 * 1024
    """Memory for the bodies of outstanding requests (queued or streaming), each counted at
    twice its size (the bytes and the parsed JSON) as its bytes arrive; beyond it: 503."""
    max_buffered_body_bytes_per_client: int = 64 * 1024 * 1024
    """The share of ``max_buffered_body_bytes`` one client (API key, else address after
    trusted proxies) may hold; beyond it: 413 + Retry-After to that client only. 0 = no
    share (only the total)."""
    max_passthrough_requests: int = 16
    """Concurrent /tokenize, /info, /v1/models requests (no slot taken) per client (API key,
    else address); beyond it: 429. Counted once the body is read. 0 = no limit."""
    max_passthrough_total: int = 256
    """The same for all clients together, so many clients cannot flood the replicas with
    /tokenize; beyond it: 429. 0 = no limit."""
    tokenize_concurrency: int = 1
    """Prompts tokenized at once in worker threads (each can take a core)."""

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
