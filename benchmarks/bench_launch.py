"""What a launch costs: whole-process wall and CPU of `profilerd run -- CMD` over `CMD` (issue 17).

Targets: <= 0.1 s added to an empty torch job; <= 1.03x on the 5 s examples; below every peer.

Each job runs plain and wrapped in alternating pairs (the order swaps every repeat, and the
tools take turns within a repeat, so drift in the machine's load hits every side alike); a
pair's ratio is wrapped/plain of that pair and the figure is the median over pairs. CPU is
the user+system time of the process tree that was waited for (os.wait4): the wrapper and the
training, not the detached daemon, whose CPU is reported apart ("daemon CPU": its whole life,
start and 2 s linger included, read from /proc until it leaves). Each `profilerd run` finds
no daemon (the previous one has left, or is told to): every launch here pays a daemon start.

Peers, where ``--peers-venv`` has them (pip install gpuprof==0.7.1 traceml-ai==0.5.0 into a
venv made with --system-site-packages), each through its documented least-change integration:
gpuprof's ``with gpuprof.profile(name):`` around the script (run by a two-line wrapper) and
``traceml run script.py``.

    python benchmarks/bench_launch.py --repeats 5 [--peers-venv /tmp/peers-venv] [--baseline main] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import LoadWatch, isolated_env, machine_info  # noqa: E402

TARGET_ADDED_EMPTY_S = 0.1
TARGET_RATIO_EXAMPLES = 1.03

# N steps of a tiny model (~0.3 ms a step: the per-step cost shows) or of a ~4.5 ms one. It
# notes when its training is done (END_STAMP_ENV): what follows until the launcher sees it
# exit is the end of a run (the probes' flush, the interpreter's teardown; the verdict).
END_STAMP_ENV = "BENCH_END_STAMP"
STEPS_JOB = textwrap.dedent("""
    import os, sys, time, torch
    torch.set_num_threads(1)
    steps, width = int(sys.argv[1]), int(sys.argv[2])
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(64, width)
    for _ in range(steps):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    if os.environ.get("BENCH_END_STAMP"):
        open(os.environ["BENCH_END_STAMP"], "w").write(repr(time.time()))
""")
GPUPROF_WRAPPER = textwrap.dedent("""
    import runpy, sys, gpuprof
    sys.argv = sys.argv[1:]
    with gpuprof.profile("bench"):
        runpy.run_path(sys.argv[0], run_name="__main__")
""")


# The empty job, stamped: when its interpreter has started (before `import torch`) and when the
# import is done (the probes installed, under profilerd), so that a launch's added time splits
# into the start (the wrapper's own, until the training's interpreter runs), the body (the
# bootstrap and the probes' install) and the end (the exit path and, wrapped, the verdict).
EMPTY_JOB = textwrap.dedent("""
    import os, time
    started = time.time()
    import torch
    if os.environ.get("BENCH_END_STAMP"):
        open(os.environ["BENCH_END_STAMP"], "w").write(f"{started!r} {time.time()!r}")
""")


def _timed(argv: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    stamp = cwd / "end.stamp"
    stamp.unlink(missing_ok=True)
    launched_unix_s = time.time()
    started = time.monotonic()
    process = subprocess.Popen(
        argv, env={**env, END_STAMP_ENV: str(stamp)}, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    errors = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    ended_unix_s = time.time()
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"{argv} exited {process.returncode}: {errors.decode(errors='replace')[-2000:]}")
    timed = {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime}
    if stamp.exists():  # from the training's last step done to the launcher seeing the exit
        *began, done = (float(value) for value in stamp.read_text().split())
        timed["end_s"] = ended_unix_s - done
        if began:
            timed["start_s"] = began[0] - launched_unix_s
            timed["body_s"] = done - began[0]
    running = _running_daemon(cwd / "run")
    if running:
        timed["daemon_start_phases"] = running.get("start_phases") or {}
        _watch_daemon_cpu(running["pid"], timed)
    return timed


def _running_daemon(runtime: Path) -> dict[str, Any] | None:
    """The run's daemon (still lingering): its pid and when it ingested, had imported the rest,
    and served, in seconds since its process started (profilerd.daemon.Daemon.start_phases)."""
    from profilerd.runtime import read_running_daemon

    return read_running_daemon(runtime / "profilerd")


def _cpu_of(pid: int) -> float | None:
    """User+system CPU seconds of a process that is not our child, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_daemon_watchers: list[threading.Thread] = []


