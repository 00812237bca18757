"""`profilerd diff`: the measured speedup and its interval, the shifts, the verdict, the prediction."""

from __future__ import annotations

import json
import re
import sqlite3
import sys
from pathlib import Path

import pytest

from profilerd import recordings, report
from profilerd.analysis.rules import load_rules
from profilerd.report import diff
from tests.conftest import EXAMPLES, run_cli
from tests.fixtures.make_fixture import Job, Node, write_recording

RULES, _ = load_rules()
# Five blocks of `diff`'s batch means past the warm-up: an interval narrow enough to exclude 1.
STEPS_FOR_AN_INTERVAL = 5 * diff.MIN_STEPS_PER_BLOCK + RULES.warmup_steps
QUIET = {"checkpoint_at_s": None, "lost_steps": None, "xid_at_s": None, "throttle_gpu": None, "gpu_gap_span_s": None}


def _pair(tmp_path: Path, before: Job, after: Job) -> tuple[Path, Path]:
    a = write_recording(tmp_path / "a.sqlite", before, Node("run-a", "node", (0, 1)))
    b = write_recording(tmp_path / "b.sqlite", after, Node("run-b", "node", (0, 1)))
    return a, b


def _compare(a: Path, b: Path, applied: list[str] | None = None) -> dict:
    ra, rb = recordings.load(a), recordings.load(b)
    return diff.compare(
        ra, report.verdict_document(ra, RULES), rb, report.verdict_document(rb, RULES), RULES.warmup_steps, applied
    )


@pytest.mark.parametrize(
    ("p", "dof", "expected"),
    [
        (0.975, 1, 12.706),
        (0.975, 2, 4.303),
        (0.975, 3, 3.182),
        (0.975, 5, 2.571),
        (0.975, 29, 2.045),
        (0.95, 10, 1.812),
        (0.975, 1000, 1.962),
    ],
)
def test_t_quantile_matches_the_tables(p: float, dof: int, expected: float) -> None:
    assert diff.t_quantile(p, dof) == pytest.approx(expected, rel=0.02)


def test_more_workers_measured_faster_and_off_data(tmp_path: Path) -> None:
    before = Job(seconds=30, world_size=2, straggler_rank=None, data_wait_s=0.040, num_workers=1, seed=1, **QUIET)
    after = Job(seconds=30, world_size=2, straggler_rank=None, data_wait_s=0.001, num_workers=4, seed=2, **QUIET)
    document = _compare(*_pair(tmp_path, before, after))
    assert document["schema"] == "profilerd.diff/v1"
    true_ratio = document["a"]["step_time_s"]["mean"] / document["b"]["step_time_s"]["mean"]
    speedup = document["speedup"]
    assert speedup["step_time"] == pytest.approx(true_ratio, rel=1e-3)
    low, high = speedup["ci95"]
    assert 1.0 < low < speedup["step_time"] < high < 1.3 * speedup["step_time"]
    assert speedup["significant"] is True
    assert document["fractions"]["data_wait"]["delta"] < -0.3
    assert document["verdict"] == {
        "a": "data",
        "b": document["verdict"]["b"],
        "changed": True,
        "moved_off": "data",
        "resolved_rules": document["verdict"]["resolved_rules"],
        "new_rules": document["verdict"]["new_rules"],
    }
    assert "data.input_wait" in document["verdict"]["resolved_rules"]
    assert {c["key"] for c in document["config_changes"]} == {"dataloader.num_workers"}
    [applied] = [a for a in document["applied"] if a["id"] == "dataloader.num_workers"]
    assert applied["status"] in ("materialized", "exceeded", "partial")
    assert applied["measured_speedup"] == pytest.approx(speedup["step_time"], rel=1e-3)
    assert applied["predicted_speedup"] > 1.0


def test_the_same_job_twice_is_not_a_significant_change(tmp_path: Path) -> None:
    """The interval's coverage: the same job with different random draws, 20 times over."""
    from dataclasses import replace

    job = Job(seconds=12, world_size=2, straggler_rank=None, **QUIET)
    covered = 0
    for seed in range(20):
        pair = _pair(tmp_path, replace(job, seed=seed), replace(job, seed=seed + 100))
        document = _compare(*pair, applied=["dataloader.num_workers"])
        low, high = document["speedup"]["ci95"]
        covered += low < 1.0 < high
        assert document["verdict"]["changed"] is False
        assert document["config_changes"] == []
        if low < 1.0 < high:
            assert document["speedup"]["significant"] is False
            assert document["applied"][0]["status"] == "not materialized"
    assert covered >= 16  # a 95% interval; 19 expected, 16 or fewer has probability below 2%


