"""Compute rules: the device is busy, so the gains are cheaper math (and the GPU's own health)."""

from __future__ import annotations

from profilerd.analysis import recommendations as recs
from profilerd.analysis.features import Features
from profilerd.analysis.rules.base import _confidence, _device_metrics, _nvml_note, _on_cuda, _severity, rule
from profilerd.model import Finding, Recommendation

# A loader wait the GPU spends on queued work costs nothing; from this share of step time it
# is named in the compute evidence, so a user who sees the wait in a trace knows why it is fine.
HIDDEN_WAIT_WORTH_NAMING = 0.05


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
            cost=share,
        )
    return None


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
