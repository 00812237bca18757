"""The daemon's HTTP server: /metrics, /healthz and the read-only JSON API under /api/v1/.

Handlers only read the store's snapshots; nothing here calls NVML or waits on a sampler.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


# One client must not exhaust the daemon (issue 18): each connection costs a thread and a file
# descriptor, so the server holds at most MAX_CONNECTIONS. A connection has REQUEST_TIMEOUT_S
# from opening (or from its last response, when kept alive) to deliver a complete request head,
# however slowly it trickles; a full server makes room by closing the connection that has
# waited longest for its request, so idle connections can never lock out a scrape.
MAX_CONNECTIONS = 64
REQUEST_TIMEOUT_S = 10.0
# Each blocking read or write on a connection; a client that stops reading its response is
# dropped after this long instead of holding a thread.
SOCKET_TIMEOUT_S = 10.0


class _Connections:
    """The connections the server holds, and since when each has waited for a request."""

    def __init__(self, limit: int, request_timeout_s: float) -> None:
        self.limit = limit
        self.request_timeout_s = request_timeout_s
        self._lock = threading.Lock()
        self._waiting_since: dict[socket.socket, float | None] = {}  # None while a request is served
        self.evicted_total = 0

    def admit(self, conn: socket.socket) -> bool:
        """Take ``conn`` if there is room, making room by closing the longest-waiting idle one."""
        with self._lock:
            if len(self._waiting_since) >= self.limit:
                idle = [(since, c) for c, since in self._waiting_since.items() if since is not None]
                if not idle:
                    return False  # every connection is being answered: the newcomer waits its turn elsewhere
                _, oldest = min(idle, key=lambda item: item[0])
                self._drop(oldest)
            self._waiting_since[conn] = time.monotonic()
            return True

    def waiting(self, conn: socket.socket) -> None:
        with self._lock:
            if conn in self._waiting_since:
                self._waiting_since[conn] = time.monotonic()

    def serving(self, conn: socket.socket) -> None:
        with self._lock:
            if conn in self._waiting_since:
                self._waiting_since[conn] = None

    def release(self, conn: socket.socket) -> None:
        with self._lock:
            self._waiting_since.pop(conn, None)

    def expire(self) -> None:
        """Close every connection that has waited too long for its request."""
        deadline = time.monotonic() - self.request_timeout_s
        with self._lock:
            for conn, since in list(self._waiting_since.items()):
                if since is not None and since < deadline:
                    self._drop(conn)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting_since)

    def _drop(self, conn: socket.socket) -> None:
        """Wake the connection's thread with an end of file; that thread closes the socket (closing
        it here could close a descriptor number already reused by a new connection)."""
        del self._waiting_since[conn]
        self.evicted_total += 1
        try:
            conn.shutdown(socket.SHUT_RDWR)
        except OSError as exc:  # already gone
            log.debug("http: shutting down an idle connection: %s", exc)


class DaemonHttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Connections waiting in the kernel's accept queue cost the daemon no descriptor. The queue
    # must outlast a flood: when it overflows, Linux drops the client's handshake ACK, and a
    # scrape that believes it is connected waits for retransmissions (seconds) instead of
    # queueing behind the flood's connections (microseconds each). The kernel caps it at
    # net.core.somaxconn (4096 by default since Linux 5.4).
    request_queue_size = 4096

    def __init__(
        self,
        address: tuple[str, int],
        store: Store,
        info: dict[str, Any],
        redactor: ArgvRedactor = DEFAULT_REDACTOR,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.store = store
        self.info = info
        self.redactor = redactor
        self.connections = _Connections(max_connections, REQUEST_TIMEOUT_S)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProfilerdCollector(store))
        super().__init__(address, _Handler)

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.2}, name="profilerd-http", daemon=True
        )
        thread.start()
        return thread

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.connections.admit(request):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.release(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away mid-answer (or was dropped as idle) is not the daemon's error."""
        log.debug("http: connection from %s failed", client_address, exc_info=True)

    def service_actions(self) -> None:
        """Called by serve_forever every poll interval, in its own thread."""
        self.connections.expire()


class _LineReader:
    """The connection's reader, remembering the last line read: http.client's header parser
    stops at a blank line and at end of file alike, and only the first is a complete head."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.last_line: bytes | None = None

    def readline(self, limit: int = -1) -> bytes:
        self.last_line = self._raw.readline(limit)
        return self.last_line

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


class _Handler(BaseHTTPRequestHandler):
    server: DaemonHttpServer
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: with Nagle's algorithm the body can wait for the
    # client's delayed ACK (up to 40 ms on Linux), which showed up as the scrape latency tail.
    disable_nagle_algorithm = True
    timeout = SOCKET_TIMEOUT_S

    def setup(self) -> None:
        super().setup()
        self.rfile = _LineReader(self.rfile)  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        self.server.connections.waiting(self.connection)
        super().handle_one_request()

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if parsed and self.rfile.last_line == b"":  # type: ignore[attr-defined]
            # The head ended at end of file, not at its blank line: the client went away, or
            # the connection was dropped as idle. Answering would build a response (a /metrics
            # scrape's worth of work) for nobody, once per dropped connection.
            self.close_connection = True
            return False
        self.server.connections.serving(self.connection)  # a complete head (or an error to answer)
        return parsed

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
        with store.lock:
            return {"runs": [asdict(run) for run in store.runs.values()]}
    if len(segments) == 2 and segments[0] == "runs":
        with store.lock:
            run = store.runs.get(segments[1])
            if run is None:
                raise ApiError(404, f"no run {segments[1]!r} in this daemon")
            return asdict(run)
    if segments == ["host"]:
        with store.lock:
            return {"host": asdict(store.host) if store.host else None}
    if segments == ["gpus"]:
        with store.lock:
            return {
                "available": store.gpu_available,
                "reason": store.gpu_unavailable_reason,
                "gpus": [asdict(g) for g in store.gpus],
                "events": [asdict(e) for e in list(store.gpu_events)[-50:]],
            }
    raise ApiError(404, f"no such API path: {API_PREFIX}{path}")


def status_document(server: DaemonHttpServer) -> dict[str, Any]:
    store = server.store
    with store.lock:
        return {
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


def job_summary(store: Store, name: str) -> dict[str, Any]:
    with store.lock:
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


def job_document(
    store: Store, name: str, recent_steps: int, redactor: ArgvRedactor = DEFAULT_REDACTOR
) -> dict[str, Any]:
    summary = job_summary(store, name)
    with store.lock:
        job = store.jobs[name]
        verdict = job.verdict
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
    document = dict(summary)
    document["verdict"] = verdict.to_json(job.run_id, name) if verdict else None
    document["rank_detail"] = ranks
    document["processes"] = processes
    document["config"] = config
    return document
