"""Sequence log-probs of completions from one forward over a micro-batch's chosen and rejected sequences.

A batch (``ds_dpo.forward.layouts``) lists the M *scored tokens* of its completions: for each, the flat position in the
model's output whose hidden state predicts it (``score_index``), the token (``score_labels``), the sequence it
belongs to (``score_sequence``, one of the batch's U sequences) and its 1-based rank in that completion
(``score_rank``); ``chosen_sequence`` and ``rejected_sequence`` say which two sequences each pair compares (a response
that several pairs share is one sequence, scored once). That one description serves every layout (padded, packed,
prefix-shared), so the log-prob code never looks at how sequences were laid out.

The model scores its tokens itself (``ds_dpo.forward.scoring``); per-token statistics are reduced to per-pair ones by
pure functions (``completion_logps``, ``wpo_logps``), so the same reduction serves the policy, the reference, and the
tests that drive TRL with identical per-token inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from ds_dpo.forward import sequence_parallel
from ds_dpo.forward.layouts import Layout
from ds_dpo.forward.scoring import unwrap_peft
from ds_dpo.forward.sequence_parallel import SequenceParallel

CHUNK_LOGITS_BYTES = 256 * 2**20
"""``logps_chunk_size: auto`` keeps one chunk's fp32 logits within this (and as much again for their gradient)."""


def chunk_size(configured: int | str, model_config) -> int:
    """Rows per chunk of the vocabulary projection: ``configured``, or for ``auto`` the largest power of two from 128
    to 1024 whose fp32 logits over the vocabulary of ``model_config`` (its text model's; None or no ``vocab_size``:
    1024) fit in ``CHUNK_LOGITS_BYTES`` (1024 up to a 64k vocabulary, 256 for Gemma's 262k: there 1024 rows would be
    1 GiB of logits, the step's peak on a small model)."""
    if configured != "auto":
        return int(configured)
    vocab = None if model_config is None else getattr(model_config.get_text_config(), "vocab_size", None)
    rows = 1024
    while rows > 128 and vocab and rows * vocab * 4 > CHUNK_LOGITS_BYTES:
        rows //= 2
    return rows


@dataclass(frozen=True)
class Scoring:
    """How a run's micro-batches are scored, decided once (``RunPlan.scoring``) and handed to every forward."""

    layout: Layout
    logps_chunk_size: int
    """Rows per chunk of the vocabulary projection; 0: the model's full logits."""
    ld_alpha: float | None = None
    """LD-DPO's weight of tokens past the shorter completion (``completion_logps``)."""
    sp: SequenceParallel | None = None
    """This rank's sequence-parallel group: each rank runs its slice of the rows."""


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
    aux_loss: torch.Tensor | None = None
    """Scalar router load-balancing loss of the whole micro-batch (mixture-of-experts models, when asked for)."""
    entropy: torch.Tensor | None = None
    """Sum over both completions' tokens of the policy's entropy at the predicting position (TRL's ``entropy``)."""
    chosen_top1: torch.Tensor | None = None
    """Chosen tokens that are the policy's most likely next token (TRL's ``mean_token_accuracy``)."""

    def select(self, index: torch.Tensor) -> PairLogps:
        """The statistics of the pairs at ``index`` ([K] long); ``aux_loss`` stays the micro-batch's."""
        return replace(
            self,
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                for f in fields(self)
                if f.name != "aux_loss"
            },
        )


def completion_logps(
    token_logps: torch.Tensor,
    sequence: torch.Tensor,
    rank: torch.Tensor,
    pairs: torch.Tensor,
    lengths: torch.Tensor,
    ld_alpha: float | None = None,
) -> torch.Tensor:
    """The summed completion-token log-probs of each pair's chosen and rejected sequence.

    Args:
        token_logps: [M] log-prob of each scored token.
        sequence: [M] long, the sequence each token belongs to (one of U).
        rank: [M] long, 1-based position of the token among its sequence's scored tokens.
        pairs: [2B] long, the sequences the B pairs compare: every chosen, then every rejected.
        lengths: [U] completion lengths (of the whole completion, also when the M tokens are only a
            sequence-parallel shard's).
        ld_alpha: LD-DPO (Liu et al. 2024, https://arxiv.org/abs/2409.06411): tokens past the shorter completion of
            the pair count with weight ``ld_alpha``; ``logp = logp_shared + ld_alpha * logp_tail``.

    Returns:
        [2B] summed log-probs, chosen first.
    """
    if ld_alpha is None:
        return token_logps.new_zeros(lengths.shape[0]).index_add(0, sequence, token_logps)[pairs]
    chosen, rejected = lengths[pairs].chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2)
    # a shared response's weighting depends on the pair (on its partner's length): one row of weights per pair side
    weight = torch.where(rank <= shared[:, None], 1.0, ld_alpha) * (sequence == pairs[:, None])
    return weight.to(token_logps.dtype) @ token_logps


