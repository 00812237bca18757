"""Device-side step timing: markers on the current stream, resolved later, never a sync.

At the step boundaries the probe already knows (step start, backward start, optimizer start,
step end) it records a *marker*, a timing event taken from a small reused pool, on the current
stream. Markers are resolved oldest first with a non-blocking query; ``elapsed`` is only ever
asked of two completed markers. Nothing here waits for the device.

Each resolved marker gets ``device_s``, when the device reached it, on the host clock::

    device_s(M) = max(host_s(M), device_s(previous) + elapsed(previous, M))

which unrolls to the largest ``host_s(P) + elapsed(P, M)`` over the markers P before M: a lower
bound (the device reaches P no earlier than the host records it), exact from the first marker
recorded on a drained stream on (an *anchor*: the device reaches it at its host time). A
``loss.item()``, a data wait or the start of the run drains the stream often enough in practice.

From the markers of one step (see ``step_timing`` and docs/concepts.md): device time per phase,
device busy and idle, the device idle while the host waited for data, and how far the host ran
ahead of the device at the step's end.

Standard library only; the CUDA implementation reaches torch through the object it is given.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

# Events alive at most: 16 steps of 4 markers. A device further behind than that gets no new
# markers (those steps go without device timing) rather than an unbounded pool.
POOL_SIZE = 64
# Busy time is reported as exact while the device time the markers cannot see into (the device
# keeping pace with the host between launches) stays under this share of the step.
UNSEEN_TOLERANCE = 0.05


class DeviceTimer(Protocol):
    """What the probe needs from a device: the seam between the CUDA runtime and a simulation."""

    def allowed(self) -> bool:
        """Whether a marker may be recorded now (never while a CUDA graph is captured)."""
        ...

    def new_event(self) -> Any: ...

    def record(self, event: Any) -> None:
        """Record ``event`` on the current stream (asynchronous)."""
        ...

    def done(self, event: Any) -> bool:
        """Whether the device has reached ``event`` (a non-blocking query)."""
        ...

    def elapsed_s(self, start: Any, end: Any) -> float:
        """Device seconds from ``start`` to ``end``; only called when both are done."""
        ...


class CudaTimer:
    """``torch.cuda.Event`` with timing on the current stream: record, query, elapsed_time.

    ``Event.query`` is ``cudaEventQuery`` and ``elapsed_time`` is ``cudaEventElapsedTime``, which
    fails rather than waits on an unfinished event (and is only called on finished ones here).
    """

    def __init__(self, torch: Any) -> None:
        self._cuda = torch.cuda

    def allowed(self) -> bool:
        return not self._cuda.is_current_stream_capturing()

    def new_event(self) -> Any:
        return self._cuda.Event(enable_timing=True)

    def record(self, event: Any) -> None:
        event.record()

    def done(self, event: Any) -> bool:
        return bool(event.query())

    def elapsed_s(self, start: Any, end: Any) -> float:
        return float(start.elapsed_time(end)) / 1000.0


class Marker:
    """A point in the stream: when the host recorded it and (once resolved) when the device
    reached it, both in host ``perf_counter`` seconds. ``blocked_s`` is the host's cumulative
    time in synchronising calls when it was recorded."""

    __slots__ = ("blocked_s", "device_s", "event", "host_s")

    def __init__(self, event: Any, host_s: float, blocked_s: float) -> None:
        self.event = event
        self.host_s = host_s
        self.blocked_s = blocked_s
        self.device_s: float | None = None


class DeviceClock:
    """The marker chain of one process: record, resolve in order, recycle the events."""

    def __init__(self, timer: DeviceTimer) -> None:
        self._timer = timer
        self._free: list[Any] = []
        self._created = 0
        self._pending: deque[Marker] = deque()
        self._last: Marker | None = None  # the newest resolved marker: its event times the next one
        self.skipped = 0  # markers not recorded: the pool was exhausted

    def mark(self, host_s: float, blocked_s: float) -> Marker | None:
        timer = self._timer
        if not timer.allowed():
            return None
        if not self._free:
            if self._created < POOL_SIZE:
                self._created += 1
                self._free.append(timer.new_event())
            else:
                self.poll()
                if not self._free:
                    self.skipped += 1
                    return None
        event = self._free.pop()
        timer.record(event)
        marker = Marker(event, host_s, blocked_s)
        self._pending.append(marker)
        return marker

    def poll(self) -> None:
        """Resolve the markers the device has reached, oldest first (a stream reaches them in order)."""
        pending, timer = self._pending, self._timer
        while pending and timer.done(pending[0].event):
            marker = pending.popleft()
            last = self._last
            if last is None or last.device_s is None:
                marker.device_s = marker.host_s  # the first marker: the stream is taken as drained
            else:
                marker.device_s = max(marker.host_s, last.device_s + timer.elapsed_s(last.event, marker.event))
            if last is not None:
                self._free.append(last.event)
                last.event = None
            self._last = marker

    @property
    def pending(self) -> int:
        return len(self._pending)


def _phase_busy(start: Marker, start_host_s: float, end: Marker) -> tuple[float, float]:
    """Device-busy estimate of the work queued between two resolved markers, and the device time
    in which the device may have been busy unseen (the estimate is a lower bound by that much).

    If the device had not reached ``start`` when the host recorded ``end``, the whole phase was
    queued before the device began it, so it ran back to back: ``d(end) - d(start)``. Otherwise
    the device kept pace with the host for a while, and what it did in that while is known only
    where the host was blocked in a synchronising call (the device was busy then) or after the
    host's last launch; never more than the span from the phase's possible start to its end. The
    rest of that span is unseen: the device may or may not have been busy in it.
    """
    d_start, d_end = start.device_s, end.device_s
    assert d_start is not None and d_end is not None
    if d_start >= end.host_s:
        return max(0.0, d_end - d_start), 0.0
    span = max(0.0, d_end - max(d_start, start_host_s))
    seen = max(0.0, min(span, d_end - end.host_s + end.blocked_s - start.blocked_s))
    return seen, span - seen


def step_timing(
    start: Marker | None,
    backward: Marker | None,
    optimizer: Marker | None,
    end: Marker | None,
    data_wait_s: float,
    step_s: float,
) -> tuple[tuple[float, float, float, float, float, float, float], bool] | None:
    """(busy, forward, backward, optimizer, idle, idle during the data wait, host ahead) of one
    step and whether busy is only a lower bound (idle then an upper bound: more than
    UNSEEN_TOLERANCE of the step is device time the markers cannot tell busy or idle), or None
    until its start and end markers are resolved.

    The step is taken to begin with its data wait, as steps do behind a DataLoader. A phase
    whose marker is missing (no backward pass, no optimizer) counts in the one before it.
    """
    if start is None or end is None or start.device_s is None or end.device_s is None:
        return None
    # The phase boundaries present, in host order; each phase runs to the next boundary.
    wait_end = start.host_s + data_wait_s
    bounds = [(0, start, wait_end)]
    for index, marker in ((1, backward), (2, optimizer)):
        if marker is not None and marker.device_s is not None and start.host_s <= marker.host_s <= end.host_s:
            bounds.append((index, marker, marker.host_s))
    if len(bounds) == 3 and bounds[2][1].host_s < bounds[1][1].host_s:
        bounds[1], bounds[2] = bounds[2], bounds[1]  # an optimizer step before the backward pass
    phases = [0.0, 0.0, 0.0]
    unseen = 0.0
    for i, (index, marker, host_s) in enumerate(bounds):
        following = bounds[i + 1][1] if i + 1 < len(bounds) else end
        busy, phase_unseen = _phase_busy(marker, host_s, following)
        phases[index] += busy
        unseen += phase_unseen
    busy = phases[0] + phases[1] + phases[2]
    idle_data_wait = min(data_wait_s, max(0.0, wait_end - start.device_s))
    idle = max(0.0, step_s - busy)
    ahead = max(0.0, end.device_s - end.host_s)
    return (busy, phases[0], phases[1], phases[2], idle, idle_data_wait, ahead), unseen > UNSEEN_TOLERANCE * step_s
