"""Probe overhead: instrumented over plain on a ~5 ms CPU training step (targets: <= 1 %, <= 20 us/step).

Three measurements, all in this one process (the probes are installed and uninstalled per
segment; a receiver process runs the daemon's real ``Ingest`` so that sends really happen):

1. Training loop: a small MLP fed by a DataLoader over an in-memory dataset, one thread.
   Each round runs one segment of each mode in a shuffled order: ``plain`` (no probes),
   ``daemon`` (probes on, receiver bound) and ``absent`` (probes on, no socket file). The
   overhead is the median over rounds of (instrumented time / plain time of the same round),
   in wall time and in CPU time of the training thread.
2. Hook bodies, timed directly: loader ``__next__`` wrapper, forward pre+post, backward wrapper,
   optimizer pre+post, and the step close (hello/config checks, encode, send), each against a
   no-op baseline. Their sum is the probe's own CPU cost per step.
3. Trivial model: the same loop shape with near-zero compute (Linear(8, 1), pre-built batches),
   instrumented minus plain, per step: the hook bodies plus what torch pays to dispatch them.

    python benchmarks/bench_probe_overhead.py               # default run, about a minute
    python benchmarks/bench_probe_overhead.py --json out.json --rounds 15
    python benchmarks/bench_probe_overhead.py --gpu        # CUDA: device timing (events) on vs off

``--gpu`` runs the training loop on the GPU instead (a larger MLP, batches moved with
``non_blocking``) in three alternated modes: ``plain``, ``events_off`` (probes on,
PROFILERD_GPU_TIMING=0) and ``events_on`` (probes on, device timing on), and reports both
ratios over plain, the device timing's own share (events_on over events_off), and how many steps
carried device timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# after the path set-up, for `python benchmarks/<name>.py`
import profilerd_probes as probes  # noqa: E402
from benchmarks.machine import LoadWatch, machine_info, pin, wait_quiet  # noqa: E402
from profilerd_probes import core, wire  # noqa: E402

TARGET_RATIO = 1.01
TARGET_US_PER_STEP = 20.0
MODES = ("plain", "daemon", "absent")
# wall: mean step wall time; median: median step wall time; cpu: median step CPU time of the
# training thread; cpu_mean: mean step CPU time (includes the work done every Nth step).
CLOCKS = ("wall", "median", "cpu", "cpu_mean")
# Each instrumented segment starts a fresh probe; the steps it times are those a long training
# run spends its time in, past the probe's start-up (the loss read at every step at first).
STEADY_WARMUP = core.LOSS_EVERY_STEP_STEPS + 10
PLAIN_WARMUP = 25
NOMINAL_STEP_US = 5000.0  # the step the ratio target is set for


# ---- receiver process: the daemon's ingest, nothing else -------------------------------------
def receiver_main(path: str, cpu: int | None) -> None:
    """Child process: bind the socket, run Ingest until stdin closes, print the store's counters."""
    from profilerd.samplers.ingest import Ingest, bind_socket
    from profilerd.samplers.sinks import fan_out
    from profilerd.store import Store

    pin(cpu)
    store = Store()
    stop = threading.Event()
    sock = bind_socket(Path(path))
    ingest = Ingest(sock, store, fan_out(store, None), stop)
    ingest.start()
    print("ready", flush=True)
    sys.stdin.read()
    time.sleep(0.3)  # let the last datagrams in
    stop.set()
    ingest.join(2.0)
    sock.close()
    print(json.dumps({"received": dict(store.received), "dropped": dict(store.dropped)}), flush=True)


