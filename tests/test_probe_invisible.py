"""The probes are invisible to the training program: each small program runs plainly and with the
probes installed, in processes of their own, and what the program can observe must be the same.

The scenarios are forked from a zygote that has imported torch once (see probe_helpers.Zygote);
the ones about other interpreters (spawn children, loading a checkpoint where profilerd cannot be
imported) run real interpreters.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from probe_helpers import (
    Receiver,
    Zygote,
    make_bootstrap_dir,
    parse_kv,
    run_python,
    short_socket_dir,
    write_script,
)

from profilerd_probes import wire

PRELUDE = """
import copy, hashlib, inspect, io, json, os, pickle, sys, threading, time, warnings, weakref
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

torch.set_num_threads(1)
PROBED = os.environ["PROBED"] == "1"
if PROBED:
    import profilerd_probes as probes
    assert probes.install()


def result(key, value):
    sys.stdout.flush()
    os.write(1, f"RESULT {key}={json.dumps(value)}\\n".encode())


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))


def make_data(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True))


def module_hooks(model):
    mod = torch.nn.modules.module
    globals_ = (
        len(mod._global_forward_pre_hooks)
        + len(mod._global_forward_hooks)
        + len(mod._global_forward_hooks_always_called)
        + len(mod._global_backward_hooks)
        + len(mod._global_backward_pre_hooks)
    )
    own = sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )
    tensors = sum(len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
                  for p in model.parameters())
    return {"global": globals_, "modules": own, "parameters": tensors}


def attributes(model):
    return [sorted(vars(m)) for m in model.modules()]


def exact(value):
    return float(value).hex()
"""


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


class Pair:
    """One program run plainly and probed: results, stderr, and what the probed run sent."""

    def __init__(self, plain: dict, probed: dict, plain_stderr: str, probed_stderr: str, rx: Receiver) -> None:
        self.plain = plain
        self.probed = probed
        self.plain_stderr = plain_stderr
        self.probed_stderr = probed_stderr
        self.rx = rx
        self.probed_dir = Path()

    def steps(self) -> list[wire.StepMessage]:
        return self.rx.steps(self.probed["pid"])


def run_pair(zygote: Zygote, tmp: Path, body: str, *, env=None, warnings=("error",), timeout=60.0) -> Pair:
    """Run PRELUDE + body plainly, then with the probes, each under `-W error` by default."""
    results, stderrs = {}, {}
    sock_dir = short_socket_dir()
    rx = Receiver(sock_dir / "ingest.sock")
    try:
        for probed in ("0", "1"):
            directory = tmp / ("probed" if probed == "1" else "plain")
            directory.mkdir(exist_ok=True)
            script = write_script(directory, PRELUDE + "\nresult('pid', os.getpid())\n" + body)
            proc = zygote.run(
                script,
                rx.path if probed == "1" else None,
                env={**(env or {}), "PROBED": probed, "OUT": str(directory)},
                warnings=warnings,
                timeout=timeout,
            )
            results[probed] = {k: json.loads(v) for k, v in parse_kv(proc.stdout).items()}
            stderrs[probed] = proc.stderr
    finally:
        rx.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert rx.errors == []
    pair = Pair(results["0"], results["1"], stderrs["0"], stderrs["1"], rx)
    pair.probed_dir = tmp / "probed"
    return pair


def same_except_pid(pair: Pair) -> None:
    plain = {k: v for k, v in pair.plain.items() if k != "pid"}
    probed = {k: v for k, v in pair.probed.items() if k != "pid"}
    assert probed == plain


def normalised(stderr: str, run: str) -> list[str]:
    """stderr without what differs between two runs of one program: log prefixes (time, pid),
    the script's directory; profilerd's own lines are left out."""
    lines = [
        re.sub(r"^[DIWE]\d{4} [\d:.]+ \d+ ", "", line).replace(f"/{run}/", "/RUN/") for line in stderr.splitlines()
    ]
    return [line for line in lines if not line.startswith("profilerd:")]


def only_profilerd_lines(stderr: str) -> None:
    assert all(line.startswith("profilerd:") for line in stderr.splitlines()), stderr


# ---- a model saved, copied, scripted, traced and exported -----------------------------------
IDIOMS = """
from torch._subclasses.fake_tensor import FakeTensorMode

