"""Vision-language models (tiny random LLaVA, LLaVA-NeXT, Idefics3, Gemma-3, Qwen2-VL, Qwen2.5-VL and Qwen3-VL
built offline with their processors; the Qwen ones where torchvision is installed, ``.venv-vision``): rows with images
through the data pipeline, every layout's log-probs and gradients against the model's own forward on one sequence at a
time, the vision tower run once per pair in the prefix-shared layout, TRL 1.16 parity, processors refused at startup,
and bad image rows."""

import json
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from ds_dpo.config import make_config
from ds_dpo.data.images import (
    VisionInputs,
    image_bytes,
    image_token_types,
    mrope_image_token,
    open_images,
    processor_problem,
)
from ds_dpo.data.pipeline import DataError, load_preference_data
from ds_dpo.data.tokenization import load_processor
from ds_dpo.forward.layouts import LAYOUTS, PADDED, SHARED, collate_pairs
from ds_dpo.forward.logprobs import Scoring, concatenated_forward
from ds_dpo.forward.scoring import install_token_scoring, token_scoring
from ds_dpo.forward.self_check import scoring_mismatch
from ds_dpo.models.engines import freeze_vision_tower
from ds_dpo.models.support import attention_setting, model_support
from helpers import vlm


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def load_pairs(model_dir, data, cache, **values):
    processor = load_processor(model_dir)
    cfg = make_config({"model_name_or_path": model_dir, "dataset": data, "dataset_cache_dir": str(cache), **values})
    train, _, report = load_preference_data(cfg.data, processor.tokenizer, 0, processor=processor)
    return processor, train, report


def vision_inputs(processor):
    """The run's ``VisionInputs`` (``token_type_ids`` too where the processor marks image tokens: Gemma-3; 3D positions
    of Qwen2-VL's)."""
    assert processor_problem(processor) is None
    return VisionInputs(processor.image_processor, image_token_types(processor), mrope_image_token(processor))


@pytest.fixture(scope="module", params=[vlm.param(f) for f in vlm.FAMILIES])
def tiny_vlm(request, tmp_path_factory):
    """The family's model directory, processor and tokenized pairs (1, 2, 1 and 0 images)."""
    root = tmp_path_factory.mktemp(request.param)
    model_dir = vlm.build(request.param, root / "model")
    data = write_rows(root / "pairs.jsonl", vlm.rows(root / "images"))
    processor, train, _ = load_pairs(model_dir, data, root / "cache")
    return model_dir, processor, [train[i] for i in range(len(train))]


def load_model(model_dir, layout):
    """The model as a run with ``layout`` loads it (block attention for the language model of a packed run)."""
    config = AutoConfig.from_pretrained(model_dir)
    support = model_support(config, "sdpa", "cpu")
    attn = attention_setting(config, support.attention_for(layout)[0])
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation=attn)
    return install_token_scoring(model).eval()


def watch_tower(model):
    """The model's vision tower and a list that gets the images (tiles, crops) it is given at each call."""
    tower = next(m for m in model.modules() if getattr(m, "config", None) is model.config.vision_config)
    seen = []
    tower.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((kwargs.get("pixel_values", args[0] if args else None)).shape[0]),
        with_kwargs=True,
    )
    return tower, seen


def own_forward(model, processor, rows, conversations):
    """The oracle, [2B] (chosen first): each whole conversation rendered by the processor's template and run through
    the processor with its images (token ids must equal the pipeline's prompt + completion), then the model's own
    forward on that one sequence; the completion's log-probs summed."""
    out = []
    for side in ("chosen", "rejected"):
        for row, conversation in zip(rows, conversations):
            text = processor.apply_chat_template(conversation["prompt"] + conversation[side], tokenize=False)
            images = open_images(row["images"]) or None
            inputs = processor(text=[text], images=images, add_special_tokens=False, return_tensors="pt")
            prompt, completion = row["prompt_input_ids"], row[f"{side}_input_ids"]
            assert inputs["input_ids"][0].tolist() == prompt + completion
            logits = token_scoring(model).plain_forward(**inputs).logits[0]
            logps = logits[len(prompt) - 1 : -1].log_softmax(-1)
            out.append(logps.gather(-1, torch.tensor(completion)[:, None]).sum())
    return torch.stack(out)


