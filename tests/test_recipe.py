"""End-to-end runs of launch/train.py on CPU ranks (gloo): the README's demo and the two-node hostfile run under the
real ``deepspeed`` launcher, the rest as its ranks started directly (``conftest.launch``)."""

import dataclasses
from concurrent.futures import ThreadPoolExecutor
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DEEPSPEED, REPO, assert_same_weights, free_port, launch, read_metrics, run_job
from ds_dpo.config import load_config
from ds_dpo.data import load_tokenized
from ds_dpo.layouts import collate_pairs
from ds_dpo.logprobs import concatenated_forward, enable_token_scoring
from ds_dpo.losses import LOSS_TYPES, LossConfig
from ds_dpo.metrics import MetricAccumulator
from ds_dpo.recipe import DPORecipe

SHORT = ["--max_steps", "8", "--logging_steps", "1", "--save_steps", "0", "--eval_steps", "100"]


def losses(output_dir):
    return [r["loss"] for r in read_metrics(output_dir)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The README's main command, as written there (built-in task, 2 ranks, ZeRO-3, `zero` reference)."""
    out = tmp_path_factory.mktemp("demo")
    proc = run_job(["bash", "launch/demo.sh", "--output_dir", str(out)], timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


@pytest.mark.slow
def test_demo_learns_the_task(demo):
    out, stdout = demo
    accuracy = float(re.search(r"held-out reward accuracy: ([0-9.]+)", stdout).group(1))
    assert accuracy >= 0.9
    first = read_metrics(out)[0]
    assert first["step"] == 10 and 0.3 < first["loss"] < 0.75  # starts near ln 2 = 0.693
    assert not list(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*_29500_*"))  # no leaked shm buffers


@pytest.mark.slow
def test_demo_writes_config_metrics_and_tensorboard(demo):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = demo
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    ds = json.loads((out / "deepspeed_config.json").read_text())  # as handed to DeepSpeed
    assert cfg["reference"] == "zero" and ds["zero_optimization"]["stage"] == 3
    assert ds["train_batch_size"] == 2 * cfg["per_device_train_batch_size"]
    tags = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "learning_rate", "grad_norm", "epoch",
            "pairs_per_second", "tokens_per_second", "peak_memory_mb", "entropy", "mean_token_accuracy", "num_tokens"]
    events = EventAccumulator(str(out / "runs" / out.name)).Reload()  # the run's own folder, HF Trainer's tags
    scalars = set(events.Tags()["scalars"])
    assert {f"train/{t}" for t in tags} <= scalars
    assert {f"eval/{t}" for t in tags[:9]} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == list(range(10, cfg["max_steps"] + 1, 10))
    train = read_metrics(out)
    assert all(set(tags) <= set(r) for r in train)
    counts = [r["num_tokens"] for r in train]  # the run's total, growing with every window
    assert counts[0] > 0 and all(b > a for a, b in zip(counts, counts[1:]))
    # HF's cosine schedule with warmup: the lr logged at step s is the one its update used, lr(s - 1).
    total, warmup, peak = cfg["max_steps"], round(cfg["warmup_ratio"] * cfg["max_steps"]), cfg["learning_rate"]
    for r in train:
        progress = (r["step"] - 1 - warmup) / (total - warmup)
        assert r["learning_rate"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-6)


@pytest.mark.slow
def test_demo_checkpoints_rotate(demo):
    out, _ = demo
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-100"]  # save_total_limit 1


@pytest.mark.slow
def test_exported_model_loads_with_plain_transformers_and_matches_engine(demo):
    out, _ = demo
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # config + safetensors + tokenizer, nothing else
    enable_token_scoring(model)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    final = read_metrics(out, "eval_")[-1]
    data = load_tokenized(out / "builtin" / "eval.jsonl", tokenizer, 32, 8)
    chosen, rejected = [], []
    with torch.no_grad():
        for s in range(0, len(data), 32):
            rows = [data[i] for i in range(s, min(s + 32, len(data)))]
            # the plain padded path; the run itself used prefix-shared batches and chunked log-probs
            logps = concatenated_forward(model, collate_pairs(rows, [1.0] * len(rows), tokenizer.pad_token_id),
                                         logps_chunk_size=0)
            chosen.append(logps.chosen)
            rejected.append(logps.rejected)
    assert torch.cat(chosen).mean().item() == pytest.approx(final["eval_logps/chosen"], rel=1e-5)
    assert torch.cat(rejected).mean().item() == pytest.approx(final["eval_logps/rejected"], rel=1e-5)


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
        "2x4_packed_chunk3_token_budget_tiled": (2, [
            "--per_device_train_batch_size", "4", "--prefix_sharing", "false", "--logps_chunk_size", "3",
            "--max_tokens_per_batch", "40", "--tiled_mlp_shards", "3",
            "--deepspeed", str(tmp_path / "zero3_gather_all.json")]),
        "2x2x2_zero2_precomputed": (2, ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
                                        "--deepspeed", "ds_configs/zero2.json", "--reference", "precomputed"]),
        "2x4_offload": (2, ["--per_device_train_batch_size", "4", "--deepspeed", "ds_configs/zero3_offload.json",
                            "--ref_offload", "true", "--gradient_checkpointing", "true"]),
        "sp2_packed_x2": (2, ["--sequence_parallel_size", "2", "--per_device_train_batch_size", "4",
                              "--gradient_accumulation_steps", "2", "--prefix_sharing", "false",
                              "--logps_chunk_size", "3", "--gradient_checkpointing", "true",
                              "--activation_offloading", "true"]),
    }
    curves = {}
    for name, (nprocs, args) in runs.items():
        launch(*SHORT, *args, "--output_dir", str(tmp_path / name), nprocs=nprocs)
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
    common = ["--max_steps", "6", "--logging_steps", "1", "--save_steps", "3", "--save_total_limit", "2",
              "--max_samples", "640",  # of the built-in task's 4,000: enough for 6 steps, less to precompute
              "--use_peft", "true", "--reference", "lora", "--lora_r", "4", "--learning_rate", "1e-2",
              "--save_merged_model", "true", "--gradient_checkpointing", "true"]
    launch(*common, "--output_dir", str(out))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-6").is_dir()
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    (resumed / "checkpoints" / "latest").write_text("step-3")
    proc = launch(*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "auto",
                  "--sequence_parallel_size", "2", "--per_device_train_batch_size", "32",
                  "--precompute_ref_log_probs", "true")
    assert "sequence-parallel over 2 ranks" in proc.stdout
    assert [r["step"] for r in read_metrics(resumed)] == [4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(out)[3:], abs=1e-6)
    # each pair counted once, not once per rank of the group
    assert [r["num_tokens"] for r in read_metrics(resumed)] == [r["num_tokens"] for r in read_metrics(out)[3:]]
    assert read_metrics(resumed, "eval_")[-1]["eval_loss"] == pytest.approx(
        read_metrics(out, "eval_")[-1]["eval_loss"], abs=1e-6)
    assert_same_weights(out, resumed, tol=1e-5)
    exported = tmp_path / "exported"
    subprocess.run([sys.executable, "launch/export.py", str(out / "checkpoints" / "step-6"), str(exported), "--merge"],
                   cwd=REPO, check=True, capture_output=True)
    assert_same_weights(out, exported)
    assert_same_weights(out / "merged", exported / "merged")
    merged = enable_token_scoring(AutoModelForCausalLM.from_pretrained(out / "merged").eval())
    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    data = load_tokenized(out / "builtin" / "eval.jsonl", tokenizer, 32, 8)
    rows = [data[i] for i in range(len(data))]
    with torch.no_grad():
        logps = concatenated_forward(merged, collate_pairs(rows, [1.0] * len(rows), tokenizer.pad_token_id))
    final = read_metrics(out, "eval_")[-1]
    assert logps.chosen.mean().item() == pytest.approx(final["eval_logps/chosen"], rel=1e-5)
    assert read_metrics(out)[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # adapters start as a no-op
    from_adapter = tmp_path / "from_adapter"
    launch("--max_steps", "1", "--logging_steps", "1", "--save_steps", "0", "--adapter_name_or_path", str(out),
           "--reference", "zero", "--lora_r", "4", "--max_samples", "640", "--output_dir", str(from_adapter))
    first, base = read_metrics(from_adapter)[0], read_metrics(out)[0]  # the same first batch (same seed)
    assert first["loss"] == pytest.approx(0.6931472, abs=1e-6)  # policy and reference: base + the same adapter
    assert first["logps/chosen"] > base["logps/chosen"] + 0.1  # ... and that adapter is the trained one (a fresh
    # one would give the base model's -25.44 exactly; seen: -24.87)


@pytest.mark.slow
def test_config_errors_stop_before_training(tmp_path):
    proc = launch("--betta", "0.1", "--output_dir", str(tmp_path), nprocs=1, check=False)
    assert proc.returncode != 0
    assert "unknown config key `betta` in the command line; did you mean `beta`?" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_two_node_hostfile_launch_takes_yaml_and_overrides(tmp_path):
    """Two "nodes" on this machine: a hostfile with two hosts and one launcher per node (--no_ssh), as under SLURM,
    in bf16. `--config OUTPUT_DIR/config.yaml` of that run then repeats it on one node."""
    (tmp_path / "hosts").write_text("node0 slots=1\nnode1 slots=1\n")
    (tmp_path / "run.yaml").write_text("max_steps: 4\nlogging_steps: 1\nbeta: 0.2\nsave_steps: 2\nbf16: true\n")
    out, port = tmp_path / "out", str(free_port())
    commands = [[DEEPSPEED, "--hostfile", str(tmp_path / "hosts"), "--no_ssh", "--node_rank", str(rank),
                 "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py", "--config",
                 str(tmp_path / "run.yaml"), "--learning_rate", "1e-3", "--output_dir", str(out)] for rank in (0, 1)]
    with ThreadPoolExecutor(2) as pool:  # the two nodes' launchers run side by side
        nodes = list(pool.map(run_job, commands))
    assert [p.returncode for p in nodes] == [0, 0], "".join(p.stdout[-3000:] + p.stderr[-3000:] for p in nodes)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["beta"] == 0.2 and cfg["learning_rate"] == 1e-3
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["train_batch_size"] == 2 * cfg["per_device_train_batch_size"] and ds["bf16"]["enabled"] is True
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4] and all(math.isfinite(x) for x in losses(out))
    assert (out / "checkpoints" / "step-4").is_dir() and (out / "model.safetensors").is_file()
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    # The same 2 ranks on one node, started from the finished run's config.yaml (flat keys, the DeepSpeed JSON
    # inlined): the same run.
    one_node = tmp_path / "one_node"
    launch("--config", str(out / "config.yaml"), "--output_dir", str(one_node))
    assert losses(out) == pytest.approx(losses(one_node), abs=1e-6)


