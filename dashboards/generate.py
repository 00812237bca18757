"""Writes the Grafana dashboards in dashboards/grafana/ from the panel lists below, and the alerts'
runbook links from DOCS_BASE_URL.

    python dashboards/generate.py          # rewrite the JSON files and the alerts' runbook_url
    python dashboards/generate.py --check  # exit 1 if a file differs from what this writes

The JSON files are what users import (Grafana 10 or newer: Dashboards > New > Import); this
script keeps their ids, layout and datasource references consistent. Change a panel here, run
the script, commit both. tests/test_dashboards.py checks that the files are up to date, and
tests/test_dashboards_prometheus.py evaluates every expression against a real Prometheus.

Series are labelled as a Prometheus scraping the daemons with `honor_labels: true` stores them
(docs/deployment.md): `job` is the training job, `instance` the node's daemon.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "grafana"
# Where docs/alerts.md is published: every alert's runbook_url is this plus "/alerts.md#<alert>".
# `profilerd dashboards --runbook-base URL` writes the files with another base (an internal mirror).
DOCS_BASE_URL = "https://github.com/profilerd/profilerd/blob/main/docs"
ALERT_FILES = (
    HERE / "prometheus" / "profilerd-alerts.yml",
    HERE / "prometheus" / "tests" / "profilerd-alerts.test.yml",
)
_RUNBOOK_URL = re.compile(r'(runbook_url: "?)[^"\s#]*(#[\w-]+)')
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_MIN_VERSION = "10.0.0"
SCHEMA_VERSION = 39

# Selectors for the template variables.
JOB = 'job=~"$job"'
NODE = 'instance=~"$node"'
RANKS = 'job=~"$job", instance=~"$node", rank=~"$rank"'
GPUS = 'instance=~"$node", gpu=~"$gpu"'
RATE = "$__rate_interval"

THROTTLE_REASONS = "sw_power_cap|sw_thermal|hw_thermal|hw_slowdown|hw_power_brake"
CATEGORY_CODES = {"none": 0, "data": 1, "compute": 2, "communication": 3, "algorithm": 4}
CATEGORY_COLORS = {"none": "text", "data": "orange", "compute": "green", "communication": "purple", "algorithm": "blue"}
SEVERITY_MAPPING = {"0": ("ok", "green"), "1": ("info", "blue"), "2": ("warning", "orange"), "3": ("critical", "red")}
PHASE_COLORS = {
    "data_wait": "orange",
    "forward": "blue",
    "backward": "dark-blue",
    "optimizer": "purple",
    "communication": "red",
    "other": "text",
}
LINKS = [
    {
        "title": "profilerd dashboards",
        "type": "dashboards",
        "tags": ["profilerd"],
        "asDropdown": True,
        "includeVars": False,
        "keepTime": True,
        "targetBlank": False,
        "icon": "external link",
        "tooltip": "",
        "url": "",
    }
]


# ------------------------------------------------------------------------------- building blocks


def target(expr: str, legend: str = "", *, instant: bool = False, table: bool = False) -> dict[str, Any]:
    """One Prometheus query; refIds are given by the panel."""
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "format": "table" if table else "time_series",
        "instant": instant or table,
        "range": not (instant or table),
        "legendFormat": legend or "__auto",
    }


def _thresholds(*steps: tuple[str, float | None]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for color, value in steps]}


def _value_mapping(mapping: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    options = {
        value: {"text": text, "color": color, "index": index}
        for index, (value, (text, color)) in enumerate(mapping.items())
    }
    return [{"type": "value", "options": options}]


def panel(
    kind: str,
    title: str,
    targets: list[dict[str, Any]],
    *,
    width: int,
    height: int,
    description: str = "",
    unit: str | None = None,
    defaults: dict[str, Any] | None = None,
    custom: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    overrides: list[dict[str, Any]] | None = None,
    transformations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    field_defaults: dict[str, Any] = {"color": {"mode": "palette-classic"}}
    if unit:
        field_defaults["unit"] = unit
    field_defaults.update(defaults or {})
    if custom:
        field_defaults["custom"] = custom
    result: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"w": width, "h": height},
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": field_defaults, "overrides": overrides or []},
        "options": options or {},
    }
    if transformations:
        result["transformations"] = transformations
    return result


def timeseries(
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str,
    width: int = 12,
    height: int = 8,
    description: str = "",
    stack: bool = False,
    steps: bool = False,
    min_value: float | None = None,
    max_value: float | None = None,
    threshold: float | None = None,
    overrides: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "line",
        "lineInterpolation": "stepAfter" if steps else "linear",
        "lineWidth": 1,
        "fillOpacity": 60 if stack else 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "line+area" if threshold is not None else "off"},
    }
    defaults: dict[str, Any] = {}
    if min_value is not None:
        defaults["min"] = min_value
    if max_value is not None:
        defaults["max"] = max_value
    if threshold is not None:
        defaults["thresholds"] = _thresholds(("transparent", None), ("red", threshold))
    return panel(
        "timeseries",
        title,
        targets,
        width=width,
        height=height,
        description=description,
        unit=unit,
        defaults=defaults,
        custom=custom,
        options={
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        overrides=overrides,
    )


def state_timeline(
    title: str,
    targets: list[dict[str, Any]],
    mapping: dict[str, tuple[str, str]],
    *,
    width: int = 24,
    height: int = 7,
    description: str = "",
) -> dict[str, Any]:
    return panel(
        "state-timeline",
        title,
        targets,
        width=width,
        height=height,
        description=description,
        defaults={"color": {"mode": "thresholds"}, "mappings": _value_mapping(mapping), "thresholds": _thresholds()},
        custom={"fillOpacity": 80, "lineWidth": 0, "hideFrom": {"legend": False, "tooltip": False, "viz": False}},
        options={
            "mergeValues": True,
            "showValue": "auto",
            "alignValue": "left",
            "rowHeight": 0.9,
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": False},
            "tooltip": {"mode": "single", "sort": "none"},
        },
    )


def table(
    title: str,
    targets: list[dict[str, Any]],
    *,
    width: int,
    height: int,
    description: str = "",
    rename: dict[str, str] | None = None,
    hide: Iterable[str] = (),
    columns: dict[str, dict[str, Any]] | None = None,
    sort_by: str | None = None,
) -> dict[str, Any]:
    """An instant table; several queries are merged on their common labels."""
    excluded = {"Time": True, "__name__": True} | {name: True for name in hide}
    overrides = []
    for name, properties in (columns or {}).items():
        overrides.append(
            {
                "matcher": {"id": "byName", "options": name},
                "properties": [{"id": key, "value": value} for key, value in properties.items()],
            }
        )
    return panel(
        "table",
        title,
        targets,
        width=width,
        height=height,
        description=description,
        defaults={"custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
        options={
            "showHeader": True,
            "cellHeight": "sm",
            "footer": {"show": False, "reducer": ["sum"], "fields": ""},
            "sortBy": [{"displayName": sort_by, "desc": True}] if sort_by else [],
        },
        overrides=overrides,
        transformations=[
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": excluded, "renameByName": rename or {}}},
        ],
    )


def stat(
    title: str,
    targets: list[dict[str, Any]],
    *,
    width: int = 6,
    height: int = 5,
    description: str = "",
    mapping: dict[str, tuple[str, str]] | None = None,
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"color": {"mode": "thresholds"}, "thresholds": _thresholds(("green", None))}
    if mapping:
        defaults["mappings"] = _value_mapping(mapping)
    return panel(
        "stat",
        title,
        targets,
        width=width,
        height=height,
        description=description,
        defaults=defaults,
        options={
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "value_and_name",
        },
    )


def bargauge(
    title: str,
    targets: list[dict[str, Any]],
    *,
    unit: str,
    width: int = 12,
    height: int = 8,
    description: str = "",
    warn: float,
    crit: float,
) -> dict[str, Any]:
    return panel(
        "bargauge",
        title,
        targets,
        width=width,
        height=height,
        description=description,
        unit=unit,
        defaults={
            "min": 0,
            "color": {"mode": "thresholds"},
            "thresholds": _thresholds(("green", None), ("yellow", warn), ("red", crit)),
        },
        options={
            "orientation": "horizontal",
            "displayMode": "gradient",
            "showUnfilled": True,
            "valueMode": "color",
            "namePlacement": "auto",
            "minVizHeight": 16,
            "minVizWidth": 8,
            "sizing": "auto",
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        },
    )


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def color_override(regex: str, color: str, *, dashed: bool = False) -> dict[str, Any]:
    properties: list[dict[str, Any]] = [{"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]
    if dashed:
        properties.append({"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}})
    return {"matcher": {"id": "byRegexp", "options": regex}, "properties": properties}


def dashed(regex: str) -> dict[str, Any]:
    return {
        "matcher": {"id": "byRegexp", "options": regex},
        "properties": [
            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
            {"id": "custom.fillOpacity", "value": 0},
        ],
    }


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Place panels left to right, wrapping at Grafana's 24 columns; rows start a new line."""
    x = y = line_height = 0
    for index, item in enumerate(panels, start=1):
        pos = item["gridPos"]
        if item["type"] == "row" or x + pos["w"] > 24:
            y += line_height
            x = line_height = 0
        pos.update(x=x, y=y)
        item["id"] = index
        x += pos["w"]
        line_height = max(line_height, pos["h"])
        if item["type"] == "row":
            y += 1
            x = line_height = 0
    return panels


