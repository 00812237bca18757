"""Step datagrams for tests that stand in for the probes."""

from __future__ import annotations

from profilerd_probes import wire


def step_datagram(**fields: float) -> bytes:
    """One step record, its fields by name (those not given are 0), sent as the probes send
    steps: in a batch (here of one)."""
    return wire.encode_step_batch([wire.pack_step_record(**fields)])