@pytest.mark.parametrize("options", [
    dict(loss_type="sigmoid", beta=0.1),
    dict(loss_type="robust", beta=0.2, label_smoothing=0.2),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.1),
])  # every loss type's formula is checked against TRL in test_losses; these check a whole run's plumbing
def test_first_step_loss_matches_trl_compute_loss(options, single_rank, builtin_files, tmp_path):
    """A real (in-process) 1-rank ZeRO-3 run's step-1 loss (policy and a different reference model, 4 pairs) equals TRL 1.16's
    ``DPOTrainer._compute_loss`` on the same weights and the same collated batch, to 1e-5."""
    from trl_oracle import build_trainer, configure

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
    cfg = load_config(["--model_name_or_path", policy_dir, "--ref_model_name_or_path", str(ref_dir),
                       "--dataset", str(pairs), "--max_steps", "1", "--per_device_train_batch_size", "4",
                       "--logging_steps", "1", "--save_steps", "0", "--max_length", "32", "--max_prompt_length", "8",
                       "--output_dir", str(out), *flags])
    cfg.validate()
    recipe = DPORecipe(cfg)
    recipe.setup()
    assert recipe.train().status == "finished"
    recipe.cleanup()
    ours = read_metrics(out)[0]["loss"]

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    data = load_tokenized(pairs, tokenizer, 32, 8)
    batch = collate_pairs([data[i] for i in range(4)], [1.0] * 4, tokenizer.pad_token_id)
    trainer = configure(build_trainer(policy_dir, str(tmp_path / "trl"), ref_model=reference.eval()), **options)
    completion_mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    completion_mask.view(-1)[batch["score_index"] + 1] = True  # in padded rows each label follows its predictor
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": completion_mask}
    with torch.no_grad():
        expected = trainer._compute_loss(trainer.model, inputs, return_outputs=False).item()
    print(f"step-1 loss {options}: ds_dpo {ours:.8f} TRL {expected:.8f} diff {ours - expected:.1e}")
    assert ours == pytest.approx(expected, abs=1e-5)
    assert abs(expected - math.log(2)) > 1e-3 or options["loss_type"] != "sigmoid"  # the reference really differs


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_trains_from_the_cli(loss_type, single_rank, builtin_files, tmp_path):
    """Each registered loss, from command-line arguments through the real recipe (in-process 1-rank ZeRO-3). Ten
    pairs at 4 per step: the third step holds 2 real pairs and 2 weight-0 fillers, which batch-coupled losses must
    not see (else aot's sort or sft's token mean would change, and a NaN/inf could slip in)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(builtin_files["dataset"]).readlines()[:10]))
    argv = ["--model_name_or_path", builtin_files["model_name_or_path"], "--dataset", str(pairs),
            "--eval_dataset", str(pairs), "--loss_type", loss_type, "--num_train_epochs", "1",
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "3", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--save_steps", "0", "--max_length", "512", "--output_dir", str(tmp_path / "out")]
    if loss_type == "exo_pair":
        argv += ["--label_smoothing", "1e-3"]
    cfg = load_config(argv)  # `--max_length` alone, as TRL users write it
    cfg.validate()
    recipe = DPORecipe(cfg)
    recipe.setup()
    result = recipe.train()
    assert result.status == "finished" and result.step == 3
    assert (recipe.reference is None) == (not LossConfig(loss_type=loss_type).needs_reference)
    with torch.no_grad():  # fillers change nothing: 2 real pairs + 2 fillers == the 2 real pairs alone
        window = MetricAccumulator(recipe.device)
        mixed = recipe._micro_batch_loss(recipe._batch(recipe.train_data, [0, 1, 2, 3], [1.0, 1.0, 0.0, 0.0]),
                                         [1.0, 1.0, 0.0, 0.0], window)
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
    assert events.Histograms("eval/rewards/chosen_histogram")[-1].histogram_value.num == len(recipe.eval_data)


def test_pair_weights_step_like_repeated_pairs(single_rank, builtin_files, tmp_path):
    """A `weight` column: pairs A (weight 2), B, C and D (weight 0) take the same first step as A, A, B, C unweighted
    (the loss is the weighted mean over the global batch), and differ from A, B, C, D unweighted."""
    rows = [json.loads(line) for line in open(builtin_files["dataset"]).readlines()[:4]]
    runs = {"weighted": [{**rows[0], "weight": 2}, rows[1], rows[2], {**rows[3], "weight": 0.0}],
            "repeated": [rows[0], rows[0], rows[1], rows[2]], "unweighted": rows}
    grad_norms = {}
    for name, pairs in runs.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
        out = tmp_path / name
        cfg = load_config(["--model_name_or_path", builtin_files["model_name_or_path"], "--dataset", str(path),
                           "--max_steps", "1", "--per_device_train_batch_size", "4", "--logging_steps", "1",
                           "--save_steps", "0", "--learning_rate", "1e-3", "--output_dir", str(out)])
        cfg.validate()
        recipe = DPORecipe(cfg)
        recipe.setup()
        assert recipe.train().status == "finished"
        recipe.cleanup()
        grad_norms[name] = read_metrics(out)[0]["grad_norm"]
    assert grad_norms["weighted"] == pytest.approx(grad_norms["repeated"], rel=1e-5)
    assert abs(grad_norms["weighted"] / grad_norms["unweighted"] - 1) > 1e-3


def test_ranked_rows_train_like_their_pairs_written_out(single_rank, builtin_files, tmp_path):
    """K = 4 ranked responses to each of 2 prompts, all pairs (12): one step of the default prefix-shared run, which
    computes each prompt once and each response once, takes the same loss and gradient as the 12 pairs written out as
    explicit rows in padded batches (every sequence computed in full for every pair); ZeRO-3 policy and reference."""
    ranked = [{"prompt": f"count up from {n} :",
               "responses": ["".join(f" {n + k}" for k in range(1, 6)), f" {n + 1} {n + 2} {n + 4}", f" {n + 3} {n}",
                             f" {n - 1}"]} for n in (6, 48)]
    written_out = [{"prompt": r["prompt"], "chosen": r["responses"][a], "rejected": r["responses"][b]}
                   for r in ranked for a in range(4) for b in range(a + 1, 4)]
    runs = {"ranked": (ranked, ["--response_pairing", "all_pairs"]),
            "pairs": (written_out, ["--padding_free", "false"])}
    first_step = {}
    for name, (rows, options) in runs.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        recipe = short_run(builtin_files["model_name_or_path"], path, tmp_path / name, 1,
                           "--per_device_train_batch_size", "12", *options)
        if name == "ranked":
            assert len(recipe.train_data) == 12 and recipe.layout == "shared"
            batch = recipe._batch(recipe.train_data, range(12), [1.0] * 12)
            assert batch["sequence_tokens"].numel() == 8 and int(batch["segment"].max()) == 1  # 2 prompts, 8 responses
        assert recipe.train().status == "finished"
        recipe.cleanup()
        first_step[name] = read_metrics(tmp_path / name)[0]
    for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected", "entropy"):
        assert first_step["ranked"][key] == pytest.approx(first_step["pairs"][key], rel=1e-5, abs=1e-6), key
    assert first_step["ranked"]["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.slow
def test_short_training_run_on_hh_rlhf(tmp_path, hh_data):
    """Real data end to end: HH-RLHF harmless-base test (implicit prompts, 9 bad rows skipped), a BPE tokenizer
    trained on it and a tiny random-init Llama, 2 ranks, ZeRO-3."""
    import gzip

    from transformers import LlamaConfig

    from ds_dpo import builtin

    rows = [json.loads(line) for line in gzip.open(hh_data, "rt")]
    tokenizer = builtin.train_bpe_tokenizer((r[k] for r in rows for k in ("chosen", "rejected")), 4096)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**builtin.MODEL_CONFIG, "max_position_embeddings": 512})
    model_dir = tmp_path / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    proc = launch("--model_name_or_path", str(model_dir), "--dataset", str(hh_data), "--on_bad_rows", "skip",
                  "--eval_split_ratio", "0.01", "--max_length", "256", "--max_prompt_length", "192",
                  "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8", "--max_steps", "4",
                  "--logging_steps", "2", "--save_steps", "0", "--learning_rate", "1e-4",
                  "--dataset_cache_dir", str(tmp_path / "cache"), "--output_dir", str(out))
    assert "4 x empty completion" in proc.stdout and "implicit" in proc.stdout
    report = json.loads((out / "data_report.json").read_text())
    assert report["train_pairs"] + report["eval_pairs"] == 2303 and report["eval_pairs"] == 24
    assert [r["step"] for r in read_metrics(out)] == [2, 4]
    assert read_metrics(out)[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert math.isfinite(read_metrics(out, "eval_")[-1]["eval_loss"])


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(single_rank, builtin_files, tmp_path, monkeypatch):
    """A NaN loss (injected into the recipe's loss on chosen steps) gives NaN gradients: DeepSpeed skips that
    update, the run counts it in `skipped_steps` and goes on with finite losses; too many in a row save a
    checkpoint and end the run with status `non_finite`."""
    argv = ["--model_name_or_path", builtin_files["model_name_or_path"], "--dataset", builtin_files["dataset"],
            "--max_steps", "6", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--save_steps", "0", "--max_length", "32", "--max_prompt_length", "8",
            "--max_consecutive_nan_steps", "2"]

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


def tiny_moe_model(family: str, tokenizer_dir: str, out: Path, **overrides) -> str:
    """A tiny random mixture-of-experts checkpoint with the built-in tokenizer."""
    from transformers import AutoConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, num_experts_per_tok=2, pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.mark.slow
@pytest.mark.parametrize("family, reference", [("mixtral", "zero")])  # more families: test_model_families
def test_moe_models_train_on_two_ranks_with_their_router_loss(family, reference, builtin_files, tmp_path):
    """An MoE model under ZeRO-3 on 2 ranks: the router loss is logged and trained with, the MoE blocks are ZeRO-3
    leaf modules of both engines."""
    experts = {"num_local_experts": 4} if family == "mixtral" else {"num_experts": 4}
    model = tiny_moe_model(family, builtin_files["model_name_or_path"], tmp_path / "model", **experts)
    out = tmp_path / "run"
    extra = ["--use_peft", "true", "--lora_r", "4"] if reference == "lora" else []
    proc = launch(*SHORT, "--max_steps", "4", "--model_name_or_path", model, "--dataset", builtin_files["dataset"],
                  "--eval_dataset", builtin_files["eval_dataset"], "--reference", reference,
                  "--router_aux_loss_coef", "0.02", "--per_device_train_batch_size", "2", *extra,
                  "--output_dir", str(out))
    assert "router load-balancing loss added with weight 0.02" in proc.stdout
    rows = read_metrics(out)
    assert len(rows) == 4 and all(r["aux_loss"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert read_metrics(out, "eval_")[-1]["eval_aux_loss"] > 0
    block = {"mixtral": "MixtralSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock"}[family]
    configs = ["deepspeed_config.json"] + (["reference_deepspeed_config.json"] if reference == "zero" else [])
    for name in configs:
        leaf = json.loads((out / name).read_text())["zero_optimization"]["leaf_module"]["classes"]
        assert any(c.endswith(block) for c in leaf), (name, leaf)


def test_the_policy_trains_in_train_mode_so_checkpointing_applies(single_rank, builtin_files, tmp_path):
    """from_pretrained returns an eval-mode model, where transformers skips gradient checkpointing: the policy must be
    put in train mode, else `gradient_checkpointing: true` silently keeps every activation (seen before the fix)."""
    cfg = load_config(["--model_name_or_path", builtin_files["model_name_or_path"], "--dataset",
                       builtin_files["dataset"], "--max_steps", "1", "--per_device_train_batch_size", "2",
                       "--save_steps", "0", "--gradient_checkpointing", "true", "--output_dir", str(tmp_path)])
    cfg.validate()
    recipe = DPORecipe(cfg)
    recipe.setup()
    layers = recipe.policy.module.model.layers
    checkpointed = []
    for layer in layers:
        func = layer._gradient_checkpointing_func
        layer._gradient_checkpointing_func = lambda *a, func=func, **kw: checkpointed.append(1) or func(*a, **kw)
    recipe.train_step(next(recipe.sampler.plans())[2])
    recipe.cleanup()
    assert recipe.policy.module.training and len(checkpointed) == len(layers)


SEQ2SEQ = {  # tiny encoder-decoders (the dimensions of tests/test_model_families.py)
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
}


def tiny_seq2seq_model(family: str, tokenizer_dir: str, out: Path) -> str:
    """A tiny random encoder-decoder checkpoint with the built-in tokenizer (decoder start: T5's pad, BART's EOS)."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = tokenizer.pad_token_id if family == "t5" else tokenizer.eos_token_id
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  decoder_start_token_id=start, **SEQ2SEQ[family])
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def seq2seq_logps(model, rows) -> torch.Tensor:
    """[2B] chosen then rejected log-probs of ``rows`` from the model's own forward, one unpadded pair at a time."""
    logps = []
    for side in ("chosen", "rejected"):
        for row in rows:
            labels = torch.tensor([row[f"{side}_input_ids"]])
            logits = model(input_ids=torch.tensor([row["prompt_input_ids"]]), labels=labels).logits
            logps.append(logits.log_softmax(-1).gather(-1, labels[..., None]).sum())
    return torch.stack(logps)


