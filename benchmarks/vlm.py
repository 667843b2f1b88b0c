"""Speed and memory of a vision-language DPO step: each pair's image through the vision tower once (ds_dpo's
prefix-shared rows) against twice (ds_dpo's padded rows, and TRL 1.16's DPOTrainer, whose vision collator repeats
every image for chosen and rejected), on the same model, rows and order (benchmarks/README.md).

    .venv/bin/python benchmarks/vlm.py --out docs/vlm.md
    .venv-vision/bin/python benchmarks/vlm.py --family qwen2_5_vl --out docs/vlm_qwen.md

``--family llava`` (default): a random-init LLaVA, a ViT-S/16-shaped CLIP vision tower at 224 px (196 image tokens
per image, 12 layers of width 384) and a 4-layer Llama-style language model of width 512, with a CLIP image
processor. ``--family qwen2_5_vl``: a random-init Qwen2.5-VL, its vision tower of the same depth and width (12
layers of width 384, a gated MLP of 1024: ViT-S's parameters per layer) with Qwen2.5-VL's patches of 14 px, windows
of 112 px and full attention in every fourth layer, at 392 px (784 patches, 2 x 2 merged into 196 image tokens, as
many as the LLaVA's), and a 4-layer Qwen2.5-VL language model of width 512 (3D positions), with the real
``Qwen2_5_VLProcessor`` (``Qwen2VLImageProcessor`` at its defaults); its processor needs torchvision, so it runs in
``.venv-vision`` (``bash launch/setup.sh test vision``). Both use the built-in word-level tokenizer plus the
family's image tokens. The rows are the built-in counting task's pairs in TRL's conversational vision format, one
random square image each. Policy and reference start from the same weights. ds_dpo runs without ZeRO
(``ds_configs/ddp.json``), as TRL does on one process. Every configuration runs in a fresh process (1 process, fp32,
``--pairs`` pairs per step, the same pairs in the same order), round-robin over ``--repeats`` rounds: ``--warmup``
steps, then ``--steps`` timed ones; pairs/s is the median over rounds; memory is the process's peak resident set
size (lifetime) and its rise during the steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
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

# ds_dpo without ZeRO, as TRL runs on one process: on a single rank ZeRO only adds fp32 copies
NO_ZERO = {"deepspeed": str(REPO / "ds_configs" / "ddp.json")}
CONFIGS = {  # name -> (trainer, ds_dpo options)
    "TRL DPOTrainer (images twice per pair)": ("trl", {}),
    "ds_dpo padded (images twice per pair)": ("ds_dpo", {"padding_free": False, **NO_ZERO}),
    "ds_dpo prefix-shared (images once per pair)": ("ds_dpo", NO_ZERO),
}
# "<role> : <parts> <eos>" per message, each image part as the family's image text
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} :{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %} IMAGE{% else %} {{ part['text'] }}{% endif %}{% endfor %}"
    " {{ eos_token }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
LLAVA_IMAGE = 224
# the language model of both families: 4 layers of width 512
TEXT = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

# Qwen2.5-VL's config field -> its special token (an image is "<|vision_start|><|image_pad|><|vision_end|>" in a
# prompt, the pad expanded by the processor to the image's tokens)
QWEN_TOKENS = {
    "vision_start_token_id": "<|vision_start|>",
    "image_token_id": "<|image_pad|>",
    "vision_end_token_id": "<|vision_end|>",
    "video_token_id": "<|video_pad|>",
}


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family to measure: the side of its square images, what an image part of a prompt becomes in its chat
    template, the special tokens it adds to the tokenizer, what the report says about it, and ``build(tokenizer,
    template)``, which returns its processor, model config and model class; ``needs_torchvision``: its processor
    exists only with torchvision."""

    image: int
    image_text: str
    special_tokens: list[str]
    title: str
    description: str
    build: Callable
    needs_torchvision: bool = False


