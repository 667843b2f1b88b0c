"""Training metrics: accumulated on the device, synchronised across ranks once per log, written by rank 0.

Names follow TRL's DPOTrainer (``rewards/chosen``, ``rewards/margins``, ``logps/chosen``, ``logits/chosen``, ...);
evaluation metrics carry an ``eval_`` prefix. Each log goes to the rank-0 progress bar and to the ``report_to``
destinations: ``output_dir/metrics.jsonl`` (one JSON object per log, with ``step``, TRL's names); TensorBoard, laid
out as the HF Trainer writes it (so TRL users' dashboards match): one folder per run (``logging_dir/<run_name>``),
tags ``train/<name>`` and ``eval/<name>``, a custom-scalars layout that puts the train and eval curves of each metric
on one chart, and at each log histograms of the window's per-pair margins and rewards, tagged
``train/rewards/margins_histogram`` etc. (all ranks' pairs; a resumed run's first window has only the pairs after the
resume); Weights & Biases, with the same tags and histograms, as HF's integration logs them.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import uuid
from pathlib import Path

import torch

from ds_dpo.logprobs import PairLogps
from ds_dpo.losses import PreferenceLossOutput

# Pair-weighted means, then token-weighted sums, then the raw counters (new counters go last: a checkpoint's window
# from before they existed loads into the ones it has).
_PAIR_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected")
_KEYS = _PAIR_KEYS + ("logits/chosen", "logits/rejected", "chosen_tokens", "rejected_tokens", "pairs", "tokens",
                      "aux_loss", "aux_pairs", "entropy", "chosen_top1")


def peak_memory_mb() -> float:
    """Peak accelerator memory allocated, or on CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricAccumulator:
    """Sums per-pair statistics over micro-batches without a host sync; ``reduce`` is the one sync point."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(len(_KEYS), dtype=torch.float64, device=device)
        self.pair_values: list[torch.Tensor] = []
        """This rank's [pairs, 3] margins, chosen and rejected rewards of the window, for the histograms."""
        self.distributions: dict[str, torch.Tensor] = {}
        """The last ``reduce``'s per-pair values over all ranks, by metric name."""
        self.started = time.perf_counter()

    def add(self, out: PreferenceLossOutput, policy: PairLogps, num_tokens: torch.Tensor) -> None:
        """Add a micro-batch's real pairs; ``num_tokens`` counts their (non-padding) tokens."""
        cr, rr = out.chosen_rewards, out.rejected_rewards
        per_pair = torch.stack([out.losses.detach(), cr, rr, (cr > rr).float(), cr - rr,
                                policy.chosen.detach(), policy.rejected.detach(),
                                policy.chosen_logits, policy.rejected_logits,
                                policy.chosen_tokens.float(), policy.rejected_tokens.float()])
        pairs = torch.full((1,), per_pair.shape[1], dtype=torch.float64, device=self.sums.device)
        aux = torch.zeros(2, dtype=torch.float64, device=self.sums.device)
        if policy.aux_loss is not None:  # the micro-batch's router loss, weighted by its pairs
            aux = torch.cat([policy.aux_loss.detach().double().view(1) * pairs, pairs])
        token_sums = torch.stack([policy.entropy.sum(), policy.chosen_top1.sum()]).double()
        self.pair_values.append(torch.stack([cr - rr, cr, rr], dim=1).detach().float())
        self.sums += torch.cat([per_pair.double().sum(-1), pairs, num_tokens.double().view(1), aux, token_sums])

    def state_dict(self) -> list[float]:
        """The partial window's sums (a checkpoint taken between logs carries them over)."""
        return self.sums.tolist()

    def load_state_dict(self, sums: list[float]) -> None:
        self.sums.zero_()  # a checkpoint from before a counter was added has fewer
        self.sums[:len(sums)] = torch.tensor(sums, dtype=self.sums.dtype)

    def reduce(self, prefix: str = "") -> dict[str, float]:
        """All-reduce the sums, return means and rates over the window, and start a new window."""
        torch.distributed.all_reduce(self.sums)
        s = dict(zip(_KEYS, self.sums.tolist()))
        elapsed = time.perf_counter() - self.started
        pairs = max(s["pairs"], 1.0)
        metrics = {f"{prefix}{k}": s[k] / pairs for k in _PAIR_KEYS}
        metrics[f"{prefix}logits/chosen"] = s["logits/chosen"] / max(s["chosen_tokens"], 1.0)
        metrics[f"{prefix}logits/rejected"] = s["logits/rejected"] / max(s["rejected_tokens"], 1.0)
        # TRL's: mean entropy over all completion tokens, argmax accuracy over the chosen ones
        metrics[f"{prefix}entropy"] = s["entropy"] / max(s["chosen_tokens"] + s["rejected_tokens"], 1.0)
        metrics[f"{prefix}mean_token_accuracy"] = s["chosen_top1"] / max(s["chosen_tokens"], 1.0)
        metrics[f"{prefix}num_tokens"] = s["tokens"]  # the window's; the training loop makes it the run's total
        metrics[f"{prefix}pairs_per_second"] = s["pairs"] / elapsed
        metrics[f"{prefix}tokens_per_second"] = s["tokens"] / elapsed
        if s["aux_pairs"]:
            metrics[f"{prefix}aux_loss"] = s["aux_loss"] / s["aux_pairs"]
        values = _gather_rows(torch.cat(self.pair_values) if self.pair_values
                              else self.sums.new_zeros(0, 3, dtype=torch.float32))
        self.distributions = {f"{prefix}{name}": values[:, i].cpu()
                              for i, name in enumerate(("rewards/margins", "rewards/chosen", "rewards/rejected"))}
        self.pair_values = []
        self.sums.zero_()
        self.started = time.perf_counter()
        return metrics


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``local`` ([n_rank, ...], n_rank may differ), concatenated in rank order."""
    counts = [torch.zeros(1, dtype=torch.long, device=local.device)
              for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(counts, torch.tensor([local.shape[0]], device=local.device))
    longest = int(max(c.item() for c in counts))
    padded = local.new_zeros(longest, *local.shape[1:])
    padded[:local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([g[:int(c.item())] for g, c in zip(gathered, counts)])


def max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def tensorboard_tag(name: str) -> str:
    """HF Trainer's TensorBoard tag of a metric: ``eval_loss`` -> ``eval/loss``, ``loss`` -> ``train/loss``."""
    return f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"


