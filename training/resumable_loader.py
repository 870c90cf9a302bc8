"""A training DataLoader that can start an epoch at batch k with the order and augmentations of an uninterrupted run.

A mid-epoch checkpoint records how many batches of its epoch are done. The resumed run sets the sampler to the
same epoch (same permutation) and skips the first k batches' indices without loading them. Augmentation draws must
not depend on how many samples a process loaded before, so each sample seeds Python's, NumPy's and torch's RNGs
from (seed, rank, epoch, position in the epoch). In the main process (``--num_workers 0``) the global RNG states are
put back afterwards, so data loading never shifts the stream that mixup and drop path draw from (which the
checkpoint holds). Results are therefore the same for every ``--num_workers``, also across a resume. The loader
draws its worker base seed from its own generator, so creating an iterator does not touch the global RNG either.

Workers ignore SIGINT and SIGTERM: Ctrl-C reaches the whole process group, and the main process alone decides
when to stop (training/interrupts.py); a worker killed by it would end the run with a DataLoader error.
"""
from __future__ import annotations

import random
import signal
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info


class ResumableSampler(Sampler):
    """Wraps an epoch-seeded sampler; yields (epoch, position, index) and can skip whole batches of an epoch."""

    def __init__(self, sampler: Sampler, batch_size: int) -> None:
        self.sampler, self.batch_size = sampler, batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.epoch, self.skip = epoch, 0

    def skip_batches(self, batches: int) -> None:
        """Start the current epoch after its first ``batches`` batches (reset by the next ``set_epoch``)."""
        self.skip = batches * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for position, index in enumerate(self.sampler):
            if position >= self.skip:
                yield self.epoch, position, index

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class SeededSamples(Dataset):
    """Serves ``dataset[index]`` for an (epoch, position, index) key with RNGs seeded for that sample."""

    def __init__(self, dataset: Dataset, seed: int, rank: int) -> None:
        self.dataset, self.seed, self.rank = dataset, seed, rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int, int]]) -> list[Any]:
        """A batch of samples (the DataLoader calls this with a batch's keys). In the main process the global RNG
        states are saved once and put back after the batch: NumPy's state round trip alone costs ~0.2 ms, once per
        sample it was ~15% of a DIGITS epoch. Every sample still draws from its own seed, so results are the same."""
        if get_worker_info() is not None:
            return [self._seeded_sample(key) for key in keys]
        saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
        try:
            return [self._seeded_sample(key) for key in keys]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.default_generator.set_state(saved[2])

    def _seeded_sample(self, key: tuple[int, int, int]) -> Any:
        epoch, position, index = key
        _seed_all(sample_seed(self.seed, self.rank, epoch, position))
        return self.dataset[index]


def sample_seed(seed: int, rank: int, epoch: int, position: int) -> int:
    """The 64-bit seed of the sample at ``position`` of ``rank``'s ``epoch`` (stored teacher outputs record it)."""
    return int(np.random.SeedSequence([seed, rank, epoch, position]).generate_state(1, np.uint64)[0])


def _seed_all(seed: int) -> None:
    """Seed the CPU RNGs that transforms draw from. ``torch.manual_seed`` would also seed every accelerator backend,
    at ~0.6 ms a call (it doubled the DIGITS epoch time); transforms run on the CPU generator alone."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _ignore_stop_signals(worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def resumable_loader(dataset: Dataset, sampler: Sampler, batch_size: int, seed: int, rank: int,
                     **loader_kwargs: Any) -> DataLoader:
    """A drop-last training DataLoader over ``dataset`` whose ``sampler`` is a ``ResumableSampler``."""
    return DataLoader(SeededSamples(dataset, seed, rank), sampler=ResumableSampler(sampler, batch_size),
                      batch_size=batch_size, drop_last=True, worker_init_fn=_ignore_stop_signals,
                      generator=torch.Generator().manual_seed(seed + rank), **loader_kwargs)
