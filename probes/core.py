"""Step timing inside the training process.

A step runs from one step boundary to the next. Boundaries come from the global
optimizer-step hooks; loops without an optimizer (hand-written updates, GradScaler skipping a
step) fall back to "a new batch or a new forward pass after a backward pass". Inside a step the
probe sums, on the training thread only:

- data wait: time blocked in ``DataLoader.__next__``;
- forward: time inside root modules (found once with short-lived global module hooks, then
  timed with per-instance hooks so that PyTorch's fast path stays on for every other module);
- backward: time inside ``torch.autograd.backward``;
- optimizer: time between the optimizer's pre- and post-step hooks.

Everything is host wall time from ``time.perf_counter``: the probe never synchronises the GPU.
Every hook body is guarded; the first internal error disables the probe with one warning and
the user's code carries on untouched.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import socket
import sys
import threading
import time
import warnings
import weakref
from typing import Any

from profilerd_probes import wire
from profilerd_probes.signals import (
    COLLECTIVES,
    SYNC_METHODS,
    CollectiveTimer,
    DdpSplit,
    DeferredScalar,
    NcclDeviceTime,
    SyncCounter,
    arm_nccl_device_timing,
)
from profilerd_probes.transport import DatagramSender

log = logging.getLogger("profilerd_probes")

PROBE_VERSION = "0.1.0"
# Steps at which the configuration snapshot is rebuilt and resent if it changed; later, every
# CONFIG_REFRESH_STEPS. The first steps are where loaders, optimizers and autocast appear.
CONFIG_STEPS = (1, 2, 3, 5, 10, 20, 50)
CONFIG_REFRESH_STEPS = 500
HELLO_REFRESH_S = 10.0
REDISCOVERY_STEPS = 100
BATCH_MAX_AGE_S = 0.05  # steps wait at most this long to share a datagram
COMPILES_REFRESH_S = 0.5


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _env_float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


def identity() -> dict[str, Any]:
    """Who this process is within its job, from the launcher's environment."""
    pid = os.getpid()
    hostname = socket.gethostname()
    job_id = (
        os.environ.get("PROFILERD_JOB_ID")
        or os.environ.get("TORCHELASTIC_RUN_ID")
        or os.environ.get("SLURM_JOB_ID")
        or f"{hostname}-{pid}"
    )
    return {
        "pid": pid,
        "job": job_id,
        "run_id": os.environ.get("PROFILERD_RUN_ID") or job_id,
        "rank": _env_int("RANK", 0),
        "local_rank": _env_int("LOCAL_RANK", 0),
        "world_size": _env_int("WORLD_SIZE", 1),
        "hostname": hostname,
        "argv": list(sys.argv)[:16],
        "python": sys.version.split()[0],
        "probe_version": PROBE_VERSION,
    }


