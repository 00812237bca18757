"""The wire format between probes and daemon: what encodes decodes back, and every bad datagram is
refused with a stable reason label (the daemon counts drops by it) and never anything else."""

from __future__ import annotations

import json
import math
import socket
import struct
from dataclasses import fields

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from profilerd_probes import wire

HEADER_BATCH = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.KIND_STEP_BATCH)
BATCH_OF_ONE_SIZE = wire.HEADER.size + wire.BATCH_COUNT.size + wire.STEP.size
DURATION_FIELDS = (
    "step_s",
    "data_wait_s",
    "forward_s",
    "backward_s",
    "optimizer_s",
    "comm_s",
    "sync_s",
    "comm_total_s",
)


def step_kwargs(**overrides):
    values = {
        "pid": 4242,
        "rank": 3,
        "seq": 17,
        "step": 1000,
        "end_unix_s": 1_700_000_000.25,
        "step_s": 0.5,
        "data_wait_s": 0.1,
        "forward_s": 0.15,
        "backward_s": 0.2,
        "optimizer_s": 0.04,
        "comm_s": 0.01,
        "sender_dropped": 2,
        "flags": wire.FLAG_FALLBACK_BOUNDARY,
    }
    values.update(overrides)
    return values


def encode(**kwargs) -> bytes:
    kw = dict(kwargs)
    positional = [
        kw.pop(name)
        for name in (
            "pid",
            "rank",
            "seq",
            "step",
            "end_unix_s",
            "step_s",
            "data_wait_s",
            "forward_s",
            "backward_s",
            "optimizer_s",
            "comm_s",
            "sender_dropped",
            "flags",
        )
    ]
    return wire.encode_step_batch([wire.pack_step_record(*positional, **kw)])  # as the probes send a step


def only_step(datagram: bytes) -> wire.StepMessage:
    """The one step record of a batch of one."""
    message = wire.decode(datagram)
    assert isinstance(message, wire.StepBatch) and len(message.steps) == 1, message
    return message.steps[0]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def json_datagram(kind: int, payload: bytes) -> bytes:
    return wire.HEADER.pack(wire.MAGIC, wire.VERSION, kind) + payload


def reason_of(datagram: bytes) -> str:
    with pytest.raises(wire.WireError) as info:
        wire.decode(datagram)
    return info.value.reason


# ---- round trips ----------------------------------------------------------------------------------
def test_step_round_trip():
    kwargs = step_kwargs()
    message = only_step(encode(**kwargs))
    for name, value in kwargs.items():
        assert getattr(message, name) == value, name


def test_step_header_layout_is_magic_version_kind():
    datagram = encode(**step_kwargs())
    assert datagram[:2] == b"PF"
    assert datagram[2] == wire.VERSION
    assert datagram[3] == wire.KIND_STEP_BATCH
    assert wire.BATCH_COUNT.unpack_from(datagram, wire.HEADER.size) == (1,)
    assert len(datagram) == BATCH_OF_ONE_SIZE


def test_a_batch_keeps_its_records_in_order_and_the_largest_fits_a_datagram():
    """The probes send up to MAX_BATCH_RECORDS steps of one sender per datagram."""
    records = [wire.pack_step_record(**step_kwargs(seq=seq, step=seq)) for seq in range(wire.MAX_BATCH_RECORDS)]
    datagram = wire.encode_step_batch(records)
    message = wire.decode(datagram)
    assert isinstance(message, wire.StepBatch)
    assert [step.seq for step in message.steps] == list(range(wire.MAX_BATCH_RECORDS))
    assert len(datagram) <= wire.MAX_DATAGRAM_BYTES
    assert reason_of(datagram[:-1]) == "truncated"  # a record cut short loses the whole batch, named


def test_step_signals_round_trip_and_may_be_nan_or_inf():
    signals = {
        "loss": float("nan"),  # a diverged run still reports its steps
        "grad_norm": float("inf"),
        "lr": 3e-4,
        "scaler_scale": 65536.0,
        "sync_count": 7,
        "sync_s": 0.003,
        "comm_total_s": 0.02,
        "graph_compiles": 2,
        "comm_ops": 5,
        "comm_bytes": 2**40,
    }
    flags = wire.FLAG_HAS_LOSS | wire.FLAG_HAS_GRAD_NORM | wire.FLAG_HAS_LR | wire.FLAG_HAS_SCALE
    message = only_step(encode(**step_kwargs(flags=flags), **signals))
    assert message.flags == flags
    for name, value in signals.items():
        assert same(getattr(message, name), value), name


