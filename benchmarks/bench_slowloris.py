"""`/metrics` latency of a real daemon, quiet and while 1,000 idle connections are held open.

A forked attacker (uid 12345 when run as root) opens CONNECTIONS loopback connections that
send `GET /metrics HTTP/1.1` and one header, never the blank line, and reopens each one the
daemon closes (issue 18's slowloris). The daemon (`profilerd serve --gpu none`, held to 1,024
descriptors as the issue found it) is scraped SCRAPES times in each phase; latencies, and the
daemon's descriptors and threads under attack, are printed.

    python benchmarks/bench_slowloris.py
    python benchmarks/bench_slowloris.py --connections 2000 --scrapes 500 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_shared_box import hold_idle_connections  # noqa: E402  (the attacker of the test)


def scrape(url: str, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
            response.read()
        latencies.append(time.perf_counter() - start)
        time.sleep(0.02)
    return latencies


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def resources(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    return {"descriptors": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pd-", dir="/tmp") as tmp:
        runtime = Path(tmp) / "run"
        runtime.mkdir(mode=0o700)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILERD_")}
        env.update({"XDG_RUNTIME_DIR": str(runtime), "PROFILERD_DATA_DIR": f"{tmp}/data", "PROFILERD_HTTP_PORT": "0"})
        daemon = subprocess.Popen(
            [sys.executable, "-m", "profilerd", "serve", "--gpu", "none"], env=env, stderr=subprocess.PIPE, text=True
        )
        assert daemon.stderr is not None
        url = daemon.stderr.readline().split("serving ")[1].split("/metrics")[0]
        resource.prlimit(
            daemon.pid, resource.RLIMIT_NOFILE, (1024, resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE)[1])
        )
        results: dict[str, Any] = {"connections": args.connections, "scrapes": args.scrapes}
        attacker = 0
        try:
            scrape(url, 10)  # warm-up
            results["quiet"] = summary(scrape(url, args.scrapes))
            read_fd, write_fd = os.pipe()
            attacker = os.fork()
            if attacker == 0:
                try:
                    hold_idle_connections(int(url.rsplit(":", 1)[1]), args.connections, write_fd)
                finally:
                    os._exit(1)
            os.close(write_fd)
            os.read(read_fd, 1)
            results["under_attack"] = summary(scrape(url, args.scrapes))
            results["daemon_under_attack"] = resources(daemon.pid)
        finally:
            if attacker:
                os.kill(attacker, signal.SIGKILL)
                os.waitpid(attacker, 0)
            daemon.terminate()
            daemon.wait(timeout=10)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
