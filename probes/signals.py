"""Training signals read without adding GPU synchronisation.

- ``observable_now`` / ``plain_tensor`` decide when the probe may run a tensor op of its own:
  never while compiling, tracing, profiling, under a dispatch mode or a CUDA graph capture,
  and only on plain dense CPU/CUDA tensors.
- ``DeferredScalar`` reads a 0-d tensor (the loss, a gradient norm, GradScaler's scale): CPU
  values directly, CUDA values through a non-blocking copy into pinned memory that is read
  once its CUDA event has completed. The hot path never waits on the GPU.
- ``SyncCounter`` counts the calls in user code that force the host to wait for the device
  (``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``, ``float(t)``, ``print(t)``) and
  remembers where they are called from.
- ``CollectiveTimer`` times ``torch.distributed`` collectives called from Python, with a
  re-entry guard so one op calling another is counted once.
- ``DdpSplit`` splits DDP's backward time into compute and exposed gradient all-reduce from
  DDP's own sampled timing data.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Callable
from typing import Any

SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__repr__", "__format__")
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "gather",
    "scatter",
    "send",
    "recv",
)
MAX_SYNC_SITES = 64


def bind_torch(torch: Any) -> None:
    """Look up torch's compile/trace predicates once, not on every call."""
    global _is_compiling, _is_tracing
    _is_compiling = torch.compiler.is_compiling
    _is_tracing = torch._C._is_tracing


def _never() -> bool:
    return False


_is_compiling: Callable[[], bool] = _never  # torch's own predicates once bind_torch() has run
_is_tracing: Callable[[], bool] = _never


def compiling() -> bool:
    """torch.compile, torch.export or torch.jit.trace is running the user's code.

    Every wrapper checks this first and then only calls through, so the graph dynamo or the
    tracer records is the one it records without profilerd (dynamo folds it to True)."""
    return _is_compiling() or _is_tracing()


def hide_from_dynamo(torch: Any, modules: list[Any]) -> None:
    """Dynamo never compiles a frame of ours as a frame of its own.

    Code that runs eagerly inside a compiled region (after a graph break: ``loss.backward()``,
    ``.item()``) still goes through dynamo's frame hook, which would compile our wrappers, see
    ``compiling()`` true and record graph breaks the plain program does not have. Marking our
    code objects SKIP (not their callees: the user's code they call is treated as without us)
    keeps those frames eager; when dynamo *inlines* a wrapper it traces it as usual, and the
    wrapper only calls through.
    """
    eval_frame = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
    if eval_frame is None or not hasattr(eval_frame, "set_code_exec_strategy"):
        return
    action = eval_frame._FrameAction
    strategy = eval_frame._FrameExecStrategy(action.SKIP, action.DEFAULT)
    seen: set[types.CodeType] = set()

    def mark(code: types.CodeType) -> None:
        if code in seen:
            return
        seen.add(code)
        eval_frame.set_code_exec_strategy(code, strategy)
        for const in code.co_consts:  # nested functions, closures and lambdas
            if isinstance(const, types.CodeType):
                mark(const)

    def visit(value: Any, module: str) -> None:
        value = value.__func__ if isinstance(value, staticmethod | classmethod) else value
        if isinstance(value, property):
            for accessor in (value.fget, value.fset, value.fdel):
                if accessor is not None:
                    visit(accessor, module)
        elif isinstance(value, types.FunctionType) and value.__module__ == module:
            mark(value.__code__)
        elif isinstance(value, type) and value.__module__ == module:
            for member in vars(value).values():
                visit(member, module)

    for module in modules:
        for value in list(vars(module).values()):
            visit(value, module.__name__)


