"""Model-family conformance: tiny random models of many causal LM families in transformers, built from their
configs, scored in every layout the family supports (padded, packed, prefix-shared; chunked and full logits) against
the model's own forward; and the startup self-check that catches a fast path that does not match."""

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, LlamaForCausalLM

from ds_dpo import attention as ds_dpo_attention, layouts
from ds_dpo.layouts import LAYOUTS, collate_pairs
from ds_dpo.logprobs import (OutputHead, concatenated_forward, enable_token_scoring, router_aux_loss,
                             scoring_mismatch)
from ds_dpo.model_support import model_support, moe_block_classes

from test_logprobs import PAIRS, VOCAB, forward_and_grad, one_at_a_time

TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2, output_router_logits=False)
# Sliding windows of 3 tokens are shorter than most test sequences (up to 16 tokens), so a layout that loses the
# window is caught; logit transforms use values far from 1.
FAMILIES = {
    "llama": {},
    "mistral": dict(sliding_window=3),
    "qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),  # layer 2 slides
    "qwen3": {},
    "gemma": {},
    "gemma2": dict(final_logit_softcapping=0.5, sliding_window=3),  # no sdpa: routed to eager
    "gemma3_text": dict(final_logit_softcapping=0.5, sliding_window=3, sliding_window_pattern=2),
    "phi3": dict(sliding_window=3),
    "phi": {},
    "olmo2": {},
    "gpt_neox": {},
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4),
    "cohere": dict(logit_scale=0.5),
    "cohere2": dict(logit_scale=0.5, sliding_window=3, sliding_window_pattern=2),
    "granite": dict(logits_scaling=4.0),
    "stablelm": {},
    "starcoder2": dict(sliding_window=3),
    "falcon_h1": dict(lm_head_multiplier=0.3, mamba_d_ssm=16, mamba_n_heads=4, mamba_d_head=4, mamba_d_state=4,
                      mamba_n_groups=1, mamba_chunk_size=4),  # hybrid attention + Mamba-2: padded only
    "mixtral": dict(num_local_experts=4, sliding_window=3, **MOE),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16, **MOE),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=16, **MOE),
    "granitemoe": dict(num_local_experts=4, logits_scaling=4.0, **MOE),
}


def tiny_model(family: str, attn: str = "sdpa", layout: str = "padded", sequence_parallel: bool = False,
               **overrides):
    """The family's tiny model (same weights whatever the attention) loaded as a run with ``layout`` would load it;
    ``overrides``: config values."""
    config = AutoConfig.for_model(family, **{**TINY, **FAMILIES[family], **overrides})
    support = model_support(config, attn)
    torch.manual_seed(0)
    attn_implementation = support.attention_for(layout, sequence_parallel)[0]
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return enable_token_scoring(model).eval(), support


