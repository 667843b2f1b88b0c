"""The run plan: every decision a run makes before it builds anything, made once in setup from the config, the
world size and what the model's class supports, then handed whole to whatever needs it.

Nothing downstream re-derives these (no module asks which layout a batch is from its keys, or which attention a
model was loaded with from its config): the layout is a strategy object, the scoring options travel as one
``Scoring``, the sequence-parallel group is part of it, and ``describe`` is the startup line that says all of it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from ds_dpo import estimate
from ds_dpo.config import ConfigError, DPOConfig
from ds_dpo.forward import sequence_parallel
from ds_dpo.forward.attention import is_block_attention
from ds_dpo.forward.layouts import SEQ2SEQ, SHARED, Layout, is_varlen
from ds_dpo.forward.logprobs import Scoring, chunk_size
from ds_dpo.forward.sequence_parallel import SequenceParallel
from ds_dpo.models.support import ModelSupport, inspect_model

AUTO_RESERVE = 4 * estimate.GiB
"""Kept free by ``deepspeed: auto`` (as ``launch/estimate.py``'s default): the CUDA context, allocator fragmentation,
what the estimate does not model."""


@dataclass(frozen=True)
class RunPlan:
    support: ModelSupport
    """What the policy's class supports (its name, vision, encoder-decoder, the attention it can run)."""
    layout: Layout
    attn_implementation: str
    """What both models are loaded with: the configured kernel, or ds_dpo's block attention around it."""
    scoring: Scoring
    """How every forward scores a micro-batch (layout, chunked log-probs, LD-DPO, the sequence-parallel group)."""
    data_parallel: tuple[int, int]
    """(size, rank) of the data-parallel dimension: sequence-parallel groups count as one rank."""
    deepspeed: str | dict
    """The policy's DeepSpeed config (file or mapping): the configured one, or ``deepspeed: auto``'s pick."""
    notices: tuple[str, ...] = ()
    """Where the run differs from what was configured, and why (printed once at startup)."""
    deadline: float | None = None
    """When (``time.time()``) the run must have stopped by: ``max_time`` after its start or the SLURM job's end,
    whichever comes first; None: no limit."""

    @property
    def sp(self) -> SequenceParallel | None:
        return self.scoring.sp

    @property
    def vision(self) -> bool:
        return self.support.vision

    @property
    def encoder_decoder(self) -> bool:
        return self.support.encoder_decoder

    def describe(self, cfg: DPOConfig) -> str:
        """The startup line: reference, batches, attention, log-probs, parallelism, memory savers."""
        rows = self.scoring.logps_chunk_size
        chunks = f"chunks of {rows} tokens" if rows else "full logits"
        attention, layout = self.attn_implementation, self.layout
        if is_block_attention(attention):
            attention = f"{cfg.model.attn_implementation} per sequence block"
        elif layout.padding_free and is_varlen(attention):
            attention += " varlen" + (", prompt keys gathered per rejected run" if layout is SHARED else "")
        elif layout.padding_free:
            attention += " with a block mask" if attention == "flex_attention" else " with a dense row mask"
        batches = layout.name + (
            " (each prompt encoded once, chosen and rejected decoded from it)" if layout is SEQ2SEQ else ""
        )
        parallel = "" if self.sp is None else f"; sequence-parallel over {self.sp.size} ranks (Ulysses)"
        if self.vision:
            times = "once" if layout is SHARED else "twice"
            batches += f"; images: each pair's through the vision tower {times}" + (
                " (frozen)" if cfg.model.freeze_vision_tower else ""
            )
        memory = "".join(
            [
                f"; MLPs in {cfg.model.tiled_mlp_shards} slices" if cfg.model.tiled_mlp_shards > 1 else "",
                "; checkpointed activations offloaded" if cfg.model.activation_offloading else "",
            ]
        )
        deadline = (
            ""
            if self.deadline is None
            else f"; stops with a checkpoint before {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.deadline))}"
        )
        return (
            f"reference: {_describe_reference(cfg)}; batches: {batches}; attention: {attention}; "
            f"log-probs from {chunks}{parallel}{memory}{deadline}"
        )


def _describe_reference(cfg: DPOConfig) -> str:
    if not cfg.loss.needs_reference:
        why = "with reference_free" if cfg.loss.reference_free else "need no reference"
        return f"none ({cfg.loss.loss_types} {why})"
    source = (
        "the policy with LoRA adapters disabled"
        if cfg.ref.reference == "lora"
        else f"a ZeRO-3 inference engine{' (parameters offloaded to CPU)' if cfg.ref.ref_offload else ''}"
    )
    if cfg.ref.sync_ref_model:
        return (
            f"{source}, mixed with the policy every {cfg.ref.ref_model_sync_steps} steps "
            f"(TR-DPO, alpha {cfg.ref.ref_model_mixup_alpha}, shard by shard)"
        )
    return f"{source}, log-probs precomputed before training" if cfg.ref.precompute_ref_log_probs else source


def make_plan(cfg: DPOConfig, world_size: int, device_type: str) -> RunPlan:
    """Decide the run (collective: forms the sequence-parallel groups); ConfigError when the model cannot run as
    configured."""
    support = inspect_model(cfg.model, device_type)
    sp_size = cfg.parallel.sequence_parallel_size
    layout, layout_notice = support.layout(cfg.batch.padding_free, cfg.batch.prefix_sharing)
    attn_implementation, attention_notice = support.attention_for(layout, sp_size > 1)
    problems = sequence_parallel.problems(
        sp_size, world_size, support.config, attn_implementation, support.stateful, support.reads_row_index
    )
    if problems:
        raise ConfigError("; ".join(problems))
    sp = sequence_parallel.initialize(sp_size)
    scoring = Scoring(layout, chunk_size(cfg.batch.logps_chunk_size, support.config), cfg.loss.ld_alpha, sp)
    deepspeed, deepspeed_notice = cfg.parallel.deepspeed, None
    if deepspeed == "auto":
        deepspeed, deepspeed_notice = _auto_deepspeed(cfg, support, world_size, device_type)
    notices = tuple(n for n in (*support.notices, layout_notice, attention_notice, deepspeed_notice) if n)
    return RunPlan(
        support,
        layout,
        attn_implementation,
        scoring,
        sequence_parallel.data_parallel(sp),
        deepspeed,
        notices,
        _deadline(cfg.checkpoint.max_time_s),
    )


def _auto_deepspeed(cfg: DPOConfig, support: ModelSupport, world_size: int, device_type: str) -> tuple[str, str]:
    """``deepspeed: auto``: the preset the estimator picks for this device's memory (``estimate.auto_setup``), and the
    startup line that says which and why."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if device_type == "cuda":
        budget = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory - AUTO_RESERVE
        where = "GPU"
    else:  # CPU processes of a node share its memory
        budget = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / local - AUTO_RESERVE
        where = f"CPU process ({local} per node)"
    try:
        work = estimate.workload(cfg, support.config, world_size, local, device=device_type)
        shape = estimate.ModelShape.of(support.config)
    except (ConfigError, ValueError) as e:  # encoder-decoders; configs AutoModelForCausalLM does not build
        preset = estimate.auto_preset(estimate.Setup(0 if world_size == 1 else 2))
        return preset, f"deepspeed auto: {preset} (not estimated: {e})"
    setup, found, fits = estimate.auto_setup(shape, work, cfg.model.gradient_checkpointing, budget)
    preset = estimate.auto_preset(setup)
    verdict = "fits" if fits else "nothing fits, the most offloaded setup"
    return preset, (
        f"deepspeed auto: {preset} ({setup.describe()}; ~{found.total / estimate.GiB:.1f} GiB per {where} estimated "
        f"for the longest rows, {budget / estimate.GiB:.1f} GiB available: {verdict})"
    )


def _deadline(max_time_s: float | None) -> float | None:
    limits = [time.time() + max_time_s] if max_time_s else []
    if os.environ.get("SLURM_JOB_END_TIME", "").isdigit():  # epoch seconds, set by SLURM for jobs with a time limit
        limits.append(float(os.environ["SLURM_JOB_END_TIME"]))
    return min(limits, default=None)
