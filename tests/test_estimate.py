"""The memory estimator (``ds_dpo.estimate``, ``launch/estimate.py``): its accounting against DeepSpeed's own
estimators and hand counts; the command line. How close it comes to measured runs is benchmarks/estimate_check.py's
job (docs/deepspeed.md, "Will it fit?")."""

import importlib.util

import pytest
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, T5Config

from ds_dpo.config import make_config
from ds_dpo.estimate import (
    CANDIDATES,
    ModelShape,
    Setup,
    Workload,
    auto_preset,
    auto_setup,
    estimate,
    lora_params,
    model_states,
    own_model_states,
    workload,
)
from ds_dpo.forward.layouts import PACKED, PADDED, SHARED
from ds_dpo.forward.logprobs import CHUNK_LOGITS_BYTES, chunk_size
from ds_dpo.models.engines import lora_config
from helpers.runs import REPO

LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)


def work(**changes):
    values = dict(
        world=8,
        gpus_per_node=8,
        bf16=True,
        trainable_params=None,
        reference="zero",
        ref_offload=False,
        layout=SHARED,
        pairs=4,
        prompt_tokens=1024,
        completion_tokens=512,
        max_tokens_per_batch=None,
        logps_chunk_size=1024,
        sequence_parallel=1,
        tiled_mlp_shards=1,
        attention="sdpa",
    )
    return Workload(**{**values, **changes})


def test_shape_counts_the_model_without_building_it():
    shape = ModelShape.of(LlamaConfig(**LLAMA_8B))
    assert shape.params == 8_030_261_248  # Llama-3-8B's published count
    assert shape.largest_layer_params == 128256 * 4096  # an embedding (or the untied head)
    assert (shape.layers, shape.hidden, shape.kv_width, shape.intermediate) == (32, 4096, 1024, 14336)


@pytest.mark.parametrize("setup", [s for s in CANDIDATES if s.zero_stage > 0])
@pytest.mark.parametrize("world", [1, 8, 16])
def test_own_accounting_is_deepspeeds_for_bf16_full_fine_tuning(setup, world):
    shape = ModelShape.of(LlamaConfig(**LLAMA_8B))
    w = work(world=world, gpus_per_node=min(world, 8))
    assert own_model_states(shape, setup, w)[0] == pytest.approx(model_states(shape, setup, w)[0], rel=1e-6)


def test_fp32_and_lora_states_by_hand():
    shape = ModelShape(
        params=1000, largest_layer_params=100, layers=2, hidden=8, intermediate=16, heads=2, kv_width=8, vocab=50
    )
    zero3 = Setup(3)
    # fp32 ZeRO-3 on 4 ranks: (4 weight + 4 grad + 8 Adam) / 4 per parameter + 2 x 4 bytes of the largest layer
    assert model_states(shape, zero3, work(world=4, bf16=False))[0] == 16 * 1000 / 4 + 8 * 100
    # LoRA with 10 trainable: the base's weights, the adapters' states
    assert (
        model_states(shape, zero3, work(world=4, bf16=False, trainable_params=10))[0]
        == 4 * 1000 / 4 + 8 * 100 + 12 * 10 / 4
    )
    # ZeRO-2 in bf16 keeps every 16-bit weight and 18 bytes of states per parameter, partitioned
    assert model_states(shape, Setup(2), work(world=4, trainable_params=10))[0] == 2 * 1000 + 18 * 10 / 4


def test_auto_picks_the_first_setup_that_fits_plain_deepspeed_on_one_rank():
    """``deepspeed: auto``: on one rank plain DeepSpeed (ZeRO-0; in fp32 12 bytes of states per parameter, no
    partition copy) and, when it does not fit, everything offloaded; on several ranks ZeRO-2, ZeRO-3, offload."""
    shape = ModelShape.of(LlamaConfig(**LLAMA_8B))
    assert own_model_states(shape, Setup(0), work(world=1, bf16=False))[0] == (4 + 12) * shape.params
    picks = {}
    for world, budget_gb in [(1, 200), (1, 40), (8, 80), (8, 30), (8, 10), (8, 4)]:
        setup, found, fits = auto_setup(shape, work(world=world, pairs=1), True, budget_gb * 2**30)
        assert setup.gradient_checkpointing and fits == (found.total <= budget_gb * 2**30)
        picks[world, budget_gb] = (auto_preset(setup), fits)
    assert picks == {
        (1, 200): ("ds_configs/ddp.json", True),
        (1, 40): ("ds_configs/zero3_offload.json", True),
        (8, 80): ("ds_configs/zero2.json", True),
        (8, 30): ("ds_configs/zero3.json", True),
        (8, 10): ("ds_configs/zero3_offload.json", True),
        (8, 4): ("ds_configs/zero3_offload.json", False),
    }


