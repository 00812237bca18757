"""Build and drive the simulated ``libnvidia-ml.so.1`` (simnvml.c) for tests and benchmarks.

The real nvidia-ml-py bindings run against the simulated library, so these tests check the
ctypes layouts and error paths that a pure-Python fake would hide. Python holds every default
value (``GPU_DEFAULTS``) and always writes them out, so a test can compute what it expects.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("simnvml.c")
GIB = 1024**3
MIB = 1024**2

GPU_DEFAULTS: dict[str, Any] = {
    "name": "NVIDIA H100 80GB HBM3",
    "gpm": 1,
    "gpm_min_interval_ms": 100,
    "mig": 0,
    "mig_instances": 0,
    "mig_mem_total": 10 * GIB,
    "mig_mem_used": 1 * GIB,
    "mem_total": 80 * GIB,
    "mem_used": 20 * GIB,
    "mem_reserved": 512 * MIB,
    "util_gpu": 87,
    "util_mem": 42,
    "power_mw": 312_500,
    "power_limit_mw": 700_000,
    "energy_step_mj": 250_000,
    "temp": 61,
    "mem_temp": 70,
    "sm_clock": 1755,
    "sm_clock_max": 1980,
    "mem_clock": 2619,
    "mem_clock_max": 2619,
    "clock_reasons": 0x4 | 0x20,  # sw_power_cap, sw_thermal
    "pcie_tx_step": 3_000_000,
    "pcie_rx_step": 5_000_000,
    "nvlink_links": 18,
    "nvlink_tx_step_kib": 1000,
    "nvlink_rx_step_kib": 2000,
    "ecc_corrected": 3,
    "ecc_uncorrected": 0,
    "remap_corr": 2,
    "remap_unc": 1,
    "remap_pending": 0,
    "remap_failure": 0,
    "gpm_sm_util": 64.0,
    "gpm_sm_occupancy": 33.5,
    "gpm_tensor": 25.0,
    "gpm_dram": 45.5,
    "gpm_fp16": 10.0,
    "gpm_fp32": 20.0,
    "gpm_fp64": 0.5,
    "gpm_drift": 0.0,
    "procutil_max_gens": 1000,
    "lost_after_calls": -1,
    "lost_for_calls": -1,
    "not_supported": "",
    "fail": "",
}

# An older data-centre GPU: no GPM, no NVLink counters, no memory temperature.
OLDER_GPU: dict[str, Any] = {
    "name": "Tesla T4",
    "gpm": 0,
    "mem_total": 16 * GIB,
    "mem_used": 2 * GIB,
    "nvlink_links": 0,
    "not_supported": "field:82",
}


def uuid_for(index: int) -> str:
    return f"GPU-{index:08x}-5151-4e56-8d4c-00000000000{index % 10}"


@dataclass
class Scenario:
    """What the simulated driver reports; ``gpus`` holds per-GPU overrides of GPU_DEFAULTS."""

    gpus: list[Mapping[str, Any]] = field(default_factory=list)
    driver_version: str = "570.124.06"
    nvml_version: str = "12.570.124.06"
    cuda_version: int = 12080
    init_error: int = 0
    processes: list[tuple[int, int, int, int]] = field(default_factory=list)  # gpu,pid,bytes,sm%
    xids: list[tuple[int, int, int]] = field(default_factory=list)  # gpu, xid, delay ms

    @classmethod
    def of(cls, count: int, **overrides: Any) -> Scenario:
        return cls(gpus=[dict(overrides) for _ in range(count)])

    def gpu(self, index: int) -> dict[str, Any]:
        """The full settings of one simulated GPU (defaults, then overrides)."""
        values = {**GPU_DEFAULTS, "uuid": uuid_for(index)}
        values.update(self.gpus[index])
        return values

    def write(self, path: Path) -> Path:
        lines = [
            f"driver_version={self.driver_version}",
            f"nvml_version={self.nvml_version}",
            f"cuda_version={self.cuda_version}",
            f"init_error={self.init_error}",
            f"gpu_count={len(self.gpus)}",
        ]
        for index in range(len(self.gpus)):
            lines += [f"gpu.{index}.{key}={value}" for key, value in self.gpu(index).items()]
        lines += [f"process={g}:{pid}:{mem}:{sm}" for g, pid, mem, sm in self.processes]
        lines += [f"xid={g}:{xid}:{delay}" for g, xid, delay in self.xids]
        path.write_text("\n".join(lines) + "\n")
        return path


def build_library(out_dir: Path, *, old_driver: bool = False) -> Path:
    """Compile simnvml.c into ``out_dir/libnvidia-ml.so.1`` with the machine's C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) found to build the simulated NVML library")
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "libnvidia-ml.so.1"
    cmd = [compiler, "-shared", "-fPIC", "-O2", "-Wall", "-o", str(target), str(SOURCE)]
    if old_driver:
        cmd.insert(1, "-DSIMNVML_OLD_DRIVER")
    subprocess.run([*cmd, "-lpthread"], check=True, capture_output=True, text=True)
    return target


class SimControl:
    """The simnvml_* test hooks of an already-loaded simulated library.

    dlopen() of the same path returns the same handle, so this sees the state that pynvml sees.
    """

    def __init__(self, library: Path) -> None:
        self._lib = ctypes.CDLL(str(library))
        self._lib.simnvml_device_calls.restype = ctypes.c_long
        self._lib.simnvml_function_calls.restype = ctypes.c_long
        self._lib.simnvml_function_calls.argtypes = [ctypes.c_char_p]
        self._lib.simnvml_inject_xid.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        self._lib.simnvml_set_not_supported.argtypes = [ctypes.c_int, ctypes.c_char_p]

    def set_lost(self, gpu: int, lost: bool) -> None:
        self._lib.simnvml_set_lost(gpu, int(lost))

    def set_not_supported(self, gpu: int, functions: str) -> None:
        """Replace the GPU's NotSupported list (comma-separated function names / field:ID)."""
        self._lib.simnvml_set_not_supported(gpu, functions.encode())

    def move_process(self, pid: int, gpu: int) -> None:
        """Put a simulated process on another GPU; -1 takes it off all of them."""
        self._lib.simnvml_move_process(pid, gpu)

    def device_calls(self, gpu: int) -> int:
        return int(self._lib.simnvml_device_calls(gpu))

    def function_calls(self, name: str) -> int:
        return int(self._lib.simnvml_function_calls(name.encode()))

    def inject_xid(self, gpu: int, xid: int) -> None:
        self._lib.simnvml_inject_xid(gpu, xid)

    def init_count(self) -> int:
        return int(self._lib.simnvml_init_count())
