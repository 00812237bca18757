"""Snapshots of the main screens at 80×24 and 160×48, fed from the fixture recording.

Update after an intended change with `python -m pytest tests/test_tui_snapshots.py --snapshot-update`
and look at the SVGs under tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from profilerd_tui.app import make_app
from profilerd_tui.sources import ReplaySource
from tests.tui_helpers import make_fixture_recording, wait_for


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fixture_recording(tmp_path_factory.mktemp("tui-snapshots"))


def loaded(*keys: str) -> Callable[[Any], Any]:
    """run_before: wait for the first snapshot, then press ``keys``."""

    async def run_before(pilot: Any) -> None:
        await wait_for(pilot, pilot.app.settled)
        await pilot.pause(0.1)
        for key in keys:
            await pilot.press(key)
            await pilot.pause(0.1)

    return run_before


def test_main_screen_80x24(snap_compare: Any, recording: Path) -> None:
    app = make_app(ReplaySource(recording, playing=False))
    assert snap_compare(app, terminal_size=(80, 24), run_before=loaded())


def test_main_screen_160x48(snap_compare: Any, recording: Path) -> None:
    app = make_app(ReplaySource(recording, playing=False))
    assert snap_compare(app, terminal_size=(160, 48), run_before=loaded())


def test_main_screen_light_theme_80x24(snap_compare: Any, recording: Path) -> None:
    app = make_app(ReplaySource(recording, playing=False), theme="textual-light")
    assert snap_compare(app, terminal_size=(80, 24), run_before=loaded())


def test_recommendation_details_80x24(snap_compare: Any, recording: Path) -> None:
    app = make_app(ReplaySource(recording, playing=False))
    assert snap_compare(app, terminal_size=(80, 24), run_before=loaded("enter"))


def test_ranks_focused_160x48_mid_run(snap_compare: Any, recording: Path) -> None:
    app = make_app(ReplaySource(recording, playing=False, position_s=20.0))
    assert snap_compare(app, terminal_size=(160, 48), run_before=loaded("tab", "tab", "tab", "tab"))


def _device_recording(directory: Path, scenario: Any) -> Path:
    """A recording of a simulated GPU job (tests/simdevice.py: a real probe on a simulated
    stream), its times moved to a fixed start so that the screen does not depend on today."""
    from dataclasses import replace

    from simdevice import run_scenario

    from profilerd.model import ProbeSession
    from profilerd.recordings.schema import recording_file
    from profilerd.recordings.writer import Recorder
    from tests.test_gpu_analysis import CONFIG

    run = run_scenario(scenario, 200, pid=4100, job="gpu-sim")
    shift = 1_760_000_000.0 - min(r.end_unix_s - r.step_s for r in run.records)
    recorder = Recorder(directory)
    recorder.start()
    recorder.start_run("gpu-sim", {"job": "gpu-sim", "hostname": "node-a", "started_unix_s": 1_760_000_000.0})
    recorder.session(ProbeSession(4100, "gpu-sim", "gpu-sim", 0, 0, 1, "node-a", ("train.py",), 1_760_000_000.0, "t"))
    recorder.config("gpu-sim", 4100, 0, CONFIG)
    for record in run.records:
        recorder.step("gpu-sim", replace(record, end_unix_s=record.end_unix_s + shift))
    for sample in run.nvml_samples():
        recorder.gpu(["gpu-sim"], replace(sample, ts_unix_s=sample.ts_unix_s + shift, processes=()))
    recorder.close_run("gpu-sim", "finished", 0)
    recorder.stop()
    return recording_file(directory, "gpu-sim")


def test_gpu_job_shows_what_the_device_did_80x24(snap_compare: Any, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A compute-bound job printing loss.item() every step: the step-time panel's shares are the
    device's, and its line says so (busy, idle, how far the host is ahead, steps timed)."""
    from simdevice import COMPUTE_BOUND_ITEM

    path = _device_recording(tmp_path_factory.mktemp("tui-gpu"), COMPUTE_BOUND_ITEM)
    app = make_app(ReplaySource(path, playing=False))
    assert snap_compare(app, terminal_size=(80, 24), run_before=loaded())


def test_a_lower_bound_on_busy_is_shown_as_one(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Launch-bound: the device kept pace with the host, so the panel says busy ≥, idle ≤."""
    from simdevice import LAUNCH_BOUND

    from profilerd_tui.model import DeviceView

    path = _device_recording(tmp_path_factory.mktemp("tui-gpu-lb"), LAUNCH_BOUND)
    snapshot = ReplaySource(path, playing=False).fetch()
    assert snapshot.primary == "algorithm"
    device = snapshot.device
    assert isinstance(device, DeviceView) and device.busy_is_lower_bound
    line = device.line()
    assert line.startswith(f"GPU clock: busy ≥{device.busy_ratio:.0%} · idle ≤{device.idle_ratio:.0%} ")
    assert line.endswith(f" · {device.steps_timed}/{device.steps} steps")
