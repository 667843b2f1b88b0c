"""Sequence parallelism (DeepSpeed Ulysses): the ``sequence_parallel_size`` ranks of a group train on one micro-batch
together, each holding a contiguous slice of its rows, so a pair longer than one rank's memory still trains.

Groups are DeepSpeed's (``parallel_state_sp``: consecutive ranks form a group); the ranks of a group get the same
micro-batches from the sampler (they are one data-parallel rank). The engines are not told about the groups (no
``mpu``): DeepSpeed 0.19.8 divides the summed gradients by ``world / sp`` on some of its reduce paths and by
``world`` on others (ZeRO-3's default reduce-scatter), so ZeRO sees plain data parallelism over every rank (it
shards over all of them either way) and the training loop's loss scale does the arithmetic, the same on every
path.

Attention (wrapped around the run's kernels by ``ds_dpo.forward.hooks.install``, a no-op for forwards that are not
sharded): around the kernel of each layer an all-to-all turns this rank's slice of the row with all heads
``[B, H, S/sp, D]`` into the whole row with ``H/sp`` heads ``[B, H/sp, S, D]``, and back after the kernel
(DeepSpeed's differentiable all-to-all operator). The kernel is the run's own: ds_dpo's block attention or
flash-attention's varlen path, fed with the blocks / sequence boundaries of the whole row (computed from the whole
micro-batch, which every rank of the group has), so packed and prefix-shared rows stay exact. DeepSpeed's
``UlyssesSPAttentionHF`` is not used as it is: it drops the attention mask and relies on causal masking, which in a
packed sdpa row lets one sequence attend to the one before it, and it fixes the batch size when it is registered.

Scoring: a token's log-prob is computed on the rank that holds its predicting position; each rank sums its tokens
per sequence and the sums are added over the group, forward only (the backward passes each rank's gradient to its
own partial sum once), so every rank of the group computes the same loss and the group's parameter gradients add
up to that loss's gradient, exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from deepspeed.sequence.layer import _dim_zero_all_to_all, register_all_to_all_group

from ds_dpo.forward.attention import Blocks, is_block_attention, stand_in_mask
from ds_dpo.forward.layouts import Layout, is_varlen, sliding_window


@dataclass(frozen=True)
class SequenceParallel:
    """This rank's sequence-parallel group."""

    group: dist.ProcessGroup
    size: int
    rank: int
    """Rank within the group: which slice of the row this rank holds."""


def initialize(size: int) -> SequenceParallel | None:
    """Form the sequence-parallel groups (collective); None for ``size`` 1."""
    if size == 1:
        return None
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    parallel_state_sp.initialize_sequence_parallel(size)
    group = parallel_state_sp.get_sequence_parallel_group()
    register_all_to_all_group(group)
    return SequenceParallel(group, size, dist.get_rank(group))


def data_parallel(sp: SequenceParallel | None) -> tuple[int, int]:
    """(size, rank) of the data-parallel dimension: the groups, in rank order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    size = 1 if sp is None else sp.size
    return world // size, rank // size


def problems(
    sp_size: int, world_size: int, config, attn_implementation: str, stateful: bool, reads_row_index: bool = False
) -> list[str]:
    """Why a run cannot use ``sequence_parallel_size`` ``sp_size`` (empty: it can)."""
    if sp_size == 1:
        return []
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    checks = [
        (
            world_size % sp_size == 0,
            f"the number of ranks ({world_size}) must be a multiple of `sequence_parallel_size` ({sp_size})",
        ),
        (
            heads % sp_size == 0,
            f"the model's {heads} attention heads must be divisible by `sequence_parallel_size` "
            f"({sp_size}): each rank of a group computes attention for heads / sp of them",
        ),
        (
            kv_heads % sp_size == 0,
            f"the model's {kv_heads} key/value heads must be divisible by `sequence_parallel_size` ({sp_size})",
        ),
        (
            is_block_attention(attn_implementation) or is_varlen(attn_implementation),
            f"attention `{attn_implementation}` cannot run sequence-parallel here: it needs ds_dpo's block attention "
            "(`attn_implementation: sdpa` or `eager` on a model that takes a custom attention function) or "
            "flash-attention",
        ),
        (
            not stateful,
            "recurrent (state-space) layers carry state along the whole row, which sequence parallelism "
            "splits across ranks",
        ),
        (
            not reads_row_index,
            "the model's layers read each token's index in the row (Llama-4's attention temperature tuning), which "
            "a rank's slice of the row would count from its own start",
        ),
        (
            not getattr(config, "is_encoder_decoder", False),
            "encoder-decoder models are not supported (their cross-attention reads the whole encoder output)",
        ),
        (
            getattr(config, "vision_config", None) is None,
            "vision-language models are not supported (an image's tokens could straddle two ranks' slices)",
        ),
    ]
    return [f"sequence parallelism: {message}" for ok, message in checks if not ok]


# --- the micro-batch, sharded -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardedForward:
    """What the attention of a sharded forward needs besides its own slice (passed as ``ds_dpo_sp``)."""

    group: dist.ProcessGroup
    size: int
    position_ids: torch.Tensor
    """The whole row's positions: flash-attention finds packed sequences from them."""


