"""One training epoch and one evaluation pass. Both return dicts of averaged metrics.

The trainer knows the `Sparsifier` protocol, never a sparsity method's internals, and it is
device-agnostic: the same code runs on CPU (CI) and under CUDA autocast.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.utils import ModelEmaV3

from sparselearning import Sparsifier


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run must stop before anything is saved."""


@dataclass
class StepContext:
    """What a training step needs besides the model and the data; built once per run by main.py."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sparsifier: Sparsifier
    amp_dtype: torch.dtype | None = None  # None: no autocast
    clip_grad: float | None = None
    mixup_fn: Mixup | None = None
    model_ema: ModelEmaV3 | None = None
    print_freq: int = 50
    # Called after every optimizer step with (epoch, batches done in the epoch, global step, epoch loss sum);
    # main.py's periodic and on-signal mid-epoch checkpoints (training/interrupts.py). It may raise to stop.
    after_step: Callable[[int, int, int, torch.Tensor], None] | None = None


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Native AMP context (replaces apex); a no-op when amp_dtype is None."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(
    model: nn.Module,
    criterion: Callable[..., torch.Tensor],
    loader: Iterable,
    ctx: StepContext,
    device: torch.device,
    epoch: int,
    global_step: int,
    show_progress: bool = True,
    first_batch: int = 0,
    loss_sum: float = 0.0,
) -> tuple[dict[str, float], int]:
    """Train for one pass over `loader`; returns (metrics, optimizer steps done so far in the run).

    The loss is summed on the device and checked every `print_freq` steps and at the end, so a finite
    run never syncs per step, and a non-finite one stops before its epoch can be checkpointed.
    ``criterion`` is called as ``criterion(samples, outputs, targets)`` (``training.distillation.DistillationLoss``,
    which wraps a plain loss), so a teacher sees the same augmented and mixed batch as the model.
    An epoch resumed from a mid-epoch checkpoint passes the batches already done and their loss sum; `loader`
    then yields only the remaining batches.
    """
    model.train()
    loss_sum = torch.full((), loss_sum, device=device, dtype=torch.float64)
    num_steps = first_batch + len(loader)
    progress = _Progress(f"Epoch {epoch}", num_steps, ctx.print_freq, show_progress, first_batch)
    for i, (samples, targets) in enumerate(loader, start=first_batch):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if ctx.mixup_fn is not None:
            samples, targets = ctx.mixup_fn(samples, targets)
        with autocast(device, ctx.amp_dtype):
            loss = criterion(samples, model(samples), targets)  # (inputs, outputs, targets): DeiT's distillation
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.scaler.scale(loss).backward()
        if ctx.clip_grad is not None:
            ctx.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), ctx.clip_grad)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        global_step += 1
        ctx.sparsifier.step(global_step)
        if ctx.model_ema is not None:
            ctx.model_ema.update(model, step=global_step)
            ctx.sparsifier.apply_masks(ctx.model_ema.module)  # the EMA keeps exactly the model's sparsity
        loss_sum += loss.detach()
        if (i + 1) % ctx.print_freq == 0 or i + 1 == num_steps:
            mean_loss = loss_sum.item() / (i + 1)
            if not math.isfinite(mean_loss):
                raise NonFiniteLossError(f"loss became {mean_loss} in epoch {epoch} (step {global_step})")
            progress.update(i + 1, samples.shape[0], loss=mean_loss, lr=ctx.optimizer.param_groups[-1]["lr"])
        if ctx.after_step is not None:
            ctx.after_step(epoch, i + 1, global_step, loss_sum)
    progress.close()
    metrics = {"loss": loss_sum.item() / max(num_steps, 1), "lr": ctx.optimizer.param_groups[-1]["lr"]}
    return metrics, global_step


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole validation set.

    Under torch.distributed each rank sees a disjoint shard (no padding duplicates); sums are all-reduced,
    so every image counts exactly once.
    """
    model.eval()
    # Loss sum, top-1 hits, top-5 hits, images, all on the device: no per-batch host round trip.
    totals = torch.zeros(4, device=device, dtype=torch.float64)
    for samples, targets in loader:
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(samples)
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5.eq(targets[:, None])
        totals[:3] += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(1).sum().double()])
        totals[3] += targets.numel()  # a Python int operand travels with the kernel launch, not as a copy
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_sum, top1, top5_hits, count = totals.tolist()
    if count == 0:
        raise ValueError("the validation set is empty; check --data-path and the val/ split")
    return {"loss": loss_sum / count, "acc1": 100.0 * top1 / count, "acc5": 100.0 * top5_hits / count,
            "images": int(count)}


class _Progress:
    """A tqdm bar on a terminal; periodic plain lines when output goes to a file (logs stay readable)."""

    def __init__(self, desc: str, total: int, print_freq: int, enabled: bool, first_step: int = 0) -> None:
        self.desc, self.total, self.enabled = desc, total, enabled
        self.start = time.perf_counter()
        self.seen_images = 0
        self.last_step = first_step
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=first_step, desc=desc, dynamic_ncols=True, leave=False)

    def update(self, step: int, batch_size: int, loss: float, lr: float) -> None:
        self.seen_images += batch_size * (step - self.last_step)
        rate = self.seen_images / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(step - self.last_step)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
        elif self.enabled:
            print(f"{self.desc} [{step}/{self.total}] loss {loss:.4f} lr {lr:.3e} {rate:.0f} img/s", flush=True)
        self.last_step = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
