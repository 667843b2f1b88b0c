import pytest

from ds_dpo.data.sampler import GlobalBatchSampler


def plans(n, micro, accum, world, epoch=0, seed=0):
    """All ranks' step plans for one epoch: [step][rank]."""
    per_rank = [list(GlobalBatchSampler(n, micro, accum, world, r, seed).epoch(epoch)) for r in range(world)]
    return list(zip(*per_rank))


@pytest.mark.parametrize("n, micro, accum, world", [(10, 2, 1, 2), (37, 3, 2, 2), (5, 4, 2, 3), (64, 8, 1, 1)])
def test_every_pair_once_per_epoch_fillers_weigh_zero(n, micro, accum, world):
    seen = []
    for step in plans(n, micro, accum, world):
        assert len({p.num_pairs for p in step}) == 1  # every rank agrees on the global count
        real = [i for p in step for mb, w in zip(p.micro_batches, p.weights) for i, wi in zip(mb, w) if wi == 1.0]
        assert len(real) == step[0].num_pairs
        for p in step:  # every rank runs the same number of equally sized micro-batches
            assert [len(mb) for mb in p.micro_batches] == [micro] * accum
        seen += real
    assert sorted(seen) == list(range(n))


def test_order_is_seeded_and_changes_per_epoch():
    a = GlobalBatchSampler(100, 4, 1, 1, 0, seed=3)
    assert a.order(0) == GlobalBatchSampler(100, 4, 1, 1, 0, seed=3).order(0)
    assert a.order(0) != a.order(1) and sorted(a.order(1)) == list(range(100))


def test_same_global_batches_for_any_split():
    """1 rank x 4 micro-batches, 4 ranks x 1, and 2 x 2 put the same pairs in each optimizer step."""

    def step_sets(micro, accum, world):
        return [
            sorted(i for p in step for mb in p.micro_batches for i in mb) for step in plans(50, micro, accum, world)
        ]

    assert step_sets(2, 4, 1) == step_sets(2, 1, 4) == step_sets(2, 2, 2) == step_sets(8, 1, 1)


@pytest.mark.parametrize("budget", [1, 40, 100, 10**6])
def test_token_budget_regroups_each_ranks_pairs_and_keeps_ranks_in_step(budget):
    n, micro, accum, world = 53, 4, 2, 3
    tokens = [(7 * i) % 50 + 5 for i in range(n)]  # uneven pair sizes, 5..54 tokens

    def sampler(rank, **budgeted):
        return GlobalBatchSampler(n, micro, accum, world, rank, seed=1, **budgeted)

    for r in range(world):
        plain = list(sampler(r).epoch(0))
        budgeted = list(sampler(r, pair_tokens=tokens, max_tokens_per_batch=budget).epoch(0))
        for p, b in zip(plain, budgeted):
            # the same pairs, in the same order, with the same weights; only the grouping differs
            assert [i for mb in b.micro_batches for i in mb] == [i for mb in p.micro_batches for i in mb]
            assert [w for ws in b.weights for w in ws] == [w for ws in p.weights for w in ws]
            assert b.num_pairs == p.num_pairs and all(b.micro_batches)
            # a micro-batch over budget is one pair, unless it was split only to match another rank's count
            assert all(len(mb) == 1 or sum(tokens[i] for i in mb) <= budget or budget == 1 for mb in b.micro_batches)
    for step in zip(*(sampler(r, pair_tokens=tokens, max_tokens_per_batch=budget).epoch(0) for r in range(world))):
        assert len({len(p.micro_batches) for p in step}) == 1  # every rank runs the same number of forwards
    if budget == 1:
        assert all(len(mb) == 1 for p in budgeted for mb in p.micro_batches)
    if budget == 10**6:
        assert all(len(p.micro_batches) == 1 for p in budgeted)


def test_plans_run_on_across_epochs_and_resume_where_a_checkpoint_left_off():
    sampler = GlobalBatchSampler(10, 2, 1, 2, 0, seed=3)  # 3 steps per epoch, the last one short
    plans = sampler.plans()
    first = [next(plans) for _ in range(7)]
    assert [(e, d) for e, d, _ in first] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 1)]
    expected = list(sampler.epoch(0)) + list(sampler.epoch(1)) + list(sampler.epoch(2))[:1]
    assert [p for _, _, p in first] == expected
    resumed = sampler.plans(0, 3)  # a checkpoint at the end of epoch 0 resumes at the start of epoch 1
    assert [next(resumed)[:2] for _ in range(2)] == [(1, 1), (1, 2)]
    assert next(sampler.plans(1, 1))[2] == list(sampler.epoch(1))[1]


def test_pair_weights_ride_with_their_pairs_and_sum_per_global_batch():
    weights = [0.5 * i for i in range(10)]  # pair 0 weighs nothing, like a filler
    ranks = [list(GlobalBatchSampler(10, 2, 1, 2, r, seed=3, pair_weights=weights).epoch(0)) for r in range(2)]
    seen = []
    for step in zip(*ranks):
        pairs = [(i, w) for p in step for mb, ws in zip(p.micro_batches, p.weights) for i, w in zip(mb, ws)]
        assert all(p.weight_sum == pytest.approx(sum(w for _, w in pairs)) for p in step)
        seen += [(i, w) for i, w in pairs if w > 0]
    assert sorted(seen) == [(i, w) for i, w in enumerate(weights) if w > 0]


def test_a_prompts_pairs_stay_next_to_each_other_and_single_pairs_keep_their_order():
    groups = [g for g in range(12) for _ in range(g % 4 + 1)]  # groups of 1 to 4 pairs
    sampler = GlobalBatchSampler(len(groups), 4, 2, 1, 0, seed=5, pair_groups=groups)
    for epoch in range(3):
        order = sampler.order(epoch)
        assert sorted(order) == list(range(len(groups)))
        runs = [groups[i] for k, i in enumerate(order) if k == 0 or groups[i] != groups[order[k - 1]]]
        assert sorted(runs) == list(range(12))  # each group one contiguous run
    assert sampler.order(0) != sampler.order(1)
    # one pair per group: the same permutation as without groups, so existing runs are unchanged
    assert GlobalBatchSampler(50, 4, 1, 1, 0, seed=3, pair_groups=list(range(50))).order(2) == GlobalBatchSampler(
        50, 4, 1, 1, 0, seed=3
    ).order(2)
