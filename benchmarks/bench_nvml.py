"""Cost of one NVML sampling tick, in microseconds per GPU per ``sample()`` call.

Against the simulated library (default; built with the machine's C compiler) the clocks are
stepped by hand, so no time is spent sleeping and the figures are the Python + bindings cost
of a tick: "1 Hz" steps 1 s between calls, "10 Hz" 0.1 s (a new GPM window on every call), and
"burst" 10 ms (GPM values reused). With ``--real`` the system NVML is used and calls are paced
with real sleeps, because the driver's own caching depends on real time.

    python benchmarks/bench_nvml.py                 # simulated, 1 and 8 GPUs
    python benchmarks/bench_nvml.py --real          # this machine's GPUs
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from profilerd.gpu import nvml  # noqa: E402

RATES = {"1 Hz": 1.0, "10 Hz": 0.1, "burst": 0.01}


class SteppedClock:
    """A monotonic clock the benchmark advances, so GPM windows open without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _summary(per_device_us: list[float]) -> str:
    ordered = sorted(per_device_us)
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]
    return f"median {statistics.median(ordered):8.1f}  p95 {p95:8.1f}  max {ordered[-1]:8.1f}"


def bench_simulated(gpu_counts: list[int], calls: int) -> None:
    from profilerd.gpu.simnvml import Scenario, build_library

    with tempfile.TemporaryDirectory(prefix="bench-nvml-") as tmp:
        library = build_library(Path(tmp) / "lib")
        print(f"simulated NVML ({library.name}), {calls} calls per row; us per GPU per sample()")
        for count in gpu_counts:
            # The GPM pacing is the clock's job here; two processes per GPU exercise the NSpid path.
            scenario = Scenario.of(count, gpm_min_interval_ms=0)
            scenario.processes = [(g, pid, 1 << 30, 30) for g in range(count) for pid in (os.getpid(), os.getppid())]
            os.environ["SIMNVML_SCENARIO"] = str(scenario.write(Path(tmp) / f"s{count}.txt"))
            for label, step in RATES.items():
                clock = SteppedClock()
                started = time.perf_counter()
                backend = nvml.open_backend(library, clock=clock)
                open_ms = (time.perf_counter() - started) * 1e3
                if not isinstance(backend, nvml.NvmlBackend):
                    raise SystemExit(f"simulated NVML did not open: {backend.unavailable_reason}")
                timings: list[float] = []
                now = 1_700_000_000.0
                for i in range(calls + 20):
                    clock.now += step
                    now += step
                    t0 = time.perf_counter_ns()
                    backend.sample(now)
                    elapsed_us = (time.perf_counter_ns() - t0) / 1e3
                    if i >= 20:  # warm-up
                        timings.append(elapsed_us / count)
                errors = backend.error_count
                backend.close()
                print(f"  {count} GPU(s) {label:6} {_summary(timings)}  open {open_ms:6.1f} ms  errors {errors}")


def bench_real(seconds: float) -> None:
    backend = nvml.open_backend()
    if not isinstance(backend, nvml.NvmlBackend):
        raise SystemExit(f"no NVML here: {backend.unavailable_reason}")
    try:
        count = len(backend.devices())
        print(f"real NVML, driver {backend.driver_version}, {count} GPU(s); us per GPU per sample()")
        for label, interval in (("1 Hz", 1.0), ("10 Hz", 0.1)):
            timings: list[float] = []
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                t0 = time.perf_counter_ns()
                backend.sample(time.time())
                timings.append((time.perf_counter_ns() - t0) / 1e3 / count)
                time.sleep(interval)
            print(f"  {count} GPU(s) {label:6} {_summary(timings)}  calls {len(timings)}")
        print(f"  errors {backend.error_count}: {backend.error_counts()}")
    finally:
        backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="use the system NVML (real GPUs)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="simulated GPU counts")
    parser.add_argument("--calls", type=int, default=2000, help="sample() calls per simulated row")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per rate with --real")
    args = parser.parse_args()
    if args.real:
        bench_real(args.seconds)
    else:
        bench_simulated(args.gpus, args.calls)


if __name__ == "__main__":
    main()
