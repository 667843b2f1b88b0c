"""DeepSpeed checkpoints during training, and resuming from them (also on another world size).

A checkpoint is ``output_dir/checkpoints/step-N``: DeepSpeed's own files (engine, optimizer, LR schedule) plus one
``trainer_state_rank{R}.json`` per rank (the ``TrainState``: step, epoch, position in the epoch, NaN streak, learning
rate, the partial metric window; plus RNG states and the world size), plain JSON so that resuming unpickles nothing of
ours, and with ``sync_ref_model`` the mixed reference's shards (``reference/``, ``ReferenceSync``). Once every rank
has finished writing, rank 0 writes ``manifest.json`` (every file's size, and a checksum of each small one) and only
then replaces ``checkpoints/latest`` (atomically): a crash, a kill or a full disk during a save leaves the previous
checkpoint in place as the one to resume from; what a failed save left is skipped on resume and removed by the next
save of that step.

Resuming with ``auto`` takes the newest checkpoint whose files match its manifest; one that does not (a save that
never finished, a file truncated or damaged by a copy or a quota) is skipped with a message saying what is wrong,
and no whole checkpoint at all is an error that lists why each was refused. A checkpoint named explicitly must be
whole. The manifest covers the files rank 0 sees: on node-local disks (no shared file system) each node's shards are
its own to keep.

``Checkpointer`` owns when to save, what goes in, which checkpoint is the best (``metric_for_best_model``, recorded
in the trainer state, so a resumed run knows it) and loading it at the end (``load_best_model_at_end``), which old
checkpoints to delete (never the best), which one a run resumes from and its conversion when the world size
changed. Exporting a model is ``ds_dpo.training.export``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ds_dpo.config import CheckpointConfig, ConfigError
from ds_dpo.distributed import any_rank, device, say
from ds_dpo.training.reference import ReferenceSync
from ds_dpo.training.state import TrainState

TAG_PREFIX = "step-"
LATEST = "latest"
UNIVERSAL_SUFFIX = "-universal"
MANIFEST = "manifest.json"
CHECKSUMMED_BYTES = 1 << 20
"""Files up to this size get a checksum in the manifest (states, configs, small shards); larger ones are checked by
size, which a truncated copy or an interrupted write changes, without reading gigabytes at every resume."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read back; the message names the checkpoint and what is wrong."""


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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(checkpoint: Path) -> None:
    """Record every file of ``checkpoint`` (written by every rank by now): its size, and a checksum when small."""
    files = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST):
        size = path.stat().st_size
        files[str(path.relative_to(checkpoint))] = {
            "size": size,
            **({"sha256": _sha256(path)} if size <= CHECKSUMMED_BYTES else {}),
        }
    tmp = checkpoint / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    os.replace(tmp, checkpoint / MANIFEST)


def checkpoint_problem(checkpoint: Path, legacy: bool = False) -> str | None:
    """What is wrong with ``checkpoint`` (None: it is whole). ``legacy``: a checkpoint ``latest`` names may predate
    manifests (written by an earlier version) and is then taken as whole."""
    manifest = checkpoint / MANIFEST
    if not manifest.is_file():
        return None if legacy else f"no {MANIFEST}: its save did not finish"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__})"
    for name, expected in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} when it was written"
        if "sha256" in expected and _sha256(path) != expected["sha256"]:
            return f"{name} differs from what was written (checksum)"
    return None