def shard(
    batch: dict[str, torch.Tensor], layout: Layout, config, dtype: torch.dtype, sp: SequenceParallel
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The model's keyword arguments for this rank's slice of the micro-batch, and the scored tokens whose predicting
    position is in that slice (``score_index`` relative to the slice; ``score_labels``, ``score_sequence``,
    ``score_rank`` as in the batch)."""
    padded = not layout.padding_free
    batch, width = _pad_to_multiple(batch, sp.size, padded)
    if padded:  # each row is one block: causal (and the sliding window), right padding never seen by a real token
        inputs = _whole_row_inputs(batch["input_ids"], config, dtype)
    else:
        inputs = layout.model_inputs(batch, config, dtype)
    local = width // sp.size
    start = sp.rank * local
    rows = slice(None), slice(start, start + local)
    position_ids = inputs["position_ids"]
    inputs["input_ids"], inputs["position_ids"] = inputs["input_ids"][rows], position_ids[rows]
    inputs["ds_dpo_sp"] = ShardedForward(sp.group, sp.size, position_ids)
    row, column = batch["score_index"] // width, batch["score_index"] % width
    mine = (column >= start) & (column < start + local)
    scored = {"score_index": row[mine] * local + column[mine] - start}
    for key in ("score_labels", "score_sequence", "score_rank"):
        scored[key] = batch[key][mine]
    return inputs, scored


def _pad_to_multiple(
    batch: dict[str, torch.Tensor], multiple: int, padded: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """``batch`` with its rows extended to a width divisible by ``multiple`` (by tokens nothing scores or attends
    to), and that width. A packed row gets a filler sequence of its own."""
    width = batch["input_ids"].shape[1]
    extra = math.ceil(width / multiple) * multiple - width
    if not extra:
        return batch, width
    batch = dict(batch)

    def extend(key: str, values: torch.Tensor) -> None:
        batch[key] = torch.cat([batch[key], values.to(batch[key].dtype).expand(batch[key].shape[0], -1)], dim=1)

    device = batch["input_ids"].device
    extend("input_ids", torch.zeros(1, extra, device=device))
    if padded:  # flat positions in [rows, width] move to [rows, width + extra]
        batch["score_index"] = batch["score_index"] + (batch["score_index"] // width) * extra
    else:
        extend("position_ids", torch.arange(extra, device=device)[None])
        extend("segment", torch.full((1, extra), int(batch["segment"].max()) + 1, device=device))
        extend("branch", torch.zeros(1, extra, device=device))
    return batch, width + extra


def _whole_row_inputs(input_ids: torch.Tensor, config, dtype: torch.dtype) -> dict:
    """Inputs of a padded micro-batch whose rows each attend as one causal block."""
    rows, width = input_ids.shape
    positions = torch.arange(width, device=input_ids.device)
    inputs = {"input_ids": input_ids, "position_ids": positions.expand(rows, -1)}
    attn = config._attn_implementation
    if is_block_attention(attn):
        additive = None if attn.endswith("sdpa") else dtype
        zeros = torch.zeros_like(positions)
        inputs["ds_dpo_blocks"] = Blocks([(0, width)], zeros, zeros, positions, additive)
        stand_in = stand_in_mask(width, input_ids.device)
        inputs["attention_mask"] = (
            {"full_attention": stand_in, "sliding_attention": stand_in} if sliding_window(config)[1] else stand_in
        )
    return inputs


# --- attention ----------------------------------------------------------------------------------------------------


def _whole_row(x: torch.Tensor, sharded: ShardedForward) -> torch.Tensor:
    """[B, H, S/sp, D] (this rank's slice, every head) -> [B, H/sp, S, D] (the whole row, this rank's heads)."""
    b, h, length, d = x.shape
    n = sharded.size
    x = x.reshape(b, n, h // n, length, d).transpose(0, 1)  # [n, ...]: the heads for group rank j go to j
    x = _dim_zero_all_to_all(sharded.group, x)  # [n, ...]: what group rank j holds of this rank's heads
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * length, d)


def _own_slice(x: torch.Tensor, sharded: ShardedForward) -> torch.Tensor:
    """The kernel's [B, S, H/sp, D] -> [B, S/sp, H, D]: this rank's slice of the row, every head."""
    b, length, h, d = x.shape
    n = sharded.size
    x = x.reshape(b, n, length // n, h, d).transpose(0, 1)  # [n, ...]: slice j goes to group rank j
    x = _dim_zero_all_to_all(sharded.group, x)  # [n, ...]: group rank j's heads of this rank's slice
    return x.permute(1, 2, 0, 3, 4).reshape(b, length // n, n * h, d)


def ulysses(attention):
    """``attention`` run on the whole row with this rank's heads when the forward is sharded (``ds_dpo_sp``)."""

    def wrapped(module, query, key, value, attention_mask, ds_dpo_sp: ShardedForward | None = None, **kwargs):
        if ds_dpo_sp is None:
            return attention(module, query, key, value, attention_mask, **kwargs)
        if "position_ids" in kwargs:
            kwargs["position_ids"] = ds_dpo_sp.position_ids
        query, key, value = (_whole_row(t, ds_dpo_sp) for t in (query, key, value))
        out, _ = attention(module, query, key, value, attention_mask, **kwargs)
        return _own_slice(out, ds_dpo_sp), None

    return wrapped


# --- scores ---------------------------------------------------------------------------------------------------------


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) in forward; in backward each rank's part gets the gradient once, unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_group(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """The group's sum of ``x`` (each rank's partial per-sequence sums), differentiable as described above."""
    return _SumOverGroup.apply(x, sp.group)
