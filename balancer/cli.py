"""``neuron-fleet balance``: the balancer alone, in front of replicas that run elsewhere."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Awaitable
from dataclasses import replace

from balancer.admission import QUEUE_ORDERS
from balancer.client_address import parse_networks
from balancer.config import ENGINES, BalancerConfig, UpstreamSpec
from balancer.logs import add_logging_arguments, configure_logging
from balancer.policy import POLICIES
from balancer.secrets_env import API_KEYS_VAR, secrets_from_env
from balancer.server import BalancerServer

log = logging.getLogger("neuron_fleet")


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8080`` for IPv6) or a bare port."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", value
    host = host.strip("[]") or "127.0.0.1"
    try:
        return host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None


def _upstream(value: str) -> UpstreamSpec:
    """``URL`` or ``NAME=URL``."""
    name, sep, url = value.partition("=")
    if not sep or name.startswith(("http://", "https://")):
        name, url = "", value
    if not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"upstream must be an http:// URL, got {value!r}")
    return UpstreamSpec(url=url, name=name or None)


def _positive_seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return seconds


def _count(value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {value!r}")
    return count


def _share(value: str) -> float:
    try:
        share = float(value)
    except ValueError:
        share = float("nan")
    if not 0 <= share < 1:
        raise argparse.ArgumentTypeError(f"expected a share 0 <= x < 1, got {value!r}")
    return share


def _trusted_proxy(value: str) -> str:
    """An IP address or CIDR range (checked here, so a typo stops the start)."""
    try:
        parse_networks([value])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options; each default is ``BalancerConfig``'s (``d``), the one source of defaults
    for ``balance`` and ``serve`` (tests/test_cli.py checks that none drifts)."""
    d = BalancerConfig()
    parser.add_argument(
        "--listen",
        default=f"{d.host}:{d.port}",
        type=parse_listen,
        help="address to listen on (default %(default)s)",
    )
    parser.add_argument(
        "--upstream",
        action="append",
        type=_upstream,
        required=True,
        metavar="[NAME=]URL",
        help="a replica's base URL; repeat per replica",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default=d.engine,
        help="what the replicas are; the balancer's own errors take its shapes "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        default=d.policy,
        help="how a ready replica is chosen (default %(default)s)",
    )
    parser.add_argument(
        "--max-inflight-per-replica",
        type=int,
        default=d.max_inflight_per_replica,
        help="slot cap per replica, normally the compiled batch size; 0 = no cap "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=d.max_queue,
        help="requests waiting here for a free slot; beyond it 429 (default %(default)s)",
    )
    parser.add_argument(
        "--queue-timeout",
        type=float,
        default=d.queue_timeout_s,
        metavar="S",
        help="longest wait for a slot; beyond it 503 + Retry-After (default %(default)s)",
    )
    parser.add_argument(
        "--queue-order",
        choices=QUEUE_ORDERS,
        default=d.queue_order,
        help="fifo; deadline: short requests first with ageing, on fixed inf2 estimates; "
        "shortest: the same on the slot times learned from the replicas (default %(default)s)",
    )
    parser.add_argument(
        "--queue-ageing",
        type=float,
        default=d.queue_ageing,
        help="deadline/shortest order: arrival + AGEING x estimated slot seconds "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--queue-long-tokens",
        type=int,
        default=d.queue_long_tokens,
        metavar="N",
        help="prompts of at least N tokens are long (default %(default)s)",
    )
    parser.add_argument(
        "--queue-long-share",
        type=_share,
        default=d.queue_long_share,
        metavar="SHARE",
        help="shortest order: share of granted slots long prompts get while one waits "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--ttft-slo",
        type=_positive_seconds,
        default=d.ttft_slo_s,
        metavar="SECONDS",
        help="refuse at once (429 + Retry-After) requests predicted to get their first token "
        "later than this, and drop queued ones that can no longer make it (default: off)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=d.retries,
        help="attempts on another replica before the first byte (default %(default)s)",
    )
    parser.add_argument(
        "--quarantine-after",
        type=_count,
        default=d.quarantine_after,
        metavar="N",
        help="refuse (422, for --quarantine-ttl) requests identical to one that broke N "
        "replica processes while they served it (a query of death); 0 = off "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--quarantine-ttl",
        type=_positive_seconds,
        default=d.quarantine_ttl_s,
        metavar="S",
        help="how long such a request stays refused (default %(default)s)",
    )
    parser.add_argument(
        "--confirm-window",
        type=_positive_seconds,
        default=d.confirm_window_s,
        metavar="S",
        help="after a failure that may be the request's own, how long its replica must "
        "live on and answer /health before the request goes to another (default %(default)s)",
    )
    parser.add_argument(
        "--first-byte-timeout",
        type=float,
        default=d.first_byte_timeout_s,
        metavar="S",
        help="streams: until a replica's headers and first event (default %(default)s)",
    )
    parser.add_argument(
        "--response-timeout",
        type=float,
        default=d.response_timeout_s,
        metavar="S",
        help="non-streaming requests: the whole response (default %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=d.idle_timeout_s,
        metavar="S",
        help="longest silence inside a started stream (default %(default)s)",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=d.health_interval_s,
        metavar="S",
        help="seconds between /health checks of each replica (default %(default)s)",
    )
    parser.add_argument(
        "--max-input-tokens",
        type=int,
        default=d.max_input_tokens,
        help="refuse longer prompts with 422 (default: the replicas judge)",
    )
    parser.add_argument(
        "--tokenizer",
        default=d.tokenizer_path,
        metavar="DIR",
        help="local model folder to count prompt tokens with",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="on SIGTERM, how long in-flight streams may finish (default %(default)s)",
    )
    add_logging_arguments(parser)
    parser.add_argument(
        "--allow-public-without-api-keys",
        action="store_true",
        help=f"start on a non-loopback --listen address although {API_KEYS_VAR} is "
        "unset (e.g. behind an authenticating proxy)",
    )
    parser.add_argument(
        "--trusted-proxy",
        action="append",
        type=_trusted_proxy,
        default=list(d.trusted_proxies),
        metavar="CIDR",
        help="a front proxy (address or CIDR range, e.g. the VPC of an ALB) whose "
        "X-Forwarded-For names the client for per-client limits; repeatable (default: none, "
        "the socket peer is the client)",
    )
    parser.add_argument(
        "--shutdown-delay",
        type=float,
        default=d.shutdown_delay_s,
        metavar="S",
        help="on SIGTERM, keep serving this long with /health 503 before refusing new "
        "requests (longer than a front load balancer's health-check detection time; "
        "default %(default)s)",
    )


