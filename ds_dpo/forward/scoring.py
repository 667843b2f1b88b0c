"""The model's token-scoring forward: log-probs and statistics of the scored tokens of a micro-batch, without the
full-vocabulary logits.

The vocabulary projection runs only on the M scored positions, in chunks of ``logps_chunk_size`` rows with each
chunk's [chunk, V] logits recomputed in backward (``ChunkedTokenStats``, on the model's own output-layer weight):
the [2B, T, V] logits tensor that is the memory peak of a plain DPO step never exists. ``logps_chunk_size=0`` takes
the plain path instead: the model's full logits, then the same per-token statistics.

The chunked path needs the model's logits to be its output layer applied to the base model's last hidden state.
Some families transform those logits in their ``forward`` (Granite divides by ``logits_scaling``, Cohere multiplies
by ``logit_scale``, Falcon-H1 by ``lm_head_multiplier``, Gemma-2/3 soft-cap them); rather than keeping a list of such
config keys, the first scoring call probes the model (``probe_output_head``): it compares the model's own logits on
a few fixed tokens with the output layer applied to the base model's hidden states and fits a scale (after undoing
``final_logit_softcapping`` where the config has one). What fits is applied in the chunked path; a model whose logits
are anything else is scored from its full logits, with a notice.

Mixture-of-experts models add their router load-balancing loss (``TokenStats.aux_loss``, ``ds_dpo.forward.router_loss``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from deepspeed.runtime.zero.partition_parameters import register_external_parameter
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from ds_dpo.distributed import say
from ds_dpo.forward.router_loss import router_aux_loss


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
        self.chunk_stats = _head_token_stats
        """One chunk's statistics (``compile_chunks`` replaces it with its compiled form)."""
        for param in output_layer.parameters():
            if hasattr(param, "ds_id"):  # a ZeRO-3 partitioned parameter
                register_external_parameter(self, param)

    def forward(
        self, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int, head: OutputHead, with_wpo: bool = False
    ):
        """``hidden`` [M, H] at the scored positions, ``labels`` [M] -> ``TokenStats``."""
        weight, bias = self.output_layer.weight, self.output_layer.bias
        chunks = []
        for h, y in zip(hidden.split(chunk_size), labels.split(chunk_size)):
            if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
                chunks.append(checkpoint(self.chunk_stats, h, weight, bias, y, head, with_wpo, use_reentrant=False))
            else:
                chunks.append(self.chunk_stats(h, weight, bias, y, head, with_wpo))
        return TokenStats(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*chunks)))

    def compile_chunks(self) -> None:
        """Compile the per-chunk function (``torch_compile``): the [chunk, V] logits, their log-softmax and the
        statistics fuse into fewer passes over the chunk. The loop over chunks stays outside, so a micro-batch's
        number of chunks never recompiles it; dynamic shapes cover the last, shorter chunk of every micro-batch."""
        self.chunk_stats = torch.compile(_head_token_stats, dynamic=True)


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


_PROBE_TOKENS = 16


def probe_output_head(causal_lm: torch.nn.Module, plain_forward: Callable, device: torch.device) -> OutputHead | None:
    """How the model turns its output layer's logits into the logits it returns, or None when that is not
    ``OutputHead``-shaped (or the output layer is not a Linear on the base model's last hidden state, or the base
    model cannot be told).

    Runs the model on ``_PROBE_TOKENS`` fixed token ids (the same on every rank, so every rank decides alike; an
    encoder-decoder reads them as prompt and as completion), inside the model's forward: under ZeRO-3 the layers
    gather their weights as they are called.
    """
    head = causal_lm.get_output_embeddings()
    encoder_decoder = causal_lm.config.is_encoder_decoder
    if not isinstance(head, torch.nn.Linear) or (not encoder_decoder and _base_model(causal_lm) is None):
        return None
    config = causal_lm.config.get_text_config()
    ids = torch.randint(config.vocab_size, (1, _PROBE_TOKENS), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids.to(device), "use_cache": False}
    with torch.no_grad():
        if encoder_decoder:
            # explicit masks: some decoders (T5Gemma) otherwise mask every token equal to the pad id
            ones = torch.ones_like(inputs["input_ids"])
            inputs = _encode_prompts_once(
                causal_lm,
                inputs
                | {
                    "attention_mask": ones,
                    "labels": inputs["input_ids"].repeat(2, 1),
                    "decoder_attention_mask": ones.repeat(2, 1),
                },
            )
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
    return inputs | {
        "encoder_outputs": BaseModelOutput(last_hidden_state=torch.cat([encoded, encoded])),
        "attention_mask": None if mask is None else torch.cat([mask, mask]),
        "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels),
    }


def _base_model(causal_lm: torch.nn.Module) -> torch.nn.Module | None:
    """The causal LM's base model: the module its ``base_model_prefix`` names or, where that names no attribute (then
    ``base_model`` is the causal LM itself: Llama-4's and Mllama's text models are kept as ``model``), its one
    pretrained-model child; None if there is no such single child."""
    if causal_lm.base_model is not causal_lm:
        return causal_lm.base_model
    children = [m for m in causal_lm.children() if isinstance(m, PreTrainedModel)]
    return children[0] if len(children) == 1 else None


