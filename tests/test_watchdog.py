"""The watchdog between real processes (gloo process groups, no model): a rank that dies, hangs, or stops on an error
ends every other rank within seconds, with one message naming it; ends the ranks agree on say nothing.

Run as a script, this file is one rank of such a job: ``python tests/test_watchdog.py SCENARIO`` with the usual
RANK/WORLD_SIZE/MASTER_* environment."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

from helpers.runs import free_port  # noqa: E402

TIMEOUT_S = 3


def rank_main(scenario: str) -> None:
    """One rank: start the watchdog, say `started`, then do what ``scenario`` gives this rank to do."""
    import torch

    from ds_dpo.watchdog import Watchdog

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    watchdog = Watchdog.start(TIMEOUT_S, lambda: "the last whole checkpoint is /ckpt/step-2")
    print(f"started {rank}", flush=True)
    if scenario == "killed" and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if scenario == "rank0_killed" and rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    if scenario == "failed" and rank == 1:
        watchdog.close(3)
        sys.exit(3)
    if scenario == "crashed" and rank == 1:
        watchdog.close(None, "RuntimeError: CUDA error: an illegal memory access was encountered")
        sys.exit(1)
    if scenario == "done":
        torch.distributed.barrier()
        watchdog.close(0)
        sys.exit(0)
    if scenario == "collective":  # gloo fails at once when the peer's connections close: the error gives way
        try:
            while True:
                torch.distributed.all_reduce(torch.ones(1))
                time.sleep(0.05)
        except RuntimeError:
            watchdog.wait_for_verdict()
            raise
    time.sleep(120)  # a rank blocked in a collective that never returns (NCCL)


def run(scenario: str, world: int = 2, freeze: int | None = None, kill_after_start: int | None = None):
    """Start ``world`` ranks; optionally SIGSTOP rank ``freeze`` or SIGKILL rank ``kill_after_start`` once all have
    started. Returns ({rank: exit status}, {rank: stderr}, seconds from the fault to the last exit)."""
    port = str(free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-u", str(HERE), scenario],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    try:
        for p in procs:  # every rank has its watchdog running
            assert p.stdout.readline().startswith("started"), p.stderr.read()
        fault = time.monotonic()
        if freeze is not None:
            procs[freeze].send_signal(signal.SIGSTOP)
        if kill_after_start is not None:
            procs[kill_after_start].kill()
        codes = {}
        for r, p in enumerate(procs):
            if r != freeze:
                codes[r] = p.wait(timeout=60)
        seconds = time.monotonic() - fault
        errors = {r: p.stderr.read() for r, p in enumerate(procs) if r != freeze}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return codes, errors, seconds


def test_a_killed_rank_stops_the_blocked_rank_with_a_message_naming_it():
    codes, errors, seconds = run("killed")
    assert codes == {0: 4, 1: -signal.SIGKILL}
    assert "ds_dpo: rank 1 (host " in errors[0] and "died: its process ended without a word" in errors[0]
    assert "the last whole checkpoint is /ckpt/step-2" in errors[0]
    assert "--resume_from_checkpoint auto" in errors[0] and "Traceback" not in errors[0]
    assert seconds < 10


def test_a_failing_collective_gives_way_to_the_message():
    codes, errors, _ = run("collective", kill_after_start=1)
    assert codes[0] == 4 and "rank 1 (host " in errors[0] and "Traceback" not in errors[0], errors[0]


def test_a_hung_rank_is_declared_lost_after_the_heartbeat_timeout():
    codes, errors, seconds = run("hung", freeze=1)
    assert codes == {0: 4}
    assert f"rank 1 (host {os.uname().nodename}" in errors[0]
    assert f"has not been heard from for {TIMEOUT_S} s: its node hung or is unreachable" in errors[0]
    assert TIMEOUT_S <= seconds < TIMEOUT_S + 8


def test_losing_rank_0_stops_every_rank_and_one_of_them_says_so():
    codes, errors, seconds = run("rank0_killed", world=3, kill_after_start=0)
    assert codes == {0: -signal.SIGKILL, 1: 4, 2: 4}
    assert "ds_dpo: rank 0 (host " in errors[1] and errors[2] == ""
    assert seconds < 10


@pytest.mark.parametrize(
    "scenario, expected, message",
    [
        ("failed", {0: 3, 1: 3}, None),  # rank 1 said what went wrong itself; rank 0 stops quietly with its status
        ("crashed", {0: 4, 1: 1}, "rank 1 (host "),
        ("done", {0: 0, 1: 0}, None),
    ],
)
def test_ends_a_rank_reports_itself(scenario, expected, message):
    codes, errors, _ = run(scenario)
    assert codes == expected
    if message:
        assert message in errors[0] and "stopped with an error: RuntimeError: CUDA error" in errors[0]
    else:
        assert "ds_dpo:" not in errors[0]


if __name__ == "__main__":
    rank_main(sys.argv[1])
