import os
import time

from ds_dpo.distributed import clear_stale_build_locks


def test_only_stale_op_build_locks_are_removed(tmp_path, monkeypatch, capsys):
    """A lock left by a process killed while loading a JIT-built op would make every later run wait forever."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, live = tmp_path / "cpu_adam" / "lock", tmp_path / "fused_adam" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.touch()
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))
    assert clear_stale_build_locks(max_age_s=600) == [stale]
    assert not stale.exists() and live.exists()  # a build in progress keeps its lock
    assert "removed a stale DeepSpeed op build lock" in capsys.readouterr().out
