"""A simulated CUDA device for the probes' device timing, and a driver for training scenarios.

``SimDevice`` is a single stream on a fake clock: the host launches kernels (each costs host
time and queues device work), the device runs them in order as soon as it is free, a sync such as
``loss.item()`` blocks the host until the device has caught up, and a full launch queue blocks
the host while the device is more than ``max_queue_s`` behind. It implements the probes'
``DeviceTimer`` (record, query, elapsed) on that clock, so a real ``StepProbe`` runs unchanged
on it: its hook methods are called as the patched DataLoader, autograd and optimizer would call
them, its ``item()`` wrapper is the probe's own, and its datagrams are decoded with the wire
module and turned into ``StepRecord``s as the daemon's ingest does.

``run_scenario`` returns those records together with the simulation's ground truth per step.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import os
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

from profilerd.model import StepRecord
from profilerd.samplers.ingest import step_record
from profilerd_probes import core, signals, wire
from profilerd_probes.device import DeviceTimer

LAUNCH_LATENCY_S = 5e-6  # from a launch call to the earliest start of its kernel


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SimEvent:
    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = math.inf  # never recorded: never done


@dataclass
class SimDevice:
    """One stream on the fake clock."""

    clock: FakeClock
    max_queue_s: float = math.inf
    free_at: float = 0.0
    # Every kernel's launch, start and end times (each list in increasing order): the ground truth.
    launched: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    records: int = 0
    queries: int = 0
    elapsed_calls: int = 0

    def launch(self, kernel_s: float, host_cost_s: float) -> None:
        self.clock.advance(host_cost_s)
        start = max(self.free_at, self.clock.now + LAUNCH_LATENCY_S)
        self.free_at = start + kernel_s
        self.launched.append(self.clock.now)
        self.starts.append(start)
        self.ends.append(self.free_at)
        if self.free_at - self.clock.now > self.max_queue_s:  # the launch queue is full
            self.clock.now = self.free_at - self.max_queue_s

    def sync(self) -> float:
        self.clock.now = max(self.clock.now, self.free_at)
        return 0.0

    # ---- the probes' DeviceTimer ----------------------------------------------------------------
    def allowed(self) -> bool:
        return True

    def new_event(self) -> SimEvent:
        return SimEvent()

    def record(self, event: SimEvent) -> None:
        self.records += 1
        event.at = max(self.free_at, self.clock.now + LAUNCH_LATENCY_S)

    def done(self, event: SimEvent) -> bool:
        self.queries += 1
        return event.at <= self.clock.now

    def elapsed_s(self, start: SimEvent, end: SimEvent) -> float:
        if not (self.done(start) and self.done(end)):
            raise RuntimeError("cudaErrorNotReady: elapsed time of an unfinished event")
        self.elapsed_calls += 1
        return end.at - start.at

    def busy_between(self, start: float, end: float) -> float:
        """Device seconds spent on kernels within the interval [start, end]."""
        first, last = bisect.bisect_right(self.ends, start), bisect.bisect_left(self.starts, end)
        return sum(min(self.ends[i], end) - max(self.starts[i], start) for i in range(first, last))

    def work_launched(self, start: float, end: float) -> float:
        """Device seconds of the kernels launched within the host interval [start, end)."""
        first, last = bisect.bisect_left(self.launched, start), bisect.bisect_left(self.launched, end)
        return sum(self.ends[i] - self.starts[i] for i in range(first, last))


class ConstantTimer:
    """A device that has always reached every marker (``reached``), or never; counts events made."""

    def __init__(self, reached: bool, elapsed_s: float = 1e-3) -> None:
        self.reached = reached
        self.elapsed = elapsed_s
        self.created = 0

    def allowed(self) -> bool:
        return True

    def new_event(self) -> object:
        self.created += 1
        return object()

    def record(self, event: object) -> None:
        return

    def done(self, event: object) -> bool:
        return self.reached

    def elapsed_s(self, start: object, end: object) -> float:
        if not self.reached:
            raise RuntimeError("cudaErrorNotReady: elapsed time of an unfinished event")
        return self.elapsed


@dataclass(frozen=True)
class Phase:
    kernels: int = 0
    kernel_s: float = 0.0
    launch_s: float = 20e-6  # host time to launch one kernel (Python, dispatcher, driver)


@dataclass(frozen=True)
class Scenario:
    name: str
    data_wait_s: float = 0.0005
    forward: Phase = Phase()
    backward: Phase = Phase()
    optimizer: Phase = Phase()
    item_every_step: bool = False  # loss.item() after the optimizer step
    max_queue_s: float = math.inf


@dataclass(frozen=True)
class Truth:
    """What the simulated device really did during one step's host span."""

    start_s: float
    end_s: float
    busy_s: float  # device time of the kernels the step launched
    idle_data_wait_s: float  # device idle while the host waited for the batch
    host_ahead_s: float  # device work still queued when the step ended


