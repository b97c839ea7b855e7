"""The systemd notify protocol (``Type=notify``), natively: one datagram per message.

systemd passes ``$NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract socket)
and, with ``WatchdogSec=``, ``$WATCHDOG_USEC`` (+ ``$WATCHDOG_PID``). We send
``KEY=VALUE`` lines over AF_UNIX/SOCK_DGRAM: ``READY=1`` once we can serve, ``STATUS=...``
for ``systemctl status``, ``WATCHDOG=1`` keep-alives from the event loop (so a blocked loop
gets the service restarted), ``STOPPING=1`` on shutdown. No library needed; everything is a
no-op outside systemd. Failures to send are logged once and never stop the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("neuron_fleet.systemd")


def _address(value: str) -> str | bytes:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace (Linux)
    return value


class SystemdNotifier:
    """Sends sd_notify messages to ``$NOTIFY_SOCKET``; does nothing when it is unset."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = _address(path) if path.startswith(("/", "@")) else None
        self._socket: socket.socket | None = None
        self._warned = False
        self.watchdog_interval_s: float | None = None
        """Half of WatchdogSec (systemd's advice), when the watchdog is meant for us."""
        usec = env.get("WATCHDOG_USEC", "")
        wd_pid = env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not wd_pid or wd_pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 1e6 / 2
        self.last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; True if sent."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
                self._socket.setblocking(False)
            self._socket.sendto(message, self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at $NOTIFY_SOCKET: %s", exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields = ["READY=1"]
        if status is not None:
            fields.append(f"STATUS={status}")
            self.last_status = status
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """Send ``STATUS=text`` unless it is what systemd already shows."""
        if text == self.last_status:
            return False
        self.last_status = text
        return self.notify(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        fields = ["STOPPING=1"]
        if status is not None:
            fields.append(f"STATUS={status}")
            self.last_status = status
        return self.notify(*fields)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping the watchdog every WATCHDOG_USEC/2 forever; returns at once if not asked for."""
        interval = self.watchdog_interval_s
        if interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
