import gzip
import json
import re

import pytest

from ds_dpo.config import ConfigError, make_config
from ds_dpo.data import builtin
from ds_dpo.data import pipeline as data
from ds_dpo.data.pipeline import DataError, load_preference_data
from ds_dpo.forward.layouts import PADDED, SHARED, collate_pairs
from helpers.runs import REPO

GOOD = {"prompt": "count up from 3 :", "chosen": " 4 5", "rejected": " 2 1"}
USER = {"role": "user", "content": "count up from 3 :"}


def write(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows))
    return str(path)


def load(cfg, tokenizer):
    return load_preference_data(cfg.data, tokenizer, cfg.seed)


def config(tmp_path, **values):
    return make_config(
        {
            "model_name_or_path": "unused",
            "dataset": "unused",
            "max_length": 64,
            "max_prompt_length": 32,
            "dataset_cache_dir": str(tmp_path / "cache"),
            **values,
        }
    )


@pytest.mark.parametrize(
    "bad, where",
    [
        (b"{not json", "row 2: malformed JSON"),
        ({"prompt": "p", "chosen": "a"}, "row 2: field `rejected`: missing"),
        ({"prompt": "p", "chosen": ["a"], "rejected": "b"}, "row 2: field `chosen`: must be a string, got list"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "row 2: field `chosen`: empty completion"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "row 2: field `rejected`: identical to `chosen`"),
        ({**GOOD, "weight": -1}, r"row 2: field `weight`: must be a finite number >= 0, got -1"),
        ({**GOOD, "weight": "high"}, r"row 2: field `weight`: must be a finite number >= 0, got 'high'"),
        (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "row 2: not UTF-8 text"),
    ],
)
def test_each_defect_is_reported_with_file_row_and_field(tmp_path, bad, where):
    path = write(tmp_path / "pairs.jsonl", [GOOD, bad, GOOD])
    cfg = config(tmp_path, dataset=path)
    with pytest.raises(DataError, match=f"(?s)1 bad row.*pairs.jsonl: {where}.*on_bad_rows: skip"):
        load(cfg, builtin.build_tokenizer())
    train, _, report = load(config(tmp_path, dataset=path, on_bad_rows="skip"), builtin.build_tokenizer())
    assert len(train) == 2 and sum(report.sources[0].bad_rows.values()) == 1


def test_conversational_defects(tmp_path):
    rows = [
        {
            "prompt": [USER],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "2"}],
        },
        {"prompt": [{"role": "robot", "content": "x"}], "chosen": [], "rejected": []},
        {
            "chosen": [USER, {"role": "assistant", "content": "a"}, USER, {"role": "assistant", "content": "b"}],
            "rejected": [USER, {"role": "assistant", "content": "c"}],
        },
    ]
    with pytest.raises(
        DataError,
        match=r"(?s)2 bad row.*row 2: field `prompt\[0\].role`: invalid role 'robot'.*"
        r"row 3: field `chosen\[1\].role`: .*differ before the final assistant turn",
    ):
        load(config(tmp_path, dataset=write(tmp_path / "c.jsonl", rows)), builtin.build_tokenizer())


def test_empty_and_missing_datasets(tmp_path):
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        load(config(tmp_path, dataset=write(tmp_path / "empty.jsonl", [])), builtin.build_tokenizer())
    with pytest.raises(DataError, match="absent.jsonl: no such file"):
        load(config(tmp_path, dataset=str(tmp_path / "absent.jsonl")), builtin.build_tokenizer())


def test_error_lists_the_first_ten_and_the_total(tmp_path):
    path = write(tmp_path / "p.jsonl", [GOOD] + [{"prompt": "p"}] * 14)
    with pytest.raises(DataError) as e:
        load(config(tmp_path, dataset=path), builtin.build_tokenizer())
    assert str(e.value).startswith("14 bad row(s)") and "row 11:" in str(e.value) and "row 12:" not in str(e.value)
    assert "... and 4 more" in str(e.value)


