import torch
from transformers import Gemma3TextConfig, MistralConfig

from ds_dpo.forward import attention
from ds_dpo.forward.layouts import PACKED, PADDED, SHARED, collate_pairs, layout_for, packed_attention_mask

ROWS = [
    {"index": 7, "prompt_input_ids": [1, 2, 3], "chosen_input_ids": [4, 5], "rejected_input_ids": [6, 7, 8]},
    {"index": 9, "prompt_input_ids": [], "chosen_input_ids": [10, 11], "rejected_input_ids": [12]},
]


def test_packed_row_restarts_positions_per_sequence_and_scores_every_completion_token():
    batch = collate_pairs(ROWS, [1.0, 0.0], pad_token_id=0, layout=PACKED)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 6, 7, 8, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 0]]
    assert batch["segment"].tolist() == [[0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 1, 1, 3]]
    # each scored token is the one after its predicting position; the empty prompt's first tokens are unscored
    assert batch["score_labels"].tolist() == [4, 5, 6, 7, 8, 11]
    assert (batch["input_ids"][0, batch["score_index"] + 1] == batch["score_labels"]).all()
    assert batch["score_sequence"].tolist() == [0, 0, 2, 2, 2, 1]
    assert batch["score_rank"].tolist() == [1, 2, 1, 2, 3, 1]
    assert batch["index"].tolist() == [7, 9] and batch["weight"].tolist() == [1.0, 0.0]
    assert batch["pair_tokens"].tolist() == [11, 3]


def test_shared_prefix_layout_continues_rejected_positions_from_the_prompt():
    batch = collate_pairs(ROWS, [1.0, 1.0], pad_token_id=0, layout=SHARED)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 0]]
    assert batch["branch"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 1, 1, 2]]  # prompt, then response 1, 2
    # the last prompt token (position 2) predicts both the first chosen and the first rejected token
    assert batch["score_index"].tolist() == [2, 3, 2, 5, 6, 8]
    assert batch["score_labels"].tolist() == [4, 5, 6, 7, 8, 11]
    assert batch["score_sequence"].tolist() == [0, 0, 1, 1, 1, 2]  # sequences in row order
    assert batch["chosen_sequence"].tolist() == [0, 2] and batch["rejected_sequence"].tolist() == [1, 3]
    assert batch["sequence_tokens"].tolist() == [2, 3, 1, 0]  # the empty prompt's first tokens are not scored


def test_pairs_of_one_prompt_share_its_pass_and_each_response_is_scored_once():
    """K = 3 responses a > b > c of prompt P as all three pairs, apart in the micro-batch around a pair of prompt
    Q: one block per prompt, each response once, every response's positions continuing from its prompt."""
    p, q, a, b, c = [1, 2], [3], [4, 5], [6], [7, 8, 9]
    rows = [
        {"index": 0, "prompt_input_ids": p, "chosen_input_ids": a, "rejected_input_ids": b},
        {"index": 1, "prompt_input_ids": q, "chosen_input_ids": [10], "rejected_input_ids": [11]},
        {"index": 2, "prompt_input_ids": p, "chosen_input_ids": a, "rejected_input_ids": c},
        {"index": 3, "prompt_input_ids": p, "chosen_input_ids": b, "rejected_input_ids": c},
    ]
    batch = collate_pairs(rows, [1.0] * 4, pad_token_id=0, layout=SHARED)
    assert batch["input_ids"].tolist() == [p + a + b + c + q + [10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 2, 3, 4, 0, 1, 1]]
    assert batch["segment"].tolist() == [[0] * 8 + [1] * 3]
    assert batch["branch"].tolist() == [[0, 0, 1, 1, 2, 3, 3, 3, 0, 1, 2]]
    # sequences: a, b, c of P, then Q's two; pair i compares these
    assert batch["chosen_sequence"].tolist() == [0, 3, 0, 1] and batch["rejected_sequence"].tolist() == [1, 4, 2, 2]
    assert batch["sequence_tokens"].tolist() == [2, 1, 3, 1, 1]
    assert batch["pair_tokens"].tolist() == [7, 4, 9, 8]  # the pair's own tokens, whatever the sharing
    allowed = packed_attention_mask(batch["segment"], batch["branch"], "sdpa", torch.float32)[0, 0]
    visible = {t: allowed[t].nonzero().flatten().tolist() for t in range(11)}
    assert visible[4] == [0, 1, 4] and visible[7] == [0, 1, 5, 6, 7] and visible[10] == [8, 10]


