"""What a model family supports, decided before its weights are loaded: which transformers class builds it, the
attention implementation it can run and whether its sequences may share a row.

Both come from what transformers declares about the model and its config (the class's ``_supports_*`` attention
flags, the config's ``layer_types``), not from a list of families kept here:

- an attention implementation the class does not support (Gemma-2 has no sdpa: sdpa cannot soft-cap attention
  scores) is replaced by ``eager``;
- an encoder-decoder model (``config.is_encoder_decoder``: T5, BART, T5Gemma, ...) is built by
  ``AutoModelForSeq2SeqLM`` and gets the ``seq2seq`` layout: each pair's prompt through the encoder once, chosen and
  rejected as decoder rows reading that one encoder output;
- a vision-language model (a config with a ``vision_config`` that ``AutoModelForImageTextToText`` builds: LLaVA,
  Idefics3, SmolVLM, ...) is built by that class; its images travel with the batch (``ds_dpo.data.images``), and with
  ds_dpo's block attention only its language model gets the block attention (``attention_setting``): its vision
  tower, which some families (LLaVA) hand the forward's keyword arguments too, keeps the plain kernel;
- a stateful model (Mamba-style, linear-attention or short-convolution layers: Falcon-H1, Jamba, Bamba, Zamba,
  Qwen3-Next, LFM2, ...) carries state from one token to the next along the whole row, past any attention mask, so a
  packed row would leak one sequence into the next: such models get the padded layout. Told by the layer kinds its
  config declares (``layer_types``, as transformers' caches read them), by the class's ``_is_stateful`` (transformers
  before 5.25) or by a forward taking a recurrent state (``cache_params``, ``state``: Mamba,
  RWKV).
- a model whose layers read a token's index in the row instead of its position id (Llama-4's attention temperature
  tuning, declared by its config's ``attn_temperature_tuning`` with NoPE layers in ``no_rope_layers``) gets the padded
  layout too: in a packed row every sequence but the first would be computed as if it started where it sits in the row.

- packed and prefix-shared rows use ds_dpo's block attention (``ds_dpo.forward.attention``) where the class runs its
  attention through transformers' interface (``_supports_attention_backend``), else a dense row-wide mask.

Each replacement is printed as a one-line notice. How the model turns hidden states into logits is decided later,
from the loaded model itself (``ds_dpo.forward.scoring.probe_output_head``), and the whole fast path is checked once on the
first micro-batch (``ds_dpo.forward.self_check.scoring_mismatch``).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSeq2SeqLM
from transformers.models.auto.auto_factory import _get_model_class

from ds_dpo.config import ModelConfig
from ds_dpo.forward.attention import BLOCK_ATTENTION, is_block_attention
from ds_dpo.forward.layouts import PADDED, SEQ2SEQ, Layout, layout_for
from ds_dpo.forward.router_loss import router_modules

# attn_implementation -> the class flag that says it is supported
_ATTENTION_FLAGS = {
    "sdpa": "_supports_sdpa",
    "flex_attention": "_supports_flex_attn",
    "flash_attention_2": "_supports_flash_attn",
    "flash_attention_3": "_supports_flash_attn",
}


# `layer_types` entries of layers that carry a state along the row (transformers gives them recurrent cache layers;
# "mamba" is the name before transformers 5.25)
_RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "hybrid", "hybrid_sliding", "conv", "mamba"})


def _is_stateful(cls, config) -> bool:
    if getattr(cls, "_is_stateful", False):
        return True
    layer_types = getattr(config.get_text_config(), "layer_types", None) or ()
    if _RECURRENT_LAYER_TYPES.intersection(layer_types):
        return True
    # a recurrent state passed under its own name (Mamba's cache_params, RWKV's state), not as a KV cache
    return not {"cache_params", "state"}.isdisjoint(inspect.signature(cls.forward).parameters)


def _reads_row_index(config) -> bool:
    """Llama-4's temperature tuning scales the queries of its NoPE layers (``no_rope_layers`` entries 0) by
    ``1 + attn_scale * log(1 + floor((i + 1) / floor_scale))`` with i the token's index in the row, not its position
    id (from ``floor_scale`` tokens on: 8192 in the released models)."""
    text = config.get_text_config()
    return bool(getattr(text, "attn_temperature_tuning", False)) and 0 in (getattr(text, "no_rope_layers", None) or ())


def is_vision_language(config) -> bool:
    return (
        getattr(config, "vision_config", None) is not None
        and type(config) in AutoModelForImageTextToText._model_mapping
    )


def auto_class(config):
    """The transformers auto class that builds a trainable language model of ``config``."""
    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM
    return AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM


def attention_setting(config, attn_implementation: str) -> str | dict[str, str]:
    """What to load a model of ``config`` with for ``attn_implementation``: the name itself, or, for ds_dpo's block
    attention in a model with several sub-models (a vision-language model), the block attention for the model and
    its language model and the inner kernel for every other sub-model (the vision tower)."""
    sub_configs = getattr(config, "sub_configs", None) or {}
    if not is_block_attention(attn_implementation) or not sub_configs:
        return attn_implementation
    inner = next(k for k, v in BLOCK_ATTENTION.items() if v == attn_implementation)
    text = config.get_text_config()
    return {
        "": attn_implementation,
        **{key: attn_implementation if getattr(config, key, None) is text else inner for key in sub_configs},
    }


@dataclass(frozen=True)
class ModelSupport:
    class_name: str
    attn_implementation: str
    """The implementation the run uses (the configured one, or ``eager`` where the class lacks it)."""
    stateful: bool
    """Recurrent state along the row (Mamba-style layers): sequences cannot share a row."""
    reads_row_index: bool = False
    """A layer reads each token's index in the row, not its position id (Llama-4's temperature tuning): sequences
    cannot share a row."""
    attention_backend: bool = False
    """The class runs its attention through transformers' attention interface, passing the forward's keyword
    arguments down (``_supports_attention_backend``): it can take ds_dpo's block attention."""
    encoder_decoder: bool = False
    """The prompt goes through an encoder, completions through a decoder that reads it (the ``seq2seq`` layout)."""
    vision: bool = False
    """A vision-language model: the model's processor tokenizes, its images travel with the batch."""
    notices: tuple[str, ...] = ()
    config: Any = field(default=None, repr=False, compare=False)
    """The model's transformers config."""

    def attention_for(self, layout: Layout, sequence_parallel: bool = False) -> tuple[str, str | None]:
        """The attention implementation to load the model with for ``layout``, and a notice when a packed row has to
        fall back to a dense [S, S] mask. Sequence-parallel runs take the block attention in every layout (a padded
        row is one block there: ``ds_dpo.forward.sequence_parallel``)."""
        attn = self.attn_implementation
        if (not layout.padding_free and not sequence_parallel) or attn not in BLOCK_ATTENTION:
            return attn, None
        if not self.attention_backend:
            return attn, (
                f"{self.class_name} cannot take a custom attention function: each packed row gets a dense "
                "[S, S] mask, whose cost grows with the square of the row"
            )
        return BLOCK_ATTENTION[attn], None

    def layout(self, padding_free: bool, prefix_sharing: bool) -> tuple[Layout, str | None]:
        """The batch layout for this model and a notice when it differs from the configured one."""
        if self.encoder_decoder:  # the prompt is computed once per pair by the model's own design
            return SEQ2SEQ, None
        wanted = layout_for(padding_free, prefix_sharing)
        if wanted.padding_free and (self.stateful or self.reads_row_index):
            why = (
                "has recurrent (state-space) layers, which carry state across sequence boundaries"
                if self.stateful
                else "scales attention by each token's index in the row (attn_temperature_tuning), not its position, "
                "which is wrong for every sequence but the first"
            )
            return (
                PADDED,
                f"{self.class_name} {why} in a {wanted} row: batches are padded (as with `padding_free: false`)",
            )
        return wanted, None


