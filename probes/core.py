"""Step timing inside the training process, without touching the user's objects.

The probe never registers a hook on, or sets an attribute of, a user's module, tensor or
optimizer instance, and no global module hook is ever active. It patches a few functions at
class or module level (DataLoader iterators, ``torch.autograd.backward``/``grad``, autocast's
``__enter__``, GradScaler, ``clip_grad_norm_``, LR schedulers, DDP's ``__init__``, Tensor sync
methods, ``torch.distributed`` collectives) and uses the global optimizer-step hooks. Every
patch does nothing but call through while torch.compile, torch.export or torch.jit trace.

On the training thread it sums, per step:

- data wait: time blocked in ``DataLoader.__next__``;
- forward: from the end of the last phase the probe saw (the batch's arrival, the previous
  backward or optimizer step) to the start of ``torch.autograd.backward`` or ``grad``;
- backward: time inside ``torch.autograd.backward`` / ``torch.autograd.grad``;
- optimizer: the optimizer-step hook span minus the forward/backward run inside it (a closure);
- communication: ``torch.distributed`` collectives called from Python, and DDP's exposed
  all-reduce estimated from DDP's own logging data.

A step ends where the next iteration's activity begins: the next batch, or an optimizer stepping
a second time. Several optimizers stepped in one iteration (a GAN) are one step. Loops without an
optimizer end a step at each backward pass (flagged as a fallback boundary).

Everything is host wall time from ``time.perf_counter``: the probe never synchronises the GPU.
Every hook body is guarded; the first internal error disables the probe with one ``profilerd:``
line on stderr (logging, never ``warnings``) and the user's code carries on untouched.
"""

from __future__ import annotations

import functools
import glob
import logging
import math
import os
import socket
import sys
import threading
import time
import types
import weakref
from typing import Any, cast

from profilerd_probes import wire
from profilerd_probes.device import CudaTimer, DeviceClock, DeviceTimer, Marker, step_timing
from profilerd_probes.schema import GPU_TIMING_FIELDS
from profilerd_probes.signals import (
    COLLECTIVES,
    SYNC_METHODS,
    CollectiveTimer,
    DdpSplit,
    DeferredScalar,
    NcclDeviceTime,
    SyncCounter,
    arm_nccl_device_timing,
    bind_torch,
    compiling,
    hide_from_dynamo,
    observable_now,
    plain_tensor,
)
from profilerd_probes.transport import DatagramSender

PROBE_VERSION = "0.2.0"
# Steps at which the configuration snapshot is rebuilt and resent if it changed; later, every
# CONFIG_REFRESH_STEPS. The first steps are where loaders, optimizers and autocast appear.
CONFIG_STEPS = (1, 2, 3, 5, 10, 20, 50)
CONFIG_REFRESH_STEPS = 500
HELLO_REFRESH_S = 10.0
# The first steps go out one datagram each (a short or crashing run loses nothing it reached);
# later ones share a datagram for at most BATCH_MAX_AGE_S (what os._exit can lose).
EAGER_STEPS = 20
BATCH_MAX_AGE_S = 0.02
COMPILES_REFRESH_S = 0.5
# The loss is read at every step at first, so a non-finite loss is caught at the exact step
# where it appears, then at most every loss_every_s (and every step again while non-finite).
LOSS_EVERY_STEP_STEPS = 200
# A step whose device markers are not reached yet waits in the batch for at most this long (the
# host running further ahead than that is sent without device timing rather than held).
GPU_TIMING_WAIT_S = 1.0


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time; a broken stderr is not the user's problem."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            return


