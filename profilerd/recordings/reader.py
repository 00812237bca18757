"""Loading a recording into frames for the analysis and the report: steps, samples, configs,
sessions and events, and the GPU samples as the analysis reads them.

Recordings are read defensively. A file cut short (disk full, copied while being written), a
run whose daemon was killed mid-way, or a recording from an older schema still loads as far as
it can be read; everything that is missing is described in ``Recording.notes`` so a report can
say what it lacks instead of failing. Only a file that is not a recording at all is an error.

Frames are built column-wise from chunks of rows (numpy, not one Python object per value kept
around), so a 10-hour, 8-rank recording of millions of steps loads in seconds and well under
the memory of a pandas ``read_sql`` of the same table.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from profilerd.analysis.context import HOST_COLUMNS, PROCESS_COLUMNS, gpu_frame
from profilerd.analysis.features import STEP_COLUMNS
from profilerd.model import (
    GPU_SAMPLE_JSON,
    GPU_TABLE,
    HOST_TABLE,
    PROCESS_TABLE,
    VERDICT_TABLE,
    GpuSample,
    HostSample,
    RecordedProcess,
    RecordedVerdict,
    Table,
)
from profilerd.recordings.salvage import (
    CHUNK_ROWS,
    Damage,
    RecordingError,
    connect_readonly,
    open_readonly,
    read_chunks,
    read_meta,
    schema_problem,
    table_names,
    truncation_damage,
)
from profilerd_probes.schema import INTEGER_STEP_COLUMNS

# The samples' integer columns that are always known (int32 in their frames).
_SAMPLE_INT32_COLUMNS = {
    column.name
    for table in (HOST_TABLE, PROCESS_TABLE, GPU_TABLE)
    for column in table.columns
    if column.kind.frame_dtype == "int32"
}
# Integer columns; every other numeric column is float64 and NaN where the value is unknown.
_INT_COLUMNS = {*INTEGER_STEP_COLUMNS, *_SAMPLE_INT32_COLUMNS}
# Small integers kept as int32: a 10-hour, 8-rank run has millions of step rows, and the
# analysis copies its frame a few times.
_INT32_COLUMNS = {"rank", "pid", "step", "flags", "sync_count", "graph_compiles", "comm_ops", *_SAMPLE_INT32_COLUMNS}
log = logging.getLogger(__name__)

GPU_COLUMNS = list(GPU_TABLE.names)
_GPU_NUMERIC = [column.name for column in GPU_TABLE.columns if column.kind.sql != "TEXT"]
EVENT_COLUMNS = ["ts_unix_s", "kind", "detail"]


@dataclass(frozen=True)
class Source:
    """One recording that went into a (possibly merged) Recording, and how its clock was moved."""

    run_id: str
    path: Path
    hostname: str
    state: str
    ranks: tuple[int, ...]
    clock_offset_s: float = 0.0  # added to this recording's timestamps to align it
    clock_residual_s: float | None = None  # spread of the alignment (median absolute deviation)


def _empty(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {c: pd.Series(dtype=object if c in ("uuid", "name", "kind", "detail", "node") else float) for c in columns}
    )


def _empty_gpus() -> pd.DataFrame:
    return _empty([*GPU_COLUMNS, "clock_event_reasons", "node"])


def _empty_events() -> pd.DataFrame:
    return _empty([*EVENT_COLUMNS, "node"])


@dataclass(frozen=True)
class Recording:
    path: Path
    meta: dict[str, str]
    steps: pd.DataFrame
    configs: list[dict[str, Any]]
    hosts: pd.DataFrame
    processes: pd.DataFrame
    sessions: pd.DataFrame
    gpus: pd.DataFrame = field(default_factory=_empty_gpus)
    events: pd.DataFrame = field(default_factory=_empty_events)
    notes: tuple[str, ...] = ()  # what could not be read, for the report's data-quality section
    sources: tuple[Source, ...] = ()  # the recordings merged into this one (one when not merged)

    @property
    def damage(self) -> tuple[str, ...]:
        """The notes that say the file is damaged; empty for an intact recording."""
        return tuple(note for note in self.notes if isinstance(note, Damage))

    @property
    def run_id(self) -> str:
        return self.meta.get("run_id", self.path.stem)

    @property
    def job(self) -> str:
        return self.meta.get("job", self.run_id)

    @property
    def state(self) -> str:
        return self.meta.get("state", "unknown")

    def config(self) -> dict[str, Any] | None:
        """The latest configuration snapshot of the lowest rank."""
        if not self.configs:
            return None
        lowest = min(c.get("rank", 0) for c in self.configs)
        return [c for c in self.configs if c.get("rank", 0) == lowest][-1]


# ---- reading tables ----------------------------------------------------------------------------
def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    try:
        return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
    except sqlite3.DatabaseError:
        return []


def _select(
    conn: sqlite3.Connection, table: str, wanted: Sequence[str], extra: dict[str, str], notes: list[str]
) -> tuple[list[str], str] | None:
    """The SELECT for the columns of ``wanted`` that the table has (older schemas lack some)."""
    present = _columns(conn, table)
    if not present:
        notes.append(f"table {table} is missing or unreadable")
        return None
    columns = [c for c in wanted if c in present]
    expressions = columns + [f"{expr} AS {name}" for name, expr in extra.items()]
    return columns + list(extra), f"SELECT {', '.join(expressions)} FROM {table}"


def _to_floats(rows: list[tuple[Any, ...]], width: int, columns: Sequence[str]) -> np.ndarray:
    try:
        return np.array(rows, dtype=np.float64).reshape(len(rows), width)
    except (TypeError, ValueError):  # text where a number belongs: coerce, do not fail
        chunk = pd.DataFrame.from_records(rows, columns=list(columns))
        return np.column_stack([pd.to_numeric(chunk[name], errors="coerce").to_numpy(np.float64) for name in columns])


def _constant_columns(
    conn: sqlite3.Connection, table: str, columns: Sequence[str], first: np.ndarray
) -> dict[str, float]:
    """Columns of a large table that hold one value (or only NULL) in every row, with that value.

    Most step columns are constant in a given run (flags, lr, the counters of features the job
    does not use, NULL training signals): not moving them through Python objects saves close to
    half the load time of a long run. Candidates come from the first chunk; one SQL scan, which
    costs a fraction of reading the columns, confirms them all at once (else each on its own).
    """
    same = np.all((first == first[0]) | (np.isnan(first) & np.isnan(first[0])), axis=0)
    candidates = {name: float(first[0, i]) for i, name in enumerate(columns) if same[i]}
    if not candidates:
        return {}

    def test(name: str, value: float) -> tuple[str, list[float]]:
        return (f"{name} IS NOT NULL", []) if np.isnan(value) else (f"{name} IS NOT ?", [value])

    tests = [test(name, value) for name, value in candidates.items()]
    params = [p for _, values in tests for p in values]
    try:
        where = " OR ".join(condition for condition, _ in tests)
        if conn.execute(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE {where})", params).fetchone()[0] == 0:
            return candidates
        varies = conn.execute(f"SELECT {', '.join(f'MAX({c})' for c, _ in tests)} FROM {table}", params).fetchone()
    except sqlite3.DatabaseError:
        return {}  # a damaged table is read column by column, as far as it goes
    return {name: value for (name, value), moved in zip(candidates.items(), varies, strict=True) if not moved}


def _numeric_table(
    conn: sqlite3.Connection, table: str, wanted: Sequence[str], sort_by: str, notes: list[str]
) -> pd.DataFrame:
    """An all-numeric table as float64/int64 columns; missing columns are NaN (or 0 for counters).

    Rows are converted chunk by chunk into preallocated column arrays, so the peak memory is
    the final columns plus one chunk, whatever the length of the run.
    """
    query = _select(conn, table, wanted, {}, notes)
    columns: list[str] = []
    constants: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    filled = 0
    if query is not None:
        columns, sql = query
        try:
            first = conn.execute(f"{sql} LIMIT {CHUNK_ROWS}").fetchall()
            expected = int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        except sqlite3.DatabaseError:
            first, expected = [], 0
        if len(first) == CHUNK_ROWS:
            constants = _constant_columns(conn, table, columns, _to_floats(first, len(columns), columns))
            if constants:
                columns = [c for c in columns if c not in constants]
                sql = f"SELECT {', '.join(columns)} FROM {table}"
        del first
        arrays = {name: np.empty(max(expected, CHUNK_ROWS)) for name in columns}
        for rows in read_chunks(conn, sql, table, notes):
            chunk = _to_floats(rows, len(columns), columns)
            if filled + len(chunk) > len(next(iter(arrays.values()))):  # rows written since the count
                arrays = {name: np.resize(values, 2 * (filled + len(chunk))) for name, values in arrays.items()}
            for index, name in enumerate(columns):
                arrays[name][filled : filled + len(chunk)] = chunk[:, index]
            filled += len(chunk)
    order = None
    if sort_by in arrays and filled > 1:
        order = np.argsort(arrays[sort_by][:filled], kind="stable")
        if (order[1:] > order[:-1]).all():
            order = None  # already in time order, as the daemon writes
    frame = {}
    for name in wanted:
        if name in arrays:
            values = arrays.pop(name)[:filled]
            values = values[order] if order is not None else values
        else:
            values = np.full(filled, constants.get(name, np.nan))
        if name in _INT_COLUMNS:
            dtype = np.int32 if name in _INT32_COLUMNS else np.int64
            values = np.nan_to_num(values, nan=0.0).astype(dtype)
        frame[name] = values
    # copy=False: one block per column, no consolidation copy of a frame that can be 0.5 GB.
    return pd.DataFrame(frame, columns=list(wanted), copy=False)


def _mixed_table(
    conn: sqlite3.Connection,
    table: str,
    wanted: Sequence[str],
    numeric: Sequence[str],
    extra: dict[str, str],
    notes: list[str],
) -> pd.DataFrame:
    """A table with text columns, chunk by chunk; numbers coerced, missing columns filled."""
    query = _select(conn, table, wanted, extra, notes)
    names = [*wanted, *extra]
    if query is None:
        return _empty(names)
    columns, sql = query
    parts = [pd.DataFrame.from_records(rows, columns=columns) for rows in read_chunks(conn, sql, table, notes)]
    frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    for name in names:
        if name not in frame:
            frame[name] = np.nan if name in numeric else None
    for name in numeric:
        values = pd.to_numeric(frame[name], errors="coerce")
        frame[name] = values.fillna(0).astype(np.int64) if name in _INT_COLUMNS else values.astype(np.float64)
    return frame[names].sort_values("ts_unix_s", kind="stable", ignore_index=True)


def _read_configs(conn: sqlite3.Connection, notes: list[str]) -> list[dict[str, Any]]:
    configs = []
    bad = 0
    sql = "SELECT ts_unix_s, rank, config FROM configs ORDER BY ts_unix_s"
    for rows in read_chunks(conn, sql, "configs", notes):
        for _ts, rank, config in rows:
            try:
                document = json.loads(config)
            except (TypeError, ValueError):
                bad += 1
                continue
            if isinstance(document, dict):
                document.setdefault("rank", rank)
                configs.append(document)
    if bad:
        notes.append(f"{bad} configuration snapshot(s) are not valid JSON and were skipped")
    return configs


def _read_sessions(conn: sqlite3.Connection, notes: list[str]) -> pd.DataFrame:
    wanted = ["pid", "rank", "local_rank", "world_size", "hostname", "argv", "started_unix_s", "probe_version"]
    numeric = ["pid", "rank", "local_rank", "world_size", "started_unix_s"]
    query = _select(conn, "sessions", wanted, {}, notes)
    if query is None:
        return _empty(wanted)
    columns, sql = query
    rows = [row for chunk in read_chunks(conn, sql, "sessions", notes) for row in chunk]
    frame = pd.DataFrame.from_records(rows, columns=columns)
    for name in wanted:
        if name not in frame:
            frame[name] = None
    for name in numeric:
        frame[name] = pd.to_numeric(frame[name], errors="coerce")
    return frame[wanted]


def load(path: Path) -> Recording:
    """Everything in a recording as frames; damaged or missing parts become ``notes``."""
    conn, wal_note = open_readonly(path)
    notes: list[str] = [wal_note] if wal_note else []
    try:
        try:
            tables = table_names(conn)
        except sqlite3.DatabaseError as exc:
            raise RecordingError(f"{path} is not a readable profilerd recording: {exc}") from None
        if not tables & {"meta", "steps"}:
            raise RecordingError(f"{path} is not a profilerd recording (no meta or steps table)")
        meta = read_meta(conn, notes) if "meta" in tables else {}
        if "meta" not in tables:
            notes.append(Damage("table meta is missing: the run's identity and state are unknown"))
        newer = schema_problem(path, meta)
        if newer:
            raise RecordingError(newer)
        version = meta.get("schema_version")
        if version is not None and not version.strip().isdigit():
            notes.append(Damage(f"the schema version {version!r} is not a number"))
        cut = truncation_damage(path)
        if cut:
            notes.append(cut)
        steps = _numeric_table(conn, "steps", STEP_COLUMNS, "end_unix_s", notes)
        configs = _read_configs(conn, notes) if "configs" in tables else []
        hosts = _numeric_table(conn, "host_samples", HOST_COLUMNS, "ts_unix_s", notes)
        processes = _numeric_table(conn, "process_samples", PROCESS_COLUMNS, "ts_unix_s", notes)
        sessions = _read_sessions(conn, notes)
        reasons = "CASE WHEN json_valid(sample) THEN json_extract(sample, '$.clock_event_reasons') END"
        gpus = _mixed_table(conn, "gpu_samples", GPU_COLUMNS, _GPU_NUMERIC, {"clock_event_reasons": reasons}, notes)
        events = _mixed_table(conn, "events", EVENT_COLUMNS, ["ts_unix_s"], {}, notes)
    finally:
        conn.close()
    hostname = meta.get("hostname", "")
    gpus["node"] = hostname
    events["node"] = hostname
    ranks = tuple(int(r) for r in np.unique(steps["rank"].to_numpy()))
    source = Source(meta.get("run_id", path.stem), path, hostname, meta.get("state", "unknown"), ranks)
    return Recording(path, meta, steps, configs, hosts, processes, sessions, gpus, events, tuple(notes), (source,))


def gpu_samples(recording: Recording) -> pd.DataFrame:
    """The job's GPU samples as the analysis reads them (``context.gpu_frame``), from every
    recording merged into this one."""
    pids = {int(p) for p in recording.sessions["pid"].dropna()} if "pid" in recording.sessions else set()
    paths = [source.path for source in recording.sources] or [recording.path]
    return gpu_frame(read_gpu_samples(paths), pids)


def read_gpu_samples(paths: list[Path]) -> list[GpuSample]:
    """Every recorded GPU sample, oldest first in each recording; unreadable rows are skipped."""
    samples: list[GpuSample] = []
    for path in paths:
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        except sqlite3.Error:
            continue
        try:
            cursor = conn.execute(
                f"SELECT {', '.join(GPU_TABLE.names)}, {GPU_SAMPLE_JSON} FROM {GPU_TABLE.name} ORDER BY ts_unix_s"
            )
            for *row, text in cursor:
                try:
                    document = json.loads(text)
                except (TypeError, ValueError):
                    continue
                if not isinstance(document, dict):
                    continue
                # The row's own columns fill what the JSON lacks (a sample written without its
                # timestamp or index is still that row's sample).
                for column, value in zip(GPU_TABLE.columns, row, strict=True):
                    if document.get(column.attribute) is None and value is not None:
                        document[column.attribute] = column.decode(value)
                if isinstance(document.get("ts_unix_s"), int | float) and isinstance(document.get("index"), int):
                    try:
                        samples.append(GpuSample.from_json(document))
                    except TypeError:  # a sample that is not one (a field of the wrong shape)
                        continue
        except sqlite3.Error as exc:
            log.debug("gpu samples of %s unreadable: %s", path, exc)
        finally:
            conn.close()
    return samples


@dataclass(frozen=True)
class SampleRows:
    """The sample tables as stored rows, oldest first: what a replay steps through by time,
    with what the frames leave out (per-core CPU, memory, the whole GPU sample as JSON)."""

    hosts: list[HostSample]
    processes: list[RecordedProcess]
    gpus: list[tuple[float, int, str]]  # ts_unix_s, gpu_index, the sample as JSON
    sessions: dict[int, tuple[int, str]]  # rank: (pid, hostname)


def _records(conn: sqlite3.Connection, table: Table) -> list[dict[str, Any]]:
    """A record table's rows, oldest first, as its record's attribute values; the columns an older
    recording lacks read as unknown, and a recording without the table has no rows."""
    stored = set(_columns(conn, table.name))
    present = tuple(name for name in table.names if name in stored)
    if not present:
        return []
    sql = f"SELECT {', '.join(present)} FROM {table.name} ORDER BY {table.columns[0].name}"
    return [table.values(present, row) for row in conn.execute(sql)]


def read_sample_rows(path: Path) -> SampleRows:
    """The sample rows of one recording (a table it lacks has none); RecordingError when a table
    cannot be read."""
    conn = connect_readonly(path)
    try:
        tables = table_names(conn)
        gpus = f"SELECT ts_unix_s, gpu_index, {GPU_SAMPLE_JSON} FROM {GPU_TABLE.name} ORDER BY ts_unix_s"
        sessions = "SELECT pid, rank, hostname FROM sessions"
        return SampleRows(
            hosts=[HostSample(**values) for values in _records(conn, HOST_TABLE)],
            processes=[RecordedProcess(**values) for values in _records(conn, PROCESS_TABLE)],
            gpus=conn.execute(gpus).fetchall() if GPU_TABLE.name in tables else [],
            sessions={
                int(rank): (int(pid), hostname)
                for pid, rank, hostname in (conn.execute(sessions).fetchall() if "sessions" in tables else [])
            },
        )
    except sqlite3.DatabaseError as exc:
        raise RecordingError(f"{path}: {exc}") from None
    finally:
        conn.close()


def read_verdicts(path: Path) -> list[RecordedVerdict]:
    """The verdicts the daemon recorded during the run (when one changed, and every few seconds),
    oldest first; RecordingError when the table cannot be read."""
    conn = connect_readonly(path)
    try:
        return [RecordedVerdict(**values) for values in _records(conn, VERDICT_TABLE)]
    except sqlite3.DatabaseError as exc:
        raise RecordingError(f"{path}: {exc}") from None
    finally:
        conn.close()
