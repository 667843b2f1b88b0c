"""Where reference log-probs come from: a frozen engine, the policy with its LoRA adapters off, or the batch itself.

Each reference answers one question, ``logps(batch) -> (chosen, rejected)``, both [B] and detached, so the training
loop does not care which one it has. ``score_dataset`` runs any of them once over a dataset; the table is cached on
disk (``cached_reference_logps``) and stored as columns, after which the ``PrecomputedReference`` reads them back
from the batch. ``ReferenceSync`` (TR-DPO) moves a reference engine towards the policy during training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import datasets
import torch
from datasets.fingerprint import Hasher
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ds_dpo.config import ConfigError, DPOConfig
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


class ReferenceSync:
    """TR-DPO (Gorbatovski et al., 2024; TRL's ``sync_ref_model``): every ``every`` optimizer steps the reference
    engine's weights become ``alpha * policy + (1 - alpha) * reference``.

    The reference is ZeRO-3 over all ranks, and the policy either ZeRO-3 over the same ranks (the same model
    partitioned the same way: each rank holds the same slice of both) or whole on every rank. So each rank mixes
    only the reference partitions it holds, with the matching slice of the policy: nothing is gathered and no rank
    needs more than its shards (TRL under ZeRO-3 gathers both models whole on every rank and mixes on rank 0). The
    policy's partitions are its working copy after the step (bf16 where it trains in bf16), as TRL mixes the
    module's parameters.

    The mixed reference is run state: ``save`` writes each rank's partitions into a checkpoint and ``load`` puts them
    back, also on another number of ranks."""

    DIRECTORY = "reference"

    def __init__(self, policy, reference, alpha: float, every: int):
        self.alpha, self.every = alpha, every
        for engine in (policy, reference):
            offload = engine.zero_offload_param()
            if offload is not None and offload.device == "nvme":
                raise ConfigError(
                    "`sync_ref_model` mixes parameter shards in memory: parameters offloaded to NVMe "
                    "(`offload_param.device: nvme`) are not; offload them to `cpu`"
                )
            if engine.zero_optimization_stage() == 3 and (engine.zero_hpz_partition_size() or 1) > 1:
                raise ConfigError(
                    "`sync_ref_model` with ZeRO++ hierarchical partitions (`zero_hpz_partition_size`): their node-local "
                    "copies would keep the reference's old weights; remove `zero_hpz_partition_size`"
                )
        self.group = torch.distributed.get_world_size(), torch.distributed.get_rank()
        self.pairs = _paired_parameters(policy.module, reference.module, self.group[0])

    def after_step(self, step: int) -> bool:
        """Mix when ``step`` (optimizer steps done) is a multiple of ``every``, as TRL's callback at a step's end."""
        if step % self.every:
            return False
        self.mix()
        return True

    @torch.no_grad()
    def mix(self) -> None:
        for _, policy_param, shard, _ in self._shards():
            mine = _local_slice(policy_param, shard.numel(), self.group[1])
            # TRL's operation order (scale, then add the policy), for the same rounding
            shard[: mine.numel()].mul_(1.0 - self.alpha).add_(mine.to(shard.device, shard.dtype), alpha=self.alpha)
        self._refresh()

    def _shards(self):
        """(name, policy parameter, reference partition, reference parameter) of every parameter."""
        return ((name, p, q.ds_tensor.view(-1), q) for name, p, q in self.pairs)

    def _refresh(self) -> None:
        """Persistent reference parameters (small ones ZeRO-3 keeps gathered) are whole copies of the partitions just
        changed: gathered again, as DeepSpeed does after loading a checkpoint."""
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        whole = [q for _, _, q in self.pairs if q.ds_status == ZeroParamStatus.AVAILABLE]
        if whole:
            whole[0].partition(param_list=whole)
            whole[0].all_gather(param_list=whole)

    def save(self, checkpoint: Path) -> None:
        """This rank's reference partitions into ``checkpoint/reference/rank{R}.safetensors``."""
        world, rank = self.group
        directory = checkpoint / self.DIRECTORY
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: shard.detach().cpu().contiguous() for name, _, shard, _ in self._shards()}
        save_file(tensors, directory / f"rank{rank}.safetensors", metadata={"world_size": str(world)})

    @torch.no_grad()
    def load(self, checkpoint: Path) -> bool:
        """The reference partitions ``save`` wrote into ``checkpoint`` (False: it has none, a checkpoint of a run
        without ``sync_ref_model``). Written by another number of ranks, each parameter is put together from every
        rank's file and this rank's slice taken."""
        directory = checkpoint / self.DIRECTORY
        files = sorted(directory.glob("rank*.safetensors"), key=lambda f: int(f.stem[len("rank") :]))
        if not files:
            return False
        world, rank = self.group
        if len(files) == world:
            saved = load_file(files[rank])
            for name, _, shard, _ in self._shards():
                shard.copy_(saved[name])
        else:
            handles = [safe_open(f, "pt") for f in files]
            for name, _, shard, ref_param in self._shards():
                whole = torch.cat([h.get_tensor(name) for h in handles])[: ref_param.ds_numel]
                mine = _local_slice(whole, shard.numel(), rank)
                shard.zero_()[: mine.numel()].copy_(mine)
        self._refresh()
        return True


def _paired_parameters(policy: torch.nn.Module, reference: torch.nn.Module, world: int) -> list:
    """(name, policy parameter, reference parameter) for every parameter; ConfigError when the two models differ
    (a ``ref_model_name_or_path`` of another architecture) or are not partitioned alike."""
    ours = dict(policy.named_parameters())
    theirs = dict(reference.named_parameters())
    if ours.keys() != theirs.keys():
        differ = sorted(ours.keys() ^ theirs.keys())
        raise ConfigError(
            f"`sync_ref_model` mixes the policy into the reference parameter by parameter, but their parameters "
            f"differ ({len(differ)}, e.g. {differ[0]}): use a reference of the policy's architecture"
        )
    pairs = []
    for name, q in theirs.items():
        p = ours[name]
        shape = tuple(getattr(p, "ds_shape", p.shape))
        problem = (
            f"{name} is {shape} in the policy, {tuple(q.ds_shape)} in the reference"
            if shape != tuple(q.ds_shape)
            else f"{name} is partitioned over another group of ranks in the policy"
            if hasattr(p, "ds_tensor") and p.ds_tensor.numel() != q.ds_tensor.numel()
            else None
        )
        if problem:
            raise ConfigError(f"`sync_ref_model`: {problem}; they must be alike to be mixed shard by shard")
        pairs.append((name, p, q))
    if any(torch.distributed.get_world_size(q.ds_process_group) != world for _, _, q in pairs):
        raise ConfigError("`sync_ref_model` needs the reference partitioned over all ranks")
    return pairs


def _local_slice(param: torch.Tensor, partition: int, rank: int) -> torch.Tensor:
    """The elements of ``param`` that ZeRO-3 partition ``rank`` (of ``partition`` elements) holds: its own partition
    when ``param`` is partitioned alike, else that range of the whole tensor (shorter at the end)."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.view(-1)
    flat = param.detach().reshape(-1)
    return flat[rank * partition : (rank + 1) * partition]


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
