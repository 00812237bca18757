"""Reading recordings back: list, resolve, prune, load into frames, merge nodes, and analyse offline.

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
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from profilerd.analysis.context import HOST_COLUMNS, PROCESS_COLUMNS, gpu_frame
from profilerd.analysis.diagnosis import Observation, diagnose
from profilerd.analysis.features import STEP_COLUMNS
from profilerd.analysis.rules import RuleSet
from profilerd.analysis.verdict import Verdict
from profilerd.catalog import (  # noqa: F401  (the listing's names, as callers know them)
    CHUNK_ROWS,
    Damage,
    RecordingError,
    RunSummary,
    _chunks,
    _open,
    _read_meta,
    _tables,
    _truncation,
    connect_readonly,
    list_runs,
    prune,
    resolve,
    schema_problem,
    select_for_pruning,
    summarize,
)
from profilerd.recording import GPU_SAMPLE_COLUMNS, read_gpu_samples
from profilerd_probes.schema import INTEGER_STEP_COLUMNS

# Integer columns; every other numeric column is float64 and NaN where the value is unknown.
_INT_COLUMNS = {
    *INTEGER_STEP_COLUMNS,
    "cpu_count",
    "alive",
    "num_workers",
    "gpu_index",
    "lost",
}
# Small integers kept as int32: a 10-hour, 8-rank run has millions of step rows, and the
# analysis copies its frame a few times.
_INT32_COLUMNS = {
    "rank",
    "pid",
    "step",
    "flags",
    "sync_count",
    "graph_compiles",
    "comm_ops",
    "cpu_count",
    "alive",
    "num_workers",
    "gpu_index",
    "lost",
}
GPU_COLUMNS = [column for column, _, _ in GPU_SAMPLE_COLUMNS]
_GPU_NUMERIC = [column for column, _, sql in GPU_SAMPLE_COLUMNS if sql != "TEXT"]
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
        for rows in _chunks(conn, sql, table, notes):
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
    parts = [pd.DataFrame.from_records(rows, columns=columns) for rows in _chunks(conn, sql, table, notes)]
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
    for rows in _chunks(conn, sql, "configs", notes):
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
    rows = [row for chunk in _chunks(conn, sql, "sessions", notes) for row in chunk]
    frame = pd.DataFrame.from_records(rows, columns=columns)
    for name in wanted:
        if name not in frame:
            frame[name] = None
    for name in numeric:
        frame[name] = pd.to_numeric(frame[name], errors="coerce")
    return frame[wanted]


def load(path: Path) -> Recording:
    """Everything in a recording as frames; damaged or missing parts become ``notes``."""
    conn, wal_note = _open(path)
    notes: list[str] = [wal_note] if wal_note else []
    try:
        try:
            tables = _tables(conn)
        except sqlite3.DatabaseError as exc:
            raise RecordingError(f"{path} is not a readable profilerd recording: {exc}") from None
        if not tables & {"meta", "steps"}:
            raise RecordingError(f"{path} is not a profilerd recording (no meta or steps table)")
        meta = _read_meta(conn, notes) if "meta" in tables else {}
        if "meta" not in tables:
            notes.append(Damage("table meta is missing: the run's identity and state are unknown"))
        newer = schema_problem(path, meta)
        if newer:
            raise RecordingError(newer)
        version = meta.get("schema_version")
        if version is not None and not version.strip().isdigit():
            notes.append(Damage(f"the schema version {version!r} is not a number"))
        cut = _truncation(path)
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


# ---- several nodes of one job ----------------------------------------------------------------------
def estimate_clock_offset(reference: pd.DataFrame, other: pd.DataFrame) -> tuple[float, float] | None:
    """Seconds to add to ``other``'s clock to match ``reference``'s, and the alignment's spread.

    Synchronous data-parallel ranks finish step N together (the gradient all-reduce is a
    barrier), so the median difference of per-step end times over the steps both recordings
    saw is the offset between the two nodes' clocks; the median absolute deviation around it
    says how well the steps lined up. None when they share fewer than 3 steps.
    """
    a = reference.groupby("step")["end_unix_s"].median()
    b = other.groupby("step")["end_unix_s"].median()
    common = a.index.intersection(b.index)
    if len(common) < 3:
        return None
    differences = a.loc[common].to_numpy() - b.loc[common].to_numpy()
    offset = float(np.median(differences))
    return offset, float(np.median(np.abs(differences - offset)))


def _shift(frame: pd.DataFrame, column: str, offset: float) -> pd.DataFrame:
    if offset == 0.0 or frame.empty:
        return frame
    return frame.assign(**{column: frame[column] + offset})


def merge(recordings: Sequence[Recording]) -> Recording:
    """Recordings of one job from several nodes as one, with every clock aligned to rank 0's node.

    Refuses recordings of different jobs or with ranks in common: those are not the nodes of
    one run, and aligning their clocks by step would produce a confident-looking fiction.
    """
    if len(recordings) == 1:
        return recordings[0]
    jobs = sorted({r.job for r in recordings})
    if len(jobs) > 1:
        raise RecordingError(
            f"these recordings belong to different jobs ({', '.join(jobs)}): `report` merges the nodes of one job "
            "(give every node the same PROFILERD_JOB_ID, as torchrun's TORCHELASTIC_RUN_ID does)"
        )
    seen: dict[int, str] = {}
    for recording in recordings:
        for rank in recording.sources[0].ranks if recording.sources else ():
            if rank in seen:
                raise RecordingError(
                    f"rank {rank} is in both {seen[rank]} and {recording.run_id}: these are not different nodes of "
                    "one run (a restarted job is reported one recording at a time)"
                )
            seen[rank] = recording.run_id
    ordered = sorted(recordings, key=lambda r: min(r.sources[0].ranks) if r.sources and r.sources[0].ranks else 1 << 30)
    reference = ordered[0]
    notes: list[str] = []
    sources: list[Source] = []
    parts: dict[str, list[pd.DataFrame]] = {
        k: [] for k in ("steps", "hosts", "processes", "sessions", "gpus", "events")
    }
    configs: list[dict[str, Any]] = []
    for index, recording in enumerate(ordered):
        source = recording.sources[0] if recording.sources else Source(recording.run_id, recording.path, "", "", ())
        offset, residual = 0.0, None
        if index > 0:
            estimate = estimate_clock_offset(reference.steps, recording.steps)
            if estimate is None:
                notes.append(
                    f"{recording.run_id}: no steps in common with {reference.run_id}, so its clock could not be "
                    "aligned; its timestamps are used as recorded"
                )
            else:
                offset, residual = estimate
        else:
            residual = 0.0
        sources.append(replace(source, clock_offset_s=offset, clock_residual_s=residual))
        notes.extend(type(note)(f"{recording.run_id}: {note}") for note in recording.notes)
        node = source.hostname or f"node{index}"
        parts["steps"].append(_shift(recording.steps, "end_unix_s", offset))
        parts["hosts"].append(_shift(recording.hosts, "ts_unix_s", offset))
        parts["processes"].append(_shift(recording.processes, "ts_unix_s", offset))
        parts["sessions"].append(_shift(recording.sessions, "started_unix_s", offset))
        parts["gpus"].append(_shift(recording.gpus, "ts_unix_s", offset).assign(node=node))
        parts["events"].append(_shift(recording.events, "ts_unix_s", offset).assign(node=node))
        configs.extend(recording.configs)

    def joined(name: str, sort_by: str | None) -> pd.DataFrame:
        frames = [f for f in parts[name] if not f.empty]
        if not frames:
            return parts[name][0]
        frame = pd.concat(frames, ignore_index=True)
        return frame.sort_values(sort_by, kind="stable", ignore_index=True) if sort_by else frame

    meta = dict(reference.meta)
    meta["merged_run_ids"] = ",".join(r.run_id for r in ordered)
    states = {r.state for r in ordered}
    meta["state"] = reference.state if len(states) == 1 else ",".join(sorted(states))
    return Recording(
        path=reference.path,
        meta=meta,
        steps=joined("steps", "end_unix_s"),
        configs=configs,
        hosts=joined("hosts", "ts_unix_s"),
        processes=joined("processes", "ts_unix_s"),
        sessions=joined("sessions", None),
        gpus=joined("gpus", "ts_unix_s"),
        events=joined("events", "ts_unix_s"),
        notes=tuple(notes),
        sources=tuple(sources),
    )


def gpu_samples(recording: Recording) -> pd.DataFrame:
    """The job's GPU samples as the analysis reads them (``context.gpu_frame``), from every
    recording merged into this one."""
    pids = {int(p) for p in recording.sessions["pid"].dropna()} if "pid" in recording.sessions else set()
    paths = [source.path for source in recording.sources] or [recording.path]
    return gpu_frame(read_gpu_samples(paths), pids)


# ---- analysis ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunVerdict(Verdict):
    """A whole-run verdict, with the time-series and data-quality summaries of the recording.

    ``to_json`` adds them to the verdict document, so `run --json` and `report --format json`
    (which both analyse through :func:`analyse`) write the same extended document.
    """

    timeseries: dict[str, Any] = field(default_factory=dict)
    data_quality: dict[str, Any] = field(default_factory=dict)

    def to_json(self, run_id: str, job: str | None = None, **extra: Any) -> dict[str, Any]:
        return super().to_json(run_id, job, timeseries=self.timeseries, data_quality=self.data_quality, **extra)


def analyse(recording: Recording, ruleset: RuleSet) -> RunVerdict:
    """The whole-run verdict: every recorded step after warm-up, one evaluation; the loss
    evidence from every step, warm-up included (a loss that is NaN from step 1 counts)."""
    from profilerd import timeline

    steps = recording.steps
    observation = Observation.whole_run(
        steps,
        config=recording.config(),
        hosts=recording.hosts,
        processes=recording.processes,
        gpus=gpu_samples(recording),
    )
    verdict = diagnose(observation, ruleset)
    # Stamp it with the last recorded step, so the same recording always gives the same JSON.
    last = float(steps["end_unix_s"].max()) if not steps.empty else 0.0
    base = {f.name: getattr(verdict, f.name) for f in fields(Verdict)}
    return RunVerdict(
        **{**base, "evaluated_unix_s": last},
        timeseries=timeline.summaries(recording, ruleset.warmup_steps),
        data_quality=timeline.data_quality(recording),
    )
