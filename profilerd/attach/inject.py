"""L2: the probes injected into the live target, and removed again on detach.

The lifecycle (``Injection``): a lease on the daemon the probes report to, a bootstrap folder
the target can read, the injection itself; at detach, the removal, the run's end, the recording
and, when enough steps arrived, the verdict of those steps instead of the stack samples'.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from profilerd.analysis.rules import RuleSet
from profilerd.attach.target import PTRACE_HELP, AttachError, Target
from profilerd.attach.verdict import AttachResult, Layers, probed_verdict, with_attach_fields
from profilerd.config import DaemonConfig
from profilerd.session import DaemonHandle, bootstrap_dir, wait_for_recording
from profilerd_probes import wire
from profilerd_probes.paths import TRUSTED_UIDS_ENV


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


class Injection:
    """Probes injected into the target (L2): removed on detach; their steps decide the verdict."""

    def __init__(
        self,
        target: Target,
        config: DaemonConfig,
        daemon_flags: list[str],
        run_id: str,
        ruleset: RuleSet,
        experimental: bool,
    ) -> None:
        self.target, self.config, self.run_id = target, config, run_id
        self.ruleset, self.experimental = ruleset, experimental
        self.handle = DaemonHandle(config, daemon_flags)
        self.boot = bootstrap_dir()
        os.chmod(self.boot, 0o755)  # the target may run as another user than the one reading its files
        self.error: str | None = None  # why the probes are not in the target

    def start(self) -> None:
        """Install the probes; a refusal is kept as L2's reason, the attach goes on with L0/L1."""
        try:
            self._inject(install=True)
        except AttachError as exc:
            self.error = str(exc)

    def _inject(self, install: bool) -> None:
        code = injection_code(self.boot, self.handle.socket_path, self.run_id, install)
        inject(self.target.pid, code, self.target.python_version, self.experimental)

    def finish(self, document: dict[str, Any], result: AttachResult) -> dict[str, Any]:
        """Remove the probes and end their run; the document of their steps when there are
        enough, else ``document`` with L2's reason for not deciding."""
        try:
            if self.error is None:
                self._inject(install=False)
        except AttachError as exc:
            document["notes"].append(f"could not remove the probes: {exc}")
        finally:
            self.handle.send(
                wire.encode_json(wire.KIND_RUN_END, {"pid": os.getpid(), "run_id": self.run_id, "exit_code": None})
            )
            recording = wait_for_recording(self.handle, self.run_id, self.config, timeout=10)
            self.handle.close()
            shutil.rmtree(self.boot, ignore_errors=True)
        if self.error is not None:
            document["layers"]["L2"] = {"available": False, "why": self.error}
            return document
        if recording is None:
            document["layers"]["L2"] = {"available": False, "why": "probes injected but no training step arrived"}
            return document
        verdict = probed_verdict(recording, self.ruleset, result.l0.seconds)
        if verdict.features.steps < 5:
            document["layers"]["L2"] = {"available": False, "why": f"only {verdict.features.steps} steps observed"}
            return document
        result.layer = "L2"
        layers: Layers = {
            **document["layers"],
            "L2": {"available": True, "steps": verdict.features.steps, "detached": True},
        }
        injected = verdict.to_json(self.run_id, f"pid-{self.target.pid}", recording=str(recording))
        # Not the L1 note that steps need probes: here they are.
        return with_attach_fields(injected, result, layers, list(result.notes))
