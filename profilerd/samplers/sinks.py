"""Where records go: one fan-out from the samplers to the store and the recording.

Ingest, the host and GPU samplers and live analysis produce records and hand them to one
``Sinks``, which gives each record to every sink in order: the store first, then the recording
(when the daemon records). The store may refuse a record (``Refused``: the job table is full, a
config from a process it does not know); a refused record reaches no later sink, so a recording
never holds what the daemon itself does not know.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from profilerd.model import GpuEvent, GpuSample, HostSample, ProbeSession, ProcessSample, RecordedVerdict, StepRecord
from profilerd.recordings.writer import Recorder, RunMeta
from profilerd.store import RunState, Store

if TYPE_CHECKING:  # the analysis (pandas) is not loaded by what only ingests
    from profilerd.analysis.verdict import Verdict

# A verdict is recorded when it changes, and at least this often.
RECORD_VERDICT_EVERY_S = 10.0


class Refused(ValueError):
    """The store would not take a record; the message says why (ingest counts it as bad_field)."""


@dataclass(frozen=True, slots=True)
class HostRecords:
    """One host-sampler cycle: the host, and each training process with its workers."""

    host: HostSample
    processes: list[ProcessSample]


@dataclass(frozen=True, slots=True)
class GpuRecords:
    """One GPU-sampler cycle: every device, the events since the last one, the failed reads so far."""

    samples: list[GpuSample]
    events: list[GpuEvent]
    field_errors: int


@dataclass(frozen=True, slots=True)
class VerdictRecord:
    job: str
    run_id: str | None
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class LateDeviceTiming:
    """Device timing of a step already received without it (the probes' first steps are sent
    at once, their device timing once the device has reached them). ``fields`` holds comm_s,
    the gpu_* fields and ``flags``, the bits to add to the step's; ``end_unix_s`` with pid and
    step finds the step."""

    pid: int
    step: int
    end_unix_s: float
    fields: dict[str, float | int]


@dataclass(frozen=True, slots=True)
class EndedRun:
    """A run that ended (run_end, or all its processes gone); ``recorded``: it has a recording
    to close (a run_end for a run this daemon never saw has none)."""

    run: RunState
    exit_code: int | None
    recorded: bool = True


class Sink(Protocol):
    """A destination for every kind of record the daemon takes in."""

    def session(self, session: ProbeSession, previous: ProbeSession | None) -> None: ...

    def step(self, session: ProbeSession, step: StepRecord, seq: int, sender_dropped: int) -> None: ...

    def step_timing(self, session: ProbeSession, timing: LateDeviceTiming) -> None: ...

    def config(self, session: ProbeSession, config: dict[str, Any]) -> None: ...

    def event(self, session: ProbeSession, kind: str, detail: dict[str, Any]) -> None: ...

    def host(self, records: HostRecords) -> None: ...

    def gpus(self, records: GpuRecords) -> None: ...

    def verdicts(self, records: Sequence[VerdictRecord]) -> None: ...

    def runs_ended(self, ended: Sequence[EndedRun]) -> None: ...


class Sinks:
    """The fan-out (a composite ``Sink``): each record to every sink, in order."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self._sinks = tuple(sinks)

    def session(self, session: ProbeSession, previous: ProbeSession | None) -> None:
        for sink in self._sinks:
            sink.session(session, previous)

    def step(self, session: ProbeSession, step: StepRecord, seq: int, sender_dropped: int) -> None:
        for sink in self._sinks:
            sink.step(session, step, seq, sender_dropped)

    def step_timing(self, session: ProbeSession, timing: LateDeviceTiming) -> None:
        for sink in self._sinks:
            sink.step_timing(session, timing)

    def config(self, session: ProbeSession, config: dict[str, Any]) -> None:
        for sink in self._sinks:
            sink.config(session, config)

    def event(self, session: ProbeSession, kind: str, detail: dict[str, Any]) -> None:
        for sink in self._sinks:
            sink.event(session, kind, detail)

    def host(self, records: HostRecords) -> None:
        for sink in self._sinks:
            sink.host(records)

    def gpus(self, records: GpuRecords) -> None:
        for sink in self._sinks:
            sink.gpus(records)

    def verdicts(self, records: Sequence[VerdictRecord]) -> None:
        for sink in self._sinks:
            sink.verdicts(records)

    def runs_ended(self, ended: Sequence[EndedRun]) -> None:
        for sink in self._sinks:
            sink.runs_ended(ended)


def fan_out(store: Store, recorder: Recorder | None) -> Sinks:
    """The daemon's fan-out: the store, then the recording when there is one."""
    if recorder is None:
        return Sinks([StoreSink(store, recording=False)])
    return Sinks([StoreSink(store, recording=True), RecordingSink(recorder, store)])