# A shape check under FakeTensorMode before training: the probe must neither read nor break.
with FakeTensorMode():
    fake_model = nn.Linear(8, 2)
    fake_model(torch.randn(3, 8)).sum().backward()
result("installed_after_fake", probes.installed() if PROBED else True)

model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loader = DataLoader(make_data(), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))
hooks_seen, attrs_seen, traced_ok = [], [], None
x0 = make_data(4, seed=3).tensors[0]
for i, (x, y) in enumerate(loader):
    opt.zero_grad()
    out = model(x)
    hooks_seen.append(module_hooks(model))
    loss = ((out - y) ** 2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    opt.step()
    hooks_seen.append(module_hooks(model))
    attrs_seen.append(attributes(model))
    if i == 5:  # after the probe's configuration snapshots have started
        with warnings.catch_warnings():  # TorchScript is deprecated: said in both runs
            warnings.simplefilter("ignore", DeprecationWarning)
            traced = torch.jit.trace(model, x0)
        traced_ok = torch.equal(traced(x0), model(x0))
result("steps", i + 1)
result("hooks", hooks_seen)
result("attributes", attrs_seen[-1])
result("same_attributes_every_step", all(a == attrs_seen[0] for a in attrs_seen))
result("final_loss", exact(loss.detach()))
result("traced_after_step_5", traced_ok)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    scripted = torch.jit.script(model)
result("scripted", torch.equal(scripted(x0), model(x0)))
exported = torch.export.export(model, (x0,), strict=True)
result("exported", torch.equal(exported.module()(x0), model(x0)))
result("exported_graph", str(exported.graph))
clone = copy.deepcopy(model)
result("deepcopy_hooks", module_hooks(clone))


def same_state(a, b):
    return all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))


result("deepcopy_equal", same_state(clone, model))
unpickled = pickle.loads(pickle.dumps(model))
result("pickle_attributes", attributes(unpickled))
result("pickle_equal", same_state(unpickled, model))
torch.save(model, os.path.join(os.environ["OUT"], "model.pt"))
torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, os.path.join(os.environ["OUT"], "ckpt.pt"))
buffer = io.BytesIO()
torch.save(model.state_dict(), buffer)
result("state_dict_sha", hashlib.sha256(buffer.getvalue()).hexdigest())
result("optimizer_state_keys", sorted(opt.state_dict()))
"""


@pytest.fixture(scope="module")
def idioms(zygote, tmp_path_factory):
    return run_pair(zygote, tmp_path_factory.mktemp("idioms"), IDIOMS)


def test_program_observes_the_same_with_and_without_probes(idioms):
    same_except_pid(idioms)
    assert idioms.plain_stderr == idioms.probed_stderr == ""  # -W error: nothing raised, nothing said


def test_no_hook_anywhere_while_user_code_runs(idioms):
    assert idioms.probed["hooks"] == [{"global": 0, "modules": 0, "parameters": 0}] * (2 * idioms.probed["steps"])
    assert idioms.probed["deepcopy_hooks"] == {"global": 0, "modules": 0, "parameters": 0}
    assert not any("profilerd" in name for names in idioms.probed["attributes"] for name in names)


def test_jit_trace_script_and_strict_export_work(idioms):
    assert idioms.probed["traced_after_step_5"] is True
    assert idioms.probed["scripted"] is True
    assert idioms.probed["exported"] is True
    assert idioms.probed["exported_graph"] == idioms.plain["exported_graph"]


def test_fake_tensor_backward_neither_disables_nor_warns(idioms):
    assert idioms.probed["installed_after_fake"] is True
    assert idioms.probed_stderr == ""


def test_training_is_still_recorded(idioms):
    steps = idioms.steps()
    assert [s.step for s in steps] == list(range(1, idioms.probed["steps"] + 1))
    assert all(s.forward_s > 0 and s.backward_s > 0 and s.optimizer_s > 0 for s in steps)


LOAD = """
import sys
sys.modules["profilerd_probes"] = None  # an interpreter where profilerd cannot be imported
import torch
from torch import nn
out = sys.argv[1]
with torch.serialization.safe_globals([nn.Sequential, nn.Linear, nn.ReLU]):
    model = torch.load(out + "/model.pt", weights_only=True)
