"""Before/after comparison of two runs: did the change make training faster, and by as much as predicted?

The speedup is the ratio of mean step times. Its confidence interval comes from batch means:
each run's steps (after warm-up, in time order) are cut into contiguous blocks, and the spread
of the block means gives the standard error of the run's mean. Contiguous blocks keep the
autocorrelation of step times (a slow epoch start, a throttled minute) inside blocks, where
a per-step bootstrap would pretend every step is independent and report a far too narrow
interval. The ratio's interval is taken on the log scale (delta method, Student's t).

Which recommendation was applied is read from the two configuration snapshots (num_workers
went from 0 to 2: `dataloader.num_workers`), or named with ``--applied``; its predicted speedup
is the one run A's verdict estimated.

A speedup means something only between two runs of the same job: the same program, model size,
batch size and world size. Arguments may differ (that is how most fixes are applied). For two
different jobs the figures are shown, labelled as such, without a speedup headline unless forced.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from profilerd.recordings.timeline import changed_settings
from profilerd.vocabulary import Fraction

if TYPE_CHECKING:
    from profilerd.recordings.reader import Recording

SCHEMA = "profilerd.diff/v1"
MAX_BLOCKS = 30
MIN_STEPS_PER_BLOCK = 20
FRACTIONS = tuple(str(key) for key in Fraction)
# Which configuration keys a recommendation changes: (key prefix, key suffix) pairs.
APPLIED_BY: dict[str, tuple[tuple[str, str], ...]] = {
    "dataloader.num_workers": (("dataloader.num_workers", ""),),
    "dataloader.pin_memory": (("dataloader.pin_memory", ""),),
    "dataloader.persistent_workers": (("dataloader.persistent_workers", ""),),
    "dataloader.prefetch_factor": (("dataloader.prefetch_factor", ""),),
    "amp.autocast": (("autocast.", ""), ("grad_scaler", "")),
    "torch.compile": (("models.", ".compiled"),),
    "optimizer.fused": (("optimizers.", ".fused"), ("optimizers.", ".foreach")),
    "optimizer.adamw": (("optimizers.", ".class"),),
    "optimizer.lr_schedule": (("lr_scheduler", ""),),
    "compute.channels_last": (("models.", ".channels_last"),),
    "compute.tf32": (("tf32.", ""),),
    "ddp.bucket_cap_mb": (("models.", ".ddp.bucket_cap_mb"),),
    "ddp.static_graph": (("models.", ".ddp.static_graph"), ("models.", ".ddp.gradient_as_bucket_view")),
}


@dataclass(frozen=True)
class MeanEstimate:
    """A run's mean step time with its batch-means standard error."""

    mean_s: float
    stderr_s: float | None
    blocks: int
    steps: int


