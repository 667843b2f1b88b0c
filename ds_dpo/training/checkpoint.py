"""DeepSpeed checkpoints during training, and resuming from them (also on another world size).

A checkpoint is ``output_dir/checkpoints/step-N``: DeepSpeed's own files (engine, optimizer, LR schedule) plus one
``trainer_state_rank{R}.json`` per rank (the ``TrainState``: step, epoch, position in the epoch, NaN streak, learning
rate, the partial metric window; plus RNG states and the world size), plain JSON so that resuming unpickles nothing of ours. ``checkpoints/latest`` names the newest
*complete* checkpoint: it is replaced (atomically) only after every rank has finished writing, so a crash or a kill
during a save leaves the previous checkpoint in place as the one to resume from.

``Checkpointer`` owns when to save, what goes in, which old checkpoints to delete, which one a run resumes from and
its conversion when the world size changed. Exporting a model is ``ds_dpo.training.export``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ds_dpo.config import CheckpointConfig
from ds_dpo.distributed import say
from ds_dpo.training.state import TrainState

TAG_PREFIX = "step-"
LATEST = "latest"
UNIVERSAL_SUFFIX = "-universal"


def rng_state() -> dict:
    """Python, numpy and torch RNG states as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state().tolist(),
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def find_checkpoint(root: Path, spec: str) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` names: ``auto`` -> the one ``latest`` points to (None if none);
    a ``checkpoints`` directory -> its latest; otherwise the directory itself."""
    path = root if spec == "auto" else Path(spec)
    if (path / LATEST).is_file():
        return path / (path / LATEST).read_text().strip()
    return None if spec == "auto" else path


def read_state(checkpoint: Path, rank: int) -> dict:
    """This rank's trainer state (rank 0's when resuming on more ranks than wrote the checkpoint)."""
    own = checkpoint / f"trainer_state_rank{rank}.json"
    return json.loads((own if own.is_file() else checkpoint / "trainer_state_rank0.json").read_text())


def universal_checkpoint(checkpoint: Path) -> Path:
    """Collective. DeepSpeed's world-size-independent form of ``checkpoint`` (converted once, by global rank 0)."""
    target = checkpoint.with_name(checkpoint.name + UNIVERSAL_SUFFIX)
    if torch.distributed.get_rank() == 0 and not (target / "zero").is_dir():
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(checkpoint),
                "--output_folder",
                str(tmp),
                "--num_extract_workers",
                "1",
                "--num_merge_workers",
                "1",
            ],
            check=True,
            capture_output=True,
        )
        os.replace(tmp, target)
    torch.distributed.barrier()
    return target


class Checkpointer:
    """Owns the run's checkpoints: when to save, what goes in, where a run resumes from, and the conversion when it
    resumes on another world size."""

    def __init__(self, cfg: CheckpointConfig, output_dir: str | Path, world_size: int):
        self.cfg, self.world_size = cfg, world_size
        self.root = Path(output_dir) / "checkpoints"
        self.resume_from: Path | None = None
        self._resume_state: dict | None = None

    def prepare_resume(self, ds_config: dict) -> None:
        """Collective, before the engines are built: find the checkpoint ``resume_from_checkpoint`` names; when
        another world size wrote it, convert it once to DeepSpeed's universal format and have DeepSpeed load that
        (``ds_config`` is the policy's)."""
        spec = self.cfg.resume_from_checkpoint
        if not spec:
            return
        path = find_checkpoint(self.root, spec)
        if path is None:
            say("resume_from_checkpoint: auto, but no checkpoint yet: starting from scratch")
            return
        self._resume_state = read_state(path, torch.distributed.get_rank())
        if self._resume_state["world_size"] != self.world_size:
            say(
                f"{path} was written by {self._resume_state['world_size']} ranks; resuming on {self.world_size} "
                "through DeepSpeed's universal checkpoint format"
            )
            path = universal_checkpoint(path)
            ds_config["checkpoint"] = {"load_universal": True}
        self.resume_from = path

    def restore(self, engine, state: TrainState) -> None:
        """Collective: load the engine (weights, optimizer, LR schedule) and the run's state from the checkpoint
        ``prepare_resume`` chose; nothing when starting fresh."""
        if self.resume_from is None:
            return
        loaded, _ = engine.load_checkpoint(str(self.resume_from.parent), tag=self.resume_from.name)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {self.resume_from}")
        set_rng_state(self._resume_state["rng"])
        state.load_state_dict(self._resume_state)
        state.skipped_steps = engine.skipped_steps  # restored by DeepSpeed with the engine
        say(f"resumed from {self.resume_from} at step {state.step}")

    def due(self, step: int) -> bool:
        return self.cfg.save_steps > 0 and step % self.cfg.save_steps == 0

    def save(self, engine, state: TrainState) -> None:
        """Collective: every rank writes its shards and its trainer state; once all are done, rank 0 moves
        ``latest`` to the new checkpoint and prunes those beyond ``save_total_limit``."""
        started = time.perf_counter()
        rank, tag = torch.distributed.get_rank(), f"{TAG_PREFIX}{state.step}"
        directory = self.root / tag
        directory.mkdir(parents=True, exist_ok=True)
        payload = {**state.state_dict(), "rng": rng_state(), "world_size": self.world_size}
        (directory / f"trainer_state_rank{rank}.json").write_text(json.dumps(payload))
        # DeepSpeed writes its own `latest` before the other ranks are known to be done; we move ours after.
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        torch.distributed.barrier()
        if rank == 0:
            tmp = self.root / f"{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / LATEST)
            if self.cfg.save_total_limit:
                for old in self.tags()[: -self.cfg.save_total_limit]:
                    shutil.rmtree(old)
                    shutil.rmtree(old.with_name(old.name + UNIVERSAL_SUFFIX), ignore_errors=True)
        torch.distributed.barrier()
        say(f"checkpoint {tag} saved in {time.perf_counter() - started:.2f} s")

    def tags(self) -> list[Path]:
        """Saved checkpoint directories, oldest first."""
        found = [p for p in self.root.glob(f"{TAG_PREFIX}*") if p.name[len(TAG_PREFIX) :].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(TAG_PREFIX) :]))
