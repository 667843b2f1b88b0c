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

Each pair's images are processed as one sample, as the processor tokenized them, and the pairs' tensors joined along
their first dimension, zero-padded at the end of the others to the largest: what the image processor makes of all of
them at once. Two tensor layouts exist, told apart by the image processor's own output:

- LLaVA-style, one entry per image whatever the text rows: ``pixel_values`` [images, C, H, W]; LLaVA-NeXT's
  any-resolution images [images, tiles, C, H, W] (a base view and the tiles of the grid nearest to the image's aspect
  ratio, padded to the most tiles) with ``image_sizes`` [images, 2], from which the model tells each image's tiles
  (padding tiles never reach the vision tower) and its feature count, as the processor counted its image tokens;
- Idefics3/SmolVLM-style [text rows, images, C, H, W] zero-padded per row, with ``pixel_attention_mask``
  [text rows, images, H, W] (an all-zero image is padding to the model).

Gemma-3's processor also returns ``token_type_ids``, 1 exactly on the image soft tokens (one token id): the model's
image tokens attend to each other bidirectionally within their image (``image_token_types``). Those ids are not
stored: they follow from the token ids, and each batch makes them (``VisionInputs.token_types``,
``ds_dpo.forward.layouts.collate_pairs``), for the model's own mask in a padded batch and for ds_dpo's masks of packed
and prefix-shared rows (``ds_dpo.forward.attention``).

Qwen2-VL, Qwen2.5-VL and Qwen3-VL describe images by patches: ``pixel_values`` [patches of all images, C * T * P * P]
(each image resized to a multiple of its patch grid, so images of different sizes give different patch and token counts)
and ``image_grid_thw`` [images, 3] (each image's temporal, height and width patch counts), joined along their first
dimension in token order as the other families' tensors. Their language model places tokens by 3D positions (M-RoPE): an
image's tokens at (temporal, row, column) from where the image starts, the text after it from one past the image's
largest extent in patches (after the merge), not from its token count. The processor's ``mm_token_type_ids`` (1 on the
image tokens) let the model compute those positions itself in a padded batch; like ``token_type_ids`` they follow from
the token ids and each batch makes them. A packed or prefix-shared row carries each sequence's 3D positions instead,
computed by ds_dpo as the model computes them for that sequence alone (``ds_dpo.forward.layouts``).

Served: models whose processor returns only ``input_ids``, ``attention_mask``, ``IMAGE_KEYS``, such ``token_type_ids``
and ``mm_token_type_ids`` that mark the image tokens, and whose image processor batches images of several sizes as
ds_dpo joins them (LLaVA, LLaVA-NeXT, Idefics3, SmolVLM, Gemma-3, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...). A processor that
returns more (LLaVA-OneVision's ``batch_num_images``) or type ids that mark anything but one image token (PaliGemma's
prefix/suffix types) describes images in a way these layouts do not carry: refused at startup (``processor_problem``),
as is an image processor that batches otherwise. A row with videos is a bad row (``ds_dpo.data.formats``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "image_sizes", "image_grid_thw")
"""What a processor may return about images besides the token ids: what ds_dpo's layouts carry."""
_TEXT_KEYS = ("input_ids", "attention_mask")
_TYPE_KEYS = {"token_type_ids": "Gemma-3", "mm_token_type_ids": "Qwen2-VL"}
"""Type ids a processor may return about its image tokens, each with a family that does: 1 on the image tokens."""


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


def _probe(processor) -> dict[str, torch.Tensor]:
    """The processor's output on its image token and one image."""
    from PIL import Image

    return processor(text=[processor.image_token], images=[Image.new("RGB", (32, 32))], return_tensors="pt")


def _marked_token(out: dict[str, torch.Tensor], key: str = "token_type_ids") -> int | None:
    """The one token id whose tokens ``out[key]`` marks 1 (and nothing else), else None."""
    types, ids = out[key], out["input_ids"]
    marked = ids[types == 1].unique()
    if len(marked) != 1 or not torch.equal(types.long(), (ids == marked[0]).long()):
        return None
    return int(marked[0])


def image_token_types(processor) -> int | None:
    """The image token id whose tokens the processor's ``token_type_ids`` mark 1 (Gemma-3's image soft tokens, which
    the model lets attend to each other bidirectionally within an image); None where it returns no
    ``token_type_ids``. For a processor ``processor_problem`` accepts."""
    out = _probe(processor)
    return _marked_token(out) if "token_type_ids" in out else None


def mrope_image_token(processor) -> int | None:
    """The image token id of a model that places its image tokens by 3D positions from ``image_grid_thw`` (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL: the processor's ``mm_token_type_ids`` mark those tokens), else None. For a processor
    ``processor_problem`` accepts."""
    out = _probe(processor)
    return _marked_token(out, "mm_token_type_ids") if "image_grid_thw" in out else None


