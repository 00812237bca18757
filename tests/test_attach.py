"""`profilerd attach PID` against real, unchanged CPU training processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from profilerd.analysis.rules import load_rules
from tests.conftest import EXAMPLES, REPO, run_cli

HAS_PY_SPY = shutil.which("py-spy") is not None or Path(sys.executable).with_name("py-spy").exists()


def start(*cmd: str, env: dict[str, str], cwd: Path = REPO) -> subprocess.Popen[str]:
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # unchanged scripts, no probes
    return subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.fixture
def spawn(profilerd_env: dict[str, str]) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def wait_for_torch(pid: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("the target never loaded torch")


def wait_for_training(pid: int, timeout: float = 60.0) -> None:
    """Past start-up: three stack dumps in a row inside the script, none importing. On a loaded
    machine `import torch` and the first optimizer step's imports (torch._dynamo) take seconds,
    and what is seen then is rightly not the loop's bottleneck, which these tests are about."""
    wait_for_torch(pid, timeout)
    if not HAS_PY_SPY:
        time.sleep(1.5)  # past import, into the training loop on an idle machine
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    deadline, settled = time.monotonic() + timeout, 0
    while time.monotonic() < deadline and settled < 3:
        dump = subprocess.run([spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True)
        settled = settled + 1 if "main (" in dump.stdout and "importlib" not in dump.stdout else 0
        time.sleep(0.3)
    assert settled == 3, f"the target never settled into its training loop:\n{dump.stdout}"


def main_thread_schedstat_s(pid: int) -> tuple[float, float]:
    """Seconds the target's main thread ran on a CPU, and waited runnable for one (the kernel's
    /proc/PID/schedstat): what it got, and what a busy host kept from it."""
    on_cpu_ns, run_queue_ns, _ = Path(f"/proc/{pid}/schedstat").read_text().split()
    return int(on_cpu_ns) / 1e9, int(run_queue_ns) / 1e9


def attach(pid: int, env: dict[str, str], out: Path, *flags: str) -> dict:
    result = run_cli("attach", str(pid), "--once", "--duration", "5", "--json", str(out), *flags, env=env, timeout=90)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    "stacks", [False, pytest.param(True, marks=pytest.mark.skipif(not HAS_PY_SPY, reason="py-spy missing"))]
)
def test_data_starved_and_compute_bound_targets(spawn, profilerd_env, short_tmp: Path, stacks: bool) -> None:
    starved = start(sys.executable, "-m", "profilerd.demo.starved", "--seconds", "60", env=profilerd_env)
    spawn.append(starved)
    wait_for_training(starved.pid)
    flags = () if stacks else ("--no-stacks",)
    document = attach(starved.pid, profilerd_env, short_tmp / "starved.json", *flags)
    assert document["primary"] == "data", document["summary"]
    assert document["attach_layer"] == ("L1" if stacks else "L0")
    assert document["schema"] == "profilerd.verdict/v1"
    assert sum(document["fractions"].values()) == pytest.approx(1.0, abs=0.01)
    starved.kill()
    compute = start(sys.executable, str(EXAMPLES / "compute_bound.py"), "--seconds", "60", env=profilerd_env)
    spawn.append(compute)
    wait_for_training(compute.pid)
    (cpu_before, queued_before), started = main_thread_schedstat_s(compute.pid), time.monotonic()
    document = attach(compute.pid, profilerd_env, short_tmp / "compute.json", *flags)
    (cpu_after, queued_after), wall = main_thread_schedstat_s(compute.pid), time.monotonic() - started
    got, queued = (cpu_after - cpu_before) / wall, (queued_after - queued_before) / wall
    # Stack samples see the loop compute; thread CPU (L0) does where the thread got a core.
    if stacks or got >= 0.6 or queued < 0.2:
        assert document["primary"] == "compute", (document["summary"], got, queued)
    else:
        # Other jobs kept the core from it (it waited runnable a fifth of the time or more): by
        # thread CPU alone a thread waiting for a core looks like one waiting for input, and L0
        # says what it saw.
        saw = document["layers"]["L0"]["saw"]["main_thread_cores"]
        assert saw == pytest.approx(got, abs=0.25), (saw, got)
        assert document["primary"] in ("compute", "data"), document["summary"]
    if stacks:
        assert document["layers"]["L1"]["samples"]["backward"] > 0


