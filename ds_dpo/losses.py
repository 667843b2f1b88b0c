"""Preference losses: pure functions of sequence log-probs, registered by name.

Every loss maps the log-probs of a batch of B pairs to B per-pair losses; nothing here knows about models, batches
or engines. The reference-based variants follow TRL 1.16's ``DPOTrainer`` exactly (the tests prove it, values and
gradients); ``simpo``, ``orpo``, ``cpo`` and ``ipo_sum`` follow their papers / OpenRLHF. Adding a variant is one
registered function and one test:

    @register("my_loss", needs_reference=True)
    def my_loss(x: LossInputs, o: LossConfig) -> torch.Tensor:  # [B]
        return -F.logsigmoid(o.beta * x.delta_scores(o))

Public entry point (used by the training loop and by users' own code):

    from ds_dpo.losses import LossConfig, LossInputs, preference_loss, LOSS_TYPES
    out = preference_loss(LossInputs(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                     chosen_lengths, rejected_lengths), LossConfig(loss_type="sigmoid", beta=0.1))
    out.loss, out.losses, out.chosen_rewards, out.rejected_rewards

Notation in the docstrings: for a pair (x, y_w, y_l), log-ratios ``r_w = log pi(y_w|x) - log pi_ref(y_w|x)`` and
``r_l`` likewise; ``h = s(r_w) - s(r_l)`` where ``s`` is the f-divergence score (identity for the default
``reverse_kl``); ``|y|`` is a completion's token count; ``eps`` is ``label_smoothing``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

FDivergence = Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCES: tuple[str, ...] = get_args(FDivergence)


@dataclass
class LossConfig:
    """The preference objective: which loss (or weighted mixture) and its options, under TRL's key names. It is
    the ``loss`` section of the run config, and every loss function receives it."""

    loss_type: str | list[str] = "sigmoid"
    """A name from ``LOSS_TYPES``, or a list of names for a weighted mixture (see docs/losses.md)."""
    loss_weights: list[float] | None = None
    """One weight per ``loss_type`` entry (default 1 each)."""
    beta: float = 0.1
    """Temperature of the implicit reward ``beta * log(pi / pi_ref)`` (IPO's tau, ORPO's lambda)."""
    label_smoothing: float = 0.0
    """Label-noise probability in [0, 0.5): cDPO for sigmoid, Robust DPO, EXO's epsilon, AOT, SimPO/CPO."""
    f_divergence_type: FDivergence = "reverse_kl"
    """f-DPO divergence: ``reverse_kl``, ``forward_kl``, ``js_divergence``, ``alpha_divergence``."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of ``alpha_divergence``."""
    discopop_tau: float = 0.05
    """Temperature of DiscoPOP's log-ratio modulation."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma."""
    cpo_alpha: float = 1.0
    """Weight of CPO's behaviour-cloning NLL term."""
    reference_free: bool = False
    """Take the reference log-ratio as 0 for every loss type; no reference model is built."""
    use_weighting: bool = False
    """WPO: weight each pair by the policy's length-normalised probability of both completions."""
    ld_alpha: float | None = None
    """LD-DPO: weight of completion tokens past the shorter completion of a pair, for policy and reference alike
    (applied where sequence log-probs are summed, ``ds_dpo.forward.logprobs``)."""

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def needs_reference(self) -> bool:
        """Whether any configured loss reads reference log-probs (else no reference is built or run)."""
        return not self.reference_free and any(_REGISTRY[n].needs_reference for n in self.loss_types if n in _REGISTRY)

    def problems(self) -> list[str]:
        """Every invalid option or combination of options, as messages naming the keys."""
        names = self.loss_types
        if not names:
            return ["`loss_type` must name at least one loss"]
        unknown = [n for n in names if n not in _REGISTRY]
        if unknown:
            return [f"unknown `loss_type` {n!r}; known: {sorted(_REGISTRY)}" for n in unknown]
        no_f_divergence = [n for n in names if not _REGISTRY[n].f_divergence]
        checks = [
            (
                self.loss_weights is None or len(self.loss_weights) == len(names),
                f"loss_weights has {len(self.loss_weights or [])} entries but loss_type has {len(names)}: {names}",
            ),
            (self.beta > 0, f"`beta` must be > 0 (got {self.beta})"),
            (0.0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}"),
            (
                "exo_pair" not in names or self.label_smoothing > 0,
                "exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)",
            ),
            ("discopop" not in names or self.discopop_tau > 0, f"discopop_tau must be > 0, got {self.discopop_tau}"),
            (
                self.f_divergence_type in F_DIVERGENCES,
                f"f_divergence_type must be one of {F_DIVERGENCES}, got {self.f_divergence_type!r}",
            ),
            (
                self.f_divergence_type == "reverse_kl" or not no_f_divergence,
                f"f_divergence_type={self.f_divergence_type!r} is not defined for {no_f_divergence}; it applies to "
                f"{sorted(n for n, s in _REGISTRY.items() if s.f_divergence)}",
            ),
            (
                not self.use_weighting or not {"aot", "aot_unpaired"} & set(names),
                "use_weighting (WPO) cannot be combined with aot/aot_unpaired: they sort the pairs",
            ),
            (self.ld_alpha is None or 0.0 <= self.ld_alpha <= 1.0, "`ld_alpha` must be in [0, 1] or unset"),
        ]
        return [message for ok, message in checks if not ok]


