"""A deadline-scheduled sampler thread that counts its own errors and lag."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from profilerd.store import Store

log = logging.getLogger(__name__)


class SamplerLoop:
    """Calls ``tick(now_unix_s)`` every ``interval_s`` on fixed deadlines.

    A slow tick does not shift later deadlines; missed ones are skipped and the lateness is
    reported as lag. An exception in a tick is counted and logged (once per distinct message),
    and the loop goes on.
    """

    def __init__(
        self,
        name: str,
        interval_s: float,
        tick: Callable[[float], None],
        store: Store,
        stop: threading.Event,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self._tick = tick
        self._store = store
        self._stop = stop
        self._seen_errors: set[str] = set()
        self.thread = threading.Thread(target=self._run, name=f"profilerd-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        health = self._store.health_for(self.name)
        deadline = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            lag = max(0.0, started - deadline)
            try:
                self._tick(time.time())
            except Exception as exc:  # a sampler must survive anything one cycle throws
                message = f"{type(exc).__name__}: {exc}"
                with self._store.lock:
                    health.errors_total += 1
                    health.last_error = message
                if message not in self._seen_errors:
                    self._seen_errors.add(message)
                    log.warning("sampler %s failed: %s", self.name, message, exc_info=True)
            finished = time.monotonic()
            with self._store.lock:
                health.cycles_total += 1
                health.lag_s = lag
                health.last_duration_s = finished - started
            deadline += self.interval_s
            if deadline < finished:  # overran: skip the missed deadlines
                missed = int((finished - deadline) / self.interval_s) + 1
                deadline += missed * self.interval_s
            self._stop.wait(max(0.0, deadline - time.monotonic()))
