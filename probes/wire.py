"""The wire format between the probes and the daemon: one datagram per message.

This module is the single definition of the format; the probes encode with it and the daemon
decodes with it. It imports only the standard library because it runs inside training
processes.

Every datagram starts with a 4-byte header: the magic ``b"PF"``, the format version and the
message kind. Step records, the hot path, are a fixed binary struct (cheap to pack and to
unpack, ~0.3 µs each), sent in batches (one or more records of one sender per datagram);
rarer messages (hello, configuration, events) carry a JSON object.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from profilerd_probes.schema import (  # noqa: F401  (the flags, as the probes and the daemon know them)
    FLAG_FALLBACK_BOUNDARY,
    FLAG_GPU_BUSY_LOWER_BOUND,
    FLAG_GRAD_SCALER_SKIPPED,
    FLAG_HAS_GPU_TIMING,
    FLAG_HAS_GRAD_NORM,
    FLAG_HAS_LOSS,
    FLAG_HAS_LR,
    FLAG_HAS_SCALE,
    FLAG_LOSS_FIRST_NONFINITE,
    WIRE_DURATION_INDICES,
    WIRE_STEP_FORMAT,
    WIRE_STEP_INDEX,
    WIRE_STEP_NAMES,
    WIRE_UNSIGNED_LIMITS,
    check_fields,
)

MAGIC = b"PF"
VERSION = 3  # 2: step records carry the training signals; 3: and device-side timing
HEADER = struct.Struct("<2sBB")

KIND_HELLO = 1
# 2 was a single step record; steps travel only in batches (KIND_STEP_BATCH). Not reused.
KIND_CONFIG = 3
KIND_EVENT = 4
KIND_RUN_END = 5
KIND_STEP_BATCH = 6  # a u16 count, then that many step records
# Device timing of steps already sent without it (the first steps, never held): rows of
# [step, end_unix_s, comm_s, flags, *GPU_TIMING_FIELDS], keyed by the sender's pid and step.
KIND_STEP_TIMING = 7

JSON_KINDS: dict[int, str] = {
    KIND_HELLO: "hello",
    KIND_CONFIG: "config",
    KIND_EVENT: "event",
    KIND_RUN_END: "run_end",
    KIND_STEP_TIMING: "step_timing",
}

# The fields of a step record, in order, are the wire fields of schema.STEP_FIELDS.
STEP = struct.Struct(WIRE_STEP_FORMAT)
BATCH_COUNT = struct.Struct("<H")
_ZEROS = (0,) * len(WIRE_STEP_NAMES)

# Large enough for any configuration snapshot, small enough to fit the default AF_UNIX
# datagram limits with room to spare.
MAX_DATAGRAM_BYTES = 64 * 1024
MAX_BATCH_RECORDS = 32


class WireError(ValueError):
    """A datagram that cannot be decoded; ``reason`` is a short, stable label for metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class StepMessage:
    """One training step as timed by the probes, durations in seconds of host wall time."""

    pid: int
    rank: int
    seq: int
    step: int
    end_unix_s: float
    step_s: float
    data_wait_s: float
    forward_s: float
    backward_s: float
    optimizer_s: float
    comm_s: float
    sender_dropped: int
    flags: int
    loss: float = 0.0
    grad_norm: float = 0.0
    lr: float = 0.0
    scaler_scale: float = 0.0
    sync_count: int = 0
    sync_s: float = 0.0
    comm_total_s: float = 0.0
    graph_compiles: int = 0
    comm_ops: int = 0
    comm_bytes: int = 0
    gpu_busy_s: float = 0.0
    gpu_forward_s: float = 0.0
    gpu_backward_s: float = 0.0
    gpu_optimizer_s: float = 0.0
    gpu_idle_s: float = 0.0
    gpu_idle_data_wait_s: float = 0.0
    host_ahead_s: float = 0.0


check_fields(StepMessage, WIRE_STEP_NAMES)


@dataclass(frozen=True, slots=True)
class StepBatch:
    """Several step records of one sender in one datagram (the probes' normal form)."""

    steps: tuple[StepMessage, ...]