def close(got, expected, what):
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(getattr(got, side), getattr(expected, side), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{what} {side}: {m}")


@pytest.mark.parametrize("attention", ["dense mask", "blocks", "blocks, one at a time"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_layout_scores_like_the_models_own_forward(family, attention, monkeypatch):
    """With ``blocks`` the model is loaded with the attention a packed run gets (ds_dpo's block attention where the
    class supports it; the test rows are short, so their blocks run in groups), ``one at a time`` as a row of long
    blocks runs (no groups); ``dense mask`` forces the row-wide 4D mask."""
    if attention.endswith("one at a time"):
        monkeypatch.setattr(ds_dpo_attention, "GROUP_TOKENS", 0)
    model, support = tiny_model(family, layout="padded" if attention == "dense mask" else "shared")
    with torch.no_grad():
        plain = concatenated_forward(model, collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, "padded"), logps_chunk_size=0)
        # the oracle itself: the model's own forward on one unpadded sequence at a time
        expected = torch.stack([one_at_a_time(model, row["prompt_input_ids"], row["chosen_input_ids"])
                                for row in PAIRS])
        torch.testing.assert_close(plain.chosen, expected, rtol=1e-5, atol=1e-5)
        for layout in LAYOUTS:
            used, _ = support.layout(padding_free=layout != "padded", prefix_sharing=layout == "shared")
            for chunk in (0, 4):
                got = concatenated_forward(model, collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, used),
                                           logps_chunk_size=chunk)
                close(got, plain, f"{family} {used} chunk {chunk}")
    assert model._ds_dpo_output_head is not None, "every family here has a head the chunked path reproduces"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_layout_trains_like_the_plain_padded_path(family):
    """Every parameter's gradient through the fast path a run takes (the family's block attention where it has it,
    each layout it gets, chunked log-probs) equals the plain padded path's with full logits, to 1e-5 of the largest
    gradient entry."""
    model, support = tiny_model(family, layout="shared")
    _, expected = forward_and_grad(model, "padded", 0)
    assert expected.abs().max() > 0
    for layout in LAYOUTS:
        used, _ = support.layout(padding_free=layout != "padded", prefix_sharing=layout == "shared")
        _, grad = forward_and_grad(model, used, 4)
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5 * expected.abs().max().item(),
                                   msg=lambda m: f"{family} {used}: {m}")


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """transformers compiles FlexAttention, which inductor cannot do on this CPU (torch 2.13: a C++ compile error);
    torch's plain kernel computes the same attention from the same block mask. The padded path's block masks are
    built uncompiled too (the same mask; compiling it costs ~20 s here)."""
    from transformers import masking_utils
    from transformers.integrations import flex_attention as hf_flex

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention",
                        lambda query, key, value, training=False, **kwargs: flex_attention(query, key, value, **kwargs))
    monkeypatch.setattr(masking_utils, "create_block_mask",
                        lambda *args, _compile=False, **kwargs: create_block_mask(*args, **kwargs))


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
# Qwen2 here mixes full and sliding layers (one block mask per layer type); Gemma-2 soft-caps its scores.
@pytest.mark.parametrize("family", ["qwen2", "gemma2"])
def test_flex_attention_block_masks_score_like_the_plain_padded_path(family, uncompiled_flex):
    """``attn_implementation: flex_attention``: packed and shared rows get FlexAttention block masks (sliding windows
    and per-layer-type masks included) and score like the plain padded path. Forward only: torch has no FlexAttention
    backward on CPU; gradients and speed are for a GPU (not yet run on one)."""
    model, support = tiny_model(family, attn="flex_attention", layout="shared")
    assert model.config._attn_implementation == "flex_attention"
    with torch.no_grad():
        plain = concatenated_forward(model, collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, "padded"), logps_chunk_size=0)
        for layout in ("packed", "shared"):
            batch = collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, layout)
            masks = layouts.model_inputs(batch, model.config, torch.float32)["attention_mask"]
            assert all(isinstance(m, BlockMask) for m in (masks.values() if isinstance(masks, dict) else [masks]))
            for chunk in (0, 4):
                close(concatenated_forward(model, batch, logps_chunk_size=chunk), plain,
                      f"{family} flex {layout} chunk {chunk}")


