"""Cost of `profilerd attach` to the target, and how fast a verdict arrives.

A CPU training loop (~5 ms steps) runs in a subprocess and logs every step's time. Each round
runs, in shuffled order, `profilerd attach --once` with L0 only, with L1 (py-spy
--nonblocking) at 10 Hz, and at the default rate (50 Hz), each right after a window with no
observer. The slowdown is the median over rounds of plain step rate / attached step rate.
Also reported: seconds from starting attach to its verdict.

    python benchmarks/bench_attach.py [--rounds 5] [--seconds 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TARGET = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(512, 768), torch.nn.ReLU(), torch.nn.Linear(768, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.utils.data.TensorDataset(torch.randn(4096, 512), torch.randint(0, 10, (4096,)))
    log = open(sys.argv[1], "w", buffering=1)
    while True:
        for x, y in torch.utils.data.DataLoader(data, batch_size=64):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            log.write(f"{time.monotonic()}\\n")
""")


def steps_between(log: Path, start: float, end: float) -> int:
    times = [float(line) for line in log.read_text().split() if line]
    return sum(1 for t in times if start <= t < end)


MODES = {
    "L0 only (--no-stacks)": ("--no-stacks",),
    "L1 at 10 Hz": ("--rate", "10"),
    "L1 at the default rate": (),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=str)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pd-attach-"))
    script = work / "target.py"
    script.write_text(TARGET)
    log = work / "steps.log"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(work), PROFILERD_DATA_DIR=str(work / "data"), PROFILERD_HTTP_PORT="0")
    target = subprocess.Popen([sys.executable, str(script), str(log)], env=env)
    ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
    verdict_s: dict[str, list[float]] = {mode: [] for mode in MODES}
    order = random.Random(args.seed)
    try:
        time.sleep(4.0)  # imports and warm-up
        for _ in range(args.rounds):
            modes = list(MODES)
            order.shuffle(modes)
            for mode in modes:
                # each attached window is compared with a plain window right before it
                start = time.monotonic()
                time.sleep(args.seconds)
                plain = steps_between(log, start, time.monotonic()) / args.seconds
                start = time.monotonic()
                command = [sys.executable, "-m", "profilerd", "attach", str(target.pid), "--once"]
                command += ["--duration", str(args.seconds), *MODES[mode]]
                subprocess.run(command, env=env, capture_output=True, check=True)
                verdict_s[mode].append(time.monotonic() - start)
                # from 1 s in: the attach process's own start-up (imports) is not the target's cost
                attached = steps_between(log, start + 1.0, start + 1.0 + args.seconds - 1.0) / (args.seconds - 1.0)
                ratios[mode].append(plain / attached if attached else float("inf"))
    finally:
        target.kill()
        target.wait()
    result = {
        "attach_duration_s": args.seconds,
        "rounds": args.rounds,
        "modes": {
            mode: {
                "slowdown_ratio_median": round(statistics.median(ratios[mode]), 4),
                "slowdown_ratios": [round(r, 4) for r in ratios[mode]],
                "seconds_to_verdict_median": round(statistics.median(verdict_s[mode]), 2),
            }
            for mode in MODES
        },
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
