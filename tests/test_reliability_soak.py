"""A short soak (16 ranks x 100 steps/s x 10 s against `profilerd serve`): every message is
accounted for and the daemon stays within its window. The full 64-rank, 60-second soak and its
figures are in benchmarks/bench_soak.py and benchmarks/README.md."""

from __future__ import annotations

import pytest

from benchmarks.bench_soak import run_soak

pytestmark = pytest.mark.slow
WINDOW_STEPS = 100
MIB = 2**20


def test_short_soak_accounts_for_every_message_and_stays_within_its_window() -> None:
    result = run_soak(ranks=16, rate=100.0, duration_s=10.0, window_steps=WINDOW_STEPS)
    received, dropped = result["received"], result["dropped"]
    # received + dropped, as the daemon's own counters tell it, is what the ranks sent
    assert result["accounted"] == result["attempted"], (received, dropped, result["attempted"])
    assert dropped.get("sender_side", 0) == result["sender_dropped"]
    assert set(dropped) <= {"sender_side"}  # no gap, no unknown sender, nothing malformed
    assert received["hello"] == 16
    assert result["recorded_step_rows"] == received["step"]  # and every step received is recorded
    # bounds: every rank's ring is full and no larger; memory levels off once the rings are full
    assert result["ring_count"] == 16 and result["ring_min"] == result["ring_max"] == WINDOW_STEPS
    assert result["rss_end_bytes"] - result["rss_warm_bytes"] < 16 * MIB
    assert result["daemon_exit_code"] == 0 and result["daemon_warnings"] == []
