import json
import subprocess
import sys

import pytest
import yaml

from ds_dpo.config import (
    BUILTIN_DEFAULTS,
    KEYS,
    SECTIONS,
    ConfigError,
    DPOConfig,
    dump_config,
    load_config,
    make_config,
)
from ds_dpo.models.ds_config import reference_deepspeed_config, resolve_deepspeed_config
from helpers.runs import REPO


def test_yaml_then_cli_overrides(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(
        "beta: 0.3\nlearning_rate: 5e-7\nloss_type: sigmoid\nlora_target_modules: [q_proj, v_proj]\n"
        "model_name_or_path: m\ndataset: d\n"
    )
    cfg = load_config(
        ["--config", str(run), "--beta", "0.2", "--per_device_train_batch_size=4", "--bf16", "--local_rank=1"]
    )
    assert cfg.loss.beta == 0.2 and cfg.optim.learning_rate == 5e-7 and cfg.optim.per_device_train_batch_size == 4
    assert cfg.model.bf16 is True and cfg.model.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.max_steps == DPOConfig().optim.max_steps  # not the built-in default: a model and dataset given


def test_builtin_defaults_fill_only_unset_keys():
    cfg = load_config(["--max_steps", "7"])
    assert cfg.builtin and cfg.optim.max_steps == 7
    assert cfg.optim.learning_rate == BUILTIN_DEFAULTS["learning_rate"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--betta", "0.1"], "unknown config key `betta`.*did you mean `beta`"),
        (["--beta", "abc"], "`beta` expects float"),
        (["--max_steps", "1.5"], "`max_steps` expects int"),
        (["--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
        (["--beta"], "`--beta` needs a value"),
        (["stray"], "unexpected argument"),
    ],
)
def test_cli_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("learning_rat: 1e-6\n")
    with pytest.raises(ConfigError, match=r"`learning_rat` in .*run.yaml.*`learning_rate`"):
        load_config(["--config", str(run)])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"reference": "lora"}, "set `use_peft: true`"),
        ({"reference": "ema"}, "`reference` must be one of"),
        ({"loss_type": "nope"}, "unknown `loss_type` 'nope'"),
        ({"beta": 0.0}, "`beta` must be > 0"),
        ({"label_smoothing": 0.5}, "label_smoothing"),
        ({"max_length": 16, "max_prompt_length": 16}, "must be < `max_length`"),
        ({"deepspeed": "ds_configs/zero4.json"}, r"DeepSpeed config `ds_configs/zero4.json` not found.*zero3.json"),
        ({"model_name_or_path": "./nowhere", "dataset": "x.jsonl"}, "does not exist"),
        ({"model_name_or_path": "m"}, "give both"),
        ({"save_merged_model": True}, "needs `use_peft: true`"),
        ({"load_in_4bit": True}, r"`load_in_4bit` .* set `use_peft: true` \(QLoRA\)"),
        ({"load_in_4bit": True, "use_peft": True}, "`load_in_4bit` with `reference: zero`: .* set `reference: lora`"),
        ({"load_in_4bit": True, "use_peft": True, "reference": "precomputed"}, "with `reference: precomputed`"),
        ({"bnb_4bit_quant_type": "int4"}, r"`bnb_4bit_quant_type` must be one of \('nf4', 'fp4'\)"),
        ({"bnb_4bit_quant_storage": "int8"}, "`bnb_4bit_quant_storage` must be one of"),
        ({"model_init_kwargs": {"quantization_config": {}}}, "sets quantization_config: set `load_in_4bit`"),
        ({"loss_type": "exo_pair"}, "exo_pair needs label_smoothing > 0"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights has 1 entries"),
        ({"loss_type": "aot", "f_divergence_type": "js_divergence"}, "not defined for \\['aot'\\]"),
        ({"ld_alpha": 1.5}, "`ld_alpha` must be in"),
        (
            {"reference": "lora", "use_peft": True, "ref_model_name_or_path": "x"},
            "cannot be used with `reference: lora`",
        ),
        ({"activation_offloading": True}, "needs `gradient_checkpointing: true`"),
        ({"tiled_mlp_shards": 0}, "`tiled_mlp_shards` must be >= 1"),
        ({"report_to": "tensorboard,mlflow"}, "`report_to` takes tensorboard, jsonl, wandb, all or none"),
        ({"sync_ref_model": True, "reference": "precomputed"}, "`reference: precomputed` and precomputed log-probs"),
        ({"sync_ref_model": True, "use_peft": True}, "the policy's weights are the base plus adapters"),
        ({"sync_ref_model": True, "loss_type": "simpo"}, "reference-free loss: there is no reference to sync"),
        ({"sync_ref_model": True, "ref_model_mixup_alpha": 0.0}, "`ref_model_mixup_alpha` must be in"),
        ({"ref_model_sync_steps": 0}, "`ref_model_sync_steps` must be >= 1"),
    ],
)
def test_validation_messages(values, message):
    with pytest.raises(ConfigError, match=message):
        make_config(values).validate()


