"""Sequence log-probs of completions from one forward over a micro-batch's chosen and rejected sequences.

A batch (``ds_dpo.layouts``) lists the M *scored tokens* of its completions: for each, the flat position in the
model's output whose hidden state predicts it (``score_index``), the token (``score_labels``), the sequence it
belongs to (``score_sequence``, one of the batch's U sequences) and its 1-based rank in that completion
(``score_rank``); ``chosen_sequence`` and ``rejected_sequence`` say which two sequences each pair compares (a response
that several pairs share is one sequence, scored once). That one description serves every layout (padded, packed,
prefix-shared), so the log-prob code never looks at how sequences were laid out.

The vocabulary projection runs only on the M scored positions, in chunks of ``logps_chunk_size`` rows with each
chunk's [chunk, V] logits recomputed in backward (``ChunkedTokenStats``, on the model's own output-layer weight):
the [2B, T, V] logits tensor that is the memory peak of a plain DPO step never exists. ``logps_chunk_size=0`` takes the plain path instead: the model's
full logits, then the same per-token statistics.

The chunked path needs the model's logits to be its output layer applied to the base model's last hidden state.
Some families transform those logits in their ``forward`` (Granite divides by ``logits_scaling``, Cohere multiplies
by ``logit_scale``, Falcon-H1 by ``lm_head_multiplier``, Gemma-2/3 soft-cap them); rather than keeping a list of such
config keys, the first scoring call probes the model (``probe_output_head``): it compares the model's own logits on
a few fixed tokens with the output layer applied to the base model's hidden states and fits a scale (after undoing
``final_logit_softcapping`` where the config has one). What fits is applied in the chunked path; a model whose logits
are anything else is scored from its full logits, with a notice.

Mixture-of-experts models add their router load-balancing loss (``TokenStats.aux_loss``) the way their own
``forward`` does, with the model's ``load_balancing_loss_func`` on the router logits of every layer, recorded by hooks
so that it works in every layout (the model's own call cannot take a packed row's 4D mask).

Per-token statistics are reduced to per-pair ones by pure functions (``completion_logps``, ``wpo_logps``), so the
same reduction serves the policy, the reference, and the tests that drive TRL with identical per-token inputs.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from dataclasses import dataclass, fields, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from deepspeed.runtime.zero.partition_parameters import register_external_parameter
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import BaseModelOutput

from ds_dpo import sequence_parallel
from ds_dpo.distributed import say
from ds_dpo.layouts import collate_pairs, model_inputs
from ds_dpo.model_support import router_modules


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

    def select(self, index: torch.Tensor) -> "PairLogps":
        """The statistics of the pairs at ``index`` ([K] long); ``aux_loss`` stays the micro-batch's."""
        return replace(self, **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                                for f in fields(self) if f.name != "aux_loss"})


class TokenStats(NamedTuple):
    """What the scoring forward returns for the M scored tokens; every tensor is [M] float32."""

    logps: torch.Tensor
    """log pi(token | prefix), differentiable."""
    logit_means: torch.Tensor
    """Vocabulary-mean logit at the predicting position (detached)."""
    log_sum_sq_probs: torch.Tensor | None
    """log sum_v pi(v)^2 at the predicting position (detached; only when asked for, for WPO)."""
    entropy: torch.Tensor
    """Entropy of pi at the predicting position (detached)."""
    top1: torch.Tensor
    """1.0 where the token is pi's most likely one (detached)."""
    aux_loss: torch.Tensor | None = None
    """Scalar router load-balancing loss (only when asked for, for mixture-of-experts models)."""