def wpo_logps(
    token_logps: torch.Tensor,
    log_sum_sq_probs: torch.Tensor,
    sequence: torch.Tensor,
    num_sequences: int,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """[2B] WPO's aligned mean log-prob, ``mean_t (log p(y_t) - log sum_v p(v)^2)`` over completion tokens, detached
    (Zhou et al. 2024, https://arxiv.org/abs/2406.11827, Eq. 2). Inputs as in ``completion_logps`` (with a shard's
    tokens and the whole ``lengths``: that shard's part of the mean)."""
    aligned = (token_logps - log_sum_sq_probs).detach()
    sums = aligned.new_zeros(num_sequences).index_add(0, sequence, aligned)
    if lengths is None:
        lengths = torch.bincount(sequence, minlength=num_sequences)
    return sums / lengths.clamp(min=1)


def concatenated_forward(
    model, batch: dict[str, torch.Tensor], scoring: Scoring, with_wpo: bool = False, router_aux_loss: bool = False
) -> PairLogps:
    """One forward over all sequences of a micro-batch laid out in ``scoring.layout``.

    ``model`` is a DeepSpeed engine or a causal LM on which ``install_token_scoring`` was called.
    ``router_aux_loss``: also return a mixture-of-experts model's router load-balancing loss (None for other models).

    Under sequence parallelism (``scoring.sp``, ``ds_dpo.forward.sequence_parallel``) each rank of the group runs its
    slice of the rows and scores the tokens predicted there; the per-sequence sums are added over the group, so every
    rank returns the same statistics of the whole micro-batch.
    """
    tokens = batch["sequence_tokens"]
    num_sequences = tokens.shape[0]
    pairs = torch.cat([batch["chosen_sequence"], batch["rejected_sequence"]])
    causal_lm = unwrap_peft(getattr(model, "module", model))  # getattr: a DeepSpeed engine wraps the model
    sp, layout = scoring.sp, scoring.layout
    if sp is None:
        inputs, scored = layout.model_inputs(batch, causal_lm.config, causal_lm.dtype), batch
    else:
        inputs, scored = sequence_parallel.shard(batch, layout, causal_lm.config, causal_lm.dtype, sp)
    sequence, rank = scored["score_sequence"], scored["score_rank"]
    stats = model(
        **inputs,
        score_index=scored["score_index"],
        score_labels=scored["score_labels"],
        logps_chunk_size=scoring.logps_chunk_size,
        with_wpo=with_wpo,
        router_aux_loss=router_aux_loss,
    )
    logps = completion_logps(stats.logps, sequence, rank, pairs, tokens, scoring.ld_alpha)

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(num_sequences).index_add(0, sequence, values)

    # detached per-sequence sums: logit means, entropy, top-1 hits (+ WPO's aligned means)
    detached = torch.stack(
        [
            per_sequence(stats.logit_means),
            per_sequence(stats.entropy),
            per_sequence(stats.top1),
            *([wpo_logps(stats.logps, stats.log_sum_sq_probs, sequence, num_sequences, tokens)] if with_wpo else []),
        ]
    )
    if sp is not None:
        logps = sequence_parallel.sum_over_group(logps, sp)
        torch.distributed.all_reduce(detached, group=sp.group)
    detached = detached[:, pairs]
    (c, r), (cl, rl), (ct, rt) = logps.chunk(2), detached[0].chunk(2), tokens[pairs].chunk(2)
    cw, rw = detached[3].chunk(2) if with_wpo else (None, None)
    entropy, top1 = detached[1].view(2, -1).sum(0), detached[2].chunk(2)[0]
    return PairLogps(c, r, cl, rl, ct, rt, cw, rw, stats.aux_loss, entropy=entropy, chosen_top1=top1)