def test_validation_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        make_config({"beta": -1.0, "learning_rate": 0.0}).validate()
    assert "`beta`" in str(e.value) and "`learning_rate`" in str(e.value)


def test_loss_mixture_from_the_command_line():
    cfg = load_config(["--loss_type", "[sigmoid, sft]", "--loss_weights", "[1, 0.5]"])
    cfg.validate()
    assert cfg.loss.loss_types == ["sigmoid", "sft"] and cfg.loss.loss_weights == [1.0, 0.5]
    with pytest.raises(ConfigError, match="`loss_weights` expects"):
        load_config(["--loss_weights", "[a, b]"])


def test_precomputed_implies_precompute_flag():
    assert make_config({"reference": "precomputed"}).ref.precompute_ref_log_probs


def test_deepspeed_auto_values_filled(builtin_files):
    cfg = make_config(
        {
            **builtin_files,
            "per_device_train_batch_size": 3,
            "gradient_accumulation_steps": 2,
            "learning_rate": 1e-5,
            "max_grad_norm": 0.5,
            "weight_decay": 0.01,
        }
    )
    ds = resolve_deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["lr"] == 1e-5 and ds["optimizer"]["params"]["weight_decay"] == 0.01
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 3
    zero = ds["zero_optimization"]  # HF Trainer's bucket rule from the built-in model's hidden size, 64
    assert (
        zero["reduce_bucket_size"],
        zero["stage3_prefetch_bucket_size"],
        zero["stage3_param_persistence_threshold"],
    ) == (4096, 3686, 640)
    ref = reference_deepspeed_config(ds, ref_offload=True)
    assert ref["zero_optimization"]["stage"] == 3 and ref["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "optimizer" not in ref and ref["train_batch_size"] == 24


def test_reference_engine_inherits_the_policys_parameter_settings():
    leaf = {"classes": ["my_models.MoeBlock"], "name_suffixes": ["experts"]}
    policy = {
        "train_batch_size": 8,
        "optimizer": {"type": "AdamW"},
        "zero_optimization": {
            "stage": 3,
            "leaf_module": leaf,
            "zero_quantized_weights": True,
            "zero_hpz_partition_size": 2,
            "stage3_prefetch_bucket_size": 1234,
            "stage3_param_persistence_threshold": 99,
            "reduce_bucket_size": 5,
            "offload_optimizer": {"device": "cpu"},
            "offload_param": {"device": "nvme", "nvme_path": "/nvme"},
        },
    }
    ref = reference_deepspeed_config(policy, ref_offload=False)["zero_optimization"]
    assert ref == {
        "stage": 3,
        "leaf_module": leaf,
        "zero_quantized_weights": True,
        "zero_hpz_partition_size": 2,
        "stage3_prefetch_bucket_size": 1234,
        "stage3_param_persistence_threshold": 99,
    }
    offloaded = reference_deepspeed_config(policy, ref_offload=True)["zero_optimization"]
    assert offloaded["offload_param"] == {"device": "nvme", "nvme_path": "/nvme"}  # the policy's own offload target
    zero2 = reference_deepspeed_config({"zero_optimization": {"stage": 2, "allgather_bucket_size": 7}}, True)
    assert zero2["zero_optimization"] == {
        "stage": 3,
        "offload_param": {"device": "cpu", "pin_memory": True},
        "stage3_param_persistence_threshold": 1e4,
    }


def test_deepspeed_batch_size_conflict_is_explained(tmp_path):
    ds_file = tmp_path / "ds.json"
    preset = make_config({}).parallel.deepspeed_json()
    ds_file.write_text(json.dumps({**preset, "train_batch_size": 32}))
    cfg = make_config({"deepspeed": str(ds_file), "per_device_train_batch_size": 4})
    with pytest.raises(ConfigError, match=r"train_batch_size.*32.*needs 8.*world size 2"):
        resolve_deepspeed_config(cfg, world_size=2)


def test_every_preset_resolves(builtin_files):
    for preset in ("zero1", "zero2", "zero3", "zero3_offload", "ddp"):
        ds = resolve_deepspeed_config(
            make_config({**builtin_files, "deepspeed": f"ds_configs/{preset}.json"}), world_size=2
        )
        assert "auto" not in json.dumps(ds)


def test_dump_reads_back_as_the_same_config(builtin_files, tmp_path):
    """config.yaml holds the flat keys a user types, the DeepSpeed JSON inlined as written ("auto" values kept, so
    it resolves again for any world size); --config on it gives the same config."""
    cfg = make_config({**builtin_files, "beta": 0.25, "loss_type": ["sigmoid", "sft"], "max_prompt_length": None})
    dump_config(cfg, tmp_path / "config.yaml")
    doc = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert doc["beta"] == 0.25 and "local_rank" not in doc and set(doc) == set(KEYS) - {"local_rank"}
    assert doc["deepspeed"]["train_batch_size"] == "auto"
    again = load_config(["--config", str(tmp_path / "config.yaml")])
    again.validate()
    assert again.to_dict() == {**cfg.to_dict(), "deepspeed": doc["deepspeed"]}
    assert resolve_deepspeed_config(again, world_size=2) == resolve_deepspeed_config(cfg, world_size=2)


def test_every_key_is_documented_and_the_docs_table_is_the_generated_one():
    """Every key has a docstring on its field, and docs/configuration.md's table is
    `python -m ds_dpo.config.docs --write`'s output."""
    from ds_dpo.config import docs

    for key, section in KEYS.items():
        owner = DPOConfig if section is None else SECTIONS[section]
        assert docs._field_docs(owner).get(key), f"`{key}` has no docstring"
    table = docs.written_table()
    assert table.strip() == docs.config_reference().strip(), "run `python -m ds_dpo.config.docs --write`"
    assert all(f"| `{key}` |" in table for key in KEYS if key != "local_rank")


def test_max_length_alone_is_enough():
    """A TRL habit: `--max_length 512` with nothing else (TRL 1.16 has no `max_prompt_length`)."""
    cfg = load_config(["--model_name_or_path", "m", "--dataset", "d", "--max_length", "512"])
    assert cfg.data.max_prompt_length is None
    problems = [p for p in cfg.data.problems() if "max_length" in p or "max_prompt_length" in p]
    assert problems == []


@pytest.mark.parametrize(
    "example", sorted((REPO / "examples").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO / "examples"))
)
def test_example_configs_load_and_validate(example):
    """Every example config's keys and values are valid; only files an example prepares itself (under outputs/)
    may be missing."""
    cfg = load_config(["--config", str(example)])
    try:
        cfg.validate()
    except ConfigError as e:
        problems = str(e).splitlines()[1:]
        assert all("does not exist" in p and "'outputs/" in p for p in problems), str(e)


