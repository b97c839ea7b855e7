"""One replica's lifecycle: start, wait until healthy, restart with backoff, stop.

A ``ReplicaProcess`` owns one child process and one supervising task. The task is the only
code that spawns or stops the process; callers (the fleet, the admin API, signals) only post
a command (``restart`` / ``stop``) and wait for its effect. That keeps the state machine in
one place::

    STARTING --/health 200--> READY (or DRAINING if an operator drained it)
    STARTING/READY --process exits--> STARTING --backoff--> spawn again
    READY + unhealthy for too long --> stop --> STARTING --> spawn again
    N exits within the crash-loop window --> FAILED (no more restarts; restart() revives it)
    stop() --> STOPPED

Replica facts (state, pid, started_at, restarts, last_exit, start_duration_s, failed_reason)
are written to the shared ``Replica`` so the balancer's routing, /fleet/status and metrics
always see the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import shlex
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import aiohttp

from balancer.upstream import Registry, Replica, ReplicaState
from supervisor.launchers import LaunchSpec
from supervisor.procutil import (
    child_env,
    describe_returncode,
    die_with_parent_preexec,
    signal_group,
)

log = logging.getLogger("neuron_fleet.replica")
output_log = logging.getLogger("neuron_fleet.replica.output")
"""Replica stdout/stderr, one record per line, ``[replica-0] ...``."""

LINE_LIMIT = 1 << 20
"""Longest replica output line kept (longer ones are dropped with a note)."""


@dataclass(frozen=True)
class LifecycleSettings:
    """Timings of one replica's lifecycle (the ``[fleet]`` part of the config)."""

    startup_timeout_s: float = 1800.0
    """Loading + warming a model on Neuron takes minutes; past this the start counts as failed."""
    stop_grace_s: float = 30.0
    """Between the stop request (SIGTERM / stop command) and SIGKILL."""
    health_poll_interval_s: float = 0.5
    health_timeout_s: float = 2.0
    restart_backoff_initial_s: float = 1.0
    restart_backoff_max_s: float = 60.0
    crash_loop_max_exits: int = 5
    crash_loop_window_s: float = 600.0
    unhealthy_restart_after_s: float | None = 300.0
    """Restart a READY replica the balancer has seen unhealthy this long; None/0: never."""
    output_tail_lines: int = 20
    """Last output lines kept to explain a failure."""

    @classmethod
    def from_fleet(cls, fleet: Any) -> LifecycleSettings:
        """Take every field that the fleet config section defines (others keep defaults)."""
        values = {}
        for name in cls.__dataclass_fields__:
            value = getattr(fleet, name, None)
            if value is not None:
                values[name] = value
        return cls(**values)


def backoff_delay(failures: int, initial: float, maximum: float, rng: random.Random) -> float:
    """Exponential backoff with "equal jitter": half fixed, half random.

    The jitter keeps replicas that crashed together (a shared cause) from restarting in
    lockstep; the fixed half keeps the delay from collapsing to zero.
    """
    base = min(maximum, initial * 2 ** max(0, failures - 1))
    return base / 2 + rng.uniform(0, base / 2)


class ReplicaStartError(RuntimeError):
    """The replica did not become ready (it failed, or was stopped meanwhile)."""

    http_status = 503  # the admin API answers "unavailable"


class _Command(enum.Enum):
    RESTART = "restart"
    STOP = "stop"


class _Outcome(enum.Enum):
    READY = "ready"
    EXITED = "exited"
    TIMEOUT = "startup timeout"
    UNHEALTHY = "failing health checks"
    CANNOT_SPAWN = "cannot spawn"
    RESTART = "restart"
    STOP = "stop"


