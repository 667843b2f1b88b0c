"""Reading preference data from wherever it lives, keeping each row's provenance for error messages.

A source is a local ``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet`` or ``.csv`` file, a directory written by
``datasets.Dataset.save_to_disk``, a directory in the Hub's layout (``data/<split>-*.parquet``, as ``huggingface-cli
download`` leaves a dataset), or a Hugging Face Hub dataset name. The last three can hold several splits (and a Hub
dataset several configurations): ``read_source`` reads the one asked for. It yields ``Row`` records whose ``number``
is what a user finds in their file (the 1-based line for JSONL, the 1-based record otherwise), one at a time: JSONL
is read line by line and the other sources are Arrow tables that ``datasets`` memory-maps, so reading a source does
not hold it in memory (a ``.json`` list is the exception: it is parsed whole).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_dpo.config import FILE_SUFFIXES, looks_local


class DataError(ValueError):
    """Bad input data; the message names the file, the row and the field."""


@dataclass(frozen=True)
class RowProblem:
    source: str
    number: int
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}: row {self.number}"
        return f"{where}: field `{self.field}`: {self.reason}" if self.field else f"{where}: {self.reason}"


@dataclass(frozen=True)
class Row:
    number: int
    data: dict[str, Any]


def read_source(spec: str, split: str, config_name: str | None = None) -> Iterator[Row | RowProblem]:
    """Every row of a source (of its ``split`` and configuration ``config_name`` where it has several), in order; a
    row that cannot even be parsed (malformed JSON, non-UTF-8 bytes) comes as a ``RowProblem``. Where the source is
    missing or unreadable as a whole, ``DataError`` is raised before the first row."""
    path = Path(spec).expanduser()
    if looks_local(spec):
        if not path.exists():
            raise DataError(f"{spec}: no such file or directory")
        if path.is_dir():
            if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
                return _numbered(_load_from_disk(path, split))
            if not any(f.name.endswith(FILE_SUFFIXES + (".arrow",)) for f in path.rglob("*")):
                raise DataError(
                    f"{spec}: a directory without data: neither files written by datasets' save_to_disk "
                    "nor data files (the Hub's layout: data/<split>-*.parquet)"
                )
            return _numbered(_load_hub(spec, split, config_name))
        name = path.name
        if name.endswith((".jsonl", ".jsonl.gz")):
            return _read_jsonl(path, spec)
        if name.endswith((".json", ".json.gz")):
            return _read_json_list(path, spec)
        import datasets

        loader = datasets.Dataset.from_parquet if name.endswith(".parquet") else datasets.Dataset.from_csv
        return _numbered(loader(str(path)))
    return _numbered(_load_hub(spec, split, config_name))


def split_names(spec: str, config_name: str | None = None) -> list[str]:
    """The splits a source has: none for a file or a saved single dataset (which are read whatever split is asked);
    a ``save_to_disk`` dataset dict's, or those ``datasets`` finds in a Hub dataset or a Hub-layout directory (from
    its metadata or its data files' names, without reading the data)."""
    path = Path(spec).expanduser()
    if (path / "dataset_dict.json").is_file():
        return json.loads((path / "dataset_dict.json").read_text())["splits"]
    if looks_local(spec) and (not path.is_dir() or (path / "dataset_info.json").is_file()):
        return []
    import datasets

    return _with_config(datasets.get_dataset_split_names, spec, config_name)


def _with_config(load, name: str, config_name: str | None, **kwargs):
    """``load(name, config_name, **kwargs)`` of ``datasets``; a ``config_name`` the dataset does not declare is its
    subfolder (``data_dir``: HH-RLHF's ``harmless-base``)."""
    try:
        return load(name, config_name, **kwargs)
    except ValueError as e:
        if config_name is None or "BuilderConfig" not in str(e):
            raise
        return load(name, None, data_dir=config_name, **kwargs)


def _open(path: Path):
    return (gzip.open if path.name.endswith(".gz") else open)(path, "rb")


def _read_jsonl(path: Path, spec: str) -> Iterator[Row | RowProblem]:
    with _open(path) as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield RowProblem(spec, number, "", f"not UTF-8 text (byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield Row(number, json.loads(line))
            except json.JSONDecodeError as e:
                yield RowProblem(spec, number, "", f"malformed JSON ({e.msg}, column {e.colno})")


def _read_json_list(path: Path, spec: str) -> Iterator[Row]:
    try:
        with _open(path) as f:
            records = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{spec}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{spec}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    if isinstance(records, dict) and "data" in records:
        records = records["data"]
    if not isinstance(records, list):
        raise DataError(f"{spec}: expected a JSON list of rows (or use .jsonl, one row per line)")
    return (Row(i, r) for i, r in enumerate(records, start=1))


def _numbered(dataset) -> Iterator[Row]:
    """The rows of a memory-mapped ``datasets.Dataset``, decoded one at a time."""
    return (Row(i, r) for i, r in enumerate(dataset, start=1))


def _load_from_disk(path: Path, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{path}: no split `{split}` (splits: {', '.join(loaded)}); choose one with "
                "`dataset_train_split` / `dataset_test_split`"
            )
        loaded = loaded[split]
    return loaded


def _load_hub(name: str, split: str, config_name: str | None):
    """A Hub dataset, or a local directory in the Hub's layout, through ``datasets.load_dataset`` (``config_name``
    as ``_with_config`` takes it)."""
    import datasets

    try:
        return _with_config(datasets.load_dataset, name, config_name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():  # datasets: 'Unknown split "train". Should be one of [...]'
            raise DataError(
                f"{name}: no split `{split}` ({e}); choose one with `dataset_train_split` / `dataset_test_split`"
            ) from None
        if "config" in str(e).lower():  # several configurations and none (or an unknown one) named
            raise DataError(f"{name}: {e} (set `dataset_config`)") from None
        raise DataError(f"{name}: cannot be read as a dataset: {e}") from None
    except Exception as e:  # the Hub client raises many types; the user needs the name and the cause
        if Path(name).expanduser().is_dir():
            raise DataError(
                f"{name}: cannot be read as a dataset in the Hub's layout: {type(e).__name__}: {e}"
            ) from None
        offline = "offline" in str(e).lower() or "connect" in str(e).lower() or "resolve" in str(e).lower()
        hint = (
            " This machine seems to be offline: download the dataset elsewhere and pass its local files or "
            "a save_to_disk directory."
            if offline
            else ""
        )
        raise DataError(
            f"{name}: not a local file, and loading it from the Hugging Face Hub failed: {type(e).__name__}: {e}.{hint}"
        ) from None
