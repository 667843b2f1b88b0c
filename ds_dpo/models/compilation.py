"""``torch_compile``: regional compilation, as torchtitan and open-instruct do it. Each decoder layer's forward is
compiled on its own, and so is the chunked output head's per-chunk function (``ChunkedTokenStats.compile_chunks``).

Why layers, not the model: a model's layers run one code object N times, so one compilation serves them all (dynamo
guards on the layer's class, not on which layer it is: parameters are graph inputs), and the model's forward around
them (embedding, masks, the scoring branch) stays eager instead of breaking a whole-model graph into pieces.
DeepSpeed's ``engine.compile()`` compiles the whole module (``module.compile()``); its one regional mode
(``compile.autoep_non_moe``) is for AutoEP layers and refuses ZeRO-3.

Why the layer's ``forward`` and not ``layer.compile()``: ``nn.Module.compile`` compiles ``_call_impl``, hooks
included, and ZeRO-3 hooks every layer: dynamo then traces DeepSpeed's hooks, guards on each layer's own hook
objects and compiles again for every layer until its recompile limit (seen: 57 graphs and the limit hit in a
4-step tiny run). Compiling ``forward`` keeps the hooks eager and the module, its parameters (already partitioned
and hooked) and its checkpoint keys unchanged. Under ZeRO-3 each compiled layer is also made a leaf module
(gathered whole by its own hook, its submodules unhooked): hooks inside the layer would break its graph at every
linear layer. A layer's parameters are then gathered at once, as ZeRO-3's prefetch of the next layer mostly does.
Gradient checkpointing stays outside the compiled call (``GradientCheckpointingLayer.__call__``), so backward
recomputes the layer with the compiled code.

Why ``dynamic=True``: a packed row's length changes with every micro-batch; with static shapes dynamo would compile
again for each new length until its recompile limit, then run eagerly. Block attention (``ds_dpo.forward.attention``)
runs between graphs: its loop follows each row's blocks. What still compiles a new graph: a size of 1 (a padded
batch of one row; a last chunk of one token), another set of keyword arguments (the output-head probe and the
self-check's plain forwards), no-grad passes and frozen parameters (the reference): all at setup or the first steps.
"""

from __future__ import annotations

import torch
from deepspeed.utils import set_z3_leaf_module
from transformers import GradientCheckpointingLayer

from ds_dpo.config import ConfigError
from ds_dpo.forward.router_loss import router_aux_loss
from ds_dpo.forward.scoring import unwrap_peft


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's decoder layers (and an encoder's or vision tower's): transformers builds each of them as a
    ``GradientCheckpointingLayer``, whatever the family."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def compile_layers(model: torch.nn.Module, router_aux_loss_coef: float | None = 0.0) -> int:
    """Compile every decoder layer of ``model`` in place and its chunked output head's per-chunk function; returns
    the number of layers. Compilation itself happens at each one's first call. ``router_aux_loss_coef``: the run's
    weight of a mixture-of-experts model's router loss (None: the model config's; the reference: 0)."""
    causal_lm = unwrap_peft(model)
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(
            f"`torch_compile`: {type(causal_lm).__name__} has no decoder layer that transformers marks as one "
            "(`GradientCheckpointingLayer`) to compile"
        )
    if router_aux_loss_coef is None:
        router_aux_loss_coef = getattr(causal_lm.config, "router_aux_loss_coef", 0.0)
    if router_aux_loss_coef and router_aux_loss(causal_lm) is not None:
        # the router loss reads router logits through forward hooks added for each forward that asks for it; dynamo
        # does not guard on a module's hooks, so a layer first compiled without them (the output-head probe, the
        # self-check, a reference pass) ignores them from then on and the loss silently vanishes (seen on Mixtral)
        raise ConfigError(
            f"`torch_compile` with {type(causal_lm).__name__}'s router load-balancing loss: compiled layers would "
            "drop it; set `router_aux_loss_coef: 0` to train without it, or `torch_compile: false`"
        )
    for layer in layers:
        if any(hasattr(p, "ds_id") for p in layer.parameters()):  # ZeRO-3: gathered whole, no hooks inside the graph
            set_z3_leaf_module(layer, True)
        layer.forward = torch.compile(layer.forward, dynamic=True)
    chunked = getattr(causal_lm, "ds_dpo_token_stats", None)
    if chunked is not None:
        chunked.compile_chunks()
    return len(layers)
