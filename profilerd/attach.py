"""`profilerd attach PID`: diagnose a training process that is already running.

Three layers, from least to most privileged; the best one available is used and named:

- L0 (no privileges): psutil on the target, its threads and its DataLoader workers, plus the
  host. Enough to tell input-bound from CPU-bound from host-bound.
- L1 (ptrace): py-spy samples the target's Python stacks without pausing it (``--nonblocking``);
  the share of training-thread samples in DataLoader ``__next__``, forward, backward, the
  optimizer and collectives gives the step-phase fractions without probes.
- L2 (inject): the probes themselves, installed in the live interpreter (``sys.remote_exec`` on
  Python >= 3.14; on older Pythons an experimental gdb injection that is off by default), and
  removed again on detach.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

from profilerd.analysis.context import HOST_COLUMNS, PROCESS_COLUMNS
from profilerd.analysis.diagnosis import Observation, SampledPhases, diagnose
from profilerd.analysis.rules import RuleSet
from profilerd.analysis.verdict import Verdict
from profilerd.config import ATTACH_RATE_HZ
from profilerd.model import Finding
from profilerd.samplers.host import DATALOADER_WORKER_NAME
from profilerd_probes.paths import TRUSTED_UIDS_ENV

PTRACE_HELP = (
    "stack sampling needs ptrace rights over the target: run as the same user with "
    "kernel.yama.ptrace_scope=0 (sudo sysctl kernel.yama.ptrace_scope=0), or grant CAP_SYS_PTRACE "
    "(e.g. docker run --cap-add SYS_PTRACE); profilerd never escalates by itself"
)


class AttachError(Exception):
    """Attaching is impossible; the message says why and what to do (exit code 2)."""


@dataclass(frozen=True)
class Target:
    pid: int
    cmdline: tuple[str, ...]
    python_version: str | None
    has_torch: bool


def inspect_target(pid: int) -> Target:
    """Check the pid is a live Python process with torch loaded, or raise AttachError."""
    try:
        proc = psutil.Process(pid)
        cmdline = tuple(proc.cmdline())
        exe = proc.exe()
    except psutil.NoSuchProcess:
        raise AttachError(f"no process with pid {pid}") from None
    except psutil.ZombieProcess:
        raise AttachError(f"process {pid} has already exited (zombie)") from None
    except psutil.AccessDenied:
        raise AttachError(f"no permission to inspect process {pid}: attach as its user, or as root") from None
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except PermissionError:
        raise AttachError(f"no permission to read /proc/{pid}/maps: attach as the process's user") from None
    except OSError as exc:
        raise AttachError(f"process {pid} is gone or unreadable: {exc.strerror}") from None
    version = _python_version(exe, maps)
    if version is None:
        name = Path(exe).name if exe else (cmdline[0] if cmdline else "?")
        raise AttachError(f"process {pid} ({name}) is not a Python process")
    has_torch = "libtorch" in maps or "/torch/_C" in maps
    if not has_torch:
        raise AttachError(f"process {pid} is Python {version} but has not imported torch: nothing to diagnose")
    return Target(pid, cmdline, version, has_torch)


def _python_version(exe: str, maps: str) -> str | None:
    match = re.search(r"libpython(\d+\.\d+)", maps) or re.search(r"python(\d+\.\d+)", Path(exe).name)
    if match:
        return match.group(1)
    if re.fullmatch(r"python\d*", Path(exe).name):
        return "3"
    return None


# ---- L0: psutil ------------------------------------------------------------------------------
@dataclass
class L0Summary:
    seconds: float = 0.0
    samples: int = 0
    main_thread_cores: float = 0.0  # the training (main) thread, 1.0 = one full core
    other_threads_cores: float = 0.0  # intra-op threads and the rest
    workers: int = 0
    workers_cores: float = 0.0
    worker_max_ratio: float | None = None
    host_busy_cores: float = 0.0
    cpu_count: int = 1
    iowait_ratio: float | None = None
    exited: bool = False

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class L0Sampler:
    """CPU of the target's threads and DataLoader workers, and the host, over an interval."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.proc = psutil.Process(pid)
        self._threads = self._thread_times()
        self._workers: dict[int, psutil.Process] = {}
        self._worker_ratios: list[float] = []
        self._last_ratios: list[float] = []
        self._start = time.monotonic()
        self._main = self._other = self._workers_total = self._host = 0.0
        self._ticks = 0
        self.summary = L0Summary(cpu_count=psutil.cpu_count() or 1)
        psutil.cpu_percent(None)
        self._discover_workers()

    def worker_pids(self) -> list[int]:
        return list(self._workers)

    def worker_ratios(self) -> list[float]:
        """The workers' CPU over the last tick, 1.0 = one full core, in worker_pids() order."""
        return list(self._last_ratios)

    def _thread_times(self) -> dict[int, float]:
        return {t.id: t.user_time + t.system_time for t in self.proc.threads()}

    def _discover_workers(self) -> None:
        for child in self.proc.children():
            with contextlib.suppress(psutil.Error):
                if child.pid not in self._workers and child.name() == DATALOADER_WORKER_NAME:
                    child.cpu_percent(None)
                    self._workers[child.pid] = child

    def tick(self, interval: float) -> bool:
        """Sample once after ``interval`` seconds; False once the target has exited."""
        try:
            before = self._threads
            time.sleep(interval)
            if self.proc.status() == psutil.STATUS_ZOMBIE:
                raise psutil.ZombieProcess(self.pid)
            now = self._thread_times()
            self._discover_workers()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            self.summary.exited = True
            return False
        main = (now.get(self.pid, 0.0) - before.get(self.pid, 0.0)) / interval
        other = sum(v - before.get(tid, v) for tid, v in now.items() if tid != self.pid) / interval
        ratios = []
        for pid, worker in list(self._workers.items()):
            try:
                ratios.append(worker.cpu_percent(None) / 100.0)
            except psutil.Error:
                del self._workers[pid]
        self._threads = now
        self._last_ratios = ratios
        self._ticks += 1
        self._main += main
        self._other += other
        self._workers_total += sum(ratios)
        self._worker_ratios.extend(ratios)
        self._host += psutil.cpu_percent(None) / 100.0 * (psutil.cpu_count() or 1)
        s = self.summary
        s.samples = self._ticks
        s.seconds = time.monotonic() - self._start
        s.main_thread_cores = self._main / self._ticks
        s.other_threads_cores = self._other / self._ticks
        s.workers = len(self._workers)
        s.workers_cores = self._workers_total / self._ticks
        s.worker_max_ratio = float(np.percentile(self._worker_ratios, 90)) if self._worker_ratios else None
        s.host_busy_cores = self._host / self._ticks
        times = psutil.cpu_times_percent(None)
        s.iowait_ratio = getattr(times, "iowait", None)
        return True


