"""Build the daemon from its config and run its lifecycle.

Config -> single-instance lock -> recorder and socket, ingesting at once (start_ingest) ->
samplers, analysis, HTTP (start_serving) -> wait for SIGTERM/SIGINT -> stop HTTP, join
threads, flush the recording, close NVML -> exit code.

Ingest comes first and needs only light imports (store, recording, ingest: no pandas, no
prometheus-client): a daemon started beside a training takes its probes' first records before
its heavy imports are done, so a short training never waits at exit for the daemon's start.

This module only builds and runs things: every sampler (``profilerd.samplers``: ingest, host,
GPU, live analysis, housekeeping) returns records, and one fan-out
(``profilerd.samplers.sinks``) writes them to the store and the recording.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from profilerd import __version__
from profilerd.config import DaemonConfig
from profilerd.recordings.writer import Recorder
from profilerd.redaction import ArgvRedactor
from profilerd.runtime import (
    INFO_NAME,
    LOCK_NAME,
    IngestError,
    leases_locked,
    live_leases,
    prepare_runtime_dir,
    read_running_daemon,
    remove_private_runtime_dir,
)
from profilerd.samplers.housekeeping import Housekeeping
from profilerd.samplers.ingest import Ingest, bind_socket
from profilerd.samplers.loop import SamplerLoop
from profilerd.samplers.sinks import fan_out
from profilerd.store import Store

if TYPE_CHECKING:  # the analysis (pandas), HTTP (prometheus-client), GPU: imported by start_serving
    from profilerd.analysis.rules import RuleSet
    from profilerd.exporters.http import DaemonHttpServer
    from profilerd.gpu import GpuBackend

log = logging.getLogger(__name__)

# How long a thread may hold the GIL while another waits (CPython's default is 5 ms): short, so
# the ingest thread drains its socket (10 datagrams deep by default) while analysis computes. In
# the soak, 1 ms halved the drops of 5 ms (0.8% vs 1.5%) with the scrape p99 still under 50 ms.
GIL_SWITCH_INTERVAL_S = 0.001
# The live windows are tens of thousands of long-lived objects that come and go (steps): with
# CPython's default thresholds a full collection (~25-45 ms with 64 busy ranks, holding the GIL
# and finding next to no garbage) ran every 2 s, in whichever thread allocated: often a scrape.
# Full collections are left to the housekeeping loop instead, once a minute.
GC_THRESHOLDS = (700, 10, 1_000_000)
# A daemon started for runs exits once no run holds a lease and no run is recording, after this
# long: short, so that it does not outlive a script of runs by much, long enough that the next
# run of a loop of short runs finds it still there.
RUN_DAEMON_LINGER_S = 2.0
RUN_DAEMON_CHECK_S = 0.5
# How often a verdict request that waits for its run's recording to close looks (in-process).
VERDICT_POLL_S = 0.002


# What start_serving and the run verdicts import (the analysis: pandas; HTTP: prometheus-client;
# the GPU backends; the samplers: psutil): a daemon for runs imports them at low priority once
# it ingests, so that what start_serving then does at the normal priority is only to start.
SERVING_MODULES = (
    "profilerd.analysis.rules",
    "profilerd.analysis.live",
    "profilerd.exporters.http",
    "profilerd.gpu",
    "profilerd.recordings.reader",
    "profilerd.recordings.offline",
    "profilerd.samplers.analysis",
    "profilerd.samplers.gpu",
    "profilerd.samplers.host",
)

__all__ = ["SERVING_MODULES", "Daemon", "DaemonError", "read_running_daemon"]


def _seconds_since_process_start() -> float:
    """How long this process has run (its exec included: the interpreter's own start), from
    /proc, to a clock tick (10 ms); -1.0 where /proc cannot tell."""
    try:
        started_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0
    return uptime_s - started_ticks / os.sysconf("SC_CLK_TCK")


class DaemonError(RuntimeError):
    """The daemon cannot start; the message is for the user."""


class Daemon:
    """``ruleset`` may be given later, before start_serving (a daemon for runs loads it after
    it ingests: the default rules need the analysis' imports)."""

    def __init__(
        self, config: DaemonConfig, ruleset: RuleSet | None = None, gpu_backend: GpuBackend | None = None
    ) -> None:
        self.config = config
        self.ruleset = ruleset
        self.stop_event = threading.Event()
        self.store = Store(config.window_steps, config.window_s, config.max_jobs)
        self._gpu = gpu_backend
        self._lock_fd: int | None = None
        self._threads: list[Any] = []
        self.recorder: Recorder | None = None
        self.http: DaemonHttpServer | None = None
        self.redactor = ArgvRedactor(config.argv_safe_flags)
        self.ingest: Ingest | None = None
        self._sinks: Any = None
        self._previous_handlers: dict[int, Any] = {}
        self._housekeeping = Housekeeping(self.store, config.runtime_dir)
        self._stopped = False
        # Set by start_ingest, written by start_serving to the info file; timestamps of the
        # start's phases (time since the process started), for the log and bench_launch.py.
        self.start_phases: dict[str, float] = {}

    @property
    def http_address(self) -> tuple[str, int]:
        if self.http is None:
            raise DaemonError("the daemon is not started")
        host, port = self.http.server_address[:2]
        return str(host), int(port)

    # ---- start ---------------------------------------------------------------------------
    @property
    def _shared_socket(self) -> bool:
        """Other uids may send: the socket must be reachable for them (credentials still gate)."""
        return any(uid != os.getuid() for uid in self.config.allowed_uids)

    def start(self, any_port_fallback: bool = False) -> None:
        """Ingest, then everything else: start_ingest() and start_serving() at once."""
        self.start_ingest()
        self.start_serving(any_port_fallback)

    def start_ingest(self) -> None:
        """Take the lock, open the recording and bind the probe socket: from here on the probes'
        records are received, stored and recorded. Stops what it started on failure."""
        cfg = self.config
        self._stopped = False
        try:
            prepare_runtime_dir(cfg.runtime_dir, self._shared_socket)
        except (OSError, IngestError) as exc:
            raise DaemonError(f"cannot use runtime directory {cfg.runtime_dir}: {exc}") from exc
        if self._shared_socket:
            closed = [str(p) for p in cfg.runtime_dir.parents if not p.stat().st_mode & 0o001]
            if closed:
                log.warning(
                    "allowed_uids is set, but other users cannot reach %s through %s: "
                    "put socket_path in a directory they can traverse, e.g. /run/profilerd-<user>/",
                    cfg.socket_path,
                    ", ".join(closed),
                )
        self._acquire_lock()
        try:
            self._start_ingesting()
        except BaseException:
            self.stop()
            raise
        self._phase("ingesting")

    def start_serving(self, any_port_fallback: bool = False) -> None:
        """The samplers, the live analysis and HTTP, after start_ingest; then the info file, which
        is what says the daemon serves. ``any_port_fallback``: a taken HTTP port is replaced by
        any free one (a daemon for runs: its runs find it through the info file)."""
        try:
            self._start_serving(any_port_fallback)
        except BaseException:
            self.stop()
            raise

    def _phase(self, name: str) -> None:
        self.start_phases[name] = round(_seconds_since_process_start(), 3)

    def _acquire_lock(self) -> None:
        path = self.config.runtime_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            running = read_running_daemon(self.config.runtime_dir) or {}
            where = (
                f" (pid {running.get('pid')}, http://{running.get('http_host')}:{running.get('http_port')})"
                if running
                else ""
            )
            raise DaemonError(f"another profilerd daemon is already running for this user{where}") from None
        self._lock_fd = fd

    def _start_ingesting(self) -> None:
        cfg = self.config
        store = self.store
        if cfg.retention_days is not None:
            from profilerd.recordings.retention import prune

            prune(cfg.runs_dir, older_than_s=cfg.retention_days * 86400)
        if cfg.record:
            self.recorder = Recorder(
                cfg.runs_dir,
                on_closed=store.finish_run,
                on_status=store.set_recording_paused,
                argv_filter=None if cfg.record_full_argv else self.redactor,
            )
            try:
                self.recorder.start()
            except OSError as exc:
                raise DaemonError(f"cannot create the data directory {cfg.runs_dir}: {exc.strerror}") from exc
        try:
            sock = bind_socket(cfg.socket_path, self._shared_socket)
        except (OSError, IngestError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise DaemonError(f"cannot bind the probe socket {cfg.socket_path}: {reason}") from exc
        self._sinks = sinks = fan_out(store, self.recorder)
        self.ingest = Ingest(sock, store, sinks, self.stop_event, cfg.allowed_uids)
        self.ingest.start()
        # Ended runs are closed (their recording flushed) from the start, too: a short run's
        # run_end may come before the analysis is loaded.
        housekeeping = SamplerLoop(
            "housekeeping", cfg.host_interval_s, self._housekeeping.sample, sinks.runs_ended, store, self.stop_event
        )
        housekeeping.start()
        self._threads.append(housekeeping)

    def _start_serving(self, any_port_fallback: bool) -> None:
        from profilerd.analysis.live import LiveAnalyzer
        from profilerd.exporters.http import DaemonHttpServer
        from profilerd.gpu import open_backend
        from profilerd.samplers.analysis import AnalysisRounds
        from profilerd.samplers.gpu import GpuSampler
        from profilerd.samplers.host import NodeSampler

        self._phase("imported")
        if self.ruleset is None:
            raise DaemonError("no rules to analyse with")
        cfg = self.config
        store, sinks, stop = self.store, self._sinks, self.stop_event
        if self._gpu is None:
            self._gpu = open_backend(cfg.gpu_backend)
        store.set_gpu_backend(self._gpu.available, self._gpu.unavailable_reason)
        if not self._gpu.available:
            log.info("no-GPU mode: %s", self._gpu.unavailable_reason)
        analysis = AnalysisRounds(LiveAnalyzer(store, self.ruleset), store, cfg.analysis_interval_s)
        loops: list[SamplerLoop[Any]] = [
            SamplerLoop("host", cfg.host_interval_s, NodeSampler(store.training_pids).sample, sinks.host, store, stop),
            SamplerLoop(
                "analysis", cfg.analysis_interval_s, analysis.sample, sinks.verdicts, store, stop, pace=analysis.pace
            ),
        ]
        if self._gpu.available:
            loops.append(SamplerLoop("gpu", cfg.gpu_interval_s, GpuSampler(self._gpu).sample, sinks.gpus, store, stop))
        for loop in loops:
            loop.start()
        self._threads.extend(loops)
        info: dict[str, Any] = {
            "socket": str(cfg.socket_path),
            "data_dir": str(cfg.data_dir),
            "rules_file": str(cfg.rules_file) if cfg.rules_file is not None else None,
        }
        port = cfg.http_port
        while True:
            try:
                self.http = DaemonHttpServer(
                    (cfg.http_host, port), store, info, self.redactor, run_verdict=self.run_verdict
                )
                break
            except OSError as exc:
                if any_port_fallback and port != 0:
                    port = 0  # the port is taken by something else: any free one will do
                    continue
                raise DaemonError(
                    f"cannot listen on {cfg.http_host}:{cfg.http_port}: {exc.strerror or exc} "
                    "(choose another with --port, or 0 for any free port)"
                ) from exc
        host_name, port = self.http_address
        info.update({"http_host": host_name, "http_port": port})
        self.http.serve_in_thread()
        self._phase("serving")
        self._write_info({"pid": os.getpid(), "version": __version__, **info, "start_phases": self.start_phases})
        log.info(
            "profilerd %s listening on http://%s:%d, probes on %s (started in %s)",
            __version__,
            host_name,
            port,
            cfg.socket_path,
            ", ".join(f"{name} {at:.3f} s" for name, at in self.start_phases.items()),
        )

    def run_verdict(self, run_id: str, exit_code: int | None, wait_s: float = 0.0) -> dict[str, Any]:
        """The end-of-run verdict of a run this daemon recorded and closed, as `profilerd run`
        prints it (its --json document): the run's wrapper asks for it, so that it need not
        load the recording and the analysis itself. Waits up to ``wait_s`` for the recording's
        close (the wrapper asks right after its run_end: one call, no polling). KeyError: no
        closed recording of that run."""
        from profilerd import recordings as runs

        deadline = time.monotonic() + wait_s
        while True:
            run = self.store.read(lambda s: s.runs.get(run_id))
            if run is not None and run.state in ("closed", "aborted") and run.recording_path:
                break
            if time.monotonic() >= deadline or self.stop_event.is_set():
                raise KeyError(run_id)
            time.sleep(VERDICT_POLL_S)
        assert self.ruleset is not None  # set before HTTP serves
        verdict = runs.analyse(runs.load(Path(run.recording_path)), self.ruleset)
        return verdict.to_json(run_id, run.job, recording=run.recording_path, exit_code=exit_code)

    def _write_info(self, info: dict[str, Any]) -> None:
        path = self.config.runtime_dir / INFO_NAME
        tmp = path.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(info))
        os.replace(tmp, path)

    # ---- stop ----------------------------------------------------------------------------
    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.stop_event.set()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        if self.ingest is not None:
            self.ingest.join(2.0)
            self.ingest.sock.close()
            try:
                if self.config.socket_path.exists():
                    self.config.socket_path.unlink()
            except OSError as exc:
                log.debug("socket cleanup: %s", exc)
            self.ingest = None
        for thread in self._threads:
            thread.join(2.0)
        self._threads = []
        if self.recorder is not None:
            self.recorder.stop()
            self.recorder = None
        if self._gpu is not None:
            self._gpu.close()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                (self.config.runtime_dir / INFO_NAME).unlink()
            os.close(self._lock_fd)
            self._lock_fd = None
            remove_private_runtime_dir(self.config.runtime_dir)  # one run's: it has ended

    def catch_signals(self) -> None:
        """Turn SIGTERM and SIGINT into a clean shutdown from now on (main thread only).

        Call it before starting, so that a signal that arrives while the daemon starts up (or
        right after it said it is serving) still ends in a flush and exit code 0.
        """
        if self._previous_handlers:
            return

        def on_signal(signum: int, frame: Any) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self.stop_event.set()

        self._previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _tune_process(self) -> None:
        """Settings for a process that is the daemon and nothing else (`profilerd serve`), for
        ingest and /metrics to keep up under load (see GIL_SWITCH_INTERVAL_S, GC_THRESHOLDS)."""
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # Everything loaded by now (pandas, numpy, prometheus_client: most of the objects) lives
        # as long as the daemon: keep it out of the collector's passes altogether.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self._housekeeping.full_collections = True

    def serve_until_signal(self, for_runs: bool = False) -> int:
        """Run until SIGTERM or SIGINT, then shut down cleanly; returns the exit code.

        ``for_runs``: a daemon that `profilerd run` started: it also ends once no run needs it
        (see :mod:`profilerd.runtime`), shutting down with the leases locked so that no run
        starting meanwhile picks a daemon that is leaving.
        """
        self.catch_signals()
        self._tune_process()
        try:
            if for_runs:
                self._wait_until_unneeded()
            else:
                self.stop_event.wait()
        finally:
            self.stop()
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)
            self._previous_handlers = {}
        return 0

    def _wait_until_unneeded(self) -> None:
        runtime_dir = self.config.runtime_dir
        idle_since: float | None = None
        while not self.stop_event.wait(RUN_DAEMON_CHECK_S):
            with leases_locked(runtime_dir, wait_s=0) as locked:
                if not locked:  # a run is taking its lease right now
                    idle_since = None
                    continue
                if live_leases(runtime_dir) or self.store.running_run_ids():
                    idle_since = None
                    continue
                now = time.monotonic()
                idle_since = idle_since or now
                if now - idle_since >= RUN_DAEMON_LINGER_S:
                    log.info("no run needs this daemon any more: shutting down")
                    self.stop()  # under the lock: see profilerd.runtime
                    return