def _watch_daemon_cpu(pid: int, timed: dict[str, Any]) -> None:
    """Sets ``timed["daemon_cpu_s"]`` to the CPU the daemon has used when last seen (to within
    its last 50 ms), from a thread that follows it until it leaves (while the next run goes on)."""

    def follow() -> None:
        while (cpu := _cpu_of(pid)) is not None:
            timed["daemon_cpu_s"] = cpu
            time.sleep(0.05)

    watcher = threading.Thread(target=follow, daemon=True)
    watcher.start()
    _daemon_watchers.append(watcher)


def _wait_daemon_gone(runtime: Path, limit_s: float = 15.0) -> None:
    """The for-runs daemon leaves ~2 s after its last run: wait, so the next launch starts one."""
    from profilerd.runtime import read_running_daemon

    deadline = time.monotonic() + limit_s
    while read_running_daemon(runtime / "profilerd") is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    while _daemon_watchers:
        _daemon_watchers.pop().join(timeout=max(0.0, deadline - time.monotonic()))


def compile_bytecode() -> None:
    """Compile profilerd's own modules as `pip install` does: a checkout run with
    PYTHONDONTWRITEBYTECODE=1 (this box's setting) otherwise compiles every module it imports
    (the wrapper's, the probes' in the training, the daemon's) again at each launch, which no
    installed profilerd does (the probes' install alone: ~45 ms of CPU instead of ~15 ms)."""
    import compileall

    for package in ("profilerd", "probes", "tui"):
        compileall.compile_dir(REPO / package, quiet=1)


def jobs(work: Path, steps_scaling: list[int], with_ranks: bool) -> dict[str, list[str]]:
    py = sys.executable
    empty = work / "empty.py"
    empty.write_text(EMPTY_JOB)
    steps = work / "steps.py"
    steps.write_text(STEPS_JOB)
    found = {
        "empty torch job": [py, str(empty)],
        "data-starved example, 5 s": [py, str(REPO / "examples/data_starved.py"), "--seconds", "5"],
        "compute-bound example, 5 s": [py, str(REPO / "examples/compute_bound.py"), "--seconds", "5"],
        "fast steps (1000 x ~4.5 ms)": [py, str(steps), "1000", "256"],
    }
    for n in steps_scaling:
        found[f"{n:,} tiny steps"] = [py, str(steps), str(n), "8"]
    if with_ranks:
        for ranks in (1, 2):
            found[f"torchrun, {ranks} rank(s), 3 s"] = [
                py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                str(REPO / "examples/ddp_cpu.py"), "--seconds", "3",
            ]  # fmt: skip
    return found


def baseline_tree(work: Path, revision: str) -> Path:
    """profilerd as of ``revision`` (git archive of this repository), importable from its root
    as the installed packages are (profilerd, profilerd_probes, profilerd_tui), compiled."""
    import compileall

    tree = work / f"profilerd-{revision}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    (tree / "profilerd_probes").symlink_to(tree / "probes", target_is_directory=True)
    (tree / "profilerd_tui").symlink_to(tree / "tui", target_is_directory=True)
    for package in ("profilerd", "probes", "tui"):
        compileall.compile_dir(tree / package, quiet=1)
    return tree


