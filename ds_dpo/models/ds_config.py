"""The DeepSpeed JSON a run hands to DeepSpeed. Imports no DeepSpeed.

``resolve_deepspeed_config`` fills the ``"auto"`` values of the user's JSON from the run config and the world size
(an explicit value that disagrees is a ConfigError); ``reference_deepspeed_config`` derives the reference engine's
inference-only ZeRO-3 config from the policy's.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import AutoConfig, get_scheduler

from ds_dpo.config import ConfigError, DPOConfig, OptimConfig


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _fill(section: dict, key: str, value: Any, what: str, why: str = "") -> None:
    """Replace an ``"auto"`` value; an explicit value must agree with ours."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(
            f'the DeepSpeed config sets `{what}` = {current!r} but the run needs {value!r}{why}: set it to "auto" '
            "in the DeepSpeed JSON, or change the run config to match"
        )


def resolve_deepspeed_config(cfg: DPOConfig, world_size: int) -> dict:
    """The policy's DeepSpeed config with its ``"auto"`` values filled from ``cfg`` and the world size."""
    ds = cfg.parallel.deepspeed_json()
    optim = cfg.optim
    micro, accum = optim.per_device_train_batch_size, optim.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "train_micro_batch_size_per_gpu")
    _fill(ds, "gradient_accumulation_steps", accum, "gradient_accumulation_steps")
    _fill(
        ds,
        "train_batch_size",
        micro * accum * world_size,
        "train_batch_size",
        f" (per_device_train_batch_size {micro} x gradient_accumulation_steps {accum} x world size {world_size})",
    )
    _fill(ds, "gradient_clipping", optim.max_grad_norm, "gradient_clipping")
    _fill(ds.setdefault("bf16", {}), "enabled", cfg.model.bf16, "bf16.enabled")
    if cfg.model.bf16:  # skip (and count) an update whose gradient norm is not finite, as ZeRO-3 and fp32 always do
        ds["bf16"].setdefault("check_grad_overflow", True)
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError("fp16 is not supported (DPO log-ratios lose too much precision): use `bf16: true`")
    _fill_bucket_sizes(ds.get("zero_optimization", {}), cfg)
    _fill_optimizer(ds.setdefault("optimizer", {}), optim)
    _check_scheduler(ds, optim)
    return ds


# which of the run's optimizer keys each DeepSpeed optimizer takes
_TAKES_BETAS = {"Adam", "AdamW", "Lamb", "Lion"}
_TAKES_EPS = {"Adam", "AdamW", "Lamb", "Adagrad"}


def _fill_optimizer(block: dict, optim: OptimConfig) -> None:
    """The ``optimizer`` block from ``optim`` (a JSON without one gets one); an explicit value must agree, as in HF
    Trainer."""
    kind = optim.deepspeed_optimizer
    current = block.get("type", "auto")
    if current != "auto" and current.lower() != kind.lower():
        raise ConfigError(
            f'the DeepSpeed config\'s optimizer is {current!r} but `optim` is {optim.optim!r} ({kind}): set "type" to '
            '"auto" in the DeepSpeed JSON, or `optim` to match'
        )
    block["type"] = kind if current == "auto" else current
    params = block.setdefault("params", {})
    _fill(params, "lr", optim.learning_rate, "optimizer.params.lr")
    _fill(params, "weight_decay", optim.weight_decay, "optimizer.params.weight_decay")
    if kind in _TAKES_BETAS:
        _fill(params, "betas", [optim.adam_beta1, optim.adam_beta2], "optimizer.params.betas")
    if kind in _TAKES_EPS:
        _fill(params, "eps", optim.adam_epsilon, "optimizer.params.eps")
    for key in [key for key, value in params.items() if value == "auto"]:
        del params[key]  # a preset's value that this optimizer does not take (Adagrad: betas)