def short_run(model_dir: str, data: Path, out: Path, steps: int, *options: str) -> DPORecipe:
    """An in-process recipe, set up: 4 pairs per step from ``data`` (also the eval set), lr 3e-3, every step logged."""
    cfg = load_config(["--model_name_or_path", model_dir, "--dataset", str(data), "--eval_dataset", str(data),
                       "--max_steps", str(steps), "--per_device_train_batch_size", "4", "--learning_rate", "3e-3",
                       "--logging_steps", "1", "--save_steps", "0", "--output_dir", str(out), *options])
    cfg.validate()
    recipe = DPORecipe(cfg)
    recipe.setup()
    return recipe


def train_export_and_score(recipe: DPORecipe):
    """Train ``recipe`` to its end and export it; its log-probs of the first 4 pairs after training. Step 1 is at
    ln 2 (policy = reference) and the final evaluation, on the pairs it trained on, below it."""
    assert recipe.train().status == "finished"
    recipe.save()
    with torch.no_grad():
        recipe.policy.eval()
        logps = concatenated_forward(recipe.policy, recipe._batch(recipe.train_data, range(4), [1.0] * 4))
    recipe.cleanup()
    assert losses(recipe.output_dir)[0] == pytest.approx(math.log(2), abs=1e-6)
    assert read_metrics(recipe.output_dir, "eval_")[-1]["eval_loss"] < math.log(2) - 1e-2
    return logps


