"""`profilerd report` and `profilerd runs` as users meet them: every format, damaged recordings,
several nodes, listing, pruning and retention, and the HTML in a real browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from profilerd import recordings, report
from profilerd.analysis.rules import load_rules
from tests.browser_helpers import chromium, ink, layout_boxes, page_fetches, read_png, screenshot
from tests.conftest import REPO, run_cli
from tests.fixtures.make_fixture import FIXTURE, FIXTURE_NODE, Job, Node, write_recording

GOLDEN = FIXTURE.with_suffix(".golden.json")
RULES, _ = load_rules()


def _matches(actual: Any, expected: Any, where: str = "$") -> list[str]:
    """Differences between two JSON documents; floats compared to 1e-6 relative."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        problems = (
            [f"{where}: keys {sorted(set(actual) ^ set(expected))} differ"] if set(actual) != set(expected) else []
        )
        for key in set(actual) & set(expected):
            problems += _matches(actual[key], expected[key], f"{where}.{key}")
        return problems
    if isinstance(expected, list) and isinstance(actual, list):
        if len(actual) != len(expected):
            return [f"{where}: {len(actual)} items, expected {len(expected)}"]
        return [
            p for i, (a, e) in enumerate(zip(actual, expected, strict=True)) for p in _matches(a, e, f"{where}[{i}]")
        ]
    if isinstance(expected, float) and isinstance(actual, int | float) and not isinstance(actual, bool):
        return [] if actual == pytest.approx(expected, rel=1e-6, abs=1e-9) else [f"{where}: {actual} != {expected}"]
    return [] if actual == expected else [f"{where}: {actual!r} != {expected!r}"]


def _without_path(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != "recording"}