ckpt = torch.load(out + "/ckpt.pt", weights_only=True)
full = torch.load(out + "/model.pt", weights_only=False)
assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ckpt["model"].values()))
assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), ckpt["model"].values()))
print("loaded", type(model).__name__, len(ckpt["optimizer"]["state"]))
"""


def test_saved_model_loads_with_weights_only_where_profilerd_is_absent(idioms, tmp_path_factory):
    out = idioms.probed_dir
    script = write_script(tmp_path_factory.mktemp("load"), LOAD, "load.py")
    proc = run_python([str(script), str(out)], None)
    assert proc.stdout.split() == ["loaded", "Sequential", "4"]
    assert proc.stderr == ""


def test_wrappers_keep_name_signature_and_docstring(zygote, tmp_path):
    body = """
import torch.optim.optimizer
from torch.utils.data import dataloader as dl

def describe(fn):
    try:
        signature = str(inspect.signature(fn))
    except (TypeError, ValueError) as exc:
        signature = type(exc).__name__
    return [getattr(fn, "__name__", None), getattr(fn, "__qualname__", None), signature, fn.__doc__]

functions = {
    "torch.autograd.backward": torch.autograd.backward,
    "torch.autograd.grad": torch.autograd.grad,
    "clip_grad_norm_": torch.nn.utils.clip_grad_norm_,
    "Optimizer.__init__": torch.optim.Optimizer.__init__,
    "loader __next__": dl._BaseDataLoaderIter.__next__,
    "autocast.__enter__": torch.amp.autocast_mode.autocast.__enter__,
    "GradScaler.step": torch.amp.GradScaler.step,
    "DDP.__init__": torch.nn.parallel.DistributedDataParallel.__init__,
    "all_reduce": torch.distributed.all_reduce,
}
for name in ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__repr__", "__format__"):
    functions["Tensor." + name] = getattr(torch.Tensor, name)
result("described", {name: describe(fn) for name, fn in functions.items()})
result("patched", sorted(name for name, fn in functions.items() if hasattr(fn, "__wrapped__")))
"""
    pair = run_pair(zygote, tmp_path, body)
    assert pair.probed["described"] == pair.plain["described"]
    assert len(pair.probed["patched"]) >= 10  # the probes did wrap them, or this proves nothing


# ---- torch.compile -----------------------------------------------------------------------
COMPILE = """
import torch._dynamo.utils as dynamo_utils

model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
compiled = torch.compile(model, fullgraph=True, backend="eager")

