"""Re-export each replica's own metrics (``tgi_*``, ``vllm:*``) with a ``replica`` label.

One Prometheus target then shows the whole host. Replicas are scraped concurrently when the
balancer's ``/metrics`` is scraped, each with a short timeout; a replica that does not answer
is simply absent from that scrape (its ``neuron_fleet_replica_up`` says why).

The text is relabelled line by line rather than parsed and re-rendered, so every name stays
exactly as the replica wrote it (TGI's counters have no ``_total`` suffix; dashboards built
for TGI keep working) and the samples of one family stay together across replicas, as the
exposition format requires.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp

from balancer.upstream import Registry, Replica, ReplicaState

PREFIXES = ("tgi_", "vllm:")
SCRAPE_TIMEOUT_S = 2.0


@dataclass
class _Family:
    meta: list[str] = field(default_factory=list)
    """``# HELP`` / ``# TYPE`` lines, once each."""
    samples: list[str] = field(default_factory=list)


def relabel(text: str, replica: str, families: dict[str, _Family]) -> None:
    """Add ``replica="<name>"`` to every sample of the kept families of one replica."""
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
        if end == brace:
            inner = "" if line[brace + 1] == "}" else ","
            line = f"{name}{{{label}{inner}{line[brace + 1 :]}"
        else:
            line = f"{name}{{{label}}}{line[end:]}"
        families.setdefault(current, _Family()).samples.append(line)


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
        for replica, text in zip(replicas, texts, strict=True):
            if text:
                relabel(text, replica.name, families)
        lines: list[str] = []
        for family in families.values():
            lines += family.meta
            lines += family.samples
        return ("\n".join(lines) + "\n").encode() if lines else b""

    async def _scrape(self, replica: Replica) -> str:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        try:
            async with self.session.get(f"{replica.url}/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return ""
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return ""