def _check_scheduler(ds: dict, optim: OptimConfig) -> None:
    """The run's schedule can be built from its keys (``lr_scheduler_kwargs`` as the schedule takes them), checked
    now rather than when the engine is built. A ``scheduler`` block in the DeepSpeed JSON replaces the run's
    schedule: the schedule keys must then be left at their defaults, or the run would silently not follow them."""
    if "scheduler" not in ds:
        stand_in = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        try:
            get_scheduler(
                optim.lr_scheduler_type,
                stand_in,
                num_warmup_steps=optim.warmup(10),
                num_training_steps=10,
                scheduler_specific_kwargs=optim.lr_scheduler_kwargs,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"`lr_scheduler_type` {optim.lr_scheduler_type!r} with `lr_scheduler_kwargs` "
                f"{optim.lr_scheduler_kwargs}: {e}"
            ) from None
        return
    defaults = OptimConfig()
    keys = ("lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps")
    given = [f"{k}={getattr(optim, k)!r}" for k in keys if getattr(optim, k) != getattr(defaults, k)]
    if given:
        raise ConfigError(
            f"the DeepSpeed config has its own `scheduler` block ({ds['scheduler'].get('type')}), which replaces the "
            f"run's schedule, and the run sets {', '.join(given)}: remove the block, or those keys"
        )


def _fill_bucket_sizes(zero: dict, cfg: DPOConfig) -> None:
    """HF Trainer's sizes for ``"auto"`` ZeRO buckets, from the model's hidden size H: reduce bucket H^2, ZeRO-3
    prefetch bucket 0.9 H^2, parameters below 10 H kept whole. Fixed sizes would allocate hundreds of MB of
    buffers for a small model and be too small for a large one."""
    sizes = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    auto = [key for key in sizes if zero.get(key) == "auto"]
    if not auto:
        return
    model_config = AutoConfig.from_pretrained(cfg.model.model_name_or_path, **cfg.model.source)
    hidden = getattr(model_config.get_text_config(), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ConfigError(
            f'cannot fill the DeepSpeed config\'s "auto" {auto}: the model config has no '
            "`hidden_size`; set them to numbers in the DeepSpeed JSON"
        )
    for key in auto:
        zero[key] = sizes[key](hidden)


# ZeRO settings that only concern gradients and optimizer states, which an inference-only engine does not have
_TRAINING_ONLY_ZERO_KEYS = (
    "offload_optimizer",
    "zero_quantized_gradients",
    "reduce_scatter",
    "reduce_bucket_size",
    "allgather_bucket_size",
    "overlap_comm",
    "contiguous_gradients",
    "round_robin_gradients",
    "sub_group_size",
    "elastic_checkpoint",
    "gather_16bit_weights_on_model_save",
    "stage3_gather_16bit_weights_on_model_save",
    "ignore_unused_parameters",
    "cpu_offload",
    "load_from_fp32_weights",
)


def reference_deepspeed_config(policy_ds: dict, ref_offload: bool) -> dict:
    """Inference-only ZeRO-3 for the reference, inheriting the policy's ZeRO settings that concern parameters
    (leaf modules, ZeRO++ quantized weights and hierarchical partitions, prefetch and persistence sizes): a MoE
    reference whose blocks are not leaf modules can hang where the policy runs. Parameters go to CPU with
    ``ref_offload`` (the policy's own ``offload_param`` block if it has one, e.g. NVMe), else stay on the device."""
    zero = {
        key: copy.deepcopy(value)
        for key, value in policy_ds.get("zero_optimization", {}).items()
        if key not in _TRAINING_ONLY_ZERO_KEYS
    }
    zero["stage"] = 3
    policy_offload = zero.pop("offload_param", None)
    if ref_offload:
        zero["offload_param"] = policy_offload or {"device": "cpu", "pin_memory": True}
    zero.setdefault("stage3_param_persistence_threshold", 1e4)
    keep = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16")
    ref = {key: copy.deepcopy(policy_ds[key]) for key in keep if key in policy_ds}
    return {**ref, "zero_optimization": zero, "steps_per_print": policy_ds.get("steps_per_print", 10**9)}
