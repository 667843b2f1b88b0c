"""Where metrics go: the rank-0 progress bar and the ``report_to`` destinations.

``output_dir/metrics.jsonl`` (one JSON object per log, with ``step``, TRL's names); TensorBoard, laid out as the HF
Trainer writes it (so TRL users' dashboards match): one folder per run (``logging_dir/<run_name>``), tags
``train/<name>`` and ``eval/<name>``, a custom-scalars layout that puts the train and eval curves of each metric on
one chart, and at each log histograms of the window's per-pair margins and rewards, tagged
``train/rewards/margins_histogram`` etc. (all ranks' pairs; a resumed run's first window has only the pairs after the
resume); Weights & Biases, with the same tags and histograms, as HF's integration logs them. Replies to held-out
prompts (``generate_during_eval``, ``ds_dpo.training.samples``) go to TensorBoard's text tab
(``eval/samples/policy/text_summary``, ``eval/samples/reference/text_summary``: a markdown table per evaluation), a
wandb table (``eval/samples``) and ``output_dir/samples.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import torch

from ds_dpo.training.metrics import PAIR_KEYS
from ds_dpo.training.samples import Sample


def tensorboard_tag(name: str) -> str:
    """HF Trainer's TensorBoard tag of a metric: ``eval_loss`` -> ``eval/loss``, ``loss`` -> ``train/loss``."""
    return f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"


def samples_markdown(samples: list[Sample]) -> str:
    """A markdown table of prompts and replies, as TensorBoard's text tab renders it (cells on one line each)."""
    cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>") or " "  # noqa: E731
    return "\n".join(
        ["| prompt | reply |", "|---|---|", *(f"| {cell(s.prompt)} | {cell(s.completion)} |" for s in samples)]
    )


def histogram_tag(name: str) -> str:
    """The tag of a metric's per-pair histogram: ``rewards/margins`` -> ``train/rewards/margins_histogram``. Not the
    scalar's tag: TensorBoard keeps one kind of data per tag (the first it reads), so a histogram under the scalar's
    tag empties the scalar chart and is not shown itself, and in a wandb row it would replace the scalar."""
    return f"{tensorboard_tag(name)}_histogram"


# train and eval on one chart, for every metric evaluation also reports
_PAIRED_LAYOUT = {
    "train vs eval": {
        name: ["Multiline", [tensorboard_tag(name), tensorboard_tag(f"eval_{name}")]]
        for name in PAIR_KEYS + ("logits/chosen", "logits/rejected")
    }
}


class _TensorBoard:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir))
        self.writer.add_custom_scalars(_PAIRED_LAYOUT)

    def log(self, step: int, metrics: dict[str, float], distributions: dict[str, torch.Tensor]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(tensorboard_tag(name), value, step)
        for name, values in distributions.items():
            self.writer.add_histogram(histogram_tag(name), values, step)
        self.writer.flush()

    def log_samples(self, step: int, samples: list[Sample]) -> None:
        for model in dict.fromkeys(s.model for s in samples):
            self.writer.add_text(
                f"eval/samples/{model}", samples_markdown([s for s in samples if s.model == model]), step
            )
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Jsonl:
    def __init__(self, path: Path):
        self.file = path.open("a")
        self.samples_path = path.with_name("samples.jsonl")

    def log(self, step: int, metrics: dict[str, float], distributions: dict[str, torch.Tensor]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def log_samples(self, step: int, samples: list[Sample]) -> None:
        with self.samples_path.open("a") as file:  # only runs that generate have the file
            file.writelines(json.dumps(dataclasses.asdict(s)) + "\n" for s in samples)

    def close(self) -> None:
        self.file.close()


class _Wandb:
    """HF Trainer's wandb layout: the TensorBoard tags, plotted against ``train/global_step`` (so a resumed run that
    logs a step again is not dropped as out of order). A resumed run continues the same wandb run: its id is kept in
    ``output_dir/wandb_run_id``."""

    def __init__(self, output_dir: Path, run_name: str, resumed: bool, config: dict):
        import wandb

        id_file = output_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ds_dpo"),
            name=run_name,
            id=run_id,
            resume="allow",
            dir=str(output_dir),
            config=config,
        )
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        self.histogram, self.table = wandb.Histogram, wandb.Table

    def log(self, step: int, metrics: dict[str, float], distributions: dict[str, torch.Tensor]) -> None:
        record = {tensorboard_tag(name): value for name, value in metrics.items()}
        record.update(
            {
                histogram_tag(name): self.histogram(values.double().cpu().numpy())
                for name, values in distributions.items()
            }
        )
        self.run.log({**record, "train/global_step": step})

    def log_samples(self, step: int, samples: list[Sample]) -> None:
        fields = [f.name for f in dataclasses.fields(Sample)]
        rows = [[getattr(s, f) for f in fields] for s in samples]
        self.run.log({"eval/samples": self.table(columns=fields, data=rows), "train/global_step": step})

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Rank 0 writes (to ``report_to``'s destinations and the progress bar); other ranks hold a logger that does
    nothing."""

    def __init__(
        self,
        output_dir: str | Path,
        rank: int,
        total_steps: int,
        initial: int = 0,
        run_name: str | None = None,
        logging_dir: str | Path | None = None,
        report_to: tuple[str, ...] = ("tensorboard", "jsonl"),
        config: dict | None = None,
    ):
        """``initial``: steps already done (a resumed run, which appends to the same TensorBoard and wandb run);
        ``config``: the run's keys, for wandb."""
        self.enabled = rank == 0
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        output_dir = Path(output_dir)
        run_name = run_name or output_dir.resolve().name
        make = {
            "tensorboard": lambda: _TensorBoard(Path(logging_dir or output_dir / "runs") / run_name),
            "jsonl": lambda: _Jsonl(output_dir / "metrics.jsonl"),
            "wandb": lambda: _Wandb(output_dir, run_name, initial > 0, config or {}),
        }
        self.destinations = [make[name]() for name in report_to]
        self.bar = tqdm(total=total_steps, initial=initial, desc="training", dynamic_ncols=True)

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def log(self, step: int, metrics: dict[str, float], distributions: dict[str, torch.Tensor] | None = None) -> None:
        """``distributions``: per-pair values (``MetricAccumulator.distributions``), as histograms."""
        if not self.enabled:
            return
        distributions = {name: values for name, values in (distributions or {}).items() if values.numel()}
        for destination in self.destinations:
            destination.log(step, metrics, distributions)
        # a training log, or one eval set's: `eval_` or a named set's `eval_<name>_`
        accuracy = next((k for k in metrics if k.endswith("rewards/accuracies")), "rewards/accuracies")
        prefix = accuracy.removesuffix("rewards/accuracies")
        if f"{prefix}loss" in metrics:
            self.bar.set_postfix(
                {
                    f"{prefix}loss": f"{metrics[prefix + 'loss']:.4f}",
                    "acc": f"{metrics[prefix + 'rewards/accuracies']:.3f}",
                    "margin": f"{metrics[prefix + 'rewards/margins']:.3f}",
                }
            )
        if prefix:
            self.bar.write(
                f"step {step}: "
                + ", ".join(
                    f"{k} {v:.4f}"
                    for k, v in metrics.items()
                    if k.removeprefix(prefix).split("/")[0] in ("loss", "rewards")
                )
            )

    def log_samples(self, step: int, samples: list[Sample]) -> None:
        """Replies to held-out prompts (``EvalSamples.generate``)."""
        if self.enabled:
            for destination in self.destinations:
                destination.log_samples(step, samples)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            for destination in self.destinations:
                destination.close()
