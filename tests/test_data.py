import gzip
import json

import pytest

from ds_dpo import builtin
from ds_dpo.collate import collate_pairs
from ds_dpo.data import DataError, load_tokenized, read_pairs


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"prompt": "count up from 3 :", "chosen": " 4 5", "rejected": " 2 1"}


@pytest.mark.parametrize("bad, message", [
    ("{not json", r"row 2: malformed JSON"),
    ({"prompt": "p", "chosen": "a"}, r"row 2: missing field `rejected`"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, r"row 2: field `chosen` must be a string, got int"),
    ({"prompt": "p", "chosen": "  ", "rejected": "b"}, r"row 2: field `chosen` is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, r"row 2: `chosen` and `rejected` are identical"),
    ([1, 2], r"row 2: expected a JSON object"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, bad])
    with pytest.raises(DataError, match=f"pairs.jsonl: {message}"):
        read_pairs(path)


def test_missing_empty_and_non_utf8(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_pairs(tmp_path / "absent.jsonl")
    with pytest.raises(DataError, match="no rows"):
        read_pairs(write_jsonl(tmp_path / "empty.jsonl", []))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_pairs(tmp_path / "latin1.jsonl")


def test_gzip_and_json_list(tmp_path):
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write(json.dumps(GOOD) + "\n")
    (tmp_path / "p.json").write_text(json.dumps([GOOD, GOOD]))
    assert read_pairs(tmp_path / "p.jsonl.gz") == [GOOD]
    assert len(read_pairs(tmp_path / "p.json")) == 2


def test_tokenization_and_truncation(tmp_path):
    tok = builtin.build_tokenizer()
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {"prompt": "count up from 1 2 3 4 5 6 :", "chosen": " 1 2 3 4 5",
                                                     "rejected": " 9"}])
    ds = load_tokenized(path, tok, max_length=8, max_prompt_length=4)
    assert ds[0]["prompt_input_ids"] == tok.convert_tokens_to_ids(["up", "from", "3", ":"])  # kept from the left
    long = ds[1]
    assert len(long["prompt_input_ids"]) == 4 and long["prompt_input_ids"][-1] == tok.convert_tokens_to_ids(":")
    assert len(long["prompt_input_ids"]) + len(long["chosen_input_ids"]) == 8  # completion cut to fit max_length
    assert long["rejected_input_ids"] == tok.convert_tokens_to_ids(["9"]) + [tok.eos_token_id]
    assert ds[0]["chosen_input_ids"][-1] == tok.eos_token_id and ds[0]["index"] == 0 and ds[1]["index"] == 1


def test_untruncated_prompt_has_one_bos(tmp_path):
    tok = builtin.build_tokenizer()
    ds = load_tokenized(write_jsonl(tmp_path / "p.jsonl", [GOOD]), tok, max_length=None, max_prompt_length=None)
    assert ds[0]["prompt_input_ids"] == tok.convert_tokens_to_ids(["<s>", "count", "up", "from", "3", ":"])
    assert ds[0]["chosen_input_ids"] == tok.convert_tokens_to_ids(["4", "5", "</s>"])


def test_collate_layout():
    rows = [{"index": 7, "prompt_input_ids": [1, 2], "chosen_input_ids": [3], "rejected_input_ids": [4, 5, 6]},
            {"index": 9, "prompt_input_ids": [1], "chosen_input_ids": [3, 3], "rejected_input_ids": [4]}]
    b = collate_pairs(rows, [1.0, 0.0], pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0, 0], [1, 3, 3, 0, 0], [1, 2, 4, 5, 6], [1, 4, 0, 0, 0]]
    assert b["completion_mask"].int().tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert b["attention_mask"].sum(-1).tolist() == [3, 3, 5, 2]
    assert b["index"].tolist() == [7, 9] and b["weight"].tolist() == [1.0, 0.0]
