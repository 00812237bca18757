"""`profilerd run` as a session a user lives in: signals from a real terminal and from `kill`,
job control, the training's environment, concurrent runs sharing one daemon, the live view
failing, bad --json paths and closed pipes. Everything runs in subprocesses as a user meets it."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import termios
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from tests.test_tui_e2e import Tmux

PROFILERD = [sys.executable, "-m", "profilerd"]

# A training stand-in without torch (fast to start): notes every signal it gets in a log, one
# name a line, and runs until a stop file appears.
SIGNAL_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    log, stop = sys.argv[1], sys.argv[2]
    def note(signum, frame):
        with open(log, "a") as f:
            f.write(signal.Signals(signum).name + "\\n")
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, note)
    with open(log, "a") as f:
        f.write(f"ready {os.getpid()} {os.getppid()}\\n")
    while not os.path.exists(stop):
        time.sleep(0.02)
""")

# A training stand-in that sleeps until a signal ends it.
SLEEPER = """
import os, time
with open({log!r}, "w") as f:
    f.write(f"ready {{os.getpid()}} {{os.getppid()}}")
time.sleep(60)
"""

# Exactly N optimizer steps of a tiny model, then the step count on stdout.
STEPS_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    steps = int(sys.argv[1])
    print("TRAINING-START", flush=True)
    model = torch.nn.Linear(32, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = model(torch.randn(16, 32)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        time.sleep(0.03)
    print("TRAINING-DONE", steps, flush=True)
""")


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return "gone"


# A shell's job control, as bash does it: the job in its own process group, in the terminal's
# foreground; a stopped job gets the terminal back and SIGCONT when the test says `fg` (by
# creating the file $FG); the job's exit status is written as the shell's $? would be.
JOB_CONTROL_SHELL = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a shell may take the terminal back
    job = os.fork()
    if job == 0:
        os.setpgid(0, 0)
        os.tcsetpgrp(0, os.getpgrp())
        signal.signal(signal.SIGTTOU, signal.SIG_DFL)
        os.execvp(sys.argv[1], sys.argv[1:])
    try:  # as shells do, both sides set the group: whichever runs first (the child may have exec'd)
        os.setpgid(job, job)
    except (PermissionError, ProcessLookupError):
        pass
    def said(line):
        with open(os.environ["STATUS"], "a") as f:
            f.write(line + "\\n")
    while True:
        _, status = os.waitpid(job, os.WUNTRACED)
        if os.WIFSTOPPED(status):
            os.tcsetpgrp(0, os.getpgrp())
            said(f"stopped {128 + os.WSTOPSIG(status)}")
            while not os.path.exists(os.environ["FG"]):
                time.sleep(0.05)
            os.unlink(os.environ["FG"])
            os.tcsetpgrp(0, job)
            os.killpg(job, signal.SIGCONT)
            continue
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        said(f"status {code}")
        break
""")


class TerminalSession:
    """`profilerd run` as a shell's foreground job on a real (pseudo-)terminal: ^C, ^\\ and ^Z
    written to it are the kernel's signals to the job's whole process group."""

    def __init__(self, args: list[str], env: dict[str, str], tmp: Path) -> None:
        self.master, slave = os.openpty()
        self.status_path, self.fg_path = tmp / "shell.status", tmp / "fg"
        self.stderr_path = tmp / "profilerd.stderr"

        def take_terminal() -> None:  # runs after setsid(): the pty is the shell's terminal
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        with open(self.stderr_path, "wb") as stderr:
            self.shell = subprocess.Popen(
                [sys.executable, "-c", JOB_CONTROL_SHELL, *PROFILERD, *args],
                env=dict(env, STATUS=str(self.status_path), FG=str(self.fg_path)),
                cwd=REPO,
                stdin=slave,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=take_terminal,
            )
        os.close(slave)

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def fg(self) -> None:
        self.fg_path.write_text("")

    def shell_said(self) -> list[str]:
        return self.status_path.read_text().splitlines() if self.status_path.exists() else []

    def exit_status(self) -> int:
        """What the shell saw as the job's exit status ($?)."""
        wait_until(lambda: any(line.startswith("status") for line in self.shell_said()), "the job to end")
        self.shell.wait(timeout=30)
        return int(self.shell_said()[-1].split()[1])

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def close(self, job_pids: tuple[int, ...] = ()) -> None:
        for pid in job_pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.shell.poll() is None:
            os.killpg(self.shell.pid, signal.SIGKILL)
            self.shell.wait(timeout=10)
        os.close(self.master)


def signal_child(tmp: Path) -> tuple[list[str], Path, Path]:
    script = tmp / "sigchild.py"
    script.write_text(SIGNAL_CHILD)
    log, stop = tmp / "signals.log", tmp / "stop"
    return ["run", "--no-status", "--", sys.executable, str(script), str(log), str(stop)], log, stop


def noted(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if not line.startswith("ready")] if log.exists() else []


def started(log: Path) -> tuple[int, int]:
    """The training's pid and its parent's (`profilerd run`), once it is running."""
    wait_until(lambda: log.exists() and "ready" in log.read_text(), "the training to start")
    _, child, parent = log.read_text().split("\n", 1)[0].split()
    return int(child), int(parent)


def test_terminal_signals_reach_the_training_once_and_kill_signals_are_relayed_once(
    profilerd_env: dict[str, str], short_tmp: Path
) -> None:
    args, log, stop = signal_child(short_tmp)
    session = TerminalSession(args, profilerd_env, short_tmp)
    pids: tuple[int, ...] = ()
    try:
        pids = started(log)
        ours = pids[1]
        expected: list[str] = []
        for keys, name in ((b"\x03", "SIGINT"), (b"\x1c", "SIGQUIT")):  # ^C and ^\ on the terminal
            session.type(keys)
            expected.append(name)
            wait_until(lambda: noted(log) == expected, f"{name} from the terminal")
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGINT):
            os.kill(ours, sig)  # sent to profilerd alone, as `kill PID` does
            expected.append(sig.name)
            wait_until(lambda: noted(log) == expected, f"{sig.name} relayed")
        time.sleep(1.0)  # room for a second delivery, which must not come
        assert noted(log) == expected
        assert state_of(ours) not in ("gone", "Z")  # none of them ended profilerd: the training runs
        stop.write_text("")
        assert session.exit_status() == 0
        assert "Traceback" not in session.stderr()
    finally:
        session.close(pids)


