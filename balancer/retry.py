"""When a request is retried, and whom a failure is blamed on: one rule, apart from the relay.

Envoy keeps its retry policy and its outlier detection apart from the router; so do we. The
relay (balancer/relay.py) sends attempts and reports what happened to each; everything it
does about a failure comes from here. **When is a request retried?**

1. **Harmless failures** (the request never reached the process: connection refused; or the
   replica said it is busy: 429, an "overloaded" error event): retried at once, on any other
   replica, or on the same one once it restarted (``upstream.excluded``).
2. **Every other failure may be the request's own fault**: an error answer (424, 5xx) or a
   generation error event before the first token, a break (the connection dropped under the
   request), a first-byte or response timeout; after the commit, an error event, a cut or a
   stall. The request goes to no other replica until the fate of the process it failed on is
   known (balancer/fate.py: it exited, stopped answering ``/health``, or stayed healthy
   through ``confirm_window_s``):

   - it **survived**, or was stopped on purpose: the failure was that replica's; retried
     elsewhere (never again on that replica);
   - it **broke** (exited, wedged) and this request is the *prime suspect*, the one whose
     failure no other explains (``fate.Watch.prime``): the first to fail there and alone
     (a death or a crashed batch fails everything in flight at once: then nobody is); for
     requests that got no answer in time, the first one sent, unless streams it was
     serving before stalled too (the ones sent after it waited on a process it had hung;
     a process that froze under streams already running may have been frozen by anything).
     Evidence specific to it: not retried, the client gets the first answer (the replica's
     424 or error event, else 502/504). So a query of death, or a request that hangs its
     replica, harms one replica per send until the quarantine engages;
   - it broke, and this request is not the prime suspect: no evidence against it. Retried,
     but at most once more after a break (at most one more replica). Attempts still waiting
     for a first byte from a process found wedged are cut and retried at once;
   - its fate stays unknown (no answer within the window and the probe): at most one more
     replica.

   Resends follow the same rule: while an identical request's fate is unknown, one more
   attempt of it goes out per unknown fate, and others wait until that attempt's outcome
   and every fate are known (``before_attempt``).
3. **Attribution.** Each process that broke is a break for every request that failed on it
   (``Quarantine.record``), also when the exit is seen after the answer went out (retries 0,
   a committed stream). Breaks add up only one after the other (an attempt sent after the
   last counted failure): a host-level event that kills every replica under the same popular
   request quarantines nothing. A break specific to the request (its process failed it in
   words, no other request failed there, then broke) counts even so. An exit seen up to
   ``fate.LATE_EXIT_S`` after the process was found alive counts too (for the quarantine:
   the retry was decided), if one request alone failed there. ``quarantine_after`` of
   them, and identical requests are refused before any replica (422, ``x-should-retry:
   false``) for ``quarantine_ttl_s``, unless an identical request is served in full
   meanwhile, or an operator lifts it.
4. **Outliers** (balancer/outlier.py): transport failures and timeouts count against the
   replica at once; an answered failure only once the same request succeeded elsewhere.

Nothing here runs while nothing fails: the hot path (relaying token events) never calls in,
and a request pays a digest of its body only while something is quarantined or watched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from balancer.config import BalancerConfig
from balancer.fate import Fate, Fates, Prober, Suspect, Watch
from balancer.metrics import BalancerMetrics
from balancer.outlier import OutlierDetector, RequestFailures
from balancer.quarantine import Entry, Quarantine, Verdict, request_digest
from balancer.ticket import Ticket
from balancer.upstream import EVERY_INCARNATION, Registry, Replica, ReplicaState, excluded

log = logging.getLogger("neuron_fleet.retry")

WEDGED_REPLICA = "wedged_replica"
"""Why an attempt still waiting for its first byte was cut when another request's failure
showed its process wedged (``RetryPolicy.on_wedged``): a victim, retried at once."""
NOT_SUSPECT = frozenset(
    {"relay_error", "slow_client", "client_gone", "drain_timeout", WEDGED_REPLICA}
)
"""Failures that say nothing about the request or the replica: our bug, the client's side,
a shutdown."""
TIMEOUTS = frozenset({"first_byte_timeout", "response_timeout"})
"""Failures by the request's own deadline: no answer in time (balancer/fate.py ``prime``)."""
FATE_WAIT_MARGIN_S = 1.0
"""Added to the window and the probe's timeout: the longest a request waits for a fate."""


