import torch

from ds_dpo.training.metrics import MetricAccumulator
from ds_dpo.training.state import TrainState


def test_nan_streak_counts_consecutive_skipped_steps_and_state_round_trips():
    state = TrainState(MetricAccumulator(torch.device("cpu")))
    for skipped in (0, 1, 2, 2, 3):  # DeepSpeed's running count of skipped updates after each step
        state.finish_step(epoch=0, done_in_epoch=state.done_in_epoch + 1, skipped_steps=skipped)
    assert (state.step, state.done_in_epoch, state.nan_streak, state.skipped_steps) == (5, 5, 1, 3)
    state.window.sums += torch.arange(len(state.window.sums), dtype=state.window.sums.dtype)
    state.learning_rate = 1e-4
    restored = TrainState(MetricAccumulator(torch.device("cpu")))
    restored.load_state_dict(state.state_dict())
    assert restored.state_dict() == state.state_dict()
    assert torch.equal(restored.window.sums, state.window.sums)