def t_quantile(p: float, dof: int) -> float:
    """Student's t quantile: exact for 1 and 2 degrees of freedom, else a Cornish-Fisher expansion
    (within 2% at 3, better above); no scipy needed."""
    if dof <= 0:
        return float("inf")
    if dof == 1:  # Cauchy: exact
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:  # exact
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = _normal_quantile(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3


def _normal_quantile(p: float) -> float:
    """Acklam's rational approximation of the standard normal quantile."""
    a = (
        -39.69683028665376,
        220.9460984245205,
        -275.9285104469687,
        138.3577518672690,
        -30.66479806614716,
        2.506628277459239,
    )
    b = (-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972, -13.28068155288572)
    c = (
        -0.007784894002430293,
        -0.3223964580411365,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    )
    d = (0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416)
    if p < 0.02425:
        q = math.sqrt(-2 * math.log(p))
        return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / (
            (((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1
        )
    if p > 1 - 0.02425:
        return -_normal_quantile(1 - p)
    q = p - 0.5
    r = q * q
    return (
        (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5])
        * q
        / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    )


def mean_step_time(recording: Recording, warmup_steps: int) -> MeanEstimate:
    """Mean step time over every rank's steps after warm-up, with a batch-means standard error."""
    steps = recording.steps
    usable = steps[steps["step"].to_numpy() > warmup_steps]
    values = usable["step_s"].to_numpy()[np.argsort(usable["end_unix_s"].to_numpy(), kind="stable")]
    if values.size == 0:
        return MeanEstimate(float("nan"), None, 0, 0)
    blocks = min(MAX_BLOCKS, values.size // MIN_STEPS_PER_BLOCK)
    if blocks < 2:
        return MeanEstimate(float(values.mean()), None, 1, int(values.size))
    means = np.array([chunk.mean() for chunk in np.array_split(values, blocks)])
    return MeanEstimate(float(values.mean()), float(means.std(ddof=1) / math.sqrt(blocks)), blocks, int(values.size))


def speedup_interval(a: MeanEstimate, b: MeanEstimate, level: float = 0.95) -> tuple[float, float, float] | None:
    """(speedup, low, high) of B over A as mean_a / mean_b; None without a standard error for both."""
    if not (a.mean_s > 0 and b.mean_s > 0):
        return None
    ratio = a.mean_s / b.mean_s
    if a.stderr_s is None or b.stderr_s is None:
        return ratio, float("nan"), float("nan")
    log_se = math.sqrt((a.stderr_s / a.mean_s) ** 2 + (b.stderr_s / b.mean_s) ** 2)
    t = t_quantile(0.5 + level / 2, min(a.blocks, b.blocks) - 1)
    return ratio, ratio * math.exp(-t * log_se), ratio * math.exp(t * log_se)


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, digits)


def _batch_size(recording: Recording) -> int | None:
    config = recording.config() or {}
    size = (config.get("dataloader") or {}).get("batch_size")
    return int(size) if isinstance(size, int | float) and size > 0 else None


@dataclass(frozen=True)
class JobShape:
    """What a run trained, as far as the recording tells (None: not recorded)."""

    command: tuple[str, ...]
    parameters: int | None
    batch_size: int | None
    world_size: int | None

    @property
    def program(self) -> str:
        """The training script (or module file) without its directory: a clone elsewhere is the same program."""
        scripts = [arg for arg in self.command if arg.endswith(".py")]
        first = scripts[0] if scripts else (self.command[0] if self.command else "")
        return first.rsplit("/", 1)[-1]


def job_shape(recording: Recording, doc: dict[str, Any]) -> JobShape:
    config = recording.config() or {}
    counts = [m.get("parameters") for m in config.get("models") or [] if isinstance(m, dict)]
    parameters = sum(int(n) for n in counts if isinstance(n, int | float)) or None
    sizes = recording.sessions["world_size"].dropna() if "world_size" in recording.sessions else []
    world: int | None
    if len(sizes):
        world = int(max(sizes))
    elif isinstance(config.get("world_size"), int):
        world = int(config["world_size"])
    else:
        world = int(doc["ranks"]) if doc.get("ranks") else None
    return JobShape(tuple(_argv(recording)), parameters, _batch_size(recording), world)


def job_differences(a: JobShape, b: JobShape) -> list[dict[str, Any]]:
    """What differs between the two jobs; ``defining`` marks what makes them different jobs.

    A changed argument list alone does not (``--num-workers 4`` is how a fix is applied); another
    program, model size, batch size (step times measure different work) or world size does.
    """
    found = []
    if a.command and b.command and a.command != b.command:
        found.append(
            {
                "what": "command",
                "a": shlex.join(a.command),
                "b": shlex.join(b.command),
                "defining": a.program != b.program,
            }
        )
    for what, value_a, value_b in (
        ("model size", a.parameters, b.parameters),
        ("batch size", a.batch_size, b.batch_size),
        ("world size", a.world_size, b.world_size),
    ):
        if value_a is not None and value_b is not None and value_a != value_b:
            found.append({"what": what, "a": value_a, "b": value_b, "defining": True})
    return found


def applied_recommendations(
    changes: list[tuple[str, Any, Any]], recommendations: list[dict[str, Any]], named: list[str] | None = None
) -> list[dict[str, Any]]:
    """Run A's recommendations that the configuration changes carry out (or those named)."""
    by_id = {r["id"]: r for r in recommendations}
    if named:
        return [by_id.get(rec_id, {"id": rec_id, "title": rec_id, "estimated_speedup": None}) for rec_id in named]
    found = []
    for rec in recommendations:
        patterns = APPLIED_BY.get(rec["id"], ())
        if any(k.startswith(prefix) and k.endswith(suffix) for k, _, _ in changes for prefix, suffix in patterns):
            found.append(rec)
    return found


def _status(predicted: float | None, measured: tuple[float, float, float] | None) -> tuple[str, str]:
    """Whether a predicted speedup materialized, judged against the measured interval."""
    if measured is None:
        return "unknown", "no steps to measure in one of the runs"
    speedup, low, high = measured
    if predicted is None:
        return "unknown", f"measured {speedup:.2f}×; this recommendation was not predicted for run A"
    if not math.isfinite(low):
        return (
            "unknown",
            f"measured {speedup:.2f}× against {predicted:.2f}× predicted, from too few steps for an interval",
        )
    gain = (speedup - 1) / (predicted - 1) if predicted > 1 else float("nan")
    share = f" ({gain:.0%} of the predicted gain)" if math.isfinite(gain) else ""
    span = f"measured {speedup:.2f}× (95% CI {low:.2f}–{high:.2f}) against {predicted:.2f}× predicted"
    if low > predicted * 1.05:
        return "exceeded", f"{span}: better than predicted"
    if high >= predicted * 0.95 or (math.isfinite(gain) and gain >= 0.8):
        return "materialized", f"{span}{share}"
    if low > 1.0:
        return "partial", f"{span}{share}: faster, but less than predicted"
    if high < 1.0:
        return "regressed", f"{span}: run B is slower"
    return "not materialized", f"{span}: no measurable speedup"


def _warnings(doc_a: dict[str, Any], doc_b: dict[str, Any]) -> list[str]:
    warnings = []
    for doc, name in ((doc_a, "A"), (doc_b, "B")):
        if doc["primary"] == "none":
            warnings.append(f"run {name} has too little evidence for a verdict: {doc['summary']}")
        for note in (doc.get("data_quality") or {}).get("notes", []):
            warnings.append(f"run {name}: {note}")
    return warnings


def _argv(recording: Recording) -> list[str]:
    sessions = recording.sessions
    if sessions.empty or "argv" not in sessions:
        return []
    try:
        value = json.loads(str(sessions["argv"].iloc[0]))
    except ValueError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def compare(
    a: Recording,
    doc_a: dict[str, Any],
    b: Recording,
    doc_b: dict[str, Any],
    warmup_steps: int,
    applied: list[str] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The `profilerd.diff/v1` document comparing run B against run A.

    ``force`` claims a speedup even between different jobs (``same_job`` false).
    """
    est_a, est_b = mean_step_time(a, warmup_steps), mean_step_time(b, warmup_steps)
    interval = speedup_interval(est_a, est_b)
    differences = job_differences(job_shape(a, doc_a), job_shape(b, doc_b))
    defining = [d["what"] for d in differences if d["defining"]]

    def side(recording: Recording, doc: dict[str, Any], est: MeanEstimate) -> dict[str, Any]:
        t = t_quantile(0.975, est.blocks - 1) if est.stderr_s is not None else float("nan")
        half = t * est.stderr_s if est.stderr_s is not None else float("nan")
        batch = _batch_size(recording)
        rate = doc.get("steps_per_s", 0.0)
        return {
            "run_id": doc["run_id"],
            "job": doc.get("job"),
            "recording": str(recording.path),
            "primary": doc["primary"],
            "severity": doc["severity"],
            "summary": doc["summary"],
            "steps": doc.get("steps", 0),
            "ranks": doc.get("ranks", 0),
            "step_time_s": {
                "mean": _round(est.mean_s, 6),
                "ci95": [_round(est.mean_s - half, 6), _round(est.mean_s + half, 6)],
                "p50": doc.get("step_time_s", {}).get("p50"),
                "p95": doc.get("step_time_s", {}).get("p95"),
                "blocks": est.blocks,
            },
            "steps_per_s": rate,
            "samples_per_s": _round(rate * batch * max(1, doc.get("ranks", 1)), 2) if batch else None,
        }

    sides = {"a": side(a, doc_a, est_a), "b": side(b, doc_b, est_b)}
    fractions = {
        key: {
            "a": doc_a["fractions"][key],
            "b": doc_b["fractions"][key],
            "delta": round(doc_b["fractions"][key] - doc_a["fractions"][key], 4),
        }
        for key in FRACTIONS
    }
    phase_time = {
        key: {
            "a": _round(doc_a["fractions"][key] * est_a.mean_s, 6),
            "b": _round(doc_b["fractions"][key] * est_b.mean_s, 6),
            "delta": _round(doc_b["fractions"][key] * est_b.mean_s - doc_a["fractions"][key] * est_a.mean_s, 6),
        }
        for key in FRACTIONS
    }
    rules_a = {f["rule"] for f in doc_a.get("findings", []) if f["severity"] in ("warning", "critical")}
    rules_b = {f["rule"] for f in doc_b.get("findings", []) if f["severity"] in ("warning", "critical")}
    changes = changed_settings(a.config(), b.config())
    recommended = applied_recommendations(changes, doc_a.get("recommendations", []), applied)
    applied_out = []
    for rec in recommended:
        if defining and not force:
            status, detail = "different jobs", f"A and B are different jobs ({', '.join(defining)} differ)"
        else:
            status, detail = _status(rec.get("estimated_speedup"), interval)
        suggested = _suggested_value(rec, changes)
        applied_out.append(
            {
                "id": rec["id"],
                "title": rec.get("title"),
                "predicted_speedup": rec.get("estimated_speedup"),
                "measured_speedup": _round(interval[0]) if interval else None,
                "ci95": [_round(interval[1]), _round(interval[2])] if interval else [None, None],
                "status": status,
                "detail": detail + (f"; {suggested}" if suggested else ""),
            }
        )
    speedup = interval[0] if interval else None
    significant = bool(interval and math.isfinite(interval[1]) and (interval[1] > 1.0 or interval[2] < 1.0))
    return {
        "schema": SCHEMA,
        **sides,
        "same_job": not defining,
        "forced": force,
        "differences": differences,
        "speedup": {
            "step_time": _round(speedup),
            "ci95": [_round(interval[1]), _round(interval[2])] if interval else [None, None],
            "significant": significant,
            "step_time_change_ratio": _round(1 / speedup - 1) if speedup else None,
            "throughput": _round(doc_b["steps_per_s"] / doc_a["steps_per_s"]) if doc_a.get("steps_per_s") else None,
            "method": f"ratio of mean step times; 95% CI from batch means ({est_a.blocks} and {est_b.blocks} blocks)",
        },
        "fractions": fractions,
        "phase_time_s": phase_time,
        "verdict": {
            "a": doc_a["primary"],
            "b": doc_b["primary"],
            "changed": doc_a["primary"] != doc_b["primary"],
            "moved_off": doc_a["primary"] if doc_a["primary"] not in (doc_b["primary"], "none") else None,
            "resolved_rules": sorted(rules_a - rules_b),
            "new_rules": sorted(rules_b - rules_a),
        },
        "config_changes": [{"key": k, "a": va, "b": vb} for k, va, vb in changes],
        "applied": applied_out,
        "warnings": _warnings(doc_a, doc_b),
    }


def _suggested_value(rec: dict[str, Any], changes: list[tuple[str, Any, Any]]) -> str:
    """For num_workers: the count run A suggested against the one run B used, when they differ."""
    if rec["id"] != "dataloader.num_workers":
        return ""
    title = str(rec.get("title", ""))
    suggested = title.rsplit(" to ", 1)[-1] if " to " in title else ""
    used = next((vb for k, _, vb in changes if k == "dataloader.num_workers"), None)
    if suggested.isdigit() and used is not None and int(suggested) != used:
        return f"run A suggested num_workers={suggested}, run B used {used}"
    return ""


# ---- rendering ---------------------------------------------------------------------------------------
def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.2f} ms"


def _pct(value: float) -> str:
    return f"{value:+.1%}"


def claims_speedup(diff: dict[str, Any]) -> bool:
    """Whether the speedup may be stated as such: the same job, or ``--force``."""
    return bool(diff["same_job"] or diff["forced"])


def headline(diff: dict[str, Any]) -> str:
    """The one-line answer every format leads with."""
    s = diff["speedup"]
    defining = ", ".join(d["what"] for d in diff["differences"] if d["defining"])
    if not claims_speedup(diff):
        return f"A and B are different jobs ({defining} differ): no speedup claimed (--force to compare anyway)"
    if s["step_time"] is None:
        return "No steps to compare"
    ci = s["ci95"]
    interval = f" (95% CI {ci[0]:.2f}–{ci[1]:.2f}×)" if ci[0] is not None else " (too few steps for an interval)"
    verdict = "faster" if s["step_time"] > 1 else "slower"
    sure = "" if s["significant"] else ", not significant"
    forced = f" [forced: different jobs, {defining} differ]" if not diff["same_job"] else ""
    return f"B is {s['step_time']:.2f}× {verdict}{interval}{sure}{forced}"


def describe_difference(row: dict[str, Any]) -> str:
    """One difference between the jobs, in words."""
    what, value_a, value_b = row["what"], row["a"], row["b"]
    if what == "command":
        same = "" if row["defining"] else "  (same program, other arguments)"
        return f"command: {value_a} → {value_b}{same}"
    if what == "model size":
        return f"model size: {value_a:,} → {value_b:,} parameters"
    if what == "batch size":
        return f"batch size: {value_a} → {value_b} (a step is different work: compare samples/s)"
    return f"world size: {value_a} → {value_b} ranks"


def render_text(diff: dict[str, Any]) -> str:
    a, b = diff["a"], diff["b"]
    lines = [f"profilerd diff · A {a['run_id']}  →  B {b['run_id']}", headline(diff)]
    if diff["differences"]:
        lines += ["What differs between A and B:"] + [f"  {describe_difference(d)}" for d in diff["differences"]]
    if not claims_speedup(diff):
        lines.append("Figures of the two jobs (not a speedup):")
    for name, side in (("A", a), ("B", b)):
        step = side["step_time_s"]
        if step["mean"] is None:
            lines.append(f"  {name}: no steps after warm-up were recorded")
            continue
        samples = f", {side['samples_per_s']:,.0f} samples/s" if side.get("samples_per_s") else ""
        lines.append(
            f"  {name}: step time mean {step['mean'] * 1000:.2f} ms (p50 {(step['p50'] or 0) * 1000:.2f}, "
            f"p95 {(step['p95'] or 0) * 1000:.2f}) · {side['steps_per_s']:.1f} steps/s per rank{samples} · "
            f"{side['steps']} steps"
        )
    lines += ["", "Where step time goes (share, and ms per step):"]
    for key, row in diff["fractions"].items():
        phase = diff["phase_time_s"][key]
        lines.append(
            f"  {key.replace('_', ' '):14} {row['a']:6.1%} → {row['b']:6.1%}  ({row['delta'] * 100:+.1f} pp)   "
            f"{(phase['a'] or 0) * 1000:7.2f} → {(phase['b'] or 0) * 1000:7.2f} ms"
        )
    v = diff["verdict"]
    lines.append("")
    if v["changed"]:
        moved = f" (moved off {v['moved_off']})" if v["moved_off"] else ""
        lines.append(f"Verdict: {v['a']} → {v['b']}{moved}")
    else:
        lines.append(f"Verdict: unchanged ({v['a']})")
    lines.append(f"  A: {a['summary']}")
    lines.append(f"  B: {b['summary']}")
    if v["resolved_rules"]:
        lines.append(f"  resolved: {', '.join(v['resolved_rules'])}")
    if v["new_rules"]:
        lines.append(f"  new: {', '.join(v['new_rules'])}")
    if diff["config_changes"]:
        lines += ["", "Configuration changes:"]
        lines += [f"  {c['key']}: {c['a']!r} → {c['b']!r}" for c in diff["config_changes"][:20]]
    lines.append("")
    if diff["applied"]:
        lines.append("Applied recommendations:")
        for rec in diff["applied"]:
            lines.append(f"  [{rec['status']}] {rec['id']}: {rec['detail']}")
    else:
        lines.append("No applied recommendation recognised in the configuration changes (name one with --applied ID).")
    if diff["warnings"]:
        lines += ["", "Warnings:"] + [f"  ! {w}" for w in diff["warnings"]]
    return "\n".join(lines) + "\n"


def render_markdown(diff: dict[str, Any]) -> str:
    a, b, s = diff["a"], diff["b"], diff["speedup"]
    lines = [
        f"### profilerd diff: `{a['run_id']}` → `{b['run_id']}` — {headline(diff)}",
        "",
        *[f"- differs: {describe_difference(d)}" for d in diff["differences"]],
        *([""] if diff["differences"] else []),
        "| | A | B | change |",
        "|---|---|---|---|",
        f"| step time (mean) | {_ms(a['step_time_s']['mean'])} | {_ms(b['step_time_s']['mean'])} | "
        f"{_pct(s['step_time_change_ratio'] or 0)} |",
        f"| steps/s per rank | {a['steps_per_s']:.2f} | {b['steps_per_s']:.2f} | {s['throughput'] or 0:.2f}× |",
    ]
    if a.get("samples_per_s") and b.get("samples_per_s"):
        lines.append(
            f"| samples/s | {a['samples_per_s']:,.0f} | {b['samples_per_s']:,.0f} | "
            f"{b['samples_per_s'] / a['samples_per_s']:.2f}× |"
        )
    for key, row in diff["fractions"].items():
        lines.append(
            f"| {key.replace('_', ' ')} share | {row['a']:.1%} | {row['b']:.1%} | {row['delta'] * 100:+.1f} pp |"
        )
    v = diff["verdict"]
    lines.append(f"| verdict | {v['a']} | {v['b']} | {'changed' if v['changed'] else 'unchanged'} |")
    lines.append("")
    for rec in diff["applied"]:
        lines.append(f"- **{rec['id']}** — {rec['status']}: {rec['detail']}")
    if not diff["applied"]:
        lines.append("- No applied recommendation recognised in the configuration changes.")
    for warning in diff["warnings"]:
        lines.append(f"> ⚠️ {warning}")
    return "\n".join(lines) + "\n"


def render_html(diff: dict[str, Any]) -> str:
    """A one-page HTML comparison with the report's styling: per-step phase times of A and B."""
    from html import escape

    from profilerd.report import charts
    from profilerd.report.html import CSP, CSS, FRACTION_COLORS

    a, b = diff["a"], diff["b"]
    layers = [
        charts.Layer(
            key.replace("_", " "),
            FRACTION_COLORS[key],
            np.array([diff["phase_time_s"][key]["a"] or 0.0, diff["phase_time_s"][key]["b"] or 0.0]),
        )
        for key in FRACTIONS
    ]
    bars = charts.stacked_bars(
        ["A (before)", "B (after)"],
        layers,
        title="Mean time per step, A and B",
        chart_id="chart-diff",
        fmt=charts.fmt_seconds,
    )
    text = escape(render_text(diff))
    title = escape(f"profilerd diff · {a['run_id']} → {b['run_id']}")
    legend = charts.legend([(key.replace("_", " "), FRACTION_COLORS[key]) for key in FRACTIONS])
    speedup = diff["speedup"]["step_time"]
    faster = speedup is not None and speedup >= 1
    verdict = diff["verdict"]
    moved = f"{verdict['a']} → {verdict['b']}" if verdict["changed"] else f"unchanged ({verdict['a']})"
    applied = "".join(
        f"<div><b>{escape(r['id'])}</b>: {escape(r['status'])} — {escape(r['detail'])}</div>" for r in diff["applied"]
    )
    color = "#15803d" if diff["speedup"]["significant"] and faster and claims_speedup(diff) else "#c2410c"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<title>{title}</title><style>{CSS}</style></head><body><div class="page">'
        f"<header><h1>{title}</h1></header>"
        f'<section><div class="verdict" style="--sev:{color}"><div class="headline">{escape(headline(diff))}</div>'
        f'<div class="summary">Verdict: {escape(moved)}</div>{applied}</div></section>'
        f"<section><h2>Mean time per step</h2>{legend}{bars}</section>"
        f"<section><h2>Comparison</h2><pre><code>{text}</code></pre></section></div></body></html>\n"
    )
