"""TUI CPU budget: the `profilerd tui` process while a job runs (target < 5% of one core).

Starts a private `profilerd serve`, a CPU training job under `profilerd run --no-tui` that
reports to it, and `profilerd tui` inside a private tmux server (a real terminal, 120×40, so
Textual renders as it would for a user). Once the TUI shows the job, the TUI process's CPU
time (user + system, psutil) is sampled over the window; the figure is CPU seconds per wall
second, i.e. the share of one core.

    python benchmarks/bench_tui.py                   # default refresh, 20 s window, ~45 s total
    python benchmarks/bench_tui.py --window 30 --refresh 0.5 --json out.json

Needs tmux.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
RULES = "[evidence]\nmin_steps = 20\nmin_seconds = 2.0\n"


def measure(window_s: float, refresh_s: float | None, size: tuple[int, int]) -> dict[str, Any]:
    if shutil.which("tmux") is None:
        raise SystemExit("bench_tui needs tmux")
    work = Path(tempfile.mkdtemp(prefix="pd-bench-", dir="/tmp"))
    (work / "run").mkdir(mode=0o700)
    (work / "rules.toml").write_text(RULES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILERD_")}
    env.update(
        {
            "XDG_RUNTIME_DIR": str(work / "run"),
            "PROFILERD_DATA_DIR": str(work / "data"),
            "PROFILERD_HTTP_PORT": "0",
            "TERM": "xterm-256color",
            "COLORTERM": "truecolor",
        }
    )
    tmux = ["tmux", "-S", str(work / "tmux.sock")]
    server = subprocess.Popen(
        [sys.executable, "-m", "profilerd", "serve", "--gpu", "none", "--rules", str(work / "rules.toml")],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    job = None
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        url = line.split("serving ", 1)[1].split("/metrics", 1)[0]
        job_seconds = window_s + 25
        job = subprocess.Popen(
            [
                *(sys.executable, "-m", "profilerd", "run", "--no-tui", "--"),
                *(sys.executable, str(REPO / "examples/data_starved.py"), "--seconds", str(job_seconds)),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        refresh = f" --refresh {refresh_s}" if refresh_s else ""
        command = f"exec {sys.executable} -m profilerd tui --url {url}{refresh}"
        width, height = size
        subprocess.run(
            [*tmux, "new-session", "-d", "-s", "bench", "-x", str(width), "-y", str(height), command],
            env=env,
            check=True,
        )
        pane_pid = int(
            subprocess.run([*tmux, "list-panes", "-F", "#{pane_pid}"], capture_output=True, text=True).stdout
        )
        deadline = time.monotonic() + 60
        while True:  # wait until the TUI shows the job with a verdict
            screen = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True).stdout
            if "DATA-BOUND" in screen:
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"the TUI never showed a verdict:\n{screen}")
            time.sleep(0.5)
        process = psutil.Process(pane_pid)
        assert "tui" in " ".join(process.cmdline())
        before = process.cpu_times()
        started = time.monotonic()
        time.sleep(window_s)
        after = process.cpu_times()
        wall = time.monotonic() - started
        busy = (after.user - before.user) + (after.system - before.system)
        still_running = job.poll() is None
        return {
            "benchmark": "tui_cpu",
            "window_s": round(wall, 2),
            "refresh_s": refresh_s or 1.0,
            "terminal": f"{width}x{height}",
            "tui_cpu_seconds": round(busy, 3),
            "tui_cpu_share_of_one_core": round(busy / wall, 4),
            "rss_bytes": process.memory_info().rss,
            "job_running_throughout": still_running,
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
        }
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        if job is not None and job.poll() is None:
            job.terminate()
            job.wait(timeout=30)
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--window", type=float, default=20.0, help="seconds of measurement")
    parser.add_argument("--refresh", type=float, help="TUI refresh in seconds (default: its own, 1 s)")
    parser.add_argument("--size", default="120x40", help="terminal size, COLSxROWS")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    cols, rows = (int(v) for v in args.size.lower().split("x"))
    result = measure(args.window, args.refresh, (cols, rows))
    share = result["tui_cpu_share_of_one_core"]
    verdict = "within" if share < 0.05 else "OVER"
    print(
        f"profilerd tui at {result['terminal']}, refresh {result['refresh_s']:g} s, while a job runs: "
        f"{share:.1%} of one core over {result['window_s']:.0f} s ({verdict} the 5% budget); "
        f"RSS {result['rss_bytes'] / 2**20:.0f} MiB"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
