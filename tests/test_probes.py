"""The probes as a training script sees them: each scenario is a process of its own that sends to
a datagram socket bound by the test, and every datagram is decoded with probes.wire.

Most scenarios are forked from a zygote that has imported torch once (see probe_helpers.Zygote:
`import torch` and the first optimizer cost 2-4 s per interpreter here); the ones about interpreter
start-up (sitecustomize, python -m, torchrun) run real interpreters. Nothing here installs a hook
in the pytest process.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from probe_helpers import (
    Receiver,
    Zygote,
    child_env,
    make_bootstrap_dir,
    parse_kv,
    run_python,
    short_socket_dir,
    write_script,
)

from profilerd_probes import wire
from profilerd_probes.transport import MAX_HELD_DATAGRAMS, RECONNECT_INTERVAL_S, DatagramSender
from tests.wire_helpers import step_datagram

# Shared by the training scripts: no `import probes`, so bootstrap scripts stay unmodified.
COMMON = """
import json, os, sys, threading, time
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

torch.set_num_threads(1)


def result(key, value):
    # one write() per line: ranks sharing stdout must not interleave their results
    sys.stdout.flush()
    os.write(1, f"RESULT {key}={json.dumps(value)}\\n".encode())


class SleepyDataset(Dataset):
    '''Samples of 8 features; each __getitem__ sleeps sleep_s, like slow decoding.'''

    def __init__(self, n, sleep_s=0.0):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)
        self.sleep_s = sleep_s

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self.x[i], self.y[i]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def hook_counts():
    mod = torch.nn.modules.module
    return len(mod._global_forward_pre_hooks) + len(mod._global_forward_hooks)
"""

STEP_TOL_S = 1e-6
# The flags that say how a step ended; the others only say which optional signals it carries.
BOUNDARY_FLAGS = wire.FLAG_FALLBACK_BOUNDARY | wire.FLAG_GRAD_SCALER_SKIPPED


def boundary(step: wire.StepMessage) -> int:
    return step.flags & BOUNDARY_FLAGS


@pytest.fixture
def sock_dir():
    directory = short_socket_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def receiver(sock_dir):
    with Receiver(sock_dir / "ingest.sock") as rx:
        yield rx


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def run_scenario(zygote, tmp_path: Path, rx: Receiver | None, body: str, *, env=None, warnings=(), check=True):
    """Run COMMON + body as train.py in a child of the zygote; returns (result, RESULT values).

    The receiver is closed afterwards (what is still queued is read first)."""
    script = write_script(tmp_path, COMMON + "\n" + body)
    proc = zygote.run(script, rx.path if rx is not None else None, env=env, warnings=warnings, check=check)
    if rx is not None:
        rx.close()
        assert rx.errors == [], f"undecodable datagrams: {rx.errors}"
    return proc, {k: json.loads(v) for k, v in parse_kv(proc.stdout).items()}


def assert_numbered(steps: list[wire.StepMessage], n: int) -> None:
    assert [s.step for s in steps] == list(range(1, n + 1))
    seqs = [s.seq for s in steps]
    assert seqs == list(range(seqs[0], seqs[0] + n)), f"gaps in seq: {seqs}"
    assert all(s.sender_dropped == 0 for s in steps)


# ---- a normal DataLoader + optimizer loop ------------------------------------------------------
N_STEPS = 6
BATCH = 2
SLEEP_S = 0.005  # per sample, so at least BATCH * SLEEP_S of data wait per step

BASIC = f"""
import profilerd_probes as probes
probes.install()
model = make_model().double()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loss_fn = nn.MSELoss()
loader = DataLoader(SleepyDataset({N_STEPS * BATCH}, {SLEEP_S}), batch_size={BATCH})
hooks, losses, grad_norms = [], [], []
for x, y in loader:
    hooks.append(hook_counts())
    opt.zero_grad()
    loss = loss_fn(model(x.double()), y.double())
    loss.backward()
    with torch.no_grad():
        grad_norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    opt.step()
    losses.append(loss.item())  # the one host sync of this loop