class Quarantined(Exception):
    """The request is quarantined (now, or an identical one was): no further attempt."""

    def __init__(self, entry: Entry, unsent: bool = False) -> None:
        super().__init__(entry.short)
        self.entry = entry
        self.unsent = unsent
        """The request never reached a replica (it waited for an identical one's fate)."""


@dataclass
class Attempts:
    """What the policy knows of one request across its attempts."""

    request: web.Request
    route: str
    body: bytes
    request_id: str
    ticket: Ticket
    tried: dict[Replica, int] = field(default_factory=dict)
    """Replicas this request failed on -> the incarnation it failed in (or every one)."""
    failures: RequestFailures = field(default_factory=RequestFailures)
    attempt: int = -1
    """Attempts made so far, minus one (the current one's index)."""
    replica: Replica | None = None
    incarnation: int = 0
    pid: int | None = None
    started: float = 0.0
    """When the current attempt was sent (time.monotonic())."""
    suspect: Suspect | None = None
    """The current attempt's failure, once it failed in a way that may be its own."""
    breaks: int = 0
    """Attempts that broke their process without evidence against this request."""
    exposed: str | None = None
    """Digest this attempt counts as "the one more" for while an identical one's fate is
    unknown (released when the attempt ends)."""
    _digest: str | None = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            r = self.request
            self._digest = request_digest(r.method, r.path_qs, self.body)
        return self._digest


