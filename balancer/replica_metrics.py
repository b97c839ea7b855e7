"""Re-export each replica's own metrics (``tgi_*``, ``vllm:*``) with a ``replica`` label.

One Prometheus target then shows the whole host. Replicas are scraped concurrently when the
balancer's ``/metrics`` is scraped, each with a short timeout; a replica that does not answer
is simply absent from that scrape (its ``neuron_fleet_replica_up`` says why).

The text is relabelled line by line rather than parsed and re-rendered, so every name stays
exactly as the replica wrote it (TGI's counters have no ``_total`` suffix; dashboards built
for TGI keep working) and the samples of one family stay together across replicas, as the
exposition format requires.

Two gauges say the same thing for either engine, so one dashboard and one set of alerts
serve both (``ENGINE_GAUGES``): ``neuron_fleet_replica_engine_running{replica}`` (requests
in the engine's batch) and ``neuron_fleet_replica_engine_waiting{replica}`` (requests
queued inside the replica), read from the same scrape.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp

from balancer.upstream import Registry, Replica, ReplicaState

PREFIXES = ("tgi_", "vllm:")
SCRAPE_TIMEOUT_S = 2.0
ENGINE_GAUGES = {
    # text-generation-inference v3.3.7 router/src/infer/mod.rs and queue.rs
    "tgi_batch_current_size": "running",
    "tgi_queue_size": "waiting",
    # vllm 0.11.0 v1/metrics/loggers.py (labels model_name, engine: summed per replica)
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
}
NORMALISED = {
    "running": (
        "neuron_fleet_replica_engine_running",
        "Requests in the replica engine's running batch (TGI's batch_current_size, vLLM's "
        "num_requests_running), read when /metrics is scraped.",
    ),
    "waiting": (
        "neuron_fleet_replica_engine_waiting",
        "Requests queued inside the replica for a batch slot (TGI's queue_size, vLLM's "
        "num_requests_waiting), read when /metrics is scraped.",
    ),
}


@dataclass
class _Family:
    meta: list[str] = field(default_factory=list)
    """``# HELP`` / ``# TYPE`` lines, once each."""
    samples: list[str] = field(default_factory=list)


def relabel(
    text: str,
    replica: str,
    families: dict[str, _Family],
    engine: dict[str, float] | None = None,
) -> None:
    """Add ``replica="<name>"`` to every sample of the kept families of one replica; sum
    its ``ENGINE_GAUGES`` samples into ``engine`` (``running`` / ``waiting``)."""
    current: str | None = None
    label = f'replica="{replica}"'
    for line in text.splitlines():
        if not line:
            continue
        if line[0] == "#":
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                current = parts[2] if parts[2].startswith(PREFIXES) else None
                if current is not None:
                    family = families.setdefault(current, _Family())
                    if line not in family.meta:
                        family.meta.append(line)
            continue
        brace, space = line.find("{"), line.find(" ")
        end = brace if brace != -1 and (space == -1 or brace < space) else space
        if end <= 0:
            continue
        name = line[:end]
        if current is None or not name.startswith(current):
            current = name if name.startswith(PREFIXES) else None
        if current is None:
            continue
        if engine is not None and name in ENGINE_GAUGES:
            _add_value(engine, ENGINE_GAUGES[name], line, end == brace)
        if end == brace:
            inner = "" if line[brace + 1] == "}" else ","
            line = f"{name}{{{label}{inner}{line[brace + 1 :]}"
        else:
            line = f"{name}{{{label}}}{line[end:]}"
        families.setdefault(current, _Family()).samples.append(line)


def _add_value(engine: dict[str, float], kind: str, line: str, labelled: bool) -> None:
    """Add a sample's value (after its labels: a label value may hold spaces)."""
    tail = line[line.rfind("}") + 1 :] if labelled else line[line.find(" ") :]
    try:
        value = float(tail.split()[0])
    except (IndexError, ValueError):
        return
    engine[kind] = engine.get(kind, 0.0) + value


def normalised(engines: dict[str, dict[str, float]]) -> list[str]:
    """The two engine gauges' exposition lines, one sample per replica that reported."""
    lines: list[str] = []
    for kind, (name, help_text) in NORMALISED.items():
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for replica, values in engines.items():
            if kind in values:
                lines.append(f'{name}{{replica="{replica}"}} {values[kind]}')
    return lines


class ReplicaMetricsExporter:
    def __init__(self, registry: Registry, session: aiohttp.ClientSession) -> None:
        self.registry = registry
        self.session = session

    async def render(self) -> bytes:
        replicas = [
            r
            for r in self.registry.replicas
            if r.state in (ReplicaState.READY, ReplicaState.DRAINING)
        ]
        texts = await asyncio.gather(*(self._scrape(r) for r in replicas))
        families: dict[str, _Family] = {}
        engines: dict[str, dict[str, float]] = {}
        for replica, text in zip(replicas, texts, strict=True):
            if text:
                relabel(text, replica.name, families, engines.setdefault(replica.name, {}))
        lines = normalised(engines)
        for family in families.values():
            lines += family.meta
            lines += family.samples
        return ("\n".join(lines) + "\n").encode()

    async def _scrape(self, replica: Replica) -> str:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        try:
            async with self.session.get(f"{replica.url}/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return ""
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return ""