def _make_logger() -> logging.Logger:
    """Our own handler, no propagation: `-W error` and the user's logging setup never see us."""
    logger = logging.getLogger("profilerd_probes")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("profilerd: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    return logger


log = _make_logger()


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


class _Step:
    """What one step accumulates, from its start to its (possibly still tentative) end."""

    __slots__ = (
        "backward_s",
        "backward_seen",
        "comm_bytes",
        "comm_ops",
        "comm_s",
        "data_wait_s",
        "ddp_exposed",
        "emitted",
        "end",
        "fallback",
        "forward_s",
        "grad_norm",
        "loss",
        "loss_first_nonfinite",
        "mark_backward",
        "mark_end",
        "mark_optimizer",
        "mark_start",
        "optimizer_s",
        "optimizers",
        "record",
        "scale",
        "skipped",
        "start",
        "sync_count",
        "sync_s",
    )

    def __init__(self, start: float | None) -> None:
        self.start = start
        self.end: float | None = None
        self.data_wait_s = 0.0
        self.forward_s = 0.0
        self.backward_s = 0.0
        self.optimizer_s = 0.0
        self.comm_s = 0.0
        self.comm_ops = 0
        self.comm_bytes = 0
        self.sync_count = 0
        self.sync_s = 0.0
        self.backward_seen = False
        self.fallback = False
        self.skipped = False
        self.optimizers: set[int] = set()  # ids, not references: nothing outlives the user's objects
        self.loss: float | None = None
        self.loss_first_nonfinite = False
        self.grad_norm: float | None = None
        self.scale: float | None = None
        self.record: list[Any] | None = None  # the record's fields, once emitted and until sent
        self.emitted = False
        # Device markers (CUDA only) at the step's start, first backward, first optimizer step, end.
        self.mark_start: Marker | None = None
        self.mark_backward: Marker | None = None
        self.mark_optimizer: Marker | None = None
        self.mark_end: Marker | None = None
        # DDP: the host seconds moved from backward to exposed communication, and DDP's exposed
        # share of the backward pass, for redoing that split on the device clock.
        self.ddp_exposed = (0.0, 0.0)

    def absorb(self, later: _Step) -> None:
        """The activity after this step's tentative end belongs to the same iteration after all."""
        self.data_wait_s += later.data_wait_s
        self.forward_s += later.forward_s
        self.backward_s += later.backward_s
        self.optimizer_s += later.optimizer_s
        self.comm_s += later.comm_s
        self.comm_ops += later.comm_ops
        self.comm_bytes += later.comm_bytes
        self.sync_count += later.sync_count
        self.sync_s += later.sync_s
        self.backward_seen = self.backward_seen or later.backward_seen
        self.skipped = self.skipped or later.skipped
        self.optimizers |= later.optimizers
        for name in ("loss", "grad_norm", "scale"):
            if getattr(later, name) is not None:
                setattr(self, name, getattr(later, name))
        self.loss_first_nonfinite = self.loss_first_nonfinite or later.loss_first_nonfinite
        self.mark_backward = self.mark_backward or later.mark_backward
        self.mark_optimizer = self.mark_optimizer or later.mark_optimizer


# Positions of the fields in a step record (wire.STEP), by name: _AT.loss is where the loss goes.
_AT = types.SimpleNamespace(**wire.WIRE_STEP_INDEX)
_EMPTY_RECORD: list[Any] = [0] * len(wire.WIRE_STEP_NAMES)
# The fields a deferred read may fill in before the record is sent.
_FLAGS, _LOSS, _GRAD_NORM, _SCALE = _AT.flags, _AT.loss, _AT.grad_norm, _AT.scaler_scale
# The device timing fields, contiguous in the table, in step_timing's order.
_GPU_FIRST, _GPU_END = _AT.gpu_busy_s, _AT.host_ahead_s + 1
if wire.WIRE_STEP_NAMES[_GPU_FIRST:_GPU_END] != GPU_TIMING_FIELDS:
    raise RuntimeError("the device timing fields must be contiguous in the step field table")
_SIGNAL_FLAGS = {_LOSS: wire.FLAG_HAS_LOSS, _GRAD_NORM: wire.FLAG_HAS_GRAD_NORM, _SCALE: wire.FLAG_HAS_SCALE}
_SIGNAL_NAMES = {_LOSS: "loss", _GRAD_NORM: "grad_norm", _SCALE: "scale"}


class StepProbe:
    """Owns the patches of one process and the accumulators of the step in progress."""

    def __init__(self, sender: DatagramSender) -> None:
        import torch  # the probe is only installed once torch is importable

        self._torch = torch
        self.sender = sender
        self.ident = identity()
        self._pid, self._rank = self.ident["pid"], self.ident["rank"]
        self._started_unix_s = time.time()
        self._wall_offset = time.time() - time.perf_counter()  # perf_counter -> unix seconds
        self._batch: list[_Step] = []
        self._batch_started = time.perf_counter()
        self._compiles = 0
        self._compiles_read_at = -math.inf
        self._loss_read_at = -math.inf
        self._loss_nonfinite = False  # the last loss read was NaN or inf
        self._grad_norm_read_at = -math.inf
        self._said_goodbye = False
        self.train_thread = threading.main_thread().ident
        self.enabled = True
        self._handles: list[Any] = []
        self._patches: list[tuple[Any, str, Any]] = []
        self._hello_sent_at = -math.inf
        self._seq = 0
        self.step_index = 0
        self.optimizer_seen = False
        self.optimizer_exists = False  # set when any torch.optim.Optimizer is constructed
        self.optimizer_steps = 0
        self._in_loader = 0
        self._backward_depth = 0
        # The optimizers (by id) whose step is running, outermost first: one that steps another
        # inside its step (a wrapper like Lookahead) makes one span.
        self._stepping: list[int] = []
        self._optimizer_start = 0.0
        self._optimizer_inner = 0.0  # forward + backward + comm inside the optimizer span so far
        self._mark: float | None = None  # where the next forward window starts
        self._mark_comm = 0.0
        self._loader_config: dict[str, Any] = {}
        self._noted_iterator: weakref.ref[Any] | None = None
        self._stepped_ids: set[int] = set()  # optimizers (by id: no reference) that stepped
        self._optimizers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._last_optimizer_id = 0  # an id, not a reference: nothing outlives the user's objects
        self._autocast: dict[str, Any] = {}
        self._scaler_used = False
        self._last_config: dict[str, Any] | None = None
        self._config_due = False
        self._loss = DeferredScalar(torch)
        self._grad_norm = DeferredScalar(torch)
        self._scale = DeferredScalar(torch)
        self.syncs = SyncCounter()
        self.collectives = CollectiveTimer()
        self._ddp_split = DdpSplit()
        self._nccl = NcclDeviceTime(torch)
        self._ddp: weakref.ref[Any] | None = None
        self._lr: float | None = None
        # The gradient norm costs a pass over every gradient: sample it once a second at most
        # (0 disables); a clip_grad_norm_ call in the loop gives it for free every step.
        self._grad_norm_every_s = max(0.0, _env_float("PROFILERD_GRAD_NORM_EVERY_S", 1.0))
        self.loss_every_s = max(0.0, _env_float("PROFILERD_LOSS_EVERY_S", 0.05))
        self._scheduler: str | None = None
        self._clip_used = False
        self.current = _Step(None)  # the first step starts at the first observed activity
        self.ended: _Step | None = None  # a step whose end is known, until the next iteration begins
        # Device timing: set up when the first CUDA loss is seen (or a timer is given), never on CPU.
        self.device: DeviceClock | None = None
        self._device_timing = os.environ.get("PROFILERD_GPU_TIMING", "1") != "0"
        # First steps sent before their markers were reached: (step, number, end unix s,
        # step_s, comm_s), for the late device-timing message.
        self._late: list[tuple[_Step, int, float, float, float]] = []

    # ---- step boundaries ---------------------------------------------------------------
    def _absorb_counters(self, step: _Step) -> None:
        """Move what the sync and collective counters gathered into ``step``."""
        step.sync_count += self.syncs.count
        step.sync_s += self.syncs.seconds
        step.comm_s += self.collectives.seconds
        step.comm_ops += self.collectives.ops
        step.comm_bytes += self.collectives.bytes
        self.syncs.reset_step()
        self.collectives.reset_step()
        self._mark_comm = 0.0

    def _end_tentatively(self, now: float, *, fallback: bool = False, skipped: bool = False) -> None:
        """The current step may end here; whether it did is known when the next iteration begins.

        An optimizer step after another one of the same iteration (GAN) extends the ended step.
        """
        step = self.current
        self._absorb_counters(step)
        step.fallback = fallback
        step.skipped = step.skipped or skipped
        if self.ended is not None:
            self.ended.absorb(step)
            step = self.ended
        step.end = now
        self.ended = step
        self.current = _Step(now)
        if self.device is not None:
            step.mark_end = self.current.mark_start = self._device_mark(now)

    def _reopen(self) -> None:
        """The step that seemed to have ended goes on (its activity since then is its own)."""
        ended, self.ended = self.ended, None
        if ended is not None:
            self._absorb_counters(self.current)
            ended.absorb(self.current)
            ended.end = None
            ended.mark_end = None
            ended.fallback = False
            self.current = ended

    def _new_iteration(self, now: float) -> None:
        """The next iteration's activity (a batch, or an optimizer stepping again) has begun."""
        if self.ended is not None:
            ended, self.ended = self.ended, None
            self._emit(ended)
        if self.current.start is None:
            self.current.start = now

    def _emit(self, step: _Step) -> None:
        end = step.end if step.end is not None else time.perf_counter()
        start = step.start if step.start is not None else end
        self.step_index += 1
        config_step = self.step_index in CONFIG_STEPS or self.step_index % CONFIG_REFRESH_STEPS == 0
        self._config_due = self._config_due or config_step
        ddp = self._ddp() if self._ddp is not None else None
        ddp_read = ddp is not None and (self.step_index <= 12 or self.step_index % DdpSplit.READ_EVERY_STEPS == 0)
        observable = (self._config_due or ddp_read) and observable_now(self._torch)  # only when needed
        if config_step:
            self._refresh_rank()
        self.sender.ensure_connected()  # a reconnect must be followed by hello before the step
        self._maybe_hello()
        if self._config_due and observable:  # never inside a trace: the snapshot reads tensors
            self._config_due = False
            self._send_config()
        self._seq += 1
        self._poll_deferred()
        flags = wire.FLAG_FALLBACK_BOUNDARY if step.fallback else 0
        flags |= wire.FLAG_GRAD_SCALER_SKIPPED if step.skipped else 0
        flags |= wire.FLAG_LOSS_FIRST_NONFINITE if step.loss_first_nonfinite else 0
        flags |= wire.FLAG_HAS_LR if self._lr is not None else 0
        backward = step.backward_s
        comm = step.comm_s
        comm_total = comm
        if ddp is not None:
            if ddp_read and observable:
                self._ddp_split.refresh(ddp)
            # DDP's gradient all-reduce runs inside backward (issued from C++): its exposed part
            # is the share DDP's own sampled timings give, moved from backward to communication.
            exposed = backward * self._ddp_split.exposed_ratio
            comm_total += max(exposed, backward * self._ddp_split.comm_ratio)
            backward -= exposed
            comm += exposed
            step.ddp_exposed = (exposed, self._ddp_split.exposed_ratio)
        # NCCL ops run asynchronously on the device: their completed durations count as total
        # communication (overlapped or not) of the step in which they were read.
        comm_total += self._nccl.poll(end)
        if end - self._compiles_read_at > COMPILES_REFRESH_S:
            self._compiles_read_at = end
            self._compiles = _graph_compiles()
        record = _EMPTY_RECORD.copy()
        record[_AT.pid] = self._pid
        record[_AT.rank] = self._rank
        record[_AT.seq] = self._seq
        record[_AT.step] = self.step_index
        record[_AT.end_unix_s] = end + self._wall_offset
        record[_AT.step_s] = end - start
        record[_AT.data_wait_s] = step.data_wait_s
        record[_AT.forward_s] = step.forward_s
        record[_AT.backward_s] = backward
        record[_AT.optimizer_s] = step.optimizer_s
        record[_AT.comm_s] = comm
        record[_AT.sender_dropped] = self.sender.dropped_total
        record[_AT.flags] = flags
        record[_AT.lr] = self._lr if self._lr is not None else 0.0
        record[_AT.sync_count] = step.sync_count
        record[_AT.sync_s] = step.sync_s
        record[_AT.comm_total_s] = comm_total
        record[_AT.graph_compiles] = self._compiles
        record[_AT.comm_ops] = step.comm_ops
        record[_AT.comm_bytes] = step.comm_bytes
        step.record = record
        step.emitted = True
        for index, value in ((_LOSS, step.loss), (_GRAD_NORM, step.grad_norm), (_SCALE, step.scale)):
            if value is not None:
                self._fill(step, index, value)
        self._batch.append(step)
        if (
            self.step_index <= EAGER_STEPS
            or len(self._batch) >= wire.MAX_BATCH_RECORDS
            or end - self._batch_started >= BATCH_MAX_AGE_S
        ):
            self._send_batch(end)

    def _fill(self, step: _Step, index: int, value: float) -> None:
        record = step.record
        if record is not None:
            record[index] = value
            record[_FLAGS] |= _SIGNAL_FLAGS[index]

    def _send_batch(self, now: float, final: bool = False) -> None:
        """One datagram for the steps gathered so far: a syscall per batch, not per step.

        With device timing, the steps whose markers the device has not reached yet stay for a
        later batch (in order: the daemon counts losses by sequence number), for at most
        GPU_TIMING_WAIT_S; ``final`` sends everything as it stands.
        """
        if self.device is not None:
            try:
                self.device.poll()
            except Exception as exc:
                self._device_failed(exc)
        if self._late:
            self._send_late(now, final)
        if self._batch:
            records = []
            for step in self._batch:
                if not self._device_timing_settled(step, now, final):
                    break
                if step.record is not None:
                    records.append(wire.STEP.pack(*step.record))
                    step.record = None  # sent: a late deferred value goes elsewhere
            if records:
                self.sender.send(wire.encode_step_batch(records), records=len(records))
            self._batch = self._batch[len(records) :] if records else self._batch
        self._batch_started = now

    def _device_timing_settled(self, step: _Step, now: float, final: bool) -> bool:
        """Fill the step's device timing into its record if its markers are resolved; False
        while it may still be worth waiting for them.

        The first steps are never held (a crash must not lose them): one whose markers are not
        reached yet goes out at once, and its device timing follows in a late message.
        """
        record = step.record
        if record is None or step.mark_start is None or step.mark_end is None or self.device is None:
            return True
        if self._fill_device_timing(step, record):
            return True
        if record[_AT.step] <= EAGER_STEPS and not final:
            self._late.append((step, record[_AT.step], record[_AT.end_unix_s], record[_AT.step_s], record[_AT.comm_s]))
            return True
        end = step.end if step.end is not None else now
        return final or now - end > GPU_TIMING_WAIT_S or len(self._batch) >= wire.MAX_BATCH_RECORDS

    def _fill_device_timing(self, step: _Step, record: list[Any]) -> bool:
        """Write the step's device timing (fields, flags, exposed communication) into ``record``
        if its markers are resolved.

        DDP's exposed all-reduce is a wait of the stream within the backward markers: the
        markers count it busy. On the device clock it is idle, and exposed communication is
        DDP's exposed share of the backward pass as the device ran it, not as the host queued it.
        """
        assert step.mark_start is not None and step.mark_end is not None
        timing = step_timing(
            step.mark_start,
            step.mark_backward,
            step.mark_optimizer,
            step.mark_end,
            step.data_wait_s,
            record[_AT.step_s],
        )
        if timing is None:
            return False
        values, lower_bound = timing
        busy, forward, backward, optimizer, idle, idle_data_wait, ahead = values
        host_exposed, ratio = step.ddp_exposed
        if ratio > 0.0:
            wait = backward * ratio
            busy, backward = busy - wait, backward - wait
            idle = max(0.0, record[_AT.step_s] - busy)
            record[_AT.comm_s] += wait - host_exposed
        record[_GPU_FIRST:_GPU_END] = busy, forward, backward, optimizer, idle, idle_data_wait, ahead
        record[_FLAGS] |= wire.FLAG_HAS_GPU_TIMING | (wire.FLAG_GPU_BUSY_LOWER_BOUND if lower_bound else 0)
        step.mark_start = step.mark_end = None  # filled once
        return True

    def _send_late(self, now: float, final: bool) -> None:
        """Send the device timing of first steps that went out without it, keyed by step, once
        their markers are reached; give up on those older than GPU_TIMING_WAIT_S (or at exit)."""
        ready, waiting = [], []
        for late in self._late:
            step, number, end_unix_s, step_s, comm_s = late
            record = _EMPTY_RECORD.copy()
            record[_AT.step_s], record[_AT.comm_s] = step_s, comm_s
            if step.mark_start is not None and self._fill_device_timing(step, record):
                timing = record[_GPU_FIRST:_GPU_END]
                ready.append([number, end_unix_s, record[_AT.comm_s], record[_FLAGS], *timing])
            elif not final and step.end is not None and now - step.end <= GPU_TIMING_WAIT_S:
                waiting.append(late)
        self._late = waiting
        if ready:
            body = {"pid": self._pid, "rank": self._rank, "steps": ready}
            self.sender.send(wire.encode_json(wire.KIND_STEP_TIMING, body))

    # ---- device timing -----------------------------------------------------------------
    def use_device_timer(self, timer: DeviceTimer) -> None:
        """Time steps on this device (CUDA, or a simulated device in tests)."""
        self.device = DeviceClock(timer)

    def _device_mark(self, now: float) -> Marker | None:
        device = self.device
        if device is None:
            return None
        try:
            return device.mark(now, self.syncs.total_seconds)
        except Exception as exc:
            self._device_failed(exc)
            return None

    def _device_failed(self, exc: BaseException) -> None:
        """A CUDA error in the event path (a device switched mid-run, a broken context) turns
        device timing off; step timing goes on without it."""
        self.device = None
        self._device_timing = False
        self._late = []
        log.debug("device timing off after an error: %r", exc)

    def flush(self) -> None:
        """Emit the steps that have ended, and send what is batched (exit, uninstall)."""
        if self.ended is not None:
            ended, self.ended = self.ended, None
            tail = self.current
            if not tail.backward_seen:
                # What ran after the last step's end (its loss.item(), a final all_reduce) is its
                # own; the time is added only if a collective needs it, so that the program's
                # teardown does not lengthen the last step.
                self._absorb_counters(tail)
                if tail.comm_s:
                    ended.absorb(tail)
                    ended.end = time.perf_counter()
                else:
                    ended.sync_count += tail.sync_count
                    ended.sync_s += tail.sync_s
                self.current = _Step(None)
            self._emit(ended)
        if self.current.backward_seen:  # activity after the last optimizer step: a step of its own
            step, self.current = self.current, _Step(None)
            self._absorb_counters(step)
            step.fallback = True
            step.end = time.perf_counter()
            self._emit(step)
        self._send_batch(time.perf_counter(), final=True)

    def say_goodbye(self) -> None:
        """At interpreter exit: tells the daemon this process ended normally (once)."""
        if self.step_index > 0 and not self._said_goodbye:
            self._said_goodbye = True
            body = {"pid": self.ident["pid"], "kind": "exit", "steps": self.step_index}
            self.sender.send(wire.encode_json(wire.KIND_EVENT, body))

    # ---- deferred training signals ------------------------------------------------------
    def _signal_step(self) -> _Step:
        """The step a value read now belongs to: the one that just ended, if any."""
        return self.ended if self.ended is not None else self.current

    def _deliver(self, step: _Step, index: int, value: float) -> None:
        """A value read (maybe a step late, on CUDA) for ``step``: into it, or into its record if
        that is still waiting in the batch, or else into the current step."""
        name = _SIGNAL_NAMES[index]
        if index == _LOSS:
            finite = math.isfinite(value)
            if not finite and not self._loss_nonfinite:
                step.loss_first_nonfinite = True
                if step.record is not None:
                    step.record[_FLAGS] |= wire.FLAG_LOSS_FIRST_NONFINITE
            self._loss_nonfinite = not finite
        if step.record is not None:
            self._fill(step, index, value)
        elif not step.emitted:
            setattr(step, name, value)
        elif getattr(self._signal_step(), name) is None:  # its record is sent: the next one
            setattr(self._signal_step(), name, value)

    def _capture(self, scalar: DeferredScalar, tensor: Any, index: int, step: _Step) -> None:
        scalar.capture(tensor, lambda value: self._deliver(step, index, value))

    def _poll_deferred(self) -> None:
        self._loss.poll()
        self._grad_norm.poll()
        self._scale.poll()

    def _loss_read_due(self, now: float) -> bool:
        step = self.current
        if step.loss is not None or self._loss.pending:
            return False
        return (
            self.step_index < LOSS_EVERY_STEP_STEPS
            or self._loss_nonfinite
            or now - self._loss_read_at >= self.loss_every_s
        )

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
            # The user's FLOPs per step of this rank, for the MFU estimate (None: not given).
            "flops_per_step": _env_float("PROFILERD_FLOPS_PER_STEP", 0.0) or None,
        }
        optimizers = list(self._optimizers)[:4]
        config["optimizers"] = [_describe_optimizer(opt) for opt in optimizers]
        config["models"] = self._describe_models(optimizers)
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

    def _describe_models(self, optimizers: list[Any]) -> list[dict[str, Any]]:
        """The trained parameters, from the DDP wrapper if there is one, else from the optimizers'
        parameter groups: no module is hooked, so the model's own class is not known otherwise."""
        torch = self._torch
        compiled = _graph_compiles() > 0
        ddp = self._ddp() if self._ddp is not None else None
        if ddp is not None:
            description = _describe_parameters(torch, list(ddp.module.parameters()))
            description.update(
                {
                    "class": type(ddp).__name__,
                    "module_class": type(ddp.module).__name__,
                    "compiled": compiled,
                    "ddp": {
                        "bucket_cap_mb": round(ddp.bucket_bytes_cap / 2**20, 3),
                        "find_unused_parameters": bool(ddp.find_unused_parameters),
                        "static_graph": bool(ddp.static_graph),
                        "gradient_as_bucket_view": bool(ddp.gradient_as_bucket_view),
                    },
                }
            )
            return [description] if description["parameters"] > 0 else []
        seen: set[int] = set()
        params = []
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    if id(param) not in seen:
                        seen.add(id(param))
                        params.append(param)
        if not params:
            return []
        return [dict(_describe_parameters(torch, params), **{"class": None, "compiled": compiled})]

    # ---- hook bodies (hot path) ----------------------------------------------------------
    def on_loader_next_start(self, now: float) -> None:
        ended = self.ended
        if ended is not None:
            # The next batch is the clearest boundary: what ran since the step's tentative end
            # (logging, loss.item(), a hand-written update) is still that step's.
            self._absorb_counters(self.current)
            ended.absorb(self.current)
            ended.end = now
            self.current = _Step(now)
            if self.device is not None:
                ended.mark_end = self.current.mark_start = self._device_mark(now)
        self._new_iteration(now)
        if self.device is not None and self.current.mark_start is None:
            self.current.mark_start = self._device_mark(now)

    def on_loader_next_end(self, start: float, end: float) -> None:
        self.current.data_wait_s += end - start
        self._mark = end  # the batch has arrived: the forward pass can start
        self._mark_comm = self.collectives.seconds

    def on_backward_start(self, now: float, loss: Any) -> float:
        """Closes the forward window; returns when the backward pass itself starts."""
        ended = self.ended
        if ended is not None and ended.fallback:
            self._new_iteration(now)  # without an optimizer, each backward pass is a step
        step = self.current
        if step.start is None:
            step.start = self._mark if self._mark is not None else now
        if self._mark is not None:
            window = now - self._mark - (self.collectives.seconds - self._mark_comm)
            step.forward_s += max(0.0, window)
            self._mark = None
        torch = self._torch
        if self.device is None and self._device_timing and getattr(loss, "is_cuda", False):
            self.use_device_timer(CudaTimer(torch))
        if loss is not None and self._loss_read_due(now) and plain_tensor(torch, loss) and observable_now(torch):
            self._loss_read_at = now
            self._capture(self._loss, loss, _LOSS, step)
            now = time.perf_counter()
        if self.device is not None and step.mark_backward is None:
            step.mark_backward = self._device_mark(now)
        return now

    def on_backward_end(self, start: float, end: float) -> None:
        step = self.current
        step.backward_s += end - start
        step.backward_seen = True
        self._mark = end  # a second forward (accumulation, a closure evaluated again) starts here
        self._mark_comm = self.collectives.seconds
        if not self.optimizer_exists and not self._stepping:
            self._end_tentatively(end, fallback=True)

    def on_optimizer_pre(self, optimizer: Any) -> None:
        key = id(optimizer)
        if key in self._stepping:
            # Its last step never returned: an exception left it (a Ctrl-C's KeyboardInterrupt
            # the program caught, a closure's error), and the post hook never ran. That step is
            # over, and the steps it nested; its time goes into this one.
            del self._stepping[self._stepping.index(key) :]
            if not self._stepping:
                self.syncs.suspended = max(0, self.syncs.suspended - 1)
        self._stepping.append(key)
        if len(self._stepping) > 1:
            return  # an optimizer stepping another one inside its step: one span
        self.syncs.suspended += 1  # the optimizer's own .item() calls are not the user's
        now = time.perf_counter()
        ended = self.ended
        if ended is not None and ended.fallback:
            self._reopen()  # an optimizer created before install: the backward was not the end
        elif ended is not None and id(optimizer) in ended.optimizers:
            self._new_iteration(now)  # the same optimizer again: a new iteration
        elif (
            ended is not None
            and id(optimizer) not in self._stepped_ids
            and self.optimizer_steps > len(ended.optimizers)
        ):
            # A new optimizer after steps of others (the next trial of a sweep), not a second
            # optimizer of the loop's first iteration (a GAN's): a new iteration.
            self._new_iteration(now)
        self._stepped_ids.add(id(optimizer))
        self.optimizer_exists = True
        step = self.current
        if step.start is None:
            step.start = now
        step.optimizers.add(id(optimizer))
        if id(optimizer) != self._last_optimizer_id:  # one built before install (others are noted)
            self._last_optimizer_id = id(optimizer)
            self._optimizers.add(optimizer)
        if self._grad_norm_due(now, step) and observable_now(self._torch):
            self._grad_norm_read_at = now
            self._sample_grad_norm(optimizer, step)
            now = time.perf_counter()
        if self.device is not None and step.mark_optimizer is None:
            step.mark_optimizer = self._device_mark(now)
        self._optimizer_start = now
        self._optimizer_inner = step.forward_s + step.backward_s + self.collectives.seconds
        self._mark = now  # a closure's forward starts with the step
        self._mark_comm = self.collectives.seconds

    def on_optimizer_post(self, optimizer: Any) -> None:
        key = id(optimizer)
        if key in self._stepping:
            del self._stepping[self._stepping.index(key) :]
        elif self._stepping:
            self._stepping.pop()
        if self._stepping:
            return
        now = time.perf_counter()
        step = self.current
        inner = step.forward_s + step.backward_s + self.collectives.seconds - self._optimizer_inner
        step.optimizer_s += max(0.0, now - self._optimizer_start - inner)
        self.optimizer_seen = True
        self.optimizer_steps += 1
        self.syncs.suspended = max(0, self.syncs.suspended - 1)
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        self._lr = float(lr) if isinstance(lr, int | float) else self._lr
        self._mark = now  # without a DataLoader, the next forward starts when this step ends
        self._mark_comm = 0.0
        self._end_tentatively(now)

    def _grad_norm_due(self, now: float, step: _Step) -> bool:
        every = self._grad_norm_every_s
        if not every or step.grad_norm is not None or self._grad_norm.pending:
            return False
        return now - self._grad_norm_read_at >= every

    def _sample_grad_norm(self, optimizer: Any, step: _Step) -> None:
        """The global gradient norm, computed asynchronously on the gradients' device. Only for
        plain dense tensors on one device: a DTensor/FSDP shard could issue a collective."""
        torch = self._torch
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or not all(plain_tensor(torch, g, scalar=False) for g in grads):
            return
        if len({g.device for g in grads}) != 1:
            return
        with torch.no_grad():
            norms = torch._foreach_norm(grads)
            self._capture(self._grad_norm, torch.linalg.vector_norm(torch.stack(norms)), _GRAD_NORM, step)

    def on_clip_grad_norm(self, total_norm: Any) -> None:
        self._clip_used = True
        if plain_tensor(self._torch, total_norm) and observable_now(self._torch):
            self._capture(self._grad_norm, total_norm, _GRAD_NORM, self.current)
            self._grad_norm_read_at = time.perf_counter()

    def on_scaler_update(self, scaler: Any) -> None:
        self._scaler_used = True
        scale = getattr(scaler, "_scale", None)
        if scaler.is_enabled() and plain_tensor(self._torch, scale) and observable_now(self._torch):
            self._capture(self._scale, scale, _SCALE, self._signal_step())

    # ---- configuration captured on the way ---------------------------------------------
    def note_loader(self, iterator: Any) -> None:
        """The loader's settings, read from its iterator the first time it yields (no wrapper on
        the iterator's ``__init__``: torch's warnings there must keep pointing at their caller)."""
        noted = self._noted_iterator
        if noted is not None and noted() is iterator:
            return
        self._noted_iterator = weakref.ref(iterator)
        sampler = getattr(iterator, "_index_sampler", None)
        auto_collation = bool(getattr(iterator, "_auto_collation", False))
        self._loader_config = {
            "num_workers": int(iterator._num_workers),
            "pin_memory": bool(iterator._pin_memory),
            "prefetch_factor": getattr(iterator, "_prefetch_factor", None),
            "persistent_workers": bool(iterator._persistent_workers),
            "batch_size": getattr(sampler, "batch_size", None) if auto_collation else None,
            "dataset": type(iterator._dataset).__name__,
        }

    def note_autocast(self, autocast: Any) -> None:
        """Whether autocast is used; once seen on, it stays on (a loss module after the autocast
        block, or an eval pass without it, must not hide it)."""
        if self._autocast.get("enabled"):
            return
        enabled = bool(getattr(autocast, "_enabled", False))
        dtype = getattr(autocast, "fast_dtype", None)
        self._autocast = {
            "enabled": enabled,
            "dtype": str(dtype).replace("torch.", "") if enabled and dtype is not None else None,
        }

    def note_optimizer(self, optimizer: Any) -> None:
        self.optimizer_exists = True
        self._optimizers.add(optimizer)
        if self.current.start is None and self._mark is None:
            self._mark = time.perf_counter()  # the first forward pass comes after the optimizer

    def note_ddp(self, ddp: Any) -> None:
        self._ddp = weakref.ref(ddp)

    # ---- install / uninstall -----------------------------------------------------------
    def install(self) -> None:
        torch = self._torch
        import torch.optim.optimizer as optim_mod
        from torch.utils.data import dataloader as dl

        bind_torch(torch)
        try:
            arm_nccl_device_timing(torch, os.environ, bool(glob.glob("/dev/nvidia[0-9]*")))
        except Exception as exc:  # optional: NCCL device times stay unknown, the rest runs
            log.debug("cannot arm NCCL device timing: %r", exc)

        iterator = dl._BaseDataLoaderIter
        self._patch(iterator, "__next__", _make_loader_next(iterator.__next__))
        self._patch(torch.autograd, "backward", _make_backward(torch.autograd.backward, reads_loss=True))
        self._patch(torch.autograd, "grad", _make_backward(torch.autograd.grad, reads_loss=False))
        autocast_cls = torch.amp.autocast_mode.autocast
        self._patch(autocast_cls, "__enter__", _make_autocast_enter(autocast_cls.__enter__))
        scaler_cls = torch.amp.grad_scaler.GradScaler
        self._patch(scaler_cls, "update", _make_scaler_update(scaler_cls.update))
        self._patch(scaler_cls, "step", _make_scaler_step(scaler_cls.step))
        optimizer_cls = torch.optim.Optimizer
        self._patch(optimizer_cls, "__init__", _make_noting_init(optimizer_cls.__init__, "note_optimizer"))
        self._patch(torch.nn.utils, "clip_grad_norm_", _make_clip_grad_norm(torch.nn.utils.clip_grad_norm_))
        scheduler_cls = torch.optim.lr_scheduler.LRScheduler
        self._patch(scheduler_cls, "step", _make_scheduler_step(scheduler_cls.step))
        torch_dir = os.path.dirname(cast(str, torch.__file__)) + os.sep  # a regular package: never None
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            wrapped = self.syncs.wrap(name, original, lambda: self.train_thread, torch_dir)
            self._patch(torch.Tensor, name, wrapped)
        dist = torch.distributed
        if dist.is_available():
            for name in COLLECTIVES:
                if hasattr(dist, name):
                    self._patch(dist, name, self.collectives.wrap(getattr(dist, name), lambda: self.train_thread))
            ddp_cls = _safe(lambda: torch.nn.parallel.DistributedDataParallel)
            if ddp_cls is not None:
                self._patch(ddp_cls, "__init__", _make_noting_init(ddp_cls.__init__, "note_ddp"))
        self._handles.append(optim_mod.register_optimizer_step_pre_hook(_optimizer_pre))
        self._handles.append(optim_mod.register_optimizer_step_post_hook(_optimizer_post))
        package = sys.modules["profilerd_probes"]
        hide_from_dynamo(torch, [m for m in vars(package).values() if isinstance(m, types.ModuleType)] + [package])

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        """Replace an attribute; uninstall puts back exactly what was there (or nothing)."""
        own = getattr(owner, "__dict__", {})
        original = own.get(name, _INHERITED)
        self._patches.append((owner, name, original))
        setattr(owner, name, replacement)

    def uninstall(self) -> None:
        self.enabled = False
        for handle in self._handles:
            handle.remove()
        self._handles = []
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
        self._late = []
        self._started_unix_s = time.time()
        self.train_thread = threading.get_ident()
        self._seq = 0
        self.step_index = 0
        self._hello_sent_at = -math.inf
        self._said_goodbye = False
        self._loss_nonfinite = False
        self._backward_depth = 0
        self._stepping = []
        self._mark = None
        self._loss = DeferredScalar(self._torch)
        self._grad_norm = DeferredScalar(self._torch)
        self._scale = DeferredScalar(self._torch)
        self.syncs.reset_step()
        self.syncs.suspended = 0
        self.collectives.reset_step()
        self.current = _Step(None)
        self.ended = None
        self.device = None  # CUDA cannot be used in a forked child


