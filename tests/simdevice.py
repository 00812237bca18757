"""A simulated CUDA device for the probes' device timing, and a driver for training scenarios.

``SimDevice`` is a single stream on a fake clock: the host launches kernels (each costs host
time and queues device work), the device runs them in order as soon as it is free, a sync such as
``loss.item()`` blocks the host until the device has caught up, and a full launch queue blocks
the host while the device is more than ``max_queue_s`` behind. It implements the probes'
``DeviceTimer`` (record, query, elapsed) on that clock, so a real ``StepProbe`` runs unchanged
on it: its hook methods are called as the patched DataLoader, autograd and optimizer would call
them, its ``item()`` wrapper is the probe's own, and its datagrams are decoded with the wire
module and turned into ``StepRecord``s as the daemon's ingest does.

``run_scenario`` returns those records together with the simulation's ground truth per step,
and ``SimDevice.nvml_samples`` what NVML would report for the same GPU: the one simulator for
the probes' device timing and for the analysis on top of it (tests/test_device_timing.py,
tests/test_gpu_analysis.py).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import os
import socket
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

from profilerd.model import GpuProcess, GpuSample, StepRecord
from profilerd.samplers.ingest import Ingest
from profilerd.samplers.sinks import fan_out
from profilerd.store import Store
from profilerd_probes import core, signals
from profilerd_probes.device import DeviceTimer

LAUNCH_LATENCY_S = 5e-6  # from a launch call to the earliest start of its kernel
H100 = "NVIDIA H100 80GB HBM3"


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

    def wait(self, seconds: float) -> None:
        """The stream waits for work on another stream (DDP's NCCL all-reduce): no kernel of its
        own runs, yet the markers queued behind the wait are reached only after it."""
        self.free_at = max(self.free_at, self.clock.now + LAUNCH_LATENCY_S) + seconds

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

    def nvml_samples(
        self, index: int, pid: int, wall_offset_s: float, interval_s: float = 0.5, name: str = H100
    ) -> list[GpuSample]:
        """NVML samples of this GPU over the run (unix seconds = clock + ``wall_offset_s``):
        utilization is the kernels' busy share of each interval, SM activity a little lower."""
        samples = []
        t = (self.starts[0] if self.starts else self.clock.now) + interval_s
        while t <= self.clock.now:
            share = self.busy_between(t - interval_s, t) / interval_s
            samples.append(
                GpuSample(
                    ts_unix_s=t + wall_offset_s,
                    index=index,
                    uuid=f"GPU-{index}",
                    name=name,
                    utilization_gpu_ratio=share,
                    sm_active_ratio=0.8 * share,
                    memory_used_bytes=40 << 30,
                    memory_total_bytes=80 << 30,
                    processes=(GpuProcess(pid, 30 << 30),),
                )
            )
            t += interval_s
        return samples

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
    python_s: float = 0.0  # host work per step outside the phases (logging, bookkeeping)
    # DDP: after backward the stream waits this long for the gradient all-reduce (exposed
    # communication); DDP's sampled runtime stats tell the probe its share of the backward pass.
    exposed_comm_s: float = 0.0


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
DDP_COMM_BOUND = Scenario(
    "DDP communication-bound",
    forward=Phase(20, 0.0015),
    backward=Phase(20, 0.003),
    optimizer=Phase(10, 0.0005),
    max_queue_s=0.1,
    exposed_comm_s=0.060,
)
SCENARIOS = (DATA_STARVED, COMPUTE_BOUND, COMPUTE_BOUND_ITEM, LOADER_OVERLAPPED, LAUNCH_BOUND, DDP_COMM_BOUND)


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


class _Ddp:
    """What the probe reads of a DistributedDataParallel module: its sampled runtime stats (ns),
    here those of the scenario: the backward kernels, then the exposed all-reduce."""

    bucket_bytes_cap = 25 << 20
    find_unused_parameters = static_graph = gradient_as_bucket_view = False

    def __init__(self, scenario: Scenario) -> None:
        self.module = types.SimpleNamespace(parameters=list)  # no parameters of its own
        self.iteration = 0
        self.compute_ns = int(scenario.backward.kernels * scenario.backward.kernel_s * 1e9)
        self.comm_ns = int(scenario.exposed_comm_s * 1e9)

    def _get_ddp_logging_data(self) -> dict[str, int]:
        return {
            "iteration": self.iteration,
            "backward_compute_time_start": 1,
            "backward_compute_time_end": 1 + self.compute_ns,
            "backward_comm_time_end": 1 + self.compute_ns + self.comm_ns,
            "backward_comm_time": self.comm_ns,
        }


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

    def nvml_samples(self, index: int | None = None) -> list[GpuSample]:
        """NVML's samples of the GPU this rank ran on (GPU ``rank`` unless told)."""
        probe = self.probe
        return self.device.nvml_samples(
            probe.ident["rank"] if index is None else index, probe.ident["pid"], probe._wall_offset
        )


def run_scenario(
    scenario: Scenario,
    steps: int = 60,
    device_timing: bool = True,
    timer: DeviceTimer | None = None,
    rank: int = 0,
    pid: int | None = None,
    job: str = "sim",
    crash: bool = False,
) -> Run:
    """Drive a real StepProbe through ``steps`` iterations of ``scenario`` on a SimDevice (whose
    markers come from ``timer`` instead, when given), as ``rank`` of a job, under ``pid``; with
    ``crash`` the process dies after the last step (no flush at exit: what was sent is all)."""
    clock = FakeClock()
    device = SimDevice(clock, max_queue_s=scenario.max_queue_s)
    sender = _Sender()
    truths: list[Truth] = []
    with _fake_time(clock):
        probe = core.StepProbe(sender)  # type: ignore[arg-type]
        probe._rank = probe.ident["rank"] = rank
        probe.ident["job"] = probe.ident["run_id"] = job
        if pid is not None:
            probe._pid = probe.ident["pid"] = pid
        if device_timing:
            probe.use_device_timer(timer or device)
        ddp = _Ddp(scenario) if scenario.exposed_comm_s else None
        if ddp is not None:
            probe.note_ddp(ddp)
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
            if ddp is not None:
                ddp.iteration += 1
                device.wait(scenario.exposed_comm_s)
            probe.on_backward_end(backward_start, clock.now)
            probe.on_optimizer_pre(optimizer)
            _launch(device, scenario.optimizer)
            probe.on_optimizer_post(optimizer)
            if scenario.item_every_step:
                item(object())
            clock.advance(scenario.python_s)
            truths.append(_truth(device, start, wait_end, clock.now, ahead))
        if not crash:
            probe.flush()
    # The step ends where the next one starts (the next batch), so each truth spans to there.
    truths = [
        Truth(t.start_s, n.start_s, device.work_launched(t.start_s, n.start_s), t.idle_data_wait_s, n.host_ahead_s)
        for t, n in itertools.pairwise(truths)
    ]
    store = ingest(sender.datagrams)
    records = [r for steps in store.ring(job).values() for r in steps if r.pid == probe.ident["pid"]]
    return Run(records, truths, device, probe, sender.datagrams)


def ingest(datagrams: list[bytes], store: Store | None = None) -> Store:
    """The datagrams through the daemon's own Ingest into a Store, as the daemon takes them."""
    store = store if store is not None else Store(window_steps=100_000, window_s=1e12)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        receiver = Ingest(sock, store, fan_out(store, None), threading.Event())
        for datagram in datagrams:
            receiver.handle(datagram)
    return store


def _launch(device: SimDevice, phase: Phase) -> None:
    for _ in range(phase.kernels):
        device.launch(phase.kernel_s, phase.launch_s)


def _truth(device: SimDevice, start: float, wait_end: float, end: float, ahead: float) -> Truth:
    wait = wait_end - start
    return Truth(start, end, 0.0, wait - device.busy_between(start, wait_end), ahead)
