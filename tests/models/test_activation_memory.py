"""Tiled MLPs and CPU offload of checkpointed hidden states (``ds_dpo.models.activation_memory``): the same log-probs and
gradients as the plain model, and the same number of weight gathers on every rank whatever its row length."""

import pytest
import torch
from deepspeed.runtime.activation_checkpointing.offload_activations import CheckpointHiddenStatesOffload

from ds_dpo.config import ConfigError
from ds_dpo.forward.layouts import SHARED
from ds_dpo.models.activation_memory import checkpoint_offload, dense_mlps, tile_mlps
from helpers.models import tiny_model
from helpers.pairs import forward_and_grad


def trainable(family: str, **overrides):
    model, _ = tiny_model(family, layout=SHARED, **overrides)
    for module in model.modules():  # train mode (checkpointing acts only there) without dropout
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.train()


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_mlps_give_the_plain_models_logps_and_gradients(family, checkpointing):
    plain, tiled = trainable(family), trainable(family)  # the same weights
    assert tile_mlps(tiled, 3) == 2  # both layers
    for model in (plain, tiled):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for layout in ("padded", "shared"):
        expected, expected_grad = forward_and_grad(plain, layout, 4)
        got, grad = forward_and_grad(tiled, layout, 4)
        torch.testing.assert_close(got.chosen, expected.chosen, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.rejected, expected.rejected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_every_row_length_makes_the_same_number_of_slice_calls():
    """Under ZeRO-3 each slice's forward gathers the MLP's weights: ranks whose rows differ in length must still make
    the same number of calls (forward: one per slice; backward: one per slice again)."""
    model = trainable("llama")
    mlp = dense_mlps(model)[0]
    calls = []
    forward = mlp.forward
    mlp.forward = lambda x: calls.append(x.shape[-2]) or forward(x)
    reference = dense_mlps(trainable("llama"))[0]  # the same weights, untiled
    tile_mlps(model, 4)
    for length in (1, 3, 5, 13, 16):
        calls.clear()
        x = torch.randn(2, length, 32, requires_grad=True)
        out = mlp(x)
        out.pow(2).sum().backward()
        assert len(calls) == 8, (length, calls)
        x_ref = x.detach().clone().requires_grad_()
        expected = reference(x_ref)
        expected.pow(2).sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_mixture_of_experts_blocks_are_left_alone():
    model = trainable("qwen2_moe")
    with pytest.raises(ConfigError, match="no dense MLP"):
        tile_mlps(model, 2)
    plain, mixed = (trainable("qwen2_moe", mlp_only_layers=[0]) for _ in range(2))  # layer 0 dense, 1 routed
    assert tile_mlps(mixed, 2) == 1
    expected, expected_grad = forward_and_grad(plain, "shared", 0)
    got, grad = forward_and_grad(mixed, "shared", 0)
    torch.testing.assert_close(got.chosen, expected.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_offloading_moves_each_checkpointed_layer_input_and_restores_it_for_backward(monkeypatch):
    """DeepSpeed offloads only tensors on an accelerator; here its host copies are forced for CPU tensors too, so the
    whole copy-out / copy-back path runs and gradients must still equal the run without it."""
    model = trainable("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    expected, expected_grad = forward_and_grad(model, "shared", 4)
    offload = checkpoint_offload(True)
    with offload:
        forward_and_grad(model, "shared", 4)
    assert offload.stats.marked_tensors == 2 and offload.stats.offloaded_tensors == 0  # nothing to move off a CPU

    monkeypatch.setattr(
        CheckpointHiddenStatesOffload,
        "_should_skip",
        lambda self, t: self._num_bytes(t) < self.min_offload_bytes,
        raising=False,
    )
    offload = checkpoint_offload(True)
    with offload:
        got, grad = forward_and_grad(model, "shared", 4)
    # DeepSpeed keeps the last layer's input where it is (backward needs it first)
    assert offload.stats.offloaded_tensors == offload.stats.restored_tensors == 1
    assert offload.stats.kept_last_tensors == 1
    torch.testing.assert_close(got.chosen, expected.chosen, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