def processor_problem(processor) -> str | None:
    """Why ds_dpo cannot lay out this processor's images (None: it can): from the processor's output on one image,
    and its image processor's on images of three sizes in two samples, which must equal ``VisionInputs``' joining of
    each sample's own output."""
    from PIL import Image

    if getattr(processor, "image_token", None) is None:
        return f"{type(processor).__name__} names no `image_token`"
    out = _probe(processor)
    extra = sorted(set(out) - set(_TEXT_KEYS) - set(IMAGE_KEYS) - set(_TYPE_KEYS))
    if extra:
        return (
            f"{type(processor).__name__} describes images with {', '.join(extra)} besides pixel_values, which "
            "ds_dpo's batch layouts do not carry (served: LLaVA, LLaVA-NeXT, Idefics3, SmolVLM, Gemma-3, Qwen2-VL, "
            f"Qwen2.5-VL, Qwen3-VL and others whose processor returns only {', '.join(IMAGE_KEYS)} and "
            "token_type_ids or mm_token_type_ids that mark image tokens)"
        )
    for key in _TYPE_KEYS:
        if key in out and _marked_token(out, key) is None:
            return (
                f"{type(processor).__name__} returns {key} that do not mark exactly its image tokens, which "
                f"ds_dpo's batch layouts do not carry (served: {key} 1 on the image tokens only, as "
                f"{_TYPE_KEYS[key]}'s)"
            )
    if "image_grid_thw" in out and "mm_token_type_ids" not in out:
        return (
            f"{type(processor).__name__} returns image_grid_thw but no mm_token_type_ids, from which its model "
            "places the image tokens (3D positions)"
        )
    # sizes whose tile grids differ (LLaVA-NeXT), a sample of two images (Idefics3 pads the other sample's row)
    samples = [[(240, 240, "red")], [(240, 700, "green"), (700, 240, "blue")]]
    samples = [[Image.new("RGB", (w, h), color) for w, h, color in sample] for sample in samples]
    batched = processor.image_processor(images=samples, return_tensors="pt")
    joined = VisionInputs(processor.image_processor)([[image_bytes(i) for i in s] for s in samples], [[0], [1]])
    if set(batched) != set(joined) or any(not torch.equal(batched[k].to(v.dtype), v) for k, v in joined.items()):
        return (
            f"{type(processor.image_processor).__name__} batches images otherwise than ds_dpo, which makes each "
            "pair's pixel tensors on its own and joins them along their first dimension, zero-padded at the end "
            "of the others"
        )
    return None


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``tensors`` concatenated along their first dimension, each zero-padded at the end of every other dimension to
    the largest: how an image processor batches what it made one sample at a time (LLaVA-NeXT's tiles, Idefics3's
    images of a text row)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = tensors[0].new_zeros(sum(len(t) for t in tensors), *shape)
    start = 0
    for t in tensors:
        out[(slice(start, start + len(t)), *map(slice, t.shape[1:]))] = t
        start += len(t)
    return out


class VisionInputs:
    """The pixel tensors of a micro-batch from its pairs' encoded images, made with the model's image processor."""

    def __init__(self, image_processor, image_token_types: int | None = None, mrope_image_token: int | None = None):
        from PIL import Image

        self.image_processor = image_processor
        self.image_token_types = image_token_types
        """The image token id the model's ``token_type_ids`` mark (``image_token_types``; Gemma-3), or None."""
        self.mrope_image_token = mrope_image_token
        """The image token id of a model with 3D positions (``mrope_image_token``; Qwen2-VL), or None."""
        self.merge_size = getattr(image_processor, "merge_size", 1)
        """Patches merged into one image token along each side (``image_grid_thw`` counts patches)."""
        probe = self._process([Image.new("RGB", (32, 32))] * 2)["pixel_values"]
        self.per_text_row = len(probe) == 1  # Idefics3-style: one sample's two images in one [1, images, ...] row

    def _process(self, images: list) -> dict[str, torch.Tensor]:
        # one pair's images as one sample, as the processor tokenized them
        out = self.image_processor(images=[images], return_tensors="pt")
        if "pixel_attention_mask" in out:  # bool: a byte a pixel instead of the processor's eight
            out["pixel_attention_mask"] = out["pixel_attention_mask"].bool()
        return dict(out)

    def pair_pixels(self, encoded: list[bytes]) -> dict[str, torch.Tensor]:
        """One pair's images (every crop or tile, where the processor splits them): each tensor the image processor
        returns, the pair's images along its first dimension: ``pixel_values`` [n, C, H, W] or, LLaVA-NeXT,
        [n, tiles, C, H, W] with ``image_sizes`` [n, 2]; Idefics3-style with ``pixel_attention_mask`` [n, H, W]."""
        out = self._process(open_images(encoded))
        return {k: v[0] for k, v in out.items()} if self.per_text_row else out

    def token_types(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """The type ids of a batch's token ids as the processor makes them (1 on the image tokens): ``token_type_ids``
        for models whose image tokens attend bidirectionally within an image, ``mm_token_type_ids`` for models that
        place them by 3D positions; empty for others."""
        out = {}
        if self.image_token_types is not None:
            out["token_type_ids"] = (input_ids == self.image_token_types).long()
        if self.mrope_image_token is not None:
            out["mm_token_type_ids"] = (input_ids == self.mrope_image_token).int()
        return out

    def __call__(self, images: list[list[bytes]], text_rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """The pixel tensors of pairs whose images are ``images`` (one list per pair, maybe empty; ``shared``: per
        block), ordered as the batch's text rows hold them (``text_rows``: the pairs of each row, from the layout's
        ``image_rows``); empty when no pair has an image."""
        pixels = [self.pair_pixels(encoded) if encoded else None for encoded in images]
        rows = [[pixels[i] for i in pairs if pixels[i] is not None] for pairs in text_rows]
        if not any(rows):
            return {}
        first = next(p for row in rows for p in row)
        if not self.per_text_row:  # every pair's images in token order, whatever row holds them
            return {k: _cat_padded([p[k] for row in rows for p in row]) for k in first}
        # [text rows, images, ...]: a row's pairs' images, rows without images all padding
        return {
            k: _cat_padded([_cat_padded([p[k] for p in row] or [first[k][:0]])[None] for row in rows]) for k in first
        }
