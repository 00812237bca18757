"""Non-blocking datagram sender: hold, then drop and count; never block, never raise.

`profilerd run` starts the training at once and the daemon beside it, so the first records
of a run are made before anything listens. Until the socket has answered once, the sender
holds them (bounded) and replays them in order, hello first, as soon as it does. A process
that ends before then waits for the daemon at exit, under `profilerd run` only (whose daemon
is on its way, and whose verdict waits for it anyway), at most EXIT_WAIT_S. A daemon lost
later is not waited for: records are dropped and counted. A daemon that is only busy (its
socket's queue full) gets the same bounded holding: the held datagrams go first with the next
send, and at exit.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import time
from collections import Counter, deque
from pathlib import Path

from profilerd_probes import wire
from profilerd_probes.paths import RUN_DIR_ENV, SENDER_MARK_SUFFIX, socket_problem

# How often to try again after the daemon was found absent; bounds how quickly probes
# resume after a daemon restart and how much a missing daemon costs per step.
RECONNECT_INTERVAL_S = 0.5
# In the first seconds, before any daemon answered, one that is starting is looked for more
# often: the sooner it answers, the fewer records wait (a refused connect costs microseconds).
STARTING_RECONNECT_INTERVAL_S = 0.05
STARTING_WINDOW_S = 10.0
# What is held while no daemon answers: a few seconds of steps at any rate (a step batch is up
# to 32 records, ~5 KiB). Beyond it the oldest go (the run's first hello stays), counted.
MAX_HELD_DATAGRAMS = 256
# At exit outside `profilerd run`, how long held datagrams may wait for a busy daemon's queue.
BUSY_EXIT_WAIT_S = 0.2
MAX_HELD_BYTES = 2 << 20
EXIT_WAIT_S = 5.0


def _is_hello(datagram: bytes) -> bool:
    return len(datagram) >= wire.HEADER.size and datagram[wire.HEADER.size - 1] == wire.KIND_HELLO


class DatagramSender:
    """Sends datagrams to the daemon's AF_UNIX socket.

    The socket is connected so that a restarted daemon (a new socket file) shows up as
    ECONNREFUSED, after which the sender reconnects at most every RECONNECT_INTERVAL_S.
    Until a daemon first answers, datagrams are held (see MAX_HELD_*) and sent in order once
    one does, hello first (a daemon drops steps from a process it has not heard say hello).
    Every message that cannot be sent is counted by reason in ``dropped``.
    A socket that is not in a trusted directory (profilerd_probes.paths.socket_problem: say,
    one another local user planted) is never connected to; ``refused`` says why.
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
        self._started = time.monotonic()
        self._ever_connected = False
        self._held: deque[tuple[bytes, int]] = deque()
        self._held_bytes = 0
        self._marked = False
        self.refused: str | None = None

    @property
    def held(self) -> int:
        """How many datagrams wait for the daemon."""
        return len(self._held)

    def _connect(self) -> bool:
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        starting = not self._ever_connected and now - self._started < STARTING_WINDOW_S
        self._next_attempt = now + (STARTING_RECONNECT_INTERVAL_S if starting else RECONNECT_INTERVAL_S)
        self.connect_attempts += 1
        # Checked on every attempt, not once: the socket comes and goes with its daemon.
        self.refused = socket_problem(Path(self.path))
        if self.refused is not None:
            return False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return False
        self._sock = sock
        self._ever_connected = True
        self.reconnected = True
        return True

    def ensure_connected(self) -> None:
        """Connect now if needed (rate-limited), so a hello can go out before the next message."""
        if self._sock is None:
            self._connect()
        if self._held and self._sock is not None:
            self._replay()

    def _drop(self, reason: str, records: int) -> bool:
        self.dropped[reason] += records
        self.dropped_total += records
        return False

    def _hold(self, datagram: bytes, records: int, reason: str = "daemon_absent") -> bool:
        """Keep a datagram to send later, in order; beyond the bound the oldest go, counted."""
        self._held.append((datagram, records))
        self._held_bytes += len(datagram)
        while len(self._held) > MAX_HELD_DATAGRAMS or self._held_bytes > MAX_HELD_BYTES:
            victim = self._held.popleft()
            if _is_hello(victim[0]) and self._held:  # the hello goes first, whatever is dropped
                victim, first = self._held.popleft(), victim
                self._held.appendleft(first)
            self._held_bytes -= len(victim[0])
            self._drop(reason, victim[1])
        return False

    def _replay(self) -> None:
        """Send what is held, oldest first, until done or the daemon stops taking them."""
        while self._held and self._sock is not None:
            datagram, records = self._held[0]
            outcome = self._send_now(datagram, records)
            if outcome is None:  # absent again, or busy: keep the rest, in order, for later
                return
            self._held.popleft()
            self._held_bytes -= len(datagram)

    def _send_now(self, datagram: bytes, records: int) -> bool | None:
        """True sent, False dropped (counted), None not sent now (the caller may hold it)."""
        sock = self._sock
        if sock is None:
            return None
        try:
            sock.send(datagram)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                return self._drop("oversized", records)
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTCONN):
                self.close()
                return None
            self.close()
            return self._drop("send_error", records)
        self.sent += records
        return True

    def send(self, datagram: bytes, records: int = 1) -> bool:
        """Send one datagram carrying ``records`` messages; drops are counted per message."""
        if not self._marked:
            self._mark()
        if self._sock is None:
            self._connect()
        if self._held:
            self._replay()
            if self._held or self._sock is None:  # behind the held ones, in order
                return self._hold(datagram, records, "daemon_busy" if self._sock is not None else "daemon_absent")
        outcome = self._send_now(datagram, records)
        if outcome is not None:
            return outcome
        if self._sock is not None:
            # Connected, but the socket's queue is full (a busy daemon, a burst from many
            # processes: AF_UNIX queues hold only ~10 datagrams): held, sent with the next one.
            return self._hold(datagram, records, "daemon_busy")
        if self._ever_connected:
            return self._drop("daemon_absent", records)
        return self._hold(datagram, records)

    def _mark(self) -> None:
        self._marked = True
        run_dir = os.environ.get(RUN_DIR_ENV)
        if run_dir:
            mark = os.path.join(run_dir, f"{os.getpid()}{SENDER_MARK_SUFFIX}")
            with contextlib.suppress(OSError):
                os.close(os.open(mark, os.O_CREAT | os.O_WRONLY, 0o600))

    def finish(self) -> None:
        """At exit: send what is held if the daemon answers; under `profilerd run`, wait for its
        daemon up to EXIT_WAIT_S first (only a run shorter than the daemon's start waits)."""
        # A connected daemon that is only busy drains its queue in milliseconds.
        if self.refused is not None:
            wait_s = 0.0  # no daemon of the user's can come there
        elif os.environ.get(RUN_DIR_ENV):
            wait_s = EXIT_WAIT_S
        else:
            wait_s = BUSY_EXIT_WAIT_S if self._sock is not None else 0.0
        deadline = time.monotonic() + wait_s
        while self._held:
            self._next_attempt = 0.0
            self.ensure_connected()
            if not self._held or time.monotonic() >= deadline:
                break
            time.sleep(0.01)

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def reset_after_fork(self) -> None:
        """A forked child must not share the parent's socket, counters or held records."""
        self._sock = None
        self.dropped = Counter()
        self.dropped_total = 0
        self.sent = 0
        self.connect_attempts = 0
        self._next_attempt = 0.0
        self.reconnected = False
        self._started = time.monotonic()
        self._ever_connected = False
        self._held = deque()
        self._held_bytes = 0
        self._marked = False
        self.refused = None