hooks.append(hook_counts())
result("pid", os.getpid())
result("params", sum(p.numel() for p in model.parameters()))
result("hooks", hooks)
result("losses", losses)
result("grad_norms", [float(torch.Tensor.__float__(g)) for g in grad_norms])
"""


@pytest.fixture(scope="module")
def basic_run(zygote, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("basic")
    sock_dir = short_socket_dir()
    rx = Receiver(sock_dir / "ingest.sock")
    env = {
        "PROFILERD_RUN_ID": "run-42",
        "PROFILERD_JOB_ID": "job-7",
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "PROFILERD_GRAD_NORM_EVERY_S": "0",  # 0 turns sampling off; see the dedicated test below
        "PROFILERD_LOSS_EVERY_S": "0",  # every step's loss, to compare exactly
        "PROFILERD_FLOPS_PER_STEP": "2.5e9",  # the user's figure for the MFU estimate
    }
    started = time.time()
    try:
        _, res = run_scenario(zygote, tmp, rx, BASIC, env=env)
    finally:
        rx.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    return rx, res, started, time.time()


def test_every_step_arrives_numbered_in_sequence(basic_run):
    rx, res, _, _ = basic_run
    steps = rx.steps()
    assert {s.pid for s in steps} == {res["pid"]}
    assert_numbered(steps, N_STEPS)


def test_step_phases_are_timed(basic_run):
    rx, _, started, ended = basic_run
    steps = rx.steps()
    assert len(steps) == N_STEPS
    for s in steps:
        assert s.rank == 3
        assert boundary(s) == 0
        assert s.data_wait_s >= BATCH * SLEEP_S
        assert s.forward_s > 0 and s.backward_s > 0 and s.optimizer_s > 0
        assert s.comm_s == 0
        phases = s.data_wait_s + s.forward_s + s.backward_s + s.optimizer_s + s.comm_s
        assert s.step_s + STEP_TOL_S >= phases
        assert started - 1 <= s.end_unix_s <= ended + 1
    ends = [s.end_unix_s for s in steps]
    assert ends == sorted(ends)


def test_hello_identifies_the_process_before_its_first_step(basic_run):
    rx, res, _, _ = basic_run
    kinds = [r.kind for r in rx.received]
    assert "hello" in kinds
    assert kinds.index("hello") < kinds.index("step")
    hello = rx.bodies("hello")[0]
    assert hello["pid"] == res["pid"]
    assert hello["run_id"] == "run-42"
    assert hello["job"] == "job-7"
    assert (hello["rank"], hello["local_rank"], hello["world_size"]) == (3, 1, 8)
    assert hello["argv"][0].endswith("train.py")


def test_config_describes_loader_optimizer_and_model(basic_run):
    rx, res, _, _ = basic_run
    configs = rx.bodies("config")
    assert configs, "no config message"
    kinds = [r.kind for r in rx.received]
    assert kinds.index("config") < kinds.index("step")
    config = configs[-1]
    assert config["pid"] == res["pid"]
    loader = config["dataloader"]
    assert (loader["num_workers"], loader["batch_size"], loader["pin_memory"]) == (0, BATCH, False)
    assert loader["dataset"] == "SleepyDataset"
    [optimizer] = config["optimizers"]
    assert optimizer["class"] == "SGD"
    assert optimizer["hyperparameters"]["lr"] == pytest.approx(0.05)
    assert optimizer["hyperparameters"]["momentum"] == pytest.approx(0.9)
    # The model is described from the optimizer's parameters: no module is hooked, so its class
    # is not known (only a DDP wrapper's is).
    [model] = config["models"]
    assert model["class"] is None and model["device"] == "cpu" and model["compiled"] is False
    assert model["parameters"] == res["params"] == 8 * 16 + 16 + 16 + 1
    assert model["parameter_dtypes"] == {"float64": res["params"]}
    assert config["autocast"]["enabled"] is False
    assert (config["rank"], config["world_size"]) == (3, 8)
    assert config["flops_per_step"] == 2.5e9


def test_exit_event_counts_the_steps(basic_run):
    rx, res, _, _ = basic_run
    events = rx.bodies("event")
    assert events == [{"pid": res["pid"], "kind": "exit", "steps": N_STEPS}]
    assert rx.received[-1].kind == "event"


def test_steps_carry_loss_lr_grad_norm_and_host_syncs(basic_run):
    rx, res, _, _ = basic_run
    steps = rx.steps()
    assert len(steps) == N_STEPS
    for i, s in enumerate(steps):
        assert s.flags & wire.FLAG_HAS_LOSS and s.loss == pytest.approx(res["losses"][i], rel=1e-9)
        assert s.flags & wire.FLAG_HAS_LR and s.lr == pytest.approx(0.05)
        assert not s.flags & wire.FLAG_HAS_SCALE
        assert not s.flags & wire.FLAG_HAS_GRAD_NORM  # sampling is off in this run
        assert s.sync_count == 1, "exactly the user's loss.item() per step"
        assert 0 <= s.sync_s <= s.step_s
    [site] = rx.bodies("config")[-1]["sync_sites"]
    assert site["file"].endswith("train.py") and site["call"] == "item"


def test_no_global_module_hooks_ever(basic_run):
    _, res, _, _ = basic_run
    hooks = res["hooks"]  # sampled at the start of each iteration, then after the loop
    assert hooks == [0] * (N_STEPS + 1)


# ---- autocast ----------------------------------------------------------------------------------
AUTOCAST_LOOP = """
import profilerd_probes as probes
probes.install()
{model}
opt = torch.optim.SGD(model.parameters(), lr=0.01)
loss_fn = nn.MSELoss()
for x, y in DataLoader(SleepyDataset(8), batch_size=2):
    opt.zero_grad()
{forward}
    loss.backward()
    opt.step()
"""


def _autocast_config(zygote, tmp_path, rx, model: str, forward: str) -> dict:
    run_scenario(zygote, tmp_path, rx, AUTOCAST_LOOP.format(model=model, forward=forward))
    configs = rx.bodies("config")
    assert configs and len(rx.steps()) == 4
    return configs[-1]["autocast"]


def test_autocast_around_forward_and_loss_is_reported(zygote, tmp_path, receiver):
    forward = """\
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(x), y)"""
    autocast = _autocast_config(zygote, tmp_path, receiver, "model = make_model()", forward)
    assert autocast == {"enabled": True, "dtype": "bfloat16"}


def test_autocast_decorating_forward_is_reported(zygote, tmp_path, receiver):
    model = """\
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_model()

    @torch.autocast("cpu", dtype=torch.bfloat16)
    def forward(self, x):
        return self.body(x)

model = Net()"""
    forward = """\
    loss = ((model(x).float() - y) ** 2).mean()"""
    autocast = _autocast_config(zygote, tmp_path, receiver, model, forward)
    assert autocast == {"enabled": True, "dtype": "bfloat16"}


def test_autocast_with_loss_module_outside_the_block_is_reported(zygote, tmp_path, receiver):
    forward = """\
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = loss_fn(out.float(), y)"""
    autocast = _autocast_config(zygote, tmp_path, receiver, "model = make_model()", forward)
    assert autocast == {"enabled": True, "dtype": "bfloat16"}


# ---- step boundaries without an optimizer or without a DataLoader ------------------------------
FALLBACK = f"""
import profilerd_probes as probes
mode = os.environ["MODE"]
probes.install()
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05) if mode == "optimizer_without_loader" else None
data = SleepyDataset({N_STEPS * BATCH})
if mode == "manual_updates_with_loader":
    batches = DataLoader(data, batch_size={BATCH})
else:
    batches = [(data.x[i:i + {BATCH}], data.y[i:i + {BATCH}]) for i in range(0, {N_STEPS * BATCH}, {BATCH})]
