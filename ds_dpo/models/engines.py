"""DeepSpeed engines for the policy and the reference: the one module that builds them.

The policy and a separate reference come from the same function, ``build_engine``, with ``trainable`` telling them
apart. Under ZeRO-3 the model is created inside ``deepspeed.zero.Init`` (through transformers' ``HfDeepSpeedConfig``)
so it is never whole on one device. The reference engine is always ZeRO-3 (sharded even when the policy runs
ZeRO-1/2, where TRL and OpenRLHF replicate it), has no optimizer, and runs in eval mode under ``no_grad``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from typing import NamedTuple

import deepspeed

# Model code must be imported before deepspeed.zero.Init patches module construction: importing it inside fails
# with a torch._dynamo "Signature mismatch" TypeError (seen with transformers 5.24 / torch 2.13).
import torch
import torch._dynamo  # noqa: F401
from deepspeed.accelerator import get_accelerator
from transformers import AutoConfig, BitsAndBytesConfig, PretrainedConfig, get_scheduler
from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config
from transformers.models.auto.configuration_auto import model_type_to_module_name

from ds_dpo.config import DPOConfig, ModelConfig
from ds_dpo.config.schema import DECIDED_BY_KEYS, source_kwargs
from ds_dpo.models.activation_memory import tile_mlps
from ds_dpo.models.compilation import compile_layers
from ds_dpo.models.ds_config import zero_stage
from ds_dpo.models.support import attention_setting, auto_class, moe_block_classes

_NO_DECAY = ("bias", "norm")


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


def _import_model_code(config: PretrainedConfig) -> None:
    """The modeling modules of ``config`` and its sub-configs (a vision-language model's language model and vision
    tower, which the outer model builds by their config) imported before ``deepspeed.zero.Init``. A module class
    first defined inside zero.Init has DeepSpeed's construction hook wrapped around the ``__init__`` it has when its
    body ends, and leaving zero.Init puts that one back: what a class decorator installed after the body is undone.
    transformers 5.25's ``kernels`` wrappers are such a decorator (``LlamaAttention``), so every later instance lacks
    its ``_kernel_funcs`` and its forward raises AttributeError."""
    for sub in (getattr(config, name, None) for name in getattr(config, "sub_configs", {})):
        if isinstance(sub, PretrainedConfig):
            _import_model_code(sub)
    module = model_type_to_module_name(config.model_type)
    with contextlib.suppress(ModuleNotFoundError):  # remote code: imported with its class, before zero.Init
        importlib.import_module(f"transformers.models.{module}.modeling_{module}")


def load_model(
    cfg: DPOConfig, ds_config: dict, trainable: bool, attn_implementation: str | None = None
) -> tuple[torch.nn.Module, HfDeepSpeedConfig | None]:
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
    init_kwargs = (m.model_init_kwargs or {}) if trainable else cfg.ref_init_kwargs
    config = AutoConfig.from_pretrained(path, **source_kwargs(init_kwargs, m.trust_remote_code))
    if m.disable_dropout:
        _zero_dropout_rates(config)
    _import_model_code(config)
    dtype = torch.bfloat16 if m.bf16 else torch.float32
    model = auto_class(config).from_pretrained(
        path,
        **{k: v for k, v in init_kwargs.items() if k not in DECIDED_BY_KEYS},  # validated: they agree with the keys
        config=config,
        dtype=dtype,
        attn_implementation=attention_setting(config, attn_implementation or m.attn_implementation),
        trust_remote_code=m.trust_remote_code,
        quantization_config=quantization_config(m, dtype) if trainable else None,
    )
    model.config.use_cache = False
    if trainable and m.load_in_4bit:
        _no_cpu_inference_packing(model)
        _release_checkpoint_file(model)
    if m.disable_dropout:
        _disable_dropout(model)
    tile_mlps(model, m.tiled_mlp_shards)
    return model, hf_ds


def quantization_config(cfg: ModelConfig, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """The 4-bit base of QLoRA (``load_in_4bit``), as TRL's ``get_quantization_config`` builds it: computing in the
    run's dtype, so that the 4-bit layers' outputs have the dtype of the rest of the model."""
    if not cfg.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.use_bnb_nested_quant,
        bnb_4bit_quant_storage=cfg.bnb_4bit_quant_storage,
    )


def _no_cpu_inference_packing(model: torch.nn.Module) -> None:
    """Keep every 4-bit layer in its trainable format. On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a
    4-bit layer for its CPU inference kernel the first time the layer runs in eval mode without grad (a reference,
    self-check or evaluation pass), in place and for good; that kernel has no backward, so every later training
    step would pass no gradient through the base layers to the adapters below them (torch only warns that
    ``bitsandbytes::gemv_4bit`` has no autograd kernel)."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _release_checkpoint_file(model: torch.nn.Module) -> None:
    """Copy a 4-bit model's full-precision CPU tensors (embeddings, norms, output layer) out of the memory-mapped
    checkpoint they are views of. While one view lives, the whole file stays mapped, and every page quantizing the
    other weights read stays resident: for SmolLM2-135M on CPU ~400 MiB, more than the 4 bits saved."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.dtype.is_floating_point:
            tensor.data = tensor.data.clone()


def lora_config(cfg: ModelConfig, encoder_decoder: bool = False):
    """The peft ``LoraConfig`` of the run's LoRA keys (for an encoder-decoder model with ``encoder_decoder``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM",
    )


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


