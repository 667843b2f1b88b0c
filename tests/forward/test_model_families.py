"""Model-family conformance: tiny random models of many causal LM families in transformers, built from their
configs, scored in every layout the family supports (padded, packed, prefix-shared; chunked and full logits) against
the model's own forward; and the startup self-check that catches a fast path that does not match."""

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

from ds_dpo.forward import attention as ds_dpo_attention
from ds_dpo.forward import layouts
from ds_dpo.forward.layouts import LAYOUTS, PACKED, PADDED, SEQ2SEQ, SHARED, collate_pairs
from ds_dpo.forward.logprobs import Scoring
from ds_dpo.forward.router_loss import router_aux_loss
from ds_dpo.forward.scoring import OutputHead, install_token_scoring, token_scoring
from ds_dpo.forward.self_check import scoring_mismatch
from ds_dpo.models.support import model_support, moe_block_classes
from helpers.models import ENCODER_DECODERS, FAMILIES, TINY, install_emulated_flash, tiny_config, tiny_model
from helpers.pairs import PAIRS, forward_and_grad, one_at_a_time, score


def layouts_taken(support):
    """The layouts a run of the family takes, each once (a stateful family takes the padded one whatever it asks)."""
    return dict.fromkeys(
        support.layout(padding_free=layout != "padded", prefix_sharing=layout == "shared")[0] for layout in LAYOUTS
    )


def close(got, expected, what):
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(
            getattr(got, side), getattr(expected, side), rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} {side}: {m}"
        )


def padded_only(family):
    """Whether a run of the family takes the padded layout whatever it asks (a stateful family)."""
    return model_support(tiny_config(family), "sdpa").layout(padding_free=True, prefix_sharing=True)[0] is PADDED


@pytest.mark.parametrize(
    ("family", "attention"),
    [
        (family, attention)
        for family in FAMILIES
        for attention in ("dense mask", "blocks", "blocks, one at a time")
        if attention == "dense mask" or not padded_only(family)
    ],
)
def test_every_layout_scores_like_the_models_own_forward(family, attention, monkeypatch):
    """With ``blocks`` the model is loaded with the attention a packed run gets (ds_dpo's block attention where the
    class supports it; the test rows are short, so their blocks run in groups), ``one at a time`` as a row of long
    blocks runs (no groups); ``dense mask`` forces the row-wide 4D mask. A family that takes the padded layout only
    has no packed rows: its block cases would score the same padded batches again."""
    if attention.endswith("one at a time"):
        monkeypatch.setattr(ds_dpo_attention, "GROUP_TOKENS", 0)
    model, support = tiny_model(family, layout=PADDED if attention == "dense mask" else SHARED)
    loaded = model.config._attn_implementation
    with torch.no_grad():
        plain = score(model, PAIRS, PADDED, 0)
        # the oracle itself: the model's own forward on one unpadded sequence at a time, with the attention its class
        # runs (sdpa or eager), not through ds_dpo's block kernel (which must run the module's own eager attention:
        # GPT-OSS's sinks)
        model.config._attn_implementation = support.attn_implementation
        expected = torch.stack(
            [one_at_a_time(model, row["prompt_input_ids"], row["chosen_input_ids"]) for row in PAIRS]
        )
        model.config._attn_implementation = loaded
        torch.testing.assert_close(plain.chosen, expected, rtol=1e-5, atol=1e-5)
        for used in layouts_taken(support):
            for chunk in (0, 4):
                close(score(model, PAIRS, used, chunk), plain, f"{family} {used} chunk {chunk}")
    assert token_scoring(model).head is not None, "every family here has a head the chunked path reproduces"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_layout_trains_like_the_plain_padded_path(family):
    """Every parameter's gradient through the fast path a run takes (the family's block attention where it has it,
    each layout it gets, chunked log-probs) equals the plain padded path's with full logits, to 1e-5 of the largest
    gradient entry."""
    model, support = tiny_model(family, layout=SHARED)
    _, expected = forward_and_grad(model, PADDED, 0)
    assert expected.abs().max() > 0
    for used in layouts_taken(support):
        _, grad = forward_and_grad(model, used, 4)
        torch.testing.assert_close(
            grad, expected, rtol=0, atol=1e-5 * expected.abs().max().item(), msg=lambda m: f"{family} {used}: {m}"
        )


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
# Qwen2 here mixes full and sliding layers (one block mask per layer type); Gemma-2 soft-caps its scores; Llama-4
# mixes chunked and full layers.
@pytest.mark.parametrize("family", ["qwen2", "gemma2", "llama4_text"])
def test_flex_attention_block_masks_score_like_the_plain_padded_path(family, uncompiled_flex):
    """``attn_implementation: flex_attention``: packed and shared rows get FlexAttention block masks (sliding windows,
    attention chunks and per-layer-type masks included) and score like the plain padded path. Forward only: torch has
    no FlexAttention backward on CPU; gradients and speed are for a GPU (not yet run on one)."""
    model, support = tiny_model(family, attn="flex_attention", layout=SHARED)
    assert model.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        plain = score(model, PAIRS, PADDED, 0)
        for layout in (PACKED, SHARED):
            batch = collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, layout)
            masks = layout.model_inputs(batch, model.config, torch.float32)["attention_mask"]
            assert all(isinstance(m, BlockMask) for m in (masks.values() if isinstance(masks, dict) else [masks]))
            for chunk in (0, 4):
                close(score(model, PAIRS, layout, chunk), plain, f"{family} flex {layout} chunk {chunk}")