for x, y in batches:
    loss = ((model(x) - y) ** 2).mean()
    if opt is not None:
        opt.zero_grad()
        loss.backward()
        opt.step()
    else:
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.05 * p.grad
result("pid", os.getpid())
"""


@pytest.mark.parametrize(
    ("mode", "flags"),
    [
        ("manual_updates_with_loader", wire.FLAG_FALLBACK_BOUNDARY),
        ("optimizer_without_loader", 0),
        ("manual_updates_without_loader", wire.FLAG_FALLBACK_BOUNDARY),
    ],
)
def test_steps_arrive_without_optimizer_or_loader(zygote, tmp_path, receiver, mode, flags):
    _, res = run_scenario(zygote, tmp_path, receiver, FALLBACK, env={"MODE": mode})
    steps = receiver.steps(res["pid"])
    assert_numbered(steps, N_STEPS)
    for i, s in enumerate(steps):
        assert boundary(s) == flags
        # Without a DataLoader or an optimizer nothing marks where the very first forward began.
        assert s.forward_s > 0 or (i == 0 and mode == "manual_updates_without_loader")
        assert s.backward_s > 0
        assert (s.optimizer_s > 0) == (mode == "optimizer_without_loader")
        assert (s.data_wait_s > 0) == (mode == "manual_updates_with_loader")
        assert s.step_s + STEP_TOL_S >= s.data_wait_s + s.forward_s + s.backward_s + s.optimizer_s
    kinds = [r.kind for r in receiver.received]
    assert kinds.index("hello") < kinds.index("step")


# ---- gradient accumulation -------------------------------------------------------------------
ACCUMULATION = f"""
import profilerd_probes as probes
probes.install()
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
loss_fn = nn.MSELoss()
loader = DataLoader(SleepyDataset({4 * 4 * BATCH}, {SLEEP_S}), batch_size={BATCH})
for i, (x, y) in enumerate(loader):
    loss = loss_fn(model(x), y) / 4
    loss.backward()
    if (i + 1) % 4 == 0:
        opt.step()
        opt.zero_grad()
