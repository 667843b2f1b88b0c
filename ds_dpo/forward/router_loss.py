"""A mixture-of-experts model's router load-balancing loss, computed the way its own ``forward`` does.

Models in transformers record their routers' logits (``_can_record_outputs``) and compute the loss in their causal
LM's ``forward`` with their module's ``load_balancing_loss_func``; here hooks record the router logits of every layer,
so that the loss works in every layout (the model's own call cannot take a packed row's 4D mask).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch


def router_modules(model: torch.nn.Module) -> tuple[list[torch.nn.Module], int]:
    """A mixture-of-experts model's routers (the modules whose output transformers records as ``router_logits``)
    and which element of their output the logits are; ``([], 0)`` for other models."""
    recorder = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    target = getattr(recorder, "target_class", None)
    if target is None:
        return [], 0
    return [m for m in model.modules() if isinstance(m, target)], recorder.index


@dataclass(frozen=True)
class RouterAuxLoss:
    """A mixture-of-experts model's own router load-balancing loss, computed from its routers' logits.

    Models in transformers record their routers' logits (``_can_record_outputs``) and compute the loss in their
    causal LM's ``forward`` with their module's ``load_balancing_loss_func``; ``router_aux_loss`` finds both."""

    routers: list[torch.nn.Module]
    index: int
    """Which element of a router's output is its logits."""
    loss_func: Callable
    num_experts: int
    top_k: int

    @contextlib.contextmanager
    def recording(self):
        """Collect the routers' logits of every call while the context is open."""
        logits: list[torch.Tensor] = []

        def record(_module, _inputs, output):
            logits.append(output[self.index] if isinstance(output, tuple) else output)

        hooks = [router.register_forward_hook(record) for router in self.routers]
        try:
            yield logits
        finally:
            for hook in hooks:
                hook.remove()

    def __call__(self, router_logits: list[torch.Tensor], padding_mask: torch.Tensor | None) -> torch.Tensor:
        return self.loss_func(tuple(router_logits), self.num_experts, self.top_k, padding_mask)


def router_aux_loss(causal_lm: torch.nn.Module) -> RouterAuxLoss | None:
    """The model's ``RouterAuxLoss``, or None for a model without one."""
    routers, index = router_modules(causal_lm)
    loss_func = getattr(sys.modules[type(causal_lm).__module__], "load_balancing_loss_func", None)
    experts, top_k = getattr(causal_lm, "num_experts", None), getattr(causal_lm, "num_experts_per_tok", None)
    if not routers or loss_func is None or not experts or not top_k:
        return None
    return RouterAuxLoss(routers, index, loss_func, experts, top_k)
