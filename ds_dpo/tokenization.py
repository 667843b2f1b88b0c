"""Canonical pairs to token ids: special tokens, chat templates, truncation, and the drop/truncation bookkeeping.

``encode_pair`` returns ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` plus ``drop`` (the reason
a pair cannot be trained on, or "") and the untruncated lengths for the data report. The rules:

- text prompts get the tokenizer's own special tokens (BOS where it adds one, never two); completions none, and each
  is closed by EOS;
- conversations are rendered with the chat template (the prompt with ``add_generation_prompt``; the row's
  ``template_options``, e.g. ``tools`` and ``enable_thinking``, passed to it); the prompt tokens
  are the longest prefix shared by the tokenized prompt and both full conversations, so they are identical for
  chosen and rejected even for templates that render a prompt differently once a reply follows; the template's own
  end-of-turn closes each reply;
- pre-tokenized ids are taken as they are;
- a prompt longer than ``max_prompt_length`` keeps its end (``truncation_mode: keep_end``) or its start
  (``keep_start``); without ``max_prompt_length`` (the default, as in TRL) a prompt is cut only when it alone fills
  ``max_length``, to half of ``max_length``; completions are cut to ``max_completion_length`` and to what
  ``max_length`` leaves; a pair with no room for a completion token is dropped. Every truncation and drop is counted
  in the data report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass(frozen=True)
class LengthLimits:
    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None
    truncation_mode: str = "keep_end"


def load_tokenizer(model_name_or_path: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The model's tokenizer, with a pad token (pads are masked out, so EOS serves) and ``chat_template`` (a Jinja
    string or a file holding one) in place of its own when given."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template:
        is_file = "{" not in chat_template and Path(chat_template).expanduser().is_file()  # Jinja has braces
        tokenizer.chat_template = Path(chat_template).expanduser().read_text() if is_file else chat_template
    return tokenizer


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


def _render(tokenizer, messages: list[dict], generation_prompt: bool, options: dict[str, Any]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         **options)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes its own BOS


def _ids(pair: dict[str, Any], tokenizer) -> tuple[list[int], list[int], list[int]]:
    prompt, chosen, rejected = pair["prompt"], pair["chosen"], pair["rejected"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        return prompt, chosen, rejected
    if isinstance(prompt, list):  # messages
        options = json.loads(pair.get("template_options") or "{}")
        prompt_ids = _render(tokenizer, prompt, True, options)
        full_chosen = _render(tokenizer, prompt + chosen, False, options)
        full_rejected = _render(tokenizer, prompt + rejected, False, options)
        n = _common_prefix(prompt_ids, full_chosen, full_rejected)
        return full_chosen[:n], full_chosen[n:], full_rejected[n:]
    if pair["split_by_tokens"]:  # implicit prompt without turn boundaries: longest common token prefix
        full_chosen, full_rejected = _text_prompt(tokenizer, chosen), _text_prompt(tokenizer, rejected)
        n = min(_common_prefix(full_chosen, full_rejected), len(full_chosen) - 1, len(full_rejected) - 1)
        eos = [tokenizer.eos_token_id]
        return full_chosen[:n], full_chosen[n:] + eos, full_rejected[n:] + eos
    return _text_prompt(tokenizer, prompt), _completion(tokenizer, chosen), _completion(tokenizer, rejected)


def encode_pair(pair: dict[str, Any], tokenizer, limits: LengthLimits) -> dict[str, Any]:
    prompt, chosen, rejected = _ids(pair, tokenizer)
    out = {"prompt_length": len(prompt), "chosen_length": len(chosen), "rejected_length": len(rejected),
           "prompt_truncated": False, "completion_truncated": False, "drop": ""}
    if not prompt:
        out["drop"] = "empty prompt and no BOS token to start from"
    elif not chosen or not rejected:
        out["drop"] = "empty completion after tokenization"
    m = limits.max_prompt_length
    if m is None and limits.max_length is not None and len(prompt) >= limits.max_length:
        m = limits.max_length // 2  # the prompt alone fills max_length: keep half of it for the prompt
    if m is not None and len(prompt) > m:
        prompt = prompt[-m:] if limits.truncation_mode == "keep_end" else prompt[:m]
        out["prompt_truncated"] = True
    room = limits.max_completion_length
    if limits.max_length is not None:
        left = limits.max_length - len(prompt)
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
