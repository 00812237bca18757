"""Non-blocking datagram sender: drop and count, never block, never raise."""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from collections import Counter
from pathlib import Path

# How often to try again after the daemon was found absent; bounds how quickly probes
# resume after a daemon restart and how much a missing daemon costs per step.
RECONNECT_INTERVAL_S = 0.5


class DatagramSender:
    """Sends datagrams to the daemon's AF_UNIX socket.

    The socket is connected so that a restarted daemon (a new socket file) shows up as
    ECONNREFUSED, after which the sender reconnects at most every RECONNECT_INTERVAL_S.
    Every message that cannot be sent is counted by reason in ``dropped``.
    """

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.dropped: Counter[str] = Counter()
        self.dropped_total = 0  # kept as an int: it goes into every step record
        self.sent = 0
        self.connect_attempts = 0  # bounded by time, not by steps: what a missing daemon costs
        self._sock: socket.socket | None = None
        self._next_attempt = 0.0
        self.reconnected = False  # set when a (re)connection succeeds; the caller resends hello

    def _connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        self._next_attempt = now + RECONNECT_INTERVAL_S
        self.connect_attempts += 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return False
        self._sock = sock
        self.reconnected = True
        return True

    def ensure_connected(self) -> None:
        """Connect now if needed (rate-limited), so a hello can go out before the next message."""
        if self._sock is None:
            self._connect()

    def _drop(self, reason: str, records: int) -> bool:
        self.dropped[reason] += records
        self.dropped_total += records
        return False

    def send(self, datagram: bytes, records: int = 1) -> bool:
        """Send one datagram carrying ``records`` messages; drops are counted per message."""
        if self._sock is None and not self._connect():
            return self._drop("daemon_absent", records)
        sock = self._sock
        if sock is None:
            return False
        try:
            sock.send(datagram)
        except BlockingIOError:
            return self._drop("daemon_busy", records)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                return self._drop("oversized", records)
            absent = exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN)
            self.close()
            return self._drop("daemon_absent" if absent else "send_error", records)
        self.sent += records
        return True

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def reset_after_fork(self) -> None:
        """A forked child must not share the parent's socket or counters."""
        self._sock = None
        self.dropped = Counter()
        self.dropped_total = 0
        self.sent = 0
        self.connect_attempts = 0
        self._next_attempt = 0.0
        self.reconnected = False
