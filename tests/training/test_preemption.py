import time

import pytest

from ds_dpo.config import CheckpointConfig
from ds_dpo.config.schema import duration_seconds
from ds_dpo.plan import _deadline
from helpers.runs import read_metrics, short_run


def test_max_time_takes_seconds_or_slurm_time_limits():
    assert [duration_seconds(v) for v in (90, "45", "30:00", "02:03:04", "1-02:03:04")] == [
        90,
        45,
        1800,
        7384,
        93784,
    ]
    for bad in ("x", "1:2:3:4", "a-01:00:00", 0, -5):
        assert CheckpointConfig(max_time=bad).problems(), bad
    assert not CheckpointConfig(max_time="12:00:00").problems()


def test_the_deadline_is_max_time_after_the_start_or_the_slurm_jobs_end_whichever_is_first(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    assert _deadline(None) is None
    assert _deadline(60) == pytest.approx(time.time() + 60, abs=1)
    job_end = int(time.time()) + 30
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(job_end))  # epoch seconds, as SLURM sets it
    assert _deadline(60) == job_end == _deadline(None)
    assert _deadline(10) == pytest.approx(time.time() + 10, abs=1)


def test_a_run_stops_with_a_checkpoint_before_its_deadline_and_resumes(single_rank, builtin_files, tmp_path):
    """``max_time`` 15 s, far fewer than the run's steps take: it stops at a step boundary with time left for a
    step and a save, saves, and says so; resumed without the limit, it trains on to the end."""
    out, steps, data = tmp_path / "out", 1000, tmp_path / "pairs.jsonl"
    data.write_text("".join(open(builtin_files["dataset"]).readlines()[:64]))
    recipe = short_run(builtin_files["model_name_or_path"], data, out, steps, max_time=15)
    assert recipe.plan.deadline is not None and "stops with a checkpoint before" in recipe.plan.describe(recipe.cfg)
    result = recipe.train()
    stopped_by = time.time()
    recipe.cleanup()
    assert result.status == "deadline" and 1 <= result.step < steps
    assert stopped_by < recipe.plan.deadline, "it stopped, saved and returned before the deadline"
    assert (out / "checkpoints" / "latest").read_text() == f"step-{result.step}"

    recipe = short_run(builtin_files["model_name_or_path"], data, out, result.step + 2, resume_from_checkpoint="auto")
    assert recipe.plan.deadline is None
    assert recipe.train().status == "finished"
    recipe.cleanup()
    assert [r["step"] for r in read_metrics(out)] == list(range(1, result.step + 3))
