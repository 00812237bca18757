"""Helpers for the probe tests: a datagram receiver standing in for the daemon, and a runner
for short training scripts in a fresh interpreter (so no hook ever leaks into pytest)."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import profilerd_probes as probes
from profilerd_probes import wire

PROBES_DIR = Path(probes.__file__).resolve().parent
SITECUSTOMIZE = PROBES_DIR / "bootstrap" / "sitecustomize.py"

# Environment variables that would change what the probes send; scrubbed from every child.
_SCRUBBED_ENV = (
    "PROFILERD_SOCKET",
    "PROFILERD_DISABLE",
    "PROFILERD_RUN_ID",
    "PROFILERD_JOB_ID",
    "TORCHELASTIC_RUN_ID",
    "SLURM_JOB_ID",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "PYTHONPATH",
    "PYTHONWARNINGS",
)


def short_socket_dir() -> Path:
    """AF_UNIX paths are limited to 107 bytes; pytest's tmp_path can be longer than that."""
    return Path(tempfile.mkdtemp(prefix="pd-", dir="/tmp"))


class Received:
    """One datagram as the daemon would see it, with its arrival time and decoded message."""

    __slots__ = ("arrived", "message", "raw")

    def __init__(self, raw: bytes, arrived: float, message: wire.StepMessage | wire.JsonMessage) -> None:
        self.raw = raw
        self.arrived = arrived
        self.message = message

    @property
    def kind(self) -> str:
        return "step" if isinstance(self.message, wire.StepMessage) else self.message.kind

    @property
    def pid(self) -> int:
        message = self.message
        return message.pid if isinstance(message, wire.StepMessage) else message.body["pid"]


class Receiver:
    """A datagram socket bound where the probes send, drained by a thread (the kernel queues
    only a few datagrams per AF_UNIX socket, so an idle receiver would make the probes drop).

    Every datagram must decode with probes.wire; one that does not is kept in ``errors``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self.errors: list[tuple[bytes, Exception]] = []
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.bind()

    # ---- lifecycle -------------------------------------------------------------------------
    def bind(self) -> None:
        """Bind (again) at the same path, as a restarted daemon does."""
        assert self._sock is None, "already bound"
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self.path))
        sock.settimeout(0.02)
        self._sock = sock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, args=(sock, self._stop), daemon=True)
        self._thread.start()

    def close(self, unlink: bool = True) -> None:
        """Stop receiving; what is still queued in the kernel is read first."""
        sock, thread = self._sock, self._thread
        if sock is None or thread is None:
            return
        self._stop.set()
        thread.join(5)
        sock.setblocking(False)
        while True:
            try:
                self._keep(sock.recv(wire.MAX_DATAGRAM_BYTES + 1))
            except (BlockingIOError, InterruptedError):
                break
        sock.close()
        self._sock = None
        self._thread = None
        if unlink:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self, sock: socket.socket, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                datagram = sock.recv(wire.MAX_DATAGRAM_BYTES + 1)
            except TimeoutError:
                continue
            except OSError:
                return
            self._keep(datagram)

    def _keep(self, datagram: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            try:
                decoded = wire.decode(datagram)
            except wire.WireError as exc:
                self.errors.append((datagram, exc))
                return
            # A batch is several steps: keep one entry per step, as the daemon counts them.
            messages = decoded.steps if isinstance(decoded, wire.StepBatch) else (decoded,)
            self._received.extend(Received(datagram, now, message) for message in messages)

    # ---- queries -------------------------------------------------------------------------
    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    def messages(self, kind: str | None = None, pid: int | None = None) -> list[wire.StepMessage | wire.JsonMessage]:
        return [r.message for r in self.received if (kind is None or r.kind == kind) and (pid is None or r.pid == pid)]

    def steps(self, pid: int | None = None) -> list[wire.StepMessage]:
        return [m for m in self.messages("step", pid) if isinstance(m, wire.StepMessage)]

    def bodies(self, kind: str, pid: int | None = None) -> list[dict]:
        return [m.body for m in self.messages(kind, pid) if isinstance(m, wire.JsonMessage)]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.received):
                return True
            time.sleep(0.01)
        return predicate(self.received)


def child_env(socket_path: Path | None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED_ENV}
    env["OMP_NUM_THREADS"] = "1"  # 2 cores: keep the child from fighting the receiver thread
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if socket_path is not None:
        env["PROFILERD_SOCKET"] = str(socket_path)
    if extra:
        env.update(extra)
    return env


def write_script(directory: Path, source: str, name: str = "train.py") -> Path:
    path = Path(directory) / name
    path.write_text(textwrap.dedent(source))
    return path


def run_python(
    args: Iterable[str],
    socket_path: Path | None,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    check: bool = True,
    python_flags: Iterable[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` in a fresh interpreter; fails the test with its output if it fails."""
    cmd = [sys.executable, *python_flags, *args]
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env=child_env(socket_path, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd} exited with {result.returncode}\n--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
        )
    return result


