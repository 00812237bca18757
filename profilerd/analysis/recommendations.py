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


IO_BOUND_CPU = 0.5  # a loader using less than half a core while the loop waits is waiting on I/O


def worker_cpu_need(features: Features) -> float:
    """The CPU (in cores) one more DataLoader worker needs.

    What the busiest current worker uses, as long as the host had a free core (on a full host a
    worker gets less than it needs). With no workers, at most what each training process uses
    in all, loading included. A full core when neither is known.
    """
    ctx = features.context
    current = int(ctx.dataloader().get("num_workers") or 0)
    free = ctx.free_cores
    if current > 0:
        if ctx.worker_cpu_max_ratio is not None and free is not None and free >= 1.0:
            return min(1.0, max(ctx.worker_cpu_max_ratio, 0.1))
        return 1.0
    if ctx.trainer_cpu_cores is not None and features.ranks > 0:
        per_process = ctx.trainer_cpu_cores / features.ranks
        if (ctx.config or {}).get("device_type") == "cpu":
            # On a CPU the step outside the data wait is CPU work: a process measured below that
            # share was sampled outside its steps (a run shorter than the sampler's interval),
            # and its loader cannot be said to wait on I/O from it.
            per_process = max(per_process, 1.0 - features.fractions["data_wait"])
        return min(1.0, max(per_process, 0.1))
    return 1.0


def extra_workers(features: Features) -> tuple[int | None, float]:
    """How many more DataLoader workers the free cores can run, and the CPU one worker needs;
    None when the host's free cores were not measured.

    From the loop, a first worker that waits on I/O is always possible: it takes over the little
    CPU the loop spends loading, and the wait it overlaps needs none.
    """
    ctx = features.context
    current = int(ctx.dataloader().get("num_workers") or 0)
    per_worker = worker_cpu_need(features)
    free = ctx.free_cores
    if free is None:
        return None, per_worker
    extra = int(free / per_worker + 1e-9)
    if current == 0 and per_worker < IO_BOUND_CPU:
        extra = max(extra, 1)
    return extra, per_worker


def loader_advice(features: Features, gain: float) -> Recommendation:
    """More workers where free cores can run them; otherwise the input pipeline is CPU-bound
    and only cheaper samples help. The one place that decides between the two."""
    ctx = features.context
    current = int(ctx.dataloader().get("num_workers") or 0)
    extra, per_worker = extra_workers(features)
    cores = ctx.cpu_count
    if extra is None:
        suggested = max(2, current * 2)
        reason = f"the host's free cores were not measured: check that {suggested - current} more cores are idle"
        return _num_workers(features, current, suggested, reason)
    free = ctx.free_cores or 0.0
    if extra < 1:
        return cheaper_samples(features, current, free, cores, gain)
    # From the loop, a few workers first: how much CPU one needs is not known until one runs.
    suggested = min(8, extra) if current == 0 else min(64, current + extra)
    if current == 0 and per_worker < IO_BOUND_CPU:
        waits = (
            f"the loader runs in the training loop and mostly waits on I/O (each training process uses "
            f"{per_worker:.2f} cores in all), so workers need little CPU"
        )
        room = f"room for {extra}" if free >= per_worker else "enough for one to take the loading over, not more"
        reason = f"{waits}: {free:.1f} of {cores} cores are free, {room}"
    elif current == 0:
        reason = f"{free:.1f} of {cores} cores are free and the loader runs in the training loop"
    else:
        each = "the worker uses" if current == 1 else f"each of the {current} workers uses"
        reason = f"{free:.1f} of {cores} cores are free and {each} {per_worker:.0%} of a core: room for {extra} more"
    return _num_workers(features, current, suggested, reason)


def _num_workers(features: Features, current: int, suggested: int, reason: str) -> Recommendation:
    # In units of the step time (so that an attach, which sees shares but no steps, gets the
    # same estimate): the per-batch load time is serial in the loop with 0 workers; else the
    # pipeline's throughput bound (W workers deliver one batch every step time).
    wait = features.fractions["data_wait"]
    load = wait if current == 0 else float(current)
    new_step = max(1.0 - wait, load / suggested)
    speedup = max(1.0, 1.0 / new_step) if new_step > 0 else removed(wait)
    return Recommendation(
        id="dataloader.num_workers",
        title=f"Raise DataLoader num_workers from {current} to {suggested}",
        estimated_speedup=min(speedup, removed(features.fractions["data_wait"])),
        how=f"DataLoader(dataset, batch_size=..., num_workers={suggested}, persistent_workers=True)",
        why=reason,
    )