def build_llava(tokenizer, template: str):
    """A CLIP image processor and vision tower of ViT-S/16's shape at ``LLAVA_IMAGE`` px, and the Llama ``TEXT``."""
    image = LLAVA_IMAGE
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image}, crop_size={"height": image, "width": image}
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
        image_size=image,
        patch_size=16,
        projection_dim=384,
    )
    text = LlamaConfig(vocab_size=len(tokenizer), **token_ids(tokenizer), **TEXT)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_seq_length=(image // 16) ** 2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return processor, config, LlavaForConditionalGeneration


def build_qwen2_5_vl(tokenizer, template: str):
    """Qwen2.5-VL's real processor classes at their defaults (patches of 14 px, 2 x 2 merged; the video processor
    only because the processor requires one), its vision tower of ViT-S's size: 12 layers of width 384, 6 heads, a
    gated MLP of 1024 (Qwen2.5-VL's ratio, 3420 / 1280; as many weights per layer as ViT-S's MLP of 1536), windows of
    112 px (8 x 8 patches) but full attention in every fourth layer (Qwen2.5-VL: every eighth of 32); the Qwen2.5-VL
    language model of ``TEXT``'s size."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=template,
    )
    # head_dim 64: 32 rotary frequencies for the temporal position, the row and the column, in Qwen2.5-VL's
    # proportions ([16, 24, 24] of its 64)
    rope = {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1000000.0}
    text = Qwen2_5_VLTextConfig(vocab_size=len(tokenizer), rope_parameters=rope, **token_ids(tokenizer), **TEXT)
    vision = Qwen2_5_VLVisionConfig(
        depth=12,
        hidden_size=384,
        intermediate_size=1024,
        num_heads=6,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[3, 7, 11],
        out_hidden_size=TEXT["hidden_size"],
    )
    ids = {key: tokenizer.convert_tokens_to_ids(token) for key, token in QWEN_TOKENS.items()}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return processor, config, Qwen2_5_VLForConditionalGeneration


def token_ids(tokenizer) -> dict:
    return dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )


FAMILIES = {
    "llava": Family(
        image=LLAVA_IMAGE,
        image_text="<image>",
        special_tokens=["<image>"],
        title="Vision-language DPO: each image once per pair vs twice",
        description="Random-init LLaVA (CLIP ViT-S/16 at 224 px: 196 image tokens per image; 4-layer Llama-style "
        "language model, width 512)",
        build=build_llava,
    ),
    "qwen2_5_vl": Family(
        image=392,
        image_text="<|vision_start|><|image_pad|><|vision_end|>",
        special_tokens=list(QWEN_TOKENS.values()),
        title="Vision-language DPO on Qwen2.5-VL: each image once per pair vs twice",
        description="Random-init Qwen2.5-VL (vision tower of ViT-S's depth and width: 12 layers of 384, a gated "
        "MLP of 1024; patches of 14 px, attention in windows of 112 px except every fourth layer; 392 x 392 "
        "images: 784 patches per image, merged 2 x 2 into 196 image tokens; 4-layer Qwen2.5-VL language "
        "model, width 512, 3D positions), the real `Qwen2_5_VLProcessor` (`Qwen2VLImageProcessor` at its "
        "defaults, torchvision)",
        build=build_qwen2_5_vl,
        needs_torchvision=True,
    ),
}


def prepare(work: Path, family: Family, num_pairs: int, seed: int) -> None:
    """The model with its processor and ``pairs.jsonl`` (image files beside it) under ``work``."""
    import random

    import numpy as np
    import torch
    from PIL import Image

    from ds_dpo.data import builtin

    tokenizer = builtin.build_tokenizer()
    tokenizer.add_tokens(["user", "assistant"])
    tokenizer.add_special_tokens({"additional_special_tokens": family.special_tokens})
    processor, config, model_class = family.build(tokenizer, TEMPLATE.replace("IMAGE", family.image_text))
    torch.manual_seed(seed)
    model_class(config).save_pretrained(work / "model")
    processor.save_pretrained(work / "model")
    rng, pixels = random.Random(seed), np.random.default_rng(seed)
    (work / "images").mkdir(exist_ok=True)
    with open(work / "pairs.jsonl", "w") as f:
        for i in range(num_pairs):
            pair = builtin.make_pair(rng)
            path = work / "images" / f"{i}.png"
            Image.fromarray(pixels.integers(0, 255, (family.image, family.image, 3), dtype=np.uint8)).save(path)
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


def report(results: dict[str, list[dict]], args, machine_line: str, load: float) -> str:
    """The table, after the command that made it, the machine, ``load`` (its 1-minute load average before the first
    run: other processes slow the runs, which take turns, alike only on average) and the setting."""
    base, family = next(iter(CONFIGS)), FAMILIES[args.family]
    rows = []
    for name, runs in results.items():
        rate = statistics.median(args.pairs * args.steps / sum(r["times"][args.warmup :]) for r in runs)
        peak = max(r["peak_mib"] for r in runs)
        step = max(r["step_mib"] for r in runs)
        rows.append((name, rate, peak, step, runs[0]["first_loss"]))
    trl_rate, trl_peak = rows[0][1], rows[0][2]
    out = args.out.resolve() if args.out else None
    command = ["python", "benchmarks/vlm.py", "--family", args.family]
    for option in ("pairs", "steps", "warmup", "repeats", *(["seed"] if args.seed else [])):
        command += [f"--{option}", str(getattr(args, option))]
    if out and out.is_relative_to(REPO):
        command += ["--out", str(out.relative_to(REPO))]
    lines = [
        f"# {family.title}\n",
        f"Produced by `{shlex.join(command)}` on {time.strftime('%Y-%m-%d')}; do not edit by hand. Machine: "
        f"{machine_line}; 1-minute load average {load:.1f} before the first run.\n",
        f"{family.description}, one image per pair, the built-in counting pairs as TRL conversational rows "
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


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def versions() -> str:
    """``machine()``, with torchvision's version where it is installed (the Qwen-VL processors need it)."""
    if not has_torchvision():
        return machine()
    import torchvision

    return f"{machine()}; torchvision {torchvision.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    run_arguments(parser, REPO / "outputs" / "bench_vlm", steps=3, repeats=2)
    parser.add_argument("--family", choices=list(FAMILIES), default="llava")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.work, args.pairs, args.total_steps)
    family = FAMILIES[args.family]
    if family.needs_torchvision and not has_torchvision():
        parser.error(
            f"--family {args.family}: its processor needs torchvision; run with .venv-vision/bin/python "
            "(bash launch/setup.sh test vision)"
        )
    work = args.work / args.family
    work.mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps
    if not (work / "model" / "config.json").is_file():
        prepare(work, family, args.pairs * total, args.seed)
    load = os.getloadavg()[0]
    results = round_robin(list(CONFIGS), lambda name: run_config(name, work, args.pairs, total), args, args.pairs)
    write_report(report(results, args, versions(), load), args.out)


if __name__ == "__main__":
    main()
