"""Speed and memory of a DPO step, ds_dpo side by side with TRL 1.16's DPOTrainer (benchmarks/README.md).

    .venv/bin/python benchmarks/benchmark.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz
    .venv/bin/python benchmarks/benchmark.py --model outputs/smollm2-135m-instruct \
        --data outputs/smollm2-hh-data/train.jsonl --nproc 2 --out docs/benchmarks_smollm2.md

One invocation prepares the shared inputs once — without ``--model``, a byte-level BPE tokenizer trained on the data
and a random-init policy and a different random-init reference built from one Llama config; with ``--model``, that
pretrained checkpoint as policy and reference with its own tokenizer and chat template; the pairs tokenized and
truncated by ds_dpo's pipeline (``max_length`` 1024) in one seeded order — and then runs every configuration in
fresh processes of its own (``--nproc`` CPU processes, fp32, 8 pairs per optimizer step split evenly over them, the
same pairs in the same order), round-robin, so slow drifts of the machine hit all of them alike. Each run does
``--warmup`` steps, then ``--steps`` timed steps; pairs/s is the median over ``--repeats`` rounds; memory is each
process's peak resident set size and its rise during the steps (sampled every 2 ms), the largest over the processes.
The table goes to ``--out`` (docs/benchmarks.md).

Several processes: ds_dpo runs its DeepSpeed ZeRO-3 engines; TRL runs as its users run it on several CPU processes,
DDP over gloo (``use_cpu``): accelerate 1.15 turns DeepSpeed on only on an accelerator (``PartialState`` takes the
DeepSpeed branch only when not on CPU, and without ``use_cpu`` a CPU-only machine gets no distributed state at all, so
each process sees world size 1 and DeepSpeed's batch-size check fails), so TRL with a ZeRO-3 config cannot run here.

Useful-token efficiency = distinct real tokens (prompt + chosen + rejected per pair) / token positions the step
runs through the model (policy forward, plus the reference forward when it is not precomputed); precomputed
reference log-probs cost one no-grad pass over the data before training, not counted per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PAIRS_PER_STEP = 8
MAX_LENGTH = 1024
MAX_PROMPT_LENGTH = 512
MODEL = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=MAX_LENGTH,
    tie_word_embeddings=False,
)

# name -> (trainer, options); ds_dpo options are DPOConfig fields
CONFIGS = {
    "TRL DPOTrainer (default)": ("trl", {}),
    "TRL DPOTrainer, precompute_ref_log_probs": ("trl", {"precompute_ref_log_probs": True}),
    "TRL DPOTrainer, gradient checkpointing off": ("trl", {"gradient_checkpointing": False}),
    "ds_dpo padded, full logits": ("ds_dpo", {"padding_free": False, "logps_chunk_size": 0}),
    "ds_dpo padded": ("ds_dpo", {"padding_free": False}),
    "ds_dpo padded, precomputed reference": ("ds_dpo", {"padding_free": False, "reference": "precomputed"}),
    "ds_dpo packed": ("ds_dpo", {"prefix_sharing": False}),
    "ds_dpo packed, precomputed reference": ("ds_dpo", {"prefix_sharing": False, "reference": "precomputed"}),
    "ds_dpo packed + prefix sharing": ("ds_dpo", {}),
    "ds_dpo packed + prefix sharing, precomputed reference": ("ds_dpo", {"reference": "precomputed"}),
    # TRL 1.16 checkpoints by default, ds_dpo does not: these match it
    "ds_dpo packed + prefix sharing, gradient checkpointing": ("ds_dpo", {"gradient_checkpointing": True}),
    "ds_dpo packed + prefix sharing, gradient checkpointing, ZeRO off": (
        "ds_dpo",
        {"gradient_checkpointing": True, "deepspeed": "ds_configs/ddp.json"},
    ),
    "ds_dpo packed + prefix sharing, deepspeed auto": ("ds_dpo", {"deepspeed": "auto"}),
    "ds_dpo packed + prefix sharing, gradient checkpointing, deepspeed auto": (
        "ds_dpo",
        {"gradient_checkpointing": True, "deepspeed": "auto"},
    ),
    # a large vocabulary (Gemma 3: 262k) makes each chunk of full-vocabulary logits large: a smaller chunk
    "ds_dpo packed + prefix sharing, gradient checkpointing, logps_chunk_size 256": (
        "ds_dpo",
        {"gradient_checkpointing": True, "logps_chunk_size": 256},
    ),
    "ds_dpo packed + prefix sharing, gradient checkpointing, deepspeed auto, logps_chunk_size 256": (
        "ds_dpo",
        {"gradient_checkpointing": True, "deepspeed": "auto", "logps_chunk_size": 256},
    ),
}


# --- shared inputs ----------------------------------------------------------------------------------------------------


def model_dirs(work: Path, model: Path | None) -> tuple[Path, Path]:
    """Policy and reference checkpoints: the pretrained ``model`` for both, else the random pair ``prepare`` wrote."""
    return (model, model) if model else (work / "policy", work / "reference")


def prepare(
    data: Path,
    work: Path,
    num_pairs: int,
    vocab_size: int,
    seed: int,
    model: Path | None,
    max_length: int = MAX_LENGTH,
) -> list[dict]:
    """Tokenizer, policy and reference directories (unless ``model``) and ``pairs.jsonl`` under ``work`` (pairs cut
    to ``max_length``, prompts to at most half of it); returns the pairs."""
    import gzip

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ds_dpo.config import make_config
    from ds_dpo.data import builtin
    from ds_dpo.data.pipeline import load_preference_data
    from ds_dpo.data.tokenization import load_tokenizer

    if model:
        tokenizer = load_tokenizer(str(model))
    else:
        rows = [json.loads(line) for line in gzip.open(data, "rt")]
        tokenizer = builtin.train_bpe_tokenizer((r[k] for r in rows for k in ("chosen", "rejected")), vocab_size)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **MODEL,
        )
        for name, model_seed in (("policy", seed), ("reference", seed + 1)):
            torch.manual_seed(model_seed)
            AutoModelForCausalLM.from_config(config).save_pretrained(work / name)
            tokenizer.save_pretrained(work / name)
    cfg = make_config(
        {
            "model_name_or_path": str(model_dirs(work, model)[0]),
            "dataset": str(data),
            "on_bad_rows": "skip",
            "max_length": max_length,
            "max_prompt_length": min(MAX_PROMPT_LENGTH, max_length // 2),
            "dataset_cache_dir": str(work / "cache"),
        }
    )
    train, _, _ = load_preference_data(cfg.data, tokenizer, cfg.seed)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:num_pairs].tolist()
    fields = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    pairs = [{k: train[i][k] for k in fields} for i in order]
    with open(work / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    return pairs


def token_positions(pairs: list[dict], layout: str) -> int:
    """Token positions one forward of these pairs runs through the model."""
    lengths = [(len(p["prompt_input_ids"]), len(p["chosen_input_ids"]), len(p["rejected_input_ids"])) for p in pairs]
    if layout == "padded":
        return 2 * len(lengths) * max(pl + max(c, r) for pl, c, r in lengths)
    if layout == "packed":
        return sum(2 * pl + c + r for pl, c, r in lengths)
    return sum(pl + c + r for pl, c, r in lengths)


def efficiency(pairs: list[dict], trainer: str, options: dict) -> float:
    layout = (
        "padded"
        if trainer == "trl" or options.get("padding_free") is False
        else "packed"
        if options.get("prefix_sharing") is False
        else "shared"
    )
    precomputed = options.get("precompute_ref_log_probs") or options.get("reference") == "precomputed"
    distinct = computed = 0
    for s in range(0, len(pairs), PAIRS_PER_STEP):
        step = pairs[s : s + PAIRS_PER_STEP]
        distinct += token_positions(step, "shared")
        computed += token_positions(step, layout) * (1 if precomputed else 2)
    return distinct / computed


# --- one configuration in its own process -----------------------------------------------------------------------------


class PeakRSS:
    """Samples this process's resident set size every 2 ms in a thread while in the ``with`` block: ``start`` and
    ``peak`` in MiB."""

    def __init__(self):
        self.start = self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def current() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.002)

    def __enter__(self):
        self.start = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run_ds_dpo(
    work: Path, model: Path | None, options: dict, total_steps: int, phases: dict
) -> tuple[list[float], float, PeakRSS]:
    from ds_dpo.config import make_config
    from ds_dpo.models import engines

    build_engine = engines.build_engine

    def measured_build_engine(cfg, ds_config, trainable, **kwargs):  # the resident set size each engine adds
        engine = build_engine(cfg, ds_config, trainable, **kwargs)
        phases["policy engine" if trainable else "reference engine"] = PeakRSS.current()
        return engine

    engines.build_engine = measured_build_engine
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    per_rank = PAIRS_PER_STEP // world
    policy, reference = model_dirs(work, model)
    cfg = make_config(
        {
            "model_name_or_path": str(policy),
            "ref_model_name_or_path": str(reference),
            "dataset": str(work / "pairs.jsonl"),
            "dataset_format": "tokenized",
            "max_length": MAX_LENGTH,
            "max_prompt_length": MAX_PROMPT_LENGTH,
            "per_device_train_batch_size": per_rank,
            "max_steps": total_steps,
            "save_steps": 0,
            "learning_rate": 1e-6,
            "output_dir": str(work / "ds_dpo_run"),
            "dataset_cache_dir": str(work / "cache"),
            **options,
        }
    )
    firsts = [s * PAIRS_PER_STEP + rank * per_rank for s in range(total_steps)]  # TRL's order: rank r takes the
    return timed_steps(cfg, [list(range(f, f + per_rank)) for f in firsts], PAIRS_PER_STEP)  # step's r-th slice


def timed_steps(cfg, steps: list[list[int]], global_pairs: int) -> tuple[list[float], float, PeakRSS]:
    """ds_dpo's recipe for ``cfg`` taking one optimizer step per entry of ``steps`` (this rank's pair indices, one
    micro-batch, of a global batch of ``global_pairs``): each step's time, the first step's loss, the memory."""
    import torch

    from ds_dpo.data.sampler import StepPlan
    from ds_dpo.training.recipe import DPORecipe

    cfg.validate()
    recipe = DPORecipe(cfg)
    recipe.setup()
    times, first_loss = [], None
    with PeakRSS() as memory:
        for step, indices in enumerate(steps):
            started = time.perf_counter()
            recipe.train_step(StepPlan([indices], [[1.0] * len(indices)], global_pairs, global_pairs))
            times.append(time.perf_counter() - started)
            if step == 0:
                first_loss = recipe.state.window.reduce()["loss"]
    recipe.cleanup()
    torch.distributed.destroy_process_group()
    return times, first_loss, memory


def recording_trainer(losses: list[float], tokenized: bool = True):
    """TRL's DPOTrainer taking the dataset in file order (with several processes, accelerate hands process r the
    r-th of each step's per-device batches) and appending each step's loss to ``losses``; ``tokenized``: the dataset
    already holds ds_dpo's token ids, which TRL takes as they are."""
    from torch.utils.data import SequentialSampler
    from trl import DPOTrainer

    class Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset if tokenized else super()._prepare_dataset(dataset, *args, **kwargs)

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append(float((loss[0] if isinstance(loss, tuple) else loss).detach()))
            return loss

    return Trainer