def test_rows_by_layout_and_sequence_parallel():
    assert work(layout=SHARED).row_tokens() == 4 * (1024 + 2 * 512)
    assert work(layout=PACKED).row_tokens() == work(layout=PADDED).row_tokens() == 4 * 2 * (1024 + 512)
    assert work(sequence_parallel=4).row_tokens() == 4 * 2048 // 4
    assert work(max_tokens_per_batch=3000).row_tokens() == 3000


def test_checkpointing_tiling_and_offload_each_lower_the_estimate():
    shape = ModelShape.of(LlamaConfig(**LLAMA_8B))
    totals = [
        estimate(shape, s, work()).total
        for s in (
            Setup(3),
            Setup(3, gradient_checkpointing=True),
            Setup(3, True, False, True),
            Setup(3, True, True, True),
        )
    ]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
    plain = estimate(shape, Setup(3, gradient_checkpointing=True), work()).parts["activations"]
    tiled = estimate(shape, Setup(3, gradient_checkpointing=True), work(tiled_mlp_shards=4)).parts["activations"]
    assert tiled < plain
    assert "reference" not in estimate(shape, Setup(3), work(reference="lora")).parts


def test_lora_count_is_peft_s():
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    cfg = make_config({"use_peft": True, "lora_r": 4})
    model = get_peft_model(AutoModelForCausalLM.from_config(config), lora_config(cfg.model))
    assert lora_params(cfg, config) == sum(p.numel() for p in model.parameters() if p.requires_grad) > 0


def test_command_line_gives_a_table_and_a_verdict(tmp_path, capsys):
    """launch/estimate.py's main, in this process: exit 0 with a verdict, 1 when nothing fits, 2 for a bad config,
    an encoder-decoder model (not estimated) and a model config it cannot read (one line, no traceback)."""
    spec = importlib.util.spec_from_file_location("estimate_cli", REPO / "launch" / "estimate.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    LlamaConfig(**LLAMA_8B).save_pretrained(tmp_path / "llama-8b")
    T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4).save_pretrained(tmp_path / "t5")
    (tmp_path / "pairs.jsonl").write_text("")

    def run(*args, model="llama-8b"):
        code = cli.main(
            [
                "--model_name_or_path",
                str(tmp_path / model),
                "--dataset",
                str(tmp_path / "pairs.jsonl"),
                "--bf16",
                "true",
                "--max_length",
                "2048",
                *args,
            ]
        )
        return code, *capsys.readouterr()

    code, out, err = run("--num_gpus", "8", "--gpu_memory_gb", "80")
    assert code == 0, err
    assert "8.03 B parameters" in out and "verdict: fits with ZeRO-" in out
    assert out.count("| ZeRO-") == len(CANDIDATES)  # the configured setup (ZeRO-3) is one of them
    code, out, _ = run("--num_gpus", "1", "--gpu_memory_gb", "16")
    assert code == 1 and "verdict: no setup fits" in out
    code, _, err = run("--num_gpus", "1", "--beta", "-1")
    assert code == 2 and "`beta`" in err
    code, _, err = run(model="t5")
    assert code == 2 and "T5ForConditionalGeneration is an encoder-decoder model" in err
    (tmp_path / "no-config").mkdir()  # as a Hub id without Hub access: no config.json to read
    code, _, err = run(model="no-config")
    assert code == 2 and f"cannot read the model config of '{tmp_path / 'no-config'}'" in err
    assert "give a local directory holding the model's config.json" in err and "Traceback" not in err


@pytest.mark.parametrize(("vocab", "rows"), [(32000, 1024), (65536, 1024), (128256, 512), (262144, 256)])
def test_auto_chunks_are_sized_to_the_vocabulary(vocab, rows):
    """`logps_chunk_size: auto` keeps a chunk's fp32 logits within 256 MiB, as the run and the estimator see it."""
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config.vocab_size = vocab
    assert chunk_size("auto", config) == rows and rows * vocab * 4 <= CHUNK_LOGITS_BYTES
    assert workload(make_config({}), config, world=1, gpus_per_node=1).logps_chunk_size == rows
    assert workload(make_config({"logps_chunk_size": 64}), config, world=1, gpus_per_node=1).logps_chunk_size == 64
