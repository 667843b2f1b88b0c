"""Where reference log-probs come from: a frozen engine, the policy with its LoRA adapters off, or the batch itself.

Each reference answers one question, ``logps(batch) -> (chosen, rejected)``, both [B] and detached, so the training
loop does not care which one it has. ``score_dataset`` runs any of them once over a dataset; the table is cached on
disk (``cached_reference_logps``) and stored as columns, after which the ``PrecomputedReference`` reads them back
from the batch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import datasets
import torch
from datasets.fingerprint import Hasher
from safetensors.torch import load_file, save_file

from ds_dpo.config import DPOConfig
from ds_dpo.data.pipeline import cache_root
from ds_dpo.data.sampler import GlobalBatchSampler
from ds_dpo.distributed import any_rank, say
from ds_dpo.forward.layouts import Layout, collate_pairs
from ds_dpo.forward.logprobs import Scoring, concatenated_forward

REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
REF_CACHE_VERSION = "2"  # bump when the log-prob computation changes


class Reference(Protocol):
    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...


class EngineReference:
    """A separate frozen model: an inference-only ZeRO-3 engine (see ``engines.build_engine(trainable=False)``),
    scoring batches as the run does (``scoring``)."""

    def __init__(self, engine, scoring: Scoring):
        self.engine, self.scoring = engine, scoring

    @torch.no_grad()
    def logps(self, batch):
        out = concatenated_forward(self.engine, batch, self.scoring)
        return out.chosen, out.rejected


class AdapterReference:
    """The LoRA policy's base model: same weights with adapters disabled, no second copy in memory."""

    def __init__(self, policy_engine, scoring: Scoring):
        self.engine, self.scoring = policy_engine, scoring

    @torch.no_grad()
    def logps(self, batch):
        was_training = self.engine.module.training
        self.engine.eval()  # adapter dropout off, exactly the base model
        try:
            with self.engine.module.disable_adapter():
                out = concatenated_forward(self.engine, batch, self.scoring)
        finally:
            self.engine.train(was_training)
        return out.chosen, out.rejected


class PrecomputedReference:
    """Reads the ``ref_*_logps`` columns that ``with_reference_columns`` added to the dataset."""

    def logps(self, batch):
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]


@torch.no_grad()
def score_dataset(
    reference: Reference,
    dataset: datasets.Dataset,
    batch_size: int,
    pad_token_id: int,
    device: torch.device,
    layout: Layout,
    desc: str = "reference log-probs",
    data_parallel: tuple[int, int] | None = None,
    vision=None,
) -> torch.Tensor:
    """[N, 2] float64 (chosen, rejected) reference log-probs of every pair, on every rank.

    Each data-parallel rank (``data_parallel``: size and rank; default every rank is one) scores a disjoint shard,
    padded with fillers so that every rank runs the same number of forwards, as ZeRO-3 requires; one all-gather at
    the end gives every rank the whole table (a sequence-parallel group's ranks give the same rows). ``vision``: a
    vision-language model's ``VisionInputs``.
    """
    from tqdm.auto import tqdm

    world = torch.distributed.get_world_size()
    size, rank = data_parallel or (world, torch.distributed.get_rank())
    sampler = GlobalBatchSampler(len(dataset), batch_size, 1, size, rank, seed=0, shuffle=False)
    rows = []  # [position, weight, chosen, rejected] per scored pair
    for plan in tqdm(
        sampler.epoch(0), total=sampler.steps_per_epoch, desc=desc, disable=torch.distributed.get_rank() != 0
    ):
        indices, weights = plan.micro_batches[0], plan.weights[0]
        batch = collate_pairs([dataset[i] for i in indices], weights, pad_token_id, layout, vision)
        chosen, rejected = reference.logps({k: v.to(device) for k, v in batch.items()})
        rows.append(
            torch.stack(
                [
                    torch.tensor(indices, dtype=torch.float64),
                    batch["weight"].double(),
                    chosen.double().cpu(),
                    rejected.double().cpu(),
                ],
                dim=1,
            )
        )
    local = torch.cat(rows).to(device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local)
    table = torch.cat(gathered).cpu()
    table = table[table[:, 1] > 0]
    logps = torch.empty(len(dataset), 2, dtype=torch.float64)
    logps[table[:, 0].long()] = table[:, 2:]
    return logps


