"""How far off is ``launch/estimate.py``? Its estimate next to the measured peak memory of real runs on this machine.

    .venv/bin/python benchmarks/estimate_check.py --out docs/estimate_check.md

A random-init model of SmolLM2-135M's shape (30 layers x 576, 9 heads / 3 key-value heads, MLP 1536, 49k
vocabulary, tied embeddings), fp32 as on CPU, synthetic pairs of fixed lengths; each configuration is fresh
processes running the real recipe for 2 optimizer steps. Measured: per process, the peak resident set size minus the
resident size just before the recipe's setup (after imports and process-group start: what a GPU's memory would not
hold; the model code, datasets and peft imported too); the largest process; glibc told to map every
allocation over 64 KiB on its own (``MALLOC_MMAP_THRESHOLD_``), so that freed tensors leave the resident set. Estimated: ``ds_dpo.estimate`` for the same keys with ``device: cpu``; on a CPU machine
the offloaded states live in the same memory, so they are added (their share per process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmark import free_port, machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)
BASE = {
    "per_device_train_batch_size": 4,
    "max_steps": 2,
    "save_steps": 0,
    "learning_rate": 1e-6,
    "scoring_self_check": False,
    "logging_steps": 1,
}
# name: (processes, prompt tokens, completion tokens, keys)
RUNS = {
    "ZeRO-3, shared rows": (1, 256, 128, {}),
    "ZeRO-3, padded rows": (1, 256, 128, {"padding_free": False}),
    "ZeRO-2, shared rows": (1, 256, 128, {"deepspeed": "ds_configs/zero2.json"}),
    "ZeRO-3, checkpointing, 2 x (1024 + 2 x 512)": (
        1,
        1024,
        512,
        {"gradient_checkpointing": True, "per_device_train_batch_size": 2},
    ),
    "ZeRO-3 + offload, checkpointing": (
        1,
        256,
        128,
        {"deepspeed": "ds_configs/zero3_offload.json", "gradient_checkpointing": True},
    ),
    "LoRA, reference = adapters off": (1, 256, 128, {"use_peft": True, "reference": "lora"}),
    "ZeRO-3, 2 ranks": (2, 256, 128, {}),
}


def prepare(work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ds_dpo.data import builtin
    from ds_dpo.data.tokenization import load_tokenizer

    if (work / "policy" / "config.json").exists():
        return
    tokenizer = load_tokenizer(builtin.materialize(work / "builtin", seed=0)["model_name_or_path"])
    config = LlamaConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=4096,
        **SHAPE,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(work / "policy")
    tokenizer.save_pretrained(work / "policy")


def keys(work: Path, name: str) -> dict:
    _, prompt, completion, extra = RUNS[name]
    data = work / f"pairs-{prompt}-{completion}.jsonl"
    if not data.exists():
        rows = [
            {
                "prompt_input_ids": [5 + (i + j) % 200 for j in range(prompt)],
                "chosen_input_ids": [7 + (i * j) % 300 for j in range(completion)],
                "rejected_input_ids": [9 + (i + 2 * j) % 250 for j in range(completion)],
            }
            for i in range(16)
        ]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        **BASE,
        "model_name_or_path": str(work / "policy"),
        "dataset": str(data),
        "dataset_format": "tokenized",
        "max_length": prompt + completion + 1,
        "output_dir": str(work / "runs" / name.replace(" ", "_")),
        "dataset_cache_dir": str(work / "cache"),
        **extra,
    }


def rss_mib() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) / 1024


def worker(work: Path, name: str) -> None:
    import datasets  # noqa: F401  (code a GPU's memory never holds: imported before the baseline)
    import peft  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    from ds_dpo.config import make_config
    from ds_dpo.distributed import init_distributed
    from ds_dpo.training.recipe import DPORecipe

    cfg = make_config(keys(work, name))
    cfg.validate()
    init_distributed(cfg.parallel.ddp_timeout)
    before = rss_mib()
    recipe = DPORecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    torch.distributed.destroy_process_group()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps({"measured_mib": peak - before}), flush=True)


def estimated_mib(work: Path, name: str) -> tuple[float, dict]:
    from transformers import AutoConfig

    from ds_dpo.config import make_config
    from ds_dpo.estimate import ModelShape, estimate, setup_of, workload
    from ds_dpo.models.ds_config import resolve_deepspeed_config

    nproc, prompt, completion, _ = RUNS[name]
    cfg = make_config(keys(work, name))
    config = AutoConfig.from_pretrained(cfg.model.model_name_or_path)
    work_ = workload(cfg, config, nproc, nproc, prompt, completion, device="cpu")
    result = estimate(ModelShape.of(config), setup_of(cfg, resolve_deepspeed_config(cfg, nproc)), work_)
    return (result.total + result.cpu_bytes_per_node / nproc) / 2**20, result.parts


def measure(work: Path, name: str) -> float:
    nproc = RUNS[name][0]
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc)),
        # glibc keeps freed heap memory resident (measured: 7.6 GiB resident after a step whose live tensors are
        # ~3 GiB); with every allocation over 64 KiB its own mapping, freed tensors leave the resident set and its
        # peak follows the live tensors, as a GPU allocator's peak does
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    logs = [work / "logs" / f"{name.replace(' ', '_')}.rank{r}.log" for r in range(nproc)]
    logs[0].parent.mkdir(exist_ok=True)
    procs = []
    for r, log in enumerate(logs):  # to files: a rank blocked on a full pipe would hang the others in a collective
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", name, "--work", str(work)],
                    env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    results = []
    for proc, log in zip(procs, logs):
        proc.wait()
        out = log.read_text()
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"{name} failed:\n{out[-4000:]}")
        results.append(json.loads(lines[-1].removeprefix("RESULT "))["measured_mib"])
    return max(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "estimate_check")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "estimate_check.md")
    parser.add_argument("--only", nargs="*", choices=list(RUNS))
    parser.add_argument("--reuse", action="store_true", help="take the measurements of an earlier run from --work")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.work, args.worker)
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work)
    cache = args.work / "measured.json"  # measurements are kept: --reuse re-estimates without re-running
    measured_mib = json.loads(cache.read_text()) if args.reuse and cache.exists() else {}
    rows, errors = [], []
    for name in args.only or RUNS:
        estimate, parts = estimated_mib(args.work, name)
        if name not in measured_mib:
            measured_mib[name] = measure(args.work, name)
            cache.write_text(json.dumps(measured_mib, indent=1))
        measured = measured_mib[name]
        errors.append(estimate / measured - 1)
        rows.append(
            f"| {name} | {estimate / 1024:.2f} | {measured / 1024:.2f} | {errors[-1]:+.0%} | "
            + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items())
            + " |"
        )
        print(rows[-1], flush=True)
    table = "\n".join(
        [
            "# launch/estimate.py against measured runs",
            "",
            f"Produced by `python benchmarks/estimate_check.py` on {time.strftime('%Y-%m-%d')}; do not edit by hand.",
            "",
            f"- Machine: {machine()}.",
            "- Model: random-init Llama of SmolLM2-135M's shape (30 x 576, 49k vocabulary, tied embeddings), fp32; a "
            "ZeRO-3 reference engine unless said; synthetic pairs: 4 per micro-batch of 256 prompt + 2 x 128 "
            "completion tokens unless said; 2 optimizer steps of the real recipe in fresh processes.",
            "- Measured (glibc's `MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors leave the resident set): the largest process's peak resident memory minus its resident memory just before the recipe's "
            "setup (Python, torch, DeepSpeed, transformers' model code, datasets and peft imported, process group up). Estimated: `ds_dpo.estimate` for the same "
            "keys with the CPU's attention kernels, offloaded states added (same memory on a CPU machine).",
            "",
            "| run | estimated GiB | measured GiB | error | estimate by part (GiB) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Mean absolute error {sum(map(abs, errors)) / len(errors):.0%}, largest {max(errors, key=abs):+.0%}.",
            "",
        ]
    )
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
