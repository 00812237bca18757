"""Reading recordings back: list, resolve, prune, load into frames, and analyse offline."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from profilerd.analysis.context import HOST_COLUMNS, PROCESS_COLUMNS, build_context
from profilerd.analysis.features import STEP_COLUMNS, compute_features
from profilerd.analysis.rules import RuleSet
from profilerd.analysis.verdict import Verdict, evaluate


class RecordingError(Exception):
    """A recording that cannot be found or read; the message is for the user."""


@dataclass(frozen=True)
class Recording:
    path: Path
    meta: dict[str, str]
    steps: pd.DataFrame
    configs: list[dict[str, Any]]
    hosts: pd.DataFrame
    processes: pd.DataFrame
    sessions: pd.DataFrame

    @property
    def run_id(self) -> str:
        return self.meta.get("run_id", self.path.stem)

    @property
    def job(self) -> str:
        return self.meta.get("job", self.run_id)

    def config(self) -> dict[str, Any] | None:
        """The latest configuration snapshot of the lowest rank."""
        if not self.configs:
            return None
        lowest = min(c.get("rank", 0) for c in self.configs)
        return [c for c in self.configs if c.get("rank", 0) == lowest][-1]


def connect_readonly(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise RecordingError(f"no recording at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        conn.execute("SELECT 1 FROM meta LIMIT 1")
        return conn
    except sqlite3.DatabaseError as exc:
        raise RecordingError(f"{path} is not a readable profilerd recording: {exc}") from None


def load(path: Path) -> Recording:
    conn = connect_readonly(path)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        steps = pd.read_sql_query(f"SELECT {', '.join(STEP_COLUMNS)} FROM steps ORDER BY end_unix_s", conn)
        configs = []
        for _ts, rank, config in conn.execute("SELECT ts_unix_s, rank, config FROM configs ORDER BY ts_unix_s"):
            document = json.loads(config)
            document.setdefault("rank", rank)
            configs.append(document)
        hosts = pd.read_sql_query(f"SELECT {', '.join(HOST_COLUMNS)} FROM host_samples ORDER BY ts_unix_s", conn)
        processes = pd.read_sql_query(
            f"SELECT {', '.join(PROCESS_COLUMNS)} FROM process_samples ORDER BY ts_unix_s", conn
        )
        sessions = pd.read_sql_query("SELECT * FROM sessions", conn)
    except (sqlite3.DatabaseError, ValueError) as exc:
        raise RecordingError(f"{path} is damaged or from an incompatible version: {exc}") from None
    finally:
        conn.close()
    return Recording(path, meta, steps, configs, hosts, processes, sessions)


def analyse(recording: Recording, ruleset: RuleSet) -> Verdict:
    """The whole-run verdict: every recorded step after warm-up, one evaluation."""
    steps = recording.steps
    since = float((steps["end_unix_s"] - steps["step_s"]).min()) if not steps.empty else None
    context = build_context(recording.config(), recording.hosts, recording.processes, since)
    features = compute_features(steps, context, ruleset.warmup_steps)
    verdict = evaluate(features, ruleset)
    # Stamp it with the last recorded step, so the same recording always gives the same JSON.
    last = float(steps["end_unix_s"].max()) if not steps.empty else 0.0
    return replace(verdict, evaluated_unix_s=last)


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    path: Path
    job: str
    state: str
    started_unix_s: float | None
    ended_unix_s: float | None
    steps: int
    primary: str | None
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "path": str(self.path),
            "job": self.job,
            "state": self.state,
            "started_unix_s": self.started_unix_s,
            "ended_unix_s": self.ended_unix_s,
            "steps": self.steps,
            "primary": self.primary,
            "size_bytes": self.size_bytes,
        }


def summarize(path: Path) -> RunSummary:
    conn = connect_readonly(path)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        steps, first, last = conn.execute("SELECT COUNT(*), MIN(end_unix_s), MAX(end_unix_s) FROM steps").fetchone()
        row = conn.execute("SELECT primary_category FROM verdicts ORDER BY ts_unix_s DESC LIMIT 1").fetchone()
    except sqlite3.DatabaseError as exc:
        raise RecordingError(f"{path}: {exc}") from None
    finally:
        conn.close()
    started = _float(meta.get("started_unix_s")) or first
    ended = _float(meta.get("ended_unix_s")) or last
    return RunSummary(
        run_id=meta.get("run_id", path.stem),
        path=path,
        job=meta.get("job", path.stem),
        state=meta.get("state", "unknown"),
        started_unix_s=started,
        ended_unix_s=ended,
        steps=int(steps),
        primary=row[0] if row else None,
        size_bytes=_size(path),
    )


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "None", "") else None
    except ValueError:
        return None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """Every readable recording, newest first; unreadable files are skipped."""
    summaries = []
    for path in runs_dir.glob("*.sqlite") if runs_dir.is_dir() else []:
        try:
            summaries.append(summarize(path))
        except RecordingError:
            continue
    return sorted(summaries, key=lambda s: -(s.started_unix_s or 0.0))


def resolve(runs_dir: Path, reference: str) -> Path:
    """A run id, a unique prefix of one, 'latest', or a path to a .sqlite file."""
    as_path = Path(reference)
    if as_path.suffix == ".sqlite" or as_path.is_file():
        if not as_path.is_file():
            raise RecordingError(f"no recording at {as_path}")
        return as_path
    runs = list_runs(runs_dir)
    if reference in ("latest", "last"):
        if not runs:
            raise RecordingError(f"no recordings in {runs_dir}")
        return runs[0].path
    exact = [r for r in runs if r.run_id == reference or r.path.stem == reference]
    if exact:
        return exact[0].path
    prefixed = [r for r in runs if r.run_id.startswith(reference)]
    if len(prefixed) == 1:
        return prefixed[0].path
    if len(prefixed) > 1:
        names = ", ".join(r.run_id for r in prefixed[:5])
        raise RecordingError(f"'{reference}' matches several runs: {names}")
    raise RecordingError(f"no run '{reference}' in {runs_dir} (see `profilerd runs`)")


def prune(runs_dir: Path, older_than_s: float | None = None, keep: int | None = None) -> list[Path]:
    """Delete recordings older than ``older_than_s`` and beyond the newest ``keep``."""
    runs = [r for r in list_runs(runs_dir) if r.state != "running"]
    doomed: list[RunSummary] = []
    now = time.time()
    for index, run in enumerate(runs):
        too_old = older_than_s is not None and (run.ended_unix_s or run.started_unix_s or now) < now - older_than_s
        beyond = keep is not None and index >= keep
        if too_old or beyond:
            doomed.append(run)
    removed = []
    for run in doomed:
        for path in (run.path, Path(f"{run.path}-wal"), Path(f"{run.path}-shm")):
            if path.exists():
                path.unlink()
        removed.append(run.path)
    return removed
