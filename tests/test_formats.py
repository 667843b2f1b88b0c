import pytest

from ds_dpo.formats import RowError, detect, normalize

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


@pytest.mark.parametrize("row, fmt, field, reason", [
    ({"prompt": "p", "chosen": "a"}, "explicit", "rejected", "missing"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "explicit", "chosen", "must be a string, got int"),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, "explicit", "chosen", "empty completion"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "explicit", "rejected", "identical to `chosen`"),
    ({"prompt": [{"role": "human", "content": "x"}], "chosen": [], "rejected": []}, "conversational",
     "prompt[0].role", "invalid role 'human'"),
    ({"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": 1}],
      "rejected": []}, "conversational", "chosen[0].content", "must be a string"),
    ({"prompt_input_ids": [1], "chosen_input_ids": [2, -1], "rejected_input_ids": [3]}, "tokenized",
     "chosen_input_ids", "non-negative token ids"),
])
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
