"""Padded collation: B tokenized pairs become one right-padded batch of 2B sequences, chosen first, then rejected.

Batch layout (all tensors on CPU; N = 2B, T = longest prompt + completion in the batch):

    input_ids       [N, T] long   prompt + completion, padded with ``pad_token_id``
    attention_mask  [N, T] long   1 on real tokens
    completion_mask [N, T] bool   True on completion tokens (the ones whose log-probs are scored)
    index           [B]    long   row index in the dataset (keys precomputed reference log-probs)
    weight          [B]    float  1 for a real pair, 0 for a filler that only keeps ranks in step
    ref_chosen_logps, ref_rejected_logps  [B] float, only when the dataset carries precomputed reference log-probs
"""

from __future__ import annotations

from typing import Any

import torch


def collate_pairs(rows: list[dict[str, Any]], weights: list[float], pad_token_id: int) -> dict[str, torch.Tensor]:
    sequences, prompt_lengths = [], []
    for side in ("chosen", "rejected"):
        for row in rows:
            sequences.append(row["prompt_input_ids"] + row[f"{side}_input_ids"])
            prompt_lengths.append(len(row["prompt_input_ids"]))
    n, t = len(sequences), max(map(len, sequences))
    input_ids = torch.full((n, t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, t), dtype=torch.long)
    completion_mask = torch.zeros((n, t), dtype=torch.bool)
    for i, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        completion_mask[i, p : len(seq)] = True
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "index": torch.tensor([row["index"] for row in rows], dtype=torch.long),
        "weight": torch.tensor(weights, dtype=torch.float32),
    }
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        if column in rows[0]:
            batch[column] = torch.tensor([row[column] for row in rows], dtype=torch.float32)
    return batch
