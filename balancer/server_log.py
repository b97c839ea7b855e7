"""What aiohttp's server logs about requests it could not parse: one short line, no bytes.

aiohttp logs a malformed request at ERROR with a traceback whose message quotes the
offending header line (``RequestHandler.handle_error`` -> ``log_exception``, aiohttp 3.14.5
web_protocol.py), which can be an ``Authorization`` header: a secret in the log. Such
requests are the client's fault, so they are counted and logged at INFO with the client's
address and the HTTP status only; other server errors keep aiohttp's full report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("neuron_fleet.http")


class ServerLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Pass as ``logger=`` to aiohttp's runner (it calls ``debug`` and ``exception``)."""

    def __init__(self, on_bad_request: Callable[[], None]) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})
        self.on_bad_request = on_bad_request

    def exception(self, msg: Any, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.on_bad_request()
            remote = args[0] if args else "?"
            log.info(
                "malformed request from %s: HTTP %s (%s)",
                remote,
                exc_info.code,
                type(exc_info).__name__,
            )
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)
