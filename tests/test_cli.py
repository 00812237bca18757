"""The command line as a user meets it: subprocesses, exit codes, real training runs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from profilerd import recordings as runs
from profilerd.analysis.rules import load_rules
from tests.conftest import EXAMPLES, REPO, run_cli

RULES, _ = load_rules()


def run_example_with_evidence(
    script: str, verdict_path: Path, rules: Path, env: dict[str, str], seconds: float = 5.0
) -> dict:
    """`profilerd run -- python examples/SCRIPT --seconds N` and its verdict, trained for the
    rules' minimum step count: a busy host makes each step slower, so a run that fell short is
    repeated for as long as its own measured step rate needs."""
    min_steps = load_rules(rules)[0].min_steps
    for _ in range(2):
        command = [sys.executable, str(EXAMPLES / script), "--seconds", f"{seconds:.1f}"]
        result = run_cli("run", "--rules", str(rules), "--json", str(verdict_path), "--", *command, env=env)
        assert result.returncode == 0, result.stderr
        document = json.loads(verdict_path.read_text())
        if document["steps"] >= min_steps or not document["steps_per_s"]:
            break
        seconds = 1.5 * (min_steps + RULES.warmup_steps) / document["steps_per_s"]
    return document


def check_loader_advice(document: dict, printed: str | None = None) -> None:
    """The data-wait finding's first fix is more workers wherever a core was idle (as measured
    during the run); on a host that other jobs keep busy it is rightly cheaper samples."""
    [finding] = [f for f in document["findings"] if f["rule"] == "data.input_wait"]
    fix = finding["recommendations"][0]
    if finding["metrics"]["free_cores"] >= 1.0:
        assert fix["id"] == "dataloader.num_workers", finding
    else:
        assert fix["id"] in ("dataloader.num_workers", "dataloader.cheaper_samples"), finding
    assert document["recommendations"][0]["id"] == fix["id"]
    if printed is not None:
        assert fix["title"] in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "required: COMMAND"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        (("run",), "no command to run"),
        (("serve", "--port", "abc"), "invalid int value"),
        (("report", "no-such-run"), "no run 'no-such-run'"),
        (("runs", "--older-than", "soon"), "cannot read duration"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(args: tuple[str, ...], message: str, profilerd_env) -> None:
    result = run_cli(*args, env=profilerd_env, timeout=30)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_bad_config_file_exits_2_naming_the_key(profilerd_env, short_tmp: Path) -> None:
    config = short_tmp / "c.toml"
    config.write_text("[daemon]\nhttp_prot = 1\n")
    result = run_cli("run", "--config", str(config), "--", "true", env=profilerd_env, timeout=30)
    assert result.returncode == 2
    assert "unknown key 'http_prot'" in result.stderr


def test_run_returns_the_childs_exit_code(profilerd_env) -> None:
    result = run_cli("run", "--", sys.executable, "-c", "import sys; sys.exit(3)", env=profilerd_env, timeout=60)
    assert result.returncode == 3
    assert "no training steps were recorded" in result.stderr
    missing = run_cli("run", "--", "no-such-program-xyz", env=profilerd_env, timeout=60)
    assert missing.returncode == 127
    assert "cannot run 'no-such-program-xyz'" in missing.stderr


def test_a_run_without_steps_writes_a_verdict_that_says_so_without_the_analysis(profilerd_env, short_tmp) -> None:
    """`run --json` of a command that never trains: the profilerd.verdict/v1 document says that
    nothing was judged and why, with the command's exit code; the wrapper builds it without pandas."""
    out = short_tmp / "verdict.json"
    argv = ["run", "--no-status", "--json", str(out), "--", sys.executable, "-c", "import sys; sys.exit(3)"]
    probe = textwrap.dedent(f"""
        import sys
        from profilerd.cli import main
        code = main({argv!r})
        print("HEAVY", sorted({{"pandas", "numpy"}} & set(sys.modules)), file=sys.stderr)
        sys.exit(code)
    """)
    env = {k: v for k, v in profilerd_env.items() if k != "PROFILERD_JOB_ID"}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, result.stderr
    assert "HEAVY []" in result.stderr, result.stderr
    document = json.loads(out.read_text())
    run_id = document["run_id"]
    assert list(document.items()) == [
        ("schema", "profilerd.verdict/v1"),
        ("run_id", run_id),
        ("job", run_id),
        ("primary", "none"),
        ("steps", 0),
        ("error", "no training steps were recorded"),
        ("exit_code", 3),
    ]


