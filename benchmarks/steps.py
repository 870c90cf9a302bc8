"""Step runners: turn a mode's setup and a pre-built batch on the device into a `Run` for the timing protocol.

The input is random and already on the device (no data loader, no host-to-device copy), so only the
model, the loss and the optimizer step are measured. Every mode gets the same loss (plain cross-entropy),
so a ratio between modes measures the training machinery, not the choice of loss.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

import engine
from benchmarks.modes import ModeSetup, build_optimizer
from benchmarks.timing import Run
from training.distillation import DistillationLoss


def random_batch(batch_size: int, img_size: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(images, labels) drawn on the device, shaped like real data."""
    images = torch.randn(batch_size, 3, img_size, img_size, device=device)
    return images, torch.randint(0, num_classes, (batch_size,), device=device)


def inference_run(model: nn.Module, images: torch.Tensor, device: torch.device, amp_dtype: torch.dtype | None) -> Run:
    """Forward passes in eval mode under inference_mode (no autograd bookkeeping), as timm's benchmark does."""

    def run(n: int) -> None:
        model.eval()
        with torch.inference_mode(), engine.autocast(device, amp_dtype):
            for _ in range(n):
                model(images)

    return run


def train_run(setup: ModeSetup, forward: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device,
              amp_dtype: torch.dtype | None) -> Run:
    """The project's training step when the setup has a StepContext, else the plain loop.

    `forward` is the module that runs (the model or its torch.compile wrapper); optimizers hold `setup.model`'s
    parameters under their own names, so DeiT's no-weight-decay rules still match when compiled.
    """
    if setup.ctx is None:
        return plain_train_run(setup.model, forward, batch, device, amp_dtype)
    return engine_train_run(forward, setup.ctx, batch, device)


def engine_train_run(model: nn.Module, ctx: engine.StepContext, batch: tuple[torch.Tensor, ...],
                     device: torch.device, criterion: nn.Module | None = None,
                     loader: Callable[[list[tuple[torch.Tensor, ...]]], Iterable] = list) -> Run:
    """`engine.train_one_epoch` over a loader of n copies of the batch: the real loop, per-epoch costs included.

    Args:
        criterion: the loss (default: plain cross-entropy, as every mode of the throughput suite).
        loader: wraps the n copies into the loader the epoch iterates (benchmarks/distillation.py: stored outputs).
    """
    criterion = criterion if criterion is not None else DistillationLoss(nn.CrossEntropyLoss())
    global_step = 0

    def run(n: int) -> None:
        nonlocal global_step
        _, global_step = engine.train_one_epoch(model, criterion, loader([batch] * n), ctx, device, epoch=0,
                                                global_step=global_step, show_progress=False)

    return run


def plain_train_run(model: nn.Module, forward: nn.Module, batch: tuple[torch.Tensor, ...], device: torch.device,
                    amp_dtype: torch.dtype | None) -> Run:
    """The textbook loop: forward, cross-entropy, zero_grad, backward, step (a GradScaler only for float16)."""
    images, labels = batch
    criterion = nn.CrossEntropyLoss()
    optimizer = build_optimizer(model, images.shape[0])
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    def run(n: int) -> None:
        forward.train()
        for _ in range(n):
            with engine.autocast(device, amp_dtype):
                loss = criterion(forward(images), labels)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()

    return run
