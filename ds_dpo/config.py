"""Typed run configuration: defaults, YAML + command-line loading, validation, dump.

Field names follow TRL's ``DPOConfig`` and HF ``TrainingArguments`` wherever the concept is the same, so a user's
existing YAML mostly carries over. Every default lives here, in the dataclass, and nowhere else.

    cfg = load_config(["--config", "run.yaml", "--beta", "0.2"])

Values on the command line are parsed as YAML scalars/lists (``--loss_type '[sigmoid, sft]'``), which also works
through the ``deepspeed`` launcher and hostfile (pdsh) runs, where only plain ``--key value`` arguments survive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REFERENCE_MODES = ("zero", "lora", "precomputed")
LR_SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says how."""


@dataclass
class DPOConfig:
    # --- model and data -------------------------------------------------------------------------------------------
    model_name_or_path: str | None = None
    """Hugging Face model id or local directory. Unset together with ``dataset``: the built-in tiny default."""
    ref_model_name_or_path: str | None = None
    """The reference model for ``reference: zero``/``precomputed``; unset: the same checkpoint as the policy."""
    dataset: str | list[str] | None = None
    """Training pairs: a ``.jsonl``/``.jsonl.gz``/``.json``/``.parquet``/``.csv`` file, a ``save_to_disk`` directory
    or a Hub dataset name; a list mixes several (see ``dataset_probs``). Formats: README "Data"."""
    dataset_probs: list[float] | None = None
    """Sampling probabilities for a list of datasets (OpenRLHF-style blending); unset: concatenated."""
    eval_dataset: str | list[str] | None = None
    """Held-out pairs, any source above; evaluated every ``eval_steps`` and at the end."""
    eval_split_ratio: float = 0.0
    """Without ``eval_dataset``: hold this fraction of the training pairs out for evaluation (seeded)."""
    max_samples: int | None = None
    """Use at most this many training pairs (after mixing)."""
    prompt_key: str = "prompt"
    """Column holding the prompt in your data."""
    chosen_key: str = "chosen"
    """Column holding the preferred completion."""
    rejected_key: str = "rejected"
    """Column holding the dispreferred completion."""
    dataset_format: str = "auto"
    """``auto`` (detected per dataset), ``explicit``, ``implicit``, ``conversational`` or ``tokenized``."""
    implicit_prompt_delimiter: str = "\n\nAssistant:"
    """Turn boundary that ends the prompt in implicit-prompt data (HH-RLHF's)."""
    chat_template: str | None = None
    """A Jinja chat template, or a file holding one, to use instead of the tokenizer's."""
    on_bad_rows: str = "error"
    """``error``: stop before training, listing bad rows; ``skip``: drop them and count them in the data report."""
    dataset_num_proc: int | None = None
    """Processes for tokenization."""
    dataset_cache_dir: str | None = None
    """Where tokenized datasets are cached (default: the datasets cache, ``ds_dpo/`` inside it)."""
    output_dir: str = "outputs/run"
    """Where config.yaml, metrics.jsonl, runs/ (TensorBoard), checkpoints/ and the final HF model go."""
    trust_remote_code: bool = False
    """Allow model/tokenizer code from the model's repository to run (off unless you set it)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to ``from_pretrained`` (``sdpa``, ``eager``, ``flash_attention_2``)."""
    disable_dropout: bool = True
    """Zero every dropout in policy and reference, as TRL does, so that log-probs are deterministic."""

    # --- schedule ---------------------------------------------------------------------------------------------------
    max_steps: int = -1
    """Optimizer steps to run; overrides ``num_train_epochs`` when > 0."""
    num_train_epochs: float = 1.0
    """Passes over the training pairs when ``max_steps`` <= 0."""
    per_device_train_batch_size: int = 8
    """Pairs per micro-batch per rank (each forward carries 2x this many sequences)."""
    per_device_eval_batch_size: int = 8
    """Pairs per eval micro-batch per rank."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-6
    """Peak learning rate (TRL's DPO default)."""
    lr_scheduler_type: str = "linear"
    """``linear``, ``cosine``, ``constant`` or ``constant_with_warmup`` (HF semantics)."""
    warmup_ratio: float = 0.0
    """Fraction of the optimizer steps spent warming the learning rate up linearly from 0."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (DeepSpeed ``gradient_clipping``); 0 disables."""
    seed: int = 42
    """Seeds model init (built-in model), data order and sampling."""

    # --- objective --------------------------------------------------------------------------------------------------
    beta: float = 0.1
    """Temperature of the implicit reward ``beta * log(pi / pi_ref)`` (IPO's tau, ORPO's lambda)."""
    loss_type: str | list[str] = "sigmoid"
    """A name from ``ds_dpo.losses.LOSS_TYPES``, or a list of names for a weighted mixture (see docs/losses.md)."""
    loss_weights: list[float] | None = None
    """One weight per ``loss_type`` entry (default 1 each)."""
    label_smoothing: float = 0.0
    """Label-noise probability in [0, 0.5): cDPO for sigmoid, Robust DPO, EXO's epsilon, AOT, SimPO/CPO."""
    f_divergence_type: str = "reverse_kl"
    """f-DPO divergence: ``reverse_kl``, ``forward_kl``, ``js_divergence``, ``alpha_divergence``."""
    f_alpha_divergence_coef: float = 0.5
    """alpha of ``alpha_divergence``."""
    discopop_tau: float = 0.05
    """Temperature of DiscoPOP's log-ratio modulation."""
    simpo_gamma: float = 0.5
    """SimPO's target reward margin gamma."""
    cpo_alpha: float = 1.0
    """Weight of CPO's behaviour-cloning NLL term."""
    reference_free: bool = False
    """Take the reference log-ratio as 0 for every loss type; no reference model is built."""
    use_weighting: bool = False
    """WPO: weight each pair by the policy's length-normalised probability of both completions."""
    ld_alpha: float | None = None
    """LD-DPO: weight of completion tokens past the shorter completion of a pair (policy and reference)."""

    # --- sequence lengths -------------------------------------------------------------------------------------------
    max_length: int | None = 1024
    """Upper bound on prompt + completion tokens; completions are truncated to fit."""
    max_prompt_length: int | None = 512
    """Prompts longer than this are truncated (see ``truncation_mode``)."""
    max_completion_length: int | None = None
    """Completions longer than this are cut from the right."""
    truncation_mode: str = "keep_end"
    """Which end of a long prompt to keep: ``keep_end`` (nearest the answer) or ``keep_start``."""

    # --- logging, eval, checkpoints ---------------------------------------------------------------------------------
    logging_steps: int = 10
    """Optimizer steps between metric logs."""
    eval_steps: int | None = None
    """Optimizer steps between evaluations; unset: evaluate only at the end."""
    save_steps: int = 500
    """Optimizer steps between DeepSpeed checkpoints under ``output_dir/checkpoints``; 0 disables."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (oldest deleted first)."""
    resume_from_checkpoint: str | None = None
    """``auto`` (the newest checkpoint under ``output_dir/checkpoints``, if any) or a checkpoint directory."""

    # --- precision and memory ---------------------------------------------------------------------------------------
    bf16: bool = False
    """Train in bfloat16 (DeepSpeed ``bf16.enabled``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (HF ``gradient_checkpointing_enable``)."""
    padding_free: bool = True
    """Pack each micro-batch's sequences into one row without padding, attention confined to each sequence
    (flash-attention's varlen path, else a 4D mask; README "How training works")."""
    prefix_sharing: bool = True
    """With ``padding_free``: each pair as one sequence ``prompt | chosen | rejected`` so the prompt is computed
    once; rejected tokens cannot see chosen ones. Not available with flash-attention (packs without sharing)."""
    max_tokens_per_batch: int | None = None
    """Token-budget micro-batches: each step's pairs (the same as without it) are regrouped on each rank into
    micro-batches of at most this many tokens (``prompt + chosen + rejected`` per pair with prefix sharing, the
    prompt twice otherwise; a longer pair alone), so forwards carry similar token counts."""
    logps_chunk_size: int = 1024
    """Completion tokens per chunk of the vocabulary projection: full-vocabulary logits exist for at most this many
    tokens at a time and are recomputed in backward. 0: the model's full [2B, T, V] logits (the plain path)."""

    # --- DeepSpeed and the reference model --------------------------------------------------------------------------
    deepspeed: str = "ds_configs/zero3.json"
    """DeepSpeed JSON; ``"auto"`` values in it are filled from this config. Relative paths: cwd, then the repo."""
    reference: str = "zero"
    """``zero``: a separate inference-only ZeRO-3 engine; ``lora``: the policy with adapters disabled;
    ``precomputed``: reference log-probs computed once before training, then the reference is freed."""
    precompute_ref_log_probs: bool = False
    """TRL's flag: compute reference log-probs once up front (implied by ``reference: precomputed``)."""
    precompute_ref_batch_size: int | None = None
    """Pairs per no-grad batch of the precomputation pass (TRL's name); unset: ``per_device_eval_batch_size``.
    Nothing is stored for backward there, so it can be several times the training batch."""
    ref_offload: bool = False
    """Keep the reference engine's ZeRO-3 parameter shards in CPU memory."""

    # --- LoRA -------------------------------------------------------------------------------------------------------
    use_peft: bool = False
    """Train LoRA adapters (peft) instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch (off in reference passes)."""
    lora_target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or ``all-linear``."""
    save_merged_model: bool = False
    """With LoRA: also write the merged full model to ``output_dir/merged``."""

    max_consecutive_nan_steps: int = 10
    """Optimizer steps with a non-finite loss or gradient norm are skipped (and counted in ``skipped_steps``);
    this many in a row save a checkpoint and stop the run with an error."""
    ddp_timeout: int = 1800
    """Seconds any collective may wait (HF's name): a dead rank fails the job instead of hanging it."""

    # --- set by the launcher ----------------------------------------------------------------------------------------
    local_rank: int = -1
    """Filled by the ``deepspeed`` launcher; ignored otherwise."""

    def __post_init__(self) -> None:
        if self.reference == "precomputed":
            self.precompute_ref_log_probs = True

    @property
    def builtin(self) -> bool:
        """True when neither a model nor a dataset was given: the run uses the built-in tiny task."""
        return self.model_name_or_path is None and self.dataset is None

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def deepspeed_path(self) -> Path:
        return resolve_path(self.deepspeed)

    def validate(self) -> None:
        """Check everything that can be checked without a model, data or world size; raise ConfigError."""
        from ds_dpo.formats import FORMATS
        from ds_dpo.losses import LOSS_TYPES, check_options
        from ds_dpo.sources import looks_local
        from ds_dpo.tokenization import TRUNCATION_MODES

        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need((self.model_name_or_path is None) == (self.dataset is None),
             "give both `model_name_or_path` and `dataset`, or neither (neither runs the built-in tiny task)")
        need(self.max_steps > 0 or self.num_train_epochs > 0, "set `max_steps` > 0 or `num_train_epochs` > 0")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            need(getattr(self, name) >= 1, f"`{name}` must be >= 1 (got {getattr(self, name)})")
        need(self.learning_rate > 0, f"`learning_rate` must be > 0 (got {self.learning_rate})")
        need(self.beta > 0, f"`beta` must be > 0 (got {self.beta})")
        need(0.0 <= self.warmup_ratio <= 1.0, f"`warmup_ratio` must be in [0, 1] (got {self.warmup_ratio})")
        need(self.max_grad_norm >= 0, f"`max_grad_norm` must be >= 0 (got {self.max_grad_norm})")
        need(self.lr_scheduler_type in LR_SCHEDULER_TYPES,
             f"`lr_scheduler_type` must be one of {LR_SCHEDULER_TYPES} (got {self.lr_scheduler_type!r})")
        for name in self.loss_types:
            need(name in LOSS_TYPES, f"unknown `loss_type` {name!r}; known: {sorted(LOSS_TYPES)}")
        if all(name in LOSS_TYPES for name in self.loss_types):
            try:
                check_options(self.loss_type, self.loss_weights, self.label_smoothing, self.f_divergence_type,
                              self.use_weighting, max(self.beta, 1e-12), self.discopop_tau)
            except ValueError as e:
                problems.append(str(e))
        need(self.ld_alpha is None or 0.0 <= self.ld_alpha <= 1.0, f"`ld_alpha` must be in [0, 1] or unset")
        need(self.reference in REFERENCE_MODES,
             f"`reference` must be one of {REFERENCE_MODES} (got {self.reference!r})")
        need(self.reference != "lora" or self.use_peft,
             "`reference: lora` takes reference log-probs from the LoRA base model: set `use_peft: true` "
             "(or use `reference: zero`)")
        need(not self.save_merged_model or self.use_peft, "`save_merged_model` needs `use_peft: true`")
        need(self.eval_steps is None or self.eval_steps >= 1, "`eval_steps` must be >= 1 or unset")
        resume = self.resume_from_checkpoint
        need(resume in (None, "auto") or Path(resume).is_dir(),
             f"`resume_from_checkpoint` must be `auto` or an existing checkpoint directory (got {resume!r})")
        need(self.precompute_ref_batch_size is None or self.precompute_ref_batch_size >= 1,
             "`precompute_ref_batch_size` must be >= 1 or unset")
        need(self.max_tokens_per_batch is None or self.max_tokens_per_batch >= 1,
             "`max_tokens_per_batch` must be >= 1 or unset")
        need(self.logps_chunk_size >= 0, "`logps_chunk_size` must be >= 0 (0: full logits)")
        need(self.ddp_timeout >= 1, "`ddp_timeout` must be >= 1 second")
        need(self.max_consecutive_nan_steps >= 1, "`max_consecutive_nan_steps` must be >= 1")
        need(self.save_steps >= 0, "`save_steps` must be >= 0 (0 disables checkpoints)")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "`save_total_limit` must be >= 1 or unset")
        need(self.max_length is None or self.max_length >= 2, "`max_length` must be >= 2 or unset")
        if self.max_length is not None and self.max_prompt_length is not None:
            need(self.max_prompt_length < self.max_length,
                 f"`max_prompt_length` ({self.max_prompt_length}) must be < `max_length` ({self.max_length}) "
                 "to leave room for the completion")
        if self.use_peft:
            need(self.lora_r >= 1, "`lora_r` must be >= 1")
            need(0.0 <= self.lora_dropout < 1.0, "`lora_dropout` must be in [0, 1)")
        need(self.deepspeed_path.is_file(),
             f"DeepSpeed config `{self.deepspeed}` not found (presets: {preset_names()})")
        for name in ("dataset", "eval_dataset"):
            for spec in as_list(getattr(self, name)):
                need(not looks_local(spec) or Path(spec).expanduser().exists(),
                     f"`{name}` {spec!r} does not exist")
        if self.dataset_probs is not None:
            need(len(self.dataset_probs) == len(as_list(self.dataset)) and all(p > 0 for p in self.dataset_probs),
                 "`dataset_probs` needs one positive probability per `dataset` entry")
        need(0.0 <= self.eval_split_ratio < 1.0, "`eval_split_ratio` must be in [0, 1)")
        need(not (self.eval_dataset and self.eval_split_ratio), "set `eval_dataset` or `eval_split_ratio`, not both")
        need(self.max_samples is None or self.max_samples >= 1, "`max_samples` must be >= 1 or unset")
        need(self.dataset_format in ("auto", *FORMATS),
             f"`dataset_format` must be auto or one of {FORMATS} (got {self.dataset_format!r})")
        need(self.on_bad_rows in ("error", "skip"), "`on_bad_rows` must be `error` or `skip`")
        need(self.truncation_mode in TRUNCATION_MODES, f"`truncation_mode` must be one of {TRUNCATION_MODES}")
        need(self.max_completion_length is None or self.max_completion_length >= 1,
             "`max_completion_length` must be >= 1 or unset")
        for name in ("model_name_or_path", "ref_model_name_or_path"):
            path = getattr(self, name)
            if path and path.startswith((".", "/", "~")):
                need(Path(path).expanduser().is_dir(), f"`{name}` directory {path!r} does not exist")
        need(self.ref_model_name_or_path is None or self.reference != "lora",
             "`ref_model_name_or_path` cannot be used with `reference: lora` (the reference is the LoRA base model)")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("local_rank")
        return out


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


_FIELDS = {f.name: f for f in dataclasses.fields(DPOConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Check ``value`` against the annotation of field ``name``; ints are accepted where floats are expected."""
    hint = typing.get_type_hints(DPOConfig)[name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option) or option
        if value is None and option is type(None):
            return None
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin is float and isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)  # PyYAML reads `5e-7` (no dot) as a string
        if origin is list and isinstance(value, list):
            inner = typing.get_args(option)[0]
            if inner is float and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return [float(v) for v in value]
            if all(type(v) is inner for v in value):
                return value
        if origin in (str, int, bool) and type(value) is origin:
            return value
        if origin is str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"`{name}` expects {expected}, got {value!r} ({type(value).__name__})")


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _FIELDS, n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    return ConfigError(f"unknown config key `{key}` in {where}{hint}")


def parse_cli(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split ``--config FILE`` from ``--key value`` / ``--key=value`` overrides (values parsed as YAML)."""
    config_file, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use `--key value`")
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                if _FIELDS.get(key) and _FIELDS[key].type in ("bool", bool):
                    value = "true"  # a bare boolean flag
                else:
                    raise ConfigError(f"`--{key}` needs a value")
            else:
                i += 1
                value = argv[i]
        i += 1
        if key == "config":
            config_file = value
            continue
        if key not in _FIELDS:
            raise _unknown_key(key, "the command line")
        overrides[key] = yaml.safe_load(value) if value != "" else None
    return config_file, overrides


def load_config(argv: list[str]) -> tuple[DPOConfig, set[str]]:
    """Build the config from ``--config`` YAML plus overrides; returns it and the set of keys the user set.

    With neither a model nor a dataset, unset keys take the built-in tiny run's defaults (``builtin.DEFAULTS``).
    """
    config_file, overrides = parse_cli(argv)
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {config_file!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{config_file}: expected a mapping of `key: value`, got {type(loaded).__name__}")
        for key in loaded:
            if key not in _FIELDS:
                raise _unknown_key(key, config_file)
        values.update(loaded)
    values.update(overrides)
    explicit = set(values)
    if values.get("model_name_or_path") is None and values.get("dataset") is None:
        from ds_dpo import builtin

        values = builtin.with_defaults(values)
    return make_config(values), explicit


def make_config(values: dict[str, Any]) -> DPOConfig:
    for key in values:
        if key not in _FIELDS:
            raise _unknown_key(key, "the config")
    return DPOConfig(**{k: _coerce(k, v) for k, v in values.items()})


def dump_config(cfg: DPOConfig, deepspeed_config: dict, path: str | os.PathLike) -> None:
    """Write the resolved run config, with the DeepSpeed config as it was handed to DeepSpeed, as YAML."""
    doc = cfg.to_dict()
    doc["deepspeed_config"] = deepspeed_config
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
