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

Behind real TGI a query of death is mostly *answered* before the process goes: when a shard
dies under a batch, the router answers every request of the batch with a generation error
(TGI v3.3.7 ``backends/v3/src/backend.rs`` ``prefill``/``decode``: ``Err(err) =>
send_errors(err, entries)``, each an ``InferError::GenerationError``: 424 ``error_type:
generation``, or an error event when streaming; ``router/src/server.rs`` ``impl
From<InferError>``), and only then does the launcher see ``Shard {rank} crashed`` and shut
the whole server down (``launcher/src/main.rs`` ``main``, on ``ShardStatus::Failed``). So a
generation failure is remembered as a *pending* break of its process (``pending``) and
becomes a break if that process is seen to exit, not stopped on purpose, within
``PENDING_WINDOW_S`` (``process_exited``); exits are remembered as long, so a failure read
after its process was seen to exit (a slow client held the event back) counts at once.
The request in flight is not stopped by this (its retries happen before the exit is seen);
what it stops is the resends that take the fleet down. Only a process the supervisor knows
by pid can be confirmed: in balance-only mode (no pid) nothing is recorded as pending, and a
generation failure never counts.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("neuron_fleet.quarantine")

MAX_ENTRIES = 4096
"""Suspects (and, separately, quarantined requests) remembered at most."""
PENDING_WINDOW_S = 30.0
"""Seconds after a generation failure within which its process must be seen to exit for the
failure to count as a break (TGI's launcher shuts down within seconds of a shard crash)."""
MAX_PENDING = 1024
"""Pending breaks remembered at most (a crash answers a whole batch: a few hundred)."""
MAX_EXITED = 64
"""Process exits remembered (for ``PENDING_WINDOW_S``) at most: a generation failure read
after its process was seen to exit (a slow client held the event back) still counts."""
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

    @property
    def short(self) -> str:
        return self.digest[:DIGEST_SHOWN]

    @property
    def replicas(self) -> list[str]:
        return list(dict.fromkeys(self.broke.values()))


@dataclass
class PendingBreak:
    """A generation failure answered by a process that may be about to exit (see above)."""

    digest: str
    route: str
    replica: str
    pid: int
    process: str
    """The process key ``record`` gets (as the relay's ``_broke`` builds it)."""
    at: float


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
        self._pending: deque[PendingBreak] = deque(maxlen=MAX_PENDING)
        self._exited: deque[tuple[str, int, bool, float]] = deque(maxlen=MAX_EXITED)
        """Recent exits: (replica, pid, on purpose, when), oldest first."""

    @property
    def enabled(self) -> bool:
        return self.after > 0

    @property
    def suspecting(self) -> bool:
        """A break is remembered: a request that ends well is worth a digest (``passed``).
        Expires first (a peek at the oldest entry): else one break long ago would cost every
        response served in full a digest of its body until the next break."""
        if not (self._suspects or self._held or self._pending):
            return False
        self._expire(self.clock())
        return bool(self._suspects or self._held or self._pending)

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

    def record(self, digest: str, route: str, replica: str, process: str) -> tuple[Verdict, Entry]:
        """The request ``digest`` broke ``replica``'s connection while ``process`` (a key
        unique to one process of it) was serving it."""
        now = self.clock()
        self._expire(now)
        if not self.enabled:
            return Verdict.SUSPECT, Entry(digest, route, now)
        held = self._held.get(digest)
        if held is not None:
            held.broke.setdefault(process, replica)
            return Verdict.ALREADY, held
        entry = self._suspects.pop(digest, None)
        if entry is None:
            entry = Entry(digest, route, now + self.ttl_s)
        entry.broke.setdefault(process, replica)
        entry.until = now + self.ttl_s
        if len(entry.broke) < self.after:
            self._suspects[digest] = entry  # most recent last
            _trim(self._suspects, self.max_entries)
            return Verdict.SUSPECT, entry
        self._held[digest] = entry
        _trim(self._held, self.max_entries)
        self.quarantined_total += 1
        log.warning(
            "quarantined request %s (%s) for %g s: it broke %d replica processes while they "
            "served it (%s); identical requests are refused with 422 until then",
            entry.short,
            route,
            self.ttl_s,
            len(entry.broke),
            ", ".join(entry.replicas),
        )
        return Verdict.QUARANTINED, entry

    def pending(
        self, digest: str, route: str, replica: str, pid: int, process: str
    ) -> tuple[Verdict, Entry] | None:
        """Process ``pid`` of ``replica`` answered the request ``digest`` with a generation
        failure: a break if that process exits within ``PENDING_WINDOW_S``. If it was seen
        to exit already (the answer was read late), what ``record`` made of it at once."""
        if not self.enabled:
            return None
        now = self.clock()
        self._expire(now)
        for name, exited_pid, on_purpose, at in self._exited:
            if name == replica and exited_pid == pid and at + PENDING_WINDOW_S > now:
                return None if on_purpose else self.record(digest, route, replica, process)
        self._pending.append(PendingBreak(digest, route, replica, pid, process, now))
        return None

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    def process_exited(
        self, replica: str, pid: int, on_purpose: bool
    ) -> list[tuple[Verdict, Entry]]:
        """Process ``pid`` of ``replica`` exited: its pending breaks become breaks (what
        ``record`` made of each), unless it was stopped on purpose (then they are dropped)."""
        if not self.enabled:
            return []
        now = self.clock()
        self._exited.append((replica, pid, on_purpose, now))
        if not self._pending:
            return []
        self._expire(now)
        mine, others = [], deque[PendingBreak](maxlen=MAX_PENDING)
        for p in self._pending:
            (mine if p.replica == replica and p.pid == pid else others).append(p)
        if not mine:
            return []
        self._pending = others
        if on_purpose:
            return []
        return [self.record(p.digest, p.route, p.replica, p.process) for p in mine]

    def passed(self, digest: str) -> None:
        """A request ``digest`` ended well: it is no query of death, whatever broke before."""
        self._suspects.pop(digest, None)
        if self._pending:
            self._pending = deque(
                (p for p in self._pending if p.digest != digest), maxlen=self._pending.maxlen
            )
        entry = self._held.pop(digest, None)
        if entry is not None:
            log.warning(
                "request %s (%s) released from quarantine: an identical request (sent before "
                "it began) was served in full, so the breaks were not its doing",
                entry.short,
                entry.route,
            )

    def entries(self) -> list[Entry]:
        """Quarantined now, oldest first."""
        self._expire(self.clock())
        return list(self._held.values())

    def __len__(self) -> int:
        self._expire(self.clock())
        return len(self._held)

    def _expire(self, now: float) -> None:
        pending = self._pending
        while pending and pending[0].at + PENDING_WINDOW_S <= now:
            pending.popleft()
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
