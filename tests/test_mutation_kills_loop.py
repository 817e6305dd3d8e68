"""Training-loop behaviour the mutation run (make mutation) found untested."""
import pytest

from training.loop import EpochKeySampler


@pytest.mark.parametrize("n, batch_size, world, start, expected", [
    (10, 3, 1, 0, 3),  # 10 keys in batches of 3: 3 full batches, the last key dropped
    (10, 3, 1, 2, 1),  # resumed after 2 batches of the epoch
    (17, 2, 2, 0, 4),  # two processes: 4 global batches of 2 x 2, each process takes 4 batches
    (17, 2, 2, 3, 1),
])
def test_sampler_length_is_the_batches_it_yields(n, batch_size, world, start, expected):
    for rank in range(world):
        sampler = EpochKeySampler(n, batch_size, epoch=1, seed=0, rank=rank, world=world, start=start)
        assert len(sampler) == expected
        assert isinstance(len(sampler), int)
        assert len(list(sampler)) == expected
