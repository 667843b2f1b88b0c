"""Canonical pairs to token ids: special tokens, chat templates, truncation, and the drop/truncation bookkeeping.

``encode_pair`` returns ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` plus ``drop`` (the reason
a pair cannot be trained on, or "") and the untruncated lengths for the data report. The rules:

- text prompts get the tokenizer's own special tokens (BOS where it adds one, never two); completions none, and each
  is closed by EOS;
- conversations are rendered with the chat template (the prompt with ``add_generation_prompt``; the row's
  ``template_options``, e.g. ``tools`` and ``enable_thinking``, passed to it); the prompt tokens
  are the longest prefix shared by the tokenized prompt and both full conversations, so they are identical for
  chosen and rejected even for templates that render a prompt differently once a reply follows (TRL 1.16's rule);
  the tokens of a prompt that is not a prefix of its conversation are counted (``prompt_not_prefix``, for the data
  report: a thinking template's empty ``<think></think>`` before a reply that thinks, say); the template's own
  end-of-turn closes each reply;
- rows with images (a vision-language model's ``processor``) are tokenized by the processor with their images, so
  each image token is expanded to the image's feature tokens: conversations rendered by the processor's chat template,
  a text prompt with the tokenizer's special tokens (its completions as any text completion); a prompt with images is
  never cut (the pair is dropped instead: a cut image would not match its features);
- pre-tokenized ids are taken as they are;
- for an encoder-decoder model (``encoder_decoder``) the prompt is the encoder's input and each completion a decoder
  target: text prompts get the tokenizer's special tokens (T5's closing ``</s>``, BART's ``<s> ... </s>``),
  completions are tokenized as targets (``text_target``) and closed by EOS; conversations render the prompt with the
  chat template and take each reply's text as its target;
- a prompt longer than ``max_prompt_length`` keeps its end (``truncation_mode: keep_end``) or its start
  (``keep_start``); without ``max_prompt_length`` (the default, as in TRL) a prompt is cut only when it alone fills
  ``max_length``, to half of ``max_length``; completions are cut to ``max_completion_length`` and to what
  ``max_length`` leaves; a pair with no room for a completion token is dropped. Every truncation and drop is counted
  in the data report. For an encoder-decoder the prompt and each completion are limited separately: the prompt to
  ``max_prompt_length`` (default ``max_length``), a completion to ``max_completion_length`` and ``max_length``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ds_dpo.config import DataConfig


def load_tokenizer(model_name_or_path: str, source: dict | None = None, chat_template: str | None = None):
    """The model's tokenizer, with a pad token (pads are masked out, so EOS serves) and ``chat_template`` (a Jinja
    string or a file holding one) in place of its own when given; ``source``: ``from_pretrained`` arguments saying
    where the model's files are (``ModelConfig.source``: trust_remote_code, revision, ...)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, **(source or {}))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        tokenizer.chat_template = _template_text(chat_template)
    return tokenizer


def load_processor(model_name_or_path: str, source: dict | None = None, chat_template: str | None = None):
    """A vision-language model's processor, its tokenizer prepared as ``load_tokenizer`` prepares one and
    ``chat_template`` in place of the processor's own when given."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_name_or_path, **(source or {}))
    if processor.tokenizer.pad_token_id is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    if chat_template:
        processor.chat_template = processor.tokenizer.chat_template = _template_text(chat_template)
    return processor


def _template_text(chat_template: str) -> str:
    """A Jinja string, or the text of the file that holds one."""
    is_file = "{" not in chat_template and Path(chat_template).expanduser().is_file()  # Jinja has braces
    return Path(chat_template).expanduser().read_text() if is_file else chat_template


def _common_prefix(*sequences: list[int]) -> int:
    n = 0
    for items in zip(*sequences):
        if any(x != items[0] for x in items[1:]):
            break
        n += 1
    return n


def _text_prompt(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and ids[:2] == [bos, bos]:  # the text already began with the BOS string
        ids = ids[1:]
    if not ids and bos is not None:
        ids = [bos]
    return ids


def _completion(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids if ids[-1:] == [tokenizer.eos_token_id] else ids + [tokenizer.eos_token_id]


def _target(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text_target=text)["input_ids"]
    return ids if ids[-1:] == [tokenizer.eos_token_id] else ids + [tokenizer.eos_token_id]


def _reply_text(messages: list[dict]) -> str:
    return "".join(
        m["content"] if isinstance(m["content"], str) else "".join(part.get("text", "") for part in m["content"])
        for m in messages
    )


def _render(
    tokenizer, messages: list[dict], generation_prompt: bool, options: dict[str, Any], images: list | None = None
) -> list[int]:
    """``messages`` through the chat template, tokenized; with ``images``, ``tokenizer`` is the model's processor."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **options)
    if images is not None:
        return list(tokenizer(text=[text], images=images or None, add_special_tokens=False)["input_ids"][0])
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own BOS


