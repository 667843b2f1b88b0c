"""Batch layouts: B tokenized pairs become one micro-batch, padded or padding-free, and the attention inputs that
keep the sequences of a padding-free row apart. Each layout is a ``Layout`` (``PADDED``, ``PACKED``, ``SHARED``,
``SEQ2SEQ``): a run picks one once (``ds_dpo.plan``) and hands it to whatever builds or reads its batches, so no code
asks a batch which layout it is.

``padded`` (N = 2B rows, chosen first, T = longest prompt + completion):

    input_ids       [N, T] long   prompt + completion, right-padded with ``pad_token_id``
    attention_mask  [N, T] long   1 on real tokens

``packed``: the 2B sequences ``prompt + chosen`` and ``prompt + rejected`` of B pairs concatenated into one row,
``position_ids`` restarting at 0 for each. ``shared`` (prefix sharing): each distinct prompt of the micro-batch once,
followed by each distinct response to it, ``prompt | response 1 | ... | response K``; every response continues the
positions from the end of the prompt and cannot attend to the other responses, so each of its tokens sees exactly
``prompt + response[:t]``. A pair's prompt is computed once instead of twice, and pairs that share a prompt (the K
responses of one prompt, ``ds_dpo.data.formats``) share its pass and each response's: K responses in C(K, 2) pairs cost
one prompt and K responses. Both are one row of S tokens without padding:

    input_ids, position_ids, segment, branch   [1, S]

``seq2seq`` (encoder-decoder models): the prompt is the encoder's input, once per pair; chosen and rejected are
decoder rows that read their pair's encoder output (decoder row j reads prompt j mod B):

    input_ids, attention_mask                [B, Tp]   prompts, right-padded
    labels, decoder_attention_mask          [2B, Tc]  completions (chosen first), ``labels`` -100 on padding

The model makes its decoder inputs from ``labels`` (``prepare_decoder_input_ids_from_labels``: its decoder start
token, then the labels shifted right), so decoder position t predicts completion token t.

Which tokens may attend to which is described per token by ``segment`` (the block it belongs to in the row) and
``branch`` (0 prompt, k the block's response k), and turned into the attention kernel's input in ``Layout.model_inputs``:

- flash-attention (``attn_implementation`` containing ``flash``): no mask; packed, the kernel's varlen path finds
  sequence boundaries where ``position_ids`` restart; shared, each block's query runs and the keys each of them reads
  (``ds_dpo.forward.attention.shared_varlen_inputs``).
- ds_dpo's block attention (``ds_dpo.forward.attention``, the default for sdpa and eager): the row's ``Blocks``, each with
  its own small mask, and a stride-0 stand-in where the model expects a mask;
- everything else (models that cannot take a custom attention function): a 4D [1, 1, S, S] mask, bool for sdpa,
  additive float for the others; ``position_ids`` restarting alone does not isolate sequences there. A 4D mask is used by the model as it is, so
  sliding-window attention (Mistral, Phi-3, Gemma-2/3, Cohere-2, ...) must be in it: a token attends only to keys
  fewer than ``sliding_window`` positions back, and chunked attention (Llama-4) must too: a token attends only to keys
  in its own chunk of ``attention_chunk_size`` positions. Models that mix full layers with sliding or chunked ones
  (``config.layer_types``) take one mask per layer type.

Every layout also carries the scored tokens (M of them; see ``ds_dpo.forward.logprobs``) of its U scored sequences (2B, or
fewer when shared responses are scored once), which of them each pair compares, and the pairs' bookkeeping:

    score_index, score_labels, score_sequence, score_rank   [M] long
    sequence_tokens                         [U] long   scored tokens of each sequence
    chosen_sequence, rejected_sequence      [B] long   the pair's two sequences among the U
    index        [B] long   row index in the dataset (keys precomputed reference log-probs)
    weight       [B] float  1 for a real pair, 0 for a filler that only keeps ranks in step
    pair_tokens  [B] long   prompt + chosen + prompt + rejected tokens (the pair's real tokens, in any layout)
    distinct_tokens    [] long  the real pairs' distinct tokens: each distinct prompt once, each distinct response
                                 to it once (the least any layout must compute; ``distinct_tokens``)
    forward_positions  [] long  positions the forward computes: every row's, padding and repeated prompts included
                                 (``seq2seq``: encoder and decoder positions)
    ref_chosen_logps, ref_rejected_logps  [B] float, only when the dataset carries precomputed reference log-probs
    pixel_values (+ pixel_attention_mask, image_sizes or image_grid_thw)  a vision-language model's images in the
        layout's order (``ds_dpo.data.images``)
    token_type_ids  like input_ids, 1 on image tokens, for models whose image tokens attend bidirectionally within
        their image (Gemma-3): the model's own mask reads them in a padded batch; a packed or shared row keeps them
        out of the model and puts each image's bidirectional attention into its own masks
        (``ds_dpo.forward.attention.image_groups``)
    mm_token_type_ids  like input_ids, 1 on image tokens, for models that place them by 3D positions (M-RoPE:
        Qwen2-VL, Qwen2.5-VL, Qwen3-VL): a padded batch hands them to the model, which computes its positions from them
    mrope_position_ids  [3, 1, S] such a model's positions in a packed or shared row (``mrope_positions``): each
        sequence's as the model computes them for it alone, a shared block's responses continuing from its prompt's
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ds_dpo.data.images import IMAGE_KEYS
from ds_dpo.forward.attention import (
    PROMPT,
    Blocks,
    attention_chunk,
    flex_block_mask,
    image_groups,
    is_block_attention,
    packed_attention_mask,
    shared_varlen_inputs,
    stand_in_mask,
)


def is_varlen(attn_implementation: str) -> bool:
    """Kernels that take packed sequences from ``position_ids`` (and no mask)."""
    return "flash" in attn_implementation


class ScoredTokens:
    """Collects the scored-token description of a batch (see ``ds_dpo.forward.logprobs``)."""

    def __init__(self):
        self.index, self.labels, self.sequence, self.rank = [], [], [], []

    def add(self, sequence: int, completion: list[int], before: int | None, start: int) -> None:
        """Score ``completion``, whose tokens sit at flat positions ``start, start + 1, ...`` and follow the token at
        flat position ``before`` (the prompt's last; None for an empty prompt: then nothing predicts the
        completion's first token, which is not scored)."""
        predictors = list(range(start, start + len(completion) - 1))
        labels = completion
        if before is None:
            labels = completion[1:]
        else:
            predictors.insert(0, before)
        self.index += predictors
        self.labels += labels
        self.sequence += [sequence] * len(labels)
        self.rank += range(1, len(labels) + 1)

    def tensors(self, num_sequences: int, chosen: list[int], rejected: list[int]) -> dict[str, torch.Tensor]:
        """The scored tokens of ``num_sequences`` sequences, pair i comparing ``chosen[i]`` with ``rejected[i]``."""
        sequence = torch.tensor(self.sequence, dtype=torch.long)
        return {
            "score_index": torch.tensor(self.index, dtype=torch.long),
            "score_labels": torch.tensor(self.labels, dtype=torch.long),
            "score_sequence": sequence,
            "score_rank": torch.tensor(self.rank, dtype=torch.long),
            "sequence_tokens": torch.bincount(sequence, minlength=num_sequences),
            "chosen_sequence": torch.tensor(chosen, dtype=torch.long),
            "rejected_sequence": torch.tensor(rejected, dtype=torch.long),
        }

    def pairs_in_order(self, b: int) -> dict[str, torch.Tensor]:
        """``tensors`` for 2B sequences numbered chosen 0..B-1, then rejected B..2B-1."""
        return self.tensors(2 * b, list(range(b)), list(range(b, 2 * b)))


def prompt_blocks(rows: list[dict[str, Any]]) -> list[list[int]]:
    """The pairs of each distinct prompt among ``rows`` (the same token ids and images), in order of first
    appearance: the blocks of a ``shared`` row."""
    members: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        members.setdefault((tuple(row["prompt_input_ids"]), tuple(row.get("images") or ())), []).append(i)
    return list(members.values())


class PaddingFreeRow:
    """A [1, S] row being built: each token with its position, block (``segment``) and ``branch``."""

    def __init__(self):
        self.tokens, self.positions, self.segment, self.branch = [], [], [], []

    def append(self, ids: list[int], first_position: int, kind: int, block: int) -> int:
        """Add ``ids`` at positions ``first_position, ...``; returns the flat position of the first."""
        start = len(self.tokens)
        self.tokens.extend(ids)
        self.positions.extend(range(first_position, first_position + len(ids)))
        self.segment.extend([block] * len(ids))
        self.branch.extend([kind] * len(ids))
        return start

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.tensor([self.tokens], dtype=torch.long),
            "position_ids": torch.tensor([self.positions], dtype=torch.long),
            "segment": torch.tensor([self.segment], dtype=torch.long),
            "branch": torch.tensor([self.branch], dtype=torch.int16),
        }


