"""A simulated CUDA device for CPU tests: one stream, a bounded launch queue, events.

A training loop is described by its host costs (data wait, launch cost per kernel, Python work,
a per-step ``.item()``) and its kernels' device durations. The simulation plays the host and
the stream against each other the way CUDA does (a kernel starts when it is launched and the
stream is free; a launch blocks while the queue is full; a sync blocks the host until the
stream drains) and reports each step as the probes would: host-timed phases, and the device
timing the CUDA events at the phase boundaries give. NVML samples of the same GPU follow from
the stream's busy intervals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from profilerd.model import GpuProcess, GpuSample, StepRecord

H100 = "NVIDIA H100 80GB HBM3"


@dataclass(frozen=True)
class Loop:
    data_wait_s: float = 0.001  # the host blocks this long for each batch
    launch_s: float = 20e-6  # host time to launch one kernel
    forward: tuple[int, float] = (40, 1e-3)  # kernels, device seconds each
    backward: tuple[int, float] = (80, 1e-3)
    optimizer: tuple[int, float] = (10, 0.5e-3)
    exposed_comm_s: float = 0.0  # the stream waits this long for a collective after backward
    python_s: float = 0.2e-3  # host work per step outside the phases
    item_every_step: bool = False  # print(loss.item()): the host waits for the stream to drain
    max_ahead_s: float = 0.2  # how far the launch queue lets the host run ahead


@dataclass
class Stream:
    now: float = 0.0  # host clock
    free_at: float = 0.0  # when the stream finishes what is queued
    busy: list[tuple[float, float]] = field(default_factory=list)

    def launch(self, count: int, each_s: float, launch_s: float, max_ahead_s: float) -> None:
        for _ in range(count):
            self.now += launch_s
            if self.free_at - self.now > max_ahead_s:  # queue full: the launch blocks
                self.now = self.free_at - max_ahead_s
            start = max(self.now, self.free_at)
            self.free_at = start + each_s
            self.busy.append((start, self.free_at))

    def wait_device(self, seconds: float) -> None:
        """The stream waits (on another stream's collective) without computing."""
        self.free_at = max(self.now, self.free_at) + seconds

    def sync(self) -> float:
        waited = max(0.0, self.free_at - self.now)
        self.now += waited
        return waited

    def busy_within(self, start: float, end: float) -> float:
        spans = np.array(self.busy) if self.busy else np.zeros((0, 2))
        return float((np.clip(spans[:, 1], start, end) - np.clip(spans[:, 0], start, end)).sum())


def simulate(
    loop: Loop, steps: int = 300, rank: int = 0, pid: int = 100, start_unix_s: float = 1e6
) -> tuple[list[StepRecord], list[tuple[float, float]]]:
    """The step records of one rank, and its stream's busy intervals (unix seconds)."""
    stream = Stream()
    records = []
    for number in range(1, steps + 1):
        t0 = stream.now
        stream.now += loop.data_wait_s
        waited_until = stream.now
        idle_in_wait = (waited_until - t0) - stream.busy_within(t0, waited_until)
        phase_s = []
        kernel_s = []
        for count, each in (loop.forward, loop.backward):
            begin = stream.now
            stream.launch(count, each, loop.launch_s, loop.max_ahead_s)
            phase_s.append(stream.now - begin)
            kernel_s.append(count * each)
        stream.wait_device(loop.exposed_comm_s)
        begin = stream.now
        stream.launch(*loop.optimizer, loop.launch_s, loop.max_ahead_s)
        phase_s.append(stream.now - begin)
        kernel_s.append(loop.optimizer[0] * loop.optimizer[1])
        sync_s = stream.sync() if loop.item_every_step else 0.0
        stream.now += loop.python_s
        end = stream.now
        step_s = end - t0
        busy = stream.busy_within(t0, end)
        scale = busy / sum(kernel_s) if sum(kernel_s) else 0.0  # this span's busy time, by phase
        records.append(
            StepRecord(
                "simjob",
                rank,
                pid,
                number,
                start_unix_s + end,
                step_s,
                data_wait_s=loop.data_wait_s,
                forward_s=phase_s[0],
                backward_s=phase_s[1],
                optimizer_s=phase_s[2],
                comm_s=loop.exposed_comm_s,  # the flight recorder's device duration
                sync_count=int(loop.item_every_step),
                sync_s=sync_s,
                gpu_busy_s=busy,
                gpu_forward_s=kernel_s[0] * scale,
                gpu_backward_s=kernel_s[1] * scale,
                gpu_optimizer_s=kernel_s[2] * scale,
                gpu_idle_s=step_s - busy,
                gpu_idle_data_wait_s=idle_in_wait,
                host_ahead_s=max(0.0, stream.free_at - end),
            )
        )
    return records, [(start_unix_s + a, start_unix_s + b) for a, b in stream.busy]


def nvml_samples(
    busy: list[tuple[float, float]],
    index: int,
    pid: int,
    start_unix_s: float,
    end_unix_s: float,
    name: str = H100,
    interval_s: float = 0.5,
) -> list[dict[str, object]]:
    """NVML samples of the GPU that ran ``busy``: utilization is the busy share of each interval
    (what NVML's counter measures), SM activity a little lower, the process on it listed."""
    stream = Stream(busy=[(a - start_unix_s, b - start_unix_s) for a, b in busy])
    samples = []
    t = start_unix_s + interval_s
    while t <= end_unix_s:
        share = stream.busy_within(t - interval_s - start_unix_s, t - start_unix_s) / interval_s
        sample = GpuSample(
            ts_unix_s=t,
            index=index,
            uuid=f"GPU-{index}",
            name=name,
            utilization_gpu_ratio=share,
            sm_active_ratio=0.8 * share,
            memory_used_bytes=40 << 30,
            memory_total_bytes=80 << 30,
            processes=(GpuProcess(pid, 30 << 30),),
        )
        samples.append(sample)
        t += interval_s
    return samples
