"""The compatibility suite: a training program runs the same under `profilerd run` as without it.

Each program in tests/compat/ is a small training script built around one idiom that commonly
breaks instrumentation. It runs twice in subprocesses, plainly (`python prog.py`) and as
`profilerd run --no-status --json OUT -- python prog.py`, each in a fresh working directory, and
the test asserts what a user relies on:

- the same exit status (a death by signal N included: the shell sees 128+N either way);
- the same stdout, bit for bit: the programs print their final losses as ``float.hex``;
- the same stderr, apart from lines prefixed ``profilerd:`` and the verdict `profilerd run`
  prints after the training ended;
- the same saved files, which load (``weights_only=True`` for torch.save files) in an interpreter
  where profilerd cannot be imported, with the same contents;
- the step count each process wrote (``steps.<label>.txt``) is what the daemon recorded for it,
  and what the ``--json`` verdict document's ``steps`` says.

Runs share one `profilerd serve` daemon with private directories, and execute in parallel
threads: most of their time is interpreter start-up and `import torch`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from profilerd import recordings
from profilerd.analysis.rules import load_rules

pytestmark = pytest.mark.slow

COMPAT = Path(__file__).resolve().parent / "compat"
PROGRAM_TIMEOUT_S = 240.0
SAVED_SUFFIXES = (".pt", ".pth", ".pkl", ".ts", ".pt2")
# c10 log lines carry a level letter, the date and time (and a thread id): they differ run to run.
C10_LOG_STAMP = re.compile(r"\[([WIEF])\d{4} [\d:.]+ (\d+ )?")
# Kineto's trace-point lines carry the date, time, pid and thread id.
KINETO_STAMP = re.compile(r"^USDT:\d{4}-\d\d-\d\d [\d:]+ \d+:\d+ ")
REPORT_HEADER = "profilerd · run "


@dataclass(frozen=True)
class Case:
    """One program and how to run it; ``args`` follow `python`, with {port} a free TCP port."""

    name: str
    args: tuple[str, ...]
    interpreter_flags: tuple[str, ...] = ()
    stdin: str | None = None
    pythonpath: tuple[Path, ...] = ()
    send: signal.Signals | None = None  # sent each time the program writes its `ready-<n>` file
    rounds: int = 1  # how many times the signal is sent
    from_terminal: bool = False  # typed on its controlling terminal (Ctrl-C), else sent to the started process
    count_steps: bool = True
    same_saved_contents: bool = True
    setup: Callable[[Path], None] | None = None
    check: Callable[[Outcome, Outcome], None] | None = None


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path
    document: dict | None = None
    notes: list[str] = field(default_factory=list)


def _write_training_data(cwd: Path) -> None:
    import torch

    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=generator)
    (cwd / "data").mkdir()
    torch.save({"x": x, "y": x.sum(dim=1, keepdim=True) * 0.5}, cwd / "data" / "train.pt")


def _optimizer_share_agrees(plain: Outcome, profiled: Outcome) -> None:
    """LBFGS: the closure's forward and backward are not optimizer time; fractions sum to 1."""
    assert profiled.document is not None
    measured = float((profiled.cwd / "optimizer_share.txt").read_text())
    reported = profiled.document["phases"]["optimizer"]
    assert reported <= measured + 0.1, f"optimizer share {reported:.2f}, measured outside the closure {measured:.2f}"
    assert abs(sum(profiled.document["fractions"].values()) - 1) <= 0.01, profiled.document["fractions"]


def _program(name: str) -> str:
    return str(COMPAT / name)