def test_mask_is_causal_per_sequence_and_hides_chosen_from_rejected():
    batch = collate_pairs(ROWS, [1.0, 1.0], pad_token_id=0, layout=SHARED)
    allowed = packed_attention_mask(batch["segment"], batch["branch"], "sdpa", torch.float32)[0, 0]
    assert allowed.dtype == torch.bool and allowed.shape == (11, 11)
    visible = {t: allowed[t].nonzero().flatten().tolist() for t in range(11)}
    assert visible[4] == [0, 1, 2, 3, 4]  # chosen: prompt + itself
    assert visible[6] == [0, 1, 2, 5, 6]  # rejected: prompt + earlier rejected, never chosen
    assert visible[8] == [8] and visible[10] == [10]  # the second pair sees nothing of the first; empty prompt
    additive = packed_attention_mask(batch["segment"], batch["branch"], "eager", torch.bfloat16)[0, 0]
    assert additive.dtype == torch.bfloat16
    assert ((additive == 0) == allowed).all() and (additive[~allowed] == torch.finfo(torch.bfloat16).min).all()


def test_layout_choice_and_kernel_inputs():
    assert layout_for(True, True) is SHARED and layout_for(True, False) is PACKED
    assert layout_for(False, True) is PADDED and layout_for(False, False) is PADDED
    assert (PADDED.forward_tokens(3, 2, 1), PACKED.forward_tokens(3, 2, 1), SHARED.forward_tokens(3, 2, 1)) == (9, 9, 6)
    packed = collate_pairs(ROWS, [1.0, 1.0], 0, PACKED)
    assert set(PACKED.model_inputs(packed, config("flash_attention_2"), torch.bfloat16)) == {
        "input_ids",
        "position_ids",
    }
    # shared on flash-attention: per pair the query runs prompt + chosen and rejected, whose keys are prompt + chosen
    # and prompt + rejected (ROWS: prompt, chosen, rejected of 3, 2, 3 and 0, 2, 1 tokens)
    flash = SHARED.model_inputs(collate_pairs(ROWS, [1.0, 1.0], 0, SHARED), config("flash_attention_2"), torch.bfloat16)
    assert flash["cu_seq_lens_q"].tolist() == [0, 5, 8, 10, 11]
    assert flash["cu_seq_lens_k"].tolist() == [0, 5, 11, 13, 14]
    assert flash["ds_dpo_kv_index"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 9, 10]
    assert (flash["max_length_q"], flash["max_length_k"]) == (5, 6)
    assert PACKED.model_inputs(packed, config("sdpa"), torch.float32)["attention_mask"].shape == (1, 1, 14, 14)
    padded = collate_pairs(ROWS, [1.0, 1.0], 0, PADDED)
    assert padded["input_ids"].shape == (4, 6) and set(PADDED.model_inputs(padded, config("sdpa"), torch.float32)) == {
        "input_ids",
        "attention_mask",
    }
    assert (padded["input_ids"].flatten()[padded["score_index"] + 1] == padded["score_labels"]).all()


def config(attn, **kwargs):
    c = Gemma3TextConfig(**kwargs) if "sliding_window_pattern" in kwargs else MistralConfig(**kwargs)
    c._attn_implementation = attn
    return c


def test_sliding_window_masks_follow_positions_and_layer_types():
    shared = collate_pairs(ROWS, [1.0, 1.0], 0, SHARED)
    full = SHARED.model_inputs(shared, config("sdpa", sliding_window=None), torch.float32)["attention_mask"][0, 0]
    window = SHARED.model_inputs(shared, config("sdpa", sliding_window=2), torch.float32)["attention_mask"][0, 0]
    pos = shared["position_ids"][0]
    near = (pos.unsqueeze(1) - pos.unsqueeze(0)) < 2
    assert (window == (full & near)).all() and window.sum() < full.sum()
    per_type = SHARED.model_inputs(shared, config("sdpa", sliding_window=2, sliding_window_pattern=2), torch.float32)
    assert (per_type["attention_mask"]["full_attention"][0, 0] == full).all()
    assert (per_type["attention_mask"]["sliding_attention"][0, 0] == window).all()