def test_flex_attention_on_cpu_is_replaced_with_a_notice():
    support = model_support(AutoConfig.for_model("llama", **TINY), "flex_attention", device_type="cpu")
    assert support.attn_implementation == "sdpa" and "FlexAttention cannot train on CPU" in support.notices[0]


@pytest.fixture
def emulated_flash(monkeypatch):
    install_emulated_flash(monkeypatch.setattr)  # restored after the test


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "mistral"])
def test_flash_attention_shares_the_prefix_and_trains_like_the_plain_padded_path(family, emulated_flash):
    """``attn_implementation: flash_attention_2`` keeps prefix sharing: each pair's rejected run reads the prompt's keys
    gathered again (bottom-right causal), so log-probs and every parameter's gradient equal the plain padded path's
    (sdpa/eager, same weights). Sliding windows (Qwen2's second layer, Mistral) and soft-capped scores (Gemma-2) go
    through transformers' own flash kwargs. Run with a plain-torch stand-in for the kernel: not yet on a GPU."""
    plain_model, _ = tiny_model(family)
    model, support = tiny_model(family)  # loaded with sdpa/eager (no flash-attn here), then switched to flash
    model.config._attn_implementation = "flash_attention_2"
    assert model_support(model.config, "flash_attention_2").layout(True, True) == (SHARED, None)
    expected, expected_grad = forward_and_grad(plain_model, PADDED, 0)
    for layout in (PACKED, SHARED):
        out, grad = forward_and_grad(model, layout, 4)
        close(out, expected, f"{family} flash {layout}")
        torch.testing.assert_close(
            grad,
            expected_grad,
            rtol=0,
            atol=1e-5 * expected_grad.abs().max().item(),
            msg=lambda m: f"{family} flash {layout}: {m}",
        )
    inputs = SHARED.model_inputs(collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, SHARED), model.config, torch.float32)
    # a query run per distinct response: 5 pairs' 2, and the third response of two of their prompts
    assert "attention_mask" not in inputs and inputs["cu_seq_lens_q"].numel() == 2 * 5 + 2 + 1


def output_head(model):
    with torch.no_grad():  # the first chunked scoring call probes the head
        score(model, PAIRS[:1], PADDED, 4)
    return token_scoring(model).head


def test_logit_transforms_are_found_from_the_model():
    heads = {
        family: output_head(tiny_model(family)[0]) for family in ("granite", "cohere", "falcon_h1", "gemma2", "llama")
    }
    assert heads["granite"].scale == pytest.approx(1 / 4.0, rel=1e-6)  # Granite divides by logits_scaling
    assert heads["cohere"].scale == pytest.approx(0.5, rel=1e-6)
    assert heads["falcon_h1"].scale == pytest.approx(0.3, rel=1e-6)
    assert heads["gemma2"] == OutputHead(1.0, 0.5)
    assert heads["llama"] == OutputHead()


