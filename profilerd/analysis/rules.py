"""Diagnosis rules as data: each has an id, a category, overridable thresholds and a pure check.

Thresholds and the assumptions behind speedup estimates come from ``default_rules.toml``,
overridden by a user's rules file. ``docs/rules.md`` is generated from ``REGISTRY``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from profilerd.analysis import recommendations as recs
from profilerd.analysis.features import Features
from profilerd.charts import fmt_seconds
from profilerd.config import known_key, read_toml
from profilerd.model import Finding, Recommendation

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_RULES_FILE = Path(__file__).with_name("default_rules.toml")

Check = Callable[[Features, dict[str, float], dict[str, float]], Finding | None]


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    title: str
    description: str
    check: Check
    recommendation_ids: tuple[str, ...] = ()
    # Decisive rules judge run-wide evidence, so they run even before the window holds enough steps.
    decisive: bool = False
    # Correctness rules recommend fixing the training itself; their advice claims no speedup and
    # is never moved to the details for a small estimate.
    correctness: bool = False


REGISTRY: dict[str, Rule] = {}


def rule(
    id: str,
    category: str,
    title: str,
    recommendation_ids: tuple[str, ...] = (),
    *,
    decisive: bool = False,
    correctness: bool = False,
) -> Callable[[Check], Check]:
    def register(check: Check) -> Check:
        description = (check.__doc__ or "").strip()
        REGISTRY[id] = Rule(id, category, title, description, check, recommendation_ids, decisive, correctness)
        return check

    return register


@dataclass(frozen=True)
class RuleSet:
    """Loaded thresholds: per rule, plus evidence, hysteresis and assumptions."""

    thresholds: dict[str, dict[str, float]]
    min_steps: int = 20  # no verdict on fewer steps (after warm-up), unless the evidence is decisive
    min_seconds: float = 10.0  # time a live window spans when it can; less lowers the confidence
    warmup_steps: int = 2
    min_speedup: float = 1.03  # speed recommendations estimated below this go to the details
    hysteresis_evaluations: int = 3
    assumptions: dict[str, float] = field(default_factory=dict)
    source: str = str(DEFAULT_RULES_FILE)


def _read(path: Path) -> dict[str, Any]:
    with open(path, "rb") as fh:
        document: dict[str, Any] = tomllib.load(fh)
    return document


def load_rules(path: Path | None = None) -> tuple[RuleSet, list[str]]:
    """Defaults merged with ``path``; problems name the key and the file."""
    base = _read(DEFAULT_RULES_FILE)
    problems: list[str] = []
    thresholds = {rid: dict(values) for rid, values in base["rules"].items()}
    evidence = dict(base["evidence"])
    hysteresis = dict(base["hysteresis"])
    assumptions = dict(base["assumptions"])
    if path is not None:
        user = read_toml(path, "rules file", problems)
        if problems:
            return RuleSet(thresholds, **_evidence_kwargs(evidence, hysteresis), assumptions=assumptions), problems
        for key in user:
            if key not in ("rules", "evidence", "hysteresis", "assumptions"):
                problems.append(f"{path}: unknown section '{key}'")
        for section, target in (
            ("evidence", evidence),
            ("hysteresis", hysteresis),
            ("assumptions", assumptions),
        ):
            _merge(user.get(section, {}), target, f"{path} [{section}]", problems)
        for rule_id, values in user.get("rules", {}).items():
            if rule_id not in thresholds:
                problems.append(f"{path}: unknown rule '{rule_id}' (known: {', '.join(sorted(thresholds))})")
                continue
            _merge(values, thresholds[rule_id], f'{path} [rules."{rule_id}"]', problems)
    ruleset = RuleSet(
        thresholds,
        **_evidence_kwargs(evidence, hysteresis),
        assumptions=assumptions,
        source=str(path or DEFAULT_RULES_FILE),
    )
    return ruleset, problems


def _merge(values: Any, target: dict[str, Any], where: str, problems: list[str]) -> None:
    if not isinstance(values, dict):
        problems.append(f"{where}: must be a table")
        return
    for key, value in values.items():
        if not known_key(key, target, where, problems):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{where}: '{key}' must be a number, got {value!r}")
        elif value < 0:
            problems.append(f"{where}: '{key}' must not be negative")
        else:
            target[key] = value


def _evidence_kwargs(evidence: dict[str, Any], hysteresis: dict[str, Any]) -> dict[str, Any]:
    return {
        "min_steps": int(evidence["min_steps"]),
        "min_seconds": float(evidence["min_seconds"]),
        "warmup_steps": int(evidence["warmup_steps"]),
        "min_speedup": float(evidence["min_speedup"]),
        "hysteresis_evaluations": max(1, int(hysteresis["evaluations"])),
    }


def _severity(value: float, thresholds: dict[str, float]) -> str | None:
    if value >= thresholds["critical"]:
        return "critical"
    if value >= thresholds["warning"]:
        return "warning"
    return None


def _confidence(features: Features, value: float, threshold: float) -> float:
    """More steps and a wider margin over the threshold give more confidence."""
    sample = min(1.0, features.steps / 200.0)
    margin = min(1.0, (value - threshold) / max(threshold, 1e-6))
    return round(0.5 + 0.25 * sample + 0.25 * max(0.0, margin), 3)


# A loader wait the GPU spends on queued work costs nothing; from this share of step time it
# is named in the compute evidence, so a user who sees the wait in a trace knows why it is fine.
HIDDEN_WAIT_WORTH_NAMING = 0.05


# ---- the rules -------------------------------------------------------------------------
@rule(
    "data.input_wait",
    "data",
    "The training loop waits for input batches",
    (
        "dataloader.num_workers",
        "dataloader.cheaper_samples",
        "dataloader.pin_memory",
        "dataloader.persistent_workers",
        "dataloader.prefetch_factor",
    ),
)
def check_input_wait(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of step time the training thread spends blocked in DataLoader.__next__; with device
    timing, the share the GPU is idle during that wait (a wait it spends on queued work is free)."""
    wait = features.fractions["data_wait"]
    severity = _severity(wait, t)
    if severity is None:
        return None
    ctx = features.context
    loader = ctx.dataloader()
    workers = int(loader.get("num_workers") or 0)
    loader_fix = recs.loader_advice(features, a["cheaper_samples_speedup"])
    found: list[Recommendation] = [loader_fix]
    if (ctx.config or {}).get("device_type") == "cuda" and not loader.get("pin_memory"):
        found.append(recs.pin_memory(features, a["pin_memory_gain"]))
    if workers > 0 and not loader.get("persistent_workers") and features.data_wait_spike_fraction > 0.01:
        found.append(recs.persistent_workers(features))
    saturation = ctx.worker_cpu_max_ratio
    # Workers that use little CPU on a host with free cores wait on I/O: deeper prefetching helps.
    # On a full host they use little because they get little: that is not waiting on I/O.
    free = ctx.free_cores
    if workers > 0 and saturation is not None and saturation < 0.5 and free is not None and free >= 1.0:
        found.append(recs.prefetch_factor(features))
    cores = f"; {free:.1f} of {ctx.cpu_count} cores idle" if free is not None and ctx.cpu_count else ""
    bound = "; the input pipeline is CPU-bound" if loader_fix.id == "dataloader.cheaper_samples" else ""
    device = features.device
    if device is None:
        waiting = f"{wait:.0%} of step time waiting for batches"
    else:
        waiting = (
            f"the GPU is idle {wait:.0%} of step time while the loop waits for batches "
            f"(device clock; the loop waits {device.host_data_wait_fraction:.0%}){_nvml_note(features)}"
        )
    evidence = f"{waiting}; {workers} DataLoader workers{cores}{bound}"
    metrics = {"data_wait_fraction": wait, "num_workers": float(workers), **_device_metrics(features)}
    if free is not None:
        metrics["free_cores"] = free
    if saturation is not None:
        metrics["worker_cpu_max_ratio"] = saturation
    return Finding(
        "data.input_wait",
        "data",
        severity,
        evidence,
        _confidence(features, wait, t["warning"]),
        metrics,
        t,
        tuple(sorted(found, key=lambda r: -r.estimated_speedup)),
        cost=wait,
    )


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


