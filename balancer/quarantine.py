"""Quarantine of poison requests ("queries of death"): refuse a request that keeps killing
the replica processes serving it.

Why: on Neuron some prompts crash the replica process (runtime errors on some shapes). A
retry never goes back to a process the request killed (balancer/upstream.py
``EVERY_INCARNATION``), but the request still kills one process per replica, and a client
that resends it (a user's "retry", or an SDK's own retries on 5xx) kills them all again;
each restart takes minutes and five exits in ten minutes mark a replica FAILED. So, as
Envoy and Google SRE advise for a query of death, the balancer remembers which requests
broke a replica's connection while it was serving them (the process died or cut the
response: not a timeout, not a client leaving, not an answered failure unless its process
then exits: see below) and, once one has broken ``after`` distinct replica processes,
refuses identical requests for ``ttl_s`` before any replica sees them.

A death breaks every request its process was serving, so a popular request (a benchmark's,
a canary's) is a suspect after any crash. What sets a query of death apart is that it never
completes: an identical request that ends well clears the suspicion (and lifts a
quarantine), so unrelated crashes do not add up against a request that is served between
them.

Requests are known by a digest of method, path and body bytes (never the prompt itself:
it may hold user data), computed only when a break is recorded, on arrival while something
is quarantined, and for a response served in full while a break is remembered (``ttl_s``
after the last one), so the hot path pays nothing otherwise. Memory is bounded: at most
``max_entries`` suspects and as many quarantined requests, oldest dropped first; a
suspect's breaks are forgotten ``ttl_s`` after the last one.

What counts as a break, and when, is the retry policy's call (balancer/retry.py): a process
that exited or stopped answering ``/health`` after the request failed on it
(balancer/fate.py), also when the exit is seen after the answer went out. Breaks must be
*sequential* to add up: one counts towards ``after`` only if its attempt was sent after the
failure of the last counted one. A request sent after a failure followed the failure around;
a popular request that was in flight on every replica when a host-level event (an OOM
killer, a driver reset) took them all down together did not, and is not quarantined however
many processes died under it.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("neuron_fleet.quarantine")

MAX_ENTRIES = 4096
"""Suspects (and, separately, quarantined requests) remembered at most."""
DIGEST_SHOWN = 12
"""Hex digits of the digest shown in logs, errors and status."""


def request_digest(method: str, path_qs: str, body: bytes) -> str:
    """What identifies a request: its method, path (with query) and exact body bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{method} {path_qs}\n".encode("utf-8", "surrogateescape"))
    h.update(body)
    return h.hexdigest()


class Verdict(enum.Enum):
    """What a recorded break did."""

    SUSPECT = "suspect"
    """Remembered; not (yet) enough distinct processes."""
    QUARANTINED = "quarantined"
    """This break put the request in quarantine (logged and counted once, here)."""
    ALREADY = "already"
    """The request was in quarantine already (an identical one was in flight)."""


@dataclass
class Entry:
    """One request the replicas had trouble with (no prompt text: only its digest)."""

    digest: str
    route: str
    until: float
    """Clock time the entry is forgotten (the quarantine, or the suspicion, ends)."""
    broke: dict[str, str] = field(default_factory=dict)
    """Replica processes it broke (process key -> replica name), in order."""
    refused: int = 0
    """Identical requests refused while quarantined."""
    last_failed: float = float("-inf")
    """When the last counted break's attempt failed: a later break counts only if its
    attempt was sent after this (it followed the failure; see the module's docstring)."""
    together: int = 0
    """Breaks not counted: their attempts were in flight together with a counted one."""

    @property
    def short(self) -> str:
        return self.digest[:DIGEST_SHOWN]

    @property
    def replicas(self) -> list[str]:
        return list(dict.fromkeys(self.broke.values()))