CASES = [
    Case("save_whole_model", (_program("save_whole_model.py"),)),
    Case("deepcopy_best", (_program("deepcopy_best.py"),)),
    Case("pickle_model", (_program("pickle_model.py"),)),
    Case("jit_script", (_program("jit_script.py"),)),
    Case("jit_trace_after_step_5", (_program("jit_trace.py"),)),
    Case("export_strict", (_program("export_strict.py"),)),
    Case("no_hooks_assertion", (_program("no_hooks.py"),)),
    Case("compile_fullgraph", (_program("compile_fullgraph.py"),)),
    Case("warnings_as_errors", (_program("warnings_error.py"),), interpreter_flags=("-W", "error")),
    Case(
        "ctrl_c_in_a_terminal",
        (_program("keyboard_interrupt.py"),),
        send=signal.SIGINT,
        rounds=3,
        from_terminal=True,
        same_saved_contents=False,
    ),
    Case(
        "sigint_by_kill",
        (_program("keyboard_interrupt.py"),),
        send=signal.SIGINT,
        rounds=3,
        same_saved_contents=False,
    ),
    Case("ctrl_c_inside_optimizer_step", (_program("interrupted_optimizer_step.py"),)),
    Case("sigterm_handler", (_program("signal_handler.py"), "TERM"), send=signal.SIGTERM, same_saved_contents=False),
    Case("sighup_handler", (_program("signal_handler.py"), "HUP"), send=signal.SIGHUP, same_saved_contents=False),
    Case("sigusr1_handler", (_program("signal_handler.py"), "USR1"), send=signal.SIGUSR1, same_saved_contents=False),
    Case("death_by_signal", (_program("killed_by_signal.py"),), count_steps=False),
    Case("site_sitecustomize", (_program("site_sitecustomize.py"),), pythonpath=(COMPAT / "site_dir",)),
    Case("user_packages_probes_and_tui", (_program("shadow/train.py"),)),
    Case("sweep_frees_trials", (_program("sweep_weakref.py"),)),
    Case("lbfgs_closure", (_program("lbfgs_closure.py"),), check=_optimizer_share_agrees),
    Case("gan_two_optimizers", (_program("gan_two_optimizers.py"),)),
    Case("autograd_grad_loop", (_program("autograd_grad_loop.py"),)),
    Case("torch_func_loop", (_program("torch_func_loop.py"),)),
    Case("os_exit", (_program("os_exit.py"),)),
    Case("hogwild", (_program("hogwild.py"),)),  # two step files: both processes must be recorded
    Case("dataloader_fork_workers", (_program("dataloader_workers.py"), "fork")),
    Case("dataloader_spawn_workers", (_program("dataloader_workers.py"), "spawn")),
    Case("dataloader_persistent_workers", (_program("dataloader_workers.py"), "persistent")),
    Case("iterable_dataset", (_program("dataloader_workers.py"), "iterable")),
    Case("grad_scaler", (_program("grad_scaler.py"),)),
    Case("autocast_bf16", (_program("autocast_bf16.py"),)),
    Case("activation_checkpoint", (_program("activation_checkpoint.py"),)),
    Case("data_parallel", (_program("data_parallel.py"),)),
    Case("ddp_gloo_no_sync_unused", (_program("ddp_gloo.py"), "{port}")),
    Case("async_collectives", (_program("async_collectives.py"), "{port}")),
    Case("training_in_a_thread", (_program("thread_training.py"),)),
    Case("python_dash_m", ("-m", "pkgtrain", "--epochs", "1"), pythonpath=(COMPAT,)),
    Case(
        "env_stdin_and_cwd",
        (_program("env_stdin_cwd.py"), "--lr", "0.05"),
        stdin=json.dumps({"lr": 0.05, "epochs": 6}),
        setup=_write_training_data,
    ),
    Case("profiler_trace_ops", (_program("profiler_trace.py"),)),
    # Its failing attempts (a backward without a step, a step whose closure raises) leave a partial
    # step that a probe may or may not count: step counting is other programs' subject.
    Case("traceback_frames", (_program("traceback_frames.py"),), count_steps=False),
    Case("wrapped_signatures", (_program("signatures.py"),)),
]
CASES_BY_NAME = {case.name: case for case in CASES}