def wrappers(work: Path, peers_venv: Path | None, baseline: Path | None = None) -> dict[str, Any]:
    profilerd = [sys.executable, "-m", "profilerd", "run", "--no-status", "--"]
    found: dict[str, Any] = {"profilerd": lambda cmd: [*profilerd, *cmd]}
    if baseline is not None:  # first on the path: its packages, not this checkout's (nor its daemon)
        before = ["env", f"PYTHONPATH={baseline}", *profilerd]
        found[f"profilerd {baseline.name.removeprefix('profilerd-')}"] = lambda cmd: [*before, *cmd]
    if peers_venv is None:
        return found
    python = str(peers_venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import gpuprof"], capture_output=True)
    if probe.returncode == 0:
        wrapper = work / "gpuprof_wrap.py"
        wrapper.write_text(GPUPROF_WRAPPER)
        found["gpuprof 0.7.1"] = lambda cmd: [python, str(wrapper), *cmd[1:]] if cmd[1] != "-m" else None
    traceml = peers_venv / "bin" / "traceml"
    if traceml.exists():
        # `traceml run SCRIPT --args A B`: its own flags come before the script's arguments.
        found["traceml-ai 0.5.0"] = lambda cmd: (
            [str(traceml), "run", cmd[1], *(["--args", *cmd[2:]] if cmd[2:] else [])] if cmd[1] != "-m" else None
        )
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="pairs per job and wrapper (median of these)")
    parser.add_argument("--peers-venv", type=Path, help="a venv with gpuprof and traceml-ai installed")
    parser.add_argument("--scaling", default="1,10,10000,100000", help="tiny-step counts for the scaling rows")
    parser.add_argument("--ranks", action="store_true", help="also torchrun with 1 and 2 ranks")
    parser.add_argument("--only", help="only the jobs whose name contains one of these (comma-separated)")
    parser.add_argument("--baseline", help="also profilerd as of this git revision, side by side (e.g. main)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pd-bl-", dir="/tmp"))
    runtime = work / "run"
    runtime.mkdir(mode=0o700)
    env = isolated_env(work)
    scaling = [int(n) for n in args.scaling.split(",") if n]
    rows: list[dict[str, Any]] = []
    compile_bytecode()
    baseline = baseline_tree(work, args.baseline) if args.baseline else None
    watch = LoadWatch()
    try:
        for job, cmd in jobs(work, scaling, args.ranks).items():
            if args.only and not any(part in job for part in args.only.split(",")):
                continue
            tools = {tool: wrapped for tool, wrap in wrappers(work, args.peers_venv, baseline).items()
                     if (wrapped := wrap(cmd)) is not None}  # fmt: skip
            pairs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
            # Repeat by repeat, each tool's pair in turn: a drift in the machine's load hits every
            # tool alike, not the one whose pairs happened to run during it.
            for repeat in range(args.repeats):
                for tool, wrapped in tools.items():
                    _wait_daemon_gone(runtime)
                    pair_watch = LoadWatch()
                    order = ("plain", "wrapped") if repeat % 2 == 0 else ("wrapped", "plain")
                    pair = {side: _timed(cmd if side == "plain" else wrapped, env, work) for side in order}
                    pair["others_cpu"] = pair_watch.others()
                    pairs[tool].append(pair)
            _wait_daemon_gone(runtime)  # the last daemon's CPU is in
            for tool in tools:
                row = summarize(job, tool, pairs[tool])
                rows.append(row)
                print(format_row(row), flush=True)
    finally:
        _wait_daemon_gone(runtime)
        shutil.rmtree(work, ignore_errors=True)
    for line in per_step_lines(rows):
        print(line)
    document = {"machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "repeats": args.repeats, "load": watch.result(), "rows": rows}  # fmt: skip
    print(f"other processes used {document['load']['other_processes_cpu_ratio']:.2f} CPUs on average")
    if args.json:
        args.json.write_text(json.dumps(document, indent=2))
    return 0


def summarize(job: str, tool: str, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    def median(values: list[float]) -> float:
        return statistics.median(values)

    ratios = [p["wrapped"]["wall_s"] / p["plain"]["wall_s"] for p in pairs]

    return {
        "job": job,
        "tool": tool,
        "plain_wall_s": median([p["plain"]["wall_s"] for p in pairs]),
        "wrapped_wall_s": median([p["wrapped"]["wall_s"] for p in pairs]),
        "wall_ratio": median(ratios),
        "wall_added_s": median([p["wrapped"]["wall_s"] - p["plain"]["wall_s"] for p in pairs]),
        "cpu_ratio": median([p["wrapped"]["cpu_s"] / p["plain"]["cpu_s"] for p in pairs]),
        "cpu_added_s": median([p["wrapped"]["cpu_s"] - p["plain"]["cpu_s"] for p in pairs]),
        "ratio_range": [min(ratios), max(ratios)],
        "others_cpu": median([p["others_cpu"] for p in pairs]),
        **_end_medians(pairs),
        "pairs": pairs,
    }


def _end_medians(pairs: list[dict[str, Any]]) -> dict[str, float]:
    """The run's end on each side and the wrapped run's daemon start phases, where every pair has them."""
    found = {}
    for side in ("plain", "wrapped"):
        if all("end_s" in p[side] for p in pairs):
            found[f"{side}_end_s"] = statistics.median(p[side]["end_s"] for p in pairs)
    for phase in ("start", "body", "end"):  # the added wall, phase by phase: medians of the pairs' differences
        if all(f"{phase}_s" in p[side] for p in pairs for side in ("plain", "wrapped")):
            found[f"added_{phase}_s"] = statistics.median(
                p["wrapped"][f"{phase}_s"] - p["plain"][f"{phase}_s"] for p in pairs
            )
    if all("daemon_cpu_s" in p["wrapped"] for p in pairs):
        found["daemon_cpu_s"] = statistics.median(p["wrapped"]["daemon_cpu_s"] for p in pairs)
    for phase in ("ingesting", "imported", "serving"):
        phases = [p["wrapped"].get("daemon_start_phases", {}).get(phase) for p in pairs]
        if phases and None not in phases:
            found[f"daemon_{phase}_s"] = statistics.median(phases)
    return found


def per_step_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Launch cost against per-step cost: the tiny-step rows' added wall and CPU over the
    1-step row's, per extra step (what grows with the work, not with the launch)."""
    lines = []
    tiny = {
        (int(row["job"].split()[0].replace(",", "")), row["tool"]): row
        for row in rows
        if row["job"].endswith(" tiny steps")
    }
    for (steps, tool), row in sorted(tiny.items()):
        base = tiny.get((1, tool))
        if base is None or steps == 1:
            continue
        wall_us = (row["wall_added_s"] - base["wall_added_s"]) / (steps - 1) * 1e6
        cpu_us = (row["cpu_added_s"] - base["cpu_added_s"]) / (steps - 1) * 1e6
        row["per_step_added_us"] = {"wall": wall_us, "cpu": cpu_us}
        lines.append(
            f"{tool}: per launch {base['wall_added_s']:+.2f} s wall; per step beyond it, at {steps:,} steps: "
            f"{wall_us:+.1f} us wall, {cpu_us:+.1f} us CPU"
        )
    return lines


def format_row(row: dict[str, Any]) -> str:
    low, high = row["ratio_range"]
    return (
        f"{row['job']:34} {row['tool']:17} plain {row['plain_wall_s']:6.2f} s  wrapped {row['wrapped_wall_s']:6.2f} s  "
        f"wall {row['wall_ratio']:.3f}x ({row['wall_added_s']:+.2f} s, {low:.2f}-{high:.2f})  "
        f"cpu {row['cpu_ratio']:.3f}x ({row['cpu_added_s']:+.2f} s)  others {row['others_cpu']:.2f} CPU"
        + (f"  end {row['plain_end_s']:.2f} -> {row['wrapped_end_s']:.2f} s" if "wrapped_end_s" in row else "")
        + (
            f"  daemon ingests at {row['daemon_ingesting_s']:.2f} s, serves at {row['daemon_serving_s']:.2f} s"
            if "daemon_serving_s" in row
            else ""
        )
        + (f", daemon CPU {row['daemon_cpu_s']:.2f} s" if "daemon_cpu_s" in row else "")
        + (
            f"  added: start {row['added_start_s'] * 1e3:+.0f} ms, body {row['added_body_s'] * 1e3:+.0f} ms, "
            f"end {row['added_end_s'] * 1e3:+.0f} ms"
            if "added_start_s" in row
            else ""
        )
    )


if __name__ == "__main__":
    sys.exit(main())
