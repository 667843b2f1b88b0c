"""The startup self-check: the run's fast path (layout, chunked log-probs, attention kernel) against the model's own
forward on the first micro-batch, before any step is taken."""

from __future__ import annotations

from dataclasses import replace

import torch

from ds_dpo.forward.layouts import collate_pairs
from ds_dpo.forward.logprobs import PairLogps, Scoring, concatenated_forward
from ds_dpo.forward.scoring import unwrap_peft


def _relative_error(got: PairLogps, expected: PairLogps) -> tuple[float, str, int]:
    """Largest |got - expected| / max(|expected|, 1) over the pairs' chosen and rejected log-probs, where."""
    worst = (0.0, "chosen", 0)
    for side in ("chosen", "rejected"):
        a, b = getattr(got, side).double(), getattr(expected, side).double()
        error = (a - b).abs() / b.abs().clamp(min=1.0)
        i = int(error.argmax())
        worst = max(worst, (float(error[i]), side, i))
    return worst


@torch.no_grad()
def scoring_mismatch(model, rows: list[dict], pad_token_id: int, scoring: Scoring, vision=None) -> str | None:
    """The startup self-check: score ``rows`` (a real micro-batch) with the run's fast path (``scoring``: its layout,
    chunked log-probs) and with the model's own forward on a padded batch; a description of the difference when they
    disagree beyond rounding, else None.

    Three forwards under ``no_grad`` in eval mode, the same on every rank: the fast path and a padded batch with the
    run's chunked log-probs, over every pair (is the layout exact?), and the model's own forward, full-vocabulary
    logits, over the last pair only (is the chunked output head exact?). Full logits of a whole micro-batch would make
    the self-check the run's memory peak (8 pairs of 256 tokens with a 262k vocabulary: 4 GiB of logits and as much
    again for their log-softmax); one pair costs what the training step's own chunks cost. The last pair is the one
    packed after the others, where a leak between packed sequences would show. An encoder-decoder's only layout is its
    plain one: two forwards."""
    causal_lm = unwrap_peft(getattr(model, "module", model))
    was_training = causal_lm.training
    layout = scoring.layout
    plain_layout = layout.plain
    plain_scoring = replace(scoring, layout=plain_layout)
    model.eval()
    try:
        batch = lambda layout, rows: collate_pairs(rows, [1.0] * len(rows), pad_token_id, layout, vision)  # noqa: E731
        own = concatenated_forward(model, batch(plain_layout, rows[-1:]), replace(plain_scoring, logps_chunk_size=0))
        head = concatenated_forward(model, batch(plain_layout, rows), plain_scoring)
        fast = head if layout is plain_layout else concatenated_forward(model, batch(layout, rows), scoring)
    finally:
        model.train(was_training)
    # float32 agrees to ~1e-6; bf16 kernels on different layouts round differently by up to ~1e-2
    tolerance = 1e-4 if causal_lm.dtype == torch.float32 else 5e-2
    last = len(rows) - 1
    error, side, _ = _relative_error(head.select(torch.tensor([last])), own)
    if error > tolerance:
        pair, got, expected = last, getattr(head, side)[last], getattr(own, side)[0]
        culprit, avoid, reference = "its chunked output head", "`logps_chunk_size: 0`", "the model's own forward"
    else:
        error, side, pair = _relative_error(fast, head)
        if error <= tolerance:
            return None
        got, expected = getattr(fast, side)[pair], getattr(head, side)[pair]
        culprit, avoid, reference = f"the {layout} batch layout", "`padding_free: false`", "a padded forward"
    return (
        f"scoring self-check failed for {type(causal_lm).__name__}: the {side} log-prob of pair {pair} of the "
        f"first micro-batch is {float(got):.6g} from the fast path but {float(expected):.6g} from {reference} "
        f"(relative difference {error:.2g}, tolerance {tolerance:g}); the difference comes from {culprit}. Set {avoid} "
        "to score this model another way (or `scoring_self_check: false` to train anyway)"
    )
