"""The DPO recipe: setup -> train -> save -> cleanup, with a training loop that reads top to bottom.

    deepspeed --num_gpus 2 launch/train.py --config run.yaml --beta 0.1

Per optimizer step, each rank runs ``gradient_accumulation_steps`` micro-batches. Each micro-batch is one
concatenated forward of chosen and rejected sequences through the reference (no grad) and through the policy,
the preference loss on the summed completion log-probs, and ``engine.backward``/``engine.step`` (the engine decides
when the optimizer really steps). The objective is the mean loss over the global batch's pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from datasets.fingerprint import Hasher
from transformers import AutoTokenizer

from ds_dpo import builtin, engines
from ds_dpo.checkpoint import (Checkpointer, export_hf_model, find_checkpoint, read_state, rng_state, set_rng_state,
                               universal_checkpoint)
from ds_dpo.collate import collate_pairs
from ds_dpo.config import DPOConfig, dump_config
from ds_dpo.data import cache_root, load_preference_data
from ds_dpo.logprobs import PairLogps, concatenated_forward
from ds_dpo.losses import PreferenceLossOutput, needs_reference, preference_loss
from ds_dpo.metrics import MetricAccumulator, MetricsLogger, max_over_ranks, peak_memory_mb
from ds_dpo.packing import batch_layout
from ds_dpo.preemption import PreemptionGuard
from ds_dpo.reference import (AdapterReference, EngineReference, PrecomputedReference, Reference,
                              cached_reference_logps, model_fingerprint, score_dataset, with_reference_columns)
from ds_dpo.sampler import GlobalBatchSampler, StepPlan

REF_CACHE_VERSION = "2"  # bump when the log-prob computation changes


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class DPORecipe:
    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        self.final_eval: dict[str, float] = {}

    # --- setup ------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        self.output_dir = Path(self.cfg.output_dir)
        if self.cfg.builtin:
            paths = builtin.materialize(self.output_dir / "builtin", self.cfg.seed)
            self.cfg = dataclasses.replace(self.cfg, **paths)
        cfg = self.cfg
        self.rank, self.world_size, self.local_rank = engines.init_distributed(cfg.ddp_timeout)
        self.device = engines.device()
        self.layout = batch_layout(cfg.padding_free, cfg.prefix_sharing, cfg.attn_implementation)
        self.forward_options = {"ld_alpha": cfg.ld_alpha, "logps_chunk_size": cfg.logps_chunk_size}
        torch.manual_seed(cfg.seed)  # same on every rank: LoRA init and anything else random must agree
        self.output_dir.mkdir(parents=True, exist_ok=True)

        self.tokenizer = self._load_tokenizer()
        with self._local_main_first():  # tokenizes once per node; the other ranks read the cache
            self.train_data, self.eval_data, report = load_preference_data(cfg, self.tokenizer)
        if self.rank == 0:
            print(report.format(), flush=True)
            (self.output_dir / "data_report.json").write_text(json.dumps(dataclasses.asdict(report), indent=1))
        self.sampler = GlobalBatchSampler(len(self.train_data), cfg.per_device_train_batch_size,
                                          cfg.gradient_accumulation_steps, self.world_size, self.rank, cfg.seed,
                                          pair_tokens=self._pair_tokens(self.train_data) if cfg.max_tokens_per_batch
                                          else None, max_tokens_per_batch=cfg.max_tokens_per_batch)
        self.total_steps = (cfg.max_steps if cfg.max_steps > 0
                            else math.ceil(cfg.num_train_epochs * self.sampler.steps_per_epoch))

        ds_config = engines.resolve_deepspeed_config(cfg, self.world_size)
        self.resume_from = self._checkpoint_to_resume(ds_config)
        if self.rank == 0:
            dump_config(cfg, ds_config, self.output_dir / "config.yaml")
        self._setup_models(ds_config)
        self.checkpointer = Checkpointer(self.policy, self.output_dir, cfg.save_steps, cfg.save_total_limit)
        self.logger = MetricsLogger(self.output_dir, self.rank, self.total_steps)

    def _pair_tokens(self, data) -> list[int]:
        """Tokens each pair puts into a forward in this run's layout (the prompt once when shared, else twice)."""
        prompts = 1 if self.layout == "shared" else 2
        return [prompts * len(p) + len(c) + len(r) for p, c, r in zip(
            data["prompt_input_ids"], data["chosen_input_ids"], data["rejected_input_ids"])]

    def _load_tokenizer(self):
        tokenizer = AutoTokenizer.from_pretrained(self.cfg.model_name_or_path,
                                                  trust_remote_code=self.cfg.trust_remote_code)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token  # pads are masked out; any id will do
        template = self.cfg.chat_template
        if template:
            tokenizer.chat_template = Path(template).read_text() if Path(template).is_file() else template
        return tokenizer

    def _setup_models(self, ds_config: dict) -> None:
        cfg = self.cfg
        self.reference: Reference | None = None  # reference-free losses: no reference is built or run
        with_reference = needs_reference(cfg.loss_type, cfg.reference_free)
        # A separate reference is built before the policy, so that the policy's ZeRO-3 settings are the ones
        # transformers and peft see for the rest of the run.
        if with_reference and cfg.reference != "lora":
            ref_engine = engines.build_engine(cfg, engines.reference_deepspeed_config(ds_config, cfg), trainable=False)
            self.reference = EngineReference(ref_engine, **self.forward_options)
            if cfg.precompute_ref_log_probs:
                self._precompute_reference()
                engines.release(ref_engine)
        self.policy = engines.build_engine(cfg, ds_config, trainable=True, total_steps=self.total_steps)
        chunks = f"chunks of {cfg.logps_chunk_size} tokens" if cfg.logps_chunk_size else "full logits"
        self._say(f"reference: {self._describe_reference(with_reference)}; batches: {self.layout}; log-probs from "
                  f"{chunks}")
        if with_reference and cfg.reference == "lora":
            self.reference = AdapterReference(self.policy, **self.forward_options)
            if cfg.precompute_ref_log_probs:
                self._precompute_reference()

    def _describe_reference(self, with_reference: bool) -> str:
        cfg = self.cfg
        if not with_reference:
            return f"none ({cfg.loss_types} {'with reference_free' if cfg.reference_free else 'need no reference'})"
        source = ("the policy with LoRA adapters disabled" if cfg.reference == "lora" else
                  f"a ZeRO-3 inference engine{' (parameters offloaded to CPU)' if cfg.ref_offload else ''}")
        return f"{source}, log-probs precomputed before training" if cfg.precompute_ref_log_probs else source

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(f"ds_dpo: {message}", flush=True)

    def _precompute_reference(self) -> None:
        """Score both datasets once with the current reference, or read the scores an earlier run cached for the same
        reference weights, data and settings (a resumed run or a beta sweep pays for the reference once); afterwards
        the batches carry the log-probs."""
        cfg = self.cfg
        source = cfg.model_name_or_path if cfg.reference == "lora" else (cfg.ref_model_name_or_path or
                                                                         cfg.model_name_or_path)
        batch_size = cfg.precompute_ref_batch_size or cfg.per_device_eval_batch_size
        for name in ("train_data", "eval_data"):
            data = getattr(self, name)
            if data is None:
                continue
            key = Hasher.hash((REF_CACHE_VERSION, model_fingerprint(source), data._fingerprint, cfg.ld_alpha, cfg.bf16,
                               cfg.attn_implementation))
            cache_file = cache_root(cfg.dataset_cache_dir) / f"ref-logps-{key}.safetensors"
            logps, hit = cached_reference_logps(
                cache_file, lambda: score_dataset(self.reference, data, batch_size,
                                                  self.tokenizer.pad_token_id, self.device, self.layout), self.device)
            self._say(f"reference log-probs of {len(data)} pairs: {'read from cache' if hit else 'computed'} "
                      f"({cache_file.name})")
            setattr(self, name, with_reference_columns(data, logps))
        self.reference = PrecomputedReference()

    @contextlib.contextmanager
    def _local_main_first(self):
        """Local rank 0 does the work (files, tokenization caches) first; the others then find it done."""
        if self.local_rank != 0:
            torch.distributed.barrier()
        yield
        if self.local_rank == 0:
            torch.distributed.barrier()

    # --- training ---------------------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        window = MetricAccumulator(self.device)
        step, epoch, done_in_epoch = self._resume(window)
        self.preempted, self.skipped_steps, consecutive = False, self.policy.skipped_steps, 0
        with PreemptionGuard() as guard:
            while step < self.total_steps and not self.preempted:
                for plan in self.sampler.epoch(epoch, start_step=done_in_epoch):
                    self.train_step(plan, window)
                    step, done_in_epoch = step + 1, done_in_epoch + 1
                    # DeepSpeed skips an update whose gradient norm is NaN/inf and counts it (a host-side int)
                    consecutive = consecutive + 1 if self.policy.skipped_steps > self.skipped_steps else 0
                    self.skipped_steps = self.policy.skipped_steps
                    if consecutive >= cfg.max_consecutive_nan_steps:
                        self._save_checkpoint(step, epoch, done_in_epoch, window)
                        raise NonFiniteError(
                            f"{consecutive} optimizer steps in a row (up to step {step}) had a non-finite loss or "
                            f"gradient norm and were skipped; the unchanged weights are saved in checkpoint "
                            f"step-{step}. Lower the learning rate, check the data, or raise "
                            "`max_consecutive_nan_steps`.")
                    self.logger.advance()
                    if step % cfg.logging_steps == 0 or step == self.total_steps:
                        self._log_train(step, window)
                    if cfg.eval_steps and step % cfg.eval_steps == 0 and step != self.total_steps:
                        self.evaluate(step)
                    saved = self.checkpointer.due(step)
                    if saved:
                        self._save_checkpoint(step, epoch, done_in_epoch, window)
                    if guard.agreed_stop(self.device):
                        if not saved:
                            self._save_checkpoint(step, epoch, done_in_epoch, window)
                        self.preempted, self.stopped_at = True, step
                        break
                    if step == self.total_steps:
                        break
                else:
                    epoch, done_in_epoch = epoch + 1, 0
        if not self.preempted:
            self.final_eval = self.evaluate(step)

    def _save_checkpoint(self, step: int, epoch: int, done_in_epoch: int, window: MetricAccumulator) -> None:
        """Everything beyond the engine's own state that the run needs to continue exactly where it stopped."""
        started = time.perf_counter()
        self.checkpointer.save(step, {
            "step": step, "epoch": epoch, "done_in_epoch": done_in_epoch, "learning_rate": self.learning_rate,
            "metric_window": window.sums.tolist(), "rng": rng_state(), "world_size": self.world_size,
        })
        self._say(f"checkpoint step-{step} saved in {time.perf_counter() - started:.2f} s")

    def _checkpoint_to_resume(self, ds_config: dict) -> Path | None:
        """The checkpoint ``resume_from_checkpoint`` names, made loadable on this world size (DeepSpeed's universal
        format, converted once, when the world size differs from the one that wrote it)."""
        spec = self.cfg.resume_from_checkpoint
        if not spec:
            return None
        path = find_checkpoint(self.output_dir / "checkpoints", spec)
        if path is None:
            self._say("resume_from_checkpoint: auto, but no checkpoint yet: starting from scratch")
            return None
        self.resume_state = read_state(path, self.rank)
        if self.resume_state["world_size"] != self.world_size:
            self._say(f"{path} was written by {self.resume_state['world_size']} ranks; resuming on "
                      f"{self.world_size} through DeepSpeed's universal checkpoint format")
            path = universal_checkpoint(path)
            ds_config["checkpoint"] = {"load_universal": True}
        return path

    def _resume(self, window: MetricAccumulator) -> tuple[int, int, int]:
        """(step, epoch, steps done in that epoch) to start from: zeros, or the checkpoint's."""
        if self.resume_from is None:
            return 0, 0, 0
        self.checkpointer.load(self.resume_from)
        state = self.resume_state
        set_rng_state(state["rng"])
        window.sums.copy_(torch.tensor(state["metric_window"], dtype=window.sums.dtype))
        self.learning_rate = state["learning_rate"]
        self.logger.advance(state["step"])
        self._say(f"resumed from {self.resume_from} at step {state['step']}")
        epoch, done = state["epoch"], state["done_in_epoch"]
        return (state["step"], epoch + 1, 0) if done >= self.sampler.steps_per_epoch else (state["step"], epoch, done)

    def train_step(self, plan: StepPlan, window: MetricAccumulator) -> None:
        """One optimizer step over this rank's micro-batches of ``plan``; adds their statistics to ``window``."""
        # engine.backward divides by gradient_accumulation_steps and gradients are averaged over ranks; this scale
        # turns the sums of real pairs' losses into the exact mean over the global batch's real pairs.
        scale = self.world_size * self.cfg.gradient_accumulation_steps / plan.num_pairs
        for i, (indices, weights) in enumerate(zip(plan.micro_batches, plan.weights)):
            if self.cfg.max_tokens_per_batch:  # the micro-batch count varies per step: tell DeepSpeed where it ends
                self.policy.set_gradient_accumulation_boundary(i == len(plan.micro_batches) - 1)
            batch = self._batch(self.train_data, indices, weights)
            loss_sum = self._micro_batch_loss(batch, weights, window)
            self.policy.backward(loss_sum * scale)
            if self.policy.is_gradient_accumulation_boundary():
                self.learning_rate = self.policy.get_lr()[0]
            self.policy.step()

    def _micro_batch_loss(self, batch: dict[str, torch.Tensor], weights: list[float],
                          window: MetricAccumulator) -> torch.Tensor:
        """Sum of the per-pair losses of the micro-batch's real pairs (a zero still attached to the graph when it
        holds only fillers: every rank must run backward under ZeRO-3); adds the pairs' statistics to ``window``."""
        ref_chosen, ref_rejected = self.reference.logps(batch) if self.reference is not None else (None, None)
        policy = concatenated_forward(self.policy, batch, with_wpo=self.cfg.use_weighting, **self.forward_options)
        real = [i for i, w in enumerate(weights) if w > 0]
        if not real:
            return policy.chosen.sum() * 0.0
        if len(real) < len(weights):  # fillers must not enter batch-coupled losses (sorting, token means)
            index = torch.tensor(real, device=policy.chosen.device)
            policy = policy.select(index)
            ref_chosen, ref_rejected = (None, None) if ref_chosen is None else (ref_chosen[index], ref_rejected[index])
        out = self._preference_loss(policy, ref_chosen, ref_rejected)
        window.add(out, policy, (batch["pair_tokens"] * batch["weight"]).sum())
        return out.losses.sum()

    def _preference_loss(self, policy: PairLogps, ref_chosen, ref_rejected) -> PreferenceLossOutput:
        cfg = self.cfg
        return preference_loss(
            policy.chosen, policy.rejected, ref_chosen, ref_rejected, policy.chosen_tokens, policy.rejected_tokens,
            loss_type=cfg.loss_type, loss_weights=cfg.loss_weights, beta=cfg.beta,
            label_smoothing=cfg.label_smoothing, f_divergence_type=cfg.f_divergence_type,
            f_alpha_divergence_coef=cfg.f_alpha_divergence_coef, discopop_tau=cfg.discopop_tau,
            simpo_gamma=cfg.simpo_gamma, cpo_alpha=cfg.cpo_alpha, reference_free=cfg.reference_free,
            use_weighting=cfg.use_weighting, chosen_wpo_logps=policy.chosen_wpo,
            rejected_wpo_logps=policy.rejected_wpo)

    def _batch(self, dataset, indices: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
        batch = collate_pairs([dataset[i] for i in indices], weights, self.tokenizer.pad_token_id, self.layout)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _log_train(self, step: int, window: MetricAccumulator) -> None:
        metrics = window.reduce()
        grad_norm = self.policy.get_global_grad_norm()
        metrics.update(
            learning_rate=self.learning_rate,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            skipped_steps=self.skipped_steps,
            epoch=step / self.sampler.steps_per_epoch,
            peak_memory_mb=max_over_ranks(peak_memory_mb(), self.device),
        )
        self.logger.log(step, metrics)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Loss and reward metrics over the whole eval set, prefixed ``eval_``."""
        if self.eval_data is None:
            return {}
        sampler = GlobalBatchSampler(len(self.eval_data), self.cfg.per_device_eval_batch_size, 1, self.world_size,
                                     self.rank, self.cfg.seed, shuffle=False)
        window = MetricAccumulator(self.device)
        self.policy.eval()
        for plan in sampler.epoch(0):
            batch = self._batch(self.eval_data, plan.micro_batches[0], plan.weights[0])
            self._micro_batch_loss(batch, plan.weights[0], window)
        self.policy.train()
        metrics = window.reduce(prefix="eval_")
        self.logger.log(step, metrics)
        return metrics

    # --- outputs ----------------------------------------------------------------------------------------------------

    def save(self) -> None:
        """The final model as a Hugging Face directory in ``output_dir`` (collective)."""
        export_hf_model(self.policy, self.tokenizer, self.output_dir, self.cfg.save_merged_model)

    def cleanup(self) -> None:
        self.logger.close()
        torch.distributed.barrier()
        engines.release_shm_buffers()
