"""Attention cost of a packed micro-batch: the dense row-wide mask against ds_dpo's block attention (benchmarks/README.md).

    .venv/bin/python benchmarks/attention_scaling.py --out docs/attention_scaling.md

One training step's forward and backward of the policy (a random-init Llama, hidden 256, 4 layers, 4 heads, fp32,
one CPU process, no DeepSpeed: only the model and ds_dpo's scoring path) on one prefix-shared micro-batch of
synthetic pairs of ``--pair_tokens`` tokens (prompt, chosen and rejected a third each), for micro-batches of S tokens.
Two tables:

1. S from 2k to 32k: time and peak resident memory of the step, dense [S, S] mask (sdpa) vs block attention (sdpa per
   pair). Each point runs in a fresh process; a point whose dense mask cannot fit is recorded as such.
2. Pairs/s with 1, 8 and 32 pairs per micro-batch (same pairs, same total), block attention: packing must never be
   slower per pair than one pair at a time.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmark import machine  # noqa: E402  (benchmarks/benchmark.py)

MODEL = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=4096,
)
ATTENTION = {"dense mask": "sdpa", "blocks": "ds_dpo_blocks_sdpa"}
NOT_MEASURED = """
## Backends not measured here

- **FlexAttention** (`attn_implementation: flex_attention`): packed and prefix-shared rows get a FlexAttention
  block mask built from the same segment/branch/position rules (`ds_dpo.forward.attention.flex_block_mask`); the kernel
  skips 128 x 128 tiles where nothing may attend. Checked on CPU for log-probs only (torch's uncompiled kernel,
  `tests/test_model_families.py`): transformers compiles FlexAttention, which inductor fails to build on this CPU
  (torch 2.13: "'cur_kvSplitSize0' was not declared"), and torch has no FlexAttention backward on CPU, so a CPU run
  is switched to `sdpa` with a notice. **Not yet run on a GPU**: no speed, memory or gradient numbers.
- **flash-attention varlen** (`attn_implementation: flash_attention_2`): packed rows through `position_ids`;
  prefix-shared rows as two query runs per pair (`prompt + chosen`, `rejected`) reading `prompt + chosen` and
  `prompt + rejected` keys (`ds_dpo.forward.attention.shared_varlen_inputs`). Log-probs and gradients checked on CPU against
  the padded path with a plain-torch stand-in for the kernel; flash-attn cannot be installed on this machine.
  **Not yet run on a GPU**.