# Run in an interpreter that cannot import profilerd, as on a machine without it: isolated (-I),
# without site (-S: no .pth file installs the editable finder), torch's site-packages added back
# by hand, and a finder that refuses profilerd's import names (for a non-editable install there).
LOADER = r"""
import hashlib, importlib, importlib.abc, json, pickle, sys
BLOCKED = ("profilerd", "profilerd_probes", "profilerd_tui", "probes", "tui")


class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (profilerd is not installed here)")
        return None


sys.meta_path.insert(0, Refuse())
sys.path[:0] = json.loads(sys.argv[1])
sys.path.append(sys.argv[2])  # the programs' own modules, as a user's code is on another machine
for name in BLOCKED:
    try:
        importlib.import_module(name)
    except ImportError:
        continue
    print(json.dumps({"error": f"{name} is importable in the loader"}))
    sys.exit(3)
import torch


def resolve(qualified):
    parts = qualified.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"cannot import {qualified}")


def digest(obj):
    if isinstance(obj, torch.Tensor):
        data = obj.detach().cpu().reshape(-1).contiguous()
        raw = data.view(torch.uint8).numpy().tobytes()
        return f"{data.dtype}{tuple(data.shape)}:{hashlib.sha256(raw).hexdigest()[:16]}"
    if isinstance(obj, torch.nn.Module):
        return {"type": type(obj).__qualname__, "state": digest(obj.state_dict())}
    if isinstance(obj, dict):
        return {str(k): digest(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [digest(v) for v in obj]
    return repr(obj)


def load(path):
    if path.endswith(".pkl"):
        with open(path, "rb") as handle:
            return digest(pickle.load(handle))
    if path.endswith(".ts"):
        module = torch.jit.load(path)
        return {"code": module.code, "state": digest(module.state_dict())}
    if path.endswith(".pt2"):
        program = torch.export.load(path)
        return {"graph": str(program.graph), "state": digest(program.state_dict)}
    needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with torch.serialization.safe_globals([resolve(name) for name in needed]):
        return {"globals": sorted(needed), "value": digest(torch.load(path, weights_only=True))}


def load_all(paths):
    result = {}
    for path in paths:
        try:
            result[path.rsplit("/", 1)[-1]] = load(path)
        except Exception as exc:
            result[path.rsplit("/", 1)[-1]] = {"error": f"{type(exc).__name__}: {exc}"}
    return result


# Each run's files load in a process of its own, forked once torch is imported (the import is
# most of a loader's cost): loading one run's files cannot change how the other's load (e.g.
# TorchScript renames a class it has already compiled once).
import os
readers = {}
for label, paths in json.loads(sys.argv[3]).items():  # {run directory: its saved files}
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.chdir(label)  # the run's own directory
        with os.fdopen(write_end, "w") as out:
            out.write(json.dumps(load_all(paths)))
        os._exit(0)
    os.close(write_end)
    readers[label] = (pid, os.fdopen(read_end))
results = {}
for label, (pid, handle) in readers.items():
    text = handle.read()
    _, status = os.waitpid(pid, 0)
    results[label] = json.loads(text) if status == 0 else {"loader": {"error": f"wait status {status}"}}
print(json.dumps(results))
"""


def _site_dirs() -> list[str]:
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]


# Run as `python -c TAKE_TERMINAL CMD...` in a new session with the terminal on stdin: the
# terminal becomes the session's controlling terminal, then CMD replaces the interpreter.
TAKE_TERMINAL = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execvp(sys.argv[1], sys.argv[1:])"
)


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _profilerd_command() -> list[str]:
    script = Path(sys.executable).parent / "profilerd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "profilerd"]


