"""CPU cost of the probes' device-timing path, measured on the simulated device (no GPU needed).

Three figures, all on the training thread:

1. ``event_path_us_per_step``: the probe's own Python per step for device timing, timed directly:
   four markers (``DeviceClock.mark``: pool, record, pending queue), the resolution (``poll``:
   query, elapsed, recycle) and ``step_timing``. The timer's calls are no-ops here; on CUDA each
   record is a ``cudaEventRecord`` and each query a ``cudaEventQuery`` on top (see
   ``bench_probe_overhead.py --gpu`` for the whole cost on a real device).
2. ``probe_delta_us_per_step``: a real StepProbe driven through a scenario of tests/simdevice.py
   with the simulated timer against the same probe without one (CPU time per step, the
   difference of medians over alternated rounds): everything the feature adds, batching included.
3. ``cpu_only_us_per_step``: what a CPU-only run pays: the per-backward ``is_cuda`` check that
   would set device timing up, and the ``device is None`` tests on the hook paths.

    python benchmarks/bench_device_timing.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_info  # noqa: E402
from profilerd_probes import device  # noqa: E402
from tests.simdevice import COMPUTE_BOUND_ITEM, ConstantTimer, run_scenario  # noqa: E402


def event_path_us(steps: int) -> float:
    clock = device.DeviceClock(ConstantTimer(reached=True))  # always caught up: resolved at the next poll
    thread_time = time.thread_time
    begin = thread_time()
    now = 0.0
    for _ in range(steps):
        start = clock.mark(now, 0.0)
        backward = clock.mark(now + 0.01, 0.0)
        optimizer = clock.mark(now + 0.02, 0.0)
        end = clock.mark(now + 0.03, 0.0)
        clock.poll()
        device.step_timing(start, backward, optimizer, end, 0.001, 0.03)
        now += 0.03
    return (thread_time() - begin) / steps * 1e6


def probe_delta_us(steps: int, rounds: int) -> dict[str, float]:
    per_mode: dict[bool, list[float]] = {True: [], False: []}
    run_scenario(COMPUTE_BOUND_ITEM, steps=50)  # warm-up: first-call costs, the first config snapshots
    for i in range(rounds):
        for timing in (True, False) if i % 2 else (False, True):
            begin = time.thread_time()
            run_scenario(COMPUTE_BOUND_ITEM, steps=steps, device_timing=timing)
            per_mode[timing].append((time.thread_time() - begin) / steps * 1e6)
    on, off = statistics.median(per_mode[True]), statistics.median(per_mode[False])
    return {"with_timer_us_per_step": on, "without_us_per_step": off, "delta_us_per_step": on - off}


def cpu_only_us(calls: int) -> float:
    import torch

    loss = torch.ones(())
    holder: Any = type("Holder", (), {"device": None})()
    thread_time = time.thread_time
    begin = thread_time()
    for _ in range(calls):
        if holder.device is None and getattr(loss, "is_cuda", False):
            raise AssertionError
        # the hook paths' own `device is not None` tests: step start, backward, optimizer, end
        if holder.device is not None or holder.device is not None or holder.device is not None:
            raise AssertionError
    empty = thread_time() - begin
    begin = thread_time()
    for _ in range(calls):
        pass
    return max(0.0, empty - (thread_time() - begin)) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000, help="steps of the direct event-path timing")
    parser.add_argument("--probe-steps", type=int, default=1500, help="steps per simulated probe run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    event_path_us(1000)  # warm-up
    samples = [event_path_us(args.steps) for _ in range(5)]
    results = {
        "machine": machine_info(),
        "event_path_us_per_step": statistics.median(samples),
        "probe": probe_delta_us(args.probe_steps, args.rounds),
        "cpu_only_us_per_step": cpu_only_us(200_000),
    }
    print(f"event path (4 markers, resolve, derive): {results['event_path_us_per_step']:.2f} us/step (median of 5)")
    probe = results["probe"]
    print(
        f"simulated probe: {probe['with_timer_us_per_step']:.1f} us/step with the timer, "
        f"{probe['without_us_per_step']:.1f} without: +{probe['delta_us_per_step']:.2f} us/step"
    )
    print(f"CPU-only run: {results['cpu_only_us_per_step']:.3f} us/step for the device-timing checks")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