def test_attention_and_layout_routing_is_announced():
    gemma2 = model_support(AutoConfig.for_model("gemma2", **TINY), "sdpa")
    assert gemma2.attn_implementation == "eager" and "Gemma2ForCausalLM" in gemma2.notices[0]
    gpt_oss = model_support(tiny_config("gpt_oss"), "sdpa")  # attention sinks: no sdpa either
    assert gpt_oss.attn_implementation == "eager" and "GptOssForCausalLM" in gpt_oss.notices[0]
    falcon = model_support(AutoConfig.for_model("falcon_h1", **TINY, **FAMILIES["falcon_h1"]), "sdpa")
    layout, notice = falcon.layout(padding_free=True, prefix_sharing=True)
    assert layout is PADDED and "FalconH1ForCausalLM" in notice
    # told by the layer kinds the config declares (transformers 5.25 dropped the class flag): short convolutions too
    lfm2 = model_support(AutoConfig.for_model("lfm2", **TINY, full_attn_idxs=[1]), "sdpa")
    assert lfm2.layout(padding_free=True, prefix_sharing=False)[0] is PADDED
    layout, notice = model_support(tiny_config("qwen3_next"), "sdpa").layout(padding_free=True, prefix_sharing=True)
    assert layout is PADDED and "Qwen3NextForCausalLM" in notice  # linear attention
    # Llama-4's temperature tuning scales the queries of its NoPE layers by each token's index in the row...
    llama4 = model_support(tiny_config("llama4_text", attn_temperature_tuning=True), "sdpa")
    layout, notice = llama4.layout(padding_free=True, prefix_sharing=True)
    assert layout is PADDED and "Llama4ForCausalLM" in notice and "attn_temperature_tuning" in notice
    # ...which a packed row gets wrong for every sequence but the first once the row is past floor_scale tokens
    model, _ = tiny_model("llama4_text", layout=PACKED, attn_temperature_tuning=True, floor_scale=2, attn_scale=2.0)
    with torch.no_grad():
        packed, padded = score(model, PAIRS, PACKED).chosen, score(model, PAIRS, PADDED).chosen
    assert (packed[0] - padded[0]).abs() < 1e-5 and (packed[1:] - padded[1:]).abs().max() > 1e-3
    assert model_support(AutoConfig.for_model("llama", **TINY), "sdpa").layout(True, True) == (SHARED, None)


class AbsLogits(LlamaForCausalLM):
    """A head no scale or soft-cap describes."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits.abs()
        return out


def test_a_head_that_cannot_be_reproduced_is_scored_from_full_logits(capsys):
    torch.manual_seed(0)
    model = install_token_scoring(AbsLogits(LlamaConfig(**TINY))).eval()
    with torch.no_grad():
        plain = score(model, PAIRS, PADDED, 0)
        chunked = score(model, PAIRS, SHARED, 4)
    assert token_scoring(model).head is None and "AbsLogits" in capsys.readouterr().out
    close(chunked, plain, "full-logits fallback")


def test_self_check_catches_a_broken_head_and_a_broken_layout(monkeypatch):
    model, _ = tiny_model("llama")
    assert scoring_mismatch(model, PAIRS, 0, Scoring(SHARED, 4)) is None
    assert output_head(model) == OutputHead()
    token_scoring(model).head = OutputHead(scale=0.5)  # a head that forgot a transform
    message = scoring_mismatch(model, PAIRS, 0, Scoring(SHARED, 4))
    assert "LlamaForCausalLM" in message and "`logps_chunk_size: 0`" in message
    mistral, _ = tiny_model("mistral")
    assert scoring_mismatch(mistral, PAIRS, 0, Scoring(PACKED, 4)) is None
    monkeypatch.setattr(layouts, "sliding_window", lambda config: (None, False))  # a mask that lost the window
    message = scoring_mismatch(mistral, PAIRS, 0, Scoring(PACKED, 4))
    assert "MistralForCausalLM" in message and "packed batch layout" in message and "`padding_free: false`" in message


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "granitemoe"])
def test_router_aux_loss_is_the_models_own_in_every_layout(family):
    model, _ = tiny_model(family)
    assert moe_block_classes(model) and router_aux_loss(model) is not None
    batch = collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, PADDED)
    expected = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
    ).aux_loss  # the model's own, padding masked out
    # a packed row holds exactly the padded batch's real tokens; a shared one holds each prompt once
    for layout in (PADDED, PACKED, SHARED):
        for chunk in (0, 4):
            model.zero_grad()
            out = score(model, PAIRS, layout, chunk, router_aux_loss=True)
            if layout is SHARED:
                assert torch.isfinite(out.aux_loss) and abs(out.aux_loss - expected) < 0.1 * expected
            else:
                torch.testing.assert_close(out.aux_loss, expected, msg=f"{layout} chunk {chunk}")
            out.aux_loss.backward()  # differentiable: the routers get gradients
            assert any(
                p.grad is not None and p.grad.abs().sum() > 0
                for n, p in model.named_parameters()
                if "gate" in n or "router" in n
            )
    assert score(model, PAIRS, PADDED, 4).aux_loss is None  # only when asked for


# --- encoder-decoder models ------------------------------------------------------------------------------------------

SEQ2SEQ_PAIRS = PAIRS[:4]  # an encoder-decoder's prompt is never empty (its tokenizer closes it with EOS)


def pair_by_pair(model, pairs, weights):
    """The oracle: the model's own forward on one unpadded (prompt, completion) at a time; the weighted sum of the
    completions' log-probs, and each one."""
    logps = {}
    for side in ("chosen", "rejected"):
        logps[side] = []
        for row in pairs:
            labels = torch.tensor([row[f"{side}_input_ids"]])
            logits = model(input_ids=torch.tensor([row["prompt_input_ids"]]), labels=labels).logits
            logps[side].append(logits.float().log_softmax(-1).gather(-1, labels[..., None]).sum())
    chosen, rejected = torch.stack(logps["chosen"]), torch.stack(logps["rejected"])
    return (weights * chosen - 0.7 * rejected).sum(), chosen, rejected


