"""Speed and memory of a vision-language DPO step: each pair's image through the vision tower once (ds_dpo's
prefix-shared rows) against twice (ds_dpo's padded rows, and TRL 1.16's DPOTrainer, whose vision collator repeats
every image for chosen and rejected), on the same model, rows and order (benchmarks/README.md).

    .venv/bin/python benchmarks/vlm.py --out docs/vlm.md

The model is a random-init LLaVA: a ViT-S/16-shaped CLIP vision tower at 224 px (196 image tokens per image, 12
layers of width 384) and a 4-layer Llama-style language model of width 512, with the built-in word-level tokenizer
plus the image token and a CLIP image processor. The rows are the built-in counting task's pairs in TRL's
conversational vision format, one random 224 x 224 image each. Policy and reference start from the same weights.
ds_dpo runs without ZeRO (``ds_configs/ddp.json``), as TRL does on one process. Every configuration runs in a fresh
process (1 process, fp32, ``--pairs`` pairs per step, the same pairs in the same order), round-robin over
``--repeats`` rounds: ``--warmup`` steps, then ``--steps`` timed ones; pairs/s is the median over rounds; memory is
the process's peak resident set size (lifetime) and its rise during the steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from benchmark import (  # noqa: E402
    PeakRSS,
    machine,
    print_result,
    round_robin,
    run_arguments,
    run_one_process,
    timed_steps,
    timed_trl,
    write_report,
)

IMAGE = 224
# ds_dpo without ZeRO, as TRL runs on one process: on a single rank ZeRO only adds fp32 copies
NO_ZERO = {"deepspeed": str(REPO / "ds_configs" / "ddp.json")}
CONFIGS = {  # name -> (trainer, ds_dpo options)
    "TRL DPOTrainer (images twice per pair)": ("trl", {}),
    "ds_dpo padded (images twice per pair)": ("ds_dpo", {"padding_free": False, **NO_ZERO}),
    "ds_dpo prefix-shared (images once per pair)": ("ds_dpo", NO_ZERO),
}


def prepare(work: Path, num_pairs: int, seed: int) -> None:
    """The model with its processor and ``pairs.jsonl`` (image files beside it) under ``work``."""
    import random

    import numpy as np
    import torch
    from PIL import Image
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from ds_dpo.data import builtin

    tokenizer = builtin.build_tokenizer()
    tokenizer.add_tokens(["user", "assistant"])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} :{% for part in m['content'] %}"
        "{% if part['type'] == 'image' %} <image>{% else %} {{ part['text'] }}{% endif %}{% endfor %}"
        " {{ eos_token }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}
        ),
        tokenizer=tokenizer,
        patch_size=16,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    vision = CLIPVisionConfig(
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=6,
        image_size=IMAGE,
        patch_size=16,
        projection_dim=384,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_seq_length=(IMAGE // 16) ** 2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(work / "model")
    processor.save_pretrained(work / "model")
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    (work / "images").mkdir(exist_ok=True)
    with open(work / "pairs.jsonl", "w") as f:
        for i in range(num_pairs):
            pair = builtin.make_pair(rng)
            path = work / "images" / f"{i}.png"
            Image.fromarray(pixels.integers(0, 255, (IMAGE, IMAGE, 3), dtype=np.uint8)).save(path)
            f.write(
                json.dumps(
                    {
                        "images": [str(path)],
                        "prompt": [{"role": "user", "content": pair["prompt"]}],
                        "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                        "rejected": [{"role": "assistant", "content": pair["rejected"]}],
                    }
                )
                + "\n"
            )


def run_ds_dpo(work: Path, options: dict, pairs: int, total_steps: int) -> tuple[list[float], float, PeakRSS]:
    from ds_dpo.config import make_config

    cfg = make_config(
        {
            "model_name_or_path": str(work / "model"),
            "dataset": str(work / "pairs.jsonl"),
            "per_device_train_batch_size": pairs,
            "max_steps": total_steps,
            "save_steps": 0,
            "learning_rate": 1e-6,
            "output_dir": str(work / "ds_dpo_run"),
            "dataset_cache_dir": str(work / "cache"),
            **options,
        }
    )
    return timed_steps(cfg, [list(range(s * pairs, (s + 1) * pairs)) for s in range(total_steps)], pairs)


def run_trl(work: Path, pairs: int, total_steps: int) -> tuple[list[float], float, PeakRSS]:
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig

    rows = [json.loads(line) for line in open(work / "pairs.jsonl")]
    dataset = Dataset.from_list(
        [{**row, "images": [Image.open(p).convert("RGB") for p in row["images"]]} for row in rows]
    )
    args = DPOConfig(
        output_dir=str(work / "trl_run"),
        per_device_train_batch_size=pairs,
        max_length=None,
        max_steps=total_steps,
        learning_rate=1e-6,
        bf16=False,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
    )
    model = work / "model"
    return timed_trl(
        tokenized=False,
        model=AutoModelForImageTextToText.from_pretrained(model),
        ref_model=AutoModelForImageTextToText.from_pretrained(model),
        args=args,
        train_dataset=dataset,
        processing_class=AutoProcessor.from_pretrained(model),
    )


def worker(name: str, work: Path, pairs: int, total_steps: int) -> None:
    import torch

    torch.manual_seed(0)
    trainer, options = CONFIGS[name]
    print_result(
        *(run_trl(work, pairs, total_steps) if trainer == "trl" else run_ds_dpo(work, options, pairs, total_steps))
    )


def run_config(name: str, work: Path, pairs: int, total_steps: int) -> dict:
    log = work / "logs" / f"{name.split(' (')[0].replace(' ', '_')}.log"
    return run_one_process(
        name, __file__, ["--work", str(work), "--pairs", str(pairs), "--total_steps", str(total_steps)], log
    )


def report(results: dict[str, list[dict]], args, machine_line: str) -> str:
    base = next(iter(CONFIGS))
    rows = []
    for name, runs in results.items():
        rate = statistics.median(args.pairs * args.steps / sum(r["times"][args.warmup :]) for r in runs)
        peak = max(r["peak_mib"] for r in runs)
        step = max(r["step_mib"] for r in runs)
        rows.append((name, rate, peak, step, runs[0]["first_loss"]))
    trl_rate, trl_peak = rows[0][1], rows[0][2]
    lines = [
        "# Vision-language DPO: each image once per pair vs twice\n",
        f"`benchmarks/vlm.py --pairs {args.pairs} --steps {args.steps} --warmup {args.warmup} --repeats "
        f"{args.repeats}`. Machine: {machine_line}.\n",
        "Random-init LLaVA (CLIP ViT-S/16 at 224 px: 196 image tokens per image; 4-layer Llama-style language "
        "model, width 512), one image per pair, the built-in counting pairs as TRL conversational rows "
        "(prompts ~12 text tokens, completions ~6); policy and reference from the same weights, fp32, 1 "
        f"process, {args.pairs} pairs per step; ds_dpo without ZeRO (`ds_configs/ddp.json`), as TRL runs on "
        f"one process. Baseline: {base}.\n",
        "| configuration | pairs/s | vs TRL | peak memory (MiB) | vs TRL | memory rise in the steps (MiB) | "
        "step-1 loss |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, rate, peak, step, loss in rows:
        lines.append(
            f"| {name} | {rate:.3f} | {rate / trl_rate:.2f}x | {peak:.0f} | {peak / trl_peak:.2f}x | "
            f"{step:.0f} | {loss:.6f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    run_arguments(parser, REPO / "outputs" / "bench_vlm", steps=3, repeats=2)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.work, args.pairs, args.total_steps)
    args.work.mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps
    if not (args.work / "model" / "config.json").is_file():
        prepare(args.work, args.pairs * total, args.seed)
    results = round_robin(list(CONFIGS), lambda name: run_config(name, args.work, args.pairs, total), args, args.pairs)
    write_report(report(results, args, machine()), args.out)


if __name__ == "__main__":
    main()
