"""``torch_compile``: compiled decoder layers and output head score and differentiate as the eager model does, packed
rows of new lengths compile nothing new, and a compiled run follows the eager run's loss curve.

Most of this file's time is inductor compiling (C++ kernels, each built with the compiler on a fresh machine). So
every model here has the built-in model's sizes (``ds_dpo.data.builtin``): parameter shapes are static in the graphs
and in the kernels' source, so identical kernels are built once and the run test reuses what the others compiled;
each layout's model is compiled once (``compiled``) and serves the equivalence and the recompile tests; inductor
builds kernels in this process rather than starting a pool of compile workers (on 2 cores the pool's start costs
more than it saves)."""

import pytest
import torch
from torch._dynamo.utils import counters

from ds_dpo.config import ConfigError
from ds_dpo.data import builtin
from ds_dpo.models.compilation import compile_layers, decoder_layers
from helpers.models import tiny_model
from helpers.pairs import PAIRS, named, score
from helpers.runs import cli, losses, set_up

VOCAB = 70
"""The built-in tokenizer's vocabulary (checked in the run test): the output layer is [VOCAB, hidden]."""
SIZES = {k: v for k, v in builtin.MODEL_CONFIG.items() if k != "max_position_embeddings"}
# the helpers' pairs (uneven lengths, an empty prompt, shared prompts), their token ids folded into VOCAB, 0 (pad) left out
FOLDED = [
    {key: [1 + t % (VOCAB - 1) for t in v] if key.endswith("_input_ids") else v for key, v in pair.items()}
    for pair in PAIRS
]


@pytest.fixture(scope="module", autouse=True)
def _compile_in_process():
    with torch._inductor.config.patch(compile_threads=1):
        yield


def builtin_sized(layout: str) -> torch.nn.Module:
    """A random model with the built-in model's sizes, in train mode as a run trains it (Llama has no dropout)."""
    model, _ = tiny_model("llama", layout=named(layout), vocab_size=VOCAB, head_dim=16, **SIZES)
    return model.train()


def forward_and_grad(model, layout, chunk=4, rows=FOLDED):
    """``rows`` scored with every statistic, and every parameter's gradient of a fixed objective of the log-probs."""
    model.zero_grad()
    out = score(model, rows, layout, chunk, with_wpo=True)
    (out.chosen * torch.arange(1.0, len(rows) + 1) - 0.7 * out.rejected).sum().backward()
    return out, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.fixture(scope="module")
def compiled():
    """Per layout: the model, compiled, and its eager and compiled log-probs and gradients; chunks of 4 tokens, so
    that the compiled head runs several chunks and a shorter last one."""
    results = {}
    for layout in ("packed", "padded"):
        model = builtin_sized(layout)
        eager = forward_and_grad(model, layout)
        graphs = counters["stats"]["unique_graphs"]
        assert compile_layers(model) == 2
        results[layout] = model, eager, forward_and_grad(model, layout)
        # dynamo compiled this layout's layer (forward and backward) and head: the code above ran compiled
        assert counters["stats"]["unique_graphs"] > graphs
    return results


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_compiled_layers_give_the_eager_logps_and_gradients(compiled, layout):
    """Sequence log-probs (every statistic, WPO's included) and every parameter's gradient, inductor-compiled: equal
    to the eager model's to 1e-5 relative (seen: 0 for log-probs, 2e-7 for gradients)."""
    model, (eager, eager_grad), (got, got_grad) = compiled[layout]
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in decoder_layers(model))
    for side in ("chosen", "rejected", "chosen_wpo", "rejected_wpo"):
        assert relative(getattr(got, side), getattr(eager, side)) <= 1e-5, side
    assert relative(got_grad, eager_grad) <= 1e-5


def test_packed_rows_of_new_lengths_compile_nothing_new(compiled):
    """Dynamic shapes: after the compiled micro-batch, four packed micro-batches of other lengths (and other numbers
    of sequences and of chunks) run on the graphs already compiled. With static shapes each new length would compile
    again."""
    model = compiled["packed"][0]
    before = counters["stats"]["unique_graphs"]
    assert before > 0
    later = [[(7, 2, 4)], [(3, 3, 3), (5, 8, 2)], [(9, 4, 6), (2, 2, 7), (6, 5, 3)], [(11, 9, 8)]]
    for seed, lengths in enumerate(later, start=1):
        g = torch.Generator().manual_seed(seed)
        ids = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
        rows = [
            {"index": i, "prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)}
            for i, (p, c, r) in enumerate(lengths)
        ]
        # one chunk each: chunks of 4 could leave a last chunk of 1 token, a size dynamo specialises (a new graph,
        # though not for a new length)
        forward_and_grad(model, "packed", chunk=1024, rows=rows)
    assert counters["stats"]["unique_graphs"] == before


def test_a_compiled_run_follows_the_eager_loss_curve(single_rank, builtin_files, tmp_path):
    """2 steps of the built-in task on one in-process ZeRO-3 rank with a ZeRO-3 reference engine (its compiled layers
    run frozen, under no_grad) and prefix-shared rows: every step's loss with ``torch_compile`` equals the eager
    run's to 1e-5 relative (seen: 2e-7). No self-check and no evaluation: their padded and eval-mode graphs would
    only add compile time, and the tests above compare compiled scoring with eager in both layouts."""
    # dynamo keeps its graphs per code object (every Llama layer's `forward`): the other tests' graphs would use up
    # part of its recompile limit (8 per function), after which a function runs eagerly. Inductor's caches stay:
    # the training graphs are those of the tests above (same sizes), compiled again from them
    torch._dynamo.reset()
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(open(builtin_files["dataset"]).readlines()[:16]))
    curves = {}
    for compiled in ("false", "true"):
        out = tmp_path / compiled
        recipe = set_up(
            *cli(model_name_or_path=builtin_files["model_name_or_path"], dataset=data, output_dir=out),
            *cli(deepspeed="ds_configs/zero3.json"),  # ZeRO-3's hooks are what compiled layers must live with
            *cli(max_steps=2, per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=1, save_steps=0),
            scoring_self_check="false",
            torch_compile=compiled,
        )
        assert recipe.tokenizer is not None and len(recipe.tokenizer) == VOCAB
        graphs = counters["stats"]["unique_graphs"]
        assert recipe.train().status == "finished"
        if compiled == "true":  # the layers and the head ran compiled
            assert counters["stats"]["unique_graphs"] > graphs
        recipe.cleanup()
        curves[compiled] = losses(out)
    assert len(curves["true"]) == 2
    for got, expected in zip(curves["true"], curves["false"]):
        assert got == pytest.approx(expected, rel=1e-5)


def test_a_router_loss_is_refused_and_allowed_off():
    """Mixtral's router loss reads router logits through hooks that a compiled layer ignores when it was first
    compiled without them (seen: ``aux_loss`` None): compiling with the loss on is refused, naming the key that turns
    it off; with it off the layers compile."""
    model, _ = tiny_model("mixtral", layout=named("packed"))
    with pytest.raises(ConfigError, match="router_aux_loss_coef: 0"):
        compile_layers(model, None)  # the model config's coefficient, 0.001
    assert compile_layers(model, 0.0) == 2
