"""The daemon's HTTP server: /metrics, /healthz and the read-only JSON API under /api/v1/.

Handlers only read the store's snapshots; nothing here calls NVML or waits on a sampler.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from profilerd import __version__
from profilerd.exporters.prometheus import ProfilerdCollector
from profilerd.redaction import DEFAULT_REDACTOR, ArgvRedactor
from profilerd.store import Store

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1/"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# One client must not exhaust the daemon (issue 18). Connections are accepted and their request
# heads read by one selector loop, so an idle or trickling connection costs a descriptor and a
# few hundred bytes, never a thread; only a complete head goes to one of MAX_WORKERS threads.
# At most MAX_CONNECTIONS are held: a full server closes the connection that has waited longest
# for its head, so idle connections can never lock out a scrape, and the daemon's descriptors
# stay far from its limit (the samplers need some). A connection has REQUEST_TIMEOUT_S to send a
# complete head, however slowly it trickles, and is closed after its response.
MAX_CONNECTIONS = 128
MAX_WORKERS = 8
REQUEST_TIMEOUT_S = 10.0
# Each blocking write of a response: a client that stops reading is dropped after this long.
SOCKET_TIMEOUT_S = 10.0
# A head longer than this is handed to the handler, which answers 414 or 431 as for any other.
MAX_HEAD_BYTES = 80 * 1024
# New connections taken per turn of the loop, so a flood cannot stall reading the heads of
# connections already accepted.
ACCEPTS_PER_TURN = 64
# A verdict request may wait this long for its run's recording to close (it holds a worker).
MAX_VERDICT_WAIT_MS = 10_000
_REQUEST_LINE = re.compile(rb"\S+ \S+ HTTP/\d\.\d\r?")


@dataclass
class _Pending:
    """A connection whose request head is still arriving."""

    sock: socket.socket
    address: Any
    since: float
    head: bytearray = field(default_factory=bytearray)

    def ready(self) -> bool:
        """The head is complete, too long, or its request line is one the handler will refuse
        without reading headers (it answers 400 at once)."""
        head = bytes(self.head)
        if b"\r\n\r\n" in head or b"\n\n" in head or len(head) > MAX_HEAD_BYTES:
            return True
        line, newline, _ = head.partition(b"\n")
        return bool(newline) and _REQUEST_LINE.fullmatch(line) is None


class _HeadThenSocket(io.RawIOBase):
    """The bytes the selector loop already read, then the socket: the handler's input."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        self._head = memoryview(head)
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            count = min(len(buffer), len(self._head))
            buffer[:count] = self._head[:count]
            self._head = self._head[count:]
            return count
        return self._sock.recv_into(buffer)


class _SocketWriter(io.BufferedIOBase):
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self._sock.sendall(data)
        return len(data)