L0_RULE = "attach.thread_cpu"  # the estimate's finding: not a rule of the rules file
L0_CONFIDENCE = 0.5  # thread CPU alone cannot see phases: at best a medium-low confidence


def classify_l0(s: L0Summary) -> tuple[Finding, dict[str, float]]:
    """A finding and rough fractions from thread CPU alone, for the one decision to weigh.

    The training thread's own CPU share says how much of the time it computes or runs Python;
    the rest it is blocked (waiting for input, the device or other ranks). Busy workers with
    an idle loop mean the input pipeline is the limit.
    """
    busy = min(1.0, s.main_thread_cores)
    workers_busy = s.worker_max_ratio is not None and s.worker_max_ratio >= 0.8
    compute_cores = s.main_thread_cores + s.other_threads_cores
    if workers_busy and busy < 0.6:
        evidence = (
            f"{s.workers} DataLoader workers run at {s.worker_max_ratio:.0%} of a core while the training "
            f"thread is busy only {busy:.0%} of the time"
        )
        category, severity, rough = "data", "warning", {"data_wait": 1 - busy, "compute": busy}
    elif busy < 0.5:
        what = "input" if s.workers or compute_cores < 0.5 else "the device or other ranks"
        evidence = (
            f"the training thread is busy only {busy:.0%} of the time and the process uses "
            f"{compute_cores:.1f} cores: it mostly waits ({what})"
        )
        category, severity, rough = "data", "warning", {"data_wait": 1 - busy, "compute": busy}
    elif s.other_threads_cores < 0.2 and busy >= 0.9:
        evidence = f"the training thread runs at {busy:.0%} of a core while the math threads idle: host-bound"
        category, severity, rough = "algorithm", "warning", {"other": busy, "compute": 1 - busy}
    else:
        evidence = f"the process keeps {compute_cores:.1f} of {s.cpu_count} cores busy computing"
        category, severity, rough = "compute", "info", {"compute": busy, "data_wait": 1 - busy}
    metrics = {"main_thread_busy_ratio": busy, "process_cpu_cores": compute_cores}
    finding = Finding(L0_RULE, category, severity, evidence, L0_CONFIDENCE, metrics, {}, cost=max(rough.values()))
    return finding, rough