@pytest.mark.parametrize("how", ["terminal-ctrl-c", "sigkill"])
def test_a_training_killed_by_a_signal_ends_profilerd_by_the_same_signal(
    how: str, profilerd_env: dict[str, str], short_tmp: Path
) -> None:
    script = short_tmp / "sleeper.py"
    log = short_tmp / "signals.log"
    script.write_text(SLEEPER.format(log=str(log)))
    session = TerminalSession(["run", "--no-status", "--", sys.executable, str(script)], profilerd_env, short_tmp)
    pids: tuple[int, ...] = ()
    try:
        pids = child, _ = started(log)
        if how == "terminal-ctrl-c":
            session.type(b"\x03")  # Python dies of an unhandled KeyboardInterrupt by SIGINT
            expected = signal.SIGINT
        else:
            os.kill(child, signal.SIGKILL)
            expected = signal.SIGKILL
        assert session.exit_status() == 128 + expected
        assert "profilerd/" not in session.stderr()  # the training's own traceback only, none of ours
    finally:
        session.close(pids)


def test_ctrl_z_stops_the_job_and_fg_resumes_it(profilerd_env: dict[str, str], short_tmp: Path) -> None:
    args, log, stop = signal_child(short_tmp)
    session = TerminalSession(args, profilerd_env, short_tmp)
    pids: tuple[int, ...] = ()
    try:
        pids = child, ours = started(log)
        for stop_it in (lambda: session.type(b"\x1a"), lambda: os.kill(ours, signal.SIGTSTP)):
            stop_it()  # ^Z on the terminal, then `kill -TSTP` to profilerd alone (relayed)
            wait_until(lambda: state_of(child) == "T" and state_of(ours) == "T", "the whole job to stop")
            wait_until(lambda: session.shell_said()[-1:] == ["stopped 148"], "the shell to see it stopped")
            session.fg()
            wait_until(lambda: state_of(child) != "T" and state_of(ours) != "T", "the job to resume")
        stop.write_text("")
        assert session.exit_status() == 0
        assert noted(log) == []  # job control sent the training nothing else
    finally:
        session.close(pids)


