"""Preference data for a run: read every source, check every row, tokenize (cached), mix, split, report.

    train, evals, report = load_preference_data(cfg.data, tokenizer, cfg.seed)   # evals: eval sets by name

Every row problem is found here, before any model is built: with ``on_bad_rows: error`` the run stops listing the
first offenders (file, row, field, reason) and the total; with ``skip`` they are dropped and counted. A source streams
through: its rows are read and checked one at a time and their canonical pairs written to an Arrow file (named by a
hash of their content), so no Python list of the dataset exists. Tokenization runs through ``datasets.map`` into a
cache file named by that hash, the tokenizer (chat template included) and the length settings, so a second run with
the same inputs tokenizes nothing. The returned datasets
hold ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``, ``weight`` (the row's, 1 by default),
``group`` (pairs made of one ranked row share it: they are held out together and batched together), ``index`` (the
pair's position, which keys precomputed reference log-probs) and, for a vision-language model,
``images`` (each pair's encoded images, empty for a text pair; pixels are made per micro-batch, ``ds_dpo.data.images``).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.arrow_writer import ArrowWriter
from datasets.fingerprint import Hasher

from ds_dpo.config import DataConfig, SourceSpec, eval_sets, source_specs
from ds_dpo.data.formats import RowError, detect, has_images, normalize, pair_weight, response_pairs
from ds_dpo.data.sources import DataError, RowProblem, read_source, split_names
from ds_dpo.data.tokenization import encode_pair
from ds_dpo.distributed import say

ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
CACHE_VERSION = "3"  # bump when tokenization rules change, so that old cache files are not reused
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
    prompt_not_prefix: int = 0
    """Conversational pairs whose rendered prompt is not a prefix of the rendered conversations."""
    prompt_tokens_left_out: int = 0
    """Their prompt tokens past the point where prompt and conversation diverge, in all."""
    pairs: int = 0
    lengths: dict[str, dict[str, int]] = field(default_factory=dict)
    cache_hit: bool = False


@dataclass
class DataReport:
    sources: list[SourceReport] = field(default_factory=list)
    train_pairs: int = 0
    eval_pairs: int = 0
    """In all eval sets."""
    eval_sets: dict[str, int] = field(default_factory=dict)
    """Pairs per named eval set (``eval_dataset: {name: source}``)."""

    def format(self) -> str:
        lines = ["data report:"]
        for s in self.sources:
            lines.append(
                f"  {s.source} [{s.format}]: {s.rows_read} rows read, {s.pairs} pairs kept"
                f"{' (tokenization cache hit)' if s.cache_hit else ''}"
            )
            for title, counts in (("bad rows skipped", s.bad_rows), ("pairs dropped", s.dropped)):
                for reason, n in sorted(counts.items()):
                    lines.append(f"    {title}: {n} x {reason}")
            if s.unpaired_rows:
                lines.append(
                    f"    rows without a pair: {s.unpaired_rows} (fewer than two responses, or all ranked alike)"
                )
            if s.prompt_truncated or s.completion_truncated:
                lines.append(
                    f"    truncated: {s.prompt_truncated} prompts, {s.completion_truncated} pairs' completions"
                )
            if s.prompt_not_prefix:
                lines.append(
                    f"    prompt not a prefix of its conversation: {s.prompt_not_prefix} pairs (the chat template renders"
                    " the prompt alone differently, e.g. an empty <think></think> block before a reply); as in TRL,"
                    f" the completions start where they diverge, leaving {s.prompt_tokens_left_out} rendered prompt"
                    " tokens out in all"
                )
            for part, q in s.lengths.items():
                lines.append(f"    {part} tokens: " + ", ".join(f"{k} {v}" for k, v in q.items()))
        per_set = ", ".join(f"{name}: {n}" for name, n in self.eval_sets.items())
        lines.append(
            f"  train pairs: {self.train_pairs}, eval pairs: {self.eval_pairs}" + (f" ({per_set})" if per_set else "")
        )
        return "\n".join(lines)


def cache_root(configured: str | os.PathLike | None) -> Path:
    """Where tokenized datasets and precomputed reference log-probs are cached (``dataset_cache_dir``)."""
    root = Path(configured or Path(datasets.config.HF_DATASETS_CACHE) / "ds_dpo")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if not len(values):
        return {}
    ordered = np.sort(values)
    at = lambda q: int(ordered[min(len(ordered) - 1, int(q * len(ordered)))])  # noqa: E731
    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": int(ordered[-1])}


def _bad_rows_error(problems: list[RowProblem]) -> DataError:
    listed = "\n  ".join(str(p) for p in problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return DataError(
        f"{len(problems)} bad row(s) in the data:\n  {listed}{more}\n"
        "Fix them, or set `on_bad_rows: skip` to train on the rest (counts go to the data report)."
    )


def _rename(data: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    return {keys.get(k, k): v for k, v in data.items()} if keys else data


def _cache_key(content: str, tokenizer, cfg: DataConfig, encoder_decoder: bool, processor) -> str:
    """The tokenization cache key: the canonical pairs' ``content`` hash and everything that turns them into ids."""
    vision = None if processor is None else (processor.chat_template, processor.to_json_string())
    limits = (cfg.max_length, cfg.max_prompt_length, cfg.max_completion_length, cfg.truncation_mode)
    return Hasher.hash(
        (CACHE_VERSION, content, Hasher.hash(tokenizer), tokenizer.chat_template, limits, encoder_decoder, vision)
    )