def test_demo_reports_data_bound_with_num_workers_and_report_agrees(profilerd_env, short_tmp: Path) -> None:
    """The first command a new user runs, with the default rules."""
    verdict_path = short_tmp / "demo.json"
    result = run_cli("demo", "--seconds", "12", "--json", str(verdict_path), env=profilerd_env)
    assert result.returncode == 0, result.stderr
    assert "DATA-BOUND" in result.stderr
    document = json.loads(verdict_path.read_text())
    assert document["schema"] == "profilerd.verdict/v1"
    assert document["primary"] == "data"
    assert sum(document["fractions"].values()) == pytest.approx(1.0, abs=0.01)
    assert document["findings"][0]["rule"] == "data.input_wait"
    check_loader_advice(document, result.stderr)
    if document["recommendations"][0]["id"] == "dataloader.num_workers":
        assert "num_workers" in result.stderr
    report = run_cli("report", document["run_id"], "--format", "json", env=profilerd_env, timeout=60)
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout) == document
    text = run_cli("report", "latest", env=profilerd_env, timeout=60)
    assert "DATA-BOUND" in text.stdout and "data.input_wait" in text.stdout
    listing = run_cli("runs", "--json", env=profilerd_env, timeout=60)
    runs = json.loads(listing.stdout)
    assert runs[0]["run_id"] == document["run_id"]
    assert runs[0]["state"] == "closed"
    assert runs[0]["primary"] == "data"


def test_compute_example_is_compute_bound(profilerd_env, short_tmp: Path, fast_rules: Path) -> None:
    document = run_example_with_evidence("compute_bound.py", short_tmp / "compute.json", fast_rules, profilerd_env)
    assert document["primary"] == "compute", document["summary"]
    assert document["fractions"]["compute"] > 0.5
    assert {r["id"] for r in document["recommendations"]} >= {"torch.compile", "optimizer.fused"}


def test_data_starved_example_is_data_bound(profilerd_env, short_tmp: Path, fast_rules: Path) -> None:
    document = run_example_with_evidence("data_starved.py", short_tmp / "starved.json", fast_rules, profilerd_env)
    assert document["primary"] == "data", document["summary"]
    check_loader_advice(document)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")