def test_once_figures_agree_and_report_finds_the_run(spawn, profilerd_env, short_tmp: Path) -> None:
    """What `attach --once` prints rests on one set of data, and `profilerd report ID` shows that verdict."""
    target = start(sys.executable, "-m", "profilerd.demo.starved", "--seconds", "60", env=profilerd_env)
    spawn.append(target)
    wait_for_training(target.pid)
    out = short_tmp / "once.json"
    result = run_cli("attach", str(target.pid), "--once", "--duration", "4", "--json", str(out), env=profilerd_env)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert document["attach_layer"] in ("L0", "L1")
    # Without probes no step is seen: no step count, rate or time, not a sample count next to "0.0 steps/s".
    assert document["steps"] == 0 and document["steps_per_s"] == 0.0 and document["step_time_s"]["p50"] == 0.0
    assert " steps over " not in result.stderr and "0.0 steps/s" not in result.stderr
    if document["attach_layer"] == "L1":
        samples = document["stack_samples"]
        assert samples == sum(document["layers"]["L1"]["samples"].values())
        assert f"note: {samples} stack samples of the training thread" in result.stderr
    run_id = document["run_id"]
    assert f"(profilerd report {run_id})" in result.stderr
    report = run_cli("report", run_id, "--format", "json", env=profilerd_env)
    assert report.returncode == 0, report.stderr
    reported = json.loads(report.stdout)
    assert (reported["run_id"], reported["primary"], reported["summary"]) == (
        document["run_id"],
        document["primary"],
        document["summary"],
    )
    assert reported["primary"] == "data"
    text = run_cli("report", run_id, env=profilerd_env)
    assert text.returncode == 0 and document["summary"] in text.stdout, text.stderr
    listing = json.loads(run_cli("runs", "--json", env=profilerd_env).stdout)
    assert [(r["run_id"], r["primary"]) for r in listing] == [(run_id, "data")]


