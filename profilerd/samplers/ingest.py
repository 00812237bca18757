"""The probe ingest socket: an AF_UNIX datagram socket in the per-user runtime directory.

Every datagram arrives with the sender's credentials as the kernel reports them
(``SO_PASSCRED``/``SCM_CREDENTIALS``): a sender whose uid is not allowed is dropped before its
bytes are decoded, and a message that claims another process's pid is dropped too, so one
process cannot speak for another. Received bytes are only ever unpacked with ``struct`` or
parsed with ``json`` (never pickle, eval or import), and the kernel truncates a datagram to
``MAX_DATAGRAM_BYTES`` before anything reads it.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
import socket
import struct
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

from profilerd.model import ProbeSession, StepRecord
from profilerd.runtime import prepare_runtime_dir
from profilerd.samplers.sinks import EndedRun, LateDeviceTiming, Sinks
from profilerd.store import Store
from profilerd_probes import wire
from profilerd_probes.schema import GPU_TIMING_FIELDS, STORED_STEP_FIELDS

log = logging.getLogger(__name__)

RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
# struct ucred: pid_t pid, uid_t uid, gid_t gid
_UCRED = struct.Struct("=iII")
PASSCRED = hasattr(socket, "SO_PASSCRED") and hasattr(socket, "SCM_CREDENTIALS")  # Linux
_ANCILLARY_BYTES = socket.CMSG_SPACE(_UCRED.size) if PASSCRED else 0
_NS_PID_CACHE_MAX = 4096


class Credentials(NamedTuple):
    """Who sent a datagram, as the kernel reports it (pid 0: not visible in our pid namespace)."""

    pid: int
    uid: int
    gid: int


def bind_socket(path: Path, shared: bool = False) -> socket.socket:
    """Bind the ingest socket (mode 0600, or 0666 when ``shared``), replacing a stale file left
    by a crashed daemon, and ask the kernel for every sender's credentials.

    The caller holds the single-instance lock, so an existing file here is stale.
    """
    prepare_runtime_dir(path.parent, shared)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
    except OSError as exc:
        log.debug("could not enlarge the receive buffer: %s", exc)
    if PASSCRED:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    mode = 0o666 if shared else 0o600
    try:
        os.fchmod(sock.fileno(), mode)  # Linux creates the file with the socket's mode: no window
    except OSError as exc:
        log.debug("could not set the socket's mode before bind: %s", exc)
    sock.bind(str(path))
    os.chmod(path, mode)
    sock.settimeout(0.2)
    return sock


def _credentials(ancdata: list[tuple[int, int, bytes]]) -> Credentials | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            return Credentials(*_UCRED.unpack_from(data))
    return None


def _innermost_pid(pid: int) -> int | None:
    """The pid a process sees for itself (the last NSpid entry): it differs from ours when the
    process runs in a container's pid namespace."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"NSpid:"):
                    return int(line.split()[-1])
    except (OSError, ValueError):
        return None
    return None


