"""Encoder-decoder and vision-language models through the real recipe: they train with each reference, export,
and two ZeRO-3 ranks reproduce one rank."""

import json
import math

import pytest
import torch

from ds_dpo.forward.layouts import PADDED, SEQ2SEQ, SHARED, collate_pairs
from ds_dpo.forward.logprobs import Scoring, concatenated_forward
from ds_dpo.forward.scoring import install_token_scoring
from ds_dpo.training.recipe import DPORecipe
from helpers import vlm
from helpers.models import save_tiny_model
from helpers.runs import SHORT, cli, launch, losses, read_metrics, set_up, short_run


def seq2seq_logps(model, rows) -> torch.Tensor:
    """[2B] chosen then rejected log-probs of ``rows`` from the model's own forward, one unpadded pair at a time."""
    logps = []
    for side in ("chosen", "rejected"):
        for row in rows:
            labels = torch.tensor([row[f"{side}_input_ids"]])
            logits = model(input_ids=torch.tensor([row["prompt_input_ids"]]), labels=labels).logits
            logps.append(logits.log_softmax(-1).gather(-1, labels[..., None]).sum())
    return torch.stack(logps)


def train_export_and_score(recipe: DPORecipe):
    """Train ``recipe`` to its end and export it; its log-probs of the first 4 pairs after training. Step 1 is at
    ln 2 (policy = reference) and the final evaluation, on the pairs it trained on, below it."""
    assert recipe.train().status == "finished"
    recipe.save()
    with torch.no_grad():
        recipe.policy.eval()
        logps = concatenated_forward(
            recipe.policy, recipe._batch(recipe.train_data, range(4), [1.0] * 4), recipe.plan.scoring
        )
    recipe.cleanup()
    assert losses(recipe.output_dir)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert read_metrics(recipe.output_dir, "eval_")[-1]["eval_loss"] < math.log(2) - 1e-2
    return logps


