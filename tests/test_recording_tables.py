"""The recorded tables (``profilerd.model``: host samples, process samples, verdicts, the GPU
sample's columns): what the daemon's recorder writes reads back equal through the reading API,
the file's columns are the tables', the frames are the same live and offline, and a recording
written before the tables existed (the committed fixture, an older schema) still loads."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from profilerd import recordings
from profilerd.analysis.context import HOST_COLUMNS, PROCESS_COLUMNS, host_frame, process_frame
from profilerd.analysis.rules import load_rules
from profilerd.model import (
    GPU_TABLE,
    HOST_TABLE,
    PROCESS_TABLE,
    VERDICT_TABLE,
    GpuProcess,
    GpuSample,
    HostSample,
    Kind,
    ProbeSession,
    ProcessSample,
    RecordedVerdict,
    Table,
    _check,
)
from profilerd.recordings.schema import recording_file
from profilerd.recordings.writer import Recorder, open_recording
from profilerd.samplers.sinks import RecordingSink, VerdictRecord
from profilerd.store import Store
from tests.fixtures.make_fixture import FIXTURE, START_UNIX_S

RUN = "tables-run"
T0 = 1_767_225_600.0
SESSION = ProbeSession(4242, "tables-job", RUN, 0, 0, 1, "node-a", ("train.py",), T0 - 1.0, "0.1.0")

# Every field set, none left at a default; per-core ratios already at the 4 decimals a recording keeps.
HOSTS = [
    HostSample(T0 + 1, 4, (0.25, 0.5, 0.0, 1.0), 0.4375, 0.0625, 3 << 30, 16 << 30, 1.5),
    HostSample(T0 + 2, 4, (0.1234, 0.9, 0.3, 0.2), 0.3809, None, 5 << 30, 16 << 30, None),  # unknown iowait, load
]
PROCESSES = [
    ProcessSample(T0 + 1, 4242, "tables-job", 0, True, 1.25, 2 << 30, 12, (4243, 4244), (0.75, 0.5)),
    ProcessSample(T0 + 2, 4242, "tables-job", 0, True, None, None, None),  # psutil was denied: unknown
    ProcessSample(T0 + 3, 4242, "tables-job", 0, False, None, None, None),  # the process is gone
]


def write_run(runs_dir: Path, verdicts: list[RecordedVerdict] = ()) -> Path:
    """A run as the daemon records it: a hello, then host and process samples and verdicts."""
    recorder = Recorder(runs_dir)
    recorder.start()
    recorder.start_run(RUN, {"job": SESSION.job, "hostname": SESSION.hostname})
    recorder.session(SESSION)
    for host in HOSTS:
        recorder.host([RUN], host)
    for process in PROCESSES:
        recorder.process(RUN, process)
    for verdict in verdicts:
        recorder.verdict(RUN, verdict)
    recorder.stop()
    return recording_file(runs_dir, RUN)


def test_host_samples_read_back_equal_in_every_field(tmp_path: Path) -> None:
    path = write_run(tmp_path)
    assert recordings.read_sample_rows(path).hosts == HOSTS


def test_process_samples_read_back_equal_in_every_recorded_field(tmp_path: Path) -> None:
    path = write_run(tmp_path)
    read = recordings.read_sample_rows(path).processes
    assert len(read) == len(PROCESSES)
    for written, back in zip(PROCESSES, read, strict=True):
        for column in PROCESS_TABLE.columns:
            assert getattr(back, column.attribute) == getattr(written, column.attribute), column.name
    # What the recording keeps of the workers: their count, their sum and the busiest one.
    assert (read[0].num_workers, read[0].workers_cpu_ratio, read[0].worker_cpu_max_ratio) == (2, 1.25, 0.75)
    assert (read[1].cpu_ratio, read[1].rss_bytes, read[1].worker_cpu_max_ratio) == (None, None, None)
    assert [p.alive for p in read] == [True, True, False]


def test_verdicts_recorded_by_the_daemon_read_back_equal(tmp_path: Path) -> None:
    """A real whole-run verdict through the daemon's recording sink, document and all."""
    ruleset, _ = load_rules()
    verdict = recordings.analyse(recordings.load(FIXTURE), ruleset)
    store = Store(500, 120.0)
    recorder = Recorder(tmp_path)
    recorder.start()
    RecordingSink(recorder, store).verdicts([VerdictRecord("job-v", RUN, verdict)])
    recorder.stop()
    [back] = recordings.read_verdicts(recording_file(tmp_path, RUN))
    expected = RecordedVerdict(
        verdict.evaluated_unix_s, "job-v", verdict.primary, verdict.severity, verdict.to_json(RUN, "job-v")
    )
    assert back == expected
    assert back.primary == "data" and back.document is not None and back.document["schema"] == "profilerd.verdict/v1"
    # `profilerd runs` lists the run with the verdict it recorded.
    assert recordings.summarize(recording_file(tmp_path, RUN)).primary == "data"