class Quarantine:
    """Suspects and quarantined requests, by digest. ``after`` = 0 disables it."""

    def __init__(
        self,
        after: int,
        ttl_s: float,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.after = after
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.clock = clock
        self._suspects: OrderedDict[str, Entry] = OrderedDict()
        self._held: OrderedDict[str, Entry] = OrderedDict()
        """Quarantined, oldest first (a fixed TTL: also soonest to expire first)."""
        self.quarantined_total = 0
        self.lifted_total = 0
        self._passed: OrderedDict[str, float] = OrderedDict()
        """Digests served in full lately -> when: a break that failed before it, recorded
        only once its process's fate was known, is no evidence either."""

    @property
    def enabled(self) -> bool:
        return self.after > 0

    @property
    def suspecting(self) -> bool:
        """A break is remembered: a request that ends well is worth a digest (``passed``).
        Expires first (a peek at the oldest entry): else one break long ago would cost every
        response served in full a digest of its body until the next break."""
        if not (self._suspects or self._held):
            return False
        self._expire(self.clock())
        return bool(self._suspects or self._held)

    @property
    def holding(self) -> bool:
        """Something is (or was until lately) quarantined: only then is a request's digest
        worth computing on arrival. One attribute test on the hot path."""
        return bool(self._held)

    def held(self, digest: str) -> Entry | None:
        """The quarantine entry for ``digest`` if it is quarantined now (counts a refusal)."""
        self._expire(self.clock())
        entry = self._held.get(digest)
        if entry is not None:
            entry.refused += 1
        return entry

    def peek(self, digest: str) -> Entry | None:
        """Like ``held`` without counting a refusal (a retry about to be stopped)."""
        self._expire(self.clock())
        return self._held.get(digest)

    def record(
        self,
        digest: str,
        route: str,
        replica: str,
        process: str,
        started: float = float("inf"),
        failed: float | None = None,
        specific: bool = False,
    ) -> tuple[Verdict, Entry]:
        """The request ``digest`` broke ``process`` (a key unique to one process of
        ``replica``): its attempt was sent at ``started`` and failed at ``failed`` (the
        clock's time). Counted only if sent after the last counted break's failure (the
        defaults: always; failed now), or if the break is ``specific`` to the request (the
        process answered it alone with a failure, then broke: balancer/retry.py)."""
        now = self.clock()
        if failed is None:
            failed = now
        self._expire(now)
        if not self.enabled:
            return Verdict.SUSPECT, Entry(digest, route, now)
        held = self._held.get(digest)
        if held is not None:
            held.broke.setdefault(process, replica)
            return Verdict.ALREADY, held
        served = self._passed.get(digest)
        if served is not None and served >= failed:
            return Verdict.SUSPECT, Entry(digest, route, now)  # served in full since
        entry = self._suspects.pop(digest, None)
        if entry is None:
            entry = Entry(digest, route, now + self.ttl_s)
        if process not in entry.broke:
            if specific or started >= entry.last_failed:
                entry.broke[process] = replica
                entry.last_failed = max(entry.last_failed, failed)
            else:
                entry.together += 1
        entry.until = now + self.ttl_s
        if len(entry.broke) < self.after:
            self._suspects[digest] = entry  # most recent last
            _trim(self._suspects, self.max_entries)
            return Verdict.SUSPECT, entry
        self._held[digest] = entry
        _trim(self._held, self.max_entries)
        self.quarantined_total += 1
        log.warning(
            "quarantined request %s (%s) for %g s: it broke %d replica processes one after "
            "the other (%s); identical requests are refused with 422 until then",
            entry.short,
            route,
            self.ttl_s,
            len(entry.broke),
            ", ".join(entry.replicas),
        )
        return Verdict.QUARANTINED, entry

    def passed(self, digest: str) -> None:
        """A request ``digest`` ended well: it is no query of death, whatever broke before
        (also a break recorded later, once its process's fate is known)."""
        self._passed[digest] = self.clock()
        self._passed.move_to_end(digest)
        while len(self._passed) > self.max_entries:
            self._passed.popitem(last=False)
        self._suspects.pop(digest, None)
        entry = self._held.pop(digest, None)
        if entry is not None:
            self.lifted_total += 1
            log.warning(
                "request %s (%s) released from quarantine: an identical request (sent before "
                "it began) was served in full, so the breaks were not its doing",
                entry.short,
                entry.route,
            )

    def lift(self, digest: str) -> Entry | None:
        """An operator lifts the quarantine of the request whose digest starts with
        ``digest`` (at least ``DIGEST_SHOWN`` hex digits, as shown): the entry lifted, or None
        (none, or more than one, match)."""
        if len(digest) < DIGEST_SHOWN:
            return None
        self._expire(self.clock())
        found = [d for d in self._held if d.startswith(digest.lower())]
        if len(found) != 1:
            return None
        entry = self._held.pop(found[0])
        self._suspects.pop(found[0], None)
        self.lifted_total += 1
        log.warning(
            "request %s (%s) released from quarantine by an operator", entry.short, entry.route
        )
        return entry

    def entries(self) -> list[Entry]:
        """Quarantined now, oldest first."""
        self._expire(self.clock())
        return list(self._held.values())

    def __len__(self) -> int:
        self._expire(self.clock())
        return len(self._held)

    def _expire(self, now: float) -> None:
        for table in (self._held, self._suspects):
            while table:
                digest, entry = next(iter(table.items()))
                if entry.until > now:
                    break
                del table[digest]
                if table is self._held:
                    log.info("request %s is out of quarantine", entry.short)


def _trim(table: OrderedDict[str, Entry], limit: int) -> None:
    while len(table) > limit:
        table.popitem(last=False)
