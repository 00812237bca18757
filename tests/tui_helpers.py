"""Helpers for testing the TUI (used by tests/test_tui*.py): the fixture recording, a fake JSON
server that can be taken away and brought back, canned daemon documents, and waiting on the app.

They live with the tests, beside the fixture they build, not in the installed package.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import Callable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fixtures.tui_make_recording import make_recording


def make_fixture_recording(directory: Path) -> Path:
    """The TUI's fixture recording (tests/fixtures/tui_make_recording.py), made in ``directory``."""
    return make_recording(directory)


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on its own event loop: no pytest async plugin is needed."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


async def wait_for(pilot: Any, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the app run until ``condition`` holds (data arrives from a worker thread)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.05)


class JsonServer:
    """A tiny HTTP server answering GETs from ``handler(path, query) -> (status, document)``.

    It can be stopped and started again on the same port, which is how the tests take a
    "daemon" away and bring it back.
    """

    def __init__(self, handler: Callable[[str, dict[str, list[str]]], tuple[int, Any]]) -> None:
        self.handler = handler
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self.requests: list[str] = []

    def start(self) -> JsonServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                outer.requests.append(self.path)
                status, document = outer.handler(parts.path, parse_qs(parts.query))
                body = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def daemon_documents(steps_total: int = 300) -> dict[str, Any]:
    """What a daemon's /api/v1 answers for one data-bound job with two ranks."""
    verdict = {
        "schema": "profilerd.verdict/v1",
        "run_id": "r1",
        "job": "train",
        "primary": "data",
        "severity": "critical",
        "summary": "DATA-BOUND: 43% of step time waiting for batches; 2 of 8 cores busy",
        "fractions": {"data_wait": 0.43, "compute": 0.5, "communication": 0.05, "other": 0.02},
        "phases": {
            "data_wait": 0.43,
            "forward": 0.2,
            "backward": 0.25,
            "optimizer": 0.05,
            "communication": 0.05,
            "other": 0.02,
        },
        "steps": 200,
        "ranks": 2,
        "duration_s": 20.0,
        "steps_per_s": 10.0,
        "step_time_s": {"p50": 0.1, "p95": 0.2, "mean": 0.11},
        "findings": [
            {
                "rule": "data.input_wait",
                "category": "data",
                "severity": "critical",
                "evidence": "43% of step time waiting for batches; 2 of 8 cores busy",
                "confidence": 0.9,
                "metrics": {},
                "thresholds": {"warning": 0.1, "critical": 0.2},
                "recommendations": [],
            },
            {
                "rule": "communication.straggler",
                "category": "communication",
                "severity": "warning",
                "evidence": "rank 1 is the straggler: its own work takes 36% of a step longer than the median rank's",
                "confidence": 0.7,
                "metrics": {"straggler_rank": 1.0},
                "thresholds": {"warning": 0.1, "critical": 0.25},
                "recommendations": [],
            },
        ],
        "recommendations": [
            {
                "id": "dataloader.num_workers",
                "title": "Raise DataLoader num_workers from 0 to 6",
                "estimated_speedup": 1.7,
                "how": "DataLoader(dataset, num_workers=6, persistent_workers=True)",
                "why": "6 of 8 cores are free",
                "rule": "data.input_wait",
            }
        ],
    }

    def steps(rank: int) -> list[dict[str, float]]:
        wait = 0.02 if rank == 0 else 0.06
        comm = 0.04 if rank == 0 else 0.0
        return [
            {
                "step": i,
                "end_unix_s": 1000.0 + i,
                "step_s": 0.1 + wait,
                "data_wait_s": wait,
                "compute_s": 0.06,
                "comm_s": comm,
                "other_s": 0.0,
            }
            for i in range(50)
        ]

    return {
        "/api/v1/jobs": {
            "jobs": [
                {"job": "train", "run_id": "r1", "alive": True, "primary": "data", "severity": "critical"},
            ]
        },
        "/api/v1/jobs/train": {
            "job": "train",
            "run_id": "r1",
            "ranks": [0, 1],
            "alive": True,
            "steps_total": steps_total,
            "primary": "data",
            "severity": "critical",
            "summary": verdict["summary"],
            "verdict": verdict,
            "rank_detail": [
                {
                    "rank": r,
                    "pid": 100 + r,
                    "hostname": "vm",
                    "alive": True,
                    "steps_total": 150,
                    "recent_steps": steps(r),
                }
                for r in (0, 1)
            ],
            "processes": [
                {
                    "pid": 100,
                    "rank": 0,
                    "alive": True,
                    "cpu_ratio": 1.0,
                    "rss_bytes": 1 << 30,
                    "worker_pids": [201, 202],
                    "worker_cpu_ratios": [0.9, 0.8],
                }
            ],
            "config": None,
        },
        "/api/v1/gpus": {"available": False, "reason": "no NVIDIA driver", "gpus": [], "events": []},
        "/api/v1/host": {
            "host": {
                "cpu_count": 8,
                "cpu_per_core_ratio": [0.5] * 8,
                "cpu_ratio": 0.5,
                "memory_used_bytes": 4 << 30,
                "memory_total_bytes": 16 << 30,
            }
        },
    }
