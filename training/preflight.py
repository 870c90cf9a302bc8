"""Flag checks that must fail before any data is read or model built, with the fix in the message."""
from __future__ import annotations

import argparse

import torch

from training.distillation import DistillationConfig


def check_device(name: str) -> None:
    """Refuse a ``--device`` that is not a device name or does not exist on this machine."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {name} was asked for but no CUDA device is available; pass --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name} does not exist: this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"--device {name} needs Apple's Metal backend, which is not available here; "
                             "pass --device cpu")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as e:
            raise ValueError(f"--device {name} is not usable here ({e}); pass --device cpu") from None


def check_training_flags(args: argparse.Namespace) -> None:
    """Schedule and checkpointing flags that would otherwise divide by zero or silently do nothing."""
    if args.decay_epochs <= 0:
        raise ValueError(f"--decay-epochs must be > 0 (epochs between learning-rate decays of --sched step/"
                         f"multistep), got {args.decay_epochs}")
    if args.save_every_steps < 0:
        raise ValueError(f"--save-every-steps must be >= 0 (0: only at the end of each epoch), got "
                         f"{args.save_every_steps}")
    if (args.auto_resume or args.save_every_steps) and not args.output_dir:
        flag = "--auto-resume" if args.auto_resume else "--save-every-steps"
        raise ValueError(f"{flag} works on the checkpoints in --output_dir; pass --output_dir DIR")
    if not args.save_teacher_topk:  # a save runs its teacher without distilling (training/save_topk.py checks it)
        DistillationConfig.from_args(args)  # a distillation type without a teacher, or a teacher without one


def check_eval(args: argparse.Namespace) -> None:
    """``--eval`` without ``--resume`` would report the accuracy of random weights (models are never pretrained)."""
    if args.eval and not args.resume:
        raise ValueError("--eval evaluates a checkpoint: pass --resume FILE (without one the weights are random); "
                         "for the parameter and MAC counts of --model use --flops")
