"""Checkpoints, exact resume and preemption, on real 2-rank DeepSpeed runs (CPU, gloo)."""

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import DEEPSPEED, REPO, free_port, launch, read_metrics


def losses(output_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(output_dir)]


def weights(output_dir):
    name = "adapter_model.safetensors" if (output_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(output_dir / name)


def assert_same_weights(a, b, tol=1e-6):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tol


@pytest.mark.parametrize("reference", ["zero", "lora"])
def test_resume_reproduces_the_uninterrupted_run(reference, builtin_files, tmp_path):
    """20 pairs, 2 ranks x 2 pairs x 2 accumulation = 8 per step: epochs of 3 steps, the last one short (4 pairs
    plus fillers). 7 steps in one go == 4 steps, stop, resume for 3 more: same per-step losses and final weights
    (seen: bit-identical)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(builtin_files["dataset"]).readlines()[:20]))
    common = ["--model_name_or_path", builtin_files["model_name_or_path"], "--dataset", str(pairs),
              "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--logging_steps", "1",
              "--lr_scheduler_type", "constant", "--learning_rate", "3e-3", "--max_length", "32",
              "--max_prompt_length", "8", "--reference", reference]
    if reference == "lora":
        common += ["--use_peft", "true", "--lora_r", "4", "--learning_rate", "2e-2"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    launch(*common, "--max_steps", "7", "--save_steps", "7", "--output_dir", str(whole))
    launch(*common, "--max_steps", "4", "--save_steps", "4", "--output_dir", str(split))
    proc = launch(*common, "--max_steps", "7", "--save_steps", "0", "--output_dir", str(split),
                  "--resume_from_checkpoint", "auto")
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    expected, got = losses(whole), losses(split)
    assert [s for s, _ in got] == list(range(1, 8))
    assert max(abs(a - b) for (_, a), (_, b) in zip(expected, got)) <= 1e-6
    assert_same_weights(whole, split)

    # Offline export of the ZeRO-3 checkpoint (no launcher, no torch.distributed) == the run's own final export
    exported = tmp_path / "exported"
    subprocess.run([sys.executable, "launch/export.py", str(whole / "checkpoints" / "step-7"), str(exported),
                    "--merge"], cwd=REPO, check=True, capture_output=True)
    assert_same_weights(whole, exported)
    if reference == "lora":
        merged = AutoModelForCausalLM.from_pretrained(exported / "merged")  # plain transformers
        assert merged.config.vocab_size > 0 and (exported / "merged" / "tokenizer.json").is_file()


def test_sigterm_saves_and_the_resumed_run_is_the_same_run(tmp_path):
    """SIGTERM to the launcher's process group (as SLURM preemption sends it) mid-training: all ranks stop at the
    same step, save, and exit 0; resuming reproduces the uninterrupted run step for step."""
    common = ["--max_steps", "200", "--logging_steps", "1", "--save_steps", "1000", "--eval_steps", "1000"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    launch(*common, "--output_dir", str(whole))
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py", *common,
           "--output_dir", str(cut)]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGTERM)
    output = job.communicate(timeout=300)[0]
    assert "stopped by a signal at step" in output, output[-3000:]
    stopped = int(output.split("stopped by a signal at step ")[1].split(";")[0])
    assert 5 <= stopped < 200 and (cut / "checkpoints" / f"step-{stopped}").is_dir()
    assert not (cut / "model.safetensors").exists()  # no export on preemption: just the checkpoint
    proc = launch(*common, "--output_dir", str(cut), "--resume_from_checkpoint", "auto")
    assert f"at step {stopped}" in proc.stdout
    expected, got = losses(whole), losses(cut)
    assert [s for s, _ in got] == list(range(1, 201))
    assert max(abs(a - b) for (_, a), (_, b) in zip(expected, got)) <= 1e-6
    assert_same_weights(whole, cut)
