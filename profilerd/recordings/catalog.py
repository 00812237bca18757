"""The recordings in a data directory: list them (one summary row each) and resolve a reference.

Standard library only (sqlite3): `profilerd runs` and `run`'s end read these without the
analysis' imports (pandas); :mod:`profilerd.recordings.reader` loads a recording's tables.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profilerd.model import VERDICT_TABLE
from profilerd.recordings.salvage import RecordingError, connect_readonly, read_meta, schema_problem, truncation_damage

# A daemon writes every running recording at least once per host sample (at most 60 s apart):
# one marked 'running' and untouched for longer lost its writer (a killed daemon), and is
# listed 'aborted'. Pruning waits longer (retention.STALE_RUNNING_S), in case the daemon is only stuck.
WRITER_GONE_S = 120.0


_LATEST_PRIMARY = (
    f"SELECT {VERDICT_TABLE.column('primary').name} FROM {VERDICT_TABLE.name}"
    f" ORDER BY {VERDICT_TABLE.column('evaluated_unix_s').name} DESC LIMIT 1"
)


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
    last_step_unix_s: float | None = None
    writer_gone: bool = False  # marked 'running' in the file, listed 'aborted': nobody writes it
    problem: str | None = None  # why the file cannot be read (state "unreadable" or "newer")

    @property
    def duration_s(self) -> float | None:
        """From start to the end of the run, or to its last step when it never closed."""
        end = self.ended_unix_s or self.last_step_unix_s
        if self.started_unix_s is None or end is None:
            return None
        return max(0.0, end - self.started_unix_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "path": str(self.path),
            "job": self.job,
            "state": self.state,
            "started_unix_s": self.started_unix_s,
            "ended_unix_s": self.ended_unix_s,
            "duration_s": round(self.duration_s, 3) if self.duration_s is not None else None,
            "steps": self.steps,
            "primary": self.primary,
            "size_bytes": self.size_bytes,
            "problem": self.problem,
        }


def summarize(path: Path) -> RunSummary:
    """A recording's listing row; a damaged file is listed as 'damaged' rather than hidden."""
    untouched_s = seconds_untouched(path, time.time())  # before opening it: that may create its -wal
    conn = connect_readonly(path)
    notes: list[str] = []
    try:
        meta = read_meta(conn, notes)
        try:
            steps, first, last = conn.execute("SELECT COUNT(*), MIN(end_unix_s), MAX(end_unix_s) FROM steps").fetchone()
        except sqlite3.DatabaseError:
            steps, first, last = 0, None, None
            notes.append("steps unreadable")
        try:
            row = conn.execute(_LATEST_PRIMARY).fetchone()
        except sqlite3.DatabaseError:
            row = None
    finally:
        conn.close()
    newer = schema_problem(path, meta)
    if truncation_damage(path):
        notes.append("cut short")
    started = _float(meta.get("started_unix_s")) or first
    if started is None:
        started = path.stat().st_mtime
    state = "damaged" if notes else meta.get("state", "unknown")
    writer_gone = state == "running" and untouched_s > WRITER_GONE_S
    return RunSummary(
        run_id=meta.get("run_id", path.stem),
        path=path,
        job=meta.get("job", meta.get("run_id", path.stem)),
        state="newer" if newer else ("aborted" if writer_gone else state),
        writer_gone=writer_gone,
        started_unix_s=started,
        ended_unix_s=_float(meta.get("ended_unix_s")),
        steps=int(steps or 0),
        primary=row[0] if row else None,
        size_bytes=_size(path),
        last_step_unix_s=last,
        problem=newer,
    )


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "None", "") else None
    except ValueError:
        return None


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def _unreadable(path: Path, problem: str) -> RunSummary:
    try:
        modified: float | None = path.stat().st_mtime
    except OSError:
        modified = None
    size = _size(path) if path.exists() else 0
    return RunSummary(path.stem, path, path.stem, "unreadable", modified, None, 0, None, size, problem=problem)


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """Every recording, newest first; a file that cannot be read (empty, not a recording) is
    listed as 'unreadable' with the reason, never hidden."""
    summaries = []
    for path in runs_dir.glob("*.sqlite") if runs_dir.is_dir() else []:
        try:
            summaries.append(summarize(path))
        except RecordingError as exc:
            summaries.append(_unreadable(path, str(exc)))
        except OSError as exc:
            summaries.append(_unreadable(path, f"cannot read {path}: {exc.strerror}"))
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


def seconds_untouched(path: Path, now: float) -> float:
    """Seconds since the recording (or its write-ahead log) was last written."""
    try:
        modified = max(p.stat().st_mtime for p in (path, Path(f"{path}-wal")) if p.exists())
    except (OSError, ValueError):
        return 0.0
    return now - modified
