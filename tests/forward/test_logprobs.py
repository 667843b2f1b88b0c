"""Scoring (``ds_dpo.forward.scoring``, ``ds_dpo.forward.logprobs``): every layout and chunk size against the plain padded
path and against one sequence at a time, TRL's entropy and token accuracy, and the chunked head's memory bound."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ds_dpo.data import builtin
from ds_dpo.data.pipeline import load_tokenized
from ds_dpo.forward import attention, scoring
from ds_dpo.forward.layouts import LAYOUTS, PADDED, SHARED, collate_pairs
from ds_dpo.forward.logprobs import Scoring, concatenated_forward
from ds_dpo.forward.scoring import install_token_scoring, token_scoring, token_stats
from helpers.models import tiny_model
from helpers.pairs import PAIRS, forward_and_grad, one_at_a_time, random_pairs, score

ARCHITECTURES = {"llama": {}, "qwen2-tied": dict(tie_word_embeddings=True, use_sliding_window=False), "gpt2": {}}
"""Families (and config overrides) of the tiny models here: a tied output layer, GPT-2's own attention."""


def model_of(arch: str, attn: str = "sdpa"):
    family = arch.split("-")[0]
    return tiny_model(family, attn, **ARCHITECTURES[arch])[0]


@pytest.mark.parametrize(
    "arch, attn, group_tokens",
    [
        (arch, attn, group)
        for arch in ARCHITECTURES
        for attn in ("sdpa", "eager", "ds_dpo_blocks_sdpa")
        for group in ((attention.GROUP_TOKENS, 0) if attn.startswith("ds_dpo_blocks") else (attention.GROUP_TOKENS,))
    ]
    + [("llama", "ds_dpo_blocks_eager", attention.GROUP_TOKENS), ("llama", "ds_dpo_blocks_eager", 0)],
)
def test_every_layout_and_chunking_equals_the_plain_padded_path(arch, attn, group_tokens, monkeypatch):
    """Log-probs and every parameter's gradient; packed rows through the dense mask (sdpa, eager) and through the
    per-block kernels, their short blocks in groups or (``group_tokens`` 0) one at a time, as long blocks run."""
    monkeypatch.setattr(attention, "GROUP_TOKENS", group_tokens)
    model = model_of(arch, attn)  # in eval mode: dropout off (GPT-2 has some); gradients still flow
    for ld_alpha in (None, 0.5):
        expected, expected_grad = forward_and_grad(model, PADDED, 0, ld_alpha)
        for layout in LAYOUTS:
            for chunk in (0, 3, 1024):
                out, grad = forward_and_grad(model, layout, chunk, ld_alpha)
                for field in (
                    "chosen",
                    "rejected",
                    "chosen_logits",
                    "rejected_logits",
                    "chosen_wpo",
                    "rejected_wpo",
                    "chosen_tokens",
                    "rejected_tokens",
                    "entropy",
                    "chosen_top1",
                ):
                    torch.testing.assert_close(
                        getattr(out, field),
                        getattr(expected, field),
                        rtol=1e-6,
                        atol=1e-6,
                        msg=f"{layout} chunk {chunk} {field}",
                    )
                torch.testing.assert_close(
                    grad,
                    expected_grad,
                    atol=1e-6 * expected_grad.abs().max().item(),
                    rtol=0,
                    msg=f"{layout} chunk {chunk}",
                )
    # the empty prompt's first completion token has no predicting position and is not scored, as in padded batches
    assert expected.chosen_tokens.tolist() == [3, 6, 1, 4, 3, 3, 7, 3, 2]
    assert expected.rejected_tokens.tolist() == [7, 2, 1, 4, 2, 5, 5, 1, 1]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_log_probs_equal_one_sequence_at_a_time(layout):
    model = model_of("llama")
    with torch.no_grad():
        out = score(model, PAIRS, layout)
        for i, row in enumerate(PAIRS):
            for side, got in (("chosen", out.chosen[i]), ("rejected", out.rejected[i])):
                expected = one_at_a_time(model, row["prompt_input_ids"], row[f"{side}_input_ids"])
                torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_entropy_and_token_accuracy_are_trls(layout):
    """TRL 1.16's ``entropy`` (each completion token's predictive entropy, chosen and rejected) and
    ``mean_token_accuracy`` (chosen tokens that are the argmax), per pair, from one unpadded sequence at a time."""
    model = model_of("llama")
    with torch.no_grad():
        out = score(model, PAIRS, layout, 4)
        for i, row in enumerate(PAIRS):
            entropy, top1 = 0.0, None
            for side in ("chosen", "rejected"):
                prompt, completion = row["prompt_input_ids"], row[f"{side}_input_ids"]
                ids = torch.tensor([prompt + completion])
                logits = model(input_ids=ids).logits[0, :-1][max(len(prompt) - 1, 0) :]
                entropy += torch.distributions.Categorical(logits=logits).entropy().sum()
                if side == "chosen":
                    top1 = (logits.argmax(-1) == ids[0, 1:][max(len(prompt) - 1, 0) :]).sum().float()
            torch.testing.assert_close(out.entropy[i], entropy, rtol=1e-5, atol=1e-5)
            assert out.chosen_top1[i] == top1
    logits, labels = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.5, 0.0]]), torch.tensor([0, 2, 1])
    stats = token_stats(logits, labels)  # a random model is rarely right: the argmax test needs hits
    assert stats.top1.tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(stats.entropy, torch.distributions.Categorical(logits=logits).entropy())


