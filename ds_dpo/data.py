"""Preference data for a run: read every source, check every row, tokenize (cached), mix, split, report.

    train, eval, report = load_preference_data(cfg.data, tokenizer, cfg.seed)

Every row problem is found here, before any model is built: with ``on_bad_rows: error`` the run stops listing the
first offenders (file, row, field, reason) and the total; with ``skip`` they are dropped and counted. Tokenization runs
through ``datasets.map`` into a cache file named by a fingerprint of the checked rows, the tokenizer (chat template
included) and the length settings, so a second run with the same inputs tokenizes nothing. The returned datasets
hold ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``, ``weight`` (the row's, 1 by default),
``group`` (pairs made of one ranked row share it: they are held out together and batched together), ``index`` (the
pair's position, which keys precomputed reference log-probs) and, for a vision-language model,
``images`` (each pair's encoded images, empty for a text pair; pixels are made per micro-batch, ``ds_dpo.vision``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets.fingerprint import Hasher

from ds_dpo.config import DataConfig
from ds_dpo.formats import RowError, detect, has_images, normalize, pair_weight, response_pairs
from ds_dpo.sources import DataError, RowProblem, SourceSpec, read_source, source_specs
from ds_dpo.tokenization import LengthLimits, encode_pair

ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
CACHE_VERSION = "2"  # bump when tokenization rules change, so that old cache files are not reused
MAX_LISTED = 10

__all__ = ["DataError", "DataReport", "load_preference_data", "load_tokenized", "prepare_source"]


@dataclass
class SourceReport:
    source: str
    format: str = ""
    rows_read: int = 0
    bad_rows: dict[str, int] = field(default_factory=dict)
    unpaired_rows: int = 0
    """Ranked rows whose responses rank nothing apart (fewer than two, or all alike)."""
    dropped: dict[str, int] = field(default_factory=dict)
    prompt_truncated: int = 0
    completion_truncated: int = 0
    pairs: int = 0
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)
    cache_hit: bool = False


@dataclass
class DataReport:
    sources: list[SourceReport] = field(default_factory=list)
    train_pairs: int = 0
    eval_pairs: int = 0

    def format(self) -> str:
        lines = ["data report:"]
        for s in self.sources:
            lines.append(f"  {s.source} [{s.format}]: {s.rows_read} rows read, {s.pairs} pairs kept"
                         f"{' (tokenization cache hit)' if s.cache_hit else ''}")
            for title, counts in (("bad rows skipped", s.bad_rows), ("pairs dropped", s.dropped)):
                for reason, n in sorted(counts.items()):
                    lines.append(f"    {title}: {n} x {reason}")
            if s.unpaired_rows:
                lines.append(f"    rows without a pair: {s.unpaired_rows} (fewer than two responses, or all ranked alike)")
            if s.prompt_truncated or s.completion_truncated:
                lines.append(f"    truncated: {s.prompt_truncated} prompts, {s.completion_truncated} pairs' completions")
            for part, q in s.lengths.items():
                lines.append(f"    {part} tokens: " + ", ".join(f"{k} {v}" for k, v in q.items()))
        lines.append(f"  train pairs: {self.train_pairs}, eval pairs: {self.eval_pairs}")
        return "\n".join(lines)


def cache_root(configured: str | os.PathLike | None) -> Path:
    """Where tokenized datasets and precomputed reference log-probs are cached (``dataset_cache_dir``)."""
    root = Path(configured or Path(datasets.config.HF_DATASETS_CACHE) / "ds_dpo")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _percentiles(values: list[int]) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)
    at = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": ordered[-1]}


def _bad_rows_error(problems: list[RowProblem]) -> DataError:
    listed = "\n  ".join(str(p) for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return DataError(f"{len(problems)} bad row(s) in the data:\n  {listed}{more}\n"
                     "Fix them, or set `on_bad_rows: skip` to train on the rest (counts go to the data report).")


def _rename(data: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    return {keys.get(k, k): v for k, v in data.items()} if keys else data


def _cache_key(canonical: datasets.Dataset, tokenizer, limits: LengthLimits, encoder_decoder: bool,
               processor) -> str:
    vision = None if processor is None else (processor.chat_template, processor.to_json_string())
    return Hasher.hash((CACHE_VERSION, canonical._fingerprint, Hasher.hash(tokenizer), tokenizer.chat_template,
                        limits, encoder_decoder, vision))


def prepare_source(spec: str, tokenizer, limits: LengthLimits, *, dataset_format: str = "auto",
                   delimiter: str = "\n\nAssistant:", keys: dict[str, str] | None = None,
                   on_bad_rows: str = "error", cache_dir: str | os.PathLike | None = None,
                   num_proc: int | None = None, split: str = "train", config_name: str | None = None,
                   chat_template_kwargs: dict[str, Any] | None = None, response_pairing: str = "best_vs_worst",
                   encoder_decoder: bool = False, processor=None) -> tuple[datasets.Dataset, SourceReport]:
    """Read, check, normalise and tokenize one source (its ``split`` where it has several; for an encoder-decoder
    model with ``encoder_decoder``, for a vision-language model with its ``processor``); returns its trainable
    pairs (``group``: the row they were made of) and its report."""
    report = SourceReport(spec)
    rows, problems = read_source(spec, split, config_name)
    report.rows_read = len(rows) + len(problems)
    if not rows and not problems:
        raise DataError(f"{spec}: no rows")
    fmt = dataset_format
    vision, image_token = None, None
    canonical, weights, groups = [], [], []
    for row in rows:
        data = row.data
        if not isinstance(data, dict):
            problems.append(RowProblem(spec, row.number, "", f"expected a JSON object, got {type(data).__name__}"))
            continue
        data = _rename(data, keys or {})
        if fmt == "auto":
            fmt = detect(data)
        if vision is None:
            vision = has_images(data)
            if vision and processor is None:
                raise DataError(f"{spec}: rows have images, but the model is not a vision-language model (it has no "
                                "image processor)")
            image_token = processor.image_token if vision else None
        try:
            weight = pair_weight(data)
            pairs = (response_pairs(data, response_pairing, delimiter, chat_template_kwargs, image_token)
                     if fmt == "ranked" else [normalize(data, fmt, delimiter, chat_template_kwargs, image_token)])
        except RowError as e:
            problems.append(RowProblem(spec, row.number, e.field, e.reason))
            continue
        report.unpaired_rows += not pairs
        canonical += pairs
        weights += [weight] * len(pairs)
        groups += [row.number] * len(pairs)
    report.format = fmt
    problems.sort(key=lambda p: p.number)
    if problems and on_bad_rows == "error":
        raise _bad_rows_error(problems)
    report.bad_rows = dict(Counter(p.reason for p in problems))
    if not canonical:
        raise DataError(f"{spec}: no usable rows ({len(problems)} bad)")

    table = datasets.Dataset.from_list(canonical)
    key = _cache_key(table, tokenizer, limits, encoder_decoder, processor)
    cache_file = cache_root(cache_dir) / f"tokenized-{key}.arrow"
    report.cache_hit = cache_file.exists()
    tokenized = table.map(encode_pair, fn_kwargs={"tokenizer": tokenizer, "limits": limits,
                                                  "encoder_decoder": encoder_decoder, "processor": processor},
                          remove_columns=[c for c in table.column_names if c != "images"],
                          cache_file_name=str(cache_file), new_fingerprint=key,
                          num_proc=num_proc if num_proc and num_proc > 1 and not report.cache_hit else None,
                          desc=f"tokenizing {Path(spec).name}")
    stats = tokenized.select_columns(["drop", "prompt_truncated", "completion_truncated", "prompt_length",
                                      "chosen_length", "rejected_length"]).to_dict()
    kept = [i for i, d in enumerate(stats["drop"]) if not d]
    report.dropped = dict(Counter(d for d in stats["drop"] if d))
    report.prompt_truncated = sum(stats["prompt_truncated"])
    report.completion_truncated = sum(stats["completion_truncated"])
    report.pairs = len(kept)
    report.lengths = {part: _percentiles([stats[f"{part}_length"][i] for i in kept])
                      for part in ("prompt", "chosen", "rejected")}
    if not kept:
        raise DataError(f"{spec}: every pair was dropped ({report.dropped})")
    pairs = tokenized.select_columns(list(ID_COLUMNS) + (["images"] if vision else []))
    pairs = pairs.add_column("weight", weights).add_column("group", groups)
    if processor is not None and not vision:  # a text source in a vision-language run: pairs without images
        pairs = pairs.add_column("images", [[]] * len(pairs), feature=datasets.Sequence(datasets.Value("binary")))
    return (pairs if len(kept) == len(tokenized) else pairs.select(kept)), report


def _load_all(specs: list[SourceSpec], probs: list[float] | None, cfg: DataConfig, seed: int, tokenizer,
              report: DataReport, split: str, encoder_decoder: bool, processor) -> datasets.Dataset:
    """Every source of ``specs`` (each of its own split and configuration, else ``split`` and the run's), mixed."""
    parts = []
    for spec in specs:
        part, source_report = prepare_source(
            spec.path, tokenizer, cfg.length_limits, dataset_format=cfg.dataset_format,
            delimiter=cfg.implicit_prompt_delimiter, keys=cfg.column_names, on_bad_rows=cfg.on_bad_rows,
            cache_dir=cfg.dataset_cache_dir, num_proc=cfg.dataset_num_proc, split=spec.split or split,
            config_name=spec.config or cfg.dataset_config, chat_template_kwargs=cfg.chat_template_kwargs,
            response_pairing=cfg.response_pairing, encoder_decoder=encoder_decoder, processor=processor)
        if parts:  # groups are row numbers within a source: keep sources' groups apart
            offset = max(parts[-1]["group"]) + 1
            part = part.remove_columns("group").add_column("group", [g + offset for g in part["group"]])
        parts.append(part)
        report.sources.append(source_report)
    if len(parts) == 1:
        return parts[0]
    if probs:
        # OpenRLHF's blending: sample sources by probability until every one is used up (smaller ones repeat)
        return datasets.interleave_datasets(parts, probabilities=probs, seed=seed, stopping_strategy="all_exhausted")
    return datasets.concatenate_datasets(parts)


def _split_groups(pairs: datasets.Dataset, test_size: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A seeded train/test split of ``pairs`` by ``group``: a ranked row's pairs all go to one side (with one pair
    per group it is ``datasets``' own ``train_test_split`` of the pairs)."""
    members: dict[int, list[int]] = {}
    for i, group in enumerate(pairs["group"]):
        members.setdefault(group, []).append(i)
    split = datasets.Dataset.from_dict({"group": list(members)}).train_test_split(test_size=test_size, seed=seed)
    return tuple(pairs.select([i for g in split[side]["group"] for i in members[g]]) for side in ("train", "test"))


def load_preference_data(cfg: DataConfig, tokenizer, seed: int, encoder_decoder: bool = False, processor=None
                         ) -> tuple[datasets.Dataset, datasets.Dataset | None, DataReport]:
    """The run's training and eval pairs (each with an ``index`` column) and the data report; ``encoder_decoder``:
    tokenized for an encoder-decoder model; ``processor``: a vision-language model's (``ds_dpo.tokenization``)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; completions must be closed by one")
    report = DataReport()
    train = _load_all(source_specs(cfg.dataset), cfg.dataset_probs, cfg, seed, tokenizer, report, cfg.dataset_train_split,
                      encoder_decoder, processor)
    if cfg.max_samples is not None:
        train = train.select(range(min(cfg.max_samples, len(train))))
    evals = None
    if cfg.eval_dataset:
        evals = _load_all(source_specs(cfg.eval_dataset), None, cfg, seed, tokenizer, report, cfg.dataset_test_split,
                          encoder_decoder, processor)
    elif cfg.eval_split_ratio > 0:
        train, evals = _split_groups(train, cfg.eval_split_ratio, seed)
    train = train.add_column("index", list(range(len(train))))
    if evals is not None:
        evals = evals.add_column("index", list(range(len(evals))))
    report.train_pairs, report.eval_pairs = len(train), 0 if evals is None else len(evals)
    return train, evals, report


def load_tokenized(spec: str, tokenizer, max_length: int | None = None, max_prompt_length: int | None = None,
                   **options) -> datasets.Dataset:
    """One source's pairs, tokenized with default settings and an ``index`` column (for tools and tests)."""
    limits = LengthLimits(max_length, max_prompt_length, options.pop("max_completion_length", None))
    pairs, _ = prepare_source(str(spec), tokenizer, limits, **options)
    return pairs.add_column("index", list(range(len(pairs))))
