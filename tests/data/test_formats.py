import re

import pytest

from ds_dpo.data.formats import RowError, detect, normalize, response_pairs

D = "\n\nAssistant:"


def test_detect():
    assert detect({"prompt": "p", "chosen": "a", "rejected": "b"}) == "explicit"
    assert detect({"chosen": "a", "rejected": "b"}) == "implicit"
    assert detect({"chosen": [{"role": "user", "content": "x"}], "rejected": []}) == "conversational"
    assert detect({"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]}) == "tokenized"


def test_implicit_prompt_ends_at_the_last_shared_turn_boundary():
    chosen = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: Sure thing."
    rejected = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: Sure, no."
    pair = normalize({"chosen": chosen, "rejected": rejected}, "implicit", D)
    assert pair["prompt"] == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: and?\n\nAssistant:"
    assert (pair["chosen"], pair["rejected"]) == (" Sure thing.", " Sure, no.")  # "Sure" is not split off


def test_implicit_rows_that_differ_before_the_final_turn_are_bad():
    chosen = "\n\nHuman: hi\n\nAssistant: A\n\nHuman: more\n\nAssistant: B"
    rejected = "\n\nHuman: hi\n\nAssistant: C"
    with pytest.raises(RowError, match="differ before the final") as e:
        normalize({"chosen": chosen, "rejected": rejected}, "implicit", D)
    assert e.value.field == "chosen"


def test_implicit_without_turns_is_split_by_tokens_later():
    pair = normalize({"chosen": "the cat sat", "rejected": "the cat ran"}, "implicit", D)
    assert pair["split_by_tokens"] and pair["prompt"] == ""


@pytest.mark.parametrize(
    "row, fmt, field, reason",
    [
        ({"prompt": "p", "chosen": "a"}, "explicit", "rejected", "missing"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "explicit", "chosen", "must be a string, got int"),
        ({"prompt": "p", "chosen": " ", "rejected": "b"}, "explicit", "chosen", "empty completion"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "explicit", "rejected", "identical to `chosen`"),
        (
            {"prompt": [{"role": "human", "content": "x"}], "chosen": [], "rejected": []},
            "conversational",
            "prompt[0].role",
            "invalid role 'human'",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "x"}],
                "chosen": [{"role": "assistant", "content": 1}],
                "rejected": [],
            },
            "conversational",
            "chosen[0].content",
            "must be a string",
        ),
        (
            {"prompt_input_ids": [1], "chosen_input_ids": [2, -1], "rejected_input_ids": [3]},
            "tokenized",
            "chosen_input_ids",
            "non-negative token ids",
        ),
    ],
)
def test_row_errors_name_the_field(row, fmt, field, reason):
    with pytest.raises(RowError, match=reason) as e:
        normalize(row, fmt, D)
    assert e.value.field == field