def test_counters_wrap_or_saturate_instead_of_failing_the_probe():
    message = only_step(encode(**step_kwargs(pid=2**32 + 5, seq=2**32 + 9, sender_dropped=2**40)))
    assert message.pid == 5
    assert message.seq == 9  # the daemon detects gaps modulo 2**32
    assert message.sender_dropped == 2**32 - 1


finite_s = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)
u32 = st.integers(0, 2**32 - 1)


@settings(max_examples=200, deadline=None)
@given(
    pid=u32,
    rank=st.integers(-(2**31), 2**31 - 1),
    seq=u32,
    step=st.integers(0, 2**64 - 1),
    end_unix_s=st.floats(min_value=1e-3, max_value=1e10),
    step_s=finite_s,
    data_wait_s=finite_s,
    forward_s=finite_s,
    backward_s=finite_s,
    optimizer_s=finite_s,
    comm_s=finite_s,
    sender_dropped=u32,
    flags=u32,
    loss=any_float,
    grad_norm=any_float,
    lr=any_float,
    scaler_scale=any_float,
    sync_count=u32,
    sync_s=finite_s,
    comm_total_s=finite_s,
    graph_compiles=u32,
    comm_ops=u32,
    comm_bytes=st.integers(0, 2**64 - 1),
)
def test_any_valid_step_round_trips(**kwargs):
    message = only_step(encode(**kwargs))
    for name, value in kwargs.items():
        got = getattr(message, name)
        assert same(got, value) if isinstance(value, float) else got == value, name


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (wire.KIND_HELLO, "hello"),
        (wire.KIND_CONFIG, "config"),
        (wire.KIND_EVENT, "event"),
        (wire.KIND_RUN_END, "run_end"),
    ],
)
def test_json_round_trip(kind, name):
    body = {
        "pid": 99,
        "job": "jöb-✓",
        "nested": {"list": [1, 2.5, None, True], "empty": {}},
        "argv": ["train.py", "--lr", "0.1"],
    }
    message = wire.decode(wire.encode_json(kind, body))
    assert message == wire.JsonMessage(name, body)


def test_json_values_that_json_cannot_encode_are_sent_as_text():
    from pathlib import PurePosixPath

    message = wire.decode(wire.encode_json(wire.KIND_CONFIG, {"pid": 1, "path": PurePosixPath("/data"), "ids": {3}}))
    assert message.body == {"pid": 1, "path": "/data", "ids": "{3}"}


def test_encode_json_refuses_the_step_kind():
    with pytest.raises(ValueError):
        wire.encode_json(wire.KIND_STEP_BATCH, {"pid": 1})


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(sorted(wire.JSON_KINDS)),
    body=st.dictionaries(
        st.text(max_size=8),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**63)
            | st.floats(allow_nan=False)
            | st.text(max_size=16),
            lambda children: (
                st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
            ),
            max_leaves=12,
        ),
        max_size=6,
    ),
    pid=st.integers(0, 2**31),
)
def test_any_json_body_with_pid_round_trips(kind, body, pid):
    body = {**body, "pid": pid}
    assert wire.decode(wire.encode_json(kind, body)) == wire.JsonMessage(wire.JSON_KINDS[kind], body)


def test_largest_datagram_is_accepted_and_fits_an_af_unix_socket():
    padding = wire.MAX_DATAGRAM_BYTES - len(json_datagram(wire.KIND_CONFIG, b'{"pid":1,"x":""}'))
    datagram = wire.encode_json(wire.KIND_CONFIG, {"pid": 1, "x": "a" * padding})
    assert len(datagram) == wire.MAX_DATAGRAM_BYTES
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        a.send(datagram)
        received = b.recv(wire.MAX_DATAGRAM_BYTES + 1)
    assert wire.decode(received).body["x"] == "a" * padding