class Built(NamedTuple):
    """What ``build_engine`` returns."""

    engine: deepspeed.DeepSpeedEngine
    ds_config: dict
    """The DeepSpeed config the engine was built with (the run's, plus the model's MoE leaf modules)."""
    zero3: HfDeepSpeedConfig | None
    """transformers' ZeRO-3 registration for this model (a weak reference there): kept alive with the engine so that
    transformers and peft see ZeRO-3 as enabled for as long as the engine runs (None: not ZeRO-3)."""


def build_engine(
    cfg: DPOConfig,
    ds_config: dict,
    trainable: bool,
    total_steps: int = 0,
    attn_implementation: str | None = None,
    prepare: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> Built:
    """Build the policy (``trainable``: optimizer, LR schedule, optional LoRA) or a frozen reference engine.

    ``prepare`` is applied to the loaded model before anything wraps it (the training recipe installs its scoring
    forward there): modules it adds are part of the model when DeepSpeed sets up its ZeRO-3 hooks."""
    model, hf_ds = load_model(cfg, ds_config, trainable, attn_implementation)
    if prepare is not None:
        model = prepare(model)
    ds_config = with_moe_leaf_modules(ds_config, model)
    if not trainable:
        if cfg.model.adapter_name_or_path and cfg.ref.ref_model_name_or_path is None:
            model = _with_adapter(cfg, model, trainable=False)
        model.requires_grad_(False)
        if cfg.model.torch_compile:
            compile_layers(model)
        engine, *_ = deepspeed.initialize(model=model, config=ds_config)
        engine.eval()
        return Built(engine, ds_config, hf_ds)
    if cfg.model.freeze_vision_tower:
        freeze_vision_tower(model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.use_peft:
        model = _with_adapter(cfg, model, trainable=True)
        if cfg.model.disable_dropout:  # the adapters' dropout too, as TRL does after wrapping the model with peft
            _disable_dropout(model)
    if cfg.model.torch_compile:  # last: the layers are compiled as they will run, adapters and checkpointing included
        compile_layers(model, cfg.model.router_aux_loss_coef)
    optim = cfg.optim

    def lr_schedule(optimizer):
        # HF semantics (warmup from 0, then linear/cosine decay to 0), unlike DeepSpeed's WarmupLR family, which
        # forces >= 2 warmup steps. A `scheduler` block in the DeepSpeed JSON replaces it (``ds_config``).
        return get_scheduler(
            optim.lr_scheduler_type,
            optimizer,
            num_warmup_steps=optim.warmup(total_steps),
            num_training_steps=total_steps,
            scheduler_specific_kwargs=optim.lr_scheduler_kwargs,
        )

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, optim.weight_decay),
        config=ds_config,
        lr_scheduler=None if "scheduler" in ds_config else lr_schedule,
    )
    # from_pretrained returns a model in eval mode, where transformers skips gradient checkpointing (and dropout,
    # where it is not disabled): the policy trains in train mode, as in TRL
    engine.train()
    return Built(engine, ds_config, hf_ds)


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full model state dict on rank 0 (None elsewhere); a collective under ZeRO-3."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    if torch.distributed.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def release(engine) -> None:
    """Free an engine's parameters and hooks (the precomputed reference, once its log-probs are stored)."""
    engine.destroy()
    del engine
    get_accelerator().empty_cache()