def test_flex_attention_on_cpu_is_replaced_with_a_notice():
    support = model_support(AutoConfig.for_model("llama", **TINY), "flex_attention", device_type="cpu")
    assert support.attn_implementation == "sdpa" and "FlexAttention cannot train on CPU" in support.notices[0]


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                     deterministic=False, return_attn_probs=False):
    """flash-attn 2's ``flash_attn_varlen_func`` as documented, in plain torch: run i's queries attend to run i's keys;
    causal is aligned to the bottom right (query j sees keys up to j + len_k - len_q) and ``window_size[0]`` keys
    back from there; grouped KV heads are shared by consecutive query heads."""
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qi = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)
        ki, vi = (x[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // x.shape[1], 0)
                  for x in (k, v))
        scores = qi @ ki.transpose(1, 2) * (softmax_scale or qi.shape[-1] ** -0.5)
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        query_at = torch.arange(qi.shape[1])[:, None] + ki.shape[1] - qi.shape[1]
        key_at = torch.arange(ki.shape[1])[None]
        allowed = key_at <= query_at if causal else torch.ones_like(key_at <= query_at)
        if window_size[0] >= 0:
            allowed &= key_at >= query_at - window_size[0]
        out.append((scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vi).transpose(0, 1))
    return torch.cat(out)


def dense_flash_attention(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                          softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func``: [B, L, heads, head_dim], each row one run (transformers uses it for unpacked rows)."""
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    runs = lambda length: torch.arange(0, (b + 1) * length, length)  # noqa: E731
    out = varlen_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), runs(lq), runs(lk), lq, lk,
                           softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap)
    return out.unflatten(0, (b, lq))


def install_emulated_flash(setattr_) -> None:
    """flash-attention 2 on a machine without it: ``varlen_attention`` is installed (with ``setattr_``) where
    transformers imports the kernel from, so everything transformers and ds_dpo do around the kernel (kwargs, window
    and soft-cap mapping, the gathered keys of a prefix-shared row) runs as it would on a GPU."""
    from transformers import modeling_flash_attention_utils as fa

    for name in ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn"):
        setattr_(fa, name, None)  # a later real load starts clean
    setattr_(fa, "_lazy_imports", lambda *args, **kwargs: (dense_flash_attention, varlen_attention, None,
                                                           fa._pad_input, fa._unpad_input))


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
    assert model_support(model.config, "flash_attention_2").layout(True, True) == ("shared", None)
    expected, expected_grad = forward_and_grad(plain_model, "padded", 0)
    for layout in ("packed", "shared"):
        out, grad = forward_and_grad(model, layout, 4)
        close(out, expected, f"{family} flash {layout}")
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5 * expected_grad.abs().max().item(),
                                   msg=lambda m: f"{family} flash {layout}: {m}")
    inputs = layouts.model_inputs(collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, "shared"), model.config, torch.float32)
    # a query run per distinct response: 5 pairs' 2, and the third response of two of their prompts
    assert "attention_mask" not in inputs and inputs["cu_seq_lens_q"].numel() == 2 * 5 + 2 + 1


def output_head(model):
    with torch.no_grad():  # the first chunked scoring call probes the head
        concatenated_forward(model, collate_pairs(PAIRS[:1], [1.0], 0, "padded"), logps_chunk_size=4)
    return model._ds_dpo_output_head


def test_logit_transforms_are_found_from_the_model():
    heads = {family: output_head(tiny_model(family)[0]) for family in ("granite", "cohere", "falcon_h1", "gemma2",
                                                                        "llama")}
    assert heads["granite"].scale == pytest.approx(1 / 4.0, rel=1e-6)  # Granite divides by logits_scaling
    assert heads["cohere"].scale == pytest.approx(0.5, rel=1e-6)
    assert heads["falcon_h1"].scale == pytest.approx(0.3, rel=1e-6)
    assert heads["gemma2"] == OutputHead(1.0, 0.5)
    assert heads["llama"] == OutputHead()


def test_attention_and_layout_routing_is_announced():
    gemma2 = model_support(AutoConfig.for_model("gemma2", **TINY), "sdpa")
    assert gemma2.attn_implementation == "eager" and "Gemma2ForCausalLM" in gemma2.notices[0]
    falcon = model_support(AutoConfig.for_model("falcon_h1", **TINY, **FAMILIES["falcon_h1"]), "sdpa")
    layout, notice = falcon.layout(padding_free=True, prefix_sharing=True)
    assert layout == "padded" and "FalconH1ForCausalLM" in notice
    assert model_support(AutoConfig.for_model("llama", **TINY), "sdpa").layout(True, True) == ("shared", None)


class AbsLogits(LlamaForCausalLM):
    """A head no scale or soft-cap describes."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits.abs()
        return out


def test_a_head_that_cannot_be_reproduced_is_scored_from_full_logits(capsys):
    torch.manual_seed(0)
    model = enable_token_scoring(AbsLogits(LlamaConfig(**TINY))).eval()
    with torch.no_grad():
        plain = concatenated_forward(model, collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, "padded"), logps_chunk_size=0)
        chunked = concatenated_forward(model, collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, "shared"), logps_chunk_size=4)
    assert model._ds_dpo_output_head is None and "AbsLogits" in capsys.readouterr().out
    close(chunked, plain, "full-logits fallback")


def test_self_check_catches_a_broken_head_and_a_broken_layout(monkeypatch):
    model, _ = tiny_model("llama")
    assert scoring_mismatch(model, PAIRS, 0, "shared", 4) is None
    assert output_head(model) == OutputHead()
    model._ds_dpo_output_head = OutputHead(scale=0.5)  # a head that forgot a transform
    message = scoring_mismatch(model, PAIRS, 0, "shared", 4)
    assert "LlamaForCausalLM" in message and "`logps_chunk_size: 0`" in message
    mistral, _ = tiny_model("mistral")
    assert scoring_mismatch(mistral, PAIRS, 0, "packed", 4) is None
    monkeypatch.setattr(layouts, "sliding_window", lambda config: (None, False))  # a mask that lost the window
    message = scoring_mismatch(mistral, PAIRS, 0, "packed", 4)
    assert "MistralForCausalLM" in message and "packed batch layout" in message and "`padding_free: false`" in message


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "granitemoe"])
def test_router_aux_loss_is_the_models_own_in_every_layout(family):
    model, _ = tiny_model(family)
    assert moe_block_classes(model) and router_aux_loss(model) is not None
    batch = collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, "padded")
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     output_router_logits=True).aux_loss  # the model's own, padding masked out
    # a packed row holds exactly the padded batch's real tokens; a shared one holds each prompt once
    for layout in ("padded", "packed", "shared"):
        for chunk in (0, 4):
            model.zero_grad()
            out = concatenated_forward(model, collate_pairs(PAIRS, [1.0] * len(PAIRS), 0, layout),
                                       logps_chunk_size=chunk, router_aux_loss=True)
            if layout == "shared":
                assert torch.isfinite(out.aux_loss) and abs(out.aux_loss - expected) < 0.1 * expected
            else:
                torch.testing.assert_close(out.aux_loss, expected, msg=f"{layout} chunk {chunk}")
            out.aux_loss.backward()  # differentiable: the routers get gradients
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
                       if "gate" in n or "router" in n)
    assert concatenated_forward(model, batch, logps_chunk_size=4).aux_loss is None  # only when asked for