def query_variable(
    name: str, label: str, query: str, *, all_value: str | None, sort: int = 1, description: str = ""
) -> dict[str, Any]:
    variable: dict[str, Any] = {
        "type": "query",
        "name": name,
        "label": label,
        "description": description,
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,
        "regex": "",
        "sort": sort,
        "includeAll": True,
        "multi": True,
        "current": {},
        "options": [],
        "hide": 0,
    }
    if all_value is not None:
        variable["allValue"] = all_value
    return variable


DATASOURCE_VARIABLE = {
    "type": "datasource",
    "name": "datasource",
    "label": "Prometheus",
    "query": "prometheus",
    "regex": "",
    "refresh": 1,
    "includeAll": False,
    "multi": False,
    "current": {},
    "options": [],
    "hide": 0,
}

ALERT_ANNOTATION = {
    "name": "profilerd alerts",
    "datasource": DATASOURCE,
    "enable": True,
    "iconColor": "red",
    "expr": 'ALERTS{alertname=~"Profilerd.*", alertstate="firing"}',
    "step": "60s",
    "titleFormat": "{{alertname}}",
    "textFormat": "{{job}} {{instance}} {{gpu}} {{rank}}",
    "useValueForTime": False,
}


def dashboard(
    uid: str, title: str, description: str, variables: list[dict[str, Any]], panels: list[dict[str, Any]]
) -> dict[str, Any]:
    used_types = sorted({p["type"] for p in panels if p["type"] != "row"})
    return {
        "__inputs": [],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": GRAFANA_MIN_VERSION},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *({"type": "panel", "id": kind, "name": kind, "version": ""} for kind in used_types),
        ],
        "annotations": {"list": [ALERT_ANNOTATION]},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": LINKS,
        "liveNow": False,
        "panels": layout(panels),
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["profilerd", "pytorch", "gpu"],
        "templating": {"list": [DATASOURCE_VARIABLE, *variables]},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