def histogram_tag(name: str) -> str:
    """The tag of a metric's per-pair histogram: ``rewards/margins`` -> ``train/rewards/margins_histogram``. Not the
    scalar's tag: TensorBoard keeps one kind of data per tag (the first it reads), so a histogram under the scalar's
    tag empties the scalar chart and is not shown itself, and in a wandb row it would replace the scalar."""
    return f"{tensorboard_tag(name)}_histogram"


# train and eval on one chart, for every metric evaluation also reports
_PAIRED_LAYOUT = {"train vs eval": {name: ["Multiline", [tensorboard_tag(name), tensorboard_tag(f"eval_{name}")]]
                                    for name in _PAIR_KEYS + ("logits/chosen", "logits/rejected")}}


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

    def close(self) -> None:
        self.writer.close()


class _Jsonl:
    def __init__(self, path: Path):
        self.file = path.open("a")

    def log(self, step: int, metrics: dict[str, float], distributions: dict[str, torch.Tensor]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

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
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ds_dpo"), name=run_name, id=run_id,
                              resume="allow", dir=str(output_dir), config=config)
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        self.histogram = wandb.Histogram

    def log(self, step: int, metrics: dict[str, float], distributions: dict[str, torch.Tensor]) -> None:
        record = {tensorboard_tag(name): value for name, value in metrics.items()}
        record.update({histogram_tag(name): self.histogram(values.double().cpu().numpy())
                       for name, values in distributions.items()})
        self.run.log({**record, "train/global_step": step})

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Rank 0 writes (to ``report_to``'s destinations and the progress bar); other ranks hold a logger that does
    nothing."""

    def __init__(self, output_dir: str | Path, rank: int, total_steps: int, initial: int = 0,
                 run_name: str | None = None, logging_dir: str | Path | None = None,
                 report_to: tuple[str, ...] = ("tensorboard", "jsonl"), config: dict | None = None):
        """``initial``: steps already done (a resumed run, which appends to the same TensorBoard and wandb run);
        ``config``: the run's keys, for wandb."""
        self.enabled = rank == 0
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        output_dir = Path(output_dir)
        run_name = run_name or output_dir.resolve().name
        make = {"tensorboard": lambda: _TensorBoard(Path(logging_dir or output_dir / "runs") / run_name),
                "jsonl": lambda: _Jsonl(output_dir / "metrics.jsonl"),
                "wandb": lambda: _Wandb(output_dir, run_name, initial > 0, config or {})}
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
        prefix = "eval_" if any(k.startswith("eval_") for k in metrics) else ""
        if f"{prefix}loss" in metrics:
            self.bar.set_postfix({f"{prefix}loss": f"{metrics[prefix + 'loss']:.4f}",
                                  "acc": f"{metrics[prefix + 'rewards/accuracies']:.3f}",
                                  "margin": f"{metrics[prefix + 'rewards/margins']:.3f}"})
        if prefix:
            self.bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                        if k.split("/")[0] in ("eval_loss", "eval_rewards")))

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            for destination in self.destinations:
                destination.close()
