"""Tiny random models built offline from their configs: one factory for every family the tests cover (causal LMs and
encoder-decoders, in memory or saved beside a tokenizer for a run), and flash-attention emulated in plain torch."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from ds_dpo.forward.layouts import PADDED, Layout
from ds_dpo.forward.scoring import install_token_scoring
from ds_dpo.models.support import auto_class, model_support
from helpers.pairs import VOCAB

TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
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
    "falcon_h1": dict(
        lm_head_multiplier=0.3,
        mamba_d_ssm=16,
        mamba_n_heads=4,
        mamba_d_head=4,
        mamba_d_state=4,
        mamba_n_groups=1,
        mamba_chunk_size=4,
    ),  # hybrid attention + Mamba-2: padded only
    "mixtral": dict(num_local_experts=4, sliding_window=3, **MOE),
    "qwen2_moe": dict(num_experts=4, moe_intermediate_size=16, shared_expert_intermediate_size=16, **MOE),
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=16, **MOE),
    "granitemoe": dict(num_local_experts=4, logits_scaling=4.0, **MOE),
    # attention sinks: a learned logit per head in every query's softmax (no sdpa: the module's own eager kernel, per
    # block); sliding and full layers alternate; MoE
    "gpt_oss": dict(num_local_experts=4, sliding_window=3, **MOE),
    # multi-head latent attention: low-rank queries and keys/values, RoPE on a separate part of each head (MLA needs
    # as many key/value heads as heads); a dense first layer, then shared and routed experts
    "deepseek_v3": dict(
        num_key_value_heads=4,
        head_dim=4,
        q_lora_rank=16,
        kv_lora_rank=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=8,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
        **MOE,
    ),
    # chunked attention (a token sees only its own chunk of 3 positions), then a full-attention layer without RoPE;
    # temperature tuning, which reads the row index, is off (with it the family is padded: the routing test)
    "llama4_text": dict(
        attention_chunk_size=3,
        no_rope_layers=[1, 0],
        attn_temperature_tuning=False,
        num_local_experts=4,
        intermediate_size_mlp=64,
        **MOE,
    ),
    "smollm3": dict(no_rope_layers=[1, 0]),  # layer 2 without RoPE (NoPE)
    # Gated DeltaNet linear attention, then gated full attention; MoE: padded only
    "qwen3_next": dict(
        layer_types=["linear_attention", "full_attention"],
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_experts=4,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        **MOE,
    ),
    "lfm2": dict(full_attn_idxs=[1]),  # a short-convolution layer, then attention: padded only
    # KV sharing (layer 2 reuses layer 1's keys and values), AltUp, per-layer inputs, soft-capped logits. No pad id:
    # padding_idx would zero the pad token's embedding, whose AltUp magnitude (a square root) then has a NaN gradient
    # in the model's own padded forward
    "gemma3n_text": dict(
        pad_token_id=None,
        sliding_window=3,
        final_logit_softcapping=0.5,
        num_kv_shared_layers=1,
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=8,
        laurel_rank=4,
        altup_num_inputs=2,
        activation_sparsity_pattern=[0.0, 0.0],
    ),
    "exaone4": dict(sliding_window=3, sliding_window_pattern=2),  # a sliding layer, then a full one without RoPE
    "olmo3": dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"]),  # QK-norm
    "ministral": dict(sliding_window=3, layer_types=["sliding_attention", "full_attention"]),
    # MoE after a dense layer; layer 2 slides
    "dots1": dict(
        use_sliding_window=True,
        sliding_window=3,
        max_window_layers=1,
        n_routed_experts=4,
        n_shared_experts=1,
        moe_intermediate_size=16,
        first_k_dense_replace=1,
        **MOE,
    ),
    "glm": {},  # partial, interleaved RoPE
    "glm4": {},  # partial RoPE, norms after attention and MLP too
    "seed_oss": {},  # biased query/key/value projections
    "hunyuan_v1_dense": {},  # QK-norm after RoPE
    "apertus": {},  # xIELU activation, Llama-3 RoPE scaling, QK-norm
    "arcee": {},  # ReLU² MLP without a gate
    "ernie4_5": {},  # interleaved RoPE
}
_ENCODER_STACK = {key: value for key, value in TINY.items() if not key.endswith("_token_id")}
ENCODER_DECODERS = {
    # tied embeddings: T5 scales the decoder output by d_model ** -0.5 before its head
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
    "bart": dict(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        decoder_start_token_id=2,
    ),
    # Gemma-2 stacks: soft-capped logits, decoder start = BOS
    "t5gemma": dict(
        encoder=dict(_ENCODER_STACK, final_logit_softcapping=0.5),
        decoder=dict(_ENCODER_STACK, final_logit_softcapping=0.5),
    ),
}


def tiny_config(family: str, **overrides):
    """The family's tiny config (``overrides``: config values)."""
    if family in ENCODER_DECODERS:
        base = {"vocab_size": VOCAB, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
        return AutoConfig.for_model(family, **{**base, **ENCODER_DECODERS[family], **overrides})
    return AutoConfig.for_model(family, **{**TINY, **FAMILIES[family], **overrides})


def tiny_model(
    family: str = "llama", attn: str = "sdpa", layout: Layout = PADDED, sequence_parallel: bool = False, **overrides
):
    """The family's tiny model (the same weights whatever the attention), loaded as a run with ``layout`` loads it,
    with the scoring forward installed, in eval mode; and its ``ModelSupport``. ``attn`` may also name one of
    ds_dpo's block attentions directly."""
    config = tiny_config(family, **overrides)
    support = model_support(config, attn)
    torch.manual_seed(0)
    attn_implementation = support.attention_for(layout, sequence_parallel)[0]
    model = auto_class(config).from_config(config, attn_implementation=attn_implementation)
    return install_token_scoring(model).eval(), support


def save_tiny_model(family: str, tokenizer_dir: str, out: Path, **overrides) -> str:
    """The family's tiny model as a checkpoint beside the tokenizer in ``tokenizer_dir`` (its vocabulary and special
    tokens; an encoder-decoder starts decoding with T5's pad or BART's EOS), for a run to load; returns its path."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if family in ENCODER_DECODERS:
        ids["decoder_start_token_id"] = tokenizer.pad_token_id if family == "t5" else tokenizer.eos_token_id
    config = tiny_config(family, **ids, **overrides)
    torch.manual_seed(0)
    auto_class(config).from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


# --- flash-attention on a machine without it -------------------------------------------------------------------------


def varlen_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """flash-attn 2's ``flash_attn_varlen_func`` as documented, in plain torch: run i's queries attend to run i's keys;
    causal is aligned to the bottom right (query j sees keys up to j + len_k - len_q) and ``window_size[0]`` keys
    back from there; grouped KV heads are shared by consecutive query heads."""
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qi = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]].transpose(0, 1)
        ki, vi = (
            x[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].transpose(0, 1).repeat_interleave(q.shape[1] // x.shape[1], 0)
            for x in (k, v)
        )
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


def dense_flash_attention(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    """``flash_attn_func``: [B, L, heads, head_dim], each row one run (transformers uses it for unpacked rows)."""
    b, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    runs = lambda length: torch.arange(0, (b + 1) * length, length)  # noqa: E731
    out = varlen_attention(
        q.flatten(0, 1),
        k.flatten(0, 1),
        v.flatten(0, 1),
        runs(lq),
        runs(lk),
        lq,
        lk,
        softmax_scale=softmax_scale,
        causal=causal,
        window_size=window_size,
        softcap=softcap,
    )
    return out.unflatten(0, (b, lq))


def install_emulated_flash(setattr_) -> None:
    """flash-attention 2 on a machine without it: ``varlen_attention`` is installed (with ``setattr_``) where
    transformers imports the kernel from, so everything transformers and ds_dpo do around the kernel (kwargs, window
    and soft-cap mapping, the gathered keys of a prefix-shared row) runs as it would on a GPU."""
    from transformers import modeling_flash_attention_utils as fa

    for name in (
        "_loaded_implementation",
        "_flash_fn",
        "_flash_varlen_fn",
        "_flash_with_kvcache_fn",
        "_pad_fn",
        "_unpad_fn",
        "_process_flash_kwargs_fn",
        "_process_with_kvcache_kwargs_fn",
    ):
        setattr_(fa, name, None)  # a later real load starts clean
    setattr_(
        fa,
        "_lazy_imports",
        lambda *args, **kwargs: (dense_flash_attention, varlen_attention, None, fa._pad_input, fa._unpad_input),
    )
