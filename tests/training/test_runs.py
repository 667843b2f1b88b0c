"""Runs across ranks and settings (ranks started as the launcher starts them, ``helpers.runs.launch``): two ranks and
gradient accumulation equal one rank, a LoRA run resumes and exports its adapter and merged model, real HH-RLHF data
end to end, mixture-of-experts models with their router loss, and the policy in train mode."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_dpo.data.pipeline import load_tokenized
from ds_dpo.forward.layouts import PADDED, collate_pairs
from ds_dpo.forward.logprobs import Scoring, concatenated_forward
from ds_dpo.forward.scoring import install_token_scoring
from helpers.models import save_tiny_model
from helpers.runs import REPO, SHORT, assert_same_weights, cli, launch, losses, read_metrics, set_up


@pytest.mark.slow
def test_two_ranks_and_accumulation_reproduce_one_rank(tmp_path):
    """Same global batch of 8 pairs: 1 rank x 8 on the plain padded path with full logits is the oracle. On 2 ranks
    (ZeRO-3 policy + ZeRO-3 reference unless said): packing without prefix sharing with tiny log-prob chunks and
    token-budget micro-batches, MLPs in 3 slices and no ZeRO-3 weight kept gathered; 2 x 2 accumulation with the default prefix-shared batches and chunked log-probs, a
    ZeRO-2 policy and the precomputed reference; ZeRO-3 with parameter + optimizer offload (DeepSpeedCPUAdam),
    reference offload and gradient checkpointing; sequence-parallel over the 2 ranks (one data-parallel rank of 4
    pairs x 2 accumulation; packed rows, tiny log-prob chunks, gradient checkpointing with offloading). All give the same trajectory: loss trajectories
    agree to 1e-6 (seen: at most ~6e-8). (Final weights are not compared here: Adam's first updates are about
    lr x sign(gradient), so float noise in near-zero gradient components moves weights by ~1e-5 between any two
    layouts, two 1-rank runs included; runs that differ only in how ranks split the work are compared in
    test_checkpoint and the LoRA test.)"""
    plain = ["--padding_free", "false", "--logps_chunk_size", "0"]
    # no weight stays gathered between uses: every MLP slice's forward is a collective, which hangs where ranks cut
    # different numbers of slices
    zero3 = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3_gather_all.json").write_text(json.dumps(zero3))
    runs = {
        "1x8_plain": (1, ["--per_device_train_batch_size", "8", *plain]),
        # 18-token pairs, 40-token budget: 2 micro-batches of 2 pairs per rank and step where the config says 1;
        # ranks score different numbers of tokens, so they run different numbers of chunks; their rows differ in
        # length, and each cuts its MLPs' tokens into 3 slices
        "2x4_packed_chunk3_token_budget_tiled": (
            2,
            cli(
                per_device_train_batch_size=4,
                prefix_sharing=False,
                logps_chunk_size=3,
                max_tokens_per_batch=40,
                tiled_mlp_shards=3,
                deepspeed=str(tmp_path / "zero3_gather_all.json"),
            ),
        ),
        "2x2x2_zero2_precomputed": (
            2,
            cli(
                per_device_train_batch_size=2,
                gradient_accumulation_steps=2,
                deepspeed="ds_configs/zero2.json",
                reference="precomputed",
            ),
        ),
        "2x4_offload": (
            2,
            cli(
                per_device_train_batch_size=4,
                deepspeed="ds_configs/zero3_offload.json",
                ref_offload=True,
                gradient_checkpointing=True,
            ),
        ),
        "sp2_packed_x2": (
            2,
            cli(
                sequence_parallel_size=2,
                per_device_train_batch_size=4,
                gradient_accumulation_steps=2,
                prefix_sharing=False,
                logps_chunk_size=3,
                gradient_checkpointing=True,
                activation_offloading=True,
            ),
        ),
    }
    curves = {}
    for name, (nprocs, args) in runs.items():
        launch(*SHORT, *args, output_dir=str(tmp_path / name), nprocs=nprocs)
        curves[name] = losses(tmp_path / name)
    expected = curves["1x8_plain"]
    assert len(expected) == 8 and expected[0] == pytest.approx(0.6931472, abs=1e-6)
    assert max(expected) - min(expected) > 1e-2  # the runs really train
    for name, curve in curves.items():
        assert curve == pytest.approx(expected, abs=1e-6), name


@pytest.mark.slow
def test_lora_reference_run_resumes_and_exports_adapter_and_merged_model(tmp_path):
    """LoRA + ZeRO-3 + gradient checkpointing together (TRL #2514). Resuming from the step-3 checkpoint
    sequence-parallel (the 2 ranks share each micro-batch of prefix-shared rows: one data-parallel rank of 32 pairs,
    the same global batch; reference log-probs precomputed with the adapters disabled) reproduces steps 4-6, the
    final eval and the final adapter. The checkpoint exports offline (adapter + merged model) as the run exported
    itself. Then a run that starts from the exported adapter with that adapter, frozen, as its reference."""
    out = tmp_path / "lora"
    common = [
        "--max_steps",
        "6",
        "--logging_steps",
        "1",
        "--save_steps",
        "3",
        "--save_total_limit",
        "2",
        "--max_samples",
        "640",  # of the built-in task's 4,000: enough for 6 steps, less to precompute
        "--use_peft",
        "true",
        "--reference",
        "lora",
        "--lora_r",
        "4",
        "--learning_rate",
        "1e-2",
        "--save_merged_model",
        "true",
        "--gradient_checkpointing",
        "true",
    ]
    launch(*common, output_dir=str(out))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-6").is_dir()
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    (resumed / "checkpoints" / "latest").write_text("step-3")
    proc = launch(
        *common,
        output_dir=str(resumed),
        resume_from_checkpoint="auto",
        sequence_parallel_size=2,
        per_device_train_batch_size=32,
        precompute_ref_log_probs=True,
    )
    assert "sequence-parallel over 2 ranks" in proc.stdout
    assert [r["step"] for r in read_metrics(resumed)] == [4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(out)[3:], abs=1e-6)
    # each pair counted once, not once per rank of the group
    assert [r["num_tokens"] for r in read_metrics(resumed)] == [r["num_tokens"] for r in read_metrics(out)[3:]]
    assert read_metrics(resumed, "eval_")[-1]["eval_loss"] == pytest.approx(
        read_metrics(out, "eval_")[-1]["eval_loss"], abs=1e-6
    )
    assert_same_weights(out, resumed, tol=1e-5)
    exported = tmp_path / "exported"
    subprocess.run(
        [sys.executable, "launch/export.py", str(out / "checkpoints" / "step-6"), str(exported), "--merge"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    assert_same_weights(out, exported)
    assert_same_weights(out / "merged", exported / "merged")
    merged = install_token_scoring(AutoModelForCausalLM.from_pretrained(out / "merged").eval())
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    data = load_tokenized(out / "builtin" / "eval.jsonl", tokenizer, max_length=32, max_prompt_length=8)
    rows = [data[i] for i in range(len(data))]
    with torch.no_grad():
        logps = concatenated_forward(
            merged, collate_pairs(rows, [1.0] * len(rows), tokenizer.pad_token_id, PADDED), Scoring(PADDED, 0)
        )
    final = read_metrics(out, "eval_")[-1]
    assert logps.chosen.mean().item() == pytest.approx(final["eval_logps/chosen"], rel=1e-5)
    assert read_metrics(out)[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # adapters start as a no-op
    from_adapter = tmp_path / "from_adapter"
    launch(
        max_steps=1,
        logging_steps=1,
        save_steps=0,
        adapter_name_or_path=str(out),
        reference="zero",
        lora_r=4,
        max_samples=640,
        output_dir=str(from_adapter),
    )
    first, base = read_metrics(from_adapter)[0], read_metrics(out)[0]  # the same first batch (same seed)
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy and reference: base + the same adapter
    assert first["logps/chosen"] > base["logps/chosen"] + 0.1  # ... and that adapter is the trained one (a fresh


@pytest.mark.slow
def test_short_training_run_on_hh_rlhf(tmp_path, hh_data):
    """Real data end to end: HH-RLHF harmless-base test (implicit prompts, 9 bad rows skipped), a BPE tokenizer
    trained on it and a tiny random-init Llama, 2 ranks, ZeRO-3."""
    import gzip

    from transformers import LlamaConfig

    from ds_dpo.data import builtin

    rows = [json.loads(line) for line in gzip.open(hh_data, "rt")]
    tokenizer = builtin.train_bpe_tokenizer((r[k] for r in rows for k in ("chosen", "rejected")), 4096)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**builtin.MODEL_CONFIG, "max_position_embeddings": 512},
    )
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    proc = launch(
        model_name_or_path=str(model_dir),
        dataset=str(hh_data),
        on_bad_rows="skip",
        eval_split_ratio=0.01,
        max_length=256,
        max_prompt_length=192,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=8,
        max_steps=4,
        logging_steps=2,
        save_steps=0,
        learning_rate="1e-4",
        dataset_cache_dir=str(tmp_path / "cache"),
        output_dir=str(out),
    )
    assert "4 x empty completion" in proc.stdout and "implicit" in proc.stdout
    report = json.loads((out / "data_report.json").read_text())
    assert report["train_pairs"] + report["eval_pairs"] == 2303 and report["eval_pairs"] == 24
    assert [r["step"] for r in read_metrics(out)] == [2, 4]
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert math.isfinite(read_metrics(out, "eval_")[-1]["eval_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("family, reference", [("mixtral", "zero")])  # more families: test_model_families
def test_moe_models_train_on_two_ranks_with_their_router_loss(family, reference, builtin_files, tmp_path):
    """An MoE model under ZeRO-3 on 2 ranks: the router loss is logged and trained with, the MoE blocks are ZeRO-3
    leaf modules of both engines."""
    model = save_tiny_model(family, builtin_files["model_name_or_path"], tmp_path / "model")
    out = tmp_path / "run"
    extra = ["--use_peft", "true", "--lora_r", "4"] if reference == "lora" else []
    proc = launch(
        *SHORT,
        *extra,
        max_steps=4,
        model_name_or_path=model,
        dataset=builtin_files["dataset"],
        eval_dataset=builtin_files["eval_dataset"],
        reference=reference,
        router_aux_loss_coef=0.02,
        per_device_train_batch_size=2,
        output_dir=str(out),
    )
    assert "router load-balancing loss added with weight 0.02" in proc.stdout
    rows = read_metrics(out)
    assert len(rows) == 4 and all(r["aux_loss"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert read_metrics(out, "eval_")[-1]["eval_aux_loss"] > 0
    block = {"mixtral": "MixtralSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock"}[family]
    configs = ["deepspeed_config.json"] + (["reference_deepspeed_config.json"] if reference == "zero" else [])
    for name in configs:
        leaf = json.loads((out / name).read_text())["zero_optimization"]["leaf_module"]["classes"]
        assert any(c.endswith(block) for c in leaf), (name, leaf)


def one_step_on_builtin(builtin_files: dict, out, **keys):
    """An in-process recipe set up for one step of 2 pairs of the built-in task, with ``keys``."""
    return set_up(
        model_name_or_path=builtin_files["model_name_or_path"],
        dataset=builtin_files["dataset"],
        max_steps=1,
        per_device_train_batch_size=2,
        save_steps=0,
        output_dir=str(out),
        **keys,
    )


def test_the_policy_trains_in_train_mode_so_checkpointing_applies(single_rank, builtin_files, tmp_path):
    """from_pretrained returns an eval-mode model, where transformers skips gradient checkpointing: the policy must be
    put in train mode, else `gradient_checkpointing: true` silently keeps every activation (seen before the fix)."""
    recipe = one_step_on_builtin(builtin_files, tmp_path, gradient_checkpointing=True)
    layers = recipe.policy.module.model.layers
    checkpointed = []
    for layer in layers:
        func = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, func=func, **kw: checkpointed.append(1) or func(*a, **kw)
    recipe.train_step(next(recipe.sampler.plans())[2])
    recipe.cleanup()
    assert recipe.policy.module.training and len(checkpointed) == len(layers)


def test_deepspeed_auto_runs_plain_deepspeed_on_one_rank(single_rank, builtin_files, tmp_path, capsys):
    """`deepspeed: auto` on one rank: the estimator's pick (ZeRO-0) is announced, built, and dumped with the run;
    `logps_chunk_size: auto` (the default) is sized to the small vocabulary: 1024 tokens."""
    recipe = one_step_on_builtin(builtin_files, tmp_path, deepspeed="auto")
    recipe.train_step(next(recipe.sampler.plans())[2])
    recipe.cleanup()
    out = capsys.readouterr().out
    assert (
        "notice: deepspeed auto: ds_configs/ddp.json (ZeRO-0," in out and "log-probs from chunks of 1024 tokens" in out
    )
    assert recipe.policy.zero_optimization_stage() == 0 and math.isfinite(recipe.state.window.reduce()["loss"])
    assert json.loads((tmp_path / "deepspeed_config.json").read_text())["zero_optimization"]["stage"] == 0
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["deepspeed"]["zero_optimization"]["stage"] == 0