@dataclass(frozen=True)
class LossInputs:
    """Log-probs of B pairs; every tensor is [B]. ``preference_loss`` takes absent reference log-probs as zeros
    (reference-free losses, ``reference_free``)."""

    chosen_logps: torch.Tensor
    """Policy log-prob sums over each chosen completion's tokens."""
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None = None
    """The reference's; None where no reference is used."""
    ref_rejected_logps: torch.Tensor | None = None
    chosen_lengths: torch.Tensor | None = None
    """Completion token counts (read by ``ipo``, ``sigmoid_norm``, ``sft``, ``simpo``, ``orpo``, ``cpo``)."""
    rejected_lengths: torch.Tensor | None = None
    chosen_wpo_logps: torch.Tensor | None = None
    """WPO (``use_weighting``): mean over the completion of ``log pi(y_t) - log sum_v pi(v)^2`` (``logprobs``)."""
    rejected_wpo_logps: torch.Tensor | None = None

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen_logps - self.ref_chosen_logps

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected_logps - self.ref_rejected_logps

    def scores(self, o: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """f-DPO scores s(r) = f'(pi/pi_ref) (Wang et al. 2023, https://arxiv.org/abs/2309.16240)."""
        return _f_score(self.chosen_logratios, o), _f_score(self.rejected_logratios, o)

    def delta_scores(self, o: LossConfig) -> torch.Tensor:
        """h = s(r_w) - s(r_l); with reverse KL, the DPO logit r_w - r_l."""
        chosen, rejected = self.scores(o)
        return chosen - rejected

    def lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen_lengths.clamp(min=1.0), self.rejected_lengths.clamp(min=1.0)

    def chosen_nll(self) -> torch.Tensor:
        """[B]: the batch's token-level mean NLL of the chosen completions, sum(-log pi(y_w)) / sum(|y_w|), as TRL's
        ``sft`` term computes it, repeated per pair (so that the mean over pairs is that value)."""
        nll = -self.chosen_logps.sum() / self.chosen_lengths.sum().clamp(min=1.0)
        return nll.expand_as(self.chosen_logps)


def _f_score(logratio: torch.Tensor, o: LossConfig) -> torch.Tensor:
    if o.f_divergence_type == "reverse_kl":
        return logratio
    if o.f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratio)
    if o.f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratio)
    alpha = o.f_alpha_divergence_coef  # alpha_divergence: f'(t) = (t^(alpha - 1) - 1) / (alpha - 1)
    if abs(alpha - 1.0) < 1e-6:
        return logratio  # the alpha -> 1 limit is reverse KL
    t = torch.clamp(((alpha - 1.0) * logratio).float(), max=11.0 if logratio.dtype == torch.float16 else 80.0)
    return (torch.exp(t) - 1.0).to(logratio.dtype) / (alpha - 1.0)


