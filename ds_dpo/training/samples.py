"""Replies to a few held-out prompts at each evaluation (``generate_during_eval``): the policy's greedy replies, and
at the first evaluation the reference's, to the first ``generate_num_prompts`` distinct prompts of the eval set, for
the ``MetricsLogger`` to write (TensorBoard text, a wandb table, ``samples.jsonl``).

Generation is the model's own ``generate``: the scoring forward that ``install_token_scoring`` gives the model runs
its plain forward whenever no tokens are to be scored, so the logits are the model's. Every rank generates the same
prompts with ``synced_gpus``: under ZeRO-3 each forward gathers the layers' weights from all ranks, so every rank must
run as many forwards as the others, and a rank that has finished goes on until all have.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ds_dpo.config import ConfigError
from ds_dpo.config.schema import SamplesConfig
from ds_dpo.training.reference import AdapterReference, EngineReference, Reference


@dataclass(frozen=True)
class Sample:
    """One reply, as ``samples.jsonl`` holds it."""

    step: int
    model: str
    """``policy`` or ``reference``."""
    prompt: str
    completion: str


class EvalSamples:
    """The fixed prompts of a run and how to answer them; ``generate`` at each evaluation."""

    def __init__(
        self, prompts: list[list[int]], tokenizer, max_new_tokens: int, encoder_decoder: bool, device: torch.device
    ):
        self.prompts, self.tokenizer, self.max_new_tokens = prompts, tokenizer, max_new_tokens
        self.encoder_decoder, self.device = encoder_decoder, device
        self.reference_done = False
        """The reference answered already: it answers once, as it does not train (a TR-DPO reference that
        ``sync_ref_model`` moves is not asked again either)."""

    @classmethod
    def for_run(
        cls, cfg: SamplesConfig, eval_data, tokenizer, vision: bool, encoder_decoder: bool, device: torch.device
    ) -> EvalSamples | None:
        """The run's samples, or None without ``generate_during_eval``; ConfigError where they cannot be made."""
        if not cfg.generate_during_eval:
            return None
        if vision:
            raise ConfigError(
                "`generate_during_eval` is not supported for vision-language models (the prompts' images would have "
                "to be passed to generate): set `generate_during_eval: false`"
            )
        if eval_data is None:  # known only now: a training source's test split may have become the eval set
            raise ConfigError(
                "`generate_during_eval` answers held-out prompts and there are none: set `eval_dataset` or "
                "`eval_split_ratio`"
            )
        # the first distinct non-empty prompts (a ranked row's pairs share one; a decoder needs a token to start from)
        prompts: dict[tuple[int, ...], None] = {}
        for i in range(len(eval_data)):
            prompt = tuple(eval_data[i]["prompt_input_ids"])
            if prompt:
                prompts[prompt] = None
            if len(prompts) == cfg.generate_num_prompts:
                break
        if not prompts:
            raise ConfigError("`generate_during_eval`: the eval set has no pair with a non-empty prompt")
        return cls([list(p) for p in prompts], tokenizer, cfg.generate_max_new_tokens, encoder_decoder, device)

    @torch.no_grad()
    def generate(self, step: int, policy, reference: Reference | None) -> list[Sample]:
        """The policy's replies (``policy``: its DeepSpeed engine) and, the first time, the reference's (a reference
        engine, or the LoRA policy with its adapters disabled; none for precomputed log-probs). Collective: every
        rank calls it."""
        samples = self._replies(step, "policy", policy.module, contextlib.nullcontext())
        if not self.reference_done:
            self.reference_done = True
            if isinstance(reference, EngineReference):
                samples += self._replies(step, "reference", reference.engine.module, contextlib.nullcontext())
            elif isinstance(reference, AdapterReference):
                model = reference.engine.module
                samples += self._replies(step, "reference", model, model.disable_adapter())
        return samples

    def _replies(self, step: int, name: str, model: torch.nn.Module, context: Any) -> list[Sample]:
        was_training = model.training
        model.eval()  # no dropout: greedy replies of the model as it is
        try:
            with context:
                out = model.generate(
                    **self._inputs(),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    synced_gpus=True,
                )
        finally:
            model.train(was_training)
        # a decoder's output starts with the (left-padded) prompt; an encoder-decoder's is the reply alone
        replies = out if self.encoder_decoder else out[:, max(map(len, self.prompts)) :]
        return [
            Sample(
                step,
                name,
                self.tokenizer.decode(prompt),  # as the model read it, special tokens included
                self.tokenizer.decode(reply, skip_special_tokens=True),
            )
            for prompt, reply in zip(self.prompts, replies.tolist())
        ]

    def _inputs(self) -> dict[str, torch.Tensor]:
        """The prompts as one batch: left-padded for a decoder (generation continues every row at its end),
        right-padded for an encoder."""
        width = max(map(len, self.prompts))
        ids = torch.full((len(self.prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(self.prompts):
            span = slice(0, len(prompt)) if self.encoder_decoder else slice(width - len(prompt), width)
            ids[i, span], mask[i, span] = torch.tensor(prompt), 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