result("optimizer_steps", (i + 1) // 4)
"""


def test_gradient_accumulation_gives_one_step_per_optimizer_step(zygote, tmp_path, receiver):
    _, res = run_scenario(zygote, tmp_path, receiver, ACCUMULATION)
    steps = receiver.steps()
    assert res["optimizer_steps"] == 4
    assert_numbered(steps, 4)
    for s in steps:
        assert boundary(s) == 0
        assert s.data_wait_s >= 4 * BATCH * SLEEP_S  # four micro-batches' worth
        assert s.optimizer_s > 0


# ---- a transform module run by the DataLoader in the main process -------------------------------
TRANSFORM = f"""
import profilerd_probes as probes
probes.install()

class SlowAugment(nn.Module):
    '''torchvision's transforms are nn.Modules: with num_workers=0 they run inside __next__.'''
    def forward(self, x):
        time.sleep({SLEEP_S})
        return x

class Augmented(SleepyDataset):
    def __init__(self, n):
        super().__init__(n)
        self.augment = SlowAugment()
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return self.augment(x), y

model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for x, y in DataLoader(Augmented({N_STEPS * BATCH}), batch_size={BATCH}):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
"""


def test_transform_modules_in_the_loader_are_data_wait_not_forward(zygote, tmp_path, receiver):
    run_scenario(zygote, tmp_path, receiver, TRANSFORM)
    steps = receiver.steps()
    assert_numbered(steps, N_STEPS)
    # the model itself is tiny: forward is a fraction of one sample's augmentation (the median,
    # so that one step descheduled on a loaded machine does not decide it)
    assert statistics.median(s.forward_s for s in steps) < SLEEP_S / 2
    for s in steps:
        assert s.data_wait_s >= BATCH * SLEEP_S
        assert s.step_s + STEP_TOL_S >= s.data_wait_s + s.forward_s + s.backward_s + s.optimizer_s


# ---- a DataLoader drained by a prefetch thread -------------------------------------------------
PREFETCH = f"""
import queue
import profilerd_probes as probes
probes.install()
q = queue.Queue(maxsize=2)

def producer():
    for batch in DataLoader(SleepyDataset({N_STEPS * BATCH}, 0.01), batch_size={BATCH}):
        q.put(batch)
    q.put(None)

threading.Thread(target=producer, daemon=True).start()
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
while (batch := q.get()) is not None:
    x, y = batch
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
"""


def test_loader_in_prefetch_thread_is_not_main_loop_data_wait(zygote, tmp_path, receiver):
    run_scenario(zygote, tmp_path, receiver, PREFETCH)
    steps = receiver.steps()
    assert_numbered(steps, N_STEPS)
    for s in steps:
        # each batch takes 20 ms to load in the producer thread; none of it is DataLoader wait
        # on the training thread
        assert s.data_wait_s == 0.0
        assert s.forward_s > 0 and s.backward_s > 0 and s.optimizer_s > 0
        assert boundary(s) == 0


# ---- the daemon is absent ----------------------------------------------------------------------
ABSENT = """
import profilerd_probes as probes
if os.environ["INSTALL"] == "1":
    probes.install()
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
loader = DataLoader(SleepyDataset(1200), batch_size=4)
start = time.perf_counter()
for x, y in loader:
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
result("loop_s", time.perf_counter() - start)
result("installed", probes.installed())
with torch.no_grad():
    result("loss", ((model(loader.dataset.x) - loader.dataset.y) ** 2).mean().item())
"""


@pytest.mark.parametrize("absence", ["no_socket_file", "stale_socket_file"])
def test_absent_daemon_costs_nothing_visible(zygote, tmp_path, sock_dir, absence):
    socket_path = sock_dir / "ingest.sock"
    if absence == "stale_socket_file":  # a crashed daemon left its socket file behind
        Receiver(socket_path).close(unlink=False)
        assert socket_path.exists()
    runs: dict[str, list] = {"0": [], "1": []}
    for _ in range(2):  # alternate, and keep the faster of two, to tame a noisy machine
        for install in ("0", "1"):
            proc, res = run_scenario(zygote, tmp_path, None, ABSENT, env={"INSTALL": install}, warnings=["always"])
            assert proc.stderr == ""  # no warning, no traceback, nothing
            assert res["installed"] is (install == "1")
            runs[install].append(res)
    assert {r["loss"] for r in runs["0"] + runs["1"]} == {runs["0"][0]["loss"]}
    baseline = min(r["loop_s"] for r in runs["0"])
    probed = min(r["loop_s"] for r in runs["1"])
    assert probed < 2 * baseline + 0.05


# ---- the daemon restarts mid-run ---------------------------------------------------------------
RESTART = """
import profilerd_probes as probes
probes.install()
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
stop = os.environ["STOP_FILE"]
deadline = time.monotonic() + 20
while not os.path.exists(stop) and time.monotonic() < deadline:
    for x, y in DataLoader(SleepyDataset(16), batch_size=4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        time.sleep(0.005)
result("pid", os.getpid())
"""


@pytest.fixture(scope="module")
def restart_run(zygote, tmp_path_factory):
    """Receive some steps, stop the 'daemon' for 0.3 s, bind again at the same path."""
    tmp = tmp_path_factory.mktemp("restart")
    sock_dir = short_socket_dir()
    stop_file = tmp / "stop"
    script = write_script(tmp, COMMON + RESTART)
    old = Receiver(sock_dir / "ingest.sock")
    running = zygote.start(script, old.path, env={"STOP_FILE": str(stop_file)})
    new = None
    try:
        assert old.wait_for(lambda rs: sum(r.kind == "step" for r in rs) >= 5, timeout=15), "no steps before restart"
        old.close(unlink=False)  # the daemon dies; its socket file stays behind
        time.sleep(0.3)
        new = Receiver(old.path)  # the new daemon replaces the stale file
        rebound = time.monotonic()
        resumed = new.wait_for(lambda rs: any(r.kind == "step" for r in rs), timeout=2.0)
        resumed_after = time.monotonic() - rebound
        new.wait_for(lambda rs: sum(r.kind == "step" for r in rs) >= 3, timeout=3.0)
    finally:
        stop_file.touch()
        result = running.wait()
        old.close()
        if new is not None:
            new.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert new.errors == []
    return old, new, resumed, resumed_after, parse_kv(result.stdout)


def test_steps_resume_after_daemon_restart(restart_run):
    old, new, resumed, resumed_after, res = restart_run
    pid = int(res["pid"])
    assert resumed, "no step reached the restarted daemon within 2 s"
    assert resumed_after < 2.0
    before, after = old.steps(pid), new.steps(pid)
    assert before and after
    assert after[0].step > before[-1].step
    assert after[0].sender_dropped > 0  # the steps sent while it was down are counted as dropped
    steps = [s.step for s in after]
    assert steps == list(range(steps[0], steps[0] + len(steps)))


def test_restarted_daemon_gets_fresh_hello_and_config(restart_run):
    _, new, _, _, res = restart_run
    pid = int(res["pid"])
    assert new.bodies("hello", pid), "no hello after reconnection"
    assert new.bodies("config", pid), "the restarted daemon never learns the configuration"


def test_restarted_daemon_hears_hello_before_any_step(restart_run):
    _, new, _, _, res = restart_run
    kinds = [r.kind for r in new.received if r.pid == int(res["pid"])]
    assert kinds and kinds[0] == "hello", kinds[:5]


# ---- the probe's own failures never reach the user ---------------------------------------------
FAILURE = """
import warnings
import profilerd_probes as probes
import profilerd_probes as probes, profilerd_probes.core
from torch.utils.data import dataloader as dl

class Indexed(Dataset):
    def __len__(self):
        return 16
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(8, generator=g)
        return i, x, x.sum(dim=0, keepdim=True)

def train():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(Indexed(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    seen = []
    for epoch in range(2):
        for idx, x, y in loader:
            seen.extend(idx.tolist())
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
    return seen, [p.detach().clone() for p in model.parameters()]

original_next = dl._BaseDataLoaderIter.__next__
original_backward = torch.autograd.backward
ref_seen, ref_params = train()  # before the probes exist: the reference result

def boom(self, *args, **kwargs):
    raise RuntimeError("injected probe failure")

setattr(probes.core.StepProbe, os.environ["FAILING"], boom)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("error")  # as under `python -W error`
    assert probes.install()
    seen, params = train()
result("warnings", [f"{w.category.__name__}: {w.message}" for w in caught])
result("same_batches", seen == ref_seen)
result("same_params", all(torch.equal(a, b) for a, b in zip(params, ref_params)))
result("installed", probes.installed())
result("restored", dl._BaseDataLoaderIter.__next__ is original_next and torch.autograd.backward is original_backward)
result("hooks", hook_counts())
"""


@pytest.mark.parametrize("failing", ["_emit", "on_loader_next_end", "on_backward_start", "on_optimizer_post"])
def test_internal_failure_disables_probe_with_one_stderr_line(zygote, tmp_path, receiver, failing):
    proc, res = run_scenario(zygote, tmp_path, receiver, FAILURE, env={"FAILING": failing}, warnings=["error"])
    assert res["warnings"] == []  # no warning: under -W error it would raise in the user's code
    [line] = proc.stderr.splitlines()
    assert line.startswith("profilerd: probes disabled after an internal error")
    assert "injected probe failure" in line
    assert res["same_batches"] is True
    assert res["same_params"] is True
    assert res["installed"] is False
    assert res["restored"] is True
    assert res["hooks"] == 0
    assert "Traceback" not in proc.stderr
    assert receiver.received == []  # it failed in step 1, before anything was sent


USER_ERRORS = """
import profilerd_probes as probes
probes.install()

class DatasetError(Exception):
    pass

raised = []

class Flaky(Dataset):
    def __len__(self):
        return 12
    def __getitem__(self, i):
        if i == 6:
            exc = DatasetError(f"corrupt sample {i}")
            raised.append(exc)
            raise exc
        return torch.full((8,), float(i))

class Short(IterableDataset):
    def __iter__(self):
        yield from (torch.full((8,), float(i)) for i in range(5))

model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)

def step(x):
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()

it = iter(DataLoader(Flaky(), batch_size=2))
step(next(it))
step(next(it))
step(next(it))
try:
    next(it)  # batch [6, 7]
except DatasetError as exc:
    result("same_object", exc is raised[0])
    result("message", str(exc))
    result("context", repr(exc.__context__))
    result("cause", repr(exc.__cause__))
batches = 0
for x in DataLoader(Short(), batch_size=2):
    batches += 1
    step(x)
result("short_batches", batches)
it = iter(DataLoader(Short(), batch_size=5))
next(it)
for attempt in range(2):
    try:
        next(it)
    except StopIteration as exc:
        result(f"stop_{attempt}", repr(exc.value))
result("installed", probes.installed())
"""


def test_user_dataset_exceptions_propagate_unchanged(zygote, tmp_path, receiver):
    proc, res = run_scenario(zygote, tmp_path, receiver, USER_ERRORS)
    assert res["same_object"] is True
    assert res["message"] == "corrupt sample 6"
    assert res["context"] == "None" and res["cause"] == "None"
    assert res["short_batches"] == 3
    assert res["stop_0"] == res["stop_1"] == "None"
    assert res["installed"] is True  # a user's exception is not a probe failure
    assert "Warning" not in proc.stderr
    assert len(receiver.steps()) == 6


CONTEXT_ON_FAILURE = """
import profilerd_probes as probes, profilerd_probes.core

def boom(self, *args, **kwargs):
    raise RuntimeError("injected probe failure")

probes.core.StepProbe._emit = boom
probes.install()

class DatasetError(Exception):
    pass

class Flaky(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, i):
        if i >= 4:
            raise DatasetError(f"corrupt sample {i}")
        return torch.zeros(8)

model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
it = iter(DataLoader(Flaky(), batch_size=4))
model(next(it)).sum().backward()
opt.step()
try:
    next(it)  # emits step 1: the probe fails here, and so does the dataset
except DatasetError as exc:
    result("context", repr(exc.__context__))
"""


def test_probe_failure_is_not_chained_into_user_exceptions(zygote, tmp_path, receiver):
    _, res = run_scenario(zygote, tmp_path, receiver, CONTEXT_ON_FAILURE, warnings=["ignore"])
    assert res["context"] == "None"


# ---- uninstall and profile() -------------------------------------------------------------------
UNINSTALL = """
import types
import profilerd_probes as probes
import torch.optim.optimizer as optim_mod
from torch.utils.data import dataloader as dl

mod = torch.nn.modules.module
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
# Every namespace the probes might patch, as it was before install.
namespaces = {
    "Tensor": torch.Tensor,
    "TensorBase": torch._C.TensorBase,
    "BaseDataLoaderIter": dl._BaseDataLoaderIter,
    "SingleProcessDataLoaderIter": dl._SingleProcessDataLoaderIter,
    "DataLoader": DataLoader,
    "Module": nn.Module,
    "Optimizer": torch.optim.Optimizer,
    "SGD": torch.optim.SGD,
    "GradScaler": torch.amp.GradScaler,
    "LRScheduler": torch.optim.lr_scheduler.LRScheduler,
    "autocast": torch.amp.autocast_mode.autocast,
    "DistributedDataParallel": torch.nn.parallel.DistributedDataParallel,
    "torch": torch,
    "torch.autograd": torch.autograd,
    "torch.nn.utils": torch.nn.utils,
    "torch.nn.functional": torch.nn.functional,
    "torch.distributed": torch.distributed,
}
before = {name: dict(vars(ns)) for name, ns in namespaces.items()}

def changed():
    out = []
    for name, ns in namespaces.items():
        now, was = vars(ns), before[name]
        for key in set(now) | set(was):
            if key not in was and isinstance(now[key], types.ModuleType):
                continue  # a submodule imported on the way
            if key not in now or key not in was or now[key] is not was[key]:
                out.append(f"{name}.{key}")
    return sorted(out)

def state():
    return {
        "changed": changed(),
        "global_module_hooks": len(mod._global_forward_pre_hooks)
        + len(mod._global_forward_hooks)
        + len(mod._global_forward_hooks_always_called),
        "optimizer_hooks": len(optim_mod._global_optimizer_pre_hooks) + len(optim_mod._global_optimizer_post_hooks),
        "instance_hooks": len(model._forward_pre_hooks) + len(model._forward_hooks),
        "marked": any(hasattr(m, "_profilerd_hooked") for m in model.modules()),
    }

def train(n):
    for x, y in DataLoader(SleepyDataset(2 * n), batch_size=2):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

probes.install()
result("installed", state())
train(3)
result("trained", state())
probes.uninstall()
result("uninstalled", state())
train(3)  # sends nothing
probes.install()  # and out again before any step
probes.uninstall()
result("reinstalled_uninstalled", state())
result("installed_flag", probes.installed())
"""


def test_uninstall_restores_everything(zygote, tmp_path, receiver):
    _, res = run_scenario(zygote, tmp_path, receiver, UNINSTALL)
    clean = {"changed": [], "global_module_hooks": 0, "optimizer_hooks": 0, "instance_hooks": 0, "marked": False}
    # the probe did hook things, or this test would prove nothing
    patched = set(res["installed"]["changed"])
    assert {"BaseDataLoaderIter.__next__", "torch.autograd.backward", "torch.autograd.grad"} <= patched
    assert res["installed"]["optimizer_hooks"] == 2
    # nothing on modules, ever
    assert res["installed"]["global_module_hooks"] == res["trained"]["global_module_hooks"] == 0
    assert res["trained"]["instance_hooks"] == 0 and res["trained"]["marked"] is False
    assert res["uninstalled"] == clean
    assert res["reinstalled_uninstalled"] == clean
    assert res["installed_flag"] is False
    assert [s.step for s in receiver.steps()] == [1, 2, 3]


PROFILE_BLOCK = """
import profilerd_probes as probes
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)

def train(n):
    # no DataLoader: the block's last step ends with its optimizer step, and only leaving the
    # block can send it
    data = SleepyDataset(2 * n)
    for i in range(n):
        x, y = data.x[2 * i : 2 * i + 2], data.y[2 * i : 2 * i + 2]
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

train(3)
with probes.profile():
    result("inside", probes.installed())
    train(5)
result("after", probes.installed())
train(3)
"""


def test_profile_block_probes_only_inside(zygote, tmp_path, receiver):
    _, res = run_scenario(zygote, tmp_path, receiver, PROFILE_BLOCK)
    assert res["inside"] is True and res["after"] is False
    steps = receiver.steps()
    assert_numbered(steps, 5)
    assert all(boundary(s) == 0 and s.optimizer_s > 0 for s in steps)


# ---- the sitecustomize bootstrap (`profilerd run`): real interpreters ---------------------------
USER_TRAIN = """
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for x, y in DataLoader(SleepyDataset(8), batch_size=2):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
result("pid", os.getpid())
"""

# The same without an optimizer: the first optimizer imports torch._dynamo (~1 s of CPU here).
USER_TRAIN_LITE = """
model = make_model()
for x, y in DataLoader(SleepyDataset(8), batch_size=2):
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
result("pid", os.getpid())
"""

OTHER_SITECUSTOMIZE = """
import os
with open(os.environ["MARKER"], "a") as f:
    f.write("other sitecustomize ran\\n")
"""


def run_real(tmp: Path, rx: Receiver | None, source: str, *, env=None, name="train.py", args=()):
    """Run a script in a fresh interpreter; returns (completed process, RESULT values)."""
    script = write_script(tmp, source, name)
    proc = run_python([*args, str(script)], rx.path if rx is not None else None, cwd=tmp, env=env)
    if rx is not None:
        rx.close()
        assert rx.errors == []
    return proc, {k: json.loads(v) for k, v in parse_kv(proc.stdout).items()}


@pytest.fixture(scope="module")
def bootstrap_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bootstrap")
    boot = make_bootstrap_dir(tmp)
    other = tmp / "other"
    other.mkdir()
    write_script(other, OTHER_SITECUSTOMIZE, "sitecustomize.py")
    marker = tmp / "marker"
    sock_dir = short_socket_dir()
    rx = Receiver(sock_dir / "ingest.sock")
    env = {"PYTHONPATH": f"{boot}:{other}", "MARKER": str(marker), "PROFILERD_RUN_ID": "boot-run"}
    try:
        proc, res = run_real(tmp, rx, COMMON + USER_TRAIN, env=env)
    finally:
        rx.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    return rx, res, marker, proc


def test_bootstrap_probes_unmodified_script(bootstrap_run):
    rx, res, _, proc = bootstrap_run
    steps = rx.steps(res["pid"])
    assert_numbered(steps, 4)
    assert all(boundary(s) == 0 and s.forward_s > 0 and s.optimizer_s > 0 for s in steps)
    [hello] = rx.bodies("hello")
    assert hello["run_id"] == "boot-run"
    kinds = [r.kind for r in rx.received]
    assert kinds.index("hello") < kinds.index("step")
    assert proc.stderr == ""


def test_bootstrap_chains_to_existing_sitecustomize(bootstrap_run):
    _, _, marker, _ = bootstrap_run
    assert marker.read_text() == "other sitecustomize ran\n"


def test_bootstrap_with_python_dash_m(tmp_path, receiver):
    boot = make_bootstrap_dir(tmp_path)
    package = tmp_path / "trainer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    write_script(package, COMMON + USER_TRAIN_LITE, "__main__.py")
    proc = run_python(["-m", "trainer"], receiver.path, cwd=tmp_path, env={"PYTHONPATH": str(boot)})
    receiver.close()
    pid = int(parse_kv(proc.stdout)["pid"])
    assert_numbered(receiver.steps(pid), 4)
    assert receiver.bodies("hello", pid)


def test_bootstrap_respects_profilerd_disable(tmp_path, receiver):
    boot = make_bootstrap_dir(tmp_path)
    body = COMMON + USER_TRAIN_LITE + "import profilerd_probes as probes\nresult('installed', probes.installed())\n"
    _, res = run_real(tmp_path, receiver, body, env={"PYTHONPATH": str(boot), "PROFILERD_DISABLE": "1"})
    assert res["installed"] is False
    assert receiver.received == []


def test_install_without_torch_returns_false_with_one_stderr_line():
    code = (
        "import sys, warnings; sys.modules['torch'] = None; import profilerd_probes as probes; "
        "warnings.simplefilter('error'); print(probes.install(), probes.install(), probes.installed())"
    )
    proc = run_python(["-c", code], None)
    assert proc.stdout.split() == ["False", "False", "False"]
    [line] = proc.stderr.splitlines()
    assert line.startswith("profilerd: probes disabled")


LIGHT_MODULES = ("torch", "numpy", "pandas", "prometheus_client", "textual", "psutil", "profilerd")


def test_bootstrap_leaves_programs_without_torch_alone(tmp_path, receiver):
    boot = make_bootstrap_dir(tmp_path)
    script = write_script(
        tmp_path,
        f"""
        import json, sys
        import profilerd_probes as probes
        print(json.dumps([probes.installed(), sorted(m for m in {LIGHT_MODULES!r} if m in sys.modules)]))
        """,
        "tool.py",
    )
    proc = run_python([str(script)], receiver.path, env={"PYTHONPATH": str(boot)})
    receiver.close()
    assert json.loads(proc.stdout) == [False, []]
    assert proc.stderr == ""
    assert receiver.received == []


def test_torchrun_agent_is_not_probed(tmp_path, receiver):
    """A script whose argv0 is `torchrun`, as in torchrun's agent, trains without probes."""
    boot = make_bootstrap_dir(tmp_path)
    body = (
        COMMON
        + USER_TRAIN_LITE
        + (
            "import profilerd_probes as probes\n"
            "result('installed', probes.installed())\nresult('launcher', probes.is_launcher_process())\n"
        )
    )
    _, res = run_real(tmp_path, receiver, body, env={"PYTHONPATH": str(boot)}, name="torchrun")
    assert res["launcher"] is True
    assert res["installed"] is False
    assert receiver.received == []


AT_EXIT_MARKER = """
import atexit, os, sys

def _report():
    probes = sys.modules.get("profilerd_probes")
    with open(os.environ["MARKER"], "w") as f:
        f.write(f"torch={'torch' in sys.modules} installed={bool(probes and probes.installed())}")

atexit.register(_report)
"""


def _launcher_installed(tmp_path: Path, args: list[str]) -> str:
    boot = make_bootstrap_dir(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    write_script(other, AT_EXIT_MARKER, "sitecustomize.py")
    marker = tmp_path / "marker"
    env = child_env(None, {"PYTHONPATH": f"{boot}:{other}", "MARKER": str(marker)})
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return marker.read_text()


def test_torchrun_console_script_is_not_probed(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("no torchrun console script next to this python")
    assert _launcher_installed(tmp_path, [str(torchrun), "--help"]) == "torch=True installed=False"


def test_python_dash_m_torch_distributed_run_is_not_probed(tmp_path):
    args = [sys.executable, "-m", "torch.distributed.run", "--help"]
    assert _launcher_installed(tmp_path, args) == "torch=True installed=False"


# ---- fork --------------------------------------------------------------------------------------
FORK = """
import profilerd_probes as probes
probes.install()
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
children = []
for i, (x, y) in enumerate(DataLoader(SleepyDataset(12), batch_size=2)):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    if i == 2:  # mid-step: the child inherits a step in progress
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # the child does nothing; its atexit handlers run
        children.append(pid)
        os.waitpid(pid, 0)
    opt.step()
result("pid", os.getpid())
result("children", children)
"""


def test_forked_child_sends_nothing(zygote, tmp_path, receiver):
    _, res = run_scenario(zygote, tmp_path, receiver, FORK)
    assert len(res["children"]) == 1
    assert {r.pid for r in receiver.received} == {res["pid"]}
    assert_numbered(receiver.steps(), 6)


WORKERS = """
import profilerd_probes as probes
probes.install()

class Augmented(SleepyDataset):
    '''Runs a small module in the worker, as an augmentation pipeline can.'''
    def __init__(self, n):
        super().__init__(n)
        self.aug = nn.Linear(8, 8)
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        with torch.no_grad():
            x = x + 0.0 * self.aug(x)
        return x, y, os.getpid()

model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
loader = DataLoader(Augmented(12), batch_size=2, num_workers=2, multiprocessing_context="fork", pin_memory=True)
workers = set()
for epoch in range(2):
    for x, y, pids in loader:
        workers.update(pids.tolist())
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
result("pid", os.getpid())
result("workers", sorted(workers))
result("pinning", torch.accelerator.is_available())  # pin_memory takes effect only with one
"""


def test_dataloader_workers_send_nothing(zygote, tmp_path, receiver):
    _, res = run_scenario(zygote, tmp_path, receiver, WORKERS, warnings=["ignore"])
    assert len(res["workers"]) >= 2 and res["pid"] not in res["workers"]
    assert {r.pid for r in receiver.received} == {res["pid"]}
    assert_numbered(receiver.steps(), 12)
    loader = receiver.bodies("config")[-1]["dataloader"]
    # The loader's effective settings, as its iterator runs them.
    assert (loader["num_workers"], loader["pin_memory"], loader["batch_size"]) == (2, res["pinning"], 2)


# ---- ranks started without a launcher's environment (torch.multiprocessing) ----------------------
DDP_RANKS = """
import profilerd_probes as probes
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
probes.install()

def worker(rank):
    dist.init_process_group("gloo", init_method="file://" + os.environ["STORE"], rank=rank, world_size=2)
    model = DDP(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = SleepyDataset(16)
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
    for x, y in DataLoader(data, batch_size=2, sampler=sampler):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    dist.destroy_process_group()
    result(f"rank{rank}", os.getpid())

mp.start_processes(worker, nprocs=2, start_method="fork")
result("parent", os.getpid())
"""


@pytest.fixture(scope="module")
def ddp_run(zygote, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    sock_dir = short_socket_dir()
    rx = Receiver(sock_dir / "ingest.sock")
    try:
        # A fresh interpreter, not a zygote child: fork-starting ranks from a process that was
        # itself forked from a torch-importing parent with threads can deadlock in the harness.
        script = write_script(tmp, COMMON + "\n" + DDP_RANKS)
        proc = run_python([str(script)], rx.path, cwd=tmp, env={"STORE": str(sock_dir / "store")}, timeout=90)
        rx.close()
        res = {k: json.loads(v) for k, v in parse_kv(proc.stdout).items()}
    finally:
        rx.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    return rx, res


def test_ddp_ranks_each_send_their_steps(ddp_run):
    rx, res = ddp_run
    assert {r.pid for r in rx.received} == {res["rank0"], res["rank1"]}  # the parent trains nothing
    for rank in (0, 1):
        pid = res[f"rank{rank}"]
        steps = rx.steps(pid)
        assert_numbered(steps, 4)
        for s in steps:
            assert boundary(s) == 0
            assert s.forward_s > 0 and s.backward_s > 0 and s.optimizer_s > 0 and s.comm_s >= 0
            phases = s.data_wait_s + s.forward_s + s.backward_s + s.optimizer_s + s.comm_s
            assert s.step_s + STEP_TOL_S >= phases
        config = rx.bodies("config", pid)[-1]
        assert config["distributed"] == {"backend": "gloo", "rank": rank, "world_size": 2}
        [model] = config["models"]
        assert model["class"] == "DistributedDataParallel" and "ddp" in model


def test_ddp_ranks_without_launcher_env_report_their_rank(ddp_run):
    rx, res = ddp_run
    for rank in (0, 1):
        pid = res[f"rank{rank}"]
        assert {s.rank for s in rx.steps(pid)} == {rank}
        assert [(h["rank"], h["world_size"]) for h in rx.bodies("hello", pid)][-1] == (rank, 2)


def test_ddp_ranks_without_launcher_env_share_one_job(ddp_run):
    rx, res = ddp_run
    jobs = {h["job"] for pid in (res["rank0"], res["rank1"]) for h in rx.bodies("hello", pid)}
    assert len(jobs) == 1


# ---- GradScaler skipping a step ----------------------------------------------------------------
SCALER = """
import profilerd_probes as probes
probes.install()
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
scaler = torch.amp.GradScaler("cpu")
for i, (x, y) in enumerate(DataLoader(SleepyDataset(10), batch_size=2)):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ((model(x) - y) ** 2).mean()
    if i in json.loads(os.environ["SKIP"]):
        loss = loss * float("inf")  # overflow: the scaler skips this optimizer step
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
"""


@pytest.fixture(scope="module")
def scaler_run(zygote, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scaler")
    sock_dir = short_socket_dir()
    rx = Receiver(sock_dir / "ingest.sock")
    try:
        run_scenario(zygote, tmp, rx, SCALER, env={"SKIP": "[2]"})
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
    return rx


def test_step_skipped_by_grad_scaler_still_arrives_flagged(scaler_run):
    steps = scaler_run.steps()
    assert_numbered(steps, 5)
    skipped = steps[2]
    assert skipped.optimizer_s == 0 and skipped.backward_s > 0
    assert boundary(skipped) == wire.FLAG_GRAD_SCALER_SKIPPED  # the step ends exactly at scaler.step()
    assert all(s.optimizer_s > 0 and boundary(s) == 0 for i, s in enumerate(steps) if i != 2)
    config = scaler_run.bodies("config")[-1]
    assert config["grad_scaler"] is True


def test_grad_scaler_scale_is_reported(scaler_run):
    steps = scaler_run.steps()
    assert all(s.flags & wire.FLAG_HAS_SCALE for s in steps)
    # the overflow in step 3 halves the scale (backoff_factor 0.5) from the default 2**16
    assert [s.scaler_scale for s in steps] == [2.0**16, 2.0**16, 2.0**15, 2.0**15, 2.0**15]


def test_first_step_skipped_by_grad_scaler_is_flagged(zygote, tmp_path, receiver):
    run_scenario(zygote, tmp_path, receiver, SCALER, env={"SKIP": "[0]"})
    steps = receiver.steps()
    assert_numbered(steps, 5)
    assert steps[0].optimizer_s == 0
    assert boundary(steps[0]) == wire.FLAG_GRAD_SCALER_SKIPPED
    assert all(boundary(s) == 0 for s in steps[1:])


# ---- a machine booted moments ago --------------------------------------------------------------
FRESH_BOOT = """
import time
_real_monotonic = time.monotonic
_boot = _real_monotonic() - 2.0
time.monotonic = lambda: _real_monotonic() - _boot  # uptime: 2 s
import profilerd_probes as probes
probes.install()
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for x, y in DataLoader(SleepyDataset(8), batch_size=2):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
"""


def test_hello_precedes_first_step_soon_after_boot(zygote, tmp_path, receiver):
    run_scenario(zygote, tmp_path, receiver, FRESH_BOOT)
    kinds = [r.kind for r in receiver.received]
    assert "step" in kinds and "hello" in kinds
    assert kinds.index("hello") < kinds.index("step")


# ---- the datagram sender (in-process: it installs no hooks) -------------------------------------
def _step_datagram(seq: int) -> bytes:
    return step_datagram(pid=1, seq=seq, step=seq, end_unix_s=time.time(), step_s=0.1)


def test_sender_drops_and_counts_once_the_daemon_it_had_is_gone(sock_dir):
    """Records made before any daemon answered are held (tests/test_launch.py); once a daemon
    has answered and gone, nothing waits for the next one: each record is dropped, counted."""
    path = sock_dir / "gone.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as daemon:
        daemon.bind(str(path))
        sender = DatagramSender(path)
        assert sender.send(_step_datagram(0)) is True
    path.unlink()
    assert [sender.send(_step_datagram(i)) for i in range(1, 201)] == [False] * 200
    assert dict(sender.dropped) == {"daemon_absent": 200}
    assert sender.sent == 1 and sender.held == 0


def test_sender_never_blocks_on_a_daemon_that_does_not_read(sock_dir):
    """A full socket queue (a busy daemon) neither blocks nor loses the newest records: they are
    held, bounded, and sent in order once the daemon reads again; beyond the bound the oldest
    held ones are dropped and counted."""
    path = sock_dir / "busy.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as busy:
        busy.bind(str(path))
        busy.setblocking(False)
        sender = DatagramSender(path)
        results = [sender.send(_step_datagram(i)) for i in range(2000)]

        def drain() -> list[int]:
            seqs = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    seqs.extend(step.seq for step in wire.decode(busy.recv(wire.MAX_DATAGRAM_BYTES)).steps)
            return seqs

        queued = drain()
        first = sum(results)
        assert 0 < first < 2000 and queued == list(range(first))  # the first ones, in order
        assert sender.held == MAX_HELD_DATAGRAMS
        assert dict(sender.dropped) == {"daemon_busy": 2000 - first - MAX_HELD_DATAGRAMS}
        later: list[int] = []
        for _ in range(1000):  # the daemon reads again: each chance to send replays what fits
            sender.ensure_connected()
            later += drain()
            if not sender.held:
                break
    assert later == list(range(2000 - MAX_HELD_DATAGRAMS, 2000))  # the newest, in order
    assert sender.sent == first + MAX_HELD_DATAGRAMS


def test_sender_reconnects_when_the_daemon_comes_back(sock_dir):
    path = sock_dir / "late.sock"
    sender = DatagramSender(path)
    assert sender.send(_step_datagram(0)) is False
    with Receiver(path) as rx:
        deadline = time.monotonic() + 4 * RECONNECT_INTERVAL_S + 1
        seq = 1
        while not sender.send(_step_datagram(seq)):
            assert time.monotonic() < deadline, "never reconnected"
            time.sleep(0.01)
            seq += 1
        assert sender.reconnected is True
        rx.close()
        assert [m.seq for m in rx.steps()] == list(range(seq + 1))  # the held ones first, in order


def test_sender_drops_an_oversized_datagram_and_keeps_going(receiver):
    sender = DatagramSender(receiver.path)
    assert sender.send(_step_datagram(1)) is True
    assert sender.send(b"PF\x01\x03" + b" " * (8 * 2**20)) is False
    assert sender.dropped["oversized"] == 1
    assert sender.send(_step_datagram(2)) is True
    receiver.close()
    assert [m.seq for m in receiver.steps()] == [1, 2]


GRAD_NORM = """
import profilerd_probes as probes
probes.install()
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
norms = []
for x, y in DataLoader(SleepyDataset(16, sleep_s=0.02), batch_size=2):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    norms.append(float(torch.Tensor.__float__(total)))
    opt.step()
result("norms", norms)
"""


def test_grad_norm_is_sampled_at_most_every_interval(zygote, tmp_path, receiver):
    _, res = run_scenario(zygote, tmp_path, receiver, GRAD_NORM, env={"PROFILERD_GRAD_NORM_EVERY_S": "0.1"})
    steps = receiver.steps()
    sampled = [i for i, s in enumerate(steps) if s.flags & wire.FLAG_HAS_GRAD_NORM]
    assert sampled and sampled[0] == 0  # the first optimizer step is sampled
    assert len(sampled) < len(steps)  # ~40 ms steps, one sample per 100 ms
    for i in sampled:
        assert steps[i].grad_norm == pytest.approx(res["norms"][i], rel=1e-6)


LOSS_SCHEDULE = """
import time
import profilerd_probes as probes
probes.install()
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
data = SleepyDataset(8)
for i in range(320):
    if i >= 200:
        time.sleep(0.002)  # 70 NaN steps span well over one 50 ms read interval, however fast the host
    opt.zero_grad()
    loss = ((model(data.x) - data.y) ** 2).mean()
    diverged = 230 <= i < 300
    if diverged:
        loss = loss * float("nan")
    loss.backward()
    if diverged:
        opt.zero_grad()  # this loop drops NaN gradients (as GradScaler would): the weights stay finite
    opt.step()
"""


def test_loss_is_read_every_step_at_first_then_by_time_and_while_non_finite(zygote, tmp_path, receiver):
    run_scenario(zygote, tmp_path, receiver, LOSS_SCHEDULE)
    steps = receiver.steps()
    assert_numbered(steps, 320)
    read = [i for i, s in enumerate(steps) if s.flags & wire.FLAG_HAS_LOSS]
    assert read[:200] == list(range(200)), "every step of the first 200"
    # then by time (at most every 50 ms); once a NaN is seen, every step until it is finite again
    [first] = [i for i, s in enumerate(steps) if s.flags & wire.FLAG_LOSS_FIRST_NONFINITE]
    assert 230 <= first < 300
    assert all(math.isnan(steps[i].loss) for i in range(first, 300))
    assert set(range(first, 301)) <= set(read)
    assert math.isfinite(steps[300].loss)