def inspect_model(cfg: ModelConfig, device_type: str = "cuda") -> ModelSupport:
    """``ModelSupport`` of the policy checkpoint on ``device_type``, from its config (no weights are read)."""
    config = AutoConfig.from_pretrained(cfg.model_name_or_path, **cfg.source)
    return model_support(config, cfg.attn_implementation, device_type)


def model_support(config, attn_implementation: str, device_type: str = "cuda") -> ModelSupport:
    """``ModelSupport`` of the class ``auto_class(config)`` builds for ``config``; a class that cannot be told in
    advance (remote code) is taken as it is configured."""
    attn, notices = attn_implementation, []
    if attn == "flex_attention" and device_type == "cpu":
        notices.append("FlexAttention cannot train on CPU (torch has no CPU backward for it); using 'sdpa'")
        attn = "sdpa"
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    try:
        cls = _get_model_class(config, auto_class(config)._model_mapping)
    except (KeyError, ValueError):
        name = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        return ModelSupport(
            name, attn, stateful=False, encoder_decoder=encoder_decoder, notices=tuple(notices), config=config
        )
    flag = _ATTENTION_FLAGS.get(attn)
    if flag is not None and not getattr(cls, flag, False):
        notices.append(f"{cls.__name__} does not support attn_implementation {attn!r}; using 'eager'")
        attn = "eager"
    return ModelSupport(
        cls.__name__,
        attn,
        stateful=_is_stateful(cls, config),
        reads_row_index=_reads_row_index(config),
        attention_backend=bool(getattr(cls, "_supports_attention_backend", False)),
        encoder_decoder=encoder_decoder,
        vision=is_vision_language(config),
        notices=tuple(notices),
        config=config,
    )


def moe_block_classes(model: torch.nn.Module) -> list[str]:
    """Fully qualified class names of the modules that hold a router (the MoE blocks). Under ZeRO-3 they must be
    leaf modules, gathered whole: otherwise each rank fetches only the experts its tokens chose, and ranks that
    chose differently wait for each other forever."""
    routers = {id(m) for m in router_modules(model)[0]}
    blocks = {type(parent) for parent in model.modules() if any(id(child) in routers for child in parent.children())}
    return sorted(f"{cls.__module__}.{cls.__qualname__}" for cls in blocks)
