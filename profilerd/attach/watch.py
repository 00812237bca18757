"""Observing the target: once for ``--duration`` (``run_attach``), or continuously for the live
view (``LiveAttach``), each ending in the one attach verdict (:mod:`.verdict`)."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import psutil

from profilerd.analysis.rules import RuleSet
from profilerd.attach.sampling import L0Sampler, L0Summary, PySpySampler
from profilerd.attach.target import AttachError, inspect_target
from profilerd.attach.verdict import AttachResult, conclude, document
from profilerd.config import ATTACH_RATE_HZ


def run_attach(
    pid: int,
    duration_s: float,
    ruleset: RuleSet,
    *,
    use_l1: bool = True,
    rate_hz: int = ATTACH_RATE_HZ,
    on_tick: Callable[[L0Summary], None] | None = None,
) -> AttachResult:
    """Observe the target for ``duration_s`` (or until it exits) with L0 and, if allowed, L1."""
    target = inspect_target(pid)
    try:
        l0 = L0Sampler(pid)
    except psutil.NoSuchProcess:
        raise AttachError(f"process {pid} exited before profilerd could attach") from None
    spy = None
    note = None
    if use_l1:
        try:
            spy = PySpySampler(pid, rate_hz, duration_s)
        except AttachError as exc:
            note = str(exc)
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        if not l0.tick(min(0.5, max(0.05, deadline - time.monotonic()))):
            break
        if on_tick is not None:
            on_tick(l0.summary)
    if spy is not None:
        spy.stop()
    counts, spy_note = spy.result(timeout=10) if spy is not None else (None, None)
    return conclude(target, l0.summary, counts, note or spy_note, ruleset, duration_s)


class LiveAttach:
    """Attach for the live view: L0 continuously, L1 in short py-spy chunks, and a fresh verdict
    document after each chunk over the last few chunks (a rolling window)."""

    CHUNK_S = 2.0
    WINDOW_CHUNKS = 5

    def __init__(
        self, pid: int, ruleset: RuleSet, run_id: str, *, use_l1: bool = True, rate_hz: int = ATTACH_RATE_HZ
    ) -> None:
        self.target = inspect_target(pid)
        self.run_id = run_id
        self.ruleset = ruleset
        self.use_l1 = use_l1
        self.rate_hz = rate_hz
        self.l0 = L0Sampler(pid)
        self._chunks: deque[Counter[str]] = deque(maxlen=self.WINDOW_CHUNKS)
        self._note: str | None = None
        self.result: AttachResult | None = None
        self.document: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profilerd-attach", daemon=True)

    @property
    def exited(self) -> bool:
        return self.l0.summary.exited

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.CHUNK_S + 10)

    def _run(self) -> None:
        while not self._stop.is_set() and not self.exited:
            spy = None
            if self.use_l1 and self._note is None:
                try:
                    spy = PySpySampler(self.target.pid, self.rate_hz, self.CHUNK_S)
                except AttachError as exc:
                    self._note = str(exc)
            end = time.monotonic() + self.CHUNK_S
            while time.monotonic() < end and not self._stop.is_set():
                if not self.l0.tick(0.5):
                    break
            if spy is not None:
                spy.stop()
                counts, note = spy.result(timeout=5)
                if counts:
                    self._chunks.append(counts)
                elif note:
                    self._note = note  # refused (no ptrace rights): stay at L0 from now on
            window: Counter[str] = Counter()
            for chunk in self._chunks:
                window.update(chunk)
            seconds = min(self.l0.summary.seconds, self.CHUNK_S * max(1, len(self._chunks)))
            self.result = conclude(self.target, self.l0.summary, window or None, self._note, self.ruleset, seconds)
            self.document = document(self.result, self.run_id)
