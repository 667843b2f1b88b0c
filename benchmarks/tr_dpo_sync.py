"""TR-DPO's reference sync: peak memory and time of ds_dpo's shard-by-shard mix vs TRL's gathered one.

    .venv/bin/python benchmarks/tr_dpo_sync.py --model outputs/smollm2-135m-instruct --out docs/tr_dpo_sync.md

Runs 2 ranks (CPU, gloo), each with the run's real policy and reference ZeRO-3 engines (``DPORecipe.setup`` with
``sync_ref_model``). On each rank it measures the growth of the process's peak resident memory (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``) and the time of one mix done two ways from the same reference:
ds_dpo's (``ReferenceSync.mix``: every rank mixes the partitions it holds) and TRL 1.16's ``SyncRefModelCallback``
under ZeRO-3 (both models gathered whole on every rank inside ``deepspeed.zero.GatheredParameters``, mixed on rank
0, scattered back). Both must give the same reference (checked: the largest difference is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ALPHA = 0.6


def rss_peak_growth(fn) -> tuple[float, float]:
    """(MiB the peak resident memory rose above the resident memory before ``fn``, seconds ``fn`` took)."""

    def status(key: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key))
        return int(line.split()[1]) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # peak resident memory := resident memory now
    before = status("VmRSS:")
    started = time.perf_counter()
    fn()
    return (status("VmHWM:") - before) / 2**20, time.perf_counter() - started


def gathered_mix(policy, reference) -> None:
    """TRL 1.16's ``SyncRefModelCallback.sync_target_model`` under ZeRO-3, as it does it."""
    import deepspeed
    import torch

    params = list(policy.parameters()) + list(reference.parameters())
    with torch.no_grad(), deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if torch.distributed.get_rank() == 0:
            for target, source in zip(reference.parameters(), policy.parameters(), strict=True):
                target.data.mul_(1.0 - ALPHA).add_(source.data, alpha=ALPHA)


def worker(args) -> None:
    import torch

    from ds_dpo.config import load_config
    from ds_dpo.training.recipe import DPORecipe

    keys = dict(
        output_dir=str(args.work / "run"),
        max_steps=1,
        save_steps=0,
        sync_ref_model=True,
        ref_model_mixup_alpha=ALPHA,
        per_device_train_batch_size=1,
    )
    if args.model:
        keys.update(model_name_or_path=str(args.model), dataset=str(args.work / "pairs.jsonl"))
    recipe = DPORecipe(load_config([part for k, v in keys.items() for part in (f"--{k}", str(v))]))
    recipe.setup()
    sync, shards = recipe.reference_sync, lambda: [s.clone() for _, _, s, _ in recipe.reference_sync._shards()]
    start = shards()
    ours = rss_peak_growth(sync.mix)
    mixed = shards()
    for (_, _, shard, _), value in zip(sync._shards(), start):
        shard.copy_(value)
    sync._refresh()
    trl = rss_peak_growth(lambda: gathered_mix(recipe.policy.module, recipe.reference.engine.module))
    difference = max((a - b).abs().max().item() for a, b in zip(mixed, shards()))
    numel = sum(p.ds_numel for p in recipe.policy.module.parameters())
    line = dict(rank=recipe.rank, params=numel, ours=ours, trl=trl, difference=difference)
    print("RESULT " + json.dumps(line), flush=True)
    recipe.cleanup()
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a causal LM directory (default: the built-in tiny model)")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "tr_dpo_sync")
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    args.work.mkdir(parents=True, exist_ok=True)
    pair = {"prompt": "Say something kind.", "chosen": " You did well today.", "rejected": " No."}
    (args.work / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561", "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}
    cmd = [sys.executable, __file__, "--worker", "--work", str(args.work)] + (
        ["--model", str(args.model)] if args.model else []
    )
    ranks = [
        subprocess.Popen(cmd, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    results = []
    for rank in ranks:
        out, _ = rank.communicate()
        if rank.returncode:
            sys.exit(f"a rank failed ({rank.returncode}):\n{out[-3000:]}")
        results += [json.loads(x[len("RESULT ") :]) for x in out.splitlines() if x.startswith("RESULT ")]
    results.sort(key=lambda r: r["rank"])
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if git("status", "--porcelain") else "")
    lines = [
        "# TR-DPO reference sync: shard by shard vs gathered",
        "",
        f"Model: {args.model.name if args.model else 'the built-in tiny model'} ({results[0]['params'] / 1e6:.1f}M "
        f"parameters, fp32), 2 ranks, ZeRO-3 policy and reference; commit {commit}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only. "
        "Growth of each process's peak resident memory during one mix (alpha 0.6), and its time.",
        "",
        "| rank | ds_dpo (each rank its partitions) | TRL 1.16 way (both models gathered, mixed on rank 0) |",
        "| --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['rank']} | {r['ours'][0]:.1f} MiB, {r['ours'][1]:.3f} s | {r['trl'][0]:.1f} MiB, {r['trl'][1]:.3f} s |"
        )
    lines += ["", f"Largest difference between the two mixed references: {max(r['difference'] for r in results):.2e}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