def _schedstat_s(path: str) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a task, in nanoseconds' precision
    (/proc/.../schedstat; 0.0, 0.0 where the kernel has no schedstats)."""
    try:
        with open(path) as f:
            run_ns, wait_ns, *_ = f.read().split()
    except (OSError, ValueError):
        return 0.0, 0.0
    return int(run_ns) / 1e9, int(wait_ns) / 1e9


def _context_switches() -> tuple[int, int]:
    """(voluntary, involuntary) context switches of the calling thread so far."""
    counts = {}
    with contextlib.suppress(OSError), open("/proc/thread-self/status") as f:
        for line in f:
            if line.endswith("ctxt_switches:\t" + line.rsplit("\t", 1)[-1]):
                name, value = line.split(":")
                counts[name] = int(value)
    return counts.get("voluntary_ctxt_switches", 0), counts.get("nonvoluntary_ctxt_switches", 0)


class SchedWatch:
    """What the scheduler did to the training thread during a segment, and how much CPU the
    receiver (the daemon's side) used meanwhile: the two ways a daemon can cost a training
    process beyond the probe's own code."""

    def __init__(self, receiver_pid: int | None) -> None:
        self.receiver_pid = receiver_pid
        self.thread0 = _schedstat_s("/proc/thread-self/schedstat")
        self.switches0 = _context_switches()
        self.receiver0 = self._receiver_cpu_s()

    def _receiver_cpu_s(self) -> float:
        if self.receiver_pid is None:
            return 0.0
        tasks = Path(f"/proc/{self.receiver_pid}/task")
        with contextlib.suppress(OSError):
            return sum(_schedstat_s(str(task / "schedstat"))[0] for task in tasks.iterdir())
        return 0.0

    def result(self, steps: int) -> dict[str, float]:
        run_s, wait_s = _schedstat_s("/proc/thread-self/schedstat")
        voluntary, involuntary = _context_switches()
        return {
            "train_run_s_per_step": (run_s - self.thread0[0]) / steps,
            "train_wait_s_per_step": (wait_s - self.thread0[1]) / steps,  # runnable, preempted
            "train_voluntary_switches": voluntary - self.switches0[0],
            "train_involuntary_switches": involuntary - self.switches0[1],
            "receiver_cpu_s": self._receiver_cpu_s() - self.receiver0,
        }


class Receiver:
    def __init__(self, path: Path, cpu: int | None) -> None:
        cmd = [sys.executable, __file__, "--_receiver", str(path)]
        if cpu is not None:
            cmd += ["--_cpu", str(cpu)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.pid = self.proc.pid
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"receiver did not start: {line!r}")

    def close(self) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])


# ---- workloads -----------------------------------------------------------------------------
def _forever(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


class Workload:
    """A training loop whose step is ``next(batch) -> forward -> loss -> backward -> step``."""

    def __init__(self, trivial: bool, batch: int, width: int, hidden: int, device: str = "cpu") -> None:
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, Dataset, TensorDataset

        torch.manual_seed(0)
        self.torch = torch
        if trivial:
            x, y = torch.randn(16, 8), torch.randn(16, 1)

            class Fixed(Dataset):  # a pre-built batch: the loader does almost nothing
                def __len__(self) -> int:
                    return 1024

                def __getitem__(self, i: int) -> Any:
                    return x, y

            loader = DataLoader(Fixed(), batch_size=None)
            self.model = nn.Linear(8, 1)
            self.loss = nn.functional.mse_loss
        else:
            n = batch * 64
            data = TensorDataset(torch.randn(n, width), torch.randint(0, 10, (n,)))
            loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True)
            self.model = nn.Sequential(
                nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10)
            )
            self.loss = nn.functional.cross_entropy
        self.device = device
        if device != "cpu":
            self.model = self.model.to(device)
            loader = DataLoader(loader.dataset, batch_size=batch, shuffle=True, drop_last=True, pin_memory=True)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        self.batches = _forever(loader)

    def run(self, steps: int) -> tuple[list[float], list[float]]:
        """Runs ``steps`` steps; returns each one's wall time and training-thread CPU time.

        The two clock reads per step (~0.5 us) are the same in every mode.
        """
        batches, model, loss_fn, optimizer = self.batches, self.model, self.loss, self.optimizer
        device = None if self.device == "cpu" else self.device
        pc, tt = time.perf_counter, time.thread_time
        wall, cpu = [], []
        w0, c0 = pc(), tt()
        for _ in range(steps):
            inputs, targets = next(batches)
            if device is not None:
                inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            w1, c1 = pc(), tt()
            wall.append(w1 - w0)
            cpu.append(c1 - c0)
            w0, c0 = w1, c1
        return wall, cpu


def run_segment(
    work: Workload, mode: str, paths: dict[str, Path], warmup: int, steps: int, receiver_pid: int | None = None
) -> dict[str, Any]:
    os.environ["PROFILERD_GPU_TIMING"] = "0" if mode == "events_off" else "1"  # read by install()
    if mode != "plain" and not probes.install(paths[mode]):
        raise RuntimeError("probes.install() failed")
    try:
        # Untimed: the first config snapshots, the eagerly sent first steps and the start-up
        # regime of the loss read (every step for the first LOSS_EVERY_STEP_STEPS); the plain
        # loop only needs its caches warm.
        work.run(min(warmup, PLAIN_WARMUP) if mode == "plain" else warmup)
        watch, sched = LoadWatch(), SchedWatch(receiver_pid)
        sent_before = probe.sender.sent if (probe := core.active()) is not None else 0
        wall, cpu = work.run(steps)
        scheduler = sched.result(steps)
        if work.device != "cpu":
            work.torch.cuda.synchronize()  # the benchmark's own: no segment's work spills into the next
        others = watch.others()
        probe = core.active()
        sender = {"sent": 0, "dropped": {}}
        if probe is not None:
            sender = {"sent": probe.sender.sent, "dropped": dict(probe.sender.dropped), "steps": probe.step_index}
            sender["sent_timed"] = probe.sender.sent - sent_before
            sender["device_timing"] = probe.device is not None
        elif mode != "plain":
            raise RuntimeError("the probe disabled itself during the segment")
    finally:
        probes.uninstall()
    return {
        "mode": mode,
        "steps": steps,
        "wall_s_per_step": statistics.mean(wall),  # includes every preemption by other processes
        "median_s_per_step": statistics.median(wall),  # robust to preemption and to rare slow steps
        "cpu_s_per_step": statistics.median(cpu),  # training-thread CPU time, median step
        "cpu_mean_s_per_step": statistics.mean(cpu),  # includes the periodic work (grad norm, config)
        "others_cpu_ratio": others,
        "sender": sender,
        "scheduler": scheduler,
    }