def observable_now(torch: Any) -> bool:
    """Whether the probe may run a tensor op of its own now without anyone noticing it.

    Not while compiling, exporting or tracing; not under a torch.profiler (the user's trace
    would gain our ops); not under a dispatch or torch-function mode (FakeTensorMode,
    FlopCounterMode, make_fx, a user's own mode: they would see our ops), except torch's
    default-device mode; not inside a torch.func transform; not while a CUDA graph is captured.
    """
    C = torch._C
    if compiling() or C._autograd._profiler_enabled() or C._len_torch_dispatch_stack():
        return False
    modes = C._len_torch_function_stack()
    if modes:
        from torch.utils._device import DeviceContext

        if any(not isinstance(C._get_function_stack_at(i), DeviceContext) for i in range(modes)):
            return False
    if C._functorch.peek_interpreter_stack() is not None:
        return False
    return not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def plain_tensor(torch: Any, value: Any, *, scalar: bool = True, subclasses: bool = False) -> bool:
    """A dense CPU/CUDA tensor of torch's own type (a one-element float one if ``scalar``).

    FakeTensor, DTensor and FSDP shards, functional and functorch wrappers, meta and sparse
    tensors are not: reading them can fail, trace, or issue a collective on some ranks only.
    ``subclasses`` admits nn.Parameter and other subclasses for metadata-only reads.
    """
    Tensor = torch.Tensor
    if subclasses:
        if not isinstance(value, Tensor) or type(value).__torch_dispatch__ is not Tensor.__torch_dispatch__:
            return False
    elif type(value) is not Tensor:
        return False
    if value.layout is not torch.strided or not (value.is_cpu or value.is_cuda):  # not meta, not sparse
        return False
    if scalar and (value.numel() != 1 or not value.is_floating_point()):
        return False
    return not (torch._C._functorch.is_functorch_wrapped_tensor(value) or torch._is_functional_tensor(value))


class DeferredScalar:
    """Reads 0-d tensors (the loss, a gradient norm, GradScaler's scale) without a device sync.

    CPU values are read at once. A CUDA value is copied without blocking into pinned memory, and
    delivered by a later ``poll()`` once its CUDA event has completed; at most ``DEPTH`` copies are
    in flight (a further capture is skipped rather than queued). The hot path never waits.
    """

    DEPTH = 4

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self._item = torch._C.TensorBase.item  # the unpatched method: our own reads are not user syncs
        self._pending: list[tuple[Any, Any, Callable[[float], None]]] = []
        self._free: list[Any] = []

    @property
    def pending(self) -> bool:
        """No room for another copy in flight."""
        return len(self._pending) >= self.DEPTH

    def capture(self, tensor: Any, deliver: Callable[[float], None]) -> None:
        """Read ``tensor`` (a one-element plain tensor) and call ``deliver`` with its value."""
        if tensor.is_cpu:
            deliver(float(self._item(tensor)))
            return
        if not tensor.is_cuda or self.pending:
            return
        torch = self._torch
        buffer = self._free.pop() if self._free else torch.empty((), dtype=torch.float64, pin_memory=True)
        with torch.no_grad():  # converted on the device, so the copy itself needs no host step
            buffer.copy_(tensor.detach().reshape(()).to(torch.float64), non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(tensor.device))
        self._pending.append((buffer, event, deliver))

    def poll(self) -> None:
        """Deliver the copies that have completed, oldest first."""
        while self._pending:
            buffer, event, deliver = self._pending[0]
            if not event.query():
                return
            self._pending.pop(0)
            value = float(self._item(buffer))
            self._free.append(buffer)
            deliver(value)