def test_report_to_takes_lists_commas_all_and_none(monkeypatch):
    reporters = lambda value: make_config({"report_to": value}).logging.reporters  # noqa: E731
    assert reporters("tensorboard,jsonl") == reporters(["tensorboard", "jsonl"]) == ["tensorboard", "jsonl"]
    assert reporters("none") == [] and reporters("wandb") == ["wandb"]
    assert reporters("all") == ["tensorboard", "jsonl", "wandb"]
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else object())
    assert reporters("all") == ["tensorboard", "jsonl"]
    with pytest.raises(ConfigError, match="names wandb, which is not installed: `pip install wandb`"):
        make_config({"report_to": ["wandb"]}).validate()


def test_help_lists_every_key_with_its_default():
    """`python launch/train.py --help` (a new user's first command) prints the usage and every key, and exits 0."""
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("Train a policy with DPO on DeepSpeed.")
    assert "\n  --beta 0.1\n" in proc.stdout and "\n  --heartbeat_timeout 60\n" in proc.stdout
    listed = {line.split()[0][2:] for line in proc.stdout.splitlines() if line.startswith("  --")}
    assert listed == set(KEYS) - {"local_rank"}


def test_optimizer_keys_fill_the_deepspeed_optimizer_block_and_explicit_values_must_agree(builtin_files, tmp_path):
    """``optim``, ``adam_beta1/2``, ``adam_epsilon`` go into the DeepSpeed JSON's optimizer block (HF Trainer's
    names; each optimizer gets the values it takes); a JSON that says otherwise is an error naming both."""

    def optimizer(**keys):
        return resolve_deepspeed_config(make_config({**builtin_files, **keys}), world_size=2)["optimizer"]

    assert optimizer() == {
        "type": "AdamW",
        "params": {"lr": 1e-6, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0},
    }
    assert optimizer(optim="lion_32bit", adam_beta2=0.99) == {
        "type": "Lion",
        "params": {"lr": 1e-6, "betas": [0.9, 0.99], "weight_decay": 0.0},
    }
    assert optimizer(optim="adagrad", adam_epsilon=1e-6)["params"] == {"lr": 1e-6, "eps": 1e-6, "weight_decay": 0.0}
    assert optimizer(optim="Lamb")["type"] == "Lamb"
    with pytest.raises(ConfigError, match="`optim` must be one of"):
        make_config({"optim": "sgd"}).validate()

    def own_json(block):
        preset = {k: v for k, v in make_config({}).parallel.deepspeed_json().items() if k != "optimizer"}
        path = tmp_path / f"ds{len(list(tmp_path.iterdir()))}.json"
        path.write_text(json.dumps({**preset, **block}))
        return str(path)

    assert optimizer(deepspeed=own_json({}))["type"] == "AdamW"  # a JSON without an optimizer block gets one
    explicit = own_json({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}})
    assert optimizer(deepspeed=explicit, adam_beta2=0.95)["params"]["betas"] == [0.9, 0.95]
    with pytest.raises(ConfigError, match=r"optimizer.params.betas.*\[0.9, 0.95\].*needs \[0.9, 0.999\]"):
        optimizer(deepspeed=explicit)
    with pytest.raises(ConfigError, match=r"optimizer is 'AdamW' but `optim` is 'lion_32bit'"):
        optimizer(deepspeed=explicit, optim="lion_32bit")


