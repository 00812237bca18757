"""torch.compile with and without the probes: compiled step time ratio (target: within noise) and
the same compilation (graph count, graph breaks, results).

Each segment is a fresh process (so dynamo's caches and guards never mix the two modes) that
compiles a small MLP with inductor, trains ``--warmup`` untimed steps (compilation included),
then ``--steps`` timed ones, and prints its median step time, its dynamo counters and its final
loss. Segments run in alternating pairs, plain/probed then probed/plain, and the figure is the
median over pairs of probed/plain, in wall time and in the training thread's CPU time (which a
busy machine disturbs less). A second measurement runs in one process, installing and removing
the probes around ``--rounds`` alternating segments of the same compiled model (and checks that
this causes no recompilation).

    python benchmarks/bench_compile.py [--pairs 6] [--steps 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import LoadWatch, machine_info  # noqa: E402

SETUP = r"""
import json, os, statistics, sys, time
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)
import profilerd_probes as probes

if os.environ.get("PROBED") == "1":
    assert probes.install(os.environ["SOCKET"])  # no daemon there: the probes run, sends drop
import torch._dynamo.utils as dynamo_utils

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
compiled = torch.compile(model)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
n = 64 * 64
data = TensorDataset(torch.randn(n, 256), torch.randint(0, 10, (n,)))
loss_fn = nn.CrossEntropyLoss()


def batches():
    while True:
        yield from DataLoader(data, batch_size=64)


"""

SEGMENT = (
    SETUP
    + r"""
warmup, steps = int(os.environ["WARMUP"]), int(os.environ["STEPS"])
times, cpu = [], []
source = batches()
for i in range(warmup + steps):
    start, start_cpu = time.perf_counter(), time.thread_time()
    x, y = next(source)
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(compiled(x), y)
    loss.backward()
    opt.step()
    if i >= warmup:
        times.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
print(json.dumps({
    "median_s": statistics.median(times),
    "mean_s": statistics.mean(times),
    "cpu_median_s": statistics.median(cpu),
    "unique_graphs": dynamo_utils.counters["stats"]["unique_graphs"],
    "graph_breaks": sum(dynamo_utils.counters["graph_break"].values()),
    "final_loss": float(loss.detach()).hex(),
}))
"""
)


INTERLEAVED = (
    SETUP
    + r"""
source = batches()


def run(steps):
    cpu = []
    for _ in range(steps):
        start = time.thread_time()
        x, y = next(source)
        opt.zero_grad(set_to_none=True)
        loss_fn(compiled(x), y).backward()
        opt.step()
        cpu.append(time.thread_time() - start)
    return statistics.median(cpu)


run(int(os.environ["WARMUP"]))
graphs = dynamo_utils.counters["stats"]["unique_graphs"]
rounds = []
for i in range(int(os.environ["ROUNDS"])):
    order = ("plain", "probed") if i % 2 == 0 else ("probed", "plain")
    result = {}
    for mode in order:
        if mode == "probed":
            assert probes.install(os.environ["SOCKET"])
        result[mode] = run(int(os.environ["STEPS"]))
        probes.uninstall()
    rounds.append(result)
