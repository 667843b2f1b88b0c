"""Activation memory of long rows beyond gradient checkpointing: tiled MLPs and CPU offload of the checkpointed
hidden states, the two "Arctic Long Sequence Training" pieces DeepSpeed ships beside its Ulysses sequence
parallelism (``ds_dpo.forward.sequence_parallel``).

- ``tiled_mlp_shards: N`` runs each decoder layer's dense MLP through DeepSpeed's ``TiledMLP``: the forward computes
  N slices of the tokens without keeping anything but the MLP's input, and backward recomputes and differentiates one
  slice at a time. The MLP's [tokens, intermediate] activations (several per layer, each 3-4x the hidden states)
  then exist for 1/N of the row at a time. Each slice's forward under ZeRO-3 gathers the MLP's weights (a
  collective), so every rank must cut exactly N slices whatever its row length: ``TiledMLP`` cuts with
  ``torch.chunk``, which returns fewer pieces when the length does not divide well (5 tokens in 4: 2 + 2 + 1), so
  the tokens are padded to a multiple of N first (zeros whose outputs are dropped: their gradients are zero).
  Mixture-of-experts blocks are left as they are (their router outputs are recorded for the router loss).
- ``activation_offloading`` wraps each micro-batch's policy forward and backward in DeepSpeed's
  ``CheckpointHiddenStatesOffload``: the input that gradient checkpointing keeps for each decoder layer is copied
  to pinned CPU memory on a side stream and brought back for that layer's recompute. DeepSpeed skips tensors that
  are already in host memory, so on a CPU-only run it marks the inputs and moves nothing.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from transformers import GradientCheckpointingLayer

from ds_dpo.config import ConfigError
from ds_dpo.forward.router_loss import router_modules


def dense_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``mlp`` module of every decoder layer that does not route tokens to experts."""
    routers = {id(m) for m in router_modules(model)[0]}
    mlps = [
        layer.mlp
        for layer in model.modules()
        if isinstance(layer, GradientCheckpointingLayer) and isinstance(getattr(layer, "mlp", None), torch.nn.Module)
    ]
    return [mlp for mlp in mlps if not any(id(m) in routers for m in mlp.modules())]


def tile_mlps(model: torch.nn.Module, shards: int) -> int:
    """Make every dense decoder-layer MLP of ``model`` run in ``shards`` slices (``shards`` 1: untouched); returns how
    many were tiled. A model without any is a ``ConfigError``."""
    if shards == 1:
        return 0
    mlps = dense_mlps(model)
    if not mlps:
        raise ConfigError(
            f"`tiled_mlp_shards: {shards}`: {type(model).__name__} has no dense MLP in a decoder layer "
            "to tile (its layers have no `mlp` module, or only mixture-of-experts blocks)"
        )
    for mlp in mlps:
        mlp.forward = _tiled(mlp, mlp.forward, shards)
    return len(mlps)


def _tiled(mlp: torch.nn.Module, forward, shards: int):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    def tiled_forward(x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-2]
        padded = -(-max(length, 1) // shards) * shards  # a multiple of shards: torch.chunk then cuts exactly shards
        if padded != length:
            x = F.pad(x, (0, 0, 0, padded - length))
        # the weights that train now (LoRA is added after tiling): DeepSpeed reduces their gradients after the last
        # slice only
        params = [p for p in mlp.parameters() if p.requires_grad]
        # a slice of a batch of rows is not contiguous, and some MLPs view their input (GPT-2's Conv1D)
        out = TiledMLP.apply(lambda _, x_slice: forward(x_slice.contiguous()), mlp, x, shards, params)
        return out[..., :length, :]

    return tiled_forward


def checkpoint_offload(enabled: bool):
    """A fresh context for one micro-batch's forward and backward: DeepSpeed's ``CheckpointHiddenStatesOffload``
    (which must see both: a tensor offloaded in forward is restored in backward), or nothing."""
    if not enabled:
        return contextlib.nullcontext()
    from deepspeed.runtime.activation_checkpointing.offload_activations import CheckpointHiddenStatesOffload

    return CheckpointHiddenStatesOffload()