# ---- module-level hook functions: they look up the active probe, so uninstall is total ----
_INHERITED = object()  # marks an attribute that was inherited, not set on the patched class
_active: StepProbe | None = None
_reported = False


def active() -> StepProbe | None:
    return _active


def set_active(probe: StepProbe | None) -> None:
    global _active
    _active = probe


def disable(exc: BaseException) -> None:
    """Turn the probe off after an internal error: one stderr line, patches removed, training
    goes on. Logging, not warnings: under `-W error` a warning would raise in the user's code."""
    global _active, _reported
    probe, _active = _active, None
    if not _reported:
        _reported = True
        log.warning("probes disabled after an internal error, training continues unprofiled: %r", exc)
    if probe is not None:
        try:
            probe.uninstall()
        except Exception as uninstall_exc:  # already failing; keep the user's code running
            log.debug("uninstall after failure also failed: %r", uninstall_exc)


def _make_loader_next(original: Any) -> Any:
    perf_counter = time.perf_counter
    get_ident = threading.get_ident

    @functools.wraps(original)
    def __next__(self: Any) -> Any:
        if compiling():
            return original(self)
        probe = _active
        if probe is None or get_ident() != probe.train_thread:
            return original(self)
        start = perf_counter()
        try:
            probe.on_loader_next_start(start)
            probe.note_loader(self)
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
            try:
                probe.on_loader_next_end(start, perf_counter())
            except Exception as exc:
                disable(exc)

    return __next__