def _ids(
    pair: dict[str, Any], tokenizer, encoder_decoder: bool, processor
) -> tuple[list[int], list[int], list[int], int]:
    """Prompt, chosen and rejected ids, and how many tokens of the rendered prompt are not in the prompt ids."""
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    images = None
    if "images" in pair:  # a vision-language row: the processor renders and tokenizes it, images included
        from ds_dpo.data.images import open_images

        tokenizer, images = processor, open_images(pair["images"])
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return prompt, chosen, rejected, 0
    if isinstance(prompt, list) and encoder_decoder:  # the rendered prompt to the encoder, each reply's text as target
        options = json.loads(pair.get("template_options") or "{}")
        return (
            _render(tokenizer, prompt, True, options),
            _target(tokenizer, _reply_text(chosen)),
            _target(tokenizer, _reply_text(rejected)),
            0,
        )
    if isinstance(prompt, list):  # messages
        options = json.loads(pair.get("template_options") or "{}")
        prompt_ids = _render(tokenizer, prompt, True, options, images)
        full_chosen = _render(tokenizer, prompt + chosen, False, options, images)
        full_rejected = _render(tokenizer, prompt + rejected, False, options, images)
        n = _common_prefix(prompt_ids, full_chosen, full_rejected)
        return full_chosen[:n], full_chosen[n:], full_rejected[n:], len(prompt_ids) - n
    if pair["split_by_tokens"]:  # implicit prompt without turn boundaries: longest common token prefix
        full_chosen, full_rejected = _text_prompt(tokenizer, chosen), _text_prompt(tokenizer, rejected)
        n = min(_common_prefix(full_chosen, full_rejected), len(full_chosen) - 1, len(full_rejected) - 1)
        eos = [tokenizer.eos_token_id]
        return full_chosen[:n], full_chosen[n:] + eos, full_rejected[n:] + eos, 0
    completion = _target if encoder_decoder else _completion
    if images is not None:
        text_tokenizer = tokenizer.tokenizer
        prompt_ids = list(tokenizer(text=[prompt], images=images or None)["input_ids"][0])
        return prompt_ids, _completion(text_tokenizer, chosen), _completion(text_tokenizer, rejected), 0
    return _text_prompt(tokenizer, prompt), completion(tokenizer, chosen), completion(tokenizer, rejected), 0


def encode_pair(
    pair: dict[str, Any], tokenizer, limits: DataConfig, encoder_decoder: bool = False, processor=None
) -> dict[str, Any]:
    """The token ids of a canonical pair (``ds_dpo.data.formats``) and its bookkeeping, cut to the length keys of
    ``limits``; ``processor``: a vision-language model's, for rows with images."""
    prompt, chosen, rejected, not_prefix = _ids(pair, tokenizer, encoder_decoder, processor)
    out = {
        "prompt_not_prefix": not_prefix,
        "prompt_length": len(prompt),
        "chosen_length": len(chosen),
        "rejected_length": len(rejected),
        "prompt_truncated": False,
        "completion_truncated": False,
        "drop": "",
    }
    if not prompt:
        out["drop"] = "empty prompt and no BOS token to start from"
    elif not chosen or not rejected:
        out["drop"] = "empty completion after tokenization"
    m = limits.max_prompt_length
    if m is None and limits.max_length is not None and encoder_decoder:
        m = limits.max_length  # the encoder's own limit
    elif m is None and limits.max_length is not None and len(prompt) >= limits.max_length:
        m = limits.max_length // 2  # the prompt alone fills max_length: keep half of it for the prompt
    if m is not None and len(prompt) > m and pair.get("images"):
        out["drop"] = out["drop"] or "prompt with images longer than the prompt limit (an image cannot be cut)"
    elif m is not None and len(prompt) > m:
        prompt = prompt[-m:] if limits.truncation_mode == "keep_end" else prompt[:m]
        out["prompt_truncated"] = True
    room = limits.max_completion_length
    if limits.max_length is not None:
        left = limits.max_length - (0 if encoder_decoder else len(prompt))
        room = left if room is None else min(room, left)
    if room is not None:
        if room < 1:
            out["drop"] = out["drop"] or "prompt leaves no room for the completion within max_length"
        elif len(chosen) > room or len(rejected) > room:
            chosen, rejected = chosen[:room], rejected[:room]
            out["completion_truncated"] = True
            if chosen == rejected:
                out["drop"] = out["drop"] or "chosen and rejected identical once truncated"
    out.update(prompt_input_ids=prompt, chosen_input_ids=chosen, rejected_input_ids=rejected)
    return out
