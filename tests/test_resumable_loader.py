"""The resumable loader's per-sample seeding: a sample's augmentation depends only on (seed, rank, epoch, position),
never on what was loaded before it or with it, and loading never moves the global RNG streams."""
import random

import numpy as np
import torch
from torch.utils.data import Dataset, SequentialSampler

from training.resumable_loader import ResumableSampler, SeededSamples, resumable_loader


class RandomDraws(Dataset):
    """A 'transform' that draws from all three global RNGs, as timm's augmentations do."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([index, random.random(), float(np.random.rand()), torch.rand(()).item()])


class EpochSampler(SequentialSampler):
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def test_a_sample_is_the_same_alone_or_in_a_batch_in_any_order():
    samples = SeededSamples(RandomDraws(), seed=3, rank=0)
    keys = [(1, position, 9 - position) for position in range(6)]
    batch = samples.__getitems__(keys)
    alone = [samples[key] for key in reversed(keys)][::-1]
    for a, b in zip(batch, alone):
        assert torch.equal(a, b)
    other_epoch = samples[(2, 0, 9)]
    assert not torch.equal(other_epoch, batch[0]) and other_epoch[0] == batch[0][0]


def test_loading_leaves_the_global_rng_streams_where_they_were():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = random.random(), float(np.random.rand()), torch.rand(()).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    loader = resumable_loader(RandomDraws(), EpochSampler(range(10)), batch_size=4, seed=0, rank=0)
    loader.sampler.set_epoch(0)
    batches = list(loader)
    assert len(batches) == 2 and batches[0].shape == (4, 4)
    assert (random.random(), float(np.random.rand()), torch.rand(()).item()) == expected


def test_skipping_batches_serves_the_same_later_batches():
    loader = resumable_loader(RandomDraws(), EpochSampler(range(10)), batch_size=3, seed=0, rank=0)
    assert isinstance(loader.sampler, ResumableSampler)
    loader.sampler.set_epoch(4)
    full = list(loader)
    loader.sampler.set_epoch(4)
    loader.sampler.skip_batches(1)
    resumed = list(loader)
    assert len(resumed) == len(full) - 1
    for a, b in zip(resumed, full[1:]):
        assert torch.equal(a, b)