@dataclass(frozen=True)
class OutputHead:
    """What a model does to its output layer's logits before returning them: ``softcap(scale * logits)``."""

    scale: float = 1.0
    softcap: float | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def completion_logps(token_logps: torch.Tensor, sequence: torch.Tensor, rank: torch.Tensor, pairs: torch.Tensor,
                     lengths: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
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


def wpo_logps(token_logps: torch.Tensor, log_sum_sq_probs: torch.Tensor, sequence: torch.Tensor,
              num_sequences: int, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[2B] WPO's aligned mean log-prob, ``mean_t (log p(y_t) - log sum_v p(v)^2)`` over completion tokens, detached
    (Zhou et al. 2024, https://arxiv.org/abs/2406.11827, Eq. 2). Inputs as in ``completion_logps`` (with a shard's
    tokens and the whole ``lengths``: that shard's part of the mean)."""
    aligned = (token_logps - log_sum_sq_probs).detach()
    sums = aligned.new_zeros(num_sequences).index_add(0, sequence, aligned)
    if lengths is None:
        lengths = torch.bincount(sequence, minlength=num_sequences)
    return sums / lengths.clamp(min=1)


def token_stats(logits: torch.Tensor, labels: torch.Tensor, with_wpo: bool = False) -> TokenStats:
    """Per-token statistics from [M, V] logits (any dtype; computed in float32) and [M] labels."""
    logits = logits.float()
    log_norm = logits.logsumexp(-1)
    logps = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - log_norm
    detached, log_norm_detached = logits.detach(), log_norm.detach()
    log_sum_sq = None
    if with_wpo:
        log_sum_sq = torch.logsumexp(2 * (detached - log_norm_detached.unsqueeze(-1)), dim=-1)
    probs = (detached - log_norm_detached.unsqueeze(-1)).exp()
    entropy = log_norm_detached - (probs * detached).sum(-1)
    top1 = (detached.argmax(-1) == labels).float()
    return TokenStats(logps, detached.mean(-1), log_sum_sq, entropy, top1)


def _head_token_stats(hidden, weight, bias, labels, head, with_wpo):
    return token_stats(head(F.linear(hidden, weight, bias).float()), labels, with_wpo)


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

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int, head: OutputHead,
                with_wpo: bool = False):
        """``hidden`` [M, H] at the scored positions, ``labels`` [M] -> ``TokenStats``."""
        weight, bias = self.output_layer.weight, self.output_layer.bias
        chunks = []
        for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size)):
            if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
                chunks.append(checkpoint(_head_token_stats, h, weight, bias, y, head, with_wpo, use_reentrant=False))
            else:
                chunks.append(_head_token_stats(h, weight, bias, y, head, with_wpo))
        return TokenStats(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*chunks)))


def _unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


_PROBE_TOKENS = 16