@dataclass(frozen=True, slots=True)
class JsonMessage:
    """A hello, config, event or run_end message; ``body`` always has an integer ``pid``."""

    kind: str
    body: dict[str, Any]


def pack_step_record(*values: float, **named: float) -> bytes:
    """One record without header (what a batch is made of): fields in table order, positionally
    or by name; those not given are 0, unsigned counters are clamped to their width."""
    record = [*values, *_ZEROS[len(values) :]]
    for name, value in named.items():
        record[WIRE_STEP_INDEX[name]] = value
    for index, limit in WIRE_UNSIGNED_LIMITS.items():
        record[index] = int(record[index]) & 0xFFFFFFFF if index in _WRAPPED else min(int(record[index]), limit)
    return STEP.pack(*record)


_WRAPPED = {WIRE_STEP_INDEX["pid"], WIRE_STEP_INDEX["seq"]}  # identities wrap, counters saturate


def encode_step_batch(records: list[bytes]) -> bytes:
    """Header, count, then records made with ``pack_step_record``."""
    return HEADER.pack(MAGIC, VERSION, KIND_STEP_BATCH) + BATCH_COUNT.pack(len(records)) + b"".join(records)


def _step(datagram: bytes, offset: int) -> StepMessage:
    fields = STEP.unpack_from(datagram, offset)
    message = StepMessage(*fields)
    durations = [fields[i] for i in WIRE_DURATION_INDICES]
    low, high = min(durations), max(durations)
    # NaN fails every comparison (and makes the sum NaN), so these reject it with negatives.
    if not low >= 0.0 or not high <= 1e6 or sum(durations) != sum(durations) or not message.end_unix_s > 0:
        raise WireError("bad_value", "negative, NaN or absurd duration")
    return message


def encode_json(kind: int, body: dict[str, Any]) -> bytes:
    if kind not in JSON_KINDS:
        raise ValueError(f"kind {kind} is not a JSON message kind")
    payload = json.dumps(body, separators=(",", ":"), default=str).encode()
    return HEADER.pack(MAGIC, VERSION, kind) + payload


def decode(datagram: bytes) -> StepBatch | JsonMessage:
    """Decode one datagram or raise WireError with a reason label."""
    if len(datagram) < HEADER.size:
        raise WireError("truncated", f"{len(datagram)} bytes is shorter than the header")
    if len(datagram) > MAX_DATAGRAM_BYTES:
        raise WireError("oversized", f"{len(datagram)} bytes")
    magic, version, kind = HEADER.unpack_from(datagram)
    if magic != MAGIC:
        raise WireError("bad_magic", repr(magic))
    if version != VERSION:
        raise WireError("bad_version", f"version {version}, expected {VERSION}")
    if kind == KIND_STEP_BATCH:
        if len(datagram) < HEADER.size + BATCH_COUNT.size:
            raise WireError("truncated", "batch without a count")
        (count,) = BATCH_COUNT.unpack_from(datagram, HEADER.size)
        start = HEADER.size + BATCH_COUNT.size
        if count == 0 or len(datagram) != start + count * STEP.size:
            raise WireError("truncated", f"batch of {count} records in {len(datagram)} bytes")
        return StepBatch(tuple(_step(datagram, start + i * STEP.size) for i in range(count)))
    if kind in JSON_KINDS:
        try:
            body = json.loads(datagram[HEADER.size :])
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            # ValueError covers bad JSON and integers too long to convert; RecursionError,
            # deeply nested arrays. Neither may escape to the daemon.
            raise WireError("malformed", f"{type(exc).__name__}: {str(exc)[:200]}") from None
        pid = body.get("pid") if isinstance(body, dict) else None
        if not isinstance(pid, int) or isinstance(pid, bool):
            raise WireError("bad_type", "JSON body must be an object with an integer pid")
        return JsonMessage(JSON_KINDS[kind], body)
    raise WireError("unknown_kind", f"kind {kind}")
