"""The bookkeeping under the retry rule: a watched process's fate (balancer/fate.py) and the
quarantine's "one after the other" count (balancer/quarantine.py). End to end with real
processes: tests/test_containment.py."""

from __future__ import annotations

import asyncio

from balancer.fate import Fate, Fates, Suspect, Watch
from balancer.quarantine import Quarantine, Verdict
from balancer.upstream import Registry, Replica, ReplicaState


def _replica(name: str, pid: int | None) -> Replica:
    r = Replica(name, f"http://{name}", state=ReplicaState.READY, healthy=True)
    r.pid = pid
    return r


class Probe:
    def __init__(self, ok: bool) -> None:
        self.ok = ok
        self.calls = 0

    async def __call__(self, replica: Replica) -> bool:
        self.calls += 1
        return self.ok


def _fates(registry: Registry, probe: Probe, window_s: float = 0.05) -> tuple[Fates, list]:
    seen: list[tuple[str, Fate, list[str]]] = []

    def on_fate(watch: Watch, fate: Fate, suspects: list[Suspect]) -> None:
        seen.append((watch.key, fate, [s.digest for s in suspects]))

    return Fates(registry, probe, window_s, on_fate), seen


def _suspect(digest: str, started: float = 0.0) -> Suspect:
    return Suspect(digest, "/generate", started, started + 0.1)


async def test_an_exit_within_the_window_concludes_without_a_probe() -> None:
    a = _replica("a", 10)
    registry = Registry([a])
    probe = Probe(ok=True)
    fates, seen = _fates(registry, probe, window_s=5)
    watch = fates.suspect(a, 10, a.incarnation, _suspect("d"))
    assert fates.watching and fates.unknown_for("d") == [watch]
    registry.process_exited(a, 10)
    assert await asyncio.wait_for(watch.fate, 1) is Fate.EXITED
    assert not fates.watching and probe.calls == 0
    assert seen == [("a/pid 10", Fate.EXITED, ["d"])]


async def test_alive_and_answering_survives_silent_is_wedged_on_purpose_is_stopped() -> None:
    a = _replica("a", 10)
    registry = Registry([a])
    fates, _ = _fates(registry, Probe(ok=True))
    assert await fates.suspect(a, 10, 1, _suspect("d")).fate is Fate.SURVIVED
    fates, _ = _fates(registry, Probe(ok=False))
    assert await fates.suspect(a, 10, 1, _suspect("d")).fate is Fate.WEDGED
    a.stopping_pid = 10  # the supervisor is stopping it: its silence is not the request's
    fates, _ = _fates(registry, Probe(ok=False))
    assert await fates.suspect(a, 10, 1, _suspect("d")).fate is Fate.STOPPED
    a.stopping_pid = None
    fates, _ = _fates(registry, Probe(ok=True))
    watch = fates.suspect(a, 10, 1, _suspect("d"))
    registry.process_exited(a, 11)  # another process of a: says nothing of this one
    await asyncio.sleep(0)
    assert not watch.known


async def test_an_answer_read_after_the_exit_was_seen_counts_at_once() -> None:
    """A slow client held the error back; the supervisor reaped the process first."""
    a = _replica("a", 10)
    registry = Registry([a])
    fates, seen = _fates(registry, Probe(ok=True))
    registry.process_exited(a, 10)
    watch = fates.suspect(a, 10, 1, _suspect("d"))
    assert watch.known and watch.fate.result() is Fate.EXITED and not fates.watching
    # Another request's failure on the concluded process joins it and is told alone.
    fates.suspect(a, 10, 1, _suspect("e", started=-1.0))
    assert seen[-1] == ("a/pid 10", Fate.EXITED, ["e"])
    d, e = watch.failures
    assert watch.prime(e) and not watch.prime(d)  # "e" failed first, alone


async def test_without_a_pid_the_incarnation_names_the_process() -> None:
    a = _replica("a", None)
    fates, seen = _fates(Registry([a]), Probe(ok=False))
    assert await fates.suspect(a, None, 3, _suspect("d")).fate is Fate.WEDGED
    assert seen[0][0] == "a/3"


async def test_the_prime_suspect_of_a_death_is_alone_and_of_a_hang_the_first_sent() -> None:
    a = _replica("a", 10)
    fates, _ = _fates(Registry([a]), Probe(ok=True))
    # A death: three requests cut within milliseconds: none is singled out.
    cut = [Suspect(d, "/generate", 0.0, 5.0 + i * 0.01) for i, d in enumerate("xyz")]
    for s in cut:
        watch = fates.suspect(a, 10, 1, s)
    assert not any(watch.prime(s) for s in cut)
    # A hang: the first sent times out first; those sent after it (even within
    # milliseconds) waited on a process it had hung.
    b = _replica("b", 20)
    fates, _ = _fates(Registry([b]), Probe(ok=True))
    hung = [
        Suspect(d, "/generate", i * 0.01, 3.0 + i * 0.01, timed_out=True)
        for i, d in enumerate("hvw")
    ]
    for s in hung:
        watch = fates.suspect(b, 20, 1, s)
    assert [watch.prime(s) for s in hung] == [True, False, False]
    assert watch.first_timed_out == 0.0


def test_breaks_add_up_only_one_after_the_other() -> None:
    q = Quarantine(after=2, ttl_s=60)
    # A host-level event: the same request in flight on a and b, both sent at 0, a's
    # failure at 1, b's at 1.05: together, they count once.
    assert q.record("d", "/generate", "a", "a/pid 1", started=0.0, failed=1.0)[0] is (
        Verdict.SUSPECT
    )
    verdict, entry = q.record("d", "/generate", "b", "b/pid 2", started=0.0, failed=1.05)
    assert verdict is Verdict.SUSPECT and entry.together == 1 and len(entry.broke) == 1
    # Sent after the counted failure (a resend, a retry): it followed the failure.
    verdict, entry = q.record("d", "/generate", "c", "c/pid 3", started=2.0, failed=2.5)
    assert verdict is Verdict.QUARANTINED and entry.replicas == ["a", "c"]


def test_an_operator_lifts_a_quarantine_by_its_shown_digest() -> None:
    q = Quarantine(after=1, ttl_s=60)
    digest = "0123456789abcdef" * 2
    q.record(digest, "/generate", "a", "a/pid 1")
    assert q.lift(digest[:6]) is None  # too short to be the digest shown
    assert q.lift("ffffffffffff") is None
    entry = q.lift(digest[:12])
    assert entry is not None and entry.digest == digest
    assert len(q) == 0 and q.lifted_total == 1 and q.held(digest) is None


def test_an_identical_request_served_before_the_fate_was_known_clears_the_break() -> None:
    """retries 0: the 502 goes out at once, an identical request is served in full, and
    only then is the exit seen: that break is no evidence (the request can be served)."""
    clock = _Clock()
    q = Quarantine(after=1, ttl_s=60, clock=clock)
    q.passed("d")  # at 1000.0
    verdict, _ = q.record("d", "/generate", "a", "a/pid 1", started=998.0, failed=999.0)
    assert verdict is Verdict.SUSPECT and q._suspects == {}
    clock.now += 5  # a break that failed after the success counts
    assert q.record("d", "/generate", "b", "b/pid 2")[0] is Verdict.QUARANTINED


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
