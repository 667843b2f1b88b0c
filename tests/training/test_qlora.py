"""QLoRA (`load_in_4bit`): LoRA adapters on a 4-bit bitsandbytes base, the reference being that base with the
adapters off, through the real recipe; the exported adapter and merged model score as the trained engine."""

import math

import pytest
import torch

from helpers.runs import SHORT, assert_same_weights, cli, launch, losses, read_metrics, short_run, stopped_at

pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (the test extra installs it)")

QLORA = cli(use_peft=True, load_in_4bit=True, reference="lora", lora_r=4)


def causal_logps(model, rows) -> torch.Tensor:
    """[2B] chosen then rejected completion log-probs of ``rows`` from the model's own forward, one unpadded
    sequence at a time."""
    logps = []
    for side in ("chosen", "rejected"):
        for row in rows:
            prompt, completion = row["prompt_input_ids"], row[f"{side}_input_ids"]
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            logps.append(logits.log_softmax(-1).gather(-1, ids[0, len(prompt) :, None]).sum())
    return torch.stack(logps)


def four_bit_layers(model) -> dict:
    from bitsandbytes.nn import Linear4bit

    return {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}


def test_qlora_trains_only_adapters_on_a_4bit_base_and_exports_adapter_and_merged_model(
    single_rank, builtin_files, tmp_path
):
    """One in-process 1-rank ZeRO-2 run (whole parameters to compare; ZeRO-3: the 2-rank test): the base is 4-bit and never moves, only the adapters train; the reference
    is that base with adapters off (step 1 at ln 2, its log-probs after training equal the policy's before); no
    4-bit layer was switched to bitsandbytes' CPU inference format, which has no backward, by the eval-mode passes
    (self-check, reference, evaluation); the exported adapter on a freshly loaded 4-bit base and the merged model
    (dequantized base + adapters, plain transformers) score the pairs as the trained engine does, and the offline
    export of the run's checkpoint (launch/export.py) writes the same files."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ds_dpo.forward.logprobs import concatenated_forward
    from ds_dpo.models.engines import quantization_config
    from ds_dpo.training.export import export_checkpoint

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(builtin_files["dataset"]).readlines()[:16]))
    out = tmp_path / "run"
    model_dir = builtin_files["model_name_or_path"]
    recipe = short_run(
        model_dir,
        pairs,
        out,
        6,
        *QLORA,
        learning_rate="3e-2",
        save_merged_model=True,
        deepspeed="ds_configs/zero2.json",
        save_steps=6,
    )
    model = recipe.policy.module
    layers = four_bit_layers(model)
    assert layers and all(m.weight.dtype == torch.uint8 for m in layers.values())
    base = {name: m.weight.detach().clone() for name, m in layers.items()}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    rows = [recipe.train_data[i] for i in range(4)]
    batch = recipe._batch(recipe.train_data, range(4), [1.0] * 4)
    with torch.no_grad():
        recipe.policy.eval()
        before = concatenated_forward(recipe.policy, batch, recipe.plan.scoring)

    assert recipe.train().status == "finished"
    recipe.save()
    with torch.no_grad():
        recipe.policy.eval()
        after = concatenated_forward(recipe.policy, batch, recipe.plan.scoring)
    reference = recipe.reference.logps(batch)
    recipe.cleanup()

    assert losses(out)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert read_metrics(out, "eval_")[-1]["eval_loss"] < math.log(2) - 5e-3  # on the pairs it trained on
    assert all(torch.equal(base[name], m.weight) for name, m in layers.items())
    assert all(not getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers.values())
    assert all(not torch.equal(adapters[n], p) for n, p in model.named_parameters() if n in adapters and "lora_B" in n)
    torch.testing.assert_close(torch.cat(reference), torch.cat([before.chosen, before.rejected]), rtol=0, atol=0)
    trained = torch.cat([after.chosen, after.rejected])
    assert (trained - torch.cat([before.chosen, before.rejected])).abs().max() > 1e-3

    assert (out / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        base_4bit = AutoModelForCausalLM.from_pretrained(
            model_dir, quantization_config=quantization_config(recipe.cfg.model, torch.float32)
        )
        reloaded = PeftModel.from_pretrained(base_4bit, out).eval()
        torch.testing.assert_close(causal_logps(reloaded, rows), trained, rtol=1e-5, atol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert not hasattr(merged.config, "quantization_config")
        torch.testing.assert_close(causal_logps(merged, rows), trained, rtol=1e-4, atol=1e-4)

    export_checkpoint(out / "checkpoints" / "step-6", tmp_path / "offline", merge=True)
    for name in ("adapter_model.safetensors", "merged/model.safetensors"):
        live, offline = load_file(out / name), load_file(tmp_path / "offline" / name)
        assert live.keys() == offline.keys() and all(torch.equal(live[k], offline[k]) for k in live)


def test_qlora_with_a_separate_reference_is_refused_at_startup(builtin_files, tmp_path):
    """A separate reference would be the full-precision model: refused before any model loads, exit status 2."""
    proc = launch(*QLORA, nprocs=1, check=False, timeout=120, output_dir=tmp_path / "run", reference="zero")
    assert proc.returncode == 2
    assert "`load_in_4bit` with `reference: zero`" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_qlora_on_two_ranks_gives_the_same_run_under_zero2_and_zero3(tmp_path):
    """The built-in task on 2 ranks: ZeRO-3 partitions the 4-bit base that transformers loaded whole on each rank
    (it does not load quantized models under zero.Init); the run equals ZeRO-2's, which keeps it whole, and so do
    the exported adapter and the merged model (dequantized from ZeRO-3's gathered 4-bit weights). The ZeRO-3 run
    resumed from its step-2 checkpoint (which holds the 4-bit base with bitsandbytes' quantization state) ends as it
    did."""
    from safetensors.torch import load_file

    runs = {}
    run = lambda stage, out, *extra: launch(  # noqa: E731
        *SHORT,
        *QLORA,
        *extra,
        output_dir=out,
        deepspeed=f"ds_configs/{stage}.json",
        max_steps=4,
        save_steps=2,
        save_total_limit=2,  # the built-in task keeps 1: step 2 must stay to resume from
        save_merged_model=True,
    )
    for stage in ("zero2", "zero3"):
        runs[stage] = tmp_path / stage
        run(stage, runs[stage])
    stopped_at(runs["zero3"], 2, tmp_path / "resumed")
    run("zero3", tmp_path / "resumed", "--resume_from_checkpoint", "auto")
    assert losses(tmp_path / "resumed") == pytest.approx(losses(runs["zero3"]), abs=1e-6)
    assert_same_weights(runs["zero3"], tmp_path / "resumed", tol=1e-6)
    assert losses(runs["zero2"]) == pytest.approx(losses(runs["zero3"]), abs=1e-6)
    assert losses(runs["zero3"])[0] == pytest.approx(math.log(2), abs=1e-6)
    # the stages sum gradients in different orders; Adam turns that rounding, on near-zero gradients, into weight
    # differences of ~2e-5 after 4 steps (the adapters' entries are ~0.1)
    assert_same_weights(runs["zero2"], runs["zero3"], tol=1e-4)
    merged = [load_file(runs[stage] / "merged" / "model.safetensors") for stage in runs]
    assert merged[0].keys() == merged[1].keys()
    assert max((merged[0][k] - merged[1][k]).abs().max().item() for k in merged[0]) <= 1e-4
