"""The verdict for people in a terminal: headline, fraction bar, findings, device, timeline, data quality."""

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
    if document.get("damaged"):
        header += " · DAMAGED RECORDING"
    lines.append(header)
    if document.get("damaged"):
        lines.append("  The recording is damaged; what follows is only what could be read:")
        lines.extend(
            textwrap.wrap("; ".join(document["damaged"]), width=100, initial_indent="    ", subsequent_indent="    ")
        )
    severity = document["severity"]
    lines.append(f"{document['summary']}" + (f"  [{severity}]" if document["primary"] != "none" else ""))
    if steps:
        f = document["fractions"]
        evidence = document.get("evidence") or {}
        confidence = (
            f" · confidence {evidence['confidence']:.2f} ({evidence['level']})" if evidence.get("level") else ""
        )
        lines.append(
            f"  {steps} steps over {document['duration_s']:.1f} s · {document['steps_per_s']:.1f} steps/s · "
            f"step time p50 {p50:.1f} ms, p95 {p95:.1f} ms{confidence}"
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
    """Every rule that fired, with its evidence and thresholds, and the minor fixes (for `report`)."""
    if not document.get("findings"):
        return ""
    lines = ["", "Rules that fired:"]
    for finding in document["findings"]:
        thresholds = ", ".join(f"{k} {v}" for k, v in finding["thresholds"].items())
        lines.append(
            f"  {finding['rule']} ({finding['category']}, {finding['severity']}, "
            f"confidence {finding['confidence']:.2f}): {finding['evidence']}  [thresholds: {thresholds}]"
        )
    minor = document.get("minor_recommendations") or []
    if minor:
        lines += ["", "Minor fixes (estimated too small to recommend):"]
        lines += [f"  {rec['title']}  ~{rec['estimated_speedup']:.2f}x  [{rec['id']}]" for rec in minor]
    return "\n".join(lines)


def device_summary(document: dict[str, Any]) -> str | None:
    """What the GPU did, on its own clock, and the MFU estimate: one line, None without either."""
    from profilerd.units import fmt_seconds

    device = document.get("device") or {}
    mfu = document.get("mfu") or {}
    parts = []
    if device.get("busy_fraction") is not None:
        ahead = device.get("host_ahead_s_p50")
        # A lower bound on busy (the GPU kept pace with the host) is stated as one.
        at_least, up_to = ("at least ", "up to ") if device.get("busy_is_lower_bound") else ("", "")
        parts.append(
            f"on the GPU's clock ({device['steps_timed']:,} of {device['steps']:,} steps): busy "
            f"{at_least}{device['busy_fraction']:.0%}, idle {up_to}{device['idle_fraction']:.0%} "
            f"({device['idle_data_wait_fraction']:.0%} while the loop waited for batches)"
            + (f", host {fmt_seconds(ahead) if ahead > 0 else '0 µs'} ahead" if ahead is not None else "")
        )
    if mfu:
        parts.append(
            f"MFU ≈ {mfu['mfu']:.0%} (estimate: {mfu['achieved_tflops']:.1f} of {mfu['peak_tflops']:g} "
            f"TFLOP/s {mfu['dtype']} on {mfu['device']})"
        )
    return "; ".join(parts) if parts else None


def render_device(document: dict[str, Any]) -> str:
    line = device_summary(document)
    return f"\n\n{textwrap.fill(line[0].upper() + line[1:], 100)}" if line else ""


def render_timeline(document: dict[str, Any]) -> str:
    """Step time and data-wait share over the run as sparklines (from the ``timeseries`` summary)."""
    from profilerd.report.charts import fmt_duration, sparkline  # numpy: only when there is a timeline

    timeseries = document.get("timeseries") or {}
    series = timeseries.get("series") or {}
    if not series.get("step_time_s"):
        return ""
    span = fmt_duration(timeseries["bucket_s"] * timeseries["buckets"])
    lines = ["", "", f"Over the run (0:00 → {span}, {timeseries['bucket_s']:g} s per character):"]
    for key, label, fmt in (
        ("step_time_s", "step time", lambda v: f"{v * 1000:.1f} ms"),
        ("data_wait_ratio", "data wait", lambda v: f"{v:.0%}"),
        ("gpu_utilization_ratio", "GPU util", lambda v: f"{v:.0%}"),
    ):
        entry = series.get(key)
        if not entry or entry.get("min") is None:
            continue
        lines.append(f"  {label:10} {sparkline(entry['values'])}  {fmt(entry['min'])} – {fmt(entry['max'])}")
    return "\n".join(lines)


def render_quality(document: dict[str, Any]) -> str:
    """Data-quality facts and notes, in a few lines; empty for a complete, clean recording."""
    quality = document.get("data_quality") or {}
    if not quality:
        return ""
    lines = []
    lost = quality.get("missing_steps", 0)
    gaps = quality.get("gaps", {}).get("count", 0)
    clock = quality.get("clock", {})
    facts = []
    if lost:
        facts.append(f"{lost} step record(s) lost ({quality.get('missing_steps_ratio') or 0:.2%})")
    if gaps:
        facts.append(
            f"{gaps} gap(s) over {quality['gaps']['threshold_s']:g} s, {quality['gaps']['total_s']:.3g} s in all"
        )
    for name, stats in (quality.get("samplers") or {}).items():
        if stats.get("gaps"):
            facts.append(f"{name} sampler: {stats['gaps']} gap(s), longest {stats['longest_gap_s']:g} s")
    if clock.get("aligned"):
        offsets = ", ".join(
            f"{s.get('hostname') or s['run_id']} {s['offset_s']:+.3f} s" for s in clock.get("sources", [])
        )
        facts.append(f"clocks of {clock['nodes']} nodes aligned ({offsets})")
    if document.get("damaged"):
        facts.insert(0, f"recording DAMAGED ({quality.get('state')})")
    if facts or quality.get("notes"):
        lines += ["", "", "Data quality: " + ("; ".join(facts) if facts else f"recording {quality.get('state')}")]
        for note in quality.get("notes", []):
            lines.extend(textwrap.wrap(f"note: {note}", width=100, initial_indent="  ", subsequent_indent="        "))
    return "\n".join(lines)


# ---- the `report` and `diff` commands' work, kept out of the CLI module ------------------------------
