"""Faults a cluster job meets, injected into real launched runs (2 CPU ranks, ZeRO-3): a rank killed mid-step, a
node lost or hung, a damaged newest checkpoint, a disk that fills up before or during a save. Each ends the job
within seconds with a message that names what and where, loses nothing that was saved, and
``--resume_from_checkpoint auto`` continues exactly (the uninterrupted run's losses to 1e-6)."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from ds_dpo.training.checkpoint import checkpoint_problem
from helpers.runs import DEEPSPEED, REPO, assert_same_weights, cli, free_port, launch, read_metrics, stopped_at

pytestmark = pytest.mark.slow  # every test here launches real multi-process runs

RESUMED_PAST = 5e-6
"""Weights after resuming from a checkpoint the first run had trained past (step 2 of a run that went on to step 4)
match the uninterrupted run's to about 1e-6, not bit for bit as from the last checkpoint written (seen: 1.0e-6 after
4 more steps, the same before checkpoints had manifests); the losses match to 1e-6."""


def run_keys(builtin_files, tmp_path):
    """16 pairs, 2 ranks x 4 pairs per step, constant learning rate: every step moves the weights."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(open(builtin_files["dataset"]).readlines()[:16]))
    return cli(
        model_name_or_path=builtin_files["model_name_or_path"],
        dataset=str(pairs),
        per_device_train_batch_size=4,
        logging_steps=1,
        lr_scheduler_type="constant",
        learning_rate="3e-3",
        max_length=32,
        max_prompt_length=8,
        dataset_cache_dir=str(tmp_path / "cache"),
    )


def step_losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(output_dir)}


def same_losses(got: dict[int, float], expected: dict[int, float]) -> None:
    assert sorted(got) == sorted(expected)
    assert max(abs(got[s] - expected[s]) for s in expected) <= 1e-6


LONG_STEPS = 12


