"""Who may talk to the daemon, and what it gives away: socket and directory permissions,
kernel-checked sender credentials (uid and pid) on every datagram, a local-only HTTP server
with command-line secrets redacted by an allow-list (API and recordings), received data that is
never executed, and the systemd unit."""

from __future__ import annotations

import ast
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from profilerd.analysis.rules import load_rules
from profilerd.config import load
from profilerd.daemon import Daemon, DaemonError
from profilerd.gpu import NoGpuBackend
from profilerd.recordings.schema import recording_file
from profilerd.redaction import MASK, redact_argv
from profilerd_probes import wire
from tests.conftest import REPO
from tests.reliability_helpers import get_json, hello, http_get, send, send_as, step_batch, step_records, wait_for

RULES, _ = load_rules()
OTHER_UID = 12345
THIRD_UID = 23456
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to send as another user")

DaemonFactory = Callable[..., Daemon]


@pytest.fixture
def make_daemon(profilerd_env: dict[str, str]) -> Iterator[DaemonFactory]:
    started: list[Daemon] = []

    def make(**overrides: Any) -> Daemon:
        config, problems = load()
        assert problems == []
        daemon = Daemon(replace(config, **overrides), RULES, gpu_backend=NoGpuBackend("no GPU in tests"))
        daemon.start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        daemon.stop()


def counts(daemon: Daemon) -> tuple[dict[str, int], dict[str, int]]:
    return daemon.store.message_counts()


def open_parents(path: Path) -> None:
    """Let other users traverse the test's private temporary directories down to the socket."""
    for parent in path.parents:
        if parent == Path("/tmp"):
            return
        os.chmod(parent, parent.stat().st_mode | 0o011)


def messages_from(job: str) -> Callable[[int], list[bytes]]:
    """What a probe in a child process sends: a hello and 5 steps, all with its own pid."""
    return lambda pid: [hello(pid, job=job, run_id=job), step_batch(1, 5, pid)]