@torch.compile(fullgraph=True, backend="eager")
def autocast_forward(x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(x).float().sum()

@torch.compile(backend="eager")
def train_step(x, y):  # graph-breaks at backward, in both runs
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    return loss

@torch.compile(backend="eager")
def with_item(x):
    value = model(x).sum()
    return value * value.item()

values = []
for x, y in DataLoader(make_data(), batch_size=4):
    opt.zero_grad()
    values.append(exact(((compiled(x) - y) ** 2).mean().detach()))
    values.append(exact(autocast_forward(x).detach()))
    values.append(exact(train_step(x, y).detach()))
    opt.step()
    values.append(exact(with_item(x).detach()))
result("values", values)
result("stats", dict(dynamo_utils.counters["stats"]))
result("graph_breaks", dict(dynamo_utils.counters["graph_break"]))
result("unique_graphs", dynamo_utils.counters["stats"]["unique_graphs"])
"""


def test_torch_compile_compiles_exactly_as_without_probes(zygote, tmp_path):
    pair = run_pair(zygote, tmp_path, COMPILE, warnings=("ignore",), timeout=180)
    assert pair.probed["unique_graphs"] > 0
    same_except_pid(pair)  # same values, same graph count, same graph breaks (by reason)
    # torch's own graph-break warnings are the same; nothing else is said
    assert normalised(pair.probed_stderr, "probed") == normalised(pair.plain_stderr, "plain")
    steps = pair.steps()
    assert [s.step for s in steps] == list(range(1, 9))
    # the backward run eagerly after the compiled step's graph break is timed
    assert all(s.backward_s > 0 and s.optimizer_s > 0 for s in steps)
    # the graph counter is refreshed at most twice a second: it lags, but it counts
    assert 0 < max(s.graph_compiles for s in steps) <= pair.probed["unique_graphs"]


# ---- torch.profiler: the user's trace gains no op from the probes ------------------------------
PROFILER = """
model = make_model()
opt = torch.optim.Adam(model.parameters(), lr=0.01)
data = make_data(64)

def train(batches):
    for x, y in batches:
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()

train(DataLoader(data, batch_size=8))  # step 1-8 outside: the probe is warmed up
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    train(DataLoader(data, batch_size=8))
counts = {}
for event in prof.events():
    counts[event.name] = counts.get(event.name, 0) + 1
result("ops", {k: v for k, v in counts.items() if k.startswith("aten::")})
"""


def test_profiler_traces_gain_no_ops(zygote, tmp_path):
    pair = run_pair(zygote, tmp_path, PROFILER, warnings=("ignore",))
    assert pair.plain["ops"], "the profiler recorded nothing: this test would prove nothing"
    assert pair.probed["ops"] == pair.plain["ops"]
    assert len(pair.steps()) == 16


# ---- phases and steps -------------------------------------------------------------------------
STEP_TOL_S = 1e-6


def phase_sum(s: wire.StepMessage) -> float:
    return s.data_wait_s + s.forward_s + s.backward_s + s.optimizer_s + s.comm_s


LBFGS = """
model = make_model()
opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3, history_size=3)
calls = []
for x, y in DataLoader(make_data(), batch_size=8):
    def closure():
        calls.append(1)
        opt.zero_grad()
        time.sleep(0.01)  # a slow forward pass
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss
    loss = opt.step(closure)
result("closure_calls", len(calls))
result("final_loss", exact(loss.detach()))
"""


def test_lbfgs_closure_is_forward_and_backward_not_optimizer(zygote, tmp_path):
    pair = run_pair(zygote, tmp_path, LBFGS)
    same_except_pid(pair)
    steps = pair.steps()
    assert len(steps) == 4
    calls_per_step = pair.probed["closure_calls"] / 4
    for s in steps:
        assert boundary_flags(s) == 0
        assert s.forward_s >= calls_per_step * 0.01  # every closure's sleep is forward time
        assert s.backward_s > 0
        assert s.optimizer_s < 0.01  # LBFGS's own arithmetic on 161 parameters: well under a sleep
        assert phase_sum(s) <= s.step_s + STEP_TOL_S


def one_step_per_iteration(pair: Pair) -> list[wire.StepMessage]:
    """Same results plainly and probed, and one step record per iteration of the program."""
    same_except_pid(pair)
    steps = pair.steps()
    assert [s.step for s in steps] == list(range(1, pair.probed["iterations"] + 1))
    return steps


def boundary_flags(s: wire.StepMessage) -> int:
    return s.flags & (wire.FLAG_FALLBACK_BOUNDARY | wire.FLAG_GRAD_SCALER_SKIPPED)


GAN = """
torch.manual_seed(0)
generator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
discriminator = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
opt_g = torch.optim.Adam(generator.parameters(), lr=1e-3)
opt_d = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
bce = nn.BCEWithLogitsLoss()
real_data = make_data(48).tensors[0]
if os.environ["MODE"] == "loader":
    batches = (x for (x,) in DataLoader(TensorDataset(real_data), batch_size=8))
else:
    batches = (real_data[i:i + 8] for i in range(0, 48, 8))
iterations = 0
for real in batches:
    iterations += 1
    z = torch.randn(8, 4)
    fake = generator(z)
    opt_d.zero_grad()
    d_loss = bce(discriminator(real), torch.ones(8, 1)) + bce(discriminator(fake.detach()), torch.zeros(8, 1))
    d_loss.backward()
    opt_d.step()
    opt_g.zero_grad()
    g_loss = bce(discriminator(fake), torch.ones(8, 1))
    g_loss.backward()
    opt_g.step()
