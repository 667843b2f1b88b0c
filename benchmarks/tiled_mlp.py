"""What ``tiled_mlp_shards`` buys: peak memory and time of one decoder layer's training step on a long row, its MLP
whole vs in slices (DeepSpeed's ``TiledMLP`` as ds_dpo installs it, ``ds_dpo.models.activation_memory``).

    .venv/bin/python benchmarks/tiled_mlp.py --out docs/tiled_mlp.md

One random-init Llama decoder layer at Llama-3.2-1B's widths (hidden 2048, MLP 8192, 32 query / 8 key-value heads)
under gradient checkpointing, as a long-context run uses it, with a small vocabulary (the layer is what is measured,
not the output head); fp32; forward + backward of one row of S tokens with causal attention. Each configuration runs
in a fresh process; memory is the process's peak resident set size over its whole life (imports and weights
included), time the second of two steps. The MLP's [S, 8192] activations (gate, up, their product, and what backward
keeps of them) are what tiling cuts; the checkpointed layer input and the attention (sdpa's causal kernel, linear in
S) stay.
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

from benchmark import machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LAYER = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=8,
    num_hidden_layers=1,
    vocab_size=1024,
)


def worker(tokens: int, shards: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_dpo.models.activation_memory import tile_mlps

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=tokens, **LAYER))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tile_mlps(model, shards)
    model.train()
    ids = torch.randint(0, LAYER["vocab_size"], (1, tokens))
    times = []
    for _ in range(2):
        started = time.perf_counter()
        hidden = model.model(input_ids=ids).last_hidden_state
        hidden.float().pow(2).mean().backward()
        times.append(time.perf_counter() - started)
        model.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print("RESULT " + json.dumps({"step_s": times[-1], "peak_mib": peak}), flush=True)


def run(tokens: int, shards: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", str(tokens), str(shards)], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT ")).removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "tiled_mlp.md")
    parser.add_argument("--worker", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    rows = []
    for tokens in args.tokens:
        shards = -(-tokens // LAYER["hidden_size"])  # the rule the README gives: tokens / hidden size
        whole, tiled = run(tokens, 1), run(tokens, shards)
        rows.append(
            f"| {tokens} | {whole['step_s']:.1f} s, {whole['peak_mib'] / 1024:.2f} GiB | {shards} | "
            f"{tiled['step_s']:.1f} s, {tiled['peak_mib'] / 1024:.2f} GiB | "
            f"{(whole['peak_mib'] - tiled['peak_mib']) / 1024:.2f} GiB |"
        )
        print(rows[-1], flush=True)
    command = shlex.join(["python", "benchmarks/tiled_mlp.py", *sys.argv[1:]])
    table = "\n".join(
        [
            "# Tiled MLP: one decoder layer's training step, MLP whole vs in slices",
            "",
            f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}; do not edit by hand.",
            "",
            f"- Machine: {machine()}.",
            f"- One random-init Llama decoder layer: hidden {LAYER['hidden_size']}, MLP {LAYER['intermediate_size']}, "
            f"{LAYER['num_attention_heads']} query / {LAYER['num_key_value_heads']} key-value heads (Llama-3.2-1B's "
            "widths); gradient checkpointing; fp32; forward + backward of one row; fresh process per cell.",
            "- Cells: the second step's seconds and the process's peak resident set size (imports and weights "
            "included).",
            "",
            "| tokens | MLP whole | slices | MLP in slices | saved |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    args.out.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
