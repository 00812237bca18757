"""Shared fixtures: every test gets its own runtime and data directories and a free port."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"

FAST_RULES = """
[evidence]
min_steps = 20
min_seconds = 2.0
"""


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: AF_UNIX socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def profilerd_env(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment for a CLI subprocess: private runtime and data dirs, any free HTTP port."""
    runtime = short_tmp / "run"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ)
    for key in list(env):
        if key.startswith(("PROFILERD_", "TORCHELASTIC_")) or key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            del env[key]
    env.update(
        {
            "XDG_RUNTIME_DIR": str(runtime),
            "PROFILERD_DATA_DIR": str(short_tmp / "data"),
            "PROFILERD_HTTP_PORT": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for key in ("XDG_RUNTIME_DIR", "PROFILERD_DATA_DIR", "PROFILERD_HTTP_PORT"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("PROFILERD_SOCKET", raising=False)
    return env


@pytest.fixture
def fast_rules(short_tmp: Path) -> Path:
    """Rules needing 2 s of evidence instead of 10, to keep end-to-end tests short."""
    path = short_tmp / "rules.toml"
    path.write_text(FAST_RULES)
    return path


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`profilerd ARGS...` in a subprocess, as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "profilerd", *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- --cpu-times: what each test file costs in CPU, which a busy host inflates less than wall time
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-times",
        action="store_true",
        help="report each test file's wall time and the CPU time of pytest and the subprocesses it waited for",
    )


_FILE_TIMES: dict[str, list[float]] = {}  # file: [wall s, cpu s]


def _cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    if not item.config.getoption("--cpu-times"):
        yield
        return
    wall, cpu = time.monotonic(), _cpu_s()
    yield
    totals = _FILE_TIMES.setdefault(item.location[0], [0.0, 0.0])
    totals[0] += time.monotonic() - wall
    totals[1] += _cpu_s() - cpu


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    if not config.getoption("--cpu-times") or not _FILE_TIMES:
        return
    terminalreporter.section("time per test file")
    terminalreporter.write_line(f"{'file':<44} {'wall s':>8} {'cpu s':>8}")
    for path, (wall, cpu) in sorted(_FILE_TIMES.items(), key=lambda item: -item[1][0]):
        terminalreporter.write_line(f"{path:<44} {wall:8.1f} {cpu:8.1f}")
    terminalreporter.write_line(
        "(cpu: pytest and the subprocesses it waited for; a daemon that detached is not counted)"
    )