def _smoothed_logistic(z: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


LossFn = Callable[[LossInputs, LossConfig], torch.Tensor]


@dataclass(frozen=True)
class LossSpec:
    fn: LossFn
    needs_reference: bool
    """False: computed from the policy alone; no reference model is built when every configured type says so."""
    needs_lengths: bool
    """Uses completion token counts (length normalisation or a token-level NLL)."""
    f_divergence: bool
    """Accepts an ``f_divergence_type`` other than reverse KL (TRL's rule: where log Z(x) cancels)."""


_REGISTRY: dict[str, LossSpec] = {}


def register(
    name: str, needs_reference: bool = True, needs_lengths: bool = False, f_divergence: bool = False
) -> Callable[[LossFn], LossFn]:
    def add(fn: LossFn) -> LossFn:
        if name in _REGISTRY:
            raise ValueError(f"loss type {name!r} is already registered")
        _REGISTRY[name] = LossSpec(fn, needs_reference, needs_lengths, f_divergence)
        return fn

    return add


# --- reference-based losses (TRL 1.16 DPOTrainer semantics) -----------------------------------------------------------


@register("sigmoid", f_divergence=True)
def sigmoid(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290): ``-log sigmoid(beta h)``.

    With ``label_smoothing`` eps > 0 this is conservative DPO (cDPO, Mitchell 2023, https://ericmitchell.ai/cdpo.pdf):
    ``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``, as in OpenRLHF and TRL before 1.0 (TRL 1.16's
    sigmoid ignores ``label_smoothing``; it is identical to this at eps = 0).
    """
    return _smoothed_logistic(o.beta * x.delta_scores(o), o.label_smoothing)


@register("hinge", f_divergence=True)
def hinge(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023, https://arxiv.org/abs/2305.10425): ``max(0, 1 - beta h)``."""
    return torch.relu(1 - o.beta * x.delta_scores(o))


@register("ipo", needs_lengths=True, f_divergence=True)
def ipo(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17) on length-normalised scores, as TRL:
    ``(s(r_w)/|y_w| - s(r_l)/|y_l| - 1/(2 beta))^2``; beta is the paper's tau."""
    (chosen, rejected), (lc, lr) = x.scores(o), x.lengths()
    return (chosen / lc - rejected / lr - 1 / (2 * o.beta)) ** 2


@register("exo_pair", f_divergence=True)
def exo_pair(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """EXO (Ji et al. 2024, https://arxiv.org/abs/2402.00856, Eq. 16) for K = 2: KL(q || p) with
    ``q = (sigmoid(beta h), sigmoid(-beta h))`` and ``p = (1 - eps, eps)``; needs eps > 0 (paper: 1e-3)."""
    z = o.beta * x.delta_scores(o)
    eps = torch.tensor(o.label_smoothing, dtype=z.dtype, device=z.device)
    return torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - torch.log(eps)
    )


@register("nca_pair")
def nca_pair(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """NCA (Chen et al. 2024, https://arxiv.org/abs/2402.05369):
    ``-log sigmoid(beta r_w) - 1/2 log sigmoid(-beta r_w) - 1/2 log sigmoid(-beta r_l)``."""
    cw, cl = o.beta * x.chosen_logratios, o.beta * x.rejected_logratios
    return -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)


@register("robust", f_divergence=True)
def robust(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409), eps = probability of a flipped label:
    ``(-(1 - eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)``."""
    z, eps = o.beta * x.delta_scores(o), o.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


@register("bco_pair")
def bco_pair(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, https://arxiv.org/abs/2404.04656), without the reward shift, as TRL:
    ``-log sigmoid(beta r_w) - log sigmoid(-beta r_l)``."""
    return -F.logsigmoid(o.beta * x.chosen_logratios) - F.logsigmoid(-o.beta * x.rejected_logratios)


@register("sppo_hard")
def sppo_hard(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, https://arxiv.org/abs/2405.00675, Eq. 4.7 with P in {0, 1}):
    ``(r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2``."""
    return (x.chosen_logratios - 0.5 / o.beta) ** 2 + (x.rejected_logratios + 0.5 / o.beta) ** 2


@register("aot")
def aot(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882): the batch's policy log-ratio margins
    ``log pi(y_w) - log pi(y_l)`` and reference margins are each sorted, and the smoothed logistic loss is applied to
    their difference. Couples the pairs of a batch."""
    policy, _ = torch.sort(x.chosen_logps - x.rejected_logps, dim=0)
    ref, _ = torch.sort(x.ref_chosen_logps - x.ref_rejected_logps, dim=0)
    return _smoothed_logistic(o.beta * (policy - ref), o.label_smoothing)


@register("aot_unpaired")
def aot_unpaired(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): ``r_w`` and ``r_l`` are sorted separately over the batch, then the smoothed
    logistic loss is applied to the sorted differences."""
    chosen, _ = torch.sort(x.chosen_logratios, dim=0)
    rejected, _ = torch.sort(x.rejected_logratios, dim=0)
    return _smoothed_logistic(o.beta * (chosen - rejected), o.label_smoothing)


@register("apo_zero")
def apo_zero(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, Eq. 7), for chosen outputs better than
    the model's own: ``1 - sigmoid(beta r_w) + sigmoid(beta r_l)``."""
    return 1 - torch.sigmoid(o.beta * x.chosen_logratios) + torch.sigmoid(o.beta * x.rejected_logratios)


@register("apo_down")
def apo_down(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """APO-down (same paper, Eq. 8), for chosen outputs worse than the model's own:
    ``sigmoid(beta r_w) + 1 - sigmoid(beta (r_w - r_l))``."""
    cw = x.chosen_logratios
    return torch.sigmoid(o.beta * cw) + 1 - torch.sigmoid(o.beta * (cw - x.rejected_logratios))


@register("discopop", f_divergence=True)
def discopop(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, https://arxiv.org/abs/2406.08414, Eq. 5), with
    z = beta h and m = sigmoid(z / tau): ``(1 - m) (-log sigmoid(z)) + m exp(-z)``; tau = ``discopop_tau``."""
    z = o.beta * x.delta_scores(o)
    m = torch.sigmoid(z / o.discopop_tau)
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m


@register("sigmoid_norm", needs_lengths=True, f_divergence=True)
def sigmoid_norm(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """DPO on length-normalised scores, as TRL: ``-log sigmoid(beta (s(r_w)/|y_w| - s(r_l)/|y_l|))``."""
    (chosen, rejected), (lc, lr) = x.scores(o), x.lengths()
    return -F.logsigmoid(o.beta * (chosen / lc - rejected / lr))


@register("ipo_sum")
def ipo_sum(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """IPO on summed log-probs, as OpenRLHF: ``(r_w - r_l - 1/(2 beta))^2``."""
    return (x.chosen_logratios - x.rejected_logratios - 1 / (2 * o.beta)) ** 2


# --- losses without a reference model ---------------------------------------------------------------------------------


@register("sft", needs_reference=False, needs_lengths=True, f_divergence=True)
def sft(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """Supervised NLL of the chosen completions: ``sum(-log pi(y_w)) / sum(|y_w|)`` over the batch, as TRL's ``sft``
    (combine with ``sigmoid`` for RPO, Pang et al. 2024, https://arxiv.org/abs/2404.19733). Couples the pairs."""
    return x.chosen_nll()


@register("simpo", needs_reference=False, needs_lengths=True)
def simpo(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, Eq. 6), reference-free and length-normalised:
    ``-log sigmoid(beta log pi(y_w)/|y_w| - beta log pi(y_l)/|y_l| - gamma)`` with gamma = ``simpo_gamma``
    (label smoothing as in TRL's CPOTrainer)."""
    lc, lr = x.lengths()
    z = o.beta * (x.chosen_logps / lc - x.rejected_logps / lr) - o.simpo_gamma
    return _smoothed_logistic(z, o.label_smoothing)


@register("orpo", needs_reference=False, needs_lengths=True)
def orpo(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691, Eqs. 6-7): ``L_SFT - beta log sigmoid(log odds(y_w) -
    log odds(y_l))`` with ``odds(y) = P / (1 - P)``, ``P = exp(log pi(y)/|y|)``; beta is the paper's lambda and
    ``L_SFT`` the batch's token-level chosen NLL (as TRL's ORPOTrainer)."""
    lc, lr = x.lengths()
    chosen, rejected = x.chosen_logps / lc, x.rejected_logps / lr
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    return x.chosen_nll() - o.beta * F.logsigmoid(log_odds)


@register("cpo", needs_reference=False, needs_lengths=True)
def cpo(x: LossInputs, o: LossConfig) -> torch.Tensor:
    """CPO (Xu et al. 2024, https://arxiv.org/abs/2401.08417, Eq. 7): reference-free DPO plus a behaviour-cloning NLL,
    ``-log sigmoid(beta (log pi(y_w) - log pi(y_l))) + alpha L_NLL`` with alpha = ``cpo_alpha`` (label smoothing as in
    TRL's CPOTrainer)."""
    z = o.beta * (x.chosen_logps - x.rejected_logps)
    return _smoothed_logistic(z, o.label_smoothing) + o.cpo_alpha * x.chosen_nll()


LOSS_TYPES: tuple[str, ...] = tuple(_REGISTRY)


@dataclass(frozen=True)
class PreferenceLossOutput:
    loss: torch.Tensor
    """Scalar: ``sum_k w_k * mean over pairs of loss_k`` (TRL's combination rule)."""
    losses: torch.Tensor
    """[B] per-pair loss, ``sum_k w_k * loss_k``; its mean is ``loss``."""
    chosen_rewards: torch.Tensor
    """[B] ``beta * (chosen_logps - ref_chosen_logps)``, detached; the reference term is 0 without a reference."""
    rejected_rewards: torch.Tensor
    """[B] likewise for the rejected completions."""


def preference_loss(inputs: LossInputs, config: LossConfig) -> PreferenceLossOutput:
    """One registered preference loss, or a weighted mixture of several (MPO-style; RPO = ``["sigmoid", "sft"]``),
    for B pairs. With ``use_weighting`` (WPO, Zhou et al. 2024, https://arxiv.org/abs/2406.11827, Eq. 2) each pair's
    loss is scaled by ``exp(chosen_wpo_logps) * exp(rejected_wpo_logps)`` (detached). ``config`` is taken as valid
    (``config.problems()`` empty: a run validates it once at startup); raises ValueError on missing inputs."""
    names = config.loss_types
    weights = list(config.loss_weights) if config.loss_weights is not None else [1.0] * len(names)
    specs = [_REGISTRY[n] for n in names]
    x = inputs
    without_reference = x.ref_chosen_logps is None or x.ref_rejected_logps is None
    if config.needs_reference and without_reference:
        raise ValueError(
            f"{names} need reference log-probs: pass ref_chosen_logps/ref_rejected_logps (or set reference_free)"
        )
    if any(s.needs_lengths for s in specs) and (x.chosen_lengths is None or x.rejected_lengths is None):
        raise ValueError(
            f"{[n for n, s in zip(names, specs) if s.needs_lengths]} need chosen_lengths and "
            "rejected_lengths (completion token counts)"
        )
    if config.use_weighting and (x.chosen_wpo_logps is None or x.rejected_wpo_logps is None):
        raise ValueError("use_weighting needs chosen_wpo_logps and rejected_wpo_logps")
    dtype = x.chosen_logps.dtype
    x = dataclasses.replace(
        x,
        chosen_lengths=None if x.chosen_lengths is None else x.chosen_lengths.to(dtype),
        rejected_lengths=None if x.rejected_lengths is None else x.rejected_lengths.to(dtype),
    )
    if config.reference_free or without_reference:
        x = dataclasses.replace(
            x, ref_chosen_logps=torch.zeros_like(x.chosen_logps), ref_rejected_logps=torch.zeros_like(x.rejected_logps)
        )
    pair_weight = None
    if config.use_weighting:
        pair_weight = (torch.exp(x.chosen_wpo_logps) * torch.exp(x.rejected_wpo_logps)).detach().to(dtype)
    losses = 0.0
    for spec, w in zip(specs, weights):
        per_pair = spec.fn(x, config)
        losses = losses + w * (per_pair if pair_weight is None else per_pair * pair_weight)
    return PreferenceLossOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=(config.beta * x.chosen_logratios).detach(),
        rejected_rewards=(config.beta * x.rejected_logratios).detach(),
    )
