"""Real pretrained models end to end: SmolLM2-135M-Instruct and Gemma 3 270M (converted from the GGUF files of PyPI
packages by ``examples/smollm2-hh/prepare.py``, cached under ``outputs/``) on conversational HH-RLHF pairs rendered
with their chat templates (ChatML; Gemma 3's turns).

Skipped, saying why, when a model cannot be obtained (no network and no local copy, or no ``gguf`` package) or the
HH-RLHF file is absent. The long accuracy run is the example's (``examples/smollm2-hh/run.sh``), not a test's.
"""

import functools
import gzip
import importlib.util
import json
import math
import shutil
import sys
import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ds_dpo.config import ModelConfig
from ds_dpo.data.pipeline import load_tokenized
from ds_dpo.data.tokenization import load_tokenizer
from ds_dpo.forward.layouts import PADDED, SHARED, collate_pairs
from ds_dpo.forward.logprobs import Scoring, concatenated_forward
from ds_dpo.forward.scoring import install_token_scoring
from ds_dpo.models.support import inspect_model
from helpers.runs import REPO, launch, read_metrics

MAX_LENGTH = 256
ROWS = [0, 1, 2, 4, 5, 6, 7, 8]
"""Usable HH pairs (in file order) for the tests: rows 0 and 1 have completions cut by ``MAX_LENGTH`` (in SmolLM2's
tokens; Gemma 3's larger vocabulary cuts only one); row 3, whose prompt alone is longer than ``MAX_LENGTH`` (which
TRL drops and ds_dpo cuts), is left out."""


def _prepare_module():
    spec = importlib.util.spec_from_file_location("smollm2_prepare", REPO / "examples" / "smollm2-hh" / "prepare.py")
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def _model(name: str) -> str:
    """The converted model directory (built on first use, 1-2 min with the download)."""
    prepare = _prepare_module()
    try:
        return str(prepare.ensure_model(model=name))
    except prepare.ModelUnavailable as e:
        pytest.skip(f"{name} unavailable: {e}")


@pytest.fixture(scope="module")
def smollm2() -> str:
    return _model("smollm2-135m")


@pytest.fixture(scope="module", params=["smollm2-135m", "gemma3-270m"])
def real_model(request) -> str:
    """Each real model: SmolLM2-135M-Instruct (Llama, ChatML) and Gemma 3 270M (another family: 262k vocabulary,
    sliding-window layers, Gemma's chat template)."""
    return _model(request.param)


@pytest.fixture
def hh_pairs(hh_data, tmp_path):
    """``ROWS`` of HH-RLHF as conversational pairs (the example's conversion), in a JSONL file and as a list."""
    prepare = _prepare_module()
    pairs = []
    with gzip.open(hh_data, "rt", encoding="utf-8") as f:
        for line in f:
            try:
                pairs.append(prepare.hh_to_conversational(json.loads(line)))
            except ValueError:
                continue
            if len(pairs) > max(ROWS):
                break
    rows = [pairs[i] for i in ROWS]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, rows