def test_the_training_sees_its_own_sys_path_cwd_argv_stdin_and_environment(
    profilerd_env: dict[str, str], short_tmp: Path
) -> None:
    """What a program sees of itself is what it sees without profilerd, a site's own
    sitecustomize (which extends sys.path) included; only PROFILERD_* and our PYTHONPATH
    entry are added to its environment."""
    site, extra, work = short_tmp / "site", short_tmp / "extra", short_tmp / "work"
    for directory in (site, extra, work):
        directory.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nsys.path.append({str(extra)!r})\n")
    (extra / "site_extra.py").write_text("VALUE = 'from the site'\n")
    script = short_tmp / "introspect.py"
    script.write_text(
        textwrap.dedent("""
        import json, os, sys
        import site_extra
        print(json.dumps({
            "path": sys.path, "cwd": os.getcwd(), "argv": sys.argv, "stdin": sys.stdin.read(),
            "env": dict(os.environ), "extra": site_extra.VALUE,
            "probes_on_path": any("profilerd-boot" in p for p in sys.path),
        }))
    """)
    )
    env = dict(profilerd_env, PYTHONPATH=str(site))
    argv = [sys.executable, str(script), "--flag", "a b"]
    plain = subprocess.run(argv, env=env, cwd=work, input="data\n", capture_output=True, text=True, timeout=60)
    probed = subprocess.run(
        [*PROFILERD, "run", "--", *argv], env=env, cwd=work, input="data\n", capture_output=True, text=True, timeout=120
    )
    assert plain.returncode == 0 and probed.returncode == 0, probed.stderr
    without, under = json.loads(plain.stdout), json.loads(probed.stdout)
    assert under["path"] == without["path"]
    assert not under["probes_on_path"]
    assert under["extra"] == "from the site"
    for key in ("cwd", "argv", "stdin"):
        assert under[key] == without[key]
    added = {k: v for k, v in under["env"].items() if without["env"].get(k) != v}
    assert set(added) - {"PYTHONPATH"} == {k for k in added if k.startswith("PROFILERD_")}
    assert added["PYTHONPATH"].split(os.pathsep)[1:] == [str(site)]  # our entry first, theirs kept
    assert not set(without["env"]) - set(under["env"])


