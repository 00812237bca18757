"""`profilerd run` starts the training at once (issue 17): no step is lost to a daemon that is
still starting, what the probes hold for it is bounded and never blocks, and the CLI starts
without the analysis, the TUI or the exporters. Timings are in benchmarks/bench_launch.py."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from profilerd_probes import transport, wire
from profilerd_probes.transport import MAX_HELD_DATAGRAMS, DatagramSender
from tests.conftest import REPO, run_cli
from tests.wire_helpers import step_datagram

# N optimizer steps of a tiny model, the first at once: nothing waits for a daemon.
STEPS = textwrap.dedent("""
    import sys, torch
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(int(sys.argv[1])):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
""")


def _recorded_steps(recording: Path) -> list[int]:
    with sqlite3.connect(recording) as db:
        return [row[0] for row in db.execute("SELECT step FROM steps ORDER BY step")]


@pytest.mark.parametrize("steps", [3, 200])
def test_a_run_with_no_daemon_records_every_step_from_the_first(profilerd_env, short_tmp, steps):
    """No daemon runs: `run` starts one beside the training, and the probes hold what they
    make until it answers. 3 steps end before it can (the process waits for it at exit);
    200 outlast its start."""
    script = short_tmp / "train.py"
    script.write_text(STEPS)
    out = short_tmp / "verdict.json"
    result = run_cli("run", "--no-status", "--json", str(out), "--", sys.executable, str(script), str(steps),
                     env=profilerd_env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())  # the verdict leaves warm-up steps out; the recording has all
    assert _recorded_steps(Path(document["recording"])) == list(range(1, steps + 1))


def _step(seq: int) -> bytes:
    return step_datagram(pid=1, seq=seq, step=seq, end_unix_s=time.time(), step_s=0.1)


def _hello() -> bytes:
    return wire.encode_json(wire.KIND_HELLO, {"pid": 1, "job": "j"})


def test_a_probe_with_no_daemon_holds_a_bound_drops_the_oldest_and_never_blocks(short_tmp):
    sender = DatagramSender(short_tmp / "nobody.sock")
    sender.send(_hello())
    extra = 300
    started = time.monotonic()
    results = [sender.send(_step(i)) for i in range(MAX_HELD_DATAGRAMS + extra)]
    assert not any(results)
    assert sender.held == MAX_HELD_DATAGRAMS
    # The hello and the newest steps are kept; each dropped step is counted.
    assert dict(sender.dropped) == {"daemon_absent": extra + 1}
    assert sender.connect_attempts <= (time.monotonic() - started) / transport.STARTING_RECONNECT_INTERVAL_S + 2


def test_held_records_go_out_in_order_hello_first_once_the_daemon_answers(short_tmp):
    import socket

    path = short_tmp / "late.sock"
    sender = DatagramSender(path)
    sender.send(_hello())
    for seq in range(1, 6):
        sender.send(_step(seq))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as daemon:
        daemon.bind(str(path))
        deadline = time.monotonic() + 10
        while sender.held:  # the next message (or this) retries on the sender's clock, never blocks
            assert time.monotonic() < deadline, "never connected"
            time.sleep(0.01)
            sender.ensure_connected()
        assert sender.send(_step(6)) is True
        daemon.setblocking(False)
        received = []
        while True:
            try:
                received.append(wire.decode(daemon.recv(wire.MAX_DATAGRAM_BYTES)))
            except BlockingIOError:
                break
    assert isinstance(received[0], wire.JsonMessage) and received[0].kind == "hello"
    assert [step.seq for batch in received[1:] for step in batch.steps] == [1, 2, 3, 4, 5, 6]
    assert sender.held == 0 and sender.dropped_total == 0


def test_a_job_that_never_steps_ends_without_waiting_for_the_daemon(profilerd_env):
    """`python -c "import torch"` under run: nothing to record, no verdict to wait for."""
    result = run_cli("run", "--no-status", "--", sys.executable, "-c", "import torch", env=profilerd_env)
    assert result.returncode == 0, result.stderr
    assert "no training steps were recorded" in result.stderr


@pytest.mark.parametrize("argv", [["--help"], ["runs"], ["doctor"]])
def test_the_cli_starts_without_pandas_textual_or_prometheus_client(profilerd_env, argv):
    probe = textwrap.dedent(f"""
        import sys
        from profilerd.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        heavy = sorted({{"pandas", "textual", "prometheus_client", "numpy"}} & set(sys.modules))
        print("HEAVY", heavy, file=sys.stderr)
    """)
    result = subprocess.run(
        [sys.executable, "-c", probe], env=profilerd_env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert "HEAVY []" in result.stderr, result.stderr


def test_the_run_prints_the_daemons_verdict_and_its_wrapper_never_imports_pandas(profilerd_env, short_tmp):
    """The daemon has the recording and the analysis loaded: it computes the end-of-run verdict,
    and the wrapper only prints it. The verdict is the one the recording gives."""
    from profilerd import recordings as runs
    from profilerd.analysis.rules import load_rules

    script = short_tmp / "train.py"
    script.write_text(STEPS)
    out = short_tmp / "verdict.json"
    argv = ["run", "--no-status", "--json", str(out), "--", sys.executable, str(script), "40"]
    probe = textwrap.dedent(f"""
        import sys
        from profilerd.cli import main
        code = main({argv!r})
        heavy = sorted({{"pandas", "numpy", "textual", "prometheus_client"}} & set(sys.modules))
        print("HEAVY", heavy, file=sys.stderr)
        sys.exit(code)
    """)
    result = subprocess.run(
        [sys.executable, "-c", probe], env=profilerd_env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr, result.stderr
    document = json.loads(out.read_text())
    recording = Path(document["recording"])
    local = runs.analyse(runs.load(recording), load_rules()[0]).to_json(
        document["run_id"], document["job"], recording=str(recording), exit_code=0
    )
    assert document == json.loads(json.dumps(local, default=str))
    assert f"run {document['run_id']}" in result.stderr  # the verdict was printed


def test_a_private_runtime_directory_goes_with_its_runs_daemon(profilerd_env, short_tmp):
    """A runtime directory others can write in is replaced by a private one for the run; it is
    removed when the run's daemon stops (or at once when the run started none)."""
    taken = Path(profilerd_env["XDG_RUNTIME_DIR"]) / "profilerd"
    taken.mkdir()
    taken.chmod(0o777)
    script = short_tmp / "train.py"
    script.write_text(STEPS)
    for cmd in ([sys.executable, str(script), "5"], [sys.executable, "-c", "pass"]):
        result = run_cli("run", "--no-status", "--", *cmd, env=profilerd_env)
        assert result.returncode == 0, result.stderr
        private = Path(result.stderr.split("this run uses ", 1)[1].split()[0])
        deadline = time.monotonic() + 60
        while private.exists():  # the run's daemon lingers a moment for a next run, then stops
            assert time.monotonic() < deadline, f"{private} left behind: {sorted(private.iterdir())}"
            time.sleep(0.1)


