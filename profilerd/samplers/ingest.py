"""The probe ingest socket: an AF_UNIX datagram socket in the per-user runtime directory."""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any

from probes import wire
from profilerd.model import ProbeSession, StepRecord
from profilerd.recording import Recorder
from profilerd.store import Store

log = logging.getLogger(__name__)

RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024


class IngestError(RuntimeError):
    """The socket cannot be opened safely; the message says what to do."""


def prepare_runtime_dir(directory: Path) -> None:
    """Create the directory 0700, or refuse one that others could write into."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = directory.stat()
    if info.st_uid != os.getuid():
        raise IngestError(f"{directory} belongs to uid {info.st_uid}, not to you ({os.getuid()})")
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(directory, 0o700)


def bind_socket(path: Path) -> socket.socket:
    """Bind the ingest socket, replacing a stale file left by a crashed daemon.

    The caller holds the single-instance lock, so an existing file here is stale.
    """
    prepare_runtime_dir(path.parent)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
    except OSError as exc:
        log.debug("could not enlarge the receive buffer: %s", exc)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.settimeout(0.2)
    return sock


class Ingest:
    """Receives datagrams, decodes them with the shared wire module, updates store and recording."""

    def __init__(self, sock: socket.socket, store: Store, recorder: Recorder | None, stop: threading.Event) -> None:
        self.sock = sock
        self.store = store
        self.recorder = recorder
        self._stop = stop
        self.thread = threading.Thread(target=self._run, name="profilerd-ingest", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        recv = self.sock.recv
        size = wire.MAX_DATAGRAM_BYTES + 1  # one byte more, so oversized is detectable
        while not self._stop.is_set():
            try:
                datagram = recv(size)
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("ingest socket error: %s", exc)
                self.store.count_dropped("socket_error")
                continue
            try:
                self.handle(datagram)
            except Exception:  # nothing a sender does may stop ingest; count it and go on
                log.exception("ingest failed on one datagram")
                self.store.count_dropped("internal_error")

    def handle(self, datagram: bytes) -> None:
        """Process one datagram; never raises (bad input is counted by reason)."""
        try:
            message = wire.decode(datagram)
        except wire.WireError as exc:
            self.store.count_dropped(exc.reason)
            return
        if isinstance(message, wire.StepMessage):
            self._on_step(message)
            return
        if isinstance(message, wire.StepBatch):
            for step in message.steps:
                self._on_step(step)
            return
        try:
            handler = getattr(self, f"_on_{message.kind}")
            handler(message.body)
        except (KeyError, TypeError, ValueError) as exc:
            log.debug("rejected %s message: %s", message.kind, exc)
            self.store.count_dropped("bad_field")
            return
        self.store.count_received(message.kind)

    def _on_step(self, message: wire.StepMessage) -> None:
        session = self.store.session_for(message.pid)
        if session is None or session.rank != message.rank:
            self.store.count_dropped("unknown_sender")
            return
        flags = message.flags
        step = StepRecord(
            session.job,
            message.rank,
            message.pid,
            message.step,
            message.end_unix_s,
            message.step_s,
            message.data_wait_s,
            message.forward_s,
            message.backward_s,
            message.optimizer_s,
            message.comm_s,
            flags,
            loss=message.loss if flags & wire.FLAG_HAS_LOSS else None,
            grad_norm=message.grad_norm if flags & wire.FLAG_HAS_GRAD_NORM else None,
            lr=message.lr if flags & wire.FLAG_HAS_LR else None,
            scaler_scale=message.scaler_scale if flags & wire.FLAG_HAS_SCALE else None,
            sync_count=message.sync_count,
            sync_s=message.sync_s,
            comm_total_s=message.comm_total_s,
            graph_compiles=message.graph_compiles,
            comm_ops=message.comm_ops,
            comm_bytes=message.comm_bytes,
        )
        self.store.add_step(step, message.seq, message.sender_dropped)
        if self.recorder is not None:
            self.recorder.step(session.run_id, step)

    def _on_hello(self, body: dict[str, Any]) -> None:
        session = ProbeSession(
            pid=int(body["pid"]),
            job=_text(body["job"]),
            run_id=_text(body.get("run_id") or body["job"]),
            rank=int(body.get("rank", 0)),
            local_rank=int(body.get("local_rank", 0)),
            world_size=int(body.get("world_size", 1)),
            hostname=_text(body.get("hostname", "")),
            argv=tuple(_text(a) for a in body.get("argv", ()))[:16],
            started_unix_s=float(body.get("started_unix_s", 0.0)),
            probe_version=_text(body.get("probe_version", "")),
        )
        known = self.store.session_for(session.pid)
        if not self.store.add_session(session):
            raise ValueError("job table full")
        if self.recorder is not None and known != session:
            if known is None or known.run_id != session.run_id:
                self.recorder.start_run(
                    session.run_id,
                    {
                        "job": session.job,
                        "hostname": session.hostname,
                        "started_unix_s": session.started_unix_s,
                    },
                )
            self.recorder.session(session)

    def _on_config(self, body: dict[str, Any]) -> None:
        pid = int(body["pid"])
        session = self.store.session_for(pid)
        if session is None or not self.store.set_config(pid, body):
            raise ValueError("config from an unknown sender")
        if self.recorder is not None:
            self.recorder.config(session.run_id, pid, session.rank, body)

    def _on_event(self, body: dict[str, Any]) -> None:
        pid = int(body["pid"])
        session = self.store.session_for(pid)
        if session is None:
            raise ValueError("event from an unknown sender")
        kind = _text(body.get("kind", "event"), 64)
        if kind == "exit":
            self.store.mark_process_exited(pid, clean=True)
        if self.recorder is not None:
            self.recorder.event(session.run_id, kind, body)

    def _on_run_end(self, body: dict[str, Any]) -> None:
        run_id = _text(body["run_id"])
        exit_code = body.get("exit_code")
        exit_code = int(exit_code) if exit_code is not None else None
        aborted = exit_code is not None and exit_code < 0
        known = run_id in self.store.runs
        run = self.store.end_run(run_id, exit_code, aborted)
        if self.recorder is not None and run is not None and known:
            self.recorder.close_run(run_id, run.final_state, exit_code)
        elif run is not None:
            self.store.finish_run(run_id, None)


def _text(value: Any, limit: int = 512) -> str:
    if not isinstance(value, str | int | float):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return str(value)[:limit]