# ---- the socket and its directory ---------------------------------------------------------------
@needs_root
def test_another_user_cannot_even_reach_the_socket(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    path = daemon.config.socket_path
    assert path.parent.stat().st_mode & 0o777 == 0o700 and path.stat().st_mode & 0o777 == 0o600
    assert send_as(OTHER_UID, path, messages_from("intruder")) == 13  # EACCES from the file system
    assert "intruder" not in daemon.store.jobs


def test_a_symlinked_runtime_directory_is_refused(make_daemon: DaemonFactory, short_tmp: Path) -> None:
    real = short_tmp / "elsewhere"
    real.mkdir(mode=0o700)
    (short_tmp / "link").symlink_to(real)
    with pytest.raises(DaemonError, match="symbolic link"):
        make_daemon(socket_path=short_tmp / "link" / "ingest.sock")
    assert not (real / "ingest.sock").exists()


@needs_root
def test_a_runtime_directory_owned_by_someone_else_is_refused(make_daemon: DaemonFactory, short_tmp: Path) -> None:
    theirs = short_tmp / "theirs"
    theirs.mkdir(mode=0o777)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    with pytest.raises(DaemonError, match=f"belongs to uid {OTHER_UID}"):
        make_daemon(socket_path=theirs / "ingest.sock")


def test_a_stale_symlink_in_place_of_the_socket_is_replaced_not_followed(
    make_daemon: DaemonFactory, profilerd_env: dict[str, str], short_tmp: Path
) -> None:
    config, _ = load()
    config.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    victim = short_tmp / "victim"
    victim.write_text("keep me")
    config.socket_path.symlink_to(victim)
    daemon = make_daemon()
    assert victim.read_text() == "keep me"
    assert not daemon.config.socket_path.is_symlink()


# ---- credentials on every datagram --------------------------------------------------------------
@needs_root
def test_another_uid_is_rejected_by_its_credentials_even_if_it_reaches_the_socket(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    path = daemon.config.socket_path
    open_parents(path)  # a permission mistake: the file system no longer protects it
    os.chmod(path, 0o666)
    assert send_as(OTHER_UID, path, messages_from("intruder")) == 0  # it did reach the socket
    wait_for(lambda: counts(daemon)[1].get("forbidden_uid") == 2, what="both datagrams rejected")
    received, _ = counts(daemon)
    assert received == {} and "intruder" not in daemon.store.jobs
    send(path, hello(job="mine"), step_batch(1, 5))  # the daemon's own user still gets in
    wait_for(lambda: counts(daemon)[0].get("step") == 5)


@needs_root
def test_allowed_uids_admits_exactly_the_configured_users(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(allowed_uids=(OTHER_UID,))
    path = daemon.config.socket_path
    # reachable for the other users; the credentials decide
    assert path.parent.stat().st_mode & 0o777 == 0o711 and path.stat().st_mode & 0o777 == 0o666
    open_parents(path.parent)  # as a socket_path under /run would be
    assert send_as(OTHER_UID, path, messages_from("colleague")) == 0
    assert send_as(THIRD_UID, path, messages_from("stranger")) == 0
    wait_for(lambda: counts(daemon)[0].get("step") == 5, what="the allowed user's steps")
    wait_for(lambda: counts(daemon)[1].get("forbidden_uid") == 2, what="the other user's datagrams")
    assert "colleague" in daemon.store.jobs and "stranger" not in daemon.store.jobs


def victim(make_daemon: DaemonFactory, steps: int) -> tuple[Daemon, Path, int]:
    """A daemon that holds ``steps`` steps of this process's job "victim"; its socket; our pid."""
    daemon = make_daemon()
    path = daemon.config.socket_path
    send(path, hello(job="victim", run_id="victim"), step_batch(1, steps))
    wait_for(lambda: counts(daemon)[0].get("step") == steps)
    return daemon, path, os.getpid()


def test_a_message_claiming_another_process_pid_is_rejected(make_daemon: DaemonFactory) -> None:
    daemon, path, me = victim(make_daemon, 3)

    def impostor(own_pid: int) -> list[bytes]:
        # a same-user process speaking for this one: steps into its rank, a new hello, run_end
        return [
            step_batch(4, 10, me),
            hello(me, job="hijack", run_id="victim"),
            wire.encode_json(wire.KIND_RUN_END, {"pid": me, "run_id": "victim", "exit_code": 0}),
            hello(own_pid, job="honest", run_id="honest"),  # its own pid is fine
        ]

    assert send_as(os.getuid(), path, impostor) == 0
    wait_for(lambda: counts(daemon)[0].get("hello") == 2, what="the impostor's honest hello")
    received, dropped = counts(daemon)
    assert dropped.get("pid_mismatch") == 12  # 10 step records, the hello, the run_end
    assert received["step"] == 3
    assert daemon.store.runs["victim"].state == "running"
    assert daemon.store.session_for(me).job == "victim"  # type: ignore[union-attr]
    assert "honest" in daemon.store.jobs


def test_a_batch_mixing_the_senders_steps_with_another_process_steps_keeps_only_its_own(
    make_daemon: DaemonFactory,
) -> None:
    """The daemon checks a batch's sender once per claimed pid, not per step: a pid that changes
    inside the datagram is checked again."""
    daemon, path, me = victim(make_daemon, 2)

    def mixed(own_pid: int) -> list[bytes]:
        records = step_records(1, 2, own_pid) + step_records(3, 3, me) + step_records(3, 2, own_pid)
        return [hello(own_pid, job="mixed", run_id="mixed"), wire.encode_step_batch(records)]

    assert send_as(os.getuid(), path, mixed) == 0
    wait_for(lambda: counts(daemon)[1].get("pid_mismatch") == 3, what="the other process's steps refused")
    wait_for(lambda: counts(daemon)[0].get("step") == 6, what="the sender's own steps")
    assert daemon.store.jobs["mixed"].ranks[0].steps_total == 4
    assert daemon.store.jobs["victim"].ranks[0].steps_total == 2


def test_run_end_from_the_run_command_with_its_own_pid_closes_the_run(make_daemon: DaemonFactory) -> None:
    """`profilerd run` is another process than the trainer: its run_end carries its own pid."""
    daemon = make_daemon()
    path = daemon.config.socket_path
    send(path, hello(job="j", run_id="r"), step_batch(1, 4))
    wait_for(lambda: counts(daemon)[0].get("step") == 4)

    def run_command(own_pid: int) -> list[bytes]:
        return [wire.encode_json(wire.KIND_RUN_END, {"pid": own_pid, "run_id": "r", "exit_code": 0})]

    assert send_as(os.getuid(), path, run_command) == 0
    wait_for(lambda: daemon.store.runs["r"].state == "closed", what="run closed")


# ---- HTTP ------------------------------------------------------------------------------------------
def test_http_listens_on_loopback_only_by_default(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    assert daemon.http_address[0] == "127.0.0.1"


SECRETS = ("hf_abcdefghijklmnop", "hunter2", "XYZ123456", "s3cr3tpw", "sk-abcdefghijklmnopq", "tok.en.value")


def test_api_redacts_secrets_in_command_lines(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon()
    argv = [
        "train.py",
        "--hf-token",
        SECRETS[0],
        "--password",
        SECRETS[1],
        f"--api-key={SECRETS[2]}",
        f"--db=postgres://bob:{SECRETS[3]}@db/x",
        SECRETS[4],
        "--header",
        f"Authorization: Bearer {SECRETS[5]}",
        "--lr",
        "0.1",
    ]
    send(daemon.config.socket_path, hello(job="j", run_id="r", argv=argv), step_batch(1, 3))
    wait_for(lambda: counts(daemon)[0].get("step") == 3)
    host, port = daemon.http_address
    for path in ("/api/v1/jobs/j?steps=5", "/api/v1/jobs", "/api/v1/runs", "/api/v1/status", "/metrics"):
        status, body = http_get(f"http://{host}:{port}{path}")
        assert status == 200
        assert not [s for s in SECRETS if s in body.decode()], path
    document = json.loads(http_get(f"http://{host}:{port}/api/v1/jobs/j")[1])
    shown = document["rank_detail"][0]["argv"]
    assert shown[:2] == ["train.py", "--hf-token"] and shown[-2:] == ["--lr", "0.1"]  # the rest stays readable


# Each flag spelling from issue 18 that the old deny-list missed, and common token shapes.
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train.py", "--db-pass", "x"], ["train.py", "--db-pass", MASK]),
        (["train.py", "--wandb-key=x"], ["train.py", f"--wandb-key={MASK}"]),
        (["train.py", "--private-key="], ["train.py", f"--private-key={MASK}"]),
        (["train.py", "--key", "x"], ["train.py", "--key", MASK]),
        (["train.py", "--credentials=/x.json"], ["train.py", f"--credentials={MASK}"]),
        (["train.py", "--pass=x"], ["train.py", f"--pass={MASK}"]),
        (["train.py", "--pwd=x"], ["train.py", f"--pwd={MASK}"]),
        (["train.py", "--passphrase=x y"], ["train.py", f"--passphrase={MASK}"]),
        (["train.py", "--master_key=x"], ["train.py", f"--master_key={MASK}"]),
        (["train.py", "-p", "x"], ["train.py", "-p", MASK]),
        (["train.py", "-pSECRETVALUE"], ["train.py", f"-{MASK}"]),
        (["train.py", "glpat-abcdefghij0123456789"], ["train.py", MASK]),
        (["train.py", "AKIAIOSFODNN7EXAMPLE"], ["train.py", MASK]),
        (["train.py", "--password", "x"], ["train.py", "--password", MASK]),
        (["train.py", "--token=x"], ["train.py", f"--token={MASK}"]),
        (["train.py", "WANDB_API_KEY=x"], ["train.py", f"WANDB_API_KEY={MASK}"]),
        (["train.py", "https://u:pw@host/p"], ["train.py", MASK]),
        (["train.py", "data/imagenet", "7"], ["train.py", MASK, MASK]),  # positional: never shown
        # a token in the value of a harmless flag, or in what is shown, is still masked
        (["train.py", "--model", "hf_abcdefghijklmnop"], ["train.py", "--model", MASK]),
        (["train.py", "--model=https://u:pw@hub/m"], ["train.py", f"--model=https://u:{MASK}@hub/m"]),
        # what is shown: the script, flag names, values of known-harmless flags
        (
            ["train.py", "--lr", "3e-4", "--batch-size=64", "-b", "256", "--epochs", "90", "--seed", "-1"],
            ["train.py", "--lr", "3e-4", "--batch-size=64", "-b", "256", "--epochs", "90", "--seed", "-1"],
        ),
        (["train.py", "--num_workers", "8", "--amp"], ["train.py", "--num_workers", "8", "--amp"]),
        (["train.py", "optimizer.lr=0.1", "db.password=x"], ["train.py", "optimizer.lr=0.1", f"db.password={MASK}"]),
        (["train.py", "--", "--lr", "1"], ["train.py", "--", MASK, MASK]),
        (
            ["train.py", "--max-tokens", "100", "--tokenizer", "gpt2"],
            ["train.py", "--max-tokens", MASK, "--tokenizer", MASK],
        ),
    ],
)
def test_redaction_allow_list(argv: list[str], expected: list[str]) -> None:
    assert redact_argv(argv) == expected


def test_flags_the_user_lists_show_their_values() -> None:
    argv = ["train.py", "--max-tokens", "100", "--max_new_tokens=20", "--hf-token", "x"]
    shown = redact_argv(argv, ["max-tokens", "--max-new-tokens"])
    assert shown == ["train.py", "--max-tokens", "100", "--max_new_tokens=20", "--hf-token", MASK]


# ---- secrets through a real daemon: the API and the recording (issue 18) ----------------------------
# The examples, each with a secret that must not leave the training process (the probes
# send at most 16 arguments; every spelling is in test_redaction_allow_list above).
SECRET_ARGV = [
    "train.py",
    "--db-pass",
    "S1-hunter2",
    "--wandb-key=S2-0123456789abcdef",
    "--private-key=S3-/home/a/.ssh/id",
    "--key",
    "S4-k",
    "--credentials=S5-creds.json",
    "-p",
    "S7",
    "glpat-S8abcdefghij0123456",
    "AKIAS9ABCDEFGHIJKLMN",
    "--lr",
    "0.1",
    "--max-tokens",
    "512",
]
SECRETS = ["S1-hunter2", "S2-0123", "S3-", "S4-k", "S5-", "S7", "S8", "S9"]


def _recorded_argv(daemon: Daemon, run_id: str) -> list[str]:
    path = recording_file(daemon.config.runs_dir, run_id)

    def read() -> list[str] | None:
        if not path.exists():
            return None
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            try:
                row = conn.execute("SELECT argv FROM sessions").fetchone()
            except sqlite3.OperationalError:
                return None
        return json.loads(row[0]) if row else None

    return wait_for(read, what="the session recorded")


def _shown_argv(daemon: Daemon, job: str) -> tuple[list[str], str]:
    host, port = daemon.http_address
    wait_for(lambda: get_json(f"http://{host}:{port}/api/v1/jobs/{job}"), what="the job in the API")
    everything = "".join(
        http_get(f"http://{host}:{port}{path}")[1].decode()
        for path in (f"/api/v1/jobs/{job}?steps=5", "/api/v1/jobs", "/api/v1/runs", "/api/v1/status", "/metrics")
    )
    return get_json(f"http://{host}:{port}/api/v1/jobs/{job}")["rank_detail"][0]["argv"], everything


def test_secrets_in_the_command_line_leave_neither_by_the_api_nor_in_the_recording(
    make_daemon: DaemonFactory,
) -> None:
    daemon = make_daemon()
    send(daemon.config.socket_path, hello(job="j", run_id="r", argv=SECRET_ARGV), step_batch(1, 3))
    shown, everything = _shown_argv(daemon, "j")
    assert not [s for s in SECRETS if s in everything]
    assert shown[:3] == ["train.py", "--db-pass", MASK]  # flag names stay readable
    assert shown[-4:] == ["--lr", "0.1", "--max-tokens", MASK]  # harmless values shown, others not
    assert _recorded_argv(daemon, "r") == shown  # the recording follows the same rule


def test_the_user_can_list_harmless_flags_and_opt_in_to_full_recordings(make_daemon: DaemonFactory) -> None:
    daemon = make_daemon(argv_safe_flags=("max-tokens",), record_full_argv=True)
    send(daemon.config.socket_path, hello(job="j", run_id="r", argv=SECRET_ARGV), step_batch(1, 3))
    shown, everything = _shown_argv(daemon, "j")
    assert shown[-4:] == ["--lr", "0.1", "--max-tokens", "512"]
    assert not [s for s in SECRETS if s in everything]  # the API never shows more
    assert _recorded_argv(daemon, "r") == SECRET_ARGV  # opted in: the user's own 0700 recording keeps it all


# ---- received data is data ------------------------------------------------------------------------
RECEIVING_CODE = ("probes/wire.py", "profilerd/samplers/ingest.py")
FORBIDDEN_IMPORTS = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle", "importlib", "runpy"}
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "import_module", "loads_pickle"}


@pytest.mark.parametrize("relative", RECEIVING_CODE)
def test_received_bytes_are_never_unpickled_evaluated_or_imported(relative: str) -> None:
    tree = ast.parse((REPO / relative).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names if n} & FORBIDDEN_IMPORTS, ast.unparse(node)
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            assert name not in FORBIDDEN_CALLS, ast.unparse(node)


def test_sizes_are_bounded_before_parsing(make_daemon: DaemonFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel cuts a datagram to MAX_DATAGRAM_BYTES before anything reads it: an oversized
    one is counted and never reaches the decoder."""
    seen: list[int] = []
    decode = wire.decode

    def measuring_decode(datagram: bytes) -> Any:
        seen.append(len(datagram))
        return decode(datagram)

    monkeypatch.setattr(wire, "decode", measuring_decode)
    daemon = make_daemon()
    big = wire.encode_json(wire.KIND_CONFIG, {"pid": os.getpid(), "x": "y" * (3 * wire.MAX_DATAGRAM_BYTES // 2)})
    send(daemon.config.socket_path, big, hello())
    wait_for(lambda: counts(daemon)[0].get("hello") == 1)
    assert counts(daemon)[1] == {"oversized": 1}
    assert max(seen) <= wire.MAX_DATAGRAM_BYTES


# ---- attach and deployment ------------------------------------------------------------------------
def test_attach_never_escalates_privileges_itself() -> None:
    """It explains what to grant instead (tests/test_attach.py::test_no_permission_names_the_fix)."""
    modules = sorted((REPO / "profilerd" / "attach").glob("*.py"))
    assert modules, "the attach package moved: point this test at it"
    escalating = {"sudo", "su", "pkexec", "doas", "setcap", "sysctl", "runuser"}
    nodes = (node for module in modules for node in ast.walk(ast.parse(module.read_text())))
    for node in nodes:
        if isinstance(node, ast.List | ast.Tuple) and node.elts:
            first = node.elts[0]
            assert not (isinstance(first, ast.Constant) and first.value in escalating), ast.unparse(node)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            assert node.func.attr not in {"setuid", "seteuid", "setresuid", "setgid", "setegid", "setresgid"}


UNIT = REPO / "dashboards" / "systemd" / "profilerd@.service"


def test_systemd_unit_has_limits_and_hardening() -> None:
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if "=" in line and not line.startswith("#")
    )
    for key in ("CPUQuota", "MemoryMax", "NoNewPrivileges", "ProtectSystem"):
        assert key in settings, key
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["User"] == "%i"  # never root


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_accepts_the_unit(short_tmp: Path) -> None:
    profilerd = shutil.which("profilerd") or shutil.which("python3")
    assert profilerd is not None
    instance = short_tmp / "profilerd@root.service"  # an instance of the template, for verify
    instance.write_text(UNIT.read_text().replace("/usr/local/bin/profilerd", profilerd))
    result = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, timeout=60)
    problems = [line for line in result.stderr.splitlines() if str(instance.name) in line or "Unknown" in line]
    assert result.returncode == 0 and problems == [], result.stderr
