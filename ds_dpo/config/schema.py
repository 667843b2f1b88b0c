"""The run configuration's schema: one typed dataclass per concern, behind flat YAML/command-line keys.

Users type flat keys named as in TRL's ``DPOConfig`` and HF ``TrainingArguments`` (``beta``, ``learning_rate``,
``max_length``, ...); each key belongs to exactly one section, and the code reads ``cfg.loss.beta``,
``cfg.optim.learning_rate``, ``cfg.data.max_length``. Every default lives here, on its field, with its docstring,
except the loss's, which live on ``ds_dpo.losses.LossConfig`` (the losses take that object directly).

Keys that take one of a few names are typed ``Literal`` (the names are read from the annotation wherever they are
needed); ``validate`` checks everything that can be checked without a model, data or world size, once, at startup.
Loading from YAML and the command line is ``ds_dpo.config.cli``; the keys' reference table is ``ds_dpo.config.docs``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ds_dpo.losses import LossConfig

DatasetFormat = Literal["explicit", "implicit", "conversational", "tokenized", "ranked"]
ResponsePairing = Literal["best_vs_worst", "best_vs_rest", "all_pairs"]
TruncationMode = Literal["keep_end", "keep_start"]
ReferenceMode = Literal["zero", "lora", "precomputed"]
# transformers' schedulers that step with the optimizer (not reduce_lr_on_plateau, which needs a metric)
LRSchedulerType = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
]
BadRows = Literal["error", "skip"]
Bnb4bitQuantType = Literal["nf4", "fp4"]
FORMATS: tuple[str, ...] = typing.get_args(DatasetFormat)
PAIRINGS: tuple[str, ...] = typing.get_args(ResponsePairing)
TRUNCATION_MODES: tuple[str, ...] = typing.get_args(TruncationMode)
REFERENCE_MODES: tuple[str, ...] = typing.get_args(ReferenceMode)
LR_SCHEDULER_TYPES: tuple[str, ...] = typing.get_args(LRSchedulerType)
BNB_4BIT_QUANT_TYPES: tuple[str, ...] = typing.get_args(Bnb4bitQuantType)
BNB_4BIT_QUANT_STORAGE = ("uint8", "float16", "bfloat16", "float32")
"""The dtypes bitsandbytes packs 4-bit weights into."""
OPTIMIZERS = {"adamw_torch": "AdamW", "adamw_torch_fused": "AdamW", "adagrad": "Adagrad", "lion_32bit": "Lion"}
"""HF ``optim`` names -> the DeepSpeed optimizer type that runs them (DeepSpeed's own type names are taken too)."""
DEEPSPEED_OPTIMIZERS = ("Adam", "AdamW", "Adagrad", "Lamb", "Lion")
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet", ".csv")
REPO_ROOT = Path(__file__).resolve().parent.parent.parent


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


def as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def resolve_path(path: str) -> Path:
    """A relative path is looked up in the working directory first, then in the repository (for presets)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


def preset_names() -> list[str]:
    return sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "ds_configs").glob("*.json"))


@dataclass(frozen=True)
class SourceSpec:
    """One entry of ``dataset``/``eval_dataset``: where, and which split and configuration where it has several
    (None: the run's ``dataset_train_split``/``dataset_test_split`` and ``dataset_config``)."""

    path: str
    split: str | None = None
    config: str | None = None


def source_specs(value: str | list[str | dict] | None) -> list[SourceSpec]:
    """The sources of a ``dataset``/``eval_dataset`` value: a name, or a list of names and ``{path, split, config}``
    mappings; ValueError names a malformed entry."""
    specs = []
    for i, entry in enumerate([] if value is None else [value] if isinstance(value, str) else value):
        if isinstance(entry, str):
            specs.append(SourceSpec(entry))
            continue
        unknown = set(entry) - {"path", "split", "config"}
        if (
            unknown
            or not isinstance(entry.get("path"), str)
            or not all(isinstance(entry.get(k), (str, type(None))) for k in ("split", "config"))
        ):
            raise ValueError(
                f"entry {i + 1} must be a name or {{path, split, config}} with string values, got {entry!r}"
            )
        specs.append(SourceSpec(entry["path"], entry.get("split"), entry.get("config")))
    return specs


def eval_sets(value: str | list[str | dict] | dict | None) -> dict[str, list[SourceSpec]]:
    """The eval sets of an ``eval_dataset`` value, by name: a mapping names each set (its values are sources as
    ``source_specs`` takes them), anything else is one unnamed set (name ``""``); none when unset. ValueError names
    a bad name or entry."""
    if not isinstance(value, dict):
        specs = source_specs(value)
        return {"": specs} if specs else {}
    if "path" in value and set(value) <= {"path", "split", "config"}:
        raise ValueError(
            "a mapping names eval sets ({name: source}); one source with its own split is a list: [{path, split}]"
        )
    sets = {}
    for name, source in value.items():
        if not isinstance(name, str) or not name.strip() or "/" in name or name != name.strip():
            raise ValueError(f"eval set names must be non-empty strings without '/' or outer spaces (got {name!r})")
        try:
            sets[name] = source_specs(source)
        except ValueError as e:
            raise ValueError(f"set {name!r}: {e}") from None
        if not sets[name]:
            raise ValueError(f"set {name!r} has no source")
    return sets


def eval_prefix(name: str) -> str:
    """The metric prefix of an eval set, as HF Trainer's ``metric_key_prefix`` for a dict ``eval_dataset``:
    ``eval_`` for the unnamed set, ``eval_<name>_`` for a named one."""
    return f"eval_{name}_" if name else "eval_"


def looks_local(spec: str) -> bool:
    """A path (or meant as one) rather than a Hub dataset name."""
    return spec.endswith(FILE_SUFFIXES) or spec.startswith((".", "/", "~")) or Path(spec).exists()


def _missing_dir(path: str | None) -> bool:
    """A path-looking model name that is not a directory (Hub ids are checked when loading)."""
    return bool(path) and path.startswith((".", "/", "~")) and not Path(path).expanduser().is_dir()


HUB_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only")
"""``from_pretrained`` arguments that say where a model's files are: its config and tokenizer are read with them too."""


DECIDED_BY_KEYS = ("dtype", "torch_dtype", "attn_implementation", "trust_remote_code", "quantization_config")
"""``from_pretrained`` arguments that keys of their own decide (``bf16``, ``attn_implementation``, ``load_in_4bit``,
...)."""


def source_kwargs(init_kwargs: dict | None, trust_remote_code: bool) -> dict:
    """The ``from_pretrained`` arguments that say where a model's files are, from its init kwargs."""
    return {"trust_remote_code": trust_remote_code, **{k: v for k, v in (init_kwargs or {}).items() if k in HUB_KWARGS}}


def init_kwargs_problems(name: str, init_kwargs: dict | None, model: ModelConfig) -> list[str]:
    """Where ``init_kwargs`` contradicts the keys that decide the same thing."""
    if init_kwargs is None:
        return []
    if not isinstance(init_kwargs, dict):
        return [f"`{name}` must be a mapping of from_pretrained arguments (got {type(init_kwargs).__name__})"]
    dtype = ("bfloat16" if model.bf16 else "float32", "bf16")
    own = {
        "dtype": dtype,
        "torch_dtype": dtype,
        "attn_implementation": (model.attn_implementation, "attn_implementation"),
        "trust_remote_code": (model.trust_remote_code, "trust_remote_code"),
    }
    # a quantization given here would escape the checks of the stage and the reference that `load_in_4bit` gets
    quantized = [
        f"`{name}` sets quantization_config: set `load_in_4bit` (and `bnb_4bit_quant_type`, "
        "`use_bnb_nested_quant`, `bnb_4bit_quant_storage`) instead"
    ]
    return (quantized if "quantization_config" in init_kwargs else []) + [
        f"`{name}` sets {key}={init_kwargs[key]!r}, but `{flag}` makes it {value!r}: set `{flag}` instead"
        for key, (value, flag) in own.items()
        if key in init_kwargs and str(init_kwargs[key]).removeprefix("torch.") != str(value)
    ]


@dataclass
class ModelConfig:
    """The policy: which checkpoint, how it is loaded, and which of its weights train."""

    model_name_or_path: str | None = None
    """Hugging Face model id or local directory. Unset together with ``dataset``: the built-in tiny default."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the model's repository to run (off unless you set it)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``,
    ``flex_attention``)."""
    disable_dropout: bool = True
    """Zero every dropout in policy and reference, as TRL does, so that log-probs are deterministic."""
    bf16: bool = False
    """Train in bfloat16 (DeepSpeed ``bf16.enabled``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (HF ``gradient_checkpointing_enable``)."""
    activation_offloading: bool = False
    """With ``gradient_checkpointing``: each decoder layer's checkpointed input waits for backward in pinned CPU
    memory instead of on the GPU (DeepSpeed's ``CheckpointHiddenStatesOffload``; nothing to move on a CPU-only
    run). For long rows (docs/sequence_parallel.md)."""
    torch_compile: bool = False
    """Compile each decoder layer of the policy and the reference once (``torch.compile`` of every layer in place,
    with dynamic shapes, so packed rows of every length share the compiled code), and the chunked output head's
    per-chunk log-probs. The first steps pay the compilation (docs/torch_compile.md)."""
    tiled_mlp_shards: int = 1
    """Run each decoder layer's dense MLP on this many slices of its tokens (DeepSpeed's ``TiledMLP``): its
    [tokens, intermediate] activations exist for one slice at a time, for one more MLP forward per layer. 1: off.
    For long rows; about tokens per rank / hidden size is a good start (docs/sequence_parallel.md)."""
    use_peft: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch (off in reference passes, and with ``disable_dropout``, as in TRL)."""
    lora_target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or ``all-linear``."""
    adapter_name_or_path: str | None = None
    """Start from this LoRA adapter (a peft directory or Hub id) instead of fresh adapters; implies ``use_peft``.
    The reference is then the base model without adapters (``reference: lora``) or the base model with this adapter,
    frozen (``reference: zero``/``precomputed``)."""
    load_in_4bit: bool = False
    """QLoRA: load the policy's base weights in 4 bits (bitsandbytes, ``pip install bitsandbytes``) and train LoRA
    adapters on them; needs ``use_peft`` and ``reference: lora`` (the reference is this 4-bit base with the adapters
    off). Any ZeRO stage (docs/deepspeed.md, "QLoRA")."""
    bnb_4bit_quant_type: Bnb4bitQuantType = "nf4"
    """With ``load_in_4bit``: the 4-bit data type, ``nf4`` (NormalFloat, QLoRA's) or ``fp4``."""
    use_bnb_nested_quant: bool = False
    """With ``load_in_4bit``: quantize the per-block scales too (bitsandbytes' double quantization, ~0.4 bit less
    per weight)."""
    bnb_4bit_quant_storage: str | None = None
    """With ``load_in_4bit``: the dtype the packed 4-bit weights are stored in (unset: ``uint8``)."""
    freeze_vision_tower: bool = False
    """Vision-language models: keep the vision encoder's weights fixed (the projector and the language model train).
    Ignored for other models."""
    router_aux_loss_coef: float | None = None
    """Mixture-of-experts models: weight of the router load-balancing loss added to the policy loss (TRL's
    semantics); unset: the model config's ``router_aux_loss_coef``; 0: off. Ignored for models without routers."""
    model_init_kwargs: dict | None = None
    """More ``from_pretrained`` arguments for the policy (TRL's name): ``revision``, ``subfolder``, ``cache_dir``,
    ``token``, ``local_files_only`` (used for its config, tokenizer and processor too), ``low_cpu_mem_usage``, ...
    ``dtype``/``torch_dtype``, ``attn_implementation`` and ``trust_remote_code`` have keys of their own (``bf16``,
    ...): given here, they must agree with those."""

    def __post_init__(self) -> None:
        if self.adapter_name_or_path is not None:
            self.use_peft = True

    @property
    def source(self) -> dict:
        """Where the policy's files come from, for every ``from_pretrained`` of it (config, tokenizer, processor,
        weights): ``trust_remote_code`` and the hub arguments of ``model_init_kwargs``."""
        return source_kwargs(self.model_init_kwargs, self.trust_remote_code)

    def problems(self) -> list[str]:
        checks = [
            (
                not _missing_dir(self.model_name_or_path),
                f"`model_name_or_path` directory {self.model_name_or_path!r} does not exist",
            ),
            (
                self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0,
                "`router_aux_loss_coef` must be >= 0 or unset",
            ),
            (
                not self.activation_offloading or self.gradient_checkpointing,
                "`activation_offloading` offloads checkpointed activations: it needs `gradient_checkpointing: true`",
            ),
            (self.tiled_mlp_shards >= 1, "`tiled_mlp_shards` must be >= 1 (1: off)"),
            (not self.use_peft or self.lora_r >= 1, "`lora_r` must be >= 1"),
            (not self.use_peft or 0.0 <= self.lora_dropout < 1.0, "`lora_dropout` must be in [0, 1)"),
            (
                not self.load_in_4bit or self.use_peft,
                "`load_in_4bit` freezes the base model in 4 bits, which cannot train: set `use_peft: true` (QLoRA)",
            ),
            (
                self.bnb_4bit_quant_type in BNB_4BIT_QUANT_TYPES,
                f"`bnb_4bit_quant_type` must be one of {BNB_4BIT_QUANT_TYPES} (got {self.bnb_4bit_quant_type!r})",
            ),
            (
                self.bnb_4bit_quant_storage in (None, *BNB_4BIT_QUANT_STORAGE),
                f"`bnb_4bit_quant_storage` must be one of {BNB_4BIT_QUANT_STORAGE} (got {self.bnb_4bit_quant_storage!r})",
            ),
            (
                not self.load_in_4bit or importlib.util.find_spec("bitsandbytes") is not None,
                "`load_in_4bit` needs bitsandbytes, which is not installed: `pip install bitsandbytes`",
            ),
        ]
        return [message for ok, message in checks if not ok] + init_kwargs_problems(
            "model_init_kwargs", self.model_init_kwargs, self
        )


@dataclass
class DataConfig:
    """Where the pairs come from, how rows are read, and how long a tokenized pair may be (docs/data.md)."""

    dataset: str | list[str | dict] | None = None
    """Training pairs: a ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet``/``.csv`` file, a ``save_to_disk`` directory,
    a directory in the Hub's layout (``data/<split>-*.parquet``) or a Hub dataset name; a list mixes several (see
    ``dataset_probs``), each a name or ``{path, split, config}`` (its own split and configuration)."""
    dataset_config: str | None = None
    """The configuration (subset) of a Hub dataset or Hub-layout directory that has several (``name`` in
    ``datasets.load_dataset``); where the dataset declares none by that name, its subfolder (``data_dir``: HH-RLHF's
    ``harmless-base``)."""
    dataset_train_split: str = "train"
    """The split ``dataset`` is read from, where a source has splits (UltraFeedback: ``train_prefs``) and its entry
    names none."""
    dataset_test_split: str = "test"
    """The split ``eval_dataset`` is read from, where a source has splits (UltraFeedback: ``test_prefs``) and its
    entry names none. Without ``eval_dataset`` and ``eval_split_ratio``, the training sources that have this split
    are evaluated on it (as TRL's scripts do; a notice says so)."""
    dataset_probs: list[float] | None = None
    """Sampling probabilities for a list of datasets (OpenRLHF-style blending); unset: concatenated."""
    eval_dataset: str | list[str | dict] | dict | None = None
    """Held-out pairs, any source above; evaluated every ``eval_steps`` and at the end. A mapping ``{name: source}``
    evaluates several sets, each logged with the prefix ``eval_<name>_`` (``eval_<name>_loss``, as HF Trainer does
    for a dict ``eval_dataset``); names are non-empty, without '/'."""
    eval_split_ratio: float = 0.0
    """Without ``eval_dataset``: hold this fraction of the training prompts out for evaluation (seeded; all pairs of a
    ranked row's prompt go to the same side)."""
    max_samples: int | None = None
    """Use at most this many training pairs (after mixing)."""
    prompt_key: str = "prompt"
    """Column holding the prompt in your data."""
    chosen_key: str = "chosen"
    """Column holding the preferred completion."""
    rejected_key: str = "rejected"
    """Column holding the dispreferred completion."""
    dataset_format: Literal["auto"] | DatasetFormat = "auto"
    """``auto`` (detected per dataset), ``explicit``, ``implicit``, ``conversational``, ``tokenized`` or ``ranked``
    (K responses per prompt)."""
    response_pairing: ResponsePairing = "best_vs_worst"
    """How ranked rows (K responses per prompt, best first or scored) become pairs: ``best_vs_worst`` (one pair per
    prompt), ``best_vs_rest`` (K - 1) or ``all_pairs`` (every two responses ranked apart). A prompt's pairs stay in
    one micro-batch where they fit, where the prompt and each response are computed once."""
    implicit_prompt_delimiter: str = "\n\nAssistant:"
    """Turn boundary that ends the prompt in implicit-prompt data (HH-RLHF's)."""
    chat_template: str | None = None
    """A Jinja chat template, or a file holding one, to use instead of the tokenizer's."""
    chat_template_kwargs: dict | None = None
    """Extra variables for the chat template of every conversational row (Qwen3: ``{enable_thinking: false}``); a
    row's own ``chat_template_kwargs`` column overrides them key by key."""
    on_bad_rows: BadRows = "error"
    """``error``: stop before training, listing bad rows; ``skip``: drop them and count them in the data report."""
    dataset_num_proc: int | None = None
    """Processes for tokenization."""
    dataset_cache_dir: str | None = None
    """Where tokenized datasets and precomputed reference log-probs are cached (default: ``ds_dpo/`` in the datasets
    cache)."""
    max_length: int | None = 1024
    """Upper bound on prompt + completion tokens (TRL's): completions are cut to fit; a prompt is cut only when it
    leaves no room for a completion (see ``truncation_mode``)."""
    max_prompt_length: int | None = None
    """Prompts longer than this are truncated (see ``truncation_mode``); unset: only ``max_length`` bounds them."""
    max_completion_length: int | None = None
    """Completions longer than this are cut from the right."""
    truncation_mode: TruncationMode = "keep_end"
    """Which end of a prompt that must be cut to keep: ``keep_end`` (nearest the answer) or ``keep_start``."""

    @property
    def column_names(self) -> dict[str, str]:
        """Your column name -> ours, for the columns you renamed."""
        ours = {self.prompt_key: "prompt", self.chosen_key: "chosen", self.rejected_key: "rejected"}
        return {column: name for column, name in ours.items() if column != name}

    def problems(self) -> list[str]:
        checks = []
        for name, read in (("dataset", source_specs), ("eval_dataset", lambda v: sum(eval_sets(v).values(), []))):
            try:
                specs = read(getattr(self, name))
            except ValueError as e:
                checks.append((False, f"`{name}`: {e}"))
                continue
            checks += [
                (not looks_local(s.path) or Path(s.path).expanduser().exists(), f"`{name}` {s.path!r} does not exist")
                for s in specs
            ]
        checks += [
            (
                self.dataset_probs is None
                or (len(self.dataset_probs) == len(as_list(self.dataset)) and all(p > 0 for p in self.dataset_probs)),
                "`dataset_probs` needs one positive probability per `dataset` entry",
            ),
            (0.0 <= self.eval_split_ratio < 1.0, "`eval_split_ratio` must be in [0, 1)"),
            (not (self.eval_dataset and self.eval_split_ratio), "set `eval_dataset` or `eval_split_ratio`, not both"),
            (self.max_samples is None or self.max_samples >= 1, "`max_samples` must be >= 1 or unset"),
            (
                self.dataset_format in ("auto", *FORMATS),
                f"`dataset_format` must be auto or one of {FORMATS} (got {self.dataset_format!r})",
            ),
            (self.response_pairing in PAIRINGS, f"`response_pairing` must be one of {PAIRINGS}"),
            (self.on_bad_rows in typing.get_args(BadRows), "`on_bad_rows` must be `error` or `skip`"),
            (self.truncation_mode in TRUNCATION_MODES, f"`truncation_mode` must be one of {TRUNCATION_MODES}"),
            (self.max_length is None or self.max_length >= 2, "`max_length` must be >= 2 or unset"),
            (
                self.max_prompt_length is None or self.max_prompt_length >= 1,
                "`max_prompt_length` must be >= 1 or unset",
            ),
            (
                self.max_completion_length is None or self.max_completion_length >= 1,
                "`max_completion_length` must be >= 1 or unset",
            ),
            (
                None in (self.max_length, self.max_prompt_length) or self.max_prompt_length < self.max_length,
                f"`max_prompt_length` ({self.max_prompt_length}) must be < `max_length` ({self.max_length}) to leave "
                "room for the completion (or leave `max_prompt_length` unset)",
            ),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class ReferenceConfig:
    """Where the reference log-probs come from (docs/deepspeed.md)."""

    reference: ReferenceMode = "zero"
    """``zero``: a separate inference-only ZeRO-3 engine; ``lora``: the policy with adapters disabled;
    ``precomputed``: reference log-probs computed once before training, then the reference is freed."""
    ref_model_name_or_path: str | None = None
    """The reference model for ``reference: zero``/``precomputed``; unset: the same checkpoint as the policy."""
    ref_model_init_kwargs: dict | None = None
    """``from_pretrained`` arguments for the reference model (TRL's name), as ``model_init_kwargs``; unset: the
    policy's when the reference is the policy's checkpoint, none when ``ref_model_name_or_path`` names another."""
    precompute_ref_log_probs: bool = False
    """TRL's flag: compute reference log-probs once up front (implied by ``reference: precomputed``)."""
    precompute_ref_batch_size: int | None = None
    """Pairs per no-grad batch of the precomputation pass (TRL's name); unset: ``per_device_eval_batch_size``.
    Nothing is stored for backward there, so it can be several times the training batch."""
    ref_offload: bool = False
    """Keep the reference engine's ZeRO-3 parameter shards in CPU memory."""
    sync_ref_model: bool = False
    """TR-DPO (TRL's name): every ``ref_model_sync_steps`` optimizer steps the reference becomes
    ``ref_model_mixup_alpha * policy + (1 - ref_model_mixup_alpha) * reference``, each rank mixing the shards it holds
    (nothing gathered); the mixed reference is saved with each checkpoint. Needs ``reference: zero`` and full
    fine-tuning (docs/deepspeed.md)."""
    ref_model_mixup_alpha: float = 0.6
    """TR-DPO: the policy's weight in the mix (TRL's default 0.6; 1: the reference becomes a copy of the policy)."""
    ref_model_sync_steps: int = 512
    """TR-DPO: optimizer steps between mixes (TRL's default)."""

    def __post_init__(self) -> None:
        if self.reference == "precomputed":
            self.precompute_ref_log_probs = True

    def problems(self) -> list[str]:
        checks = [
            (
                self.reference in REFERENCE_MODES,
                f"`reference` must be one of {REFERENCE_MODES} (got {self.reference!r})",
            ),
            (
                self.precompute_ref_batch_size is None or self.precompute_ref_batch_size >= 1,
                "`precompute_ref_batch_size` must be >= 1 or unset",
            ),
            (0 < self.ref_model_mixup_alpha <= 1, "`ref_model_mixup_alpha` must be in (0, 1]"),
            (self.ref_model_sync_steps >= 1, "`ref_model_sync_steps` must be >= 1"),
            (
                not self.sync_ref_model or (self.reference == "zero" and not self.precompute_ref_log_probs),
                f"`sync_ref_model` changes the reference during training, so it needs a reference engine "
                f"(`reference: zero`): with `reference: {self.reference}`"
                f"{' and precomputed log-probs' if self.precompute_ref_log_probs else ''} there is none to mix into",
            ),
            (
                not _missing_dir(self.ref_model_name_or_path),
                f"`ref_model_name_or_path` directory {self.ref_model_name_or_path!r} does not exist",
            ),
            (
                self.ref_model_name_or_path is None or self.reference != "lora",
                "`ref_model_name_or_path` cannot be used with `reference: lora` (the reference is the LoRA base model)",
            ),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class OptimConfig:
    """How long to train, on how many pairs per step, and how the optimizer moves."""

    max_steps: int = -1
    """Optimizer steps to run; overrides ``num_train_epochs`` when > 0."""
    num_train_epochs: float = 1.0
    """Passes over the training pairs when ``max_steps`` <= 0."""
    per_device_train_batch_size: int = 8
    """Pairs per micro-batch per rank (each forward carries 2x this many sequences)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-6
    """Peak learning rate (TRL's DPO default)."""
    lr_scheduler_type: LRSchedulerType = "linear"
    """transformers' schedule (``get_scheduler``, HF semantics): ``linear``, ``cosine``, ``constant``,
    ``constant_with_warmup``, ``cosine_with_min_lr``, ``warmup_stable_decay``, ``polynomial``, ``inverse_sqrt``,
    ``cosine_with_restarts``, ``cosine_warmup_with_min_lr``. A ``scheduler`` block in the DeepSpeed JSON replaces it
    (then these keys must stay at their defaults)."""
    lr_scheduler_kwargs: dict | None = None
    """The schedule's own arguments, e.g. ``{min_lr_rate: 0.1}`` for ``cosine_with_min_lr`` (OpenRLHF's default
    schedule), ``{num_decay_steps: 100}`` for ``warmup_stable_decay``."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0."""
    warmup_steps: int = 0
    """Optimizer steps of warmup; overrides ``warmup_ratio`` when > 0."""
    optim: str = "adamw_torch"
    """The optimizer: HF's ``adamw_torch`` (or ``adamw_torch_fused``), ``adagrad``, ``lion_32bit``, or a DeepSpeed
    optimizer type (``AdamW``, ``Adam``, ``Adagrad``, ``Lamb``, ``Lion``); DeepSpeed runs it (its CPU version under
    optimizer offload). Written into the DeepSpeed JSON's ``optimizer`` block, whose explicit values must agree."""
    adam_beta1: float = 0.9
    """Adam/AdamW/Lamb/Lion's first beta."""
    adam_beta2: float = 0.999
    """Adam/AdamW/Lamb/Lion's second beta."""
    adam_epsilon: float = 1e-8
    """Adam/AdamW/Lamb/Adagrad's epsilon."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for AdamW; not on biases and norm weights)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (DeepSpeed ``gradient_clipping``); 0 disables."""
    max_consecutive_nan_steps: int = 10
    """Optimizer steps with a non-finite loss or gradient norm are skipped (and counted in ``skipped_steps``);
    this many in a row save a checkpoint and stop the run with an error."""

    @property
    def deepspeed_optimizer(self) -> str | None:
        """The DeepSpeed optimizer type ``optim`` names (None: none)."""
        by_name = {name.lower(): name for name in DEEPSPEED_OPTIMIZERS}
        return OPTIMIZERS.get(self.optim) or by_name.get(self.optim.lower())

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps``."""
        return self.warmup_steps or round(self.warmup_ratio * total_steps)

    def problems(self) -> list[str]:
        checks = [
            (self.max_steps > 0 or self.num_train_epochs > 0, "set `max_steps` > 0 or `num_train_epochs` > 0"),
            (
                self.per_device_train_batch_size >= 1,
                f"`per_device_train_batch_size` must be >= 1 (got {self.per_device_train_batch_size})",
            ),
            (
                self.gradient_accumulation_steps >= 1,
                f"`gradient_accumulation_steps` must be >= 1 (got {self.gradient_accumulation_steps})",
            ),
            (self.learning_rate > 0, f"`learning_rate` must be > 0 (got {self.learning_rate})"),
            (
                self.lr_scheduler_type in LR_SCHEDULER_TYPES,
                f"`lr_scheduler_type` must be one of {LR_SCHEDULER_TYPES} (got {self.lr_scheduler_type!r})",
            ),
            (0.0 <= self.warmup_ratio <= 1.0, f"`warmup_ratio` must be in [0, 1] (got {self.warmup_ratio})"),
            (self.warmup_steps >= 0, f"`warmup_steps` must be >= 0 (got {self.warmup_steps})"),
            (
                self.deepspeed_optimizer is not None,
                f"`optim` must be one of {[*OPTIMIZERS, *DEEPSPEED_OPTIMIZERS]} (got {self.optim!r})",
            ),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "`adam_beta1` and `adam_beta2` must be in [0, 1)"),
            (self.adam_epsilon > 0, f"`adam_epsilon` must be > 0 (got {self.adam_epsilon})"),
            (self.max_grad_norm >= 0, f"`max_grad_norm` must be >= 0 (got {self.max_grad_norm})"),
            (self.max_consecutive_nan_steps >= 1, "`max_consecutive_nan_steps` must be >= 1"),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class BatchConfig:
    """How a micro-batch is laid out and scored (docs/how_training_works.md)."""

    padding_free: bool = True
    """Pack each micro-batch's sequences into one row without padding, attention confined to each sequence
    (flash-attention's varlen path, ds_dpo's per-block attention, a FlexAttention block mask, else a 4D mask)."""
    prefix_sharing: bool = True
    """With ``padding_free``: each pair as one sequence ``prompt | chosen | rejected`` so the prompt is computed
    once; rejected tokens cannot see chosen ones (on flash-attention: the prompt's keys are read again by the
    rejected run)."""
    max_tokens_per_batch: int | None = None
    """Token-budget micro-batches: each step's pairs (the same as without it) are regrouped on each rank into
    micro-batches of at most this many tokens (``prompt + chosen + rejected`` per pair with prefix sharing, the
    prompt twice otherwise; a longer pair alone), so forwards carry similar token counts."""
    logps_chunk_size: Literal["auto"] | int = "auto"
    """Completion tokens per chunk of the vocabulary projection: full-vocabulary logits exist for at most this many
    tokens at a time and are recomputed in backward. 0: the model's full [2B, T, V] logits (the plain path).
    ``auto``: sized to the vocabulary, one chunk's fp32 logits at most 256 MiB (1024 tokens up to a 64k vocabulary,
    512 for 128k, 256 for Gemma's 262k; never below 128)."""
    scoring_self_check: bool = True
    """Before training, score the first micro-batch with the fast path (layout, chunked log-probs) and with the
    model's own forward on a padded batch; stop with a message naming the model and the setting to change if they
    disagree."""

    def problems(self) -> list[str]:
        checks = [
            (
                self.max_tokens_per_batch is None or self.max_tokens_per_batch >= 1,
                "`max_tokens_per_batch` must be >= 1 or unset",
            ),
            (
                self.logps_chunk_size == "auto"
                or (isinstance(self.logps_chunk_size, int) and self.logps_chunk_size >= 0),
                f"`logps_chunk_size` must be auto or >= 0 (0: full logits; got {self.logps_chunk_size!r})",
            ),
        ]
        return [message for ok, message in checks if not ok]


def duration_seconds(value: str | int | float) -> float:
    """Seconds of a duration given as a number or as SLURM writes a time limit (``[D-]HH:MM:SS``, ``MM:SS``);
    ValueError otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    days, _, clock = str(value).strip().rpartition("-")
    parts = [float(part) for part in clock.split(":")]
    if not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        raise ValueError(f"not a duration: {value!r}")
    seconds = sum(part * 60**i for i, part in enumerate(reversed(parts)))
    return seconds + 86400 * int(days or 0)


@dataclass
class CheckpointConfig:
    """When checkpoints are written, how many are kept, where a run resumes from, and what the final model holds."""

    save_steps: int = 500
    """Optimizer steps between DeepSpeed checkpoints under ``output_dir/checkpoints``; 0 disables."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first)."""
    resume_from_checkpoint: str | None = None
    """``auto`` (the newest checkpoint under ``output_dir/checkpoints``, if any) or a checkpoint directory."""
    save_merged_model: bool = False
    """With LoRA: also write the merged full model to ``output_dir/merged``."""
    metric_for_best_model: str | None = None
    """The eval metric that decides the best checkpoint (HF's): ``loss``, ``rewards/accuracies``, ... with or without
    the ``eval_`` prefix; with named eval sets one set's, ``eval_<name>_loss``. Set (or implied by
    ``load_best_model_at_end``: ``loss``), each checkpoint saved at an evaluation step is compared, the best is
    recorded in the checkpoints' trainer state (it survives a resume), and ``save_total_limit`` never deletes it."""
    greater_is_better: bool | None = None
    """Whether a larger ``metric_for_best_model`` is better; unset: as HF, False for a metric ending in ``loss``,
    else True."""
    load_best_model_at_end: bool = False
    """Export the best checkpoint's weights as the final model instead of the last (HF's): loaded into the engine
    after training, before the export. Needs checkpoints at evaluation steps: ``save_steps`` a multiple of
    ``eval_steps``. The final evaluation is still of the last weights."""
    max_time: str | int | None = None
    """Stop with a checkpoint before this much time has passed since the run started: seconds, or ``[D-]HH:MM:SS``
    as SLURM writes a time limit. Under SLURM the job's end (``SLURM_JOB_END_TIME``) is such a deadline too. The run
    stops at the first step boundary where one more step and a save might not fit before it, and is resumed like a
    preempted one (``--resume_from_checkpoint auto``)."""

    @property
    def best_metric(self) -> str | None:
        """The full metric key that decides the best checkpoint (HF's ``eval_`` prefix added); None: none tracked."""
        name = self.metric_for_best_model or ("loss" if self.load_best_model_at_end else None)
        return None if name is None else name if name.startswith("eval_") else f"eval_{name}"

    @property
    def best_is_greater(self) -> bool:
        """``greater_is_better``, defaulted as HF does."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not (self.best_metric or "").endswith("loss")

    @property
    def max_time_s(self) -> float | None:
        return None if self.max_time is None else duration_seconds(self.max_time)

    def problems(self) -> list[str]:
        try:
            max_time_ok = self.max_time_s is None or self.max_time_s > 0
        except ValueError:
            max_time_ok = False
        resume = self.resume_from_checkpoint
        checks = [
            (self.save_steps >= 0, "`save_steps` must be >= 0 (0 disables checkpoints)"),
            (self.save_total_limit is None or self.save_total_limit >= 1, "`save_total_limit` must be >= 1 or unset"),
            (max_time_ok, f"`max_time` must be seconds > 0 or [D-]HH:MM:SS (got {self.max_time!r})"),
            (
                resume in (None, "auto") or Path(resume).is_dir(),
                f"`resume_from_checkpoint` must be `auto` or an existing checkpoint directory (got {resume!r})",
            ),
        ]
        return [message for ok, message in checks if not ok]


REPORTERS = ("tensorboard", "jsonl", "wandb")


@dataclass
class LoggingConfig:
    """How often metrics are logged and the held-out pairs evaluated."""

    logging_steps: int = 10
    """Optimizer steps between metric logs."""
    eval_steps: int | None = None
    """Optimizer steps between evaluations; unset: evaluate only at the end."""
    per_device_eval_batch_size: int = 8
    """Pairs per eval micro-batch per rank."""
    run_name: str | None = None
    """The run's name in TensorBoard: its event files go to ``logging_dir/<run_name>``; unset: the name of
    ``output_dir``."""
    logging_dir: str | None = None
    """The TensorBoard folder the run writes its subfolder into; unset: ``output_dir/runs``. Give the runs of a sweep
    one ``logging_dir`` and different ``run_name``s to see them side by side."""
    report_to: str | list[str] = "tensorboard,jsonl"
    """Where metrics go besides the progress bar, a list or comma-separated: ``tensorboard``, ``jsonl``
    (``output_dir/metrics.jsonl``), ``wandb`` (``pip install wandb``; project ``$WANDB_PROJECT``, default ``ds_dpo``;
    ``WANDB_MODE=offline`` writes under ``output_dir/wandb`` without a network); ``all``: the three (wandb where
    installed); ``none``: only the bar."""

    @property
    def reporters(self) -> list[str]:
        """``report_to`` as a list of destinations."""
        names = [n.strip() for item in as_list(self.report_to) for n in item.split(",") if n.strip()]
        if "all" in names:
            return [*REPORTERS[:2], *(["wandb"] if importlib.util.find_spec("wandb") else [])]
        return [] if names == ["none"] else list(dict.fromkeys(names))

    def problems(self) -> list[str]:
        checks = [
            (self.logging_steps >= 1, f"`logging_steps` must be >= 1 (got {self.logging_steps})"),
            (
                self.run_name is None or (self.run_name.strip() and "/" not in self.run_name),
                f"`run_name` must be a non-empty name without '/' (got {self.run_name!r})",
            ),
            (self.eval_steps is None or self.eval_steps >= 1, "`eval_steps` must be >= 1 or unset"),
            (
                self.per_device_eval_batch_size >= 1,
                f"`per_device_eval_batch_size` must be >= 1 (got {self.per_device_eval_batch_size})",
            ),
            (
                all(n in REPORTERS for n in self.reporters),
                f"`report_to` takes {', '.join(REPORTERS)}, all or none (got {self.report_to!r})",
            ),
            (
                "wandb" not in self.reporters or importlib.util.find_spec("wandb") is not None,
                "`report_to` names wandb, which is not installed: `pip install wandb`",
            ),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class SamplesConfig:
    """Replies to a few held-out prompts at each evaluation, to read next to the metrics (docs/outputs.md)."""

    generate_during_eval: bool = False
    """At each evaluation, the policy's greedy replies to the first ``generate_num_prompts`` distinct prompts of the
    (first) eval set, and at the first evaluation the reference's, go to TensorBoard (text), wandb (a table) and
    ``output_dir/samples.jsonl`` (TRL's former flag). Needs an eval set; not for vision-language models."""
    generate_num_prompts: int = 4
    """How many held-out prompts ``generate_during_eval`` answers."""
    generate_max_new_tokens: int = 64
    """The longest reply ``generate_during_eval`` generates, in tokens."""

    def problems(self) -> list[str]:
        checks = [
            (self.generate_num_prompts >= 1, f"`generate_num_prompts` must be >= 1 (got {self.generate_num_prompts})"),
            (
                self.generate_max_new_tokens >= 1,
                f"`generate_max_new_tokens` must be >= 1 (got {self.generate_max_new_tokens})",
            ),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class ParallelConfig:
    """DeepSpeed and the process group."""

    deepspeed: str | dict = "ds_configs/zero3.json"
    """DeepSpeed JSON file (relative paths: cwd, then the repo's presets) or the same as an inline mapping;
    ``"auto"`` values in it are filled from this config. ``auto``: the preset the memory estimator picks at startup
    for this device and world size (docs/deepspeed.md, "deepspeed: auto"): plain DeepSpeed (ZeRO-0) on one rank,
    ZeRO-2 on several, ZeRO-3 and then offload only where the model states do not fit; printed, and dumped with the
    run."""
    ddp_timeout: int = 1800
    """Seconds any collective may wait (HF's name): a dead rank fails the job instead of hanging it."""
    heartbeat_timeout: int = 60
    """Seconds without a heartbeat from a rank before the job stops as having lost it (a hung or unreachable node;
    a rank whose process ends is noticed at once): every rank exits with status 4 and the message names the rank, its
    host and the last whole checkpoint. 0: no watchdog; a lost rank then surfaces in the next collective (gloo: at
    once, as a traceback; NCCL: after ``ddp_timeout``). See docs/resuming.md."""
    sequence_parallel_size: int = 1
    """Ranks that share each micro-batch, each holding a slice of its rows (DeepSpeed Ulysses; see
    docs/sequence_parallel.md): ``world / sequence_parallel_size`` data-parallel groups. Needs attention heads and key/value
    heads divisible by it."""
    local_rank: int = -1
    """Filled by the ``deepspeed`` launcher; ignored otherwise."""

    def deepspeed_json(self) -> dict:
        """The DeepSpeed config as written (``"auto"`` values still in it)."""
        if isinstance(self.deepspeed, dict):
            return copy.deepcopy(self.deepspeed)
        if self.deepspeed == "auto":
            raise ConfigError("`deepspeed: auto` is decided at startup, from the model and the world size")
        try:
            return json.loads(resolve_path(self.deepspeed).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"DeepSpeed config {self.deepspeed}: invalid JSON ({e})") from None

    def problems(self) -> list[str]:
        checks = [
            (
                isinstance(self.deepspeed, dict) or self.deepspeed == "auto" or resolve_path(self.deepspeed).is_file(),
                f"DeepSpeed config `{self.deepspeed}` not found (presets: {preset_names()})",
            ),
            (self.ddp_timeout >= 1, "`ddp_timeout` must be >= 1 second"),
            (self.heartbeat_timeout >= 0, "`heartbeat_timeout` must be >= 0 seconds (0: no watchdog)"),
            (self.sequence_parallel_size >= 1, "`sequence_parallel_size` must be >= 1"),
        ]
        return [message for ok, message in checks if not ok]


@dataclass
class DPOConfig:
    """A whole run: two run-wide keys and one section per concern."""

    output_dir: str = "outputs/run"
    """Where config.yaml, metrics.jsonl, runs/ (TensorBoard), checkpoints/ and the final HF model go."""
    seed: int = 42
    """Seeds model init (built-in model), data order and sampling."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ref: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def builtin(self) -> bool:
        """True when neither a model nor a dataset was given: the run uses the built-in tiny task."""
        return self.model.model_name_or_path is None and self.data.dataset is None

    @property
    def ref_init_kwargs(self) -> dict:
        """The reference model's ``from_pretrained`` arguments (``ref_model_init_kwargs``)."""
        if self.ref.ref_model_init_kwargs is not None:
            return self.ref.ref_model_init_kwargs
        return {} if self.ref.ref_model_name_or_path else (self.model.model_init_kwargs or {})

    @property
    def ref_model_path(self) -> str | None:
        """The checkpoint reference log-probs come from: ``ref_model_name_or_path``, else the policy's starting
        weights (also the LoRA base model's)."""
        return self.ref.ref_model_name_or_path or self.model.model_name_or_path

    def validate(self) -> None:
        """Check everything that can be checked without a model, data or world size; raise ConfigError listing
        every problem."""
        problems = [p for name in SECTIONS for p in getattr(self, name).problems()]
        checks = [
            (
                (self.model.model_name_or_path is None) == (self.data.dataset is None),
                "give both `model_name_or_path` and `dataset`, or neither (neither runs the built-in tiny task)",
            ),
            (
                self.ref.reference != "lora" or self.model.use_peft,
                "`reference: lora` takes reference log-probs from the LoRA base model: set `use_peft: true` "
                "(or use `reference: zero`)",
            ),
            (
                not self.checkpoint.save_merged_model or self.model.use_peft,
                "`save_merged_model` needs `use_peft: true`",
            ),
            (
                not self.ref.sync_ref_model or not self.model.use_peft,
                "`sync_ref_model` with `use_peft`: the policy's weights are the base plus adapters the reference "
                "does not have, so the two cannot be mixed parameter by parameter (as in TRL): train all weights, "
                "or turn `sync_ref_model` off",
            ),
            (
                not self.ref.sync_ref_model or self.loss.needs_reference,
                "`sync_ref_model` with a reference-free loss: there is no reference to sync",
            ),
            (
                not self.model.load_in_4bit or not self.loss.needs_reference or self.ref.reference == "lora",
                f"`load_in_4bit` with `reference: {self.ref.reference}`: a separate reference would load the model "
                "again in full precision, not the 4-bit base the adapters train on (step 1 would not be at policy = "
                "reference): set `reference: lora` (and `precompute_ref_log_probs: true` to score it once up front)",
            ),
        ]
        problems += [message for ok, message in checks if not ok]
        problems += init_kwargs_problems("ref_model_init_kwargs", self.ref.ref_model_init_kwargs, self.model)
        problems += self._best_model_problems()
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    def _best_model_problems(self) -> list[str]:
        """The best checkpoint must be among the checkpoints (saved where evaluations run) and its metric one that an
        evaluation logs."""
        checkpoint, eval_steps, metric = self.checkpoint, self.logging.eval_steps, self.checkpoint.best_metric
        problems = []
        if checkpoint.load_best_model_at_end and not (
            checkpoint.save_steps > 0 and eval_steps and checkpoint.save_steps % eval_steps == 0
        ):
            problems.append(
                "`load_best_model_at_end` needs a checkpoint at evaluation steps: set `save_steps` > 0 to a multiple "
                f"of `eval_steps` (got save_steps {checkpoint.save_steps}, eval_steps {eval_steps})"
            )
        try:
            names = [name for name in eval_sets(self.data.eval_dataset) if name]
        except ValueError:
            names = []  # reported by the data section
        if metric and names and not any(metric.startswith(eval_prefix(name)) for name in names):
            problems.append(
                f"`metric_for_best_model` {metric!r} names no eval set: with named sets it is one set's metric, "
                f"e.g. `{eval_prefix(names[0])}loss` (sets: {', '.join(names)})"
            )
        return problems

    def to_dict(self) -> dict[str, Any]:
        """The flat keys a user types, with this run's values."""
        out = {key: getattr(self, key) for key in TOP_LEVEL}
        for name in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, name)))
        out.pop("local_rank")
        return out

    def replace(self, **values: Any) -> DPOConfig:
        """A copy with some flat keys changed."""
        return make_config({**self.to_dict(), **values})


SECTIONS: dict[str, type] = {
    f.name: f.default_factory for f in dataclasses.fields(DPOConfig) if f.default_factory is not dataclasses.MISSING
}
TOP_LEVEL = tuple(f.name for f in dataclasses.fields(DPOConfig) if f.name not in SECTIONS)


def _key_sections() -> dict[str, str | None]:
    keys: dict[str, str | None] = {key: None for key in TOP_LEVEL}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            if f.name in keys:
                raise TypeError(f"config key `{f.name}` is defined in two sections")
            keys[f.name] = section
    return keys


KEYS = _key_sections()
"""Every flat key -> the section that holds it (None: ``DPOConfig`` itself)."""


def _options(hint: Any) -> tuple:
    """The alternatives of a type hint, unions flattened (``Literal["auto"] | DatasetFormat`` is one union)."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(o for arg in typing.get_args(hint) for o in _options(arg))
    return (hint,)


def _coerce(owner: type, name: str, value: Any) -> Any:
    """Check ``value`` against the annotation of field ``name``; ints are accepted where floats are expected."""
    options = _options(typing.get_type_hints(owner)[name])
    for option in options:
        origin = typing.get_origin(option) or option
        if value is None and option is type(None):
            return None
        if origin is Literal and isinstance(value, str):
            return value  # which names are allowed is a `problems` check, with the choices in its message
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)  # PyYAML reads `5e-7` (no dot) as a string
        if origin is list and isinstance(value, list):
            inner = typing.get_args(option)[0]
            if inner is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return [float(v) for v in value]
            kinds = typing.get_args(inner) if isinstance(inner, types.UnionType) else (inner,)
            if all(type(v) in kinds for v in value):
                return value
        if origin in (str, int, bool, dict) and type(value) is origin:
            return value
        if origin is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    expected = " or ".join(
        "str" if typing.get_origin(o) is Literal else getattr(o, "__name__", str(o)) for o in options
    )
    raise ConfigError(f"`{name}` expects {expected}, got {value!r} ({type(value).__name__})")


def unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return ConfigError(f"unknown config key `{key}` in {where}{hint}")


def make_config(values: dict[str, Any]) -> DPOConfig:
    """A config from flat ``key: value`` pairs (types checked; unset keys take their defaults)."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in values.items():
        if key not in KEYS:
            raise unknown_key(key, "the config")
        section = KEYS[key]
        owner = DPOConfig if section is None else SECTIONS[section]
        (top if section is None else sections[section])[key] = _coerce(owner, key, value)
    return DPOConfig(**top, **{name: SECTIONS[name](**kwargs) for name, kwargs in sections.items()})
