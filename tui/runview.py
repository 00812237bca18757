"""The TUI as the live view of `profilerd run`.

While the view owns the terminal, the training command must not write over it: its stdout and
stderr go to a pseudo-terminal (so it still line-buffers and draws progress bars as it would on
a terminal), a thread keeps the recent lines for the `o` screen and spools everything, and
when the view closes the spool is written to the real terminal and the rest of the output
passes straight through. Imported lazily by ``profilerd.session`` only on a terminal.

The view must never take the run down: whatever fails in it (the app, the terminal), the view
ends, the held-back output is written out, the rest passes through, and `run` goes on with its
status line. A crash inside the app is reported in one line, its traceback in a log file.
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
import time
from collections import deque
from typing import Any

MAX_LINES = 2000
FAULT_AFTER_S = 2.0


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
        """Drain the child's output for as long as it writes: if this stopped, the training
        would block on a full pseudo-terminal, so nothing here may end the loop but EOF."""
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
                try:
                    self._spool.write(data)
                except OSError:  # no room for the spool: what is held back goes out now
                    self._release_locked()
                    _write_stdout(data)
                    continue
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
            self._release_locked()

    def _release_locked(self) -> None:
        if self._passthrough:
            return
        self._passthrough = True
        with contextlib.suppress(OSError, ValueError):
            self._spool.seek(0)
            while chunk := self._spool.read(1 << 16):
                _write_stdout(chunk)
        with contextlib.suppress(OSError):
            self._spool.close()

    def close(self) -> None:
        if self._started:
            self._thread.join(timeout=2.0)
        else:
            with contextlib.suppress(OSError):
                os.close(self.slave)
        with contextlib.suppress(OSError):
            os.close(self.master)


def _terminal_state() -> list[Any] | None:
    try:
        return termios.tcgetattr(sys.stdin.fileno())
    except (OSError, ValueError, termios.error):
        return None


def _restore_terminal(state: list[Any] | None) -> None:
    """After a crash that Textual did not clean up: cooked mode, main screen, cursor, no mouse."""
    with contextlib.suppress(OSError, ValueError, termios.error):
        if state is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, state)
        sys.stdout.write("\x1b[?1000l\x1b[?1003l\x1b[?1006l\x1b[?2004l\x1b[?1049l\x1b[?25h")
        sys.stdout.flush()


def _describe_failure(app: Any, errors: list[Any]) -> str:
    exception = getattr(app, "_exception", None)
    what = f"{type(exception).__name__}: {exception}" if exception is not None else f"exit code {app.return_code}"
    try:
        from rich.console import Console

        with tempfile.NamedTemporaryFile("w", prefix="profilerd-live-view-", suffix=".log", delete=False) as log:
            console = Console(file=log, width=120, color_system=None)
            for renderable in errors:
                console.print(renderable)
        return f"{what}; traceback in {log.name}"
    except Exception:
        return what


def _write_stdout(data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


class LiveViewFailed(RuntimeError):
    """The app ended on an error; the message says where its traceback went."""


class LiveView:
    """What `profilerd run` needs: stdio for the child, then the app until the child exits.

    ``fault`` (a test aid) makes the app fail from inside, after it has drawn for a moment.
    """

    def __init__(self, base_url: str, job: str, fault: bool = False) -> None:
        from profilerd_tui.app import make_app  # noqa: F401 - fail here, before the child starts

        self.base_url = base_url
        self.job = job
        self.fault_at = time.monotonic() + FAULT_AFTER_S if fault else None
        self.output = ChildOutput()

    def popen_kwargs(self) -> dict[str, Any]:
        return self.output.popen_kwargs()

    def run(self, child: subprocess.Popen[bytes]) -> None:
        """The view, until the child exits or the user quits it (the child keeps running)."""
        from profilerd_tui.app import make_app
        from profilerd_tui.sources import DaemonSource

        self.output.started()

        def interrupt() -> None:
            # ctrl+c is a key here (the view reads the terminal raw), so this is its only delivery.
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGINT)

        def exit_when() -> bool:
            if self.fault_at is not None and time.monotonic() >= self.fault_at:
                raise RuntimeError("live view fault injected (PROFILERD_LIVE_VIEW_FAULT=running)")
            return child.poll() is not None

        terminal = _terminal_state()
        try:
            app = make_app(
                DaemonSource(self.base_url, self.job),
                exit_when=exit_when,
                on_interrupt=interrupt,
                output=self.output.recent,
            )
            errors: list[Any] = []
            # Textual prints a crash's traceback over the terminal when it exits: keep it for
            # the log instead, and tell the user in one line.
            app._print_error_renderables = lambda: errors.extend(app._exit_renderables)  # type: ignore[method-assign]
            app.run()
        except BaseException:
            _restore_terminal(terminal)
            raise
        finally:
            self.output.release()
        if errors or app.return_code:
            raise LiveViewFailed(_describe_failure(app, errors))

    def close(self) -> None:
        self.output.close()
