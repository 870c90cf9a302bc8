"""fp16 AMP overflow steps through the real training step: no sparsity hook may count a step GradScaler skipped.

A fused optimizer is stepped on overflow too (GradScaler sets ``found_inf`` and the kernel skips), a non-fused one is
not stepped at all. Overflows are injected on chosen steps in two ways: every gradient infinite (an infinite loss
gradient), or only the patch-embedding gradient infinite, so that the head and neuron gradients stay finite and a
skipped step could pass unnoticed into a score window.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import engine
import models
from models.head_stats import structure_units
from sparselearning import Masking, StructuredDST
from sparselearning.base import combine
from training.distillation import DistillationLoss

STEPS, UPDATE_EVERY, BATCH = 10, 4, 8
LOSS_OVERFLOW = {2}  # every gradient is infinite
EMBED_OVERFLOW = {6, 9}  # only patch_embed's gradient is infinite; step 9 lies in the window open at the end
INIT_SCALE = 2.0**10


class _InfiniteGradient(torch.autograd.Function):
    """Identity whose backward returns an infinite gradient: an fp16 overflow without an infinite loss value."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor) -> torch.Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * math.inf


class OverflowingLoss:
    """Cross-entropy that overflows on the optimizer steps in ``LOSS_OVERFLOW`` and ``EMBED_OVERFLOW``."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        model.patch_embed.proj.weight.register_hook(
            lambda grad: grad * math.inf if self.calls in EMBED_OVERFLOW else None)

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = F.cross_entropy(logits.float(), targets)
        return _InfiniteGradient.apply(loss) if self.calls in LOSS_OVERFLOW else loss


def train(mode: str, fused: bool):
    torch.manual_seed(0)
    model = models.create_model("vit_digits_micro", num_classes=10)
    if mode == "token":
        models.apply_token_selection(model, models.TokenConfig(enabled=True, num_keep=9, mode="drop"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
    records: list[dict] = []
    if mode == "unstructured":
        sparsifier = Masking(model, optimizer, density=0.5, total_steps=STEPS, update_frequency=UPDATE_EVERY,
                             t_end=0.9,
                             log_fn=records.append)
    else:
        sparsifier = StructuredDST(model, optimizer, structure_units(model, scaler), STEPS, atten_density=0.5,
                                   other_density=0.5, update_frequency=UPDATE_EVERY, t_end=0.9,
                                   log_fn=records.append)
    schedule = models.TokenSchedule(model, models.TokenConfig(enabled=True), STEPS) if mode == "token" else None
    ctx = engine.StepContext(optimizer=optimizer, scaler=scaler, sparsifier=combine(*[s for s in (sparsifier, schedule) if s]),
                             amp_dtype=torch.float16, print_freq=STEPS)
    gen = torch.Generator().manual_seed(1)
    loader = [(torch.randn(BATCH, 3, 16, 16, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen))
              for _ in range(STEPS)]
    criterion = DistillationLoss(OverflowingLoss(model))
    _, step = engine.train_one_epoch(model, criterion, loader, ctx, torch.device("cpu"), 0, 0,
                                     show_progress=False)
    assert step == STEPS
    return model, optimizer, scaler, sparsifier, schedule, records


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("mode", ["unstructured", "structured", "token"])
def test_skipped_steps_leave_windows_updates_and_masks_intact(mode: str, fused: bool) -> None:
    model, optimizer, scaler, sparsifier, schedule, records = train(mode, fused)
    overflows = len(LOSS_OVERFLOW | EMBED_OVERFLOW)
    assert scaler.get_scale() == INIT_SCALE / 2**overflows, "every injected overflow was detected and skipped"
    steps_taken = {int(optimizer.state[p]["step"]) for p in model.parameters()}
    assert steps_taken == {STEPS - overflows}

    assert [r["step"] for r in records if r["event"] == "update"] == [4, 8], "updates on schedule"
    assert sparsifier.skipped_updates == []
    params = dict(model.named_parameters())
    for name, mask in sparsifier.masks.items():
        assert bool(torch.isfinite(params[name]).all()), name
        assert not bool(params[name][~mask].any()), f"masked weights of {name} are not exactly zero"

    if mode != "unstructured":
        # the window opened by the update at step 8 holds step 10 only: step 9 overflowed
        good_steps = len(set(range(9, STEPS + 1)) - EMBED_OVERFLOW - LOSS_OVERFLOW)
        for name, sums in sparsifier.stats.sums().items():
            assert sums["samples"].item() == BATCH * good_steps, name
            assert bool(torch.isfinite(sums["taylor"]).all() & (sums["taylor"] > 0).any()), name  # pruned heads: 0
            assert bool(torch.isfinite(sums["grad_l1"]).all() & (sums["grad_l1"] > 0).all()), name
        assert sparsifier.window.grad_steps.item() == good_steps
        assert all(bool(torch.isfinite(total).all() & (total > 0).any())
                   for total in sparsifier.window.grad_sums.values())
    if schedule is not None:
        assert schedule.tau == models.tau_at(STEPS, STEPS, "linear")