result("iterations", iterations)
result("final", [exact(d_loss.detach()), exact(g_loss.detach())])
"""


@pytest.mark.parametrize("mode", ["loader", "tensors"])
def test_two_optimizers_stepped_in_one_iteration_are_one_step(zygote, tmp_path, mode):
    steps = one_step_per_iteration(run_pair(zygote, tmp_path, GAN, env={"MODE": mode}))
    for s in steps[1:]:
        assert boundary_flags(s) == 0
        assert s.backward_s > 0 and s.optimizer_s > 0
        assert phase_sum(s) <= s.step_s + STEP_TOL_S


FUNCTIONAL = """
model = make_model()
params = dict(model.named_parameters())
data = make_data()
mode = os.environ["MODE"]

def loss_of(p, x, y):
    return ((torch.func.functional_call(model, p, (x,)) - y) ** 2).mean()

iterations = 0
for x, y in DataLoader(data, batch_size=4):
    iterations += 1
    if mode == "autograd.grad":
        loss = loss_of(params, x, y)
        grads = torch.autograd.grad(loss, list(params.values()))
        with torch.no_grad():
            for p, g in zip(params.values(), grads):
                p -= 0.05 * g
    else:  # torch.func
        grads = torch.func.grad(loss_of)({k: v.detach() for k, v in params.items()}, x, y)
        with torch.no_grad():
            for k, p in params.items():
                p -= 0.05 * grads[k]
result("iterations", iterations)
result("final", exact(loss_of(params, *data.tensors).detach()))
"""


@pytest.mark.parametrize("mode", ["autograd.grad", "torch.func"])
def test_loops_without_optimizer_or_backward_are_steps(zygote, tmp_path, mode):
    steps = one_step_per_iteration(run_pair(zygote, tmp_path, FUNCTIONAL, env={"MODE": mode}))
    for s in steps:
        assert boundary_flags(s) == wire.FLAG_FALLBACK_BOUNDARY
        assert s.backward_s > 0 and s.data_wait_s > 0
        assert phase_sum(s) <= s.step_s + STEP_TOL_S


# ---- memory: a sweep in one process frees every finished trial -----------------------------------
SWEEP = """
import gc
alive = []
for trial in range(3):
    model = make_model(trial)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for x, y in DataLoader(make_data(), batch_size=8):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    refs = [weakref.ref(model), weakref.ref(opt), weakref.ref(next(model.parameters()))]
    del model, opt, x, y
    gc.collect()
    alive.append([r() is not None for r in refs])
result("alive", alive)
"""


def test_sweep_frees_each_trials_model_and_optimizer(zygote, tmp_path):
    pair = run_pair(zygote, tmp_path, SWEEP)
    assert pair.plain["alive"] == [[False] * 3] * 3  # the test program itself holds nothing
    assert pair.probed["alive"] == pair.plain["alive"]
    assert len(pair.steps()) == 12


# ---- decisive evidence: the first non-finite loss at its exact step -----------------------------
DIVERGING = """
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
losses = []
for i, (x, y) in enumerate(DataLoader(make_data(200), batch_size=4)):
    opt.zero_grad()
    loss = ((model(x) - y) ** 2).mean()
    if i == 2:
        loss = loss * float("inf")  # inf at step 3
    if i >= 4:
        loss = loss * float("nan")  # NaN from step 5 on
    loss.backward()
    opt.step()
    losses.append(repr(float(torch.Tensor.__float__(loss.detach()))))