# The scenarios of issue #15, at sizes where the answer is unambiguous.
DATA_STARVED = Scenario(
    "data-starved",
    data_wait_s=0.060,
    forward=Phase(10, 0.001),
    backward=Phase(10, 0.002),
    optimizer=Phase(5, 0.0004),
)
COMPUTE_BOUND = Scenario(
    "compute-bound",
    forward=Phase(20, 0.0015),
    backward=Phase(20, 0.003),
    optimizer=Phase(10, 0.0005),
    max_queue_s=0.1,  # the host runs ahead until the launch queue (or the allocator) stops it
)
COMPUTE_BOUND_ITEM = Scenario(
    "compute-bound, loss.item() every step",
    forward=Phase(20, 0.0015),
    backward=Phase(20, 0.003),
    optimizer=Phase(10, 0.0005),
    item_every_step=True,
)
LOADER_OVERLAPPED = Scenario(
    "loader wait overlapped by GPU work",
    data_wait_s=0.030,
    forward=Phase(20, 0.002),
    backward=Phase(20, 0.004),
    optimizer=Phase(10, 0.001),
    max_queue_s=0.5,
)
LAUNCH_BOUND = Scenario(
    "launch-bound",
    forward=Phase(200, 5e-6, launch_s=40e-6),
    backward=Phase(200, 8e-6, launch_s=40e-6),
    optimizer=Phase(100, 3e-6, launch_s=40e-6),
)
SCENARIOS = (DATA_STARVED, COMPUTE_BOUND, COMPUTE_BOUND_ITEM, LOADER_OVERLAPPED, LAUNCH_BOUND)


class _Sender:
    """Stands in for the probes' DatagramSender: keeps every datagram."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.dropped_total = 0
        self.reconnected = False

    def ensure_connected(self) -> None:
        return

    def send(self, datagram: bytes, records: int = 1) -> bool:
        self.datagrams.append(datagram)
        return True

    def reset_after_fork(self) -> None:
        return


class _Optimizer:
    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.01, "params": []}]


@contextlib.contextmanager
def _fake_time(clock: FakeClock) -> Iterator[None]:
    """The probe modules see the fake clock as ``time.perf_counter`` (and the real wall clock)."""
    fake = types.SimpleNamespace(perf_counter=clock.perf_counter, time=time.time, monotonic=time.monotonic)
    saved = core.time, signals.time
    core.time = signals.time = fake  # type: ignore[assignment]
    try:
        yield
    finally:
        core.time, signals.time = saved


@dataclass
class Run:
    records: list[StepRecord]
    truths: list[Truth]
    device: SimDevice
    probe: core.StepProbe
    datagrams: list[bytes]  # everything the probe sent, hello and config included


def run_scenario(
    scenario: Scenario, steps: int = 60, device_timing: bool = True, timer: DeviceTimer | None = None
) -> Run:
    """Drive a real StepProbe through ``steps`` iterations of ``scenario`` on a SimDevice (whose
    markers come from ``timer`` instead, when given)."""
    clock = FakeClock()
    device = SimDevice(clock, max_queue_s=scenario.max_queue_s)
    sender = _Sender()
    truths: list[Truth] = []
    with _fake_time(clock):
        probe = core.StepProbe(sender)  # type: ignore[arg-type]
        if device_timing:
            probe.use_device_timer(timer or device)
        optimizer = _Optimizer()
        library_dir = os.path.dirname(os.__file__) + "/nowhere/"
        item = probe.syncs.wrap("item", lambda tensor: device.sync(), threading.get_ident, library_dir)
        for _ in range(steps):
            start = clock.now
            ahead = max(0.0, device.free_at - start)  # what the previous step left queued
            probe.on_loader_next_start(start)
            clock.advance(scenario.data_wait_s)
            probe.on_loader_next_end(start, clock.now)
            wait_end = clock.now
            _launch(device, scenario.forward)
            backward_start = probe.on_backward_start(clock.now, None)
            _launch(device, scenario.backward)
            probe.on_backward_end(backward_start, clock.now)
            probe.on_optimizer_pre(optimizer)
            _launch(device, scenario.optimizer)
            probe.on_optimizer_post(optimizer)
            if scenario.item_every_step:
                item(object())
            truths.append(_truth(device, start, wait_end, clock.now, ahead))
        probe.flush()
    # The step ends where the next one starts (the next batch), so each truth spans to there.
    truths = [
        Truth(t.start_s, n.start_s, device.work_launched(t.start_s, n.start_s), t.idle_data_wait_s, n.host_ahead_s)
        for t, n in itertools.pairwise(truths)
    ]
    records = []
    for datagram in sender.datagrams:
        message = wire.decode(datagram)
        if isinstance(message, wire.StepBatch):
            records.extend(step_record(step, "sim", step.pid) for step in message.steps)
    return Run(records, truths, device, probe, sender.datagrams)


def _launch(device: SimDevice, phase: Phase) -> None:
    for _ in range(phase.kernels):
        device.launch(phase.kernel_s, phase.launch_s)


def _truth(device: SimDevice, start: float, wait_end: float, end: float, ahead: float) -> Truth:
    wait = wait_end - start
    return Truth(start, end, 0.0, wait - device.busy_between(start, wait_end), ahead)