# --- encoder-decoder models ------------------------------------------------------------------------------------------

_ENCODER_STACK = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
ENCODER_DECODERS = {
    # tied embeddings: T5 scales the decoder output by d_model ** -0.5 before its head
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, decoder_start_token_id=2),
    # Gemma-2 stacks: soft-capped logits, decoder start = BOS
    "t5gemma": dict(encoder=dict(_ENCODER_STACK, final_logit_softcapping=0.5),
                    decoder=dict(_ENCODER_STACK, final_logit_softcapping=0.5)),
}
SEQ2SEQ_PAIRS = PAIRS[:4]  # an encoder-decoder's prompt is never empty (its tokenizer closes it with EOS)


def tiny_encoder_decoder(family: str):
    config = AutoConfig.for_model(family, **{"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1,
                                             "eos_token_id": 2, **ENCODER_DECODERS[family]})
    support = model_support(config, "sdpa")
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config, attn_implementation=support.attn_implementation)
    return enable_token_scoring(model).eval(), support


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
    model, support = tiny_encoder_decoder(family)
    assert support.encoder_decoder and support.layout(True, True) == ("seq2seq", None)
    assert scoring_mismatch(model, SEQ2SEQ_PAIRS, 0, "seq2seq", 4) is None  # (probes the output head first)
    weights = torch.arange(1.0, len(SEQ2SEQ_PAIRS) + 1)
    model.zero_grad()
    objective, chosen, rejected = pair_by_pair(model, SEQ2SEQ_PAIRS, weights)
    objective.backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    encoder_rows = []
    model.get_encoder().register_forward_hook(lambda m, args, kwargs, out: encoder_rows.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    for chunk in (0, 4):
        model.zero_grad()
        encoder_rows.clear()
        batch = collate_pairs(SEQ2SEQ_PAIRS, [1.0] * len(SEQ2SEQ_PAIRS), 0, "seq2seq")
        out = concatenated_forward(model, batch, logps_chunk_size=chunk)
        assert encoder_rows == [len(SEQ2SEQ_PAIRS)]
        torch.testing.assert_close(out.chosen, chosen.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.rejected, rejected.detach(), rtol=1e-5, atol=1e-5)
        (weights * out.chosen - 0.7 * out.rejected).sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5 * expected.abs().max().item(),
                                   msg=lambda m: f"{family} chunk {chunk}: {m}")
    assert model._ds_dpo_output_head is not None, "T5's scale, BART's plain head and T5Gemma's soft-cap all fit"


def test_every_loss_type_trains_an_encoder_decoder():
    """Every registered loss on T5's seq2seq log-probs (a reference 0.3 nats off per sequence; WPO weights where the
    loss allows them): a finite loss whose gradient reaches the encoder and the decoder."""
    from ds_dpo.losses import LOSS_TYPES, LossConfig, LossInputs, preference_loss

    model, _ = tiny_encoder_decoder("t5")
    batch = collate_pairs(SEQ2SEQ_PAIRS, [1.0] * len(SEQ2SEQ_PAIRS), 0, "seq2seq")
    for loss_type in LOSS_TYPES:
        model.zero_grad()
        out = concatenated_forward(model, batch, logps_chunk_size=4, with_wpo=True)
        config = LossConfig(loss_type=loss_type, use_weighting=not loss_type.startswith("aot"),  # aot sorts pairs
                            label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0)
        loss = preference_loss(LossInputs(out.chosen, out.rejected, out.chosen.detach() - 0.3,
                                          out.rejected.detach() + 0.3, out.chosen_tokens, out.rejected_tokens,
                                          out.chosen_wpo, out.rejected_wpo), config).losses.mean()
        loss.backward()
        assert torch.isfinite(loss), loss_type
        for stack in (model.get_encoder(), model.get_decoder()):
            grads = [p.grad for p in stack.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads) and max(g.abs().max() for g in grads) > 0, \
                (loss_type, type(stack).__name__)