def test_target_that_exits_mid_attach_still_gets_a_verdict(spawn, profilerd_env, short_tmp: Path) -> None:
    target = start(sys.executable, "-m", "profilerd.demo.starved", "--seconds", "6", env=profilerd_env)
    spawn.append(target)
    wait_for_torch(target.pid)
    out = short_tmp / "exit.json"
    # A window far longer than the target's start-up and training: it ends when the target
    # exits, however slow the host made its start.
    result = run_cli(
        "attach", str(target.pid), "--once", "--duration", "60", "--json", str(out), env=profilerd_env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert any("exited" in note for note in document["notes"])
    assert document["primary"] in ("data", "compute", "algorithm")


def test_bad_targets_get_a_clear_error_and_exit_2(spawn, profilerd_env) -> None:
    missing = run_cli("attach", "999999", "--once", env=profilerd_env, timeout=30)
    assert missing.returncode == 2 and "no process with pid 999999" in missing.stderr
    sleeper = start("sleep", "30", env=profilerd_env)
    spawn.append(sleeper)
    not_python = run_cli("attach", str(sleeper.pid), "--once", env=profilerd_env, timeout=30)
    assert not_python.returncode == 2 and "is not a Python process" in not_python.stderr
    plain = start(sys.executable, "-c", "import time; time.sleep(30)", env=profilerd_env)
    spawn.append(plain)
    time.sleep(0.5)
    no_torch = run_cli("attach", str(plain.pid), "--once", env=profilerd_env, timeout=30)
    assert no_torch.returncode == 2 and "has not imported torch" in no_torch.stderr
    assert sleeper.poll() is None and plain.poll() is None  # no harm done


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_no_permission_names_the_fix(spawn, profilerd_env) -> None:
    target = start(sys.executable, "-m", "profilerd.demo.starved", "--seconds", "30", env=profilerd_env)
    spawn.append(target)
    wait_for_torch(target.pid)
    try:
        result = _run_as_nobody(target.pid, profilerd_env)
    except PermissionError:
        pytest.skip("the unprivileged user cannot run this Python")
    if "No module named" in result.stderr:
        pytest.skip("the unprivileged user cannot read the checkout")
    assert result.returncode == 2
    assert "permission" in result.stderr
    assert target.poll() is None


def _run_as_nobody(pid: int, profilerd_env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "profilerd", "attach", str(pid), "--once"],
        env=dict(profilerd_env, HOME="/tmp"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=lambda: os.setuid(65534),
    )


TARGET = textwrap.dedent("""
    import sys, time, torch
    from torch.utils.data import dataloader as dl
    sys.path.insert(0, {examples!r})
    from data_starved import DecodeOnTheFly
    model = torch.nn.Linear(3 * 32 * 32, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    log = open({log!r}, "w", buffering=1)
    end = time.monotonic() + 300  # past the test's end, where it is killed
    while time.monotonic() < end:
        for x, y in torch.utils.data.DataLoader(DecodeOnTheFly(256), batch_size=8):
            loss = torch.nn.functional.cross_entropy(model(x.flatten(1)), y)
            opt.zero_grad(); loss.backward(); opt.step()
            probed = hasattr(dl._BaseDataLoaderIter.__next__, "__wrapped__")  # the probes' wrapper
            log.write(f"{{time.monotonic():.3f}} {{'probed' if probed else 'plain'}}\\n")
""")


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb missing")
def test_experimental_injection_installs_and_removes_the_probes(spawn, profilerd_env, short_tmp: Path) -> None:
    log = short_tmp / "target.log"
    script = short_tmp / "target.py"
    script.write_text(TARGET.format(examples=str(EXAMPLES), log=str(log)))
    target = start(sys.executable, str(script), env=profilerd_env)
    spawn.append(target)
    logged_steps(log, at_least=3)  # in the loop, past the first optimizer step's imports
    document = attach(
        target.pid, profilerd_env, short_tmp / "l2.json", "--inject-experimental", "--no-stacks", "--rate=10"
    )
    assert document["attach_layer"] == "L2", document["layers"]
    assert document["primary"] == "data"
    attached = len(logged_steps(log, at_least=1))
    modules = logged_steps(log, at_least=attached + 1)  # a step after detach
    probed = modules.count("probed")
    assert probed, "the probes were never in the loop"
    # The steps it counts are the ones taken while the probes were in: the warm-up and a step
    # cut by the injection or the removal at either end aside.
    warmup = load_rules()[0].warmup_steps
    assert probed - warmup - 2 <= document["steps"] <= probed, (document["steps"], probed)
    assert modules[-1] == "plain"  # and gone after detach
    assert target.poll() is None  # the target carries on


def logged_steps(log: Path, at_least: int, timeout: float = 60.0) -> list[str]:
    """The TARGET's steps so far ('probed' or 'plain' each), once it has logged ``at_least``."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text().split("\n")[:-1] if log.exists() else []  # whole lines only
        complete = [line.split()[1] for line in lines]
        if len(complete) >= at_least:
            return complete
        assert time.monotonic() < deadline, f"the target logged {len(complete)} steps, not {at_least}"
        time.sleep(0.1)


def test_no_inject_forbids_injection(spawn, profilerd_env, short_tmp: Path) -> None:
    target = start(sys.executable, "-m", "profilerd.demo.starved", "--seconds", "30", env=profilerd_env)
    spawn.append(target)
    wait_for_torch(target.pid)
    document = attach(
        target.pid, profilerd_env, short_tmp / "noinject.json", "--inject-experimental", "--no-inject", "--no-stacks"
    )
    assert document["attach_layer"] == "L0"
    assert document["layers"]["L2"] == {"available": False, "why": "forbidden by --no-inject"}


def test_stack_phases_from_py_spy_frames() -> None:
    """Real frame shapes from py-spy on torch 2.13 / Python 3.11."""
    from profilerd.attach.sampling import phase_of

    loop = "<module> (train.py:42);main (train.py:29)"
    loader = "_BaseDataLoaderIter.__next__ (torch/utils/data/dataloader.py:741);_next_data (x.py:1)"
    assert phase_of(f"{loop};{loader}") == "data_wait"
    assert phase_of(f"{loop};Module._call_impl (torch/nn/modules/module.py:1789);forward (train.py:9)") == "forward"
    assert phase_of(f"{loop};all_reduce (torch/distributed/distributed_c10d.py:2900)") == "communication"
    # start-up: the optimizer's first step imports torch._dynamo, which imports torch.distributed
    importing = (
        f"{loop};Optimizer.__init__ (torch/optim/optimizer.py:405);_find_and_load (<frozen importlib._bootstrap>:1176);"
        "<module> (torch/distributed/__init__.py:13)"
    )
    assert phase_of(importing) == "other"


def test_thread_cpu_and_stack_samples_are_decided_by_the_one_diagnosis() -> None:
    """L0's thread-CPU estimate and L1's stack samples go through the same decision and the same
    document as a probed run: the estimate is a finding, its confidence is low (no step is seen)."""
    from collections import Counter

    from profilerd.analysis.rules import load_rules
    from profilerd.attach.sampling import L0Summary
    from profilerd.attach.target import Target
    from profilerd.attach.verdict import L0_RULE, conclude, document

    rules, _ = load_rules()
    target = Target(1, ("train.py",), "3.11", True)
    starved = L0Summary(
        seconds=5.0,
        samples=10,
        main_thread_cores=0.2,
        other_threads_cores=0.1,
        workers=2,
        workers_cores=1.9,
        worker_max_ratio=0.97,
        host_busy_cores=2.5,
        cpu_count=8,
    )
    l0 = document(conclude(target, starved, None, None, rules, 5.0), "r0")
    assert (l0["attach_layer"], l0["primary"], l0["severity"]) == ("L0", "data", "warning")
    assert l0["summary"] == (
        "DATA-BOUND: 2 DataLoader workers run at 97% of a core while the training thread is busy only 20% of the time"
    )
    assert [f["rule"] for f in l0["findings"]] == [L0_RULE]
    assert l0["evidence"]["level"] == "low" and l0["l0_estimate"]["primary"] == "data"
    assert l0["fractions"] == {"data_wait": 0.8, "compute": 0.2, "communication": 0.0, "other": 0.0}

    counts = Counter(forward=40, backward=50, optimizer=10)
    l1 = document(conclude(target, starved, counts, None, rules, 5.0), "r1")
    assert (l1["attach_layer"], l1["primary"], l1["stack_samples"], l1["steps"]) == ("L1", "compute", 100, 0)
    assert l1["l0_estimate"]["primary"] == "data"  # what thread CPU alone would have said, kept beside it
