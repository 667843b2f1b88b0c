"""The run's progress: the one object the training loop advances and a checkpoint saves and restores.

Everything else a resumed run needs is either the engine's own state (weights, optimizer, LR schedule, DeepSpeed's
count of skipped updates), restored by DeepSpeed, or derived from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

from ds_dpo.training.metrics import MetricAccumulator


@dataclass
class TrainState:
    window: MetricAccumulator
    """Statistics of the micro-batches since the last log (a checkpoint between logs keeps them)."""
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """The epoch the last step belonged to."""
    done_in_epoch: int = 0
    """Steps of that epoch done; the sampler continues after them."""
    nan_streak: int = 0
    """Optimizer steps in a row that DeepSpeed skipped for a non-finite loss or gradient norm."""
    skipped_steps: int = 0
    """DeepSpeed's count of skipped updates when the last step ended (kept by the engine, mirrored here)."""
    learning_rate: float = 0.0
    """The learning rate the last update used (what the logs report)."""
    num_tokens: int = 0
    """Real tokens (prompt with each completion, as TRL counts them) trained on in the logged windows."""
    best: dict | None = None
    """The best checkpoint so far by ``metric_for_best_model``: ``{step, metric, value}`` (HF's
    ``best_model_checkpoint``, ``best_metric``); None before one is saved after an evaluation."""

    def finish_step(self, epoch: int, done_in_epoch: int, skipped_steps: int) -> None:
        """Count one optimizer step of ``epoch``; ``skipped_steps`` is the engine's count after it."""
        self.step += 1
        self.epoch, self.done_in_epoch = epoch, done_in_epoch
        self.nan_streak = self.nan_streak + 1 if skipped_steps > self.skipped_steps else 0
        self.skipped_steps = skipped_steps

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "done_in_epoch": self.done_in_epoch,
            "nan_streak": self.nan_streak,
            "learning_rate": self.learning_rate,
            "num_tokens": self.num_tokens,
            "best": self.best,
            "metric_window": self.window.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.done_in_epoch = state["step"], state["epoch"], state["done_in_epoch"]
        self.nan_streak = state.get("nan_streak", 0)
        self.learning_rate, self.num_tokens = state["learning_rate"], state.get("num_tokens", 0)
        self.best = state.get("best")
        self.window.load_state_dict(state["metric_window"])
