"""Algorithm rules: the training loop itself (host work, syncs, convergence, compile)."""

from __future__ import annotations

import math
from pathlib import Path

from profilerd.analysis import recommendations as recs
from profilerd.analysis.features import Features
from profilerd.analysis.rules.base import _confidence, _device_metrics, _nvml_note, _on_cuda, _severity, rule
from profilerd.model import Finding
from profilerd.units import fmt_seconds


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