def _ddp_settings(features: Features) -> dict[str, Any] | None:
    for model in features.context.models():
        if model.get("ddp"):
            return dict(model["ddp"])
    return None


@rule(
    "algorithm.host_overhead",
    "algorithm",
    "Host work between the phases of a step",
    ("loop.host_work", "torch.compile"),
)
def check_host_overhead(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of step time outside data wait, forward, backward, optimizer and communication; with
    device timing, the share the GPU is idle waiting for the host to launch work (idle outside the
    data wait and collectives: launch-bound), and how far the host runs ahead of the device."""
    other = features.fractions["other"]
    severity = _severity(other, t)
    if severity is None:
        return None
    found = [recs.host_work(features, a["host_work_gain"])]
    device = features.device
    if device is not None:
        # The GPU waits for the host to launch work: fewer, larger launches (CUDA graphs) help.
        found.append(recs.cuda_graphs(features, a["host_work_gain"]))
        ahead = device.host_ahead_s_p50
        lead = ""
        if ahead is not None:
            lead = f"; the host is {fmt_seconds(ahead) if ahead > 0 else '0 µs'} ahead of the device at the step's end"
        evidence = (
            f"the GPU is idle {device.up_to}{other:.0%} of step time waiting for the host to launch work "
            f"(launch-bound: Python between launches, small kernels){lead}{_nvml_note(features)}"
        )
        if device.busy_is_lower_bound:
            evidence += (
                f"; it kept pace with the host, so its busy time is known only as a lower bound "
                f"(at least {device.busy_fraction:.0%})"
            )
    else:
        if (features.context.config or {}).get("device_type") == "cuda":
            found.append(recs.torch_compile(features, a["compile_speedup"], mode="reduce-overhead"))
        evidence = f"{other:.0%} of step time outside data, forward, backward and optimizer (host work)"
    return Finding(
        "algorithm.host_overhead",
        "algorithm",
        severity,
        evidence,
        _confidence(features, other, t["warning"]),
        {"other_fraction": other, **_device_metrics(features)},
        t,
        tuple(sorted(found, key=lambda r: -r.estimated_speedup)),
    )


def _nvml_note(features: Features) -> str:
    """NVML's view of the same GPUs over the same window, beside the device clock's."""
    device = features.device
    if device is None:
        return ""
    parts = []
    if device.nvml_utilization_ratio is not None:
        parts.append(f"utilization {device.nvml_utilization_ratio:.0%}")
    if device.nvml_sm_active_ratio is not None:
        parts.append(f"SM active {device.nvml_sm_active_ratio:.0%}")
    return f" (NVML: {', '.join(parts)})" if parts else ""


def _device_metrics(features: Features) -> dict[str, float]:
    """The device clock's numbers behind a finding, where the steps carry device timing."""
    device = features.device
    if device is None:
        return {}
    metrics = {
        "gpu_busy_fraction": device.busy_fraction,
        "gpu_idle_fraction": device.idle_fraction,
        "gpu_idle_data_wait_fraction": device.idle_data_wait_fraction,
        "host_data_wait_fraction": device.host_data_wait_fraction,
        "device_timed_steps": float(device.steps_timed),
    }
    if device.host_ahead_s_p50 is not None:
        metrics["host_ahead_s_p50"] = device.host_ahead_s_p50
    if device.nvml_utilization_ratio is not None:
        metrics["nvml_utilization_ratio"] = device.nvml_utilization_ratio
    if device.nvml_sm_active_ratio is not None:
        metrics["nvml_sm_active_ratio"] = device.nvml_sm_active_ratio
    return metrics


@rule(
    "compute.bound",
    "compute",
    "Compute dominates the step, and runs less efficiently than it could",
    ("amp.autocast", "torch.compile"),
)
def check_compute_bound(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of step time in forward, backward and optimizer; with device timing, the GPU's busy
    share (CUDA events) with NVML's utilization and SM activity and, where the FLOPs per step are
    given, an MFU estimate; recommends cheaper math."""
    compute = features.fractions["compute"]
    if compute < t["info"]:
        return None
    ctx = features.context
    config = ctx.config or {}
    device = config.get("device_type") or "cpu"
    models = ctx.models()
    fp32 = bool(models) and all(set(m.get("parameter_dtypes", {})) <= {"float32"} for m in models)
    autocast_on = bool((config.get("autocast") or {}).get("enabled"))
    compiled = any(m.get("compiled") for m in models)
    found: list[Recommendation] = []
    notes = []
    cpu_amx = "AMX" in str(config.get("cpu_capability") or "").upper()
    if fp32 and not autocast_on and (device == "cuda" or cpu_amx):
        local = a["amp_gpu_speedup"] if device == "cuda" else a["amp_cpu_speedup"]
        found.append(recs.autocast(features, device, local))
        notes.append("fp32 without autocast")
    if models and not compiled:
        found.append(recs.torch_compile(features, a["compile_speedup"]))
        notes.append("not compiled")
    severity = "warning" if any(r.id == "amp.autocast" for r in found) and device == "cuda" else "info"
    detail = f"; {', '.join(notes)}" if notes else ""
    timing = features.device
    if timing is None:
        evidence = f"{compute:.0%} of step time in forward, backward and optimizer on {device}{detail}"
    else:
        evidence = (
            f"the GPU is busy {timing.at_least}{compute:.0%} of step time (device clock){_nvml_note(features)}{detail}"
        )
        waited, idle_waiting = timing.host_data_wait_fraction, timing.idle_data_wait_fraction
        if waited - idle_waiting >= HIDDEN_WAIT_WORTH_NAMING:
            if idle_waiting < HIDDEN_WAIT_WORTH_NAMING:
                evidence += f"; the loop's wait for batches ({waited:.0%}) is hidden behind GPU work"
            else:
                evidence += (
                    f"; {waited - idle_waiting:.0%} of step time of the loop's wait for batches ({waited:.0%}) "
                    "is hidden behind GPU work"
                )
    metrics = {"compute_fraction": compute, **_device_metrics(features)}
    if features.mfu is not None:
        evidence += f"; {features.mfu.describe()}"
        metrics["mfu_estimate"] = features.mfu.ratio
        metrics["achieved_tflops_estimate"] = features.mfu.achieved_tflops
    return Finding(
        "compute.bound",
        "compute",
        severity,
        evidence,
        _confidence(features, compute, t["info"]),
        metrics,
        t,
        tuple(sorted(found, key=lambda r: -r.estimated_speedup)),
    )


@rule("compute.optimizer_unfused", "compute", "The optimizer updates one tensor at a time", ("optimizer.fused",))
def check_optimizer_unfused(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Optimizer share of step time when the optimizer uses neither foreach nor fused."""
    share = features.phase_fractions["optimizer"]
    if share < t["info"]:
        return None
    for optimizer in features.context.optimizers():
        hyper = optimizer.get("hyperparameters", {})
        if hyper.get("fused") or hyper.get("foreach"):
            continue
        rec = recs.fused_optimizer(features, optimizer, a["fused_optimizer_speedup"])
        evidence = f"{share:.0%} of step time in {optimizer.get('class')}.step() without foreach or fused"
        return Finding(
            "compute.optimizer_unfused",
            "compute",
            "info",
            evidence,
            _confidence(features, share, t["info"]),
            {"optimizer_fraction": share},
            t,
            (rec,),
        )
    return None


# ---- data ------------------------------------------------------------------------------------
@rule(
    "data.worker_saturation",
    "data",
    "DataLoader workers are CPU-bound",
    ("dataloader.num_workers", "dataloader.cheaper_samples"),
)
def check_worker_saturation(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """The busiest DataLoader worker's CPU use while the loop waits for data."""
    ctx = features.context
    saturation = ctx.worker_cpu_max_ratio
    wait = features.fractions["data_wait"]
    if saturation is None or saturation < t["worker_cpu"] or wait < t["data_wait"]:
        return None
    rec = recs.loader_advice(features, a["cheaper_samples_speedup"])
    free = ctx.free_cores
    metrics = {"worker_cpu_max_ratio": saturation, "data_wait_fraction": wait}
    if free is not None:
        metrics["free_cores"] = free
    cores = f"{free:.1f} cores free" if free is not None else "free cores not measured"
    evidence = (
        f"the busiest DataLoader worker uses {saturation:.0%} of a core while the loop waits "
        f"{wait:.0%} of step time; {cores}"
    )
    return Finding(
        "data.worker_saturation",
        "data",
        "warning",
        evidence,
        _confidence(features, saturation, t["worker_cpu"]),
        metrics,
        t,
        (rec,),
    )


@rule("data.worker_restarts", "data", "DataLoader workers restart every epoch", ("dataloader.persistent_workers",))
def check_worker_restarts(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of step time in data-wait spikes (over 10x the median wait) with non-persistent workers."""
    loader = features.context.dataloader()
    spike = features.data_wait_spike_fraction
    if not loader.get("num_workers") or loader.get("persistent_workers"):
        return None
    severity = _severity(spike, t)
    if severity is None:
        return None
    evidence = f"{spike:.0%} of step time in data-wait spikes at epoch starts; persistent_workers=False"
    return Finding(
        "data.worker_restarts",
        "data",
        severity,
        evidence,
        _confidence(features, spike, t["warning"]),
        {"spike_fraction": spike},
        t,
        (recs.persistent_workers(features),),
        cost=spike,
    )


# ---- compute ---------------------------------------------------------------------------------
def _on_cuda(features: Features) -> bool:
    return (features.context.config or {}).get("device_type") == "cuda"


@rule("compute.tf32_disabled", "compute", "fp32 matmuls without TF32 on a CUDA GPU", ("compute.tf32",))
def check_tf32(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Compute share on CUDA with fp32 parameters, no autocast, and TF32 matmuls disabled."""
    config = features.context.config or {}
    compute = features.fractions["compute"]
    tf32 = config.get("tf32") or {}
    fp32 = all(set(m.get("parameter_dtypes", {})) <= {"float32"} for m in features.context.models())
    autocast_on = bool((config.get("autocast") or {}).get("enabled"))
    if not _on_cuda(features) or compute < t["info"] or not fp32 or autocast_on:
        return None
    if tf32.get("matmul") or tf32.get("float32_matmul_precision") in ("high", "medium"):
        return None
    evidence = f"{compute:.0%} of step time in fp32 compute with TF32 matmuls off (precision 'highest')"
    return Finding(
        "compute.tf32_disabled",
        "compute",
        "info",
        evidence,
        _confidence(features, compute, t["info"]),
        {"compute_fraction": compute},
        t,
        (recs.tf32(features),),
    )


@rule("compute.channels_last", "compute", "A conv net in NCHW layout on a GPU", ("compute.channels_last",))
def check_channels_last(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Compute share of a CUDA model with Conv2d layers whose weights are not channels_last."""
    compute = features.fractions["compute"]
    convs = [m for m in features.context.models() if m.get("has_conv2d") and m.get("channels_last") is False]
    if not _on_cuda(features) or compute < t["info"] or not convs:
        return None
    evidence = f"{compute:.0%} of step time in a conv net ({convs[0].get('class')}) stored as NCHW"
    return Finding(
        "compute.channels_last",
        "compute",
        "info",
        evidence,
        _confidence(features, compute, t["info"]),
        {"compute_fraction": compute},
        t,
        (recs.channels_last(features),),
    )


# ---- communication ---------------------------------------------------------------------------
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


# ---- algorithm -------------------------------------------------------------------------------
@rule("algorithm.sync_in_loop", "algorithm", "Host-device syncs in the training loop", ("loop.defer_syncs",))
def check_syncs(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Calls per step that make the host wait for the device (.item(), .cpu(), float(t), print(t)),
    and the share of step time blocked in them; the call sites come from the probes. With device
    timing a sync costs what the GPU idles after it, at most its idle waiting for launches."""
    signals = features.signals
    if signals.syncs_per_step < t["syncs_per_step"]:
        return None
    on_gpu = _on_cuda(features)
    cost = recs.sync_cost(features)
    severity = "warning" if on_gpu and cost >= t["warning"] else "info"
    sites = (features.context.config or {}).get("sync_sites") or []
    site = f"{Path(sites[0]['file']).name}:{sites[0]['line']} {sites[0]['call']}()" if sites else None
    where = f", most at {site}" if site else ""
    if not on_gpu:
        impact = "on CPU they cost nothing, on a GPU each one stalls the pipeline"
    elif features.device is None:
        impact = f"blocking {signals.sync_fraction:.0%} of step time"
    else:
        # While the host blocks, the GPU works off its queue; the cost is the idle left after.
        impact = (
            f"the host blocks {signals.sync_fraction:.0%} of step time in them while the GPU works, "
            f"and the GPU idles {features.device.up_to}{features.fractions['other']:.0%} waiting for launches "
            "(device clock)"
        )
    evidence = f"{signals.syncs_per_step:.1f} host-device syncs per step{where}; {impact}"
    return Finding(
        "algorithm.sync_in_loop",
        "algorithm",
        severity,
        evidence,
        0.9 if sites else 0.7,
        {"syncs_per_step": signals.syncs_per_step, "sync_fraction": signals.sync_fraction, "sync_cost": cost},
        t,
        (recs.defer_syncs(features, site),),
        cost=cost,
    )


@rule(
    "algorithm.loss_nonfinite",
    "algorithm",
    "The loss is NaN or inf",
    ("convergence.nonfinite",),
    decisive=True,
    correctness=True,
)
def check_loss_nonfinite(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """The first step of the run whose loss was NaN or inf, and the share of readings that were;
    judged over the whole run, not the window: from that step on, the run is wasted."""
    losses = features.losses
    if not losses.readings or losses.nonfinite / losses.readings <= t["critical"]:
        return None
    share = losses.nonfinite / losses.readings
    value = losses.first_nonfinite_value
    what = "NaN" if value is None or math.isnan(value) else f"{value:g}"
    rank = f" on rank {losses.first_nonfinite_rank}" if features.ranks > 1 else ""
    evidence = (
        f"the loss is {what} first at step {losses.first_nonfinite_step}{rank}; NaN or inf in "
        f"{losses.nonfinite} of {losses.readings} readings ({share:.0%})"
    )
    return Finding(
        "algorithm.loss_nonfinite",
        "algorithm",
        "critical",
        evidence,
        0.95,
        {
            "nonfinite_fraction": share,
            "first_nonfinite_step": float(losses.first_nonfinite_step or 0),
            "nonfinite_readings": float(losses.nonfinite),
        },
        t,
        (recs.stabilize(features, "nonfinite"),),
        cost=1.0,
    )


@rule(
    "algorithm.loss_diverging",
    "algorithm",
    "The loss rose far above its early values",
    ("convergence.diverging",),
    correctness=True,
)
def check_loss_diverging(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """The highest sustained loss of the run (a median of 5 consecutive readings) over the loss
    at its start (its first reading, taken before any update), whenever in the run it happened."""
    losses = features.losses
    ratio = losses.rise_ratio
    if ratio is None or losses.peak is None or losses.baseline is None:
        return None
    severity = _severity(ratio, t)
    if severity is None:
        return None
    now = features.signals.loss_recent
    recent = f"; {now:.4g} recently" if now is not None else ""
    evidence = (
        f"the loss rose {ratio:.1f}x above its early values: from {losses.baseline:.4g} at the start "
        f"to {losses.peak:.4g} around step {losses.peak_step}{recent}"
    )
    metrics = {"loss_start": losses.baseline, "loss_peak": losses.peak, "ratio": ratio}
    metrics["peak_step"] = float(losses.peak_step or 0)
    return Finding(
        "algorithm.loss_diverging",
        "algorithm",
        severity,
        evidence,
        0.85 if severity == "critical" else 0.75,
        metrics,
        t,
        (recs.stabilize(features, "diverging"),),
        cost=1.0,
    )


@rule(
    "algorithm.loss_stuck",
    "algorithm",
    "The loss does not move: the model is not learning",
    ("convergence.not_learning",),
    correctness=True,
)
def check_loss_stuck(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Over ``min_steps`` steps from the start of the run (at least ``min_readings`` loss
    readings), a learning rate of 0, or a loss whose whole range stays within ``spread`` of its
    first value."""
    losses = features.losses
    moved = losses.relative_range
    spanned = losses.steps_spanned
    if spanned < t["min_steps"] or losses.readings < t["min_readings"] or losses.baseline is None or moved is None:
        return None
    zero_lr = losses.lr_max == 0.0
    if not zero_lr and moved >= t["spread"]:
        return None
    cause = "the learning rate is 0" if zero_lr else "no parameter update changes it"
    evidence = (
        f"the loss stays at {losses.baseline:.4g} (range {moved:.2%} of it) over {spanned} steps "
        f"({losses.readings} readings) from the start of the run: {cause}"
    )
    return Finding(
        "algorithm.loss_stuck",
        "algorithm",
        "critical" if zero_lr else "warning",
        evidence,
        0.9 if zero_lr else 0.75,
        {"relative_range": moved, "steps": float(spanned), "lr_max": losses.lr_max or 0.0},
        t,
        (recs.not_learning(features, zero_lr),),
        cost=1.0,
    )


@rule(
    "algorithm.loss_plateau",
    "algorithm",
    "The loss has stopped improving",
    ("optimizer.lr_schedule",),
    correctness=True,
)
def check_loss_plateau(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Relative spread of the loss over the last half of the window, with a constant LR, after
    the loss had fallen from its start (a loss that never fell is not learning at all)."""
    signals = features.signals
    spread = signals.loss_relative_spread
    if spread is None or signals.loss_samples < t["min_samples"] or spread >= t["spread"]:
        return None
    scheduled = (features.context.config or {}).get("lr_scheduler")
    if scheduled or signals.lr_constant is False or not signals.lr_end:
        return None
    start, recent = features.losses.baseline, signals.loss_recent
    if start is None or recent is None or recent >= start * (1 - t["spread"]):
        return None
    evidence = (
        f"the loss moved only {spread:.2%} over the last {signals.loss_samples // 2} steps "
        f"at a constant learning rate ({signals.lr_end:g}), after falling from {start:.4g} to {recent:.4g}"
    )
    return Finding(
        "algorithm.loss_plateau",
        "algorithm",
        "info",
        evidence,
        0.6,
        {"relative_spread": spread},
        t,
        (recs.lr_schedule(features),),
    )


@rule("algorithm.grad_norm", "algorithm", "Gradients explode or vanish", ("convergence.gradients",), correctness=True)
def check_grad_norm(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """A gradient norm that jumps far above the median of the samples before it (exploding), or a
    tiny median (vanishing)."""
    signals = features.signals
    median, largest = signals.grad_norm_median, signals.grad_norm_max
    if signals.grad_norm_samples < 3:
        return None
    if signals.grad_norm_nonfinite:
        evidence = (
            f"the gradient norm was inf/NaN in {signals.grad_norm_nonfinite} of {signals.grad_norm_samples} samples"
        )
        severity, metrics = "critical", {"nonfinite": float(signals.grad_norm_nonfinite)}
    elif signals.grad_norm_spike_ratio is not None and signals.grad_norm_spike_ratio >= t["exploding_ratio"]:
        jump = signals.grad_norm_spike_ratio
        evidence = f"the gradient norm jumps to {jump:.0f}x the median of the samples before it (max {largest:.3g})"
        severity, metrics = "warning", {"grad_norm_max": largest or 0.0, "spike_ratio": jump}
    elif median is not None and median < t["vanishing"]:
        evidence = f"the median gradient norm is {median:.2g}: gradients are vanishing"
        severity, metrics = "warning", {"grad_norm_median": median}
    else:
        return None
    return Finding(
        "algorithm.grad_norm",
        "algorithm",
        severity,
        evidence,
        0.8,
        metrics,
        t,
        (recs.stabilize(features, "gradients"),),
        cost=1.0 if severity == "critical" else 0.0,
    )


@rule(
    "algorithm.grad_scaler",
    "algorithm",
    "GradScaler skips steps or its scale collapsed",
    ("convergence.scaler",),
    correctness=True,
)
def check_grad_scaler(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of steps GradScaler skipped for inf/NaN gradients, and the smallest scale seen."""
    signals = features.signals
    share = signals.scaler_skipped_steps / features.steps if features.steps else 0.0
    collapsed = signals.scaler_scale_min is not None and signals.scaler_scale_min < t["collapsed_scale"]
    severity = _severity(share, t)
    if collapsed:
        severity = "critical"
    if severity is None:
        return None
    scale = f"; the loss scale fell to {signals.scaler_scale_min:.3g}" if signals.scaler_scale_min is not None else ""
    evidence = f"GradScaler skipped {signals.scaler_skipped_steps} of {features.steps} steps ({share:.0%}){scale}"
    return Finding(
        "algorithm.grad_scaler",
        "algorithm",
        severity,
        evidence,
        0.85,
        {"skipped_fraction": share, "scale_min": signals.scaler_scale_min or 0.0},
        t,
        (recs.stabilize(features, "scaler"),),
        cost=share,
    )


@rule("algorithm.recompilation", "algorithm", "torch.compile keeps recompiling", ("compile.recompilation",))
def check_recompilation(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """New graphs compiled by torch.compile during the window, after warm-up."""
    graphs = features.signals.new_graphs
    severity = _severity(float(graphs), t)
    if severity is None:
        return None
    evidence = f"torch.compile produced {graphs} new graphs during {features.steps} steps (recompilation storm)"
    return Finding(
        "algorithm.recompilation",
        "algorithm",
        severity,
        evidence,
        0.8,
        {"new_graphs": float(graphs)},
        t,
        (recs.compile_dynamic(features),),
    )


@rule(
    "algorithm.adam_weight_decay",
    "algorithm",
    "Weight decay through Adam instead of AdamW",
    ("optimizer.adamw",),
    correctness=True,
)
def check_adam_weight_decay(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Adam (not AdamW) configured with weight decay, which acts as L2 scaled by the adaptive step."""
    for optimizer in features.context.optimizers():
        decay = (optimizer.get("hyperparameters") or {}).get("weight_decay") or 0.0
        if optimizer.get("class") == "Adam" and decay >= t["weight_decay"]:
            evidence = f"Adam with weight_decay={decay:g} applies it as L2 inside the adaptive update"
            return Finding(
                "algorithm.adam_weight_decay",
                "algorithm",
                "info",
                evidence,
                0.9,
                {"weight_decay": float(decay)},
                t,
                (recs.adamw(features, float(decay)),),
            )
    return None


# ---- GPU (NVML) ------------------------------------------------------------------------------
@rule("gpu.throttling", "compute", "The GPU clocks are throttled by heat or power", ("gpu.restore_clocks",))
def check_throttling(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of GPU samples with thermal or power clock-event reasons, and the SM clock over its maximum."""
    gpu = features.context.gpu
    thermal = gpu.get("gpu_thermal_throttle", 0.0)
    power = gpu.get("gpu_power_throttle", 0.0)
    share = max(thermal, power)
    severity = _severity(share, t) if gpu else None
    if severity is None:
        return None
    kind = "thermal" if thermal >= power else "power"
    clock = gpu.get("gpu_sm_clock_ratio")
    clock_text = f"; SM clock at {clock:.0%} of its maximum" if clock is not None else ""
    evidence = f"{kind} throttling in {share:.0%} of GPU samples{clock_text}"
    return Finding(
        "gpu.throttling",
        "compute",
        severity,
        evidence,
        _confidence(features, share, t["warning"]),
        {"thermal_fraction": thermal, "power_fraction": power, "sm_clock_ratio": clock or 0.0},
        t,
        (recs.restore_clocks(features, clock),),
    )


@rule(
    "gpu.memory_near_full",
    "compute",
    "GPU memory is nearly full",
    ("memory.activation_checkpointing", "amp.autocast"),
)
def check_memory_near_full(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """The largest share of GPU memory in use on the job's GPUs during the window."""
    used = features.context.gpu.get("gpu_memory_max_ratio")
    if used is None or used < t["warning"]:
        return None
    found = [recs.activation_checkpointing(features)]
    config = features.context.config or {}
    if not (config.get("autocast") or {}).get("enabled"):
        found.append(recs.autocast(features, "cuda", a["amp_gpu_speedup"]))
    evidence = f"GPU memory reached {used:.0%} of capacity"
    return Finding(
        "gpu.memory_near_full",
        "compute",
        "warning",
        evidence,
        0.9,
        {"memory_max_ratio": used},
        t,
        tuple(found),
    )


@rule("gpu.idle_while_held", "algorithm", "The GPU sits idle while the job holds it", ("loop.host_work",))
def check_gpu_idle(features: Features, t: dict[str, float], a: dict[str, float]) -> Finding | None:
    """Share of samples where a GPU that holds the job's process is under 5% utilised."""
    idle = features.context.gpu.get("gpu_idle_while_held_fraction")
    severity = _severity(idle, t) if idle is not None else None
    if severity is None or idle is None:
        return None
    f = features.fractions
    biggest = max(
        ("data wait", f["data_wait"]),
        ("host work", f["other"]),
        ("communication", f["communication"]),
        key=lambda item: item[1],
    )
    evidence = (
        f"the job's GPU is idle in {idle:.0%} of samples; "
        f"the largest non-compute share is {biggest[0]} ({biggest[1]:.0%})"
    )
    return Finding(
        "gpu.idle_while_held",
        "algorithm",
        severity,
        evidence,
        _confidence(features, idle, t["warning"]),
        {"idle_fraction": idle},
        t,
        (recs.host_work(features, a["host_work_gain"]),),
        cost=idle,
    )


# Why each rule exists and where its default threshold comes from (rendered into docs/rules.md).
RATIONALE: dict[str, tuple[str, str]] = {
    "data.input_wait": (
        "Time the loop spends blocked on the next batch is time the device does nothing.",
        "The 5%/20% bands of TensorFlow's input-pipeline analyzer, tightened to 10%/20% of step time.",
    ),
    "data.worker_saturation": (
        "Workers at a full core each cannot load faster; only more workers or cheaper samples help.",
        "85% of a core: the point where a process is CPU-bound in practice (scheduler noise aside).",
    ),
    "data.worker_restarts": (
        "Without persistent_workers every epoch re-forks the workers and refills their queues.",
        "5%/15% of step time in spikes; profilerd's own default.",
    ),
    "compute.bound": (
        "A healthy job is compute-bound; then the only gains are cheaper math and fewer kernels.",
        "50% of step time in forward/backward/optimizer; profilerd's own default.",
    ),
    "compute.optimizer_unfused": (
        "Per-tensor optimizer loops launch thousands of tiny kernels; foreach/fused do one pass.",
        "3% of step time; PyTorch's optimizer docs recommend foreach/fused for speed.",
    ),
    "compute.tf32_disabled": (
        "On Ampere and newer GPUs TF32 runs fp32 matmuls on tensor cores at a fraction of the time.",
        "PyTorch's CUDA semantics notes on TF32; 30% compute share is profilerd's default.",
    ),
    "compute.channels_last": (
        "cuDNN's tensor-core convolutions want NHWC; NCHW inputs add transposes.",
        "PyTorch's channels_last tutorial; 30% compute share is profilerd's default.",
    ),
    "communication.exposed": (
        "All-reduce time not overlapped with backward adds directly to every step.",
        "Same 10%/20% bands as data wait, for symmetry.",
    ),
    "communication.straggler": (
        "In synchronous training every rank waits for the slowest; its cause is its own breakdown.",
        "10%/25% of the mean step time; profilerd's own default.",
    ),
    "communication.ddp_find_unused": (
        "find_unused_parameters=True traverses the autograd graph after every forward.",
        "PyTorch's DDP docs warn of its cost; 10% backward share is profilerd's default.",
    ),
    "algorithm.host_overhead": (
        "Host work between phases (logging, Python, checkpoints) leaves the device idle.",
        "Same 10%/20% bands as data wait.",
    ),
    "algorithm.sync_in_loop": (
        "Each .item()/.cpu()/print(tensor) drains the GPU queue, so the host cannot run ahead.",
        "One sync per step; PyTorch's performance tuning guide advises avoiding them.",
    ),
    "algorithm.loss_nonfinite": (
        "Once the loss is NaN/inf every later step is wasted compute.",
        "Any non-finite loss is critical.",
    ),
    "algorithm.loss_diverging": (
        "A rising loss usually means a learning rate too high for the current state.",
        "2x/10x growth of a 5-reading median over the first reading; healthy losses stay under "
        "their initial value, batch noise under 1.5x of it. profilerd's own default.",
    ),
    "algorithm.loss_stuck": (
        "A loss that never moves from its first value (a learning rate of 0, frozen parameters) "
        "means every step is wasted.",
        "200 steps (20+ readings) from the start within 1% of the first value, or a learning rate of 0; "
        "profilerd's own default.",
    ),
    "algorithm.loss_plateau": (
        "A flat loss at a constant learning rate often resumes improving with a decaying schedule.",
        "Under 1% relative movement over 200+ readings, after the loss had fallen; profilerd's own default.",
    ),
    "algorithm.grad_norm": (
        "Gradient spikes precede divergence; vanishing gradients mean no learning.",
        "10x the median, or a median under 1e-6; common practice, profilerd's default.",
    ),
    "algorithm.grad_scaler": (
        "Skipped steps do no work; a collapsing scale means fp16 overflows every step.",
        "2%/10% of steps, or a scale under 1; GradScaler starts at 65536 and halves per overflow.",
    ),
    "algorithm.recompilation": (
        "Each recompilation stalls the step for seconds; many mean dynamic shapes or guard churn.",
        "8/32 new graphs per window; torch._dynamo's default cache limit is 8 per frame.",
    ),
    "gpu.throttling": (
        "Throttled clocks slow every kernel; the cause is outside the program (cooling, power caps).",
        "20%/50% of samples; NVML clock-event reasons as decoded by dcgm-exporter and nvitop.",
    ),
    "gpu.memory_near_full": (
        "Near capacity, the caching allocator thrashes and the next larger batch fails with OOM.",
        "95% of memory; profilerd's own default.",
    ),
    "gpu.idle_while_held": (
        "A GPU reserved by a job but idle is the most expensive waste in a cluster.",
        "30%/70% of samples under 5% utilisation; profilerd's own default.",
    ),
    "algorithm.adam_weight_decay": (
        "Adam's weight decay is L2 inside the adaptive update, not true decoupled decay.",
        "Loshchilov & Hutter, Decoupled Weight Decay Regularization (AdamW).",
    ),
}