# ---- L1: py-spy ---------------------------------------------------------------------------------
PHASE_PATTERNS = (
    ("communication", re.compile(r"\(torch/distributed/|Work\.wait|distributed_c10d")),
    ("data_wait", re.compile(r"_BaseDataLoaderIter\.__next__ \(torch/utils/data/")),
    ("backward", re.compile(r"\(torch/autograd/__init__\.py|_engine_run_backward|Tensor\.backward \(torch/")),
    ("optimizer", re.compile(r"\(torch/optim/")),
    ("forward", re.compile(r"Module\._call_impl \(torch/nn/modules/module\.py")),
)


def py_spy_path() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    candidate = Path(sys.executable).with_name("py-spy")
    return str(candidate) if candidate.exists() else None


IMPORTING = re.compile(r"_find_and_load \(<frozen importlib")


def phase_of(stack: str) -> str:
    """The step phase of one stack (root first; communication wins wherever it appears).

    A stack that is importing a module is "other" whatever imports it: ``import
    torch.distributed`` during start-up is not communication."""
    if IMPORTING.search(stack):
        return "other"
    if PHASE_PATTERNS[0][1].search(stack):
        return "communication"
    frames = stack.split(";")
    for frame in frames:
        for phase, pattern in PHASE_PATTERNS[1:]:
            if pattern.search(frame):
                return phase
    return "other"


def parse_raw(text: str) -> dict[str, Counter[str]]:
    """py-spy's raw (collapsed) output → per-thread counts of samples per phase."""
    threads: dict[str, Counter[str]] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        head, _, frames = stack.partition(";")
        name = head.split(": ", 1)[-1] if ": " in head else head
        threads.setdefault(name, Counter())[phase_of(frames)] += int(count)
    return threads


def training_thread(threads: dict[str, Counter[str]]) -> Counter[str]:
    """The thread that does the training: most samples in training phases, MainThread on ties."""
    if not threads:
        return Counter()

    def score(item: tuple[str, Counter[str]]) -> tuple[int, bool]:
        name, counts = item
        return (sum(v for k, v in counts.items() if k != "other"), name == "MainThread")

    return max(threads.items(), key=score)[1]


class PySpySampler:
    """Runs `py-spy record` in the background for the attach duration."""

    def __init__(self, pid: int, rate_hz: int, duration_s: float) -> None:
        exe = py_spy_path()
        if exe is None:
            raise AttachError("py-spy is not installed (pip install py-spy)")
        self.output = Path(tempfile.mkstemp(prefix="profilerd-pyspy-", suffix=".txt")[1])
        self.process = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--nonblocking",
                "--idle",
                "--threads",
                "--rate",
                str(rate_hz),
                "--duration",
                str(max(1, round(duration_s))),
                "--format",
                "raw",
                "-o",
                str(self.output),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(2)  # SIGINT: py-spy writes what it has and exits

    def result(self, timeout: float) -> tuple[Counter[str] | None, str | None]:
        """Phase counts of the training thread, or (None, why) when sampling was refused."""
        try:
            _, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        try:
            text = self.output.read_text()
        finally:
            self.output.unlink(missing_ok=True)
        if not text.strip():
            reason = (stderr or "").strip().splitlines()
            message = reason[-1] if reason else "py-spy produced no samples"
            if "ermission" in (stderr or "") or "ptrace" in (stderr or "").lower():
                message = f"{message}; {PTRACE_HELP}"
            return None, message
        return training_thread(parse_raw(text)), None


