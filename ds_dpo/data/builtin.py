"""The built-in default run: a tiny Llama-style model, a word-level tokenizer and a synthetic preference task.

Nothing is downloaded: the tokenizer, a random-init model and the data are generated deterministically into
``output_dir/builtin/`` and then loaded through exactly the same paths as a user's model and dataset.

The task: a prompt asks to count up or down from a number; the preferred completion counts correctly, the rejected
one counts the wrong way, skips, or wanders at random. A small model learns the rule in a few hundred steps, and
held-out reward accuracy (chance 0.5) shows whether DPO learned it. The run's settings for it are
``ds_dpo.config.BUILTIN_DEFAULTS``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
from pathlib import Path

MAX_NUMBER = 60
COUNT = 5
NUM_TRAIN_PAIRS = 4000
NUM_EVAL_PAIRS = 256
SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>", "unk": "<unk>"}
WORDS = ["count", "up", "down", "from", ":"] + [str(n) for n in range(MAX_NUMBER + 1)]

MODEL_CONFIG = dict(
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def make_pair(rng: random.Random) -> dict[str, str]:
    direction = rng.choice(["up", "down"])
    step = 1 if direction == "up" else -1
    start = rng.randint(COUNT, MAX_NUMBER - COUNT)
    right = [start + step * (i + 1) for i in range(COUNT)]
    kind = rng.choice(["reverse", "skip", "random"])
    if kind == "reverse":
        wrong = [start - step * (i + 1) for i in range(COUNT)]
    elif kind == "skip":
        wrong = [start + step * 2 * (i + 1) for i in range(COUNT)]
        wrong = [min(max(n, 0), MAX_NUMBER) for n in wrong]
    else:
        wrong = [rng.randint(0, MAX_NUMBER) for _ in range(COUNT)]
    if wrong == right:
        return make_pair(rng)
    return {
        "prompt": f"count {direction} from {start} :",
        "chosen": " " + " ".join(map(str, right)),
        "rejected": " " + " ".join(map(str, wrong)),
    }


def write_pairs(path: Path, n: int, seed: int) -> None:
    rng = random.Random(seed)
    tmp = _private_tmp(path)
    with tmp.open("w") as f:
        for _ in range(n):
            f.write(json.dumps(make_pair(rng)) + "\n")
    tmp.replace(path)


def _private_tmp(path: Path) -> Path:
    # Nodes that share a filesystem each generate the same files: write privately, then rename into place.
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def build_tokenizer():
    """A whitespace word-level fast tokenizer over the task's vocabulary, adding BOS like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS.values()) + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bos = SPECIAL_TOKENS["bos"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


def materialize(root: Path, seed: int) -> dict[str, str]:
    """Write tokenizer + random-init model + train/eval pairs under ``root`` (idempotent); return config values.

    Called by every process before torch.distributed starts (transformers' ``save_pretrained`` writes only on global
    rank 0 once it has started, and a second node may not share rank 0's filesystem). A file lock makes the other
    local processes wait for the first; private temporary names keep nodes on a shared filesystem apart.
    """
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    model_dir, train, evals = root / "model", root / "train.jsonl", root / "eval.jsonl"
    with FileLock(str(root / ".lock")):
        if not (model_dir / "config.json").is_file():
            _write_model(model_dir, seed)
        if not evals.is_file():
            write_pairs(train, NUM_TRAIN_PAIRS, seed)
            write_pairs(evals, NUM_EVAL_PAIRS, seed + 1)
    return {"model_name_or_path": str(model_dir), "dataset": str(train), "eval_dataset": str(evals)}


def _write_model(model_dir: Path, seed: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_CONFIG,
    )
    from ds_dpo.distributed import zero3_disabled

    torch.manual_seed(seed)
    tmp = _private_tmp(model_dir)
    with zero3_disabled():  # a whole model to save, even if a ZeRO-3 run is alive in this process
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(model_dir)
    except OSError:  # another node got there first with the same files
        shutil.rmtree(tmp)


def train_bpe_tokenizer(texts, vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on ``texts`` (for real-text tests and benchmarks without downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values())
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    bos = SPECIAL_TOKENS["bos"]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, core.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
    )
