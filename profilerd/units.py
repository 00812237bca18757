"""Quantities written for people, shared by the analysis' evidence and the reports."""

from __future__ import annotations

import math


def fmt_seconds(value: float) -> str:
    """A duration for people: 850 µs, 85 ms, 1.35 s, 2.5 min."""
    if not math.isfinite(value):
        return "–"
    if value == 0:
        return "0"
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1.0:
        return f"{value * 1e3:.3g} ms"
    if value < 120:
        return f"{value:.3g} s"
    return f"{value / 60:.3g} min"