# ---- putting it together -----------------------------------------------------------------------
@dataclass
class AttachResult:
    target: Target
    layer: str
    l0: L0Summary
    l1_counts: Counter[str] | None = None
    l1_note: str | None = None
    l2_note: str | None = None
    verdict: Verdict | None = None
    l0_estimate: Finding | None = None
    notes: list[str] = field(default_factory=list)


def attach_ruleset(ruleset: RuleSet, duration_s: float) -> RuleSet:
    """Evidence for attach is counted in stack samples over the attach window."""
    return replace(ruleset, min_steps=20, min_seconds=min(ruleset.min_seconds, max(1.0, duration_s * 0.5)))


def probed_verdict(recording: Path, ruleset: RuleSet, seconds: float) -> Verdict:
    """The verdict of an attach whose injected probes (L2) recorded steps: the recording's, as
    `report` gives it, over attach-sized evidence (``attach_ruleset``)."""
    from profilerd import recordings as runs

    return runs.analyse(runs.load(recording), attach_ruleset(ruleset, seconds))


def run_attach(
    pid: int,
    duration_s: float,
    ruleset: RuleSet,
    *,
    use_l1: bool = True,
    rate_hz: int = ATTACH_RATE_HZ,
    on_tick: Callable[[L0Summary], None] | None = None,
) -> AttachResult:
    """Observe the target for ``duration_s`` (or until it exits) with L0 and, if allowed, L1."""
    target = inspect_target(pid)
    try:
        l0 = L0Sampler(pid)
    except psutil.NoSuchProcess:
        raise AttachError(f"process {pid} exited before profilerd could attach") from None
    spy = None
    note = None
    if use_l1:
        try:
            spy = PySpySampler(pid, rate_hz, duration_s)
        except AttachError as exc:
            note = str(exc)
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        if not l0.tick(min(0.5, max(0.05, deadline - time.monotonic()))):
            break
        if on_tick is not None:
            on_tick(l0.summary)
    if spy is not None:
        spy.stop()
    counts, spy_note = spy.result(timeout=10) if spy is not None else (None, None)
    return conclude(target, l0.summary, counts, note or spy_note, ruleset, duration_s)


def conclude(
    target: Target,
    summary: L0Summary,
    counts: Counter[str] | None,
    note: str | None,
    ruleset: RuleSet,
    duration_s: float,
) -> AttachResult:
    """The best verdict the gathered layers support: L1 stack samples when there are enough,
    else the L0 estimate from thread CPU; either way through the one ``diagnose``."""
    result = AttachResult(target, "L0", summary, counts, note)
    if summary.exited:
        result.notes.append(f"the target exited after {summary.seconds:.1f} s; the verdict uses what was gathered")
    estimate, rough = classify_l0(summary) if summary.samples else (None, None)
    result.l0_estimate = estimate
    if counts and sum(counts.values()) >= 5:
        result.layer = "L1"
        sampled = SampledPhases(summary.seconds, sum(counts.values()), phases=counts)
    elif estimate is not None:
        sampled = SampledPhases(summary.seconds, fractions=rough, estimate=estimate)
    else:
        sampled = SampledPhases(summary.seconds)
    observation = replace(observed(summary), sampled=sampled)
    result.verdict = diagnose(observation, attach_ruleset(ruleset, min(duration_s, summary.seconds)))
    return result


def observed(summary: L0Summary) -> Observation:
    """What L0 saw, as the samples the analysis reads: one host and one process sample holding the
    means over the attach, and the DataLoader workers it found as the configuration."""
    at = time.time()
    hosts = pd.DataFrame(
        [(at, summary.cpu_count, summary.host_busy_cores / max(1, summary.cpu_count))], columns=HOST_COLUMNS
    )
    process = (
        at,
        0,
        0,
        1,
        summary.main_thread_cores + summary.other_threads_cores,
        summary.workers,
        summary.workers_cores,
        summary.worker_max_ratio,
    )
    processes = pd.DataFrame([process], columns=PROCESS_COLUMNS)
    return Observation(config={"dataloader": {"num_workers": summary.workers}}, hosts=hosts, processes=processes)