@functools.lru_cache(maxsize=2)
def _trl_log_probs(model_dir: str, rows_json: str):
    """TRL 1.16: its tokenized rows (prompt/chosen/rejected ids, before its collator truncates) and the per-pair
    chosen/rejected log-probs of its padded concatenated forward (``compute_ref_log_probs``: the same fused-head
    forward and completion-mask sum as in ``_compute_loss``, without the loss). Computed once per model and session."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = json.loads(rows_json)
    output_dir = tempfile.mkdtemp(prefix="trl-")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(
        output_dir=output_dir,
        report_to=[],
        use_cpu=True,
        bf16=False,
        max_length=MAX_LENGTH,
        per_device_train_batch_size=len(rows),
        save_strategy="no",
    )
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    data = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    inputs = trainer.data_collator(data)
    trainer.model.eval()
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, inputs)
    shutil.rmtree(output_dir, ignore_errors=True)
    return data, chosen.double(), rejected.double()


@pytest.mark.slow
def test_step1_log_probs_match_trl(real_model, hh_pairs, tmp_path):
    """Tokenization and step-1 sequence log-probs of 8 conversational HH pairs, ds_dpo vs TRL 1.16's DPOTrainer on
    the same rows and ``max_length``: the same prompt/chosen/rejected ids, and per-pair chosen and rejected
    log-probs equal to 1e-5 relative, in the padded layout and in the default one (packed, prompt shared)."""
    path, rows = hh_pairs
    trl_rows, trl_chosen, trl_rejected = _trl_log_probs(real_model, json.dumps(rows))

    tokenizer = load_tokenizer(real_model)
    data = load_tokenized(path, tokenizer, max_length=MAX_LENGTH, dataset_cache_dir=str(tmp_path / "cache"))
    assert len(data) == len(trl_rows) == len(rows)  # TRL kept every row: no prompt fills max_length
    truncated = 0
    for ours, theirs in zip(data, trl_rows):
        prompt = theirs["prompt_ids"]
        assert ours["prompt_input_ids"] == prompt
        room = MAX_LENGTH - len(prompt)  # TRL's collator cuts prompt + completion to max_length (keep_start)
        assert ours["chosen_input_ids"] == theirs["chosen_ids"][:room]
        assert ours["rejected_input_ids"] == theirs["rejected_ids"][:room]
        truncated += len(theirs["chosen_ids"]) > room or len(theirs["rejected_ids"]) > room
    assert truncated >= 1  # the comparison covers completions cut by max_length (SmolLM2: 2 pairs, Gemma 3: 1)

    batch_rows = [data[i] for i in range(len(data))]
    support = inspect_model(ModelConfig(model_name_or_path=real_model))
    for layout in (PADDED, SHARED):
        attn = support.attention_for(layout)[0]  # as a run loads it: block attention for the shared layout
        model = install_token_scoring(
            AutoModelForCausalLM.from_pretrained(real_model, dtype=torch.float32, attn_implementation=attn).eval()
        )
        batch = collate_pairs(batch_rows, [1.0] * len(batch_rows), tokenizer.pad_token_id, layout)
        with torch.no_grad():
            ours = concatenated_forward(model, batch, Scoring(layout, 1024))
        for name, mine, theirs in (("chosen", ours.chosen, trl_chosen), ("rejected", ours.rejected, trl_rejected)):
            rel = ((mine.double() - theirs).abs() / theirs.abs()).max().item()
            print(f"{layout} ({attn}) {name} log-probs: max relative difference to TRL {rel:.1e}")
            assert rel < 1e-5, (layout, name, mine.tolist(), theirs.tolist())


@pytest.mark.slow
def test_two_rank_run_exports_a_model_that_generates(smollm2, hh_pairs, tmp_path, monkeypatch):
    """Two ZeRO-3 CPU ranks through launch/train.py (reference log-probs precomputed), one step on the same 8 pairs,
    then the exported model loads with plain transformers, keeps the chat template, differs from the base model and
    generates. The step's logged ``logps/chosen``/``logps/rejected`` (means over the 8 pairs, policy = base model)
    are TRL's (test above) to 1e-5 relative, and its loss is ln 2."""
    path, rows = hh_pairs
    out = tmp_path / "run"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # one thread per rank: two ranks on two cores, not four threads
    launch(
        "--model_name_or_path",
        smollm2,
        "--dataset",
        str(path),
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--learning_rate",
        "1e-5",
        "--max_length",
        str(MAX_LENGTH),
        "--reference",
        "precomputed",
        "--logging_steps",
        "1",
        "--save_steps",
        "0",
        "--scoring_self_check",
        "false",  # the test above checks these log-probs against TRL (saves ~50 s)
        "--dataset_cache_dir",
        str(tmp_path / "cache"),
        "--output_dir",
        str(out),
    )
    (first,) = read_metrics(out)
    assert first["step"] == 1 and first["grad_norm"] > 0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at step 1

    _, trl_chosen, trl_rejected = _trl_log_probs(smollm2, json.dumps(rows))
    for side, theirs in (("chosen", trl_chosen), ("rejected", trl_rejected)):
        ours, expected = first[f"logps/{side}"], theirs.mean().item()
        print(
            f"step-1 logps/{side}: ds_dpo (2 ranks) {ours:.6f}, TRL {expected:.6f}, "
            f"relative difference {abs(ours - expected) / abs(expected):.1e}; loss {first['loss']:.7f}"
        )
    assert first["logps/chosen"] == pytest.approx(trl_chosen.mean().item(), rel=1e-5)
    assert first["logps/rejected"] == pytest.approx(trl_rejected.mean().item(), rel=1e-5)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(smollm2).chat_template
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I make a cup of tea?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"exported model's reply: {reply!r}")
    assert len(reply.split()) >= 3
