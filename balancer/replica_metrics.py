"""Re-export each replica's own metrics (``tgi_*``, ``vllm:*``) with a ``replica`` label.

One Prometheus target then shows the whole host. Replicas are scraped concurrently when the
balancer's ``/metrics`` is scraped, each with a short timeout; a replica that does not answer
is simply absent from that scrape (its ``neuron_fleet_replica_up`` says why).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from balancer.upstream import Registry, Replica, ReplicaState

log = logging.getLogger("neuron_fleet.replica_metrics")

PREFIXES = ("tgi_", "vllm:")
SCRAPE_TIMEOUT_S = 2.0


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
        families: dict[str, Metric] = {}
        for replica, text in zip(replicas, texts, strict=True):
            if not text:
                continue
            try:
                parsed = list(text_string_to_metric_families(text))
            except ValueError as exc:
                log.debug("unparsable /metrics from %s: %s", replica.name, exc)
                continue
            for family in parsed:
                if not family.name.startswith(PREFIXES):
                    continue
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                for sample in family.samples:
                    labels = {**sample.labels, "replica": replica.name}
                    merged.add_sample(sample.name, labels, sample.value, sample.timestamp)
        if not families:
            return b""
        out = CollectorRegistry(auto_describe=False)
        out.register(_Fixed(list(families.values())))
        return generate_latest(out)

    async def _scrape(self, replica: Replica) -> str:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)
        try:
            async with self.session.get(f"{replica.url}/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    return ""
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return ""


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)
