"""Model FLOPs utilisation: achieved FLOP/s of a user-supplied FLOPs-per-step figure over the
device's peak for the dtype in use. An estimate, omitted wherever one of its inputs is unknown.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from profilerd.model import GpuContext

# Dense (no structured sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets; fp32 is
# the non-tensor-core figure. The first pattern that matches the NVML device name wins, so the
# more specific names come first (GH200 before H200, L40S before L4, H100 PCIe before H100).
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"GH200", "GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H200.*NVL", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"H100.*NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"H100.*PCIE", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    (r"H100", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"L40S", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    (r"\bA10\b", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    (r"V100.*PCIE", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    (r"V100", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    (r"\bT4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),
)
_AUTOCAST_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
_PARAMETER_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class Mfu:
    """Achieved TFLOP/s per GPU and its share of the device's peak: an estimate."""

    flops_per_step: float
    achieved_tflops: float
    peak_tflops: float
    dtype: str
    device: str  # the peak table's entry
    gpu_name: str  # as NVML names it

    @property
    def ratio(self) -> float:
        return self.achieved_tflops / self.peak_tflops

    def describe(self) -> str:
        return (
            f"MFU ≈ {self.ratio:.0%} (estimate: {self.achieved_tflops:.1f} of {self.peak_tflops:g} "
            f"TFLOP/s {self.dtype} peak on {self.device})"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "estimate": True,
            "mfu": round(self.ratio, 4),
            "achieved_tflops": round(self.achieved_tflops, 3),
            "peak_tflops": self.peak_tflops,
            "dtype": self.dtype,
            "device": self.device,
            "gpu_name": self.gpu_name,
            "flops_per_step": self.flops_per_step,
        }


def peak_tflops(gpu_name: str, dtype: str) -> tuple[str, float] | None:
    """The table entry and its peak for an NVML device name and dtype; None when unknown."""
    upper = gpu_name.upper()
    for pattern, device, peaks in PEAK_TFLOPS:
        if re.search(pattern, upper):
            peak = peaks.get(dtype)
            return (device, peak) if peak else None
    return None


def dtype_in_use(config: dict[str, Any]) -> str | None:
    """The math the model's matmuls run in: the autocast dtype, else the parameters' dtype
    (fp32 as tf32 where TF32 matmuls are allowed). None for FP8 or anything mixed or unknown."""
    autocast = config.get("autocast") or {}
    if autocast.get("enabled"):
        return _AUTOCAST_DTYPES.get(str(autocast.get("dtype")))
    dtypes: set[str] = set()
    for model in config.get("models") or []:
        dtypes |= set(model.get("parameter_dtypes") or {})
    if len(dtypes) != 1:
        return None
    (dtype,) = dtypes
    if dtype == "float32":
        tf32 = config.get("tf32") or {}
        allowed = tf32.get("matmul") or tf32.get("float32_matmul_precision") in ("high", "medium")
        return "tf32" if allowed else "fp32"
    return _PARAMETER_DTYPES.get(dtype)


def flops_per_step(config: dict[str, Any]) -> float | None:
    """The user's figure (``PROFILERD_FLOPS_PER_STEP`` in the training job's environment, which
    the probes report as the config key ``flops_per_step``): FLOPs one rank computes per step."""
    value = config.get("flops_per_step")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def estimate_mfu(config: dict[str, Any] | None, gpu: GpuContext, step_time_mean_s: float) -> Mfu | None:
    """MFU from the mean step time; None unless the FLOPs, the GPU and the dtype are all known."""
    config = config or {}
    flops = flops_per_step(config)
    dtype = dtype_in_use(config)
    name = gpu.get("gpu_name")
    if flops is None or dtype is None or not isinstance(name, str) or step_time_mean_s <= 0:
        return None
    peak = peak_tflops(name, dtype)
    if peak is None:
        return None
    device, tflops = peak
    achieved = flops / step_time_mean_s / 1e12
    # Above the peak the FLOPs figure must be wrong (counted for all ranks, or for more than a
    # step): no estimate rather than a false one.
    return Mfu(flops, achieved, tflops, dtype, device, name) if achieved <= tflops else None
