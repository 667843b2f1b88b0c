"""Named eval sets and the best checkpoint (``metric_for_best_model``, ``load_best_model_at_end``) on a real run
(in-process 1-rank ZeRO-3)."""

import json

import pytest
import torch

from helpers.runs import read_metrics, short_run


def test_named_eval_sets_and_the_best_checkpoint_exported_at_the_end(single_rank, builtin_files, tmp_path, capsys):
    """Two named eval sets, each logged with HF's prefix (``eval_a_loss``, TensorBoard ``eval/a_loss``) and each scored
    by the precomputed reference. A checkpoint every step, each after an evaluation; at this learning rate
    ``eval_a_loss`` rises, so the best checkpoint (lowest loss: HF's default for a loss) is the first, not the last.
    With ``save_total_limit: 1`` it is kept beside the last (the one between is deleted), its record is in the later
    checkpoints' trainer state (what a resume reads), and ``load_best_model_at_end`` exports its weights, not the
    last ones."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    lines = open(builtin_files["eval_dataset"]).readlines()
    train, a, b = tmp_path / "train.jsonl", tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    train.write_text("".join(open(builtin_files["dataset"]).readlines()[:16]))  # the reference scores every pair
    a.write_text("".join(lines[:6]))
    b.write_text("".join(lines[6:10]))
    out = tmp_path / "out"
    recipe = short_run(
        builtin_files["model_name_or_path"],
        train,
        out,
        3,
        eval_dataset=json.dumps({"a": str(a), "b": str(b)}),
        eval_steps=1,
        save_steps=1,
        save_total_limit=1,
        metric_for_best_model="a_loss",
        load_best_model_at_end="true",
        reference="precomputed",
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    try:
        result = recipe.train()
        recipe.save()
    finally:
        recipe.cleanup()
    said = capsys.readouterr().out
    assert "eval pairs: 10 (a: 6, b: 4)" in said
    assert "reference log-probs of 6 pairs" in said and "reference log-probs of 4 pairs" in said
    assert "step 1: eval_a_loss" in said and "step 1: eval_b_loss" in said  # the progress bar's line per set

    evals = read_metrics(out, "eval_")
    for name in ("a", "b"):
        assert [r["step"] for r in evals if f"eval_{name}_loss" in r] == [1, 2, 3]
    assert not any("eval_loss" in r for r in evals)
    assert {"eval_a_rewards/accuracies", "eval_b_loss"} <= set(result.eval_metrics)
    a_loss = {r["step"]: r["eval_a_loss"] for r in evals if "eval_a_loss" in r}
    best_step = min(a_loss, key=a_loss.get)
    assert best_step != 3, a_loss  # else this test could not tell the best from the last

    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == sorted({f"step-{best_step}", "step-3"})
    recorded = json.loads((checkpoints / "step-3" / "trainer_state_rank0.json").read_text())["best"]
    assert recorded == {"step": best_step, "metric": "eval_a_loss", "value": pytest.approx(a_loss[best_step])}
    assert f"load_best_model_at_end: loaded the best checkpoint step-{best_step} (eval_a_loss" in said

    exported = load_file(out / "model.safetensors")
    best, last = (
        get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=f"step-{step}") for step in (best_step, 3)
    )
    assert set(exported) <= set(best)
    assert all(torch.equal(exported[k], best[k]) for k in exported)
    assert any(not torch.equal(exported[k], last[k]) for k in exported)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(out / "runs" / "out")).Reload().Tags()["scalars"]
    assert {"eval/a_loss", "eval/b_loss", "eval/a_rewards/accuracies"} <= set(tags)