def test_second_load_hits_the_tokenization_cache(tmp_path, monkeypatch):
    path = write(tmp_path / "p.jsonl", [GOOD, {"prompt": "count down from 9 :", "chosen": " 8", "rejected": " 1"}])
    calls = []
    real = data.encode_pair
    monkeypatch.setattr(data, "encode_pair", lambda *a, **k: calls.append(1) or real(*a, **k))
    first, _, r1 = load(config(tmp_path, dataset=path), builtin.build_tokenizer())
    assert len(calls) == 2 and not r1.sources[0].cache_hit
    second, _, r2 = load(config(tmp_path, dataset=path), builtin.build_tokenizer())
    assert len(calls) == 2 and r2.sources[0].cache_hit  # nothing was tokenized again
    assert second[:] == first[:]
    load(config(tmp_path, dataset=path, max_length=8, max_prompt_length=4), builtin.build_tokenizer())
    assert len(calls) == 4  # other lengths: a new cache entry
    cfg = config(tmp_path, dataset=path)
    _, _, r3 = load_preference_data(cfg.data, builtin.build_tokenizer(), cfg.seed, encoder_decoder=True)
    assert len(calls) == 6 and not r3.sources[0].cache_hit  # tokenized for an encoder-decoder: another entry


def test_a_damaged_tokenization_cache_is_said_and_rebuilt(tmp_path, capsys):
    """A cache file cut short (a full disk, a killed process) or garbled is not trusted: the source is tokenized
    again, with a notice, to the same pairs."""
    path = write(tmp_path / "p.jsonl", [GOOD, {"prompt": "count down from 9 :", "chosen": " 8", "rejected": " 1"}])
    first, _, _ = load(config(tmp_path, dataset=path), builtin.build_tokenizer())
    expected = first[:]  # read now: the dataset maps the cache file that is damaged below
    (cache,) = (tmp_path / "cache").glob("tokenized-*.arrow")
    for damage in (lambda b: b[: len(b) // 2], lambda b: b"garbage" * 10):
        cache.write_bytes(damage(cache.read_bytes()))
        again, _, report = load(config(tmp_path, dataset=path), builtin.build_tokenizer())
        assert f"tokenization cache {cache} is damaged" in capsys.readouterr().out
        assert not report.sources[0].cache_hit and again[:] == expected


def test_the_encoder_decoder_example_rows_load(tmp_path):
    cfg = config(tmp_path, dataset=str(REPO / "examples" / "seq2seq" / "pairs.jsonl"))
    train, _, report = load_preference_data(cfg.data, builtin.build_tokenizer(), cfg.seed, encoder_decoder=True)
    assert len(train) == 8 and report.sources[0].format == "explicit" and not report.sources[0].bad_rows


def test_mixing_splitting_sampling_and_column_mapping(tmp_path):
    a = write(
        tmp_path / "a.jsonl",
        [{"q": f"count up from {i} :", "good": f" {i + 1}", "bad": f" {i - 1}"} for i in range(10, 40)],
    )
    keys = dict(prompt_key="q", chosen_key="good", rejected_key="bad")
    with pytest.raises(DataError, match="field `chosen`: missing"):
        load(config(tmp_path, dataset=a), builtin.build_tokenizer())
    train, evals, report = load(config(tmp_path, dataset=a, eval_split_ratio=0.2, **keys), builtin.build_tokenizer())
    assert (len(train), len(evals[""])) == (24, 6) and train["index"] == list(range(24))
    capped, _, _ = load(config(tmp_path, dataset=a, max_samples=5, **keys), builtin.build_tokenizer())
    assert len(capped) == 5
    c = write(tmp_path / "c.jsonl", [{"q": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in [GOOD] * 6])
    mixed, _, report = load(
        config(tmp_path, dataset=[a, c], dataset_probs=[0.5, 0.5], **keys), builtin.build_tokenizer()
    )
    assert len(report.sources) == 2 and len(mixed) >= 30 + 6  # all_exhausted: every source fully used


def test_a_hub_layout_ultrafeedback_folder_trains_on_one_split_and_evaluates_on_another(tmp_path):
    """The shape and layout of HuggingFaceH4/ultrafeedback_binarized as downloaded: splits ``train_prefs`` and
    ``test_prefs`` only, a string prompt beside message-list completions."""
    from helpers.data import CHATML, hub_layout

    def rows(start, count):
        out = []
        for i in range(start, start + count):
            user = {"role": "user", "content": f"count up from {i} :"}
            out.append(
                {
                    "prompt": user["content"],
                    "prompt_id": str(i),
                    "score_chosen": 9.0,
                    "score_rejected": 2.0,
                    "chosen": [user, {"role": "assistant", "content": f" {i + 1}"}],
                    "rejected": [user, {"role": "assistant", "content": f" {i - 1}"}],
                }
            )
        return out

    folder = hub_layout(
        tmp_path / "ultrafeedback_binarized",
        {"train_prefs": rows(10, 12), "test_prefs": rows(50, 3), "train_gen": rows(70, 2)},
    )
    tokenizer = builtin.build_tokenizer()
    tokenizer.chat_template = CHATML
    with pytest.raises(DataError, match="no split `train`"):
        load(config(tmp_path, dataset=str(folder)), tokenizer)
    train, evals, report = load(
        config(
            tmp_path,
            dataset=str(folder),
            eval_dataset=str(folder),
            dataset_train_split="train_prefs",
            dataset_test_split="test_prefs",
        ),
        tokenizer,
    )
    assert (len(train), len(evals[""])) == (12, 3) and report.sources[0].format == "conversational"
    assert report.sources[0].bad_rows == {}


def test_each_source_of_a_mixture_reads_its_own_split(tmp_path):
    """``{path, split, config}`` entries: a Hub-layout folder's ``train_prefs`` mixed with a plain file (which has no
    splits), evaluated on the folder's ``test_prefs``; malformed entries are named before anything is read."""
    from helpers.data import hub_layout

    def rows(start, n):
        return [
            {"prompt": f"count up from {i} :", "chosen": f" {i + 1}", "rejected": f" {i - 1}"}
            for i in range(start, start + n)
        ]

    folder = hub_layout(tmp_path / "hub", {"train_prefs": rows(10, 5), "test_prefs": rows(50, 2)})
    extra = write(tmp_path / "extra.jsonl", rows(70, 3))
    cfg = config(
        tmp_path,
        dataset=[{"path": str(folder), "split": "train_prefs"}, extra],
        eval_dataset=[{"path": str(folder), "split": "test_prefs"}],
    )
    cfg.validate()
    train, evals, report = load(cfg, builtin.build_tokenizer())
    assert (len(train), len(evals[""])) == (5 + 3, 2) and len(report.sources) == 3
    for entry, problem in (
        ({"split": "train"}, "entry 1 must be a name or {path, split, config}"),
        ({"path": str(folder), "splits": "x"}, "entry 1 must be"),
        ({"path": str(tmp_path / "missing.jsonl")}, "does not exist"),
    ):
        with pytest.raises(ConfigError, match=re.escape(problem)):
            config(tmp_path, dataset=[entry]).validate()


def test_named_eval_sets_and_a_training_sources_test_split(tmp_path, capsys):
    """``eval_dataset: {name: source}`` loads each set, counted per set in the report. Without ``eval_dataset`` and
    ``eval_split_ratio``, the training source's ``dataset_test_split`` is evaluated, as TRL's scripts do, with a
    notice (a ``save_to_disk`` dataset dict and a Hub-layout folder; the split named by ``dataset_test_split``); a
    plain file, which has no splits, is evaluated on nothing, as before."""
    import datasets

    from helpers.data import hub_layout

    def rows(start, n):
        return [
            {"prompt": f"count up from {i} :", "chosen": f" {i + 1}", "rejected": f" {i - 1}"}
            for i in range(start, start + n)
        ]

    tokenizer = builtin.build_tokenizer()
    plain = write(tmp_path / "plain.jsonl", rows(10, 6))
    _, evals, report = load(config(tmp_path, dataset=plain, eval_dataset={"a": plain, "b": [plain, plain]}), tokenizer)
    assert {name: len(pairs) for name, pairs in evals.items()} == {"a": 6, "b": 12}
    assert report.eval_sets == {"a": 6, "b": 12} and report.eval_pairs == 18
    assert "eval pairs: 18 (a: 6, b: 12)" in report.format()
    _, evals, report = load(config(tmp_path, dataset=plain), tokenizer)
    assert evals == {} and report.eval_pairs == 0 and "notice" not in capsys.readouterr().out

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows(10, 6)), "test": datasets.Dataset.from_list(rows(50, 3))}
    ).save_to_disk(str(saved))
    train, evals, report = load(config(tmp_path, dataset=str(saved)), tokenizer)
    assert (len(train), len(evals[""]), report.eval_pairs) == (6, 3, 3)
    assert "notice: no `eval_dataset` or `eval_split_ratio`: evaluating the `test` split" in capsys.readouterr().out
    _, evals, _ = load(config(tmp_path, dataset=str(saved), eval_split_ratio=0.5), tokenizer)
    assert len(evals[""]) == 3  # the held-out half of the training split, not the test split

    folder = hub_layout(tmp_path / "hub", {"train_prefs": rows(10, 5), "test_prefs": rows(50, 2)})
    cfg = config(tmp_path, dataset=str(folder), dataset_train_split="train_prefs", dataset_test_split="test_prefs")
    _, evals, _ = load(cfg, tokenizer)
    assert len(evals[""]) == 2 and "`test_prefs` split" in capsys.readouterr().out