def timed_trl(tokenized: bool = True, **trainer_kwargs) -> tuple[list[float], float, PeakRSS]:
    """TRL's DPOTrainer (``recording_trainer``) built with ``trainer_kwargs`` and trained: each step's time, the
    first step's loss, the memory during training."""
    losses, times = [], []
    trainer = recording_trainer(losses, tokenized)(callbacks=[step_timer(times)], **trainer_kwargs)
    with PeakRSS() as memory:
        trainer.train()
    return times, losses[0], memory


def step_timer(times: list[float]):
    """A transformers callback appending each optimizer step's wall time to ``times``."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - self.started)

    return StepTimer()


def run_trl(
    work: Path, model: Path | None, options: dict, total_steps: int, phases: dict
) -> tuple[list[float], float, PeakRSS]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    pairs = [json.loads(line) for line in open(work / "pairs.jsonl")]
    dataset = Dataset.from_list(
        [
            {
                "prompt_ids": p["prompt_input_ids"],
                "chosen_ids": p["chosen_input_ids"],
                "rejected_ids": p["rejected_input_ids"],
            }
            for p in pairs
        ]
    )
    args = DPOConfig(
        output_dir=str(work / "trl_run"),
        per_device_train_batch_size=PAIRS_PER_STEP // int(os.environ["WORLD_SIZE"]),
        max_length=MAX_LENGTH,
        max_steps=total_steps,
        learning_rate=1e-6,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        **options,
    )
    policy, reference = model_dirs(work, model)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    policy_model = AutoModelForCausalLM.from_pretrained(policy)
    phases["policy loaded"] = PeakRSS.current()
    reference_model = AutoModelForCausalLM.from_pretrained(reference)
    phases["reference loaded"] = PeakRSS.current()
    return timed_trl(
        model=policy_model, ref_model=reference_model, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def worker(name: str, work: Path, model: Path | None, total_steps: int) -> None:
    import torch

    phases = {"python + torch": PeakRSS.current()}
    torch.manual_seed(0)
    trainer, options = CONFIGS[name]
    times, first_loss, memory = (run_trl if trainer == "trl" else run_ds_dpo)(work, model, options, total_steps, phases)
    phases |= {"before the steps": memory.start, "steps (peak)": memory.peak}
    print_result(times, first_loss, memory, phases=phases)


def print_result(times: list[float], first_loss: float, memory: PeakRSS, **extra) -> None:
    """A worker process's measurements, as the ``RESULT`` line its parent reads back (``read_result``): step times,
    step-1 loss, the process's lifetime peak and the memory rise during the steps (MiB)."""
    import resource

    lifetime_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux
    print(
        "RESULT "
        + json.dumps(
            {
                "times": times,
                "first_loss": first_loss,
                "peak_mib": lifetime_peak,
                "step_mib": memory.peak - memory.start,
                **extra,
            }
        ),
        flush=True,
    )


