"""Device-side step timing (#15 item 1) on the simulated device: a real StepProbe records markers
through the DeviceTimer seam, the records travel the wire and ingest, and the derived fields are
compared with what the simulated device really did."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from simdevice import (
    COMPUTE_BOUND,
    COMPUTE_BOUND_ITEM,
    DATA_STARVED,
    DDP_COMM_BOUND,
    LAUNCH_BOUND,
    LOADER_OVERLAPPED,
    SCENARIOS,
    ConstantTimer,
    Run,
    ingest,
    run_scenario,
)

from profilerd import recordings
from profilerd.analysis.features import steps_frame
from profilerd.model import StepRecord
from profilerd.recordings.writer import Recorder
from profilerd.samplers.ingest import Ingest
from profilerd.samplers.sinks import fan_out
from profilerd.store import Store
from profilerd_probes import core, device, wire
from profilerd_probes.schema import GPU_TIMING_FIELDS

WARMUP = 3  # the first steps start before the first drained marker (and the first 20 are sent at once)


def _steady(run: Run) -> list[tuple[StepRecord, object]]:
    """Timed steady-state steps with the ground truth of the same step."""
    pairs = []
    for record in run.records:
        index = record.step - 1
        if record.step > WARMUP and index < len(run.truths) and record.gpu_busy_s is not None:
            pairs.append((record, run.truths[index]))
    assert len(pairs) >= 20, f"{run.probe.step_index} steps, {len(pairs)} timed"
    return pairs


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_every_scenario_keeps_the_stream_clean(scenario) -> None:
    """Markers come from a bounded pool, elapsed time is asked only of completed markers (the
    simulated device raises otherwise), and every field is consistent with the step."""
    run = run_scenario(scenario)
    assert run.device.records <= 4 * run.probe.step_index + 1
    assert run.device.elapsed_calls > 0
    for record, _truth in _steady(run):
        assert record.flags & wire.FLAG_HAS_GPU_TIMING
        phases = record.gpu_forward_s + record.gpu_backward_s + record.gpu_optimizer_s
        assert record.gpu_busy_s == pytest.approx(phases)
        assert record.gpu_busy_s + record.gpu_idle_s == pytest.approx(max(record.step_s, record.gpu_busy_s))
        assert 0.0 <= record.gpu_idle_data_wait_s <= record.data_wait_s + 1e-12
        assert record.host_ahead_s == pytest.approx(_truth.host_ahead_s, abs=2e-5)
        # What the analysis assumes: exposed communication lies within the idle left after the
        # data wait (DDP's all-reduce is moved there by the probe).
        assert record.comm_s <= record.gpu_idle_s - record.gpu_idle_data_wait_s + 1e-9
        # Busy is flagged a lower bound exactly where the device kept pace with the host.
        lower_bound = bool(record.flags & wire.FLAG_GPU_BUSY_LOWER_BOUND)
        assert lower_bound == (scenario is LAUNCH_BOUND), record


def test_data_starved_the_device_idles_while_the_loader_is_waited_for() -> None:
    for record, truth in _steady(run_scenario(DATA_STARVED)):
        assert record.gpu_idle_data_wait_s == pytest.approx(truth.idle_data_wait_s, abs=1e-4)
        assert record.gpu_idle_data_wait_s > 0.4 * record.data_wait_s  # most of the wait: starved
        assert record.gpu_busy_s == pytest.approx(truth.busy_s, rel=0.02)
        assert record.gpu_idle_s > 0.4 * record.step_s


def test_compute_bound_the_device_is_busy_the_whole_step_and_behind_the_host() -> None:
    for record, truth in _steady(run_scenario(COMPUTE_BOUND)):
        assert record.gpu_busy_s == pytest.approx(truth.busy_s, rel=0.01)
        assert record.gpu_busy_s > 0.98 * record.step_s
        assert record.gpu_backward_s == pytest.approx(2 * record.gpu_forward_s, rel=0.01)  # 60 ms vs 30 ms
        assert record.host_ahead_s == pytest.approx(COMPUTE_BOUND.max_queue_s, rel=0.05)
        assert record.gpu_idle_s < 0.01 * record.step_s


def test_compute_bound_with_item_every_step_is_still_busy_not_host_overhead() -> None:
    """The .item() drains the stream each step: the device work surfaces in the host's wait, which
    the host clock puts in "other"; on the device clock the step is busy."""
    for record, truth in _steady(run_scenario(COMPUTE_BOUND_ITEM)):
        assert record.gpu_busy_s == pytest.approx(truth.busy_s, rel=0.02)
        assert record.gpu_busy_s > 0.95 * record.step_s
        assert record.gpu_optimizer_s == pytest.approx(0.005, rel=0.05)  # run while the host waited
        assert record.host_ahead_s < 1e-4
        assert record.other_s > 0.8 * record.step_s  # what the host clock alone would say
        assert record.sync_count == 1


def test_a_loader_wait_overlapped_by_device_work_is_not_device_idle() -> None:
    for record, truth in _steady(run_scenario(LOADER_OVERLAPPED)):
        assert record.data_wait_s == pytest.approx(0.030)
        assert record.gpu_idle_data_wait_s == pytest.approx(0.0, abs=1e-6) == truth.idle_data_wait_s
        assert record.gpu_busy_s == pytest.approx(truth.busy_s, rel=0.01)
        assert record.host_ahead_s > 0.1 and record.host_ahead_s == pytest.approx(truth.host_ahead_s, rel=0.01)


def test_ddp_the_exposed_all_reduce_is_idle_and_communication_on_the_device_clock() -> None:
    """The stream's 60 ms wait for the all-reduce is in the backward markers' span; the probe
    moves DDP's exposed share of it out of busy and into comm_s."""
    for record, truth in _steady(run_scenario(DDP_COMM_BOUND)):
        assert record.gpu_busy_s == pytest.approx(truth.busy_s, rel=0.01)
        assert record.comm_s == pytest.approx(DDP_COMM_BOUND.exposed_comm_s, rel=0.02)
        assert record.gpu_busy_s + record.gpu_idle_s == pytest.approx(record.step_s)


