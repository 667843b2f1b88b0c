"""DeepSpeed checkpoints during training and the final Hugging Face export.

``Checkpointer`` owns when to save, where (``output_dir/checkpoints/step-N``) and which old checkpoints to delete.
``export_hf_model`` gathers the ZeRO shards into a plain ``save_pretrained`` directory that loads with
transformers alone (and, with LoRA, a peft adapter plus optionally the merged model).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch

from ds_dpo import engines

TAG_PREFIX = "step-"


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, engine, output_dir: str | Path, save_steps: int, save_total_limit: int | None):
        self.engine = engine
        self.root = Path(output_dir) / "checkpoints"
        self.save_steps, self.save_total_limit = save_steps, save_total_limit

    def due(self, step: int) -> bool:
        return self.save_steps > 0 and step % self.save_steps == 0

    def save(self, step: int, client_state: dict) -> None:
        """Collective: every rank writes its shards; rank 0 then prunes checkpoints beyond the limit."""
        self.engine.save_checkpoint(str(self.root), tag=f"{TAG_PREFIX}{step}", client_state=client_state)
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0 and self.save_total_limit:
            for old in self.tags()[: -self.save_total_limit]:
                shutil.rmtree(old)

    def find(self, spec: str) -> Path | None:
        """The checkpoint directory ``resume_from_checkpoint`` names: ``auto`` -> the newest, if any."""
        if spec != "auto":
            path = Path(spec)
            return self.tags()[-1] if path.resolve() == self.root.resolve() and self.tags() else path
        tags = self.tags()
        return tags[-1] if tags else None

    def load(self, path: Path) -> dict:
        """Collective: restore engine, optimizer and LR schedule from ``path``; returns the client state."""
        _, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if client_state is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {path}")
        return client_state

    def tags(self) -> list[Path]:
        """Saved checkpoint directories, oldest first."""
        found = [p for p in self.root.glob(f"{TAG_PREFIX}*") if p.name[len(TAG_PREFIX):].isdigit()]
        return sorted(found, key=lambda p: int(p.name[len(TAG_PREFIX):]))


def export_hf_model(engine, tokenizer, output_dir: str | Path, save_merged_model: bool = False) -> None:
    """Collective. Rank 0 writes config, safetensors weights and tokenizer to ``output_dir``.

    With LoRA the directory holds the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``), and with
    ``save_merged_model`` ``output_dir/merged`` holds the full model with the adapters merged in.
    """
    state_dict = engines.consolidated_state_dict(engine)
    if torch.distributed.get_rank() == 0:
        output_dir = Path(output_dir)
        model = engine.module
        model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
        if save_merged_model:
            _save_merged(model, state_dict, output_dir / "merged")
            tokenizer.save_pretrained(output_dir / "merged")
    torch.distributed.barrier()


def _save_merged(peft_model, state_dict: dict[str, torch.Tensor], out: Path) -> None:
    """Rebuild the peft model unpartitioned on CPU from the gathered weights, merge the adapters, save."""
    cpu_model = _cpu_model(peft_model.base_model.model.config, peft_model.peft_config["default"], state_dict)
    cpu_model.merge_and_unload().save_pretrained(out, safe_serialization=True)


def _cpu_model(config, lora_config, state_dict: dict[str, torch.Tensor]):
    """An ordinary (unpartitioned) model, peft-wrapped when ``lora_config`` is given, holding ``state_dict``."""
    from transformers import AutoModelForCausalLM

    with engines.zero3_disabled():
        model = AutoModelForCausalLM.from_config(config)
    if lora_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k.split(".")[-2:] != ["lm_head", "weight"] and k not in tied]:
        raise RuntimeError(f"checkpoint does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, merge: bool = False) -> None:
    """Turn a saved checkpoint (``OUTPUT_DIR/checkpoints/step-N``, any ZeRO stage, LoRA or full) into a Hugging Face
    directory on CPU, without starting torch.distributed: the model (or peft adapter, plus ``merged/`` with
    ``merge``) and the tokenizer, using the run's ``config.yaml`` two levels up."""
    import yaml
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoTokenizer

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    run = yaml.safe_load((checkpoint.parent.parent / "config.yaml").read_text())
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    lora = None
    if run["use_peft"]:
        from peft import LoraConfig

        lora = LoraConfig(r=run["lora_r"], lora_alpha=run["lora_alpha"], lora_dropout=run["lora_dropout"],
                          target_modules=run["lora_target_modules"], task_type="CAUSAL_LM")
    model = _cpu_model(AutoConfig.from_pretrained(run["model_name_or_path"]), lora, state_dict)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(run["model_name_or_path"])
    tokenizer.save_pretrained(output_dir)
    if merge and lora is not None:
        model.merge_and_unload().save_pretrained(output_dir / "merged", safe_serialization=True)
        tokenizer.save_pretrained(output_dir / "merged")