def pack_pairs(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The ``packed`` layout: each sequence ``prompt + completion`` its own block."""
    b, row, scores = len(rows), PaddingFreeRow(), ScoredTokens()
    for i, pair in enumerate(rows):
        prompt, p = pair["prompt_input_ids"], len(pair["prompt_input_ids"])
        for sequence, completion in ((i, pair["chosen_input_ids"]), (b + i, pair["rejected_input_ids"])):
            start = row.append(prompt, 0, PROMPT, sequence)
            scores.add(sequence, completion, start + p - 1 if p else None, row.append(completion, p, 1, sequence))
    return row.tensors() | scores.pairs_in_order(b)


def share_prompts(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The ``shared`` layout: a block per distinct prompt (``prompt_blocks``), then each distinct response to it,
    numbered 1, 2, ... in its block and scored once, whichever pairs compare it."""
    row, scores = PaddingFreeRow(), ScoredTokens()
    responses: dict[tuple, int] = {}  # (block, response ids) -> its sequence number
    sides = [[0, 0] for _ in rows]
    for block, pairs in enumerate(prompt_blocks(rows)):
        prompt = rows[pairs[0]]["prompt_input_ids"]
        start = row.append(prompt, 0, PROMPT, block)
        before = start + len(prompt) - 1 if prompt else None
        first = len(responses)
        for i in pairs:
            for side, name in enumerate(("chosen", "rejected")):
                completion = rows[i][f"{name}_input_ids"]
                key = (block, tuple(completion))
                if key not in responses:
                    responses[key] = len(responses)
                    kind = responses[key] - first + 1
                    scores.add(responses[key], completion, before, row.append(completion, len(prompt), kind, block))
                sides[i][side] = responses[key]
    return row.tensors() | scores.tensors(len(responses), *map(list, zip(*sides)))


def pad_pairs(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The ``padded`` layout."""
    b = len(rows)
    sequences = [(row["prompt_input_ids"], row[f"{side}_input_ids"]) for side in ("chosen", "rejected") for row in rows]
    t = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((2 * b, t), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((2 * b, t), dtype=torch.long)
    scores = ScoredTokens()
    for i, (prompt, completion) in enumerate(sequences):
        p, n = len(prompt), len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        attention_mask[i, :n] = 1
        scores.add(i, completion, i * t + p - 1 if p else None, i * t + p)
    return {"input_ids": input_ids, "attention_mask": attention_mask, **scores.pairs_in_order(b)}


def encoder_decoder_pairs(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """The ``seq2seq`` layout."""
    b = len(rows)
    prompts = [row["prompt_input_ids"] for row in rows]
    completions = [row[f"{side}_input_ids"] for side in ("chosen", "rejected") for row in rows]
    tp, tc = max(map(len, prompts)), max(map(len, completions))
    input_ids = torch.full((b, tp), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((b, tp), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, : len(prompt)] = torch.tensor(prompt)
        attention_mask[i, : len(prompt)] = 1
    labels = torch.full((2 * b, tc), -100, dtype=torch.long)
    decoder_attention_mask = torch.zeros((2 * b, tc), dtype=torch.long)
    scores = ScoredTokens()
    for j, completion in enumerate(completions):
        labels[j, : len(completion)] = torch.tensor(completion)
        decoder_attention_mask[j, : len(completion)] = 1
        scores.add(j, completion, j * tc, j * tc + 1)  # decoder position t predicts token t
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "decoder_attention_mask": decoder_attention_mask,
        **scores.pairs_in_order(b),
    }


def sliding_window(config) -> tuple[int | None, bool]:
    """The model's attention window and whether only some layers use it (then masks go per ``layer_types``)."""
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if not window or getattr(text, "use_sliding_window", True) is False:
        return None, False
    layer_types = set(getattr(text, "layer_types", None) or ())
    return window, "sliding_attention" in layer_types and len(layer_types) > 1


def mrope_positions(batch: dict[str, torch.Tensor], image_token: int, merge_size: int) -> torch.Tensor:
    """[3, 1, S] (temporal, height, width) positions of a padding-free row of a model with 3D positions (Qwen2-VL,
    Qwen2.5-VL, Qwen3-VL), each sequence's as the model's ``get_rope_index`` makes them for that sequence alone. The
    tokens of an image with a grid of t x h x w merged patches sit at (start + i, start + j, start + k) for its patch
    (i, j, k), start being where the image begins; the text after it continues from start + max(h, w), so every token
    after an image moves by max(h, w) - t * h * w from its 1D position. The move lasts to the end of the image's
    sequence (packed) or block (shared, where every response continues from its prompt's positions, as in the plain
    forward of prompt + response): up to the next token at position 0. ``batch["image_grid_thw"]`` lists the images in
    the order their tokens appear in the row, as every layout lays them out."""
    ids, positions = batch["input_ids"][0], batch["position_ids"][0]
    image_at = (ids == image_token).nonzero().flatten().tolist()
    starts = (positions == 0).nonzero().flatten().tolist() + [len(ids)]
    shift = torch.zeros_like(positions)
    grids, k = [], 0
    for t, h, w in batch["image_grid_thw"].tolist() if "image_grid_thw" in batch else []:
        h, w = h // merge_size, w // merge_size
        first, n = image_at[k], t * h * w
        if image_at[k + n - 1] != first + n - 1:
            raise ValueError(f"an image of {n} tokens is not one run of image tokens at position {first} of the row")
        grids.append((first, int(positions[first] + shift[first]), (t, h, w)))
        shift[first + n : next(s for s in starts if s > first)] += max(h, w) - n
        k += n
    if k != len(image_at):
        raise ValueError(f"{len(image_at)} image tokens in the row for images of {k} tokens")
    out = (positions + shift).expand(3, -1).clone()
    for first, start, (t, h, w) in grids:
        grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        out[:, first : first + t * h * w] = torch.stack(grid).reshape(3, -1) + start
    return out[:, None]


def _pixels(batch: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: batch[k].to(dtype) if batch[k].is_floating_point() else batch[k] for k in IMAGE_KEYS if k in batch}


def _padding_free_inputs(batch: dict[str, torch.Tensor], config, dtype: torch.dtype, shared: bool) -> dict:
    """A packed or prefix-shared row's keyword arguments: ``position_ids`` and, unless the kernel is varlen, the 4D
    mask (or one per layer type): ds_dpo's blocks with a stand-in, a FlexAttention block mask, or a dense mask."""
    attn = config._attn_implementation
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], **_pixels(batch, dtype)}
    if "mrope_position_ids" in batch:  # [4, 1, S]: the 1D positions first, which the model's kernels read as any's
        inputs["position_ids"] = torch.cat([batch["position_ids"][None], batch["mrope_position_ids"]])
    image = image_groups(batch["token_type_ids"]) if "token_type_ids" in batch else None
    if is_varlen(attn):
        if image is not None:
            raise ValueError(f"{attn} cannot attend bidirectionally within images in a padding-free row")
        # a shared block holding several responses reads its prompt's keys once per response
        several = shared and bool((batch["branch"] > 1).any())
        return inputs | (shared_varlen_inputs(batch["segment"], batch["branch"]) if several else {})
    if is_block_attention(attn):  # per-block kernels: no row-wide mask exists
        additive = None if attn.endswith("sdpa") else dtype
        inputs["ds_dpo_blocks"] = Blocks.of_row(
            batch["segment"], batch["branch"], batch["position_ids"], additive, image
        )
        stand_in = stand_in_mask(batch["input_ids"].shape[1], batch["input_ids"].device)
        _, per_layer_type = sliding_window(config)
        inputs["attention_mask"] = (
            {"full_attention": stand_in, "sliding_attention": stand_in} if per_layer_type else stand_in
        )
        return inputs
    if attn == "flex_attention":  # a block mask: masked tiles are skipped, not computed
        mask = functools.partial(flex_block_mask, batch["segment"], batch["branch"], batch["position_ids"], image=image)
    else:
        mask = functools.partial(
            packed_attention_mask, batch["segment"], batch["branch"], attn, dtype, batch["position_ids"], image=image
        )
    window, per_layer_type = sliding_window(config)
    chunk = attention_chunk(config.get_text_config())
    if not per_layer_type and chunk is None:
        inputs["attention_mask"] = mask(window)
        return inputs
    inputs["attention_mask"] = masks = {"full_attention": mask()}  # the model picks each layer's by its type
    if per_layer_type:
        masks["sliding_attention"] = mask(window)
    if chunk is not None:
        masks["chunked_attention"] = mask(chunk=chunk)
    return inputs