class SyncCounter:
    """Counts host-device synchronisation calls made by the training loop in one step."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.total_seconds = 0.0  # never reset: device timing takes differences of it
        self.sites: Counter[tuple[str, int, str]] = Counter()
        self.suspended = 0  # > 0 inside library code (optimizer step, GradScaler, DataLoader)
        self._local = threading.local()

    def reset_step(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def wrap(self, name: str, original: Any, train_thread: Any, library_dir: str) -> Any:
        """A Tensor method that counts calls made by user code on the training thread.

        Calls from inside torch itself (``library_dir``) are the library's business (GradScaler's
        inf check, DataLoader seeding) and are not counted.
        """
        counter = self
        perf_counter = time.perf_counter
        get_ident = threading.get_ident
        getframe = sys._getframe
        local = self._local

        @functools.wraps(original)
        def wrapper(tensor: Any, *args: Any, **kwargs: Any) -> Any:
            if compiling() or counter.suspended or get_ident() != train_thread() or getattr(local, "depth", 0):
                return original(tensor, *args, **kwargs)
            if name == "cpu" and tensor.device.type == "cpu":
                return original(tensor, *args, **kwargs)  # a no-op, not a sync
            frame = getframe(1)
            filename = frame.f_code.co_filename
            if filename.startswith(library_dir):
                return original(tensor, *args, **kwargs)
            local.depth = 1
            start = perf_counter()
            try:
                return original(tensor, *args, **kwargs)
            finally:
                spent = perf_counter() - start
                counter.seconds += spent
                counter.total_seconds += spent
                counter.count += 1
                local.depth = 0
                key = (filename, frame.f_lineno, name)
                if key in counter.sites or len(counter.sites) < MAX_SYNC_SITES:
                    counter.sites[key] += 1

        return wrapper

    def top_sites(self, n: int = 3) -> list[dict[str, Any]]:
        return [
            {"file": file, "line": line, "call": call, "count": count}
            for (file, line, call), count in self.sites.most_common(n)
        ]


class CollectiveTimer:
    """Host time, op count and bytes of torch.distributed collectives called from Python.

    Synchronous ops block the training thread, so their host time is exposed communication
    (for gloo it includes waiting for slower ranks). Async ops (async_op=True) are counted with
    their enqueue time only: their completion is not observed here.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.ops = 0
        self.bytes = 0
        self._local = threading.local()

    def reset_step(self) -> None:
        self.seconds = 0.0
        self.ops = 0
        self.bytes = 0

    def wrap(self, original: Any, train_thread: Any) -> Any:
        timer = self
        perf_counter = time.perf_counter
        get_ident = threading.get_ident
        local = self._local

        @functools.wraps(original)
        def collective(*args: Any, **kwargs: Any) -> Any:
            if compiling() or getattr(local, "depth", False) or get_ident() != train_thread():
                return original(*args, **kwargs)
            local.depth = 1
            start = perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.seconds += perf_counter() - start
                timer.ops += 1
                local.depth = 0
                if args:
                    timer.bytes += _payload_bytes(args[0])

        return collective


def _payload_bytes(value: Any) -> int:
    try:
        if hasattr(value, "element_size"):
            return int(value.numel() * value.element_size())
        if isinstance(value, list | tuple):
            return sum(int(t.numel() * t.element_size()) for t in value if hasattr(t, "element_size"))
    except (RuntimeError, TypeError, AttributeError):
        return 0
    return 0


class DdpSplit:
    """Splits a DDP rank's backward time into compute and exposed gradient communication.

    DDP records runtime stats on sampled iterations (the first ten, then every hundredth):
    backward compute start/end and gradient-communication start/end. The exposed part is the
    communication still running after the last gradient was computed; its share of the
    backward pass is applied to the backward time of later steps until the next sample.
    """

    READ_EVERY_STEPS = 10

    def __init__(self) -> None:
        self.exposed_ratio = 0.0  # of backward time
        self.comm_ratio = 0.0  # total comm time over backward time (may exceed 1 with overlap)
        self._iteration = -1
        self.samples = 0

    def refresh(self, ddp: Any) -> None:
        data = ddp._get_ddp_logging_data()
        iteration = int(data.get("iteration", -1))
        if iteration == self._iteration:
            return
        self._iteration = iteration
        start = data.get("backward_compute_time_start")
        compute_end = data.get("backward_compute_time_end")
        comm_end = data.get("backward_comm_time_end")
        comm = data.get("backward_comm_time")
        if not (start and compute_end and comm_end and comm):
            return
        total = max(compute_end, comm_end) - start
        if total <= 0:
            return
        self.exposed_ratio = min(1.0, max(0.0, comm_end - compute_end) / total)
        self.comm_ratio = max(0.0, comm / total)
        self.samples += 1


