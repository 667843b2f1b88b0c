"""A run's configuration from YAML and the command line, and back to YAML.

    cfg = load_config(["--config", "run.yaml", "--beta", "0.2"])
    cfg.validate()

Values on the command line are parsed as YAML scalars/lists (``--loss_type '[sigmoid, sft]'``), which also works
through the ``deepspeed`` launcher and hostfile (pdsh) runs, where only plain ``--key value`` arguments survive.
``dump_config`` writes the flat keys back out, so ``--config OUTPUT_DIR/config.yaml`` starts the same run.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path
from typing import Any

import yaml

from ds_dpo.config.schema import KEYS, SECTIONS, ConfigError, DPOConfig, make_config, unknown_key

BUILTIN_DEFAULTS: dict[str, Any] = dict(
    max_steps=150,
    per_device_train_batch_size=16,
    per_device_eval_batch_size=32,
    learning_rate=3e-3,
    warmup_ratio=0.05,
    lr_scheduler_type="cosine",
    max_length=32,
    max_prompt_length=8,
    logging_steps=10,
    eval_steps=50,
    save_steps=100,
    save_total_limit=1,
    output_dir="outputs/builtin",
)
"""The built-in run's settings (``ds_dpo.data.builtin``) for every key the user did not set."""


def _is_bool(key: str) -> bool:
    owner = DPOConfig if KEYS[key] is None else SECTIONS[KEYS[key]]
    return typing.get_type_hints(owner)[key] is bool


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
                if key in KEYS and _is_bool(key):
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
        if key not in KEYS:
            raise unknown_key(key, "the command line")
        overrides[key] = yaml.safe_load(value) if value != "" else None
    return config_file, overrides


def load_config(argv: list[str]) -> DPOConfig:
    """Build the config from ``--config`` YAML plus overrides (not yet validated).

    With neither a model nor a dataset, unset keys take the built-in tiny run's defaults (``BUILTIN_DEFAULTS``).
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
            if key not in KEYS:
                raise unknown_key(key, config_file)
        values.update(loaded)
    values.update(overrides)
    if values.get("model_name_or_path") is None and values.get("dataset") is None:
        values = {**BUILTIN_DEFAULTS, **values}
    return make_config(values)


def dump_config(cfg: DPOConfig, path: str | os.PathLike) -> None:
    """Write the run's flat keys as YAML that ``--config`` reads back into the same run; the DeepSpeed config is
    inlined as written (its ``"auto"`` values are filled again from the same keys)."""
    doc = cfg.to_dict()
    doc["deepspeed"] = cfg.parallel.deepspeed_json()
    Path(path).write_text(yaml.safe_dump(doc, sort_keys=False))