def with_reference_columns(dataset: datasets.Dataset, logps: torch.Tensor) -> datasets.Dataset:
    """``dataset`` with ``ref_chosen_logps``/``ref_rejected_logps`` columns from an [N, 2] table."""
    dataset = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
    return dataset.add_column(REF_COLUMNS[0], logps[:, 0].tolist()).add_column(REF_COLUMNS[1], logps[:, 1].tolist())


def _read_table(cache_file: Path, rows: int | None) -> torch.Tensor | None:
    """The cached table, or None when there is none or it cannot be used (a damaged file: said, then recomputed)."""
    if not cache_file.is_file():
        return None
    try:
        table = load_file(cache_file)["logps"]
    except Exception as e:  # safetensors reports a truncated or garbled file in its own error type
        say(f"notice: reference log-prob cache {cache_file} is damaged ({type(e).__name__}: {e}); computing again")
        return None
    if rows is not None and tuple(table.shape) != (rows, 2):
        say(
            f"notice: reference log-prob cache {cache_file} holds {tuple(table.shape)}, not ({rows}, 2); computing again"
        )
        return None
    return table


def cached_reference_logps(
    cache_file: Path, compute, device: torch.device, rows: int | None = None
) -> tuple[torch.Tensor, bool]:
    """The [N, 2] table (``rows`` = N where known) from ``cache_file`` if every rank can read it, else ``compute()``
    (collective) and store it.

    Every rank must take the same branch (computing runs collectives), so the decision is an all-reduce: on nodes
    without a shared filesystem, one node's missing (or damaged) file makes all of them compute.
    """
    table = _read_table(cache_file, rows)
    if not any_rank(table is None, device):
        return table, True
    logps = compute()
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.tmp{os.getpid()}")
        save_file({"logps": logps}, tmp)
        os.replace(tmp, cache_file)
    return logps, False


def precompute_reference_logps(
    reference: Reference,
    data: datasets.Dataset,
    cfg: DPOConfig,
    pad_token_id: int,
    device: torch.device,
    layout: Layout,
    data_parallel: tuple[int, int] | None = None,
    vision=None,
) -> datasets.Dataset:
    """Collective. ``data`` with its reference log-probs as columns: read from the cache when an earlier run scored
    the same pairs with the same reference weights and settings (a resumed run, a beta sweep), else computed once
    with ``reference`` and cached."""
    key = Hasher.hash(
        (
            REF_CACHE_VERSION,
            model_fingerprint(cfg.ref_model_path),
            # a reference engine of the base model with the starting adapter (not the adapters-disabled one)
            model_fingerprint(cfg.model.adapter_name_or_path)
            if cfg.model.adapter_name_or_path and cfg.ref.ref_model_name_or_path is None and cfg.ref.reference != "lora"
            else None,
            data._fingerprint,
            cfg.loss.ld_alpha,
            cfg.model.bf16,
            cfg.model.attn_implementation,
        )
    )
    cache_file = cache_root(cfg.data.dataset_cache_dir) / f"ref-logps-{key}.safetensors"
    batch_size = cfg.ref.precompute_ref_batch_size or cfg.logging.per_device_eval_batch_size
    logps, hit = cached_reference_logps(
        cache_file,
        lambda: score_dataset(
            reference, data, batch_size, pad_token_id, device, layout, data_parallel=data_parallel, vision=vision
        ),
        device,
        rows=len(data),
    )
    say(f"reference log-probs of {len(data)} pairs: {'read from cache' if hit else 'computed'} ({cache_file.name})")
    return with_reference_columns(data, logps)


def model_fingerprint(name_or_path: str) -> list:
    """What identifies a model's (or an adapter's) weights for caching: a local directory by its files, a Hub name by
    the revision it resolved to in the local Hub cache (the name alone where none is cached)."""
    path = Path(name_or_path)
    if not path.is_dir():
        from huggingface_hub import try_to_load_from_cache

        for filename in ("config.json", "adapter_config.json"):
            try:
                cached = try_to_load_from_cache(name_or_path, filename)
            except ValueError:  # not a valid Hub id
                break
            if isinstance(cached, str):  # .../models--org--name/snapshots/<commit>/config.json
                return [name_or_path, Path(cached).parent.name]
        return [name_or_path]
    return [str(path.resolve())] + [
        (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir()) if f.is_file()
    ]