def test_hh_rlhf_implicit_prompts(tmp_path, hh_data):
    """The real HH-RLHF harmless-base test split: implicit prompts end at the last shared '\\n\\nAssistant:';
    5 rows whose dialogues differ before their final assistant turn and 4 with an empty chosen reply are bad rows."""
    rows = [json.loads(line) for line in gzip.open(hh_data, "rt")]
    tokenizer = builtin.train_bpe_tokenizer((r[k] for r in rows for k in ("chosen", "rejected")), 4096)
    cfg = config(tmp_path, dataset=str(hh_data), max_length=1024, max_prompt_length=512)
    with pytest.raises(
        DataError,
        match=r"(?s)9 bad row.*row 87: field `chosen`: empty completion.*row 1255: field "
        r"`chosen`: `chosen` and `rejected` differ before the final",
    ):
        load(cfg, tokenizer)
    train, _, report = load(
        config(tmp_path, dataset=str(hh_data), max_length=1024, max_prompt_length=512, on_bad_rows="skip"), tokenizer
    )
    source = report.sources[0]
    assert source.format == "implicit" and source.rows_read == 2312 and len(train) == 2303
    assert sorted(source.bad_rows.values()) == [4, 5]
    assert source.lengths["prompt"]["p50"] > source.lengths["chosen"]["p50"] > 0
    batch = collate_pairs([train[i] for i in range(4)], [1.0] * 4, tokenizer.pad_token_id, PADDED)
    for i in range(4):
        prompt = tokenizer.decode(train[i]["prompt_input_ids"], skip_special_tokens=True)
        assert prompt.endswith("\n\nAssistant:") and prompt.lstrip().startswith("Human:")
        assert train[i]["chosen_input_ids"][-1] == tokenizer.eos_token_id
    assert batch["input_ids"].shape[0] == 8
    print(report.format())


