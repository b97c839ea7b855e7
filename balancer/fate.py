"""What became of a replica process after a request failed on it: did it break, or live on?

A failure that may be the request's own fault (an error answer or event, a cut, a timeout,
a stall) says nothing by itself: TGI answers a query of death with a 424 (or an error event)
*then* its process exits 50-200 ms later, when the launcher sees the shard crash (TGI v3.3.7
``backends/v3/src/backend.rs`` ``send_errors``, then ``launcher/src/main.rs`` on
``ShardStatus::Failed``); a request that wedges a replica gets no bytes and ``/health`` goes
silent too. So each failed attempt opens (or joins) a ``Watch`` on its process, which ends
with the process's ``Fate``:

- ``EXITED``: the supervisor saw it exit (``Registry.process_exited``), not on purpose;
- ``WEDGED``: it did not answer ``/health`` at the end of ``window_s`` (hung; or dead before
  the supervisor saw the exit; in balance-only mode, the only way a death is seen);
- ``STOPPED``: the supervisor stopped it on purpose (``Replica.stopping_pid``): nobody's fault;
- ``SURVIVED``: still the same process and answering ``/health`` after ``window_s``.

The watch keeps which requests (by digest) failed on the process while it was watched, so
the retry policy (balancer/retry.py) can tell a failure specific to one request from a
process that took many different requests down with it. One task per watched process, none
while nothing fails: the hot path never sees this module.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from balancer.upstream import Registry, Replica

log = logging.getLogger("neuron_fleet.fate")

MAX_WATCHES = 256
"""Concluded watches remembered (a failure read after its process's fate was known joins
the concluded watch at once), oldest dropped first."""
MAX_EXITS = 64
"""Exits remembered for a watch opened after the exit was seen (the answer read late)."""
TOGETHER_S = 0.25
"""Failures on one process this close together are one event (a death cuts every request
in flight within milliseconds; TGI answers a whole batch when a shard crashes)."""
EXIT_MEMORY_S = 30.0
"""How long a seen exit concludes a watch opened after it."""
LATE_EXIT_S = 10.0
"""How long after a process was found alive (``SURVIVED``) its exit still counts against
the requests that failed on it, for the quarantine only (the retry was decided): a poison
whose process dies later than ``window_s`` after answering (a slow shard teardown) would
otherwise kill every replica on every send, for ever."""


class Fate(enum.Enum):
    SURVIVED = "survived"
    EXITED = "exited"
    WEDGED = "wedged"
    STOPPED = "stopped"

    @property
    def broke(self) -> bool:
        """The process broke: it exited by itself or stopped answering."""
        return self is Fate.EXITED or self is Fate.WEDGED


@dataclass
class Suspect:
    """One request that failed on a watched process."""

    digest: str
    route: str
    started: float
    """When the failed attempt was sent (time.monotonic())."""
    failed: float
    """When it failed (the error read, the cut, the timeout)."""
    timed_out: bool = False
    """It got no answer within its first-byte or response timeout."""
    answered: bool = False
    """The replica failed it in words (an error status or a generation error event), not by
    a cut or silence: what TGI does to a query of death before its shard exits."""


@dataclass(eq=False)
class Watch:
    """One replica process under watch after a failure, until its fate is known."""

    replica: Replica
    pid: int | None
    key: str
    """The process, for the quarantine: ``name/pid N``, or ``name/incarnation`` without a pid."""
    opened: float
    fate: asyncio.Future[Fate]
    suspects: dict[str, Suspect] = field(default_factory=dict)
    """Requests that failed on it while watched, by digest (the first failure of each)."""
    probing: bool = False
    """A task waits for its fate (counted in ``Fates.watching``)."""

    @property
    def known(self) -> bool:
        return self.fate.done()

    failures: list[Suspect] = field(default_factory=list)
    """Every attempt that failed on it (identical requests included), in order."""
    last_joined: float = 0.0
    """When the last failure joined it (each gets a whole window)."""
    concluded: float = 0.0
    """When its fate was known (time.monotonic())."""
    let_out: set[str] = field(default_factory=set)
    """Digests of which one more attempt went to another replica while this fate was
    unknown (balancer/retry.py ``before_attempt``): no second one."""

    def prime(self, suspect: Suspect) -> bool:
        """Whether ``suspect`` is the prime suspect of the process breaking: the request
        whose failure no other explains.

        - A request that got no answer in time (``timed_out``) is prime if no other that
          failed there was sent to it earlier: the first to wait in vain is the one that
          hung the process, the ones sent after it waited on a process already hung; but
          if streams it was serving before stalled too, the process froze under them all
          (a SIGSTOP, a host-level stall, or this request: nothing tells which).
        - Any other failure (an error answer, a cut) is prime if it was the first to fail
          there and alone, no other within ``TOGETHER_S``: a process that dies, or crashes
          a batch, fails every request in flight at once, and then none is singled out.
        """
        if suspect.timed_out:
            return all(s.started >= suspect.started for s in self.failures)
        first = min(s.failed for s in self.failures)
        if suspect.failed != first:
            return False
        return sum(1 for s in self.failures if s.failed - first <= TOGETHER_S) <= 1

    @property
    def first_timed_out(self) -> float:
        """When the earliest request that timed out there was sent (inf: none did)."""
        return min((s.started for s in self.failures if s.timed_out), default=float("inf"))


Prober = Callable[[Replica], Awaitable[bool]]
"""Answers whether a replica's ``/health`` says 200 now (balancer/health.py ``probe``)."""


