"""Sequence log-probs of completions from one forward over a micro-batch's chosen and rejected sequences.

A batch (``ds_dpo.layouts``) lists the M *scored tokens* of its completions: for each, the flat position in the
model's output whose hidden state predicts it (``score_index``), the token (``score_labels``), the sequence it
belongs to (``score_sequence``: chosen of pair i is i, rejected is B + i) and its 1-based rank in that completion
(``score_rank``). That one description serves every layout (padded, packed, prefix-shared), so the log-prob code
never looks at how sequences were laid out.

The vocabulary projection runs only on the M scored positions, in chunks of ``logps_chunk_size`` rows with each
chunk's [chunk, V] logits recomputed in backward (``ChunkedTokenStats``, on the model's own output-layer weight):
the [2B, T, V] logits tensor that is the memory peak of a plain DPO step never exists. ``logps_chunk_size=0`` takes the plain path instead: the model's
full logits, then the same per-token statistics.

Per-token statistics are reduced to per-sequence ones by pure functions (``completion_logps``, ``wpo_logps``), so
the same reduction serves the policy, the reference, and the tests that drive TRL with identical per-token inputs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from deepspeed.runtime.zero.partition_parameters import register_external_parameter
from torch.utils.checkpoint import checkpoint

from ds_dpo.layouts import model_inputs


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


class TokenStats(NamedTuple):
    """What the scoring forward returns for the M scored tokens; every tensor is [M] float32."""

    logps: torch.Tensor
    """log pi(token | prefix), differentiable."""
    logit_means: torch.Tensor
    """Vocabulary-mean logit at the predicting position (detached)."""
    log_sum_sq_probs: torch.Tensor | None
    """log sum_v pi(v)^2 at the predicting position (detached; only when asked for, for WPO)."""


def completion_logps(token_logps: torch.Tensor, sequence: torch.Tensor, rank: torch.Tensor, num_sequences: int,
                     ld_alpha: float | None = None) -> torch.Tensor:
    """Sum each sequence's completion-token log-probs.

    Args:
        token_logps: [M] log-prob of each scored token.
        sequence: [M] long, the sequence each token belongs to (chosen of pair i: i; rejected: B + i).
        rank: [M] long, 1-based position of the token among its sequence's scored tokens.
        num_sequences: 2B.
        ld_alpha: LD-DPO (Liu et al. 2024, https://arxiv.org/abs/2409.06411): tokens past the shorter completion of
            the pair count with weight ``ld_alpha``; ``logp = logp_shared + ld_alpha * logp_tail``.

    Returns:
        [2B] summed log-probs.
    """
    if ld_alpha is not None:
        lengths = torch.bincount(sequence, minlength=num_sequences)
        chosen, rejected = lengths.chunk(2)
        shared = torch.minimum(chosen, rejected).repeat(2)
        weight = torch.where(rank <= shared[sequence], 1.0, ld_alpha).to(token_logps.dtype)
        token_logps = token_logps * weight
    return token_logps.new_zeros(num_sequences).index_add(0, sequence, token_logps)


def wpo_logps(token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, sequence: torch.Tensor,
              num_sequences: int) -> torch.Tensor:
    """[2B] WPO's aligned mean log-prob, ``mean_t (log p(y_t) - log sum_v p(v)^2)`` over completion tokens, detached
    (Zhou et al. 2024, https://arxiv.org/abs/2406.11827, Eq. 2). Inputs as in ``completion_logps``."""
    aligned = (token_logps - log_sum_sq_probs).detach()
    sums = aligned.new_zeros(num_sequences).index_add(0, sequence, aligned)
    return sums / torch.bincount(sequence, minlength=num_sequences).clamp(min=1)


def token_stats(logits: torch.Tensor, labels: torch.Tensor, with_wpo: bool = False) -> TokenStats:
    """Per-token statistics from [M, V] logits (any dtype; computed in float32) and [M] labels."""
    logits = logits.float()
    log_norm = logits.logsumexp(-1)
    logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_norm
    detached = logits.detach()
    log_sum_sq = None
    if with_wpo:
        log_sum_sq = torch.logsumexp(2 * (detached - log_norm.detach().unsqueeze(-1)), dim=-1)
    return TokenStats(logps, detached.mean(-1), log_sum_sq)


def _linear_token_stats(hidden, weight, bias, labels, with_wpo):
    return token_stats(F.linear(hidden, weight, bias), labels, with_wpo)


class ChunkedTokenStats(torch.nn.Module):
    """``token_stats`` of an output layer's logits, ``chunk_size`` rows at a time: each chunk's [chunk, V] logits
    are freed once its statistics are taken and recomputed in backward.

    The module owns no parameters: it uses the model's output layer's (so tied embeddings stay tied and checkpoints
    are unchanged). Under ZeRO-3 that weight is registered as an external parameter of this module, so DeepSpeed
    gathers it once per call, in forward and again in backward, on every rank alike however many chunks each rank
    has (a gather per chunk would be a collective that ranks with different token counts issue different numbers
    of times).
    """

    def __init__(self, output_layer: torch.nn.Linear):
        super().__init__()
        object.__setattr__(self, "output_layer", output_layer)  # not a submodule: its weights stay the model's
        for param in output_layer.parameters():
            if hasattr(param, "ds_id"):  # a ZeRO-3 partitioned parameter
                register_external_parameter(self, param)

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int, with_wpo: bool = False):
        """``hidden`` [M, H] at the scored positions, ``labels`` [M] -> ``TokenStats``."""
        weight, bias = self.output_layer.weight, self.output_layer.bias
        chunks = []
        for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size)):
            if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
                chunks.append(checkpoint(_linear_token_stats, h, weight, bias, y, with_wpo, use_reentrant=False))
            else:
                chunks.append(_linear_token_stats(h, weight, bias, y, with_wpo))
        return TokenStats(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*chunks)))


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def enable_token_scoring(model: torch.nn.Module) -> torch.nn.Module:
    """Let ``model(..., score_index=..., score_labels=...)`` return ``TokenStats`` for the scored tokens instead of
    logits; without ``score_index`` the model behaves as before (generation, export, plain evaluation).

    The scoring branch lives in the causal LM's own ``forward`` (as Liger's fused losses do), so a DeepSpeed engine
    wrapping the model runs it inside ``engine.forward``: ZeRO-3 gathers each module's weights when it is called,
    backward hooks are registered on the outputs, and checkpoint keys stay the model's own. Works through peft,
    whose wrappers pass extra keyword arguments down to the causal LM.
    """
    causal_lm = _unwrap_peft(model)
    if getattr(causal_lm, "_ds_dpo_plain_forward", None) is not None:
        return model
    plain_forward = causal_lm.forward
    # Models that transform the output layer's logits in their forward (Gemma-2's soft-capping, Cohere's logit
    # scale) or whose output layer is not a plain Linear keep the full-logits path.
    config = causal_lm.config
    chunkable = (isinstance(causal_lm.get_output_embeddings(), torch.nn.Linear)
                 and getattr(config, "final_logit_softcapping", None) is None
                 and getattr(config, "logit_scale", 1.0) in (None, 1.0))

    @functools.wraps(plain_forward)
    def forward(*args, score_index=None, score_labels=None, logps_chunk_size=0, with_wpo=False, **kwargs):
        if score_index is None:
            return plain_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if logps_chunk_size <= 0 or not chunkable:
            logits = plain_forward(*args, **kwargs).logits
            return token_stats(logits.flatten(0, 1)[score_index], score_labels, with_wpo)
        hidden = causal_lm.base_model(*args, **kwargs).last_hidden_state
        return causal_lm.ds_dpo_token_stats(hidden.flatten(0, 1)[score_index], score_labels, logps_chunk_size,
                                            with_wpo)

    if chunkable:
        causal_lm.ds_dpo_token_stats = ChunkedTokenStats(causal_lm.get_output_embeddings())
    causal_lm._ds_dpo_plain_forward = plain_forward
    causal_lm.forward = forward
    return model


