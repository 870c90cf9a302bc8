"""Training from stored teacher outputs (TinyViT, ``--teacher-topk DIR``): no teacher in memory, the same images.

The outputs were computed on the images the training run will see (training/save_topk.py writes them): the same
sampler order, per-sample seeded augmentation (training/resumable_loader.py) and mixup/cutmix. Here the training
loader is wrapped in ``StoredBatches``, which keeps the records of the batch it yielded last, found from the
sampler's (epoch, position), so a resumed epoch finds its records. Two things read them: ``ReplayedMixup``, the run's
mixup, which mixes the batch with the stored draws into the images the teacher saw, and ``StoredTeacher``, the
distillation loss's teacher, which returns the log of the stored target. engine.py sees a loader, a mixup function and
a criterion, as in any run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader

from training.mixup_replay import mix
from training.topk_store import StoredBatch, TopKHeader, TopKStore, topk_log_target

if TYPE_CHECKING:
    from datasets import DataConfig
    from training.assemble import MixupConfig
    from training.loaders import LoaderConfig

DEFAULT_K = 10
PAIRING = "sample i with sample B-1-i of its batch (timm)"
_RUNTIME_DATA = ("data_path", "skip_unreadable_images")  # where the images are read from, not what they become


def describe_run(data: DataConfig, loader_cfg: LoaderConfig, mixup: MixupConfig, loader: DataLoader, *, epochs: int,
                 world: int, num_classes: int, k: int | None, teacher: str = "") -> TopKHeader:
    """The header of stored outputs for a run with these settings: what a save writes, and what a training run
    expects (``k`` None: whatever K was stored). ``loader`` is the run's training loader, before any epoch starts."""
    augmentation = {f.name: getattr(data, f.name) for f in dataclasses.fields(data) if f.name not in _RUNTIME_DATA}
    augmentation["repeated_aug"] = loader_cfg.repeated_aug
    mixing = None
    if mixup.active:
        mixing = {"mixup": mixup.mixup, "cutmix": mixup.cutmix, "cutmix_minmax": mixup.cutmix_minmax,
                  "prob": mixup.prob, "switch_prob": mixup.switch_prob, "mode": mixup.mode, "pairing": PAIRING}
    return TopKHeader(k=k, num_classes=num_classes, epochs=epochs, world_size=world, dataset_length=len(loader.dataset),
                      batch_size=loader_cfg.batch_size, steps_per_epoch=len(loader), seed=loader_cfg.seed,
                      augmentation=augmentation, mixup=mixing, teacher=teacher)


class StoredBatches:
    """The training loader of a run with stored outputs: its batches unchanged, and in ``current`` the records of
    the batch it yielded last. It has the loader's ``sampler`` and length, so the loop sets epochs and resumes as
    with the bare loader."""

    def __init__(self, loader: DataLoader, store: TopKStore) -> None:
        self.loader, self.store = loader, store
        self.current: StoredBatch | None = None

    @property
    def sampler(self):
        return self.loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        keys = list(self.loader.sampler)  # (epoch, position, index) of every image still to come in this epoch
        size = self.loader.batch_size
        try:
            for step, batch in enumerate(self.loader):
                self.current = self.store.batch(keys[step * size:(step + 1) * size])
                yield batch
        finally:
            self.current = None

    def batch_for(self, samples: torch.Tensor) -> StoredBatch:
        """The current batch's records, for a step on ``samples`` (which must be that batch)."""
        if self.current is None:
            raise RuntimeError("no stored batch: stored teacher outputs are read for the batches of their loader, "
                               "while it is iterated")
        if len(self.current.records) != samples.shape[0]:
            raise RuntimeError(f"a batch of {samples.shape[0]} images, but its stored batch has "
                               f"{len(self.current.records)}")
        return self.current


class StoredTeacher:
    """The teacher of a run with stored outputs: the log of the stored target of the current batch, as logits
    [B, C] (its softmax is the target). A ``DistillationLoss`` takes it in place of a teacher model."""

    def __init__(self, batches: StoredBatches, num_classes: int) -> None:
        self.batches, self.num_classes = batches, num_classes

    def __call__(self, samples: torch.Tensor) -> torch.Tensor:
        records = self.batches.batch_for(samples).records
        probs = torch.from_numpy(np.ascontiguousarray(records["prob"])).to(samples.device)
        classes = torch.from_numpy(np.ascontiguousarray(records["cls"])).to(samples.device)
        return topk_log_target(probs, classes, self.num_classes)


class ReplayedMixup:
    """The run's mixup with stored outputs: each step mixes with the draws stored for it, not fresh ones, and mixes
    the labels as timm's ``Mixup`` does (with label smoothing)."""

    def __init__(self, batches: StoredBatches, mode: str, num_classes: int, smoothing: float) -> None:
        self.batches, self.mode, self.num_classes, self.smoothing = batches, mode, num_classes, smoothing

    def __call__(self, samples: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = mix(samples, self.batches.batch_for(samples).draws, self.mode)
        return samples, mixup_target(targets, self.num_classes, lam, self.smoothing)


def replay(directory: Path, loader: DataLoader, expected: TopKHeader, rank: int, mixup: MixupConfig,
           num_classes: int) -> tuple[StoredBatches, ReplayedMixup | None, StoredTeacher]:
    """Open this rank's stored outputs (checked against ``expected``): the loader, mixup and teacher of the run."""
    batches = StoredBatches(loader, TopKStore(directory, expected, rank))
    replayed = ReplayedMixup(batches, mixup.mode, num_classes, mixup.smoothing) if mixup.active else None
    return batches, replayed, StoredTeacher(batches, num_classes)
