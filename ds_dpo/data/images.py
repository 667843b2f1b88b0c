"""Vision-language models: images from a data row to the pixel tensors of a micro-batch, and what a model's processor
must return for ds_dpo to lay its images out.

A row's images (paths, bytes, ``{"bytes", "path"}`` records or PIL images) are checked and kept as encoded bytes
(``image_bytes``), so the tokenization cache covers them; token ids are made once by the model's processor (image
tokens expanded, ``ds_dpo.data.tokenization``), pixels at collate time by its image processor (``VisionInputs``), never
cached. A micro-batch's pixel tensors follow its layout, in the order the image tokens appear in the flattened rows
(the models scatter image features into image tokens in that order and check only the total):

- ``padded``: the chosen rows, then the rejected rows: each pair's images twice;
- ``packed``: each pair's images twice, before the next pair's;
- ``shared``: each distinct prompt's images once (``layouts.prompt_blocks``): the vision tower runs once per pair, or
  once for all pairs of a prompt, in the policy and in the reference.

Two tensor layouts exist, told apart by the image processor's own output: LLaVA-style ``pixel_values``
[images, C, H, W] whatever the text rows; Idefics3/SmolVLM-style [text rows, images, C, H, W] zero-padded per row, with
``pixel_attention_mask`` [text rows, images, H, W] (an all-zero image is padding to the model).

Served: models whose processor returns only ``input_ids``, ``attention_mask``, ``pixel_values`` and
``pixel_attention_mask`` (LLaVA, Idefics3, SmolVLM, ...). A processor that returns more (Qwen2-VL's
``image_grid_thw`` and M-RoPE positions, Gemma-3's ``token_type_ids`` for bidirectional image attention, LLaVA-NeXT's
``image_sizes``) describes images in a way these layouts do not carry: refused at startup (``processor_problem``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

PIXEL_KEYS = ("pixel_values", "pixel_attention_mask")
_TEXT_KEYS = ("input_ids", "attention_mask")


def image_bytes(value: Any) -> bytes:
    """The encoded bytes of one image as a dataset gives it; ValueError (the reason) when it is not a readable
    image."""
    from PIL import Image

    if isinstance(value, dict):  # datasets' Image feature undecoded: {"bytes", "path"}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, Image.Image):
        out = io.BytesIO()
        value.save(out, format="PNG")
        return out.getvalue()
    if isinstance(value, str):
        path = Path(value).expanduser()
        if not path.is_file():
            raise ValueError(f"image file {value!r} not found")
        value = path.read_bytes()
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"must be an image path, bytes or image, got {type(value).__name__}")
    try:
        with Image.open(io.BytesIO(value)) as image:
            image.verify()
    except Exception as e:  # PIL raises many kinds for a broken file
        raise ValueError(f"unreadable image ({type(e).__name__}: {e})") from None
    return bytes(value)


def open_images(encoded: list[bytes]) -> list:
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in encoded]


def processor_problem(processor) -> str | None:
    """Why ds_dpo cannot lay out this processor's images (None: it can), from the processor's output on one image."""
    from PIL import Image

    image_token = getattr(processor, "image_token", None)
    if image_token is None:
        return f"{type(processor).__name__} names no `image_token`"
    out = processor(text=[image_token], images=[Image.new("RGB", (32, 32))], return_tensors="pt")
    extra = sorted(set(out) - set(_TEXT_KEYS) - set(PIXEL_KEYS))
    if extra:
        return (
            f"{type(processor).__name__} describes images with {', '.join(extra)} besides pixel_values, which "
            "ds_dpo's batch layouts do not carry (served: LLaVA, Idefics3, SmolVLM and others whose processor "
            "returns only pixel_values and pixel_attention_mask)"
        )
    return None


class VisionInputs:
    """The pixel tensors of a micro-batch from its pairs' encoded images, made with the model's image processor."""

    def __init__(self, image_processor):
        from PIL import Image

        self.image_processor = image_processor
        probe = image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")["pixel_values"]
        self.per_text_row = probe.dim() == 5  # Idefics3-style [rows, images, C, H, W]

    def pair_pixels(self, encoded: list[bytes]) -> dict[str, torch.Tensor]:
        """One pair's images (every crop, where the processor splits them): ``pixel_values`` [n, C, H, W] and,
        Idefics3-style, ``pixel_attention_mask`` [n, H, W]."""
        out = self.image_processor(
            images=[open_images(encoded)] if self.per_text_row else open_images(encoded), return_tensors="pt"
        )
        if not self.per_text_row:
            return {"pixel_values": out["pixel_values"]}
        return {"pixel_values": out["pixel_values"][0], "pixel_attention_mask": out["pixel_attention_mask"][0].bool()}

    def __call__(self, images: list[list[bytes]], text_rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """The pixel tensors of pairs whose images are ``images`` (one list per pair, maybe empty; ``shared``: per
        block), ordered as the batch's text rows hold them (``text_rows``: the pairs of each row, from the layout's
        ``image_rows``); empty when no pair has an image."""
        pixels = [self.pair_pixels(encoded) if encoded else None for encoded in images]
        rows = [[pixels[i] for i in pairs if pixels[i] is not None] for pairs in text_rows]
        if not any(rows):
            return {}
        if not self.per_text_row:
            return {"pixel_values": torch.cat([p["pixel_values"] for row in rows for p in row])}
        per_row = [torch.cat([p["pixel_values"] for p in row]) if row else None for row in rows]
        masks = [torch.cat([p["pixel_attention_mask"] for p in row]) if row else None for row in rows]
        shape = next(v for v in per_row if v is not None).shape[1:]
        n = max(len(v) for v in per_row if v is not None)
        values = torch.zeros(len(rows), n, *shape)
        mask = torch.zeros(len(rows), n, *shape[1:], dtype=torch.bool)
        for i, (v, m) in enumerate(zip(per_row, masks)):
            if v is not None:
                values[i, : len(v)], mask[i, : len(m)] = v, m
        return {"pixel_values": values, "pixel_attention_mask": mask}