def make_bootstrap_dir(parent: Path) -> Path:
    """A PYTHONPATH entry as `profilerd run` builds it: our sitecustomize plus a probes symlink."""
    directory = Path(parent) / "boot"
    directory.mkdir()
    shutil.copy(SITECUSTOMIZE, directory / "sitecustomize.py")
    (directory / "profilerd_probes").symlink_to(PROBES_DIR, target_is_directory=True)
    return directory


def parse_kv(stdout: str) -> dict[str, str]:
    """Lines ``RESULT key=value`` printed by the training scripts."""
    out: dict[str, str] = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            key, _, value = line[len("RESULT ") :].partition("=")
            out[key] = value
    return out


# ---- a zygote: torch imported once, one fork per scenario -----------------------------------------
# `import torch` plus the first optimizer (which imports torch._dynamo) take 2-4 s of CPU on a small
# machine, and so does tearing that interpreter down. The zygote pays both once: it imports torch,
# warms the optimizer path, and forks a child per scenario. The child is a process of its own
# (its own pid, environment, argv, stdout/stderr, working directory); it imports probes afresh,
# runs the script as __main__, then exits as an interpreter does as far as the probes can tell:
# non-daemon threads are joined and atexit handlers run, and only the module teardown is skipped.
# Tests of interpreter start-up itself (sitecustomize, python -m) use real interpreters.
_ZYGOTE = r"""
import json, os, sys
import torch
import torch.utils.data
torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)  # imports torch._dynamo
assert "profilerd_probes" not in sys.modules
requests = os.fdopen(0, "r")
replies = os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
replies.write("ready\n")
replies.flush()


def child(req):
    import atexit, runpy, threading, traceback, warnings
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    out = os.open(req["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(err, 2)
    for fd in (devnull, out, err, requests.fileno(), replies.fileno()):
        os.close(fd)
    sys.argv = [req["script"], *req["args"]]
    sys.path[0] = os.path.dirname(req["script"])
    for action in req["warnings"]:
        warnings.simplefilter(action)
    code = 0
    try:
        runpy.run_path(req["script"], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
        code = code or 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


for line in requests:
    req = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        child(req)
    replies.write(json.dumps({"pid": pid}) + "\n")
    replies.flush()
    _, status = os.waitpid(pid, 0)
    replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}) + "\n")
    replies.flush()
os._exit(0)  # nothing to tear down that matters
"""


class ScenarioResult:
    def __init__(self, pid: int, returncode: int, stdout: str, stderr: str) -> None:
        self.pid = pid
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


class Running:
    """A scenario started in the zygote; ``wait`` returns its ScenarioResult."""

    def __init__(self, zygote: Zygote, pid: int, out: Path, err: Path, timeout: float) -> None:
        self._zygote = zygote
        self.pid = pid
        self._out = out
        self._err = err
        self._deadline = time.monotonic() + timeout

    def wait(self, check: bool = True) -> ScenarioResult:
        reply = self._zygote._read_reply(self._deadline, kill=self.pid)
        result = ScenarioResult(self.pid, reply["rc"], self._out.read_text(), self._err.read_text())
        self._zygote._busy = False
        if check and result.returncode != 0:
            raise AssertionError(
                f"scenario exited with {result.returncode}\n--- stdout ---\n{result.stdout}\n"
                f"--- stderr ---\n{result.stderr}"
            )
        return result


class Zygote:
    """Forks training scenarios from one interpreter that has already imported torch."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(None),
            text=True,
        )
        self._busy = False
        line = self._readline(time.monotonic() + 120)
        if line != "ready":
            raise RuntimeError(f"zygote failed to start: {line!r}")

    def _readline(self, deadline: float) -> str:
        stdout = self._proc.stdout
        assert stdout is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([stdout], [], [], remaining)[0]:
            raise TimeoutError("the zygote did not answer in time")
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote exited with {self._proc.wait()}")
        return line.strip()

    def _read_reply(self, deadline: float, kill: int | None = None) -> dict:
        try:
            return json.loads(self._readline(deadline))
        except TimeoutError:
            if kill is not None:
                os.kill(kill, 9)
                return json.loads(self._readline(time.monotonic() + 10))
            raise

    def start(
        self,
        script: Path,
        socket_path: Path | None,
        *,
        env: Mapping[str, str] | None = None,
        args: Iterable[str] = (),
        warnings: Iterable[str] = (),
        timeout: float = 30.0,
    ) -> Running:
        assert not self._busy, "one scenario at a time"
        script = Path(script)
        out, err = script.with_suffix(".stdout"), script.with_suffix(".stderr")
        request = {
            "script": str(script),
            "args": list(args),
            "cwd": str(script.parent),
            "env": child_env(socket_path, env),
            "stdout": str(out),
            "stderr": str(err),
            "warnings": list(warnings),
        }
        stdin = self._proc.stdin
        assert stdin is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        self._busy = True
        pid = self._read_reply(time.monotonic() + 10)["pid"]
        return Running(self, pid, out, err, timeout)

    def run(self, script: Path, socket_path: Path | None, *, check: bool = True, **kwargs) -> ScenarioResult:
        return self.start(script, socket_path, **kwargs).wait(check=check)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
