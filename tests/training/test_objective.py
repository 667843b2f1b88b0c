"""The objective a whole run optimises, in-process on one ZeRO-3 rank: step 1 equals TRL's loss, every loss type
trains from the command line, fillers and pair weights weigh as they should, ranked rows train like their pairs
written out, and non-finite steps are skipped and counted."""

import dataclasses
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_dpo.config import load_config
from ds_dpo.data.pipeline import load_tokenized
from ds_dpo.forward.layouts import PADDED, SHARED, collate_pairs
from ds_dpo.losses import LOSS_TYPES, LossConfig
from ds_dpo.training.metrics import MetricAccumulator
from ds_dpo.training.recipe import DPORecipe
from helpers.runs import cli, read_metrics, set_up, short_run


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type="sigmoid", beta=0.1),
        dict(loss_type="robust", beta=0.2, label_smoothing=0.2),
        dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1),
    ],
)  # every loss type's formula is checked against TRL in test_losses; these check a whole run's plumbing
def test_first_step_loss_matches_trl_compute_loss(options, single_rank, builtin_files, tmp_path):
    """A real (in-process) 1-rank ZeRO-3 run's step-1 loss (policy and a different reference model, 4 pairs) equals TRL 1.16's
    ``DPOTrainer._compute_loss`` on the same weights and the same collated batch, to 1e-5."""
    from helpers.trl_oracle import build_trainer, configure

    policy_dir = builtin_files["model_name_or_path"]
    ref_dir = tmp_path / "ref"
    reference = AutoModelForCausalLM.from_pretrained(policy_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.save_pretrained(ref_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(builtin_files["eval_dataset"]).readlines()[:4]))

    flags = []
    for key, value in options.items():
        flags += [f"--{key}", str(value).replace("'", "")]
    out = tmp_path / "run"
    recipe = set_up(
        *flags,
        model_name_or_path=policy_dir,
        ref_model_name_or_path=str(ref_dir),
        dataset=str(pairs),
        max_steps=1,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_steps=0,
        max_length=32,
        max_prompt_length=8,
        output_dir=str(out),
    )
    assert recipe.train().status == "finished"
    recipe.cleanup()
    ours = read_metrics(out)[0]["loss"]

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    data = load_tokenized(pairs, tokenizer, max_length=32, max_prompt_length=8)
    batch = collate_pairs([data[i] for i in range(4)], [1.0] * 4, tokenizer.pad_token_id, PADDED)
    trainer = configure(build_trainer(policy_dir, str(tmp_path / "trl"), ref_model=reference.eval()), **options)
    completion_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    completion_mask.view(-1)[batch["score_index"] + 1] = True  # in padded rows each label follows its predictor
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": completion_mask,
    }
    with torch.no_grad():
        expected = trainer._compute_loss(trainer.model, inputs, return_outputs=False).item()
        plain = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        policy_logits, reference_logits = trainer.model(**plain).logits, reference(**plain).logits
    print(f"step-1 loss {options}: ds_dpo {ours:.8f} TRL {expected:.8f} diff {ours - expected:.1e}")
    assert ours == pytest.approx(expected, abs=1e-5)
    # the comparison covers a reference that really differs from the policy (not the policy = reference start)
    assert (policy_logits - reference_logits).abs().max() > 1e-2


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_trains_from_the_cli(loss_type, single_rank, builtin_files, tmp_path):
    """Each registered loss, from command-line arguments through the real recipe (in-process 1-rank ZeRO-3). Ten
    pairs at 4 per step: the third step holds 2 real pairs and 2 weight-0 fillers, which batch-coupled losses must
    not see (else aot's sort or sft's token mean would change, and a NaN/inf could slip in)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(builtin_files["dataset"]).readlines()[:10]))
    argv = cli(
        model_name_or_path=builtin_files["model_name_or_path"],
        dataset=str(pairs),
        eval_dataset=str(pairs),
        loss_type=loss_type,
        num_train_epochs=1,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=3,
        learning_rate="1e-3",
        logging_steps=1,
        save_steps=0,
        max_length=512,
        output_dir=str(tmp_path / "out"),
    )
    if loss_type == "exo_pair":
        argv += ["--label_smoothing", "1e-3"]
    recipe = set_up(*argv)  # `--max_length` alone, as TRL users write it
    result = recipe.train()
    assert result.status == "finished" and result.step == 3
    assert (recipe.reference is None) == (not LossConfig(loss_type=loss_type).needs_reference)
    with torch.no_grad():  # fillers change nothing: 2 real pairs + 2 fillers == the 2 real pairs alone
        window = MetricAccumulator(recipe.device)
        mixed = recipe._micro_batch_loss(
            recipe._batch(recipe.train_data, [0, 1, 2, 3], [1.0, 1.0, 0.0, 0.0]), [1.0, 1.0, 0.0, 0.0], window
        )
        alone = recipe._micro_batch_loss(recipe._batch(recipe.train_data, [0, 1], [1.0, 1.0]), [1.0, 1.0], window)
    assert mixed.item() == pytest.approx(alone.item(), rel=1e-6)
    recipe.cleanup()
    train = read_metrics(tmp_path / "out")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train)
    assert math.isfinite(result.eval_metrics["eval_loss"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "out" / "runs" / "out"), size_guidance={"histograms": 0}).Reload()
    margins = events.Histograms("train/rewards/margins_histogram")  # every real pair of each logged window, no filler
    assert [(h.step, h.histogram_value.num) for h in margins] == [(1, 4), (2, 4), (3, 2)]
    assert events.Histograms("eval/rewards/chosen_histogram")[-1].histogram_value.num == len(recipe.eval_data[""])


def test_pair_weights_step_like_repeated_pairs(single_rank, builtin_files, tmp_path):
    """A `weight` column: pairs A (weight 2), B, C and D (weight 0) take the same first step as A, A, B, C unweighted
    (the loss is the weighted mean over the global batch), and differ from A, B, C, D unweighted."""
    rows = [json.loads(line) for line in open(builtin_files["dataset"]).readlines()[:4]]
    runs = {
        "weighted": [{**rows[0], "weight": 2}, rows[1], rows[2], {**rows[3], "weight": 0.0}],
        "repeated": [rows[0], rows[0], rows[1], rows[2]],
        "unweighted": rows,
    }
    grad_norms = {}
    for name, pairs in runs.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
        out = tmp_path / name
        recipe = set_up(
            model_name_or_path=builtin_files["model_name_or_path"],
            dataset=str(path),
            max_steps=1,
            per_device_train_batch_size=4,
            logging_steps=1,
            save_steps=0,
            learning_rate="1e-3",
            output_dir=str(out),
        )
        assert recipe.train().status == "finished"
        recipe.cleanup()
        grad_norms[name] = read_metrics(out)[0]["grad_norm"]
    assert grad_norms["weighted"] == pytest.approx(grad_norms["repeated"], rel=1e-5)
    assert abs(grad_norms["weighted"] / grad_norms["unweighted"] - 1) > 1e-3


def test_ranked_rows_train_like_their_pairs_written_out(single_rank, builtin_files, tmp_path):
    """K = 4 ranked responses to each of 2 prompts, all pairs (12): one step of the default prefix-shared run, which
    computes each prompt once and each response once, takes the same loss and gradient as the 12 pairs written out as
    explicit rows in padded batches (every sequence computed in full for every pair); ZeRO-3 policy and reference."""
    ranked = [
        {
            "prompt": f"count up from {n} :",
            "responses": [
                "".join(f" {n + k}" for k in range(1, 6)),
                f" {n + 1} {n + 2} {n + 4}",
                f" {n + 3} {n}",
                f" {n - 1}",
            ],
        }
        for n in (6, 48)
    ]
    written_out = [
        {"prompt": r["prompt"], "chosen": r["responses"][a], "rejected": r["responses"][b]}
        for r in ranked
        for a in range(4)
        for b in range(a + 1, 4)
    ]
    runs = {
        "ranked": (ranked, ["--response_pairing", "all_pairs"]),
        "pairs": (written_out, ["--padding_free", "false"]),
    }
    first_step = {}
    for name, (rows, options) in runs.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        recipe = short_run(
            builtin_files["model_name_or_path"], path, tmp_path / name, 1, *options, per_device_train_batch_size=12
        )
        if name == "ranked":
            assert len(recipe.train_data) == 12 and recipe.plan.layout is SHARED
            batch = recipe._batch(recipe.train_data, range(12), [1.0] * 12)
            assert batch["sequence_tokens"].numel() == 8 and int(batch["segment"].max()) == 1  # 2 prompts, 8 responses
        assert recipe.train().status == "finished"
        recipe.cleanup()
        first_step[name] = read_metrics(tmp_path / name)[0]
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected", "entropy"):
        assert first_step["ranked"][key] == pytest.approx(first_step["pairs"][key], rel=1e-5, abs=1e-6), key
    assert first_step["ranked"]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(single_rank, builtin_files, tmp_path, monkeypatch):
    """A NaN loss (injected into the recipe's loss on chosen steps) gives NaN gradients: DeepSpeed skips that
    update, the run counts it in `skipped_steps` and goes on with finite losses; too many in a row save a
    checkpoint and end the run with status `non_finite`."""
    argv = cli(
        model_name_or_path=builtin_files["model_name_or_path"],
        dataset=builtin_files["dataset"],
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate="1e-3",
        logging_steps=1,
        save_steps=0,
        max_length=32,
        max_prompt_length=8,
        max_consecutive_nan_steps=2,
    )

    def run(out, nan_steps):
        cfg = load_config([*argv, "--output_dir", str(out)])
        recipe = DPORecipe(cfg)
        recipe.setup()
        real = recipe._preference_loss
        calls = []

        def poisoned(*args, **kwargs):
            loss = real(*args, **kwargs)
            calls.append(1)
            if len(calls) in nan_steps:  # one micro-batch per step here
                return dataclasses.replace(loss, losses=loss.losses * float("nan"))
            return loss

        monkeypatch.setattr(recipe, "_preference_loss", poisoned)
        return recipe

    recipe = run(tmp_path / "one", {3})
    assert recipe.train().status == "finished"
    records = read_metrics(tmp_path / "one")
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 1]
    assert math.isnan(records[2]["loss"]) and not math.isfinite(records[2]["grad_norm"])
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i != 2)
    recipe.cleanup()

    recipe = run(tmp_path / "many", {2, 3, 4, 5, 6})
    result = recipe.train()
    assert result.status == "non_finite" and "2 optimizer steps in a row (up to step 3)" in result.message
    assert (tmp_path / "many" / "checkpoints" / "step-3").is_dir()
    recipe.cleanup()
