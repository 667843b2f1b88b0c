"""Sequence log-probs of completions from one concatenated forward of chosen and rejected sequences."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PairLogps:
    """Per-pair statistics of one micro-batch; every tensor is [B]."""

    chosen: torch.Tensor
    """Sum of log pi(token) over the chosen completion."""
    rejected: torch.Tensor
    chosen_logits: torch.Tensor
    """Sum over the chosen completion's tokens of the vocabulary-mean logit (for the ``logits/*`` metrics)."""
    rejected_logits: torch.Tensor
    chosen_tokens: torch.Tensor
    """Completion token counts."""
    rejected_tokens: torch.Tensor


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor):
    """Masked sums over each sequence's completion tokens.

    Args:
        logits: [N, T, V] next-token logits (position t predicts token t + 1).
        input_ids: [N, T].
        completion_mask: [N, T] bool, True on the tokens to score.

    Returns:
        ``(logps, logit_means, tokens)``, each [N]: summed token log-probs (fp32), summed vocabulary-mean logits
        (detached), and the number of scored tokens.
    """
    logits = logits[:, :-1]
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:]
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")  # [N, T-1]
    logps = (token_logps * mask).sum(-1)
    logit_means = (logits.detach().float().mean(-1) * mask).sum(-1)
    return logps, logit_means, mask.sum(-1)


def concatenated_forward(model, batch: dict[str, torch.Tensor]) -> PairLogps:
    """One forward over the [2B, T] batch (chosen rows first); ``model`` is an engine or a HF causal LM."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps, logit_means, tokens = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    b = logps.shape[0] // 2
    return PairLogps(logps[:b], logps[b:], logit_means[:b], logit_means[b:], tokens[:b], tokens[b:])