def test_ultrafeedback_rows_a_string_prompt_beside_whole_conversations():
    """HuggingFaceH4/ultrafeedback_binarized: ``prompt`` is the user text, ``chosen``/``rejected`` repeat it as the
    first message. The conversations' shared messages are the prompt (TRL's maybe_extract_prompt); the string stands
    in as the user turn only where the conversations share none."""
    user = {"role": "user", "content": "hi"}
    chosen, rejected = {"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "go away"}
    row = {"prompt": "hi", "chosen": [user, chosen], "rejected": [user, rejected], "score_chosen": 8.0}
    assert detect(row) == "conversational"
    assert normalize(row, "conversational", D)["prompt"] == [user]
    replies_only = normalize({"prompt": "hi", "chosen": [chosen], "rejected": [rejected]}, "conversational", D)
    assert replies_only["prompt"] == [user] and replies_only["chosen"] == [chosen]


def test_whole_conversations_split_at_the_shared_messages():
    user = {"role": "user", "content": "hi"}
    chosen = [user, {"role": "assistant", "content": "hello"}]
    rejected = [user, {"role": "assistant", "content": "go away"}]
    pair = normalize({"chosen": chosen, "rejected": rejected}, "conversational", D)
    assert pair["prompt"] == [user] and pair["chosen"] == chosen[1:] and pair["rejected"] == rejected[1:]
    diverging = [user, {"role": "assistant", "content": "x"}, user, {"role": "assistant", "content": "y"}]
    with pytest.raises(RowError, match="differ before the final assistant turn"):
        normalize({"chosen": diverging, "rejected": rejected}, "conversational", D)


# --- K responses per prompt -------------------------------------------------------------------------------------------

RANKED = {"prompt": "count up from 3 :", "responses": [" 4 5", " 4 6", " 9", " 0"]}  # best first


def made(row, pairing):
    return [(p["chosen"], p["rejected"]) for p in response_pairs(row, pairing, D)]


def test_ranked_responses_become_pairs_by_the_rule():
    assert detect(RANKED) == "ranked" and detect({"prompt": "p", "completions": []}) == "ranked"
    a, b, c, d = RANKED["responses"]
    assert made(RANKED, "best_vs_worst") == [(a, d)]
    assert made(RANKED, "best_vs_rest") == [(a, b), (a, c), (a, d)]
    assert made(RANKED, "all_pairs") == [(a, b), (a, c), (a, d), (b, c), (b, d), (c, d)]
    pair = response_pairs(RANKED, "best_vs_worst", D)[0]
    assert pair == normalize({"prompt": RANKED["prompt"], "chosen": a, "rejected": d}, "explicit", D)


def test_scored_responses_rank_by_score_and_ties_make_no_pair():
    row = {"prompt": "p", "responses": ["w", "x", "y", "z"], "scores": [2, 7.5, 2, 1]}
    assert made(row, "best_vs_worst") == [("x", "z")]
    assert made(row, "best_vs_rest") == [("x", "w"), ("x", "y"), ("x", "z")]
    assert made(row, "all_pairs") == [("x", "w"), ("x", "y"), ("x", "z"), ("w", "z"), ("y", "z")]  # not w-y
    assert made({**row, "scores": [3, 3, 3, 3]}, "all_pairs") == []
    assert made({"prompt": "p", "responses": ["only one"]}, "best_vs_worst") == []
    assert made({"prompt": "p", "responses": ["same", "same", "other"]}, "all_pairs") == [("same", "other")] * 2


def test_ultrafeedback_completions_records_and_conversational_prompts():
    """openbmb/UltraFeedback's rows: an ``instruction`` (mapped to ``prompt``) and ``completions`` records with
    ``response`` and ``overall_score``; a message-list prompt takes string responses as assistant turns."""
    row = {
        "prompt": "count up from 3 :",
        "completions": [
            {"model": "m1", "response": " 4 5", "overall_score": 8.5, "fine-grained_score": 4.2},
            {"model": "m2", "response": " 2 1", "overall_score": 3.0},
            {"model": "m3", "response": " 4", "score": 6},
        ],
    }
    assert made(row, "best_vs_rest") == [(" 4 5", " 4"), (" 4 5", " 2 1")]
    user = [{"role": "user", "content": "count up from 3 :"}]
    pair = response_pairs({"prompt": user, "responses": [" 4", " 2"], "tools": [{"name": "add"}]}, "all_pairs", D)[0]
    assert pair["prompt"] == user and pair["chosen"] == [{"role": "assistant", "content": " 4"}]
    assert '"tools"' in pair["template_options"]  # the row's other fields ride with every pair


@pytest.mark.parametrize(
    "row, field, reason",
    [
        ({"prompt": "p", "responses": "a"}, "responses", "must be a list of responses"),
        ({"prompt": "p", "responses": ["a", "b"], "scores": [1]}, "scores", "one number per response (2)"),
        ({"prompt": "p", "responses": ["a", "b"], "scores": [1, "high"]}, "scores[1]", "must be a finite number"),
        ({"prompt": "p", "responses": ["a", " "]}, "responses[1]", "empty completion"),
        ({"prompt": "p", "responses": ["a", 3]}, "responses[1]", "must be a string, got int"),
        ({"responses": ["a", "b"]}, "prompt", "missing"),
        (
            {"prompt": "p", "completions": [{"response": "a", "overall_score": 1}, {"text": "b"}]},
            "completions[1]",
            "a record with a `response`",
        ),
        (
            {"prompt": "p", "completions": [{"response": "a", "overall_score": None}]},
            "completions[0].overall_score",
            "must be a finite number",
        ),
    ],
)
def test_bad_ranked_rows_name_the_response(row, field, reason):
    with pytest.raises(RowError, match=re.escape(reason)) as e:
        response_pairs(row, "all_pairs", D)
    assert e.value.field == field
