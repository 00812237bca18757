"""The recording file: its tables (one per record type, from the records' field tables), the
schema version readers check, and where a run's file lives."""

from __future__ import annotations

import re
from pathlib import Path

from profilerd_probes import schema

SCHEMA_VERSION = 1

# The gpu_samples table: (column, GpuSample field, SQL type), then ``sample``, the whole sample as
# JSON (every field, for the offline GPU analysis). The columns are for SQL queries and the frame.
GPU_SAMPLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("ts_unix_s", "ts_unix_s", "REAL"),
    ("gpu_index", "index", "INTEGER"),
    ("uuid", "uuid", "TEXT"),
    ("name", "name", "TEXT"),
    ("lost", "lost", "INTEGER"),
    ("utilization_gpu_ratio", "utilization_gpu_ratio", "REAL"),
    ("memory_used_bytes", "memory_used_bytes", "INTEGER"),
    ("memory_total_bytes", "memory_total_bytes", "INTEGER"),
    ("power_watts", "power_watts", "REAL"),
    ("power_limit_watts", "power_limit_watts", "REAL"),
    ("temperature_celsius", "temperature_celsius", "REAL"),
    ("sm_active_ratio", "sm_active_ratio", "REAL"),
    ("tensor_active_ratio", "tensor_active_ratio", "REAL"),
)
GPU_SAMPLE_FIELDS = [sample_field for _, sample_field, _ in GPU_SAMPLE_COLUMNS]


def _gpu_samples_ddl() -> str:
    columns = ", ".join(f"{column} {sql}" for column, _, sql in GPU_SAMPLE_COLUMNS)
    return f"CREATE TABLE IF NOT EXISTS gpu_samples ({columns}, sample TEXT)"


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS sessions (
    pid INTEGER, rank INTEGER, local_rank INTEGER, world_size INTEGER, hostname TEXT,
    argv TEXT, started_unix_s REAL, probe_version TEXT);
{steps}
CREATE TABLE IF NOT EXISTS configs (ts_unix_s REAL, pid INTEGER, rank INTEGER, config TEXT);
CREATE TABLE IF NOT EXISTS host_samples (
    ts_unix_s REAL, cpu_count INTEGER, cpu_ratio REAL, iowait_ratio REAL,
    memory_used_bytes INTEGER, memory_total_bytes INTEGER, load1 REAL, cpu_per_core TEXT);
CREATE TABLE IF NOT EXISTS process_samples (
    ts_unix_s REAL, pid INTEGER, rank INTEGER, alive INTEGER, cpu_ratio REAL, rss_bytes INTEGER,
    num_workers INTEGER, workers_cpu_ratio REAL, worker_cpu_max_ratio REAL);
{gpu_samples}
CREATE TABLE IF NOT EXISTS verdicts (ts_unix_s REAL, job TEXT, primary_category TEXT,
    severity TEXT, verdict TEXT);
CREATE TABLE IF NOT EXISTS events (ts_unix_s REAL, kind TEXT, detail TEXT);
CREATE INDEX IF NOT EXISTS steps_by_time ON steps (end_unix_s);
""".replace("{steps}", schema.steps_ddl() + ";").replace("{gpu_samples}", _gpu_samples_ddl() + ";")

INSERTS = {
    "sessions": "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?)",
    "steps": schema.steps_insert(),
    "configs": "INSERT INTO configs VALUES (?,?,?,?)",
    "host_samples": "INSERT INTO host_samples VALUES (?,?,?,?,?,?,?,?)",
    "process_samples": "INSERT INTO process_samples VALUES (?,?,?,?,?,?,?,?,?)",
    "gpu_samples": f"INSERT INTO gpu_samples VALUES ({','.join('?' * (len(GPU_SAMPLE_COLUMNS) + 1))})",
    "verdicts": "INSERT INTO verdicts VALUES (?,?,?,?,?)",
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