def test_launch_bound_the_device_idles_between_tiny_kernels() -> None:
    """The busy estimate is a lower bound when the device keeps pace with the host: the
    figures must show a mostly idle device that never falls behind."""
    for record, truth in _steady(run_scenario(LAUNCH_BOUND)):
        assert record.gpu_busy_s <= truth.busy_s + 1e-6  # never more than the truth
        assert record.gpu_idle_s > 0.8 * record.step_s
        assert truth.busy_s < 0.2 * record.step_s
        assert record.host_ahead_s < 1e-4


def test_without_a_device_timer_there_is_no_device_timing() -> None:
    run = run_scenario(COMPUTE_BOUND_ITEM, steps=10, device_timing=False)
    assert run.device.records == 0
    assert run.records and all(r.gpu_busy_s is None and not r.flags & wire.FLAG_HAS_GPU_TIMING for r in run.records)


def test_a_step_is_held_until_its_markers_are_reached_and_sent_in_order() -> None:
    """With the host ahead, a step's end marker is unresolved when its batch is due: the record
    waits for a later batch (sequence numbers stay in order), within a bounded delay."""
    run = run_scenario(LOADER_OVERLAPPED, steps=80)
    seqs = [r.step for r in run.records]
    assert seqs == sorted(seqs) == list(range(1, 81))
    timed = [r.step for r in run.records if r.gpu_busy_s is not None]
    assert len(timed) >= 75


def _sent(run: Run) -> list[tuple[str, list[int]]]:
    """What the probe sent, in order: ("steps", numbers) per step batch, ("timing", numbers) per
    late device-timing message."""
    sent = []
    for datagram in run.datagrams:
        message = wire.decode(datagram)
        if isinstance(message, wire.StepBatch):
            sent.append(("steps", [m.step for m in message.steps]))
        elif isinstance(message, wire.JsonMessage) and message.kind == "step_timing":
            sent.append(("timing", [row[0] for row in message.body["steps"]]))
    return sent


def test_a_short_run_gets_device_timing_for_its_first_steps_sent_late() -> None:
    """A 20-step run with the host ahead (what users profile first): every step goes out at once,
    and its device timing follows as soon as the device reaches it; the daemon's records carry it."""
    run = run_scenario(LOADER_OVERLAPPED, steps=20)
    sent = _sent(run)
    batches = [numbers for kind, numbers in sent if kind == "steps"]
    assert batches == [[n] for n in range(1, 21)]  # one datagram per step, none held
    late = [n for kind, numbers in sent if kind == "timing" for n in numbers]
    assert late and late == sorted(late)
    for number in late:  # the timing comes after the step it completes
        assert sent.index(("steps", [number])) < next(
            i for i, (k, ns) in enumerate(sent) if k == "timing" and number in ns
        )
    assert [r.step for r in run.records] == list(range(1, 21))
    timed = [r for r in run.records if r.gpu_busy_s is not None]
    assert len(timed) >= 15 and {r.step for r in timed} == set(late)
    for record in timed:
        assert record.flags & wire.FLAG_HAS_GPU_TIMING
        if WARMUP < record.step < 20:
            truth = run.truths[record.step - 1]
            assert record.gpu_busy_s == pytest.approx(truth.busy_s, rel=0.01)
            assert record.host_ahead_s == pytest.approx(truth.host_ahead_s, rel=0.01)