def test_block_attention_inputs_hold_no_row_wide_mask(monkeypatch):
    shared = collate_pairs(ROWS, [1.0, 1.0], 0, SHARED)
    inputs = SHARED.model_inputs(shared, config("ds_dpo_blocks_sdpa"), torch.float32)
    stand_in, blocks = inputs["attention_mask"], inputs["ds_dpo_blocks"]
    assert stand_in.shape == (1, 1, 11, 11) and stand_in.untyped_storage().nbytes() == 1  # stride 0: one element
    full = packed_attention_mask(shared["segment"], shared["branch"], "sdpa", torch.float32)[0, 0]
    assert blocks.bounds == [(0, 11)] and blocks.causal_runs() == [None]  # short blocks: one group, its mask
    assert (blocks.mask(0, None)[0, 0] == full).all()
    monkeypatch.setattr(attention, "GROUP_TOKENS", 0)
    blocks = SHARED.model_inputs(shared, config("ds_dpo_blocks_sdpa"), torch.float32)["ds_dpo_blocks"]
    assert blocks.bounds == [(0, 8), (8, 11)]  # one block per pair: prompt | chosen | rejected
    assert blocks.causal_runs() == [(3, [5, 3]), (0, [2, 1])]  # prompt + chosen, then rejected over the prompt
    for i, (s, e) in enumerate(blocks.bounds):
        assert (blocks.mask(i, None)[0, 0] == full[s:e, s:e]).all() and not full[s:e, e:].any()


def test_mrope_positions_are_each_sequences_own_in_packed_and_shared_rows():
    """Qwen2-VL's 3D positions (M-RoPE) of packed and prefix-shared rows equal the model's own ``get_rope_index`` on
    each sequence alone: pairs with 2, 0 and 1 images of grids whose largest side (in merged patches) is less than
    their token count, so the text after each image moves back; the shared row's rejected response continues from its
    prompt's positions as in the forward of prompt + rejected."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    from ds_dpo.forward.layouts import mrope_positions

    start, image, end = 50, 51, 52
    grids = [(1, 10, 12), (1, 14, 6), (1, 4, 4)]  # 30, 21 and 4 tokens; sides 6, 7 and 2

    def picture(grid):
        t, h, w = grid
        return [start] + [image] * (t * h * w // 4) + [end]

    rows = [
        {"prompt_input_ids": [1, *picture(grids[0]), 2, *picture(grids[1]), 3], "images": [0, 1]},
        {"prompt_input_ids": [4, 5], "images": []},
        {"prompt_input_ids": [*picture(grids[2]), 6], "images": [2]},
    ]
    rows = [
        {**row, "index": i, "chosen_input_ids": [7, 8, 9][: i + 1], "rejected_input_ids": [10, 11]}
        for i, row in enumerate(rows)
    ]
    config = Qwen2VLConfig(
        text_config={"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64},
        vision_config={"depth": 1, "embed_dim": 8, "hidden_size": 16, "num_heads": 2},
        image_token_id=image,
    )
    model = Qwen2VLModel(config)

    def own(row, side):
        ids = torch.tensor([row["prompt_input_ids"] + row[f"{side}_input_ids"]])
        thw = torch.tensor([grids[i] for i in row["images"]]) if row["images"] else None
        return model.get_rope_index(ids, (ids == image).int(), thw)[0][:, 0]

    packed = [own(row, side) for row in rows for side in ("chosen", "rejected")]
    shared = [
        torch.cat([own(row, "chosen"), own(row, "rejected")[:, len(row["prompt_input_ids"]) :]], 1) for row in rows
    ]
    for layout, expected in ((PACKED, packed), (SHARED, shared)):
        batch = collate_pairs(rows, [1.0] * 3, pad_token_id=0, layout=layout)
        per_sequence = 1 if layout is SHARED else 2
        order = [g for row in rows for _ in range(per_sequence) for g in row["images"]]  # images in token order
        batch["image_grid_thw"] = torch.tensor([grids[g] for g in order])
        got = mrope_positions(batch, image, merge_size=2)
        assert got.shape == (3, 1, batch["input_ids"].shape[1])
        assert torch.equal(got[:, 0], torch.cat(expected, 1)), layout
