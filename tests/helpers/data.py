"""Data fixtures: a dataset folder in the Hub's layout and a ChatML chat template."""

import datasets

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML chat template (Qwen's, SmolLM2's)."""


def hub_layout(root, splits: dict[str, list[dict]]):
    """A dataset folder as ``huggingface-cli download`` leaves it: ``data/<split>-00000-of-00001.parquet``."""
    (root / "data").mkdir(parents=True)
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root