class OutOfMemory(Exception):
    """A run the kernel killed (SIGKILL: the machine's memory ran out); the table says so instead of a number."""


def read_result(name: str, returncode: int, log: Path) -> dict:
    """What ``print_result`` printed into ``log``; a worker that failed raises with the end of its output."""
    if returncode == -signal.SIGKILL:
        raise OutOfMemory(name)
    out = log.read_text()
    results = [line for line in out.splitlines() if line.startswith("RESULT ")]
    if returncode != 0 or not results:
        raise RuntimeError(f"{name} failed (exit {returncode}):\n{out[-5000:]}")
    return json.loads(results[-1].removeprefix("RESULT "))


def run_one_process(name: str, script: str, args: list[str], log: Path) -> dict:
    """``python script --worker name ARGS`` as a 1-rank run (torchrun's variables), output to ``log`` (a full pipe
    would stall the run); its ``RESULT``."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "1",
        "LOCAL_WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run(
            [sys.executable, script, "--worker", name, *args], env=env, stdout=f, stderr=subprocess.STDOUT
        ).returncode
    return read_result(name, code, log)


# --- the comparison ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_config(name: str, work: Path, model: Path | None, total_steps: int, nproc: int) -> dict:
    """One run on ``nproc`` processes, launched the way torchrun would (both trainers read the same variables);
    returns rank 0's step times, the mean of the ranks' first losses and the largest per-process memory."""
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc)),
    }
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--work",
        str(work),
        "--total_steps",
        str(total_steps),
        *(["--model", str(model)] if model else []),
    ]
    logs = [work / "logs" / f"{name.replace(' ', '_').replace('/', '_')}.rank{r}.log" for r in range(nproc)]
    logs[0].parent.mkdir(exist_ok=True)
    procs = []
    for r, log in enumerate(logs):  # output to files: a full pipe would stall one rank and the others with it
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
    codes = [proc.wait() for proc in procs]
    if -signal.SIGKILL in codes:  # the other ranks then fail on the lost peer: the kill is the cause
        raise OutOfMemory(name)
    ranks = [read_result(f"{name} rank {r}", code, log) for r, (code, log) in enumerate(zip(codes, logs))]
    return {
        "times": ranks[0]["times"],
        "first_loss": statistics.mean(r["first_loss"] for r in ranks),
        "peak_mib": max(r["peak_mib"] for r in ranks),
        "step_mib": max(r["step_mib"] for r in ranks),
        "phases": max((r["phases"] for r in ranks), key=lambda p: p["steps (peak)"]),
    }


def commit() -> str:
    """The ds_dpo commit the numbers came from (marked when the checkout had uncommitted changes)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" with uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> str:
    """The CPU, cores, RAM, accelerator and library versions the numbers came from, and the ds_dpo commit."""
    import deepspeed
    import torch
    import transformers
    import trl

    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    gpu = f"GPU: {', '.join(gpus)} (the runs here use the CPU)" if gpus else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}; ds_dpo commit {commit()}"
    )


