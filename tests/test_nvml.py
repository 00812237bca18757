"""The NVML backend, its Prometheus families and `profilerd doctor`, against a simulated driver.

The simulated libnvidia-ml.so.1 (profilerd/gpu/simnvml) is C compiled here and loaded by the real
nvidia-ml-py bindings, so struct layouts, symbol lookup (FunctionNotFound) and error codes go
through the same code paths as on a GPU machine.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from profilerd.doctor import render_doctor
from profilerd.exporters.gpu_metrics import (
    CLOCK_EVENT_REASONS,
    describe_gpu_metric_families,
    gpu_metric_families,
)
from profilerd.gpu import NoGpuBackend, nvml
from profilerd.gpu.simnvml import GIB, MIB, OLDER_GPU, Scenario, SimControl, build_library, uuid_for
from profilerd.model import GpuEvent, GpuProcess, GpuSample

REPO = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0

# ------------------------------------------------------------------------------------ fixtures


@dataclass(frozen=True)
class SimLibs:
    full: Path
    old: Path


@pytest.fixture(scope="session")
def sim_libs(tmp_path_factory: pytest.TempPathFactory) -> SimLibs:
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler (cc) to build the simulated NVML library")
    root = tmp_path_factory.mktemp("simnvml")
    return SimLibs(
        full=build_library(root / "full"),
        old=build_library(root / "old", old_driver=True),
    )


@dataclass
class Opened:
    backend: Any
    control: SimControl
    scenario: Scenario


OpenSim = Callable[..., Opened]


@pytest.fixture
def open_sim(sim_libs: SimLibs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenSim]:
    """Open the NVML backend on a scenario; every backend is closed (and NVML shut down) after."""
    opened: list[Opened] = []

    def _open(scenario: Scenario, *, old_driver: bool = False, **kwargs: Any) -> Opened:
        library = sim_libs.old if old_driver else sim_libs.full
        path = scenario.write(tmp_path / f"scenario{len(opened)}.txt")
        monkeypatch.setenv("SIMNVML_SCENARIO", str(path))
        kwargs.setdefault("event_timeout_ms", 20)
        backend = nvml.open_backend(library, **kwargs)
        result = Opened(backend, SimControl(library), scenario)
        opened.append(result)
        return result

    yield _open
    for item in reversed(opened):
        item.backend.close()
    for item in opened:
        assert item.control.init_count() == 0, "NVML was not shut down by close()"


def metrics_text(samples: list[GpuSample], events: dict[tuple[int, str], int] | None = None) -> str:
    class _Collector:
        def collect(self) -> list[Any]:
            return gpu_metric_families(samples, events)

    registry = CollectorRegistry()
    registry.register(_Collector())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def series(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample in an exposition, keyed by (name, sorted labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def names(text: str) -> set[str]:
    return {name for name, _ in series(text)}


def wait_for(predicate: Callable[[], Any], timeout_s: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


# ------------------------------------------------------------------------------------ devices


def test_zero_gpus_is_no_gpu_mode_and_shuts_nvml_down(open_sim: OpenSim) -> None:
    opened = open_sim(Scenario.of(0))
    backend = opened.backend
    assert isinstance(backend, NoGpuBackend)
    assert not backend.available
    assert "lists no GPUs" in (backend.unavailable_reason or "")
    assert "570.124.06" in (backend.unavailable_reason or "")
    assert opened.control.init_count() == 0
    assert backend.sample(T0) == []


def test_one_gpu_reads_every_field_in_base_units(open_sim: OpenSim) -> None:
    scenario = Scenario.of(1)
    backend = open_sim(scenario).backend
    assert isinstance(backend, nvml.NvmlBackend)
    gpu = scenario.gpu(0)

    (first,) = backend.sample(T0)
    assert (first.index, first.uuid, first.name) == (0, uuid_for(0), "NVIDIA H100 80GB HBM3")
    assert first.lost is False
    assert first.utilization_gpu_ratio == pytest.approx(0.87)
    assert first.utilization_memory_ratio == pytest.approx(0.42)
    assert first.memory_used_bytes == gpu["mem_used"]
    assert first.memory_total_bytes == 80 * GIB
    assert first.memory_reserved_bytes == 512 * MIB
    assert first.power_watts == pytest.approx(312.5)
    assert first.power_limit_watts == pytest.approx(700.0)
    assert first.temperature_celsius == 61.0
    assert first.memory_temperature_celsius == 70.0
    assert first.sm_clock_hertz == pytest.approx(1755e6)
    assert first.sm_clock_max_hertz == pytest.approx(1980e6)
    assert first.memory_clock_hertz == pytest.approx(2619e6)
    assert first.memory_clock_max_hertz == pytest.approx(2619e6)
    assert first.clock_event_reasons == ("sw_power_cap", "sw_thermal")
    assert (first.ecc_corrected_total, first.ecc_uncorrected_total) == (3, 0)
    assert first.remapped_rows_total == 3
    assert first.extra["remapped_rows_pending"] is False
    assert first.mig_enabled is False
    # Rates need two readings: unavailable, not zero, on the first tick.
    assert first.power_average_watts is None
    assert first.pcie_tx_bytes_per_second is None
    assert first.nvlink_tx_bytes_per_second is None

    (second,) = backend.sample(T0 + 2.0)
    assert second.power_average_watts == pytest.approx(250.0 / 2)  # 250 J per read, 2 s apart
    assert second.pcie_tx_bytes_per_second == pytest.approx(3_000_000 / 2)
    assert second.pcie_rx_bytes_per_second == pytest.approx(5_000_000 / 2)
    # 18 links x 1000 KiB each, summed by NVML for scope UINT_MAX, over 2 s.
    assert second.nvlink_tx_bytes_per_second == pytest.approx(18 * 1000 * 1024 / 2)
    assert second.nvlink_rx_bytes_per_second == pytest.approx(18 * 2000 * 1024 / 2)
    assert backend.error_count == 0
    assert all(backend.capabilities()[0].values())


def test_eight_gpus_each_sampled_once_per_tick(open_sim: OpenSim) -> None:
    opened = open_sim(Scenario.of(8))
    backend = opened.backend
    samples = backend.sample(T0)
    assert [s.index for s in samples] == list(range(8))
    assert [s.uuid for s in samples] == [uuid_for(i) for i in range(8)]
    assert sorted(backend.capabilities()) == list(range(8))
    before = [opened.control.device_calls(i) for i in range(8)]
    backend.sample(T0 + 1)
    per_tick = [opened.control.device_calls(i) - before[i] for i in range(8)]
    assert len(set(per_tick)) == 1, per_tick  # the same work for every GPU
    assert len(metrics_text(samples).splitlines()) > 8 * 30


def test_gpm_ratios_on_hopper_with_samples_100ms_apart(open_sim: OpenSim) -> None:
    clock = [0.0]  # the backend's pacing clock, moved by hand; real sleeps satisfy the simulator
    opened = open_sim(Scenario.of(1), clock=lambda: clock[0])
    backend = opened.backend
    assert backend.capabilities()[0]["gpm"] is True
    time.sleep(0.12)
    clock[0] = 0.12
    (sample,) = backend.sample(T0)
    assert sample.sm_active_ratio == pytest.approx(0.64)
    assert sample.sm_occupancy_ratio == pytest.approx(0.335)
    assert sample.tensor_active_ratio == pytest.approx(0.25)
    assert sample.dram_active_ratio == pytest.approx(0.455)
    assert sample.fp16_active_ratio == pytest.approx(0.10)
    assert sample.fp32_active_ratio == pytest.approx(0.20)
    assert sample.fp64_active_ratio == pytest.approx(0.005)

    # Less than 100 ms later: no new GPM sample is taken, the last values are reported again.
    gets = opened.control.function_calls("nvmlGpmSampleGet")
    clock[0] = 0.19
    (again,) = backend.sample(T0 + 0.07)
    assert opened.control.function_calls("nvmlGpmSampleGet") == gets
    assert again.sm_active_ratio == pytest.approx(0.64)

    time.sleep(0.12)
    clock[0] = 0.24
    backend.sample(T0 + 0.12)
    assert opened.control.function_calls("nvmlGpmSampleGet") == gets + 1
    # The simulator rejects samples < 100 ms apart or in the wrong order: none were.
    assert backend.error_count == 0


def test_gpm_windows_are_consecutive_samples(open_sim: OpenSim) -> None:
    # With drift, SM activity reveals which two samples were compared: each window must start
    # at the previous tick's sample, not at the one taken when the GPU was opened.
    backend = open_sim(Scenario(gpus=[{"gpm_drift": 1.0}])).backend
    readings = []
    for tick in range(3):
        time.sleep(0.11)
        readings.append(backend.sample(T0 + tick)[0].sm_active_ratio)
    assert readings == pytest.approx([0.64, 0.65, 0.66])


def test_older_gpu_without_gpm_omits_those_metrics(open_sim: OpenSim) -> None:
    backend = open_sim(Scenario(gpus=[OLDER_GPU])).backend
    caps = backend.capabilities()[0]
    assert caps["gpm"] is False
    assert caps["memory_temperature"] is False
    assert caps["nvlink_throughput"] is False
    assert caps["pcie_counters"] is True
    backend.sample(T0)
    (sample,) = backend.sample(T0 + 1)
    assert sample.name == "Tesla T4"
    assert sample.sm_active_ratio is None and sample.dram_active_ratio is None
    assert sample.memory_temperature_celsius is None
    assert sample.nvlink_tx_bytes_per_second is None
    assert sample.pcie_tx_bytes_per_second == pytest.approx(3_000_000)
    text = metrics_text([sample])
    assert "profilerd_gpu_sm_active_ratio" not in text
    assert "profilerd_gpu_memory_temperature_celsius" not in text
    assert "profilerd_gpu_nvlink_tx_bytes_per_second" not in text
    assert "profilerd_gpu_pcie_tx_bytes_per_second" in text
    assert backend.error_count == 0


def test_mig_mode_reports_instances_and_drops_parent_utilization(open_sim: OpenSim) -> None:
    backend = open_sim(Scenario(gpus=[{"mig": 1, "mig_instances": 2}])).backend
    caps = backend.capabilities()[0]
    assert caps["mig"] is True
    assert caps["utilization"] is False  # NotSupported on a MIG parent
    assert caps["gpm"] is False  # device-level GPM sampling refused in MIG mode
    (sample,) = backend.sample(T0)
    assert sample.mig_enabled is True
    assert sample.utilization_gpu_ratio is None
    instances = sample.extra["mig_instances"]
    assert [i["gpu_instance_id"] for i in instances] == [1, 2]
    assert instances[0]["uuid"].startswith("MIG-")
    assert instances[0]["memory_total_bytes"] == 10 * GIB
    assert instances[1]["memory_used_bytes"] == 1 * GIB + 1 * MIB
    found = series(metrics_text([sample]))
    key = (
        "profilerd_gpu_mig_instance_memory_total_bytes",
        (("gpu", "0"), ("gpu_instance", "2"), ("uuid", uuid_for(0))),
    )
    assert found[key] == 10 * GIB
    assert found[("profilerd_gpu_mig_enabled", (("gpu", "0"), ("uuid", uuid_for(0))))] == 1.0
    assert backend.error_count == 0


def test_not_supported_is_probed_once_and_left_out_of_metrics(open_sim: OpenSim) -> None:
    unsupported = "nvmlDeviceGetPowerUsage,nvmlDeviceGetTotalEccErrors,field:82"
    opened = open_sim(Scenario(gpus=[{"not_supported": unsupported}]))
    backend = opened.backend
    for tick in range(3):
        (sample,) = backend.sample(T0 + tick)
    assert sample.power_watts is None
    assert sample.ecc_corrected_total is None and sample.ecc_uncorrected_total is None
    assert sample.memory_temperature_celsius is None
    assert sample.temperature_celsius == 61.0
    assert sample.power_average_watts == pytest.approx(250.0)  # the energy counter still works
    # Asked once at open, never per tick.
    assert opened.control.function_calls("nvmlDeviceGetPowerUsage") == 1
    assert opened.control.function_calls("nvmlDeviceGetTotalEccErrors") == 1
    caps = backend.capabilities()[0]
    assert (caps["power"], caps["ecc"], caps["memory_temperature"]) == (False, False, False)
    assert backend.error_count == 0
    text = metrics_text([sample])
    assert "profilerd_gpu_power_watts" not in text
    assert "profilerd_gpu_ecc_corrected_errors_total" not in text
    assert "profilerd_gpu_memory_temperature_celsius" not in text
    assert "profilerd_gpu_temperature_celsius" in text
    assert "NaN" not in text


def test_not_supported_discovered_while_sampling_is_cached_too(open_sim: OpenSim) -> None:
    opened = open_sim(Scenario.of(1))
    backend, control = opened.backend, opened.control
    assert backend.sample(T0)[0].power_watts == pytest.approx(312.5)
    control.set_not_supported(0, "nvmlDeviceGetPowerUsage")
    calls = control.function_calls("nvmlDeviceGetPowerUsage")
    for tick in range(1, 4):
        (sample,) = backend.sample(T0 + tick)
        assert sample.power_watts is None
    assert control.function_calls("nvmlDeviceGetPowerUsage") == calls + 1
    assert backend.capabilities()[0]["power"] is False
    assert backend.error_count == 0


def test_old_driver_missing_symbols_fall_back_or_are_omitted(open_sim: OpenSim) -> None:
    scenario = Scenario.of(1)
    scenario.processes = [(0, os.getpid(), 3 * GIB, 10)]
    backend = open_sim(scenario, old_driver=True).backend
    caps = backend.capabilities()[0]
    # Symbols absent from the library: pynvml raises FunctionNotFound, cached as unsupported.
    assert (caps["gpm"], caps["remapped_rows"], caps["memory_reserved"]) == (False, False, False)
    # Older entry points take over where they exist.
    assert (caps["memory"], caps["temperature"], caps["clock_event_reasons"], caps["processes"]) == (
        True,
        True,
        True,
        True,
    )
    (sample,) = backend.sample(T0)
    gpu = scenario.gpu(0)
    assert sample.memory_used_bytes == gpu["mem_used"] + gpu["mem_reserved"]  # v1 counts reserved as used
    assert sample.memory_reserved_bytes is None
    assert sample.temperature_celsius == 61.0
    assert sample.clock_event_reasons == ("sw_power_cap", "sw_thermal")
    assert sample.remapped_rows_total is None
    assert sample.sm_active_ratio is None
    assert [p.used_memory_bytes for p in sample.processes] == [3 * GIB]
    assert backend.error_count == 0
    report = render_doctor(backend)
    assert re.search(r"^gpm\s+-\s", report, re.MULTILINE)
    assert re.search(r"^memory\s+yes\s", report, re.MULTILINE)


def test_pcie_comes_from_counters_and_a_wrapped_counter_gives_no_rate(open_sim: OpenSim) -> None:
    step = 0x6000_0000_0000_0000  # the 64-bit counter wraps on the third reading after open
    opened = open_sim(Scenario(gpus=[{"pcie_tx_step": step}]))
    backend = opened.backend
    rates = [backend.sample(T0 + t)[0].pcie_tx_bytes_per_second for t in range(4)]
    assert rates[0] is None  # first reading
    assert rates[1] is None  # wrapped: no negative or huge rate
    assert rates[2] == pytest.approx(float(step))
    assert opened.control.function_calls("nvmlDeviceGetPcieThroughput") == 0
    assert opened.control.function_calls("nvmlDeviceGetFieldValues") == 5  # probe + 4 ticks


# ------------------------------------------------------------------------------------ lost GPUs


def _events(backend: Any, kind: str) -> list[GpuEvent]:
    return [e for e in backend.drain_events() if e.kind == kind]


def test_gpu_lost_mid_run_then_recovered_with_backoff(open_sim: OpenSim) -> None:
    # GPU 0 answers 60 calls, then the next two calls say "GPU is lost", then it is back.
    scenario = Scenario(gpus=[{"lost_after_calls": 60, "lost_for_calls": 2}, {}])
    opened = open_sim(scenario)
    backend = opened.backend
    history: list[tuple[float, GpuSample, GpuSample]] = []
    events: list[GpuEvent] = []
    for tick in range(40):
        now = T0 + tick
        gpu0, gpu1 = backend.sample(now)
        history.append((now, gpu0, gpu1))
        events += backend.drain_events()
        if any(e.kind == "recovered" for e in events):
            break
    kinds = [e.kind for e in events]
    assert kinds == ["lost", "recovered"], kinds
    lost, recovered = events
    assert lost.index == recovered.index == 0
    # Lost mid-sample, one failed retry 1 s later, then success after a doubled 2 s backoff.
    assert recovered.ts_unix_s - lost.ts_unix_s == pytest.approx(3.0)
    lost_ticks = [now for now, gpu0, _ in history if gpu0.lost]
    assert lost_ticks == [lost.ts_unix_s + d for d in (0.0, 1.0, 2.0)]
    for _, gpu0, gpu1 in history:
        assert not gpu1.lost and gpu1.memory_total_bytes  # the other GPU is unaffected
        if gpu0.lost:
            assert gpu0.memory_used_bytes is None and gpu0.uuid == uuid_for(0)
    final = history[-1][1]
    assert not final.lost and final.utilization_gpu_ratio == pytest.approx(0.87)
    text = metrics_text([history[-2][1]], {(0, "lost"): 1})
    assert "profilerd_gpu_utilization_ratio" not in text
    assert series(text)[("profilerd_gpu_lost", (("gpu", "0"), ("uuid", uuid_for(0))))] == 1.0


def test_lost_gpu_is_not_polled_between_retries_and_backoff_is_capped(open_sim: OpenSim) -> None:
    opened = open_sim(Scenario.of(1), lost_backoff_initial_s=1.0, lost_backoff_max_s=8.0)
    backend, control = opened.backend, opened.control
    backend.sample(T0)
    control.set_lost(0, True)
    attempts: list[float] = []
    for tick in range(1, 60):
        before = control.device_calls(0)
        (sample,) = backend.sample(T0 + tick)
        assert sample.lost
        if control.device_calls(0) != before:
            attempts.append(T0 + tick)
    assert attempts[0] == T0 + 1  # the tick that found it lost
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[:4] == [1.0, 2.0, 4.0, 8.0]
    assert set(gaps[4:]) == {8.0}
    assert len(_events(backend, "lost")) == 1
    control.set_lost(0, False)
    for tick in range(60, 70):
        (sample,) = backend.sample(T0 + tick)
    assert not sample.lost
    assert len(_events(backend, "recovered")) == 1


def test_gpu_lost_at_open_is_listed_and_recovers_with_identity(open_sim: OpenSim) -> None:
    backend = open_sim(Scenario(gpus=[{"lost_after_calls": 0, "lost_for_calls": 1}])).backend
    assert [(d.index, d.uuid, d.lost) for d in backend.devices()] == [(0, "", True)]
    assert [e.kind for e in backend.drain_events()] == ["lost"]
    (sample,) = backend.sample(T0)  # retried at once
    assert not sample.lost and sample.uuid == uuid_for(0)
    assert sample.memory_total_bytes == 80 * GIB
    assert [e.kind for e in backend.drain_events()] == ["recovered"]


# ------------------------------------------------------------------------------------ no driver


def test_configured_library_missing_gives_a_clear_reason(tmp_path: Path) -> None:
    missing = tmp_path / "libnvidia-ml.so.1"
    backend = nvml.open_backend(missing)
    assert isinstance(backend, NoGpuBackend)
    assert str(missing) in (backend.unavailable_reason or "")
    assert "cannot load NVML library" in (backend.unavailable_reason or "")


def test_env_knob_reaches_nvml_through_the_sampler_factory(
    sim_libs: SimLibs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from profilerd.gpu import open_backend

    monkeypatch.setenv("SIMNVML_SCENARIO", str(Scenario.of(2).write(tmp_path / "s.txt")))
    monkeypatch.setenv(nvml.LIBRARY_ENV, str(sim_libs.full))
    backend = open_backend("auto")
    try:
        assert backend.available and backend.name == "nvml"
        assert len(backend.sample(T0)) == 2
    finally:
        backend.close()
    monkeypatch.setenv(nvml.LIBRARY_ENV, str(tmp_path / "nope.so"))
    assert "nope.so" in (open_backend("auto").unavailable_reason or "")


@pytest.mark.parametrize(
    ("code", "words"),
    [(9, "kernel driver is not loaded"), (18, "versions differ"), (999, "initialisation failed")],
)
def test_driver_failures_at_init_give_no_gpu_mode(open_sim: OpenSim, code: int, words: str) -> None:
    opened = open_sim(Scenario(gpus=[{}], init_error=code))
    assert isinstance(opened.backend, NoGpuBackend)
    reason = opened.backend.unavailable_reason or ""
    assert words in reason
    assert "\n" not in reason
    assert "GPUs: none (" in render_doctor(opened.backend)


def _system_nvml_present() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_system_nvml_present(), reason="a real NVIDIA driver is installed here")
def test_no_system_driver_library_after_a_simulated_one(open_sim: OpenSim, monkeypatch: pytest.MonkeyPatch) -> None:
    open_sim(Scenario.of(1)).backend.close()  # pynvml now holds the simulated library...
    monkeypatch.delenv(nvml.LIBRARY_ENV, raising=False)
    backend = nvml.open_backend()  # ...which must not leak into an unconfigured open
    assert isinstance(backend, NoGpuBackend)
    assert "libnvidia-ml.so.1 not found" in (backend.unavailable_reason or "")


# ------------------------------------------------------------------------------------ errors


def test_sample_never_raises_and_counts_failed_reads(open_sim: OpenSim) -> None:
    backend = open_sim(Scenario(gpus=[{"fail": "nvmlDeviceGetClockInfo:999"}])).backend
    start = backend.error_count
    assert start == 2  # both clock probes failed, and the metrics stay enabled for retries
    for tick in range(3):
        (sample,) = backend.sample(T0 + tick)
    assert sample.sm_clock_hertz is None and sample.memory_clock_hertz is None
    assert sample.sm_clock_max_hertz == pytest.approx(1980e6)
    assert sample.utilization_gpu_ratio == pytest.approx(0.87)
    assert backend.error_count == start + 6
    assert backend.error_counts()["sm_clock"] == 3


def test_gpu_refused_at_open_is_left_out_and_shown_by_doctor(open_sim: OpenSim) -> None:
    # NVML_ERROR_NO_PERMISSION (4): a container counts a GPU it may not open.
    backend = open_sim(Scenario(gpus=[{}, {"fail": "nvmlDeviceGetHandleByIndex_v2:4"}])).backend
    assert [d.index for d in backend.devices()] == [0]
    assert [s.index for s in backend.sample(T0)] == [0]
    assert "[1] not opened: Insufficient Permissions" in render_doctor(backend)


def test_no_gpu_mode_when_no_gpu_can_be_opened(open_sim: OpenSim) -> None:
    opened = open_sim(Scenario(gpus=[{"fail": "nvmlDeviceGetHandleByIndex_v2:4"}]))
    assert isinstance(opened.backend, NoGpuBackend)
    assert "no GPU could be opened ([0] Insufficient Permissions)" in (opened.backend.unavailable_reason or "")


def test_backends_share_one_nvml_init_and_the_last_close_shuts_it_down(open_sim: OpenSim) -> None:
    first = open_sim(Scenario.of(1))
    second = open_sim(Scenario.of(1))
    assert first.control.init_count() == 1
    first.backend.close()
    assert second.control.init_count() == 1
    assert len(second.backend.sample(T0)) == 1
    second.backend.close()
    assert second.control.init_count() == 0
    assert first.backend.sample(T0) == []  # closed backends sample nothing, and do not raise


# ------------------------------------------------------------------------------------ processes


def _fake_proc(root: Path, entries: dict[str, tuple[str, str | None]]) -> Path:
    """A /proc tree: pid -> (NSpid line values, pid-namespace link or None)."""
    for pid, (nspid, ns) in entries.items():
        (root / pid / "ns").mkdir(parents=True)
        (root / pid / "status").write_text(f"Name:\tpython\nTgid:\t{pid}\nNSpid:\t{nspid}\nVmRSS:\t1 kB\n")
        if ns is not None:
            (root / pid / "ns" / "pid").symlink_to(ns)
    return root


def test_process_memory_with_host_pids_mapped_through_nspid(open_sim: OpenSim, tmp_path: Path) -> None:
    ours, theirs = "pid:[4026532001]", "pid:[4026532999]"
    proc = _fake_proc(
        tmp_path / "proc",
        {
            "self": ("900\t1", ours),  # the daemon: in a container, one level down
            "4242": ("4242\t17", ours),  # a trainer in the daemon's container
            "4343": ("4343\t18", None),  # ns link unreadable: trusted by depth
            "5555": ("5555\t3", theirs),  # a trainer in another container
            "6666": ("6666", None),  # a host process
        },
    )
    scenario = Scenario.of(1)
    scenario.processes = [
        (0, 4242, 2 * GIB, 50),
        (0, 4343, 1 * GIB, 5),
        (0, 5555, 4 * GIB, 20),
        (0, 6666, 1 * GIB, 0),
        (0, 7777, 1 * GIB, 0),  # exited: no /proc entry
    ]
    backend = open_sim(scenario, proc_root=proc).backend
    (sample,) = backend.sample(T0)
    assert sample.processes == (
        GpuProcess(pid=17, used_memory_bytes=2 * GIB, sm_utilization_ratio=0.51),
        GpuProcess(pid=18, used_memory_bytes=1 * GIB, sm_utilization_ratio=0.06),
    )
    assert sample.extra["processes_outside_namespace"] == 3
    assert sample.extra["processes_outside_namespace_memory_bytes"] == 6 * GIB
    found = series(metrics_text([sample]))
    labels = (("gpu", "0"), ("pid", "17"), ("uuid", uuid_for(0)))
    assert found[("profilerd_gpu_process_memory_used_bytes", labels)] == 2 * GIB
    assert found[("profilerd_gpu_process_sm_utilization_ratio", labels)] == pytest.approx(0.51)
    assert not any(name == "profilerd_gpu_info" and dict(lbl).get("pid") for name, lbl in found)


def test_pid_lookup_is_reused_while_listed_and_redone_after_a_gap(open_sim: OpenSim, tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path / "proc", {"self": ("900\t1", None), "4242": ("4242\t17", None)})
    opened = open_sim(Scenario(gpus=[{}], processes=[(0, 4242, GIB, 10)]), proc_root=proc)
    backend, control = opened.backend, opened.control
    assert [p.pid for p in backend.sample(T0)[0].processes] == [17]
    # The host PID is reused by a new process in the daemon's namespace (pid 19)...
    (proc / "4242" / "status").write_text("Name:\tpython\nNSpid:\t4242\t19\n")
    # ...which cannot happen while the old one stays on the GPU, so no /proc read is needed.
    assert [p.pid for p in backend.sample(T0 + 1)[0].processes] == [17]
    control.move_process(4242, -1)
    assert backend.sample(T0 + 2)[0].processes == ()
    control.move_process(4242, 0)
    assert [p.pid for p in backend.sample(T0 + 3)[0].processes] == [19]


def test_pid_mapping_is_identity_in_the_root_namespace(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, {"self": ("100", None), "4242": ("4242\t17", None)})
    mapper = nvml.PidNamespaceMapper(proc)
    assert mapper.map(4242) == 4242
    assert mapper.map(1) is None


def test_process_utilization_not_found_means_no_new_sample(open_sim: OpenSim) -> None:
    # Two utilisation samples exist (one taken by the probe at open); afterwards NVML answers
    # NotFound for "nothing newer than the timestamp you gave".
    scenario = Scenario(gpus=[{"procutil_max_gens": 2}], processes=[(0, os.getpid(), GIB, 40)])
    backend = open_sim(scenario).backend
    (first,) = backend.sample(T0)
    assert first.processes[0].sm_utilization_ratio == pytest.approx(0.41)  # the newest of two
    (second,) = backend.sample(T0 + 1)
    assert second.processes[0].sm_utilization_ratio is None
    assert second.processes[0].used_memory_bytes == GIB
    assert backend.error_count == 0


# ------------------------------------------------------------------------------------ XID events


def test_xid_events_arrive_on_their_own_thread(open_sim: OpenSim) -> None:
    opened = open_sim(Scenario(gpus=[{}, {}], xids=[(0, 79, 30)]))
    backend = opened.backend
    assert all(caps["xid_events"] for caps in backend.capabilities().values())
    xids = wait_for(lambda: _events(backend, "xid"))
    assert [(e.index, e.detail) for e in xids] == [(0, "Xid 79: GPU has fallen off the bus")]
    opened.control.inject_xid(1, 31337)
    (later,) = wait_for(lambda: _events(backend, "xid"))
    assert (later.index, later.detail) == (1, "Xid 31337")
    assert backend._watcher is not None
    thread = backend._watcher._thread
    backend.close()
    assert not thread.is_alive()  # the wait inside has a timeout, so close() joins it rather than leak it


# ------------------------------------------------------------------------------------ exporter


def _sample(**fields: Any) -> GpuSample:
    return GpuSample(ts_unix_s=T0, index=fields.pop("index", 0), uuid="GPU-x", name="Sim GPU", **fields)


def test_exporter_omits_none_and_uses_base_units_and_total_suffix() -> None:
    sample = _sample(
        utilization_gpu_ratio=0.5,
        memory_used_bytes=10,
        ecc_corrected_total=4,
        power_watts=None,
        clock_event_reasons=("hw_slowdown",),
    )
    text = metrics_text([sample], {(0, "xid"): 2, (-1, "xid"): 1})
    found = series(text)
    gpu = (("gpu", "0"), ("uuid", "GPU-x"))
    assert found[("profilerd_gpu_info", (("gpu", "0"), ("name", "Sim GPU"), ("uuid", "GPU-x")))] == 1.0
    assert found[("profilerd_gpu_utilization_ratio", gpu)] == 0.5
    assert found[("profilerd_gpu_ecc_corrected_errors_total", gpu)] == 4
    assert found[("profilerd_gpu_lost", gpu)] == 0.0
    assert found[("profilerd_gpu_events_total", (("gpu", "0"), ("kind", "xid"), ("uuid", "GPU-x")))] == 2
    assert found[("profilerd_gpu_events_total", (("gpu", ""), ("kind", "xid"), ("uuid", "")))] == 1
    reasons = {dict(lbl)["reason"]: v for (name, lbl), v in found.items() if name == "profilerd_gpu_clock_event_reason"}
    assert reasons == {r: float(r == "hw_slowdown") for r in CLOCK_EVENT_REASONS}
    assert "profilerd_gpu_power_watts" not in text
    assert "profilerd_gpu_sm_active_ratio" not in text
    assert "NaN" not in text
    for name, labels in found:
        assert name.startswith("profilerd_gpu_")
        assert set(dict(labels)) <= {"gpu", "uuid", "name", "reason", "pid", "kind", "gpu_instance"}
        assert not re.search(r"_(mb|percent|mhz|mw)(_|$)", name)


def test_exporter_families_are_typed_and_described() -> None:
    described = {f.name: f.type for f in describe_gpu_metric_families()}
    assert described["profilerd_gpu"] == "info"
    assert described["profilerd_gpu_ecc_uncorrected_errors"] == "counter"
    assert described["profilerd_gpu_remapped_rows"] == "counter"
    assert described["profilerd_gpu_events"] == "counter"
    assert described["profilerd_gpu_power_watts"] == "gauge"
    assert all(t in ("gauge", "counter", "info") for t in described.values())
    assert gpu_metric_families([], None) == []


def test_exporter_reason_names_match_the_decoder() -> None:
    assert CLOCK_EVENT_REASONS == nvml.CLOCK_EVENT_REASON_NAMES


def test_exporter_ratios_stay_in_unit_range(open_sim: OpenSim) -> None:
    backend = open_sim(Scenario.of(1)).backend
    time.sleep(0.11)
    backend.sample(T0)
    samples = backend.sample(T0 + 1)
    for (name, _), value in series(metrics_text(samples)).items():
        if name.endswith("_ratio"):
            assert 0.0 <= value <= 1.0, name


# ------------------------------------------------------------------------------------ doctor


def test_doctor_shows_versions_and_capability_matrix(open_sim: OpenSim) -> None:
    backend = open_sim(Scenario(gpus=[{}, OLDER_GPU])).backend
    report = render_doctor(backend)
    assert "NVIDIA driver:          570.124.06" in report
    assert "NVML library:           12.570.124.06" in report
    assert "CUDA (driver API):      12.8" in report
    assert re.search(r"nvidia-ml-py bindings:\s+\d+\.\d+", report)
    assert f"[1] Tesla T4  {uuid_for(1)}" in report
    assert re.search(r"^gpm\s+yes\s+-\s", report, re.MULTILINE)
    assert re.search(r"^memory_temperature\s+yes\s+-\s", report, re.MULTILINE)
    for capability in nvml.CAPABILITIES:
        assert re.search(rf"^{capability}\s", report, re.MULTILINE), capability


def test_doctor_in_no_gpu_mode_gives_the_reason() -> None:
    report = render_doctor(NoGpuBackend("NVIDIA kernel driver is not loaded"))
    assert report.splitlines() == ["GPU backend: none", "GPUs: none (NVIDIA kernel driver is not loaded)"]


# ------------------------------------------------------------------------------------ layering


def test_only_profilerd_nvml_imports_pynvml() -> None:
    pattern = re.compile(r"^\s*(import\s+pynvml|from\s+pynvml\s+import)\b", re.MULTILINE)
    offenders = []
    for path in REPO.rglob("*.py"):
        parts = set(path.relative_to(REPO).parts)
        if parts & {".git", ".venv", "build", "dist"} or any(p.endswith(".egg-info") for p in parts):
            continue
        if pattern.search(path.read_text(errors="replace")):
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == ["profilerd/gpu/nvml.py"]


# ------------------------------------------------------------------------------------ real GPU


@pytest.mark.gpu
def test_real_nvml_samples_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(nvml.LIBRARY_ENV, raising=False)
    backend = nvml.open_backend(None)
    assert isinstance(backend, nvml.NvmlBackend), backend.unavailable_reason
    try:
        backend.sample(time.time())
        time.sleep(0.2)
        samples = backend.sample(time.time())
        assert samples and all(s.uuid.startswith("GPU-") for s in samples)
        assert all(s.memory_total_bytes for s in samples if not s.lost)
        assert all(s.power_average_watts is not None for s in samples if backend.capabilities()[s.index]["energy"])
        text = metrics_text(samples)
        assert "profilerd_gpu_memory_total_bytes" in text and "NaN" not in text
        assert f"GPUs: {len(samples)}" in render_doctor(backend)
    finally:
        backend.close()