def alternate(
    work: Workload,
    paths: dict[str, Path],
    rounds: int,
    warmup: int,
    steps: int,
    seed: int,
    modes: tuple[str, ...] = MODES,
    receiver_pid: int | None = None,
) -> list[list[dict[str, Any]]]:
    rng = random.Random(seed)
    for mode in modes:  # one untimed pass of each: caches, allocator, first-call costs
        run_segment(work, mode, paths, warmup, max(10, steps // 10), receiver_pid)
    out = []
    for _ in range(rounds):
        order = list(modes)
        rng.shuffle(order)
        out.append([run_segment(work, mode, paths, warmup, steps, receiver_pid) for mode in order])
    return out


def summarise(rounds: list[list[dict[str, Any]]], quiet_threshold: float) -> dict[str, Any]:
    """Medians over rounds; over the quiet rounds only (no segment where other processes used
    quiet_threshold CPUs or more) when there are at least 5 of them."""
    all_rounds = [{seg["mode"]: seg for seg in segs} for segs in rounds]
    quiet = [r for r in all_rounds if max(seg["others_cpu_ratio"] for seg in r.values()) < quiet_threshold]
    by_round = quiet if len(quiet) >= 5 else all_rounds
    summary: dict[str, Any] = {
        "rounds_total": len(all_rounds),
        "rounds_quiet": len(quiet),
        "rounds_used": "quiet" if by_round is quiet else "all",
        "plain_ms_per_step": 1e3 * statistics.median(r["plain"]["median_s_per_step"] for r in by_round),
    }
    for mode in ("daemon", "absent"):
        for clock in CLOCKS:
            key = f"{clock}_s_per_step"
            ratios = [r[mode][key] / r["plain"][key] for r in by_round]
            diffs = [1e6 * (r[mode][key] - r["plain"][key]) for r in by_round]
            summary[f"{mode}_{clock}_ratio"] = statistics.median(ratios)
            summary[f"{mode}_{clock}_ratio_range"] = [min(ratios), max(ratios)]
            summary[f"{mode}_{clock}_us_per_step"] = statistics.median(diffs)
        sent = sum(r[mode]["sender"]["sent"] for r in by_round)
        summary[f"{mode}_sent"] = sent
        dropped: dict[str, int] = {}
        for r in by_round:
            for k, v in r[mode]["sender"]["dropped"].items():
                dropped[k] = dropped.get(k, 0) + v
        summary[f"{mode}_sender_dropped"] = dropped
    for mode in MODES:
        sched = [r[mode]["scheduler"] for r in by_round]
        summary[f"{mode}_scheduler"] = {
            "train_wait_us_per_step": statistics.median(1e6 * s["train_wait_s_per_step"] for s in sched),
            "train_involuntary_switches": statistics.median(s["train_involuntary_switches"] for s in sched),
            "train_voluntary_switches": statistics.median(s["train_voluntary_switches"] for s in sched),
            "receiver_cpu_us_per_step": statistics.median(
                1e6 * s["receiver_cpu_s"] / r[mode]["steps"] for s, r in zip(sched, by_round, strict=True)
            ),
        }
    return summary


# ---- hook bodies, timed directly ------------------------------------------------------------
def _noop1(a: Any) -> None:
    return None


def _noop2(a: Any, b: Any) -> None:
    return None


def _noop3(a: Any, b: Any, c: Any) -> None:
    return None


def _noop_any(*args: Any) -> None:
    return None


def _pair(first: Callable[..., Any], second: Callable[..., Any], args1: tuple, args2: tuple) -> None:
    first(*args1)
    second(*args2)


def _loop_s(fn: Callable[..., Any], args: tuple, n: int, repeats: int) -> float:
    best = float("inf")
    pc = time.perf_counter
    for _ in range(repeats):
        t0 = pc()
        for _ in range(n):
            fn(*args)
        best = min(best, pc() - t0)
    return best


def _one_step_datagram(*values: float) -> bytes:
    """A step as the probes send it: one packed record in a batch."""
    return wire.encode_step_batch([wire.pack_step_record(*values)])


def _cost_us(
    fn: Callable[..., Any],
    base: Callable[..., Any],
    args: tuple,
    n: int,
    repeats: int = 5,
    base_args: tuple | None = None,
) -> float:
    """Microseconds per call of ``fn(*args)`` beyond ``base(*base_args)`` (best of repeats)."""
    base_s = _loop_s(base, args if base_args is None else base_args, n, repeats)
    return 1e6 * (_loop_s(fn, args, n, repeats) - base_s) / n


def _paced_us(fn: Callable[[Any, float], Any], obj: Any, n: int, gap_s: float) -> tuple[float, float]:
    """Mean and median microseconds of ``fn(obj, now)`` timed one call at a time, calls ``gap_s``
    apart so the receiver drains its queue in between (training steps are milliseconds apart)."""
    pc = time.perf_counter
    samples, empty = [], []
    for _ in range(n):
        now = pc()
        t0 = pc()
        fn(obj, now)
        t1 = pc()
        samples.append(t1 - t0)
        while pc() - t0 < gap_s:
            pass
    for _ in range(n):  # the timer's own cost, measured the same way
        t0 = pc()
        t1 = pc()
        empty.append(t1 - t0)
    mean = statistics.mean(samples) - statistics.mean(empty)
    return 1e6 * mean, 1e6 * (statistics.median(samples) - statistics.median(empty))


def _close(probe: Any, now: float) -> None:
    """A step's end: tentative at its optimizer step, emitted when the next iteration begins."""
    probe._end_tentatively(now)
    probe._new_iteration(now)


def _send(pair: tuple[Any, bytes], now: float) -> None:
    pair[0].send(pair[1])


def _measure(costs: dict[str, Any], name: str, fn: Callable[[], float]) -> None:
    """One component; the probes' internals move, so a component that no longer fits is reported."""
    try:
        costs[name] = fn()
    except Exception as exc:  # report, do not crash the whole benchmark
        costs[name] = None
        print(f"  could not time {name}: {exc!r}", file=sys.stderr)


def grad_norm_cost(optimizer: Any, paths: dict[str, Path], step_s: float, repeats: int = 20) -> dict[str, Any]:
    """The periodic gradient-norm sample (every PROFILERD_GRAD_NORM_EVERY_S), per sample and
    amortised over the steps of ``step_s`` in its period."""
    from profilerd_probes.transport import DatagramSender

    sender = DatagramSender(paths["absent"])
    try:
        probe = core.StepProbe(sender)
        every_s = probe._grad_norm_every_s
        if not every_s:
            return {"every_steps": None, "per_sample_us": None, "per_step_us": 0.0}
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            probe._sample_grad_norm(optimizer, probe.current)
            times.append(time.perf_counter() - t0)
    finally:
        sender.close()
    per_sample = 1e6 * statistics.median(times)
    every_steps = max(1.0, every_s / step_s)
    return {"every_steps": round(every_steps), "per_sample_us": per_sample, "per_step_us": per_sample / every_steps}


def _optimizer_cycle(probe: Any, optimizer: Any) -> None:
    """pre + post hooks of one optimizer step; forgetting the ended step keeps the step close
    (timed on its own) out of this figure."""
    core._optimizer_pre(optimizer, (), {})
    core._optimizer_post(optimizer, (), {})
    probe.ended = None


def _noop_cycle(probe: Any, optimizer: Any) -> None:
    _noop3(optimizer, (), {})
    _noop3(optimizer, (), {})
    probe.ended = None


class _LoaderIterator:
    """What the loader wrapper reads from a DataLoader iterator (it keeps a weak reference: a
    bare object() would make the probe disable itself and every later hook time a no-op)."""

    _num_workers = 0
    _pin_memory = False
    _persistent_workers = False
    _dataset = None


def _hook_components(costs: dict[str, Any], probe: Any, module: Any, optimizer: Any, loss: Any, n: int) -> None:
    obj = _LoaderIterator()
    loader_next = core._make_loader_next(_noop1)
    backward = core._make_backward(_noop1, reads_loss=True)
    probe.optimizer_exists = True  # steps end at optimizer steps, not at each backward
    _measure(costs, "loader __next__ wrapper", lambda: _cost_us(loader_next, _noop1, (obj,), n))
    _measure(costs, "backward wrapper (no loss read)", lambda: _cost_us(backward, _noop1, (loss,), n))
    sink: list[float] = []
    capture = probe._loss.capture
    _measure(costs, "loss read (every step at first)", lambda: _cost_us(capture, _noop2, (loss, sink.append), n))
    opt = (probe, optimizer)
    _measure(costs, "optimizer pre+post hooks", lambda: _cost_us(_optimizer_cycle, _noop_cycle, opt, n))


def _noops(pair_args: tuple) -> tuple:
    """The same _pair call with no-op functions of the same arity: the baseline."""
    _, _, args1, args2 = pair_args
    by_arity = {1: _noop1, 2: _noop2, 3: _noop3}
    return (by_arity[len(args1)], by_arity[len(args2)], args1, args2)


def hook_costs(paths: dict[str, Path], n: int, close_n: int, training_optimizer: Any, step_s: float) -> dict[str, Any]:
    import torch

    from profilerd_probes.transport import DatagramSender

    results: dict[str, Any] = {}
    module = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    module(torch.randn(16, 8)).sum().backward()  # gradients exist, as after a real backward
    loss = torch.tensor(0.5)
    for where in ("daemon", "absent"):
        sender = DatagramSender(paths[where])
        probe = core.StepProbe(sender)
        probe.step_index = 7  # past the first config snapshots, not a grad-norm step: steady state
        probe._step_start = time.perf_counter()
        core.set_active(probe)
        costs: dict[str, Any] = {}
        try:
            if where == "daemon":
                _hook_components(costs, probe, module, optimizer, loss, n)
            before_sent, before_dropped = sender.sent, dict(sender.dropped)
            mean, median = _paced_us(_close, probe, close_n, 100e-6)
            costs["step close (hello/config checks, encode, send)"] = mean
            results[where] = {
                "costs_us": costs,
                "close_median_us": median,
                "close_sent": sender.sent - before_sent,
                "close_dropped": {k: v - before_dropped.get(k, 0) for k, v in sender.dropped.items()},
            }
            if where == "daemon":
                step_args = (1, 0, 1, 1, time.time(), 0.005, 0.001, 0.001, 0.002, 0.001, 0.0, 0, 0)
                parts = {"wire: one record packed and batched": _cost_us(_one_step_datagram, _noop_any, step_args, n)}
                datagram = _one_step_datagram(*step_args)
                send_mean, send_median = _paced_us(_send, (sender, datagram), close_n, 100e-6)
                parts["DatagramSender.send, mean"] = send_mean
                parts["DatagramSender.send, median"] = send_median
                results["close_parts_us"] = parts
            if core.active() is not probe:
                raise RuntimeError("the probe disabled itself while its hooks were timed")
        finally:
            core.set_active(None)
            sender.close()
    results["grad_norm"] = {
        "trivial model": grad_norm_cost(optimizer, paths, step_s),
        "training model": grad_norm_cost(training_optimizer, paths, step_s),
    }
    for where in ("daemon", "absent"):
        costs = dict(results["daemon"]["costs_us"])
        costs.update(results[where]["costs_us"])
        costs["grad-norm sample, amortised (training model)"] = results["grad_norm"]["training model"]["per_step_us"]
        results[where]["costs_us"] = costs
        results[where]["sum_us"] = sum(v for v in costs.values() if v is not None)
    return results


# Entry points of the probe's per-step work, timed inside the real training loop. The step's
# emission runs nested inside on_loader_next_start, the loss read inside on_backward_start, the
# grad-norm sample inside on_optimizer_pre: reported, not added to the sum.
IN_SITU_ENTRY = (
    "on_loader_next_start",
    "on_loader_next_end",
    "on_backward_start",
    "on_backward_end",
    "on_optimizer_pre",
    "on_optimizer_post",
)
IN_SITU_NESTED = ("_emit", "_sample_grad_norm")


def _timed(original: Callable[..., Any], durations: list[float]) -> Callable[..., Any]:
    pc = time.perf_counter

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = pc()
        try:
            return original(*args, **kwargs)
        finally:
            durations.append(pc() - t0)

    return wrapper


def in_situ(work: Workload, path: Path, warmup: int, steps: int, repeats: int = 3) -> dict[str, Any]:
    """Per-step time of each probe entry point inside the ~5 ms training loop.

    Microbenchmarks in tight loops run with hot caches; between two steps of real training the
    probe's code and data are evicted, and the same hook bodies cost several times more. Each
    call is timed; the per-step figure is (median call) x (calls per step), which keeps
    preemptions by other processes out. The grad-norm sample, a slow call every Nth step, is
    timed on its own (nested) and added.
    """
    targets: list[tuple[Any, str, str]] = [(core.StepProbe, n, n) for n in IN_SITU_ENTRY + IN_SITU_NESTED]
    with contextlib.suppress(ImportError):
        from profilerd_probes import signals

        targets.append((signals.DeferredScalar, "capture", "DeferredScalar.capture (loss, scale)"))
    runs: dict[str, list[tuple[float, float]]] = {}
    for _ in range(repeats):
        calls: dict[str, list[float]] = {}
        saved = []
        for owner, attr, label in targets:
            if attr in owner.__dict__:
                calls[label] = []
                saved.append((owner, attr, owner.__dict__[attr]))
                setattr(owner, attr, _timed(owner.__dict__[attr], calls[label]))
        try:
            if not probes.install(path):
                raise RuntimeError("probes.install() failed")
            work.run(warmup)
            for durations in calls.values():
                durations.clear()
            work.run(steps)
            probes.uninstall()
        finally:
            for owner, attr, original in saved:
                setattr(owner, attr, original)
        for label, durations in calls.items():
            if durations:
                robust = statistics.median(durations) * len(durations) / steps
                runs.setdefault(label, []).append((1e6 * robust, 1e6 * sum(durations) / steps))
    per_hook = {label: statistics.median(r[0] for r in values) for label, values in runs.items()}
    mean = {label: statistics.median(r[1] for r in values) for label, values in runs.items()}
    nested = (*IN_SITU_NESTED, "DeferredScalar.capture (loss, scale)")
    summed = [label for label in per_hook if label not in nested]
    return {
        "us_per_step": per_hook,
        "mean_us_per_step": mean,
        "sum_us": sum(per_hook[label] for label in summed),
        "steps": steps,
        "repeats": repeats,
    }


def estimate(res: dict[str, Any]) -> dict[str, float]:
    """The training loop's ratio predicted from the trivial loop's per-step cost (a precise
    measurement even on a busy machine) plus the grad-norm sample's extra cost on the larger model."""
    grad = res["hooks"]["grad_norm"]
    extra = (grad["training model"]["per_step_us"] or 0.0) - (grad["trivial model"]["per_step_us"] or 0.0)
    training = res["training"]["summary"]
    plain_us = 1e3 * training["plain_ms_per_step"]
    out = {}
    for mode in ("daemon", "absent"):
        per_step = res["trivial"]["summary"][f"{mode}_cpu_mean_us_per_step"] + extra
        out[f"{mode}_us_per_step"] = per_step
        out[f"{mode}_ratio"] = 1.0 + per_step / plain_us
        out[f"{mode}_ratio_at_5ms"] = 1.0 + per_step / NOMINAL_STEP_US  # a busy machine's step is longer
    # The daemon's side: the receiver's CPU per training step beyond its idle wake-ups (what a
    # daemon on the training's own core would take from it; pinned elsewhere here).
    receiver = training["daemon_scheduler"]["receiver_cpu_us_per_step"]
    out["receiver_us_per_step"] = max(0.0, receiver - training["plain_scheduler"]["receiver_cpu_us_per_step"])
    return out


# ---- report -----------------------------------------------------------------------------------
def _mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_loop(res: dict[str, Any], name: str) -> None:
    """One loop's ratios per clock, and what the scheduler and the receiver did per mode."""
    s = res[name]["summary"]
    cfg = res[name]["config"]
    print(
        f"\n[{name}] {cfg['rounds']} rounds x {cfg['steps']} steps per segment, "
        f"plain step {s['plain_ms_per_step']:.3f} ms; medians over {s['rounds_used']} rounds "
        f"({s['rounds_quiet']} of {s['rounds_total']} quiet)"
    )
    print(f"{'mode':<8}{'clock':<10}{'ratio':>9}{'(min-max)':>19}{'us/step':>10}{'sent':>9}  dropped by sender")
    for mode in ("daemon", "absent"):
        for clock in CLOCKS:
            lo, hi = s[f"{mode}_{clock}_ratio_range"]
            extra = f"{s[f'{mode}_sent']:>9}  {s[f'{mode}_sender_dropped']}" if clock == "wall" else ""
            print(
                f"{mode:<8}{clock:<10}{s[f'{mode}_{clock}_ratio']:>9.4f}{f'{lo:.4f}-{hi:.4f}':>19}"
                f"{s[f'{mode}_{clock}_us_per_step']:>10.1f}{extra}"
            )
    print(
        f"{'mode':<8}{'runnable, waiting us/step':>27}{'involuntary':>13}{'voluntary':>11}"
        f"{'receiver CPU us/step':>22}   (medians per segment)"
    )
    for mode in MODES:
        sched = s[f"{mode}_scheduler"]
        print(
            f"{mode:<8}{sched['train_wait_us_per_step']:>27.1f}{sched['train_involuntary_switches']:>13.0f}"
            f"{sched['train_voluntary_switches']:>11.0f}{sched['receiver_cpu_us_per_step']:>22.2f}"
        )


def print_report(res: dict[str, Any]) -> None:
    m = res["machine"]
    print(f"\nmachine: {m['nproc']} CPUs, {m['cpu_model']}, Python {m['python']}, torch {m['torch']}")
    print(f"other processes used {100 * res['load']['other_processes_cpu_ratio']:.0f}% of a CPU meanwhile")
    print(
        "clocks: wall = mean step wall time, median = median step wall time, "
        "cpu / cpu_mean = median / mean step CPU time of the training thread"
    )
    for name in ("training", "trivial"):
        print_loop(res, name)
    hooks = res["hooks"]
    print("\n[hook bodies] timed directly in tight loops, us per step (no-op baseline subtracted)")
    for where in ("daemon", "absent"):
        for name, us in hooks[where]["costs_us"].items():
            print(f"  {where:<7}{name:<52}{'n/a' if us is None else f'{us:7.2f}':>7}")
        print(f"  {where:<7}{'sum':<52}{hooks[where]['sum_us']:>7.2f}")
        print(f"  {'':<7}step close: sent {hooks[where]['close_sent']}, dropped {hooks[where]['close_dropped']}")
    for name, us in hooks["close_parts_us"].items():
        print(f"  {'part':<7}{name:<52}{us:>7.2f}")
    for name, g in hooks["grad_norm"].items():
        per_sample = "n/a" if g["per_sample_us"] is None else f"{g['per_sample_us']:.1f} us"
        print(f"  grad-norm sample every {g['every_steps']} steps, {name}: {per_sample} per sample")
    situ = res["in_situ"]
    print("\n[in situ] probe entry points timed inside the training loop, us per step (daemon present)")
    print(f"  {'':<52}{'median':>8}{'mean':>8}   (median: median call x calls per step)")
    notes = {
        "_emit": "  nested in on_loader_next_start, not summed",
        "_sample_grad_norm": "  nested, every Nth step",
        "DeferredScalar.capture (loss, scale)": "  nested, not summed",
    }
    for name, us in situ["us_per_step"].items():
        print(f"  {name:<52}{us:8.2f}{situ['mean_us_per_step'][name]:8.2f}{notes.get(name, '')}")
    print(f"  {'sum':<52}{situ['sum_us']:8.2f}")
    t = res["training"]["summary"]
    direct = hooks["daemon"]["sum_us"]
    trivial = res["trivial"]["summary"]["daemon_cpu_mean_us_per_step"]
    print("\nverdict (training loop: median over rounds)")
    for mode in ("daemon", "absent"):
        for clock in ("median", "cpu_mean"):
            ratio = t[f"{mode}_{clock}_ratio"]
            label = f"overhead ratio, {'daemon present' if mode == 'daemon' else 'daemon absent'} ({clock})"
            print(f"  {label:<44}{ratio:9.4f}    target <= {TARGET_RATIO}  {_mark(ratio <= TARGET_RATIO)}")
    est = res["estimate"]
    for mode in ("daemon", "absent"):
        ratio = est[f"{mode}_ratio"]
        label = f"ratio predicted from trivial loop ({mode})"
        print(f"  {label:<44}{ratio:9.4f}    target <= {TARGET_RATIO}  {_mark(ratio <= TARGET_RATIO)}")
    for mode in ("daemon", "absent"):
        ratio = est[f"{mode}_ratio_at_5ms"]
        label = f"the same at a 5 ms step ({mode})"
        print(f"  {label:<44}{ratio:9.4f}    target <= {TARGET_RATIO}  {_mark(ratio <= TARGET_RATIO)}")
    label = "receiver (daemon) CPU per training step"
    print(f"  {label:<44}{est['receiver_us_per_step']:9.1f} us (on another CPU here; not in the ratios)")
    for label, us in (
        ("probe CPU per step, in situ (training loop)", situ["sum_us"]),
        ("probe CPU per step, hook bodies (tight loops)", direct),
        ("probe CPU per step, trivial loop (cpu_mean)", trivial),
    ):
        print(f"  {label:<44}{us:9.1f} us target <= {TARGET_US_PER_STEP}  {_mark(us <= TARGET_US_PER_STEP)}")


GPU_MODES = ("plain", "events_off", "events_on")


def gpu_overhead(args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, Any]:
    """Device timing on vs off on a CUDA training loop (median step wall time, medians over rounds)."""
    import torch

    work = Workload(False, args.batch, 2048, 4096, device="cuda")
    rounds = alternate(work, paths, args.rounds, args.warmup, args.steps, args.seed, GPU_MODES)
    by_mode = {mode: [next(s for s in r if s["mode"] == mode) for r in rounds] for mode in GPU_MODES}

    def ratio(num: str, den: str) -> float:
        return statistics.median(
            a["median_s_per_step"] / b["median_s_per_step"] for a, b in zip(by_mode[num], by_mode[den], strict=True)
        )

    plain_ms = 1e3 * statistics.median(s["median_s_per_step"] for s in by_mode["plain"])
    return {
        "device": torch.cuda.get_device_name(),
        "driver_cuda": torch.version.cuda,
        "torch": torch.__version__,
        "plain_ms_per_step": plain_ms,
        "events_off_ratio": ratio("events_off", "plain"),
        "events_on_ratio": ratio("events_on", "plain"),
        "events_on_over_off": ratio("events_on", "events_off"),
        "device_timing_active": all(s["sender"].get("device_timing") for s in by_mode["events_on"]),
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="(plain, daemon, absent) rounds, >= 5")
    parser.add_argument("--steps", type=int, default=120, help="timed steps per training segment")
    parser.add_argument(
        "--warmup",
        type=int,
        default=STEADY_WARMUP,
        help="untimed steps at the start of each instrumented segment (default: past the probe's start-up)",
    )
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--trivial-rounds", type=int, default=9)
    parser.add_argument("--trivial-steps", type=int, default=1500)
    parser.add_argument("--hook-calls", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.15,
        help="a round counts as quiet if other processes used less than this many CPUs in each segment",
    )
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="wait up to this long for a quiet machine")
    parser.add_argument("--no-pin", action="store_true", help="do not pin trainer and receiver to CPUs")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--gpu", action="store_true", help="CUDA training loop: device timing on vs off")
    parser.add_argument("--training-only", action="store_true", help="the training loop's rounds only (quick)")
    parser.add_argument("--_receiver", help=argparse.SUPPRESS)
    parser.add_argument("--_cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._receiver:
        receiver_main(args._receiver, args._cpu)
        return 0
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")

    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    cpus = sorted(os.sched_getaffinity(0))
    train_cpu, recv_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 and not args.no_pin else (None, None)
    pin(train_cpu)
    if args.wait_quiet > 0:
        print(f"other processes use {wait_quiet(args.wait_quiet, args.quiet_threshold):.2f} CPUs; starting")
    load = LoadWatch()
    results: dict[str, Any] = {"machine": machine_info(), "cpus": [train_cpu, recv_cpu]}
    with tempfile.TemporaryDirectory(prefix="bench-probes-") as tmp_name:
        tmp = Path(tmp_name)
        os.chmod(tmp, 0o700)
        paths = {"daemon": tmp / "rt" / "ingest.sock", "absent": tmp / "absent" / "ingest.sock"}
        receiver = Receiver(paths["daemon"], recv_cpu)
        if args.gpu:
            paths["events_off"] = paths["events_on"] = paths["daemon"]
            try:
                results["gpu"] = gpu = gpu_overhead(args, paths)
            finally:
                results["receiver"] = receiver.close()
            print(f"\n[gpu] {gpu['device']}, torch {gpu['torch']} (CUDA {gpu['driver_cuda']})")
            print(f"  plain step {gpu['plain_ms_per_step']:.3f} ms (median over {args.rounds} rounds)")
            for key in ("events_off_ratio", "events_on_ratio", "events_on_over_off"):
                print(f"  {key:<22}{gpu[key]:9.4f}    target <= {TARGET_RATIO}  {_mark(gpu[key] <= TARGET_RATIO)}")
            print(f"  device timing active in every events_on segment: {gpu['device_timing_active']}")
            if args.json:
                args.json.write_text(json.dumps(results, indent=2, default=str))
            return 0
        try:
            work = Workload(False, args.batch, args.width, args.hidden)
            rounds = alternate(work, paths, args.rounds, args.warmup, args.steps, args.seed, receiver_pid=receiver.pid)
            results["training"] = {
                "config": {
                    "rounds": args.rounds,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "batch": args.batch,
                    "mlp": [args.width, args.hidden, args.hidden, 10],
                },
                "summary": summarise(rounds, args.quiet_threshold),
                "rounds": rounds,
            }
            if args.training_only:
                results["load"] = load.result()
                print_loop(results, "training")
                print(f"other processes used {results['load']['other_processes_cpu_ratio']:.2f} CPUs meanwhile")
                if args.json:
                    args.json.write_text(json.dumps(results, indent=2, default=str))
                return 0
            trivial = Workload(True, 0, 0, 0)
            rounds = alternate(
                trivial, paths, args.trivial_rounds, 200, args.trivial_steps, args.seed + 1, receiver_pid=receiver.pid
            )
            results["trivial"] = {
                "config": {"rounds": args.trivial_rounds, "steps": args.trivial_steps, "model": "Linear(8, 1)"},
                "summary": summarise(rounds, args.quiet_threshold),
                "rounds": rounds,
            }
            results["in_situ"] = in_situ(work, paths["daemon"], args.warmup, 2 * args.steps)
            step_s = results["training"]["summary"]["plain_ms_per_step"] / 1e3
            calls = args.hook_calls
            results["hooks"] = hook_costs(paths, calls, max(1000, calls // 10), work.optimizer, step_s)
        finally:
            results["receiver"] = receiver.close()
    results["load"] = load.result()
    results["estimate"] = estimate(results)
    results["targets"] = {"ratio": TARGET_RATIO, "us_per_step": TARGET_US_PER_STEP}
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
