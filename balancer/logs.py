"""Log lines for a service run by systemd, in a container or by hand: one shared setup for
``serve``, ``demo`` and ``balance``.

One line per event. Under systemd (``JOURNAL_STREAM`` set) the journal adds timestamps, so we
do not. In a container logs go to stdout (``--log-stream stdout``), where ``kubectl logs``
and most collectors expect them. A replica's own output (logger ``*.output``) keeps its
``[replica-N]`` prefix and gets no level.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        default=os.environ.get("NEURON_FLEET_LOG_LEVEL", "INFO"),
        help="DEBUG, INFO, WARNING (default %(default)s; env NEURON_FLEET_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-stream",
        choices=("stderr", "stdout"),
        default=os.environ.get("NEURON_FLEET_LOG_STREAM", "stderr"),
        help="where log lines go (default %(default)s; env NEURON_FLEET_LOG_STREAM); both "
        "reach the journal and `kubectl logs`",
    )


class _Formatter(logging.Formatter):
    def __init__(self, timestamps: bool) -> None:
        super().__init__(datefmt="%Y-%m-%d %H:%M:%S")
        self.timestamps = timestamps

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        if not record.name.endswith(".output"):
            message = f"{record.levelname:<7} {message}"
        if self.timestamps:
            message = f"{self.formatTime(record, self.datefmt)} {message}"
        return message


def configure_logging(level: str = "INFO", stream: str = "stderr") -> None:
    handler = logging.StreamHandler(sys.stdout if stream == "stdout" else sys.stderr)
    handler.setFormatter(_Formatter(timestamps="JOURNAL_STREAM" not in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
