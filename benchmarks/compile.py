"""What ``torch_compile`` costs and buys: the same short training run eager and with compiled decoder layers.

    .venv/bin/python benchmarks/compile.py          # SmolLM2-135M-Instruct (examples/smollm2-hh/prepare.py), ~10 min

Each run is ``launch/train.py`` in a fresh process, one rank, ZeRO-3, the reference precomputed (so the reference
engine's layers are compiled and run too), prefix-shared rows of HH pairs (at most ``--max_length`` tokens), 4 pairs
per step, every step logged. Columns: the whole command's wall time (model loading, reference pass, compilation,
training); step 1's time (the policy's compilation happens there); pairs/s over the steps after ``--warmup`` (from
``metrics.jsonl``: each step's pairs over its time); the largest relative difference of a step's loss from the eager
run's. The inductor cache is emptied before the compiled run (``TORCHINDUCTOR_CACHE_DIR`` in a fresh temporary
directory), so its compile time is a first run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark import machine

REPO = Path(__file__).resolve().parent.parent


def run(compiled: bool, args, out: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="inductor-"))
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        *("--model_name_or_path", args.model, "--dataset", args.data, "--output_dir", str(out)),
        *("--max_steps", str(args.steps), "--max_samples", str(4 * args.steps), "--max_length", str(args.max_length)),
        *("--per_device_train_batch_size", "4", "--learning_rate", "3e-5", "--reference", "precomputed"),
        *("--logging_steps", "1", "--save_steps", "0", "--report_to", "jsonl", "--scoring_self_check", "false"),
        *("--deepspeed", "ds_configs/zero3.json"),
        *("--torch_compile", str(compiled).lower()),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    steps = [json.loads(line) for line in open(out / "metrics.jsonl") if "loss" in json.loads(line)]
    later = steps[args.warmup :]
    return {
        "wall": wall,
        "first_step": 4 / steps[0]["pairs_per_second"],
        "pairs_per_second": len(later) * 4 / sum(4 / s["pairs_per_second"] for s in later),
        "losses": [s["loss"] for s in steps],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/smollm2-135m-instruct")
    parser.add_argument("--data", default="outputs/smollm2-hh-data/train.jsonl")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of pairs/s")
    parser.add_argument("--max_length", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        eager, compiled = (run(c, args, Path(tmp) / str(c)) for c in (False, True))
    diff = max(abs(a - b) / abs(b) for a, b in zip(compiled["losses"], eager["losses"]))
    print(f"{args.model}, {args.steps} steps of 4 pairs (max_length {args.max_length}); {machine()}\n")
    print(f"| run | command, s | step 1, s | pairs/s after step {args.warmup} | loss vs eager (max rel.) |")
    print("| --- | --- | --- | --- | --- |")
    for name, r, d in (("eager", eager, "-"), ("torch_compile", compiled, f"{diff:.1e}")):
        print(f"| {name} | {r['wall']:.0f} | {r['first_step']:.1f} | {r['pairs_per_second']:.3f} | {d} |")


if __name__ == "__main__":
    main()
