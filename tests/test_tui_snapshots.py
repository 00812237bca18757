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