def checkpointing(name: str) -> bool:
    """Whether a configuration recomputes activations: TRL 1.16's default is on, ds_dpo's off."""
    trainer, options = CONFIGS[name]
    return options.get("gradient_checkpointing", trainer == "trl")


def matched_trl(name: str, ran: dict) -> str | None:
    """The TRL row of this run that ``name`` is compared with: TRL at the same gradient checkpointing, nothing else
    changed (None: not in this run)."""
    return next(
        (
            n
            for n in ran
            if CONFIGS[n][0] == "trl"
            and set(CONFIGS[n][1]) <= {"gradient_checkpointing"}
            and checkpointing(n) == checkpointing(name)
        ),
        None,
    )


def report(results: dict[str, list[dict]], pairs: list[dict], args, machine_line: str) -> str:
    base = "TRL DPOTrainer (default)"
    rows, summary = [], {}
    out_of_memory = [name for name, runs in results.items() if not runs]  # killed in every round
    for name, runs in results.items():
        if not runs:
            continue
        rates = [PAIRS_PER_STEP * args.steps / sum(r["times"][args.warmup :]) for r in runs]
        summary[name] = {
            "pairs_s": statistics.median(rates),
            "peak": statistics.median(r["peak_mib"] for r in runs),
            "step": statistics.median(r["step_mib"] for r in runs),
            "loss": runs[0]["first_loss"],
            "eff": efficiency(pairs, *CONFIGS[name]),
        }
    trl = summary[base]
    # matched rows first: each against TRL at the same gradient checkpointing, the others against TRL's default
    ordered = sorted(summary, key=lambda n: (matched_trl(n, summary) is None, CONFIGS[n][0] == "ds_dpo"))
    for name in ordered:
        s, against = summary[name], matched_trl(name, summary) or base
        t = summary[against]
        rows.append(
            f"| {name} | {'on' if checkpointing(name) else 'off'} | {against} | {s['pairs_s']:.2f} | "
            f"{s['pairs_s'] / t['pairs_s']:.2f}x | {s['peak']:.0f} | {s['peak'] / t['peak']:.2f}x | {s['step']:.0f} | "
            f"{s['step'] / t['step']:.2f}x | {s['eff']:.1%} | {s['loss']:.7f} | {s['loss'] - t['loss']:+.1e} |"
        )
    rows += [
        f"| {name} | {'on' if checkpointing(name) else 'off'} | | killed: out of memory | | | | | | | | |"
        for name in out_of_memory
    ]
    matched = []
    for on in (True, False):
        group = [n for n in summary if CONFIGS[n][0] == "ds_dpo" and checkpointing(n) == on]
        against = matched_trl(group[0], summary) if group else None
        if against:
            fast = max(group, key=lambda n: summary[n]["pairs_s"])
            lean = min(group, key=lambda n: summary[n]["peak"])
            matched.append(
                f"- gradient checkpointing {'on' if on else 'off'} in both: ds_dpo's fastest row ({fast}) "
                f"{summary[fast]['pairs_s'] / summary[against]['pairs_s']:.1f}x TRL's pairs/s; its leanest ({lean}) "
                f"{summary[lean]['peak'] / summary[against]['peak']:.2f}x TRL's peak memory"
            )
    matched += [
        f"- gradient checkpointing {'on' if checkpointing(name) else 'off'}: {name} ran out of memory on this "
        "machine (killed by the kernel)"
        for name in out_of_memory
    ]
    best = max((n for n in summary if CONFIGS[n][0] == "ds_dpo"), key=lambda n: summary[n]["pairs_s"])
    b, trl_pre = summary[best], summary.get("TRL DPOTrainer, precompute_ref_log_probs")
    headline = (
        f"Best ds_dpo setting, {best}: {b['pairs_s'] / trl['pairs_s']:.1f}x the pairs/s of TRL's default, "
        f"at {b['peak'] / trl['peak']:.2f}x its peak memory and {b['step'] / trl['step']:.2f}x its step "
        "memory"
        + (
            f"; {b['pairs_s'] / trl_pre['pairs_s']:.1f}x the pairs/s of TRL with `precompute_ref_log_probs`."
            if trl_pre
            else "."
        )
    )
    lengths = [(len(p["prompt_input_ids"]), len(p["chosen_input_ids"]), len(p["rejected_input_ids"])) for p in pairs]
    median = [statistics.median(x) for x in zip(*lengths)]
    command = shlex.join(["python", "benchmarks/benchmark.py", *sys.argv[1:]])
    if args.model:
        model_config = json.loads((args.model / "config.json").read_text())
        model = (
            f"pretrained `{args.model.name}` ({model_config['model_type']}, {model_config['num_hidden_layers']} "
            f"layers x {model_config['hidden_size']}, {model_config['vocab_size']}-token vocabulary) as policy "
            "and reference, its own tokenizer and chat template"
        )
        data = f"`{args.data.name}` ({args.data.parent.name}), rendered with the model's chat template"
        loss_note = "policy and reference are the same checkpoint, so it is log 2"
    else:
        model = (
            f"random-init Llama {MODEL['num_hidden_layers']} layers x {MODEL['hidden_size']} (intermediate "
            f"{MODEL['intermediate_size']}, untied {args.vocab_size}-token embeddings), policy and a different "
            "random-init reference"
        )
        data = f"HH-RLHF harmless-base test with a {args.vocab_size}-token byte-level BPE trained on it"
        loss_note = "policy and reference differ, so it is not log 2"
    processes = (
        "one CPU process"
        if args.nproc == 1
        else f"{args.nproc} CPU processes ({PAIRS_PER_STEP // args.nproc} pairs each per step; TRL as DDP over "
        "gloo, see the module docstring for why not DeepSpeed)"
    )
    return "\n".join(
        [
            "# Benchmark: ds_dpo vs TRL 1.16 DPOTrainer",
            "",
            f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}; do not edit by hand.",
            "",
            f"- Machine: {machine_line}.",
            f"- Data: {data}, tokenized and truncated by ds_dpo (`max_length` {args.max_length}, `max_prompt_length` "
            f"{min(MAX_PROMPT_LENGTH, args.max_length // 2)}); {len(pairs)} pairs in one seeded order (median prompt {median[0]:.0f}, chosen "
            f"{median[1]:.0f}, rejected {median[2]:.0f} tokens).",
            f"- Model: {model}; fp32; AdamW; {processes}.",
            f"- Step: {PAIRS_PER_STEP} pairs; {args.warmup} warm-up steps, then {args.steps} timed steps per run; "
            f"{args.repeats} rounds, all configurations interleaved; each run in fresh processes. ds_dpo: "
            "DeepSpeed ZeRO-3 engines (the default preset) around policy and reference, except where a row says "
            "ZeRO off (`ds_configs/ddp.json`: the policy whole, the reference still a ZeRO-3 inference engine) or "
            "deepspeed auto (the estimator's pick, printed at startup: ZeRO-0 on one process, ZeRO-2 on several).",
            "- pairs/s: median over rounds. Peak MiB: the process's peak resident set size over its whole life (imports, "
            "model setup, reference precomputation, steps), the largest over the processes. Step MiB: how far the "
            "resident set size rose during the steps above what it was before the first one (activations, logits, "
            "gradients, optimizer state); medians over rounds.",
            "- Efficiency: distinct real tokens / token positions run through a model per step (policy forward, plus "
            "reference forward unless precomputed).",
            f"- Step-1 loss: sigmoid DPO, beta 0.1, the first step's pairs; {loss_note}.",
            "",
            "Matched settings (each ds_dpo row against the TRL row with the same gradient checkpointing):",
            "",
            *matched,
            "",
            "| configuration | checkpointing | compared with | pairs/s | vs TRL | peak MiB | vs TRL | step MiB | vs TRL "
            "| efficiency | step-1 loss | vs TRL |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            headline,
            "",
            *memory_breakdown(results),
        ]
    )


