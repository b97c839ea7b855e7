"""Background loops that must not die silently.

The health checker re-admits ejected replicas and the watchdog cuts stuck streams; if either
stopped on an unexpected exception, ejected replicas would never return and stuck streams
would hold their slots forever. ``supervised`` logs the exception with its traceback,
counts it, and starts the loop again after a short pause.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("neuron_fleet.tasks")

RESTART_DELAY_S = 1.0


async def supervised(
    name: str,
    loop: Callable[[], Awaitable[None]],
    on_failure: Callable[[str], None],
    restart_delay_s: float = RESTART_DELAY_S,
) -> None:
    """Run ``loop()`` (meant to run until cancelled) again whenever it fails or returns."""
    while True:
        try:
            await loop()
            log.error("background task %s returned unexpectedly; starting it again", name)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "background task %s failed; starting it again in %g s", name, restart_delay_s
            )
        on_failure(name)
        await asyncio.sleep(restart_delay_s)
