import torch
from transformers import AutoModelForCausalLM

from ds_dpo import builtin
from ds_dpo.collate import collate_pairs
from ds_dpo.data import load_tokenized
from ds_dpo.logprobs import concatenated_forward


def one_at_a_time(model, prompt, completion):
    """Reference computation: a single unpadded sequence, log_softmax + gather, summed over the completion."""
    ids = torch.tensor([prompt + completion])
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    token_logps = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return token_logps[len(prompt) - 1:].sum()


def test_concatenated_padded_forward_equals_one_sequence_at_a_time(builtin_files):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(builtin_files["model_name_or_path"]).eval()
    tok = builtin.build_tokenizer()
    data = load_tokenized(builtin_files["eval_dataset"], tok, max_length=None, max_prompt_length=None)
    rows = [data[i] for i in range(6)]
    rows[1] = {**rows[1], "chosen_input_ids": rows[1]["chosen_input_ids"][:2]}  # uneven lengths -> real padding
    rows[2] = {**rows[2], "prompt_input_ids": rows[2]["prompt_input_ids"][:2]}
    batch = collate_pairs(rows, [1.0] * 6, tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        out = concatenated_forward(model, batch)
        for i, row in enumerate(rows):
            for side, got in (("chosen", out.chosen[i]), ("rejected", out.rejected[i])):
                expected = one_at_a_time(model, row["prompt_input_ids"], row[f"{side}_input_ids"])
                torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert out.chosen_tokens.tolist() == [len(r["chosen_input_ids"]) for r in rows]
    assert out.rejected_tokens.tolist() == [len(r["rejected_input_ids"]) for r in rows]
