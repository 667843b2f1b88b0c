import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import get_scheduler

from helpers.runs import REPO, read_metrics, short_run


def test_model_code_of_every_sub_model_is_imported_before_zero_init():
    """A vision-language model builds its language model and vision tower from their configs inside zero.Init; their
    modules must be imported before it (transformers 5.25's ``kernels`` class decorators are undone by zero.Init for
    classes first defined inside it: 'LlamaAttention' object has no attribute '_kernel_funcs'). In a fresh process,
    where nothing imported them yet."""
    script = (
        "import sys\n"
        "from transformers import AutoConfig\n"
        "from ds_dpo.models.engines import _import_model_code\n"
        "names = ['transformers.models.' + m for m in ('llama.modeling_llama', 'clip.modeling_clip', "
        "'llava.modeling_llava', 'idefics3.modeling_idefics3')]\n"
        "assert not any(n in sys.modules for n in names)\n"
        "_import_model_code(AutoConfig.for_model('llava'))\n"
        "_import_model_code(AutoConfig.for_model('idefics3'))\n"
        "missing = [n for n in names if n not in sys.modules]\n"
        "assert not missing, missing\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_run_follows_transformers_schedule_and_writes_its_optimizer(single_rank, builtin_files, tmp_path):
    """``cosine_with_min_lr`` with ``min_lr_rate`` (OpenRLHF's schedule) and ``warmup_steps``: the learning rate of
    each logged step is transformers' scheduler's; the DeepSpeed config written beside the run holds the optimizer
    keys."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(open(builtin_files["dataset"]).readlines()[:16]))
    schedule = dict(lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs='{"min_lr_rate": 0.1}', warmup_steps=2)
    out, steps = tmp_path / "out", 8
    recipe = short_run(builtin_files["model_name_or_path"], data, out, steps, adam_beta2=0.95, **schedule)
    assert recipe.train().status == "finished"
    recipe.cleanup()
    reference = get_scheduler(
        "cosine_with_min_lr",
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3),
        num_warmup_steps=2,
        num_training_steps=steps,
        scheduler_specific_kwargs={"min_lr_rate": 0.1},
    )
    expected = []
    for _ in range(steps):  # the rate each step runs with: the scheduler's before it steps
        expected.append(reference.get_last_lr()[0])
        reference.step()
    assert [r["learning_rate"] for r in read_metrics(out)] == pytest.approx(expected, rel=1e-9)
    assert expected[-1] < expected[2] and min(expected[2:]) >= 0.1 * 3e-3 - 1e-12  # it decays, to the floor
    written = json.loads((out / "deepspeed_config.json").read_text())["optimizer"]
    assert written == {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}}


def test_model_init_kwargs_reach_every_load_of_the_model(single_rank, builtin_files, tmp_path):
    """``model_init_kwargs: {subfolder: ...}``: the model's config, tokenizer and weights are all read from the
    subfolder (the policy's, the reference's, the DeepSpeed bucket sizes' and the model inspection's)."""
    shutil.copytree(builtin_files["model_name_or_path"], tmp_path / "repo" / "policy")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(open(builtin_files["dataset"]).readlines()[:8]))
    recipe = short_run(str(tmp_path / "repo"), data, tmp_path / "out", 1, model_init_kwargs='{"subfolder": "policy"}')
    assert recipe.train().status == "finished"
    recipe.cleanup()
    assert read_metrics(tmp_path / "out")[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)