# ---- bad datagrams --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (b"", "truncated"),
        (b"PF\x01", "truncated"),
        (HEADER_BATCH, "truncated"),
        (HEADER_BATCH + wire.BATCH_COUNT.pack(1) + b"\x00" * 40, "truncated"),
        (HEADER_BATCH + wire.BATCH_COUNT.pack(0), "truncated"),
        # Kind 2 was a single step record: retired, not read as anything.
        (b"PF" + bytes([wire.VERSION, 2]) + wire.pack_step_record(**step_kwargs()), "unknown_kind"),
        (b"PF\x01\x03" + b" " * wire.MAX_DATAGRAM_BYTES, "oversized"),
        (b"XX" + bytes([wire.VERSION, wire.KIND_HELLO]) + b'{"pid":1}', "bad_magic"),
        (b"pf" + bytes([wire.VERSION, wire.KIND_HELLO]) + b'{"pid":1}', "bad_magic"),
        (b"PF" + bytes([wire.VERSION + 1, wire.KIND_HELLO]) + b'{"pid":1}', "bad_version"),
        (b"PF\x00" + bytes([wire.KIND_HELLO]) + b'{"pid":1}', "bad_version"),
        (b"PF" + bytes([wire.VERSION, 0]) + b'{"pid":1}', "unknown_kind"),
        (b"PF" + bytes([wire.VERSION, 8]) + b'{"pid":1}', "unknown_kind"),
        (b"PF" + bytes([wire.VERSION, 255]) + b'{"pid":1}', "unknown_kind"),
        (json_datagram(wire.KIND_HELLO, b""), "malformed"),
        (json_datagram(wire.KIND_HELLO, b'{"pid": 1'), "malformed"),
        (json_datagram(wire.KIND_CONFIG, b'{"pid": 1} trailing'), "malformed"),
        (json_datagram(wire.KIND_EVENT, b"\xff\xfe\xfa not utf-8"), "malformed"),
        (json_datagram(wire.KIND_EVENT, b'{"pid": 1, "x": "\xc3\x28"}'), "malformed"),
        (json_datagram(wire.KIND_HELLO, b"[1, 2]"), "bad_type"),
        (json_datagram(wire.KIND_HELLO, b'"hello"'), "bad_type"),
        (json_datagram(wire.KIND_HELLO, b"12"), "bad_type"),
        (json_datagram(wire.KIND_HELLO, b"null"), "bad_type"),
        (json_datagram(wire.KIND_HELLO, b"{}"), "bad_type"),
        (json_datagram(wire.KIND_RUN_END, b'{"run_id": "x"}'), "bad_type"),
        (json_datagram(wire.KIND_CONFIG, b'{"pid": "12"}'), "bad_type"),
        (json_datagram(wire.KIND_CONFIG, b'{"pid": 12.0}'), "bad_type"),
        (json_datagram(wire.KIND_CONFIG, b'{"pid": null}'), "bad_type"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_datagram_reason(datagram, reason):
    assert reason_of(datagram) == reason


def test_step_record_longer_than_the_format_is_refused():
    with pytest.raises(wire.WireError):
        wire.decode(encode(**step_kwargs()) + b"\x00")


@pytest.mark.parametrize("value", [-1.0, -1e-9, float("nan"), float("inf"), 1e7])
@pytest.mark.parametrize("name", DURATION_FIELDS)
def test_bad_duration_is_bad_value(name, value):
    assert reason_of(encode(**step_kwargs(**{name: value}))) == "bad_value"


@pytest.mark.parametrize("end_unix_s", [0.0, -5.0, float("nan")])
def test_bad_end_time_is_bad_value(end_unix_s):
    assert reason_of(encode(**step_kwargs(end_unix_s=end_unix_s))) == "bad_value"


def test_wire_error_is_a_value_error_with_reason_in_message():
    with pytest.raises(ValueError, match="bad_magic"):
        wire.decode(b"ZZ\x01\x01{}")


def test_deeply_nested_json_is_malformed_not_a_crash():
    datagram = json_datagram(wire.KIND_CONFIG, b"[" * 60_000)
    assert len(datagram) <= wire.MAX_DATAGRAM_BYTES
    assert reason_of(datagram) == "malformed"


def test_huge_integer_in_json_is_malformed_not_a_crash():
    datagram = json_datagram(wire.KIND_HELLO, b'{"pid": 1, "x": ' + b"9" * 5000 + b"}")
    assert reason_of(datagram) == "malformed"


def test_boolean_pid_is_bad_type():
    assert reason_of(json_datagram(wire.KIND_HELLO, b'{"pid": true}')) == "bad_type"


# ---- fuzz -----------------------------------------------------------------------------------------
def _check_decoded(datagram: bytes) -> None:
    try:
        message = wire.decode(datagram)
    except wire.WireError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return
    if isinstance(message, wire.StepBatch):
        assert len(datagram) == wire.HEADER.size + wire.BATCH_COUNT.size + len(message.steps) * wire.STEP.size
        for step in message.steps:
            for name in DURATION_FIELDS:
                value = getattr(step, name)
                assert 0.0 <= value <= 1e6, name
            assert step.end_unix_s > 0
    else:
        assert isinstance(message, wire.JsonMessage)
        assert message.kind in wire.JSON_KINDS.values()
        assert isinstance(message.body, dict) and isinstance(message.body["pid"], int)


headers = st.builds(
    lambda magic, version, kind: struct.pack("<2sBB", magic, version, kind),
    st.sampled_from([wire.MAGIC, b"PX", b"\x00\x00"]),
    st.sampled_from([wire.VERSION, wire.VERSION, 0, 1, 255]),
    st.integers(0, 7),
)
json_texts = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
).map(lambda value: json.dumps(value).encode())
step_records = st.builds(
    lambda record, flips: bytes(b ^ f for b, f in zip(record, flips + bytes(len(record)), strict=False)),
    st.just(encode(**step_kwargs())),
    st.binary(max_size=BATCH_OF_ONE_SIZE),
)
datagrams = st.one_of(
    st.binary(max_size=256),
    st.builds(bytes.__add__, headers, st.binary(max_size=256)),
    st.builds(bytes.__add__, headers, json_texts),
    st.builds(bytes.__add__, headers, st.binary(min_size=wire.STEP.size, max_size=wire.STEP.size)),
    step_records,
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datagrams)
def test_decode_returns_a_message_or_raises_wire_error(datagram):
    _check_decoded(datagram)