@pytest.fixture(scope="module")
def uninterrupted(builtin_files, tmp_path_factory):
    """The keys of a 12-step run and the directory of that run, uninterrupted, with a checkpoint every 2 steps (the
    oracle of the tests that break it, and the checkpoints of those that break its files)."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    common = [*run_keys(builtin_files, tmp_path), "--max_steps", str(LONG_STEPS)]
    launch(*common, save_steps=2, output_dir=str(tmp_path / "whole"))
    return common, tmp_path / "whole"


def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_one_before(uninterrupted, tmp_path):
    common, whole = uninterrupted
    run = tmp_path / "run"
    stopped_at(whole, 4, run)
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step-4"
    optimizer = max((checkpoints / "step-4").glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    size = optimizer.stat().st_size
    optimizer.write_bytes(optimizer.read_bytes()[: size // 2])  # a copy or a quota cut it short
    proc = launch(*common, save_steps=0, output_dir=str(run), resume_from_checkpoint="auto")
    assert (
        f"skipping checkpoint {checkpoints / 'step-4'}: {optimizer.name} has {size // 2} bytes, {size} when it "
        "was written"
    ) in proc.stdout
    assert f"resumed from {checkpoints / 'step-2'} at step 2" in proc.stdout
    same_losses(step_losses(run), step_losses(whole))
    assert_same_weights(whole, run, tol=RESUMED_PAST)

    (checkpoints / "step-2" / "trainer_state_rank0.json").write_text("{}")  # now nothing whole is left
    proc = launch(*common, output_dir=str(run), resume_from_checkpoint="auto", check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert f"no whole checkpoint under {checkpoints} to resume from" in proc.stderr
    assert "step-4: " in proc.stderr and "step-2: trainer_state_rank0.json" in proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs mount whose size the test sets (``mount`` as root, as on these machines; skipped elsewhere)."""
    mounted = []

    def mount(size_bytes: int):
        where = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)], capture_output=True, text=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def disk_bytes(files) -> int:
    """What ``files`` take on a tmpfs: whole 4 KiB pages."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in files if f.is_file())


def logs_bytes(run: Path) -> int:
    """What a run writes besides its checkpoints and exported model."""
    return disk_bytes(f for f in run.rglob("*") if "checkpoints" not in f.parts and f.suffix != ".safetensors")


def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_and_the_run_resumes_elsewhere(
    uninterrupted, tmp_path, small_disk
):
    common, whole = uninterrupted
    # room for the run's logs and one checkpoint, not for a second one
    disk = small_disk(logs_bytes(whole) + int(1.5 * disk_bytes((whole / "checkpoints" / "step-2").rglob("*"))))
    out = disk / "out"
    started = time.monotonic()
    proc = launch(*common, save_steps=2, output_dir=str(out), check=False)
    seconds = time.monotonic() - started
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert f"saving checkpoint {checkpoints / 'step-4'} failed" in proc.stderr
    assert f"MiB free on the disk holding {checkpoints}" in proc.stderr and "checkpoint step-2 is kept" in proc.stderr
    assert (checkpoints / "latest").read_text() == "step-2" and not (checkpoints / "step-4").exists()
    print(f"full disk: the run stopped {seconds:.0f} s after its launch")

    elsewhere = tmp_path / "elsewhere"  # the operator moves the run to a disk with room
    shutil.copytree(out, elsewhere)
    proc = launch(*common, save_steps=2, output_dir=str(elsewhere), resume_from_checkpoint="auto")
    assert f"resumed from {elsewhere / 'checkpoints' / 'step-2'} at step 2" in proc.stdout
    same_losses(step_losses(elsewhere), step_losses(whole))
    assert_same_weights(whole, elsewhere, tol=RESUMED_PAST)


def started(cmd: list[str], log) -> subprocess.Popen:
    """A launcher in its own session (as a node's job step is), its output in ``log``."""
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_checkpoint(checkpoints, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not (checkpoints / "latest").exists():
        assert job.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)


def rank_processes(job: subprocess.Popen) -> list[psutil.Process]:
    return [p for p in psutil.Process(job.pid).children(recursive=True) if "launch/train.py" in " ".join(p.cmdline())]


def test_a_rank_killed_mid_step_ends_the_job_and_retry_resumes_it_exactly(uninterrupted, tmp_path):
    """SIGKILL one rank (as the out-of-memory killer does) of a job run under launch/retry.py with the deepspeed
    launcher: the other rank stops within seconds naming it and the last checkpoint, nothing of the first attempt is
    left running, and the automatic restart continues to the uninterrupted run's losses and weights."""
    common, whole = uninterrupted
    run, log = tmp_path / "run", tmp_path / "log"
    cmd = [sys.executable, "launch/retry.py", "--max_restarts", "1", "--wait", "1", "--", DEEPSPEED, "--num_gpus",
           "2", "--master_port", str(free_port()), "launch/train.py", *common, "--save_steps", "2",
           "--output_dir", str(run)]  # fmt: skip
    with open(log, "w") as out:
        job = started(cmd, out)
        try:
            wait_for_checkpoint(run / "checkpoints", job)
            first_attempt = psutil.Process(job.pid).children(recursive=True)
            victim = next(p for p in rank_processes(job) if "--local_rank=1" in p.cmdline())
            victim.kill()
            killed = time.monotonic()
            _, alive = psutil.wait_procs(first_attempt, timeout=60)
            seconds = time.monotonic() - killed
            assert job.wait(timeout=600) == 0
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    output = log.read_text()
    assert not alive and seconds < 15, f"{alive} alive {seconds:.0f} s after the kill"
    assert f"ds_dpo: rank 1 (host {os.uname().nodename}, pid {victim.pid}) died" in output
    assert f"the last whole checkpoint is {run / 'checkpoints'}/step-" in output and "Traceback" not in output
    assert "ds_dpo retry: the job failed (exit status 247); restart 1 of 1" in output  # 247: the launcher's -9
    assert f"resumed from {run / 'checkpoints'}/step-" in output
    same_losses(step_losses(run), step_losses(whole))
    assert_same_weights(whole, run, tol=RESUMED_PAST)
    print(f"a rank killed: the job ended {seconds:.1f} s later")


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_lost_node_ends_the_other_nodes_ranks(uninterrupted, tmp_path, fault):
    """Two "nodes" on this machine (a hostfile, one launcher per node, as under SLURM). Node 1's launcher and rank
    are killed (the node is gone) or stopped (SIGSTOP: it hangs, its connections stay open): node 0's launcher
    exits non-zero within seconds (the heartbeat timeout, 5 s here, for the hung one) naming rank 1 and a whole
    checkpoint to resume from (that resuming from one continues exactly is the killed-rank test's)."""
    common, _ = uninterrupted
    run = tmp_path / "run"
    (tmp_path / "hosts").write_text("node0 slots=1\nnode1 slots=1\n")
    port, logs = str(free_port()), [tmp_path / "node0.log", tmp_path / "node1.log"]
    nodes = []
    try:
        for node in (0, 1):
            cmd = [DEEPSPEED, "--hostfile", str(tmp_path / "hosts"), "--no_ssh", "--node_rank", str(node),
                   "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py", *common,
                   "--save_steps", "2", "--heartbeat_timeout", "5", "--output_dir", str(run)]  # fmt: skip
            nodes.append(started(cmd, open(logs[node], "w")))
        wait_for_checkpoint(run / "checkpoints", nodes[0])
        survivors = [psutil.Process(nodes[0].pid), *psutil.Process(nodes[0].pid).children(recursive=True)]
        os.killpg(nodes[1].pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        lost = time.monotonic()
        status = nodes[0].wait(timeout=120)
        seconds = time.monotonic() - lost
        _, alive = psutil.wait_procs(survivors, timeout=10)
    finally:
        for job in nodes:
            with contextlib.suppress(ProcessLookupError):  # node 0's launcher and ranks have exited
                os.killpg(job.pid, signal.SIGKILL)
                os.killpg(job.pid, signal.SIGCONT)
            job.wait()
    output = logs[0].read_text()
    assert status != 0 and not alive, output[-3000:]
    how = "died: its process ended" if fault == "killed" else "has not been heard from for 5 s"
    assert f"ds_dpo: rank 1 (host {os.uname().nodename}, pid " in output and how in output, output[-3000:]
    assert "Traceback" not in output
    assert seconds < (10 if fault == "killed" else 20), f"node 0 stopped {seconds:.0f} s after node 1 was lost"
    named = Path(output.split("the last whole checkpoint is ")[1].split(". Restart")[0])
    assert named.parent == run / "checkpoints" and checkpoint_problem(named) is None
    print(f"a node {fault}: the other node's launcher exited {seconds:.1f} s later")


def test_a_disk_that_fills_up_during_the_first_save_stops_every_rank_and_loses_nothing(
    uninterrupted, tmp_path, small_disk
):
    """No checkpoint yet, so no size to check the free space against: the first save itself runs out of room. The
    rank whose write failed says so and every rank stops with status 3, promptly; nothing claims to be a
    checkpoint, and the run restarted on a disk with room starts over, removing what the failed save left."""
    common, whole = uninterrupted
    disk = small_disk(logs_bytes(whole) + (512 << 10))  # the logs of a longer run, and a third of a checkpoint (1.4 MB)
    out = disk / "out"
    started_at = time.monotonic()
    proc = launch(*common, save_steps=2, output_dir=str(out), check=False)
    seconds = time.monotonic() - started_at
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    checkpoints = out / "checkpoints"
    assert f"saving checkpoint {checkpoints / 'step-2'} failed (" in proc.stderr
    assert "MiB free on the disk holding" in proc.stderr and "no earlier checkpoint exists" in proc.stderr
    assert not (checkpoints / "latest").exists()
    print(f"disk full during the first save: every rank stopped, {seconds:.0f} s after the launch")

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(out, elsewhere)
    proc = launch(*common, save_steps=2, output_dir=str(elsewhere), resume_from_checkpoint="auto")
    assert "starting from scratch" in proc.stdout
    assert f"removing {elsewhere / 'checkpoints' / 'step-2'}, left by a save that did not finish" in proc.stdout
    same_losses(step_losses(elsewhere), step_losses(whole))
