"""The HTML report: one self-contained file to read, share and act on.

Everything is inline: CSS in a <style> element, charts as SVG drawn by :mod:`profilerd.report.charts`.
There is no script and no external resource, and a Content-Security-Policy that forbids both,
so the file opens offline, in a mail attachment or a CI artifact viewer, and never calls home.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from html import escape
from typing import Any

import numpy as np
import pandas as pd

from profilerd import __version__
from profilerd.analysis.document import STRAGGLER_RULE, headline_of, statement_of, straggler_of
from profilerd.recordings.timeline import ReportData
from profilerd.report import charts
from profilerd.report.charts import Band, Layer, Line, Mark, fmt_duration, fmt_ratio
from profilerd.report.text import device_summary
from profilerd.units import fmt_seconds

PHASES = (
    ("data_wait_s", "data wait", "#e4572e"),
    ("forward_s", "forward", "#2f6db5"),
    ("backward_s", "backward", "#5b9bd5"),
    ("optimizer_s", "optimizer", "#9cc7ea"),
    ("comm_s", "communication", "#9467bd"),
    ("other_s", "other (host)", "#b8b0a8"),
)
FRACTION_COLORS = {"data_wait": "#e4572e", "compute": "#2f6db5", "communication": "#9467bd", "other": "#b8b0a8"}
SEVERITY_COLORS = {"critical": "#b91c1c", "warning": "#c2410c", "info": "#1d4ed8", "ok": "#15803d"}
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"

CSS = """
:root { color-scheme: light; --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --soft: #f9fafb; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--ink);
  font: 14px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.page { max-width: 1180px; margin: 0 auto; padding: 20px 24px 48px; }
header h1 { font-size: 20px; margin: 0 0 2px; }
header .meta { color: var(--muted); font-size: 13px; }
nav { position: sticky; top: 0; background: #fff; border-bottom: 1px solid var(--line); padding: 8px 0;
  margin: 12px 0 8px; font-size: 13px; z-index: 2; }
nav a { color: #1f2937; text-decoration: none; margin-right: 14px; }
nav a:hover { text-decoration: underline; }
section { margin: 26px 0; }
h2 { font-size: 17px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 14px; margin: 18px 0 6px; }
p.caption { color: var(--muted); font-size: 12.5px; margin: 4px 0 8px; }
.verdict { border-left: 6px solid var(--sev); background: var(--soft); padding: 14px 18px; border-radius: 4px; }
.verdict .headline { font-size: 22px; font-weight: 700; color: var(--sev); letter-spacing: .02em; }
.verdict .severity { font-size: 12px; text-transform: uppercase; border: 1px solid var(--sev); color: var(--sev);
  border-radius: 10px; padding: 1px 8px; margin-left: 8px; vertical-align: middle; }
.verdict .summary { font-size: 15px; margin: 6px 0 12px; }
.kpis { display: flex; flex-wrap: wrap; gap: 10px; margin: 10px 0; }
.kpi { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 8px 12px; min-width: 150px; }
.kpi b { display: block; font-size: 18px; }
.kpi span { color: var(--muted); font-size: 12px; }
.fractions { display: flex; height: 26px; border-radius: 4px; overflow: hidden; margin: 8px 0 4px; }
.fractions div { color: #fff; font-size: 12px; line-height: 26px; padding-left: 6px; white-space: nowrap;
  overflow: hidden; }
.legend { display: flex; flex-wrap: wrap; gap: 14px; font-size: 12.5px; margin: 4px 0 2px; }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px;
  vertical-align: -1px; }
.recs { counter-reset: rec; }
.rec { border: 1px solid var(--line); border-radius: 6px; padding: 10px 14px; margin: 10px 0; }
.rec .title { font-weight: 600; font-size: 15px; }
.rec .speedup { float: right; background: #ecfdf5; color: #065f46; border: 1px solid #a7f3d0; border-radius: 12px;
  padding: 1px 10px; font-weight: 600; }
.rec .why { color: #374151; margin: 4px 0; }
.rec .id { color: var(--muted); font-size: 12px; }
pre { background: #0f172a; color: #e2e8f0; padding: 10px 12px; border-radius: 6px; overflow-x: auto;
  font: 12.5px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; margin: 6px 0; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; font-size: 12.5px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; margin: 6px 0; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--soft); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.highlight td { background: #fef2f2; }
.badge { display: inline-block; border-radius: 10px; padding: 0 8px; font-size: 12px; color: #fff; }
.note { border-left: 4px solid #d97706; background: #fffbeb; padding: 8px 12px; margin: 8px 0; border-radius: 3px; }
.partial { border-left-color: #b91c1c; background: #fef2f2; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 4px 24px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 4px 0 10px; font-size: 13px; }
dt { color: var(--muted); }
dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 12.5px; }
details summary { cursor: pointer; color: #1f2937; margin: 6px 0; }
svg.chart { display: block; margin: 2px 0 6px; }
footer { color: var(--muted); font-size: 12px; border-top: 1px solid var(--line); padding-top: 10px; margin-top: 36px; }
"""


def _e(value: Any) -> str:
    return escape(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (), marked: int = -1) -> str:
    """An HTML table; cells are already-escaped HTML."""
    head = "".join(
        f'<th class="num">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>" for i, h in enumerate(headers)
    )
    body = []
    for index, row in enumerate(rows):
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(row))
        body.append(f'<tr class="highlight">{cells}</tr>' if index == marked else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _badge(severity: str) -> str:
    return f'<span class="badge" style="background:{SEVERITY_COLORS.get(severity, "#6b7280")}">{_e(severity)}</span>'


# ---- sections ---------------------------------------------------------------------------------
def _header(data: ReportData) -> str:
    doc = data.document
    window = data.window
    import datetime

    started = ""
    if window is not None:
        when = datetime.datetime.fromtimestamp(window.start_unix_s, tz=datetime.timezone.utc)
        started = f"started {when:%Y-%m-%d %H:%M:%S} UTC · "
    sources = doc.get("data_quality", {}).get("clock", {}).get("sources", [])
    nodes = f" on {len(sources)} nodes" if len(sources) > 1 else ""
    exit_code = doc.get("exit_code")
    ended = f" · exit code {exit_code}" if exit_code not in (None, 0) else ""
    runs = [source.get("run_id", "") for source in sources] if len(sources) > 1 else [doc["run_id"]]
    label = "runs" if len(runs) > 1 else "run"
    return (
        "<header><h1>profilerd report</h1>"
        f'<div class="meta">{label} {" + ".join(f"<code>{_e(r)}</code>" for r in runs)} · '
        f"job <code>{_e(doc.get('job', ''))}</code> · "
        f"{started}{fmt_duration(doc.get('duration_s', 0.0))} analysed · {doc.get('ranks', 0)} rank(s){nodes}"
        f" · recording {_e(doc.get('data_quality', {}).get('state', 'unknown'))}{ended}</div></header>"
    )


def _nav() -> str:
    links = [
        ("verdict", "Verdict"),
        ("recommendations", "Recommendations"),
        ("steps", "Step time"),
        ("devices", "GPUs & host"),
        ("ranks", "Ranks"),
        ("events", "Events"),
        ("config", "Configuration"),
        ("rules", "Rules"),
        ("quality", "Data quality"),
    ]
    return "<nav>" + "".join(f'<a href="#{anchor}">{label}</a>' for anchor, label in links) + "</nav>"


def _partial_banner(data: ReportData) -> str:
    notes = data.document.get("data_quality", {}).get("notes", [])
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return f'<div class="note partial"><b>Partial report.</b> This recording is incomplete:<ul>{items}</ul></div>'


def _verdict(data: ReportData) -> str:
    doc = data.document
    severity = doc.get("severity", "ok")
    color = SEVERITY_COLORS.get(severity, "#374151")
    headline, summary = headline_of(doc), statement_of(doc)
    step = doc.get("step_time_s", {})
    kpis = [
        (f"{doc.get('steps', 0):,}", "steps analysed (all ranks)"),
        (f"{doc.get('steps_per_s', 0.0):.2f}", "steps/s per rank"),
        (f"{fmt_seconds(step.get('p50', 0.0))} / {fmt_seconds(step.get('p95', 0.0))}", "step time p50 / p95"),
        (fmt_duration(doc.get("duration_s", 0.0)), "analysed (h:mm:ss)"),
    ]
    fractions = doc.get("fractions", {})
    bar = "".join(
        f'<div style="width:{100 * fractions.get(key, 0.0):.2f}%;background:{color_}" '
        f'title="{_e(key)} {fractions.get(key, 0.0):.1%}">'
        f"{_e(key.replace('_', ' '))} {fractions.get(key, 0.0):.0%}</div>"
        for key, color_ in FRACTION_COLORS.items()
        if fractions.get(key, 0.0) > 0
    )
    sev = f'<span class="severity">{_e(severity)}</span>' if doc["primary"] != "none" else ""
    evidence = doc.get("evidence") or {}
    basis = f'<p class="caption">Based on {_e(evidence["basis"])}.</p>' if evidence.get("basis") else ""
    device = device_summary(doc)
    if device:
        basis += f'<p class="caption">{_e(device[0].upper() + device[1:])}.</p>'
    return (
        f'<section id="verdict"><h2>Verdict</h2><div class="verdict" style="--sev:{color}">'
        f'<div><span class="headline">{_e(headline)}</span>{sev}</div>'
        f'<div class="summary">{_e(summary)}</div>'
        f'<div class="kpis">{"".join(f"<div class=kpi><b>{_e(v)}</b><span>{_e(k)}</span></div>" for v, k in kpis)}'
        "</div>"
        f'<div class="fractions">{bar}</div>'
        f'<p class="caption">Share of step time, summed over every rank\'s steps after warm-up.</p>{basis}</div>'
        "</section>"
    )


def _recommendation(number: int, rec: dict[str, Any]) -> str:
    return (
        f'<div class="rec"><span class="speedup">~{rec["estimated_speedup"]:.2f}× estimated</span>'
        f'<div class="title">{number}. {_e(rec["title"])}</div>'
        f'<div class="why">{_e(rec.get("why", ""))}</div>'
        f"<pre><code>{_e(rec['how'])}</code></pre>"
        f'<div class="id">{_e(rec["id"])} · from rule {_e(rec.get("rule", ""))}</div></div>'
    )


def _recommendations(data: ReportData, top: int = 3) -> str:
    recs = data.document.get("recommendations", [])
    if not recs:
        text = (
            "No recommendations: nothing measured points to a cheaper way to run this job."
            if data.document["primary"] != "none"
            else "No recommendations yet: not enough evidence for a verdict."
        )
        return f'<section id="recommendations"><h2>Recommendations</h2><p>{_e(text)}</p></section>'
    first = "".join(_recommendation(i, r) for i, r in enumerate(recs[:top], 1))
    rest = ""
    if len(recs) > top:
        more = "".join(_recommendation(i, r) for i, r in enumerate(recs[top:], top + 1))
        rest = f"<details><summary>{len(recs) - top} more recommendation(s)</summary>{more}</details>"
    return (
        '<section id="recommendations"><h2>Recommendations</h2>'
        '<p class="caption">Best estimated whole-step speedup first. Each estimate applies Amdahl\'s law to the '
        "measured share of step time the change can affect, so none promises more than that share allows.</p>"
        f'<div class="recs">{first}{rest}</div></section>'
    )


def _bands(data: ReportData) -> list[Band]:
    if data.throttles.empty:
        return []
    return [
        Band(float(row.start_s), float(row.end_s), f"{row.gpu} throttled: {row.reasons}")
        for row in data.throttles.itertuples()
    ]


def _marks(data: ReportData) -> list[Mark]:
    if data.events.empty or data.window is None:
        return []
    notable = data.events[data.events["kind"].isin(["xid", "lost", "recovered"])]
    notable = notable[(notable["t_s"] >= 0) & (notable["t_s"] <= data.window.span_s)]
    marks = []
    nodes = notable["node"].nunique() > 1
    for row in notable.head(20).itertuples():
        where = f"{row.node}:" if nodes else "GPU "
        gpu = f"{where}{int(row.gpu)}: " if row.gpu is not None and not pd.isna(row.gpu) else ""
        marks.append(Mark(float(row.t_s), f"{gpu}{row.text or row.kind}"))
    return marks


def _steps(data: ReportData) -> str:
    window = data.window
    if window is None or data.phases.empty:
        return '<section id="steps"><h2>Step time</h2><p>No steps after warm-up were recorded.</p></section>'
    phases = data.phases
    layers = [Layer(label, color, phases[column].to_numpy(dtype=np.float64)) for column, label, color in PHASES]
    area = charts.stacked_area(
        phases["start_s"].to_numpy(dtype=np.float64),
        window.bucket_s,
        layers,
        window.span_s,
        title="Step-time breakdown over time",
        y_label="time per step",
        fmt=fmt_seconds,
        chart_id="chart-phases",
        bands=_bands(data),
        marks=_marks(data),
    )
    hist = data.histogram
    step = data.document.get("step_time_s", {})
    marks = [
        Mark(float(step.get("p50", 0.0)), f"p50 {fmt_seconds(step.get('p50', 0.0))}", "#065f46"),
        Mark(float(step.get("p95", 0.0)), f"p95 {fmt_seconds(step.get('p95', 0.0))}", "#b91c1c"),
    ]
    lo, hi = float(hist["left_s"].iloc[0]), float(hist["right_s"].iloc[-1])
    distribution = charts.histogram(
        hist["left_s"].to_numpy(),
        hist["right_s"].to_numpy(),
        hist["steps"].to_numpy(),
        title="Step-time distribution",
        chart_id="chart-histogram",
        marks=[m for m in marks if lo <= m.at <= hi],
    )
    return (
        '<section id="steps"><h2>Step time</h2>'
        f"<h3>Breakdown over time</h3>{charts.legend([(label, color) for _, label, color in PHASES])}{area}"
        f'<p class="caption">Mean time per step in each phase, in {fmt_seconds(window.bucket_s)} buckets, over all '
        "ranks (warm-up steps excluded). Blank stretches had no step end in them; shaded spans are throttled GPUs, "
        "dashed lines GPU events. Buckets beyond the axis are clipped and labelled.</p>"
        f"<h3>Distribution</h3>{distribution}"
        f'<p class="caption">Steps per step-time bin, between the 0.5th and 99.5th percentiles (the rest are counted '
        f"in the edge bins); mean {fmt_seconds(step.get('mean', 0.0))}.</p></section>"
    )


def _gpu_lines(gpus: pd.DataFrame, column: str, scale: float = 1.0) -> tuple[list[Line], list[tuple[str, str]]]:
    lines, legend = [], []
    for index, (gpu, frame) in enumerate(gpus.groupby("gpu", sort=True)):
        color = charts.PALETTE[index % len(charts.PALETTE)]
        lines.append(Line(str(gpu), color, frame["start_s"].to_numpy(), frame[column].to_numpy(dtype=float) * scale))
        legend.append((str(gpu), color))
    return lines, legend


def _devices(data: ReportData) -> str:
    window = data.window
    parts = ['<section id="devices"><h2>GPUs and host</h2>']
    if window is None:
        return parts[0] + "<p>No steps after warm-up: nothing to align the timelines with.</p></section>"
    bands, marks = _bands(data), _marks(data)
    gpus = data.gpus
    unreadable = [n for n in data.document.get("data_quality", {}).get("notes", []) if "gpu_samples" in n]
    if gpus.empty and unreadable:
        parts.append(
            '<p class="note">The GPU samples of this recording could not be read (see Data quality). The host '
            "timeline below is still aligned with the steps.</p>"
        )
    elif gpus.empty or gpus["utilization_gpu_ratio"].isna().all():
        parts.append(
            '<p class="note">No GPU samples in this recording: the job ran without an NVIDIA GPU, or the daemon ran '
            "with <code>--gpu none</code>. The host timeline below is still aligned with the steps.</p>"
        )
    else:
        lines, legend = _gpu_lines(gpus, "utilization_gpu_ratio")
        parts.append(charts.legend(legend))
        parts.append("<h3>Utilization</h3>")
        parts.append(
            charts.line_chart(
                lines,
                window.span_s,
                title="GPU utilization",
                y_label="busy",
                fmt=fmt_ratio,
                chart_id="chart-gpu-util",
                y_max=1.0,
                bands=bands,
                marks=marks,
            )
        )
        memory, _ = _gpu_lines(gpus, "memory_used_bytes", 1 / (1 << 30))
        totals = gpus["memory_total_bytes"].dropna()
        top = float(totals.max()) / (1 << 30) if not totals.empty else None
        parts.append("<h3>Memory used</h3>")
        parts.append(
            charts.line_chart(
                memory,
                window.span_s,
                title="GPU memory used",
                y_label="GiB",
                fmt=lambda v: f"{v:g} GiB",
                chart_id="chart-gpu-memory",
                y_max=top,
                bands=bands,
                marks=marks,
            )
        )
        power, _ = _gpu_lines(gpus, "power_watts")
        limits = gpus["power_limit_watts"].dropna()
        if not limits.empty:
            limit = float(limits.max())
            power.append(Line("power limit", "#9ca3af", np.array([0.0, window.span_s]), np.array([limit, limit]), True))
        parts.append("<h3>Power</h3>")
        parts.append(
            charts.line_chart(
                power,
                window.span_s,
                title="GPU power",
                y_label="watts",
                fmt=lambda v: f"{v:.0f} W",
                chart_id="chart-gpu-power",
                bands=bands,
                marks=marks,
            )
        )
        parts.append(
            '<p class="caption">Per GPU, mean per time bucket, on the same time axis as the step breakdown. The dashed '
            "grey line is the power limit; memory is drawn up to the GPUs' total.</p>"
        )
    if not data.host.empty:
        host = data.host
        parts.append("<h3>Host CPU</h3>")
        parts.append(
            charts.line_chart(
                [Line("host CPU", "#475569", host["start_s"].to_numpy(), host["cpu_ratio"].to_numpy(dtype=float))],
                window.span_s,
                title="Host CPU utilization",
                y_label="all cores",
                fmt=fmt_ratio,
                chart_id="chart-host-cpu",
                y_max=1.0,
                height=150,
            )
        )
    parts.append("</section>")
    return "".join(parts)


def _ranks(data: ReportData) -> str:
    ranks = data.ranks
    if ranks.empty:
        return '<section id="ranks"><h2>Ranks</h2><p>No steps after warm-up.</p></section>'
    straggler = straggler_of(data.document)
    nodes = ranks["node"].nunique() > 1
    labels = [f"rank {int(r.rank)}" + (f" ({r.node})" if nodes and r.node else "") for r in ranks.itertuples()]
    highlight = None
    if straggler is not None and straggler in set(ranks["rank"].astype(int)):
        highlight = int(np.flatnonzero(ranks["rank"].to_numpy() == straggler)[0])
    parts = ['<section id="ranks"><h2>Ranks</h2>']
    finding = next((f for f in data.document.get("findings", []) if f["rule"] == STRAGGLER_RULE), None)
    if len(ranks) == 1:
        parts.append("<p>One rank: there is nothing to compare it with.</p>")
    else:
        if finding is not None:
            parts.append(f'<div class="note"><b>Straggler:</b> {_e(finding["evidence"])}</div>')
        else:
            own = ranks["own_s"]
            spread = float((own.max() - own.median()) / ranks["step_s_mean"].mean()) if len(own) else 0.0
            parts.append(
                f"<p>No straggler: the slowest rank's own work is {spread:.0%} of a step above the median rank's.</p>"
            )
        layers = [Layer(label, color, ranks[column].to_numpy(dtype=float)) for column, label, color in PHASES]
        parts.append(charts.legend([(label, color) for _, label, color in PHASES]))
        parts.append(
            charts.stacked_bars(
                labels,
                layers,
                title="Mean time per step by rank",
                chart_id="chart-ranks",
                fmt=fmt_seconds,
                highlight=highlight,
                highlight_label="straggler" if highlight is not None else "",
            )
        )
        parts.append(
            '<p class="caption">Mean time per step of each rank by phase. In synchronous training the slowest rank\'s '
            "own work (everything but communication) sets the pace; the others show the difference as communication "
            "wait.</p>"
        )
    rows = [
        [
            _e(int(r.rank)),
            _e(r.node or "–"),
            f"{int(r.steps):,}",
            fmt_seconds(r.step_time_p50_s),
            fmt_seconds(r.data_wait_s),
            fmt_seconds(r.forward_s + r.backward_s + r.optimizer_s),
            fmt_seconds(r.comm_s),
            fmt_seconds(r.other_s),
            fmt_seconds(r.own_s),
        ]
        for r in ranks.itertuples()
    ]
    parts.append(
        _table(
            ["rank", "node", "steps", "p50 step", "data wait", "compute", "communication", "other", "own work"],
            rows,
            numeric=(2, 3, 4, 5, 6, 7, 8),
            marked=highlight if highlight is not None else -1,
        )
    )
    parts.append("</section>")
    return "".join(parts)


def _events(data: ReportData) -> str:
    parts = ['<section id="events"><h2>Throttling and events</h2>']
    throttles = data.throttles
    if not throttles.empty:
        rows = [
            [
                _e(r.gpu),
                _e(r.reasons),
                fmt_duration(r.start_s),
                fmt_duration(r.end_s),
                fmt_seconds(r.end_s - r.start_s),
            ]
            for r in throttles.itertuples()
        ]
        parts.append("<h3>Clock throttling</h3>")
        parts.append(_table(["GPU", "reasons", "from", "to", "for"], rows, numeric=(4,)))
    else:
        parts.append("<p>No GPU clock throttling (thermal, power cap, hardware slowdown) was recorded.</p>")
    events = data.events
    if not events.empty:
        counts = events["kind"].value_counts().sort_index()
        summary = ", ".join(f"{count} × {kind}" for kind, count in counts.items())
        shown = events.head(200)
        rows = [
            [
                fmt_duration(r.t_s) if r.t_s >= 0 else f"-{fmt_duration(-r.t_s)}",
                _e(r.node or "–"),
                _e("–" if r.gpu is None or pd.isna(r.gpu) else int(r.gpu)),
                _e(r.kind),
                _e(r.text),
            ]
            for r in shown.itertuples()
        ]
        parts.append(f"<h3>Events</h3><p>{_e(summary)}.</p>")
        parts.append(_table(["time", "node", "GPU", "kind", "detail"], rows))
        if len(events) > len(shown):
            parts.append(f'<p class="caption">The first {len(shown)} of {len(events)} events.</p>')
    else:
        parts.append("<p>No events (XID errors, lost GPUs, process exits) were recorded.</p>")
    parts.append("</section>")
    return "".join(parts)


def _dl(items: Sequence[tuple[str, Any]]) -> str:
    shown = [(k, v) for k, v in items if v is not None]
    if not shown:
        return "<p>–</p>"
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(_value(v))}</dd>" for k, v in shown) + "</dl>"


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_value(v)}" for k, v in value.items() if v is not None) or "–"
    if isinstance(value, list | tuple):
        return ", ".join(_value(v) for v in value) or "–"
    if isinstance(value, int) and abs(value) >= 100_000:
        return f"{value:,}"
    return str(value)


def _config(data: ReportData) -> str:
    config = data.config
    if not config:
        return (
            '<section id="config"><h2>Configuration</h2>'
            "<p>No configuration snapshot was recorded (the probes send one after the first steps).</p></section>"
        )
    loader = config.get("dataloader") or {}
    autocast = config.get("autocast") or {}
    groups = [
        (
            "DataLoader",
            [
                (k, loader.get(k))
                for k in ("num_workers", "batch_size", "pin_memory", "persistent_workers", "prefetch_factor")
            ]
            + [
                (k, v)
                for k, v in loader.items()
                if k not in ("num_workers", "batch_size", "pin_memory", "persistent_workers", "prefetch_factor")
            ],
        ),
        (
            "Precision (AMP)",
            [
                ("autocast", autocast.get("enabled")),
                ("autocast dtype", autocast.get("dtype")),
                ("GradScaler", config.get("grad_scaler")),
                ("TF32", config.get("tf32")),
            ],
        ),
    ]
    for index, optimizer in enumerate(config.get("optimizers") or []):
        groups.append(
            (
                f"Optimizer {index}" if index else "Optimizer",
                [
                    ("class", optimizer.get("class")),
                    ("parameters", optimizer.get("parameters")),
                    *sorted((optimizer.get("hyperparameters") or {}).items()),
                ],
            )
        )
    for index, model in enumerate(config.get("models") or []):
        items = [
            (k, model.get(k))
            for k in ("class", "parameters", "parameter_dtypes", "device", "compiled", "channels_last")
        ]
        groups.append((f"Model {index}" if index else "Model", items))
        if model.get("ddp"):
            groups.append(("DDP", sorted(model["ddp"].items())))
    distributed = config.get("distributed") or {}
    if distributed:
        groups.append(("Distributed", sorted(distributed.items())))
    groups.append(
        (
            "Versions and runtime",
            [
                ("torch", config.get("torch_version")),
                ("device", config.get("device_type")),
                ("CUDA available", config.get("cuda_available")),
                ("CPU capability", config.get("cpu_capability")),
                ("torch threads", config.get("num_threads")),
                ("LR scheduler", config.get("lr_scheduler")),
                ("gradient clipping", config.get("grad_clipping")),
                ("profilerd", __version__),
            ],
        )
    )
    blocks = "".join(f"<div><h3>{_e(title)}</h3>{_dl(items)}</div>" for title, items in groups)
    differing = _differing_ranks(data)
    note = f'<p class="note">{_e(differing)}</p>' if differing else ""
    snapshot = escape(json.dumps(config, indent=2, sort_keys=True, default=str))
    return (
        '<section id="config"><h2>Configuration</h2>'
        f'<p class="caption">The snapshot the probes took of rank {int(config.get("rank", 0))}.</p>{note}'
        f'<div class="grid2">{blocks}</div>'
        f"<details><summary>Full snapshot (JSON)</summary><pre><code>{snapshot}</code></pre></details></section>"
    )


def _differing_ranks(data: ReportData) -> str:
    from profilerd.recordings.timeline import changed_settings

    base = data.config or {}
    ignore = ("rank", "distributed.rank")
    differ = []
    for rank, config in sorted(data.configs_by_rank.items()):
        changes = [k for k, _, _ in changed_settings(base, config) if k not in ignore]
        if changes:
            differ.append(f"rank {rank} ({', '.join(changes[:4])})")
    if not differ:
        return ""
    return "Ranks configured differently from the one shown: " + "; ".join(differ[:8])


def _rules(data: ReportData) -> str:
    findings = data.document.get("findings", [])
    if not findings:
        return '<section id="rules"><h2>Rules that fired</h2><p>No rule fired.</p></section>'
    rows = []
    for f in findings:
        metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in f["metrics"].items())
        thresholds = ", ".join(f"{k} {v}" for k, v in f["thresholds"].items())
        rows.append(
            [
                f"<code>{_e(f['rule'])}</code>",
                _e(f["category"]),
                _badge(f["severity"]),
                f"{f['confidence']:.2f}",
                _e(f["evidence"]),
                f"<code>{_e(metrics)}</code>",
                f"<code>{_e(thresholds)}</code>",
            ]
        )
    minor = data.document.get("minor_recommendations") or []
    minor_html = ""
    if minor:
        items = "".join(
            f"<li>{_e(r['title'])} · ~{r['estimated_speedup']:.2f}× · <code>{_e(r['id'])}</code></li>" for r in minor
        )
        minor_html = f"<h3>Minor fixes</h3><p>Estimated too small to recommend:</p><ul>{items}</ul>"
    return (
        '<section id="rules"><h2>Rules that fired</h2>'
        '<p class="caption">Every rule whose check passed its threshold, most severe first, with the measured '
        "numbers and the thresholds they were held against (override them with a rules file: docs/rules.md).</p>"
        + _table(["rule", "category", "severity", "confidence", "evidence", "measured", "thresholds"], rows, (3,))
        + minor_html
        + "</section>"
    )


def _quality(data: ReportData) -> str:
    quality = data.document.get("data_quality", {})
    if not quality:
        return ""
    parts = ['<section id="quality"><h2>Data quality</h2>']
    for note in quality.get("notes", []):
        parts.append(f'<div class="note">{_e(note)}</div>')
    gaps = quality.get("gaps", {})
    samplers = quality.get("samplers", {})
    ratio = quality.get("missing_steps_ratio")
    rows = [
        ["recording state", _e(quality.get("state")) + (" (complete)" if quality.get("complete") else "")],
        ["exit code", _e(quality.get("exit_code", "–"))],
        ["step records", f"{quality.get('steps_recorded', 0):,}"],
        [
            "lost step records",
            f"{quality.get('missing_steps', 0):,}"
            + (f" ({ratio:.2%})" if ratio else "")
            + " — gaps in the step numbers (dropped messages)",
        ],
        [
            "uncovered time",
            f"{gaps.get('count', 0)} gap(s) over {_e(gaps.get('threshold_s'))} s, "
            f"{gaps.get('total_s') or 0:.3g} s in all"
            + "".join(
                f"; rank {g['rank']} at {fmt_duration(g['start_s'] or 0)} for {g['duration_s']:.3g} s"
                for g in gaps.get("largest", [])[:3]
            ),
        ],
    ]
    for name, stats in samplers.items():
        interval = stats.get("interval_s")
        longest = stats.get("longest_gap_s")
        rows.append(
            [
                f"{'GPU' if name == 'gpu' else name} sampler",
                f"{stats.get('samples', 0):,} samples"
                + (f", every {interval:g} s" if interval else "")
                + (f", {stats.get('gaps', 0)} gap(s), longest {longest:g} s" if stats.get("gaps") else ", no gaps"),
            ]
        )
    clock = quality.get("clock", {})
    if clock.get("aligned"):
        for source in clock.get("sources", []):
            residual = source.get("residual_s")
            rows.append(
                [
                    f"clock of {_e(source.get('hostname') or source.get('run_id'))}",
                    f"offset {source.get('offset_s', 0.0):+.4f} s"
                    + (f" ± {residual:.4f} s" if residual is not None else "")
                    + f" (ranks {_e(', '.join(str(r) for r in source.get('ranks', [])))}, "
                    + f"run {_e(source.get('run_id'))})",
                ]
            )
    else:
        rows.append(["clock skew", "one node, one clock: nothing to align"])
    parts.append("<table><tbody>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</tbody></table>")
    parts.append("</section>")
    return "".join(parts)


def render_html(data: ReportData) -> str:
    """The whole report as one HTML document."""
    doc = data.document
    title = f"profilerd report · {doc['run_id']} · {headline_of(doc)}"
    body = "".join(
        [
            _header(data),
            _nav(),
            _partial_banner(data),
            _verdict(data),
            _recommendations(data),
            _steps(data),
            _devices(data),
            _ranks(data),
            _events(data),
            _config(data),
            _rules(data),
            _quality(data),
            f"<footer>Generated by profilerd {_e(__version__)} from {_e(doc.get('recording', 'a recording'))}. "
            "Self-contained: no scripts, no fonts or images from elsewhere, no network access.</footer>",
        ]
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{CSS}</style></head>"
        f'<body><div class="page">{body}</div></body></html>\n'
    )