def document(result: AttachResult, run_id: str) -> dict[str, Any]:
    """The verdict contract of `profilerd run`, plus attach_layer and what each layer saw."""
    layers: dict[str, Any] = {"L0": {"available": True, "saw": result.l0.to_json()}}
    layers["L1"] = (
        {"available": True, "samples": dict(result.l1_counts)}
        if result.l1_counts
        else {"available": False, "why": result.l1_note or "not requested"}
    )
    layers["L2"] = {"available": False, "why": result.l2_note or "injection not requested (see --inject)"}
    verdict = result.verdict
    assert verdict is not None, "conclude() always decides"
    doc = verdict.to_json(run_id, f"pid-{result.target.pid}")
    notes = list(result.notes)
    if result.layer == "L1":
        # The evidence counted stack samples, not steps: no step boundaries are visible without the
        # probes, so step count, rate and time stay empty rather than mix samples with steps.
        samples = doc["steps"]
        doc.update(steps=0, steps_per_s=0.0, step_time_s={"p50": 0.0, "p95": 0.0, "mean": 0.0}, stack_samples=samples)
        notes.append(
            f"{samples} stack samples of the training thread over {result.l0.seconds:.1f} s; steps, step rate and "
            "step time need the probes (`--inject`, or train under `profilerd run`)"
        )
    return with_attach_fields(doc, result, layers, notes)


def with_attach_fields(
    doc: dict[str, Any], result: AttachResult, layers: dict[str, Any], notes: list[str]
) -> dict[str, Any]:
    """The fields an attach adds to the verdict document: which layer decided, what each saw."""
    doc["attach_layer"] = result.layer
    doc["layers"] = layers
    doc["target"] = {"pid": result.target.pid, "python": result.target.python_version}
    if result.l0_estimate is not None:
        doc["l0_estimate"] = {"primary": result.l0_estimate.category, "evidence": result.l0_estimate.evidence}
    doc["notes"] = notes
    return doc


def save_recording(doc: dict[str, Any], target: Target, runs_dir: Path, started_unix_s: float) -> Path:
    """Keep an attach verdict (L0/L1: no steps) as a recording under its run id, so that
    `profilerd report ID` and `profilerd runs` find it; the verdict is stored in the meta table."""
    import json

    from profilerd import __version__
    from profilerd.recordings.writer import open_recording, recording_file

    runs_dir.mkdir(parents=True, exist_ok=True)
    path = recording_file(runs_dir, doc["run_id"])
    ended = time.time()
    meta = {
        "schema_version": "1",
        "run_id": doc["run_id"],
        "job": doc["job"],
        "profilerd_version": __version__,
        "state": "closed",
        "started_unix_s": repr(started_unix_s),
        "ended_unix_s": repr(ended),
        "attach_layer": doc["attach_layer"],
        "attach_verdict": json.dumps({**doc, "recording": str(path)}),
    }
    conn = open_recording(path)
    try:
        with conn:
            conn.execute("BEGIN")
            conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", sorted(meta.items()))
            conn.execute(
                "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?)",
                (target.pid, 0, 0, 1, os.uname().nodename, json.dumps(list(target.cmdline)), started_unix_s, None),
            )
            conn.execute(
                "INSERT INTO verdicts VALUES (?,?,?,?,?)",
                (ended, doc["job"], doc["primary"], doc["severity"], json.dumps(doc)),
            )
    finally:
        conn.close()
    return path


# ---- L2: injection ------------------------------------------------------------------------------
def injection_code(boot_dir: Path, socket_path: Path, run_id: str, install: bool) -> str:
    if not install:
        return "import profilerd_probes as probes; probes.uninstall()"
    return (
        "import os, sys\n"
        f"sys.path.insert(0, {str(boot_dir)!r})\n"
        f"os.environ['PROFILERD_SOCKET'] = {str(socket_path)!r}\n"
        # The target may run as another user: its probes are to trust the attaching user's socket.
        f"os.environ[{TRUSTED_UIDS_ENV!r}] = ','.join(filter(None, (os.environ.get({TRUSTED_UIDS_ENV!r}), "
        f"{str(os.getuid())!r})))\n"
        f"os.environ.setdefault('PROFILERD_RUN_ID', {run_id!r})\n"
        f"os.environ.setdefault('PROFILERD_JOB_ID', {run_id!r})\n"
        "import profilerd_probes as probes; probes.install()\n"
    )


