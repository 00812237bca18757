"""The recording file: its tables (one per record type, from the records' field tables: the
step's in ``probes/schema.py``, the samples' and the verdict's in ``profilerd/model.py``), the
schema version readers check, and where a run's file lives."""

from __future__ import annotations

import re
from pathlib import Path

from profilerd.model import GPU_SAMPLE_JSON, GPU_TABLE, HOST_TABLE, PROCESS_TABLE, VERDICT_TABLE, Table
from profilerd_probes import schema

SCHEMA_VERSION = 1

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sessions (
    pid INTEGER, rank INTEGER, local_rank INTEGER, world_size INTEGER, hostname TEXT,
    argv TEXT, started_unix_s REAL, probe_version TEXT);
{schema.steps_ddl()};
CREATE TABLE IF NOT EXISTS configs (ts_unix_s REAL, pid INTEGER, rank INTEGER, config TEXT);
{HOST_TABLE.ddl()};
{PROCESS_TABLE.ddl()};
{GPU_TABLE.ddl(f", {GPU_SAMPLE_JSON} TEXT")};
{VERDICT_TABLE.ddl()};
CREATE TABLE IF NOT EXISTS events (ts_unix_s REAL, kind TEXT, detail TEXT);
CREATE INDEX IF NOT EXISTS steps_by_time ON steps (end_unix_s);
"""

# The records' tables, for the writer's migration of an older recording and the reader.
RECORD_TABLES: tuple[Table, ...] = (HOST_TABLE, PROCESS_TABLE, GPU_TABLE, VERDICT_TABLE)

INSERTS = {
    "sessions": "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?)",
    "steps": schema.steps_insert(),
    "configs": "INSERT INTO configs VALUES (?,?,?,?)",
    HOST_TABLE.name: HOST_TABLE.insert(),
    PROCESS_TABLE.name: PROCESS_TABLE.insert(),
    GPU_TABLE.name: GPU_TABLE.insert((GPU_SAMPLE_JSON,)),
    VERDICT_TABLE.name: VERDICT_TABLE.insert(),
    "events": "INSERT INTO events VALUES (?,?,?)",
    # Late device timing of a step already written (the probes' first steps); end_unix_s
    # reaches the row through the steps_by_time index, pid and step make it the one.
    "step_timing": (
        "UPDATE steps SET comm_s = ?, flags = flags | ?, "
        + ", ".join(f"{name} = ?" for name in schema.GPU_TIMING_FIELDS)
        + " WHERE end_unix_s = ? AND pid = ? AND step = ?"
    ),
}

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def recording_file(runs_dir: Path, run_id: str) -> Path:
    """The file of a run; run ids are sanitised so a hostile id cannot escape the directory."""
    safe = _SAFE_NAME.sub("_", run_id).strip("._") or "run"
    return runs_dir / f"{safe[:120]}.sqlite"