class Layout:
    """How a micro-batch's pairs are laid out: the strategy a run picks once (``RunPlan.layout``) and hands to every
    piece that builds or reads its batches. One instance per layout: ``PADDED``, ``PACKED``, ``SHARED``,
    ``SEQ2SEQ``."""

    name: str
    padding_free = False
    """One [1, S] row of sequence blocks (``segment``/``branch``), attention kept within each block."""
    prompt_once = False
    """A pair's prompt is computed once (prefix-shared, or encoded once), not once per completion."""

    def __repr__(self) -> str:
        return self.name

    __str__ = __repr__

    @property
    def plain(self) -> Layout:
        """The layout whose batches a model's own forward scores as they are (what the self-check compares with)."""
        return PADDED

    def forward_tokens(self, prompt, chosen, rejected):
        """Tokens a pair puts into a forward: the prompt once when shared (or encoded), else twice (ints or arrays)."""
        return (1 if self.prompt_once else 2) * prompt + chosen + rejected

    def collate(self, rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
        """The token tensors and scored-token description of ``rows`` in this layout."""
        raise NotImplementedError

    def image_rows(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[list[int]]]:
        """The rows whose images the batch carries and which of them each text row of the batch holds, in order
        (``VisionInputs`` lays the pixels out so)."""
        raise ValueError(f"images cannot be laid out in the {self.name} layout")

    def model_inputs(self, batch: dict[str, torch.Tensor], config, dtype: torch.dtype) -> dict:
        """The keyword arguments for the forward of a model with ``config`` (its ``_attn_implementation`` picks how
        a padding-free row's blocks are kept apart)."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], **_pixels(batch, dtype)}
        return inputs | {k: batch[k] for k in ("token_type_ids", "mm_token_type_ids") if k in batch}


class _Padded(Layout):
    name = "padded"

    def collate(self, rows, pad_token_id):
        return pad_pairs(rows, pad_token_id)

    def image_rows(self, rows):
        return rows, [[i] for i in range(len(rows))] * 2  # chosen rows, then rejected rows


class _Packed(Layout):
    name, padding_free = "packed", True

    def collate(self, rows, pad_token_id):
        return pack_pairs(rows)

    def image_rows(self, rows):
        return rows, [[i for i in range(len(rows)) for _ in range(2)]]  # each pair's prompt twice, in one row

    def model_inputs(self, batch, config, dtype):
        return _padding_free_inputs(batch, config, dtype, shared=False)


class _Shared(_Packed):
    name, prompt_once = "shared", True

    def collate(self, rows, pad_token_id):
        return share_prompts(rows)

    def image_rows(self, rows):
        blocks = [rows[pairs[0]] for pairs in prompt_blocks(rows)]  # each distinct prompt's images once
        return blocks, [list(range(len(blocks)))]

    def model_inputs(self, batch, config, dtype):
        return _padding_free_inputs(batch, config, dtype, shared=True)


class _Seq2Seq(Layout):
    name, prompt_once = "seq2seq", True

    @property
    def plain(self) -> Layout:
        return self

    def collate(self, rows, pad_token_id):
        return encoder_decoder_pairs(rows, pad_token_id)

    def model_inputs(self, batch, config, dtype):
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "decoder_attention_mask")}


PADDED, PACKED, SHARED = _Padded(), _Packed(), _Shared()
SEQ2SEQ = _Seq2Seq()
"""An encoder-decoder model's only layout: the prompt encoded once per pair, chosen and rejected decoded from it."""
LAYOUTS = {layout.name: layout for layout in (PADDED, PACKED, SHARED)}
"""A decoder-only model's layouts, by name."""


def layout_for(padding_free: bool, prefix_sharing: bool) -> Layout:
    """The layout the batch keys ask for (prefix sharing needs padding-free batches)."""
    if not padding_free:
        return PADDED
    return SHARED if prefix_sharing else PACKED


def distinct_tokens(rows: list[dict[str, Any]]) -> int:
    """The distinct tokens of ``rows``: each distinct prompt (``prompt_blocks``) once, each distinct response to it
    once; what the ``shared`` layout computes, the least any layout can."""
    total = 0
    for pairs in prompt_blocks(rows):
        responses = {tuple(rows[i][f"{side}_input_ids"]) for i in pairs for side in ("chosen", "rejected")}
        total += len(rows[pairs[0]]["prompt_input_ids"]) + sum(map(len, responses))
    return total


def collate_pairs(
    rows: list[dict[str, Any]], weights: list[float], pad_token_id: int, layout: Layout, vision=None
) -> dict[str, torch.Tensor]:
    """The micro-batch of ``rows`` in ``layout``; ``vision``: a vision-language model's ``VisionInputs``, which makes
    the pixel tensors of the rows' ``images``."""
    batch = layout.collate(rows, pad_token_id)
    batch["index"] = torch.tensor([row["index"] for row in rows], dtype=torch.long)
    batch["weight"] = torch.tensor(weights, dtype=torch.float32)
    batch["pair_tokens"] = torch.tensor(
        [
            2 * len(row["prompt_input_ids"]) + len(row["chosen_input_ids"]) + len(row["rejected_input_ids"])
            for row in rows
        ],
        dtype=torch.long,
    )
    batch["distinct_tokens"] = torch.tensor(distinct_tokens([row for row, w in zip(rows, weights) if w > 0]))
    batch["forward_positions"] = torch.tensor(sum(batch[k].numel() for k in ("input_ids", "labels") if k in batch))
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        if column in rows[0]:
            batch[column] = torch.tensor([row[column] for row in rows], dtype=torch.float32)
    if vision is not None:
        image_rows, text_rows = layout.image_rows(rows)
        batch.update(vision([row["images"] for row in image_rows], text_rows))
        batch.update(vision.token_types(batch["input_ids"]))
        if layout.padding_free and vision.mrope_image_token is not None:
            batch["mrope_position_ids"] = mrope_positions(batch, vision.mrope_image_token, vision.merge_size)
            del batch["mm_token_type_ids"]  # the model's only use of them is to compute these positions
    return batch