def inject(pid: int, code: str, python_version: str | None, experimental: bool, timeout_s: float = 30.0) -> None:
    """Run ``code`` inside the target's interpreter, or raise AttachError saying why not."""
    if python_version and tuple(int(p) for p in python_version.split(".")[:2]) >= (3, 14):
        script = Path(tempfile.mkstemp(prefix="profilerd-inject-", suffix=".py")[1])
        script.write_text(code)
        os.chmod(script, 0o644)
        try:
            # sys.remote_exec runs the file at the target's next safe point (PEP 768).
            exe = psutil.Process(pid).exe()
            result = subprocess.run(
                [exe, "-c", f"import sys; sys.remote_exec({pid}, {str(script)!r})"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        finally:
            time.sleep(1.0)  # the target reads the file at its next eval-loop check
            script.unlink(missing_ok=True)
        if result.returncode != 0:
            raise AttachError(f"sys.remote_exec failed: {result.stderr.strip()[-300:]}; {PTRACE_HELP}")
        return
    if not experimental:
        raise AttachError(
            f"injecting into Python {python_version} needs the experimental gdb method: pass --inject-experimental"
        )
    gdb = shutil.which("gdb")
    if gdb is None:
        raise AttachError("the experimental injection needs gdb (apt-get install gdb)")
    escaped = code.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    cmd = [
        gdb,
        "-p",
        str(pid),
        "-batch",
        "-nx",
        "-ex",
        "call (int)PyGILState_Ensure()",
        "-ex",
        f'call (int)PyRun_SimpleString("{escaped}")',
        "-ex",
        "call (void)PyGILState_Release($1)",
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise AttachError("gdb injection timed out (the target may hold the GIL in a blocking call)") from None
    if "$2 = 0" not in result.stdout:
        raise AttachError(f"gdb injection failed: {(result.stdout + result.stderr).strip()[-300:]}; {PTRACE_HELP}")


class LiveAttach:
    """Attach for the live view: L0 continuously, L1 in short py-spy chunks, and a fresh verdict
    document after each chunk over the last few chunks (a rolling window)."""

    CHUNK_S = 2.0
    WINDOW_CHUNKS = 5

    def __init__(
        self, pid: int, ruleset: RuleSet, run_id: str, *, use_l1: bool = True, rate_hz: int = ATTACH_RATE_HZ
    ) -> None:
        self.target = inspect_target(pid)
        self.run_id = run_id
        self.ruleset = ruleset
        self.use_l1 = use_l1
        self.rate_hz = rate_hz
        self.l0 = L0Sampler(pid)
        self._chunks: deque[Counter[str]] = deque(maxlen=self.WINDOW_CHUNKS)
        self._note: str | None = None
        self.result: AttachResult | None = None
        self.document: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profilerd-attach", daemon=True)

    @property
    def exited(self) -> bool:
        return self.l0.summary.exited

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.CHUNK_S + 10)

    def _run(self) -> None:
        while not self._stop.is_set() and not self.exited:
            spy = None
            if self.use_l1 and self._note is None:
                try:
                    spy = PySpySampler(self.target.pid, self.rate_hz, self.CHUNK_S)
                except AttachError as exc:
                    self._note = str(exc)
            end = time.monotonic() + self.CHUNK_S
            while time.monotonic() < end and not self._stop.is_set():
                if not self.l0.tick(0.5):
                    break
            if spy is not None:
                spy.stop()
                counts, note = spy.result(timeout=5)
                if counts:
                    self._chunks.append(counts)
                elif note:
                    self._note = note  # refused (no ptrace rights): stay at L0 from now on
            window: Counter[str] = Counter()
            for chunk in self._chunks:
                window.update(chunk)
            seconds = min(self.l0.summary.seconds, self.CHUNK_S * max(1, len(self._chunks)))
            self.result = conclude(self.target, self.l0.summary, window or None, self._note, self.ruleset, seconds)
            self.document = document(self.result, self.run_id)
