"""Which pairs each rank sees at each optimizer step.

An epoch is a seeded permutation of all pairs, cut into global batches of
``G = micro_batch_size * gradient_accumulation_steps * world_size`` pairs. Every pair is seen exactly once per
epoch. The last global batch of an epoch is usually short: it is filled up to ``G`` with weight-0 fillers, so every
rank still runs the same number of forwards (ZeRO-3 needs all ranks in every gather) while the fillers contribute
nothing to the loss, the gradients or the metrics. Every rank computes the same plan, so no communication is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class StepPlan:
    micro_batches: list[list[int]]
    """This rank's micro-batches for the step (dataset row indices), ``gradient_accumulation_steps`` of them."""
    weights: list[list[float]]
    """1.0 for a real pair, 0.0 for a filler; same shape as ``micro_batches``."""
    num_pairs: int
    """Real pairs in the whole global batch, across ranks: the loss is their mean."""


class GlobalBatchSampler:
    def __init__(self, num_pairs: int, micro_batch_size: int, gradient_accumulation_steps: int, world_size: int,
                 rank: int, seed: int, shuffle: bool = True):
        self.num_pairs, self.micro, self.accum = num_pairs, micro_batch_size, gradient_accumulation_steps
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.global_batch_size = micro_batch_size * gradient_accumulation_steps * world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_pairs / self.global_batch_size)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_pairs))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_pairs, generator=generator).tolist()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[StepPlan]:
        order, g = self.order(epoch), self.global_batch_size
        for step in range(start_step, self.steps_per_epoch):
            chunk = order[step * g : (step + 1) * g]
            real = len(chunk)
            chunk += [order[i % self.num_pairs] for i in range(g - real)]
            weights = [1.0] * real + [0.0] * (g - real)
            # Micro-batch m of rank r holds global slots [(m * world + r) * micro, ... + micro).
            slots = [(m * self.world_size + self.rank) * self.micro for m in range(self.accum)]
            yield StepPlan(
                micro_batches=[chunk[s : s + self.micro] for s in slots],
                weights=[weights[s : s + self.micro] for s in slots],
                num_pairs=real,
            )
