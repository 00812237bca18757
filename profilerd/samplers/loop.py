"""A deadline-scheduled sampler thread: sample, hand the records to a writer, count errors and lag."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from profilerd.store import Store

log = logging.getLogger(__name__)

R = TypeVar("R")


class SamplerLoop(Generic[R]):
    """Every ``interval_s`` on fixed deadlines, ``write(sample(now_unix_s))``.

    A slow cycle does not shift later deadlines; missed ones are skipped and the lateness is
    reported as lag. An exception in a cycle is counted and logged (once per distinct message),
    and the loop goes on. ``pace``, when given, says the interval anew after every cycle (live
    analysis stretches its own under load).
    """

    def __init__(
        self,
        name: str,
        interval_s: float,
        sample: Callable[[float], R],
        write: Callable[[R], None],
        store: Store,
        stop: threading.Event,
        pace: Callable[[], float] | None = None,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self._sample = sample
        self._write = write
        self._pace = pace
        self._store = store
        self._stop = stop
        self._seen_errors: set[str] = set()
        self.thread = threading.Thread(target=self._run, name=f"profilerd-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            started = time.monotonic()
            lag = max(0.0, started - deadline)
            error: str | None = None
            try:
                self._write(self._sample(time.time()))
            except Exception as exc:  # a sampler must survive anything one cycle throws
                error = f"{type(exc).__name__}: {exc}"
                if error not in self._seen_errors:
                    self._seen_errors.add(error)
                    log.warning("sampler %s failed: %s", self.name, error, exc_info=True)
            finished = time.monotonic()
            self._store.note_cycle(self.name, lag, finished - started, error)
            if self._pace is not None:
                self.interval_s = self._pace()
            deadline += self.interval_s
            if deadline < finished:  # overran: skip the missed deadlines
                missed = int((finished - deadline) / self.interval_s) + 1
                deadline += missed * self.interval_s
            self._stop.wait(max(0.0, deadline - time.monotonic()))
