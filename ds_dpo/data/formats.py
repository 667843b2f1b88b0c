"""Preference-data formats, detected per dataset, normalised to one canonical row per pair.

| format          | fields                                                   | canonical ``prompt``/``chosen``/``rejected`` |
| --------------- | -------------------------------------------------------- | --------------------------------------------- |
| ``explicit``    | ``prompt``, ``chosen``, ``rejected`` strings             | the strings                                   |
| ``implicit``    | ``chosen``, ``rejected`` whole dialogues (HH-RLHF)       | shared prefix up to the last shared turn      |
|                 |                                                          | boundary, then each final reply               |
| ``conversational`` | ``prompt``/``chosen``/``rejected`` message lists, or     | message lists (prompt, then each reply)       |
|                 | ``chosen``/``rejected`` whole conversations; a string    |                                               |
|                 | ``prompt`` beside them (UltraFeedback) is used only if   |                                               |
|                 | they share no leading messages, as the user turn         |                                               |
| ``tokenized``   | ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` | the id lists                       |
| ``ranked``      | ``prompt`` and K ``responses`` (best first, or with      | the pairs ``response_pairing`` makes, each as |
|                 | ``scores``), or UltraFeedback's ``completions`` records  | an explicit or conversational row             |
|                 | (``response``, ``overall_score``)                        |                                               |

Ranked rows (K responses to one prompt) become pairs by a rule (``response_pairs``): ``best_vs_worst`` (one pair),
``best_vs_rest`` (K - 1 pairs) or ``all_pairs`` (every pair of responses ranked apart, up to K(K-1)/2). A response
ranks above another when it comes first in ``responses`` or, with scores, scores strictly higher: responses scored
alike make no pair, and a row whose responses are all alike (or that has fewer than two) makes none. Its pairs are
kept together through training (``data``, ``sampler``), so that a prefix-shared batch computes the prompt once and
each response once (``layouts``).

Conversational rows may also carry ``tools`` (a list of tool schemas, for tool-calling data) and
``chat_template_kwargs`` (template variables, over the run's ``chat_template_kwargs``), as in TRL 1.16; both go to the
chat template, kept in the canonical row as ``template_options`` (JSON, so that the tokenization cache key covers
them).

Rows of a vision-language dataset (its first row has ``images``, a list, or ``image``) carry their images (paths,
bytes, ``{"bytes", "path"}`` records or PIL images), checked and kept as encoded bytes in ``images``; each image
belongs to the prompt. Conversational rows, as in TRL: message contents are strings or lists of parts
(``{"type": "text", "text": ...}``, ``{"type": "image"}``), kept as parts; as many image parts in the prompt as the row
has images, or none, and then one per image goes before the first user message's text (TRL's
``prepare_multimodal_messages``). Explicit rows: the prompt string holds the processor's image token once per image.

Any row may carry a ``weight``: the pair's weight in the training loss (a weighted mean over the global batch;
0 keeps the pair out, as the sampler's fillers are), read by ``pair_weight``.

``normalize`` and ``pair_weight`` raise ``RowError`` (field + reason) for a row that cannot be a training pair.
"""

from __future__ import annotations

import json
import math
from typing import Any

SCORE_FIELDS = ("overall_score", "score")
"""The score of a ``completions`` record, first found (UltraFeedback's is ``overall_score``)."""
ROLES = ("system", "user", "assistant", "tool")
TOKEN_FIELDS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


class RowError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def detect(row: dict[str, Any]) -> str:
    """The format of a dataset, from its first row."""
    if all(k in row for k in TOKEN_FIELDS):
        return "tokenized"
    if "responses" in row or isinstance(row.get("completions"), list):
        return "ranked"
    if isinstance(row.get("chosen"), list) or isinstance(row.get("prompt"), list):
        return "conversational"
    return "explicit" if "prompt" in row else "implicit"


def has_images(row: dict[str, Any]) -> bool:
    """Whether a dataset is a vision-language one, from its first row."""
    return "images" in row or "image" in row


