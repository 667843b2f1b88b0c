"""The README's commands as a user runs them, under the real ``deepspeed`` launcher: the demo on the built-in task
(it learns the task, writes its config, metrics, TensorBoard events, rotating checkpoints and a model that loads
with plain transformers), a config error stopping before training, and a two-node hostfile run."""

import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_dpo.data.pipeline import load_tokenized
from ds_dpo.forward.layouts import PADDED, collate_pairs
from ds_dpo.forward.logprobs import Scoring, concatenated_forward
from ds_dpo.forward.scoring import install_token_scoring
from helpers.runs import (
    DEEPSPEED,
    REPO,
    cli,
    free_port,
    launch,
    losses,
    read_metrics,
    run_job,
)


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
    tags = [
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "learning_rate",
        "grad_norm",
        "epoch",
        "pairs_per_second",
        "tokens_per_second",
        "peak_memory_mb",
        "entropy",
        "mean_token_accuracy",
        "num_tokens",
    ]
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
    install_token_scoring(model)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (out / "model.safetensors").is_file()
    final = read_metrics(out, "eval_")[-1]
    data = load_tokenized(out / "builtin" / "eval.jsonl", tokenizer, max_length=32, max_prompt_length=8)
    chosen, rejected = [], []
    with torch.no_grad():
        for s in range(0, len(data), 32):
            rows = [data[i] for i in range(s, min(s + 32, len(data)))]
            # the plain padded path; the run itself used prefix-shared batches and chunked log-probs
            logps = concatenated_forward(
                model, collate_pairs(rows, [1.0] * len(rows), tokenizer.pad_token_id, PADDED), Scoring(PADDED, 0)
            )
            chosen.append(logps.chosen)
            rejected.append(logps.rejected)
    assert torch.cat(chosen).mean().item() == pytest.approx(final["eval_logps/chosen"], rel=1e-5)
    assert torch.cat(rejected).mean().item() == pytest.approx(final["eval_logps/rejected"], rel=1e-5)


@pytest.mark.slow
def test_config_errors_stop_before_training(tmp_path):
    proc = launch(betta=0.1, output_dir=str(tmp_path), nprocs=1, check=False)
    assert proc.returncode != 0
    assert "unknown config key `betta` in the command line; did you mean `beta`?" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_run_started_without_a_launcher_runs_as_one_process(tmp_path):
    """`python launch/train.py ...`, as Hugging Face and TRL scripts are often first run: no launcher's environment,
    no MPI; one process, said at startup."""
    launcher_keys = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_keys}
    cmd = [sys.executable, "launch/train.py", *cli(max_steps=2, save_steps=0, output_dir=str(tmp_path / "out"))]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "notice: started without a launcher: one process" in proc.stdout
    assert read_metrics(tmp_path / "out")[-1]["step"] == 2


@pytest.mark.slow
def test_two_node_hostfile_launch_takes_yaml_and_overrides(tmp_path):
    """Two "nodes" on this machine: a hostfile with two hosts and one launcher per node (--no_ssh), as under SLURM,
    in bf16. `--config OUTPUT_DIR/config.yaml` of that run then repeats it on one node."""
    (tmp_path / "hosts").write_text("node0 slots=1\nnode1 slots=1\n")
    (tmp_path / "run.yaml").write_text("max_steps: 4\nlogging_steps: 1\nbeta: 0.2\nsave_steps: 2\nbf16: true\n")
    out, port = tmp_path / "out", str(free_port())
    commands = [
        [
            DEEPSPEED,
            "--hostfile",
            str(tmp_path / "hosts"),
            "--no_ssh",
            "--node_rank",
            str(rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            "launch/train.py",
            "--config",
            str(tmp_path / "run.yaml"),
            "--learning_rate",
            "1e-3",
            "--output_dir",
            str(out),
        ]
        for rank in (0, 1)
    ]
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
    launch(config=str(out / "config.yaml"), output_dir=str(one_node))
    assert losses(out) == pytest.approx(losses(one_node), abs=1e-6)