def cheaper_samples(
    features: Features, workers: int, free_cores: float, cores: int | None, gain: float
) -> Recommendation:
    """The loader saturates the host: each sample must cost less CPU (the pipeline's throughput
    grows by ``gain``, up to the point where compute sets the pace)."""
    # In units of the step time, as for more workers.
    speedup = 1.0 / max(1.0 - features.fractions["data_wait"], 1.0 / gain)
    running = f"with {workers} DataLoader workers running" if workers else "and the loader runs in the training loop"
    return Recommendation(
        id="dataloader.cheaper_samples",
        title="The input pipeline is CPU-bound: make each sample cheaper to produce",
        estimated_speedup=min(max(1.0, speedup), removed(features.fractions["data_wait"])),
        how="# decode once and cache the decoded samples (or store them pre-decoded),\n"
        "# use lighter transforms, or decode/augment on the GPU after batching:\n"
        "batch = batch.to(device, non_blocking=True)\nbatch = gpu_augment(batch)",
        why=f"{free_cores:.1f} of {cores} cores are free {running}: more workers would have no core to run on",
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
        why="the workers use little CPU while cores are free: they wait on I/O, and deeper prefetching "
        "absorbs uneven load times",
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
        why=(
            "time outside data loading, forward, backward and optimizer: logging, .item(), "
            "checkpoints or Python work between steps"
            if features.device is None
            else f"the GPU is idle {features.device.up_to}{features.fractions['other']:.0%} of step time "
            "waiting for the host (device clock): logging, .item(), checkpoints or Python work between launches"
        ),
    )


def cuda_graphs(features: Features, gain: float) -> Recommendation:
    """A launch-bound GPU (idle while the host launches kernels): CUDA graphs replay a step's
    launches at once; the estimate removes ``gain`` of the measured idle and no more."""
    idle = features.fractions["other"]
    return Recommendation(
        id="torch.compile",
        title='Compile with mode="reduce-overhead" (CUDA graphs) to cut launch overhead',
        estimated_speedup=removed(idle * gain),
        how='model = torch.compile(model, mode="reduce-overhead")',
        why=(
            f"the GPU is idle {features.device.up_to if features.device else ''}{idle:.0%} of step time "
            "waiting for the host to launch work (device clock)"
        ),
    )


def tf32(features: Features) -> Recommendation:
    return Recommendation(
        id="compute.tf32",
        title="Allow TF32 tensor cores for fp32 matmuls and convolutions",
        estimated_speedup=amdahl(features.fractions["compute"] - features.phase_fractions["optimizer"], 2.0),
        how='torch.set_float32_matmul_precision("high")\ntorch.backends.cudnn.allow_tf32 = True',
        why="fp32 matmuls run at full precision on CUDA, leaving tensor cores idle",
    )


def channels_last(features: Features) -> Recommendation:
    return Recommendation(
        id="compute.channels_last",
        title="Use the channels_last memory format for the conv net",
        estimated_speedup=amdahl(features.fractions["compute"] - features.phase_fractions["optimizer"], 1.2),
        how="model = model.to(memory_format=torch.channels_last)\n"
        "inputs = inputs.to(device, memory_format=torch.channels_last)",
        why="convolutions in NCHW need layout transposes around tensor-core kernels",
    )


def grad_compression(features: Features) -> Recommendation:
    return Recommendation(
        id="ddp.grad_compression",
        title="Compress gradients before the all-reduce (bf16 hook, or PowerSGD)",
        estimated_speedup=removed(features.fractions["communication"] * 0.5),
        how="from torch.distributed.algorithms.ddp_comm_hooks import default_hooks\n"
        "model.register_comm_hook(None, default_hooks.bf16_compress_hook)\n"
        "# stronger: powerSGD_hook.powerSGD_hook with PowerSGDState(matrix_approximation_rank=2)",
        why="halving the bytes on the wire halves the all-reduce time that is not hidden",
    )