def _end_session(process: subprocess.Popen[str]) -> None:
    """Nothing a run started may outlive it: the session leader's group is killed."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def run_program(case: Case, mode: str, workdir: Path, env: dict[str, str]) -> Outcome:
    cwd = workdir / mode
    cwd.mkdir(parents=True)
    if case.setup is not None:
        case.setup(cwd)
    args = [arg.replace("{port}", _free_port()) for arg in case.args]
    command = [sys.executable, *case.interpreter_flags, *args]
    verdict_path = workdir / f"{mode}-verdict.json"
    if mode == "profiled":
        command = [*_profilerd_command(), "run", "--no-status", "--json", str(verdict_path), "--", *command]
    run_env = dict(env)
    if case.pythonpath:
        run_env["PYTHONPATH"] = os.pathsep.join(str(p) for p in case.pythonpath)
    notes: list[str] = []
    output: dict[str, str] = {}
    stdin: int = subprocess.PIPE if case.stdin is not None else subprocess.DEVNULL
    terminal: int | None = None
    if case.from_terminal:
        # A pseudo-terminal that the started process takes as its controlling terminal: a
        # Ctrl-C typed there is the kernel's SIGINT to the foreground process group, as in a shell.
        terminal, stdin = pty.openpty()
        command = [sys.executable, "-c", TAKE_TERMINAL, *command]
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=run_env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell's foreground job
    )
    readers = [
        threading.Thread(target=lambda key=key, stream=stream: output.update({key: stream.read()}), daemon=True)
        for key, stream in (("stdout", process.stdout), ("stderr", process.stderr))
    ]
    try:
        for reader in readers:
            reader.start()
        if case.stdin is not None:
            assert process.stdin is not None
            process.stdin.write(case.stdin)
            process.stdin.close()
        if terminal is not None:
            os.close(stdin)
        if case.send is not None:
            args = (process, case, cwd, notes, terminal)
            threading.Thread(target=_signal_when_ready, args=args, daemon=True).start()
        try:
            process.wait(timeout=PROGRAM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            notes.append(f"killed after {PROGRAM_TIMEOUT_S:.0f} s")
    finally:
        # Whatever the started process leaves running when it ends (under `profilerd run`: a
        # training it did not wait for) is killed, and its missing output shows in the comparison.
        _end_session(process)
        process.wait()
        for reader in readers:
            reader.join(timeout=30)
        if terminal is not None:
            os.close(terminal)
    document = json.loads(verdict_path.read_text()) if verdict_path.exists() else None
    return Outcome(process.returncode, output.get("stdout", ""), output.get("stderr", ""), cwd, document, notes)


def _signal_when_ready(
    process: subprocess.Popen[str], case: Case, cwd: Path, notes: list[str], terminal: int | None
) -> None:
    assert case.send is not None
    deadline = time.monotonic() + PROGRAM_TIMEOUT_S
    for round_number in range(1, case.rounds + 1):
        while not (cwd / f"ready-{round_number}").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                notes.append(f"the program never became ready for signal {round_number}")
                return
            time.sleep(0.05)
        if terminal is not None:
            os.write(terminal, b"\x03")  # Ctrl-C
        else:
            process.send_signal(case.send)


class CompatRuns:
    """Starts every selected case's two runs at once in a thread pool; tests wait for theirs."""

    def __init__(self, names: list[str], root: Path, env: dict[str, str]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 2))
        self._futures: dict[tuple[str, str], Future[Outcome]] = {}
        for name in names:
            for mode in ("plain", "profiled"):
                workdir = root / name
                self._futures[name, mode] = self._pool.submit(run_program, CASES_BY_NAME[name], mode, workdir, env)

    def outcomes(self, name: str) -> tuple[Outcome, Outcome]:
        return self._futures[name, "plain"].result(), self._futures[name, "profiled"].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def compat_env() -> Iterator[dict[str, str]]:
    """Private runtime and data directories, and one daemon that every profiled run uses."""
    root = Path(tempfile.mkdtemp(prefix="pd-compat-", dir="/tmp"))
    runtime = root / "run"
    runtime.mkdir(mode=0o700)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PROFILERD_", "TORCHELASTIC_", "PYTHON")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env.update(
        XDG_RUNTIME_DIR=str(runtime),
        PROFILERD_DATA_DIR=str(root / "data"),
        PROFILERD_HTTP_PORT="0",
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    log = (root / "daemon.log").open("w")
    daemon = subprocess.Popen([*_profilerd_command(), "serve", "--gpu", "none"], env=env, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while "serving" not in (root / "daemon.log").read_text():
            assert daemon.poll() is None and time.monotonic() < deadline, (root / "daemon.log").read_text()
            time.sleep(0.1)
        yield env
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def compat_runs(request: pytest.FixtureRequest, compat_env: dict[str, str]) -> Iterator[CompatRuns]:
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.module is sys.modules[__name__] and hasattr(item, "callspec") and "case" in item.callspec.params
    ]
    root = Path(compat_env["PROFILERD_DATA_DIR"]).parent / "cases"
    pool = CompatRuns(list(dict.fromkeys(selected)), root, compat_env)
    try:
        yield pool
    finally:
        pool.close()


def program_stderr(stderr: str) -> list[str]:
    """The training's own stderr lines under `profilerd run`: not profilerd's prefixed lines, nor
    the verdict printed after the training ended."""
    lines = stderr.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(REPORT_HEADER):
            lines = lines[:index]
            break
    return _without_probe_frames([line for line in lines if not line.startswith("profilerd:")])


