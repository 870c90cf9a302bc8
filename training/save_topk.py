"""``--save-teacher-topk DIR``: run the teacher over the training set as training will see it, and store its top-K
outputs (training/topk_store.py); no training happens. main.py hands over here.

The images are the training run's: its loader (sampler order and per-sample seeded augmentation,
training/resumable_loader.py) for ``--epochs`` epochs, and timm's mixup/cutmix, drawn from NumPy's generator seeded
as training seeds it, mixed on the device, with every step's draws stored beside the outputs. A run with
``--teacher-topk DIR`` and the same flags then replays exactly these images (training/teacher_topk.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from timm.data import Mixup
from torch.utils.data import DataLoader

import engine
from training.mixup_replay import draw, mix
from training.topk_store import TopKWriter, teacher_topk


@torch.no_grad()
def save_outputs(teacher: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, mixup: Mixup | None,
                 writer: TopKWriter, device: torch.device, amp_dtype: torch.dtype | None,
                 say: Callable[[str], None] = lambda line: None) -> None:
    """Write the teacher's top-K for every step of ``writer.header.epochs`` epochs of ``loader`` (a resumable
    training loader), mixing each batch as training does; the caller closes ``writer``."""
    header = writer.header
    for epoch in range(header.epochs):
        loader.sampler.set_epoch(epoch)
        keys = list(loader.sampler)  # (epoch, position, dataset index) of every image, in the loader's order
        for step, (samples, _) in enumerate(loader):
            samples = samples.to(device, non_blocking=True)
            draws = None
            if mixup is not None:
                draws = draw(mixup, tuple(samples.shape))
                mix(samples, draws, mixup.mode)
            with engine.autocast(device, amp_dtype):
                logits = teacher(samples)
            probs, classes = teacher_topk(logits, header.k)
            writer.write(keys[step * header.batch_size:(step + 1) * header.batch_size], probs, classes, draws)
        say(f"epoch {epoch}: stored the teacher's top-{header.k} of {header.samples_per_epoch} images")