def bucket_cap(features: Features, current_mb: float | None) -> Recommendation:
    current = current_mb if current_mb is not None else 25.0
    return Recommendation(
        id="ddp.bucket_cap_mb",
        title=f"Tune DDP's gradient bucket size (now {current:g} MB)",
        estimated_speedup=removed(features.fractions["communication"] * 0.2),
        how=f"DistributedDataParallel(model, bucket_cap_mb={int(current * 2)})  # try larger and smaller",
        why="larger buckets mean fewer, more efficient all-reduces; smaller ones start overlapping sooner",
    )


def no_sync_accumulation(features: Features) -> Recommendation:
    return Recommendation(
        id="ddp.no_sync_accumulation",
        title="Accumulate gradients over micro-batches with no_sync()",
        estimated_speedup=removed(features.fractions["communication"] * 0.75),
        how="for i, batch in enumerate(loader):\n"
        "    ctx = model.no_sync() if (i + 1) % 4 else contextlib.nullcontext()\n"
        "    with ctx:\n        loss_fn(model(batch)).backward()\n"
        "    if (i + 1) % 4 == 0:\n        optimizer.step(); optimizer.zero_grad()",
        why="all-reducing once every 4 micro-batches cuts communication by 4x at the same global batch",
    )


def static_graph(features: Features) -> Recommendation:
    return Recommendation(
        id="ddp.static_graph",
        title="Tell DDP the graph is static, and let gradients be bucket views",
        estimated_speedup=removed(features.fractions["communication"] * 0.1),
        how="DistributedDataParallel(model, static_graph=True, gradient_as_bucket_view=True)",
        why="a static graph skips the per-step unused-parameter search; bucket views save a copy",
    )


def straggler(rank: int, cause: str, excess_fraction: float, wait_fraction: float) -> Recommendation:
    """Fixing the culprit removes its excess work (the others then wait less by that much), not
    all of the others' wait: some of it is the collective itself."""
    removable = min(excess_fraction, wait_fraction)
    return Recommendation(
        id="straggler.rank",
        title=f"Fix rank {rank}: the others wait for it ({cause})",
        estimated_speedup=removed(removable),
        how=f"# look at rank {rank}'s host: its {cause} is slower than on the other ranks\n"
        "profilerd report RUN  # per-rank table",
        why=f"rank {rank}'s own work takes {excess_fraction:.0%} of a step longer than the median rank's; "
        f"the other ranks spend {wait_fraction:.0%} of their step time waiting",
    )


def sync_cost(features: Features) -> float:
    """The share of step time the loop's syncs cost: on the host's clock, the time blocked in
    them; on the device's, at most the GPU idle between launches (while the host blocks in a
    sync the GPU works off its queue; what is lost is the idle until the next launch)."""
    blocked = features.signals.sync_fraction
    return blocked if features.device is None else min(blocked, features.fractions["other"])


def defer_syncs(features: Features, site: str | None) -> Recommendation:
    where = f" ({site})" if site else ""
    return Recommendation(
        id="loop.defer_syncs",
        title=f"Remove per-step host-device syncs{where}",
        estimated_speedup=removed(sync_cost(features)),
        how="# keep the loss on the device and read it every N steps:\n"
        "running += loss.detach()\n"
        "if step % 100 == 0:\n    print(step, (running / 100).item()); running.zero_()",
        why=".item(), .cpu(), float(t) and print(t) make the host wait for the GPU every step",
    )


def stabilize(features: Features, kind: str) -> Recommendation:
    lr = features.signals.lr_end
    lower = f"lr={lr / 10:g}" if lr else "a 10x lower learning rate"
    return Recommendation(
        id=f"convergence.{kind}",
        title="Stabilise training: lower the learning rate, warm it up, and clip gradients",
        estimated_speedup=1.0,
        how=f"optimizer = torch.optim.AdamW(model.parameters(), {lower})\n"
        "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=1000)\n"
        "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)  # before optimizer.step()",
        why="steps that produce inf/NaN or a growing loss waste the run; no speedup helps until fixed",
    )