class StepProbe:
    """Owns the hooks of one process and the accumulators of the step in progress."""

    def __init__(self, sender: DatagramSender) -> None:
        import torch  # the probe is only installed once torch is importable

        self._torch = torch
        self.sender = sender
        self.ident = identity()
        self._pid, self._rank = self.ident["pid"], self.ident["rank"]
        self._started_unix_s = time.time()
        self._wall_offset = time.time() - time.perf_counter()  # perf_counter -> unix seconds
        self._batch: list[bytes] = []
        self._batch_started = time.perf_counter()
        self._compiles = 0
        self._compiles_read_at = -math.inf
        self._loss_read_at = -math.inf
        self._grad_norm_read_at = -math.inf
        self._last_optimizer: Any = None
        self._said_goodbye = False
        self.train_thread = threading.main_thread().ident
        self.enabled = True
        self._handles: list[Any] = []
        self._patches: list[tuple[Any, str, Any]] = []
        self._root_modules: weakref.WeakSet[Any] = weakref.WeakSet()
        self._discovering = False
        self._depth = 0
        self._forward_start = 0.0
        self._optimizer_start = 0.0
        self._hello_sent_at = -math.inf
        self._seq = 0
        self._next_discovery_step = 0
        self._discovery_handles: list[Any] = []
        self.step_index = 0
        self.optimizer_seen = False
        self.optimizer_exists = False  # set when any torch.optim.Optimizer is constructed
        self.optimizer_steps = 0
        self._in_loader = 0
        self._skipped_this_step = False
        self._loader_config: dict[str, Any] = {}
        self._optimizers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._autocast: dict[str, Any] = {}
        self._scaler_used = False
        self._last_config: dict[str, Any] | None = None
        self._loss = DeferredScalar(torch)
        self._grad_norm = DeferredScalar(torch)
        self._scale = DeferredScalar(torch)
        self.syncs = SyncCounter()
        self.collectives = CollectiveTimer()
        self._ddp_split = DdpSplit()
        self._nccl = NcclDeviceTime(torch)
        self._ddp: weakref.ref[Any] | None = None
        self._last_grad_ready = 0.0  # perf_counter when the last gradient of a DDP backward was ready
        self._exposed_comm_s = 0.0
        self._lr: float | None = None
        # The gradient norm costs a pass over every gradient: sample it once a second at most
        # (0 disables); a clip_grad_norm_ call in the loop gives it for free every step.
        self._grad_norm_every_s = max(0.0, _env_float("PROFILERD_GRAD_NORM_EVERY_S", 1.0))
        # The loss is read at most this often: NaN/inf persist and trends are slow.
        self.loss_every_s = max(0.0, _env_float("PROFILERD_LOSS_EVERY_S", 0.05))
        self._scheduler: str | None = None
        self._clip_used = False
        self._reset_step(time.perf_counter())
        self._step_start = None  # the first step starts at the first observed activity

    # ---- step accumulators -------------------------------------------------------------
    def _reset_step(self, start: float | None) -> None:
        self._step_start = start
        self.data_wait_s = 0.0
        self.forward_s = 0.0
        self.backward_s = 0.0
        self.optimizer_s = 0.0
        self.comm_s = 0.0
        self._exposed_comm_s = 0.0
        self._backward_seen = False
        self._pending_close: float | None = None
        self._clip_this_step = False
        self._skipped_this_step = False
        self.syncs.reset_step()
        self.syncs.suspended = 0  # an exception inside optimizer.step() must not leave it on
        self.collectives.reset_step()

    def _activity(self, now: float) -> None:
        """A new batch or forward pass: close the previous step if it has ended.

        With an optimizer, steps end only at optimizer.step() (so micro-batches of gradient
        accumulation stay in one step); without one, a new batch after a backward pass ends it.
        """
        if self._pending_close is not None:
            self._close_step(self._pending_close, fallback=False)
        elif self._backward_seen and not self.optimizer_exists:
            self._close_step(now, fallback=True)
        if self._step_start is None:
            self._step_start = now

    def _close_step(self, end: float, fallback: bool) -> None:
        start = self._step_start if self._step_start is not None else end
        self.step_index += 1
        if self._discovering and self.step_index >= 1:
            self._finish_discovery()
        if (
            self._backward_seen
            and self.forward_s == 0.0
            and not self._discovering
            and self.step_index >= self._next_discovery_step
        ):
            # A model we do not time yet (created or swapped later): find its root again,
            # at most every REDISCOVERY_STEPS so a module-less loop pays nothing.
            self._next_discovery_step = self.step_index + REDISCOVERY_STEPS
            self._start_discovery()
        config_step = self.step_index in CONFIG_STEPS or self.step_index % CONFIG_REFRESH_STEPS == 0
        if config_step:
            self._refresh_rank()
        self.sender.ensure_connected()  # a reconnect must be followed by hello before the step
        self._maybe_hello()
        if config_step:
            self._send_config()
        self._seq += 1
        flags = wire.FLAG_FALLBACK_BOUNDARY if fallback else 0
        if self._skipped_this_step:
            flags |= wire.FLAG_GRAD_SCALER_SKIPPED
        loss = self._loss.take()
        grad_norm = self._grad_norm.take()
        scale = self._scale.take()
        flags |= wire.FLAG_HAS_LOSS if loss is not None else 0
        flags |= wire.FLAG_HAS_GRAD_NORM if grad_norm is not None else 0
        flags |= wire.FLAG_HAS_SCALE if scale is not None else 0
        flags |= wire.FLAG_HAS_LR if self._lr is not None else 0
        backward = self.backward_s
        comm = self.comm_s + self.collectives.seconds
        comm_total = comm
        ddp = self._ddp() if self._ddp is not None else None
        if ddp is not None:
            if self.step_index <= 12 or self.step_index % DdpSplit.READ_EVERY_STEPS == 0:
                self._ddp_split.refresh(ddp)
                if self._ddp_split.last_ready_changed:
                    self._watch_last_gradients(ddp)
            # Exposed all-reduce: the backward call waited from the last gradient being ready
            # until DDP's communication finished (on gloo this includes waiting for other ranks).
            exposed = min(self._exposed_comm_s, backward)
            comm_total += max(exposed, backward * self._ddp_split.comm_ratio)
            backward -= exposed
            comm += exposed
        # NCCL ops run asynchronously on the device: their completed durations count as total
        # communication (overlapped or not) of the step in which they were read.
        comm_total += self._nccl.poll(end)
        if end - self._compiles_read_at > COMPILES_REFRESH_S:
            self._compiles_read_at = end
            self._compiles = _graph_compiles()
        self._batch.append(
            wire.pack_step_record(
                self._pid,
                self._rank,
                self._seq,
                self.step_index,
                end + self._wall_offset,
                end - start,
                self.data_wait_s,
                self.forward_s,
                backward,
                self.optimizer_s,
                comm,
                self.sender.dropped_total,
                flags,
                loss if loss is not None else 0.0,
                grad_norm if grad_norm is not None else 0.0,
                self._lr if self._lr is not None else 0.0,
                scale if scale is not None else 0.0,
                self.syncs.count,
                self.syncs.seconds,
                comm_total,
                self._compiles,
                self.collectives.ops,
                self.collectives.bytes,
            )
        )
        if len(self._batch) >= wire.MAX_BATCH_RECORDS or end - self._batch_started >= BATCH_MAX_AGE_S:
            self._send_batch(end)
        self._reset_step(end)

    def _send_batch(self, now: float) -> None:
        """One datagram for the steps gathered so far: a syscall per batch, not per step."""
        if self._batch:
            self.sender.send(wire.encode_step_batch(self._batch), records=len(self._batch))
            self._batch = []
        self._batch_started = now

    def flush(self) -> None:
        """Close the step in progress if it has ended, and send what is batched (exit, uninstall)."""
        if self._pending_close is not None:
            self._close_step(self._pending_close, fallback=False)
        elif self._backward_seen:
            self._close_step(time.perf_counter(), fallback=True)
        self._send_batch(time.perf_counter())

    def say_goodbye(self) -> None:
        """At interpreter exit: tells the daemon this process ended normally (once)."""
        if self.step_index > 0 and not self._said_goodbye:
            self._said_goodbye = True
            body = {"pid": self.ident["pid"], "kind": "exit", "steps": self.step_index}
            self.sender.send(wire.encode_json(wire.KIND_EVENT, body))

    # ---- messages ----------------------------------------------------------------------
    def _maybe_hello(self) -> None:
        """Say who we are at the start, periodically, and after the daemon comes back."""
        now = time.monotonic()
        if self.sender.reconnected or now - self._hello_sent_at > HELLO_REFRESH_S:
            self._hello_sent_at = now
            body = dict(self.ident, started_unix_s=self._started_unix_s)
            self.sender.send(wire.encode_json(wire.KIND_HELLO, body))
            if self._last_config is not None:  # a restarted daemon needs the config again
                self.sender.send(wire.encode_json(wire.KIND_CONFIG, self._last_config))
            self.sender.reconnected = False

    def _refresh_rank(self) -> None:
        """Ranks started without RANK/WORLD_SIZE (torch.multiprocessing) learn them from the
        process group once it exists; a changed identity is announced before the next step."""
        dist = self._torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return
        rank, world = dist.get_rank(), dist.get_world_size()
        if (rank, world) != (self.ident["rank"], self.ident["world_size"]):
            self.ident = dict(self.ident, rank=rank, world_size=world)
            self._rank = rank
            self._hello_sent_at = -math.inf
        self._wall_offset = time.time() - time.perf_counter()  # follow NTP adjustments

    def _send_config(self) -> None:
        config = self.config_snapshot()
        if config != self._last_config:
            self._last_config = config
            self.sender.send(wire.encode_json(wire.KIND_CONFIG, config))

    def config_snapshot(self) -> dict[str, Any]:
        torch = self._torch
        config: dict[str, Any] = {
            "pid": self.ident["pid"],
            "torch_version": torch.__version__,
            "cuda_available": bool(torch.cuda.is_available()),
            "cpu_capability": _safe(lambda: torch.backends.cpu.get_cpu_capability()),
            "num_threads": torch.get_num_threads(),
            "dataloader": dict(self._loader_config) or None,
            "autocast": dict(self._autocast) or {"enabled": False},
            "grad_scaler": self._scaler_used,
            "tf32": {
                "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                "cudnn": bool(torch.backends.cudnn.allow_tf32),
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
            },
            "rank": self.ident["rank"],
            "world_size": self.ident["world_size"],
            "lr_scheduler": self._scheduler,
            "grad_clipping": self._clip_used,
            "sync_sites": self.syncs.top_sites(),
            "compiled_graphs": _graph_compiles(),
            "nccl_device_timing": "off: " + self._nccl.error if self._nccl.error else "on",
        }
        config["optimizers"] = [_describe_optimizer(opt) for opt in list(self._optimizers)[:4]]
        models = [_describe_model(torch, module) for module in list(self._root_modules)[:4]]
        config["models"] = [m for m in models if m["parameters"] > 0]
        devices = {m["device"] for m in config["models"]}
        config["device_type"] = "cuda" if "cuda" in devices else (devices.pop() if devices else None)
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            config["distributed"] = {
                "backend": str(dist.get_backend()),
                "rank": dist.get_rank(),
                "world_size": dist.get_world_size(),
            }
        return config

    # ---- hook bodies (hot path) ----------------------------------------------------------
    def on_loader_next_start(self, now: float) -> None:
        self._activity(now)

    def on_forward_pre(self, module: Any) -> None:
        if self._in_loader or threading.get_ident() != self.train_thread:
            return  # modules run by the loader (transforms) are data loading, not forward
        if self._depth == 0:
            now = time.perf_counter()
            self._activity(now)
            self._forward_start = now
            if self._discovering:
                self._root_modules.add(module)
        if self.step_index < 3 or self.step_index % CONFIG_REFRESH_STEPS == 0:
            self._sample_autocast(module)
        self._depth += 1

    def on_forward_post(self) -> None:
        if self._in_loader or threading.get_ident() != self.train_thread or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            self.forward_s += time.perf_counter() - self._forward_start

    def on_backward(self, start: float, end: float) -> None:
        self.backward_s += end - start
        self._backward_seen = True
        if self._ddp is not None and start <= self._last_grad_ready <= end:
            self._exposed_comm_s += end - self._last_grad_ready

    def _watch_last_gradients(self, ddp: Any) -> None:
        """Hook the parameters whose gradients are ready last (DDP's recorded order, plus the
        first parameter, usually last in backward): one cheap hook each per backward."""
        for handle in getattr(self, "_grad_handles", []):
            handle.remove()
        params = [p for p in ddp.module.parameters() if p.requires_grad]
        if not params:
            return
        chosen = {0, *self._ddp_split.last_ready[-2:]}
        self._grad_handles = [
            params[i].register_post_accumulate_grad_hook(_gradient_ready) for i in sorted(chosen) if i < len(params)
        ]

    def on_optimizer_pre(self, optimizer: Any) -> None:
        self.syncs.suspended += 1  # the optimizer's own .item() calls are not the user's
        if optimizer is not self._last_optimizer:
            self._last_optimizer = optimizer
            self._optimizers.add(optimizer)
        now = time.perf_counter()
        every = self._grad_norm_every_s
        if every and not self._clip_this_step and now - self._grad_norm_read_at >= every:
            self._grad_norm_read_at = now
            self._sample_grad_norm(optimizer)
            now = time.perf_counter()
        self._optimizer_start = now

    def on_optimizer_post(self, optimizer: Any) -> None:
        now = time.perf_counter()
        self.optimizer_s += now - self._optimizer_start
        self.optimizer_seen = True
        self.optimizer_steps += 1
        self._pending_close = now
        self.syncs.suspended = max(0, self.syncs.suspended - 1)
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        self._lr = float(lr) if isinstance(lr, int | float) else self._lr

    def _sample_grad_norm(self, optimizer: Any) -> None:
        """The global gradient norm, computed asynchronously on the gradients' device."""
        torch = self._torch
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or any(g.is_sparse for g in grads) or len({g.device for g in grads}) != 1:
            return
        with torch.no_grad():
            norms = torch._foreach_norm(grads)
            self._grad_norm.capture(torch.linalg.vector_norm(torch.stack(norms)))

    def on_clip_grad_norm(self, total_norm: Any) -> None:
        self._clip_used = True
        self._clip_this_step = True
        self._grad_norm.capture(total_norm)

    # ---- configuration captured on the way ---------------------------------------------
    def note_loader(self, loader: Any) -> None:
        batch_sampler = getattr(loader, "batch_sampler", None)
        self._loader_config = {
            "num_workers": int(loader.num_workers),
            "pin_memory": bool(loader.pin_memory),
            "prefetch_factor": loader.prefetch_factor,
            "persistent_workers": bool(loader.persistent_workers),
            "batch_size": loader.batch_size
            if loader.batch_size is not None
            else getattr(batch_sampler, "batch_size", None),
            "dataset": type(loader.dataset).__name__,
        }

    def _sample_autocast(self, module: Any) -> None:
        """Whether autocast is on where parameters are used; once seen on, it stays on (a loss
        module after the autocast block, or a decorated forward, must not hide it)."""
        if self._autocast.get("enabled"):
            return
        param = next(module.parameters(recurse=False), None)
        if param is None:
            return
        torch = self._torch
        device_type = str(param.device.type)
        try:
            enabled = bool(torch.is_autocast_enabled(device_type))
            dtype = str(torch.get_autocast_dtype(device_type)).replace("torch.", "")
        except (RuntimeError, TypeError):
            return
        self._autocast = {"enabled": enabled, "dtype": dtype if enabled else None}

    # ---- discovery of root modules -------------------------------------------------------
    def _start_discovery(self) -> None:
        mod = self._torch.nn.modules.module
        self._discovery_handles = [
            mod.register_module_forward_pre_hook(_global_forward_pre),
            mod.register_module_forward_hook(_global_forward_post, always_call=True),
        ]
        self._discovering = True

    def _finish_discovery(self) -> None:
        for handle in self._discovery_handles:
            handle.remove()
        self._discovery_handles = []
        self._discovering = False
        ddp_cls = _safe(lambda: self._torch.nn.parallel.DistributedDataParallel)
        for module in list(self._root_modules):
            if ddp_cls is not None and isinstance(module, ddp_cls) and self._ddp is None:
                self._ddp = weakref.ref(module)
                self._watch_last_gradients(module)
            if getattr(module, "_profilerd_hooked", False):
                continue
            self._handles.append(module.register_forward_pre_hook(_instance_forward_pre))
            self._handles.append(module.register_forward_hook(_instance_forward_post, always_call=True))
            module._profilerd_hooked = True

    # ---- install / uninstall -----------------------------------------------------------
    def install(self) -> None:
        torch = self._torch
        import torch.optim.optimizer as optim_mod
        from torch.utils.data import dataloader as dl

        try:
            arm_nccl_device_timing(torch, os.environ, bool(glob.glob("/dev/nvidia[0-9]*")))
        except Exception as exc:  # optional: NCCL device times stay unknown, the rest runs
            log.debug("cannot arm NCCL device timing: %r", exc)

        self._patch(dl._BaseDataLoaderIter, "__next__", _make_loader_next(dl._BaseDataLoaderIter.__next__))
        self._patch(dl._BaseDataLoaderIter, "__init__", _make_loader_init(dl._BaseDataLoaderIter.__init__))
        self._patch(torch.autograd, "backward", _make_backward(torch.autograd.backward))
        scaler_cls = torch.amp.grad_scaler.GradScaler
        self._patch(scaler_cls, "update", _make_scaler_update(scaler_cls.update))
        self._patch(scaler_cls, "step", _make_scaler_step(scaler_cls.step))
        optimizer_cls = torch.optim.Optimizer
        self._patch(optimizer_cls, "__init__", _make_optimizer_init(optimizer_cls.__init__))
        self._patch(torch.nn.utils, "clip_grad_norm_", _make_clip_grad_norm(torch.nn.utils.clip_grad_norm_))
        scheduler_cls = torch.optim.lr_scheduler.LRScheduler
        self._patch(scheduler_cls, "step", _make_scheduler_step(scheduler_cls.step))
        torch_dir = os.path.dirname(torch.__file__) + os.sep
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            wrapped = self.syncs.wrap(name, original, lambda: self.train_thread, torch_dir)
            self._patch(torch.Tensor, name, wrapped)
        dist = torch.distributed
        if dist.is_available():
            for name in COLLECTIVES:
                if hasattr(dist, name):
                    self._patch(dist, name, self.collectives.wrap(getattr(dist, name), lambda: self.train_thread))
        self._handles.append(optim_mod.register_optimizer_step_pre_hook(_optimizer_pre))
        self._handles.append(optim_mod.register_optimizer_step_post_hook(_optimizer_post))
        self._start_discovery()

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        """Replace an attribute; uninstall puts back exactly what was there (or nothing)."""
        own = getattr(owner, "__dict__", {})
        original = own.get(name, _INHERITED)
        self._patches.append((owner, name, original))
        setattr(owner, name, replacement)

    def uninstall(self) -> None:
        self.enabled = False
        for handle in self._handles + self._discovery_handles + getattr(self, "_grad_handles", []):
            handle.remove()
        self._handles = []
        self._discovery_handles = []
        for module in list(self._root_modules):
            if getattr(module, "_profilerd_hooked", False):
                del module._profilerd_hooked
        for owner, name, original in reversed(self._patches):
            if original is _INHERITED:
                delattr(owner, name)
            else:
                setattr(owner, name, original)
        self._patches = []

    def after_fork_in_child(self) -> None:
        """Forked children (DataLoader workers, fork-started ranks) start from a clean slate."""
        self.sender.reset_after_fork()
        self.ident = identity()
        self._pid, self._rank = self.ident["pid"], self.ident["rank"]
        self._batch = []
        self._started_unix_s = time.time()
        self.train_thread = threading.get_ident()
        self._seq = 0
        self.step_index = 0
        self._hello_sent_at = -math.inf
        self._depth = 0
        self._reset_step(None)


