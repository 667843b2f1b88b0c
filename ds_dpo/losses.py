"""Preference losses: pure functions of sequence log-probs, registered by name.

Every loss takes the policy's and the reference's summed completion log-probs for each pair and returns the
per-pair loss; nothing here knows about models, batches or engines. Adding a variant is one registered function:

    @register("my_loss")
    def my_loss(inputs: LossInputs, options: LossOptions) -> torch.Tensor:  # [B]
        ...

``preference_loss`` is the public entry point used by the training loop and by users' own code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossInputs:
    """Log-probs of one batch of pairs; every tensor is [B]."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor

    @property
    def logits(self) -> torch.Tensor:
        """The DPO log-ratio difference h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))."""
        return (self.chosen_logps - self.ref_chosen_logps) - (self.rejected_logps - self.ref_rejected_logps)


@dataclass(frozen=True)
class LossOptions:
    beta: float = 0.1
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class PreferenceLossOutput:
    loss: torch.Tensor
    """Scalar: mean over pairs of ``losses``."""
    losses: torch.Tensor
    """[B] per-pair loss."""
    chosen_rewards: torch.Tensor
    """[B] ``beta * (chosen_logps - ref_chosen_logps)``, detached (as TRL logs it)."""
    rejected_rewards: torch.Tensor
    """[B] ``beta * (rejected_logps - ref_rejected_logps)``, detached."""


LossFn = Callable[[LossInputs, LossOptions], torch.Tensor]
_REGISTRY: dict[str, LossFn] = {}


def register(name: str) -> Callable[[LossFn], LossFn]:
    def add(fn: LossFn) -> LossFn:
        if name in _REGISTRY:
            raise ValueError(f"loss type {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


@register("sigmoid")
def sigmoid_loss(inputs: LossInputs, options: LossOptions) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290), with cDPO label smoothing
    (Mitchell 2023, https://ericmitchell.ai/cdpo.pdf).

    With h the log-ratio difference (``LossInputs.logits``) and eps = ``label_smoothing``:

        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    eps = 0 is plain DPO: the Bradley-Terry negative log-likelihood of the implicit reward
    r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) preferring y_w over y_l.
    """
    z = options.beta * inputs.logits
    eps = options.label_smoothing
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


LOSS_TYPES: tuple[str, ...] = tuple(_REGISTRY)


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLossOutput:
    """Compute a registered preference loss from [B] summed completion log-probs (policy and reference)."""
    if loss_type not in _REGISTRY:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {sorted(_REGISTRY)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    inputs = LossInputs(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = _REGISTRY[loss_type](inputs, LossOptions(beta=beta, label_smoothing=label_smoothing))
    return PreferenceLossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=(beta * (chosen_logps - ref_chosen_logps)).detach(),
        rejected_rewards=(beta * (rejected_logps - ref_rejected_logps)).detach(),
    )
