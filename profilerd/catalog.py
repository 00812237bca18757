"""The recordings in a data directory: open one read-only, list, resolve and prune them.

Standard library only (sqlite3): `profilerd runs` and `run`'s end read these without the
analysis' imports (pandas); :mod:`profilerd.runs` loads a recording's tables for the analysis.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from profilerd.recording import SCHEMA_VERSION

SQLITE_MAGIC = b"SQLite format 3\x00"
CHUNK_ROWS = 65_536
STALE_RUNNING_S = 3600.0
# A daemon writes every running recording at least once per host sample (at most 60 s apart):
# one marked 'running' and untouched for longer lost its writer (a killed daemon), and is
# listed 'aborted'. Pruning waits for STALE_RUNNING_S still, in case the daemon is only stuck.
WRITER_GONE_S = 120.0


class RecordingError(Exception):
    """A recording that cannot be found or read; the message is for the user."""


class Damage(str):
    """A note that says the file itself is damaged (cut short, corrupt pages), as opposed to
    parts an older schema or a killed run never had: reports flag these and exit 3."""


# ---- opening ---------------------------------------------------------------------------------
def _check_header(path: Path) -> None:
    if not path.is_file():
        raise RecordingError(f"no recording at {path}")
    try:
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise RecordingError(f"cannot read {path}: {exc.strerror}") from None
    if not head:
        raise RecordingError(f"{path} is empty: the run was stopped before anything was recorded")
    if head != SQLITE_MAGIC:
        raise RecordingError(f"{path} is not a profilerd recording (not an SQLite database)")


def _truncation(path: Path) -> Damage | None:
    """Whether the file is shorter than its own header says: a copy or a disk cut it short.

    The header's page count is only trusted when its "valid-for" counter matches the change
    counter (SQLite's rule); the write-ahead log never shrinks the main file.
    """
    try:
        with path.open("rb") as fh:
            header = fh.read(100)
        size = path.stat().st_size
    except OSError:
        return None
    if len(header) < 100:
        return Damage(f"the file is cut short: {size} bytes, less than an SQLite header")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if header[24:28] != header[92:96] or not pages or not page_size:
        return None
    if size < pages * page_size:
        return Damage(f"the file is cut short: {size:,} of the {pages * page_size:,} bytes its header promises")
    return None


def schema_problem(path: Path, meta: dict[str, str]) -> str | None:
    """Why this profilerd must not read a recording's schema, or None when it can."""
    version = meta.get("schema_version")
    if version is None or not version.strip().isdigit() or int(version) <= SCHEMA_VERSION:
        return None
    return (
        f"{path} was written by a newer profilerd (recording schema {version}, profilerd "
        f"{meta.get('profilerd_version', '?')}); this one reads schema {SCHEMA_VERSION} and older: "
        "upgrade profilerd (pip install -U profilerd) to read it"
    )


def _open(path: Path) -> tuple[sqlite3.Connection, str | None]:
    """A read-only connection, and a note when the write-ahead log had to be ignored.

    ``mode=ro`` reads the WAL of a live or killed daemon (the last quarter second of rows);
    where that is impossible (a read-only copy without its -shm file), ``immutable=1`` still
    reads what was checkpointed.
    """
    _check_header(path)
    uri = path.resolve().as_uri()
    try:
        conn = _connect(f"{uri}?mode=ro")
        return conn, None
    except sqlite3.OperationalError as first:
        try:
            conn = _connect(f"{uri}?immutable=1")
        except sqlite3.DatabaseError:
            raise RecordingError(f"{path} is not a readable profilerd recording: {first}") from None
        return conn, f"the write-ahead log could not be read ({first}); rows of the last moments may be missing"
    except sqlite3.DatabaseError as exc:
        raise RecordingError(f"{path} is not a readable profilerd recording: {exc}") from None


def _connect(uri: str) -> sqlite3.Connection:
    """Open and read the schema. ``writable_schema`` (harmless on a read-only connection) lets
    SQLite open a file shorter than its header says, a truncated copy, instead of refusing it
    whole; the missing pages then surface as errors in the tables that used them."""
    conn = sqlite3.connect(uri, uri=True)
    try:
        conn.execute("PRAGMA writable_schema = ON")
        conn.execute("SELECT name FROM sqlite_master").fetchall()
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to a file that has a profilerd table; RecordingError otherwise."""
    conn, _ = _open(path)
    try:
        tables = _tables(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise RecordingError(f"{path} is not a readable profilerd recording: {exc}") from None
    if not tables & {"meta", "steps"}:
        conn.close()
        raise RecordingError(f"{path} is not a profilerd recording (no meta or steps table)")
    return conn


def _chunks(conn: sqlite3.Connection, sql: str, table: str, notes: list[str]) -> Iterator[list[tuple[Any, ...]]]:
    """Rows in chunks; a damaged page ends the table with a note instead of an exception."""
    read = 0
    try:
        cursor = conn.execute(sql)
        while rows := cursor.fetchmany(CHUNK_ROWS):
            read += len(rows)
            yield rows
    except sqlite3.DatabaseError as exc:
        # The failed chunk is lost with the cursor: read it again one row at a time, up to the
        # damaged page (the scan order of the same query is the same).
        salvaged: list[tuple[Any, ...]] = []
        try:
            cursor = conn.execute(f"{sql} LIMIT -1 OFFSET {read}")
            while (row := cursor.fetchone()) is not None:
                salvaged.append(row)
        except sqlite3.DatabaseError:
            pass  # the damaged page again: everything before it is salvaged
        if salvaged:
            read += len(salvaged)
            yield salvaged
        notes.append(Damage(f"table {table} is damaged: read {read:,} rows, then '{exc}'; later rows are missing"))


def _read_meta(conn: sqlite3.Connection, notes: list[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for rows in _chunks(conn, "SELECT key, value FROM meta", "meta", notes):
        meta.update({str(k): str(v) for k, v in rows})
    return meta


# ---- listing and pruning -------------------------------------------------------------------------
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
    untouched_s = _untouched_s(path, time.time())  # before opening it: that may create its -wal
    conn = connect_readonly(path)
    notes: list[str] = []
    try:
        meta = _read_meta(conn, notes)
        try:
            steps, first, last = conn.execute("SELECT COUNT(*), MIN(end_unix_s), MAX(end_unix_s) FROM steps").fetchone()
        except sqlite3.DatabaseError:
            steps, first, last = 0, None, None
            notes.append("steps unreadable")
        try:
            row = conn.execute("SELECT primary_category FROM verdicts ORDER BY ts_unix_s DESC LIMIT 1").fetchone()
        except sqlite3.DatabaseError:
            row = None
    finally:
        conn.close()
    newer = schema_problem(path, meta)
    if _truncation(path):
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


def _untouched_s(path: Path, now: float) -> float:
    """Seconds since the recording (or its write-ahead log) was last written."""
    try:
        modified = max(p.stat().st_mtime for p in (path, Path(f"{path}-wal")) if p.exists())
    except (OSError, ValueError):
        return 0.0
    return now - modified


def _abandoned(run: RunSummary, now: float) -> bool:
    """A 'running' recording nobody has written for an hour: its daemon was killed."""
    return _untouched_s(run.path, now) > STALE_RUNNING_S


def select_for_pruning(
    runs: Sequence[RunSummary], older_than_s: float | None = None, keep: int | None = None, now: float | None = None
) -> list[RunSummary]:
    """Runs older than ``older_than_s`` or beyond the newest ``keep``.

    A recording marked 'running' is kept while it may still be written (the daemon commits
    every quarter second and samples the host every second); one untouched for an hour was
    left behind by a killed daemon and is pruned like any other.
    """
    now = time.time() if now is None else now
    # A file this profilerd cannot read (empty, garbage, a newer schema) is never pruned: it may
    # be a recording just being created, or one a newer profilerd still reads.
    readable = [r for r in runs if r.problem is None]
    finished = [r for r in readable if (r.state != "running" and not r.writer_gone) or _abandoned(r, now)]
    doomed = []
    for index, run in enumerate(finished):
        when = run.ended_unix_s or run.last_step_unix_s or run.started_unix_s or now
        too_old = older_than_s is not None and when < now - older_than_s
        beyond = keep is not None and index >= keep
        if too_old or beyond:
            doomed.append(run)
    return doomed


def prune(
    runs_dir: Path, older_than_s: float | None = None, keep: int | None = None, dry_run: bool = False
) -> list[Path]:
    """Delete recordings older than ``older_than_s`` and beyond the newest ``keep``.

    A recording still being written is never deleted (see :func:`select_for_pruning`).
    """
    doomed = select_for_pruning(list_runs(runs_dir), older_than_s, keep)
    removed = []
    for run in doomed:
        if not dry_run:
            for path in (run.path, Path(f"{run.path}-wal"), Path(f"{run.path}-shm")):
                if path.exists():
                    path.unlink()
        removed.append(run.path)
    return removed