class Fates:
    """Open watches on replica processes; ``on_fate(watch, fate, suspects)`` is told each
    fate once it is known, with the suspects to attribute it to (all of them; or one that
    failed on the process after its fate was known)."""

    def __init__(
        self,
        registry: Registry,
        probe: Prober,
        window_s: float,
        on_fate: Callable[[Watch, Fate, list[Suspect]], None],
    ) -> None:
        self.registry = registry
        self.probe = probe
        self.window_s = window_s
        self.on_fate = on_fate
        self._watches: OrderedDict[str, Watch] = OrderedDict()
        self._open = 0
        """Watches whose fate is not known yet."""
        self._exits: deque[tuple[str, int, bool, float]] = deque(maxlen=MAX_EXITS)
        self._tasks: set[asyncio.Task[None]] = set()
        registry.on_process_exit(self._exited)

    @property
    def watching(self) -> bool:
        """Some process's fate is unknown (one attribute test, for the arrival path)."""
        return self._open > 0

    def unknown_for(self, digest: str) -> list[Watch]:
        """Open watches on processes that ``digest`` failed on."""
        return [w for w in self._watches.values() if not w.known and digest in w.suspects]

    def suspect(
        self, replica: Replica, pid: int | None, incarnation: int, suspect: Suspect
    ) -> Watch:
        """``suspect`` failed on this process: open its watch (or join the open or concluded
        one) and return it."""
        key = process_key(replica, pid, incarnation)
        watch = self._watches.get(key)
        if (
            watch is not None
            and watch.known
            and watch.fate.result() is Fate.SURVIVED
            and suspect.started > watch.concluded
        ):
            # Found alive before this attempt was even sent: that says nothing of what
            # this request does to it (a query of death on a process that once survived
            # another request's failure must not be passed on at once). A new watch.
            del self._watches[key]
            watch = None
        if watch is None:
            loop = asyncio.get_running_loop()
            watch = Watch(replica, pid, key, time.monotonic(), loop.create_future())
            self._watches[key] = watch
            while len(self._watches) > MAX_WATCHES:
                oldest = next(iter(self._watches.values()))
                if not oldest.known:
                    break
                self._watches.popitem(last=False)
            watch.suspects[suspect.digest] = suspect
            watch.failures.append(suspect)
            watch.last_joined = time.monotonic()
            seen = self._seen_exit(replica, pid)
            if seen is not None:
                self._conclude(watch, Fate.STOPPED if seen else Fate.EXITED)
            else:
                self._open += 1
                watch.probing = True
                task = asyncio.get_running_loop().create_task(self._watch(watch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return watch
        if any(s is suspect for s in watch.failures):
            return watch  # the same failure, told again
        first = suspect.digest not in watch.suspects
        watch.suspects.setdefault(suspect.digest, suspect)
        watch.failures.append(suspect)
        watch.last_joined = time.monotonic()
        if watch.known and first:
            # Read after the fate was known (a slow client held the error back): it counts
            # as if it had been there (the quarantine records each process once).
            self.on_fate(watch, watch.fate.result(), [suspect])
        return watch

    async def _watch(self, watch: Watch) -> None:
        # Every failure gets a whole window: one that joined late (another request's
        # failure opened the watch) must not be found alive a moment before its exit.
        while (left := watch.last_joined + self.window_s - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(asyncio.shield(watch.fate), left)
                return  # an exit notice concluded it
            except TimeoutError:
                pass
        replica = watch.replica
        ok = await self.probe(replica)
        if watch.known:
            return
        if watch.pid is not None and replica.pid != watch.pid:
            fate = Fate.STOPPED if replica.stopping_pid == watch.pid else Fate.EXITED
        elif ok:
            fate = Fate.SURVIVED
        elif watch.pid is not None and replica.stopping_pid == watch.pid:
            fate = Fate.STOPPED
        else:
            fate = Fate.WEDGED
        self._conclude(watch, fate)

    def _exited(self, replica: Replica, pid: int) -> None:
        on_purpose = pid == replica.stopping_pid
        self._exits.append((replica.name, pid, on_purpose, time.monotonic()))
        watch = self._watches.get(process_key(replica, pid, 0))
        if watch is None:
            return
        if not watch.known:
            self._conclude(watch, Fate.STOPPED if on_purpose else Fate.EXITED)
        elif (
            not on_purpose
            and watch.fate.result() is Fate.SURVIVED
            and time.monotonic() - watch.concluded <= LATE_EXIT_S
            and len(watch.suspects) == 1  # else nothing says which of them, if any
        ):
            log.warning(
                "%s exited %.1f s after it was found alive: counted against the %d "
                "request(s) that failed on it",
                watch.key,
                time.monotonic() - watch.concluded,
                len(watch.suspects),
            )
            watch.concluded = float("-inf")  # once
            try:
                self.on_fate(watch, Fate.EXITED, list(watch.suspects.values()))
            except Exception:
                log.exception("attributing the late exit of %s failed", watch.key)

    def _seen_exit(self, replica: Replica, pid: int | None) -> bool | None:
        """Whether ``pid`` was seen to exit lately: None if not, else whether on purpose."""
        if pid is None:
            return None
        now = time.monotonic()
        for name, exited, on_purpose, at in reversed(self._exits):
            if name == replica.name and exited == pid and now - at < EXIT_MEMORY_S:
                return on_purpose
        return None

    def _conclude(self, watch: Watch, fate: Fate) -> None:
        if watch.known:
            return
        if watch.probing:
            watch.probing = False
            self._open -= 1
        watch.fate.set_result(fate)
        watch.concluded = time.monotonic()
        level = logging.WARNING if fate.broke else logging.INFO
        log.log(
            level,
            "%s %s after %d request(s) failed on it: %s",
            watch.key,
            fate.value,
            len(watch.suspects),
            ", ".join(s[:12] for s in watch.suspects),
        )
        try:
            self.on_fate(watch, fate, list(watch.suspects.values()))
        except Exception:
            log.exception("attributing the fate of %s failed", watch.key)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def process_key(replica: Replica, pid: int | None, incarnation: int) -> str:
    """One replica process: its pid when the supervisor knows it (a drain and undrain, or a
    health flap, starts a new incarnation of the same process); else (balance-only mode)
    the incarnation is the best guess at a restart."""
    return f"{replica.name}/pid {pid}" if pid is not None else f"{replica.name}/{incarnation}"
