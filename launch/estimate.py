"""Will it fit? Memory per GPU of a run on N GPUs of M GiB, for each ZeRO stage / offload / checkpointing setup,
before anything is downloaded but the model's config (docs/deepspeed.md, "Will it fit?").

    python launch/estimate.py --config run.yaml --num_gpus 8 --gpu_memory_gb 80
    python launch/estimate.py --model_name_or_path Qwen/Qwen2.5-7B --dataset x --num_gpus 2 --gpu_memory_gb 24 \\
        --use_peft true --prompt_tokens 512 --completion_tokens 256

Every config key works as in launch/train.py (the run's file and overrides). The verdict is the first setup, fastest
first, whose estimate fits within ``gpu_memory_gb - reserve_gb``.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ds_dpo.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_gpus", type=int, default=8, help="GPUs per node")
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--gpu_memory_gb", type=float, default=80.0)
    parser.add_argument(
        "--reserve_gb",
        type=float,
        default=4.0,
        help="kept free for the CUDA context, allocator fragmentation and what is not modelled",
    )
    parser.add_argument("--prompt_tokens", type=int, help="typical prompt length (default: the longest allowed)")
    parser.add_argument("--completion_tokens", type=int, help="typical completion length (default: the longest)")
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(rest)
        cfg.validate()
    except ConfigError as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        return 2
    from transformers import AutoConfig

    from ds_dpo.data import builtin
    from ds_dpo.estimate import CANDIDATES, ModelShape, auto_setup, estimate, setup_of, table, workload

    if cfg.builtin:
        cfg = cfg.replace(**builtin.materialize(Path(cfg.output_dir) / "builtin", cfg.seed))
    try:
        config = AutoConfig.from_pretrained(cfg.model.model_name_or_path, **cfg.model.source)
    except (OSError, ValueError) as e:  # no Hub access, a gated or unknown repository, no config.json, no model_type
        print(
            f"ds_dpo: cannot read the model config of {cfg.model.model_name_or_path!r} "
            f"({str(e).strip().splitlines()[0]}). Without Hub access, give a local directory holding the model's "
            "config.json as --model_name_or_path (the estimate needs nothing else)",
            file=sys.stderr,
        )
        return 2
    world = args.num_gpus * args.num_nodes
    try:
        work = workload(cfg, config, world, args.num_gpus, args.prompt_tokens, args.completion_tokens)
    except ConfigError as e:
        print(f"ds_dpo: {e}", file=sys.stderr)
        return 2
    shape = ModelShape.of(config)
    budget = args.gpu_memory_gb - args.reserve_gb
    if cfg.parallel.deepspeed == "auto":  # what the run would pick on these GPUs
        own = auto_setup(shape, work, cfg.model.gradient_checkpointing, budget * 2**30)[0]
    else:
        own = setup_of(cfg, cfg.parallel.deepspeed_json())
    by_setup = {s: estimate(shape, s, work) for s in dict.fromkeys([own, *CANDIDATES])}  # the configured one first
    estimates = list(by_setup.values())
    print(
        f"{cfg.model.model_name_or_path}: {shape.params / 1e9:.2f} B parameters"
        + (f" ({work.trainable_params / 1e6:.1f} M trainable, LoRA)" if work.trainable_params else "")
        + f"; {world} GPUs of {args.gpu_memory_gb:g} GiB ({budget:g} GiB after the reserve); micro-batch of "
        f"{work.pairs} pairs, prompt {work.prompt_tokens} + 2 x {work.completion_tokens} tokens, "
        f"{work.layout} rows: {work.row_tokens()} tokens per rank; reference: {work.reference}\n"
    )
    print("GiB per GPU (first row: the configured setup)\n")
    print(table(estimates, budget))
    fits = [by_setup[s] for s in CANDIDATES if by_setup[s].total <= budget * 2**30]
    print()
    if fits:
        print(
            f"verdict: fits with {fits[0].setup.describe()} (~{fits[0].total / 2**30:.1f} GiB per GPU)"
            + (
                ""
                if fits[0].setup == own or by_setup[own].total > budget * 2**30
                else "; the configured setup fits too"
            )
        )
        return 0
    print(
        "verdict: no setup fits: add GPUs, shorten rows (max_length, per_device_train_batch_size), use LoRA, "
        "tiled_mlp_shards or sequence_parallel_size"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
