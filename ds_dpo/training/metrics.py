"""Training metrics: accumulated on the device in a window, synchronised across ranks once per log.

Names follow TRL's DPOTrainer (``rewards/chosen``, ``rewards/margins``, ``logps/chosen``, ``logits/chosen``, ...);
evaluation metrics carry an ``eval_`` prefix. Where they go is ``ds_dpo.training.loggers``.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass

import torch

from ds_dpo.forward.logprobs import PairLogps
from ds_dpo.forward.scoring import unwrap_peft
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
    "distinct_tokens",
    "forward_positions",
)

# Peak dense bf16 tensor FLOP/s per GPU (vendor datasheets, without sparsity), by the words of
# ``torch.cuda.get_device_name()``: the first entry whose words are all in the name (variants before the plain model).
PEAK_BF16_FLOPS = (
    (("h100", "pcie"), 756e12),
    (("h100", "nvl"), 835e12),
    (("h100",), 989e12),  # SXM (the name says "HBM3")
    (("h200",), 989e12),
    (("gh200",), 989e12),
    (("b200",), 2250e12),
    (("a100",), 312e12),
    (("l40s",), 362e12),
    (("l4",), 121e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The peak dense bf16 FLOP/s of a GPU named ``device_name`` (``PEAK_BF16_FLOPS``); None when not in the table."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    return next((peak for model, peak in PEAK_BF16_FLOPS if words.issuperset(model)), None)


def flops_per_position(params: int, trainable: int, reference_params: int) -> float:
    """Model FLOPs of one training step per computed position (token): the policy's forward (2 per parameter: a
    multiply and an add), its backward (2 per parameter for the activations' gradients, 2 per trainable parameter for
    the weights'; 6 per parameter in full fine-tuning) and the reference's forward (2 per parameter; 0 when the
    reference log-probs are precomputed or the loss needs none). Attention's own score and value products and
    gradient-checkpointing recomputation are not counted (MFU, not hardware utilisation)."""
    return 4.0 * params + 2.0 * trainable + 2.0 * reference_params


def mfu(positions: float, seconds: float, per_position: float, devices: int, peak: float) -> float:
    """Model FLOPs utilisation: the FLOPs of ``positions`` computed positions (``flops_per_position`` each) over
    what ``devices`` GPUs of ``peak`` FLOP/s could do in ``seconds``."""
    return positions * per_position / (seconds * devices * peak)


@dataclass(frozen=True)
class ModelFlops:
    """What a training window's ``mfu`` needs besides its positions and time."""

    per_position: float
    """``flops_per_position`` of this run's models."""
    peak: float
    """The device's ``peak_bf16_flops``."""


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all, trainable) parameters of ``model`` that multiply activations (a ZeRO-3 partitioned parameter counts its
    whole size): all but an input embedding that is not also the output layer (a lookup, not a product)."""
    size = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731
    causal_lm = unwrap_peft(model)
    embedding, head = causal_lm.get_input_embeddings(), causal_lm.get_output_embeddings()
    lookup = () if head is not None and head.weight is embedding.weight else tuple(embedding.parameters())
    params = [p for p in model.parameters() if all(p is not q for q in lookup)]
    return sum(map(size, params)), sum(size(p) for p in params if p.requires_grad)


def peak_memory_mb() -> float:
    """Peak accelerator memory allocated, or on CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


class MetricAccumulator:
    """Sums per-pair statistics over micro-batches without a host sync; ``reduce`` is the one sync point."""

    def __init__(self, device: torch.device, flops: ModelFlops | None = None):
        """``flops``: log ``mfu`` (training windows on a GPU of known peak)."""
        self.flops = flops
        self.sums = torch.zeros(len(_KEYS), dtype=torch.float64, device=device)
        self.pair_values: list[torch.Tensor] = []
        """This rank's [pairs, 3] margins, chosen and rejected rewards of the window, for the histograms."""
        self.distributions: dict[str, torch.Tensor] = {}
        """The last ``reduce``'s per-pair values over all ranks, by metric name."""
        self.started = time.perf_counter()

    def add(self, out: PreferenceLossOutput, policy: PairLogps, tokens: torch.Tensor) -> None:
        """Add a micro-batch's real pairs; ``tokens``: [3] their (non-padding) tokens, their distinct tokens and the
        positions the forward computed (``collate_pairs``'s ``distinct_tokens`` and ``forward_positions``)."""
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
        real, counts = tokens.double().split([1, 2])
        self.sums += torch.cat([per_pair.double().sum(-1), pairs, real, aux, token_sums, counts])

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
        if s["forward_positions"]:  # the share of computed positions that were needed (docs/outputs.md)
            metrics[f"{prefix}token_efficiency"] = s["distinct_tokens"] / s["forward_positions"]
            if self.flops is not None:
                metrics[f"{prefix}mfu"] = mfu(
                    s["forward_positions"],
                    elapsed,
                    self.flops.per_position,
                    torch.distributed.get_world_size(),
                    self.flops.peak,
                )
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