NCCL_TIMING_ENV = "PROFILERD_NCCL_TIMING"  # "1" from `profilerd run`; "0" turns it off
FLIGHT_RECORDER_ENTRIES = "2000"


def flight_recorder_variable(torch_version: str) -> str:
    """The environment variable that sizes torch's flight recorder in this torch version.

    torch 2.9 and later read TORCH_FR_BUFFER_SIZE and warn about the old NCCL-specific name;
    older versions read only the old name.
    """
    try:
        major, minor = (int(part) for part in torch_version.split("+")[0].split(".")[:2])
    except ValueError:
        return "TORCH_FR_BUFFER_SIZE"
    return "TORCH_FR_BUFFER_SIZE" if (major, minor) >= (2, 9) else "TORCH_NCCL_TRACE_BUFFER_SIZE"


def arm_nccl_device_timing(torch: Any, environ: Any, nvidia_devices: bool) -> str | None:
    """Ask torch for device-side NCCL durations, before any process group exists.

    Only where NCCL can run: a CUDA build of torch on a node with NVIDIA devices. Elsewhere the
    flight recorder would only record gloo collectives, which it cannot time, at a cost (and
    torch 2.13 can abort at exit in gloo jobs that have it on). A value the user set wins.
    Returns the variable set, or None.
    """
    if environ.get(NCCL_TIMING_ENV) != "1" or getattr(torch.version, "cuda", None) is None or not nvidia_devices:
        return None
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return None  # too late: the flight recorder reads its size once
    environ.setdefault("TORCH_NCCL_ENABLE_TIMING", "1")
    if "TORCH_FR_BUFFER_SIZE" in environ or "TORCH_NCCL_TRACE_BUFFER_SIZE" in environ:
        return None
    name = flight_recorder_variable(str(torch.__version__))
    environ[name] = FLIGHT_RECORDER_ENTRIES
    return name


class NcclDeviceTime:
    """Device-side durations of NCCL collectives from torch's flight recorder.

    Host timing of a NCCL op only measures the enqueue. With TORCH_NCCL_ENABLE_TIMING=1 (see
    ``arm_nccl_device_timing``) ProcessGroupNCCL records CUDA events around each collective,
    and the flight recorder reports a ``duration_ms`` once a collective has completed. Reading
    the dump is host-only: no sync. Any failure turns this reader off and leaves the rest of
    the probes running.
    """

    READ_EVERY_S = 1.0

    def __init__(self, torch: Any) -> None:
        self._torch = torch
        self.enabled = True
        self._last_record_id = -1
        self._read_at = -1.0
        self.error: str | None = None

    def poll(self, now: float) -> float:
        """Seconds of NCCL collective time completed since the last call (0.0 if unknown)."""
        if not self.enabled or now - self._read_at < self.READ_EVERY_S:
            return 0.0
        self._read_at = now
        try:
            dist = self._torch.distributed
            if not (dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"):
                return 0.0
            import pickle  # our own process's trace, produced by torch itself; nothing received

            dump = self._torch._C._distributed_c10d._dump_nccl_trace(True, False, False)
            entries = pickle.loads(dump).get("entries", [])
        except Exception as exc:  # an internal torch API: if it changes, just stop using it
            self.enabled = False
            self.error = f"{type(exc).__name__}: {exc}"
            return 0.0
        total_ms = 0.0
        for entry in entries:
            record_id = entry.get("record_id", -1)
            duration = entry.get("duration_ms")
            if record_id > self._last_record_id and duration is not None and entry.get("state") == "completed":
                total_ms += float(duration)
                self._last_record_id = max(self._last_record_id, record_id)
        return total_ms / 1000.0
