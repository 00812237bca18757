"""Communication rules: collectives, stragglers and DDP settings."""

from __future__ import annotations

from typing import Any

from profilerd.analysis import recommendations as recs
from profilerd.analysis.features import Features
from profilerd.analysis.rules.base import _confidence, _device_metrics, _severity, rule
from profilerd.model import Finding


def _ddp_settings(features: Features) -> dict[str, Any] | None:
    for model in features.context.models():
        if model.get("ddp"):
            return dict(model["ddp"])
    return None


@rule(
    "communication.exposed",
    "communication",
    "Communication not hidden behind compute",
    ("ddp.grad_compression", "ddp.bucket_cap_mb", "ddp.no_sync_accumulation", "ddp.static_graph", "nccl.topology"),
)
def check_exposed_comm(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of step time in collectives that did not overlap with compute (DDP's gradient
    all-reduce after the last gradient was ready, and blocking collectives called from Python);
    with device timing, beside the GPU's busy share on the device clock."""
    comm = features.fractions["communication"]
    severity = _severity(comm, t)
    if severity is None:
        return None
    ddp = _ddp_settings(features)
    found = [recs.grad_compression(features), recs.no_sync_accumulation(features)]
    gpu = features.context.gpu
    pcie, nvlink = gpu.get("gpu_pcie_bytes_per_second"), gpu.get("gpu_nvlink_bytes_per_second")
    if gpu.get("gpu_count", 0) > 1 and pcie is not None and (nvlink is None or nvlink < 0.1 * pcie):
        found.append(recs.nccl_topology(features, pcie, nvlink))
    if ddp is not None:
        found.append(recs.bucket_cap(features, ddp.get("bucket_cap_mb")))
        if not ddp.get("static_graph") or not ddp.get("gradient_as_bucket_view"):
            found.append(recs.static_graph(features))
    signals = features.signals
    detail = ""
    if signals.comm_ops_per_step:
        detail = f"; {signals.comm_ops_per_step:.1f} Python collectives per step"
    evidence = f"{comm:.0%} of step time in exposed communication{detail}"
    if features.device is not None:
        evidence += (
            f"; on the device clock the GPU computes {features.device.at_least}"
            f"{features.device.busy_fraction:.0%} of the step "
            f"and waits for collectives {comm:.0%}"
        )
    return Finding(
        "communication.exposed",
        "communication",
        severity,
        evidence,
        _confidence(features, comm, t["warning"]),
        {
            "communication_fraction": comm,
            "comm_bytes_per_step": signals.comm_bytes_per_step,
            **_device_metrics(features),
        },
        t,
        tuple(sorted(found, key=lambda r: -r.estimated_speedup)),
    )


@rule("communication.straggler", "communication", "One rank makes the others wait", ("straggler.rank",))
def check_straggler(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """How much longer the slowest rank's own work (step minus communication) is than the
    median rank's, and how much more the other ranks wait than it does, as shares of the mean
    step time; the culprit's own breakdown names the cause."""
    ranks = features.per_rank
    if features.ranks < 2 or ranks.empty or features.step_time_mean_s <= 0:
        return None
    own = ranks.set_index("rank")["own_s_mean"]
    culprit = int(own.idxmax())
    gap = float(own.max() - own.median()) / features.step_time_mean_s
    row = ranks.set_index("rank").loc[culprit]
    others = ranks[ranks["rank"] != culprit]
    waited = float(others["communication_fraction"].mean()) if not others.empty else 0.0
    # A straggler does the most work and waits the least; when every rank waits alike, the
    # job is communication-bound, not held back by one rank.
    wait_gap = waited - float(row["communication_fraction"])
    severity = _severity(min(gap, wait_gap), t)
    if severity is None:
        return None
    data_gap = float(row["data_wait_fraction"] - others["data_wait_fraction"].mean())
    compute_gap = float(row["compute_fraction"] - others["compute_fraction"].mean())
    cause = "data loading" if data_gap >= compute_gap else "compute"
    evidence = (
        f"rank {culprit} is the straggler: its own work takes {gap:.0%} of a step longer than the median "
        f"rank's; its data wait is {row['data_wait_fraction']:.0%} (others {others['data_wait_fraction'].mean():.0%}), "
        f"and the other ranks wait {waited:.0%} of their step time"
    )
    return Finding(
        "communication.straggler",
        "communication",
        severity,
        evidence,
        _confidence(features, gap, t["warning"]),
        {"straggler_rank": float(culprit), "gap_fraction": gap, "victim_wait_fraction": waited, "wait_gap": wait_gap},
        t,
        (recs.straggler(culprit, cause, gap, waited),),
        cost=waited,
    )


@rule(
    "communication.ddp_find_unused",
    "communication",
    "DDP searches for unused parameters every step",
    ("ddp.static_graph",),
)
def check_find_unused(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Backward share of a DDP model built with find_unused_parameters=True."""
    ddp = _ddp_settings(features)
    backward = features.phase_fractions["backward"]
    if ddp is None or not ddp.get("find_unused_parameters") or backward < t["info"]:
        return None
    evidence = f"DDP has find_unused_parameters=True: an extra graph traversal in {backward:.0%} of step time"
    return Finding(
        "communication.ddp_find_unused",
        "communication",
        "info",
        evidence,
        _confidence(features, backward, t["info"]),
        {"backward_fraction": backward},
        t,
        (recs.static_graph(features),),
    )