def test_a_crash_loses_no_step_that_was_reached_only_late_device_timing() -> None:
    """A process killed after its 12th step (no flush): every step it ended was sent, with or
    without its device timing."""
    run = run_scenario(COMPUTE_BOUND, steps=12, crash=True)
    assert [r.step for r in run.records] == list(range(1, 12))  # the 12th had not ended yet
    assert any(r.gpu_busy_s is not None for r in run.records)


def test_late_device_timing_that_is_malformed_is_refused_and_loses_nothing() -> None:
    run = run_scenario(COMPUTE_BOUND, steps=8)
    hello = next(d for d in run.datagrams if wire.decode(d).kind == "hello")  # type: ignore[union-attr]
    batches = [d for d in run.datagrams if isinstance(wire.decode(d), wire.StepBatch)]
    pid = run.probe.ident["pid"]
    timing = [0.01] * len(GPU_TIMING_FIELDS)
    bad = [
        [[3, 1.0, -0.5, 0, *timing]],  # a negative duration
        [[3, 1.0, 0.0, 0, *timing[:-1]]],  # a field short
        [[3, 1.0, 0.0, 0, float("nan"), *timing[1:]]],
        [[99, 1.0, 0.0, 0, *timing]],  # a step the daemon does not hold
        "not rows",
    ]
    store = Store()
    ingest([hello, *batches], store)
    before = {n: getattr(s, n) for s in store.ring("sim")[0] for n in ("step", "gpu_busy_s")}
    refused = [wire.encode_json(wire.KIND_STEP_TIMING, {"pid": pid, "rank": 0, "steps": rows}) for rows in bad]
    ingest(refused, store)
    assert store.dropped["bad_field"] == len(bad)
    assert {n: getattr(s, n) for s in store.ring("sim")[0] for n in ("step", "gpu_busy_s")} == before
    assert len(store.ring("sim")[0]) == 8


def test_late_device_timing_reaches_the_recording(tmp_path: Path) -> None:
    """The daemon's fan-out into a recording: the UPDATE finds the steps written without it."""
    run = run_scenario(LOADER_OVERLAPPED, steps=20)
    recorder = Recorder(tmp_path)
    recorder.start()
    store = Store()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        receiver = Ingest(sock, store, fan_out(store, recorder), threading.Event())
        for datagram in run.datagrams:
            receiver.handle(datagram)
    recorder.close_run("sim", "finished", 0)
    recorder.stop()
    steps = recordings.load(tmp_path / "sim.sqlite").steps.sort_values("step")
    live = {r.step: r.gpu_busy_s for r in run.records}
    assert steps["gpu_busy_s"].notna().sum() >= 15
    for step, busy in zip(steps["step"], steps["gpu_busy_s"], strict=True):
        assert busy == pytest.approx(live[int(step)], nan_ok=True) if live[int(step)] is not None else busy != busy
    # The late timing adds its flag bits; the step's own (it carries the learning rate) stay.
    flags = {r.step: r.flags for r in run.records}
    assert steps["flags"].astype(int).tolist() == [flags[int(n)] for n in steps["step"]]
    assert all(f & wire.FLAG_HAS_LR for f in flags.values())


def test_the_marker_pool_is_bounded_when_the_device_falls_far_behind() -> None:
    timer = ConstantTimer(reached=False)
    clock = device.DeviceClock(timer)
    markers = [clock.mark(float(i), 0.0) for i in range(device.POOL_SIZE + 10)]
    assert sum(m is not None for m in markers) == device.POOL_SIZE
    assert clock.skipped == 10 and timer.created == device.POOL_SIZE


def test_the_daemons_ingest_keeps_device_timing_and_none_without_it() -> None:
    """The probe's own datagrams (hello, config, step batches) through the daemon's Ingest."""
    timed, untimed = run_scenario(COMPUTE_BOUND_ITEM, steps=32), run_scenario(DATA_STARVED, 12, device_timing=False)
    for run in (timed, untimed):
        store = Store()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            ingest = Ingest(sock, store, fan_out(store, None), threading.Event())
            for datagram in run.datagrams:
                ingest.handle(datagram)
        [job] = store.job_names()
        [steps] = store.ring(job).values()
        assert [s.step for s in steps] == [r.step for r in run.records]
        for kept, sent in zip(steps, run.records, strict=True):
            assert [getattr(kept, n) for n in GPU_TIMING_FIELDS] == [getattr(sent, n) for n in GPU_TIMING_FIELDS]
    assert all(s.gpu_busy_s is None for s in untimed.records)
    assert sum(s.gpu_busy_s is not None for s in timed.records) >= 8