class StoreSink:
    """Records into the daemon's live state (``profilerd.store``).

    ``recording``: a recording sink follows and finishes each ended run once its file is
    flushed (``Recorder(on_closed=store.finish_run)``); without one, this sink finishes it.
    """

    def __init__(self, store: Store, recording: bool) -> None:
        self._store = store
        self._recording = recording

    def session(self, session: ProbeSession, previous: ProbeSession | None) -> None:
        if not self._store.add_session(session):
            raise Refused("job table full")

    def step(self, session: ProbeSession, step: StepRecord, seq: int, sender_dropped: int) -> None:
        self._store.add_step(step, seq, sender_dropped)

    def step_timing(self, session: ProbeSession, timing: LateDeviceTiming) -> None:
        if not self._store.set_step_timing(session, timing.step, timing.fields):
            raise Refused("device timing of a step the daemon does not hold")

    def config(self, session: ProbeSession, config: dict[str, Any]) -> None:
        if not self._store.set_config(session.pid, config):
            raise Refused("config from an unknown sender")

    def event(self, session: ProbeSession, kind: str, detail: dict[str, Any]) -> None:
        if kind == "exit":  # the probe's goodbye at interpreter exit
            self._store.mark_process_exited(session.pid, clean=True)

    def host(self, records: HostRecords) -> None:
        self._store.set_host(records.host)
        self._store.set_processes(records.processes)
        for process in records.processes:
            if not process.alive:
                self._store.mark_process_exited(process.pid)

    def gpus(self, records: GpuRecords) -> None:
        self._store.set_gpus(records.samples, records.events, records.field_errors)

    def verdicts(self, records: Sequence[VerdictRecord]) -> None:
        for record in records:
            self._store.set_verdict(record.job, record.verdict)

    def runs_ended(self, ended: Sequence[EndedRun]) -> None:
        for end in ended:
            if not (self._recording and end.recorded):
                self._store.finish_run(end.run.run_id, None)


class RecordingSink:
    """Records into each run's recording (``profilerd.recordings.writer``).

    Node-wide records (host, GPU, GPU events) go into every running run; the store says which
    runs are running and whose a process is.
    """

    def __init__(self, recorder: Recorder, store: Store, clock: Callable[[], float] = time.monotonic) -> None:
        self._recorder = recorder
        self._store = store
        self._clock = clock
        self._last_verdict: dict[str, tuple[str, str, float]] = {}  # job -> primary, severity, when

    def session(self, session: ProbeSession, previous: ProbeSession | None) -> None:
        if previous == session:
            return  # the same hello again (a probe reconnecting)
        if previous is None or previous.run_id != session.run_id:
            meta: RunMeta = {"job": session.job, "hostname": session.hostname, "started_unix_s": session.started_unix_s}
            self._recorder.start_run(session.run_id, meta)
        self._recorder.session(session)

    def step(self, session: ProbeSession, step: StepRecord, seq: int, sender_dropped: int) -> None:
        self._recorder.step(session.run_id, step)

    def step_timing(self, session: ProbeSession, timing: LateDeviceTiming) -> None:
        self._recorder.step_timing(session.run_id, timing.pid, timing.step, timing.end_unix_s, timing.fields)

    def config(self, session: ProbeSession, config: dict[str, Any]) -> None:
        self._recorder.config(session.run_id, session.pid, session.rank, config)

    def event(self, session: ProbeSession, kind: str, detail: dict[str, Any]) -> None:
        self._recorder.event(session.run_id, kind, detail)

    def host(self, records: HostRecords) -> None:
        store = self._store
        # The recorder's own health rides on the host cycle, as the /metrics readers expect it.
        store.set_recording_rows_dropped(self._recorder.rows_dropped)
        self._recorder.host(store.running_run_ids(), records.host)
        for process in records.processes:
            session = store.session_for(process.pid)
            if session is not None:
                self._recorder.process(session.run_id, process)

    def gpus(self, records: GpuRecords) -> None:
        if not records.samples and not records.events:
            return
        run_ids = self._store.running_run_ids()
        for sample in records.samples:
            self._recorder.gpu(run_ids, sample)
        # XID errors and lost/recovered GPUs go into every run on this node, so that the report
        # shows them on the run's timeline.
        uuids: dict[int | None, str] = {sample.index: sample.uuid for sample in records.samples}
        for event in records.events:
            detail = {"gpu_index": event.index, "uuid": uuids.get(event.index), "detail": event.detail}
            for run_id in run_ids:
                self._recorder.event(run_id, event.kind, detail, ts_unix_s=event.ts_unix_s)

    def verdicts(self, records: Sequence[VerdictRecord]) -> None:
        for record in records:
            self._record_verdict(record)

    def _record_verdict(self, record: VerdictRecord) -> None:
        verdict = record.verdict
        if verdict.primary == "none" or record.run_id is None:
            return
        last = self._last_verdict.get(record.job)
        now = self._clock()
        if (
            last
            and last[0] == verdict.primary
            and last[1] == verdict.severity
            and now - last[2] < RECORD_VERDICT_EVERY_S
        ):
            return
        self._last_verdict[record.job] = (verdict.primary, verdict.severity, now)
        document = verdict.to_json(record.run_id, record.job)
        recorded = RecordedVerdict(verdict.evaluated_unix_s, record.job, verdict.primary, verdict.severity, document)
        self._recorder.verdict(record.run_id, recorded)

    def runs_ended(self, ended: Sequence[EndedRun]) -> None:
        for end in ended:
            if end.recorded:
                self._recorder.close_run(end.run.run_id, end.run.final_state, end.exit_code)
