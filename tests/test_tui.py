"""The TUI driven through Textual's Pilot: keys, panels, details, replay, disconnect and
reconnect, and the sources on their own (daemon API, recording, Prometheus)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from profilerd_tui.app import ProfilerdApp, make_app
from profilerd_tui.model import RankRow, fmt_duration, mark_straggler
from profilerd_tui.screens import DetailsScreen, HelpScreen
from profilerd_tui.sources import DaemonSource, PrometheusSource, ReplaySource, SourceError
from profilerd_tui.widgets import StatusBar
from tests.tui_helpers import JsonServer, daemon_documents, make_fixture_recording, run_async, wait_for


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fixture_recording(tmp_path_factory.mktemp("tui-recording"))


@pytest.fixture
def daemon() -> Iterator[JsonServer]:
    documents = daemon_documents()

    def handler(path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        return (200, documents[path]) if path in documents else (404, {"error": "no such path"})

    server = JsonServer(handler).start()
    yield server
    server.stop()


def status_text(app: ProfilerdApp) -> str:
    return app.main_screen.query_one(StatusBar).plain


# ---- keys and panels ---------------------------------------------------------------------------------
@run_async
async def test_tab_moves_between_panels_and_enter_opens_details(recording: Path) -> None:
    app = make_app(ReplaySource(recording, playing=False))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.snapshot is not None)
        assert app.focused is not None and app.focused.id == "recommendations"
        seen = []
        for _ in range(6):
            await pilot.press("tab")
            assert app.focused is not None
            seen.append(app.focused.id)
        assert seen == ["banner", "breakdown", "gpus", "ranks", "processes", "recommendations"]
        # enter on a recommendation: its details, and c copies the snippet
        await pilot.press("enter")
        assert isinstance(app.screen, DetailsScreen)
        rec = app.snapshot.recommendations[0] if app.snapshot else None
        assert rec is not None and rec.how
        await pilot.press("c")
        assert app.clipboard == rec.how
        await pilot.press("escape")
        assert not isinstance(app.screen, DetailsScreen)
        # enter on the banner: the findings behind the verdict
        await pilot.press("tab")
        await pilot.press("enter")
        assert isinstance(app.screen, DetailsScreen) and "findings" in app.screen.title_text
        await pilot.press("escape")
        # enter on a rank row
        for _ in range(3):
            await pilot.press("tab")
        assert app.focused is not None and app.focused.id == "ranks"
        await pilot.press("down", "enter")
        assert isinstance(app.screen, DetailsScreen) and app.screen.title_text == "rank 1"
        await pilot.press("escape")
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.press("q")
    assert app.return_code == 0


@run_async
async def test_c_copies_the_best_recommendation_from_the_main_screen(recording: Path) -> None:
    app = make_app(ReplaySource(recording, playing=False))
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.snapshot is not None)
        await pilot.press("c")
        assert app.snapshot is not None
        assert app.clipboard == app.snapshot.recommendations[0].how


@run_async
async def test_replay_steps_speeds_and_seeks(recording: Path) -> None:
    source = ReplaySource(recording, playing=False, position_s=0.0)
    app = make_app(source)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.snapshot is not None)
        assert app.snapshot is not None and app.snapshot.steps_total == 0
        await pilot.press("right_square_bracket", "full_stop")  # +10 s, +1 s
        await wait_for(pilot, lambda: app.snapshot is not None and app.snapshot.replay.position_s == 11.0)
        assert app.snapshot is not None and app.snapshot.steps_total > 100
        assert app.snapshot.primary == "data"  # the fixture's starved loader, as in the whole run's verdict
        await pilot.press("comma")
        await wait_for(pilot, lambda: app.snapshot is not None and app.snapshot.replay.position_s == 10.0)
        await pilot.press("plus", "plus")
        assert source.state().speed == 16.0
        await pilot.press("minus")
        assert source.state().speed == 4.0
        await pilot.press("space")  # play at 4x
        await wait_for(pilot, lambda: app.snapshot is not None and app.snapshot.replay.position_s > 11.0)
        await pilot.press("p")  # p pauses a replay too
        assert not source.state().playing
        await pilot.press("G")
        await wait_for(pilot, lambda: app.snapshot is not None and app.snapshot.state == "finished")
        await pilot.press("g")
        await wait_for(pilot, lambda: app.snapshot is not None and app.snapshot.steps_total == 0)


def test_replay_at_the_end_matches_the_recorded_run(recording: Path) -> None:
    from profilerd import recordings
    from profilerd.analysis.rules import load_rules

    snapshot = ReplaySource(recording, playing=False).fetch()
    assert snapshot.job == "resnet-ddp" and snapshot.state == "finished"
    # The replay ends on the whole run's verdict, the one `report` gives (GPU samples included).
    report = recordings.analyse(recordings.load(recording), load_rules()[0])
    assert (snapshot.primary, snapshot.severity, snapshot.summary) == (report.primary, report.severity, report.summary)
    assert snapshot.primary == "data" and snapshot.summary.startswith("DATA-BOUND: 37% of step time waiting")
    assert "gpu.throttling" in {f.rule for f in report.findings}  # the power-capped GPU, a secondary finding
    assert snapshot.fractions is not None and abs(sum(snapshot.fractions.values()) - 1) < 0.01
    assert [r.straggler for r in snapshot.ranks] == [False, True]
    assert [g.throttle_reasons for g in snapshot.gpus] == [(), ("sw_power_cap",)]
    assert [(p.role, p.count) for p in snapshot.processes] == [("trainer", 1), ("workers", 2)] * 2
    assert snapshot.hosts and snapshot.hosts[0].cpu_count == 16


# ---- live: pause, disconnect, reconnect, exit_when ------------------------------------------------
@run_async
async def test_pause_stops_updates(daemon: JsonServer) -> None:
    app = make_app(DaemonSource(daemon.url), refresh_s=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.fetches >= 2)
        await pilot.press("p")
        assert app.paused
        await pilot.pause(0.3)
        fetched = len(daemon.requests)
        await pilot.pause(0.5)
        assert len(daemon.requests) == fetched
        assert "paused" in status_text(app)
        await pilot.press("p")
        await wait_for(pilot, lambda: len(daemon.requests) > fetched)


@run_async
async def test_disconnected_then_recovers_by_itself(daemon: JsonServer) -> None:
    app = make_app(DaemonSource(daemon.url), refresh_s=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.snapshot is not None)
        assert app.snapshot is not None and app.snapshot.primary == "data"
        assert [r.straggler for r in app.snapshot.ranks] == [False, True]
        daemon.stop()
        await wait_for(pilot, lambda: app.connection == "disconnected")
        assert "disconnected — retrying" in status_text(app)
        assert app.main_screen.query_one("#main").has_class("-stale")
        assert app.snapshot is not None  # the last data stays on screen, dimmed
        daemon.start()
        await wait_for(pilot, lambda: app.connection == "live", timeout=15)
        assert not app.main_screen.query_one("#main").has_class("-stale")
        assert "disconnected" not in status_text(app)


@run_async
async def test_no_daemon_yet_then_one_starts(daemon: JsonServer) -> None:
    url: list[str | None] = [None]
    app = make_app(DaemonSource(lambda: url[0]), refresh_s=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.connection == "disconnected")
        assert "no profilerd daemon" in app.error
        url[0] = daemon.url
        await wait_for(pilot, lambda: app.snapshot is not None, timeout=15)


@run_async
async def test_j_picks_the_job_to_watch(daemon: JsonServer) -> None:
    source = DaemonSource(daemon.url)
    app = make_app(source, refresh_s=0.1)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.snapshot is not None)
        await pilot.press("j")
        assert type(app.screen).__name__ == "JobPicker"
        await pilot.press("down", "enter")
        assert source.job == "train"
        await pilot.press("j", "enter")  # the first entry: follow the newest running job again
        assert source.job is None


@run_async
async def test_exit_when_closes_the_app(daemon: JsonServer) -> None:
    done = [False]
    app = make_app(DaemonSource(daemon.url), exit_when=lambda: done[0])
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.snapshot is not None)
        done[0] = True
        await wait_for(pilot, lambda: not app.is_running, timeout=3)


@run_async
async def test_ctrl_c_interrupts_the_command_under_run(daemon: JsonServer) -> None:
    interrupted: list[bool] = []
    app = make_app(DaemonSource(daemon.url), on_interrupt=lambda: interrupted.append(True), output=lambda: ["hi"])
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("ctrl+c")
        assert interrupted == [True] and app.is_running
        await pilot.press("o")
        assert type(app.screen).__name__ == "OutputScreen"


def test_daemon_source_follows_the_newest_live_job(daemon: JsonServer) -> None:
    snapshot = DaemonSource(daemon.url).fetch()
    assert snapshot.job == "train" and snapshot.state == "running"
    assert snapshot.gpu_note == "no NVIDIA driver"
    assert [(p.role, p.pid) for p in snapshot.processes] == [("trainer", 100), ("worker", 201), ("worker", 202)]
    assert snapshot.recommendations[0].evidence.startswith("43% of step time")
    with pytest.raises(SourceError):
        DaemonSource("http://127.0.0.1:9").fetch()
    waiting = DaemonSource(daemon.url, job="other").fetch()
    assert waiting.state == "waiting" and "other" in waiting.summary


# ---- Prometheus -----------------------------------------------------------------------------------
def prometheus_handler(job_label: str) -> Any:
    """Answers the PromQL the source sends with vectors for a job on two nodes."""

    def vector(*series: tuple[dict[str, str], float]) -> dict[str, Any]:
        result = [{"metric": labels, "value": [1000.0, str(value)]} for labels, value in series]
        return {"status": "success", "data": {"resultType": "vector", "result": result}}

    nodes = (("node-a:9466", "0"), ("node-b:9466", "1"))

    def handler(path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        q = query.get("query", [""])[0]
        if path == "/api/v1/query_range":
            values = [[1000.0 + i * 5, str(0.1 + 0.01 * (i % 3))] for i in range(20)]
            return 200, {
                "status": "success",
                "data": {"resultType": "matrix", "result": [{"metric": {}, "values": values}]},
            }
        if f'{job_label}="big"' not in q:
            return 200, vector()
        if q.startswith("histogram_quantile(0.5"):
            return 200, vector(({}, 0.1))
        if q.startswith("histogram_quantile(0.95"):
            return 200, vector(({}, 0.18))
        if q.startswith("rate(profilerd_step_phase_seconds_total"):
            phases = {
                "data_wait": (0.2, 0.5),
                "forward": (0.2, 0.2),
                "backward": (0.3, 0.2),
                "communication": (0.3, 0.1),
            }
            return 200, vector(
                *(
                    ({"instance": inst, "rank": rank, "phase": phase}, rates[int(rank)])
                    for phase, rates in phases.items()
                    for inst, rank in nodes
                )
            )
        if q.startswith("rate(profilerd_step_duration_seconds_sum"):
            return 200, vector(*(({"instance": i, "rank": r}, 1.0) for i, r in nodes))
        if q.startswith("rate(profilerd_step_duration_seconds_count"):
            return 200, vector(*(({"instance": i, "rank": r}, 10.0) for i, r in nodes))
        if q.startswith("profilerd_step_duration_seconds_count"):
            return 200, vector(*(({"instance": i, "rank": r}, 500.0) for i, r in nodes))
        if q.startswith("profilerd_last_step_timestamp_seconds"):
            return 200, vector(*(({"instance": i, "rank": r}, 1e12) for i, r in nodes))
        if q.startswith("profilerd_verdict{"):
            return 200, vector(({"category": "data"}, 1.0))
        if q.startswith("profilerd_verdict_severity"):
            return 200, vector(({"instance": "node-a:9466"}, 2.0), ({"instance": "node-b:9466"}, 3.0))
        if q.startswith("profilerd_recommendation_estimated_speedup_ratio"):
            return 200, vector(({"recommendation": "dataloader.num_workers"}, 1.8))
        if q.startswith("profilerd_process_cpu_cores"):
            return 200, vector(
                ({"instance": "node-a:9466", "rank": "0", "role": "trainer"}, 1.0),
                ({"instance": "node-a:9466", "rank": "0", "role": "dataloader_worker"}, 1.5),
            )
        if q.startswith("profilerd_dataloader_workers"):
            return 200, vector(({"instance": "node-a:9466", "rank": "0"}, 2.0))
        if "profilerd_gpu_(" in q:
            gpu = {"instance": "node-a:9466", "gpu": "0", "uuid": "GPU-1"}
            return 200, vector(
                ({**gpu, "__name__": "profilerd_gpu_info", "name": "H100"}, 1.0),
                ({**gpu, "__name__": "profilerd_gpu_utilization_ratio"}, 0.3),
                ({**gpu, "__name__": "profilerd_gpu_clock_event_reason", "reason": "hw_slowdown"}, 1.0),
                ({**gpu, "__name__": "profilerd_gpu_clock_event_reason", "reason": "sw_power_cap"}, 0.0),
            )
        if "profilerd_host_" in q:
            return 200, vector(
                ({"instance": "node-a:9466", "__name__": "profilerd_host_cpu_utilization_ratio", "cpu": "0"}, 0.5),
                ({"instance": "node-a:9466", "__name__": "profilerd_host_cpu_utilization_ratio", "cpu": "1"}, 1.0),
            )
        return 200, vector()

    return handler


@pytest.mark.parametrize("job_label", ["job", "exported_job"])
def test_prometheus_source_reads_a_job_across_nodes(job_label: str) -> None:
    server = JsonServer(prometheus_handler(job_label)).start()
    try:
        snapshot = PrometheusSource(server.url, "big").fetch()
    finally:
        server.stop()
    assert snapshot.primary == "data" and snapshot.severity == "critical"
    assert snapshot.summary.startswith("DATA-BOUND: 35% of step time waiting for batches across 2 ranks on 2 nodes")
    assert snapshot.fractions == pytest.approx({"data_wait": 0.35, "compute": 0.45, "communication": 0.2, "other": 0})
    assert (snapshot.step_p50_s, snapshot.step_p95_s, snapshot.steps_total) == (0.1, 0.18, 1000)
    assert [(r.host, r.straggler) for r in snapshot.ranks] == [("node-a", False), ("node-b", True)]
    assert snapshot.gpus[0].name == "H100" and snapshot.gpus[0].throttle_reasons == ("hw_slowdown",)
    assert [(p.role, p.count) for p in snapshot.processes] == [("trainer", 1), ("workers", 2)]
    assert snapshot.recommendations[0].id == "dataloader.num_workers"
    assert snapshot.hosts[0].cpu_count == 2 and len(snapshot.step_times_s) == 20


def test_prometheus_without_the_job_says_so() -> None:
    server = JsonServer(prometheus_handler("job")).start()
    try:
        snapshot = PrometheusSource(server.url, "missing").fetch()
    finally:
        server.stop()
    assert snapshot.state == "waiting" and "missing" in snapshot.summary


# ---- model and CLI ----------------------------------------------------------------------------------
def test_straggler_needs_a_clear_margin() -> None:
    def row(rank: int, own: float) -> RankRow:
        return RankRow(rank, None, None, True, 10, own, own, 0.1, 0.0, own_s=own)

    assert [r.straggler for r in mark_straggler([row(0, 0.10), row(1, 0.105)])] == [False, False]
    assert [r.straggler for r in mark_straggler([row(0, 0.10), row(1, 0.10), row(2, 0.15)])] == [False, False, True]
    assert [r.straggler for r in mark_straggler([row(0, 0.10)])] == [False]
    assert (fmt_duration(0.0000042), fmt_duration(0.0236), fmt_duration(0.1234), fmt_duration(12.3)) == (
        "4 µs",
        "23.6 ms",
        "123 ms",
        "12.3 s",
    )


def test_tui_never_loads_pynvml_or_torch() -> None:
    code = (
        "import sys, profilerd_tui.app, profilerd_tui.cli, profilerd_tui.runview; "
        "from profilerd.client import local_daemon_url; local_daemon_url(); "
        "print(' '.join(m for m in ('pynvml', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_tui_command_refuses_bad_flags_and_no_terminal(profilerd_env: dict[str, str]) -> None:
    def tui(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "profilerd", "tui", *args],
            env=profilerd_env,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )

    result = tui()
    assert result.returncode == 2 and "needs a terminal" in result.stderr
    result = tui("--speed", "3")
    assert result.returncode == 2 and "invalid choice" in result.stderr