def _tell(method: str, *args: Any) -> None:
    """``probe.<method>(*args)`` if a probe is active and nothing is being compiled; an error in
    it disables the probe, never reaches the caller."""
    probe = None if compiling() else _active
    if probe is not None:
        try:
            getattr(probe, method)(*args)
        except Exception as exc:
            disable(exc)


def _make_backward(original: Any, reads_loss: bool) -> Any:
    """``torch.autograd.backward`` (the loss is its first argument) or ``torch.autograd.grad``."""
    perf_counter = time.perf_counter
    get_ident = threading.get_ident

    @functools.wraps(original)
    def backward(*args: Any, **kwargs: Any) -> Any:
        if compiling():
            return original(*args, **kwargs)
        probe = _active
        if probe is None or probe._backward_depth or probe._in_loader or not_training(args):
            return original(*args, **kwargs)
        ident = get_ident()
        if ident != probe.train_thread:
            if probe.optimizer_seen or probe.step_index:
                return original(*args, **kwargs)
            probe.train_thread = ident  # the training loop runs on another thread
        start = perf_counter()
        try:
            loss = args[0] if reads_loss and args else None
            start = probe.on_backward_start(start, loss)
        except Exception as exc:
            disable(exc)
            probe = None
        if probe is None:
            return original(*args, **kwargs)
        probe._backward_depth += 1
        try:
            return original(*args, **kwargs)
        finally:
            probe._backward_depth -= 1
            try:
                probe.on_backward_end(start, perf_counter())
            except Exception as exc:
                disable(exc)

    return backward