def conversations_of(rows):
    """The rows' messages with the images put before the user's text (what the pipeline does)."""

    def parts(message, images):
        return {
            "role": message["role"],
            "content": [{"type": "image"}] * images + [{"type": "text", "text": message["content"]}],
        }

    return [
        {
            "prompt": [parts(row["prompt"][0], len(row["images"]))],
            "chosen": [parts(row["chosen"][0], 0)],
            "rejected": [parts(row["rejected"][0], 0)],
        }
        for row in rows
    ]


def test_every_layout_scores_and_trains_like_the_models_own_forward(tiny_vlm, tmp_path):
    """Padded, packed and prefix-shared batches of pairs with 1, 2, 1 and 0 images, full and chunked logits: every
    sequence's log-prob equals the model's own forward on that sequence alone (1e-5), every parameter's gradient (the
    vision tower's included) the padded full-logit path's; the vision tower sees each pair's images twice in padded
    and packed rows, once in shared ones."""
    model_dir, processor, rows = tiny_vlm
    vision = vision_inputs(processor)
    raw = vlm.rows(tmp_path)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected_grad = None
    for layout in LAYOUTS.values():
        model = load_model(model_dir, layout)
        tower, seen = watch_tower(model)
        if expected_grad is None:
            with torch.no_grad():
                expected = own_forward(model, processor, rows, conversations_of(raw))
            once = sum(seen) // 2  # each sequence alone: each pair's images twice
        for chunk in (0, 4):
            model.zero_grad()
            seen.clear()
            batch = collate_pairs(rows, [1.0] * 4, processor.tokenizer.pad_token_id, layout, vision)
            out = concatenated_forward(model, batch, Scoring(layout, chunk))
            got = torch.cat([out.chosen, out.rejected])
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=lambda m: f"{layout} {chunk}: {m}")
            assert sum(seen) == (once if layout is SHARED else 2 * once), (layout, seen)
            (weights * out.chosen - 0.5 * out.rejected).sum().backward()
            grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            if expected_grad is None:
                expected_grad = grad
            torch.testing.assert_close(
                grad,
                expected_grad,
                rtol=0,
                atol=1e-5 * expected_grad.abs().max().item(),
                msg=lambda m: f"{layout} {chunk}: {m}",
            )
        assert scoring_mismatch(model, rows, processor.tokenizer.pad_token_id, Scoring(layout, 4), vision) is None
    # the vision tower trains (its last norm may be unused: LLaVA reads the last layer's hidden states before it)
    assert max(p.grad.abs().max() for p in tower.parameters() if p.grad is not None) > 0


def test_pairs_of_one_prompt_and_its_images_share_one_pass_of_them(tiny_vlm):
    """A third response to pair 0's prompt (same token ids, same image) adds a response to pair 0's block, not a
    second pass of its image; the same prompt ids with another image (of the same size) are another block. Log-probs
    equal the padded batch's (each pair in full)."""
    model_dir, processor, rows = tiny_vlm
    vision = vision_inputs(processor)
    third = {
        **rows[0],
        "index": 4,
        "chosen_input_ids": rows[0]["rejected_input_ids"],
        "rejected_input_ids": rows[3]["chosen_input_ids"],
    }
    # of pair 0's image's size: as many image tokens (LLaVA-NeXT's depend on the size)
    other_image = {**third, "index": 5, "images": [image_bytes(vlm.image(99, *vlm.SHAPES[0]))]}
    pairs = [*rows, third, other_image]
    model = load_model(model_dir, SHARED)
    _, seen = watch_tower(model)

    def shared_forward(pairs):
        seen.clear()
        out = concatenated_forward(
            model, collate_pairs(pairs, [1.0] * len(pairs), 0, SHARED, vision), Scoring(SHARED, 4)
        )
        return out, sum(seen)

    with torch.no_grad():
        shared, images = shared_forward(pairs)
        # pairs 0-3's images once, and the other image's block
        assert images == shared_forward(rows)[1] + shared_forward([other_image])[1]
        padded = concatenated_forward(
            load_model(model_dir, PADDED), collate_pairs(pairs, [1.0] * 6, 0, PADDED, vision), Scoring(PADDED, 0)
        )
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(getattr(shared, side), getattr(padded, side), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_gemma3_image_attention_in_the_dense_and_flex_masks(tmp_path, uncompiled_flex):
    """Gemma-3 loaded so that packed and shared rows take ds_dpo's other masks: the dense row-wide masks (plain sdpa:
    one per layer type), the block attention's additive per-group masks (eager) and FlexAttention block masks
    (forward only, uncompiled: torch has no FlexAttention backward on CPU), each image's tokens attending to each other
    within the sliding window: log-probs equal the padded batch's (the model's own mask from ``token_type_ids``)."""
    model_dir = vlm.build("gemma3", tmp_path / "model")
    data = write_rows(tmp_path / "pairs.jsonl", vlm.rows(tmp_path / "images"))
    processor, train, _ = load_pairs(model_dir, data, tmp_path / "cache")
    rows, vision = [train[i] for i in range(len(train))], vision_inputs(processor)

    def scores(attn, layout):
        model = install_token_scoring(AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation=attn))
        with torch.no_grad():
            batch = collate_pairs(rows, [1.0] * 4, processor.tokenizer.pad_token_id, layout, vision)
            out = concatenated_forward(model.eval(), batch, Scoring(layout, 4))
        return torch.cat([out.chosen, out.rejected])

    expected = scores("sdpa", PADDED)
    blocks = attention_setting(AutoConfig.from_pretrained(model_dir), "ds_dpo_blocks_eager")
    for attn in ("sdpa", blocks, "flex_attention"):
        for layout in (LAYOUTS["packed"], SHARED):
            torch.testing.assert_close(scores(attn, layout), expected, rtol=1e-5, atol=1e-5, msg=f"{attn} {layout}")