def _without_probe_frames(lines: list[str]) -> list[str]:
    """A traceback's frames of the probes' wrappers (the documented limit of docs/concepts.md:
    one Python frame per wrapped call), with their source and marker lines, left out."""
    kept: list[str] = []
    skipping = False
    for line in lines:
        if line.startswith("  File ") and f"{os.sep}profilerd_probes{os.sep}" in line:
            skipping = True
            continue
        if skipping and line.startswith("    "):
            continue  # the frame's source line and its ^^^ marker
        skipping = False
        kept.append(line)
    return kept


def _normalised(lines: list[str]) -> collections.Counter[str]:
    # Processes of one program (ranks, workers) interleave their lines: compare them as a multiset.
    return collections.Counter(KINETO_STAMP.sub("USDT: ", C10_LOG_STAMP.sub(r"[\1 ", line)) for line in lines)


def load_saved_files(*cwds: Path) -> list[dict[str, object]]:
    """What each run directory's saved files hold, as loaded where profilerd cannot be imported."""
    files = {
        str(cwd): sorted(str(p) for p in cwd.rglob("*") if p.suffix in SAVED_SUFFIXES and p.parent.name != "data")
        for cwd in cwds
    }
    if not any(files.values()):
        return [{} for _ in cwds]
    loader = subprocess.run(
        [sys.executable, "-I", "-S", "-c", LOADER, json.dumps(_site_dirs()), str(COMPAT), json.dumps(files)],
        capture_output=True,
        text=True,
        timeout=PROGRAM_TIMEOUT_S,
        cwd=cwds[0].parent,
    )
    assert loader.returncode == 0, f"loader failed: {loader.stdout}{loader.stderr}"
    loaded = json.loads(loader.stdout)
    return [loaded[str(cwd)] for cwd in cwds]


def expected_steps(cwd: Path) -> list[int]:
    return sorted(int(path.read_text()) for path in cwd.glob("steps.*.txt"))


@pytest.mark.parametrize("case", list(CASES_BY_NAME))
def test_program_runs_unchanged_under_profilerd(case: str, compat_runs: CompatRuns) -> None:
    spec = CASES_BY_NAME[case]
    plain, profiled = compat_runs.outcomes(case)
    assert not plain.notes, f"the plain run itself failed: {plain.notes}\n{plain.stderr}"
    assert plain.returncode == profiled.returncode, (
        f"exit status {plain.returncode} plainly, {profiled.returncode} under profilerd; {profiled.notes}\n"
        f"{profiled.stderr[-3000:]}"
    )
    assert profiled.stdout == plain.stdout
    assert _normalised(program_stderr(profiled.stderr)) == _normalised(plain.stderr.splitlines())

    plain_files, profiled_files = load_saved_files(plain.cwd, profiled.cwd)
    assert sorted(profiled_files) == sorted(plain_files), "saved files differ"
    for name, contents in plain_files.items():
        assert not (isinstance(contents, dict) and "error" in contents), f"plain {name}: {contents['error']}"
    for name, contents in profiled_files.items():
        assert not (isinstance(contents, dict) and "error" in contents), f"{name}: {contents['error']}"
        if spec.same_saved_contents:
            assert contents == plain_files[name], f"{name} has other contents under profilerd"

    if spec.count_steps:
        steps = expected_steps(plain.cwd)
        assert steps, "the program wrote no step count"
        profiled_steps = expected_steps(profiled.cwd)
        assert profiled.document is not None, "profilerd run wrote no --json verdict"
        recorded = (
            sorted(recordings.load(Path(profiled.document["recording"])).steps.groupby("pid").size().tolist())
            if profiled.document.get("recording")
            else []
        )
        # Each signal can land inside a step (after its optimizer update, before the program
        # counts it; or between backward and update): one partial step per signal may be recorded.
        partial = spec.rounds if spec.send is not None else 0
        assert len(recorded) == len(profiled_steps) and all(
            n <= r <= n + partial for n, r in zip(profiled_steps, recorded, strict=True)
        ), f"steps per process: {profiled_steps} taken, {recorded} recorded"
        warmup = load_rules()[0].warmup_steps
        assert profiled.document["steps"] == sum(max(0, r - warmup) for r in recorded)
    if spec.check is not None:
        spec.check(plain, profiled)