def config_from_args(args: argparse.Namespace) -> BalancerConfig:
    host, port = args.listen
    return replace(
        BalancerConfig(),
        host=host,
        port=port,
        upstreams=tuple(args.upstream),
        engine=args.engine,
        policy=args.policy,
        max_inflight_per_replica=args.max_inflight_per_replica,
        max_queue=args.max_queue,
        queue_timeout_s=args.queue_timeout,
        queue_order=args.queue_order,
        queue_ageing=args.queue_ageing,
        queue_long_tokens=args.queue_long_tokens,
        queue_long_share=args.queue_long_share,
        ttft_slo_s=args.ttft_slo,
        retries=args.retries,
        quarantine_after=args.quarantine_after,
        quarantine_ttl_s=args.quarantine_ttl,
        confirm_window_s=args.confirm_window,
        first_byte_timeout_s=args.first_byte_timeout,
        response_timeout_s=args.response_timeout,
        idle_timeout_s=args.idle_timeout,
        health_interval_s=args.health_interval,
        max_input_tokens=args.max_input_tokens,
        tokenizer_path=args.tokenizer,
        allow_public_without_api_keys=args.allow_public_without_api_keys,
        shutdown_delay_s=args.shutdown_delay,
        trusted_proxies=tuple(args.trusted_proxy),
        **secrets_from_env(os.environ),
    )


async def serve_balancer(config: BalancerConfig, drain_timeout_s: float) -> int:
    server = BalancerServer(config)
    try:
        await server.start()
    except OSError as exc:
        log.error(
            "cannot listen on %s:%s: %s (is another process using it?)",
            config.host,
            config.port,
            exc,
        )
        return 2
    stop = asyncio.Event()
    forced = asyncio.Event()
    signals = 0

    def on_signal(name: str) -> None:
        """The first signal starts the graceful stop; a second one (as for ``serve``) skips
        the rest of the shutdown delay and the drain."""
        nonlocal signals
        signals += 1
        if signals == 1:
            stop.set()
        elif not forced.is_set():
            log.warning("%s again: stopping now, closing the remaining streams", name)
            forced.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, signal.Signals(sig).name)
    await stop.wait()
    log.info(
        "stopping: serving %.0f s more, then draining in-flight requests (up to %.0f s); "
        "a second signal stops at once",
        config.shutdown_delay_s,
        drain_timeout_s,
    )
    await _unless_forced(forced, server.begin_shutdown(config.shutdown_delay_s))
    server.refuse_new()
    if not await _unless_forced(forced, server.wait_idle(drain_timeout_s)):
        if not forced.is_set():
            log.warning("drain timeout: closing the remaining streams")
            await server.end_streams()
    await server.stop()
    return 0


async def _unless_forced(forced: asyncio.Event, waiting: Awaitable[bool | None]) -> bool:
    """True once ``waiting`` finished (and did not return False); False as soon as
    ``forced`` is set."""
    if forced.is_set():
        return False
    task = asyncio.ensure_future(waiting)
    force = asyncio.ensure_future(forced.wait())
    try:
        await asyncio.wait({task, force}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        force.cancel()
        task.cancel()
    return task.done() and not task.cancelled() and task.result() is not False


def run(args: argparse.Namespace) -> int:
    import uvloop

    from balancer.access import insecure_settings

    configure_logging(args.log_level, args.log_stream)
    config = config_from_args(args)
    problems = insecure_settings(config, token_configured=bool(config.admin_token))
    for problem in problems:
        log.error("refusing to start: %s", problem)
    if problems:
        return 2
    return uvloop.run(serve_balancer(config, args.drain_timeout))