after = dynamo_utils.counters["stats"]["unique_graphs"]
print(json.dumps({"rounds": rounds, "graphs_before": graphs, "graphs_after": after}))
"""
)


def interleaved(socket_path: Path, warmup: int, rounds: int, steps: int) -> dict[str, Any]:
    """One process, the probes installed and removed around alternating segments: the CPU time
    ratio with process-to-process variation (allocator, caches, CPU placement) out of it."""
    env = dict(os.environ, SOCKET=str(socket_path), WARMUP=str(warmup), ROUNDS=str(rounds), STEPS=str(steps))
    env.update(OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", INTERLEAVED], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"interleaved run failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    ratios = [r["probed"] / r["plain"] for r in out["rounds"]]
    out["cpu_ratio_median"] = statistics.median(ratios)
    out["cpu_ratio_range"] = [min(ratios), max(ratios)]
    out["plain_cpu_ms"] = 1e3 * statistics.median(r["plain"] for r in out["rounds"])
    return out


def segment(probed: bool, socket_path: Path, warmup: int, steps: int) -> dict[str, Any]:
    env = dict(os.environ, PROBED="1" if probed else "0", SOCKET=str(socket_path), WARMUP=str(warmup))
    env.update(STEPS=str(steps), OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    watch = LoadWatch()
    proc = subprocess.run([sys.executable, "-c", SEGMENT], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"segment failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["others_cpu_ratio"] = watch.others()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6, help="alternating (plain, probed) pairs")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps (compilation) per segment")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per segment")
    parser.add_argument("--rounds", type=int, default=20, help="alternating segments in the one-process run")
    parser.add_argument("--round-steps", type=int, default=60, help="steps per segment in the one-process run")
    parser.add_argument("--json", type=Path, help="write every raw figure here")
    args = parser.parse_args(argv)
    load = LoadWatch()
    pairs = []
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        socket_path = Path(tmp) / "absent.sock"
        segment(False, socket_path, args.warmup, 5)  # fills inductor's on-disk caches for both
        for i in range(args.pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            runs = {probed: segment(probed, socket_path, args.warmup, args.steps) for probed in order}
            pairs.append({"plain": runs[False], "probed": runs[True]})
            plain, probed = runs[False], runs[True]
            print(
                f"pair {i + 1}: wall plain {1e3 * plain['median_s']:.3f} ms, probed {1e3 * probed['median_s']:.3f} ms; "
                f"CPU plain {1e3 * plain['cpu_median_s']:.3f} ms, probed {1e3 * probed['cpu_median_s']:.3f} ms"
            )
        one_process = interleaved(socket_path, args.warmup, args.rounds, args.round_steps)
    ratios = [p["probed"]["median_s"] / p["plain"]["median_s"] for p in pairs]
    cpu_ratios = [p["probed"]["cpu_median_s"] / p["plain"]["cpu_median_s"] for p in pairs]
    same = all(
        p["probed"][key] == p["plain"][key] for p in pairs for key in ("unique_graphs", "graph_breaks", "final_loss")
    )
    summary = {
        "ratio_median": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratio_range": [min(cpu_ratios), max(cpu_ratios)],
        "plain_ms_per_step": 1e3 * statistics.median(p["plain"]["median_s"] for p in pairs),
        "same_graphs_breaks_and_loss": same,
        "unique_graphs": pairs[0]["plain"]["unique_graphs"],
        "graph_breaks": pairs[0]["plain"]["graph_breaks"],
        "one_process_cpu_ratio_median": one_process["cpu_ratio_median"],
        "one_process_cpu_ratio_range": one_process["cpu_ratio_range"],
        "one_process_plain_cpu_ms": one_process["plain_cpu_ms"],
        "one_process_recompiled": one_process["graphs_after"] != one_process["graphs_before"],
    }
    m = dict(machine_info(), torch=importlib.metadata.version("torch"))
    print(f"\nmachine: {m['nproc']} CPUs, {m['cpu_model']}, Python {m['python']}, torch {m['torch']}")
    print(f"other processes used {100 * load.result()['other_processes_cpu_ratio']:.0f}% of a CPU meanwhile")
    print(
        f"compiled step {summary['plain_ms_per_step']:.3f} ms; probed/plain median {summary['ratio_median']:.4f} "
        f"(range {summary['ratio_range'][0]:.4f}-{summary['ratio_range'][1]:.4f}) over {len(pairs)} pairs; "
        f"step CPU time probed/plain median {summary['cpu_ratio_median']:.4f} "
        f"(range {summary['cpu_ratio_range'][0]:.4f}-{summary['cpu_ratio_range'][1]:.4f})"
    )
    print(
        f"graphs {summary['unique_graphs']}, graph breaks {summary['graph_breaks']}; "
        f"same graphs, breaks and final loss in every segment: {same}"
    )
    low, high = summary["one_process_cpu_ratio_range"]
    print(
        f"one process, {args.rounds} alternating segments of {args.round_steps} steps: step CPU time "
        f"probed/plain median {summary['one_process_cpu_ratio_median']:.4f} (range {low:.4f}-{high:.4f}), "
        f"plain {summary['one_process_plain_cpu_ms']:.3f} ms; recompiled on install/uninstall: "
        f"{summary['one_process_recompiled']}"
    )
    if args.json:
        raw = {"machine": m, "load": load.result(), "summary": summary, "pairs": pairs, "one_process": one_process}
        args.json.write_text(json.dumps(raw, indent=2))
        print(f"wrote {args.json}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