def test_a_daemon_with_other_rules_leaves_the_verdict_to_the_runs_own_rules(profilerd_env, short_tmp):
    """A daemon the user started with their own --rules judges by those: a run without --rules
    gets the built-in rules' verdict, computed by the wrapper, not the daemon's."""
    from profilerd import recordings as runs
    from profilerd.analysis.rules import load_rules
    from tests.reliability_helpers import Served

    lenient = short_tmp / "lenient.toml"
    lenient.write_text("[evidence]\nmin_steps = 5\nmin_seconds = 0.0\n")
    script = short_tmp / "train.py"
    script.write_text(STEPS)
    out = short_tmp / "verdict.json"
    daemon = Served(profilerd_env, "--gpu", "none", "--rules", str(lenient))
    try:
        result = run_cli("run", "--no-status", "--json", str(out), "--", sys.executable, str(script), "40",
                         env=profilerd_env)  # fmt: skip
    finally:
        daemon.process.terminate()
        daemon.process.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    recording = runs.load(Path(document["recording"]))

    def judged_by(rules: Path | None) -> dict:
        verdict = runs.analyse(recording, load_rules(rules)[0])
        judged = verdict.to_json(document["run_id"], document["job"], recording=document["recording"], exit_code=0)
        return json.loads(json.dumps(judged, default=str))

    assert document == judged_by(None)
    assert document != judged_by(lenient)  # the daemon's rules would have said otherwise


