"""Why each rule exists and where its default threshold comes from (rendered into docs/rules.md)."""

from __future__ import annotations

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
