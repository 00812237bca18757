"""Rendering a verdict for people (text) and programs (JSON)."""

from __future__ import annotations

import textwrap
from typing import Any

BAR_WIDTH = 40
_BAR_CHARS = {"data_wait": "D", "compute": "C", "communication": "N", "other": "o"}


def fraction_bar(fractions: dict[str, float], width: int = BAR_WIDTH) -> str:
    """A stacked bar, e.g. [DDDDDDDDCCo...]: one letter per phase, lengths by share."""
    cells = []
    for key, char in _BAR_CHARS.items():
        cells.append(char * round(fractions.get(key, 0.0) * width))
    bar = "".join(cells)[:width]
    return f"[{bar.ljust(width, ' ')}]"


def render_text(document: dict[str, Any], top: int = 3) -> str:
    """The verdict JSON document as a short, readable summary."""
    lines = []
    steps = document["steps"]
    p50 = document["step_time_s"]["p50"] * 1000
    p95 = document["step_time_s"]["p95"] * 1000
    header = f"profilerd · run {document['run_id']}"
    if document.get("exit_code") not in (None, 0):
        header += f" · exit code {document['exit_code']}"
    lines.append(header)
    severity = document["severity"]
    lines.append(f"{document['summary']}" + (f"  [{severity}]" if document["primary"] != "none" else ""))
    if steps:
        f = document["fractions"]
        lines.append(
            f"  {steps} steps over {document['duration_s']:.1f} s · {document['steps_per_s']:.1f} steps/s · "
            f"step time p50 {p50:.1f} ms, p95 {p95:.1f} ms"
        )
        lines.append(
            f"  {fraction_bar(f)} data wait {f['data_wait']:.0%} · compute {f['compute']:.0%} · "
            f"communication {f['communication']:.0%} · other {f['other']:.0%}"
        )
    recommendations = document.get("recommendations", [])[:top]
    if recommendations:
        lines.append("")
        lines.append("Recommendations (estimated whole-step speedup):")
        for number, rec in enumerate(recommendations, 1):
            lines.append(f"  {number}. {rec['title']}  ~{rec['estimated_speedup']:.2f}x  [{rec['id']}]")
            if rec.get("why"):
                lines.extend(
                    textwrap.wrap(
                        f"why: {rec['why']}", width=96, initial_indent="     ", subsequent_indent="          "
                    )
                )
            lines.append(textwrap.indent(rec["how"], "       | "))
    elif document["primary"] != "none":
        lines.append("No recommendations: nothing measured points to a cheaper way to run this job.")
    if document.get("per_rank"):
        lines.append("")
        lines.append("Per rank:")
        for rank in document["per_rank"]:
            rf = rank["fractions"]
            lines.append(
                f"  rank {rank['rank']}: {rank['steps']} steps, p50 {rank['step_time_s']['p50'] * 1000:.1f} ms, "
                f"data wait {rf['data_wait']:.0%}, compute {rf['compute']:.0%}, comm {rf['communication']:.0%}"
            )
    if document.get("recording"):
        lines.append("")
        lines.append(f"Recorded in {document['recording']}  (profilerd report {document['run_id']})")
    return "\n".join(lines)


def render_findings(document: dict[str, Any]) -> str:
    """Every rule that fired, with its evidence and thresholds (for `report`)."""
    if not document.get("findings"):
        return ""
    lines = ["", "Rules that fired:"]
    for finding in document["findings"]:
        thresholds = ", ".join(f"{k} {v}" for k, v in finding["thresholds"].items())
        lines.append(
            f"  {finding['rule']} ({finding['category']}, {finding['severity']}, "
            f"confidence {finding['confidence']:.2f}): {finding['evidence']}  [thresholds: {thresholds}]"
        )
    return "\n".join(lines)