def test_a_weight_column_is_carried_per_pair_and_defaults_to_one(tmp_path):
    path = write(tmp_path / "pairs.jsonl", [{**GOOD, "weight": 2.5}, GOOD, {**GOOD, "weight": 0}])
    train, _, _ = load(config(tmp_path, dataset=path, eval_split_ratio=0.0), builtin.build_tokenizer())
    assert train["weight"] == [2.5, 1.0, 0.0]
    plain, _, _ = load(
        config(tmp_path, dataset=write(tmp_path / "plain.jsonl", [GOOD]), eval_split_ratio=0.0),
        builtin.build_tokenizer(),
    )
    assert plain["weight"] == [1.0]


def test_ranked_rows_make_pairs_that_stay_together(tmp_path):
    """K = 4 scored responses per prompt, all pairs: 6 pairs per row sharing a group, held out by prompt, and laid
    out in one prefix-shared row as the prompt once and each response once."""

    def row(i):
        return {
            "prompt": f"count up from {i} :",
            "responses": [f" {i + 1}", f" {i - 1}", f" {i + 1} {i + 2}", " 0"],
            "scores": [8, 2, 9, 1],
        }

    rows = [row(i) for i in range(10, 20)] + [{"prompt": "tie", "responses": [" a", " b"], "scores": [5, 5]}]
    path = write(tmp_path / "ranked.jsonl", rows)
    tokenizer = builtin.build_tokenizer()
    train, _, report = load(config(tmp_path, dataset=path, response_pairing="all_pairs"), tokenizer)
    assert report.sources[0].format == "ranked" and report.sources[0].unpaired_rows == 1
    assert "rows without a pair: 1" in report.format()
    assert len(train) == 60 and train["group"] == [g for g in range(1, 11) for _ in range(6)]
    one, _, _ = load(config(tmp_path, dataset=path), tokenizer)  # best_vs_worst by default
    assert len(one) == 10 and tokenizer.decode(one[0]["chosen_input_ids"]).startswith("11 12")

    train, evals, _ = load(
        config(tmp_path, dataset=path, response_pairing="all_pairs", eval_split_ratio=0.2), tokenizer
    )
    evals = evals[""]
    assert (len(train), len(evals)) == (48, 12)
    assert not set(train["group"]) & set(evals["group"])  # a prompt's pairs are all on one side
    group = [train[i] for i in range(6)]
    assert len({g["group"] for g in group}) == 1
    batch = collate_pairs(group, [1.0] * 6, tokenizer.pad_token_id, SHARED)
    prompt = group[0]["prompt_input_ids"]
    responses = {tuple(g[f"{side}_input_ids"]) for g in group for side in ("chosen", "rejected")}
    assert len(responses) == 4
    assert batch["input_ids"].shape[1] == len(prompt) + sum(map(len, responses))
    assert batch["sequence_tokens"].numel() == 4