def checkpoint_tags(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first."""
    found = [p for p in root.glob(f"{TAG_PREFIX}*") if p.name[len(TAG_PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(TAG_PREFIX) :]))


def find_checkpoint(root: Path, spec: str) -> Path | None:
    """The checkpoint ``resume_from_checkpoint`` names: ``auto`` -> under ``root``, the one ``latest`` names if it is
    whole, else the newest whole one (None if there are no checkpoints); a ``checkpoints`` directory -> the same in
    it; otherwise the directory itself, which must be whole. Says which checkpoints were skipped and why;
    CheckpointError when none can be used."""
    path = root if spec == "auto" else Path(spec)
    candidates = checkpoint_tags(path)
    if not candidates:
        if spec == "auto":
            return None
        if (path / LATEST).is_file():  # a checkpoints directory whose checkpoints are all gone
            raise CheckpointError(f"{path}: `latest` names {(path / LATEST).read_text().strip()}, which does not exist")
        problem = checkpoint_problem(path, legacy=True)
        if problem:
            raise CheckpointError(f"checkpoint {path} cannot be resumed from: {problem}")
        return path
    latest = _latest(path)
    refused = []
    for candidate, problem in _examined(path, candidates):
        if problem is None:
            return candidate
        refused.append(f"{candidate.name}: {problem}")
        say(f"notice: skipping checkpoint {candidate}: {problem}")
    if latest is None and spec == "auto":  # no save ever completed: nothing to lose by starting again
        return None
    raise CheckpointError(
        f"no whole checkpoint under {path} to resume from ({'; '.join(refused)}). Start without "
        "`resume_from_checkpoint`, or restore a checkpoint from a copy"
    )


def _latest(root: Path) -> str | None:
    return (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None


def _examined(root: Path, candidates: list[Path]):
    """(checkpoint, its problem or None) in the order a resume considers them: the one ``latest`` names first (the
    newest a save completed), then the others, newest first."""
    latest = _latest(root)
    for candidate in sorted(reversed(candidates), key=lambda c: c.name != latest):
        yield candidate, checkpoint_problem(candidate, legacy=candidate.name == latest)


def last_whole_checkpoint(root: Path) -> str:
    """Where ``--resume_from_checkpoint auto`` would resume from, in words (for messages; says nothing itself)."""
    for candidate, problem in _examined(root, checkpoint_tags(root)):
        if problem is None:
            return f"the last whole checkpoint is {candidate}"
    return f"no whole checkpoint under {root} yet"


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
        converted = subprocess.run(
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
                # ZeRO-1/2 checkpoints of a model without Megatron's tensor-parallel layout have no
                # `universal_checkpoint_info`; DeepSpeed's default for that case (nothing to merge across TP ranks)
                "--inject_missing_state",
            ],
            capture_output=True,
            text=True,
        )
        if converted.returncode:
            last = (converted.stderr.strip().splitlines() or ["no output"])[-1]
            raise CheckpointError(
                f"checkpoint {checkpoint} cannot be converted for another number of ranks by DeepSpeed's "
                f"ds_to_universal ({last}); resume it on {read_state(checkpoint, 0)['world_size']} ranks"
            )
        os.replace(tmp, target)
    torch.distributed.barrier()
    return target


def _strict_weights(engine) -> bool:
    """Whether a checkpoint's weights must match the model's key for key. Not with a 4-bit (QLoRA) base: its state
    dict carries bitsandbytes' quantization state next to each 4-bit weight, which ``load_state_dict`` reports as
    unexpected keys (the base never trains: the checkpoint holds the weights it was loaded with)."""
    return not getattr(engine.module, "is_loaded_in_4bit", False)


class Checkpointer:
    """Owns the run's checkpoints: when to save, what goes in, where a run resumes from, and the conversion when it
    resumes on another world size."""

    def __init__(self, cfg: CheckpointConfig, output_dir: str | Path, world_size: int):
        self.cfg, self.world_size = cfg, world_size
        self.root = Path(output_dir) / "checkpoints"
        self.resume_from: Path | None = None
        self._resume_written: Path | None = None
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
        self._resume_written = path.with_name(path.name.removesuffix(UNIVERSAL_SUFFIX))  # where our own files are

    def restore(self, engine, state: TrainState, reference_sync: ReferenceSync | None = None) -> None:
        """Collective: load the engine (weights, optimizer, LR schedule), the run's state and a TR-DPO reference
        (``reference_sync``) from the checkpoint ``prepare_resume`` chose; nothing when starting fresh."""
        if self.resume_from is None:
            return
        loaded, _ = engine.load_checkpoint(
            str(self.resume_from.parent), tag=self.resume_from.name, load_module_strict=_strict_weights(engine)
        )
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {self.resume_from}")
        if reference_sync is not None and not reference_sync.load(self._resume_written):
            say(
                f"notice: {self._resume_written} holds no mixed reference (saved without `sync_ref_model`): the "
                "reference starts from its initial weights"
            )
        set_rng_state(self._resume_state["rng"])
        state.load_state_dict(self._resume_state)
        state.skipped_steps = engine.skipped_steps  # restored by DeepSpeed with the engine
        say(f"resumed from {self.resume_from} at step {state.step}")

    def due(self, step: int) -> bool:
        return self.cfg.save_steps > 0 and step % self.cfg.save_steps == 0

    def save(
        self,
        engine,
        state: TrainState,
        reference_sync: ReferenceSync | None = None,
        metrics: dict[str, float] | None = None,
    ) -> None:
        """Collective: every rank writes its shards and its trainer state; once all are done, rank 0 writes the
        manifest, moves ``latest`` to the new checkpoint and prunes those beyond ``save_total_limit`` (never the best
        checkpoint). ``metrics``: the evaluation of this step, if one ran; it decides whether this checkpoint is the
        best (``metric_for_best_model``), which the saved trainer state records.

        Before writing, every rank checks that the disk has room for a checkpoint as large as the last one, and all
        stop together with CheckpointError if any has not: nothing is written and ``latest`` stays. A write that fails
        anyway (the first save, or another writer filled the disk meanwhile) raises on its rank at once, and the
        watchdog stops the other ranks (``ds_dpo.watchdog``); the partial checkpoint has no manifest, so ``auto``
        resumes from ``latest``, and the next save of that step removes it."""
        started = time.perf_counter()
        self._record_best(state, metrics)  # first: a metric the evaluation does not log stops before any write
        rank, tag = torch.distributed.get_rank(), f"{TAG_PREFIX}{state.step}"
        directory = self.root / tag
        if rank == 0 and directory.is_dir() and checkpoint_problem(directory) is not None:
            # left by a save that failed or was killed (no manifest): not a checkpoint, and its files must not mix
            # with this save's (the collective below orders the removal before any rank writes)
            say(f"notice: removing {directory}, left by a save that did not finish")
            shutil.rmtree(directory)
        need = self._last_checkpoint_bytes()
        free = shutil.disk_usage(self.root).free if self.root.exists() else None
        if any_rank(free is not None and free < need, device()):
            raise CheckpointError(self._no_room(directory, f"a checkpoint needs about {need / 2**20:.0f} MiB"))
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # DeepSpeed writes its own `latest` before the other ranks are known to be done; we move ours after.
            engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
            if reference_sync is not None:  # the TR-DPO reference has moved: it is part of the run's state
                reference_sync.save(directory)
            payload = {**state.state_dict(), "rng": rng_state(), "world_size": self.world_size}
            (directory / f"trainer_state_rank{rank}.json").write_text(json.dumps(payload))
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
            raise CheckpointError(self._no_room(directory, f"{type(e).__name__}: {e}")) from None
        torch.distributed.barrier()
        if rank == 0:
            write_manifest(directory)
            tmp = self.root / f"{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, self.root / LATEST)
            if self.cfg.save_total_limit:  # the new checkpoint is whole: older ones may go, except the best (HF's)
                best = state.best and f"{TAG_PREFIX}{state.best['step']}"
                for old in [t for t in self.tags()[: -self.cfg.save_total_limit] if t.name != best]:
                    shutil.rmtree(old)
                    shutil.rmtree(old.with_name(old.name + UNIVERSAL_SUFFIX), ignore_errors=True)
        torch.distributed.barrier()
        say(f"checkpoint {tag} saved in {time.perf_counter() - started:.2f} s")

    def _record_best(self, state: TrainState, metrics: dict[str, float] | None) -> None:
        """Make this step's checkpoint the best if its evaluation beats the best's (``metric_for_best_model``)."""
        metric = self.cfg.best_metric
        if metric is None or not metrics:
            return
        if metric not in metrics:
            raise ConfigError(
                f"`metric_for_best_model` is {metric!r}, which the evaluation does not log; it logs "
                f"{', '.join(sorted(metrics))}"
            )
        value, best = metrics[metric], state.best if state.best and state.best["metric"] == metric else None
        if not math.isfinite(value):  # a diverged evaluation is never the best, and would compare as such forever
            return
        if best is None or (value > best["value"] if self.cfg.best_is_greater else value < best["value"]):
            state.best = {"step": state.step, "metric": metric, "value": value}

    def load_best(self, engine, state: TrainState) -> None:
        """Collective: load the best checkpoint's weights into ``engine`` (``load_best_model_at_end``) and say so;
        where it cannot be, say why (the final model is then the last weights)."""
        best = state.best
        if best is None or best["metric"] != self.cfg.best_metric:
            say(
                "notice: load_best_model_at_end: no checkpoint was saved after an evaluation; the final model is the "
                "last weights"
            )
            return
        tag = f"{TAG_PREFIX}{best['step']}"
        what = f"checkpoint {tag} ({best['metric']} {best['value']:.4f})"
        if best["step"] == state.step:
            say(f"load_best_model_at_end: the best is the last step's {what}: the final model is the last weights")
            return
        checkpoint = self.root / tag
        problem = checkpoint_problem(checkpoint)
        if problem:
            raise CheckpointError(f"load_best_model_at_end: the best {what} cannot be loaded: {problem}")
        written = read_state(checkpoint, 0)["world_size"]
        if engine.load_universal_checkpoint():  # this run resumed on another world size: DeepSpeed loads that form
            checkpoint = universal_checkpoint(checkpoint)
        elif written != self.world_size:
            say(
                f"notice: load_best_model_at_end: the best {what} was written by {written} ranks, this run has "
                f"{self.world_size}: the final model is the last weights; export the best with `python "
                f"launch/export.py {checkpoint} OUT_DIR`"
            )
            return
        # the whole checkpoint, as a resume loads it: under ZeRO the fp32 weights are the optimizer's partitions; the
        # optimizer state comes along and is not used
        loaded, _ = engine.load_checkpoint(
            str(checkpoint.parent),
            tag=checkpoint.name,
            load_lr_scheduler_states=False,
            load_module_strict=_strict_weights(engine),
        )
        if loaded is None:
            raise CheckpointError(f"load_best_model_at_end: no DeepSpeed checkpoint in {checkpoint}")
        say(f"load_best_model_at_end: loaded the best {what}; the final model is its weights")

    def _last_checkpoint_bytes(self) -> int:
        """The size of the newest checkpoint written, from its manifest (0 before the first)."""
        for checkpoint in reversed(self.tags()):
            try:
                files = json.loads((checkpoint / MANIFEST).read_text())["files"]
            except (OSError, ValueError, KeyError):
                continue
            return sum(f["size"] for f in files.values())
        return 0

    def _no_room(self, directory: Path, why: str) -> str:
        free = shutil.disk_usage(self.root).free / 2**20 if self.root.exists() else float("nan")
        latest = self.root / LATEST
        kept = (
            f"checkpoint {latest.read_text().strip()} is kept, and `latest` still names it"
            if latest.is_file()
            else "no earlier checkpoint exists"
        )
        partial = f"the partial {directory.name} is not a checkpoint (no manifest); " if directory.exists() else ""
        return (
            f"saving checkpoint {directory} failed ({why}); {free:.0f} MiB free on the disk holding {self.root}: "
            f"{partial}{kept}. Free space (or set "
            "`save_total_limit`, or move `output_dir` to a larger disk), then resume with "
            "`--resume_from_checkpoint auto`"
        )

    def tags(self) -> list[Path]:
        """Saved checkpoint directories, oldest first."""
        return checkpoint_tags(self.root)
