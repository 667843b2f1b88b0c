"""Sequence parallelism (``ds_dpo.forward.sequence_parallel``) on 2 CPU ranks, spawned here (gloo, no engine): each rank runs
its slice of the rows through Ulysses attention and scores the tokens predicted there; the group's log-probs equal
one process's plain padded forward, and the group's gradients add up to its gradient."""

import pytest
import torch
import torch.multiprocessing as mp

from ds_dpo import distributed
from ds_dpo.forward import hooks, sequence_parallel
from ds_dpo.forward.layouts import LAYOUTS, PADDED, collate_pairs
from helpers.models import TINY, install_emulated_flash, tiny_model
from helpers.pairs import PAIRS, forward_and_grad
from helpers.runs import free_port

WORLD = 2
CASES = [("llama", "sdpa"), ("qwen2", "sdpa"), ("gemma2", "eager"), ("mistral", "flash_attention_2")]


def _run_rank(rank: int, port: int, out_dir: str) -> None:
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
    )
    distributed.init_distributed(timeout_s=120)
    hooks.install()  # a spawned process: the kernels as a run's setup installs them
    try:
        sp = sequence_parallel.initialize(WORLD)
        results = {}
        for family, attn in CASES:
            model = sharded_model(family, attn)
            for layout in LAYOUTS:
                for chunk in (0, 4):
                    out, grad = forward_and_grad(model, layout, chunk, ld_alpha=0.5, sp=sp)
                    results[family, layout, chunk] = (
                        out.chosen.detach(),
                        out.rejected.detach(),
                        out.chosen_wpo,
                        out.entropy,
                        grad,
                    )
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        distributed.release_shm_buffers()
        torch.distributed.destroy_process_group()


def sharded_model(family, attn):
    """The model as a sequence-parallel run loads it (block attention, or flash-attention emulated here)."""
    flash = attn.startswith("flash")
    if flash:
        install_emulated_flash(setattr)
    model, _ = tiny_model(family, "sdpa" if flash else attn, layout=PADDED, sequence_parallel=True)
    if flash:
        model.config._attn_implementation = attn
    return model


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Every case's results on both ranks (one spawn: the two processes start once)."""
    out = tmp_path_factory.mktemp("sp")
    mp.spawn(_run_rank, args=(free_port(), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("family, attn", CASES)
def test_two_ranks_score_and_train_like_one_process(family, attn, two_ranks):
    """Llama; Qwen2 with a sliding layer beside a full one; Gemma-2 (eager per block: soft-capped scores); Mistral
    (sliding window) through flash-attention (a plain-torch stand-in kernel). Every layout, full and chunked
    logits, LD-DPO and WPO terms: per-pair values on each rank and the sum of the two ranks' gradients equal the
    unsharded padded path's."""
    plain, _ = tiny_model(family, "sdpa" if attn.startswith("flash") else attn)
    expected, expected_grad = forward_and_grad(plain, PADDED, 0, ld_alpha=0.5)
    want = (expected.chosen, expected.rejected, expected.chosen_wpo, expected.entropy)
    for key in [k for k in two_ranks[0] if k[0] == family]:
        for rank in two_ranks:
            for got, value in zip(rank[key][:4], want):
                torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
        grad = sum(rank[key][4] for rank in two_ranks)
        torch.testing.assert_close(
            grad,
            expected_grad,
            rtol=0,
            atol=1e-5 * expected_grad.abs().max().item(),
            msg=lambda m: f"{key} gradient: {m}",
        )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_slices_of_a_group_score_every_token_once(layout):
    """Rows padded to a multiple of the group (3 here): each scored token is scored on exactly one rank, at the
    position of its predictor in that rank's slice, with the same label."""
    layout = LAYOUTS[layout]
    model, _ = tiny_model("llama", layout=layout, sequence_parallel=True)
    batch = collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, layout)
    flat = batch["input_ids"].flatten()
    width = batch["input_ids"].shape[1]
    seen = []
    for rank in range(3):
        group = sequence_parallel.SequenceParallel(group=None, size=3, rank=rank)
        inputs, scored = sequence_parallel.shard(batch, layout, model.config, torch.float32, group)
        local = inputs["input_ids"]
        assert local.shape[1] * 3 >= width and local.shape[1] * 3 - width < 3
        predictors = local.flatten()[scored["score_index"]]
        seen += list(
            zip(
                scored["score_sequence"].tolist(),
                scored["score_rank"].tolist(),
                predictors.tolist(),
                scored["score_labels"].tolist(),
            )
        )
    expected = list(
        zip(
            batch["score_sequence"].tolist(),
            batch["score_rank"].tolist(),
            flat[batch["score_index"]].tolist(),
            batch["score_labels"].tolist(),
        )
    )
    assert sorted(seen) == sorted(expected)


def test_what_cannot_run_sequence_parallel_is_named():
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "llama", **{**TINY, "hidden_size": 48, "num_attention_heads": 6, "num_key_value_heads": 3}
    )
    found = sequence_parallel.problems(4, 6, config, "sdpa", stateful=True, reads_row_index=True)
    assert any("number of ranks (6) must be a multiple" in p for p in found)
    assert any("6 attention heads must be divisible" in p for p in found)
    assert any("3 key/value heads must be divisible" in p for p in found)
    assert any("attention `sdpa` cannot run sequence-parallel" in p for p in found)
    assert any("recurrent" in p for p in found)
    assert any("index in the row" in p for p in found)  # Llama-4's attention temperature tuning
    assert sequence_parallel.problems(2, 4, AutoConfig.for_model("llama", **TINY), "ds_dpo_blocks_sdpa", False) == []
    assert sequence_parallel.problems(1, 3, config, "sdpa", stateful=True) == []