def test_sources_keep_their_groups_apart_when_mixed(tmp_path):
    a = write(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "responses": [" x", " y", " z"]} for i in range(3)])
    b = write(tmp_path / "b.jsonl", [GOOD] * 4)
    train, _, _ = load(config(tmp_path, dataset=[a, b], response_pairing="best_vs_rest"), builtin.build_tokenizer())
    assert len(train) == 6 + 4 and len(set(train["group"])) == 3 + 4


def test_a_source_streams_through_arrow_and_its_python_memory_does_not_grow_with_it(tmp_path):
    """Rows are read one at a time and their pairs written to a memory-mapped Arrow file: the Python heap's peak while
    preparing 4000 rows is about that of 1000 (a list of rows or pairs would make it ~4x: seen 3.8 -> 12.8 MiB for
    2000 -> 8000 such rows before, 2.1 -> 1.9 MiB after); lengths come from Arrow too."""
    import tracemalloc

    from ds_dpo.config import DataConfig, SourceSpec
    from ds_dpo.data.pipeline import prepare_source, token_lengths

    tokenizer, peaks = builtin.build_tokenizer(), {}
    for n in (1000, 4000):
        path = write(
            tmp_path / f"rows{n}.jsonl",
            [{**GOOD, "prompt": f"count up from {i % 90} :", "note": "x" * 400} for i in range(n)],
        )
        tracemalloc.start()
        pairs, report = prepare_source(
            SourceSpec(str(path)),
            tokenizer,
            DataConfig(max_length=64, max_prompt_length=32, dataset_cache_dir=str(tmp_path / "cache")),
            "train",
        )
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(pairs) == report.pairs == n
    assert peaks[4000] < 1.5 * peaks[1000], peaks
    lengths = token_lengths(pairs)
    assert lengths["prompt"].tolist() == [len(ids) for ids in pairs["prompt_input_ids"]]