def prepare_source(
    source: SourceSpec, tokenizer, cfg: DataConfig, split: str, encoder_decoder: bool = False, processor=None
) -> tuple[datasets.Dataset, SourceReport]:
    """Read, check, normalise and tokenize one source as ``cfg`` says (its own split where it names one, else
    ``split``; for an encoder-decoder model with ``encoder_decoder``, for a vision-language model with its
    ``processor``); returns its trainable pairs (``group``: the row they were made of) and its report."""
    spec, split, config_name = source.path, source.split or split, source.config or cfg.dataset_config
    delimiter, keys, templating = cfg.implicit_prompt_delimiter, cfg.column_names, cfg.chat_template_kwargs
    report, problems = SourceReport(spec), []
    fmt, vision, image_token = cfg.dataset_format, None, None

    def canonical_pairs() -> Iterator[dict[str, Any]]:
        """Every checked row's canonical pairs, one row at a time, with the row's weight and number (``group``)."""
        nonlocal fmt, vision, image_token
        for row in read_source(spec, split, config_name):
            report.rows_read += 1
            if isinstance(row, RowProblem):
                problems.append(row)
                continue
            data = row.data
            if not isinstance(data, dict):
                problems.append(RowProblem(spec, row.number, "", f"expected a JSON object, got {type(data).__name__}"))
                continue
            data = _rename(data, keys)
            if fmt == "auto":
                fmt = detect(data)
            if vision is None:
                vision = has_images(data)
                if vision and processor is None:
                    raise DataError(
                        f"{spec}: rows have images, but the model is not a vision-language model (it has "
                        "no image processor)"
                    )
                image_token = processor.image_token if vision else None
            try:
                weight = pair_weight(data)
                pairs = (
                    response_pairs(data, cfg.response_pairing, delimiter, templating, image_token)
                    if fmt == "ranked"
                    else [normalize(data, fmt, delimiter, templating, image_token)]
                )
            except RowError as e:
                problems.append(RowProblem(spec, row.number, e.field, e.reason))
                continue
            report.unpaired_rows += not pairs
            for pair in pairs:
                yield {**pair, "weight": weight, "group": row.number}

    table, content = _write_arrow(canonical_pairs(), cache_root(cfg.dataset_cache_dir))
    report.format = fmt
    if not report.rows_read:
        raise DataError(f"{spec}: no rows")
    problems.sort(key=lambda p: p.number)
    if problems and cfg.on_bad_rows == "error":
        raise _bad_rows_error(problems)
    report.bad_rows = dict(Counter(p.reason for p in problems))
    if table is None:
        raise DataError(f"{spec}: no usable rows ({len(problems)} bad)")

    key = _cache_key(content, tokenizer, cfg, encoder_decoder, processor)
    cache_file = cache_root(cfg.dataset_cache_dir) / f"tokenized-{key}.arrow"
    record = cache_file.with_suffix(".json")  # each file's size and checksum, written with the cache
    report.cache_hit = cache_file.exists()
    if report.cache_hit and (problem := _cache_problem(cache_file, record)):
        # cut short by a full disk or a killed process, or damaged by a copy: datasets would read it as it is
        say(f"notice: tokenization cache {cache_file} is damaged ({problem}); tokenizing again")
        for damaged in _cache_files(cache_file):
            damaged.unlink()
        report.cache_hit = False
    tokenized = table.map(
        encode_pair,
        fn_kwargs={"tokenizer": tokenizer, "limits": cfg, "encoder_decoder": encoder_decoder, "processor": processor},
        remove_columns=[c for c in table.column_names if c not in ("images", "weight", "group")],
        cache_file_name=str(cache_file),
        new_fingerprint=key,
        num_proc=cfg.dataset_num_proc if (cfg.dataset_num_proc or 0) > 1 and not report.cache_hit else None,
        desc=f"tokenizing {Path(spec).name}",
    )
    if not report.cache_hit:
        _write_record(cache_file, record)
    kept = _tally(tokenized, report)
    if not len(kept):
        raise DataError(f"{spec}: every pair was dropped ({report.dropped})")
    pairs = tokenized.select_columns([*ID_COLUMNS, "weight", "group"] + (["images"] if vision else []))
    if processor is not None and not vision:  # a text source in a vision-language run: pairs without images
        pairs = pairs.add_column("images", [[]] * len(pairs), feature=datasets.Sequence(datasets.Value("binary")))
    return (pairs if len(kept) == len(tokenized) else pairs.select(kept)), report