# ---- module-level hook functions: they look up the active probe, so uninstall is total ----
_INHERITED = object()  # marks an attribute that was inherited, not set on the patched class
_active: StepProbe | None = None
_warned = False


def active() -> StepProbe | None:
    return _active


def set_active(probe: StepProbe | None) -> None:
    global _active
    _active = probe


def disable(exc: BaseException) -> None:
    """Turn the probe off after an internal error: one warning, hooks removed, training goes on."""
    global _active, _warned
    probe, _active = _active, None
    if not _warned:
        _warned = True
        warnings.warn(
            f"profilerd probes disabled after an internal error: {exc!r}",
            RuntimeWarning,
            stacklevel=3,
        )
    if probe is not None:
        try:
            probe.uninstall()
        except Exception as uninstall_exc:  # already failing; keep the user's code running
            log.debug("uninstall after failure also failed: %r", uninstall_exc)


def _make_loader_next(original: Any) -> Any:
    perf_counter = time.perf_counter
    get_ident = threading.get_ident

    def __next__(self: Any) -> Any:
        probe = _active
        if probe is None or get_ident() != probe.train_thread:
            return original(self)
        start = perf_counter()
        try:
            probe.on_loader_next_start(start)
        except Exception as exc:
            disable(exc)
            probe = None
        if probe is None:  # outside the except block, so the user's errors carry no probe context
            return original(self)
        probe.syncs.suspended += 1
        probe._in_loader += 1
        try:
            return original(self)
        finally:
            probe._in_loader -= 1
            probe.syncs.suspended -= 1
            probe.data_wait_s += perf_counter() - start

    return __next__


