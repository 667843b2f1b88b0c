"""Speed and memory of DPO on K = 4 responses per prompt (all 6 pairs of each prompt): the pairs of a prompt trained
together in ds_dpo's prefix-shared rows (the prompt and each response computed once: 1 prompt + 4 responses per
prompt) against the same pairs written out and shuffled, as trainers that take only pairs see them (ds_dpo's
prefix-shared rows then share only within a pair: 6 prompts + 12 responses; TRL 1.16's DPOTrainer computes every
pair's prompt twice), on the same model and pairs (benchmarks/README.md).

    .venv/bin/python benchmarks/ranked.py --out docs/ranked.md

The inputs are benchmark.py's: HH-RLHF harmless-base test tokenized by ds_dpo with a byte-level BPE trained on it,
a random-init Llama (4 layers x 256) as policy and a different one as reference. Each prompt's 4 responses are its own
chosen and rejected reply and those of another HH pair (real lengths; which text is preferred does not change the
cost). Every configuration takes the same warm-up step, then the same pairs over its timed steps, 12 pairs (two
prompts' worth) per step: grouped, each step holds two prompts' 6 pairs each; written out, a seeded permutation of
those pairs. Each configuration runs in a fresh process (1 process, fp32), round-robin over ``--repeats`` rounds;
pairs/s is the median over rounds; memory is the process's peak resident set size and its rise during the steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmark import (  # noqa: E402
    MAX_LENGTH,
    MAX_PROMPT_LENGTH,
    PeakRSS,
    machine,
    model_dirs,
    prepare,
    print_result,
    round_robin,
    run_arguments,
    run_one_process,
    timed_steps,
    timed_trl,
    write_report,
)

K = 4
PAIRS_PER_PROMPT = K * (K - 1) // 2
PROMPTS_PER_STEP = 2
PAIRS_PER_STEP = PROMPTS_PER_STEP * PAIRS_PER_PROMPT
CONFIGS = {  # name -> (trainer, order of the pairs)
    "TRL DPOTrainer, pairs written out": ("trl", "shuffled"),
    "ds_dpo prefix-shared, pairs written out": ("ds_dpo", "shuffled"),
    "ds_dpo prefix-shared, K = 4 responses together": ("ds_dpo", "grouped"),
}


def ranked_pairs(work: Path, data: Path, prompts: int, vocab_size: int, seed: int) -> None:
    """``pairs.jsonl`` under ``work`` (benchmark.py's tokenized HH pairs), regrouped into ``prompts`` prompts with K
    responses each, written as ``ranked.jsonl``: every prompt's 6 pairs, one after another."""
    pairs = prepare(data, work, 2 * prompts, vocab_size, seed, None)
    with open(work / "ranked.jsonl", "w") as f:
        for g in range(prompts):
            other = pairs[prompts + g]
            responses = [
                pairs[g]["chosen_input_ids"],
                pairs[g]["rejected_input_ids"],
                other["chosen_input_ids"],
                other["rejected_input_ids"],
            ]
            for a in range(K):
                for b in range(a + 1, K):
                    f.write(
                        json.dumps(
                            {
                                "prompt_input_ids": pairs[g]["prompt_input_ids"],
                                "chosen_input_ids": responses[a],
                                "rejected_input_ids": responses[b],
                            }
                        )
                        + "\n"
                    )


def step_indices(order: str, total_steps: int, seed: int) -> list[list[int]]:
    """The pairs (rows of ``ranked.jsonl``) of each step: the first (warm-up) step and the set of timed pairs are the
    same for both orders."""
    import torch

    steps = [list(range(s * PAIRS_PER_STEP, (s + 1) * PAIRS_PER_STEP)) for s in range(total_steps)]
    if order == "grouped":
        return steps
    timed = [i for step in steps[1:] for i in step]
    shuffled = [timed[i] for i in torch.randperm(len(timed), generator=torch.Generator().manual_seed(seed)).tolist()]
    return steps[:1] + [shuffled[s : s + PAIRS_PER_STEP] for s in range(0, len(shuffled), PAIRS_PER_STEP)]


def policy_tokens(work: Path, order: str, trainer: str, total_steps: int, seed: int) -> float:
    """Token positions per step through the policy's forward (the reference's is the same), mean over timed steps."""
    from ds_dpo.forward.layouts import PADDED, SHARED, collate_pairs

    rows = [{**json.loads(line), "index": i} for i, line in enumerate(open(work / "ranked.jsonl"))]
    counts = []
    for step in step_indices(order, total_steps, seed)[1:]:
        batch = collate_pairs([rows[i] for i in step], [1.0] * len(step), 0, PADDED if trainer == "trl" else SHARED)
        counts.append(batch["input_ids"].numel())
    return statistics.mean(counts)


def run_ds_dpo(work: Path, order: str, total_steps: int, seed: int) -> tuple[list[float], float, PeakRSS]:
    from ds_dpo.config import make_config

    policy, reference = model_dirs(work, None)
    cfg = make_config(
        {
            "model_name_or_path": str(policy),
            "ref_model_name_or_path": str(reference),
            "dataset": str(work / "ranked.jsonl"),
            "dataset_format": "tokenized",
            "max_length": MAX_LENGTH,
            "max_prompt_length": MAX_PROMPT_LENGTH,
            "per_device_train_batch_size": PAIRS_PER_STEP,
            "max_steps": total_steps,
            "save_steps": 0,
            "learning_rate": 1e-6,
            "output_dir": str(work / "ds_dpo_run"),
            "dataset_cache_dir": str(work / "cache"),
        }
    )
    return timed_steps(cfg, step_indices(order, total_steps, seed), PAIRS_PER_STEP)


def run_trl(work: Path, order: str, total_steps: int, seed: int) -> tuple[list[float], float, PeakRSS]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    rows = [json.loads(line) for line in open(work / "ranked.jsonl")]
    ordered = [rows[i] for step in step_indices(order, total_steps, seed) for i in step]
    dataset = Dataset.from_list(
        [
            {
                "prompt_ids": p["prompt_input_ids"],
                "chosen_ids": p["chosen_input_ids"],
                "rejected_ids": p["rejected_input_ids"],
            }
            for p in ordered
        ]
    )
    args = DPOConfig(
        output_dir=str(work / "trl_run"),
        per_device_train_batch_size=PAIRS_PER_STEP,
        max_length=MAX_LENGTH,
        max_steps=total_steps,
        learning_rate=1e-6,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
    )
    policy, reference = model_dirs(work, None)
    return timed_trl(
        model=AutoModelForCausalLM.from_pretrained(policy),
        ref_model=AutoModelForCausalLM.from_pretrained(reference),
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(policy),
    )


def worker(name: str, work: Path, total_steps: int, seed: int) -> None:
    import torch

    torch.manual_seed(0)
    trainer, order = CONFIGS[name]
    print_result(*(run_trl if trainer == "trl" else run_ds_dpo)(work, order, total_steps, seed))


def run_config(name: str, work: Path, total_steps: int, seed: int) -> dict:
    log = work / "logs" / f"{name.replace(' ', '_').replace(',', '').replace('=', '')}.log"
    return run_one_process(
        name, __file__, ["--work", str(work), "--total_steps", str(total_steps), "--seed", str(seed)], log
    )


def report(results: dict[str, list[dict]], args, machine_line: str) -> str:
    rows = []
    for name, runs in results.items():
        trainer, order = CONFIGS[name]
        rate = statistics.median(PAIRS_PER_STEP * args.steps / sum(r["times"][args.warmup :]) for r in runs)
        rows.append(
            (
                name,
                rate,
                statistics.median(r["peak_mib"] for r in runs),
                statistics.median(r["step_mib"] for r in runs),
                runs[0]["first_loss"],
                policy_tokens(args.work, order, trainer, args.warmup + args.steps, args.seed),
            )
        )
    trl, written_out = rows[0], rows[1]
    lines = [
        "# K responses per prompt: each prompt and response computed once\n",
        f"Produced by `benchmarks/ranked.py --steps {args.steps} --warmup {args.warmup} --repeats "
        f"{args.repeats}`; do not edit by hand. Machine: {machine_line}.\n",
        f"HH-RLHF harmless-base test prompts, K = {K} responses each (its own chosen and rejected reply and "
        f"those of another pair), all {PAIRS_PER_PROMPT} pairs per prompt; tokenized by ds_dpo with an 8192-token "
        "BPE trained on the data; random-init Llama 4 x 256 as policy, a different one as reference; fp32, one "
        f"process, {PAIRS_PER_STEP} pairs per step ({PROMPTS_PER_STEP} prompts' worth), the same "
        f"{PAIRS_PER_STEP * args.steps} pairs over the {args.steps} timed steps of every configuration (after "
        f"{args.warmup} identical warm-up step); {args.repeats} rounds, median. ds_dpo: the default preset "
        "(ZeRO-3 engines for policy and reference). *Tokens*: token positions per step through the policy's "
        "forward (the reference's forward takes as many).\n",
        "| configuration | pairs/s | vs TRL | vs written out | peak MiB | vs TRL | step MiB | tokens | step-1 loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rate, peak, step, loss, tokens in rows:
        lines.append(
            f"| {name} | {rate:.2f} | {rate / trl[1]:.2f}x | {rate / written_out[1]:.2f}x | {peak:.0f} | "
            f"{peak / trl[2]:.2f}x | {step:.0f} | {tokens:.0f} | {loss:.6f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(
            os.environ.get("DS_DPO_HH_DATA", REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz")
        ),
    )
    run_arguments(parser, REPO / "outputs" / "bench_ranked", steps=4, repeats=2)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.work, args.total_steps, args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps
    if not (args.work / "ranked.jsonl").is_file():
        ranked_pairs(args.work, args.data, PROMPTS_PER_STEP * total, args.vocab_size, args.seed)
    results = round_robin(
        list(CONFIGS), lambda name: run_config(name, args.work, total, args.seed), args, PAIRS_PER_STEP
    )
    write_report(report(results, args, machine()), args.out)


if __name__ == "__main__":
    main()