def test_diff_cli_formats_and_errors(profilerd_env: dict[str, str], tmp_path: Path) -> None:
    before = Job(seconds=20, world_size=2, straggler_rank=None, data_wait_s=0.040, num_workers=1, seed=1, **QUIET)
    after = Job(seconds=20, world_size=2, straggler_rank=None, data_wait_s=0.001, num_workers=4, seed=2, **QUIET)
    a, b = _pair(tmp_path, before, after)
    text = run_cli("diff", str(a), str(b), env=profilerd_env, timeout=60)
    assert text.returncode == 0, text.stderr
    assert re.search(r"B is \d\.\d\d× faster \(95% CI \d\.\d\d–\d\.\d\d×\)", text.stdout)
    assert "Verdict: data → " in text.stdout and "(moved off data)" in text.stdout
    assert "dataloader.num_workers: 1 → 4" in text.stdout
    out = tmp_path / "diff.json"
    assert run_cli("diff", str(a), str(b), "-o", str(out), env=profilerd_env, timeout=60).returncode == 0
    assert json.loads(out.read_text())["verdict"]["moved_off"] == "data"
    document = _compare(a, b)
    markdown = diff.render_markdown(document)
    assert markdown.startswith("### profilerd diff: `run-a` → `run-b`") and "| data wait share |" in markdown
    html = diff.render_html(document)
    assert 'id="chart-diff"' in html and "<script" not in html and "http" not in html.replace("http-equiv", "")
    missing = run_cli("diff", str(a), "no-such-run", env=profilerd_env, timeout=60)
    assert missing.returncode == 2 and "no run 'no-such-run'" in missing.stderr and "Traceback" not in missing.stderr


def _retrain(
    path: Path,
    argv: list[str] | None = None,
    parameters: int | None = None,
    batch_size: int | None = None,
    world_size: int | None = None,
) -> Path:
    """The recording as if another job had been trained: its command, model, batch or world size."""
    conn = sqlite3.connect(path)
    if argv is not None:
        conn.execute("UPDATE sessions SET argv = ?", (json.dumps(argv),))
    if world_size is not None:
        conn.execute("UPDATE sessions SET world_size = ?", (world_size,))
    for rowid, text in conn.execute("SELECT rowid, config FROM configs").fetchall():
        config = json.loads(text)
        if parameters is not None:
            config["models"][0]["parameters"] = parameters
        if batch_size is not None:
            config["dataloader"]["batch_size"] = batch_size
        if world_size is not None:
            config["world_size"] = world_size
        conn.execute("UPDATE configs SET config = ? WHERE rowid = ?", (json.dumps(config), rowid))
    conn.commit()
    conn.close()
    return path


def test_two_different_jobs_get_no_speedup_headline(profilerd_env: dict[str, str], tmp_path: Path) -> None:
    """Another script, model, batch and world size: the differences are named, no "B is N× faster"."""
    slow = Job(seconds=20, world_size=2, straggler_rank=None, data_wait_s=0.040, seed=1, **QUIET)
    fast = Job(seconds=20, world_size=2, straggler_rank=None, data_wait_s=0.001, seed=2, **QUIET)
    a, b = _pair(tmp_path, slow, fast)
    _retrain(b, argv=["/home/me/gpt/train_gpt.py", "--lr", "3"], parameters=124_439_808, batch_size=16, world_size=4)
    text = run_cli("diff", str(a), str(b), env=profilerd_env, timeout=60)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert not re.search(r"B is [\d.]+× (faster|slower)", out), out
    assert "A and B are different jobs (command, model size, batch size, world size differ)" in out
    assert "--force" in out
    assert "command: train.py --epochs 90 → /home/me/gpt/train_gpt.py --lr 3\n" in out
    assert "model size: 25,557,032 → 124,439,808 parameters" in out
    assert "batch size: 64 → 16" in out and "world size: 2 → 4 ranks" in out
    assert "Figures of the two jobs (not a speedup):" in out
    assert re.search(r"  A: step time mean [\d.]+ ms", out) and re.search(r"  B: step time mean [\d.]+ ms", out)

    document = json.loads(run_cli("diff", str(a), str(b), "--format", "json", env=profilerd_env).stdout)
    assert document["same_job"] is False and document["forced"] is False
    assert [d["what"] for d in document["differences"] if d["defining"]] == [
        "command",
        "model size",
        "batch size",
        "world size",
    ]
    assert all(r["status"] == "different jobs" for r in document["applied"])
    for rendered in (diff.render_markdown(document), diff.render_html(document)):
        assert "different jobs" in rendered and not re.search(r"B is [\d.]+× faster", rendered)

    forced = run_cli("diff", str(a), str(b), "--force", env=profilerd_env, timeout=60)
    assert forced.returncode == 0, forced.stderr
    assert re.search(r"B is \d+\.\d\d× faster \(95% CI [\d.]+–[\d.]+×\) \[forced: different jobs", forced.stdout)
    assert "model size: 25,557,032 → 124,439,808 parameters" in forced.stdout
    assert "Figures of the two jobs" not in forced.stdout


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"parameters": 11_689_512}, "model size"),
        ({"batch_size": 256}, "batch size"),
        ({"world_size": 8}, "world size"),
        ({"argv": ["eval.py", "--epochs", "90"]}, "command"),
    ],
)
def test_any_one_job_difference_withholds_the_headline(tmp_path: Path, change: dict, what: str) -> None:
    job = Job(seconds=12, world_size=2, straggler_rank=None, **QUIET)
    a, b = _pair(tmp_path, job, job)
    _retrain(b, **change)
    document = _compare(a, b)
    assert [d["what"] for d in document["differences"]] == [what]
    assert document["same_job"] is False
    assert diff.headline(document).startswith(f"A and B are different jobs ({what} differ)")


