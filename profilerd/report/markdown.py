"""The Markdown report: the HTML report's findings, compact enough to paste into an issue or PR.

GitHub-flavoured: tables, fenced code, and <details> blocks for what a reviewer only sometimes
needs (every rule, per-rank numbers, events, configuration). Time series become sparklines.
"""

from __future__ import annotations

import json
from typing import Any

from profilerd.analysis.document import STRAGGLER_RULE, headline_of, statement_of, straggler_of
from profilerd.recordings.timeline import ReportData
from profilerd.report.charts import fmt_duration, sparkline
from profilerd.report.text import device_summary
from profilerd.units import fmt_seconds


def _cell(value: Any) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _details(summary: str, body: list[str]) -> list[str]:
    return ["", f"<details><summary>{summary}</summary>", "", *body, "", "</details>"]


def render_markdown(data: ReportData, top: int = 3) -> str:
    doc = data.document
    severity = f" ({doc['severity']})" if doc["primary"] != "none" else ""
    lines = [f"### profilerd · `{doc['run_id']}` — {headline_of(doc)}{severity}", "", f"> {statement_of(doc)}", ""]
    basis = (doc.get("evidence") or {}).get("basis")
    if basis:
        lines += [f"Based on {basis}.", ""]
    step = doc.get("step_time_s", {})
    fractions = doc.get("fractions", {})
    lines += _table(
        [
            "steps",
            "ranks",
            "analysed",
            "steps/s per rank",
            "step p50",
            "step p95",
            "data wait",
            "compute",
            "comm",
            "other",
        ],
        [
            [
                f"{doc.get('steps', 0):,}",
                doc.get("ranks", 0),
                fmt_duration(doc.get("duration_s", 0.0)),
                f"{doc.get('steps_per_s', 0.0):.2f}",
                fmt_seconds(step.get("p50", 0.0)),
                fmt_seconds(step.get("p95", 0.0)),
                f"{fractions.get('data_wait', 0):.0%}",
                f"{fractions.get('compute', 0):.0%}",
                f"{fractions.get('communication', 0):.0%}",
                f"{fractions.get('other', 0):.0%}",
            ]
        ],
    )
    device = device_summary(doc)
    if device:
        lines += ["", device[0].upper() + device[1:]]
    series = (doc.get("timeseries") or {}).get("series") or {}
    spark = [
        f"{label} `{sparkline(series[key]['values'])}`"
        for key, label in (
            ("step_time_s", "step time"),
            ("data_wait_ratio", "data wait"),
            ("gpu_utilization_ratio", "GPU util"),
        )
        if series.get(key, {}).get("min") is not None
    ]
    if spark:
        lines += ["", "Over the run: " + " · ".join(spark)]
    recs = doc.get("recommendations", [])
    if recs:
        lines += ["", "**Recommendations** (estimated whole-step speedup, Amdahl-bounded)", ""]
        for number, rec in enumerate(recs[:top], 1):
            lines.append(f"{number}. **{rec['title']}** — ~{rec['estimated_speedup']:.2f}× · `{rec['id']}`  ")
            if rec.get("why"):
                lines.append(f"   {rec['why']}")
            lines += ["   ```python", *[f"   {line}" for line in rec["how"].splitlines()], "   ```"]
        if len(recs) > top:
            lines.append(
                f"\n{len(recs) - top} more: "
                + ", ".join(f"`{r['id']}` ~{r['estimated_speedup']:.2f}×" for r in recs[top:])
            )
    findings = doc.get("findings", [])
    if findings:
        rows = [
            [
                f"`{f['rule']}`",
                f["severity"],
                f"{f['confidence']:.2f}",
                f["evidence"],
                ", ".join(f"{k} {v}" for k, v in f["thresholds"].items()),
            ]
            for f in findings
        ]
        minor = doc.get("minor_recommendations") or []
        minor_lines = ["", "Minor fixes, estimated too small to recommend: "] if minor else []
        minor_lines += [f"- {r['title']} ~{r['estimated_speedup']:.2f}× `{r['id']}`" for r in minor]
        lines += _details(
            f"Rules that fired ({len(findings)})",
            _table(["rule", "severity", "confidence", "evidence", "thresholds"], rows) + minor_lines,
        )
    ranks = data.ranks
    if len(ranks) > 1:
        culprit = straggler_of(doc)
        straggler = next((f for f in findings if f["rule"] == STRAGGLER_RULE), None)
        rows = [
            [
                int(r.rank) if int(r.rank) != culprit else f"**{int(r.rank)}** (straggler)",
                r.node or "–",
                f"{int(r.steps):,}",
                fmt_seconds(r.step_time_p50_s),
                fmt_seconds(r.data_wait_s),
                fmt_seconds(r.forward_s + r.backward_s + r.optimizer_s),
                fmt_seconds(r.comm_s),
                fmt_seconds(r.own_s),
            ]
            for r in ranks.itertuples()
        ]
        body = ([straggler["evidence"], ""] if straggler else []) + _table(
            ["rank", "node", "steps", "p50 step", "data wait", "compute", "comm", "own work"], rows
        )
        lines += _details("Per rank" + (" — straggler found" if straggler else ""), body)
    events: list[str] = []
    if not data.throttles.empty:
        events += _table(
            ["GPU", "throttled by", "from", "for"],
            [
                [r.gpu, r.reasons, fmt_duration(r.start_s), fmt_seconds(r.end_s - r.start_s)]
                for r in data.throttles.itertuples()
            ],
        )
    notable = data.events[data.events["kind"] != "exit"] if not data.events.empty else data.events
    if not notable.empty:
        events += [
            "",
            *_table(
                ["time", "node", "GPU", "kind", "detail"],
                [
                    [
                        fmt_duration(max(r.t_s, 0.0)),
                        r.node or "–",
                        "–" if r.gpu is None or r.gpu != r.gpu else int(r.gpu),
                        r.kind,
                        r.text,
                    ]
                    for r in notable.head(30).itertuples()
                ],
            ),
        ]
    if events:
        lines += _details("GPU throttling and events", events)
    if data.config:
        config = data.config
        summary = {
            "dataloader": config.get("dataloader"),
            "autocast": config.get("autocast"),
            "optimizers": [
                {"class": o.get("class"), **(o.get("hyperparameters") or {})} for o in config.get("optimizers") or []
            ],
            "ddp": next((m.get("ddp") for m in config.get("models") or [] if m.get("ddp")), None),
            "torch": config.get("torch_version"),
            "device": config.get("device_type"),
        }
        lines += _details("Configuration", ["```json", json.dumps(summary, indent=1, default=str), "```"])
    quality = doc.get("data_quality") or {}
    facts = [f"recording {quality.get('state', 'unknown')}"]
    if quality.get("missing_steps"):
        facts.append(f"{quality['missing_steps']} step records lost")
    if quality.get("gaps", {}).get("count"):
        facts.append(f"{quality['gaps']['count']} gap(s), {quality['gaps']['total_s']:.3g} s uncovered")
    clock = quality.get("clock", {})
    if clock.get("aligned"):
        facts.append(f"{clock['nodes']} nodes, clocks aligned (max offset {clock['max_abs_offset_s']:.3g} s)")
    lines += ["", "**Data quality:** " + "; ".join(facts) + "."]
    lines += [f"> ⚠️ {note}" for note in quality.get("notes", [])]
    lines += ["", f"<sub>profilerd report {doc['run_id']} --format md</sub>", ""]
    return "\n".join(lines)