# ------------------------------------------------------------------------------- training jobs


def _verdict_code_expr() -> str:
    """The current category of each job on each node as a number (CATEGORY_CODES), so a state
    timeline can colour it: one series per job and node instead of one per category."""
    terms = [
        f'(profilerd_verdict{{{JOB}, {NODE}, category="{category}"}} == 1) * {code}'
        for category, code in CATEGORY_CODES.items()
    ]
    return "max by (job, instance) (\n  " + "\n  or ".join(terms) + "\n)"


def jobs_dashboard() -> dict[str, Any]:
    variables = [
        query_variable(
            "job",
            "Job",
            "label_values(profilerd_step_duration_seconds_count, job)",
            all_value=".*",
            description="Training jobs: PROFILERD_JOB_ID, TORCHELASTIC_RUN_ID or SLURM_JOB_ID",
        ),
        query_variable(
            "node",
            "Node",
            'label_values(profilerd_step_duration_seconds_count{job=~"$job"}, instance)',
            all_value=None,  # "All" means the selected jobs' nodes, not every node in the cluster
            description="The daemons (one per node) the selected jobs run on",
        ),
        query_variable(
            "rank",
            "Rank",
            'label_values(profilerd_step_duration_seconds_count{job=~"$job", instance=~"$node"}, rank)',
            all_value=".*",
            sort=3,
        ),
    ]
    phase_overrides = [color_override(f"^{phase}$", color) for phase, color in PHASE_COLORS.items()]
    ratio = {"unit": "percentunit", "decimals": 1}
    severity_column = {
        "mappings": _value_mapping(SEVERITY_MAPPING),
        "custom.cellOptions": {"type": "color-text"},
    }
    panels = [
        row("Jobs now"),
        table(
            "Jobs (all nodes)",
            [
                target(f"max by (job) (job:profilerd_steps_per_second:rate5m{{{JOB}}})", table=True),
                target(f"max by (job) (job:profilerd_active_ranks:count{{{JOB}}})", table=True),
                target(f"max by (job) (job:profilerd_data_wait:ratio_rate5m{{{JOB}}})", table=True),
                target(f"max by (job) (job:profilerd_communication:ratio_rate5m{{{JOB}}})", table=True),
                target(f"max by (job) (job:profilerd_gpu_utilization:avg{{{JOB}}})", table=True),
                target(f"max by (job) (profilerd_verdict_severity{{{JOB}}})", table=True),
            ],
            width=24,
            height=7,
            description=(
                "Every job's job-wide numbers from the recording rules: steps per second, ranks that "
                "stepped in the last 2 minutes, the share of step time waiting for data and in exposed "
                "communication across all its nodes, the mean utilization of its GPUs, and the worst "
                "verdict severity of its nodes. A data wait above 20% is the ProfilerdJobDataStarved alert."
            ),
            rename={
                "job": "job",
                "Value #A": "steps/s",
                "Value #B": "active ranks",
                "Value #C": "data wait",
                "Value #D": "communication",
                "Value #E": "GPU busy",
                "Value #F": "severity",
            },
            columns={
                "data wait": {
                    **ratio,
                    "custom.cellOptions": {"type": "color-background"},
                    "thresholds": _thresholds(("green", None), ("orange", 0.1), ("red", 0.2)),
                },
                "communication": {
                    **ratio,
                    "custom.cellOptions": {"type": "color-background"},
                    "thresholds": _thresholds(("green", None), ("orange", 0.1), ("red", 0.2)),
                },
                "GPU busy": {
                    **ratio,
                    "custom.cellOptions": {"type": "color-background"},
                    "thresholds": _thresholds(("red", None), ("orange", 0.1), ("green", 0.5)),
                },
                "steps/s": {"decimals": 2},
                "severity": severity_column,
            },
            sort_by="data wait",
        ),
        row("Verdict"),
        state_timeline(
            "Verdict timeline (per node)",
            [target(_verdict_code_expr(), "{{job}} · {{instance}}")],
            {str(code): (category, CATEGORY_COLORS[category]) for category, code in CATEGORY_CODES.items()},
            height=7,
            description=(
                "What holds each job back, as each node's daemon diagnoses it: data, compute, "
                "communication or algorithm (none: not enough evidence yet). Nodes of one job can "
                "disagree; the job-wide shares below settle it."
            ),
        ),
        state_timeline(
            "Verdict severity (per node)",
            [target(f"max by (job, instance) (profilerd_verdict_severity{{{JOB}, {NODE}}})", "{{job}} · {{instance}}")],
            SEVERITY_MAPPING,
            width=12,
            height=8,
        ),
        table(
            "Top recommendations",
            [
                target(
                    "sort_desc(max by (job, recommendation) "
                    f"(profilerd_recommendation_estimated_speedup_ratio{{{JOB}, {NODE}}}))",
                    table=True,
                )
            ],
            width=12,
            height=8,
            description=(
                "The daemons' current recommendations with their estimated whole-step speedup (Amdahl's "
                "law over the measured shares). `profilerd report` on a node has the evidence and the code "
                "to change."
            ),
            rename={"Value": "estimated speedup"},
            columns={"estimated speedup": {"unit": "suffix:×", "decimals": 2}},
            sort_by="estimated speedup",
        ),
        row("Step time"),
        timeseries(
            "Step time breakdown",
            [
                target(
                    f"sum by (phase) (rate(profilerd_step_phase_seconds_total{{{RANKS}}}[{RATE}]))\n"
                    "/ ignoring (phase) group_left\n"
                    f"sum(rate(profilerd_step_duration_seconds_count{{{RANKS}}}[{RATE}]))",
                    "{{phase}}",
                )
            ],
            unit="s",
            stack=True,
            min_value=0,
            description="Mean time per step in each phase over the selected ranks, stacked: the top is the step time.",
            overrides=phase_overrides,
        ),
        timeseries(
            "Share of step time per phase, job-wide (all nodes)",
            [target(f"job_phase:profilerd_step_phase:ratio_rate5m{{{JOB}}}", "{{job}} · {{phase}}")],
            unit="percentunit",
            stack=True,
            min_value=0,
            max_value=1,
            description=(
                "Recording rule job_phase:profilerd_step_phase:ratio_rate5m: every rank of the job on every node, "
                "over 5 minutes."
            ),
        ),
        timeseries(
            "Data wait and communication, job-wide",
            [
                target(f"job:profilerd_data_wait:ratio_rate5m{{{JOB}}}", "{{job}} data wait"),
                target(f"job:profilerd_communication:ratio_rate5m{{{JOB}}}", "{{job}} communication"),
            ],
            unit="percentunit",
            min_value=0,
            max_value=1,
            threshold=0.2,
            description=(
                "The inputs of the ProfilerdJobDataStarved and ProfilerdJobCommunicationBound alerts (threshold 20%)."
            ),
        ),
        timeseries(
            "Steps per second",
            [
                target(
                    f"sum by (job, instance, rank) (rate(profilerd_step_duration_seconds_count{{{RANKS}}}[{RATE}]))",
                    "{{job}} rank {{rank}} · {{instance}}",
                )
            ],
            unit="short",
            min_value=0,
        ),
        row("Ranks and stragglers"),
        timeseries(
            "Step time per rank (mean)",
            [
                target(
                    f"rate(profilerd_step_duration_seconds_sum{{{RANKS}}}[{RATE}])\n"
                    f"/ (rate(profilerd_step_duration_seconds_count{{{RANKS}}}[{RATE}]) > 0)",
                    "{{job}} rank {{rank}} · {{instance}}",
                )
            ],
            unit="s",
            min_value=0,
        ),
        timeseries(
            "Step time per rank (p95)",
            [
                target(
                    "histogram_quantile(0.95, sum by (job, instance, rank, le) "
                    f"(rate(profilerd_step_duration_seconds_bucket{{{RANKS}}}[{RATE}])))",
                    "{{job}} rank {{rank}} · {{instance}}",
                )
            ],
            unit="s",
            min_value=0,
        ),
        bargauge(
            "Straggler score per rank",
            [
                target(
                    f"sort_desc(job_instance_rank:profilerd_straggler:score5m{{{RANKS}}})",
                    "{{job}} rank {{rank}} · {{instance}}",
                    instant=True,
                )
            ],
            unit="percentunit",
            warn=0.1,
            crit=0.25,
            description=(
                "How much longer a rank's own work (step time minus communication) is than the median "
                "rank's, as a share of the job's step time. In synchronous training the others wait for "
                "the slowest rank in communication, so the straggler is the rank at the top. Above 10% "
                "for 10 minutes: ProfilerdStragglerRank."
            ),
        ),
        timeseries(
            "Own work per rank (step time minus communication)",
            [
                target(
                    f"job_instance_rank:profilerd_step_own_seconds:mean5m{{{RANKS}}}",
                    "{{job}} rank {{rank}} · {{instance}}",
                )
            ],
            unit="s",
            min_value=0,
        ),
        row("Input pipeline and host"),
        timeseries(
            "Training processes and DataLoader workers, CPU",
            [target(f"profilerd_process_cpu_cores{{{RANKS}}}", "{{job}} rank {{rank}} {{role}}")],
            unit="suffix: cores",
            min_value=0,
            description="Busy cores of each training process and of its DataLoader workers together.",
        ),
        timeseries(
            "DataLoader workers",
            [target(f"profilerd_dataloader_workers{{{RANKS}}}", "{{job}} rank {{rank}}")],
            unit="short",
            width=6,
            min_value=0,
            steps=True,
        ),
        timeseries(
            "Host CPU, I/O wait and memory",
            [
                target(f"avg by (instance) (profilerd_host_cpu_utilization_ratio{{{NODE}}})", "{{instance}} CPU busy"),
                target(f"profilerd_host_iowait_ratio{{{NODE}}}", "{{instance}} I/O wait"),
                target(
                    f"profilerd_host_memory_used_bytes{{{NODE}}} / profilerd_host_memory_total_bytes{{{NODE}}}",
                    "{{instance}} memory used",
                ),
            ],
            unit="percentunit",
            width=6,
            min_value=0,
            max_value=1,
        ),
        row("GPUs on the job's nodes"),
        timeseries(
            "GPU utilization",
            [
                target(f"profilerd_gpu_utilization_ratio{{{NODE}}}", "{{instance}} GPU {{gpu}}"),
                target(f"job:profilerd_gpu_utilization:avg{{{JOB}}}", "{{job}} (its GPUs, mean)"),
            ],
            unit="percentunit",
            min_value=0,
            max_value=1,
            description=(
                "NVML utilization (share of time a kernel ran) of every GPU on the selected nodes, and "
                "the mean over each job's own GPUs (dashed; recording rule job:profilerd_gpu_utilization:avg)."
            ),
            overrides=[dashed(r"\(its GPUs, mean\)$")],
        ),
        timeseries(
            "GPU memory used",
            [target(f"instance_gpu:profilerd_gpu_memory_used:ratio{{{NODE}}}", "{{instance}} GPU {{gpu}}")],
            unit="percentunit",
            min_value=0,
            max_value=1,
            threshold=0.95,
        ),
        timeseries(
            "GPU power",
            [
                target(f"profilerd_gpu_power_watts{{{NODE}}}", "{{instance}} GPU {{gpu}}"),
                target(f"profilerd_gpu_power_limit_watts{{{NODE}}}", "{{instance}} GPU {{gpu}} limit"),
            ],
            unit="watt",
            width=8,
            min_value=0,
            overrides=[dashed(" limit$")],
        ),
        timeseries(
            "GPU temperature",
            [
                target(f"profilerd_gpu_temperature_celsius{{{NODE}}}", "{{instance}} GPU {{gpu}}"),
                target(f"profilerd_gpu_memory_temperature_celsius{{{NODE}}}", "{{instance}} GPU {{gpu}} memory"),
            ],
            unit="celsius",
            width=8,
            overrides=[dashed(" memory$")],
        ),
        timeseries(
            "GPU SM clock (share of maximum)",
            [
                target(
                    f"profilerd_gpu_sm_clock_hertz{{{NODE}}} / profilerd_gpu_sm_clock_max_hertz{{{NODE}}}",
                    "{{instance}} GPU {{gpu}}",
                )
            ],
            unit="percentunit",
            width=8,
            min_value=0,
            max_value=1,
        ),
        state_timeline(
            "GPU throttling",
            [
                target(
                    "max by (instance, gpu, reason) "
                    f'(profilerd_gpu_clock_event_reason{{{NODE}, reason=~"{THROTTLE_REASONS}"}})',
                    "{{instance}} GPU {{gpu}} {{reason}}",
                )
            ],
            {"0": ("", "transparent"), "1": ("throttled", "red")},
            height=8,
            description=(
                "Clock event reasons that slow a GPU down: thermal, hardware slowdown, power brake and "
                "power cap. Alerts: ProfilerdGpuThermalThrottling, ProfilerdGpuPowerThrottling."
            ),
        ),
        table(
            "GPUs held by each rank",
            [
                target(f"max by (job, rank, instance, gpu, uuid) (profilerd_rank_gpu_info{{{RANKS}}})", table=True),
                target(
                    f"max by (job, rank, instance, gpu) (profilerd_rank_gpu_memory_used_bytes{{{RANKS}}})", table=True
                ),
            ],
            width=12,
            height=8,
            description=(
                "Which GPU each rank runs on (NVML's process list joined with the probes' hellos) and the "
                "device memory it holds there. Empty when the daemon cannot see the training processes' "
                "PIDs (docs/deployment.md: hostPID)."
            ),
            hide=["Value #A"],
            rename={"Value #B": "memory"},
            columns={"memory": {"unit": "bytes"}},
        ),
        timeseries(
            "GPU errors: XID events and uncorrectable ECC (counters)",
            [
                target(f'profilerd_gpu_events_total{{{NODE}, kind="xid"}}', "{{instance}} GPU {{gpu}} XID events"),
                target(
                    f"profilerd_gpu_ecc_uncorrected_errors_total{{{NODE}}}", "{{instance}} GPU {{gpu}} uncorrected ECC"
                ),
            ],
            unit="short",
            min_value=0,
            steps=True,
            description=(
                "Counters: a step up is a new error. XID events count since the daemon started, ECC errors "
                "since the driver loaded. Alerts: ProfilerdGpuXidError, ProfilerdGpuEccUncorrectedErrors."
            ),
        ),
        row("profilerd daemons"),
        stat(
            "Daemons",
            [
                target(f"up{{{NODE}}}", "{{instance}}", instant=True),
            ],
            width=4,
            height=8,
            mapping={"0": ("down", "red"), "1": ("up", "green")},
            description="Whether Prometheus could scrape each node's daemon. Down for 5 minutes: ProfilerdDaemonDown.",
        ),
        stat(
            "Recording",
            [target(f"profilerd_recording_paused{{{NODE}}}", "{{instance}}", instant=True)],
            width=4,
            height=8,
            mapping={"0": ("recording", "green"), "1": ("paused", "red")},
            description="Run recordings are paused when the disk is full: ProfilerdRecordingPaused.",
        ),
        timeseries(
            "Dropped probe messages",
            [
                target(
                    f"sum by (instance, reason) (rate(profilerd_probe_messages_dropped_total{{{NODE}}}[{RATE}]))",
                    "{{instance}} {{reason}}",
                ),
                target(
                    f"sum by (instance) (rate(profilerd_probe_messages_received_total{{{NODE}}}[{RATE}]))",
                    "{{instance}} received",
                ),
            ],
            unit="cps",
            width=8,
            min_value=0,
            description=(
                "Probe messages lost or rejected, by reason, against those received (dashed). Over 1% for 10 minutes:"
                " ProfilerdProbeDataDropped."
            ),
            overrides=[dashed(" received$")],
        ),
        timeseries(
            "Sampler errors",
            [
                target(
                    f"sum by (instance, sampler) (rate(profilerd_sampler_errors_total{{{NODE}}}[{RATE}]))",
                    "{{instance}} {{sampler}}",
                ),
                target(f"rate(profilerd_gpu_field_errors_total{{{NODE}}}[{RATE}])", "{{instance}} NVML field reads"),
            ],
            unit="cps",
            width=8,
            min_value=0,
        ),
        timeseries(
            "Sampler lag and cycle time",
            [
                target(f"profilerd_sampler_lag_seconds{{{NODE}}}", "{{instance}} {{sampler}} lag"),
                target(f"profilerd_sampler_duration_seconds{{{NODE}}}", "{{instance}} {{sampler}} cycle"),
            ],
            unit="s",
            width=12,
            min_value=0,
            description=(
                "How late each sampler's last cycle started (lag), and how long it took. Lag that grows means the "
                "daemon does not get the CPU it needs."
            ),
            overrides=[dashed(" cycle$")],
        ),
        timeseries(
            "Recording: rows dropped",
            [target(f"increase(profilerd_recording_rows_dropped_total{{{NODE}}}[{RATE}])", "{{instance}}")],
            unit="short",
            width=12,
            min_value=0,
            description=(
                "Rows a recording could not keep in memory while it was paused for long: missing from "
                "`profilerd report`, not from the live metrics."
            ),
        ),
    ]
    return dashboard(
        "profilerd-jobs",
        "profilerd / Training jobs",
        "Where the step time of PyTorch training jobs goes across a cluster: verdicts, job-wide "
        "shares, stragglers, recommendations, the GPUs on the jobs' nodes and the daemons' health.",
        variables,
        panels,
    )


