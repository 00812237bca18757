"""Run recordings: one SQLite file (WAL) per run, written by a single background thread.

Rows are queued by the samplers and committed every COMMIT_INTERVAL_S, so a kill -9 of the
daemon loses at most about that much. A full disk or a read-only directory pauses recording
with one warning; the rows wait in memory (at most MAX_PENDING_ROWS, beyond which they are
dropped and counted) and are written once there is room again, retried every
RETRY_INTERVAL_S, while the live view carries on.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

from profilerd import __version__
from profilerd.model import (
    GPU_TABLE,
    HOST_TABLE,
    PROCESS_TABLE,
    VERDICT_TABLE,
    GpuSample,
    HostSample,
    ProbeSession,
    ProcessSample,
    RecordedVerdict,
    SqlValue,
    StepRecord,
)
from profilerd.recordings.schema import INSERTS, RECORD_TABLES, SCHEMA, SCHEMA_VERSION, recording_file
from profilerd_probes import schema

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.25
RETRY_INTERVAL_S = 2.0
# Beyond this many rows waiting for a paused recording (~600 bytes each, so ~300 MB), rows are
# dropped and counted: a long outage must not take the node's memory with it.
MAX_PENDING_ROWS = 500_000


def open_recording(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    _add_missing_columns(conn, "steps", [(f.name, str(f.sql)) for f in schema.STORED_STEP_FIELDS])
    for table in RECORD_TABLES:
        _add_missing_columns(conn, table.name, [(column.name, column.sql) for column in table.columns])
    return conn


def _add_missing_columns(conn: sqlite3.Connection, table: str, columns: list[tuple[str, str]]) -> None:
    """A recording begun by an older profilerd (a daemon restarted on it) gains the newer
    nullable columns; its rows keep NULL there, which readers take as unknown."""
    present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    for name, sql in columns:
        if name not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {sql}")


class RunMeta(TypedDict, total=False):
    """What a run's first hello says about it, kept in its recording's meta table."""

    job: str
    hostname: str
    started_unix_s: float


@dataclass(frozen=True, slots=True)
class RunClose:
    """A run's end, written into its recording's meta table once its rows are."""

    state: str
    exit_code: int | None


Row = tuple[SqlValue, ...]


class Recorder:
    """Queues rows per run and commits them from one thread."""

    def __init__(
        self,
        runs_dir: Path,
        on_closed: Callable[[str, str], None] | None = None,
        on_status: Callable[[str | None], None] | None = None,
        argv_filter: Callable[[Sequence[str]], list[str]] | None = None,
    ) -> None:
        self.runs_dir = runs_dir
        # What of a command line is recorded: the redacted form unless the user opted in
        # (config record_full_argv), so a copied or shared recording carries no secrets.
        self._argv_filter = argv_filter
        self._queue: queue.SimpleQueue[tuple[str, str, Row | RunMeta | RunClose]] = queue.SimpleQueue()
        self._conns: dict[str, sqlite3.Connection] = {}
        self._pending: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
        self._pending_rows = 0
        self._closing: dict[str, RunClose] = {}
        self._on_closed = on_closed
        self._on_status = on_status
        self._paused_reason: str | None = None
        self._paused_since = 0.0
        self._next_retry = 0.0
        self.rows_written = 0
        self.rows_dropped = 0
        self._stop = threading.Event()
        # Set by close_run and stop: a run's end is written now, not at the next commit, since
        # its `profilerd run` waits for the closed recording to print the verdict.
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profilerd-recorder", daemon=True)

    # ---- producers (any thread) --------------------------------------------------------
    def start_run(self, run_id: str, meta: RunMeta) -> None:
        self._queue.put((run_id, "_start", meta))

    def step(self, run_id: str, step: StepRecord) -> None:
        self._queue.put((run_id, "steps", step.as_row()))

    def step_timing(self, run_id: str, pid: int, step: int, end_unix_s: float, fields: dict[str, float | int]) -> None:
        """Late device timing of a step queued earlier (the UPDATE follows its INSERT)."""
        values = [fields["comm_s"], fields["flags"], *(fields[name] for name in schema.GPU_TIMING_FIELDS)]
        self._queue.put((run_id, "step_timing", (*values, end_unix_s, pid, step)))

    def session(self, session: ProbeSession) -> None:
        row = (
            session.pid,
            session.rank,
            session.local_rank,
            session.world_size,
            session.hostname,
            json.dumps(self._argv_filter(session.argv) if self._argv_filter else list(session.argv)),
            session.started_unix_s,
            session.probe_version,
        )
        self._queue.put((session.run_id, "sessions", row))

    def config(self, run_id: str, pid: int, rank: int, config: dict[str, Any]) -> None:
        self._queue.put((run_id, "configs", (time.time(), pid, rank, json.dumps(config))))

    def host(self, run_ids: list[str], sample: HostSample) -> None:
        row = HOST_TABLE.row(sample)
        for run_id in run_ids:
            self._queue.put((run_id, HOST_TABLE.name, row))

    def process(self, run_id: str, sample: ProcessSample) -> None:
        self._queue.put((run_id, PROCESS_TABLE.name, PROCESS_TABLE.row(sample)))

    def gpu(self, run_ids: list[str], sample: GpuSample) -> None:
        row = (*GPU_TABLE.row(sample), json.dumps(asdict(sample), default=str))
        for run_id in run_ids:
            self._queue.put((run_id, GPU_TABLE.name, row))

    def verdict(self, run_id: str, verdict: RecordedVerdict) -> None:
        self._queue.put((run_id, VERDICT_TABLE.name, VERDICT_TABLE.row(verdict)))

    def event(self, run_id: str, kind: str, detail: dict[str, Any], ts_unix_s: float | None = None) -> None:
        stamp = time.time() if ts_unix_s is None else ts_unix_s
        self._queue.put((run_id, "events", (stamp, kind, json.dumps(detail, default=str))))

    def close_run(self, run_id: str, state: str, exit_code: int | None) -> None:
        self._queue.put((run_id, "_close", RunClose(state, exit_code)))
        self._wake.set()

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued, close every open run as it stands, and stop."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def paused_reason(self) -> str | None:
        return self._paused_reason

    # ---- writer thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._wake.wait(COMMIT_INTERVAL_S)
            self._wake.clear()
            stopping = self._stop.is_set()
            self._drain()
            if stopping:
                self._next_retry = 0.0  # one last attempt, even while paused
            self._flush()
            if stopping:
                if self._pending_rows:
                    log.warning("recording stopped with %d rows unwritten: %s", self._pending_rows, self._paused_reason)
                for conn in self._conns.values():
                    try:
                        conn.close()
                    except sqlite3.Error as exc:
                        log.debug("closing a recording failed: %s", exc)
                self._conns.clear()
                return

    def _drain(self) -> None:
        while True:
            try:
                run_id, table, payload = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(payload, RunClose):
                self._closing[run_id] = payload
                continue
            if self._pending_rows >= MAX_PENDING_ROWS and table != "_start":
                self.rows_dropped += 1
                continue
            self._pending[run_id][table].append(payload)
            self._pending_rows += 1

    def _conn(self, run_id: str) -> sqlite3.Connection:
        conn = self._conns.get(run_id)
        if conn is None:
            conn = self._conns[run_id] = open_recording(recording_file(self.runs_dir, run_id))
            conn.execute(
                "INSERT OR IGNORE INTO meta VALUES (?, ?), (?, ?), (?, ?), (?, ?)",
                (
                    "schema_version",
                    str(SCHEMA_VERSION),
                    "run_id",
                    run_id,
                    "profilerd_version",
                    __version__,
                    "state",
                    "running",
                ),
            )
        return conn

    def _flush(self) -> None:
        now = time.monotonic()
        if self._paused_reason is not None and now < self._next_retry:
            return
        for run_id in list(self._pending):
            tables = self._pending[run_id]
            try:
                conn = self._conn(run_id)
                conn.execute("BEGIN")
                for meta in tables.get("_start", []):
                    conn.executemany(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [(k, str(v)) for k, v in meta.items()],
                    )
                # Late device timing updates steps: after the inserts it may refer to.
                for table, rows in sorted(tables.items(), key=lambda item: item[0] == "step_timing"):
                    if table != "_start":
                        conn.executemany(INSERTS[table], rows)
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                # Nothing is taken out of _pending before the commit succeeded: every row is
                # written on a later attempt.
                self._rollback(run_id)
                self._pause(f"recording paused: {exc} (writing {recording_file(self.runs_dir, run_id)})")
                self._next_retry = now + RETRY_INTERVAL_S
                return
            self.rows_written += sum(len(rows) for table, rows in tables.items() if table != "_start")
            self._pending_rows -= sum(len(rows) for rows in tables.values())
            del self._pending[run_id]
        for run_id in list(self._closing):
            if not self._finish(run_id, self._closing.pop(run_id)):
                self._next_retry = now + RETRY_INTERVAL_S
                return
        self._resume()

    def _rollback(self, run_id: str) -> None:
        conn = self._conns.pop(run_id, None)
        if conn is not None:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.debug("rollback failed: %s", exc)
            conn.close()

    def _pause(self, reason: str) -> None:
        if self._paused_reason is None:
            self._paused_since = time.monotonic()
            log.warning(
                "%s; the live view (/metrics, /api/v1) continues, and recording resumes when there is room again",
                reason,
            )
        self._paused_reason = reason
        if self._on_status:
            self._on_status(reason)

    def _resume(self) -> None:
        if self._paused_reason is not None:
            log.warning(
                "recording resumed after %.0f s; rows that waited were written (%d dropped)",
                time.monotonic() - self._paused_since,
                self.rows_dropped,
            )
            self._paused_reason = None
            if self._on_status:
                self._on_status(None)

    def _finish(self, run_id: str, close: RunClose) -> bool:
        """Mark the run's recording closed and checkpoint it; False (and still closing) on error."""
        path = recording_file(self.runs_dir, run_id)
        try:
            conn = self._conn(run_id)
            conn.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [
                    ("state", close.state),
                    ("exit_code", str(close.exit_code)),
                    ("ended_unix_s", str(time.time())),
                ],
            )
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            conn.close()
            del self._conns[run_id]
        except sqlite3.Error as exc:
            self._rollback(run_id)
            self._pause(f"recording paused: {exc} (closing {path})")
            self._closing[run_id] = close
            return False
        if self._on_closed:
            self._on_closed(run_id, str(path))
        return True
