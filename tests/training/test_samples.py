"""Replies to held-out prompts during evaluation (``generate_during_eval``) and the throughput metrics that compare
layouts and hardware (``token_efficiency``, ``mfu``)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing import plugin_event_accumulator
from tensorboard.util import tensor_util
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ds_dpo.config import ConfigError, make_config
from ds_dpo.config.schema import SamplesConfig
from ds_dpo.forward.layouts import PACKED, PADDED, SEQ2SEQ, SHARED, collate_pairs
from ds_dpo.training.loggers import MetricsLogger, samples_markdown
from ds_dpo.training.metrics import flops_per_position, matmul_params, mfu, peak_bf16_flops
from ds_dpo.training.samples import EvalSamples, Sample
from helpers.models import tiny_model
from helpers.runs import launch, read_metrics, short_run

# --- throughput ----------------------------------------------------------------------------------------------------


def pair(prompt: int, chosen: int, rejected: int, start: int = 1) -> dict:
    """A tokenized pair of these lengths; ``start`` makes token ids that differ from other pairs'."""
    ids = lambda n, offset: list(range(start + offset, start + offset + n))  # noqa: E731
    return {
        "index": 0,
        "prompt_input_ids": ids(prompt, 0),
        "chosen_input_ids": ids(chosen, 100),
        "rejected_input_ids": ids(rejected, 200),
    }


def test_distinct_tokens_and_forward_positions_by_layout():
    """Pairs (prompt, chosen, rejected) of (3, 2, 4) and (1, 5, 1) tokens: 16 distinct tokens. Padded: 4 rows of the
    longest sequence, 3 + 4 = 7, so 28 positions; packed: each prompt twice, 3+2+3+4 + 1+5+1+1 = 20; shared: 16.
    A filler (weight 0) is computed but adds no distinct token; a second pair with the same prompt and chosen reply
    adds only its rejected reply."""
    rows = [pair(3, 2, 4, start=1), pair(1, 5, 1, start=1000)]
    counts = {
        layout.name: [
            int(collate_pairs(rows, [1.0, 1.0], 0, layout)[k]) for k in ("distinct_tokens", "forward_positions")
        ]
        for layout in (PADDED, PACKED, SHARED)
    }
    assert counts == {"padded": [16, 28], "packed": [16, 20], "shared": [16, 16]}
    filler = collate_pairs(rows, [1.0, 0.0], 0, SHARED)
    assert (int(filler["distinct_tokens"]), int(filler["forward_positions"])) == (3 + 2 + 4, 16)
    ranked = [rows[0], {**rows[0], "rejected_input_ids": [7, 8, 9, 10, 11, 12]}]  # prompt 3, replies 2, 4 and 6
    batch = collate_pairs(ranked, [1.0, 1.0], 0, SHARED)
    assert (int(batch["distinct_tokens"]), int(batch["forward_positions"])) == (3 + 2 + 4 + 6, 15)


def test_peak_flops_by_device_name():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("NVIDIA L40") is None and peak_bf16_flops("Tesla T4") is None


def test_mfu_from_hand_derived_numbers():
    """Full fine-tuning of 1e9 parameters with a 1e9-parameter reference engine: 6e9 + 2e9 = 8e9 FLOPs per position.
    1e5 positions in 2 s on 8 GPUs of 989e12 FLOP/s: 8e14 / (2 * 8 * 989e12) = 0.0505561...
    LoRA (1e7 trainable of 1e9) with the adapter-disabled reference (0.99e9): 4e9 + 2e7 + 1.98e9 = 6e9.
    Precomputed reference log-probs: 6e9."""
    assert flops_per_position(10**9, 10**9, 10**9) == 8e9
    assert mfu(1e5, 2.0, 8e9, 8, 989e12) == pytest.approx(0.0505561172901921, rel=1e-12)
    assert flops_per_position(10**9, 10**7, 99 * 10**7) == 6e9
    assert flops_per_position(10**9, 10**9, 0) == 6e9


def test_matmul_params_leave_out_an_untied_input_embedding():
    """Hidden 8, vocab 32, one layer: embedding 256, attention 4 * 64 (q, k, v, o; as many kv heads as heads), MLP
    3 * 8 * 16, norms 8 + 8 + final 8, head 256."""
    config = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    untied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=False))
    body = 4 * 64 + 3 * 8 * 16 + 3 * 8
    assert matmul_params(untied) == (body + 256, body + 256)
    tied = LlamaForCausalLM(LlamaConfig(**config, tie_word_embeddings=True))
    tied.model.norm.weight.requires_grad_(False)
    assert matmul_params(tied) == (body + 256, body + 256 - 8)


