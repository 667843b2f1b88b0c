"""Long pairs: the longest pair (prompt + chosen + rejected tokens) that trains within a per-process memory budget,
and the step time at each length — ds_dpo without and with sequence parallelism (2 ranks) vs TRL 1.16's DPOTrainer.

    .venv/bin/python benchmarks/long_context.py --lengths 4096 8192 16384 32768 --out docs/long_context.md

One random-init Llama (the same weights for every run) as policy and a second one as reference; one synthetic pair
per length (random token ids: prompt half of the pair, chosen and rejected a quarter each), one pair per optimizer
step, fp32, gradient checkpointing on in both trainers (what a long-context run uses), 1 warm-up + 1 timed step.
Each run is fresh processes with the address space of each process capped (``--limit_gb``): a run that cannot fit
fails its allocation and is recorded as out of memory, instead of driving the machine into the OOM killer. Memory is
each process's peak resident set size over its whole life, the largest over the processes. ds_dpo runs its defaults
(ZeRO-3 engines, prefix-shared rows, block attention, chunked log-probs) without the startup self-check (it would
score the first pair three more times); ``sp=2`` is two processes sharing the pair
(``sequence_parallel_size: 2``), each holding half of the row. TRL runs one process (its DPO has no sequence
parallelism). ``Run`` and ``measure`` serve benchmarks/scaling.py as well (several pairs per step, data-parallel
ranks, ``deepspeed: auto``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmark import PeakRSS, free_port, machine, print_result, timed_steps, timed_trl

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=32000,
    tie_word_embeddings=False,
)
RUNS = {  # name -> the Run fields besides the length
    "ds_dpo, sp=1": dict(trainer="ds_dpo"),
    "ds_dpo, sp=2": dict(trainer="ds_dpo", nproc=2, sp=2),
    "TRL DPOTrainer": dict(trainer="trl"),
}


@dataclass(frozen=True)
class Run:
    """One measured run: ``trainer`` on ``nproc`` fresh processes taking ``steps`` optimizer steps (the first
    ``warmup`` of them not timed) of ``pairs`` synthetic pairs of ``length`` tokens (``pair-{length}.jsonl``, read in
    order and from the start again when it ends), split evenly over the ``nproc // sp`` data-parallel ranks; gradient
    checkpointing on."""

    trainer: str  # "ds_dpo" or "trl"
    length: int
    nproc: int = 1
    sp: int = 1  # ds_dpo's sequence_parallel_size: that many processes share each pair
    pairs: int = 1
    steps: int = 2
    warmup: int = 1
    deepspeed: str | None = None  # ds_dpo's `deepspeed` key; None: its default preset (ds_configs/zero3.json)

    @property
    def tag(self) -> str:
        return (
            f"{self.trainer}-{self.length}-{self.nproc}proc-sp{self.sp}-{self.pairs}pairs-{self.deepspeed or 'default'}"
        )

    @property
    def per_rank(self) -> int:
        return self.pairs // (self.nproc // self.sp)

    def rows(self, rank: int, available: int) -> list[list[int]]:
        """Each step's pair indices for process ``rank``: its data-parallel rank's slice of the step's pairs, TRL's
        order (accelerate hands process r the r-th of each step's per-device batches)."""
        first = [s * self.pairs + rank // self.sp * self.per_rank for s in range(self.steps)]
        return [[(f + i) % available for i in range(self.per_rank)] for f in first]


def prepare(work: Path, pairs: dict[int, int]) -> None:
    """Policy, reference (with a tokenizer for their pad/EOS ids) and ``pairs[length]`` synthetic pairs of each
    length (``pair-{length}.jsonl``) under ``work``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ds_dpo.data import builtin
    from ds_dpo.data.tokenization import load_tokenizer

    tokenizer = load_tokenizer(builtin.materialize(work / "builtin", seed=0)["model_name_or_path"])
    config = LlamaConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=max(pairs),
        **MODEL,
    )
    for name, seed in (("policy", 0), ("reference", 1)):
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, MODEL["vocab_size"], (n,), generator=g).tolist()  # noqa: E731
    for length, count in pairs.items():
        with open(work / f"pair-{length}.jsonl", "w") as f:
            for _ in range(count):
                pair = {
                    "prompt_input_ids": ids(length // 2),
                    "chosen_input_ids": ids(length // 4),
                    "rejected_input_ids": ids(length - length // 2 - length // 4),
                }
                f.write(json.dumps(pair) + "\n")


def read_pairs(work: Path, length: int) -> list[dict]:
    return [json.loads(line) for line in open(work / f"pair-{length}.jsonl")]


def run_ds_dpo(work: Path, run: Run) -> tuple[list[float], float, PeakRSS]:
    from ds_dpo.config import make_config

    cfg = make_config(
        {
            "model_name_or_path": str(work / "policy"),
            "ref_model_name_or_path": str(work / "reference"),
            "dataset": str(work / f"pair-{run.length}.jsonl"),
            "dataset_format": "tokenized",
            "max_length": run.length + 1,
            "per_device_train_batch_size": run.per_rank,
            "max_steps": run.steps,
            "save_steps": 0,
            "learning_rate": 1e-6,
            "gradient_checkpointing": True,
            "sequence_parallel_size": run.sp,
            "scoring_self_check": False,
            "output_dir": str(work / run.tag),
            "dataset_cache_dir": str(work / "cache"),
            **({"deepspeed": run.deepspeed} if run.deepspeed else {}),
        }
    )
    steps = run.rows(int(os.environ["RANK"]), len(read_pairs(work, run.length)))
    return timed_steps(cfg, steps, run.pairs)


def run_trl(work: Path, run: Run) -> tuple[list[float], float, PeakRSS]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    pairs = read_pairs(work, run.length)
    dataset = Dataset.from_list(
        [
            {
                "prompt_ids": pair["prompt_input_ids"],
                "chosen_ids": pair["chosen_input_ids"],
                "rejected_ids": pair["rejected_input_ids"],
            }
            for pair in (pairs[i % len(pairs)] for i in range(run.pairs * run.steps))
        ]
    )
    args = DPOConfig(
        output_dir=str(work / run.tag),
        per_device_train_batch_size=run.per_rank,
        max_length=run.length + 1,
        max_steps=run.steps,
        learning_rate=1e-6,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        gradient_checkpointing=True,
    )
    return timed_trl(
        model=AutoModelForCausalLM.from_pretrained(work / "policy"),
        ref_model=AutoModelForCausalLM.from_pretrained(work / "reference"),
        args=args,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(work / "policy"),
    )


def worker(work: Path, run: Run, limit_gb: float) -> None:
    limit = int(limit_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print_result(*(run_trl if run.trainer == "trl" else run_ds_dpo)(work, run))


def measure(run: Run, work: Path, limit_gb: float, timeout: int) -> dict:
    """``run`` in fresh processes launched as torchrun would, each with its share of the cores and its address
    space capped at ``limit_gb``: rank 0's step times and mean timed step, the largest process's lifetime peak
    (MiB) and, with
    ``deepspeed: auto``, the preset it picked; ``{"oom": True}`` when it could not fit, ``{"timeout": True}`` when
    it ran past ``timeout`` seconds."""
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(run.nproc),
        "LOCAL_WORLD_SIZE": str(run.nproc),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(max(1, os.cpu_count() // run.nproc)),
    }
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(dataclasses.asdict(run)),
        "--work",
        str(work),
        "--limit_gb",
        str(limit_gb),
    ]
    logs = [work / "logs" / f"{run.tag}.rank{r}.log" for r in range(run.nproc)]
    logs[0].parent.mkdir(exist_ok=True)
    procs = []
    for r, log in enumerate(logs):
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(
                    cmd,
                    env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            )

    def stop():
        for p in procs:
            p.kill()
            p.wait()

    deadline, results = time.time() + timeout, []
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            stop()
            return {"timeout": True}
        out = log.read_text()
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if not lines:
            stop()  # the other rank waits in a collective for the one that failed
            if proc.returncode == -signal.SIGKILL or any(
                s in out for s in ("MemoryError", "can't allocate memory", "DefaultCPUAllocator", "std::bad_alloc")
            ):  # the cap, or the kernel's OOM killer when the machine ran out first
                return {"oom": True}
            raise RuntimeError(f"{run} failed:\n{out[-4000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    preset = re.search(r"deepspeed auto: ds_configs/(\S+)\.json", logs[0].read_text())
    return {
        "times": results[0]["times"],
        "step_s": statistics.mean(results[0]["times"][run.warmup :]),
        "peak_mib": max(r["peak_mib"] for r in results),
        **({"preset": preset.group(1)} if preset else {}),
    }


def report(results: dict, args, machine_line: str, command: str | None = None) -> str:
    def cell(r):
        if r is None:
            return "not run"
        if r.get("oom"):
            return f"out of memory ({args.limit_gb:g} GiB)"
        if r.get("timeout"):
            return f"over {args.timeout} s"
        return f"{r['step_s']:.1f} s, {r['peak_mib'] / 1024:.2f} GiB"

    rows = [
        f"| {length} | " + " | ".join(cell(results[name].get(length)) for name in RUNS) + " |"
        for length in args.lengths
    ]

    def longest(name: str, budget_mib: float) -> str:
        fit = [n for n in args.lengths if (results[name].get(n) or {}).get("peak_mib", float("inf")) <= budget_mib]
        return str(max(fit)) if fit else "none"

    budgets = [b for b in (3, 4, 6, 8) if b < args.limit_gb] + [args.limit_gb]
    fits = [f"| {b:g} GiB | " + " | ".join(longest(name, b * 1024) for name in RUNS) + " |" for b in budgets]
    command = command or f"`{shlex.join(['python', 'benchmarks/long_context.py', *sys.argv[1:]])}`"
    return "\n".join(
        [
            "# Long pairs: ds_dpo with and without sequence parallelism vs TRL 1.16",
            "",
            f"Produced by {command} on {time.strftime('%Y-%m-%d')}; do not edit by hand.",
            "",
            f"- Machine: {machine_line}.",
            f"- Model: random-init Llama {MODEL['num_hidden_layers']} layers x {MODEL['hidden_size']} ({MODEL['num_attention_heads']} "
            f"heads, {MODEL['vocab_size']}-token vocabulary), a different random-init reference; fp32, AdamW, gradient "
            "checkpointing in both trainers.",
            "- One synthetic pair per step: prompt half of its tokens, chosen and rejected a quarter each; 1 warm-up step "
            "and 1 timed step, fresh processes per run.",
            f"- Budget: each process's address space capped at {args.limit_gb:g} GiB (a run that cannot fit fails its "
            "allocation). Cells: the timed step's seconds and the peak resident set size of the largest process over its "
            "whole life (imports and model setup included). ds_dpo sp=2: two processes share the pair, each holding half "
            "of the row (Ulysses all-to-all around the attention); sp=1 and TRL: one process.",
            "",
            "| pair tokens | " + " | ".join(RUNS) + " |",
            "|---|" + "---|" * len(RUNS),
            *rows,
            "",
            f"Longest pair (of those run) whose largest process stayed within a memory budget (from the measured peaks; "
            f"{args.limit_gb:g} GiB is the enforced cap):",
            "",
            "| budget per process | " + " | ".join(RUNS) + " |",
            "|---|" + "---|" * len(RUNS),
            *fits,
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--limit_gb", type=float, default=12.0)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "long_context")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "long_context.md")
    parser.add_argument("--only", nargs="*", choices=list(RUNS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.work, Run(**json.loads(args.worker)), args.limit_gb)
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, dict.fromkeys(args.lengths, 1))
    names = args.only or list(RUNS)
    results: dict[str, dict] = {name: {} for name in RUNS}
    for name in names:
        for length in sorted(args.lengths):
            result = measure(Run(length=length, **RUNS[name]), args.work, args.limit_gb, args.timeout)
            results[name][length] = result
            print(f"{name} {length}: {result}", flush=True)
            if "step_s" not in result:
                break
    table = report(results, args, machine())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