def concatenated_forward(model, batch: dict[str, torch.Tensor], ld_alpha: float | None = None,
                         with_wpo: bool = False, logps_chunk_size: int = 1024) -> PairLogps:
    """One forward over all sequences of a micro-batch (any layout from ``ds_dpo.layouts``).

    ``model`` is a DeepSpeed engine or a causal LM on which ``enable_token_scoring`` was called.
    """
    num_sequences = 2 * batch["weight"].shape[0]
    sequence, rank = batch["score_sequence"], batch["score_rank"]
    causal_lm = _unwrap_peft(getattr(model, "module", model))  # getattr: a DeepSpeed engine wraps the model
    inputs = model_inputs(batch, causal_lm.config._attn_implementation, causal_lm.dtype)
    stats = model(**inputs, score_index=batch["score_index"],
                  score_labels=batch["score_labels"], logps_chunk_size=logps_chunk_size, with_wpo=with_wpo)
    logps = completion_logps(stats.logps, sequence, rank, num_sequences, ld_alpha)
    logit_sums = stats.logit_means.new_zeros(num_sequences).index_add(0, sequence, stats.logit_means)
    tokens = torch.bincount(sequence, minlength=num_sequences)
    wpo = wpo_logps(stats.logps, stats.log_sum_sq_probs, sequence, num_sequences) if with_wpo else None
    (c, r), (cl, rl), (ct, rt) = logps.chunk(2), logit_sums.chunk(2), tokens.chunk(2)
    cw, rw = wpo.chunk(2) if wpo is not None else (None, None)
    return PairLogps(c, r, cl, rl, ct, rt, cw, rw)