def test_concurrent_runs_share_one_daemon_and_are_each_recorded_completely(
    profilerd_env: dict[str, str], short_tmp: Path, fast_rules: Path
) -> None:
    """Two runs at once with no daemon: the first starts a shared daemon, which lives until the
    later run has ended, then goes away on its own."""
    script = short_tmp / "steps.py"
    script.write_text(STEPS_SCRIPT)
    plan = {"short": 40, "long": 160}
    processes = {
        name: subprocess.Popen(
            [*PROFILERD, "run", "--rules", str(fast_rules), "--json", str(short_tmp / f"{name}.json"), "--", *job],
            env=profilerd_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, steps in plan.items()
        for job in ([sys.executable, str(script), str(steps)],)
    }
    outputs = {name: process.communicate(timeout=240) for name, process in processes.items()}
    for name, process in processes.items():
        assert process.returncode == 0, outputs[name][1]
        assert f"TRAINING-DONE {plan[name]}" in outputs[name][0]
    documents = {name: json.loads((short_tmp / f"{name}.json").read_text()) for name in plan}
    listing = {r["run_id"]: r for r in json.loads(run_cli("runs", "--json", env=profilerd_env).stdout)}
    rows = {name: listing[d["run_id"]] for name, d in documents.items()}
    assert {row["state"] for row in rows.values()} == {"closed"}
    assert {name: row["steps"] for name, row in rows.items()} == plan  # every step recorded
    assert rows["long"]["ended_unix_s"] > rows["short"]["ended_unix_s"]
    runtime = Path(profilerd_env["XDG_RUNTIME_DIR"]) / "profilerd"
    wait_until(lambda: not (runtime / "daemon.json").exists(), "the shared daemon to leave", timeout=30)


# Two torch.multiprocessing workers of one program (hogwild), neither a distributed rank: both
# say rank 0. Their steps interleave in a fixed order: A steps, B steps (its hello reaches the
# daemon), then A steps again.
SAME_RANK_WORKERS = textwrap.dedent("""
    import torch, torch.multiprocessing as mp

    def steps(model, n):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(n):
            opt.zero_grad()
            model(torch.ones(4, 8)).sum().backward()
            opt.step()

    def worker_a(model, a_done, b_done):
        steps(model, 5)
        a_done.set()
        b_done.wait(60)
        steps(model, 5)

    def worker_b(model, a_done, b_done):
        a_done.wait(60)
        steps(model, 5)
        b_done.set()

    if __name__ == "__main__":
        model = torch.nn.Linear(8, 1)
        model.share_memory()
        a_done, b_done = mp.Event(), mp.Event()
        workers = [mp.Process(target=f, args=(model, a_done, b_done)) for f in (worker_a, worker_b)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        print("PIDS", *(w.pid for w in workers), flush=True)
""")


def test_two_live_processes_with_one_rank_are_both_recorded_to_the_end(
    profilerd_env: dict[str, str], short_tmp: Path, fast_rules: Path
) -> None:
    """A second process saying the same rank while the first still trains joins it: the first
    keeps being recorded (a restarted rank, whose previous process is gone, replaces it)."""
    from profilerd import recordings

    script = short_tmp / "same_rank.py"
    script.write_text(SAME_RANK_WORKERS)
    document = short_tmp / "run.json"
    done = subprocess.run(
        [*PROFILERD, "run", "--rules", str(fast_rules), "--json", str(document), "--", sys.executable, str(script)],
        env=profilerd_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    pid_a, pid_b = (int(p) for p in done.stdout.split("PIDS", 1)[1].split())
    recorded = recordings.load(Path(json.loads(document.read_text())["recording"])).steps
    assert recorded.groupby("pid").size().to_dict() == {pid_a: 10, pid_b: 5}


def test_a_run_killed_with_sigkill_is_recorded_to_the_end_and_not_listed_running(
    profilerd_env: dict[str, str], short_tmp: Path, fast_rules: Path
) -> None:
    """SIGKILL takes `profilerd run` away but not its training: the shared daemon records the
    training to its end, closes the run, and leaves once nothing needs it."""
    script = short_tmp / "steps.py"
    script.write_text(STEPS_SCRIPT)
    run = subprocess.Popen(
        [*PROFILERD, "run", "--rules", str(fast_rules), "--", sys.executable, str(script), "80"],
        env=profilerd_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert run.stdout is not None
    assert run.stdout.readline().strip() == "TRAINING-START"
    run.kill()
    run.wait(timeout=10)
    assert "TRAINING-DONE 80" in run.stdout.read()  # the training carried on to its end

    def listed() -> list[dict[str, object]]:
        return json.loads(run_cli("runs", "--json", env=profilerd_env).stdout)

    wait_until(lambda: [r["state"] for r in listed()] == ["closed"], "the run to be closed", timeout=60)
    assert listed()[0]["steps"] == 80
    runtime = Path(profilerd_env["XDG_RUNTIME_DIR"]) / "profilerd"
    wait_until(lambda: not (runtime / "daemon.json").exists(), "the shared daemon to leave", timeout=30)


def test_a_running_recording_without_a_writer_is_listed_aborted(profilerd_env: dict[str, str]) -> None:
    from profilerd.recordings.writer import open_recording

    runs_dir = Path(profilerd_env["PROFILERD_DATA_DIR"]) / "runs"
    runs_dir.mkdir(parents=True)
    for run_id, age_s in (("fresh", 0), ("left-behind", 600)):
        path = runs_dir / f"{run_id}.sqlite"
        conn = open_recording(path)
        conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [("run_id", run_id), ("state", "running")])
        conn.commit()
        conn.close()
        for file in runs_dir.glob(f"{run_id}.sqlite*"):
            os.utime(file, (time.time() - age_s, time.time() - age_s))
    listing = {r["run_id"]: r["state"] for r in json.loads(run_cli("runs", "--json", env=profilerd_env).stdout)}
    assert listing == {"fresh": "running", "left-behind": "aborted"}


@pytest.mark.parametrize(
    ("target", "message"), [("dir", "is a directory"), ("file/verdict.json", "is not a directory")]
)
def test_a_bad_json_path_is_refused_before_the_training_starts(
    target: str, message: str, profilerd_env: dict[str, str], short_tmp: Path
) -> None:
    (short_tmp / "dir").mkdir()
    (short_tmp / "file").write_text("")
    marker = short_tmp / "trained"
    result = run_cli(
        "run", "--json", str(short_tmp / target), "--", sys.executable, "-c", f"open({str(marker)!r}, 'w')",
        env=profilerd_env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr and "--json" in result.stderr
    assert not marker.exists()


def test_output_into_a_closed_pipe_exits_quietly(profilerd_env: dict[str, str]) -> None:
    """`profilerd runs | head -1` once head has gone: no traceback, exit 141 like a tool killed by SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before profilerd writes a byte
    try:
        result = subprocess.run(
            [*PROFILERD, "runs"], env=profilerd_env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert result.stderr == ""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")
@pytest.mark.parametrize("fault", ["start", "running"])
def test_a_failing_live_view_falls_back_to_the_status_line(
    fault: str, profilerd_env: dict[str, str], fast_rules: Path, short_tmp: Path
) -> None:
    """On a terminal, a live view that cannot open, or that crashes while the training runs,
    costs the view only: the training's output is all there and the run ends with its verdict."""
    script = short_tmp / "steps.py"
    script.write_text(STEPS_SCRIPT)
    env = dict(profilerd_env, TERM="xterm-256color", PROFILERD_LIVE_VIEW_FAULT=fault)
    tmux = Tmux(env, short_tmp)
    command = (
        f"{sys.executable} -m profilerd run --rules {fast_rules} -- {sys.executable} {script} 120; "
        "echo EXIT=$?; sleep 60"
    )
    tmux("new-session", "-d", "-s", "pd", "-x", "110", "-y", "40", "-c", str(REPO), command)
    try:
        tmux.wait_for("EXIT=0", timeout=180)
        screen = tmux("capture-pane", "-p", "-S", "-500", "-t", "pd")
        # The status line shares the terminal with the training's own output, which may land
        # after it on its row and wrap: read the text with the rows joined.
        text = "".join(screen.splitlines())
        assert "TRAINING-START" in text and "TRAINING-DONE 120" in text
        assert ("the live view failed" if fault == "running" else "no live view") in text
        assert "showing a status line" in text
        assert re.search(r"\d+ steps over \d", screen)  # the verdict's evidence line
        assert "Traceback" not in screen
    finally:
        tmux("kill-server")