@pytest.mark.parametrize("family, options", [
    ("t5", []),  # a ZeRO-3 reference engine; full fine-tuning, exported as a plain transformers model
    ("bart", ["--use_peft", "true", "--lora_r", "4", "--reference", "lora", "--precompute_ref_log_probs", "true",
              "--learning_rate", "3e-2"]),
])
def test_encoder_decoder_models_train_with_each_reference_and_export(family, options, single_rank, builtin_files,
                                                                     tmp_path):
    """An encoder-decoder through the real recipe (in-process 1-rank ZeRO-3): batches in the seq2seq layout, step 1 at
    ln 2 (policy = reference), training lowers the loss; BART with LoRA has its reference log-probs precomputed with
    the adapters disabled, equal to the base model's own forward pair by pair; the exported model (T5) loads with
    plain transformers and scores like the engine."""
    from transformers import AutoModelForSeq2SeqLM

    model_dir = tiny_seq2seq_model(family, builtin_files["model_name_or_path"], tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(builtin_files["dataset"]).readlines()[:16]))
    out = tmp_path / "run"
    recipe = short_run(model_dir, pairs, out, 4, *options)
    assert recipe.layout == "seq2seq"
    rows = [recipe.train_data[i] for i in range(4)]
    if "--precompute_ref_log_probs" in options:
        from ds_dpo.ds_config import zero3_disabled

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
            torch.testing.assert_close(seq2seq_logps(exported, rows), torch.cat([engine.chosen, engine.rejected]),
                                       rtol=1e-5, atol=1e-5)
    else:
        assert (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("family, options", [
    ("llava", []),  # a ZeRO-3 reference engine
    ("idefics3", ["--precompute_ref_log_probs", "true", "--freeze_vision_tower", "true"]),
])
def test_vision_language_models_train_and_export(family, options, single_rank, tmp_path):
    """A vision-language model through the real recipe (in-process 1-rank ZeRO-3) on TRL-format rows with images
    (1, 2, 1 and 0 per pair, paths in a JSON-lines file): prefix-shared batches with each pair's images once, step 1 at
    ln 2, the loss falls on the pairs it trains on; a frozen vision tower stays as it was; the export (model and
    processor) loads with plain transformers and scores like the engine."""
    import vlm_models
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ds_dpo.vision import VisionInputs

    model_dir = vlm_models.build(family, tmp_path / "model")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in vlm_models.rows(tmp_path / "images")))
    out = tmp_path / "run"
    recipe = short_run(model_dir, data, out, 3, *options)
    assert recipe.layout == "shared" and recipe.vision is not None
    engine = train_export_and_score(recipe)
    processor = AutoProcessor.from_pretrained(out)
    exported = enable_token_scoring(AutoModelForImageTextToText.from_pretrained(out).eval())
    batch = collate_pairs([recipe.train_data[i] for i in range(4)], [1.0] * 4, processor.tokenizer.pad_token_id,
                          "padded", VisionInputs(processor.image_processor))
    with torch.no_grad():
        plain = concatenated_forward(exported, batch, logps_chunk_size=0)
    torch.testing.assert_close(torch.cat([plain.chosen, plain.rejected]), torch.cat([engine.chosen, engine.rejected]),
                               rtol=1e-5, atol=1e-5)
    original = dict(AutoModelForImageTextToText.from_pretrained(model_dir).named_parameters())
    moved = [n for n, p in exported.named_parameters() if "vision" in n and not torch.equal(p, original[n])]
    assert bool(moved) != ("--freeze_vision_tower" in options)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["encoder-decoder", "vision-language"])
