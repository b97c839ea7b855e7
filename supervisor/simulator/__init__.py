"""A simulated TGI Neuron replica: the Neuron timing model (``engine``) behind TGI's HTTP
routes and wire formats (``server``), for tests and demos without Inferentia hardware.

The engine names are cheap to import; the HTTP names (aiohttp, prometheus) load on first use.
"""

from __future__ import annotations

from typing import Any

from .engine import Engine, FakeClock, FaultConfig, NeuronBatcher, NeuronTiming, SimConfig

__all__ = [
    "Engine",
    "FakeClock",
    "FaultConfig",
    "NeuronBatcher",
    "NeuronTiming",
    "SimConfig",
    "SimServer",
    "create_app",
    "run",
    "serve",
    "start_server",
]

_SERVER_NAMES = {"SimServer", "create_app", "run", "serve", "start_server"}


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