def _cache_files(cache_file: Path) -> list[Path]:
    """The Arrow files of a tokenization cache entry (several when it was written by several processes)."""
    return sorted(cache_file.parent.glob(f"{cache_file.stem}*.arrow"))


def _write_record(cache_file: Path, record: Path) -> None:
    files = {f.name: {"size": f.stat().st_size, "sha256": _file_digest(f)} for f in _cache_files(cache_file)}
    tmp = record.with_name(f"{record.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(files))
    os.replace(tmp, record)


def _cache_problem(cache_file: Path, record: Path) -> str | None:
    """What is wrong with a tokenization cache entry against its record (None: it is as written)."""
    try:
        expected = json.loads(record.read_text())
    except (OSError, ValueError):
        return "no record of what was written"
    found = {f.name: f for f in _cache_files(cache_file)}
    if set(found) != set(expected):
        return f"files {sorted(found)}, {sorted(expected)} when it was written"
    for name, want in expected.items():
        size = found[name].stat().st_size
        if size != want["size"]:
            return f"{name} has {size} bytes, {want['size']} when it was written"
        if _file_digest(found[name]) != want["sha256"]:
            return f"{name} differs from what was written (checksum)"
    return None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _tally(tokenized: datasets.Dataset, report: SourceReport) -> np.ndarray:
    """The indices of the pairs tokenization kept; drops, truncations and lengths counted into ``report`` from the
    Arrow columns."""
    stats = tokenized.with_format("arrow")
    kept = pc.equal(stats["drop"], "")
    dropped = pc.value_counts(pc.filter(stats["drop"], pc.invert(kept))).to_pylist()
    report.dropped = {d["values"]: d["counts"] for d in dropped}
    report.prompt_truncated = int(pc.sum(stats["prompt_truncated"]).as_py() or 0)
    report.completion_truncated = int(pc.sum(stats["completion_truncated"]).as_py() or 0)
    report.prompt_not_prefix = int(pc.sum(pc.greater(stats["prompt_not_prefix"], 0)).as_py() or 0)
    report.prompt_tokens_left_out = int(pc.sum(stats["prompt_not_prefix"]).as_py() or 0)
    report.lengths = {
        part: _percentiles(pc.filter(stats[f"{part}_length"], kept).to_numpy())
        for part in ("prompt", "chosen", "rejected")
    }
    indices = np.flatnonzero(kept.to_numpy(zero_copy_only=False))
    report.pairs = len(indices)
    return indices


def _write_arrow(examples: Iterator[dict[str, Any]], directory: Path) -> tuple[datasets.Dataset | None, str]:
    """``examples`` streamed into an Arrow file under ``directory`` (named by a hash of their content, which is also
    returned) and memory-mapped: a source's pairs are never a Python list. None when there are none."""
    digest, writer = hashlib.sha256(), None
    partial = directory / f"canonical-{os.getpid()}-{uuid.uuid4().hex}.arrow.partial"
    try:
        for example in examples:
            if writer is None:
                writer = ArrowWriter(path=str(partial), features=_features(example))
            writer.write(example)
            digest.update(json.dumps(example, sort_keys=True, default=_bytes_digest).encode())
        if writer is None:
            return None, ""
        writer.finalize()
        writer.close()
        final = directory / f"canonical-{digest.hexdigest()[:32]}.arrow"
        os.replace(partial, final)  # atomic: ranks writing the same content at once each leave a whole file
        return datasets.Dataset.from_file(str(final)), digest.hexdigest()
    finally:
        partial.unlink(missing_ok=True)


def _features(example: dict[str, Any]) -> datasets.Features:
    """The Arrow schema of a source's canonical pairs, from its first: a value that is empty there (no images, an
    image part's text) must still take what later rows carry, bytes and strings."""

    def typed(t: pa.DataType) -> pa.DataType:
        if pa.types.is_null(t):
            return pa.string()
        if pa.types.is_list(t):
            return pa.list_(typed(t.value_type))
        if pa.types.is_struct(t):
            return pa.struct([pa.field(f.name, typed(f.type)) for f in t])
        return t

    schema = pa.Table.from_pylist([example]).schema
    schema = pa.schema(
        [pa.field(f.name, pa.list_(pa.binary()) if f.name == "images" else typed(f.type)) for f in schema]
    )
    return datasets.Features.from_arrow_schema(schema)


def _bytes_digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


def _load_all(
    specs: list[SourceSpec],
    probs: list[float] | None,
    cfg: DataConfig,
    seed: int,
    tokenizer,
    report: DataReport,
    split: str,
    encoder_decoder: bool,
    processor,
) -> datasets.Dataset:
    """Every source of ``specs`` (each of its own split and configuration, else ``split`` and the run's), mixed."""
    parts = []
    for spec in specs:
        part, source_report = prepare_source(spec, tokenizer, cfg, split, encoder_decoder, processor)
        if parts:  # groups are row numbers within a source: keep sources' groups apart
            offset = int(parts[-1].with_format("numpy")["group"][:].max()) + 1
            part = part.remove_columns("group").add_column("group", part.with_format("numpy")["group"][:] + offset)
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


def _test_splits(cfg: DataConfig) -> list[SourceSpec]:
    """TRL's scripts' eval set when none is given: the ``dataset_test_split`` of each training source that has it
    (and does not train on it)."""
    split, found = cfg.dataset_test_split, []
    for spec in source_specs(cfg.dataset):
        if (spec.split or cfg.dataset_train_split) == split:
            continue
        try:
            splits = split_names(spec.path, spec.config or cfg.dataset_config)
        except Exception as e:  # the Hub client raises many types; the training split was read, so train without
            say(f"notice: cannot list the splits of {spec.path} ({type(e).__name__}: {e}); no test split evaluated")
            continue
        if split in splits:
            found.append(SourceSpec(spec.path, split, spec.config))
    if found:
        say(
            f"notice: no `eval_dataset` or `eval_split_ratio`: evaluating the `{split}` split "
            f"(`dataset_test_split`) of {', '.join(s.path for s in found)}"
        )
    return found


def load_preference_data(
    cfg: DataConfig, tokenizer, seed: int, encoder_decoder: bool = False, processor=None
) -> tuple[datasets.Dataset, dict[str, datasets.Dataset], DataReport]:
    """The run's training pairs, its eval sets by name (``""``: the one unnamed set; empty: nothing to evaluate),
    each with an ``index`` column, and the data report; ``encoder_decoder``: tokenized for an encoder-decoder model;
    ``processor``: a vision-language model's (``ds_dpo.data.tokenization``)."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; completions must be closed by one")
    report = DataReport()
    load = lambda specs, probs, split: _load_all(  # noqa: E731
        specs, probs, cfg, seed, tokenizer, report, split, encoder_decoder, processor
    )
    train = load(source_specs(cfg.dataset), cfg.dataset_probs, cfg.dataset_train_split)
    if cfg.max_samples is not None:
        train = train.select(range(min(cfg.max_samples, len(train))))
    sets = eval_sets(cfg.eval_dataset)
    if not sets and not cfg.eval_split_ratio and (tests := _test_splits(cfg)):
        sets = {"": tests}
    evals = {name: load(specs, None, cfg.dataset_test_split) for name, specs in sets.items()}
    if cfg.eval_split_ratio > 0:
        train, evals[""] = _split_groups(train, cfg.eval_split_ratio, seed)
    train = train.add_column("index", np.arange(len(train)))
    evals = {name: pairs.add_column("index", np.arange(len(pairs))) for name, pairs in evals.items()}
    report.train_pairs, report.eval_pairs = len(train), sum(len(pairs) for pairs in evals.values())
    report.eval_sets = {name: len(pairs) for name, pairs in evals.items() if name}
    return train, evals, report


def token_lengths(pairs: datasets.Dataset) -> dict[str, np.ndarray]:
    """Each pair's prompt, chosen and rejected token counts, read from Arrow a batch at a time (the ids never become
    Python lists)."""
    parts = ("prompt", "chosen", "rejected")
    batches = [
        [pc.list_value_length(batch[f"{part}_input_ids"]).to_numpy() for part in parts]
        for batch in pairs.with_format("arrow").iter(batch_size=65536)
    ]
    return {part: np.concatenate([b[k] for b in batches]) for k, part in enumerate(parts)}


def load_tokenized(spec: str | os.PathLike, tokenizer, **data_keys: Any) -> datasets.Dataset:
    """One source's pairs, tokenized with ``data_keys`` (the data section's keys; unset: their defaults) and an
    ``index`` column (for tools and tests)."""
    cfg = DataConfig(**data_keys)
    pairs, _ = prepare_source(SourceSpec(str(spec)), tokenizer, cfg, cfg.dataset_train_split)
    return pairs.add_column("index", np.arange(len(pairs)))