def memory_breakdown(results: dict[str, list[dict]]) -> list[str]:
    """Where each run's resident memory goes, from the first round: the rise over each phase of the process with
    the highest step peak (MiB)."""
    lines = [
        "## Where the memory goes",
        "",
        "Resident set size at each point of the first round's run (MiB, the process with the highest peak), and "
        "what each phase added. ds_dpo: the reference engine (built first) and the policy engine (ZeRO-3 "
        "partitions, DeepSpeed's gradient and communication buffers), then the steps (activations, logits, "
        "gradients, the optimizer states that DeepSpeed and torch create at the first step). TRL: the two models "
        "as loaded, then `train()` (accelerate's preparation, optimizer, steps).",
        "",
        "| configuration | phases (RSS after, +added) | peak during steps |",
        "|---|---|---|",
    ]
    for name, runs in results.items():
        if not runs:  # killed: out of memory
            continue
        phases = runs[0]["phases"]
        previous, cells = 0.0, []
        for phase, rss in phases.items():
            if phase == "steps (peak)":
                continue
            cells.append(f"{phase} {rss:.0f} (+{rss - previous:.0f})")
            previous = rss
        lines.append(
            f"| {name} | {'; '.join(cells)} | {phases['steps (peak)']:.0f} "
            f"(+{phases['steps (peak)'] - phases['before the steps']:.0f}) |"
        )
    return lines + [""]


