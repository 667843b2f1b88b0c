"""Checkpoints, exact resume and preemption, on real 2-rank DeepSpeed runs (CPU, gloo)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.runs import DEEPSPEED, REPO, assert_same_weights, cli, free_port, launch, read_metrics, stopped_at

pytestmark = pytest.mark.slow  # every test here launches real multi-process runs


def losses(output_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(output_dir)]


def test_resume_reproduces_the_uninterrupted_run(builtin_files, tmp_path):
    """20 pairs, 2 ranks x 2 pairs x 2 accumulation = 8 per step: epochs of 3 steps, the last one short (4 pairs
    plus fillers). 8 steps in one go == resumed from its step-4 checkpoint for 4 more: same per-step losses and
    final weights (seen: bit-identical). A half-written later checkpoint (a crash during a save) is ignored: `latest`
    still names the last complete one. (Runs really cut short resume in the SIGTERM test and test_faults, LoRA in
    the LoRA export test.)"""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(builtin_files["dataset"]).readlines()[:20]))
    common = cli(
        model_name_or_path=builtin_files["model_name_or_path"],
        dataset=str(pairs),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        logging_steps=1,
        lr_scheduler_type="constant",
        learning_rate="3e-3",
        max_length=32,
        max_prompt_length=8,
        reference="zero",
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    launch(*common, max_steps=8, save_steps=4, output_dir=str(whole))
    stopped_at(whole, 4, split)
    partial = split / "checkpoints" / "step-6"  # what a kill in the middle of saving step 6 leaves behind
    partial.mkdir()
    (partial / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"truncated")
    proc = launch(*common, max_steps=8, save_steps=0, output_dir=str(split), resume_from_checkpoint="auto")
    assert "resumed from" in proc.stdout and "step-4 at step 4" in proc.stdout
    expected, got = losses(whole), losses(split)
    assert [s for s, _ in got] == list(range(1, 9))
    assert max(abs(a - b) for (_, a), (_, b) in zip(expected, got)) <= 1e-6
    assert_same_weights(whole, split)

    # Offline export of the ZeRO-3 checkpoint (no launcher, no torch.distributed) == the run's own final export
    exported = tmp_path / "exported"
    subprocess.run(
        [sys.executable, "launch/export.py", str(whole / "checkpoints" / "step-8"), str(exported), "--merge"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    assert_same_weights(whole, exported)


def test_sigterm_saves_and_the_resumed_run_is_the_same_run(builtin_files, tmp_path):
    """SIGTERM to the launcher's process group (as SLURM preemption sends it) mid-training: all ranks stop at the
    same step, save, and exit 0; resuming reproduces the uninterrupted run step for step (across epochs of 5
    steps), its precomputed reference log-probs read back from their cache, not recomputed."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(builtin_files["dataset"]).readlines()[:80]))  # 5 steps of 2 x 8
    common = cli(
        model_name_or_path=builtin_files["model_name_or_path"],
        dataset=str(pairs),
        learning_rate="3e-3",
        max_steps=16,
        logging_steps=1,
        save_steps=1000,
        eval_steps=1000,
        reference="precomputed",
        dataset_cache_dir=str(tmp_path / "cache"),
    )
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    launch(*common, output_dir=str(whole))
    # the real launcher: it is what preemption signals, and it must pass SIGTERM on to every rank
    cmd = [
        DEEPSPEED,
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        "launch/train.py",
        *common,
        "--output_dir",
        str(cut),
    ]
    job = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGTERM)
    output = job.communicate(timeout=300)[0]
    assert "stopped by a signal at step" in output, output[-3000:]
    stopped = int(output.split("stopped by a signal at step ")[1].split(";")[0])
    assert 5 <= stopped < 16 and (cut / "checkpoints" / f"step-{stopped}").is_dir()
    assert not (cut / "model.safetensors").exists()  # no export on preemption: just the checkpoint
    proc = launch(*common, output_dir=str(cut), resume_from_checkpoint="auto")
    assert f"at step {stopped}" in proc.stdout
    assert "read from cache" in proc.stdout and "computed (" not in proc.stdout
    expected, got = losses(whole), losses(cut)
    assert [s for s, _ in got] == list(range(1, 17))
    assert max(abs(a - b) for (_, a), (_, b) in zip(expected, got)) <= 1e-6
    assert_same_weights(whole, cut)


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path):
    """Written by 2 ranks x 4 pairs, resumed by 1 rank x 8 pairs (the same global batch) through DeepSpeed's
    universal checkpoint format: the continuation matches the 2-rank one (seen: step 5 identical, then <= 5e-8)."""
    common = cli(max_steps=8, logging_steps=1, save_steps=4, save_total_limit=3, eval_steps=100)
    two = tmp_path / "two"
    launch(*common, per_device_train_batch_size=4, output_dir=str(two))
    one = tmp_path / "one"
    shutil.copytree(two / "checkpoints", one / "checkpoints")
    (one / "checkpoints" / "latest").write_text("step-4")
    proc = launch(*common, per_device_train_batch_size=8, output_dir=str(one), resume_from_checkpoint="auto", nprocs=1)
    assert "universal checkpoint format" in proc.stdout and (one / "checkpoints" / "step-4-universal").is_dir()
    expected, got = losses(two)[4:], losses(one)
    assert [s for s, _ in got] == [5, 6, 7, 8]
    assert max(abs(a - b) for (_, a), (_, b) in zip(expected, got)) <= 1e-6


def test_sigkill_while_saving_every_step_resumes_from_latest(tmp_path):
    """Saving every step (a save takes about as long as a step here), SIGKILL the whole job at an arbitrary moment —
    often in the middle of writing a checkpoint. `latest` still names a complete checkpoint and the run resumes
    from it to the end."""
    out = tmp_path / "out"
    common = cli(max_steps=10, logging_steps=1, save_steps=1, save_total_limit=2, eval_steps=1000, output_dir=str(out))
    port = free_port()
    # the real launcher: the whole job, killed as a scheduler kills one
    cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "launch/train.py", *common]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and int(latest.read_text().split("-")[1]) >= 5):
        time.sleep(0.05)
    time.sleep(0.13)  # land somewhere inside a later step or save
    os.killpg(job.pid, signal.SIGKILL)
    job.wait(timeout=60)
    for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):  # killed ranks cannot unlink
        buffer.unlink(missing_ok=True)
    tag = latest.read_text().strip()
    proc = launch(*common, resume_from_checkpoint="auto")
    assert f"resumed from {out / 'checkpoints' / tag} at step {tag.split('-')[1]}" in proc.stdout
    assert read_metrics(out)[-1]["step"] == 10
