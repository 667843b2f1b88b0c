"""Tiny random vision-language models built offline, each saved with its processor (the built-in word-level
tokenizer with the model's image tokens and a chat template that renders image parts; PIL image processors), and
preference rows with images in TRL's conversational format."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ds_dpo.data import builtin

TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
# "<role> : <parts> <end of turn>" per message; the generation prompt is "assistant :"
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} :"
    "{% if m['content'] is string %} {{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %} <image>{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} END_OF_TURN {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
FAMILIES = ("llava", "llava_next", "idefics3", "gemma3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
MROPE_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
"""Families with 3D positions (M-RoPE), whose processors transformers builds only with torchvision (their video
processor): ``bash launch/setup.sh test vision`` makes ``.venv-vision``, where their tests run."""


def has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def param(family: str, *values, before: tuple = ()):
    """A pytest parameter of ``before``, ``family`` and ``values`` (the test's other arguments), skipped where the
    family's processor cannot be built."""
    import pytest

    needs = pytest.mark.skipif(
        family in MROPE_FAMILIES and not has_torchvision(),
        reason=f"{family}'s processor needs torchvision (bash launch/setup.sh test vision; run with .venv-vision)",
    )
    return pytest.param(*before, family, *values, marks=needs)


def _tokenizer(special: list[str]):
    tokenizer = builtin.build_tokenizer()
    tokenizer.add_tokens(["user", "assistant"])
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    return tokenizer


def _clip_vision(image_size: int, patch_size: int):
    """A tiny CLIP vision tower (LLaVA's and LLaVA-NeXT's)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def build(family: str, out: Path, seed: int = 0) -> str:
    """Write the tiny ``family`` model and its processor to ``out``; returns the path."""
    if family == "llava":
        from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        tokenizer = _tokenizer(["<image>"])
        template = TEMPLATE.replace("END_OF_TURN", "{{ eos_token }}")
        # 30 px, patch 10: 9 features per image; "default" drops CLS, counted by num_additional_image_tokens
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}),
            tokenizer=tokenizer,
            patch_size=10,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
        config = LlavaConfig(
            vision_config=_clip_vision(image_size=30, patch_size=10),
            text_config=_text(tokenizer),
            image_seq_length=9,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        model_class = LlavaForConditionalGeneration
    elif family == "llava_next":
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        tokenizer = _tokenizer(["<image>"])
        template = TEMPLATE.replace("END_OF_TURN", "{{ eos_token }}")
        # any resolution: a 28 px base view plus the 28 px tiles of the pinpoint closest to the image's aspect
        # ratio (2 or 4), so images of other shapes differ in tiles and feature tokens
        pinpoints = [[28, 56], [56, 28], [56, 56]]
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessorPil(
                size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints
            ),
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=template,
        )
        config = LlavaNextConfig(
            vision_config=_clip_vision(image_size=28, patch_size=14),
            text_config=_text(tokenizer),
            image_grid_pinpoints=pinpoints,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        model_class = LlavaNextForConditionalGeneration
    elif family == "gemma3":
        from transformers import (
            AutoTokenizer,
            Gemma3Config,
            Gemma3ForConditionalGeneration,
            Gemma3Processor,
            Gemma3TextConfig,
            SiglipVisionConfig,
        )
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        # the processor's image token is <start_of_image>, which it expands to "\n\n<start_of_image>", 4 soft
        # tokens, "<end_of_image>\n\n"; its token_type_ids mark the soft tokens (bidirectional within each image)
        names = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"}
        _tokenizer(list(names.values())).save_pretrained(out / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer", extra_special_tokens=names)
        template = TEMPLATE.replace("END_OF_TURN", "{{ eos_token }}").replace("<image>", "<start_of_image>")
        processor = Gemma3Processor(
            Gemma3ImageProcessorPil(size={"height": 28, "width": 28}),
            tokenizer,
            image_seq_length=4,
            chat_template=template,
        )
        # a sliding window of 3 positions: shorter than an image's 4 soft tokens, so it cuts through images
        text = Gemma3TextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            **TEXT,
        )
        vision = SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
        )
        config = Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,  # 4 x 4 patches pooled to 2 x 2
            boi_token_index=tokenizer.convert_tokens_to_ids(names["boi_token"]),
            eoi_token_index=tokenizer.convert_tokens_to_ids(names["eoi_token"]),
            image_token_index=tokenizer.convert_tokens_to_ids(names["image_token"]),
        )
        model_class = Gemma3ForConditionalGeneration
    elif family in MROPE_FAMILIES:
        tokenizer, processor, config, model_class = _qwen_vl(family)
    else:
        from transformers import (
            Idefics3Config,
            Idefics3ForConditionalGeneration,
            Idefics3Processor,
            Idefics3VisionConfig,
        )
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        # the processor adds its image tokens itself; <global-img> must already be in the vocabulary
        tokenizer = _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])
        template = TEMPLATE.replace("END_OF_TURN", "<end_of_utterance>")
        processor = Idefics3Processor(
            image_processor=Idefics3ImageProcessorPil(
                size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False
            ),
            tokenizer=tokenizer,
            image_seq_len=4,
            chat_template=template,
        )  # (32 / 8) ** 2 / 2 ** 2
        vision = Idefics3VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        config = Idefics3Config(
            vision_config=vision,
            text_config=_text(tokenizer),
            scale_factor=2,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            tie_word_embeddings=False,
        )
        model_class = Idefics3ForConditionalGeneration
    torch.manual_seed(seed)
    model = model_class(config)
    if family == "gemma3":  # its projector starts at zero: every image token would be zero, and its attention moot
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.05)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def _qwen_vl(family: str):
    """Qwen2-VL, Qwen2.5-VL or Qwen3-VL with its own processor classes (its video processor too, which needs
    torchvision): patches of 4 px, 2 x 2 of them merged into an image token, images resized to multiples of 8 px of 64
    to 48 x 48 pixels, so the rows' images (``SHAPES``) have 24, 16, 24 and 16 tokens on grids of 4 x 6, 8 x 2, 6 x 4
    and 2 x 8 merged patches (the text after each moves back by 18 or 8 positions); each image between vision start and
    end tokens, as Qwen's template puts it."""
    import transformers

    names = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}
    name = names[family]
    tokenizer = _tokenizer(["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"])
    template = TEMPLATE.replace("END_OF_TURN", "{{ eos_token }}").replace(
        "<image>", "<|vision_start|><|image_pad|><|vision_end|>"
    )
    pixels = dict(
        patch_size=4, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 64, "longest_edge": 48 * 48}
    )
    processor = getattr(transformers, f"{name}Processor")(
        image_processor=transformers.Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=getattr(transformers, f"{'Qwen3VL' if family == 'qwen3_vl' else 'Qwen2VL'}VideoProcessor")(
            **pixels
        ),
        chat_template=template,
    )
    ids = {
        f"{key}_token_id": tokenizer.convert_tokens_to_ids(token)
        for key, token in (
            ("image", "<|image_pad|>"),
            ("video", "<|video_pad|>"),
            ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"),
        )
    }
    # head_dim 16: 8 rotary frequencies, 2 for the temporal position, 3 each for the row and the column (Qwen3-VL:
    # interleaved)
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    if family == "qwen3_vl":
        rope["mrope_interleaved"] = True
    text = getattr(transformers, f"{name}TextConfig")(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_parameters=rope,
        **({"head_dim": 16} if family == "qwen3_vl" else {}),
        **TEXT,
    )
    vision = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=TEXT["hidden_size"], mlp_ratio=2)
    elif family == "qwen3_vl":  # position embeddings of a 12 x 12 patch grid, interpolated to each image's; the
        # first layer's merged features also added to the language model's first layer (deepstack)
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=TEXT["hidden_size"],
            num_position_embeddings=144,
            deepstack_visual_indexes=[0],
        )
    else:  # windows of 2 x 2 merged patches in its first layer, the whole image in its second
        vision.update(
            hidden_size=32,
            intermediate_size=64,
            out_hidden_size=TEXT["hidden_size"],
            window_size=16,
            fullatt_block_indexes=[1],
        )
    vision = getattr(transformers, f"{name}VisionConfig")(**vision)
    config = getattr(transformers, f"{name}Config")(text_config=text, vision_config=vision, **ids)
    return tokenizer, processor, config, getattr(transformers, f"{name}ForConditionalGeneration")