def test_freezing_the_vision_tower_freezes_exactly_it(tiny_vlm):
    model = load_model(tiny_vlm[0], SHARED)
    vision = {
        id(p)
        for m in model.modules()
        if getattr(m, "config", None) is model.config.vision_config
        for p in m.parameters()
    }
    frozen = freeze_vision_tower(model)
    assert frozen == sum(p.numel() for p in model.parameters() if id(p) in vision) > 0
    assert all(p.requires_grad == (id(p) not in vision) for p in model.parameters())


@pytest.mark.parametrize("family", [vlm.param(f) for f in ("llava", "llava_next", "gemma3", *vlm.MROPE_FAMILIES)])
def test_the_first_step_log_probs_equal_trl(family, tmp_path):
    """TRL 1.16's DPOTrainer (processor as processing_class, conversational rows with one image each, its vision
    collator) on the tiny LLaVA, LLaVA-NeXT (images of 5 and 3 tiles in one batch) and Gemma-3 (TRL passes its
    token_type_ids, so the model attends bidirectionally within each image): the per-sequence policy log-probs of its
    first step equal ds_dpo's prefix-shared batch of the same rows (token ids identical), to 1e-6."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model_dir = vlm.build(family, tmp_path / "model")
    one_image = [(prompt, 1, chosen, rejected) for prompt, _, chosen, rejected in vlm.PAIRS]
    raw = vlm.rows(tmp_path / "images", one_image)
    processor, train, _ = load_pairs(model_dir, write_rows(tmp_path / "pairs.jsonl", raw), tmp_path / "cache")
    captured = {}

    class Capturing(DPOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            def hook(_module, _args, kwargs, output):  # the policy's forward (the reference is another module)
                if kwargs.get("fused_lm_head") and "logps" not in captured:
                    captured["logps"] = output.log_probs.detach()

            handle = model.register_forward_hook(hook, with_kwargs=True)
            try:
                captured.setdefault("inputs", {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)})
                return super()._compute_loss(model, inputs, return_outputs)
            finally:
                handle.remove()

    trl_rows = [{**row, "images": open_images([open(p, "rb").read() for p in row["images"]])} for row in raw]
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        report_to=[],
        per_device_train_batch_size=4,
        use_cpu=True,
        max_steps=1,
        save_strategy="no",
        bf16=False,
        max_length=None,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    Capturing(
        model=AutoModelForImageTextToText.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(trl_rows),
        processing_class=processor,
    ).train()
    inputs = captured["inputs"]
    # Gemma-3: TRL 1.16 hands the processor's token_type_ids to the model (the model's own bidirectional image mask)
    assert ("token_type_ids" in inputs) == (family == "gemma3")
    trl_logps = (captured["logps"] * inputs["completion_mask"][:, 1:]).sum(1)
    # TRL shuffles: find each of its sequences among ours by its token ids
    ours = {}
    for i in range(len(train)):
        row = train[i]
        for side in ("chosen", "rejected"):
            ours[tuple(row["prompt_input_ids"] + row[f"{side}_input_ids"])] = (i, side)
    order = [ours[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    pairs = [i for i, side in order[:4]]
    assert [side for _, side in order] == ["chosen"] * 4 + ["rejected"] * 4 and order[4:] == [
        (i, "rejected") for i in pairs
    ]
    model = load_model(model_dir, SHARED)
    batch = collate_pairs(
        [train[i] for i in pairs],
        [1.0] * 4,
        processor.tokenizer.pad_token_id,
        SHARED,
        vision_inputs(processor),
    )
    with torch.no_grad():
        out = concatenated_forward(model, batch, Scoring(SHARED, 1024))
    torch.testing.assert_close(torch.cat([out.chosen, out.rejected]), trl_logps, rtol=1e-6, atol=1e-6)


class Changed:
    """A processor whose output ``change`` alters (what a processor of another kind would return)."""

    def __init__(self, processor, change):
        self.processor, self.change = processor, change

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, *args, **kwargs):
        return self.change(self.processor(*args, **kwargs))


def test_processors_that_describe_images_otherwise_are_refused(tmp_path, monkeypatch):
    """Gemma-3's processor is served: its token_type_ids mark exactly its image soft tokens (``image_token_types``);
    token_type_ids that mark anything else (PaliGemma's prefix and suffix types) and keys ds_dpo does not carry
    (LLaVA-OneVision's batch_num_images) are refused. LLaVA-NeXT's is served (as every family's is at the start of the
    recipe tests), but not with an image processor that pads tiles in front (the model reads each image's first
    tiles): its batches differ from ds_dpo's joined pairs."""
    import numpy as np
    from transformers import AutoProcessor

    gemma = AutoProcessor.from_pretrained(vlm.build("gemma3", tmp_path / "gemma3"))
    assert processor_problem(gemma) is None
    assert image_token_types(gemma) == gemma.tokenizer.convert_tokens_to_ids("<image_soft_token>")

    prefix_types = Changed(gemma, lambda out: {**out, "token_type_ids": torch.ones_like(out["input_ids"])})
    assert processor_problem(prefix_types).startswith(
        "Changed returns token_type_ids that do not mark exactly its image tokens"
    )
    more = Changed(gemma, lambda out: {**out, "batch_num_images": torch.tensor([1])})
    assert processor_problem(more).startswith(
        "Changed describes images with batch_num_images besides pixel_values, which ds_dpo's batch layouts do not "
        "carry (served: LLaVA, LLaVA-NeXT, Idefics3, SmolVLM, Gemma-3"
    )
    processor = AutoProcessor.from_pretrained(vlm.build("llava_next", tmp_path / "model"))
    assert processor_problem(processor) is None

    def pad_in_front(pixel_values):
        most = max(len(x) for x in pixel_values)
        return [np.pad(x, ((most - len(x), 0), (0, 0), (0, 0), (0, 0))) for x in pixel_values]

    monkeypatch.setattr(processor.image_processor, "_pad_for_batching", pad_in_front)
    # the PIL image processor it was saved with, or its torchvision twin where torchvision is installed
    assert processor_problem(processor).startswith(
        f"{type(processor.image_processor).__name__} batches images otherwise than ds_dpo"
    )


@pytest.mark.parametrize("family", [vlm.param(f) for f in vlm.MROPE_FAMILIES])
def test_processors_with_3d_positions_are_served_by_their_image_token(family, tmp_path):
    """The Qwen VLs' processors (built with their real classes, video processor included) are served:
    their ``mm_token_type_ids`` mark exactly the image token, from which a padded batch's model computes its 3D
    positions and ds_dpo those of packed and shared rows; without them, or marking more, they are refused."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(vlm.build(family, tmp_path / "model"))
    assert processor_problem(processor) is None and image_token_types(processor) is None
    assert mrope_image_token(processor) == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")

    untyped = Changed(processor, lambda out: {k: v for k, v in out.items() if k != "mm_token_type_ids"})
    assert processor_problem(untyped).startswith("Changed returns image_grid_thw but no mm_token_type_ids")
    every_token = Changed(processor, lambda out: {**out, "mm_token_type_ids": torch.ones_like(out["input_ids"])})
    assert processor_problem(every_token).startswith(
        "Changed returns mm_token_type_ids that do not mark exactly its image tokens"
    )


@pytest.mark.parametrize(
    "change, where",
    [
        (lambda row, d: {**row, "images": [str(d / "missing.png")]}, "field `images[0]`: image file"),
        (lambda row, d: {**row, "images": [str(d / "broken.png")]}, "field `images[0]`: unreadable image"),
        (
            lambda row, d: {
                **row,
                "prompt": [
                    {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]}
                ],
            },
            "field `prompt`: 2 image part(s) for 1 image(s)",
        ),
        (
            lambda row, d: {**row, "chosen": [{"role": "assistant", "content": [{"type": "image"}]}]},
            "field `chosen`: image parts belong in the prompt",
        ),
        (lambda row, d: {**row, "videos": [str(d / "clip.mp4")]}, "field `videos`: videos are not served"),
    ],
)
def test_bad_image_rows_are_named_before_training(change, where, tmp_path):
    model_dir = vlm.build("llava", tmp_path / "model")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    good = vlm.rows(tmp_path / "images")
    data = write_rows(tmp_path / "pairs.jsonl", [good[0], change(good[0], tmp_path)])
    with pytest.raises(DataError, match=re.escape(f"row 2: {where}")):
        load_pairs(model_dir, data, tmp_path / "cache")


def test_explicit_rows_hold_the_image_token_in_their_prompt(tmp_path):
    """TRL's text rows with images: the processor expands the prompt's image token (the tokenizer's BOS first), each
    completion is closed by EOS; a prompt whose image tokens do not match its images is a bad row."""
    model_dir = vlm.build("llava", tmp_path / "model")
    images = vlm.rows(tmp_path / "images")[0]["images"]
    row = {"images": images, "prompt": "<image> count up from 3 :", "chosen": " 4 5", "rejected": " 2 1"}
    processor, train, _ = load_pairs(model_dir, write_rows(tmp_path / "pairs.jsonl", [row]), tmp_path / "cache")
    tokenizer, image = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (
        train[0]["prompt_input_ids"]
        == [tokenizer.bos_token_id]
        + [image] * 9
        + tokenizer("count up from 3 :", add_special_tokens=False)["input_ids"]
    )
    assert train[0]["chosen_input_ids"] == tokenizer(" 4 5", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]
    bad = write_rows(tmp_path / "bad.jsonl", [{**row, "prompt": "count up from 3 :"}])
    with pytest.raises(DataError, match=re.escape("row 1: field `prompt`: 0 image token(s) '<image>' for 1 image(s)")):
        load_pairs(model_dir, bad, tmp_path / "cache")


def test_a_prompt_with_images_is_dropped_rather_than_cut(tmp_path):
    model_dir = vlm.build("llava", tmp_path / "model")
    data = write_rows(tmp_path / "pairs.jsonl", vlm.rows(tmp_path / "images"))
    _, train, report = load_pairs(model_dir, data, tmp_path / "cache", max_prompt_length=20)
    # pairs 0 and 2 (1 image: 9 image tokens + text, 20 tokens) fit, pair 1 (2 images) does not, pair 3 has none
    assert len(train) == 3 and report.sources[0].dropped == {
        "prompt with images longer than the prompt limit (an image cannot be cut)": 1
    }


def test_the_example_rows_load(tmp_path, monkeypatch):
    from helpers.runs import REPO

    monkeypatch.chdir(REPO)  # its image paths are relative to the repository, as its launch line runs
    model_dir = vlm.build("idefics3", tmp_path / "model")
    _, train, report = load_pairs(model_dir, str(REPO / "examples" / "vlm" / "pairs.jsonl"), tmp_path / "cache")
    assert len(train) == 7 and not report.sources[0].bad_rows and [len(i) for i in train["images"]] == [1] * 6 + [2]


def test_the_tokenization_cache_is_keyed_by_the_images(tmp_path):
    model_dir = vlm.build("llava", tmp_path / "model")
    rows = vlm.rows(tmp_path / "images")
    data = write_rows(tmp_path / "pairs.jsonl", rows)
    assert not load_pairs(model_dir, data, tmp_path / "cache")[2].sources[0].cache_hit
    assert load_pairs(model_dir, data, tmp_path / "cache")[2].sources[0].cache_hit
    vlm.image(99).save(rows[0]["images"][0])  # same file, other pixels
    _, train, report = load_pairs(model_dir, data, tmp_path / "cache")
    assert not report.sources[0].cache_hit and len(train) == 4


def test_images_come_as_paths_bytes_records_or_pil(tmp_path):
    picture = vlm.image(0)
    picture.save(tmp_path / "a.png")
    encoded = (tmp_path / "a.png").read_bytes()
    for value in (
        str(tmp_path / "a.png"),
        encoded,
        {"bytes": encoded, "path": None},
        {"bytes": None, "path": str(tmp_path / "a.png")},
        picture,
    ):
        assert open_images([image_bytes(value)])[0].tobytes() == picture.tobytes()
    with pytest.raises(ValueError, match="must be an image path, bytes or image, got int"):
        image_bytes(3)
