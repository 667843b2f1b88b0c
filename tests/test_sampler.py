import pytest

from ds_dpo.sampler import GlobalBatchSampler


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
        return [sorted(i for p in step for mb in p.micro_batches for i in mb) for step in plans(50, micro, accum, world)]

    assert step_sets(2, 4, 1) == step_sets(2, 1, 4) == step_sets(2, 2, 2) == step_sets(8, 1, 1)