def test_schedule_keys_are_checked_before_any_model_is_loaded(builtin_files, tmp_path):
    def resolve(**keys):
        return resolve_deepspeed_config(make_config({**builtin_files, **keys}), world_size=2)

    resolve(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=2)
    with pytest.raises(ConfigError, match="cosine_with_min_lr.*min_lr"):
        resolve(lr_scheduler_type="cosine_with_min_lr")  # it needs min_lr or min_lr_rate
    with pytest.raises(ConfigError, match="warmup_stable_decay.*unexpected keyword"):
        resolve(lr_scheduler_type="warmup_stable_decay", lr_scheduler_kwargs={"typo": 1})
    with_block = tmp_path / "ds.json"
    with_block.write_text(
        json.dumps({**make_config({}).parallel.deepspeed_json(), "scheduler": {"type": "WarmupLR", "params": {}}})
    )
    resolve(deepspeed=str(with_block))  # the JSON's schedule, the run's schedule keys left alone
    with pytest.raises(ConfigError, match=r"own `scheduler` block \(WarmupLR\).*lr_scheduler_type='cosine'"):
        resolve(deepspeed=str(with_block), lr_scheduler_type="cosine")


def test_init_kwargs_that_contradict_their_own_keys_are_named():
    make_config({"model_init_kwargs": {"revision": "main", "dtype": "float32"}}).validate()
    with pytest.raises(ConfigError) as bad:
        make_config(
            {
                "model_init_kwargs": {"dtype": "bfloat16", "attn_implementation": "eager"},
                "ref_model_init_kwargs": {"torch_dtype": "torch.float16"},
            }
        ).validate()
    for part in (
        "`model_init_kwargs` sets dtype='bfloat16', but `bf16` makes it 'float32'",
        "`model_init_kwargs` sets attn_implementation='eager', but `attn_implementation` makes it 'sdpa'",
        "`ref_model_init_kwargs` sets torch_dtype='torch.float16'",
    ):
        assert part in str(bad.value)
    cfg = make_config({"model_init_kwargs": {"revision": "v2", "low_cpu_mem_usage": True}})
    assert cfg.model.source == {"trust_remote_code": False, "revision": "v2"}
    assert cfg.ref_init_kwargs == {"revision": "v2", "low_cpu_mem_usage": True}  # the same checkpoint: the same files
    other = make_config({"ref_model_name_or_path": "org/ref", "model_init_kwargs": {"revision": "v2"}})
    assert other.ref_init_kwargs == {}


