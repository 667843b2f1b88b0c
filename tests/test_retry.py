"""launch/retry.py around a stand-in job (a Python one-liner that ends with the status it is given): which ends it
restarts, how often, with what appended, and that a signal to it reaches the job and ends the retries.
(The real thing, a deepspeed job with a killed rank restarted to the uninterrupted run's losses, is in
tests/training/test_faults.py.)"""

import signal
import subprocess
import sys
import time

import pytest

from helpers.runs import REPO


def retry(tmp_path, statuses: list[int], max_restarts: int = 3) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run retry.py over a job whose n-th attempt exits with ``statuses[n]``; returns the result and each
    attempt's arguments."""
    attempts = tmp_path / "attempts"
    job = (
        "import sys; from pathlib import Path; p = Path(sys.argv[1]); seen = p.read_text().splitlines() "
        "if p.exists() else []; p.write_text(''.join(s + '\\n' for s in [*seen, ' '.join(sys.argv[2:])])); "
        f"sys.exit({statuses}[len(seen)])"
    )
    cmd = [sys.executable, "launch/retry.py", "--max_restarts", str(max_restarts), "--wait", "0", "--", sys.executable,
           "-c", job, str(attempts), "--config", "run.yaml"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    return proc, attempts.read_text().splitlines()


def test_a_lost_rank_is_restarted_with_auto_resume_until_it_succeeds(tmp_path):
    proc, attempts = retry(tmp_path, [4, 247, 0])
    assert proc.returncode == 0
    assert attempts == ["--config run.yaml"] + ["--config run.yaml --resume_from_checkpoint auto"] * 2
    assert "the job failed (exit status 4); restart 1 of 3 in 0 s" in proc.stdout
    assert "the job failed (exit status 247); restart 2 of 3" in proc.stdout


@pytest.mark.parametrize("status", [2, 3, 5])
def test_ends_a_restart_cannot_mend_are_not_retried(tmp_path, status):
    proc, attempts = retry(tmp_path, [status, 0])
    assert proc.returncode == status and len(attempts) == 1 and "restart" not in proc.stdout


def test_restarts_stop_at_the_limit_with_the_last_status(tmp_path):
    proc, attempts = retry(tmp_path, [1, 1, 1], max_restarts=2)
    assert proc.returncode == 1 and len(attempts) == 3
    assert "the job failed (exit status 1); no restarts left (--max_restarts 2)" in proc.stdout


def test_a_signal_reaches_the_job_and_ends_the_retries(tmp_path):
    """SIGTERM (preemption) goes to the job; the job's own end is then final whatever its status."""
    started = tmp_path / "started"
    job = (
        "import signal, sys, time; from pathlib import Path; "
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7)); Path(sys.argv[1]).touch(); time.sleep(60)"
    )
    cmd = [sys.executable, "launch/retry.py", "--wait", "0", "--", sys.executable, "-c", job, str(started)]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 7 and "restart" not in proc.stdout.read()