# ------------------------------------------------------------------------------- node GPUs


def node_gpus_dashboard() -> dict[str, Any]:
    variables = [
        query_variable(
            "node",
            "Node",
            "label_values(profilerd_gpu_info, instance)",
            all_value=None,
            description="Daemons that report GPUs",
        ),
        query_variable(
            "gpu",
            "GPU",
            'label_values(profilerd_gpu_info{instance=~"$node"}, gpu)',
            all_value=".*",
            sort=3,
        ),
    ]
    legend = "{{instance}} GPU {{gpu}}"
    panels = [
        row("GPUs"),
        table(
            "GPUs",
            [
                target(f"max by (instance, gpu, uuid, name) (profilerd_gpu_info{{{GPUS}}})", table=True),
                target(f"max by (instance, gpu, uuid) (profilerd_gpu_memory_total_bytes{{{GPUS}}})", table=True),
                target(f"max by (instance, gpu, uuid) (profilerd_gpu_power_limit_watts{{{GPUS}}})", table=True),
                target(f"max by (instance, gpu, uuid) (profilerd_gpu_mig_enabled{{{GPUS}}})", table=True),
                target(f"max by (instance, gpu, uuid) (profilerd_gpu_lost{{{GPUS}}})", table=True),
            ],
            width=16,
            height=7,
            hide=["Value #A"],
            rename={"Value #B": "memory", "Value #C": "power limit", "Value #D": "MIG", "Value #E": "state"},
            columns={
                "memory": {"unit": "bytes"},
                "power limit": {"unit": "watt"},
                "MIG": {"mappings": _value_mapping({"0": ("off", "text"), "1": ("on", "blue")})},
                "state": {
                    "mappings": _value_mapping({"0": ("ok", "green"), "1": ("lost", "red")}),
                    "custom.cellOptions": {"type": "color-text"},
                },
            },
        ),
        table(
            "Training ranks on these GPUs",
            [target(f"max by (instance, gpu, job, rank) (profilerd_rank_gpu_info{{{GPUS}}})", table=True)],
            width=8,
            height=7,
            hide=["Value"],
        ),
        row("Utilization"),
        timeseries(
            "Utilization",
            [
                target(f"profilerd_gpu_utilization_ratio{{{GPUS}}}", legend + " kernels"),
                target(f"profilerd_gpu_memory_utilization_ratio{{{GPUS}}}", legend + " memory"),
            ],
            unit="percentunit",
            min_value=0,
            max_value=1,
            overrides=[dashed(" memory$")],
            description=(
                "NVML utilization: the share of time a kernel ran, and the share of time device memory was read or "
                "written."
            ),
        ),
        timeseries(
            "SM activity (GPM)",
            [
                target(f"profilerd_gpu_sm_active_ratio{{{GPUS}}}", legend + " SM active"),
                target(f"profilerd_gpu_sm_occupancy_ratio{{{GPUS}}}", legend + " occupancy"),
                target(f"profilerd_gpu_tensor_active_ratio{{{GPUS}}}", legend + " tensor cores"),
                target(f"profilerd_gpu_dram_active_ratio{{{GPUS}}}", legend + " DRAM bandwidth"),
            ],
            unit="percentunit",
            min_value=0,
            max_value=1,
            description=(
                "GPU performance metrics (Hopper and newer): how much of the SMs, tensor cores and memory bandwidth "
                "the work uses."
            ),
        ),
        timeseries(
            "Math pipes (GPM)",
            [
                target(f"profilerd_gpu_fp16_active_ratio{{{GPUS}}}", legend + " FP16"),
                target(f"profilerd_gpu_fp32_active_ratio{{{GPUS}}}", legend + " FP32"),
                target(f"profilerd_gpu_fp64_active_ratio{{{GPUS}}}", legend + " FP64"),
            ],
            unit="percentunit",
            min_value=0,
            max_value=1,
            description="Non-tensor math. Much FP32 with little tensor-core activity is the case for bf16 autocast.",
        ),
        timeseries(
            "SM utilization per process",
            [target(f"profilerd_gpu_process_sm_utilization_ratio{{{GPUS}}}", legend + " pid {{pid}}")],
            unit="percentunit",
            min_value=0,
            max_value=1,
        ),
        row("Memory"),
        timeseries(
            "Device memory",
            [
                target(f"profilerd_gpu_memory_used_bytes{{{GPUS}}}", legend + " used"),
                target(f"profilerd_gpu_memory_reserved_bytes{{{GPUS}}}", legend + " reserved by the driver"),
                target(f"profilerd_gpu_memory_total_bytes{{{GPUS}}}", legend + " total"),
            ],
            unit="bytes",
            min_value=0,
            overrides=[dashed(" total$")],
        ),
        timeseries(
            "Memory per process and per rank",
            [
                target(f"profilerd_gpu_process_memory_used_bytes{{{GPUS}}}", legend + " pid {{pid}}"),
                target(f"profilerd_rank_gpu_memory_used_bytes{{{GPUS}}}", legend + " {{job}} rank {{rank}}"),
            ],
            unit="bytes",
            min_value=0,
        ),
        timeseries(
            "MIG instances: memory used",
            [
                target(
                    f"profilerd_gpu_mig_instance_memory_used_bytes{{{GPUS}}}\n"
                    f"/ profilerd_gpu_mig_instance_memory_total_bytes{{{GPUS}}}",
                    legend + " instance {{gpu_instance}}",
                )
            ],
            unit="percentunit",
            min_value=0,
            max_value=1,
            width=24,
            height=6,
        ),
        row("Power, temperature and clocks"),
        timeseries(
            "Power",
            [
                target(f"profilerd_gpu_power_watts{{{GPUS}}}", legend + " now"),
                target(f"profilerd_gpu_power_average_watts{{{GPUS}}}", legend + " average"),
                target(f"profilerd_gpu_power_limit_watts{{{GPUS}}}", legend + " limit"),
            ],
            unit="watt",
            width=8,
            min_value=0,
            overrides=[dashed(" limit$")],
        ),
        timeseries(
            "Temperature",
            [
                target(f"profilerd_gpu_temperature_celsius{{{GPUS}}}", legend),
                target(f"profilerd_gpu_memory_temperature_celsius{{{GPUS}}}", legend + " memory"),
            ],
            unit="celsius",
            width=8,
            overrides=[dashed(" memory$")],
        ),
        timeseries(
            "Clocks",
            [
                target(f"profilerd_gpu_sm_clock_hertz{{{GPUS}}}", legend + " SM"),
                target(f"profilerd_gpu_sm_clock_max_hertz{{{GPUS}}}", legend + " SM max"),
                target(f"profilerd_gpu_memory_clock_hertz{{{GPUS}}}", legend + " memory"),
                target(f"profilerd_gpu_memory_clock_max_hertz{{{GPUS}}}", legend + " memory max"),
            ],
            unit="hertz",
            width=8,
            min_value=0,
            overrides=[dashed(" max$")],
        ),
        state_timeline(
            "Clock event reasons",
            [target(f"profilerd_gpu_clock_event_reason{{{GPUS}}}", legend + " {{reason}}")],
            {"0": ("", "transparent"), "1": ("active", "orange")},
            height=9,
            description=(
                "Why the clocks are below maximum. idle, applications_clocks, sync_boost and display_clocks "
                "are harmless; the thermal, slowdown and power ones cost speed."
            ),
        ),
        row("Interconnect"),
        timeseries(
            "PCIe",
            [
                target(f"profilerd_gpu_pcie_tx_bytes_per_second{{{GPUS}}}", legend + " sent"),
                target(f"profilerd_gpu_pcie_rx_bytes_per_second{{{GPUS}}}", legend + " received"),
            ],
            unit="Bps",
            min_value=0,
        ),
        timeseries(
            "NVLink",
            [
                target(f"profilerd_gpu_nvlink_tx_bytes_per_second{{{GPUS}}}", legend + " sent"),
                target(f"profilerd_gpu_nvlink_rx_bytes_per_second{{{GPUS}}}", legend + " received"),
            ],
            unit="Bps",
            min_value=0,
        ),
        row("Health"),
        timeseries(
            "ECC errors and remapped rows (counters)",
            [
                target(f"profilerd_gpu_ecc_corrected_errors_total{{{GPUS}}}", legend + " corrected"),
                target(f"profilerd_gpu_ecc_uncorrected_errors_total{{{GPUS}}}", legend + " uncorrected"),
                target(f"profilerd_gpu_remapped_rows_total{{{GPUS}}}", legend + " remapped rows"),
            ],
            unit="short",
            width=8,
            min_value=0,
            steps=True,
        ),
        timeseries(
            "GPU events (counters)",
            [target(f"profilerd_gpu_events_total{{{NODE}}}", "{{instance}} GPU {{gpu}} {{kind}}")],
            unit="short",
            width=8,
            min_value=0,
            steps=True,
            description=(
                "XID errors, lost and recovered GPUs since the daemon started. An XID without a GPU has an empty gpu "
                "label."
            ),
        ),
        timeseries(
            "NVML read errors",
            [target(f"rate(profilerd_gpu_field_errors_total{{{NODE}}}[{RATE}])", "{{instance}}")],
            unit="cps",
            width=8,
            min_value=0,
        ),
    ]
    return dashboard(
        "profilerd-node-gpus",
        "profilerd / Node GPUs",
        "Every GPU metric profilerd exports for the GPUs of one or more nodes.",
        variables,
        panels,
    )


# ------------------------------------------------------------------------------- output

DASHBOARDS = {
    "profilerd-jobs.json": jobs_dashboard,
    "profilerd-node-gpus.json": node_gpus_dashboard,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def with_runbook_base(text: str, base: str) -> str:
    """Alert rules (or their promtool tests) with every runbook_url under ``base``."""
    return _RUNBOOK_URL.sub(lambda m: f"{m.group(1)}{base.rstrip('/')}/alerts.md{m.group(2)}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    outputs = [(OUT / name, render(build)) for name, build in DASHBOARDS.items()]
    outputs += [(path, with_runbook_base(path.read_text(), DOCS_BASE_URL)) for path in ALERT_FILES]
    for path, text in outputs:
        name = path.name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python dashboards/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