def _last_hidden_state(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The hidden states the output layer reads: the base model's (a causal LM) or the decoder's."""
    if "encoder_outputs" not in inputs:
        return _base_model(model)(**inputs).last_hidden_state
    return model.get_decoder()(
        input_ids=inputs["decoder_input_ids"],
        attention_mask=inputs.get("decoder_attention_mask"),
        encoder_hidden_states=inputs["encoder_outputs"].last_hidden_state,
        encoder_attention_mask=inputs["attention_mask"],
    ).last_hidden_state


class TokenScoring:
    """A causal LM's forward with a scoring branch: ``model(..., score_index=..., score_labels=...)`` returns
    ``TokenStats`` for the scored tokens instead of logits; without ``score_index`` the model behaves as before
    (generation, export, plain evaluation). Installed with ``install_token_scoring``.

    The scoring branch lives in the causal LM's own ``forward`` (as Liger's fused losses do), so a DeepSpeed engine
    wrapping the model runs it inside ``engine.forward``: ZeRO-3 gathers each module's weights when it is called,
    backward hooks are registered on the outputs, and checkpoint keys stay the model's own. Works through peft,
    whose wrappers pass extra keyword arguments down to the causal LM.
    """

    def __init__(self, causal_lm: torch.nn.Module):
        self.causal_lm = causal_lm
        self.plain_forward = causal_lm.forward
        self.aux = router_aux_loss(causal_lm)
        self.chunked: ChunkedTokenStats | None = None
        if isinstance(causal_lm.get_output_embeddings(), torch.nn.Linear):
            # a submodule of the model, so that ZeRO-3 hooks it and gathers the output layer's weight for it
            causal_lm.ds_dpo_token_stats = self.chunked = ChunkedTokenStats(causal_lm.get_output_embeddings())
        self.head: OutputHead | None = None
        """What the chunked path applies to the output layer's logits (None: not probed yet, or not expressible)."""
        self.probed = False

    def output_head(self, device: torch.device) -> OutputHead | None:
        """The model's ``OutputHead``, probed on the first chunked call (the same on every rank)."""
        if not self.probed:
            self.head, self.probed = probe_output_head(self.causal_lm, self.plain_forward, device), True
            if self.head is None:
                say(
                    f"notice: {type(self.causal_lm).__name__} returns logits that are not a scaled (or soft-capped) "
                    "projection of its last hidden state; its log-probs come from its full logits "
                    "(logps_chunk_size has no effect)"
                )
        return self.head

    def __call__(
        self,
        *args,
        score_index=None,
        score_labels=None,
        logps_chunk_size=0,
        with_wpo=False,
        router_aux_loss=False,
        **kwargs,
    ):
        if score_index is None:
            return self.plain_forward(*args, **kwargs)
        causal_lm = self.causal_lm
        kwargs["use_cache"] = False
        if causal_lm.config.is_encoder_decoder:  # a seq2seq batch
            kwargs = _encode_prompts_once(causal_lm, kwargs)
        head = self.output_head(score_index.device) if logps_chunk_size > 0 else None
        aux = self.aux if router_aux_loss else None
        with aux.recording() if aux is not None else contextlib.nullcontext([]) as router_logits:
            if head is None:
                logits = self.plain_forward(*args, **kwargs).logits
                stats = token_stats(logits.flatten(0, 1)[score_index], score_labels, with_wpo)
            else:
                hidden = _last_hidden_state(causal_lm, kwargs)
                # a head was fitted, so the output layer is a Linear and ``chunked`` exists
                stats = self.chunked(hidden.flatten(0, 1)[score_index], score_labels, logps_chunk_size, head, with_wpo)
        if router_logits:
            mask = kwargs.get("attention_mask")  # padding mask of a padded batch; packed rows have no padding
            mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            stats = stats._replace(aux_loss=aux(router_logits, mask))
        return stats


def token_scoring(model: torch.nn.Module) -> TokenScoring | None:
    """The ``TokenScoring`` installed on ``model``'s causal LM, if any."""
    return getattr(unwrap_peft(model).forward, "token_scoring", None)


def install_token_scoring(model: torch.nn.Module) -> torch.nn.Module:
    """Give ``model``'s causal LM (under peft: the base model's) the scoring forward of ``TokenScoring``, once; returns
    ``model``. The one place ds_dpo replaces a model's method: the recipe has each engine's model prepared with it."""
    if token_scoring(model) is not None:
        return model
    causal_lm = unwrap_peft(model)
    scoring = TokenScoring(causal_lm)

    @functools.wraps(scoring.plain_forward)  # the model's own signature, for what inspects it (generate, peft)
    def forward(*args, **kwargs):
        return scoring(*args, **kwargs)

    forward.token_scoring = scoring
    causal_lm.forward = forward
    return model
