"""Will it fit? Memory per device of a run, from the model's config and the run's keys, before anything is loaded.

The model is built on the ``meta`` device (no weights, no memory) to count its parameters and find its largest
layer. Per device, for a ZeRO stage, offload and gradient checkpointing:

- model states of the policy: DeepSpeed's own accounting (``estimate_zero2/3_model_states_mem_needs``: with bf16,
  2 bytes of 16-bit weights plus 16-18 per trainable parameter of gradients, fp32 master weights and Adam's two
  moments, the partitioned part divided over the ranks; ZeRO-3 gathers the largest layer's 16-bit weights and
  gradients whole), generalised to fp32 runs and to LoRA (the frozen base carries weights only);
- the reference: a ZeRO-3 inference engine holds its 1/world of the weights (none on the device with
  ``ref_offload``), the LoRA base and precomputed log-probs add nothing while training;
- DeepSpeed's communication buckets (reduce, all-gather or prefetch);
- activations of one micro-batch (tokens per rank from the layout, the pair lengths and ``sequence_parallel_size``):
  what backward keeps of each decoder layer (with gradient checkpointing: each layer's input, and one layer
  recomputed at a time), the MLP's part cut by ``tiled_mlp_shards``; attention scores only where the kernel
  materialises them (``eager``);
- log-probs: fp32 logits, log-softmax and their gradient for one chunk of ``logps_chunk_size`` scored tokens (or all
  of them without chunking).

Not counted: the CUDA context and allocator fragmentation (keep a reserve: ``reserve_gb``), mixture-of-experts
routing imbalance (experts are counted as dense weights; their activations as ``num_experts_per_tok`` MLPs).
``benchmarks/estimate_check.py`` compares these numbers with measured runs (docs/deepspeed.md, "Will it fit?").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ds_dpo.config import ConfigError, DPOConfig
from ds_dpo.forward.layouts import Layout
from ds_dpo.forward.logprobs import chunk_size

GiB = 2**30


@dataclass(frozen=True)
class ModelShape:
    params: int
    largest_layer_params: int
    """The parameters of the largest single module (ZeRO-3 gathers one module's weights at a time)."""
    layers: int
    hidden: int
    intermediate: int
    """MLP width per token (for mixture-of-experts: active experts x expert width, plus any shared expert)."""
    heads: int
    kv_width: int
    """Key + value width per token of one of K or V (key-value heads x head dim)."""
    vocab: int

    @classmethod
    def of(cls, config) -> ModelShape:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())  # tied weights are one parameter
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        text = config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        experts_per_token = getattr(text, "num_experts_per_tok", 0) or 0
        width = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
        if experts_per_token:
            expert = getattr(text, "moe_intermediate_size", None) or width
            width = experts_per_token * expert + (getattr(text, "shared_expert_intermediate_size", 0) or 0)
        return cls(
            params,
            largest,
            text.num_hidden_layers,
            text.hidden_size,
            width,
            heads,
            kv_heads * head_dim,
            text.vocab_size,
        )


@dataclass(frozen=True)
class Setup:
    """One way to run: what the estimator varies."""

    zero_stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False

    def describe(self) -> str:
        offload = ("params+optimizer" if self.offload_params else "optimizer") if self.offload_optimizer else "none"
        return (
            f"ZeRO-{self.zero_stage}, offload {offload}, checkpointing {'on' if self.gradient_checkpointing else 'off'}"
        )


# fastest first: the first of these that fits is the verdict
CANDIDATES = [
    Setup(1),
    Setup(2),
    Setup(3),
    Setup(1, gradient_checkpointing=True),
    Setup(2, gradient_checkpointing=True),
    Setup(3, gradient_checkpointing=True),
    Setup(3, offload_optimizer=True, gradient_checkpointing=True),
    Setup(3, offload_optimizer=True, offload_params=True, gradient_checkpointing=True),
]


@dataclass(frozen=True)
class Workload:
    """What one micro-batch of the run looks like to memory."""

    world: int
    gpus_per_node: int
    bf16: bool
    trainable_params: int | None
    """None: all (full fine-tuning); else the LoRA adapters' count."""
    reference: str
    """``zero``, ``lora``, ``precomputed`` or ``none``."""
    ref_offload: bool
    layout: Layout
    pairs: int
    prompt_tokens: int
    completion_tokens: int
    """Per completion (chosen and rejected alike)."""
    max_tokens_per_batch: int | None
    logps_chunk_size: int
    sequence_parallel: int
    tiled_mlp_shards: int
    attention: str

    def row_tokens(self) -> int:
        """Tokens of one micro-batch on one rank."""
        p, c = self.prompt_tokens, self.completion_tokens
        per_pair = self.layout.forward_tokens(p, c, c)
        total = self.pairs * per_pair
        if self.max_tokens_per_batch:
            total = min(total, max(self.max_tokens_per_batch, per_pair))
        return math.ceil(total / self.sequence_parallel)


