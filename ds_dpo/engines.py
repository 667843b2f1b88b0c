"""DeepSpeed engines for the policy and the reference: the one module that builds them.

The policy and a separate reference come from the same function, ``build_engine``, with ``trainable`` telling them
apart. Under ZeRO-3 the model is created inside ``deepspeed.zero.Init`` (through transformers' ``HfDeepSpeedConfig``)
so it is never whole on one device. The reference engine is always ZeRO-3 (sharded even when the policy runs
ZeRO-1/2, where TRL and OpenRLHF replicate it), has no optimizer, and runs in eval mode under ``no_grad``.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
from pathlib import Path
from typing import Any

# Model code must be imported before deepspeed.zero.Init patches module construction: importing it inside fails
# with a torch._dynamo "Signature mismatch" TypeError (seen with transformers 5.24 / torch 2.13).
import torch
import torch._dynamo  # noqa: F401
import deepspeed
from deepspeed.accelerator import get_accelerator
from transformers import AutoConfig, AutoModelForCausalLM, get_scheduler
from transformers.integrations.deepspeed import HfDeepSpeedConfig, set_hf_deepspeed_config, unset_hf_deepspeed_config

from ds_dpo.config import ConfigError, DPOConfig
from ds_dpo.logprobs import enable_token_scoring

_NO_DECAY = ("bias", "norm")


def init_distributed(timeout_s: int = 1800) -> tuple[int, int, int]:
    """Initialise torch.distributed (NCCL on GPUs, gloo on CPU); return (rank, world_size, local_rank).

    ``timeout_s`` bounds every collective: a rank that dies makes the others fail after it instead of waiting forever.
    """
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank)
    return rank, world, local_rank


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _fill(section: dict, key: str, value: Any, what: str, why: str = "") -> None:
    """Replace an ``"auto"`` value; an explicit value must agree with ours."""
    current = section.get(key, "auto")
    if current == "auto":
        section[key] = value
    elif current != value:
        raise ConfigError(
            f"the DeepSpeed config sets `{what}` = {current!r} but the run needs {value!r}{why}: set it to \"auto\" "
            "in the DeepSpeed JSON, or change the run config to match"
        )


def resolve_deepspeed_config(cfg: DPOConfig, world_size: int) -> dict:
    """Load the policy's DeepSpeed JSON and fill its ``"auto"`` values from ``cfg`` and the world size."""
    try:
        ds = json.loads(cfg.deepspeed_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {cfg.deepspeed}: invalid JSON ({e})") from None
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    _fill(ds, "train_micro_batch_size_per_gpu", micro, "train_micro_batch_size_per_gpu")
    _fill(ds, "gradient_accumulation_steps", accum, "gradient_accumulation_steps")
    _fill(ds, "train_batch_size", micro * accum * world_size, "train_batch_size",
          f" (per_device_train_batch_size {micro} x gradient_accumulation_steps {accum} x world size {world_size})")
    _fill(ds, "gradient_clipping", cfg.max_grad_norm, "gradient_clipping")
    _fill(ds.setdefault("bf16", {}), "enabled", cfg.bf16, "bf16.enabled")
    if cfg.bf16:  # skip (and count) an update whose gradient norm is not finite, as ZeRO-3 and fp32 always do
        ds["bf16"].setdefault("check_grad_overflow", True)
    if ds.get("fp16", {}).get("enabled") is True:
        raise ConfigError("fp16 is not supported (DPO log-ratios lose too much precision): use `bf16: true`")
    _fill_bucket_sizes(ds.get("zero_optimization", {}), cfg)
    if "optimizer" in ds:
        params = ds["optimizer"].setdefault("params", {})
        _fill(params, "lr", cfg.learning_rate, "optimizer.params.lr")
        _fill(params, "weight_decay", cfg.weight_decay, "optimizer.params.weight_decay")
    else:
        raise ConfigError(f"DeepSpeed config {cfg.deepspeed} has no `optimizer` block (see ds_configs/zero3.json)")
    return ds


def _fill_bucket_sizes(zero: dict, cfg: DPOConfig) -> None:
    """HF Trainer's sizes for ``"auto"`` ZeRO buckets, from the model's hidden size H: reduce bucket H^2, ZeRO-3
    prefetch bucket 0.9 H^2, parameters below 10 H kept whole. Fixed sizes would allocate hundreds of MB of
    buffers for a small model and be too small for a large one."""
    sizes = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
             "stage3_param_persistence_threshold": lambda h: 10 * h}
    auto = [key for key in sizes if zero.get(key) == "auto"]
    if not auto:
        return
    model_config = AutoConfig.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)
    hidden = getattr(model_config.get_text_config(), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ConfigError(f"cannot fill the DeepSpeed config's \"auto\" {auto}: the model config has no "
                          "`hidden_size`; set them to numbers in the DeepSpeed JSON")
    for key in auto:
        zero[key] = sizes[key](hidden)


def reference_deepspeed_config(policy_ds: dict, cfg: DPOConfig) -> dict:
    """Inference-only ZeRO-3 for the reference: no optimizer, parameters on CPU with ``ref_offload``."""
    zero = {"stage": 3, "stage3_param_persistence_threshold": 1e4}
    if cfg.ref_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    keep = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16")
    ref = {key: copy.deepcopy(policy_ds[key]) for key in keep if key in policy_ds}
    return {**ref, "zero_optimization": zero, "steps_per_print": policy_ds.get("steps_per_print", 10**9)}


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def load_model(cfg: DPOConfig, ds_config: dict, trainable: bool) -> tuple[torch.nn.Module, HfDeepSpeedConfig | None]:
    """``from_pretrained`` (the policy's or the reference's checkpoint) under ZeRO-3 partitioning when
    ``ds_config`` is stage 3.

    Returns the model and the ``HfDeepSpeedConfig`` that must be kept alive while transformers/peft should see
    ZeRO-3 as enabled for this model.
    """
    if zero_stage(ds_config) == 3:
        hf_ds = HfDeepSpeedConfig(ds_config)  # registers itself: from_pretrained now partitions under zero.Init
    else:
        hf_ds = None
        unset_hf_deepspeed_config()  # a ZeRO-3 reference built earlier must not partition a ZeRO-1/2 policy
    path = cfg.model_name_or_path if trainable else (cfg.ref_model_name_or_path or cfg.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    model.config.use_cache = False
    if cfg.disable_dropout:
        _disable_dropout(model)
    return enable_token_scoring(model), hf_ds


def _lora(model: torch.nn.Module, cfg: DPOConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """HF's rule: no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name.lower() for k in _NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: DPOConfig, ds_config: dict, trainable: bool, total_steps: int = 0):
    """Build the policy (``trainable``: optimizer, LR schedule, optional LoRA) or a frozen reference engine."""
    model, hf_ds = load_model(cfg, ds_config, trainable)
    if not trainable:
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        engine.hf_deepspeed_config = hf_ds
        return engine
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.use_peft:
        model = _lora(model, cfg)

    def lr_schedule(optimizer):
        # HF semantics (warmup from 0, then linear/cosine decay to 0), unlike DeepSpeed's WarmupLR family, which
        # forces >= 2 warmup steps. A `scheduler` block in the DeepSpeed JSON takes precedence.
        return get_scheduler(cfg.lr_scheduler_type, optimizer,
                             num_warmup_steps=round(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, cfg.weight_decay),
        config=ds_config,
        lr_scheduler=None if "scheduler" in ds_config else lr_schedule,
    )
    engine.hf_deepspeed_config = hf_ds
    return engine


@contextlib.contextmanager
def zero3_disabled():
    """Let transformers build an ordinary, unpartitioned model (for export) while a ZeRO-3 run is alive."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if saved is not None and saved() is not None:
            set_hf_deepspeed_config(saved())


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (None elsewhere); a collective under ZeRO-3."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if torch.distributed.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def release_shm_buffers() -> None:
    """Unlink this rank's shared-memory all-reduce buffers (CPU accelerator only).

    DeepSpeed's CPU shm all-reduce creates ~70 MB per rank under /dev/shm named after the master address and port
    and never unlinks them, so every CPU run would leak them. Call once no rank communicates any more.
    """
    if get_accelerator().device_name() != "cpu":
        return
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    rank = os.environ.get("LOCAL_RANK", "0")
    for buffer in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        buffer.unlink(missing_ok=True)


def release(engine) -> None:
    """Free an engine's parameters and hooks (the precomputed reference, once its log-probs are stored)."""
    engine.destroy()
    del engine
    get_accelerator().empty_cache()