def test_the_files_columns_are_the_tables_and_the_frames_columns_follow_them(tmp_path: Path) -> None:
    conn = open_recording(tmp_path / "r.sqlite")
    try:
        for table, extra in ((HOST_TABLE, ()), (PROCESS_TABLE, ()), (GPU_TABLE, ("sample",)), (VERDICT_TABLE, ())):
            stored = [(row[1], row[2]) for row in conn.execute(f"PRAGMA table_info({table.name})")]
            assert stored == [(c.name, c.sql) for c in table.columns] + [(name, "TEXT") for name in extra]
    finally:
        conn.close()
    assert (HOST_TABLE.frame_columns, PROCESS_TABLE.frame_columns) == (HOST_COLUMNS, PROCESS_COLUMNS)
    assert set(HOST_COLUMNS) <= set(HOST_TABLE.names) and set(PROCESS_COLUMNS) <= set(PROCESS_TABLE.names)


def test_a_recordings_frames_equal_the_live_frames_of_the_same_samples(tmp_path: Path) -> None:
    """The offline analysis reads the same frames the live analysis builds from the store."""
    rec = recordings.load(write_run(tmp_path))
    pd.testing.assert_frame_equal(rec.hosts, host_frame(HOSTS), check_dtype=False)
    pd.testing.assert_frame_equal(rec.processes, process_frame(PROCESSES), check_dtype=False)
    for table, frame in ((HOST_TABLE, rec.hosts), (PROCESS_TABLE, rec.processes)):
        integers = {c.name for c in table.columns if c.frame and c.kind.frame_dtype == "int32"}
        assert {name for name in frame if frame[name].dtype.kind == "i"} == integers


def test_gpu_samples_read_back_equal_and_their_columns_fill_what_the_json_lacks(tmp_path: Path) -> None:
    full = GpuSample(
        T0,
        0,
        "GPU-a",
        "NVIDIA H100",
        utilization_gpu_ratio=0.5,
        memory_used_bytes=3 << 30,
        memory_total_bytes=80 << 30,
        power_watts=250.0,
        clock_event_reasons=("sw_power_cap",),
        sm_active_ratio=0.25,
        processes=(GpuProcess(4242, 1 << 30, 0.5), GpuProcess(4243, None)),
    )
    lost = GpuSample(T0 + 1, 1, "GPU-b", "NVIDIA H100", lost=True, memory_used_bytes=2 << 30, power_watts=90.0)
    recorder = Recorder(tmp_path)
    recorder.start()
    for sample in (full, lost):
        recorder.gpu([RUN], sample)
    recorder.stop()
    path = recording_file(tmp_path, RUN)
    assert recordings.read_gpu_samples([path]) == [full, lost]
    conn = sqlite3.connect(path)
    conn.execute("UPDATE gpu_samples SET sample = '{}' WHERE gpu_index = 1")  # as the committed fixture's lack fields
    conn.commit()
    conn.close()
    back = recordings.read_gpu_samples([path])[1]
    assert [getattr(back, a) for a in GPU_TABLE.attributes] == [getattr(lost, a) for a in GPU_TABLE.attributes]