@dataclass(frozen=True)
class Estimate:
    setup: Setup
    parts: dict[str, float]
    """Bytes per device by part."""
    cpu_bytes_per_node: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def model_states(shape: ModelShape, setup: Setup, work: Workload) -> tuple[float, float]:
    """The policy's weights, gradients and optimizer states per device, and per node in CPU memory (offload):
    DeepSpeed's own estimators for bf16 full fine-tuning under ZeRO-1/2/3, ``own_model_states`` otherwise."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if not (work.bf16 and work.trainable_params is None and setup.zero_stage in (1, 2, 3)):
        return own_model_states(shape, setup, work)
    nodes = max(1, work.world // work.gpus_per_node)
    if setup.zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            shape.params,
            shape.largest_layer_params,
            work.gpus_per_node,
            nodes,
            setup.offload_optimizer,
            setup.offload_params,
            zero_init=True,
            additional_buffer_factor=1.0,
        )
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            shape.params, work.gpus_per_node, nodes, setup.offload_optimizer, additional_buffer_factor=1.0
        )
    return gpu, float(cpu) if setup.offload_optimizer else 0.0


def own_model_states(shape: ModelShape, setup: Setup, work: Workload) -> tuple[float, float]:
    """DeepSpeed's accounting, for any precision and trainable share. Per trainable parameter, besides its weight:
    bf16 keeps fp32 master weights, fp32 gradients and Adam's two moments (16 bytes; ZeRO-1/2 also a 16-bit gradient
    in the partition: 18); fp32 keeps gradients and the moments (12), and under ZeRO-1/2 a master copy of its
    partition as well (16: stage 1/2 clone the weights where ZeRO-3 reuses fp32 ones; stage 0 keeps none: 12). Frozen parameters (a LoRA
    base) hold their weight only. ZeRO-3 gathers the largest layer's weights and gradients whole."""
    weight = 2 if work.bf16 else 4
    trainable = shape.params if work.trainable_params is None else work.trainable_params
    world, nodes = work.world, max(1, work.world // work.gpus_per_node)
    if setup.zero_stage == 3:
        states = (16 if work.bf16 else 12) * trainable
        device = (
            (0 if setup.offload_params else weight * shape.params / world)
            + 2 * weight * shape.largest_layer_params
            + (0 if setup.offload_optimizer else states / world)
        )
    else:
        states = (18 if work.bf16 else 16 if setup.zero_stage else 12) * trainable
        device = weight * shape.params + (0 if setup.offload_optimizer else states / (world if setup.zero_stage else 1))
    cpu = states + (weight * shape.params if setup.offload_params else 0)
    return device, cpu / nodes if setup.offload_optimizer else 0.0


def estimate(shape: ModelShape, setup: Setup, work: Workload) -> Estimate:
    weight = 2 if work.bf16 else 4
    states, cpu = model_states(shape, setup, work)
    parts = {"model states": states}
    if work.reference == "zero":
        parts["reference"] = (
            0 if work.ref_offload else weight * shape.params / work.world
        ) + 2 * weight * shape.largest_layer_params
    h, bucket = shape.hidden, shape.hidden**2  # DeepSpeed's "auto" bucket sizes are about hidden^2 elements
    parts["buffers"] = (
        weight * 2 * bucket
        if setup.zero_stage == 3
        else weight * (bucket + 5e7)
        if setup.zero_stage in (1, 2)
        else weight * bucket
    )

    t = work.row_tokens()
    # What autograd keeps of one decoder layer, per token: 8 h + 2 kv + 4 i values (counted with saved-tensor hooks
    # on Llama layers through sdpa: norms, projections' inputs, rotary, attention in/out; the MLP's gate, up,
    # activation and product), within 1% for five shapes from 512 to 2048 wide. A tiled MLP keeps only its input,
    # and in a recompute holds one slice's 4 i.
    mlp = 4 * shape.intermediate / work.tiled_mlp_shards
    layer = weight * t * (8 * h + 2 * shape.kv_width + mlp)
    if work.tiled_mlp_shards > 1 and not setup.gradient_checkpointing:
        layer = weight * t * (8 * h + 2 * shape.kv_width)
    heads = shape.heads / work.sequence_parallel
    scores = 0.0
    if work.attention == "eager":
        scores = 2 * weight * heads * t * min(t, 2 * (work.prompt_tokens + work.completion_tokens))
    if setup.gradient_checkpointing:
        activations = shape.layers * weight * t * h + 2 * (layer + scores)  # inputs kept; one layer and its grads
    else:
        activations = shape.layers * (layer + scores)
    parts["activations"] = activations + 3 * weight * t * h  # embeddings, final norm, their gradients
    scored = work.pairs * 2 * work.completion_tokens / work.sequence_parallel
    chunk = min(work.logps_chunk_size, scored) if work.logps_chunk_size else scored
    parts["logits"] = 3 * 4 * chunk * shape.vocab
    return Estimate(setup, parts, cpu)


# ``deepspeed: auto``'s candidates and their presets.
AUTO_PRESETS = {
    Setup(0): "ds_configs/ddp.json",
    Setup(2): "ds_configs/zero2.json",
    Setup(3): "ds_configs/zero3.json",
    Setup(3, offload_optimizer=True, offload_params=True): "ds_configs/zero3_offload.json",
}


def auto_setup(shape: ModelShape, work: Workload, checkpointing: bool, budget: float) -> tuple[Setup, Estimate, bool]:
    """``deepspeed: auto``'s pick for ``budget`` bytes per device: the setup, its estimate, and whether it fits (the
    last candidate, offloading everything, when nothing does)."""
    # With the run's own gradient checkpointing. On one rank ZeRO partitions nothing and its stages only add copies
    # (flat fp32 partitions beside the weights): plain DeepSpeed (stage 0) is the leanest and fastest, and offload
    # the way out. On several, ZeRO-2 moves as many bytes as plain data parallelism (reduce-scatter + all-gather =
    # all-reduce) and keeps 1/world of the optimizer states, so it goes first; ZeRO-3, then offload, when the model
    # states do not fit.
    stages = [0, "offload"] if work.world == 1 else [2, 3, "offload"]
    candidates = [s for s in AUTO_PRESETS if (s.zero_stage if not s.offload_params else "offload") in stages]
    for setup in candidates:
        setup = replace(setup, gradient_checkpointing=checkpointing)
        found = estimate(shape, setup, work)
        if found.total <= budget:
            return setup, found, True
    return setup, found, False


def auto_preset(setup: Setup) -> str:
    return AUTO_PRESETS[replace(setup, gradient_checkpointing=False)]


def table(estimates: list[Estimate], budget_gb: float) -> str:
    parts = list(estimates[0].parts)
    lines = [
        "| setup | " + " | ".join(parts) + " | total per device | CPU per node | fits |",
        "|---|" + "---|" * (len(parts) + 3),
    ]
    for e in estimates:
        lines.append(
            f"| {e.setup.describe()} | "
            + " | ".join(f"{e.parts[p] / GiB:.2f}" for p in parts)
            + f" | {e.total / GiB:.2f} GiB | {e.cpu_bytes_per_node / GiB:.1f} GiB | "
            + ("yes" if e.total <= budget_gb * GiB else "no")
            + " |"
        )
    return "\n".join(lines)


def lora_params(cfg: DPOConfig, config) -> int:
    """The LoRA adapters' parameter count for the run's LoRA keys (peft on the meta-device model)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from ds_dpo.models.engines import lora_config

    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config), lora_config(cfg.model))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def workload(
    cfg: DPOConfig,
    config,
    world: int,
    gpus_per_node: int,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    device: str = "cuda",
) -> Workload:
    """The run's micro-batch as the estimator sees it; pair lengths default to the longest the length keys allow
    (prompt ``max_prompt_length`` or half of ``max_length``, each completion the rest)."""
    from ds_dpo.models.support import model_support

    data, batch = cfg.data, cfg.batch
    longest = data.max_length or 2048
    prompt = prompt_tokens or min(data.max_prompt_length or longest // 2, longest - 1)
    completion = completion_tokens or min(data.max_completion_length or longest, longest - prompt)
    support = model_support(config, cfg.model.attn_implementation, device)
    if support.encoder_decoder:
        raise ConfigError(
            f"{support.class_name} is an encoder-decoder model; the estimator counts decoder-only "
            "models' activations and does not estimate it"
        )
    layout, _ = support.layout(batch.padding_free, batch.prefix_sharing)
    reference = (
        "none"
        if not cfg.loss.needs_reference
        else ("precomputed" if cfg.ref.precompute_ref_log_probs else cfg.ref.reference)
    )
    return Workload(
        world=world,
        gpus_per_node=gpus_per_node,
        bf16=cfg.model.bf16,
        trainable_params=lora_params(cfg, config) if cfg.model.use_peft else None,
        reference=reference,
        ref_offload=cfg.ref.ref_offload,
        layout=layout,
        pairs=cfg.optim.per_device_train_batch_size,
        prompt_tokens=prompt,
        completion_tokens=completion,
        max_tokens_per_batch=batch.max_tokens_per_batch,
        logps_chunk_size=chunk_size(batch.logps_chunk_size, config),
        sequence_parallel=cfg.parallel.sequence_parallel_size,
        tiled_mlp_shards=cfg.model.tiled_mlp_shards,
        attention=support.attn_implementation,
    )


def setup_of(cfg: DPOConfig, ds_config: dict) -> Setup:
    """The run's own setup, from its DeepSpeed config and keys."""
    zero = ds_config.get("zero_optimization", {})
    offloaded = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa: E731
    return Setup(
        int(zero.get("stage", 0)),
        offloaded("offload_optimizer"),
        offloaded("offload_param"),
        cfg.model.gradient_checkpointing,
    )