class RetryPolicy:
    def __init__(
        self,
        config: BalancerConfig,
        registry: Registry,
        metrics: BalancerMetrics,
        quarantine: Quarantine,
        probe: Prober,
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.quarantine = quarantine
        self.outliers = OutlierDetector(
            registry, metrics, config.eject_after_failures, config.max_ejected_fraction
        )
        self.fates = Fates(registry, probe, config.confirm_window_s, self._fate_known)
        self.on_wedged: Callable[[Replica, int | None, float], None] | None = None
        """Told when a process is found wedged, with when the earliest request that timed
        out on it was sent: the relay cuts the attempts still waiting for a first byte
        from it that were sent after that (they are retried now), and of those sent before
        it all but the earliest (which may be what hung it)."""
        self._exposed: dict[str, int] = {}
        """Digests with an unknown fate -> attempts of them in flight since."""
        self._exposure_ended: asyncio.Future[None] | None = None
        """Done when an exposed attempt ended (made by the first waiter after that)."""
        self.fate_wait_s = config.confirm_window_s + config.health_timeout_s + FATE_WAIT_MARGIN_S

    def begin(
        self, request: web.Request, route: str, body: bytes, request_id: str, ticket: Ticket
    ) -> Attempts:
        return Attempts(
            request, route, body, request_id, ticket, failures=RequestFailures(request_id)
        )

    # ------------------------------------------------------------ before an attempt
    def refused_on_arrival(self, att: Attempts) -> Entry | None:
        """The quarantine entry if an identical request is quarantined (counts a refusal)."""
        if not self.quarantine.holding:
            return None
        return self.quarantine.held(att.digest)

    async def before_attempt(self, att: Attempts) -> None:
        """Raise ``Quarantined`` if the request is now; while an identical request's fate is
        unknown, let at most one more attempt of it out (once per unknown fate), and make
        the others wait for the fates.

        Unknown means a watched process it failed on, *or* the one more attempt still in
        flight without an answer: its outcome is a fate not known yet either. (Waiting only
        for the watch let a third send out the moment the first process's exit was seen,
        while the second was still on its way to killing another replica.)"""
        if self.fates.watching or self._exposed:
            digest = att.digest
            deadline = time.monotonic() + self.fate_wait_s
            while True:
                unknown = self.fates.unknown_for(digest) if self.fates.watching else []
                out = self._exposed.get(digest, 0)
                if not unknown and not out:
                    break
                if not out and len(unknown) == 1 and digest not in unknown[0].let_out:
                    # The one more, once per unknown fate (not one at a time: a second
                    # one more, once the first failed, would make three processes).
                    unknown[0].let_out.add(digest)
                    self._exposed[digest] = 1
                    att.exposed = digest
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ended = self._exposure_ended
                if ended is None or ended.done():
                    ended = self._exposure_ended = asyncio.get_running_loop().create_future()
                waits = [w.fate for w in unknown] + [ended]
                await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        if self.quarantine.holding and (att.attempt >= 0 or att._digest is not None):
            unsent = att.attempt < 0  # a refusal like one on arrival: counted
            q = self.quarantine
            entry = q.held(att.digest) if unsent else q.peek(att.digest)
            if entry is not None:
                raise Quarantined(entry, unsent=unsent)

    def started(self, att: Attempts, replica: Replica) -> None:
        att.attempt += 1
        att.replica, att.incarnation, att.pid = replica, replica.incarnation, replica.pid
        att.started = time.monotonic()
        att.suspect = None

    def attempt_ended(self, att: Attempts) -> None:
        """The attempt is over, or its outcome is known (a good answer; a failure, already
        under watch): identical requests waiting for it may go."""
        digest, att.exposed = att.exposed, None
        if digest is not None:
            left = self._exposed.get(digest, 1) - 1
            if left > 0:
                self._exposed[digest] = left
            else:
                self._exposed.pop(digest, None)
            ended = self._exposure_ended
            if ended is not None and not ended.done():
                ended.set_result(None)

    # ------------------------------------------------------------ after a failure
    def room(self, att: Attempts, harmless: bool) -> bool:
        """Whether another attempt could be made now: retries left, and a replica left that
        could take it. A starting replica counts (``att.replica`` itself after a harmless
        failure: a supervised restart comes back as a new incarnation) if it is expected back
        before the request's queue time runs out: a Neuron replica that loads for minutes
        does not make the client wait ``queue_timeout_s`` for a 503."""
        if att.attempt >= self.config.retries:
            return False
        replica, incarnation, tried = att.replica, att.incarnation, att.tried
        queue_left = self.config.queue_timeout_s - att.ticket.queued_s
        now = time.monotonic()
        for r in self.registry.replicas:
            if (r is replica and not harmless) or tried.get(r) == EVERY_INCARNATION:
                continue  # the request may have harmed it: never again, restarted or not
            if r.state is ReplicaState.STARTING:
                left = r.start_left_s(now)
                if left is None or left <= queue_left:
                    return True
            elif r.routable and not excluded(r, tried):
                if r is not replica or r.incarnation != incarnation:
                    return True
        return False

    async def retry(self, att: Attempts, kind: str, answered: bool, harmless: bool) -> bool:
        """The current attempt failed before the commit: whether to make another one (after
        the failed process's fate is known, see the module's docstring). ``answered``: the
        replica answered with a failure (status or generation event); ``harmless``: the
        request cannot have caused it. Raises ``Quarantined`` if the fate quarantined it."""
        replica = att.replica
        assert replica is not None
        if not answered and (kind == "connect_error" or not harmless):
            self.outliers.failed(replica, kind)
        att.tried[replica] = att.incarnation if harmless else EVERY_INCARNATION
        if harmless:
            return self.room(att, harmless=True)
        if await self._retry_after_fate(att, kind):
            if answered:  # judged with the request's outcome (RequestFailures)
                att.failures.add(replica, kind)
            return True
        return False

    async def _retry_after_fate(self, att: Attempts, kind: str) -> bool:
        watch = self._suspect(att, kind)
        suspect = att.suspect
        if watch is None or not self.room(att, harmless=False):
            return False  # no other attempt: the fate is attributed when it comes
        fate = await self._await_fate(watch)
        if self.quarantine.holding:
            entry = self.quarantine.peek(att.digest)
            if entry is not None:
                raise Quarantined(entry)
        if fate is None or fate.broke:
            if fate is not None and suspect is not None and watch.prime(suspect):
                log.warning(
                    "request %s %s not retried: %s %s after it failed there (%s), the "
                    "first and only request to fail there then",
                    att.request_id,
                    att.route,
                    watch.key,
                    fate.value,
                    kind,
                )
                self.metrics.retry_decisions.labels(decision="stop_specific").inc()
                return False
            if att.breaks:
                self.metrics.retry_decisions.labels(decision="stop_second_break").inc()
                return False
            att.breaks += 1
        decision = "retry" if fate is None or not fate.broke else "retry_shared_break"
        retry = self.room(att, harmless=False)
        self.metrics.retry_decisions.labels(decision=decision if retry else "no_room").inc()
        return retry

    def failed_after_commit(self, att: Attempts, kind: str) -> None:
        """A committed response failed (an error event, a cut, a stall): counted against the
        replica now (except our own bug), attributed once its process's fate is known."""
        replica = att.replica
        assert replica is not None
        if kind in NOT_SUSPECT:
            return
        if kind != "generation_event":  # counted as an upstream error already
            self.outliers.failed(replica, kind)
        self._suspect(att, kind)

    def answered(self, att: Attempts, kind: str | None) -> None:
        """The attempt's answer is what the client gets (committed): ``kind`` if it is a
        failure answer. The outcome is known: blame now, not when a long stream ends."""
        replica = att.replica
        assert replica is not None
        if kind is not None:
            att.failures.add(replica, kind)
            self._suspect(att, kind)
        att.failures.settle(self.outliers, kind is None)
        self.attempt_ended(att)  # its outcome is known (a failure is under watch now)

    def ended_well(self, att: Attempts) -> None:
        """A response ended well: clears the replica's failure count and the request's
        suspicion or quarantine (it is no query of death)."""
        assert att.replica is not None
        self.outliers.passed(att.replica)
        if self.quarantine.enabled and (self.quarantine.suspecting or self.fates.watching):
            self.quarantine.passed(att.digest)

    def finished(self, att: Attempts) -> None:
        """The request is over (refused, cancelled, answered): settle what is left."""
        att.failures.settle(self.outliers, False)
        self.attempt_ended(att)

    # ------------------------------------------------------------ attribution
    def _suspect(self, att: Attempts, kind: str) -> Watch | None:
        """Put the current attempt's failure under watch (once per attempt)."""
        replica = att.replica
        if replica is None or kind in NOT_SUSPECT:
            return None
        if att.suspect is not None:  # counted already (e.g. a 424 relayed after its wait)
            return self.fates.suspect(replica, att.pid, att.incarnation, att.suspect)
        answered = kind.startswith("status_") or kind == "generation_event"
        suspect = Suspect(
            att.digest, att.route, att.started, time.monotonic(), kind in TIMEOUTS, answered
        )
        att.suspect = suspect
        return self.fates.suspect(replica, att.pid, att.incarnation, suspect)

    async def _await_fate(self, watch: Watch) -> Fate | None:
        if watch.known:
            return watch.fate.result()
        self.metrics.retry_decisions.labels(decision="wait_for_fate").inc()
        try:
            async with asyncio.timeout(self.fate_wait_s):
                return await asyncio.shield(watch.fate)
        except TimeoutError:
            return None

    def _fate_known(self, watch: Watch, fate: Fate, suspects: list[Suspect]) -> None:
        """A watched process's fate: breaks for the requests that failed on it."""
        self.metrics.process_fates.labels(replica=watch.replica.name, fate=fate.value).inc()
        if fate is Fate.WEDGED:
            self._take_out(watch)
            if self.on_wedged is not None:
                self.on_wedged(watch.replica, watch.pid, watch.first_timed_out)
        if not fate.broke or not self.quarantine.enabled:
            return
        replica = watch.replica
        if watch.pid is not None and watch.pid == replica.stopping_pid:
            return
        for s in suspects:
            # Evidence specific to the request counts even if it was in flight together
            # with another of its breaks: the process failed it in words, alone (the only
            # request that failed there), then broke.
            specific = s.answered and len(watch.suspects) == 1 and watch.prime(s)
            verdict, entry = self.quarantine.record(
                s.digest, s.route, replica.name, watch.key, s.started, s.failed, specific
            )
            if verdict is Verdict.SUSPECT and entry.together:
                log.info(
                    "request %s: %d break(s) not counted (in flight together with another "
                    "break: a host-level event, not the request)",
                    entry.short,
                    entry.together,
                )

    def _take_out(self, watch: Watch) -> None:
        """A wedged process: no new traffic until ``/health`` answers again (the health
        checker re-admits it after ``health_rise`` passing checks)."""
        replica = watch.replica
        if replica.healthy and (watch.pid is None or replica.pid == watch.pid):
            replica.healthy = False
            replica.health_successes = 0
            log.warning(
                "%s: not answering /health after a request failed on it: no traffic until "
                "it answers again",
                replica.name,
            )
            self.registry.notify()