class Ingest:
    """Receives datagrams, checks who sent them, decodes them with the shared wire module, and
    hands the records to the fan-out (store, then recording). The store is read to know senders.

    Messages are accepted from the daemon's own uid and from ``allowed_uids``.
    """

    def __init__(
        self,
        sock: socket.socket,
        store: Store,
        sinks: Sinks,
        stop: threading.Event,
        allowed_uids: Iterable[int] = (),
    ) -> None:
        self.sock = sock
        self.store = store
        self.sinks = sinks
        self._stop = stop
        self.allowed_uids = frozenset((os.getuid(), *allowed_uids))
        # kernel pid -> the pid that process claims for itself (only when they differ)
        self._ns_pids: dict[int, int] = {}
        self.thread = threading.Thread(target=self._run, name="profilerd-ingest", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        checked = PASSCRED
        recvmsg = self.sock.recvmsg
        ancillary = _ANCILLARY_BYTES if checked else 0
        size = wire.MAX_DATAGRAM_BYTES  # the kernel cuts anything longer and says so (MSG_TRUNC)
        while not self._stop.is_set():
            try:
                datagram, ancdata, flags, _ = recvmsg(size, ancillary)
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stop.is_set():
                    return
                log.warning("ingest socket error: %s", exc)
                self.store.count_dropped("socket_error")
                continue
            try:
                if flags & socket.MSG_TRUNC:
                    self.store.count_dropped("oversized")
                    continue
                self.handle(datagram, _credentials(ancdata) if checked else None, checked)
            except Exception:  # nothing a sender does may stop ingest; count it and go on
                log.exception("ingest failed on one datagram")
                self.store.count_dropped("internal_error")

    def handle(self, datagram: bytes, sender: Credentials | None = None, checked: bool = False) -> None:
        """Process one datagram; never raises (bad input is counted by reason).

        With ``checked``, ``sender`` must be the kernel's credentials for the datagram: an
        unknown or disallowed uid is dropped unread, and every pid in the message must be the
        sender's own. Without it (in-process use) the claimed pids are taken as they are.
        """
        if checked:
            if sender is None:
                self.store.count_dropped("no_credentials")
                return
            if sender.uid not in self.allowed_uids:
                self.store.count_dropped("forbidden_uid")
                return
        try:
            message = wire.decode(datagram)
        except wire.WireError as exc:
            self.store.count_dropped(exc.reason)
            return
        if isinstance(message, wire.StepBatch):
            self._on_steps(message.steps, sender, checked)
            return
        body = message.body
        if checked:
            pid = self._verified_pid(body["pid"], sender)
            if pid is None:
                self.store.count_dropped("pid_mismatch")
                return
            if pid != body["pid"]:
                body = dict(body, pid=pid)
        try:
            handler = getattr(self, f"_on_{message.kind}")
            handler(body)
        except (KeyError, TypeError, ValueError) as exc:
            log.debug("rejected %s message: %s", message.kind, exc)
            self.store.count_dropped("bad_field")
            return
        self.store.count_received(message.kind)

    def _verified_pid(self, claimed: int, sender: Credentials | None) -> int | None:
        """The kernel's pid of the sender if it is the process the message claims to be from.

        A process in another pid namespace (a container) knows itself by another number; its
        claim is accepted when it matches the innermost entry of the kernel's NSpid for it.
        """
        if sender is None or sender.pid <= 0:
            return None
        if claimed == sender.pid:
            return claimed
        if self._ns_pids.get(sender.pid) == claimed:
            return sender.pid
        inner = _innermost_pid(sender.pid)
        if inner is None or inner != claimed or inner == sender.pid:
            return None
        if len(self._ns_pids) >= _NS_PID_CACHE_MAX:
            self._ns_pids.clear()
        self._ns_pids[sender.pid] = inner
        return sender.pid

    def _on_steps(self, steps: tuple[wire.StepMessage, ...], sender: Credentials | None, checked: bool) -> None:
        """A datagram's steps. A batch comes from one process: its sender is checked and its
        session looked up once per claimed pid, not per step (the receiver's cost is per datagram)."""
        claimed: int | None = None
        pid: int | None = None
        session: ProbeSession | None = None
        for message in steps:
            if message.pid != claimed:
                claimed = message.pid
                pid = self._verified_pid(claimed, sender) if checked else claimed
                session = self.store.session_for(pid) if pid is not None else None
            if pid is None:
                self.store.count_dropped("pid_mismatch")
            elif session is None or session.rank != message.rank:
                self.store.count_dropped("unknown_sender")
            else:
                self.sinks.step(session, step_record(message, session.job, pid), message.seq, message.sender_dropped)

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
        self.sinks.session(session, self.store.session_for(session.pid))

    def _on_step_timing(self, body: dict[str, Any]) -> None:
        """Late device timing of steps sent without it; a bad row rejects the message."""
        pid = int(body["pid"])
        session = self.store.session_for(pid)
        if session is None or session.rank != int(body.get("rank", session.rank)):
            raise ValueError("device timing from an unknown sender")
        rows = body["steps"]
        if not isinstance(rows, list) or len(rows) > wire.MAX_BATCH_RECORDS:
            raise ValueError("steps must be a list of at most a batch")
        updates = [late_device_timing(pid, row) for row in rows]
        for update in updates:
            self.sinks.step_timing(session, update)

    def _on_config(self, body: dict[str, Any]) -> None:
        pid = int(body["pid"])
        session = self.store.session_for(pid)
        if session is None:
            raise ValueError("config from an unknown sender")
        self.sinks.config(session, body)

    def _on_event(self, body: dict[str, Any]) -> None:
        pid = int(body["pid"])
        session = self.store.session_for(pid)
        if session is None:
            raise ValueError("event from an unknown sender")
        self.sinks.event(session, _text(body.get("kind", "event"), 64), body)

    def _on_run_end(self, body: dict[str, Any]) -> None:
        run_id = _text(body["run_id"])
        exit_code = body.get("exit_code")
        exit_code = int(exit_code) if exit_code is not None else None
        aborted = exit_code is not None and exit_code < 0
        known = run_id in self.store.runs
        run = self.store.end_run(run_id, exit_code, aborted)
        self.sinks.runs_ended([EndedRun(run, exit_code, recorded=known)])


# StepRecord's fields after job, rank and pid, in its order: read from a message in one call.
_RECORD_HEAD, _RECORD_TAIL = tuple(StepRecord.__dataclass_fields__)[:3], tuple(StepRecord.__dataclass_fields__)[3:]
if _RECORD_HEAD != ("job", "rank", "pid") or not set(_RECORD_TAIL) <= set(wire.WIRE_STEP_NAMES):
    raise RuntimeError("StepRecord must start with job, rank, pid, then fields of the wire record")
_read_tail = operator.attrgetter(*_RECORD_TAIL)
_FIELD_FLAG = {f.name: f.flag for f in STORED_STEP_FIELDS}
_FLAG_BITS = functools.reduce(operator.or_, (flag for flag in _FIELD_FLAG.values() if flag), 0)


@functools.lru_cache(maxsize=256)
def _unknown_positions(flags: int) -> tuple[int, ...]:
    """Where in _RECORD_TAIL a step with these flags has no value (its flag is not set)."""
    return tuple(i for i, name in enumerate(_RECORD_TAIL) if _FIELD_FLAG[name] and not flags & _FIELD_FLAG[name])


def step_record(message: wire.StepMessage, job: str, pid: int) -> StepRecord:
    """The record of a step message: the stored fields, each None where its flag says unknown.

    Built positionally, the unknown positions cached per combination of flags: this runs for
    every step every process sends."""
    values = list(_read_tail(message))
    for i in _unknown_positions(message.flags & _FLAG_BITS):
        values[i] = None
    return StepRecord(job, message.rank, pid, *values)


def late_device_timing(pid: int, row: Any) -> LateDeviceTiming:
    """One row of a step_timing message: [step, end_unix_s, comm_s, flags, *GPU_TIMING_FIELDS],
    seconds finite and within what a step record may hold."""
    if not isinstance(row, list) or len(row) != 4 + len(GPU_TIMING_FIELDS):
        raise ValueError("a step_timing row has the wrong length")
    step, end_unix_s, comm_s, flags, *timing = row
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (step, flags)):
        raise TypeError("step and flags must be non-negative integers")
    seconds = [comm_s, *timing]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1e6 for v in seconds):
        raise ValueError("negative, NaN or absurd duration")
    if not isinstance(end_unix_s, int | float) or not end_unix_s > 0:
        raise ValueError("bad end_unix_s")
    # Only the device-timing bits are the message's to add; the step keeps its other flags.
    added = (flags & wire.FLAG_GPU_BUSY_LOWER_BOUND) | wire.FLAG_HAS_GPU_TIMING
    fields: dict[str, float | int] = {"comm_s": float(comm_s), "flags": added}
    fields.update(zip(GPU_TIMING_FIELDS, map(float, timing), strict=True))
    return LateDeviceTiming(pid, step, float(end_unix_s), fields)


def _text(value: Any, limit: int = 512) -> str:
    if not isinstance(value, str | int | float):
        raise TypeError(f"expected text, got {type(value).__name__}")
    return str(value)[:limit]