class DaemonHttpServer(HTTPServer):
    allow_reuse_address = True
    # Connections waiting in the kernel's accept queue cost the daemon no descriptor. The queue
    # must outlast a flood: when it overflows, Linux drops the client's handshake ACK, and a
    # scrape that believes it is connected waits for retransmissions (seconds). The kernel caps
    # it at net.core.somaxconn (4096 by default since Linux 5.4).
    request_queue_size = 4096

    def __init__(
        self,
        address: tuple[str, int],
        store: Store,
        info: dict[str, Any],
        redactor: ArgvRedactor = DEFAULT_REDACTOR,
        max_connections: int = MAX_CONNECTIONS,
        run_verdict: Callable[[str, int | None, float], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        # The daemon's end-of-run verdict of a closed run (KeyError: none), for `profilerd run`.
        self.run_verdict = run_verdict
        self.info = info
        self.redactor = redactor
        self.max_connections = max_connections
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProfilerdCollector(store))
        self._pending: dict[socket.socket, _Pending] = {}  # oldest first (insertion order)
        self._answering = 0  # connections handed to a worker and not yet closed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._serving = False
        self._workers = ThreadPoolExecutor(MAX_WORKERS, thread_name_prefix="profilerd-http-worker")
        super().__init__(address, _Handler)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="profilerd-http", daemon=True
        )
        self._serving = True
        thread.start()
        return thread

    def serve_forever(self, poll_interval: float = 0.2) -> None:
        self._serving = True
        selector = selectors.DefaultSelector()
        self.socket.setblocking(False)
        selector.register(self.socket, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(poll_interval):
                    if key.data is None:
                        self._accept(selector)
                    else:
                        self._read(selector, key.data)
                deadline = time.monotonic() - REQUEST_TIMEOUT_S
                while self._pending and (oldest := next(iter(self._pending.values()))).since < deadline:
                    self._discard(selector, oldest)
        finally:
            for pending in list(self._pending.values()):
                self._discard(selector, pending)
            selector.close()
            self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        if self._serving:
            self._stopped.wait()
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _accept(self, selector: selectors.BaseSelector) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors, or the peer left: try again next turn
                log.debug("http: accept failed: %s", exc)
                return
            with self._lock:
                held = len(self._pending) + self._answering
            if held >= self.max_connections:
                if not self._pending:  # every connection is being answered: this one must retry
                    conn.close()
                    continue
                self._discard(selector, next(iter(self._pending.values())))
            conn.setblocking(False)
            pending = _Pending(conn, address, time.monotonic())
            self._pending[conn] = pending
            selector.register(conn, selectors.EVENT_READ, pending)

    def _read(self, selector: selectors.BaseSelector, pending: _Pending) -> None:
        try:
            data = pending.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client left before finishing its head: nothing to answer
            self._discard(selector, pending)
            return
        pending.head += data
        if not pending.ready():
            return
        selector.unregister(pending.sock)
        del self._pending[pending.sock]
        with self._lock:
            self._answering += 1
        try:
            self._workers.submit(self._answer, pending)
        except RuntimeError:  # shutting down
            self._finish(pending.sock)

    def _discard(self, selector: selectors.BaseSelector, pending: _Pending) -> None:
        self._pending.pop(pending.sock, None)
        with contextlib.suppress(KeyError, ValueError):  # not registered yet, or already gone
            selector.unregister(pending.sock)
        pending.sock.close()

    def _answer(self, pending: _Pending) -> None:
        try:
            pending.sock.setblocking(True)
            pending.sock.settimeout(SOCKET_TIMEOUT_S)
            self.RequestHandlerClass(pending, pending.address, self)  # type: ignore[arg-type]  # typeshed: Self
        except Exception:  # a client that went away mid-answer is not the daemon's error
            log.debug("http: answering %s failed", pending.address, exc_info=True)
        finally:
            self._finish(pending.sock)

    def _finish(self, sock: socket.socket) -> None:
        with self._lock:
            self._answering -= 1
        with contextlib.suppress(OSError):  # the client already left
            sock.shutdown(socket.SHUT_WR)
        sock.close()

    def server_close(self) -> None:
        super().server_close()
        self._workers.shutdown(wait=False, cancel_futures=True)


class _Handler(BaseHTTPRequestHandler):
    server: DaemonHttpServer
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: with Nagle's algorithm the body can wait for the
    # client's delayed ACK (up to 40 ms on Linux), which showed up as the scrape latency tail.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        """The server hands a connection with its head already read (see DaemonHttpServer)."""
        pending: _Pending = self.request
        self.connection = pending.sock
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.rfile = io.BufferedReader(_HeadThenSocket(bytes(pending.head), pending.sock))
        self.wfile = _SocketWriter(pending.sock)

    def handle(self) -> None:
        self.handle_one_request()  # one request per connection: a kept-alive idle one would hold a worker

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        try:
            if parts.path == "/metrics":
                body = generate_latest(self.server.registry)
                self._send(200, body, CONTENT_TYPE_LATEST)
                return
            if parts.path == "/healthz":
                self._json(
                    200,
                    {"status": "ok", "uptime_s": round(time.time() - self.server.store.started_unix_s, 3)},
                )
                return
            if parts.path.startswith(API_PREFIX):
                query = parse_qs(parts.query, max_num_fields=20)
                self._json(200, route(self.server, parts.path[len(API_PREFIX) :], query))
                return
            raise ApiError(404, f"no such path: {parts.path}")
        except (BrokenPipeError, ConnectionResetError, TimeoutError) as exc:  # the client left or stalled
            log.debug("http %s: %s", parts.path, exc)
            self.close_connection = True
        except ApiError as exc:
            self._json(exc.status, {"error": str(exc), "status": exc.status})
        except ValueError as exc:
            self._json(400, {"error": str(exc), "status": 400})
        except Exception as exc:  # a bug must still answer in JSON, and never stop the server
            log.exception("http %s failed", parts.path)
            self._json(500, {"error": f"internal error: {type(exc).__name__}", "status": 500})

    def _refuse(self) -> None:
        self._json(405, {"error": "the API is read-only: use GET", "status": 405})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _refuse

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors the base class finds before routing (malformed request line, unknown method,
        oversized headers) are answered in JSON too; an unknown method is a 405, like the rest."""
        if code == 501:
            code, message = 405, "the API is read-only: use GET"
        if self.request_version == "HTTP/0.9":  # an unparsable request line: answer with a status line
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        try:
            self._json(code, {"error": message or self.responses.get(code, ("error",))[0], "status": code})
        except OSError as exc:
            log.debug("http: could not send error %d: %s", code, exc)

    def _json(self, status: int, document: Any) -> None:
        self._send(status, json.dumps(document, default=str).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


def _int_param(query: dict[str, list[str]], name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name, [str(default)])[-1]
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"parameter {name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ApiError(400, f"parameter {name} must be between {low} and {high}")
    return value


def route(server: DaemonHttpServer, path: str, query: dict[str, list[str]]) -> Any:
    store = server.store
    segments = [unquote(s) for s in path.strip("/").split("/")] if path.strip("/") else []
    if segments == ["status"]:
        return status_document(server)
    if segments == ["jobs"]:
        return {"jobs": [job_summary(store, name) for name in store.job_names()]}
    if len(segments) == 2 and segments[0] == "jobs":
        steps = _int_param(query, "steps", 120, 0, 5000)
        return job_document(store, segments[1], steps, server.redactor)
    if segments == ["runs"]:
        return {"runs": store.read(lambda s: [asdict(run) for run in s.runs.values()])}
    if len(segments) == 3 and segments[0] == "runs" and segments[2] == "verdict":
        return run_verdict_document(server, segments[1], query)
    if len(segments) == 2 and segments[0] == "runs":
        run = store.read(lambda s: asdict(s.runs[segments[1]]) if segments[1] in s.runs else None)
        if run is None:
            raise ApiError(404, f"no run {segments[1]!r} in this daemon")
        return run
    if segments == ["host"]:
        return {"host": store.read(lambda s: asdict(s.host) if s.host else None)}
    if segments == ["gpus"]:
        return store.read(
            lambda s: {
                "available": s.gpu_available,
                "reason": s.gpu_unavailable_reason,
                "gpus": [asdict(g) for g in s.gpus],
                "events": [asdict(e) for e in list(s.gpu_events)[-50:]],
            }
        )
    raise ApiError(404, f"no such API path: {API_PREFIX}{path}")


def run_verdict_document(server: DaemonHttpServer, run_id: str, query: dict[str, list[str]]) -> dict[str, Any]:
    """``runs/<id>/verdict?exit_code=N&wait_ms=M``: the run's end-of-run verdict (``verdict``,
    the document `profilerd run` prints and writes with --json) and the rules file it was judged
    by; waits up to M ms for the run's recording to close."""
    if server.run_verdict is None:
        raise ApiError(404, "this daemon computes no run verdicts")
    raw = query.get("exit_code", [""])[-1]
    exit_code = _int_param(query, "exit_code", 0, -255, 255) if raw else None
    wait_s = _int_param(query, "wait_ms", 0, 0, MAX_VERDICT_WAIT_MS) / 1000
    try:
        document = server.run_verdict(run_id, exit_code, wait_s)
    except KeyError:
        raise ApiError(404, f"no closed recording of run {run_id!r} in this daemon") from None
    return {"verdict": document, "rules_file": server.info.get("rules_file")}