def _make_loader_init(original: Any) -> Any:
    def __init__(self: Any, loader: Any, *args: Any, **kwargs: Any) -> None:
        original(self, loader, *args, **kwargs)
        probe = _active
        if probe is not None:
            try:
                probe.note_loader(loader)
            except Exception as exc:
                disable(exc)

    return __init__


def _make_backward(original: Any) -> Any:
    perf_counter = time.perf_counter
    get_ident = threading.get_ident

    def backward(*args: Any, **kwargs: Any) -> Any:
        probe = _active
        if probe is None:
            return original(*args, **kwargs)
        if get_ident() != probe.train_thread and not probe.optimizer_seen and probe.step_index == 0:
            probe.train_thread = get_ident()  # the training loop runs on another thread
        start = perf_counter()
        if args and start - probe._loss_read_at >= probe.loss_every_s and get_ident() == probe.train_thread:
            probe._loss_read_at = start
            try:
                probe._loss.capture(args[0] if hasattr(args[0], "numel") else None)
            except Exception as exc:
                disable(exc)
            start = perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            try:
                if get_ident() == probe.train_thread:
                    probe.on_backward(start, perf_counter())
            except Exception as exc:
                disable(exc)

    return backward


def _make_scaler_update(original: Any) -> Any:
    def update(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        probe = _active
        if probe is not None:
            probe._scaler_used = True
            try:
                if self.is_enabled():
                    probe._scale.capture(getattr(self, "_scale", None))
            except Exception as exc:
                disable(exc)
        return result

    return update


def _make_optimizer_init(original: Any) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        probe = _active
        if probe is not None:
            probe.optimizer_exists = True

    return __init__


def _make_scaler_step(original: Any) -> Any:
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        probe = _active
        if probe is None:
            return original(self, *args, **kwargs)
        probe.syncs.suspended += 1  # GradScaler's inf check is a sync it needs, not the user's
        stepped_before = probe.optimizer_steps
        try:
            return original(self, *args, **kwargs)
        finally:
            probe.syncs.suspended = max(0, probe.syncs.suspended - 1)
            if probe.optimizer_steps == stepped_before and self.is_enabled():
                # inf/NaN gradients: GradScaler skipped optimizer.step(); the step still ends here
                probe._skipped_this_step = True
                probe._pending_close = time.perf_counter()

    return step


def _make_clip_grad_norm(original: Any) -> Any:
    def clip_grad_norm_(*args: Any, **kwargs: Any) -> Any:
        total_norm = original(*args, **kwargs)
        probe = _active
        if probe is not None and threading.get_ident() == probe.train_thread:
            try:
                probe.on_clip_grad_norm(total_norm)
            except Exception as exc:
                disable(exc)
        return total_norm

    clip_grad_norm_.__wrapped__ = original  # type: ignore[attr-defined]
    return clip_grad_norm_


def _make_scheduler_step(original: Any) -> Any:
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        probe = _active
        if probe is not None and probe._scheduler is None:
            probe._scheduler = type(self).__name__
        return original(self, *args, **kwargs)

    return step


def _graph_compiles() -> int:
    """Graphs torch.compile has produced so far (0 when dynamo was never imported)."""
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None:
        return 0
    try:
        return int(utils.counters.get("stats", {}).get("unique_graphs", 0))
    except (AttributeError, TypeError, ValueError):
        return 0


def _optimizer_pre(optimizer: Any, args: Any, kwargs: Any) -> None:
    probe = _active
    if probe is not None and threading.get_ident() == probe.train_thread:
        try:
            probe.on_optimizer_pre(optimizer)
        except Exception as exc:
            disable(exc)


def _optimizer_post(optimizer: Any, args: Any, kwargs: Any) -> None:
    probe = _active
    if probe is not None and threading.get_ident() == probe.train_thread:
        try:
            probe.on_optimizer_post(optimizer)
        except Exception as exc:
            disable(exc)


def _gradient_ready(param: Any) -> None:
    probe = _active
    if probe is not None:
        probe._last_grad_ready = time.perf_counter()


def _global_forward_pre(module: Any, args: Any) -> None:
    probe = _active
    if probe is not None:
        try:
            probe.on_forward_pre(module)
        except Exception as exc:
            disable(exc)


def _global_forward_post(module: Any, args: Any, output: Any) -> None:
    probe = _active
    if probe is not None:
        try:
            probe.on_forward_post()
        except Exception as exc:
            disable(exc)


_instance_forward_pre = _global_forward_pre
_instance_forward_post = _global_forward_post


# ---- descriptions for the configuration snapshot ------------------------------------------
def _safe(getter: Any) -> Any:
    try:
        return getter()
    except Exception:  # a missing attribute in some torch build is not worth failing for
        return None


def _module_device_type(module: Any) -> str | None:
    for param in module.parameters():
        return str(param.device.type)
    return None


def _describe_model(torch: Any, module: Any) -> dict[str, Any]:
    dtypes: dict[str, int] = {}
    count = 0
    trainable = 0
    device = None
    has_conv2d = False
    for param in module.parameters():
        n = param.numel()
        count += n
        if param.requires_grad:
            trainable += n
        key = str(param.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + n
        device = device or str(param.device.type)
    channels_last = None
    for sub in module.modules():
        if isinstance(sub, torch.nn.Conv2d):
            has_conv2d = True
            channels_last = bool(sub.weight.is_contiguous(memory_format=torch.channels_last))
            break
    description: dict[str, Any] = {
        "class": type(module).__name__,
        "parameters": count,
        "trainable_parameters": trainable,
        "parameter_dtypes": dtypes,
        "device": device,
        "compiled": type(module).__name__ == "OptimizedModule",
        "has_conv2d": has_conv2d,
        "channels_last": channels_last,
    }
    ddp_cls = _safe(lambda: torch.nn.parallel.DistributedDataParallel)
    if ddp_cls is not None and isinstance(module, ddp_cls):
        description["ddp"] = {
            "bucket_cap_mb": round(module.bucket_bytes_cap / 2**20, 3),
            "find_unused_parameters": bool(module.find_unused_parameters),
            "static_graph": bool(module.static_graph),
            "gradient_as_bucket_view": bool(module.gradient_as_bucket_view),
        }
    return description


def _describe_optimizer(optimizer: Any) -> dict[str, Any]:
    defaults = getattr(optimizer, "defaults", {})
    wanted = ("lr", "momentum", "weight_decay", "betas", "eps", "foreach", "fused", "nesterov")
    hyper = {k: defaults[k] for k in wanted if k in defaults}
    if "lr" in hyper and not isinstance(hyper["lr"], int | float):
        hyper["lr"] = _safe(lambda: float(hyper["lr"]))  # a tensor learning rate
    params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return {"class": type(optimizer).__name__, "hyperparameters": hyper, "parameters": params}