# --- samples -------------------------------------------------------------------------------------------------------


def test_generate_during_eval_needs_an_eval_set_and_checks_its_keys():
    """Whether there are held-out pairs is known once the data is read (a training source's test split may be the
    eval set): no eval set is refused there."""
    with pytest.raises(ConfigError, match="`generate_during_eval` answers held-out prompts and there are none"):
        EvalSamples.for_run(SamplesConfig(generate_during_eval=True), None, None, False, False, torch.device("cpu"))
    with pytest.raises(ConfigError, match="`generate_num_prompts` must be >= 1"):
        make_config({"generate_num_prompts": 0}).validate()


def test_markdown_cells_stay_on_one_line():
    text = samples_markdown([Sample(1, "policy", "a | b\nc", "")])
    assert text.splitlines() == ["| prompt | reply |", "|---|---|", "| a \\| b<br>c |   |"]


def plain_replies(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy replies of a saved model with plain transformers, one prompt at a time (no padding)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    replies = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return replies


def check_samples(out: Path, model_dir: str, eval_file: str, evals: list[int], num_prompts: int, new_tokens: int):
    """samples.jsonl holds the policy's replies at each evaluation and the reference's at the first, to the first
    ``num_prompts`` eval prompts; the reference's are the starting model's and the last ones the final model's, as
    plain transformers generates them; TensorBoard has them as text."""
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    first = [json.loads(line)["prompt"] for line in Path(eval_file).read_text().splitlines()[:num_prompts]]
    expected_keys = [(step, "policy") for step in evals] + [(evals[0], "reference")]
    assert sorted({(r["step"], r["model"]) for r in rows}) == sorted(expected_keys)
    for key in expected_keys:
        batch = [r for r in rows if (r["step"], r["model"]) == key]
        assert [r["prompt"].removeprefix("<s>").strip() for r in batch] == first, batch
        assert any(r["completion"].strip() for r in batch), batch  # a reply may be an end-of-sequence token alone
    reference = [r["completion"] for r in rows if r["model"] == "reference"]
    prompts = [r["prompt"] for r in rows if r["model"] == "reference"]
    assert reference == plain_replies(Path(model_dir), prompts, new_tokens)
    last = [r["completion"] for r in rows if (r["step"], r["model"]) == (evals[-1], "policy")]
    assert last == plain_replies(out, prompts, new_tokens)

    board = plugin_event_accumulator.EventAccumulator(str(out / "runs" / out.name))
    board.Reload()
    # torch's add_text appends /text_summary to the tag
    assert set(board.PluginTagToContent("text")) == {f"eval/samples/{m}/text_summary" for m in ("policy", "reference")}
    texts = board.Tensors("eval/samples/policy/text_summary")
    assert [t.step for t in texts] == evals
    table = tensor_util.make_ndarray(texts[-1].tensor_proto).item().decode()
    assert table.splitlines()[2:] == [f"| {p} | {c or ' '} |" for p, c in zip(prompts, last)]
    return rows


def test_a_run_writes_replies_and_throughput(single_rank, builtin_files, tmp_path):
    """One 1-rank ZeRO-3 run, padded batches, a reference engine, evaluations at steps 2 and 4."""
    plain = AutoModelForCausalLM.from_pretrained(builtin_files["model_name_or_path"])  # before ZeRO-3 is set up
    body = sum(p.numel() for p in plain.parameters()) - plain.get_input_embeddings().weight.numel()  # untied
    out = tmp_path / "run"
    recipe = short_run(
        builtin_files["model_name_or_path"],
        builtin_files["dataset"],
        out,
        4,
        eval_dataset=builtin_files["eval_dataset"],
        eval_steps=2,
        per_device_eval_batch_size=64,  # 256 eval pairs in 4 forwards
        padding_free=False,
        generate_during_eval=True,
        generate_num_prompts=3,
        generate_max_new_tokens=6,
    )
    first_step = [recipe.train_data[i] for i in next(recipe.sampler.plans(0, 0))[2].micro_batches[0]]
    assert matmul_params(recipe.policy.module) == (body, body)  # ZeRO-3 partitioned parameters count whole
    try:
        recipe.train()
        recipe.save()
    finally:
        recipe.cleanup()
    check_samples(out, builtin_files["model_name_or_path"], builtin_files["eval_dataset"], [2, 4], 3, 6)

    # Step 1, padded: the built-in pairs are 6 + 6 + 6 tokens, so 2B rows of 12 positions; its 4 pairs have distinct
    # prompts, so 18 of each pair's 24 positions are needed
    assert {len(r[f"{k}_input_ids"]) for r in first_step for k in ("prompt", "chosen", "rejected")} == {6}
    assert len({tuple(r["prompt_input_ids"]) for r in first_step}) == 4
    metrics = read_metrics(out)
    assert metrics[0]["token_efficiency"] == 18 / 24
    assert all("mfu" not in m for m in metrics)  # CPU: no MFU
    assert 0 < read_metrics(out, "eval_")[-1]["eval_token_efficiency"] < 1


@pytest.mark.slow
def test_replies_under_two_rank_zero3_are_the_plain_models(builtin_files, tmp_path):
    """2 ranks of ZeRO-3, each generating under ``synced_gpus``: the reference's replies are the starting model's and
    the last ones the exported model's, as plain transformers generates them (shared-prefix batches)."""
    out = tmp_path / "run"
    launch(
        model_name_or_path=builtin_files["model_name_or_path"],
        dataset=builtin_files["dataset"],
        eval_dataset=builtin_files["eval_dataset"],
        max_steps=4,
        eval_steps=2,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=64,
        logging_steps=1,
        save_steps=0,
        output_dir=str(out),
        generate_during_eval=True,
        generate_num_prompts=3,
        generate_max_new_tokens=6,
    )
    check_samples(out, builtin_files["model_name_or_path"], builtin_files["eval_dataset"], [2, 4], 3, 6)
    assert read_metrics(out)[0]["token_efficiency"] == 1.0  # shared layout, no fillers: every position needed


def test_wandb_gets_the_replies_as_a_table(tmp_path, monkeypatch):
    from test_metrics import written_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = MetricsLogger(tmp_path, rank=0, total_steps=2, report_to=("wandb",))
    samples = [Sample(2, "policy", "count up from 3 :", "4 5"), Sample(2, "reference", "count up from 3 :", "9")]
    logger.log_samples(2, samples)
    logger.close()
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    row = written_records(run, rows=1)[1][0]
    assert row["train/global_step"] == 2 and row["eval/samples/_type"] == "table-file"
    table = json.loads((run / "files" / row["eval/samples/path"]).read_text())
    assert table["columns"] == ["step", "model", "prompt", "completion"]
    assert table["data"] == [[2, "policy", "count up from 3 :", "4 5"], [2, "reference", "count up from 3 :", "9"]]


class WordTokenizer:
    """Token ids as words; pad (0) and end-of-sequence (2) are the special tokens."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (0, 2)))


@pytest.mark.parametrize("family, layout", [("llama", SHARED), ("t5gemma", SEQ2SEQ)])
def test_prompts_of_different_lengths_get_the_replies_each_gets_alone(single_rank, family, layout):
    """One padded batch (left-padded for a decoder, right-padded for an encoder) through the scoring forward and, for
    the decoder, ds_dpo's block attention, replies as plain ``generate`` does to each prompt alone."""
    model, _ = tiny_model(family, layout=layout)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    samples = EvalSamples(prompts, WordTokenizer(), 5, layout is SEQ2SEQ, torch.device("cpu"))
    replies = [s.completion for s in samples.generate(3, SimpleNamespace(module=model), None)]
    alone = []
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0].tolist()
        alone.append(WordTokenizer().decode(out if layout is SEQ2SEQ else out[len(prompt) :], skip_special_tokens=True))
    assert replies == alone and all(replies)
    assert not model.training  # as it was


