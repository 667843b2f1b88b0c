"""Which pairs each rank sees at each optimizer step.

An epoch is a seeded permutation of all pairs, cut into global batches of
``G = micro_batch_size * gradient_accumulation_steps * world_size`` pairs. Every pair is seen exactly once per
epoch. The last global batch of an epoch is usually short: it is filled up to ``G`` with weight-0 fillers, so every
rank still runs the same number of forwards (ZeRO-3 needs all ranks in every gather) while the fillers contribute
nothing to the loss, the gradients or the metrics. Pairs carry their data weight (``pair_weights``; a pair of
weight 0 is a filler). Every rank computes the same plan, so no communication is needed.

Pairs made of one prompt's K responses (``pair_groups``) are permuted as a unit and stay next to each other, so they
land in one micro-batch wherever it has room for them, where the prefix-shared layout computes their prompt and each
response once (a group cut by a batch boundary is only computed in two parts).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepPlan:
    micro_batches: list[list[int]]
    """This rank's micro-batches for the step (dataset row indices): ``gradient_accumulation_steps`` of
    ``micro_batch_size`` pairs, or, with a token budget, as many as the rank that needs most."""
    weights: list[list[float]]
    """The pair's weight (1.0 without data weights), 0.0 for a filler; same shape as ``micro_batches``."""
    num_pairs: int
    """Pairs in the whole global batch, across ranks (fillers not counted)."""
    weight_sum: float
    """Their weights' sum: the loss is the weighted mean over the global batch."""


class GlobalBatchSampler:
    def __init__(
        self,
        num_pairs: int,
        micro_batch_size: int,
        gradient_accumulation_steps: int,
        world_size: int,
        rank: int,
        seed: int,
        shuffle: bool = True,
        pair_tokens: list[int] | None = None,
        max_tokens_per_batch: int | None = None,
        pair_weights: list[float] | None = None,
        pair_groups: list[int] | None = None,
    ):
        """``pair_tokens`` and ``max_tokens_per_batch``: token-budget micro-batches (see ``token_budget``);
        ``pair_weights``: each pair's data weight (default 1); ``pair_groups``: pairs of one group id are kept
        together (default: each pair its own group)."""
        self.num_pairs, self.micro, self.accum = num_pairs, micro_batch_size, gradient_accumulation_steps
        self.pair_weights = pair_weights
        members: dict[int, list[int]] = {}
        for i, group in enumerate(pair_groups if pair_groups is not None else range(num_pairs)):
            members.setdefault(group, []).append(i)
        self.groups = list(members.values())
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.pair_tokens, self.max_tokens = pair_tokens, max_tokens_per_batch
        self.global_batch_size = micro_batch_size * gradient_accumulation_steps * world_size

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.num_pairs / self.global_batch_size)

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_pairs))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return [i for g in torch.randperm(len(self.groups), generator=generator).tolist() for i in self.groups[g]]

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[StepPlan]:
        order, g = self.order(epoch), self.global_batch_size
        for step in range(start_step, self.steps_per_epoch):
            chunk = order[step * g : (step + 1) * g]
            real = len(chunk)
            chunk += [order[i % self.num_pairs] for i in range(g - real)]
            weights = [1.0 if self.pair_weights is None else self.pair_weights[i] for i in chunk[:real]]
            weights += [0.0] * (g - real)
            # Micro-batch m of rank r holds global slots [(m * world + r) * micro, ... + micro).
            per_rank = []
            for rank in range(self.world_size):
                slots = [(m * self.world_size + rank) * self.micro for m in range(self.accum)]
                per_rank.append(
                    ([chunk[s : s + self.micro] for s in slots], [weights[s : s + self.micro] for s in slots])
                )
            micro_batches, micro_weights = self.token_budget(per_rank) if self.max_tokens else per_rank[self.rank]
            yield StepPlan(micro_batches=micro_batches, weights=micro_weights, num_pairs=real, weight_sum=sum(weights))

    def plans(self, epoch: int = 0, done_in_epoch: int = 0) -> Iterator[tuple[int, int, StepPlan]]:
        """``(epoch, steps of that epoch done once this one is, plan)`` for every step after ``done_in_epoch`` steps
        of ``epoch``, epoch after epoch, without end."""
        for current in itertools.count(epoch):
            for done, plan in enumerate(self.epoch(current, start_step=done_in_epoch), start=done_in_epoch + 1):
                yield current, done, plan
            done_in_epoch = 0

    def token_budget(self, per_rank: list[tuple[list[list[int]], list[list[float]]]]):
        """This rank's pairs of the step regrouped into micro-batches of at most ``max_tokens_per_batch`` tokens (a
        longer pair alone), each rank's pairs and order unchanged. Ranks must run equally many forwards (ZeRO-3
        gathers are collectives), so ranks that need fewer split their largest micro-batches until they have as many
        as the rank that needs most; every rank computes every rank's split, so this needs no communication."""

        def split(pairs: list[tuple[int, float]]) -> list[list[tuple[int, float]]]:
            groups, tokens = [[]], 0
            for pair in pairs:
                if groups[-1] and tokens + self.pair_tokens[pair[0]] > self.max_tokens:
                    groups.append([])
                    tokens = 0
                groups[-1].append(pair)
                tokens += self.pair_tokens[pair[0]]
            return groups

        ranks = [split([p for mb, ws in zip(*r) for p in zip(mb, ws)]) for r in per_rank]
        count = max(map(len, ranks))
        groups = ranks[self.rank]
        while len(groups) < count:  # each rank holds micro x accum >= count pairs, so this ends
            size = lambda g: sum(self.pair_tokens[i] for i, _ in g) if len(g) > 1 else -1  # noqa: E731
            largest = max(range(len(groups)), key=lambda k: size(groups[k]))
            group, half, cut = groups[largest], size(groups[largest]) / 2, 1
            while cut < len(group) - 1 and sum(self.pair_tokens[i] for i, _ in group[:cut]) < half:
                cut += 1
            groups[largest : largest + 1] = [group[:cut], group[cut:]]
        return [[i for i, _ in g] for g in groups], [[w for _, w in g] for g in groups]