class ReplicaProcess:
    """Keeps one replica process running; see the module docstring for the state machine."""

    def __init__(
        self,
        replica: Replica,
        spec: LaunchSpec,
        registry: Registry,
        settings: LifecycleSettings | None = None,
        *,
        http: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.replica = replica
        self.spec = spec
        self.registry = registry
        self.settings = settings or LifecycleSettings()
        self.drained = False
        """Operator intent: keep this replica out of rotation (DRAINING) whenever it is up."""
        self._http = http
        self._own_http = http is None
        self._rng = rng or random.Random()
        self._proc: asyncio.subprocess.Process | None = None
        self._wedged = False
        """The running process is being stopped for failing health checks (not on purpose)."""
        self._helpers: list[asyncio.Task[None]] = []
        self._task: asyncio.Task[None] | None = None
        self._command: _Command | None = None
        self._stop_grace: float | None = None
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._failures: deque[float] = deque()
        self._tail: deque[str] = deque(maxlen=max(1, self.settings.output_tail_lines))
        self._spawns = 0
        self._ready_spawn = 0

    # -- public API ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.replica.name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def is_running(self) -> bool:
        """A process exists and has not exited."""
        return self._proc is not None and self._proc.returncode is None

    @property
    def is_supervising(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def spawns(self) -> int:
        """Processes started so far (the first start included)."""
        return self._spawns

    def use_session(self, session: aiohttp.ClientSession) -> None:
        """Probe /health through a shared client session (closed by its owner, not us)."""
        self._http = session
        self._own_http = False

    async def start(self) -> None:
        """Begin supervising: the process is spawned by the supervising task right away.

        On a FAILED or STOPPED replica this starts afresh: the crash history is forgotten.
        """
        if self.is_supervising:
            return
        if self._http is None:
            self._http = aiohttp.ClientSession()
        self._command = None
        self._stop_grace = None
        self._failures.clear()
        self.replica.failed_reason = None
        self.registry.set_state(self.replica, ReplicaState.STARTING)
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    async def wait_ready(self, *, after_spawn: int = 0) -> bool:
        """Wait until a process started after spawn number ``after_spawn`` is ready.

        False when supervision ended first (FAILED / STOPPED); bound it with asyncio.timeout.
        """
        while True:
            if self._ready_spawn > after_spawn and self.is_running:
                return True
            if not self.is_supervising:
                return False
            await self._changed.wait()

    async def restart(self) -> None:
        """Stop the process, start a fresh one and return once it is ready.

        Also revives a FAILED or STOPPED replica. Raises ReplicaStartError when it does not
        come back (crash loop, spawn error, or stopped meanwhile).
        """
        marker = self._spawns
        if self.is_supervising:
            self._post(_Command.RESTART)
        else:
            await self.start()
        if not await self.wait_ready(after_spawn=marker):
            r = self.replica
            why = r.failed_reason or f"state {r.state.value}"
            raise ReplicaStartError(f"{r.name} did not become ready again: {why}")

    async def stop(self, grace: float | None = None) -> None:
        """Stop the process (stop command or SIGTERM, then SIGKILL after ``grace``) for good.

        ``grace=0`` kills at once. Safe to call repeatedly and concurrently.
        """
        if grace is not None:
            self._stop_grace = grace if self._stop_grace is None else min(grace, self._stop_grace)
        task = self._task
        if task is not None and not task.done():
            self._post(_Command.STOP)
            await asyncio.shield(task)
        elif self.replica.state is not ReplicaState.FAILED:
            self.registry.set_state(self.replica, ReplicaState.STOPPED)
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None

    def kill_now(self) -> None:
        """Stop for good and SIGKILL the process group right away (a second Ctrl-C)."""
        self._stop_grace = 0
        self._post(_Command.STOP)
        if self._proc is not None and self._proc.returncode is None:
            signal_group(self._proc.pid, signal.SIGKILL)

    def last_output(self) -> list[str]:
        """The last lines the current (or last) process printed, oldest first."""
        return list(self._tail)

    # -- the supervising task -----------------------------------------------------------------

    def _post(self, command: _Command) -> None:
        if self._command is not _Command.STOP:
            self._command = command
        self._wake.set()

    def _take_command(self) -> _Command | None:
        command, self._command = self._command, None
        return command

    def _signal_changed(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake early for a command or the process exiting."""
        if seconds > 0 and not self._wake.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._wake.wait()
        self._wake.clear()

    async def _sleep_unless_command(self, seconds: float) -> bool:
        """Sleep ``seconds``; True if a command cut the sleep short."""
        deadline = time.monotonic() + seconds
        while self._command is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await self._pause(remaining)  # may wake early for a stale exit notice
        return True

    async def _supervise(self) -> None:
        try:
            while True:
                outcome = await self._run_once()
                if outcome is _Outcome.STOP:
                    return
                if outcome is _Outcome.CANNOT_SPAWN:
                    return
                if outcome is not _Outcome.RESTART:
                    if not self._count_failure():
                        return
                    s = self.settings
                    delay = backoff_delay(
                        len(self._failures),
                        s.restart_backoff_initial_s,
                        s.restart_backoff_max_s,
                        self._rng,
                    )
                    log.info("%s: restarting in %.1f s", self.name, delay)
                    if await self._sleep_unless_command(delay):
                        if self._take_command() is _Command.STOP:
                            return
                self.replica.restarts += 1
        finally:
            # Also on cancellation: a replica must never outlive its supervisor.
            await self._kill_and_reap()
            if self.replica.state is not ReplicaState.FAILED:
                self.replica.healthy = False
                self.registry.set_state(self.replica, ReplicaState.STOPPED)
            self._signal_changed()

    async def _run_once(self) -> _Outcome:
        r = self.replica
        r.healthy = False
        if r.state is not ReplicaState.STARTING:
            self.registry.set_state(r, ReplicaState.STARTING)
        if self._command is _Command.STOP:
            return _Outcome.STOP
        self._command = None  # a restart asked for before this spawn is this spawn
        argv0 = self.spec.argv[0] if self.spec.argv else "?"
        try:
            await self._spawn()
        except (FileNotFoundError, PermissionError, NotADirectoryError) as exc:
            self._fail(f"cannot start {argv0!r}: {exc}")  # retrying will not help
            return _Outcome.CANNOT_SPAWN
        except OSError as exc:  # EAGAIN, ENOMEM...: the host may recover
            r.last_exit = f"spawn error: {exc.strerror or exc}"
            log.warning("%s: cannot start %r: %s", r.name, argv0, exc)
            return _Outcome.EXITED
        spawned_at = time.monotonic()

        outcome = await self._until_ready(spawned_at)
        if outcome is _Outcome.READY:
            r.start_duration_s = round(time.monotonic() - spawned_at, 3)
            r.healthy = True
            # A new process: what the outlier detector held against the old one is gone.
            r.ejected = False
            r.consecutive_failures = 0
            self._ready_spawn = self._spawns
            state = ReplicaState.DRAINING if self.drained else ReplicaState.READY
            self.registry.set_state(r, state)
            log.info("%s: ready in %.1f s (pid %s)", r.name, r.start_duration_s, r.pid)
            self._signal_changed()
            outcome = await self._while_up()

        if outcome is _Outcome.EXITED:
            r.healthy = False
            self.registry.set_state(r, ReplicaState.STARTING)
            await self._kill_and_reap()
            last = f"; last output: {self._tail[-1]}" if self._tail else ""
            log.warning("%s: exited unexpectedly (%s)%s", r.name, r.last_exit, last)
            return outcome
        if outcome in (_Outcome.TIMEOUT, _Outcome.UNHEALTHY):
            r.healthy = False
            self.registry.set_state(r, ReplicaState.STARTING)
            # A wedge, not a stop on purpose: the requests that failed on it before may
            # have wedged it (balancer/retry.py counts it as a break).
            self._wedged = outcome is _Outcome.UNHEALTHY
        elif r.state is ReplicaState.READY:
            # stop / restart: no new traffic while the process winds down.
            self.registry.set_state(r, ReplicaState.DRAINING)
        await self._terminate()
        why = "" if outcome is _Outcome.STOP else f" for {outcome.value}"
        log.info("%s: stopped%s (%s)", r.name, why, r.last_exit)
        return outcome

    async def _spawn(self) -> None:
        spec = self.spec
        self._spawns += 1
        self._tail.clear()
        if spec.cleanup_argv:
            await self._run_cleanup_command()
        shown = spec.display or shlex.join(spec.argv)  # secrets live in spec.env, never argv
        log.info("%s: starting (spawn %d): %s", self.name, self._spawns, shown)
        # Forked from the event-loop thread, which lives as long as we do: PR_SET_PDEATHSIG
        # fires when the forking *thread* exits (see procutil).
        proc = await asyncio.create_subprocess_exec(
            *spec.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_env(spec.env),
            start_new_session=True,
            preexec_fn=die_with_parent_preexec(),
            limit=LINE_LIMIT,
        )
        self._proc = proc
        self.replica.pid = proc.pid
        self.replica.started_at = time.monotonic()
        assert proc.stdout is not None and proc.stderr is not None
        self._helpers = [
            asyncio.create_task(self._forward(proc.stdout)),
            asyncio.create_task(self._forward(proc.stderr)),
            asyncio.create_task(self._watch_exit(proc)),
        ]

    async def _forward(self, stream: asyncio.StreamReader) -> None:
        prefix = f"[{self.name}]"
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # longer than LINE_LIMIT: the reader dropped it
                output_log.info("%s <output line longer than %d bytes dropped>", prefix, LINE_LIMIT)
                continue
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            self._tail.append(text)
            output_log.info("%s %s", prefix, text)

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        # Poll returncode rather than await proc.wait(): with the stdlib loop, wait() also
        # waits for the pipes to close, which a surviving grandchild can delay forever.
        while proc.returncode is None:  # noqa: ASYNC110 (no event to wait on, see above)
            await asyncio.sleep(0.1)
        self._wake.set()

    def _exited(self) -> bool:
        return self._proc is None or self._proc.returncode is not None

    async def _probe(self) -> bool:
        assert self._http is not None
        timeout = aiohttp.ClientTimeout(total=self.settings.health_timeout_s)
        try:
            async with self._http.get(f"{self.replica.url}/health", timeout=timeout) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _until_ready(self, spawned_at: float) -> _Outcome:
        s = self.settings
        deadline = spawned_at + s.startup_timeout_s
        while True:
            command = self._take_command()
            if command is not None:  # first: a process killed on purpose is no crash
                return _Outcome(command.value)
            if self._exited():
                return _Outcome.EXITED
            if await self._probe() and not self._exited():
                return _Outcome.READY
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.error(
                    "%s: no healthy answer on %s/health %.0f s after start; stopping it "
                    "(raise fleet.startup_timeout_s if the model just loads slowly)",
                    self.name,
                    self.replica.url,
                    s.startup_timeout_s,
                )
                return _Outcome.TIMEOUT
            await self._pause(min(s.health_poll_interval_s, remaining))

    async def _while_up(self) -> _Outcome:
        after = self.settings.unhealthy_restart_after_s
        unhealthy_since: float | None = None
        while True:
            command = self._take_command()
            if command is not None:  # first: a process killed on purpose is no crash
                return _Outcome(command.value)
            if self._exited():
                return _Outcome.EXITED
            r = self.replica
            if after and r.state is ReplicaState.READY and not r.healthy:
                now = time.monotonic()
                if unhealthy_since is None:
                    unhealthy_since = now
                elif now - unhealthy_since >= after:
                    log.warning(
                        "%s: failing health checks for %.0f s; restarting it", r.name, after
                    )
                    return _Outcome.UNHEALTHY
            else:
                unhealthy_since = None
            await self._pause(self.settings.health_poll_interval_s)

    async def _wait_exit(self, seconds: float) -> bool:
        proc = self._proc
        deadline = time.monotonic() + seconds
        while proc is not None and proc.returncode is None:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _terminate(self) -> None:
        """Graceful stop: stop command or SIGTERM to the group, then SIGKILL after the grace."""
        proc = self._proc
        if proc is None:
            return
        grace = self.settings.stop_grace_s if self._stop_grace is None else self._stop_grace
        stopper: asyncio.Task[None] | None = None
        self._stopping_on_purpose(proc)
        if proc.returncode is None and grace > 0:
            if self.spec.stop_argv:
                stopper = asyncio.create_task(self._run_stop_command(grace))
                # The stop command applies its own grace (docker stop -t N) then kills.
                exited = await self._wait_exit(grace + 10)
            else:
                signal_group(proc.pid, signal.SIGTERM)
                exited = await self._wait_exit(grace)
            if not exited:
                log.warning(
                    "%s: still running %.0f s after the stop request; sending SIGKILL",
                    self.name,
                    grace,
                )
        await self._kill_and_reap()
        if stopper is not None:
            try:
                async with asyncio.timeout(5):
                    await stopper
            except TimeoutError:
                log.warning("%s: the stop command did not finish", self.name)

    def _stopping_on_purpose(self, proc: asyncio.subprocess.Process) -> None:
        """Mark a live process as stopped by us before signalling it, so the balancer does
        not hold the requests it was serving responsible (a crash is not marked: it has
        exited before we get here; nor a wedge: stopped for failing health checks)."""
        if proc.returncode is None and not self._wedged:
            self.replica.stopping_pid = proc.pid

    async def _run_cleanup_command(self) -> None:
        """Remove what a crashed earlier run left (``docker rm -f``); failures are expected."""
        argv = self.spec.cleanup_argv or ()
        try:
            await run_helper(argv, self.spec.env, timeout_s=60)
        except OSError as exc:
            log.debug("%s: cleanup command %s: %s", self.name, argv[0], exc)
        except TimeoutError:
            log.warning("%s: cleanup command %s hung; killed it", self.name, shlex.join(argv))

    async def _run_stop_command(self, grace: float) -> None:
        argv = self.spec.stop_argv or ()
        try:
            returncode, out = await run_helper(argv, self.spec.env, timeout_s=grace + 15)
        except OSError as exc:
            log.warning("%s: cannot run the stop command %s: %s", self.name, argv[0], exc)
            if self._proc is not None:
                signal_group(self._proc.pid, signal.SIGTERM)
            return
        if returncode:
            text = out.strip().splitlines()
            log.warning(
                "%s: stop command %s failed (%s): %s",
                self.name,
                shlex.join(argv),
                describe_returncode(returncode),
                text[-1] if text else "",
            )

    async def _kill_and_reap(self) -> None:
        """SIGKILL whatever is left in the replica's process group, then collect the exit.

        Also after a clean exit: shards the launcher forked must not keep NeuronCores.
        """
        proc = self._proc
        if proc is None:
            return
        self._stopping_on_purpose(proc)
        signal_group(proc.pid, signal.SIGKILL)
        if not await self._wait_exit(5.0):
            log.error(
                "%s: pid %d survives SIGKILL (stuck in the kernel?); giving up on it",
                self.name,
                proc.pid,
            )
        helpers, self._helpers = self._helpers, []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(*helpers[:2], return_exceptions=True)
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if proc.returncode is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await proc.wait()  # stdlib loop: closes the transport now that pipes are done
        r = self.replica
        r.last_exit = (
            describe_returncode(proc.returncode) if proc.returncode is not None else "unknown"
        )
        r.pid = None
        r.started_at = None
        self._proc = None
        self._wedged = False
        if proc.returncode is not None:
            # Pending breaks of this process become breaks, unless it was stopped on
            # purpose (balancer/quarantine.py): after pid and stopping_pid are final.
            self.registry.process_exited(r, proc.pid)
        self._signal_changed()

    def _count_failure(self) -> bool:
        """Remember one failed run; False (and FAILED) when that makes a crash loop."""
        s = self.settings
        now = time.monotonic()
        self._failures.append(now)
        while self._failures and now - self._failures[0] > s.crash_loop_window_s:
            self._failures.popleft()
        if len(self._failures) >= s.crash_loop_max_exits:
            self._fail(
                f"crash loop: {len(self._failures)} failed runs within "
                f"{s.crash_loop_window_s:.0f} s, last {self.replica.last_exit}"
            )
            return False
        return True

    def _fail(self, reason: str) -> None:
        r = self.replica
        r.failed_reason = reason
        r.healthy = False
        self.registry.set_state(r, ReplicaState.FAILED)
        tail = "".join(f"\n    {line}" for line in self._tail)
        log.error(
            "%s: FAILED, not restarting it: %s. Fix the cause, then restart it "
            "(POST /fleet/replicas/%s/restart or a rolling restart).%s",
            r.name,
            reason,
            r.name,
            f"\n  last output:{tail}" if tail else "",
        )
        self._signal_changed()


async def run_helper(
    argv: tuple[str, ...], env: dict[str, str], timeout_s: float
) -> tuple[int, str]:
    """Run a short helper command (``docker stop``, ``docker rm -f``) to completion.

    Returns its exit code and output; raises OSError if it cannot start, TimeoutError if
    it outlives ``timeout_s`` (it is killed first, also when the caller is cancelled).
    """
    helper = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=child_env(env),
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await helper.communicate()
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            helper.kill()
        await helper.wait()
        raise
    return helper.returncode or 0, out.decode("utf-8", "replace")