def not_learning(features: Features, zero_lr: bool) -> Recommendation:
    if zero_lr:
        title = "Set a non-zero learning rate: with lr=0 no step changes the model"
        how = (
            "optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)\n"
            "# and check schedulers and warm-ups that start at 0"
        )
    else:
        title = "Check that the parameters are trained: the loss never moves"
        how = (
            "optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)  # the model's own parameters\n"
            "assert any(p.requires_grad for p in model.parameters())\n"
            "# and that optimizer.step() runs after loss.backward()"
        )
    return Recommendation(
        id="convergence.not_learning",
        title=title,
        estimated_speedup=1.0,
        how=how,
        why="a loss stuck at its first value means every step is wasted; no speedup helps until fixed",
    )


def lr_schedule(features: Features) -> Recommendation:
    return Recommendation(
        id="optimizer.lr_schedule",
        title="Add a learning-rate schedule (the loss has plateaued at a constant LR)",
        estimated_speedup=1.0,
        how="scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)\n"
        "# call scheduler.step() after optimizer.step()",
        why="a constant learning rate often stalls once the loss stops improving",
    )


def adamw(features: Features, weight_decay: float) -> Recommendation:
    return Recommendation(
        id="optimizer.adamw",
        title="Use AdamW for weight decay (Adam applies it as an L2 term inside the adaptive step)",
        estimated_speedup=1.0,
        how=f"optimizer = torch.optim.AdamW(model.parameters(), weight_decay={weight_decay:g})",
        why="decoupled weight decay regularises as intended; Adam's L2 is scaled away by the adaptive step",
    )


def compile_dynamic(features: Features) -> Recommendation:
    return Recommendation(
        id="compile.recompilation",
        title="Stop torch.compile from recompiling: mark dynamic shapes or pad inputs",
        estimated_speedup=removed(features.fractions["other"] * 0.5),
        how="model = torch.compile(model, dynamic=True)\n"
        "# or pad batches to a few fixed shapes; see TORCH_LOGS=recompiles for the cause",
        why="each new input shape or guard failure compiles a new graph, stalling the step",
    )


def restore_clocks(features: Features, clock_ratio: float | None) -> Recommendation:
    compute = features.fractions["compute"]
    local = 1.0 / clock_ratio if clock_ratio and 0 < clock_ratio < 1 else 1.0
    return Recommendation(
        id="gpu.restore_clocks",
        title="Remove the thermal or power limit that slows the GPU clocks",
        estimated_speedup=amdahl(compute, local),
        how="nvidia-smi -q -d PERFORMANCE,TEMPERATURE,POWER   # which limit, and how close\n"
        "# then: improve airflow / cooling, or raise the power limit: sudo nvidia-smi -pl <watts>",
        why="throttled SM clocks run every kernel proportionally slower",
    )


def activation_checkpointing(features: Features) -> Recommendation:
    return Recommendation(
        id="memory.activation_checkpointing",
        title="Free GPU memory: activation checkpointing, or smaller micro-batches with accumulation",
        estimated_speedup=1.0,
        how="from torch.utils.checkpoint import checkpoint\n"
        "x = checkpoint(block, x, use_reentrant=False)   # per transformer/conv block\n"
        "# or halve the batch and call optimizer.step() every 2 micro-batches",
        why="memory near capacity risks out-of-memory errors and allocator thrashing",
    )


def nccl_topology(features: Features, pcie_bytes_per_s: float, nvlink_bytes_per_s: float | None) -> Recommendation:
    nvlink = "no NVLink traffic" if not nvlink_bytes_per_s else f"only {nvlink_bytes_per_s / 1e9:.1f} GB/s over NVLink"
    return Recommendation(
        id="nccl.topology",
        title="Route collectives over NVLink instead of PCIe",
        estimated_speedup=removed(features.fractions["communication"] * 0.5),
        how="nvidia-smi topo -m          # which GPU pairs share NVLink\n"
        "NCCL_DEBUG=INFO torchrun ...  # shows the transport NCCL picked (P2P/NVL vs SHM/PCI)\n"
        "# place the job's ranks on NVLink-connected GPUs (CUDA_VISIBLE_DEVICES), check NCCL_P2P_DISABLE",
        why=f"the GPUs move {pcie_bytes_per_s / 1e9:.1f} GB/s over PCIe with {nvlink} while communication is exposed",
    )
