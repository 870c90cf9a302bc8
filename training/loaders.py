"""Data loaders: a resumable training loader per process, and a validation loader that counts every image once."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

import datasets
from training.resumable_loader import resumable_loader


@dataclass(frozen=True)
class LoaderConfig:
    """Batching and sampling, as opposed to what the images are (``datasets.DataConfig``)."""

    batch_size: int
    num_workers: int = 0
    pin_memory: bool = False
    repeated_aug: bool = False  # timm's repeated-augmentation sampler (x3), else plain shuffling
    seed: int = 0  # the shuffling seed, the same on every rank

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoaderConfig:
        return cls(batch_size=args.batch_size, num_workers=args.num_workers, pin_memory=args.pin_mem,
                   repeated_aug=args.repeated_aug, seed=args.seed)


def build_train_loader(data: datasets.DataConfig, cfg: LoaderConfig, rank: int,
                       world: int) -> tuple[torch.utils.data.DataLoader, int]:
    """This rank's share of the training set, resumable mid-epoch; returns (loader, number of classes)."""
    train_set, num_classes = datasets.build_dataset(True, data)
    if cfg.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        sampler: torch.utils.data.Sampler = RepeatAugSampler(train_set, num_replicas=world, rank=rank, shuffle=True)
    else:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg.seed)
    loader = resumable_loader(train_set, sampler, cfg.batch_size, cfg.seed, rank, num_workers=cfg.num_workers,
                              pin_memory=cfg.pin_memory)
    if len(loader) == 0:
        raise ValueError(f"each process gets {len(sampler)} training images per epoch, fewer than one batch of "
                         f"{cfg.batch_size}; lower --batch-size")
    return loader, num_classes


def build_val_loader(data: datasets.DataConfig, cfg: LoaderConfig, rank: int,
                     world: int) -> tuple[torch.utils.data.DataLoader, int]:
    """Each rank takes every world-th validation image, without padding, so every image counts exactly once."""
    val_set, num_classes = datasets.build_dataset(False, data)
    loader = torch.utils.data.DataLoader(
        val_set, sampler=list(range(rank, len(val_set), world)), batch_size=int(1.5 * cfg.batch_size),
        num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, drop_last=False)
    return loader, num_classes
