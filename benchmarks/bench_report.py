"""`profilerd report` on a 10-hour recording: budget < 15 s and < 2 GB of RAM per report.

The recording is synthetic (tests/fixtures/make_fixture.py): an 8-rank DDP job on one node
with 8 GPUs, 10 hours at about 10 steps/s (≈360k steps of each rank, 2.9M step rows, with
loss, grad-norm and collective-time columns as the probes write them),
GPU samples at 1 Hz (288k rows), host and process samples at 1 Hz, one throttle, one XID
error, a checkpoint pause and a burst of lost step messages. Each report format runs as
`python -m profilerd report FILE --format F -o OUT` in a fresh process, as a user runs it;
wall time and the child's peak RSS (getrusage) are measured.

    python benchmarks/bench_report.py                   # builds the recording once (~1 min), then reports
    python benchmarks/bench_report.py --hours 1 --ranks 2
    python benchmarks/bench_report.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.make_fixture import Job, Node, job_steps, write_recording  # noqa: E402

BUDGET_S = 15.0
BUDGET_BYTES = 2 << 30
STEPS_PER_S = 10.0  # 360k steps in 10 hours


def build(path: Path, hours: float, ranks: int, gpus: int, signals: bool = True) -> Path:
    """The synthetic recording, reused when it already exists with the same parameters."""
    if path.exists():
        return path
    seconds = hours * 3600
    job = Job(
        seconds=seconds,
        world_size=ranks,
        gpus_per_node=gpus,
        data_wait_s=0.030,
        forward_s=0.020,
        backward_s=0.030,
        optimizer_s=0.005,
        other_s=0.004,
        comm_s=0.006,
        signals=signals,  # grad norms and collective time, as the probes write them
        straggler_rank=ranks - 1 if ranks > 1 else None,
        throttle_span_s=(seconds * 0.40, seconds * 0.45),
        checkpoint_at_s=seconds * 0.5,
        lost_steps=(0, seconds * 0.3, 50),
        xid_at_s=seconds * 0.6,
        gpu_gap_span_s=(seconds * 0.7, seconds * 0.7 + 30),
        job_id="bench-10h",
    )
    # Scale the phases so the job makes STEPS_PER_S steps per second (the slowest of the
    # ranks sets each step, so more ranks make longer steps from the same phase means).
    sample = job_steps(replace(job, seconds=300.0))
    scale = float(sample.groupby("step")["step_s"].first().mean()) * STEPS_PER_S
    job = replace(
        job,
        **{
            name: getattr(job, name) / scale
            for name in ("data_wait_s", "forward_s", "backward_s", "optimizer_s", "other_s", "comm_s")
        },
    )
    started = time.perf_counter()
    write_recording(path, job, Node("bench-10h", "bench-node", tuple(range(ranks)), gpus=gpus))
    print(f"built {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.0f} s", flush=True)
    return path


def measure(recording: Path, fmt: str, out_dir: Path) -> dict[str, object]:
    out = out_dir / f"report.{fmt}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "profilerd", "report", str(recording), "--format", fmt, "-o", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    wall = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if result.returncode != 0:
        raise SystemExit(f"report --format {fmt} failed: {result.stderr}")
    # ru_maxrss of children is the largest of any child so far: a later, smaller child cannot
    # lower it, so formats are run smallest-first and the figure is honest for the largest.
    return {
        "format": fmt,
        "wall_s": round(wall, 2),
        "peak_rss_bytes": peak_kib * 1024,
        "peak_rss_grew": peak_kib > before,
        "output_bytes": out.stat().st_size,
    }


def stages(recording: Path) -> dict[str, float]:
    """Where the time of one HTML report goes (run in a child process: a fresh heap)."""
    from profilerd import recordings, report
    from profilerd.analysis.rules import load_rules
    from profilerd.recordings import timeline
    from profilerd.report.html import render_html

    ruleset, _ = load_rules()
    timings = {}
    started = time.perf_counter()
    loaded = recordings.load(recording)
    timings["load_s"] = time.perf_counter() - started
    started = time.perf_counter()
    document = report.verdict_document(loaded, ruleset)
    timings["verdict_s"] = time.perf_counter() - started
    started = time.perf_counter()
    summaries = timeline.summaries(loaded, ruleset.warmup_steps), timeline.data_quality(loaded)
    timings["of_which_timeseries_and_quality_s"] = time.perf_counter() - started
    del summaries
    started = time.perf_counter()
    render_html(timeline.report_data(loaded, document, ruleset.warmup_steps))
    timings["html_s"] = time.perf_counter() - started
    return {k: round(v, 2) for k, v in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=10.0)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--formats", default="json,text,md,html")
    parser.add_argument("--recording", type=Path, help="where the synthetic recording is cached")
    parser.add_argument("--json", dest="json_path", type=Path)
    parser.add_argument("--gpus", type=int, help="GPUs sampled (default: one per rank)")
    parser.add_argument("--without-signals", action="store_true", help="no grad-norm or collective-time columns")
    parser.add_argument("--stages-of", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stages_of:
        print(json.dumps(stages(args.stages_of)))
        return
    gpus = args.gpus or args.ranks
    name = f"profilerd-bench-{args.hours:g}h-{args.ranks}r-{gpus}g{'-plain' if args.without_signals else ''}.sqlite"
    path = args.recording or Path(tempfile.gettempdir()) / name
    recording = build(path, args.hours, args.ranks, gpus, signals=not args.without_signals)
    import sqlite3

    conn = sqlite3.connect(recording)
    counts = {
        t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
        for t in ("steps", "gpu_samples", "host_samples", "process_samples")
    }
    conn.close()
    print(f"rows: {counts}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="pd-bench-") as out_dir:
        for fmt in args.formats.split(","):
            row = measure(recording, fmt, Path(out_dir))
            results.append(row)
            ok = row["wall_s"] < BUDGET_S and int(row["peak_rss_bytes"]) < BUDGET_BYTES  # type: ignore[arg-type]
            print(
                f"{fmt:5} {row['wall_s']:6.2f} s  peak RSS {int(row['peak_rss_bytes']) / 2**20:6.0f} MiB  "  # type: ignore[arg-type]
                f"output {int(row['output_bytes']) / 1024:7.0f} KiB  {'within budget' if ok else 'OVER BUDGET'}",
                flush=True,
            )
    breakdown = subprocess.run(
        [sys.executable, __file__, "--stages-of", str(recording)], capture_output=True, text=True, cwd=REPO, check=True
    )
    stage_times = json.loads(breakdown.stdout)
    print(f"stages of one HTML report (in-process): {stage_times}", flush=True)
    summary = {
        "stages": stage_times,
        "hours": args.hours,
        "ranks": args.ranks,
        "gpus": gpus,
        "rows": counts,
        "recording_bytes": recording.stat().st_size,
        "results": results,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    if args.json_path:
        args.json_path.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