def normalize(
    row: dict[str, Any],
    fmt: str,
    delimiter: str,
    chat_template_kwargs: dict[str, Any] | None = None,
    image_token: str | None = None,
) -> dict[str, Any]:
    """The canonical pair of ``row``; ``delimiter`` is the turn boundary of implicit prompts,
    ``chat_template_kwargs`` the run's template variables for conversational rows; ``image_token``: the row is of a
    vision-language dataset, whose processor marks an image in text with this token."""
    if image_token is not None:
        return _with_images(row, fmt, image_token, chat_template_kwargs)
    if fmt == "tokenized":
        return _tokenized(row)
    if fmt == "conversational":
        return {**_conversational(row), "template_options": _template_options(row, chat_template_kwargs)}
    if fmt == "implicit":
        chosen, rejected = _strings(row, ("chosen", "rejected"))
        return _split_implicit(chosen, rejected, delimiter)
    prompt, chosen, rejected = _strings(row, ("prompt", "chosen", "rejected"))
    _check_pair(chosen, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "split_by_tokens": False}


def response_pairs(
    row: dict[str, Any],
    pairing: str,
    delimiter: str,
    chat_template_kwargs: dict[str, Any] | None = None,
    image_token: str | None = None,
) -> list[dict[str, Any]]:
    """The canonical pairs that ``pairing`` makes of a ranked row (see the module's docstring), each normalised as
    the explicit or conversational row of its prompt and two responses; empty when the responses rank nothing
    apart."""
    if row.get("prompt") is None:
        raise RowError("prompt", "missing")
    responses, scores, name = _responses(row)
    rest = {k: v for k, v in row.items() if k not in ("responses", "scores", "completions")}
    if isinstance(rest.get("prompt"), list):  # message-list prompt: string responses are assistant turns
        responses = [[{"role": "assistant", "content": r}] if isinstance(r, str) else r for r in responses]
    order = sorted(range(len(responses)), key=lambda k: -scores[k])  # stable: ties keep the row's order
    if pairing == "best_vs_worst":
        candidates = [(order[0], order[-1])]
    elif pairing == "best_vs_rest":
        candidates = [(order[0], k) for k in order[1:]]
    else:
        candidates = [(a, b) for x, a in enumerate(order) for b in order[x + 1 :]]
    pairs = []
    for better, worse in candidates:
        if scores[better] == scores[worse] or responses[better] == responses[worse]:
            continue
        pair = {**rest, "chosen": responses[better], "rejected": responses[worse]}
        try:
            pairs.append(normalize(pair, detect(pair), delimiter, chat_template_kwargs, image_token))
        except RowError as e:  # name the response in the user's row, not the pair made of it
            field = e.field
            for side, k in (("chosen", better), ("rejected", worse)):
                if field.startswith(side):
                    field = f"{name}[{k}]" + field[len(side) :]
            raise RowError(field, e.reason) from None
    return pairs


def _responses(row: dict[str, Any]) -> tuple[list[Any], list[float], str]:
    """A ranked row's responses, their scores (higher is better; by position where the row has none) and the field
    they came from."""
    if "responses" in row:
        responses = row["responses"]
        if not isinstance(responses, list):
            raise RowError("responses", f"must be a list of responses, got {type(responses).__name__}")
        scores = row.get("scores")
        if scores is None:
            return responses, [float(k) for k in range(len(responses), 0, -1)], "responses"
        if not isinstance(scores, list) or len(scores) != len(responses):
            raise RowError("scores", f"must be a list of one number per response ({len(responses)})")
        return responses, [_score(score, f"scores[{k}]") for k, score in enumerate(scores)], "responses"
    responses, scores = [], []
    for k, record in enumerate(row["completions"]):
        if not isinstance(record, dict) or "response" not in record:
            raise RowError(f"completions[{k}]", "must be a record with a `response`")
        responses.append(record["response"])
        found = next((f for f in SCORE_FIELDS if record.get(f) is not None), SCORE_FIELDS[0])
        scores.append(_score(record.get(found), f"completions[{k}].{found}"))
    return responses, scores, "completions"


