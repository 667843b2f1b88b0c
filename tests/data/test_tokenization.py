import copy
import json
from pathlib import Path

import datasets
import pytest
import trl

from ds_dpo.config import DataConfig
from ds_dpo.data import builtin
from ds_dpo.data.formats import RowError, normalize
from ds_dpo.data.pipeline import DataReport, SourceReport, _tally
from ds_dpo.data.tokenization import encode_pair
from helpers.data import CHATML
from helpers.trl_oracle import build_trainer, trl_token_ids

NO_LIMITS = DataConfig(max_length=None, max_prompt_length=None, max_completion_length=None)


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["hello there, how are you today?", "I am fine thanks", "go away", "<|im_start|>user\nhi<|im_end|>\n"] * 50
    tok = builtin.train_bpe_tokenizer(texts, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_text_pair_one_bos_and_eos_closing_each_completion(tokenizer):
    pair = normalize({"prompt": "hello there,", "chosen": " I am fine", "rejected": " go away"}, "explicit", "")
    out = encode_pair(pair, tokenizer, NO_LIMITS)
    assert out["prompt_input_ids"][0] == tokenizer.bos_token_id and out["prompt_input_ids"][1] != tokenizer.bos_token_id
    assert tokenizer.decode(out["prompt_input_ids"], skip_special_tokens=True) == "hello there,"
    for side, text in (("chosen", " I am fine"), ("rejected", " go away")):
        ids = out[f"{side}_input_ids"]
        assert ids[-1] == tokenizer.eos_token_id and tokenizer.decode(ids[:-1]) == text
    again = encode_pair({**pair, "prompt": "<s>hello there,"}, tokenizer, NO_LIMITS)  # BOS already in the text
    assert again["prompt_input_ids"] == out["prompt_input_ids"]


def test_chat_template_completion_is_exactly_the_reply_plus_end_of_turn(tokenizer):
    prompt = [{"role": "user", "content": "how are you today?"}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "I am fine thanks"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    out = encode_pair(normalize(row, "conversational", ""), tokenizer, NO_LIMITS)
    rendered_prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert out["prompt_input_ids"] == tokenizer(rendered_prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(out["chosen_input_ids"]) == "I am fine thanks<|im_end|>\n"
    assert tokenizer.decode(out["rejected_input_ids"]) == "go away<|im_end|>\n"


# Qwen3-like: with enable_thinking false every assistant turn, the generation prompt's too, opens with empty thoughts
NO_THOUGHTS = "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}"
TOOLS_AND_THINKING = (
    "{% if tools %}<|im_start|>system\ntools: {% for t in tools %}{{ t['name'] }} {% endfor %}"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}" + NO_THOUGHTS + "{% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n" + NO_THOUGHTS + "{% endif %}"
)


def test_tools_and_template_variables_reach_the_chat_template(tokenizer, monkeypatch):
    """TRL 1.16's per-row ``tools`` and ``chat_template_kwargs`` (Qwen3's ``enable_thinking``), the run-wide
    ``chat_template_kwargs`` under the row's; bad values are bad rows naming the field."""
    monkeypatch.setattr(tokenizer, "chat_template", TOOLS_AND_THINKING)
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }

    def prompt_text(row, run_wide=None):
        pair = normalize(row, "conversational", "", run_wide)
        return tokenizer.decode(encode_pair(pair, tokenizer, NO_LIMITS)["prompt_input_ids"])

    assert "tools" not in prompt_text(row) and "<think>" not in prompt_text(row)
    tools = [{"name": "get_weather", "parameters": {"type": "object"}}]
    assert prompt_text({**row, "tools": tools}).startswith("<|im_start|>system\ntools: get_weather")
    assert prompt_text({**row, "tools": json.dumps(tools)}) == prompt_text({**row, "tools": tools})
    assert prompt_text(row, {"enable_thinking": False}).endswith("assistant\n<think></think>")
    assert "<think>" not in prompt_text(
        {**row, "chat_template_kwargs": {"enable_thinking": True}}, {"enable_thinking": False}
    )
    for field, value in (("tools", [1]), ("tools", "{bad"), ("chat_template_kwargs", ["x"])):
        with pytest.raises(RowError) as bad:
            normalize({**row, field: value}, "conversational", "")
        assert bad.value.field == field


def test_template_that_renders_the_prompt_differently_keeps_one_shared_prompt():
    """A template whose generation prompt differs from how it renders a finished turn (as thinking templates do):
    the prompt is the part shared by all renderings, identical for chosen and rejected."""
    odd = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\nthink\n{% endif %}")
    tok = builtin.train_bpe_tokenizer(["hello there think", "go away"] * 20, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = odd
    row = {
        "prompt": [{"role": "user", "content": "hello"}],
        "chosen": [{"role": "assistant", "content": "there"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    }
    out = encode_pair(normalize(row, "conversational", ""), tok, NO_LIMITS)
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert tok.decode(out["prompt_input_ids"] + out["chosen_input_ids"]) == full
    assert tok.decode(out["prompt_input_ids"]).endswith("assistant\n")


QWEN3_TEMPLATE = Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"  # Qwen3's own, as TRL ships it


def _turn(role, content):
    return [{"role": role, "content": content}]


def test_thinking_template_rows_tokenize_as_trl(tokenizer, builtin_files, tmp_path):
    """Qwen3's chat template: ``enable_thinking`` on and off (run-wide and per row), replies with and without a
    ``<think>`` block, an earlier turn's thoughts dropped from the history, multi-turn. Token ids = TRL 1.16's for
    the same rows; a prompt that is not a prefix of its conversation is counted and its completions start where they
    diverge."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.chat_template = QWEN3_TEMPLATE.read_text()
    ask, ask_again = _turn("user", "how are you today?"), _turn("user", "and now?")
    thought = _turn("assistant", "<think>\nhello there\n</think>\n\nI am fine thanks")
    plain, rude = _turn("assistant", "I am fine thanks"), _turn("assistant", "go away")
    # every row names it: a table takes its columns from the first row
    on, off = ({"chat_template_kwargs": {"enable_thinking": flag}} for flag in (True, False))
    rows = [
        {"prompt": ask, "chosen": plain, "rejected": rude, **on},  # thinking on: the reply opens with empty thoughts
        {"prompt": ask, "chosen": plain, "rejected": rude, **off},  # off: the prompt ends with them
        {"prompt": ask, "chosen": thought, "rejected": rude, **on},  # one reply thinks, the other does not
        {"prompt": ask, "chosen": thought, "rejected": rude, **off},  # off, but the reply thinks: not a prefix
        {"prompt": ask + thought + ask_again, "chosen": plain, "rejected": thought, **on},  # history's thoughts dropped
        {"prompt": ask + plain + ask_again, "chosen": rude, "rejected": plain, **off},
    ]
    trainer = build_trainer(builtin_files["model_name_or_path"], str(tmp_path / "trl"))
    expected = trl_token_ids(trainer, rows, tok)
    ours = [encode_pair(normalize(row, "conversational", ""), tok, NO_LIMITS) for row in rows]
    for i, (got, want) in enumerate(zip(ours, expected)):
        assert {side: got[f"{side}_input_ids"] for side in want} == want, i
    text = [tok.decode(out["prompt_input_ids"] + out["chosen_input_ids"]) for out in ours]
    assert text[0].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nI am fine thanks<|im_end|>\n")
    assert tok.decode(ours[1]["prompt_input_ids"]).endswith("assistant\n<think>\n\n</think>\n\n")
    assert "hello there" not in tok.decode(ours[4]["prompt_input_ids"])  # earlier thoughts are not history
    assert [out["prompt_not_prefix"] > 0 for out in ours] == [False, False, False, True, False, False]
    assert tok.decode(ours[3]["prompt_input_ids"]).endswith("assistant\n<think>\n")

    report = SourceReport("rows")
    _tally(datasets.Dataset.from_list(ours), report)
    assert (report.prompt_not_prefix, report.prompt_tokens_left_out) == (1, ours[3]["prompt_not_prefix"])
    assert "prompt not a prefix of its conversation: 1 pairs" in DataReport([report]).format()


def test_implicit_without_turns_splits_at_the_common_token_prefix(tokenizer):
    pair = normalize({"chosen": "hello there, how are you", "rejected": "hello there, go away"}, "implicit", "")
    out = encode_pair(pair, tokenizer, NO_LIMITS)
    assert tokenizer.decode(out["prompt_input_ids"], skip_special_tokens=True) == "hello there,"
    assert tokenizer.decode(out["chosen_input_ids"][:-1]) == " how are you"


def test_truncation_and_drops(tokenizer):
    raw = {"prompt_input_ids": list(range(10, 20)), "chosen_input_ids": [1, 2, 3, 4], "rejected_input_ids": [5, 6]}
    pair = normalize(raw, "tokenized", "")
    end = encode_pair(pair, tokenizer, DataConfig(max_length=12, max_prompt_length=8, max_completion_length=None))
    assert end["prompt_input_ids"] == list(range(12, 20)) and end["prompt_truncated"]
    assert end["chosen_input_ids"] == [1, 2, 3, 4] and not end["completion_truncated"] and end["drop"] == ""
    start = encode_pair(
        pair,
        tokenizer,
        DataConfig(max_length=10, max_prompt_length=8, max_completion_length=None, truncation_mode="keep_start"),
    )
    assert start["prompt_input_ids"] == list(range(10, 18)) and start["chosen_input_ids"] == [1, 2]
    assert start["completion_truncated"]
    short = encode_pair(pair, tokenizer, DataConfig(max_length=None, max_prompt_length=None, max_completion_length=1))
    assert short["chosen_input_ids"] == [1] and short["rejected_input_ids"] == [5] and short["drop"] == ""
    same = normalize({**raw, "rejected_input_ids": [1, 9]}, "tokenized", "")
    assert (
        encode_pair(same, tokenizer, DataConfig(max_length=None, max_prompt_length=None, max_completion_length=1))[
            "drop"
        ]
        == "chosen and rejected identical once truncated"
    )
    assert encode_pair(pair, tokenizer, DataConfig(max_length=10, max_prompt_length=10, max_completion_length=None))[
        "drop"
    ].startswith("prompt leaves no room")


def test_max_length_alone_cuts_the_prompt_only_when_it_must(tokenizer):
    """TRL's setting, no `max_prompt_length`: completions are cut to what the prompt leaves; only a prompt that alone
    fills `max_length` is cut, to half of it, keeping the end (`keep_end`) or the start (`keep_start`)."""
    raw = {"prompt_input_ids": list(range(10, 20)), "chosen_input_ids": [1, 2, 3, 4], "rejected_input_ids": [5, 6]}
    pair = normalize(raw, "tokenized", "")
    fits = encode_pair(pair, tokenizer, DataConfig(max_length=14, max_prompt_length=None, max_completion_length=None))
    assert fits["prompt_input_ids"] == list(range(10, 20)) and fits["chosen_input_ids"] == [1, 2, 3, 4]
    assert not fits["prompt_truncated"] and not fits["completion_truncated"]
    tight = encode_pair(pair, tokenizer, DataConfig(max_length=12, max_prompt_length=None, max_completion_length=None))
    assert tight["prompt_input_ids"] == list(range(10, 20)) and tight["chosen_input_ids"] == [1, 2]
    assert not tight["prompt_truncated"] and tight["completion_truncated"] and tight["drop"] == ""
    end = encode_pair(pair, tokenizer, DataConfig(max_length=10, max_prompt_length=None, max_completion_length=None))
    assert end["prompt_input_ids"] == list(range(15, 20)) and end["prompt_truncated"]
    assert end["chosen_input_ids"] == [1, 2, 3, 4] and end["rejected_input_ids"] == [5, 6] and end["drop"] == ""
    start = encode_pair(
        pair,
        tokenizer,
        DataConfig(max_length=8, max_prompt_length=None, max_completion_length=None, truncation_mode="keep_start"),
    )
    assert start["prompt_input_ids"] == list(range(10, 14)) and start["chosen_input_ids"] == [1, 2, 3, 4]


def test_encoder_decoder_prompt_to_the_encoder_and_completions_as_targets(tokenizer):
    """Encoder-decoder: the prompt with the tokenizer's special tokens, each completion tokenized as a target and
    closed by EOS (a reply's text where the row is a conversation: the template renders only the prompt); the prompt
    and each completion are limited separately."""
    pair = normalize({"prompt": "hello there,", "chosen": " I am fine", "rejected": " go away"}, "explicit", "")
    out = encode_pair(pair, tokenizer, NO_LIMITS, encoder_decoder=True)
    assert out["prompt_input_ids"] == tokenizer("hello there,")["input_ids"]
    for side, text in (("chosen", " I am fine"), ("rejected", " go away")):
        assert out[f"{side}_input_ids"] == tokenizer(text_target=text)["input_ids"] + [tokenizer.eos_token_id]
    chat = normalize(
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "I am fine"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        },
        "conversational",
        "",
    )
    out = encode_pair(chat, tokenizer, NO_LIMITS, encoder_decoder=True)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert out["prompt_input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert out["chosen_input_ids"] == tokenizer(text_target="I am fine")["input_ids"] + [tokenizer.eos_token_id]
    raw = normalize(
        {"prompt_input_ids": list(range(10, 20)), "chosen_input_ids": [1, 2, 3, 4], "rejected_input_ids": [5, 6]},
        "tokenized",
        "",
    )
    cut = encode_pair(
        raw,
        tokenizer,
        DataConfig(max_length=3, max_prompt_length=None, max_completion_length=None),
        encoder_decoder=True,
    )  # each part to max_length
    assert cut["prompt_input_ids"] == [17, 18, 19] and cut["chosen_input_ids"] == [1, 2, 3]
    assert cut["prompt_truncated"] and cut["completion_truncated"] and cut["drop"] == ""
    own = encode_pair(
        raw,
        tokenizer,
        DataConfig(max_length=6, max_prompt_length=4, max_completion_length=2, truncation_mode="keep_start"),
        encoder_decoder=True,
    )
    assert own["prompt_input_ids"] == [10, 11, 12, 13] and own["chosen_input_ids"] == [1, 2]