def test_named_eval_sets_and_the_best_checkpoint_keys_are_checked():
    """``eval_dataset: {name: source}`` names eval sets (metric prefix ``eval_<name>_``, HF's); the best-checkpoint
    keys take HF's names and defaults, and a best checkpoint that could not be among the checkpoints, or a metric no
    set logs, is named at startup."""
    from ds_dpo.config import eval_prefix, eval_sets

    named = {"hh": "org/hh", "uf": [{"path": "org/uf", "split": "test_prefs"}, "org/more"]}
    sets = eval_sets(named)
    assert (
        list(sets) == ["hh", "uf"]
        and [s.path for s in sets["uf"]] == ["org/uf", "org/more"]
        and sets["uf"][0].split == "test_prefs"
    )
    assert [s.path for s in eval_sets("a.jsonl")[""]] == ["a.jsonl"] and eval_sets(None) == {}
    assert (eval_prefix(""), eval_prefix("hh")) == ("eval_", "eval_hh_")
    for bad, message in (
        ({"a/b": "x"}, "without '/'"),
        ({"": "x"}, "non-empty"),
        ({"a": []}, "set 'a' has no source"),
        ({"a": [{"split": "test"}]}, "set 'a': entry 1 must be"),
        ({"path": "x", "split": "test"}, r"one source with its own split is a list: \[\{path, split\}\]"),
    ):
        with pytest.raises(ConfigError, match=message):
            make_config({"eval_dataset": bad}).validate()

    best = make_config({"load_best_model_at_end": True, "save_steps": 20, "eval_steps": 10}).checkpoint
    assert (best.best_metric, best.best_is_greater) == ("eval_loss", False)  # HF: `loss` when none is named
    accuracy = make_config({"metric_for_best_model": "rewards/accuracies"}).checkpoint
    assert (accuracy.best_metric, accuracy.best_is_greater) == ("eval_rewards/accuracies", True)
    flipped = make_config({"metric_for_best_model": "eval_loss", "greater_is_better": True}).checkpoint
    assert (flipped.best_metric, flipped.best_is_greater) == ("eval_loss", True)
    assert make_config({}).checkpoint.best_metric is None
    every_save_evaluated = "`load_best_model_at_end` needs a checkpoint at evaluation steps: set `save_steps`"
    for values in ({"save_steps": 25, "eval_steps": 10}, {"save_steps": 0, "eval_steps": 10}, {"save_steps": 10}):
        with pytest.raises(ConfigError, match=every_save_evaluated):
            make_config({"load_best_model_at_end": True, **values}).validate()
    make_config({"eval_dataset": named, "metric_for_best_model": "hh_loss"}).validate()  # `eval_` is added
    with pytest.raises(ConfigError, match=r"`metric_for_best_model` 'eval_loss' names no eval set.*`eval_hh_loss`"):
        make_config(
            {"eval_dataset": named, "load_best_model_at_end": True, "save_steps": 10, "eval_steps": 10}
        ).validate()