def run_arguments(parser: argparse.ArgumentParser, work: Path, steps: int, repeats: int) -> None:
    """The options every benchmark script takes: where it works, how many steps and rounds, and the worker's."""
    parser.add_argument("--work", type=Path, default=work)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--total_steps", type=int, help=argparse.SUPPRESS)


def round_robin(names: list[str], run, args, pairs_per_step: int) -> dict[str, list[dict]]:
    """``run(name)`` for every configuration, ``args.repeats`` rounds of all of them in turn, so that slow drifts
    of the machine hit all alike; each run's pairs/s (over the steps after ``args.warmup``) printed as it ends."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.repeats):
        for name in names:
            try:
                result = run(name)
            except OutOfMemory:
                print(f"round {round_ + 1}/{args.repeats} {name}: killed, out of memory", flush=True)
                continue
            results[name].append(result)
            rate = pairs_per_step * args.steps / sum(result["times"][args.warmup :])
            print(
                f"round {round_ + 1}/{args.repeats} {name}: {rate:.2f} pairs/s, peak {result['peak_mib']:.0f} MiB, "
                f"step-1 loss {result['first_loss']:.7f}",
                flush=True,
            )
    return results


def write_report(text: str, out: Path | None) -> None:
    """The finished table: printed, and written to ``out`` when given."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=os.environ.get("DS_DPO_HH_DATA", REPO.parent / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"),
        help="HH-RLHF pairs (.jsonl.gz); default $DS_DPO_HH_DATA, else ../shared/data/...",
    )
    run_arguments(parser, REPO / "outputs" / "benchmark", steps=4, repeats=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument(
        "--model",
        type=Path,
        help="a pretrained causal LM directory, used as policy and reference "
        "with its tokenizer (default: random-init Llama pair and a BPE trained on the data)",
    )
    parser.add_argument("--nproc", type=int, default=1, choices=(1, 2, 4, 8), help="processes (ranks) per run")
    parser.add_argument("--only", nargs="*", help="run only these configurations (names as in the table)")
    parser.add_argument(
        "--max_length", type=int, default=MAX_LENGTH, help="pairs cut to this many tokens (prompts to half of it)"
    )
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.work, args.model, args.total_steps)
    if not Path(args.data).is_file():
        parser.error(f'no data at {args.data}: pass --data or set DS_DPO_HH_DATA (README "Tests" says how to get it)')

    total = args.warmup + args.steps
    args.work.mkdir(parents=True, exist_ok=True)
    pairs = prepare(
        args.data, args.work, total * PAIRS_PER_STEP, args.vocab_size, args.seed, args.model, args.max_length
    )
    results = round_robin(
        args.only or list(CONFIGS),
        lambda name: run_config(name, args.work, args.model, total, args.nproc),
        args,
        PAIRS_PER_STEP,
    )
    write_report(report(results, pairs, args, machine()), args.out)


if __name__ == "__main__":
    main()