def test_two_zero3_ranks_reproduce_one_rank_for(kind, single_rank, builtin_files, tmp_path):
    """Under ZeRO-3, 2 launched ranks x half the pairs give the loss curve of 1 rank (in-process) x all of them
    (1e-6): T5 (chunked log-probs on one, full logits on the other), LLaVA (its vision tower sharded too; one rank's
    micro-batch may hold no image while the other's does)."""
    import vlm_models

    if kind == "encoder-decoder":
        model = tiny_seq2seq_model("t5", builtin_files["model_name_or_path"], tmp_path / "model")
        data, pairs, steps = builtin_files["dataset"], 8, 4
        one, two = ["--logps_chunk_size", "0"], ["--logps_chunk_size", "5"]
    else:
        model = vlm_models.build("llava", tmp_path / "model")
        rows = vlm_models.rows(tmp_path / "images") + vlm_models.rows(tmp_path / "images", seed=100)
        data, pairs, steps, one, two = tmp_path / "pairs.jsonl", 4, 3, [], []
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = [*SHORT, "--max_steps", str(steps), "--model_name_or_path", model, "--dataset", str(data),
              "--learning_rate", "3e-3"]
    cfg = load_config([*common, "--per_device_train_batch_size", str(pairs), *one, "--output_dir",
                       str(tmp_path / "one")])
    cfg.validate()
    recipe = DPORecipe(cfg)
    recipe.setup()
    assert recipe.train().status == "finished"
    recipe.cleanup()
    launch(*common, "--per_device_train_batch_size", str(pairs // 2), *two, "--output_dir", str(tmp_path / "two"),
           nprocs=2)
    expected = losses(tmp_path / "one")
    assert len(expected) == steps and max(expected) - min(expected) > 1e-3
    assert losses(tmp_path / "two") == pytest.approx(expected, abs=1e-6)
