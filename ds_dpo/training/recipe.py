"""The DPO recipe: setup -> train -> save -> cleanup, with a training loop that reads top to bottom.

    deepspeed --num_gpus 2 launch/train.py --config run.yaml --beta 0.1

Per optimizer step, each rank runs its micro-batches of the step (``gradient_accumulation_steps`` of them, or as many
as a token budget makes). Each micro-batch is one concatenated forward of chosen and rejected sequences through the
reference (no grad) and through the policy, the preference loss on the summed completion log-probs, and
``engine.backward``/``engine.step`` (the engine decides when the optimizer really steps). The objective is the mean
loss over the global batch's pairs.

Who owns what: every decision about the run (layout, attention kernel, sequence parallelism, scoring options) is the
``RunPlan``'s (``ds_dpo.plan``), made once at the start of setup; the run's progress is a ``TrainState`` (advanced here, saved and restored by the ``Checkpointer``);
which pairs each rank sees is the ``GlobalBatchSampler``'s; where reference log-probs come from is a ``Reference``;
metrics are summed on the device in the state's window and written by the ``MetricsLogger``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ds_dpo import distributed
from ds_dpo.config import ConfigError, DPOConfig, dump_config, eval_prefix
from ds_dpo.data import builtin
from ds_dpo.data.images import VisionInputs, image_token_types, mrope_image_token, processor_problem
from ds_dpo.data.pipeline import load_preference_data, token_lengths
from ds_dpo.data.sampler import GlobalBatchSampler, StepPlan
from ds_dpo.data.tokenization import load_processor, load_tokenizer
from ds_dpo.distributed import any_rank, local_main_first, max_over_ranks, say
from ds_dpo.forward import hooks
from ds_dpo.forward.layouts import collate_pairs
from ds_dpo.forward.logprobs import concatenated_forward
from ds_dpo.forward.router_loss import router_aux_loss
from ds_dpo.forward.scoring import install_token_scoring, unwrap_peft
from ds_dpo.forward.self_check import scoring_mismatch
from ds_dpo.losses import LossInputs, PreferenceLossOutput, preference_loss
from ds_dpo.models import engines
from ds_dpo.models.activation_memory import checkpoint_offload
from ds_dpo.models.ds_config import reference_deepspeed_config, resolve_deepspeed_config
from ds_dpo.plan import RunPlan, make_plan
from ds_dpo.training.checkpoint import Checkpointer, last_whole_checkpoint
from ds_dpo.training.export import export_hf_model
from ds_dpo.training.loggers import MetricsLogger
from ds_dpo.training.metrics import (
    MetricAccumulator,
    ModelFlops,
    flops_per_position,
    matmul_params,
    peak_bf16_flops,
    peak_memory_mb,
)
from ds_dpo.training.preemption import PreemptionGuard
from ds_dpo.training.reference import (
    AdapterReference,
    EngineReference,
    PrecomputedReference,
    Reference,
    ReferenceSync,
    precompute_reference_logps,
)
from ds_dpo.training.samples import EvalSamples
from ds_dpo.training.state import TrainState
from ds_dpo.watchdog import Watchdog


@dataclass(frozen=True)
class TrainResult:
    """How ``train`` ended, for the launcher to act on."""

    status: str
    """``finished`` (all steps done, final evaluation run), ``preempted`` (a signal; checkpoint saved), ``deadline``
    (stopped before ``max_time`` or the SLURM job's end; checkpoint saved) or
    ``non_finite`` (too many skipped steps in a row; checkpoint saved)."""
    step: int
    eval_metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""


class DPORecipe:
    """Owns a run from setup to cleanup; what it holds is declared here and set once, in ``setup``."""

    cfg: DPOConfig
    plan: RunPlan
    """Every decision about the run, made once at the start of setup."""
    rank: int
    world_size: int
    device: torch.device
    output_dir: Path
    tokenizer: Any
    processor: Any | None
    """A vision-language model's processor (its tokenizer is ``tokenizer``); None otherwise."""
    vision: VisionInputs | None
    """Makes a vision-language batch's pixel tensors; None otherwise."""
    train_data: Any
    eval_data: dict[str, Any]
    """The eval sets by name (``""``: the one unnamed set; empty: nothing to evaluate)."""
    samples: EvalSamples | None
    """Replies to held-out prompts at each evaluation (``generate_during_eval``); None otherwise."""
    sampler: GlobalBatchSampler
    total_steps: int
    checkpointer: Checkpointer
    policy: Any
    """The policy's DeepSpeed engine."""
    reference: Reference | None
    """Where reference log-probs come from; None for reference-free losses."""
    reference_sync: ReferenceSync | None
    """Moves the reference engine towards the policy (TR-DPO, ``sync_ref_model``); None otherwise."""
    aux_loss_coef: float
    """Weight of a mixture-of-experts policy's router loss (0: none computed)."""
    state: TrainState
    logger: MetricsLogger | None = None
    watchdog: Watchdog | None = None
    """Ends the job when a rank is lost (more than one rank, ``heartbeat_timeout`` > 0)."""

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        self._zero3 = []  # transformers' ZeRO-3 registrations of the engines, alive as long as they are
        self._hooks = False  # ds_dpo's attention kernels installed by this run (undone in cleanup)

    # --- setup ------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        hooks.install()  # ds_dpo's attention kernels, before any model is built (undone in cleanup)
        self._hooks = True
        self.output_dir = Path(self.cfg.output_dir)
        if self.cfg.builtin:
            self.cfg = self.cfg.replace(**builtin.materialize(self.output_dir / "builtin", self.cfg.seed))
        self.rank, self.world_size, _ = distributed.init_distributed(self.cfg.parallel.ddp_timeout)
        self.device = distributed.device()
        self.checkpointer = Checkpointer(self.cfg.checkpoint, self.output_dir, self.world_size)
        if self.world_size > 1 and self.cfg.parallel.heartbeat_timeout > 0:
            self.watchdog = Watchdog.start(
                self.cfg.parallel.heartbeat_timeout, lambda: last_whole_checkpoint(self.checkpointer.root)
            )
        self.plan = plan = make_plan(self.cfg, self.world_size, self.device.type)
        if plan.support.attn_implementation != self.cfg.model.attn_implementation:  # what the class can run
            self.cfg = self.cfg.replace(attn_implementation=plan.support.attn_implementation)
        if plan.deepspeed != self.cfg.parallel.deepspeed:  # `deepspeed: auto`'s pick, dumped with the run
            self.cfg = self.cfg.replace(deepspeed=plan.deepspeed)
        cfg = self.cfg
        for notice in plan.notices:
            say(f"notice: {notice}")
        torch.manual_seed(cfg.seed)  # same on every rank: LoRA init and anything else random must agree
        self.output_dir.mkdir(parents=True, exist_ok=True)

        self.processor, self.vision = None, None
        if plan.vision:
            self.processor = load_processor(cfg.model.model_name_or_path, cfg.model.source, cfg.data.chat_template)
            problem = processor_problem(self.processor)
            if problem:
                raise ConfigError(f"{plan.support.class_name}: {problem}")
            self.vision = VisionInputs(
                self.processor.image_processor, image_token_types(self.processor), mrope_image_token(self.processor)
            )
            self.tokenizer = self.processor.tokenizer
        else:
            self.tokenizer = load_tokenizer(cfg.model.model_name_or_path, cfg.model.source, cfg.data.chat_template)
        with local_main_first():  # tokenizes once per node; the other ranks read the cache
            self.train_data, self.eval_data, report = load_preference_data(
                cfg.data, self.tokenizer, cfg.seed, plan.encoder_decoder, self.processor
            )
        self.samples = EvalSamples.for_run(  # prompts of the first eval set
            cfg.samples,
            next(iter(self.eval_data.values()), None),
            self.tokenizer,
            plan.vision,
            plan.encoder_decoder,
            self.device,
        )
        if self.rank == 0:
            print(report.format(), flush=True)
            (self.output_dir / "data_report.json").write_text(json.dumps(dataclasses.asdict(report), indent=1))
        if cfg.checkpoint.best_metric and not self.eval_data:
            raise ConfigError(
                "`metric_for_best_model`/`load_best_model_at_end` compare evaluations, and there are no eval pairs: "
                "set `eval_dataset` or `eval_split_ratio`"
            )
        optim, budget = cfg.optim, cfg.batch.max_tokens_per_batch
        pair_tokens = None
        if budget:  # token-budget micro-batches: what each pair costs a forward in this layout
            lengths = token_lengths(self.train_data)
            pair_tokens = plan.layout.forward_tokens(lengths["prompt"], lengths["chosen"], lengths["rejected"]).tolist()
        self.sampler = GlobalBatchSampler(
            len(self.train_data),
            optim.per_device_train_batch_size,
            optim.gradient_accumulation_steps,
            *plan.data_parallel,
            cfg.seed,
            pair_tokens=pair_tokens,
            max_tokens_per_batch=budget,
            pair_weights=self.train_data["weight"],
            pair_groups=self.train_data["group"],
        )
        self.total_steps = (
            optim.max_steps if optim.max_steps > 0 else math.ceil(optim.num_train_epochs * self.sampler.steps_per_epoch)
        )

        ds_config = resolve_deepspeed_config(cfg, self.world_size)
        self.checkpointer.prepare_resume(ds_config)
        if self.rank == 0:
            dump_config(cfg, self.output_dir / "config.yaml")
        self._write_json("deepspeed_config.json", ds_config)
        self._setup_models(ds_config)
        self.state = TrainState(MetricAccumulator(self.device, self._model_flops()))
        self.checkpointer.restore(self.policy, self.state, self.reference_sync)
        self.logger = MetricsLogger(
            self.output_dir,
            self.rank,
            self.total_steps,
            initial=self.state.step,
            run_name=cfg.logging.run_name,
            logging_dir=cfg.logging.logging_dir,
            report_to=tuple(cfg.logging.reporters),
            config=cfg.to_dict(),
        )

    def _build_engine(self, ds_config: dict, trainable: bool, json_name: str):
        """A policy or reference engine, with the scoring forward installed and its DeepSpeed config written."""
        built = engines.build_engine(
            self.cfg,
            ds_config,
            trainable,
            total_steps=self.total_steps,
            attn_implementation=self.plan.attn_implementation,
            prepare=install_token_scoring,
        )
        self._zero3.append(built.zero3)
        self._write_json(json_name, built.ds_config)  # with the model's MoE leaf modules
        return built.engine

    def _setup_models(self, ds_config: dict) -> None:
        cfg, scoring = self.cfg, self.plan.scoring
        self.reference = None  # reference-free losses: no reference is built or run
        with_reference = cfg.loss.needs_reference
        # A separate reference is built before the policy, so that the policy's ZeRO-3 settings are the ones
        # transformers and peft see for the rest of the run.
        if with_reference and cfg.ref.reference != "lora":
            ref_config = reference_deepspeed_config(ds_config, cfg.ref.ref_offload)
            ref_engine = self._build_engine(ref_config, False, "reference_deepspeed_config.json")
            self._check_scoring(ref_engine, "reference")
            self.reference = EngineReference(ref_engine, scoring)
            if cfg.ref.precompute_ref_log_probs:
                self._precompute_reference()
                engines.release(ref_engine)
        self.policy = self._build_engine(ds_config, True, "deepspeed_config.json")
        self._check_scoring(self.policy, "policy")
        self.aux_loss_coef = self._router_aux_loss_coef()
        self.reference_sync = None
        if cfg.ref.sync_ref_model:
            self.reference_sync = ReferenceSync(
                self.policy, self.reference.engine, cfg.ref.ref_model_mixup_alpha, cfg.ref.ref_model_sync_steps
            )
        if with_reference and cfg.ref.reference == "lora":
            self.reference = AdapterReference(self.policy, scoring)
            if cfg.ref.precompute_ref_log_probs:
                self._precompute_reference()
        say(self.plan.describe(cfg))

    def _model_flops(self) -> ModelFlops | None:
        """What training windows need to log ``mfu``: on a GPU whose peak is in ``PEAK_BF16_FLOPS`` (a notice
        otherwise); None on other devices."""
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        peak = peak_bf16_flops(name)
        if peak is None:
            say(f"notice: the peak bf16 FLOP/s of {name} is not in ds_dpo's table; no `mfu` is logged")
            return None
        params, trainable = matmul_params(self.policy.module)
        if isinstance(self.reference, EngineReference):
            reference_params = matmul_params(self.reference.engine.module)[0]
        else:  # the LoRA base model runs all the policy's weights but its adapters; precomputed or none: nothing
            reference_params = params - trainable if isinstance(self.reference, AdapterReference) else 0
        return ModelFlops(flops_per_position(params, trainable, reference_params), peak)

    def _write_json(self, name: str, value: dict) -> None:
        if self.rank == 0:
            (self.output_dir / name).write_text(json.dumps(value, indent=1))

    def _check_scoring(self, engine, name: str) -> None:
        """The startup self-check (``scoring_self_check``) on this rank's first training micro-batch; every rank
        stops if any rank's fast path disagrees with the model's own forward."""
        if not self.cfg.batch.scoring_self_check:
            return
        first = next(self.sampler.plans(0, 0))[2].micro_batches[0]
        rows = [self.train_data[i] for i in first]
        problem = scoring_mismatch(engine, rows, self.tokenizer.pad_token_id, self.plan.scoring, self.vision)
        if any_rank(problem is not None, self.device):
            raise ConfigError(f"{name}: {problem or 'the scoring self-check failed on another rank'}")

    def _router_aux_loss_coef(self) -> float:
        """The weight of a mixture-of-experts policy's router loss (0: none is computed)."""
        causal_lm = unwrap_peft(self.policy.module)
        coef = self.cfg.model.router_aux_loss_coef
        if router_aux_loss(causal_lm) is None:
            if coef:
                say(
                    f"notice: {type(causal_lm).__name__} has no router load-balancing loss; "
                    "`router_aux_loss_coef` is ignored"
                )
            return 0.0
        coef = getattr(causal_lm.config, "router_aux_loss_coef", 0.0) if coef is None else coef
        if coef and self.plan.sp is not None:
            raise ConfigError(
                f"{type(causal_lm).__name__}'s router load-balancing loss is computed over all tokens of "
                "a micro-batch, which sequence parallelism splits across ranks: set "
                "`router_aux_loss_coef: 0` to train it sequence-parallel"
            )
        say(f"router load-balancing loss added with weight {coef}" if coef else "router load-balancing loss off")
        return coef

    def _precompute_reference(self) -> None:
        """Score the training pairs and every eval set once with the current reference (or read the scores from the
        cache); afterwards the batches carry the log-probs."""
        score = lambda data: precompute_reference_logps(  # noqa: E731
            self.reference,
            data,
            self.cfg,
            self.tokenizer.pad_token_id,
            self.device,
            self.plan.layout,
            self.plan.data_parallel,
            self.vision,
        )
        self.train_data = score(self.train_data)
        self.eval_data = {name: score(data) for name, data in self.eval_data.items()}
        self.reference = PrecomputedReference()

    # --- training ---------------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Optimizer steps until ``total_steps``, then the final evaluation; stops early (with a checkpoint) on a
        signal or too many non-finite steps in a row."""
        state, cfg = self.state, self.cfg
        plans = self.sampler.plans(state.epoch, state.done_in_epoch)
        evaluated: dict[str, float] = {}
        with PreemptionGuard(self.plan.deadline) as guard:
            while state.step < self.total_steps:
                epoch, done_in_epoch, plan = next(plans)
                self.train_step(plan)
                state.finish_step(epoch, done_in_epoch, self.policy.skipped_steps)
                if self.reference_sync is not None:
                    self.reference_sync.after_step(state.step)
                self.logger.advance()
                if state.nan_streak >= cfg.optim.max_consecutive_nan_steps:
                    self.checkpointer.save(self.policy, state, self.reference_sync)
                    return TrainResult(
                        "non_finite",
                        state.step,
                        message=(
                            f"{state.nan_streak} optimizer steps in a row (up to step {state.step}) had a non-finite "
                            f"loss or gradient norm and were skipped; the unchanged weights are saved in checkpoint "
                            f"step-{state.step}. Lower the learning rate, check the data, or raise "
                            "`max_consecutive_nan_steps`."
                        ),
                    )
                last = state.step == self.total_steps
                if state.step % cfg.logging.logging_steps == 0 or last:
                    self._log_train()
                # the last step's evaluation is the final one; each comes before its step's save, which it may make
                # the best checkpoint
                eval_due = cfg.logging.eval_steps and state.step % cfg.logging.eval_steps == 0
                evaluated = self.evaluate() if eval_due or last else {}
                saved = self.checkpointer.due(state.step)
                if saved:
                    self.checkpointer.save(self.policy, state, self.reference_sync, evaluated)
                if guard.agreed_stop(self.device):
                    if not saved:
                        self.checkpointer.save(self.policy, state, self.reference_sync, evaluated)
                    return TrainResult(guard.reason, state.step)
        # a run resumed from its last checkpoint has not evaluated its final weights yet
        return TrainResult("finished", state.step, evaluated or self.evaluate())

    def train_step(self, plan: StepPlan) -> None:
        """One optimizer step over this rank's micro-batches of ``plan``; their statistics go to the state's window."""
        # engine.backward divides by gradient_accumulation_steps and gradients are averaged over all ranks (a
        # sequence-parallel group's gradients add up to its micro-batch's, ``ds_dpo.forward.sequence_parallel``); this scale
        # turns the weighted sums of the pairs' losses into the exact weighted mean over the global batch.
        scale = self.world_size * self.cfg.optim.gradient_accumulation_steps / max(plan.weight_sum, 1e-30)
        for i, (indices, weights) in enumerate(zip(plan.micro_batches, plan.weights)):
            if self.cfg.batch.max_tokens_per_batch:  # the micro-batch count varies per step: tell DeepSpeed
                self.policy.set_gradient_accumulation_boundary(i == len(plan.micro_batches) - 1)
            batch = self._batch(self.train_data, indices, weights)
            with checkpoint_offload(self.cfg.model.activation_offloading):
                loss_sum = self._micro_batch_loss(batch, weights, self.state.window)
                self.policy.backward(loss_sum * scale)
            if self.policy.is_gradient_accumulation_boundary():
                self.state.learning_rate = self.policy.get_lr()[0]
            self.policy.step()

    def _micro_batch_loss(
        self, batch: dict[str, torch.Tensor], weights: list[float], window: MetricAccumulator
    ) -> torch.Tensor:
        """Weighted sum of the per-pair losses of the micro-batch's pairs of weight > 0 (a zero still attached to the
        graph when it holds none: every rank must run backward under ZeRO-3); adds their statistics (unweighted) to
        ``window``."""
        ref_chosen, ref_rejected = self.reference.logps(batch) if self.reference is not None else (None, None)
        policy = concatenated_forward(
            self.policy,
            batch,
            self.plan.scoring,
            with_wpo=self.cfg.loss.use_weighting,
            router_aux_loss=self.aux_loss_coef > 0,
        )
        real = [i for i, w in enumerate(weights) if w > 0]
        if not real:
            return policy.chosen.sum() * 0.0 + (0.0 if policy.aux_loss is None else policy.aux_loss * 0.0)
        if len(real) < len(weights):  # fillers must not enter batch-coupled losses (sorting, token means)
            index = torch.tensor(real, device=policy.chosen.device)
            policy = policy.select(index)
            ref_chosen, ref_rejected = (None, None) if ref_chosen is None else (ref_chosen[index], ref_rejected[index])
        out = self._preference_loss(
            LossInputs(
                policy.chosen,
                policy.rejected,
                ref_chosen,
                ref_rejected,
                policy.chosen_tokens,
                policy.rejected_tokens,
                policy.chosen_wpo,
                policy.rejected_wpo,
            )
        )
        if self.plan.sp is None or self.plan.sp.rank == 0:  # a sequence-parallel group's pairs count once
            tokens = (batch["pair_tokens"] * (batch["weight"] > 0)).sum()  # no host sync
            window.add(out, policy, torch.stack([tokens, batch["distinct_tokens"], batch["forward_positions"]]))
        pair_weights = torch.tensor([weights[i] for i in real], dtype=out.losses.dtype, device=out.losses.device)
        loss = (out.losses * pair_weights).sum()
        if policy.aux_loss is None:
            return loss
        # TRL adds coef * aux_loss to each micro-batch's mean loss; as a weighted sum over its pairs that is
        # (sum of weights) * coef * aux
        return loss + sum(weights) * self.aux_loss_coef * policy.aux_loss

    def _preference_loss(self, inputs: LossInputs) -> PreferenceLossOutput:
        return preference_loss(inputs, self.cfg.loss)

    def _batch(self, dataset, indices: list[int], weights: list[float]) -> dict[str, torch.Tensor]:
        batch = collate_pairs(
            [dataset[i] for i in indices], weights, self.tokenizer.pad_token_id, self.plan.layout, self.vision
        )
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _log_train(self) -> None:
        metrics = self.state.window.reduce()
        self.state.num_tokens += int(metrics["num_tokens"])
        metrics["num_tokens"] = self.state.num_tokens  # TRL's: the run's total so far
        grad_norm = self.policy.get_global_grad_norm()
        metrics.update(
            learning_rate=self.state.learning_rate,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            skipped_steps=self.state.skipped_steps,
            epoch=self.state.step / self.sampler.steps_per_epoch,
            peak_memory_mb=max_over_ranks(peak_memory_mb(), self.device),
        )
        self.logger.log(self.state.step, metrics, self.state.window.distributions)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and reward metrics over each whole eval set, prefixed ``eval_`` (a named set's ``eval_<name>_``),
        each set logged as it is done."""
        metrics = {}
        for name, data in self.eval_data.items():
            metrics.update(self._evaluate_set(data, eval_prefix(name)))
        if self.samples is not None:
            self.logger.log_samples(
                self.state.step, self.samples.generate(self.state.step, self.policy, self.reference)
            )
        return metrics

    def _evaluate_set(self, data, prefix: str) -> dict[str, float]:
        sampler = GlobalBatchSampler(
            len(data),
            self.cfg.logging.per_device_eval_batch_size,
            1,
            *self.plan.data_parallel,
            self.cfg.seed,
            shuffle=False,
        )
        window = MetricAccumulator(self.device)
        self.policy.eval()
        for plan in sampler.epoch(0):
            batch = self._batch(data, plan.micro_batches[0], plan.weights[0])
            self._micro_batch_loss(batch, plan.weights[0], window)
        self.policy.train()
        metrics = window.reduce(prefix=prefix)
        metrics[f"{prefix}num_tokens"] = self.state.num_tokens  # as TRL: training tokens at the time of the evaluation
        self.logger.log(self.state.step, metrics, window.distributions)
        return metrics

    # --- outputs ----------------------------------------------------------------------------------------------------

    def save(self) -> None:
        """The final model as a Hugging Face directory in ``output_dir`` (collective): the last weights, or with
        ``load_best_model_at_end`` the best checkpoint's."""
        if self.cfg.checkpoint.load_best_model_at_end:
            self.checkpointer.load_best(self.policy, self.state)
        export_hf_model(
            self.policy, self.processor or self.tokenizer, self.output_dir, self.cfg.checkpoint.save_merged_model
        )

    def failed(self) -> None:
        """An unexpected error in this rank: if it comes from a lost rank, the watchdog ends the process with a
        message naming that rank; otherwise this returns and the error goes on."""
        if self.watchdog is not None:
            self.watchdog.wait_for_verdict()

    def cleanup(self, completed: bool = True, status: int | None = None, error: str | None = None) -> None:
        """Close the logs and release what the run holds outside this process; safe after a failure at any point.

        ``completed``: every rank got here normally, so they meet at a barrier first (the CPU shared-memory buffers
        are unlinked once no rank communicates any more). Otherwise this rank stopped on an error: one it reported,
        whose exit ``status`` the other ranks then stop with, or an unexpected ``error``, which they report as the
        loss of this rank."""
        if self.watchdog is not None and not completed:
            self.watchdog.close(status, error)
        if self.logger is not None:
            self.logger.close()
        if self._hooks:
            hooks.uninstall()
            self._hooks = False
        # transformers' ZeRO-3 registration belongs to the run: a later from_pretrained in this process (a tool, a
        # test) must build a plain model, not a partitioned one
        unset_hf_deepspeed_config()
        if torch.distributed.is_initialized():
            if completed:
                torch.distributed.barrier()
                if self.watchdog is not None:
                    self.watchdog.close(0)
            distributed.release_shm_buffers()
