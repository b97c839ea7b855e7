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
    assert watch.prime(-0.9) and not watch.prime(0.1)  # "e" failed first, alone


async def test_without_a_pid_the_incarnation_names_the_process() -> None:
    a = _replica("a", None)
    fates, seen = _fates(Registry([a]), Probe(ok=False))
    assert await fates.suspect(a, None, 3, _suspect("d")).fate is Fate.WEDGED
    assert seen[0][0] == "a/3"


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