def _score(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError(field, f"must be a finite number, got {value!r}")
    return float(value)


def _strings(row: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    values = []
    for name in fields:
        if name not in row or row[name] is None:
            raise RowError(name, "missing")
        if not isinstance(row[name], str):
            raise RowError(name, f"must be a string, got {type(row[name]).__name__}")
        values.append(row[name])
    return values


def _check_pair(chosen, rejected) -> None:
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value or (isinstance(value, str) and not value.strip()):
            raise RowError(name, "empty completion")
    if chosen == rejected:
        raise RowError("rejected", "identical to `chosen`")


def _split_implicit(chosen: str, rejected: str, delimiter: str) -> dict[str, str]:
    """Prompt = shared text through the last turn boundary that lies wholly inside the shared prefix.

    Without any shared boundary the split is left to the tokenizer (longest common token prefix), never a
    character-level cut through a word. A pair whose replies contain a further boundary differs before its final
    turn: it is not one preference between two replies, and is reported as a bad row.
    """
    if chosen == rejected:
        raise RowError("rejected", "identical to `chosen`")
    shared = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        shared += 1
    cut = chosen.rfind(delimiter, 0, shared) if delimiter else -1
    if cut < 0:
        if delimiter and (delimiter in chosen or delimiter in rejected):
            raise RowError("chosen", f"`chosen` and `rejected` differ before their first {delimiter!r} turn")
        return {"prompt": "", "chosen": chosen, "rejected": rejected, "split_by_tokens": True}
    end = cut + len(delimiter)
    prompt, chosen_reply, rejected_reply = chosen[:end], chosen[end:], rejected[end:]
    for name, reply in (("chosen", chosen_reply), ("rejected", rejected_reply)):
        if delimiter in reply:
            raise RowError(name, f"`chosen` and `rejected` differ before the final {delimiter!r} turn")
    _check_pair(chosen_reply, rejected_reply)
    return {"prompt": prompt, "chosen": chosen_reply, "rejected": rejected_reply, "split_by_tokens": False}


def _messages(value: Any, name: str, parts: bool = False) -> list[dict[str, Any]]:
    """The messages of ``value``; with ``parts``, every content as a list of text and image parts."""
    if not isinstance(value, list):
        raise RowError(name, f"must be a list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"{name}[{i}]", f"must be a {{role, content}} object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"{name}[{i}].role", f"invalid role {role!r} (expected one of {ROLES})")
        if parts:
            content = _parts(content, f"{name}[{i}].content")
        elif not isinstance(content, str):
            raise RowError(f"{name}[{i}].content", f"must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _parts(content: Any, name: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise RowError(name, f"must be a string or a list of parts, got {type(content).__name__}")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            out.append({"type": "image", "text": None})
        else:
            raise RowError(f"{name}[{j}]", 'must be {"type": "text", "text": ...} or {"type": "image"}')
    return out


def _with_images(
    row: dict[str, Any], fmt: str, image_token: str, chat_template_kwargs: dict[str, Any] | None
) -> dict[str, Any]:
    images = _images(row)
    if fmt == "conversational":
        pair = _conversational(row, parts=True)
        return {
            **pair,
            "prompt": _place_images(pair, len(images)),
            "images": images,
            "template_options": _template_options(row, chat_template_kwargs),
        }
    if fmt != "explicit":
        raise RowError("images", "rows with images must be conversational or have an explicit `prompt`")
    prompt, chosen, rejected = _strings(row, ("prompt", "chosen", "rejected"))
    _check_pair(chosen, rejected)
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if image_token in text:
            raise RowError(name, f"the image token {image_token!r} belongs in the prompt")
    if prompt.count(image_token) != len(images):
        raise RowError(
            "prompt", f"{prompt.count(image_token)} image token(s) {image_token!r} for {len(images)} image(s)"
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "split_by_tokens": False, "images": images}


def _images(row: dict[str, Any]) -> list[bytes]:
    from ds_dpo.data.images import image_bytes

    for key in ("videos", "video"):
        if row.get(key) is not None:  # else the model would train on the video's text without it
            raise RowError(key, "videos are not served: ds_dpo lays out images only")
    images = row.get("images")
    name = "images"
    if images is None and row.get("image") is not None:
        images, name = [row["image"]], "image"
    if images is None:
        return []
    if not isinstance(images, list):
        raise RowError(name, f"must be a list of images, got {type(images).__name__}")
    out = []
    for i, image in enumerate(images):
        try:
            out.append(image_bytes(image))
        except ValueError as e:
            raise RowError(f"{name}[{i}]" if name == "images" else name, str(e)) from None
    return out


def _place_images(pair: dict[str, Any], count: int) -> list[dict[str, Any]]:
    """The prompt with one image part per image: the row's own, or put before the first user message's text."""

    def image_parts(messages):
        return sum(part["type"] == "image" for m in messages for part in m["content"])

    for name in ("chosen", "rejected"):
        if image_parts(pair[name]):
            raise RowError(name, "image parts belong in the prompt")
    prompt, placed = pair["prompt"], image_parts(pair["prompt"])
    if placed == 0 and count:
        first = next((i for i, m in enumerate(prompt) if m["role"] == "user"), None)
        if first is None:
            raise RowError("prompt", "images but no user message to put them in")
        message = prompt[first]
        prompt = [
            *prompt[:first],
            {**message, "content": [{"type": "image", "text": None}] * count + message["content"]},
            *prompt[first + 1 :],
        ]
    elif placed != count:
        raise RowError("prompt", f"{placed} image part(s) for {count} image(s)")
    return prompt


def _conversational(row: dict[str, Any], parts: bool = False) -> dict[str, Any]:
    for name in ("chosen", "rejected"):
        if name not in row or row[name] is None:
            raise RowError(name, "missing")
    chosen, rejected = _messages(row["chosen"], "chosen", parts), _messages(row["rejected"], "rejected", parts)
    text_prompt = row.get("prompt") if isinstance(row.get("prompt"), str) else None
    if row.get("prompt") is not None and text_prompt is None:
        prompt = _messages(row["prompt"], "prompt", parts)
    else:  # whole conversations: the shared messages are the prompt
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        # UltraFeedback's shape, a string prompt beside conversations that repeat it: as TRL's
        # maybe_extract_prompt, the conversations' shared messages are the prompt; the string only stands in as the
        # user turn when they share none
        if not prompt and text_prompt:
            prompt = [{"role": "user", "content": _parts(text_prompt, "prompt") if parts else text_prompt}]
    if not prompt:
        raise RowError("prompt", "no prompt messages")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply:
            raise RowError(name, "empty completion")
        bad = [i for i, m in enumerate(reply) if m["role"] != "assistant"]
        if bad:
            raise RowError(
                f"{name}[{bad[0]}].role",
                "the completion must be assistant messages only "
                "(chosen and rejected differ before the final assistant turn)",
            )
    if chosen == rejected:
        raise RowError("rejected", "identical to `chosen`")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "split_by_tokens": False}


def pair_weight(row: dict[str, Any]) -> float:
    """The row's ``weight`` (1 where it has none)."""
    value = row.get("weight")
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise RowError("weight", f"must be a finite number >= 0, got {value!r}")
    return float(value)


def _template_options(row: dict[str, Any], defaults: dict[str, Any] | None) -> str:
    """The keyword arguments of ``apply_chat_template`` for ``row``, as JSON."""
    options = dict(defaults or {})
    own = row.get("chat_template_kwargs")
    if own is not None:
        if not isinstance(own, dict):
            raise RowError("chat_template_kwargs", f"must be an object of template variables, got {type(own).__name__}")
        options.update(own)
    tools = row.get("tools")
    if tools is not None:
        if isinstance(tools, str):  # datasets often keep schemas as JSON text
            try:
                tools = json.loads(tools)
            except json.JSONDecodeError as e:
                raise RowError("tools", f"not valid JSON ({e.msg})") from None
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise RowError("tools", "must be a list of tool schemas (JSON objects)")
        options["tools"] = tools
    return json.dumps(options, sort_keys=True)


def _tokenized(row: dict[str, Any]) -> dict[str, Any]:
    ids = {}
    for name in TOKEN_FIELDS:
        value = row.get(name)
        if not isinstance(value, list) or not all(isinstance(t, int) and t >= 0 for t in value):
            raise RowError(name, "must be a list of non-negative token ids")
        ids[name.removesuffix("_input_ids")] = value
    _check_pair(ids["chosen"], ids["rejected"])
    if not ids["prompt"]:
        raise RowError("prompt_input_ids", "empty (the first completion token needs a context)")
    return {**ids, "split_by_tokens": False}
