"""Soak: many simulated ranks stepping at a steady rate against a real daemon on loopback.

The daemon runs as `profilerd serve` (recording on, no GPU). Each simulated rank is its own
process (forked from this one), because the daemon checks the kernel-reported pid of every
datagram: a rank is a process, as in a real job. Ranks form jobs of 8 and send what the probes
send: a hello, then every 50 ms one batch of the steps that finished meanwhile, non-blocking,
each record carrying the rank's own drop count; the last record goes out blocking, so the
daemon learns the final count.

Measured while it runs: the daemon's RSS and CPU once a second, and the latency of a
`/metrics` scrape every 0.25 s. At the end:

- accounting: the daemon's received + dropped messages (``profilerd_probe_messages_*_total``)
  against what the ranks attempted (hello + steps), and the rows in the recordings;
- bounds: every rank's live ring holds at most ``window_steps`` steps.

    python benchmarks/bench_soak.py                         # 64 ranks x 100 steps/s x 60 s
    python benchmarks/bench_soak.py --ranks 16 --duration 10 --window-steps 100 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import isolated_env  # noqa: E402
from profilerd_probes import wire  # noqa: E402 - after the path set-up, for `python benchmarks/bench_soak.py`

RANKS_PER_JOB = 8
BATCH_INTERVAL_S = 0.05  # the probes' BATCH_MAX_AGE_S
SCRAPE_INTERVAL_S = 0.25
_SAMPLE = re.compile(r"^(profilerd_probe_messages_(?:received|dropped)_total)\{(?:kind|reason)=\"([^\"]+)\"\} (\S+)$")


# ---- one simulated rank (a forked child) ------------------------------------------------------
def _record(pid: int, rank: int, seq: int, end_unix_s: float, step_s: float, dropped: int) -> bytes:
    phases = (step_s * 0.2, step_s * 0.3, step_s * 0.3, step_s * 0.1, 0.0)  # data, fwd, bwd, opt, comm
    signals = (0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0, 0, 0, 0)
    return wire.pack_step_record(pid, rank, seq, seq, end_unix_s, step_s, *phases, dropped, 0, *signals)


def rank_main(path: str, job: int, rank: int, rate: float, start_at: float, duration_s: float, out_fd: int) -> None:
    """Step at ``rate`` from ``start_at`` for ``duration_s``; write the counts to ``out_fd``."""
    pid = os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.connect(path)
    body = {
        "pid": pid,
        "job": f"soak-{job}",
        "run_id": f"soak-{job}",
        "rank": rank,
        "local_rank": rank,
        "world_size": RANKS_PER_JOB,
        "hostname": socket.gethostname(),
        "argv": ["bench_soak.py", f"--rank={rank}"],
        "started_unix_s": time.time(),
    }
    sock.send(wire.encode_json(wire.KIND_HELLO, body))  # blocking: a rank must be known
    sock.setblocking(False)
    attempted = sent = 1
    dropped = seq = 0
    step_s = 1.0 / rate
    time.sleep(max(0.0, start_at - time.monotonic()))
    end = start_at + duration_s
    next_tick = start_at
    while True:
        now = time.monotonic()
        due = min(int((min(now, end) - start_at) * rate), int(duration_s * rate) - 1) - seq
        records = []
        wall = time.time()
        for _ in range(max(0, due)):
            seq += 1
            records.append(_record(pid, rank, seq, wall, step_s, dropped))
        for first in range(0, len(records), wire.MAX_BATCH_RECORDS):
            chunk = records[first : first + wire.MAX_BATCH_RECORDS]
            attempted += len(chunk)
            try:
                sock.send(wire.encode_step_batch(chunk))
                sent += len(chunk)
            except BlockingIOError:
                dropped += len(chunk)
        if now >= end:
            break
        next_tick += BATCH_INTERVAL_S
        time.sleep(max(0.0, next_tick - time.monotonic()))
    seq += 1  # the last step goes out blocking: it tells the daemon the final drop count
    last = _record(pid, rank, seq, time.time(), step_s, dropped)
    sock.setblocking(True)
    sock.send(wire.encode_step_batch([last]))
    attempted += 1
    sent += 1
    sock.close()
    os.write(out_fd, (json.dumps({"attempted": attempted, "sent": sent, "dropped": dropped}) + "\n").encode())


def spawn_ranks(
    path: str, ranks: int, rate: float, start_at: float, duration_s: float, lockstep: bool
) -> tuple[list[int], int]:
    """Fork one process per rank. The ranks of a job step together (as DDP ranks do); jobs are
    out of phase with each other, unless ``lockstep`` puts every rank on the same tick."""
    read_fd, write_fd = os.pipe()
    pids = []
    jobs = (ranks + RANKS_PER_JOB - 1) // RANKS_PER_JOB
    for index in range(ranks):
        job = index // RANKS_PER_JOB
        phase = 0.0 if lockstep else BATCH_INTERVAL_S * job / jobs
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                os.close(read_fd)
                rank_main(path, job, index % RANKS_PER_JOB, rate, start_at + phase, duration_s, write_fd)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(write_fd)
    return pids, read_fd


# ---- the daemon -------------------------------------------------------------------------------------
class Daemon:
    def __init__(self, workdir: Path, window_steps: int, extra_config: tuple[str, ...] = ()) -> None:
        runtime = workdir / "run"
        runtime.mkdir(mode=0o700)
        config = workdir / "profilerd.toml"
        config.write_text("\n".join(["[daemon]", f"window_steps = {window_steps}", *extra_config]) + "\n")
        env = isolated_env(workdir, PROFILERD_CONFIG=str(config))
        self.socket_path = str(runtime / "profilerd" / "ingest.sock")
        self.runs_dir = workdir / "data" / "runs"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "profilerd", "serve", "--gpu", "none"], env=env, stderr=subprocess.PIPE, text=True
        )
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        if "serving http://" not in line:
            self.process.kill()
            raise RuntimeError(f"the daemon did not start: {line}{self.process.stderr.read()}")
        self.url = line.split("serving ")[1].split("/metrics")[0]
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.process.stderr is not None
        self.log.extend(self.process.stderr)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def cpu_s(self) -> float:
        with open(f"/proc/{self.process.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def get(self, path: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read()

    def counters(self) -> tuple[dict[str, float], dict[str, float]]:
        received: dict[str, float] = {}
        dropped: dict[str, float] = {}
        for line in self.get("/metrics").decode().splitlines():
            match = _SAMPLE.match(line)
            if match:
                target = received if "received" in match.group(1) else dropped
                target[match.group(2)] = float(match.group(3))
        return received, dropped

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


# ---- the soak ----------------------------------------------------------------------------------------
def _machine_busy_s() -> float:
    """CPU seconds used by everything on the machine so far (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_soak(
    ranks: int = 64,
    rate: float = 100.0,
    duration_s: float = 60.0,
    window_steps: int = 500,
    lockstep: bool = False,
    extra_config: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run one soak and return its figures (see the module docstring)."""
    workdir = Path(tempfile.mkdtemp(prefix="pd-soak-", dir="/tmp"))
    daemon = Daemon(workdir, window_steps, extra_config)
    try:
        start_at = time.monotonic() + 1.0 + ranks * 0.01  # every rank forked and said hello
        cpu0, t0, busy0, own0 = daemon.cpu_s(), time.monotonic(), _machine_busy_s(), _own_cpu_s()
        pids, read_fd = spawn_ranks(daemon.socket_path, ranks, rate, start_at, duration_s, lockstep)
        scrapes: list[float] = []
        scrape_at: list[float] = []
        memory: list[tuple[float, int]] = []
        stop = threading.Event()

        def scrape() -> None:
            while not stop.wait(SCRAPE_INTERVAL_S):
                started = time.perf_counter()
                daemon.get("/metrics")
                if time.monotonic() >= start_at:
                    scrapes.append(time.perf_counter() - started)
                    scrape_at.append(round(time.monotonic() - start_at, 3))

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        while time.monotonic() < start_at + duration_s:
            memory.append((round(time.monotonic() - start_at, 1), daemon.rss_bytes()))
            time.sleep(1.0)
        ring_sizes = []
        for job in range((ranks + RANKS_PER_JOB - 1) // RANKS_PER_JOB):
            document = json.loads(daemon.get(f"/api/v1/jobs/soak-{job}?steps=5000"))
            ring_sizes += [len(rank["recent_steps"]) for rank in document["rank_detail"]]
        stop.set()
        scraper.join()
        lines = b""
        for pid in pids:
            os.waitpid(pid, 0)
        ranks_cpu_s = _own_cpu_s() - own0  # this process and its reaped children: the ranks
        while chunk := os.read(read_fd, 65536):
            lines += chunk
        os.close(read_fd)
        senders = [json.loads(line) for line in lines.decode().splitlines()]
        attempted = sum(s["attempted"] for s in senders)
        deadline = time.monotonic() + 30
        while True:  # the daemon drains its socket queue
            received, dropped = daemon.counters()
            accounted = sum(received.values()) + sum(dropped.values())
            if accounted >= attempted or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        cpu_s = daemon.cpu_s() - cpu0
        wall_s = time.monotonic() - t0
        others_cores = max(0.0, _machine_busy_s() - busy0 - cpu_s - ranks_cpu_s) / wall_s
        health = daemon.get("/metrics").decode()
        analysis_s = re.search(r'profilerd_sampler_duration_seconds\{sampler="analysis"\} (\S+)', health)
        exit_code = daemon.stop()
        rows = 0
        for path in daemon.runs_dir.glob("*.sqlite"):
            conn = sqlite3.connect(path)
            rows += conn.execute("SELECT COUNT(*) FROM steps").fetchone()[0]
            conn.close()
        warm = [rss for t, rss in memory if t >= min(10.0, duration_s / 3)]
        return {
            "ranks": ranks,
            "rate_per_rank": rate,
            "duration_s": duration_s,
            "window_steps": window_steps,
            "lockstep": lockstep,
            "senders": len(senders),
            "attempted": attempted,
            "sent": sum(s["sent"] for s in senders),
            "sender_dropped": sum(s["dropped"] for s in senders),
            "received": received,
            "dropped": dropped,
            "accounted": accounted,
            "recorded_step_rows": int(rows),
            "ring_max": max(ring_sizes),
            "ring_min": min(ring_sizes),
            "ring_count": len(ring_sizes),
            "rss_start_bytes": memory[0][1] if memory else 0,
            "rss_warm_bytes": warm[0] if warm else 0,
            "rss_end_bytes": memory[-1][1] if memory else 0,
            "rss_max_bytes": max(rss for _, rss in memory) if memory else 0,
            "rss_series": memory,
            "daemon_cpu_cores": cpu_s / wall_s,
            "ranks_and_scraper_cpu_cores": ranks_cpu_s / wall_s,
            "other_processes_cpu_cores": others_cores,
            "analysis_cycle_s": float(analysis_s.group(1)) if analysis_s else None,
            "scrapes": len(scrapes),
            "scrape_p50_s": statistics.median(scrapes) if scrapes else None,
            "scrape_p99_s": _percentile(scrapes, 0.99),
            "scrape_max_s": max(scrapes) if scrapes else None,
            "scrape_latencies_s": list(zip(scrape_at, [round(x, 5) for x in scrapes], strict=False)),
            "daemon_exit_code": exit_code,
            "daemon_warnings": [line.strip() for line in daemon.log if "WARNING" in line or "Traceback" in line][:5],
        }
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--rate", type=float, default=100.0, help="steps per second per rank")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds")
    parser.add_argument("--window-steps", type=int, default=500, help="the daemon's window_steps")
    parser.add_argument("--lockstep", action="store_true", help="every rank on the same tick (worst case)")
    parser.add_argument("--daemon-config", action="append", default=[], help="extra [daemon] TOML line, e.g. 'x = 1'")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    result = run_soak(args.ranks, args.rate, args.duration, args.window_steps, args.lockstep, tuple(args.daemon_config))
    result["machine"] = {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    mib = 2**20
    ok = result["accounted"] == result["attempted"] and result["ring_max"] <= result["window_steps"]
    mode = "every rank in lockstep" if result["lockstep"] else "jobs of 8 ranks in step, jobs out of phase"
    print(f"{result['ranks']} ranks x {result['rate_per_rank']:.0f} steps/s x {result['duration_s']:.0f} s ({mode})")
    print(f"  messages attempted {result['attempted']:,}  sent {result['sent']:,}  dropped by senders "
          f"{result['sender_dropped']:,}")  # fmt: skip
    print(f"  daemon received {sum(result['received'].values()):,.0f} {result['received']}")
    print(f"  daemon dropped  {sum(result['dropped'].values()):,.0f} {result['dropped']}")
    print(f"  accounted {result['accounted']:,.0f} of {result['attempted']:,}: {'OK' if ok else 'MISMATCH'}")
    print(f"  recorded step rows {result['recorded_step_rows']:,}")
    print(f"  live rings: {result['ring_count']} ranks, {result['ring_min']}..{result['ring_max']} steps "
          f"(window_steps {result['window_steps']})")  # fmt: skip
    print(f"  daemon RSS start {result['rss_start_bytes'] / mib:.1f} MiB, warm {result['rss_warm_bytes'] / mib:.1f}, "
          f"end {result['rss_end_bytes'] / mib:.1f}, max {result['rss_max_bytes'] / mib:.1f}")  # fmt: skip
    print(
        f"  CPU in cores: daemon {result['daemon_cpu_cores']:.2f}, ranks and scraper "
        f"{result['ranks_and_scraper_cpu_cores']:.2f}, other processes {result['other_processes_cpu_cores']:.2f} "
        f"(of {os.cpu_count()}); last analysis cycle {result['analysis_cycle_s']:.3f} s"
    )
    print(f"  /metrics scrapes {result['scrapes']}: p50 {result['scrape_p50_s'] * 1e3:.1f} ms, "
          f"p99 {result['scrape_p99_s'] * 1e3:.1f} ms, max {result['scrape_max_s'] * 1e3:.1f} ms")  # fmt: skip
    print(f"  daemon exit code after SIGTERM {result['daemon_exit_code']}; warnings {result['daemon_warnings']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