def test_the_committed_fixture_written_by_earlier_code_still_loads() -> None:
    rows = recordings.read_sample_rows(FIXTURE)
    assert len(rows.hosts) == 41 and len(rows.processes) == 4 * 41
    first = rows.hosts[0]
    assert (first.ts_unix_s, first.cpu_count, first.cpu_per_core_ratio) == (START_UNIX_S, 32, ())
    assert (first.iowait_ratio, first.memory_used_bytes, first.memory_total_bytes, first.load1) == (
        0.01,
        64 << 30,
        512 << 30,
        9.5,
    )
    process = rows.processes[0]
    assert (process.pid, process.alive, process.rss_bytes, process.num_workers) == (40_000, True, 6 << 30, 1)
    assert [(v.job, v.primary, v.severity, v.document) for v in recordings.read_verdicts(FIXTURE)] == [
        ("fixture-ddp-job", "data", "critical", {"primary": "data"})
    ]
    rec = recordings.load(FIXTURE)
    assert list(rec.hosts) == HOST_COLUMNS and list(rec.processes) == PROCESS_COLUMNS
    assert len(rec.hosts) == 41 and rec.processes["num_workers"].eq(1).all()


def _older_recording(path: Path) -> None:
    """A recording from before the process table had its workers' maximum and the host table its
    per-core CPU, with one row each."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO meta VALUES ('schema_version', '1'), ('run_id', 'old'), ('state', 'closed');
        CREATE TABLE steps (end_unix_s REAL, rank INTEGER, pid INTEGER, step INTEGER, step_s REAL);
        CREATE TABLE host_samples (ts_unix_s REAL, cpu_count INTEGER, cpu_ratio REAL);
        INSERT INTO host_samples VALUES (10.0, 8, 0.5);
        CREATE TABLE process_samples (ts_unix_s REAL, pid INTEGER, rank INTEGER, alive INTEGER, cpu_ratio REAL,
            num_workers INTEGER, workers_cpu_ratio REAL);
        INSERT INTO process_samples VALUES (10.0, 7, 0, 1, 0.9, 2, 1.5);
        """
    )
    conn.commit()
    conn.close()


def test_an_older_schema_reads_its_missing_columns_as_unknown_and_a_daemon_extends_it(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _older_recording(path)
    rows = recordings.read_sample_rows(path)
    assert rows.hosts == [HostSample(10.0, 8, (), 0.5, None, None, None, None)]  # type: ignore[arg-type]
    [process] = rows.processes
    assert (process.num_workers, process.workers_cpu_ratio, process.worker_cpu_max_ratio) == (2, 1.5, None)
    assert math.isnan(recordings.load(path).processes["worker_cpu_max_ratio"].iloc[0])
    assert recordings.read_verdicts(path) == []  # no verdicts table: no verdicts, not an error
    # A daemon that opens it again (restarted on the same run) adds the columns and its rows fit.
    open_recording(path).close()
    conn = sqlite3.connect(path)
    present = [row[1] for row in conn.execute("PRAGMA table_info(process_samples)")]
    conn.execute(PROCESS_TABLE.insert(), PROCESS_TABLE.row(PROCESSES[0]))
    conn.commit()
    conn.close()
    assert set(PROCESS_TABLE.names) <= set(present)
    assert recordings.read_sample_rows(path).processes[-1].worker_cpu_max_ratio == 0.75


def test_a_damaged_value_reads_as_unknown_instead_of_failing(tmp_path: Path) -> None:
    path = write_run(tmp_path)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE host_samples SET cpu_ratio = 'garbage', cpu_per_core = '[0.5, \"x\"' ")
    conn.commit()
    conn.close()
    hosts = recordings.read_sample_rows(path).hosts
    assert [(h.cpu_ratio, h.cpu_per_core_ratio) for h in hosts] == [(None, ())] * len(HOSTS)


def test_a_record_that_disagrees_with_its_table_fails_at_import() -> None:
    @dataclass
    class Partial:
        ts_unix_s: float
        surplus: int

    table = Table("t", (HOST_TABLE.columns[0], HOST_TABLE.columns[1]))
    with pytest.raises(RuntimeError, match=r"Partial disagrees with the t table: missing \['cpu_count'\], unknown"):
        _check(Partial, table, exact=True)
    assert {kind.sql for kind in Kind} == {"INTEGER", "REAL", "TEXT"}
