"""Host cost of the probes' wrapper around torch.distributed collectives (target <= 2 us/call).

One gloo process group of size 1 on loopback; `dist.all_reduce` and `dist.broadcast` on a tiny
tensor, alternating plain and probed segments in one run, median of the per-round difference.
The wrapper adds no synchronisation: it only reads the host clock around the call.

    python benchmarks/bench_collectives.py [--rounds 7] [--calls 3000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import profilerd_probes as probes


def segment(op: str, calls: int, tensor: torch.Tensor) -> float:
    fn = getattr(dist, op)
    start = time.perf_counter()
    for _ in range(calls):
        if op == "broadcast":
            fn(tensor, 0)
        else:
            fn(tensor)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--json", type=str)
    args = parser.parse_args()
    store = tempfile.mktemp(prefix="pd-bench-store-")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    tensor = torch.ones(16)
    results: dict[str, dict[str, float]] = {}
    socket_dir = tempfile.mkdtemp(prefix="pd-")
    for op in ("all_reduce", "broadcast"):
        segment(op, args.calls, tensor)  # warm-up
        diffs = []
        plain_times = []
        for _ in range(args.rounds):
            plain = segment(op, args.calls, tensor)
            probes.install(os.path.join(socket_dir, "absent.sock"))
            probed = segment(op, args.calls, tensor)
            probes.uninstall()
            diffs.append((probed - plain) * 1e6)
            plain_times.append(plain * 1e6)
        results[op] = {
            "plain_us_per_call": round(statistics.median(plain_times), 3),
            "wrapper_us_per_call": round(statistics.median(diffs), 3),
        }
        print(
            f"{op:12s} plain {results[op]['plain_us_per_call']:8.2f} us/call   "
            f"wrapper +{results[op]['wrapper_us_per_call']:.2f} us/call (target <= 2)"
        )
    dist.destroy_process_group()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
