"""The distillation teacher: a frozen model loaded from a file, never downloaded.

Two routes. A name of this project's models, or no name, reads the file with ``interop`` like any checkpoint it
evaluates (this project's training checkpoints, compact models and exports, timm's DeiT weights, SViTE's files), so a
dense run's ``checkpoint.pth`` teaches its own sparse version. Any other timm name (DeiT's RegNetY-160 teacher) is
built by ``timm.create_model`` without weights and loads the file strictly.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn

import interop
import models


def load_teacher(model_name: str | None, path: str, *, num_classes: int, img_size: int,
                 device: torch.device) -> nn.Module:
    """The teacher in eval mode, on ``device``, with ``requires_grad`` off; the run's random streams untouched.

    Args:
        model_name: a timm model name or one of ``models.MODEL_NAMES``; None: the model the file records (a training
            checkpoint's ``args``, a compact model's architecture, an export's ``config.json``).
        path: ``.pth`` or ``.safetensors``, read with ``weights_only``. A training checkpoint teaches with its model
            weights (not its EMA), and with the token selection it was trained with.
        num_classes: the student's class count, which the teacher must predict.
        img_size: the student's input resolution, which the teacher must take.

    Raises:
        ValueError: a missing or unreadable file, no model name to build, or a teacher of another class count or
            resolution than the student's.
    """
    if not Path(path).is_file():
        raise ValueError(f"--teacher-path {path} does not exist")
    with torch.random.fork_rng(devices=[]):  # building draws init weights: keep the student's seeds the same
        if model_name is None or model_name in models.MODEL_NAMES:
            teacher = _project_teacher(model_name, path, num_classes, img_size)
        else:
            teacher = _timm_teacher(model_name, path, num_classes)
    teacher = teacher.to(device).eval().requires_grad_(False)
    if model_name is not None and model_name not in models.MODEL_NAMES:
        _check_output(teacher, model_name, num_classes, img_size, device)
    return teacher


def _project_teacher(model_name: str | None, path: str, num_classes: int, img_size: int) -> nn.Module:
    """A file any of this project's checkpoint readers reads, rebuilt as ``interop`` rebuilds it for evaluation."""
    contents = interop.read_checkpoint(path)
    recorded = contents.architecture["model"] if contents.architecture else contents.args.get("model")
    name = model_name or recorded
    if name is None:
        raise ValueError(f"--teacher-path {path} is {contents.description} and does not record its model; pass "
                         "--teacher-model NAME (a timm model name or one of --model's names)")
    if contents.architecture is None:
        try:
            interop.check_fits(contents.state_dict, name)
        except ValueError as e:
            raise ValueError(f"--teacher-path {path}: {e}") from None
    detection = interop.detect(contents.state_dict, name, contents.architecture)
    if (detection.num_classes, detection.img_size) != (num_classes, img_size):
        raise ValueError(f"--teacher-path {path} holds a {name} for {detection.num_classes} classes at "
                         f"{detection.img_size} px, but the student has {num_classes} classes at {img_size} px; "
                         "distil from a teacher trained on the student's data set and input size")
    tokens = interop.resolve_tokens(contents, detection, models.TokenConfig())
    return interop.build_model(contents, detection, name, tokens)


def _timm_teacher(model_name: str, path: str, num_classes: int) -> nn.Module:
    """``timm.create_model(model_name)`` without weights, then ``path`` loaded strictly."""
    if not timm.is_model(model_name):
        raise ValueError(f"--teacher-model {model_name!r} is neither a timm model nor one of --model's names "
                         f"({', '.join(models.MODEL_NAMES)})")
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    state_dict = interop.read_checkpoint(path).state_dict
    try:
        interop.load_weights(model, state_dict, path)
    except ValueError as e:
        problems = str(e).partition("this --model: ")[2]
        raise ValueError(f"--teacher-path {path} does not fit --teacher-model {model_name} with {num_classes} "
                         f"classes: {problems}") from None
    return model


@torch.no_grad()
def _check_output(teacher: nn.Module, model_name: str, num_classes: int, img_size: int,
                  device: torch.device) -> None:
    """One image through a timm teacher: it takes the student's resolution and gives ``num_classes`` logits."""
    try:
        logits = teacher(torch.zeros(1, 3, img_size, img_size, device=device))
    except (AssertionError, RuntimeError, ValueError) as e:
        raise ValueError(f"--teacher-model {model_name} cannot take the student's {img_size} px input: {e}") from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"--teacher-model {model_name} returns {shape} for one image, not (1, {num_classes}) logits")