def test_the_daemon_ingests_before_its_heavy_imports(profilerd_env):
    """A daemon for runs takes the probes' records (stored and recorded) before it has imported
    the analysis, HTTP or GPU parts: a short training's records land at once."""
    probe = textwrap.dedent("""
        import os, sqlite3, sys, time
        from profilerd.config import load
        from profilerd.daemon import Daemon
        from profilerd.recordings.schema import recording_file
        from profilerd_probes import wire
        from profilerd_probes.transport import DatagramSender

        config = load(None, {})[0]
        daemon = Daemon(config)  # no rules yet: they need the analysis
        daemon.start_ingest()
        sender = DatagramSender(config.socket_path)
        sender.send(wire.encode_json(wire.KIND_HELLO, {"pid": os.getpid(), "job": "j"}))
        record = wire.pack_step_record(pid=os.getpid(), seq=1, step=1, end_unix_s=time.time(), step_s=0.1)
        sender.send(wire.encode_step_batch([record]))
        deadline = time.monotonic() + 30
        while not daemon.store.ring("j") and time.monotonic() < deadline:
            time.sleep(0.01)
        heavy = sorted({"pandas", "numpy", "prometheus_client", "pynvml"} & set(sys.modules))
        daemon.stop()  # closes the recording as it stands
        with sqlite3.connect(recording_file(config.runs_dir, "j")) as db:
            recorded = db.execute("SELECT count(*) FROM steps").fetchone()[0]
        print("STEPS", recorded, "HEAVY", heavy)
    """)
    result = subprocess.run(
        [sys.executable, "-c", probe], env=profilerd_env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "STEPS 1 HEAVY []" in result.stdout, result.stdout + result.stderr


def test_the_signal_thread_ends_when_the_run_ends_and_a_stray_wake_signal_is_ignored():
    """`run` does not poll for its end: close() wakes the signal thread, which has no timeout to
    fall back on, so a wake that did not arrive would leave it running. The wake signal from
    elsewhere (kill -RTMIN) changes nothing while the run lasts."""
    probe = textwrap.dedent("""
        import os, signal, time
        from profilerd.session import RELAY_WAKE_SIGNAL, SignalRelay
        relay = SignalRelay()
        os.kill(os.getpid(), RELAY_WAKE_SIGNAL)  # as another process would: not the end
        time.sleep(0.2)
        print("ALIVE-BEFORE", relay._thread.is_alive())
        relay.close()
        print("ALIVE-AFTER", relay._thread.is_alive())
    """)
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "ALIVE-BEFORE True" in result.stdout and "ALIVE-AFTER False" in result.stdout, result.stdout


def test_the_run_exits_with_the_trainings_code_after_printing_everything(profilerd_env, short_tmp):
    """The wrapper skips the interpreter's teardown (os._exit) once the run is over: what it
    printed and wrote still comes out whole, and the exit code is the training's."""
    script = short_tmp / "train.py"
    script.write_text(STEPS + "raise SystemExit(3)\n")
    out = short_tmp / "verdict.json"
    result = run_cli("run", "--no-status", "--json", str(out), "--", sys.executable, str(script), "5",
                     env=profilerd_env)  # fmt: skip
    assert result.returncode == 3, result.stderr
    document = json.loads(out.read_text())
    assert document["exit_code"] == 3
    assert _recorded_steps(Path(document["recording"])) == [1, 2, 3, 4, 5]
    assert f"run {document['run_id']}" in result.stderr
