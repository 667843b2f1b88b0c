"""Sequence log-probs of completions from one concatenated forward of chosen and rejected sequences.

Per-token log-probs are reduced to per-sequence statistics by pure functions (``completion_logps``,
``wpo_logps``), so the same reduction serves the policy, the reference, and the tests that drive TRL with
identical per-token inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLogps:
    """Per-pair statistics of one micro-batch; every tensor is [B]."""

    chosen: torch.Tensor
    """Sum of log pi(token) over the chosen completion (LD-DPO-weighted with ``ld_alpha``)."""
    rejected: torch.Tensor
    chosen_logits: torch.Tensor
    """Sum over the chosen completion's tokens of the vocabulary-mean logit (for the ``logits/*`` metrics)."""
    rejected_logits: torch.Tensor
    chosen_tokens: torch.Tensor
    """Completion token counts."""
    rejected_tokens: torch.Tensor
    chosen_wpo: torch.Tensor | None = None
    """WPO: mean over the completion of log pi(y_t) - log sum_v pi(v)^2 (only with ``use_weighting``)."""
    rejected_wpo: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> "PairLogps":
        """The statistics of the pairs at ``index`` ([K] long)."""
        return PairLogps(*(None if t is None else t[index] for t in (
            self.chosen, self.rejected, self.chosen_logits, self.rejected_logits, self.chosen_tokens,
            self.rejected_tokens, self.chosen_wpo, self.rejected_wpo)))


def completion_logps(token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
    """Sum each sequence's completion-token log-probs.

    Args:
        token_logps: [2B, L] log-prob of each next token (chosen rows first, then rejected).
        mask: [2B, L] bool, True on completion tokens.
        ld_alpha: LD-DPO (Liu et al. 2024, https://arxiv.org/abs/2409.06411): tokens past the shorter completion of
            the pair count with weight ``ld_alpha``; ``logp = logp_shared + ld_alpha * logp_tail``.

    Returns:
        [2B] summed log-probs.
    """
    if ld_alpha is None:
        return (token_logps * mask).sum(-1)
    position = mask.cumsum(-1)  # 1-based position inside the completion, on completion tokens
    lengths = mask.sum(-1)
    chosen, rejected = lengths.chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2).unsqueeze(-1)
    in_shared = mask & (position <= shared)
    in_tail = mask & (position > shared)
    return (token_logps * in_shared).sum(-1) + ld_alpha * (token_logps * in_tail).sum(-1)


def wpo_logps(token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[2B] WPO's aligned mean log-prob, ``mean_t (log p(y_t) - log sum_v p(v)^2)`` over completion tokens, detached
    (Zhou et al. 2024, https://arxiv.org/abs/2406.11827, Eq. 2)."""
    aligned = ((token_logps - log_sum_sq_probs) * mask).sum(-1).detach()
    return aligned / mask.sum(-1).clamp(min=1)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                   ld_alpha: float | None = None, with_wpo: bool = False):
    """Masked sums over each sequence's completion tokens.

    Args:
        logits: [N, T, V] next-token logits (position t predicts token t + 1).
        input_ids: [N, T].
        completion_mask: [N, T] bool, True on the tokens to score.

    Returns:
        ``(logps, logit_means, tokens, wpo)``, each [N]: summed token log-probs (fp32), summed vocabulary-mean
        logits (detached), the number of scored tokens, and WPO's aligned mean log-prob (None unless ``with_wpo``).
    """
    logits = logits[:, :-1].float()
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:]
    token_logps = -F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # [N, T-1]
    logps = completion_logps(token_logps, mask, ld_alpha)
    logit_means = (logits.detach().mean(-1) * mask).sum(-1)
    wpo = None
    if with_wpo:
        with torch.no_grad():
            log_sum_sq = torch.logsumexp(2 * logits.log_softmax(-1), dim=-1)
        wpo = wpo_logps(token_logps, log_sum_sq, mask)
    return logps, logit_means, mask.sum(-1), wpo


def concatenated_forward(model, batch: dict[str, torch.Tensor], ld_alpha: float | None = None,
                         with_wpo: bool = False) -> PairLogps:
    """One forward over the [2B, T] batch (chosen rows first); ``model`` is an engine or a HF causal LM."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps, logit_means, tokens, wpo = sequence_logps(logits, batch["input_ids"], batch["completion_mask"], ld_alpha,
                                                     with_wpo)
    halves = [None if t is None else t.chunk(2) for t in (logps, logit_means, tokens, wpo)]
    (c, r), (cl, rl), (ct, rt) = halves[:3]
    cw, rw = halves[3] if wpo is not None else (None, None)
    return PairLogps(c, r, cl, rl, ct, rt, cw, rw)
