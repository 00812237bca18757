"""The TUI as the live view of `profilerd run`.

While the view owns the terminal, the training command must not write over it: its stdout and
stderr go to a pseudo-terminal (so it still line-buffers and draws progress bars as it would on
a terminal), a thread keeps the recent lines for the `o` screen and spools everything, and
when the view closes the spool is written to the real terminal and the rest of the output
passes straight through. Imported lazily by ``profilerd.cli`` only on a terminal.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import signal
import subprocess
import sys
import tempfile
import termios
import threading
from collections import deque
from typing import Any

MAX_LINES = 2000


class ChildOutput:
    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        with contextlib.suppress(OSError):
            size = fcntl.ioctl(sys.stdout.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.slave, termios.TIOCSWINSZ, size)
        self._spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed by release(), it outlives this call
        self._lines: deque[str] = deque(maxlen=MAX_LINES)
        self._partial = ""
        self._lock = threading.Lock()
        self._passthrough = False
        self._started = False
        self._thread = threading.Thread(target=self._pump, name="profilerd-child-output", daemon=True)

    def popen_kwargs(self) -> dict[str, Any]:
        # stdin is not the terminal the view reads keys from: a prompt gets EOF instead of hanging.
        return {"stdin": subprocess.DEVNULL, "stdout": self.slave, "stderr": self.slave}

    def started(self) -> None:
        """The child holds the terminal's other end now; ours would keep it open forever."""
        os.close(self.slave)
        self._started = True
        self._thread.start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every writer has closed the pseudo-terminal
                break
            if not data:
                break
            with self._lock:
                if self._passthrough:
                    _write_stdout(data)
                    continue
                self._spool.write(data)
                self._split(data.decode(errors="replace"))

    def _split(self, text: str) -> None:
        pieces = (self._partial + text).split("\n")
        self._partial = pieces.pop()
        for piece in pieces:
            self._lines.append(piece.rstrip("\r").rsplit("\r", 1)[-1])

    def recent(self) -> list[str]:
        with self._lock:
            tail = [self._partial.rsplit("\r", 1)[-1]] if self._partial.strip() else []
            return list(self._lines) + tail

    def release(self) -> None:
        """Write what was held back to the terminal; from now on output passes straight through."""
        with self._lock:
            self._spool.seek(0)
            while chunk := self._spool.read(1 << 16):
                _write_stdout(chunk)
            self._spool.close()
            self._passthrough = True

    def close(self) -> None:
        if self._started:
            self._thread.join(timeout=2.0)
        else:
            with contextlib.suppress(OSError):
                os.close(self.slave)
        with contextlib.suppress(OSError):
            os.close(self.master)


def _write_stdout(data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


class LiveView:
    """What `profilerd run` needs: stdio for the child, then the app until the child exits."""

    def __init__(self, base_url: str, job: str) -> None:
        self.base_url = base_url
        self.job = job
        self.output = ChildOutput()

    def popen_kwargs(self) -> dict[str, Any]:
        return self.output.popen_kwargs()

    def run(self, child: subprocess.Popen[bytes]) -> None:
        """The view, until the child exits or the user quits it (the child keeps running)."""
        from profilerd_tui.app import make_app
        from profilerd_tui.sources import DaemonSource

        self.output.started()

        def interrupt() -> None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGINT)

        app = make_app(
            DaemonSource(self.base_url, self.job),
            exit_when=lambda: child.poll() is not None,
            on_interrupt=interrupt,
            output=self.output.recent,
        )
        try:
            app.run()
        finally:
            self.output.release()

    def close(self) -> None:
        self.output.close()