def test_chunking_bounds_the_logits_and_keeps_the_plain_forward(builtin_files, monkeypatch):
    model = install_token_scoring(AutoModelForCausalLM.from_pretrained(builtin_files["model_name_or_path"]))
    tok = builtin.build_tokenizer()
    rows = [load_tokenized(builtin_files["eval_dataset"], tok, max_length=None)[i] for i in range(8)]
    batch = collate_pairs(rows, [1.0] * 8, tok.pad_token_id, SHARED)
    logits_shapes = []

    def recording(logits, *args):
        logits_shapes.append(tuple(logits.shape))
        return token_stats(logits, *args)

    monkeypatch.setattr(scoring, "token_stats", recording)
    out = concatenated_forward(model, batch, Scoring(SHARED, 16))
    (out.chosen.sum() - out.rejected.sum()).backward()  # recomputes each chunk
    scored = len(batch["score_index"])
    assert scored == int(out.chosen_tokens.sum() + out.rejected_tokens.sum()) > 16
    # logits exist only chunk by chunk, once in forward and once more in backward
    assert max(n for n, _ in logits_shapes) == 16 and sum(n for n, _ in logits_shapes) == 2 * scored
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    # without scoring arguments the model is an ordinary causal LM
    ids = batch["input_ids"][:, :20]
    plain = model(input_ids=ids).logits
    assert plain.shape == (1, 20, model.config.vocab_size)
    torch.testing.assert_close(plain, token_scoring(model).plain_forward(input_ids=ids).logits)
    assert (
        model.state_dict().keys()
        == AutoModelForCausalLM.from_pretrained(builtin_files["model_name_or_path"]).state_dict().keys()
    )  # checkpoints keep the model's own keys


@pytest.mark.parametrize("group_tokens", [0, 64, 512])
@pytest.mark.parametrize("num_pairs", [1, 32])
def test_block_attention_with_one_pair_and_with_many(num_pairs, group_tokens, monkeypatch):
    """Blocks alone (``GROUP_TOKENS`` 0), in groups of a few, and all in one group."""
    monkeypatch.setattr(attention, "GROUP_TOKENS", group_tokens)
    model = model_of("llama", "ds_dpo_blocks_sdpa")
    g = torch.Generator().manual_seed(1)
    lengths = [tuple(torch.randint(0, 12, (3,), generator=g).add(1).tolist()) for _ in range(num_pairs)]
    pairs = random_pairs(lengths, seed=num_pairs)
    with torch.no_grad():
        plain = score(model, pairs, PADDED, 0)
        for layout in ("packed", "shared"):
            got = score(model, pairs, layout)
            torch.testing.assert_close(got.chosen, plain.chosen, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.rejected, plain.rejected, rtol=1e-5, atol=1e-5)