def not_training(args: tuple[Any, ...]) -> bool:
    """A backward pass that is no training step: under a dispatch mode (FakeTensorMode, make_fx)
    or on fake tensors outside one (shape checks, tracing tools)."""
    torch = sys.modules["torch"]
    if torch._C._len_torch_dispatch_stack():
        return True
    fake = sys.modules.get("torch._subclasses.fake_tensor")
    return fake is not None and bool(args) and isinstance(args[0], fake.FakeTensor)


def _make_autocast_enter(original: Any) -> Any:
    @functools.wraps(original)
    def __enter__(self: Any) -> Any:
        _tell("note_autocast", self)
        return original(self)

    return __enter__


def _make_scaler_update(original: Any) -> Any:
    @functools.wraps(original)
    def update(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        _tell("on_scaler_update", self)
        return result

    return update


def _make_noting_init(original: Any, note: str) -> Any:
    """An ``__init__`` that, once the object is built, tells the probe (``probe.<note>(self)``),
    which keeps at most a weak reference to it."""

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _tell(note, self)

    return __init__


def _make_scaler_step(original: Any) -> Any:
    @functools.wraps(original)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if compiling():
            return original(self, *args, **kwargs)
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
                try:
                    probe._end_tentatively(time.perf_counter(), skipped=True)
                except Exception as exc:
                    disable(exc)

    return step


def _make_clip_grad_norm(original: Any) -> Any:
    @functools.wraps(original)
    def clip_grad_norm_(*args: Any, **kwargs: Any) -> Any:
        total_norm = original(*args, **kwargs)
        probe = None if compiling() else _active
        if probe is not None and threading.get_ident() == probe.train_thread:
            try:
                probe.on_clip_grad_norm(total_norm)
            except Exception as exc:
                disable(exc)
        return total_norm

    return clip_grad_norm_


def _make_scheduler_step(original: Any) -> Any:
    @functools.wraps(original)
    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        probe = None if compiling() else _active
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
    probe = None if compiling() else _active
    if probe is not None and threading.get_ident() == probe.train_thread:
        try:
            probe.on_optimizer_pre(optimizer)
        except Exception as exc:
            disable(exc)


def _optimizer_post(optimizer: Any, args: Any, kwargs: Any) -> None:
    probe = None if compiling() else _active
    if probe is not None and threading.get_ident() == probe.train_thread:
        try:
            probe.on_optimizer_post(optimizer)
        except Exception as exc:
            disable(exc)


# ---- descriptions for the configuration snapshot ------------------------------------------
def _safe(getter: Any) -> Any:
    try:
        return getter()
    except Exception:  # a missing attribute in some torch build is not worth failing for
        return None


def _describe_parameters(torch: Any, params: list[Any]) -> dict[str, Any]:
    """Counts, dtypes, device and conv layout from tensor metadata only (no tensor op)."""
    dtypes: dict[str, int] = {}
    count = 0
    trainable = 0
    device = None
    conv_weights = []
    for param in params:
        n = param.numel()
        count += n
        if param.requires_grad:
            trainable += n
        key = str(param.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + n
        device = device or str(param.device.type)
        if param.dim() == 4 and plain_tensor(torch, param, scalar=False, subclasses=True):
            conv_weights.append(param)
    channels_last = None
    if conv_weights:  # 4-d parameters are convolution weights
        channels_last = all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    return {
        "parameters": count,
        "trainable_parameters": trainable,
        "parameter_dtypes": dtypes,
        "device": device,
        "has_conv2d": bool(conv_weights),
        "channels_last": channels_last,
    }


def _describe_optimizer(optimizer: Any) -> dict[str, Any]:
    defaults = getattr(optimizer, "defaults", {})
    wanted = ("lr", "momentum", "weight_decay", "betas", "eps", "foreach", "fused", "nesterov")
    hyper = {k: defaults[k] for k in wanted if k in defaults}
    lr = hyper.get("lr")
    if lr is not None and not isinstance(lr, int | float):  # a tensor learning rate: CPU only, no sync
        cpu = getattr(getattr(lr, "device", None), "type", None) == "cpu"
        item = sys.modules["torch"]._C.TensorBase.item  # unpatched: not counted as the user's sync
        hyper["lr"] = _safe(lambda: float(item(lr))) if cpu else None
    params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return {"class": type(optimizer).__name__, "hyperparameters": hyper, "parameters": params}