result("losses", losses)
"""


def test_first_non_finite_loss_is_caught_at_its_exact_step(zygote, tmp_path):
    pair = run_pair(zygote, tmp_path, DIVERGING)  # default loss interval: only the first steps' rule
    steps = pair.steps()
    assert len(steps) == 50
    assert all(s.flags & wire.FLAG_HAS_LOSS for s in steps), "every step's loss is read at first"
    assert [repr(s.loss) for s in steps] == pair.probed["losses"]
    assert steps[2].loss == math.inf and all(math.isfinite(s.loss) for s in steps[:2])
    # the inf at step 3 turns the weights to NaN: every later loss is NaN, and step 3 is where
    # the divergence began
    first = [s.step for s in steps if s.flags & wire.FLAG_LOSS_FIRST_NONFINITE]
    assert first == [3]
    assert all(math.isnan(s.loss) for s in steps[3:])


# ---- processes ------------------------------------------------------------------------------
EXIT_EARLY = """
model = make_model()
opt = torch.optim.SGD(model.parameters(), lr=0.05)
for x, y in DataLoader(make_data(40), batch_size=4):
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    opt.step()
sys.stdout.flush()
os._exit(0)  # no atexit, no flush: what was sent is what the daemon has
"""


def test_steps_reach_the_daemon_before_os_exit(zygote, tmp_path):
    pair = run_pair(zygote, tmp_path, EXIT_EARLY)
    # all ten: the last next() on the exhausted DataLoader ends the last step, which goes out at
    # once (the first steps are sent one datagram each)
    assert [s.step for s in pair.steps()] == list(range(1, 11))


HOGWILD = """
import torch.multiprocessing as mp

def train(rank, model):
    torch.set_num_threads(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for x, y in DataLoader(make_data(16, seed=rank), batch_size=4):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    result(f"worker{rank}", os.getpid())

if __name__ == "__main__":
    model = make_model()
    model.share_memory()
    ctx = mp.get_context(os.environ["START"])
    workers = [ctx.Process(target=train, args=(rank, model)) for rank in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    result("exitcodes", [w.exitcode for w in workers])
"""


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_every_process_of_a_hogwild_job_is_recorded(tmp_path, start):
    """Real interpreters with the bootstrap on PYTHONPATH, as under `profilerd run`: spawned
    children are new interpreters that must install the probes themselves."""
    boot = make_bootstrap_dir(tmp_path)
    sock_dir = short_socket_dir()
    rx = Receiver(sock_dir / "ingest.sock")
    source = PRELUDE.replace('PROBED = os.environ["PROBED"] == "1"', "PROBED = False") + HOGWILD
    script = write_script(tmp_path, source)
    try:
        proc = run_python(
            [str(script)],
            rx.path,
            cwd=tmp_path,
            env={"PYTHONPATH": str(boot), "PROBED": "0", "START": start},
            timeout=120,
        )
    finally:
        rx.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    res = {k: json.loads(v) for k, v in parse_kv(proc.stdout).items()}
    assert res["exitcodes"] == [0, 0]
    only_profilerd_lines(proc.stderr)
    for rank in (0, 1):
        steps = rx.steps(res[f"worker{rank}"])
        assert [s.step for s in steps] == [1, 2, 3, 4], f"worker {rank}"
        assert rx.bodies("hello", res[f"worker{rank}"])


MORE_IDIOMS = """
from torch.utils.checkpoint import checkpoint
from torch.utils.data import IterableDataset


class Stream(IterableDataset):
    def __iter__(self):
        data = make_data(24)
        yield from zip(*data.tensors)


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = make_model()

    def forward(self, x):
        return checkpoint(self.body, x, use_reentrant=os.environ["REENTRANT"] == "1")


model = nn.DataParallel(Checkpointed())  # on CPU: runs the module itself
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
scaler = torch.amp.GradScaler("cpu")
iterations = 0
for x, y in DataLoader(Stream(), batch_size=4):
    iterations += 1
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x.requires_grad_())
    loss = ((out.float() - y) ** 2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
result("iterations", iterations)
result("final", exact(loss.detach()))
result("hooks", module_hooks(model))
"""


@pytest.mark.parametrize("reentrant", ["0", "1"])
def test_checkpoint_dataparallel_autocast_and_grad_scaler(zygote, tmp_path, reentrant):
    pair = run_pair(zygote, tmp_path, MORE_IDIOMS, env={"REENTRANT": reentrant})
    steps = one_step_per_iteration(pair)
    assert pair.probed["hooks"] == {"global": 0, "modules": 0, "parameters": 0}
    for s in steps:
        assert s.backward_s > 0 and s.optimizer_s > 0 and s.flags & wire.FLAG_HAS_SCALE
        assert phase_sum(s) <= s.step_s + STEP_TOL_S
    assert pair.rx.bodies("config", pair.probed["pid"])[-1]["autocast"] == {"enabled": True, "dtype": "bfloat16"}
