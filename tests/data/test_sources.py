import gzip
import json

import datasets
import pytest

from ds_dpo.config import looks_local
from ds_dpo.data.sources import DataError, RowProblem, read_source
from helpers.data import hub_layout

ROWS = [
    {"prompt": "count up from 3 :", "chosen": " 4 5", "rejected": " 2 1"},
    {"prompt": "count down from 9 :", "chosen": " 8 7", "rejected": " 10 11"},
]


def read(spec, split="train", config_name=None):
    """``read_source``'s rows and problems, apart (the split a run reads by default: ``train``)."""
    items = list(read_source(spec, split, config_name))
    return [i for i in items if not isinstance(i, RowProblem)], [i for i in items if isinstance(i, RowProblem)]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", "/"])
def test_every_local_source_reads_the_same_rows(tmp_path, suffix):
    path = tmp_path / f"pairs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".jsonl.gz":
        with gzip.open(path, "wt") as f:
            f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS))
    elif suffix == ".parquet":
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    elif suffix == ".csv":
        datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    rows, problems = read(str(path))
    assert problems == [] and [r.data for r in rows] == ROWS and [r.number for r in rows] == [1, 2]


def test_jsonl_problems_keep_line_numbers(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        json.dumps(ROWS[0]).encode()
        + b"\n\n{broken\n"
        + b'{"prompt": "caf\xe9"}\n'
        + json.dumps(ROWS[1]).encode()
        + b"\n"
    )
    rows, problems = read(str(path))
    assert [r.number for r in rows] == [1, 5]
    assert [(p.number, p.reason.split(" (")[0]) for p in problems] == [(3, "malformed JSON"), (4, "not UTF-8 text")]


def test_missing_paths_and_bad_directories(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        read(str(tmp_path / "absent.jsonl"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="a directory without data: neither files written by datasets' save_to_disk"):
        read(str(tmp_path / "plain"))


def test_splits_of_a_hub_layout_folder_and_a_saved_dataset_dict(tmp_path):
    folder = hub_layout(tmp_path / "ultrafeedback", {"train_prefs": ROWS, "test_prefs": ROWS[:1]})
    assert [r.data for r in read(str(folder), "train_prefs")[0]] == ROWS
    assert [r.data for r in read(str(folder), "test_prefs")[0]] == ROWS[:1]
    with pytest.raises(DataError, match="no split `train`.*dataset_train_split"):
        read(str(folder))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(saved))
    assert len(read(str(saved), "train_prefs")[0]) == 2
    with pytest.raises(DataError, match=r"no split `test` \(splits: train_prefs\)"):
        read(str(saved), "test")


def test_hub_name_offline_says_so(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: set the live flags
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert not looks_local("someone/some-preference-set")
    with pytest.raises(
        DataError,
        match="someone/some-preference-set: not a local file, and loading it from the Hugging Face Hub failed",
    ):
        read("someone/some-preference-set")


def test_a_subset_that_is_a_subfolder_as_hh_rlhf_has_them(tmp_path):
    """Anthropic/hh-rlhf keeps its subsets in folders (``harmless-base/train.jsonl.gz``), not as configurations:
    ``dataset_config`` names the folder."""
    for subset, rows in (("harmless-base", ROWS[:1]), ("helpful-base", ROWS)):
        (tmp_path / "hh" / subset).mkdir(parents=True)
        for split in ("train", "test"):
            datasets.Dataset.from_list(rows).to_json(str(tmp_path / "hh" / subset / f"{split}.jsonl"))
    assert [r.data for r in read(str(tmp_path / "hh"), "train", "harmless-base")[0]] == ROWS[:1]
    assert len(read(str(tmp_path / "hh"), "test", "helpful-base")[0]) == 2
    assert len(read(str(tmp_path / "hh"), "train")[0]) == 3  # no subset: all of them
