"""Collation: B tokenized pairs become one micro-batch in one of three layouts (``ds_dpo.packing.LAYOUTS``).

``padded`` (N = 2B rows, chosen first, T = longest prompt + completion):

    input_ids       [N, T] long   prompt + completion, right-padded with ``pad_token_id``
    attention_mask  [N, T] long   1 on real tokens

``packed`` / ``shared`` (one row of S tokens, no padding; see ``ds_dpo.packing``):

    input_ids, position_ids, segment, branch   [1, S]

Every layout also carries the scored tokens (M of them; see ``ds_dpo.logprobs``) and the pairs' bookkeeping:

    score_index, score_labels, score_sequence, score_rank   [M] long
    index        [B] long   row index in the dataset (keys precomputed reference log-probs)
    weight       [B] float  1 for a real pair, 0 for a filler that only keeps ranks in step
    pair_tokens  [B] long   prompt + chosen + prompt + rejected tokens (the pair's real tokens, in any layout)
    ref_chosen_logps, ref_rejected_logps  [B] float, only when the dataset carries precomputed reference log-probs
"""

from __future__ import annotations

from typing import Any

import torch

from ds_dpo.packing import LAYOUTS, ScoredTokens, pack_pairs


def pad_pairs(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The ``padded`` layout."""
    b = len(rows)
    sequences = [(row["prompt_input_ids"], row[f"{side}_input_ids"]) for side in ("chosen", "rejected") for row in rows]
    t = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((2 * b, t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((2 * b, t), dtype=torch.long)
    scores = ScoredTokens()
    for i, (prompt, completion) in enumerate(sequences):
        p, n = len(prompt), len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        attention_mask[i, :n] = 1
        scores.add(i, completion, i * t + p - 1 if p else None, i * t + p)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **scores.tensors()}


def collate_pairs(rows: list[dict[str, Any]], weights: list[float], pad_token_id: int,
                  layout: str = "padded") -> dict[str, torch.Tensor]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown batch layout {layout!r}; one of {LAYOUTS}")
    batch = pad_pairs(rows, pad_token_id) if layout == "padded" else pack_pairs(rows, share_prompt=layout == "shared")
    batch["index"] = torch.tensor([row["index"] for row in rows], dtype=torch.long)
    batch["weight"] = torch.tensor(weights, dtype=torch.float32)
    batch["pair_tokens"] = torch.tensor([2 * len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) +
                                         len(row["rejected_input_ids"]) for row in rows], dtype=torch.long)
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        if column in rows[0]:
            batch[column] = torch.tensor([row[column] for row in rows], dtype=torch.float32)
    return batch