def test_torchrun_ranks_are_probed_as_one_job(profilerd_env, short_tmp: Path, fast_rules: Path) -> None:
    verdict_path = short_tmp / "ddp.json"
    result = run_cli(
        "run",
        "--rules",
        str(fast_rules),
        "--json",
        str(verdict_path),
        "--",
        "torchrun",
        "--nproc-per-node",
        "2",
        str(EXAMPLES / "ddp_cpu.py"),
        "--seconds",
        "5",
        env=profilerd_env,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(verdict_path.read_text())
    assert document["ranks"] == 2  # the torchrun agent itself is not probed
    assert [r["rank"] for r in document["per_rank"]] == [0, 1]
    assert document["primary"] != "none"


def test_python_dash_m_and_a_chained_sitecustomize(profilerd_env, short_tmp: Path, fast_rules: Path) -> None:
    package = short_tmp / "pkgroot" / "trainpkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        textwrap.dedent("""
        import time, torch
        import site_extra  # on sys.path only through the site's own sitecustomize
        model = torch.nn.Linear(16, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        end, steps = time.monotonic() + 3, 0
        while time.monotonic() < end:
            loss = model(torch.randn(8, 16)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            steps += 1
            time.sleep(0.01)
        open("steps.txt", "w").write(str(steps))
    """)
    )
    marker = short_tmp / "chained"
    user_site = short_tmp / "usersite"
    user_site.mkdir()
    extra = short_tmp / "extra"
    extra.mkdir()
    (extra / "site_extra.py").write_text("")
    (user_site / "sitecustomize.py").write_text(
        f"import sys\nopen({str(marker)!r}, 'w').write('ran')\nsys.path.append({str(extra)!r})\n"
    )
    env = dict(profilerd_env, PYTHONPATH=f"{short_tmp / 'pkgroot'}:{user_site}")
    verdict_path = short_tmp / "m.json"
    command = ["run", "--rules", str(fast_rules), "--json", str(verdict_path), "--", sys.executable, "-m", "trainpkg"]
    result = run_cli(*command, env=env, cwd=short_tmp)  # the program writes steps.txt where it runs
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "ran"
    document = json.loads(verdict_path.read_text())
    # Every step the program took is counted (past the warm-up), however many the host allowed.
    taken = int((short_tmp / "steps.txt").read_text())
    assert taken > RULES.warmup_steps
    assert document["steps"] == taken - RULES.warmup_steps
    assert "-trainpkg-" in document["run_id"]


def test_run_uses_an_already_running_daemon(profilerd_env, fast_rules: Path, short_tmp: Path) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "profilerd", "serve", "--gpu", "none"],
        env=profilerd_env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        assert "serving" in server.stderr.readline()
        verdict_path = short_tmp / "shared.json"
        result = run_cli(
            "run",
            "--rules",
            str(fast_rules),
            "--json",
            str(verdict_path),
            "--",
            sys.executable,
            str(EXAMPLES / "data_starved.py"),
            "--seconds",
            "3",
            env=profilerd_env,
        )
        assert result.returncode == 0, result.stderr
        document = json.loads(verdict_path.read_text())
        # The shared daemon recorded every step, numbered without a gap, and the verdict counts
        # them past the warm-up (how many there are depends on how busy the host is).
        numbers = sorted(runs.load(Path(document["recording"])).steps["step"].tolist())
        assert len(numbers) > RULES.warmup_steps
        assert numbers == list(range(1, len(numbers) + 1))
        assert document["steps"] == len(numbers) - RULES.warmup_steps
        assert Path(document["recording"]).parent == Path(profilerd_env["PROFILERD_DATA_DIR"]) / "runs"
        assert server.poll() is None  # the shared daemon keeps running after the run
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0


def test_runs_prune_keeps_the_newest(profilerd_env, fast_rules: Path) -> None:
    for _ in range(2):
        result = run_cli(
            "run", "--", sys.executable, str(EXAMPLES / "compute_bound.py"), "--seconds", "1", env=profilerd_env
        )
        assert result.returncode == 0, result.stderr
    before = json.loads(run_cli("runs", "--json", env=profilerd_env).stdout)
    assert len(before) == 2
    pruned = run_cli("runs", "--keep", "1", env=profilerd_env)
    assert "removed 1 recording" in pruned.stdout
    after = json.loads(run_cli("runs", "--json", env=profilerd_env).stdout)
    assert [r["run_id"] for r in after] == [before[0]["run_id"]]


def test_live_status_line_on_a_terminal(profilerd_env, fast_rules: Path) -> None:
    """On a TTY with --no-tui, `run` keeps one status line updated while the job trains."""
    import os
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "profilerd",
            "run",
            "--no-tui",
            "--rules",
            str(fast_rules),
            "--",
            sys.executable,
            str(EXAMPLES / "data_starved.py"),
            "--seconds",
            "4",
        ],
        env=profilerd_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    assert process.wait(timeout=60) == 0
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    assert "profilerd ▸" in screen
    assert "steps/s" in screen
    assert "\r\x1b[2K" in screen  # the line is redrawn in place, not scrolled
    assert "DATA-BOUND" in screen.split("\r\x1b[2K")[-1]  # the final verdict follows


def test_dataloader_workers_are_sampled(profilerd_env, fast_rules: Path, short_tmp: Path) -> None:
    import sqlite3

    verdict_path = short_tmp / "workers.json"
    result = run_cli(
        "run",
        "--rules",
        str(fast_rules),
        "--json",
        str(verdict_path),
        "--",
        sys.executable,
        "-m",
        "profilerd.demo.starved",
        "--num-workers",
        "2",
        "--seconds",
        "4",
        env=profilerd_env,
    )
    assert result.returncode == 0, result.stderr
    recording = json.loads(verdict_path.read_text())["recording"]
    workers = sqlite3.connect(recording).execute("SELECT MAX(num_workers) FROM process_samples").fetchone()[0]
    assert workers == 2


def test_serve_says_no_gpu_mode_once(profilerd_env) -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "profilerd", "serve"], env=profilerd_env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        assert "no-GPU mode" in line
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    assert server.stderr.read().count("no-GPU") == 0


def test_multi_node_job_ids_come_from_the_launcher() -> None:
    from profilerd.session import scheduler_job_id as _scheduler_job_id

    assert _scheduler_job_id(["torchrun", "--nnodes", "2", "--rdzv-id", "exp7", "train.py"]) == "rdzv-exp7"
    assert _scheduler_job_id(["torchrun", "--rdzv_id=exp8", "train.py"]) == "rdzv-exp8"
    assert _scheduler_job_id(["python", "train.py"]) is None or "SLURM_JOB_ID" in __import__("os").environ
