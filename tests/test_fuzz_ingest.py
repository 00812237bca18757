"""Bad input against the live daemon: fuzzed, truncated, oversized, wrong-version and
wrong-type datagrams and floods on the ingest socket, and bad requests to the HTTP API.

Every datagram must be accounted for (accepted, or dropped under a reason label), the ingest
thread must survive, and good messages sent afterwards must still arrive.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profilerd.analysis.rules import load_rules
from profilerd.config import load
from profilerd.daemon import Daemon
from profilerd.gpu import NoGpuBackend
from profilerd_probes import wire
from tests.reliability_helpers import hello, http_get, step_batch, step_records, wait_for

RULES, _ = load_rules()
PID = os.getpid()
# Counted from sequence numbers and the senders' own counts, on top of the message itself.
INFERRED = {"sequence_gap", "sender_side"}
HANDLER_REASONS = {"pid_mismatch", "unknown_sender", "bad_field"}


@pytest.fixture
def daemon(profilerd_env: dict[str, str]) -> Iterator[Daemon]:
    config, problems = load()
    assert problems == []
    instance = Daemon(config, RULES, gpu_backend=NoGpuBackend("no GPU in tests"))
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()


def accounted(daemon: Daemon) -> tuple[int, dict[str, int]]:
    """Messages the daemon has dealt with (accepted + dropped, inferred drops aside), and drops."""
    received, dropped = daemon.store.message_counts()
    total = sum(received.values()) + sum(v for k, v in dropped.items() if k not in INFERRED)
    return total, dropped


def expected_outcome(datagram: bytes) -> tuple[int, str | None]:
    """How many messages a datagram carries, and the wire reason it must be dropped for."""
    try:
        message = wire.decode(datagram)
    except wire.WireError as exc:
        return 1, exc.reason
    return (len(message.steps) if isinstance(message, wire.StepBatch) else 1), None


# ---- strategies ----------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
)
pids = st.sampled_from([PID, PID, PID, 1, 0, PID + 1, 2**31 - 1])
json_bodies = st.fixed_dictionaries(
    {"pid": pids},
    optional={
        "job": json_values | st.text(max_size=600),
        "run_id": json_values | st.just("../../../etc/passwd") | st.text(max_size=300),
        "rank": json_values | st.integers(-3, 3),
        "world_size": json_values,
        "argv": json_values | st.lists(st.text(max_size=700), max_size=40),
        "started_unix_s": json_values,
        "kind": json_values | st.just("exit"),
        "exit_code": json_values | st.integers(-20, 300),
        "hostname": json_values,
    },
)
json_kinds = st.sampled_from(sorted(wire.JSON_KINDS))
json_messages = st.builds(wire.encode_json, json_kinds, json_bodies)
step_floats = st.floats() | st.sampled_from([0.0, 0.01, -1.0, math.inf, math.nan, 1e7])


@st.composite
def fuzzed_steps(draw: st.DrawFn) -> bytes:
    """Step records with hostile values (NaN, inf, negative, absurd), alone or in a batch."""
    records = []
    for _ in range(draw(st.integers(1, 4))):
        seq = draw(st.integers(0, 2**32 - 1))
        floats = [draw(step_floats) for _ in range(7)]  # step and phase durations, sync seconds
        identity = (draw(pids) & 0xFFFFFFFF, draw(st.integers(-2, 2)), seq, draw(st.integers(0, 2**64 - 1)))
        end_unix_s = draw(st.floats(min_value=-1.0, max_value=2e9))
        dropped, flags = draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**32 - 1))
        signals = (0.0, 0.0, 0.0, 0.0, 0, floats[6], 0.0, 0, 0, 0)
        records.append(wire.pack_step_record(*identity, end_unix_s, *floats[:6], dropped, flags, *signals))
    return wire.encode_step_batch(records)


valid = json_messages | fuzzed_steps() | st.just(hello()) | st.just(step_batch(1, 3))


@st.composite
def truncated(draw: st.DrawFn) -> bytes:
    datagram = draw(valid)
    return datagram[: draw(st.integers(0, max(0, len(datagram) - 1)))]


@st.composite
def bit_flipped(draw: st.DrawFn) -> bytes:
    datagram = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(datagram) - 1))
        datagram[position] ^= 1 << draw(st.integers(0, 7))
    return bytes(datagram)


@st.composite
def wrong_header(draw: st.DrawFn) -> bytes:
    body = draw(valid)[wire.HEADER.size :]
    magic = draw(st.sampled_from([wire.MAGIC, b"XX", b"pf"]) | st.binary(min_size=2, max_size=2))
    version = draw(st.sampled_from([wire.VERSION, 0, 1, wire.VERSION + 1, 255]))
    kind = draw(st.integers(0, 255))
    return wire.HEADER.pack(magic, version, kind) + body


@st.composite
def bad_counts(draw: st.DrawFn) -> bytes:
    """A batch whose count disagrees with its length."""
    records = step_records(1, draw(st.integers(1, 3)))
    count = draw(st.integers(0, 2**16 - 1))
    header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.KIND_STEP_BATCH)
    return header + struct.pack("<H", count) + b"".join(records)


wrong_types = st.builds(
    lambda kind, body: wire.HEADER.pack(wire.MAGIC, wire.VERSION, kind) + json.dumps(body).encode(),
    json_kinds,
    json_values | st.fixed_dictionaries({"pid": st.sampled_from(["1", True, 1.5, None, [PID]])}),
)

datagrams = st.one_of(
    st.binary(max_size=300),
    valid,
    wrong_types,
    truncated(),
    bit_flipped(),
    wrong_header(),
    bad_counts(),
)


# ---- the socket ----------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(datagrams, min_size=1, max_size=5))
def test_fuzzed_datagrams_are_counted_by_reason_and_good_ones_still_flow(daemon: Daemon, batch: list[bytes]) -> None:
    path = str(daemon.config.socket_path)
    before, dropped_before = accounted(daemon)
    expected = 0
    reasons: dict[str, int] = {}
    for datagram in batch:
        count, reason = expected_outcome(datagram)
        expected += count
        if reason is not None:
            reasons[reason] = reasons.get(reason, 0) + count
    sentinel = int(time.monotonic_ns() & 0xFFFFFFF) + 1
    good = [hello(job="good", run_id="good"), wire.encode_step_batch(step_records(sentinel, 1))]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        for datagram in [*batch, *good]:
            sock.sendto(datagram, path)
    wait_for(lambda: accounted(daemon)[0] >= before + expected + 2, timeout=10, interval=0.002)
    total, dropped = accounted(daemon)
    assert total == before + expected + 2
    for reason, count in reasons.items():
        assert dropped.get(reason, 0) - dropped_before.get(reason, 0) == count, reason
    assert "internal_error" not in dropped
    rank = daemon.store.jobs["good"].ranks[0]
    assert rank.steps[-1].step == sentinel  # the good step arrived, after everything else
    assert daemon.ingest is not None and daemon.ingest.thread.is_alive()


@pytest.mark.parametrize("size", [wire.MAX_DATAGRAM_BYTES + 1, 150_000])
def test_oversized_datagrams_are_counted(daemon: Daemon, size: int) -> None:
    path = str(daemon.config.socket_path)
    body = wire.encode_json(wire.KIND_CONFIG, {"pid": PID, "pad": ""})
    oversized = body[:-2] + b"x" * (size - len(body)) + b'"}'
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * size)
        sock.sendto(oversized, path)
        sock.sendto(hello(), path)
    wait_for(lambda: daemon.store.received.get("hello") == 1)
    assert daemon.store.dropped == {"oversized": 1}


def _flood(path: str, duration_s: float, write_fd: int) -> None:  # pragma: no cover - child process
    """Blast good batches and garbage without blocking; report what got through."""
    rng = random.Random(7)
    sent = {"good": 0, "garbage": 0}
    eagain = 0
    seq = 1
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.connect(path)
    sock.setblocking(False)
    pid = os.getpid()
    sock.setblocking(True)
    sock.send(hello(pid, job="flood", run_id="flood"))
    sock.setblocking(False)
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        if rng.random() < 0.5:
            datagram, kind, n = step_batch(seq, 8, pid), "good", 8
        else:
            datagram, kind, n = rng.randbytes(rng.randrange(0, 200)), "garbage", 1
        try:
            sock.send(datagram)
        except BlockingIOError:
            eagain += 1
            continue
        sent[kind] += n
        if kind == "good":
            seq += 8
    os.write(write_fd, json.dumps({"sent": sent, "eagain": eagain, "pid": pid}).encode())
    os._exit(0)


def test_a_flood_is_accounted_for_and_the_live_view_keeps_answering(daemon: Daemon) -> None:
    path = str(daemon.config.socket_path)
    host, port = daemon.http_address
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_fd)
        try:
            _flood(path, 2.0, write_fd)
        finally:
            os._exit(1)
    os.close(write_fd)
    scrapes = []
    while os.waitpid(child, os.WNOHANG) == (0, 0):
        status, _ = http_get(f"http://{host}:{port}/metrics")
        scrapes.append(status)
        time.sleep(0.1)
    report = json.loads(os.read(read_fd, 4096))
    os.close(read_fd)
    sent = report["sent"]["good"] + report["sent"]["garbage"] + 1  # and the hello
    assert report["eagain"] > 0 or sent > 10_000  # it really was a flood
    wait_for(lambda: accounted(daemon)[0] == sent, timeout=10, what="every sent datagram accounted")
    assert daemon.store.received["step"] == report["sent"]["good"]
    assert scrapes and set(scrapes) == {200}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:  # still open for business
        sock.sendto(hello(job="after", run_id="after"), path)
        sock.sendto(step_batch(1, 2), path)
    wait_for(lambda: "after" in daemon.store.jobs and daemon.store.jobs["after"].ranks[0].steps_total == 2)
    assert "internal_error" not in daemon.store.dropped


# ---- HTTP ----------------------------------------------------------------------------------------
segments = st.text(max_size=12).map(lambda t: quote(t, safe=""))
queries = st.lists(st.tuples(st.sampled_from(["steps", "x", "", "steps[]"]), st.text(max_size=8)), max_size=3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prefix=st.sampled_from(["/api/v1/", "/api/v1/jobs/", "/api/v1/runs/", "/", "/api/v2/", "/metrics/"]),
    parts=st.lists(segments, max_size=3),
    query=queries,
)
def test_bad_api_paths_and_parameters_get_a_4xx_json_error(
    daemon: Daemon, prefix: str, parts: list[str], query: list[tuple[str, str]]
) -> None:
    host, port = daemon.http_address
    path = prefix + "/".join(parts)
    if query:
        path += "?" + "&".join(f"{quote(k)}={quote(v)}" for k, v in query)
    status, body = http_get(f"http://{host}:{port}{path}")
    if status != 200:
        document: Any = json.loads(body)
        assert 400 <= status < 500 and isinstance(document["error"], str), (path, status, body[:200])


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (b"FOO /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        (b"GET /api/v1/jobs HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 120 + b"\r\n", 431),
        (b"GET /api/v1/jobs/x?steps=1e9 HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /api/v1/jobs?" + b"&".join(b"a%d=1" % i for i in range(50)) + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ],
)
def test_malformed_http_requests_get_a_json_error(daemon: Daemon, request_bytes: bytes, status: int) -> None:
    with socket.create_connection(daemon.http_address, timeout=5) as conn:
        conn.sendall(request_bytes)
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
            if b"\r\n\r\n" in response and response.endswith(b"}"):
                break
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split()[1] == str(status).encode(), head
    assert "error" in json.loads(body)
