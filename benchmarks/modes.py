"""Benchmark modes: each builds the model (and, for modes that train through the project, a StepContext).

A mode is a `ModeBuilder` registered in `MODES` with `@register_mode`. A setup without a context is
trained by the plain hand-written loop; one with a context goes through `engine.train_one_epoch`. The
`timm` mode is the reference every other mode is measured against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from timm.optim import create_optimizer_v2

import engine
import models
import sparselearning

REFERENCE_MODE = "timm"


@dataclass
class ModeSetup:
    """A model on the device and, when the project's training step is to be measured, its StepContext."""

    model: nn.Module
    ctx: engine.StepContext | None = None


class ModeBuilder(Protocol):
    def __call__(
        self, name: str, *, img_size: int, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None
    ) -> ModeSetup: ...


MODES: dict[str, ModeBuilder] = {}


def register_mode(mode: str) -> Callable[[ModeBuilder], ModeBuilder]:
    """Add a builder to `MODES` under `mode`; a name can be taken only once."""

    def add(builder: ModeBuilder) -> ModeBuilder:
        if mode in MODES:
            raise ValueError(f"benchmark mode {mode!r} is already registered")
        MODES[mode] = builder
        return builder

    return add


def build_optimizer(model: nn.Module, batch_size: int) -> torch.optim.Optimizer:
    """main.py's default optimizer: timm AdamW with DeiT's no-weight-decay groups and linearly scaled lr."""
    return create_optimizer_v2(model, opt="adamw", lr=5e-4 * batch_size / 512.0, weight_decay=0.05,
                               momentum=0.9, eps=1e-8)


@register_mode(REFERENCE_MODE)
def build_timm(
    name: str, *, img_size: int, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None
) -> ModeSetup:
    """Bare timm: `timm.create_model` for DeiT names, timm's VisionTransformer class for the small configs.

    A token-selection name (`*_data`) gets its unpatched DeiT, the baseline that the selector must beat.
    """
    torch.manual_seed(0)
    if name in models.DATA_MODELS:
        name = name.removesuffix("_data")
    if name in models.DEIT_MODELS:
        model = timm.create_model(name, pretrained=False, img_size=img_size)
    elif name in models.SMALL_MODELS:
        model = VisionTransformer(**{**models.SMALL_MODELS[name], "img_size": img_size})
    else:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(models.MODEL_NAMES)}")
    return ModeSetup(model.to(device))


@register_mode("dense")
def build_dense(
    name: str, *, img_size: int, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None
) -> ModeSetup:
    """The project's dense training: models.create_model and a StepContext built as main.py builds it."""
    torch.manual_seed(0)
    model = models.create_model(name, img_size=img_size).to(device)
    ctx = engine.StepContext(
        optimizer=build_optimizer(model, batch_size),
        scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
        sparsifier=sparselearning.DenseSparsifier(),
        amp_dtype=amp_dtype,
    )
    return ModeSetup(model, ctx)
