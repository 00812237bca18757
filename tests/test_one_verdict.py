"""One recording, every path to a verdict: the daemon's live analysis, `report`, a TUI replay and
`attach` with probes all name the same bottleneck, headline and straggler rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from profilerd import recordings
from profilerd.analysis.document import headline_of, straggler_of
from profilerd.analysis.live import LiveAnalyzer
from profilerd.analysis.rules import load_rules
from profilerd.attach.verdict import probed_verdict
from profilerd.config import DaemonConfig
from profilerd.model import HostSample, ProbeSession, ProcessSample, StepRecord
from profilerd.recordings.reader import read_gpu_samples
from profilerd.store import Store
from profilerd_tui.sources import ReplaySource
from tests.conftest import run_cli
from tests.tui_helpers import make_fixture_recording

RULES, _ = load_rules()


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ranks, rank 1 loading slower (the straggler) on a power-capped GPU."""
    return make_fixture_recording(tmp_path_factory.mktemp("one-verdict"))


def daemon_store(path: Path) -> tuple[Store, str, float]:
    """A daemon's store holding what it received during the recorded run: the hellos, the steps in
    arrival order, the configuration and every host, process and GPU sample."""
    rec = recordings.load(path)
    defaults = DaemonConfig()
    store = Store(defaults.window_steps, defaults.window_s)
    for s in rec.sessions.itertuples():
        store.add_session(
            ProbeSession(
                int(s.pid),
                rec.job,
                rec.run_id,
                int(s.rank),
                int(s.local_rank),
                int(s.world_size),
                s.hostname,
                tuple(json.loads(s.argv)),
                float(s.started_unix_s),
                s.probe_version,
            )
        )
    for config in rec.configs:
        pid = int(rec.sessions.loc[rec.sessions["rank"] == config["rank"], "pid"].iloc[0])
        store.set_config(pid, config)
    for seq, row in enumerate(rec.steps.sort_values("end_unix_s").to_dict("records"), 1):
        store.add_step(StepRecord(rec.job, **{k: _plain(v) for k, v in row.items()}), seq, 0)
    for h in rec.hosts.itertuples():
        store.set_host(HostSample(h.ts_unix_s, int(h.cpu_count), (), h.cpu_ratio, None, 0, 0, None))
    for p in rec.processes.itertuples():
        # The recording keeps the workers' sum and maximum; the same sum and maximum go back in.
        n = int(p.num_workers)
        ratios = (p.worker_cpu_max_ratio,) + ((p.workers_cpu_ratio - p.worker_cpu_max_ratio) / (n - 1),) * (n - 1)
        store.set_processes(
            [
                ProcessSample(
                    p.ts_unix_s,
                    int(p.pid),
                    rec.job,
                    int(p.rank),
                    bool(p.alive),
                    p.cpu_ratio,
                    None,
                    None,
                    tuple(int(p.pid) + 1 + i for i in range(n)),
                    ratios if n else (),
                )
            ]
        )
    for sample in read_gpu_samples([path]):
        store.set_gpus([sample], [], 0)
    return store, rec.job, float(rec.steps["end_unix_s"].max())


def _plain(value: object) -> object:
    """numpy scalars as Python numbers, NaN as None (the probes send no value as None)."""
    number = value.item() if hasattr(value, "item") else value
    return None if isinstance(number, float) and number != number else number


def test_live_report_replay_and_attach_give_one_verdict(recording: Path, profilerd_env: dict[str, str]) -> None:
    store, job, end = daemon_store(recording)
    live = LiveAnalyzer(store, RULES).tick(end)[job].to_json("live")
    live_says = (live["primary"], headline_of(live), straggler_of(live))

    result = run_cli("report", str(recording), "--format", "json", env=profilerd_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    report_says = (report["primary"], headline_of(report), straggler_of(report))

    def replay_says(at_unix_s: float) -> tuple[str, str, int | None, str]:
        snapshot = ReplaySource(recording, playing=False).snapshot_at(at_unix_s)
        flagged = [r.rank for r in snapshot.ranks if r.straggler]
        return snapshot.primary, snapshot.headline, flagged[0] if flagged else None, snapshot.summary

    seconds = end - float(recordings.load(recording).steps["end_unix_s"].min())
    probed = probed_verdict(recording, RULES, seconds).to_json("attach")
    attach_says = (probed["primary"], headline_of(probed), straggler_of(probed))

    # The fixture is data-bound (its workers give back the most), with a straggler (rank 1) on a
    # power-capped GPU as secondary findings.
    assert live_says == ("data", "DATA-BOUND", 1)
    assert report_says == live_says
    # The end of a replay is the whole run, as `report`; just before, the live window, as the daemon.
    for at_unix_s in (end, end - 0.001):
        assert replay_says(at_unix_s) == (*live_says, live["summary"])
    assert attach_says == live_says
    assert (
        live["summary"]
        == report["summary"]
        == probed["summary"]
        == "DATA-BOUND: 37% of step time waiting for batches; 2 DataLoader workers; 11.0 of 16 cores idle"
    )
    # The GPU samples reach every path: the power cap is found everywhere.
    for document in (live, report, probed):
        throttling = [f["evidence"] for f in document["findings"] if f["rule"] == "gpu.throttling"]
        assert throttling == ["power throttling in 50% of GPU samples"]