def status_document(server: DaemonHttpServer) -> dict[str, Any]:
    return server.store.read(
        lambda store: {
            "version": __version__,
            "pid": os.getpid(),
            **server.info,
            "uptime_s": round(time.time() - store.started_unix_s, 3),
            "gpu_available": store.gpu_available,
            "gpu_unavailable_reason": store.gpu_unavailable_reason,
            "recording_paused": store.recording_paused_reason,
            "messages_received": dict(store.received),
            "messages_dropped": dict(store.dropped),
            "jobs": len(store.jobs),
        }
    )


def job_summary(store: Store, name: str) -> dict[str, Any]:
    def copy(store: Store) -> dict[str, Any]:
        job = store.jobs.get(name)
        if job is None:
            raise ApiError(404, f"no job {name!r}")
        verdict = job.verdict
        return {
            "job": job.job,
            "run_id": job.run_id,
            "ranks": sorted(job.ranks),
            "alive": any(r.alive for r in job.ranks.values()),
            "steps_total": sum(r.steps_total for r in job.ranks.values()),
            "primary": verdict.primary if verdict else "none",
            "severity": verdict.severity if verdict else "ok",
            "summary": verdict.summary if verdict else "waiting for steps",
        }

    return store.read(copy)


def job_document(
    store: Store, name: str, recent_steps: int, redactor: ArgvRedactor = DEFAULT_REDACTOR
) -> dict[str, Any]:
    summary = job_summary(store, name)

    def copy(store: Store) -> tuple[Any, list[dict[str, Any]], list[dict[str, Any]], Any]:
        job = store.jobs[name]
        ranks = []
        for rank_id, rank in sorted(job.ranks.items()):
            recent = list(rank.steps)[-recent_steps:] if recent_steps else []
            ranks.append(
                {
                    "rank": rank_id,
                    "pid": rank.session.pid,
                    "hostname": rank.session.hostname,
                    "argv": redactor(rank.session.argv),
                    "alive": rank.alive,
                    "steps_total": rank.steps_total,
                    "last_step_unix_s": rank.last_step_unix_s,
                    "recent_steps": [
                        {
                            "step": s.step,
                            "end_unix_s": s.end_unix_s,
                            "step_s": s.step_s,
                            "data_wait_s": s.data_wait_s,
                            "compute_s": s.forward_s + s.backward_s + s.optimizer_s,
                            "comm_s": s.comm_s,
                            "other_s": s.other_s,
                        }
                        for s in recent
                    ],
                }
            )
        pids = {r.session.pid for r in job.ranks.values()}
        processes = [asdict(p) for p in store.processes.values() if p.pid in pids]
        config = next((r.config for _, r in sorted(job.ranks.items()) if r.config), None)
        return job.verdict, ranks, processes, config

    verdict, ranks, processes, config = store.read(copy)
    document = dict(summary)
    document["verdict"] = verdict.to_json(summary["run_id"], name) if verdict else None
    document["rank_detail"] = ranks
    document["processes"] = processes
    document["config"] = config
    return document
