"""DeepSpeed engines for the policy and the reference: the one module that builds them.

The policy and a separate reference come from the same function, ``build_engine``, with ``trainable`` telling them
apart. Under ZeRO-3 the model is created inside ``deepspeed.zero.Init`` (through transformers' ``HfDeepSpeedConfig``)
so it is never whole on one device. The reference engine is always ZeRO-3 (sharded even when the policy runs
ZeRO-1/2, where TRL and OpenRLHF replicate it), has no optimizer, and runs in eval mode under ``no_grad``.
"""

from __future__ import annotations

import datetime
import functools
import os
import time
from pathlib import Path

# Model code must be imported before deepspeed.zero.Init patches module construction: importing it inside fails
# with a torch._dynamo "Signature mismatch" TypeError (seen with transformers 5.24 / torch 2.13).
import torch
import torch._dynamo  # noqa: F401
import deepspeed
from deepspeed.accelerator import get_accelerator
from transformers import AutoConfig, PretrainedConfig, get_scheduler
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

from ds_dpo.activation_memory import tile_mlps
from ds_dpo.config import DPOConfig, ModelConfig
from ds_dpo.ds_config import zero_stage
from ds_dpo.logprobs import enable_token_scoring
from ds_dpo.model_support import attention_setting, auto_class, moe_block_classes
from ds_dpo.sequence_parallel import SequenceParallel

_NO_DECAY = ("bias", "norm")


def _cache_cpu_info() -> None:
    """DeepSpeed's CPU op builders (CPU Adam for offload, Adam and the shared-memory all-reduce on CPU machines) ask
    py-cpuinfo for the CPU's features twice per op load, and each ask starts a Python subprocess (~1.2 s on 2 cores,
    per rank and op): ask once per process. The answer cannot change while the process runs."""
    try:
        import cpuinfo
    except ImportError:  # DeepSpeed then falls back to lscpu
        return
    if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
        cpuinfo.get_cpu_info = functools.cache(cpuinfo.get_cpu_info)


_cache_cpu_info()


def clear_stale_build_locks(max_age_s: float = 600) -> list[Path]:
    """Remove the ``lock`` files of DeepSpeed op builds (torch's extension directory) older than ``max_age_s``.

    Every process that loads a JIT-built op (CPU Adam, the CPU shared-memory all-reduce, ...) holds ``<op>/lock``
    while ninja checks the build, about a second when it is built, minutes when it is not. A process killed in
    that window leaves the file behind, and every later process that loads the op waits for it to go, forever and
    without a word. A build takes about 3 min on 2 cores: an older lock is stale."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:  # <op>/lock, or <python_device>/<op>/lock
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # another rank removed it, or its build finished
            continue
    for lock in removed:
        print(f"ds_dpo: removed a stale DeepSpeed op build lock ({lock}), left by a process killed while loading the "
              "op", flush=True)
    return removed


def init_distributed(timeout_s: int = 1800) -> tuple[int, int, int]:
    """Initialise torch.distributed (NCCL on GPUs, gloo on CPU); return (rank, world_size, local_rank).

    ``timeout_s`` bounds every collective: a rank that dies makes the others fail after it instead of waiting forever.
    """
    clear_stale_build_locks()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank)
    return rank, world, local_rank


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _zero_dropout_rates(config: PretrainedConfig) -> None:
    """Every dropout rate of ``config`` and its sub-configs set to 0, before the model is built: many models apply
    attention dropout (T5, Llama-style ``attention_dropout``), and BART-style models all their dropout, as a
    functional call with a rate read from the config, which no ``Dropout`` module carries."""
    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _zero_dropout_rates(value)
        elif isinstance(value, float) and ("dropout" in name or "pdrop" in name):
            setattr(config, name, 0.0)


def load_model(cfg: DPOConfig, ds_config: dict, trainable: bool,
               attn_implementation: str | None = None) -> tuple[torch.nn.Module, HfDeepSpeedConfig | None]:
    """``from_pretrained`` (the policy's or the reference's checkpoint) under ZeRO-3 partitioning when
    ``ds_config`` is stage 3, with ``attn_implementation`` (default: the configured one).

    Returns the model and the ``HfDeepSpeedConfig`` that must be kept alive while transformers/peft should see
    ZeRO-3 as enabled for this model.
    """
    if zero_stage(ds_config) == 3:
        hf_ds = HfDeepSpeedConfig(ds_config)  # registers itself: from_pretrained now partitions under zero.Init
    else:
        hf_ds = None
        unset_hf_deepspeed_config()  # a ZeRO-3 reference built earlier must not partition a ZeRO-1/2 policy
    m = cfg.model
    path = m.model_name_or_path if trainable else cfg.ref_model_path
    config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    if m.disable_dropout:
        _zero_dropout_rates(config)
    model = auto_class(config).from_pretrained(
        path,
        config=config,
        dtype=torch.bfloat16 if m.bf16 else torch.float32,
        attn_implementation=attention_setting(config, attn_implementation or m.attn_implementation),
        trust_remote_code=m.trust_remote_code,
    )
    model.config.use_cache = False
    if m.disable_dropout:
        _disable_dropout(model)
    tile_mlps(model, m.tiled_mlp_shards)
    return enable_token_scoring(model), hf_ds


def lora_config(cfg: ModelConfig, encoder_decoder: bool = False):
    """The peft ``LoraConfig`` of the run's LoRA keys (for an encoder-decoder model with ``encoder_decoder``)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules,
                      task_type="SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM")


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Fix the weights of a vision-language model's vision encoder (the module built from its ``vision_config``);
    returns the number of parameters frozen (0 for other models)."""
    vision_config = getattr(model.config, "vision_config", None)
    towers = [m for m in model.modules() if vision_config is not None and getattr(m, "config", None) is vision_config]
    if not towers:
        return 0
    towers[0].requires_grad_(False)  # the outermost: modules() lists parents before their children
    return sum(p.numel() if not hasattr(p, "ds_numel") else p.ds_numel for p in towers[0].parameters())


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """HF's rule: no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if any(k in name.lower() for k in _NO_DECAY) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def with_moe_leaf_modules(ds_config: dict, model: torch.nn.Module) -> dict:
    """``ds_config`` with the model's MoE blocks added to ZeRO-3's leaf modules (kept: the user's own and DeepSpeed's
    defaults)."""
    blocks = moe_block_classes(model)
    if zero_stage(ds_config) != 3 or not blocks:
        return ds_config
    from deepspeed.runtime.zero.leaf_module_config import DEFAULT_LEAF_MODULE_CLASSES

    zero = dict(ds_config["zero_optimization"])
    leaf = dict(zero.get("leaf_module") or {})
    classes = leaf.get("classes", list(DEFAULT_LEAF_MODULE_CLASSES))
    classes = [classes] if isinstance(classes, str) else list(classes)
    leaf["classes"] = classes + [block for block in blocks if block not in classes]
    return {**ds_config, "zero_optimization": {**zero, "leaf_module": leaf}}


