"""The step record's one field table: the wire struct, the recording's columns and the frame's.

Everything that lists a step record's fields is derived from ``STEP_FIELDS``: the probes' binary
struct (``probes/wire.py``), the SQLite DDL and insert of a recording (``profilerd/recordings/schema.py``),
the columns of the analysis frame (``profilerd/analysis/features.py``) and the daemon's
message-to-record conversion (``profilerd/samplers/ingest.py``). A new field is one new row here
(appended, so that older positional callers and older recordings keep working) plus its
attribute on the two typed records, which are checked against this table at import.

Standard library only: this module is imported inside training processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Term(str, Enum):
    """A term of the shared vocabulary: a str that equals, hashes, formats and encodes to JSON as
    its value, so a document or a frame column is the same with the member or the plain string
    (``enum.StrEnum`` does this from Python 3.11; the probes run on 3.10)."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self.value, spec)


class Phase(Term):
    """The phases a step is split into; each but ``other`` is a ``<phase>_s`` field of the record
    (``communication`` is ``comm_s``), ``other`` is the rest of the step."""

    DATA_WAIT = "data_wait"
    FORWARD = "forward"
    BACKWARD = "backward"
    OPTIMIZER = "optimizer"
    COMMUNICATION = "communication"
    OTHER = "other"

    @property
    def column(self) -> str:
        """The seconds of this phase: its step field, or the analysis frame's ``other_s``."""
        return "comm_s" if self is Phase.COMMUNICATION else f"{self.value}_s"


FLAG_FALLBACK_BOUNDARY = 1  # the step was delimited without optimizer hooks
FLAG_GRAD_SCALER_SKIPPED = 2  # GradScaler found inf/NaN gradients and skipped optimizer.step()
FLAG_HAS_LOSS = 4
FLAG_HAS_GRAD_NORM = 8
FLAG_HAS_LR = 16
FLAG_HAS_SCALE = 32
# The first step whose loss is NaN or inf (after finite losses, or none): where divergence began.
# The loss is read at every step for the first 200 steps and while it stays non-finite.
FLAG_LOSS_FIRST_NONFINITE = 64
# The gpu_* and host_ahead_s fields hold device-side timing from CUDA events (see docs/concepts.md).
FLAG_HAS_GPU_TIMING = 128
# The device kept pace with the host for part of the step, so gpu_busy_s is a lower bound (and
# gpu_idle_s an upper bound): kernels run between the host's launches are not seen by the markers.
FLAG_GPU_BUSY_LOWER_BOUND = 256


@dataclass(frozen=True, slots=True)
class Field:
    """One field of the step record.

    ``wire`` is its struct code in a probe datagram (None: the daemon adds it); ``sql`` its column
    type in a recording (None: transport only, not stored); ``flag``, when set, is the wire flag
    without which the value is unknown (``None`` in the record, NULL in the recording).
    """

    name: str
    wire: str | None
    sql: str | None
    unit: str
    flag: int = 0