# ---- the verdict document -----------------------------------------------------------------------
def test_json_report_of_the_fixture_matches_the_golden_file(profilerd_env: dict[str, str]) -> None:
    """Regenerate after an intended change with PROFILERD_UPDATE_GOLDEN=1 (and review the diff)."""
    result = run_cli("report", str(FIXTURE), "--format", "json", env=profilerd_env, timeout=60)
    assert result.returncode == 0, result.stderr
    document = _without_path(json.loads(result.stdout))
    if os.environ.get("PROFILERD_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert _matches(document, expected) == []
    # What the golden file pins down, in words:
    assert document["schema"] == "profilerd.verdict/v1"
    assert document["primary"] == "data" and document["severity"] == "critical"
    assert {f["rule"] for f in document["findings"]} >= {"data.input_wait", "communication.straggler"}
    assert document["data_quality"]["missing_steps"] == 14
    assert document["data_quality"]["gaps"]["count"] == 1
    assert document["data_quality"]["samplers"]["gpu"]["longest_gap_s"] == 5.0
    # The offline GPU path: the fixture's samples (JSON without timestamps) load from their rows.
    assert document["gpu"]["gpu_count"] == 4 and document["gpu"]["gpu_thermal_throttle"] > 0
    series = document["timeseries"]["series"]
    assert {"step_time_s", "data_wait_ratio", "gpu_utilization_ratio", "gpu_power_watts", "host_cpu_ratio"} <= set(
        series
    )
    assert len(series["step_time_s"]["values"]) == document["timeseries"]["buckets"] <= 48


def test_the_fixture_script_reproduces_the_committed_fixture(tmp_path: Path) -> None:
    path = write_recording(tmp_path / "again.sqlite", Job(), FIXTURE_NODE)
    document = _without_path(report.verdict_document(recordings.load(path), RULES))
    assert _matches(document, json.loads(GOLDEN.read_text())) == []


def test_text_report_adds_timeline_and_data_quality(profilerd_env: dict[str, str]) -> None:
    result = run_cli("report", str(FIXTURE), env=profilerd_env, timeout=60)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("profilerd · run 20260101-000000-train-f1x7")
    assert "DATA-BOUND" in text and "Rules that fired:" in text and "communication.straggler" in text
    assert "Over the run (0:00 → 0:40, 1 s per character):" in text
    assert re.search(r"step time +[▁▂▃▄▅▆▇█ ]{40}", text)
    assert "Data quality: 14 step record(s) lost" in text


def test_markdown_report_is_compact_and_complete(profilerd_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "report.md"  # the format comes from the suffix
    result = run_cli("report", str(FIXTURE), "-o", str(out), env=profilerd_env, timeout=60)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert text.startswith("### profilerd · `20260101-000000-train-f1x7` — DATA-BOUND (critical)")
    assert "1. **Raise DataLoader num_workers" in text and "```python" in text
    assert "<summary>Rules that fired (6)</summary>" in text
    assert "**3** (straggler)" in text
    assert "sw_thermal, hw_slowdown" in text and "XID 13" in text
    assert "**Data quality:** recording closed; 14 step records lost; 1 gap(s)" in text
    assert len(text) < 8000  # fits in an issue comment with room to spare


# ---- HTML ------------------------------------------------------------------------------------------
def _html_report(profilerd_env: dict[str, str], tmp_path: Path, *references: str, exit_code: int = 0) -> str:
    out = tmp_path / "report.html"
    result = run_cli("report", *references, "-o", str(out), env=profilerd_env, timeout=60)
    assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stderr
    return out.read_text()


def test_html_report_is_self_contained(profilerd_env: dict[str, str], tmp_path: Path) -> None:
    html = _html_report(profilerd_env, tmp_path, str(FIXTURE))
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    for forbidden in ("<script", "<link", "<iframe", "<img", "@import", "url(", "http://", "https://", "src="):
        assert forbidden not in html, forbidden
    for section in ("verdict", "recommendations", "steps", "devices", "ranks", "events", "config", "rules", "quality"):
        assert f'<section id="{section}">' in html
    for chart in ("phases", "histogram", "gpu-util", "gpu-memory", "gpu-power", "host-cpu", "ranks"):
        assert f'id="chart-{chart}"' in html
    assert "sw_thermal, hw_slowdown" in html and "XID 13: graphics engine exception" in html
    assert "2.13.0+cu128" in html and "bucket_cap_mb" in html and "AdamW" in html  # the config snapshot
    assert "Partial report" not in html


@pytest.mark.skipif(chromium() is None, reason="needs Chromium (apt-get install chromium; .ci/run installs it)")
def test_html_report_renders_in_chromium_without_network(profilerd_env: dict[str, str], tmp_path: Path) -> None:
    """The charts are drawn where the layout puts them, and the page fetches nothing.

    Set PROFILERD_SCREENSHOTS=DIR to keep the screenshot for a look.
    """
    html = tmp_path / "report.html"
    html.write_text(_html_report(profilerd_env, tmp_path, str(FIXTURE)))
    size = (1280, 3500)
    boxes = layout_boxes(html, size)
    png, net_log = tmp_path / "report.png", tmp_path / "net.json"
    screenshot(html, png, size, net_log)
    if os.environ.get("PROFILERD_SCREENSHOTS"):
        shutil.copy(png, Path(os.environ["PROFILERD_SCREENSHOTS"]) / "report.png")
    assert page_fetches(net_log) == [html.as_uri()] or page_fetches(net_log) == []
    image = read_png(png)
    charts = {name: box for name, box in boxes.items() if name.startswith("chart-")}
    assert set(charts) == {
        f"chart-{c}" for c in ("phases", "histogram", "gpu-util", "gpu-memory", "gpu-power", "host-cpu", "ranks")
    }
    previous_bottom = 0.0
    for name, (x, y, width, height) in sorted(charts.items(), key=lambda item: item[1][1]):
        assert width > 1000 and height > 100, (name, width, height)  # laid out at full width
        assert y >= previous_bottom - 1, f"{name} overlaps the chart above it"
        previous_bottom = y + height
        assert y + height <= size[1], f"{name} is below the screenshot"
        nonwhite, colourful = ink(image[int(y) : int(y + height), int(x) : int(x + width)])
        assert nonwhite > 0.05, f"{name} looks blank ({nonwhite:.1%} ink)"
        if name != "chart-host-cpu":  # a grey line; every other chart draws its data in colour
            assert colourful > 0.01, f"{name} has no coloured data ({colourful:.1%})"
    margin = image[:, :40]
    assert ink(margin)[0] < 0.01  # the page margin stays white: nothing drawn outside the layout


@pytest.mark.skipif(chromium() is None, reason="needs Chromium")
def test_the_network_check_catches_a_page_that_fetches(tmp_path: Path) -> None:
    """The control for the check above: a page with external references is caught."""
    page = tmp_path / "fetching.html"
    page.write_text('<html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    screenshot(page, tmp_path / "f.png", (400, 300), tmp_path / "net.json")
    assert "http://127.0.0.1:9/x.png" in page_fetches(tmp_path / "net.json")


# ---- damaged, killed and old recordings ----------------------------------------------------------------
def _truncated(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.sqlite"
    data = FIXTURE.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.45)])
    return path


def _corrupted(tmp_path: Path) -> Path:
    path = tmp_path / "corrupted.sqlite"
    data = bytearray(FIXTURE.read_bytes())
    start = int(len(data) * 0.3) // 4096 * 4096
    data[start : start + 3 * 4096] = b"\xff" * (3 * 4096)
    path.write_bytes(bytes(data))
    return path


def _killed(tmp_path: Path) -> Path:
    """The daemon killed mid-run: state 'running', the last rows only in the write-ahead log."""
    source = write_recording(
        tmp_path / "live.sqlite", Job(seconds=12.0), Node("killed-run", "node-a", (0, 1, 2, 3), state="running")
    )
    conn = sqlite3.connect(source)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute(
        "INSERT INTO steps (end_unix_s, rank, pid, step, step_s, data_wait_s, forward_s, backward_s, "
        "optimizer_s, comm_s, flags) SELECT end_unix_s + 12, rank, pid, step + 1000, step_s, data_wait_s, "
        "forward_s, backward_s, optimizer_s, comm_s, flags FROM steps"
    )
    conn.commit()
    killed = tmp_path / "killed.sqlite"
    for suffix in ("", "-wal", "-shm"):  # a copy taken as kill -9 left it: no checkpoint, no close
        shutil.copy(f"{source}{suffix}", f"{killed}{suffix}")
    conn.close()
    return killed


def _old_schema(tmp_path: Path) -> Path:
    """A recording from before the training-signal columns, GPU samples and events existed."""
    path = tmp_path / "old.sqlite"
    shutil.copy(FIXTURE, path)
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE old_steps AS SELECT end_unix_s, rank, pid, step, step_s, data_wait_s, forward_s, backward_s,
            optimizer_s, comm_s, flags FROM steps;
        DROP TABLE steps; ALTER TABLE old_steps RENAME TO steps;
        DROP TABLE gpu_samples; DROP TABLE events;
        """
    )
    conn.commit()
    conn.close()
    return path


@pytest.mark.parametrize(
    ("make", "note", "exit_code"),
    [
        (_truncated, "is damaged", 3),  # damaged: exit 3 (docs/reports.md)
        (_corrupted, "is damaged", 3),
        (_killed, "never closed", 0),
        (_old_schema, "table gpu_samples is missing", 0),
    ],
)
def test_damaged_or_unfinished_recordings_get_a_partial_report(
    make: Any, note: str, exit_code: int, profilerd_env: dict[str, str], tmp_path: Path
) -> None:
    path = make(tmp_path)
    html = _html_report(profilerd_env, tmp_path, str(path), exit_code=exit_code)
    assert "Partial report" in html and note in html
    recording = recordings.load(path)
    for fmt in ("json", "text", "md"):
        output = report.build_report([path], RULES, fmt)
        assert note in output, fmt
    document = report.verdict_document(recording, RULES)
    assert document["data_quality"]["complete"] is False
    assert document["steps"] > 0  # what could be read is reported


def test_the_killed_run_report_includes_the_rows_only_in_the_wal(tmp_path: Path) -> None:
    recording = recordings.load(_killed(tmp_path))
    assert recording.state == "running"
    assert recording.steps["step"].max() > 1000  # inserted after the last checkpoint


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"PK\x03\x04 a zip file, not a recording" * 10, "not a profilerd recording")],
)
def test_files_that_are_not_recordings_exit_2_with_a_clear_message(
    content: bytes, message: str, profilerd_env: dict[str, str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.sqlite"
    path.write_bytes(content)
    result = run_cli("report", str(path), env=profilerd_env, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


# ---- several nodes ------------------------------------------------------------------------------------
def _two_nodes(tmp_path: Path, skew_s: float = 1.7, job: Job | None = None) -> tuple[Path, Path]:
    job = job or Job()
    a = write_recording(tmp_path / "a.sqlite", job, Node("run-node-a", "node-a", (0, 1)))
    b = write_recording(tmp_path / "b.sqlite", job, Node("run-node-b", "node-b", (2, 3), clock_offset_s=skew_s))
    return a, b


def test_nodes_of_one_job_merge_with_their_clocks_aligned(tmp_path: Path) -> None:
    a, b = _two_nodes(tmp_path)
    merged = recordings.merge([recordings.load(b), recordings.load(a)])  # the order given does not matter
    assert [s.run_id for s in merged.sources] == ["run-node-a", "run-node-b"]
    offset = merged.sources[1].clock_offset_s
    assert offset == pytest.approx(-1.7, abs=0.002)  # the synthetic ranks jitter by 0.2 ms
    assert merged.sources[1].clock_residual_s < 0.001
    single = json.loads(GOLDEN.read_text())
    document = report.verdict_document(merged, RULES)
    assert document["ranks"] == 4 and document["steps"] == single["steps"]
    for key, value in single["fractions"].items():
        assert document["fractions"][key] == pytest.approx(value, abs=0.002)
    assert document["data_quality"]["clock"]["aligned"] is True
    # Aligned, the GPU timelines of both nodes start where the steps do.
    from profilerd.recordings.timeline import report_data

    data = report_data(merged, document, RULES.warmup_steps)
    assert set(data.gpus["gpu"]) == {"node-a:0", "node-a:1", "node-b:0", "node-b:1"}
    assert data.gpus["start_s"].min() < 2.0


def test_report_of_several_nodes_from_the_cli(profilerd_env: dict[str, str], tmp_path: Path) -> None:
    a, b = _two_nodes(tmp_path)
    html = _html_report(profilerd_env, tmp_path, str(a), str(b))
    assert "on 2 nodes" in html and "clock of node-b" in html and "offset -1.70" in html
    other = write_recording(tmp_path / "other.sqlite", Job(job_id="another-job"), Node("x", "node-c", (0,)))
    refused = run_cli("report", str(a), str(other), env=profilerd_env, timeout=60)
    assert refused.returncode == 2 and "belong to different jobs" in refused.stderr
    twice = run_cli("report", str(a), str(a), env=profilerd_env, timeout=60)
    assert twice.returncode == 2 and "rank 0 is in both" in twice.stderr


# ---- runs: listing, pruning, retention ----------------------------------------------------------------
def _set_meta(path: Path, **values: str) -> None:
    conn = sqlite3.connect(path)
    conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())
    conn.commit()
    conn.close()


def _runs_dir(env: dict[str, str]) -> Path:
    path = Path(env["PROFILERD_DATA_DIR"]) / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_runs_lists_job_duration_steps_and_verdict(profilerd_env: dict[str, str]) -> None:
    directory = _runs_dir(profilerd_env)
    shutil.copy(FIXTURE, directory / "20260101-000000-train-f1x7.sqlite")
    listing = run_cli("runs", env=profilerd_env, timeout=60)
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()[:2]
    assert header.split() == ["RUN", "JOB", "STARTED", "DURATION", "STEPS", "STATE", "VERDICT"]
    assert row.split()[:2] == ["20260101-000000-train-f1x7", "fixture-ddp-job"]
    assert row.split()[-4:] == ["42s", "1766", "closed", "data"]
    document = json.loads(run_cli("runs", "--json", env=profilerd_env, timeout=60).stdout)
    assert [(r["job"], r["steps"], r["primary"]) for r in document] == [("fixture-ddp-job", 1766, "data")]
    assert document[0]["duration_s"] == pytest.approx(42.3, abs=0.5)


def test_prune_by_age_with_a_dry_run_first(profilerd_env: dict[str, str]) -> None:
    directory = _runs_dir(profilerd_env)
    now = time.time()
    for name, age_days in (("old", 10), ("new", 1)):
        path = directory / f"{name}.sqlite"
        shutil.copy(FIXTURE, path)
        _set_meta(path, run_id=name, ended_unix_s=repr(now - age_days * 86400))
    stale = directory / "stale.sqlite"  # left 'running' by a killed daemon, untouched for days
    live = directory / "live.sqlite"  # 'running' and written a moment ago: in use, never pruned
    for path in (stale, live):
        shutil.copy(FIXTURE, path)
        _set_meta(path, run_id=path.stem, state="running", ended_unix_s="None")
    os.utime(stale, (now - 3 * 86400, now - 3 * 86400))
    dry = run_cli("runs", "--older-than", "7d", "--dry-run", env=profilerd_env, timeout=60)
    assert dry.returncode == 0 and "would remove 2 recording(s)" in dry.stdout
    assert "old.sqlite" in dry.stdout and "stale.sqlite" in dry.stdout
    assert (directory / "old.sqlite").exists()
    pruned = run_cli("runs", "--older-than", "2d", env=profilerd_env, timeout=60)
    assert "removed 2 recording(s)" in pruned.stdout
    assert sorted(p.name for p in directory.glob("*.sqlite")) == ["live.sqlite", "new.sqlite"]


def test_daemon_retention_prunes_old_recordings_at_start(profilerd_env: dict[str, str], short_tmp: Path) -> None:
    directory = _runs_dir(profilerd_env)
    now = time.time()
    for name, age_days in (("expired", 40), ("kept", 5)):
        shutil.copy(FIXTURE, directory / f"{name}.sqlite")
        _set_meta(directory / f"{name}.sqlite", run_id=name, ended_unix_s=repr(now - age_days * 86400))
    config = short_tmp / "daemon.toml"
    config.write_text("[daemon]\nretention_days = 30\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "profilerd", "serve", "--gpu", "none", "--config", str(config)],
        env=profilerd_env,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert server.stderr is not None
        assert "serving" in server.stderr.readline()
        assert sorted(p.name for p in directory.glob("*.sqlite")) == ["kept.sqlite"]
    finally:
        server.send_signal(signal.SIGTERM)
        # Shutdown is tested elsewhere; a SIGTERM that lands before the handler is installed is fine here.
        assert server.wait(timeout=10) in (0, -signal.SIGTERM)
        if server.stderr is not None:
            server.stderr.close()


def test_a_recording_without_steps_still_reports_and_diffs(tmp_path: Path) -> None:
    path = tmp_path / "nosteps.sqlite"
    shutil.copy(FIXTURE, path)
    conn = sqlite3.connect(path)
    conn.execute("DELETE FROM steps")
    conn.commit()
    conn.close()
    for fmt in ("json", "text", "md", "html"):
        assert "No training steps were recorded" in report.build_report([path], RULES, fmt)
    for fmt in ("json", "text", "md", "html"):
        assert report.build_diff(path, FIXTURE, RULES, fmt)
    assert "no steps after warm-up" in report.build_diff(path, FIXTURE, RULES, "text")


@pytest.mark.parametrize("where", [0.02, 0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.97])
def test_garbage_anywhere_gives_a_report_or_a_clear_error(where: float, tmp_path: Path) -> None:
    """Overwrite 8 KiB at several places: every format either renders or says why it cannot."""
    data = bytearray(FIXTURE.read_bytes())
    start = int(len(data) * where)
    data[start : start + 8192] = bytes((i * 37 + 11) % 256 for i in range(8192))[: len(data) - start]
    path = tmp_path / "garbage.sqlite"
    path.write_bytes(bytes(data))
    for fmt in ("json", "text", "md", "html"):
        try:
            output = report.build_report([path], RULES, fmt)
        except recordings.RecordingError as exc:
            assert str(exc)  # the CLI prints it and exits 2
        else:
            assert output


def test_a_lost_gpu_is_listed_once_whether_recorded_as_an_event_or_only_seen_in_samples() -> None:
    import pandas as pd

    from profilerd.recordings.timeline import event_table

    gpus = pd.DataFrame(
        {"node": ["n1"] * 4, "gpu_index": [0, 0, 1, 1], "ts_unix_s": [10.0, 11.0, 10.0, 11.0], "lost": [0, 1, 0, 1]}
    )
    recorded = pd.DataFrame(
        {
            "ts_unix_s": [10.9],
            "kind": ["lost"],
            "detail": [json.dumps({"gpu_index": 0, "detail": "GPU is lost: GPU_IS_LOST"})],
            "node": ["n1"],
        }
    )
    table = event_table(recorded, gpus, None)
    lost = table[table["kind"] == "lost"]
    assert sorted(lost["gpu"]) == [0, 1]  # GPU 0 from its event, GPU 1 from its samples only
    assert lost[lost["gpu"] == 0]["text"].tolist() == ["GPU is lost: GPU_IS_LOST"]
