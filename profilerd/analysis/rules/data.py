"""Input-pipeline rules: the loop waits for batches or its workers are the limit."""

from __future__ import annotations

from profilerd.analysis import recommendations as recs
from profilerd.analysis.features import Features
from profilerd.analysis.rules.base import _confidence, _device_metrics, _nvml_note, _severity, rule
from profilerd.model import Finding, Recommendation


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