def _with_adapter(cfg: DPOConfig, model: torch.nn.Module, trainable: bool) -> torch.nn.Module:
    """The policy with its LoRA adapters (fresh, or ``adapter_name_or_path`` to train on); a reference of the same
    base with the starting adapter, frozen."""
    from peft import PeftModel, get_peft_model

    if cfg.model.adapter_name_or_path is None:
        return get_peft_model(model, lora_config(cfg.model, model.config.is_encoder_decoder))
    return PeftModel.from_pretrained(model, cfg.model.adapter_name_or_path, is_trainable=trainable)


def build_engine(cfg: DPOConfig, ds_config: dict, trainable: bool, total_steps: int = 0,
                 attn_implementation: str | None = None, sp: SequenceParallel | None = None):
    """Build the policy (``trainable``: optimizer, LR schedule, optional LoRA) or a frozen reference engine; with
    ``sp``, its forwards are sequence-parallel (``ds_dpo.sequence_parallel``)."""
    model, hf_ds = load_model(cfg, ds_config, trainable, attn_implementation)
    model._ds_dpo_sequence_parallel = sp  # read by concatenated_forward (through peft: the causal LM's own)
    ds_config = with_moe_leaf_modules(ds_config, model)
    if not trainable:
        if cfg.model.adapter_name_or_path and cfg.ref.ref_model_name_or_path is None:
            model = _with_adapter(cfg, model, trainable=False)
        model.requires_grad_(False)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        engine.hf_deepspeed_config, engine.ds_config_dict = hf_ds, ds_config
        return engine
    if cfg.model.freeze_vision_tower:
        freeze_vision_tower(model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.use_peft:
        model = _with_adapter(cfg, model, trainable=True)
        if cfg.model.disable_dropout:  # the adapters' dropout too, as TRL does after wrapping the model with peft
            _disable_dropout(model)
    optim = cfg.optim

    def lr_schedule(optimizer):
        # HF semantics (warmup from 0, then linear/cosine decay to 0), unlike DeepSpeed's WarmupLR family, which
        # forces >= 2 warmup steps. A `scheduler` block in the DeepSpeed JSON takes precedence.
        return get_scheduler(optim.lr_scheduler_type, optimizer,
                             num_warmup_steps=round(optim.warmup_ratio * total_steps), num_training_steps=total_steps)

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, optim.weight_decay),
        config=ds_config,
        lr_scheduler=None if "scheduler" in ds_config else lr_schedule,
    )
    engine.hf_deepspeed_config, engine.ds_config_dict = hf_ds, ds_config
    # from_pretrained returns a model in eval mode, where transformers skips gradient checkpointing (and dropout,
    # where it is not disabled): the policy trains in train mode, as in TRL
    engine.train()
    return engine


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
