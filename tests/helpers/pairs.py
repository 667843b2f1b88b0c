"""Preference pairs of token ids for scoring tests (uneven lengths, an empty prompt, prompts shared by several
pairs), the oracle that scores one sequence at a time, and scoring them as a run does."""

import torch

from ds_dpo.forward.layouts import LAYOUTS, SEQ2SEQ, Layout, collate_pairs
from ds_dpo.forward.logprobs import PairLogps, Scoring, concatenated_forward

VOCAB = 101


def random_pairs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [
        {"index": i, "prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)}
        for i, (p, c, r) in enumerate(lengths)
    ]


def more_responses(pair, new_response, index):
    """Two more pairs of ``pair``'s prompt, as K = 3 responses to one prompt make them: ``new_response`` against
    each of the pair's responses."""
    return [
        {**pair, "index": index, "rejected_input_ids": new_response},
        {
            **pair,
            "index": index + 1,
            "chosen_input_ids": pair["rejected_input_ids"],
            "rejected_input_ids": new_response,
        },
    ]


# uneven prompt and completion lengths; pair 4 has an empty prompt; pairs 5-8 share the prompts of pairs 0 and 4
# (apart from them in the batch), so a prefix-shared row scores each prompt once and each of the 3 responses once
_BASE = random_pairs([(5, 3, 7), (1, 6, 2), (9, 1, 1), (4, 4, 4), (0, 4, 3)])
PAIRS = _BASE + more_responses(_BASE[0], [11, 12, 13, 14, 15], 5) + more_responses(_BASE[4], [21, 22], 7)


def one_at_a_time(model, prompt, completion):
    """Reference computation: a single unpadded sequence, log_softmax + gather, summed over the completion."""
    ids = torch.tensor([prompt + completion])
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    token_logps = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return token_logps[max(len(prompt) - 1, 0) :].sum()


def score(model, rows, layout: Layout | str, chunk: int = 1024, ld_alpha=None, sp=None, **options) -> PairLogps:
    """``rows`` scored by ``model`` in ``layout`` (a ``Layout`` or its name), as a run with these settings scores a
    micro-batch; ``options``: ``concatenated_forward``'s (``with_wpo``, ``router_aux_loss``)."""
    layout = named(layout)
    return concatenated_forward(
        model, collate_pairs(rows, [1.0] * len(rows), 0, layout), Scoring(layout, chunk, ld_alpha, sp), **options
    )


def named(layout: Layout | str) -> Layout:
    return layout if isinstance(layout, Layout) else {**LAYOUTS, "seq2seq": SEQ2SEQ}[layout]


def forward_and_grad(model, layout, chunk, ld_alpha=None, sp=None):
    """``PAIRS`` scored with every statistic, and every parameter's gradient of a fixed objective of the log-probs."""
    model.zero_grad()
    out = score(model, PAIRS, layout, chunk, ld_alpha, sp, with_wpo=True)
    (out.chosen * torch.arange(1.0, len(PAIRS) + 1) - 0.7 * out.rejected).sum().backward()
    return out, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