"""


def pairs(count: int, pair_tokens: int, seed: int = 0) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    third = pair_tokens // 3
    ids = lambda: torch.randint(1, MODEL["vocab_size"], (third,), generator=g).tolist()  # noqa: E731
    return [
        {"index": i, "prompt_input_ids": ids(), "chosen_input_ids": ids(), "rejected_input_ids": ids()}
        for i in range(count)
    ]


def one_point(attention: str, num_pairs: int, pairs_per_batch: int, pair_tokens: int, steps: int) -> dict:
    """Forward + backward over ``num_pairs`` pairs in micro-batches of ``pairs_per_batch``; run in its own process."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ds_dpo.forward import hooks
    from ds_dpo.forward.layouts import SHARED, collate_pairs
    from ds_dpo.forward.logprobs import Scoring, concatenated_forward
    from ds_dpo.forward.scoring import install_token_scoring

    hooks.install()  # the block attention, as a run's setup registers it
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL), attn_implementation=ATTENTION[attention])
    model = install_token_scoring(model).train()
    data = pairs(num_pairs, pair_tokens)
    scoring = Scoring(SHARED, logps_chunk_size=1024)
    batches = [
        collate_pairs(data[i : i + pairs_per_batch], [1.0] * len(data[i : i + pairs_per_batch]), 0, SHARED)
        for i in range(0, num_pairs, pairs_per_batch)
    ]
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        for batch in batches:
            out = concatenated_forward(model, batch, scoring)
            (out.chosen - out.rejected).sum().backward()
        times.append(time.perf_counter() - start)
    step = min(times[1:])
    return {
        "step_s": step,
        "pairs_per_s": num_pairs / step,
        "tokens": int(batches[0]["input_ids"].shape[1]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def measure(
    attention: str,
    num_pairs: int,
    pairs_per_batch: int,
    pair_tokens: int,
    steps: int,
    timeout: int,
    memory_limit_gb: float,
) -> dict:
    cmd = [sys.executable, __file__, "--point", json.dumps([attention, num_pairs, pairs_per_batch, pair_tokens, steps])]
    # An address-space limit makes a point that cannot fit fail its allocation (and be recorded as out of memory)
    # instead of driving the whole machine into the kernel's OOM killer.
    limit = int(memory_limit_gb * 2**30)
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout} s"}
    if proc.returncode != 0:
        return {
            "error": "out of memory"
            if proc.returncode in (-9, 137) or "memory" in proc.stderr.lower()
            else proc.stderr.strip().splitlines()[-1][:80]
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cell(result: dict, key: str, fmt: str) -> str:
    return result.get("error") or format(result[key], fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--pair_tokens", type=int, default=1536)
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768], help="micro-batch tokens S"
    )
    parser.add_argument("--throughput_pairs", type=int, default=32)
    parser.add_argument("--throughput_pair_tokens", type=int, default=384)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument(
        "--memory_limit_gb",
        type=float,
        default=20.0,
        help="address-space limit of each point's process; leave room for the rest of the machine",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(one_point(*json.loads(args.point))))
        return

    command = shlex.join(["python", "benchmarks/attention_scaling.py", *sys.argv[1:]])
    lines = [
        "# Attention scaling: dense row mask vs block attention",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}; do not edit by hand. Each point runs in a fresh "
        f"process limited to {args.memory_limit_gb:g} GiB of address space; a point that cannot allocate is "
        "recorded as out of memory.",
        "",
        f"Machine: {machine()}",
        "",
        f"One step (forward + backward) of a random Llama (hidden 256, 4 layers, 4 heads, fp32, 1 CPU process) on "
        f"one prefix-shared micro-batch of {args.pair_tokens}-token pairs; fastest of {args.steps} steps after a "
        "warm-up; whole-process peak RSS.",
        "",
        "| S (tokens) | pairs | dense mask: step s | dense: peak GB | blocks: step s | blocks: peak GB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for size in args.sizes:
        n = max(1, round(size / args.pair_tokens))  # prefix-shared: a pair puts each of its tokens in the row once
        row = {
            name: measure(name, n, n, args.pair_tokens, args.steps, args.timeout, args.memory_limit_gb)
            for name in ATTENTION
        }
        d, b = row["dense mask"], row["blocks"]
        lines.append(
            f"| {b.get('tokens', size)} | {n} | {cell(d, 'step_s', '.2f')} | {cell(d, 'peak_rss_gb', '.2f')} "
            f"| {cell(b, 'step_s', '.2f')} | {cell(b, 'peak_rss_gb', '.2f')} |"
        )
        print(lines[-1], flush=True)
    total = args.throughput_pairs
    lines += [
        "",
        f"Pairs/s over the same {total} pairs of {args.throughput_pair_tokens} tokens, block attention, by "
        "pairs per micro-batch:",
        "",
        "| pairs per micro-batch | pairs/s | peak GB |",
        "| ---: | ---: | ---: |",
    ]
    for per_batch in (1, 8, 32):
        r = measure(
            "blocks", total, per_batch, args.throughput_pair_tokens, args.steps, args.timeout, args.memory_limit_gb
        )
        lines.append(f"| {per_batch} | {cell(r, 'pairs_per_s', '.2f')} | {cell(r, 'peak_rss_gb', '.2f')} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n" + NOT_MEASURED
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
