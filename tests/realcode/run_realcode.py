"""Runs public training code unchanged, plainly and under `profilerd run`, and compares (the
"Real code" table of docs/compatibility.md). Nothing is vendored: prepare a scratch folder

    ROOT/pytorch+examples     git clone https://github.com/pytorch/examples
    ROOT/karpathy+nanoGPT     git clone https://github.com/karpathy/nanoGPT
    ROOT/karpathy+minGPT      git clone https://github.com/karpathy/minGPT
    ROOT/pylib, pylib-pl, pylib-mpl   pip install --target DIR transformers accelerate / lightning /
                              matplotlib (then delete any torch and nvidia packages pip put there)

then: REALCODE_DIR=ROOT python tests/realcode/run_realcode.py JOB... (jobs: see JOBS;
REALCODE_TIMEOUT_SCALE=3 gives each job three times its timeout on a loaded machine). Each
profiled run gets its own XDG_RUNTIME_DIR and PROFILERD_DATA_DIR, so `profilerd run` starts its
own daemon as for a new user. Results go to ROOT/runs/JOB/{plain,profiled}/.
"""

import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("REALCODE_DIR", "/tmp/realcode"))
# On a shared, loaded VM a job can take several times its usual time, plainly as well.
TIMEOUT_SCALE = float(os.environ.get("REALCODE_TIMEOUT_SCALE", "1"))
HERE = Path(__file__).resolve().parent
PY = sys.executable
PROFILERD = str(Path(sys.executable).parent / "profilerd")
JOBS = {}


def job(name, workdir_setup, argv, compare, env=None, timeout=300):
    JOBS[name] = dict(setup=workdir_setup, argv=argv, compare=compare, env=env or {}, timeout=timeout)


def words_corpus(d: Path) -> None:
    rng = random.Random(0)
    vocab = [f"w{k}" for k in range(300)]
    weights = [1 / (k + 1) for k in range(300)]
    (d / "data").mkdir(exist_ok=True)
    for split, lines in (("train", 1500), ("valid", 150), ("test", 150)):
        text = "\n".join(" ".join(rng.choices(vocab, weights, k=rng.randint(8, 20))) for _ in range(lines))
        (d / "data" / f"{split}.txt").write_text(text + "\n")


def copy_tree(src: Path):
    def setup(d: Path) -> None:
        shutil.copytree(src, d, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))

    return setup


def corpus() -> str:
    """Shakespeare-like lines (and the prompt chargpt samples from), made up here."""
    rng = random.Random(1)
    words = [
        "First",
        "Citizen:",
        "Before",
        "we",
        "proceed",
        "any",
        "further,",
        "hear",
        "me",
        "speak.",
        "All:",
        "Speak,",
        "speak.",
        "First",
        "Citizen:",
        "You",
        "are",
        "all",
        "resolved",
        "rather",
        "to",
        "die",
        "than",
        "to",
        "famish?",
        "All:",
        "Resolved.",
        "resolved.",
        "First",
        "Citizen:",
        "First,",
        "you",
        "know",
        "Caius",
        "Marcius",
        "is",
        "chief",
        "enemy",
        "to",
        "the",
        "people.",
    ]
    return "O God, O God!\n" + "\n".join(" ".join(rng.sample(words, 8)) for _ in range(4000)) + "\n"


def nanogpt_setup(d: Path) -> None:
    import numpy as np

    copy_tree(ROOT / "karpathy+nanoGPT")(d)
    data = d / "data" / "shakespeare_char"
    text = corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    cut = int(len(ids) * 0.9)
    ids[:cut].tofile(data / "train.bin")
    ids[cut:].tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def mingpt_setup(d: Path) -> None:
    (d / "input.txt").write_text(corpus())


def tsp_setup(d: Path) -> None:
    copy_tree(ROOT / "pytorch+examples" / "time_sequence_prediction")(d)
    # generate_sine_wave.py's recipe, at 20 waves of 100 points instead of 100 of 1000 (CPU time)
    script = (d / "generate_sine_wave.py").read_text().replace("L = 1000", "L = 100").replace("N = 100", "N = 20")
    subprocess.run([PY, "-c", script], cwd=d, check=True)


