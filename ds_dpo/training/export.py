"""The trained model as a Hugging Face directory: ``export_hf_model`` gathers a live engine's ZeRO shards into a
``save_pretrained`` directory that loads with transformers alone; ``export_checkpoint`` does the same offline, on CPU,
from any saved checkpoint (``launch/export.py``)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from ds_dpo.config import ModelConfig, make_config
from ds_dpo.distributed import any_rank, device, zero3_disabled
from ds_dpo.models import engines
from ds_dpo.models.support import auto_class, is_vision_language
from ds_dpo.training.checkpoint import CheckpointError


def export_hf_model(engine, processing_class, output_dir: str | Path, save_merged_model: bool = False) -> None:
    """Collective. Rank 0 writes config, safetensors weights and ``processing_class`` (the tokenizer, or a
    vision-language model's processor) to ``output_dir``.

    With LoRA the directory holds the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``), and with
    ``save_merged_model`` ``output_dir/merged`` holds the full model with the adapters merged in.
    """
    state_dict = engines.consolidated_state_dict(engine)
    output_dir, failure = Path(output_dir), None
    if torch.distributed.get_rank() == 0:
        try:
            model = engine.module
            model.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
            processing_class.save_pretrained(output_dir)
            if save_merged_model:
                _save_merged(model, state_dict, output_dir / "merged")
                processing_class.save_pretrained(output_dir / "merged")
        except (OSError, RuntimeError) as e:  # a full disk or a quota; safetensors reports it as either
            failure = e
    if any_rank(failure is not None, device()):  # also the barrier the other ranks wait in
        free = shutil.disk_usage(output_dir).free / 2**20
        why = f"{type(failure).__name__}: {failure}" if failure is not None else "it failed on rank 0"
        raise CheckpointError(
            f"writing the final model to {output_dir} failed ({why}); {free:.0f} MiB free on that disk. The run's "
            "checkpoints are kept: free space, then export the last one with `python launch/export.py "
            f"{output_dir}/checkpoints/step-N OUT_DIR`"
        )


def _save_merged(peft_model, state_dict: dict[str, torch.Tensor], out: Path) -> None:
    """Rebuild the peft model unpartitioned on CPU from the gathered weights, merge the adapters, save."""
    config = copy.deepcopy(peft_model.base_model.model.config)
    if hasattr(config, "quantization_config"):  # a QLoRA base is dequantized: the merged model is an ordinary one
        del config.quantization_config
    cpu_model = _cpu_model(config, peft_model.peft_config["default"], _dequantized(peft_model, state_dict))
    cpu_model.merge_and_unload().save_pretrained(out, safe_serialization=True)


def _dequantized(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with each 4-bit base weight (QLoRA) as the full-precision values the layer computes with, so
    that the adapters merge into the very weights they were trained against and the merged model scores as the
    trained one did (merging into the original checkpoint's weights would not). A model without 4-bit layers is
    returned as it is."""
    if not getattr(model, "is_loaded_in_4bit", False):
        return state_dict
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    state_dict = dict(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            key = f"{name}.weight"
            for extra in [k for k in state_dict if k.startswith(f"{key}.")]:  # its serialized quantization state
                del state_dict[extra]
            # the packed bytes come from the state dict (gathered under ZeRO-3); the quantization state, which
            # ZeRO does not partition, from the layer
            state_dict[key] = dequantize_4bit(state_dict[key], module.weight.quant_state)
    return state_dict


def _cpu_model(config, lora_config, state_dict: dict[str, torch.Tensor]):
    """An ordinary (unpartitioned) model, peft-wrapped when ``lora_config`` is given, holding ``state_dict``."""
    with zero3_disabled():
        model = auto_class(config).from_config(config)
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
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    run = make_config(yaml.safe_load((checkpoint.parent.parent / "config.yaml").read_text())).model
    state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    config = AutoConfig.from_pretrained(run.model_name_or_path, **run.source)
    lora = engines.lora_config(run, config.is_encoder_decoder) if run.use_peft else None
    model = _qlora_model(run, config, lora, state_dict) if run.load_in_4bit else _cpu_model(config, lora, state_dict)
    model.save_pretrained(output_dir, safe_serialization=True)
    processing = AutoProcessor if is_vision_language(config) else AutoTokenizer
    tokenizer = processing.from_pretrained(run.model_name_or_path, **run.source)
    tokenizer.save_pretrained(output_dir)
    if merge and lora is not None:
        if run.load_in_4bit:
            _save_merged(model, model.state_dict(), output_dir / "merged")
        else:
            model.merge_and_unload().save_pretrained(output_dir / "merged", safe_serialization=True)
        tokenizer.save_pretrained(output_dir / "merged")


def _qlora_model(run: ModelConfig, config, lora_config, state_dict: dict[str, torch.Tensor]):
    """The QLoRA peft model of a checkpoint: its 4-bit base quantized again from the run's model (the base never
    trains, and bitsandbytes quantizes deterministically; the checkpoint's copy of it lacks the quantization state),
    its adapters from ``state_dict``."""
    from peft import get_peft_model

    dtype = torch.bfloat16 if run.bf16 else torch.float32
    base = auto_class(config).from_pretrained(
        run.model_name_or_path,
        **run.source,
        config=config,
        dtype=dtype,
        quantization_config=engines.quantization_config(run, dtype),
    )
    model = get_peft_model(base, lora_config)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    missing = [name for name in trainable if name not in state_dict]
    if missing:
        raise RuntimeError(f"checkpoint does not match the model (missing {missing[:5]})")
    model.load_state_dict({name: state_dict[name] for name in trainable}, strict=False)
    return model