STEP_FIELDS: tuple[Field, ...] = (
    Field("pid", "I", "INTEGER", "pid"),
    Field("rank", "i", "INTEGER", "rank"),
    Field("seq", "I", None, "count"),  # per-sender sequence number: loss detection only
    Field("step", "Q", "INTEGER", "count"),
    Field("end_unix_s", "d", "REAL", "unix_s"),
    Field("step_s", "d", "REAL", "s"),
    Field("data_wait_s", "d", "REAL", "s"),
    Field("forward_s", "d", "REAL", "s"),
    Field("backward_s", "d", "REAL", "s"),
    Field("optimizer_s", "d", "REAL", "s"),
    Field("comm_s", "d", "REAL", "s"),
    Field("sender_dropped", "I", None, "count"),
    Field("flags", "I", "INTEGER", "bits"),
    Field("loss", "d", "REAL", "", FLAG_HAS_LOSS),  # NaN and inf are legitimate values here
    Field("grad_norm", "d", "REAL", "", FLAG_HAS_GRAD_NORM),
    Field("lr", "d", "REAL", "", FLAG_HAS_LR),
    Field("scaler_scale", "d", "REAL", "", FLAG_HAS_SCALE),
    Field("sync_count", "I", "INTEGER", "count"),
    Field("sync_s", "d", "REAL", "s"),
    Field("comm_total_s", "d", "REAL", "s"),
    Field("graph_compiles", "I", "INTEGER", "count"),
    Field("comm_ops", "I", "INTEGER", "count"),
    Field("comm_bytes", "Q", "INTEGER", "bytes"),
    # Device-side timing (wire version 3), seconds of device time mapped onto the host clock.
    Field("gpu_busy_s", "d", "REAL", "s", FLAG_HAS_GPU_TIMING),
    Field("gpu_forward_s", "d", "REAL", "s", FLAG_HAS_GPU_TIMING),
    Field("gpu_backward_s", "d", "REAL", "s", FLAG_HAS_GPU_TIMING),
    Field("gpu_optimizer_s", "d", "REAL", "s", FLAG_HAS_GPU_TIMING),
    Field("gpu_idle_s", "d", "REAL", "s", FLAG_HAS_GPU_TIMING),
    Field("gpu_idle_data_wait_s", "d", "REAL", "s", FLAG_HAS_GPU_TIMING),
    Field("host_ahead_s", "d", "REAL", "s", FLAG_HAS_GPU_TIMING),
)

WIRE_STEP_FIELDS = tuple(f for f in STEP_FIELDS if f.wire is not None)
WIRE_STEP_NAMES = tuple(f.name for f in WIRE_STEP_FIELDS)
WIRE_STEP_FORMAT = "<" + "".join(f.wire for f in WIRE_STEP_FIELDS if f.wire is not None)
# Where each field sits in a packed record, for the probe filling a record in place.
WIRE_STEP_INDEX = {name: i for i, name in enumerate(WIRE_STEP_NAMES)}
# Seconds that the daemon checks are non-negative, finite and not absurd.
WIRE_DURATION_INDICES = tuple(i for i, f in enumerate(WIRE_STEP_FIELDS) if f.unit == "s")
# Unsigned integer fields and their largest value (a counter that overflows is clamped, not lost).
WIRE_UNSIGNED_LIMITS = {
    i: (1 << (8 * {"I": 4, "Q": 8}[f.wire])) - 1 for i, f in enumerate(WIRE_STEP_FIELDS) if f.wire in ("I", "Q")
}

# The recording's steps table and the analysis frame: the stored fields, in this order.
STORED_STEP_FIELDS = tuple(f for f in STEP_FIELDS if f.sql is not None)
STEP_COLUMNS = tuple(f.name for f in STORED_STEP_FIELDS)
INTEGER_STEP_COLUMNS = frozenset(f.name for f in STORED_STEP_FIELDS if f.sql == "INTEGER")
GPU_TIMING_FIELDS = tuple(f.name for f in STEP_FIELDS if f.flag == FLAG_HAS_GPU_TIMING)


def steps_ddl() -> str:
    return "CREATE TABLE IF NOT EXISTS steps (" + ", ".join(f"{f.name} {f.sql}" for f in STORED_STEP_FIELDS) + ")"


def steps_insert() -> str:
    """Columns named, so a recording created by an older schema (other column order) takes it."""
    return f"INSERT INTO steps ({', '.join(STEP_COLUMNS)}) VALUES ({','.join('?' * len(STEP_COLUMNS))})"


def check_fields(cls: type, names: tuple[str, ...], extra: tuple[str, ...] = ()) -> None:
    """Fail at import when a typed record and the table disagree (a field added to one only)."""
    declared = tuple(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    if set(declared) != set(names) | set(extra):
        missing = sorted(set(names) - set(declared))
        unknown = sorted(set(declared) - set(names) - set(extra))
        raise RuntimeError(f"{cls.__name__} disagrees with the step field table: missing {missing}, unknown {unknown}")