def probe_output_head(causal_lm: torch.nn.Module, plain_forward: Callable, device: torch.device) -> OutputHead | None:
    """How the model turns its output layer's logits into the logits it returns, or None when that is not
    ``OutputHead``-shaped (or the output layer is not a Linear on the base model's last hidden state).

    Runs the model on ``_PROBE_TOKENS`` fixed token ids (the same on every rank, so every rank decides alike; an
    encoder-decoder reads them as prompt and as completion), inside the model's forward: under ZeRO-3 the layers
    gather their weights as they are called.
    """
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None
    config = causal_lm.config.get_text_config()
    ids = torch.randint(config.vocab_size, (1, _PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids.to(device), "use_cache": False}
    with torch.no_grad():
        if causal_lm.config.is_encoder_decoder:
            # explicit masks: some decoders (T5Gemma) otherwise mask every token equal to the pad id
            ones = torch.ones_like(inputs["input_ids"])
            inputs = _encode_prompts_once(causal_lm, inputs | {
                "attention_mask": ones, "labels": inputs["input_ids"].repeat(2, 1),
                "decoder_attention_mask": ones.repeat(2, 1)})
        returned = plain_forward(**inputs).logits.float()
        projected = head(_last_hidden_state(causal_lm, inputs)).float()
    softcap = getattr(config, "final_logit_softcapping", None)
    target = returned
    if softcap is not None:  # undo the soft-capping to fit the scale before it
        target = softcap * torch.atanh((returned / softcap).clamp(-1 + 1e-6, 1 - 1e-6))
    scale = float((target * projected).sum() / (projected * projected).sum().clamp(min=1e-30))
    fitted = OutputHead(1.0 if abs(scale - 1.0) < 1e-6 else scale, softcap)
    # bf16 logits carry ~3 significant digits; a transform we cannot express is off by far more
    tolerance = 1e-4 if head.weight.dtype == torch.float32 else 3e-2
    error = (fitted(projected) - returned).abs().max() / returned.abs().max().clamp(min=1e-30)
    return fitted if error <= tolerance else None


def _encode_prompts_once(model: torch.nn.Module, inputs: dict) -> dict:
    """An encoder-decoder batch (``seq2seq`` layout: B prompts, 2B completions as ``labels``) as the model's forward
    takes it, with each prompt encoded once: the encoder's output for the B prompts, repeated for the chosen and the
    rejected decoder rows (gradients from both flow back into the one encoder pass), and the decoder inputs the
    model makes from the labels (its decoder start token, then the labels shifted right)."""
    inputs = dict(inputs)
    mask = inputs.pop("attention_mask", None)
    encoded = model.get_encoder()(input_ids=inputs.pop("input_ids"), attention_mask=mask).last_hidden_state
    labels = inputs.pop("labels")
    return inputs | {"encoder_outputs": BaseModelOutput(last_hidden_state=torch.cat([encoded, encoded])),
                     "attention_mask": None if mask is None else torch.cat([mask, mask]),
                     "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels)}


def _last_hidden_state(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The hidden states the output layer reads: the base model's (a causal LM) or the decoder's."""
    if "encoder_outputs" not in inputs:
        return model.base_model(**inputs).last_hidden_state
    return model.get_decoder()(input_ids=inputs["decoder_input_ids"],
                               attention_mask=inputs.get("decoder_attention_mask"),
                               encoder_hidden_states=inputs["encoder_outputs"].last_hidden_state,
                               encoder_attention_mask=inputs["attention_mask"]).last_hidden_state


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
    aux = router_aux_loss(causal_lm)

    @functools.wraps(plain_forward)
    def forward(*args, score_index=None, score_labels=None, logps_chunk_size=0, with_wpo=False,
                router_aux_loss=False, **kwargs):
        if score_index is None:
            return plain_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        if causal_lm.config.is_encoder_decoder:  # a seq2seq batch
            kwargs = _encode_prompts_once(causal_lm, kwargs)
        if logps_chunk_size > 0 and not hasattr(causal_lm, "_ds_dpo_output_head"):
            causal_lm._ds_dpo_output_head = probe_output_head(causal_lm, plain_forward, score_index.device)
            if causal_lm._ds_dpo_output_head is None:
                say(f"notice: {type(causal_lm).__name__} returns logits that are not a scaled (or soft-capped) "
                    "projection of its last hidden state; its log-probs come from its full logits "
                    "(logps_chunk_size has no effect)")
        head = causal_lm._ds_dpo_output_head if logps_chunk_size > 0 else None
        record = aux.recording() if router_aux_loss and aux is not None else contextlib.nullcontext([])
        with record as router_logits:
            if head is None:
                logits = plain_forward(*args, **kwargs).logits
                stats = token_stats(logits.flatten(0, 1)[score_index], score_labels, with_wpo)
            else:
                hidden = _last_hidden_state(causal_lm, kwargs)
                stats = causal_lm.ds_dpo_token_stats(hidden.flatten(0, 1)[score_index], score_labels,
                                                     logps_chunk_size, head, with_wpo)
        if router_logits:
            mask = kwargs.get("attention_mask")  # padding mask of a padded batch; packed rows have no padding
            mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            stats = stats._replace(aux_loss=aux(router_logits, mask))
        return stats

    if isinstance(causal_lm.get_output_embeddings(), torch.nn.Linear):
        causal_lm.ds_dpo_token_stats = ChunkedTokenStats(causal_lm.get_output_embeddings())
    causal_lm._ds_dpo_plain_forward = plain_forward
    causal_lm.forward = forward
    return model


def concatenated_forward(model, batch: dict[str, torch.Tensor], ld_alpha: float | None = None,
                         with_wpo: bool = False, logps_chunk_size: int = 1024,
                         router_aux_loss: bool = False) -> PairLogps:
    """One forward over all sequences of a micro-batch (any layout from ``ds_dpo.layouts``).

    ``model`` is a DeepSpeed engine or a causal LM on which ``enable_token_scoring`` was called.
    ``router_aux_loss``: also return a mixture-of-experts model's router load-balancing loss (None for other models).

    Under sequence parallelism (a model built with a ``SequenceParallel``, ``ds_dpo.sequence_parallel``) each rank of
    the group runs its slice of the rows and scores the tokens predicted there; the per-sequence sums are added over
    the group, so every rank returns the same statistics of the whole micro-batch.
    """
    tokens = batch["sequence_tokens"]
    num_sequences = tokens.shape[0]
    pairs = torch.cat([batch["chosen_sequence"], batch["rejected_sequence"]])
    causal_lm = _unwrap_peft(getattr(model, "module", model))  # getattr: a DeepSpeed engine wraps the model
    sp = getattr(causal_lm, "_ds_dpo_sequence_parallel", None)
    if sp is None:
        inputs, scored = model_inputs(batch, causal_lm.config, causal_lm.dtype), batch
    else:
        inputs, scored = sequence_parallel.shard(batch, causal_lm.config, causal_lm.dtype, sp)
    sequence, rank = scored["score_sequence"], scored["score_rank"]
    stats = model(**inputs, score_index=scored["score_index"], score_labels=scored["score_labels"],
                  logps_chunk_size=logps_chunk_size, with_wpo=with_wpo, router_aux_loss=router_aux_loss)
    logps = completion_logps(stats.logps, sequence, rank, pairs, tokens, ld_alpha)

    def per_sequence(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(num_sequences).index_add(0, sequence, values)

    # detached per-sequence sums: logit means, entropy, top-1 hits (+ WPO's aligned means)
    detached = torch.stack([per_sequence(stats.logit_means), per_sequence(stats.entropy), per_sequence(stats.top1),
                            *([wpo_logps(stats.logps, stats.log_sum_sq_probs, sequence, num_sequences, tokens)]
                              if with_wpo else [])])
    if sp is not None:
        logps = sequence_parallel.sum_over_group(logps, sp)
        torch.distributed.all_reduce(detached, group=sp.group)
    detached = detached[:, pairs]
    (c, r), (cl, rl), (ct, rt) = logps.chunk(2), detached[0].chunk(2), tokens[pairs].chunk(2)
    cw, rw = detached[3].chunk(2) if with_wpo else (None, None)
    entropy, top1 = detached[1].view(2, -1).sum(0), detached[2].chunk(2)[0]
    return PairLogps(c, r, cl, rl, ct, rt, cw, rw, stats.aux_loss, entropy=entropy, chosen_top1=top1)


def _relative_error(got: PairLogps, expected: PairLogps) -> tuple[float, str, int]:
    """Largest |got - expected| / max(|expected|, 1) over the pairs' chosen and rejected log-probs, where."""
    worst = (0.0, "chosen", 0)
    for side in ("chosen", "rejected"):
        a, b = getattr(got, side).double(), getattr(expected, side).double()
        error = (a - b).abs() / b.abs().clamp(min=1.0)
        i = int(error.argmax())
        worst = max(worst, (float(error[i]), side, i))
    return worst


@torch.no_grad()
def scoring_mismatch(model, rows: list[dict], pad_token_id: int, layout: str, logps_chunk_size: int,
                     vision=None) -> str | None:
    """The startup self-check: score ``rows`` (a real micro-batch) with the run's fast path (``layout``, chunked
    log-probs) and with the model's own forward on a padded batch; a description of the difference when they
    disagree beyond rounding, else None.

    Three forwards under ``no_grad`` in eval mode (the third, padded with chunked log-probs, tells a wrong layout from a
    wrong output head), the same on every rank. An encoder-decoder's only layout is its plain one: two forwards."""
    causal_lm = _unwrap_peft(getattr(model, "module", model))
    was_training = causal_lm.training
    plain_layout = "seq2seq" if layout == "seq2seq" else "padded"
    model.eval()
    try:
        weights = [1.0] * len(rows)
        batch = lambda layout: collate_pairs(rows, weights, pad_token_id, layout, vision)  # noqa: E731
        plain = concatenated_forward(model, batch(plain_layout), logps_chunk_size=0)
        head = concatenated_forward(model, batch(plain_layout), logps_chunk_size=logps_chunk_size)
        fast = head if layout == plain_layout else concatenated_forward(model, batch(layout),
                                                                          logps_chunk_size=logps_chunk_size)
    finally:
        model.train(was_training)
    # float32 agrees to ~1e-6; bf16 kernels on different layouts round differently by up to ~1e-2
    tolerance = 1e-4 if causal_lm.dtype == torch.float32 else 5e-2
    error, side, pair = _relative_error(fast, plain)
    if error <= tolerance:
        return None
    head_error = _relative_error(head, plain)[0]
    if head_error > tolerance:
        culprit, avoid = "its chunked output head", "`logps_chunk_size: 0`"
    else:
        culprit, avoid = f"the {layout} batch layout", "`padding_free: false`"
    return (f"scoring self-check failed for {type(causal_lm).__name__}: the {side} log-prob of pair {pair} of the "
            f"first micro-batch is {float(getattr(fast, side)[pair]):.6g} from the fast path but "
            f"{float(getattr(plain, side)[pair]):.6g} from the model's own forward (relative difference "
            f"{error:.2g}, tolerance {tolerance:g}); the difference comes from {culprit}. Set {avoid} to score this "
            "model another way (or `scoring_self_check: false` to train anyway)")