@pytest.mark.parametrize("family", list(ENCODER_DECODERS))
def test_encoder_decoders_score_and_train_like_the_models_own_forward_pair_by_pair(family):
    """The seq2seq layout (prompts padded into one encoder pass, chosen and rejected as padded decoder rows reading
    their pair's encoder output), full and chunked logits: log-probs and every parameter's gradient equal the model's
    own forward on one unpadded pair at a time (1e-5); the encoder runs once per micro-batch, on one row per pair."""
    model, support = tiny_model(family)
    assert support.encoder_decoder and support.layout(True, True) == (SEQ2SEQ, None)
    assert scoring_mismatch(model, SEQ2SEQ_PAIRS, 0, Scoring(SEQ2SEQ, 4)) is None  # (probes the output head first)
    weights = torch.arange(1.0, len(SEQ2SEQ_PAIRS) + 1)
    model.zero_grad()
    objective, chosen, rejected = pair_by_pair(model, SEQ2SEQ_PAIRS, weights)
    objective.backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    encoder_rows = []
    model.get_encoder().register_forward_hook(
        lambda m, args, kwargs, out: encoder_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    for chunk in (0, 4):
        model.zero_grad()
        encoder_rows.clear()
        out = score(model, SEQ2SEQ_PAIRS, SEQ2SEQ, chunk)
        assert encoder_rows == [len(SEQ2SEQ_PAIRS)]
        torch.testing.assert_close(out.chosen, chosen.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.rejected, rejected.detach(), rtol=1e-5, atol=1e-5)
        (weights * out.chosen - 0.7 * out.rejected).sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        torch.testing.assert_close(
            grad,
            expected,
            rtol=0,
            atol=1e-5 * expected.abs().max().item(),
            msg=lambda m: f"{family} chunk {chunk}: {m}",
        )
    assert token_scoring(model).head is not None, "T5's scale, BART's plain head and T5Gemma's soft-cap all fit"


def test_every_loss_type_trains_an_encoder_decoder():
    """Every registered loss on T5's seq2seq log-probs (a reference 0.3 nats off per sequence; WPO weights where the
    loss allows them): a finite loss whose gradient reaches the encoder and the decoder."""
    from ds_dpo.losses import LOSS_TYPES, LossConfig, LossInputs, preference_loss

    model, _ = tiny_model("t5")
    for loss_type in LOSS_TYPES:
        model.zero_grad()
        out = score(model, SEQ2SEQ_PAIRS, SEQ2SEQ, 4, with_wpo=True)
        config = LossConfig(
            loss_type=loss_type,
            use_weighting=not loss_type.startswith("aot"),  # aot sorts pairs
            label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0,
        )
        loss = preference_loss(
            LossInputs(
                out.chosen,
                out.rejected,
                out.chosen.detach() - 0.3,
                out.rejected.detach() + 0.3,
                out.chosen_tokens,
                out.rejected_tokens,
                out.chosen_wpo,
                out.rejected_wpo,
            ),
            config,
        ).losses.mean()
        loss.backward()
        assert torch.isfinite(loss), loss_type
        for stack in (model.get_encoder(), model.get_decoder()):
            grads = [p.grad for p in stack.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads) and max(g.abs().max() for g in grads) > 0, (
                loss_type,
                type(stack).__name__,
            )