@pytest.mark.parametrize(
    "family, options",
    [
        ("t5", []),  # a ZeRO-3 reference engine; full fine-tuning, exported as a plain transformers model
        (
            "bart",
            cli(use_peft=True, lora_r=4, reference="lora", precompute_ref_log_probs=True, learning_rate="3e-2"),
        ),
    ],
)
def test_encoder_decoder_models_train_with_each_reference_and_export(
    family, options, single_rank, builtin_files, tmp_path
):
    """An encoder-decoder through the real recipe (in-process 1-rank ZeRO-3): batches in the seq2seq layout, step 1 at
    ln 2 (policy = reference), training lowers the loss; BART with LoRA has its reference log-probs precomputed with
    the adapters disabled, equal to the base model's own forward pair by pair; the exported model (T5) loads with
    plain transformers and scores like the engine."""
    from transformers import AutoModelForSeq2SeqLM

    model_dir = save_tiny_model(family, builtin_files["model_name_or_path"], tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(builtin_files["dataset"]).readlines()[:16]))
    out = tmp_path / "run"
    recipe = short_run(model_dir, pairs, out, 4, *options)
    assert recipe.plan.layout is SEQ2SEQ
    rows = [recipe.train_data[i] for i in range(4)]
    if "--precompute_ref_log_probs" in options:
        from ds_dpo.distributed import zero3_disabled

        with zero3_disabled():  # the run's ZeRO-3 registration would partition it
            base = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            expected = seq2seq_logps(base, rows)
        stored = torch.tensor([row[f"ref_{side}_logps"] for side in ("chosen", "rejected") for row in rows])
        torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
    engine = train_export_and_score(recipe)
    if family == "t5":
        exported = AutoModelForSeq2SeqLM.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(
                seq2seq_logps(exported, rows), torch.cat([engine.chosen, engine.rejected]), rtol=1e-5, atol=1e-5
            )
    else:
        assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "family, options",
    [
        ("llava", []),  # a ZeRO-3 reference engine
        ("llava_next", []),  # the same, images of several sizes (tiles, feature counts) and its image_newline
        ("idefics3", ["--precompute_ref_log_probs", "true", "--freeze_vision_tower", "true"]),
        *(vlm.param(family, []) for family in vlm.MROPE_FAMILIES),  # 3D positions from each image's patch grid
    ],
)
def test_vision_language_models_train_and_export(family, options, single_rank, tmp_path):
    """A vision-language model through the real recipe (in-process 1-rank ZeRO-3) on TRL-format rows with images
    (1, 2, 1 and 0 per pair, paths in a JSON-lines file): prefix-shared batches with each pair's images once, step 1 at
    ln 2, the loss falls on the pairs it trains on; a frozen vision tower stays as it was; the export (model and
    processor) loads with plain transformers and scores like the engine."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ds_dpo.data.images import VisionInputs, image_token_types, mrope_image_token

    model_dir = vlm.build(family, tmp_path / "model")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in vlm.rows(tmp_path / "images")))
    out = tmp_path / "run"
    recipe = short_run(model_dir, data, out, 3, *options)
    assert recipe.plan.layout is SHARED and recipe.vision is not None
    engine = train_export_and_score(recipe)
    processor = AutoProcessor.from_pretrained(out)
    exported = install_token_scoring(AutoModelForImageTextToText.from_pretrained(out).eval())
    batch = collate_pairs(
        [recipe.train_data[i] for i in range(4)],
        [1.0] * 4,
        processor.tokenizer.pad_token_id,
        PADDED,
        VisionInputs(processor.image_processor, image_token_types(processor), mrope_image_token(processor)),
    )
    with torch.no_grad():
        plain = concatenated_forward(exported, batch, Scoring(PADDED, 0))
    torch.testing.assert_close(
        torch.cat([plain.chosen, plain.rejected]), torch.cat([engine.chosen, engine.rejected]), rtol=1e-5, atol=1e-5
    )
    original = dict(AutoModelForImageTextToText.from_pretrained(model_dir).named_parameters())
    tower = next(m for m in exported.modules() if getattr(m, "config", None) is exported.config.vision_config)
    vision = {id(p) for p in tower.parameters()}  # the tower's parameter names differ: vision_tower, visual, ...
    moved = [n for n, p in exported.named_parameters() if id(p) in vision and not torch.equal(p, original[n])]
    assert bool(moved) != ("--freeze_vision_tower" in options)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, family",
    [
        ("encoder-decoder", "t5"),
        ("vision-language", "llava"),
        ("vision-language", "llava_next"),
        ("vision-language", "gemma3"),
        *(vlm.param(family, before=("vision-language",)) for family in vlm.MROPE_FAMILIES),
    ],
)
def test_two_zero3_ranks_reproduce_one_rank_for(kind, family, single_rank, builtin_files, tmp_path):
    """Under ZeRO-3, 2 launched ranks x half the pairs give the loss curve of 1 rank (in-process) x all of them
    (1e-6): T5 (chunked log-probs on one, full logits on the other), LLaVA, LLaVA-NeXT and Gemma-3 (the vision tower
    sharded too; one rank's micro-batch may hold no image while the other's does, or images of other tile counts;
    Gemma-3's image tokens attending bidirectionally within each image, its sliding window cutting through them;
    Qwen2-VL's and Qwen2.5-VL's 3D positions)."""
    if kind == "encoder-decoder":
        model = save_tiny_model(family, builtin_files["model_name_or_path"], tmp_path / "model")
        data, pairs, steps = builtin_files["dataset"], 8, 4
        one, two = ["--logps_chunk_size", "0"], ["--logps_chunk_size", "5"]
    else:
        model = vlm.build(family, tmp_path / "model")
        rows = vlm.rows(tmp_path / "images") + vlm.rows(tmp_path / "images", seed=100)
        data, pairs, steps, one, two = tmp_path / "pairs.jsonl", 4, 3, [], []
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = [
        *SHORT,
        "--max_steps",
        str(steps),
        "--model_name_or_path",
        model,
        "--dataset",
        str(data),
        "--learning_rate",
        "3e-3",
    ]
    recipe = set_up(*common, *one, per_device_train_batch_size=str(pairs), output_dir=str(tmp_path / "one"))
    if family == "gemma3":  # its batches carry the token_type_ids of its image tokens (bidirectional attention)
        assert recipe.vision.image_token_types == recipe.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert recipe.train().status == "finished"
    recipe.cleanup()
    launch(*common, *two, per_device_train_batch_size=str(pairs // 2), output_dir=str(tmp_path / "two"), nprocs=2)
    expected = losses(tmp_path / "one")
    assert len(expected) == steps and max(expected) - min(expected) > 1e-3
    assert losses(tmp_path / "two") == pytest.approx(expected, abs=1e-6)
