"""Training metrics: accumulated on the device in a window, synchronised across ranks once per log.

Names follow TRL's DPOTrainer (``rewards/chosen``, ``rewards/margins``, ``logps/chosen``, ``logits/chosen``, ...);
evaluation metrics carry an ``eval_`` prefix. Where they go is ``ds_dpo.training.loggers``.
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from ds_dpo.forward.logprobs import PairLogps
from ds_dpo.losses import PreferenceLossOutput

# Pair-weighted means, then token-weighted sums, then the raw counters (new counters go last: a checkpoint's window
# from before they existed loads into the ones it has).
PAIR_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
_KEYS = PAIR_KEYS + (
    "logits/chosen",
    "logits/rejected",
    "chosen_tokens",
    "rejected_tokens",
    "pairs",
    "tokens",
    "aux_loss",
    "aux_pairs",
    "entropy",
    "chosen_top1",
)


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
        per_pair = torch.stack(
            [
                out.losses.detach(),
                cr,
                rr,
                (cr > rr).float(),
                cr - rr,
                policy.chosen.detach(),
                policy.rejected.detach(),
                policy.chosen_logits,
                policy.rejected_logits,
                policy.chosen_tokens.float(),
                policy.rejected_tokens.float(),
            ]
        )
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
        self.sums[: len(sums)] = torch.tensor(sums, dtype=self.sums.dtype)

    def reduce(self, prefix: str = "") -> dict[str, float]:
        """All-reduce the sums, return means and rates over the window, and start a new window."""
        torch.distributed.all_reduce(self.sums)
        s = dict(zip(_KEYS, self.sums.tolist()))
        elapsed = time.perf_counter() - self.started
        pairs = max(s["pairs"], 1.0)
        metrics = {f"{prefix}{k}": s[k] / pairs for k in PAIR_KEYS}
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
        values = _gather_rows(
            torch.cat(self.pair_values) if self.pair_values else self.sums.new_zeros(0, 3, dtype=torch.float32)
        )
        self.distributions = {
            f"{prefix}{name}": values[:, i].cpu()
            for i, name in enumerate(("rewards/margins", "rewards/chosen", "rewards/rejected"))
        }
        self.pair_values = []
        self.sums.zero_()
        self.started = time.perf_counter()
        return metrics


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``local`` ([n_rank, ...], n_rank may differ), concatenated in rank order."""
    counts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(counts, torch.tensor([local.shape[0]], device=local.device))
    longest = int(max(c.item() for c in counts))
    padded = local.new_zeros(longest, *local.shape[1:])
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in counts]
    torch.distributed.all_gather(gathered, padded)
    return torch.cat([g[: int(c.item())] for g, c in zip(gathered, counts)])