def test_step_message_fields_match_the_struct():
    """Every field of the record is a field of StepMessage, in order (one definition, one format)."""
    names = [f.name for f in fields(wire.StepMessage)]
    values = wire.STEP.unpack_from(encode(**step_kwargs()), wire.HEADER.size + wire.BATCH_COUNT.size)
    assert len(names) == len(values)
    assert names[:13] == [
        "pid",
        "rank",
        "seq",
        "step",
        "end_unix_s",
        *DURATION_FIELDS[:6],
        "sender_dropped",
        "flags",
    ]


# ---- the one field table (probes/schema.py) ---------------------------------------------------------
def test_every_field_of_the_table_round_trips_by_name() -> None:
    """Each wire field gets a distinct value; each comes back under its own name, so no two places
    can disagree about the order."""
    from profilerd_probes.schema import WIRE_STEP_FIELDS

    values = {f.name: (i + 1) * (0.25 if f.wire == "d" else 1) for i, f in enumerate(WIRE_STEP_FIELDS)}
    values["end_unix_s"] = 1.7e9
    message = only_step(wire.encode_step_batch([wire.pack_step_record(**values)]))
    assert {name: getattr(message, name) for name in values} == values


def test_a_record_type_that_disagrees_with_the_table_fails_at_import() -> None:
    from dataclasses import dataclass

    from profilerd_probes.schema import STEP_COLUMNS, check_fields

    @dataclass
    class Partial:
        step: int
        surplus: float

    with pytest.raises(RuntimeError, match=r"missing \[.*'step_s'.*\], unknown \['surplus'\]"):
        check_fields(Partial, STEP_COLUMNS)


def test_the_recordings_steps_table_has_the_tables_columns(tmp_path) -> None:
    from profilerd.recordings.writer import open_recording
    from profilerd_probes.schema import STEP_COLUMNS

    conn = open_recording(tmp_path / "r.sqlite")
    assert tuple(row[1] for row in conn.execute("PRAGMA table_info(steps)")) == STEP_COLUMNS
    conn.close()


def test_device_timing_fields_are_refused_when_negative_or_nan() -> None:
    for bad in (-0.001, math.nan, 1e9):
        with pytest.raises(wire.WireError) as info:
            wire.decode(encode(**step_kwargs(flags=wire.FLAG_HAS_GPU_TIMING, gpu_idle_s=bad)))
        assert info.value.reason == "bad_value"