WLM = ROOT / "pytorch+examples" / "word_language_model"
job(
    "word_language_model",
    lambda d: (copy_tree(WLM)(d), words_corpus(d)),
    [
        PY,
        "main.py",
        "--data",
        "data",
        "--emsize",
        "32",
        "--nhid",
        "32",
        "--epochs",
        "2",
        "--log-interval",
        "10",
        "--save",
        "model.pt",
    ],
    r"valid loss|test loss|Exiting",
)
job(
    "time_sequence_prediction",
    tsp_setup,
    [PY, "train.py", "--steps", "4"],
    r"^(STEP|loss|test loss)",
    env={"PYTHONPATH": str(ROOT / "pylib-mpl"), "MPLBACKEND": "Agg", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"},
)
NANO = [
    "--device=cpu",
    "--eval_iters=5",
    "--eval_interval=20",
    "--log_interval=5",
    "--block_size=64",
    "--batch_size=8",
    "--n_layer=2",
    "--n_head=2",
    "--n_embd=64",
    "--dropout=0.0",
]
job(
    "nanogpt",
    nanogpt_setup,
    [
        PY,
        "train.py",
        "config/train_shakespeare_char.py",
        *NANO,
        "--compile=False",
        "--max_iters=60",
        "--lr_decay_iters=60",
    ],
    r"^(step \d+:|iter \d+: loss [\d.]+)",
)
job(
    "nanogpt_compile",
    nanogpt_setup,
    [
        PY,
        "train.py",
        "config/train_shakespeare_char.py",
        *NANO,
        "--compile=True",
        "--max_iters=30",
        "--lr_decay_iters=30",
    ],
    r"^(step \d+:|iter \d+: loss [\d.]+)",
    timeout=600,
)
job(
    "mingpt_chargpt",
    mingpt_setup,
    [
        PY,
        str(ROOT / "karpathy+minGPT/projects/chargpt/chargpt.py"),
        "--model.model_type=gpt-nano",
        "--trainer.max_iters=60",
        "--trainer.device=cpu",
        "--trainer.batch_size=16",
        "--data.block_size=64",
    ],
    r"train loss [\d.]+$|^iter \d+",
    env={"PYTHONPATH": str(ROOT / "karpathy+minGPT")},
)
job(
    "hf_trainer",
    lambda d: shutil.copy(HERE / "hf_trainer.py", d),
    [PY, "hf_trainer.py"],
    r"'loss': [\d.]+|final train loss",
    env={"PYTHONPATH": str(ROOT / "pylib")},
)

job(
    "lightning_mlp",
    lambda d: shutil.copy(HERE / "lightning_mlp.py", d),
    [PY, "lightning_mlp.py"],
    r"final loss",
    env={"PYTHONPATH": str(ROOT / "pylib-pl")},
)


def run(name, mode):
    spec = JOBS[name]
    base = ROOT / "runs" / name / mode
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    work = base / "work"
    work.mkdir()
    spec["setup"](work)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROFILERD_")}
    env.update(spec["env"])
    env["PATH"] = str(Path(PY).parent) + os.pathsep + env["PATH"]
    argv = list(spec["argv"])
    if mode == "profiled":
        # Under ROOT, so two scratch folders (two engineers) never share a daemon; short for AF_UNIX.
        runtime = ROOT / "rt" / name[:8]
        shutil.rmtree(runtime, ignore_errors=True)
        runtime.mkdir(mode=0o700, parents=True)
        env.update(XDG_RUNTIME_DIR=str(runtime), PROFILERD_DATA_DIR=str(base / "pd-data"), PROFILERD_HTTP_PORT="0")
        argv = [PROFILERD, "run", "--no-status", "--json", str(base / "verdict.json"), "--", *argv]
    started = time.monotonic()
    try:
        proc = subprocess.run(
            argv, cwd=work, env=env, capture_output=True, text=True, timeout=spec["timeout"] * TIMEOUT_SCALE
        )
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = "timeout", exc.stdout or "", exc.stderr or ""
        out = out.decode() if isinstance(out, bytes) else out
        err = err.decode() if isinstance(err, bytes) else err
    wall = time.monotonic() - started
    (base / "stdout.txt").write_text(out)
    (base / "stderr.txt").write_text(err)
    pattern = re.compile(spec["compare"])
    results = [line.strip() for line in out.splitlines() + err.splitlines() if pattern.search(line)]
    results = [
        re.sub(r"time:?\s*[\d.]+s|ms/batch\s*[\d.]+|time [\d.]+ms|mfu -?[\d.]+%|iter_dt [\d.]+ms;?", "", r)
        for r in results
    ]
    verdict = json.loads((base / "verdict.json").read_text()) if (base / "verdict.json").exists() else None
    summary = dict(exit=code, wall_s=round(wall, 1), results=results, stderr_tail=err.splitlines()[-12:])
    if verdict:
        summary["verdict"] = {
            k: verdict.get(k) for k in ("primary", "summary", "steps", "ranks", "fractions", "phases")
        }
        summary["verdict"]["recommendations"] = [r.get("title") for r in verdict.get("recommendations", [])][:3]
    (base / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    for name in sys.argv[1:]:
        plain, prof = run(name, "plain"), run(name, "profiled")
        same = plain["results"] == prof["results"]
        print(
            f"== {name}: exit plain {plain['exit']} ({plain['wall_s']} s), "
            f"profiled {prof['exit']} ({prof['wall_s']} s), results equal: {same}"
        )
        if not same:
            print("  plain   :", plain["results"][-4:])
            print("  profiled:", prof["results"][-4:])
        print("  verdict:", json.dumps(prof.get("verdict"))[:600])
        if prof["exit"] != 0 or plain["exit"] != 0:
            print("  plain stderr:", "\n   ".join(plain["stderr_tail"][-6:]))
            print("  profiled stderr:", "\n   ".join(prof["stderr_tail"]))
        sys.stdout.flush()
