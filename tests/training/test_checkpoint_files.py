"""Which checkpoint a run resumes from (``ds_dpo.training.checkpoint``), on checkpoint directories as a save leaves
them: each save's manifest, and a damaged, truncated or unfinished checkpoint skipped with a message naming it and
what is wrong; none whole is an error. The launched runs (a damaged newest checkpoint, a full disk) are in
``test_faults.py``."""

import json

import pytest

from ds_dpo.training.checkpoint import (
    LATEST,
    MANIFEST,
    CheckpointError,
    checkpoint_problem,
    find_checkpoint,
    write_manifest,
)


def saved(root, step, big=2_000_000, manifest=True):
    """A checkpoint directory as a save leaves it: a small state file, a large shard, the manifest."""
    directory = root / f"step-{step}"
    (directory / "zero").mkdir(parents=True)
    (directory / "trainer_state_rank0.json").write_text(json.dumps({"step": step}))
    (directory / "zero" / "shard.pt").write_bytes(bytes(range(256)) * (big // 256))
    if manifest:
        write_manifest(directory)
    return directory


def point_latest(root, step):
    (root / LATEST).write_text(f"step-{step}")


def test_a_whole_checkpoint_has_no_problem_and_each_kind_of_damage_is_named(tmp_path):
    checkpoint = saved(tmp_path, 2)
    files = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert set(files) == {"trainer_state_rank0.json", "zero/shard.pt"}
    assert "sha256" in files["trainer_state_rank0.json"] and "sha256" not in files["zero/shard.pt"]  # large: size
    assert checkpoint_problem(checkpoint) is None

    shard = checkpoint / "zero" / "shard.pt"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated by a copy or a quota
    assert checkpoint_problem(checkpoint) == "zero/shard.pt has 1000 bytes, 1999872 when it was written"
    saved_again = saved(tmp_path, 4)
    (saved_again / "trainer_state_rank0.json").write_text(json.dumps({"step": 5}))  # same size, other bytes
    assert checkpoint_problem(saved_again) == "trainer_state_rank0.json differs from what was written (checksum)"
    (saved_again / "trainer_state_rank0.json").unlink()
    assert checkpoint_problem(saved_again) == "trainer_state_rank0.json is missing"
    unfinished = saved(tmp_path, 6, manifest=False)
    assert checkpoint_problem(unfinished) == f"no {MANIFEST}: its save did not finish"
    assert checkpoint_problem(unfinished, legacy=True) is None  # `latest` may name one written before manifests
    (checkpoint / MANIFEST).write_text("{not json")
    assert checkpoint_problem(checkpoint) == f"its {MANIFEST} is unreadable (JSONDecodeError)"


def test_auto_resume_takes_latest_or_the_newest_whole_checkpoint_and_says_what_it_skipped(tmp_path, capsys):
    for step in (2, 4, 6):
        saved(tmp_path, step)
    point_latest(tmp_path, 6)
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "step-6"
    saved(tmp_path, 8, manifest=False)  # a save killed before it finished: `latest` was not moved
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "step-6"
    shard = tmp_path / "step-6" / "zero" / "shard.pt"
    shard.write_bytes(b"")  # the newest complete checkpoint, damaged
    assert find_checkpoint(tmp_path, "auto") == tmp_path / "step-4"
    out = capsys.readouterr().out
    assert f"skipping checkpoint {tmp_path / 'step-6'}: zero/shard.pt has 0 bytes" in out
    assert f"skipping checkpoint {tmp_path / 'step-8'}: no {MANIFEST}" in out
    assert find_checkpoint(tmp_path, str(tmp_path)) == tmp_path / "step-4"  # the checkpoints directory named
    with pytest.raises(CheckpointError, match="step-6 cannot be resumed from: zero/shard.pt has 0 bytes"):
        find_checkpoint(tmp_path, str(tmp_path / "step-6"))  # named explicitly: no fallback


def test_no_whole_checkpoint_is_an_error_listing_why_unless_no_save_ever_finished(tmp_path):
    assert find_checkpoint(tmp_path, "auto") is None  # no checkpoints: a fresh start
    saved(tmp_path, 2, manifest=False)
    assert find_checkpoint(tmp_path, "auto") is None  # the first save never finished: nothing to lose
    saved(tmp_path, 4)
    point_latest(tmp_path, 4)
    (tmp_path / "step-4" / "zero" / "shard.pt").unlink()
    with pytest.raises(CheckpointError) as error:
        find_checkpoint(tmp_path, "auto")
    message = str(error.value)
    assert "no whole checkpoint under" in message and "step-4: zero/shard.pt is missing" in message
    assert f"step-2: no {MANIFEST}" in message