def test_the_lora_reference_answers_with_the_adapters_off(single_rank):
    """With ``reference: lora`` the reference's replies are the base model's, and the policy's its own."""
    from peft import LoraConfig, get_peft_model

    from ds_dpo.training.reference import AdapterReference

    model, _ = tiny_model("llama", layout=SHARED)
    base, _ = tiny_model("llama", layout=SHARED)  # the same weights (not a deep copy: its forward would be model's)
    torch.manual_seed(0)
    policy = SimpleNamespace(module=get_peft_model(model, LoraConfig(r=4, init_lora_weights=False)))
    prompts = [[5, 6, 7], [8, 9]]
    samples = EvalSamples(prompts, WordTokenizer(), 5, False, torch.device("cpu"))
    replies = samples.generate(3, policy, AdapterReference(policy, None))
    again = samples.generate(4, policy, AdapterReference(policy, None))
    plain = lambda m: EvalSamples(prompts, WordTokenizer(), 5, False, torch.device("cpu")).generate(  # noqa: E731
        3, SimpleNamespace(module=m), None
    )
    assert [s.completion for s in replies if s.model == "reference"] == [s.completion for s in plain(base)]
    assert [s.completion for s in replies if s.model == "policy"] != [s.completion for s in plain(base)]
    assert {s.model for s in again} == {"policy"}  # the reference answers once
