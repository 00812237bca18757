"""Recommendations: a concrete change, its evidence, and an Amdahl-bounded speedup estimate."""

from __future__ import annotations

import math
from typing import Any

from profilerd.analysis.features import Features
from profilerd.model import Recommendation


def amdahl(fraction: float, local_speedup: float) -> float:
    """Whole-step speedup when ``fraction`` of the time gets ``local_speedup`` times faster."""
    fraction = min(max(fraction, 0.0), 1.0)
    if local_speedup <= 0 or math.isinf(local_speedup):
        return 1.0 / max(1e-9, 1.0 - fraction)
    return 1.0 / (1.0 - fraction + fraction / local_speedup)


def removed(fraction: float) -> float:
    """Speedup when ``fraction`` of the step time disappears."""
    return 1.0 / max(1e-9, 1.0 - min(max(fraction, 0.0), 0.999))


def suggest_num_workers(features: Features) -> tuple[int, str]:
    """A worker count from the free cores and how saturated the current workers are."""
    ctx = features.context
    current = int(ctx.dataloader().get("num_workers") or 0)
    cores = ctx.cpu_count or 1
    free = ctx.free_cores if ctx.free_cores is not None else max(0.0, cores - 1.0)
    saturation = ctx.worker_cpu_max_ratio
    if current == 0:
        suggested = min(8, max(2, int(free)))
        reason = f"{free:.1f} of {cores} cores are free and the loader runs in the training loop"
    elif saturation is not None and saturation >= 0.8:
        suggested = current + max(1, int(free))
        reason = (
            f"the busiest of {current} workers uses {saturation:.0%} of a core (CPU-bound), {free:.1f} cores are free"
        )
    else:
        suggested = min(64, current * 2)
        busy = f"{saturation:.0%}" if saturation is not None else "an unknown share"
        reason = f"{current} workers each use {busy} of a core: they wait on I/O, so more hide latency"
    return suggested, reason


def num_workers(features: Features) -> Recommendation:
    ctx = features.context
    current = int(ctx.dataloader().get("num_workers") or 0)
    suggested, reason = suggest_num_workers(features)
    step = features.step_time_mean_s
    wait = features.fractions["data_wait"] * step
    compute = step - wait
    # Per-batch load time: serial in the loop with 0 workers; else the pipeline's throughput
    # bound (W workers deliver one batch every step time).
    load = wait if current == 0 else step * current
    new_step = max(compute, load / suggested)
    speedup = max(1.0, step / new_step) if new_step > 0 else removed(features.fractions["data_wait"])
    return Recommendation(
        id="dataloader.num_workers",
        title=f"Raise DataLoader num_workers from {current} to {suggested}",
        estimated_speedup=min(speedup, removed(features.fractions["data_wait"])),
        how=f"DataLoader(dataset, batch_size=..., num_workers={suggested}, persistent_workers=True)",
        why=reason,
    )


def pin_memory(features: Features, gain: float) -> Recommendation:
    return Recommendation(
        id="dataloader.pin_memory",
        title="Pin host memory for faster host-to-GPU copies",
        estimated_speedup=removed(features.fractions["data_wait"] * gain),
        how="DataLoader(..., pin_memory=True)\nbatch = batch.to(device, non_blocking=True)",
        why="training on a GPU with pin_memory=False",
    )


def persistent_workers(features: Features) -> Recommendation:
    spike = features.data_wait_spike_fraction
    return Recommendation(
        id="dataloader.persistent_workers",
        title="Keep DataLoader workers alive between epochs",
        estimated_speedup=removed(spike),
        how="DataLoader(..., num_workers=N, persistent_workers=True)",
        why=f"{spike:.0%} of step time is in data-wait spikes, typical of workers restarting each epoch",
    )


def prefetch_factor(features: Features) -> Recommendation:
    current = features.context.dataloader().get("prefetch_factor") or 2
    return Recommendation(
        id="dataloader.prefetch_factor",
        title=f"Prefetch more batches per worker ({current} → {current * 2})",
        estimated_speedup=removed(features.fractions["data_wait"] * 0.5),
        how=f"DataLoader(..., num_workers=N, prefetch_factor={current * 2})",
        why="workers are not CPU-saturated, so deeper prefetching can absorb uneven load times",
    )


def autocast(features: Features, device: str, local_speedup: float) -> Recommendation:
    dtype = "torch.bfloat16"
    snippet = (
        f'with torch.autocast(device_type="{device}", dtype={dtype}):\n'
        "    loss = loss_fn(model(inputs), targets)\n"
        "loss.backward()"
    )
    if device == "cuda":
        snippet += '\n# fp16 instead of bf16 needs torch.amp.GradScaler("cuda")'
    compute = features.fractions["compute"] - features.phase_fractions["optimizer"]
    return Recommendation(
        id="amp.autocast",
        title="Train with automatic mixed precision (bf16 autocast)",
        estimated_speedup=amdahl(compute, local_speedup),
        how=snippet,
        why=f"all parameters are fp32 and autocast is off on {device}",
    )


def torch_compile(features: Features, local_speedup: float, mode: str | None = None) -> Recommendation:
    compute = features.phase_fractions["forward"] + features.phase_fractions["backward"]
    arg = f', mode="{mode}"' if mode else ""
    return Recommendation(
        id="torch.compile",
        title="Compile the model with torch.compile",
        estimated_speedup=amdahl(compute, local_speedup),
        how=f"model = torch.compile(model{arg})",
        why="the model runs eagerly; compilation fuses kernels and cuts per-op overhead",
    )


def fused_optimizer(features: Features, optimizer: dict[str, Any], local_speedup: float) -> Recommendation:
    name = optimizer.get("class", "the optimizer")
    flag = "fused=True" if name in ("Adam", "AdamW", "SGD", "Adagrad") else "foreach=True"
    return Recommendation(
        id="optimizer.fused",
        title=f"Use a {flag.split('=')[0]} {name}",
        estimated_speedup=amdahl(features.phase_fractions["optimizer"], local_speedup),
        how=f"optimizer = torch.optim.{name}(model.parameters(), ..., {flag})",
        why=f"{name} updates parameters one tensor at a time "
        f"({features.phase_fractions['optimizer']:.0%} of step time)",
    )


def host_work(features: Features, gain: float) -> Recommendation:
    return Recommendation(
        id="loop.host_work",
        title="Take per-step host work out of the training loop",
        estimated_speedup=removed(features.fractions["other"] * gain),
        how=(
            "# log every N steps, and read the loss without a per-step sync:\n"
            "if step % 100 == 0:\n"
            "    print(step, loss.item())"
        ),
        why="time outside data loading, forward, backward and optimizer: logging, .item(), "
        "checkpoints or Python work between steps",
    )