def test_other_arguments_to_the_same_script_are_the_same_job(tmp_path: Path) -> None:
    """A fix applied through a flag (same script, other arguments) keeps its interval headline."""
    before = Job(seconds=20, world_size=2, straggler_rank=None, data_wait_s=0.040, num_workers=1, seed=1, **QUIET)
    after = Job(seconds=20, world_size=2, straggler_rank=None, data_wait_s=0.001, num_workers=4, seed=2, **QUIET)
    a, b = _pair(tmp_path, before, after)
    _retrain(a, argv=["/src/examples/data_starved.py", "--seconds", "5"])
    _retrain(b, argv=["/elsewhere/examples/data_starved.py", "--seconds", "4", "--num-workers", "4"])
    document = _compare(a, b)
    assert document["same_job"] is True
    [row] = document["differences"]
    assert row["what"] == "command" and row["defining"] is False
    assert re.fullmatch(r"B is \d\.\d\d× faster \(95% CI \d\.\d\d–\d\.\d\d×\)", diff.headline(document))
    text = diff.render_text(document)
    assert "(same program, other arguments)" in text and "Figures of the two jobs" not in text
    [applied] = [r for r in document["applied"] if r["id"] == "dataloader.num_workers"]
    assert applied["status"] in ("materialized", "exceeded", "partial")


@pytest.mark.slow
def test_more_workers_for_the_data_starved_example(
    profilerd_env: dict[str, str], short_tmp: Path, fast_rules: Path
) -> None:
    """The fix applied for real: the example as is, then with the recommended num_workers."""

    def run(seconds: float, *extra: str) -> dict:
        path = short_tmp / f"run{len(extra)}.json"
        result = run_cli(
            "run",
            "--rules",
            str(fast_rules),
            "--json",
            str(path),
            "--",
            sys.executable,
            str(EXAMPLES / "data_starved.py"),
            "--seconds",
            f"{seconds:.1f}",
            "--channels",
            "16",  # a light model: the steps' time is mostly the loader's waiting, which load does not stretch
            *extra,
            env=profilerd_env,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(path.read_text())

    # Enough steps for an interval of several batch-mean blocks, which a busy host makes slower:
    # if 5 s were too few, the run is repeated for as long as its measured step rate needs.
    needed = STEPS_FOR_AN_INTERVAL
    seconds = 5.0
    before = run(seconds)
    if before["steps"] < needed:
        seconds = 1.25 * needed / before["steps_per_s"]
        before = run(seconds)
    assert before["primary"] == "data", before["summary"]
    [rec] = [r for r in before["recommendations"] if r["id"] == "dataloader.num_workers"]
    workers = max(2, int(rec["title"].rsplit(" ", 1)[-1]))  # "Raise DataLoader num_workers from 0 to N"
    after = run(seconds, "--num-workers", str(workers))  # faster steps: at least as many
    result = run_cli(
        "diff", before["run_id"], after["run_id"], "--rules", str(fast_rules), "--format", "json", env=profilerd_env
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    speedup = document["speedup"]
    assert speedup["step_time"] > 1.2, speedup  # 2 workers on a 2-core host shared with the daemon
    assert speedup["ci95"][0] > 1.0, speedup  # measured, not just estimated: the interval excludes 1
    # The workers took the waiting out of the loop: the wait per step fell to under half of
    # what it was. (Its share of the step falls less where a busy host stretches the compute.)
    assert document["fractions"]["data_wait"]["delta"] < 0, document["fractions"]
    wait_s = document["phase_time_s"]["data_wait"]
    assert wait_s["b"] < 0.5 * wait_s["a"], wait_s
    assert document["verdict"]["a"] == "data"
    if document["verdict"]["b"] == "data":
        # Other jobs kept every core busy during the second run: the workers could not run as
        # fast as they asked to, and its verdict says so from what it measured.
        [finding] = [f for f in after["findings"] if f["rule"] == "data.input_wait"]
        assert finding["metrics"]["free_cores"] < 1.0 and "CPU-bound" in finding["evidence"], finding
    else:
        assert document["verdict"]["moved_off"] == "data"
    [applied] = [a for a in document["applied"] if a["id"] == "dataloader.num_workers"]
    assert applied["predicted_speedup"] == rec["estimated_speedup"]
    assert applied["status"] in ("materialized", "exceeded", "partial"), applied["detail"]