def _text(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT,
    )


def image(seed: int, height: int = 36, width: int = 44) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


# (height, width) of the rows' images in turn: to the tiny LLaVA-NeXT 5, 3, 5 and 3 tiles, 24, 16, 24 and 14 image
# tokens (one pair's two images padded to 5 tiles in one tensor)
SHAPES = [(36, 44), (60, 20), (44, 36), (20, 60)]
# (prompt, images, chosen, rejected): 1, 2, 1 and 0 images
PAIRS = [
    ("count up from 3 :", 1, " 4 5 6", " 2 1 0 0"),
    ("count down from 9 :", 2, " 8 7 6 5", " 10 11"),
    ("count up from 20 :", 1, " 21 22 23", " 5 40 7"),
    ("count down from 50 :", 0, " 49 48", " 51"),
]


def rows(image_dir: Path, pairs=PAIRS, seed: int = 0) -> list[dict]:
    """TRL-format rows: string contents (the images go before the user's text), ``images`` as PNG files written to
    ``image_dir``."""
    out, shapes = [], itertools.cycle(SHAPES)
    image_dir.mkdir(parents=True, exist_ok=True)
    for k, (prompt, n, chosen, rejected) in enumerate(pairs):
        paths = []
        for i in range(n):
            paths.append(str(image_dir / f"seed{seed}-pair{k}-image{i}.png"))
            image(seed + 10 * k + i, *next(shapes)).save(paths[-1])
        out.append(
            {
                "images": paths,
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return out
