"""Preference data: load ``prompt``/``chosen``/``rejected`` rows, check them, tokenize them (cached by ``datasets``).

A tokenized pair holds ``prompt_input_ids`` (BOS included, as the tokenizer adds it), ``chosen_input_ids`` and
``rejected_input_ids`` (each completion closed by EOS), and ``index``, the row's position in the file, which keys
precomputed reference log-probs.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import datasets

FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field."""


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def read_pairs(path: str | Path) -> list[dict[str, str]]:
    """Read and check a JSONL (optionally gzipped) or JSON-list file of string pairs; raise DataError on a bad row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with _open_text(path) as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if path.name.endswith(".json"):
        rows = json.loads(text)
        numbered = list(enumerate(rows, start=1))
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: row {number}: malformed JSON ({e.msg})") from None
    pairs = []
    for number, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
        for name in FIELDS:
            if name not in row:
                raise DataError(f"{path}: row {number}: missing field `{name}`")
            if not isinstance(row[name], str):
                raise DataError(f"{path}: row {number}: field `{name}` must be a string, got {type(row[name]).__name__}")
        for name in ("chosen", "rejected"):
            if not row[name].strip():
                raise DataError(f"{path}: row {number}: field `{name}` is empty")
        if row["chosen"] == row["rejected"]:
            raise DataError(f"{path}: row {number}: `chosen` and `rejected` are identical")
        pairs.append({name: row[name] for name in FIELDS})
    if not pairs:
        raise DataError(f"{path}: no rows")
    return pairs


def _tokenize_row(row: dict[str, Any], index: int, tokenizer, max_length: int | None,
                  max_prompt_length: int | None) -> dict[str, Any]:
    prompt = tokenizer(row["prompt"])["input_ids"]
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]  # keep the end of the prompt, nearest the answer
    out: dict[str, Any] = {"index": index, "prompt_input_ids": prompt}
    room = None if max_length is None else max_length - len(prompt)
    for name in ("chosen", "rejected"):
        ids = tokenizer(row[name], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out[f"{name}_input_ids"] = ids if room is None else ids[:room]
    return out


def tokenize_pairs(pairs: list[dict[str, str]], tokenizer, max_length: int | None,
                   max_prompt_length: int | None) -> datasets.Dataset:
    """Tokenize pairs into a ``datasets.Dataset`` (the map result is cached by its fingerprint)."""
    raw = datasets.Dataset.from_list(pairs)
    return raw.map(
        _tokenize_row,
        with_indices=True,
        fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, max_prompt_length=max_prompt_length),
        remove_columns=list(FIELDS),
        desc="tokenizing",
    )


def load_tokenized(path: str | Path, tokenizer, max_length: int | None, max_prompt_length: int | None):
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; completions must be closed by one")
    return tokenize_pairs(read_pairs(path), tokenizer, max_length, max_prompt_length).with_format("python")