def test_device_timing_travels_to_the_recording_and_the_offline_frame(tmp_path: Path) -> None:
    run = run_scenario(COMPUTE_BOUND_ITEM, steps=32)
    recorder = Recorder(tmp_path)
    recorder.start()
    recorder.start_run("sim", {"hostname": "sim"})
    for record in run.records:
        recorder.step("sim", record)
    recorder.close_run("sim", "finished", 0)
    recorder.stop()
    loaded = recordings.load(tmp_path / "sim.sqlite").steps
    live = steps_frame(run.records)
    assert list(loaded.columns) == list(live.columns)
    for name in GPU_TIMING_FIELDS:
        assert loaded[name].tolist() == pytest.approx(live[name].astype(float).tolist(), nan_ok=True)
    assert loaded["gpu_busy_s"].notna().sum() >= 8


def test_a_recording_written_before_device_timing_loads_and_takes_new_rows(tmp_path: Path) -> None:
    """Main's schema (no gpu_* columns): the reader gives NaN there; a daemon restarted on it adds
    the columns and appends rows with them."""
    path = tmp_path / "old.sqlite"
    old_columns = (
        "end_unix_s REAL, rank INTEGER, pid INTEGER, step INTEGER, step_s REAL, data_wait_s REAL, "
        "forward_s REAL, backward_s REAL, optimizer_s REAL, comm_s REAL, flags INTEGER, loss REAL, "
        "grad_norm REAL, lr REAL, scaler_scale REAL, sync_count INTEGER, sync_s REAL, comm_total_s REAL, "
        "graph_compiles INTEGER, comm_ops INTEGER, comm_bytes INTEGER"
    )
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE steps ({old_columns})")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1'), ('run_id', 'old')")
    now = time.time()
    conn.executemany(
        "INSERT INTO steps VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [(now + i, 0, 7, i, 0.1, 0.01, 0.03, 0.05, 0.01, 0.0, 0, *[None] * 4, 0, 0.0, 0.0, 0, 0, 0) for i in range(5)],
    )
    conn.commit()
    conn.close()
    steps = recordings.load(path).steps
    assert len(steps) == 5 and steps["gpu_busy_s"].isna().all() and steps["forward_s"].sum() == pytest.approx(0.15)

    recorder = Recorder(tmp_path)
    recorder.start()
    record = run_scenario(COMPUTE_BOUND_ITEM, steps=28).records[-2]
    assert record.gpu_busy_s is not None
    recorder.step("old", record)
    recorder.close_run("old", "finished", 0)
    recorder.stop()
    steps = recordings.load(path).steps
    assert len(steps) == 6
    assert steps["gpu_busy_s"].notna().sum() == 1
    assert float(steps["gpu_busy_s"].dropna().iloc[0]) == pytest.approx(record.gpu_busy_s)


class BrokenTimer(ConstantTimer):
    """A device whose event query fails, as a CUDA error would."""

    def done(self, event: object) -> bool:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_failing_device_turns_device_timing_off_and_step_timing_goes_on() -> None:
    run = run_scenario(COMPUTE_BOUND_ITEM, steps=30, timer=BrokenTimer(reached=True))
    assert run.probe.device is None and core.active() is None  # never installed: nothing to disable
    assert [r.step for r in run.records] == list(range(1, 31))
    assert all(r.gpu_busy_s is None for r in run.records)


def test_late_device_timing_is_written_after_the_step_it_updates(tmp_path: Path) -> None:
    """Rows queued in one writer cycle: an update for an earlier step, the step, its update. The
    inserts go first, so no update is lost to the order in which the rows arrived."""
    record = run_scenario(COMPUTE_BOUND_ITEM, steps=28).records[-2]
    assert record.gpu_busy_s is not None
    untimed = replace(record, **dict.fromkeys(GPU_TIMING_FIELDS))
    fields = {"comm_s": record.comm_s, "flags": record.flags, **{n: getattr(record, n) for n in GPU_TIMING_FIELDS}}
    recorder = Recorder(tmp_path)
    recorder.start_run("sim", {"hostname": "sim"})
    recorder.step_timing("sim", record.pid, record.step - 1, record.end_unix_s - 1.0, fields)  # a step not here
    recorder.step("sim", untimed)
    recorder.step_timing("sim", record.pid, record.step, record.end_unix_s, fields)
    recorder.start()  # one cycle drains all three
    recorder.close_run("sim", "finished", 0)
    recorder.stop()
    steps = recordings.load(tmp_path / "sim.sqlite").steps
    assert len(steps) == 1
    assert float(steps["gpu_busy_s"].iloc[0]) == pytest.approx(record.gpu_busy_s)
    assert int(steps["flags"].iloc[0]) == record.flags
