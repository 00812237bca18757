"""`profilerd doctor`: what the GPU backend can see, as plain text a user can paste in a bug report.

Works on any ``GpuBackend``: the NVML details (versions, capability matrix) are read only when
the backend has them, so no-GPU mode prints its one-line reason instead.
"""

from __future__ import annotations

from typing import Any

from profilerd.gpu import GpuBackend


def _describe_capabilities() -> dict[str, str]:
    # Imported late: profilerd.gpu.nvml imports pynvml, which a no-GPU install may lack.
    try:
        from profilerd.gpu.nvml import CAPABILITIES
    except ImportError:
        return {}
    return CAPABILITIES


def render_doctor(backend: GpuBackend) -> str:
    """A report of driver, NVML and binding versions and, per GPU, which metrics it supports."""
    lines = [f"GPU backend: {backend.name}"]
    if not backend.available:
        lines.append(f"GPUs: none ({backend.unavailable_reason or 'no reason given'})")
        return "\n".join(lines)

    version_fields = (
        ("NVIDIA driver", "driver_version"),
        ("CUDA (driver API)", "cuda_driver_version"),
        ("NVML library", "nvml_version"),
        ("nvidia-ml-py bindings", "binding_version"),
    )
    for label, attr in version_fields:
        lines.append(f"{label + ':':24}{getattr(backend, attr, None) or 'unknown'}")

    devices: list[Any] = list(getattr(backend, "devices", list)())
    lines.append(f"GPUs: {len(devices)}")
    for dev in devices:
        state = "  LOST" if dev.lost else ""
        lines.append(f"  [{dev.index}] {dev.name or '?'}  {dev.uuid or '?'}{state}")

    for index, why in sorted(getattr(backend, "unopened", {}).items()):
        lines.append(f"  [{index}] not opened: {why}")

    capabilities_fn = getattr(backend, "capabilities", None)
    matrix: dict[int, dict[str, bool]] = capabilities_fn() if callable(capabilities_fn) else {}
    if matrix:
        lines.append("")
        lines.extend(_matrix(matrix, _describe_capabilities()))

    if backend.error_count:
        lines.append("")
        lines.append(f"NVML read errors so far: {backend.error_count}")
    return "\n".join(lines)


def _matrix(matrix: dict[int, dict[str, bool]], descriptions: dict[str, str]) -> list[str]:
    """Capabilities down, GPUs across: 'yes' supported, '-' not (omitted from metrics)."""
    indices = sorted(matrix)
    names = list(descriptions) or sorted({cap for caps in matrix.values() for cap in caps})
    width = max(len(name) for name in names)
    header = f"{'capability':{width}}  " + " ".join(f"gpu{i:<3}" for i in indices) + "  feeds"
    lines = ["Capabilities (yes = supported, - = not supported, left out of metrics):", header]
    for name in names:
        cells = " ".join(f"{'yes' if matrix[i].get(name) else '-':6}" for i in indices)
        lines.append(f"{name:{width}}  {cells}  {descriptions.get(name, '')}".rstrip())
    return lines
