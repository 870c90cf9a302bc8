"""Knowledge distillation as DeiT defines it: the loss, its settings and their flags.

Every run's criterion is a ``DistillationLoss``, called as ``criterion(samples, outputs, targets)``, so the training
step is the same with and without a teacher; with ``kind="none"`` it is exactly the plain criterion. The kd term
reads the distillation head of a distilled model (DeiT's ``head_dist``) and the class head of any other model, which
is how a sparse student learns from its own dense version (NViT's KL to the unpruned model).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("none", "soft", "hard")

Teacher = Callable[[torch.Tensor], torch.Tensor]
"""Maps the batch's input samples (augmented and mixed, as the student sees them) to the teacher's logits."""


class DistillationLoss(nn.Module):
    """DeiT's distillation loss: ``base · (1 − α) + kd · α``, or the base loss alone for ``kind="none"``.

    soft: KL divergence at temperature τ, scaled by τ² (DeiT: summed over the batch, divided by the logits' numel).
    hard: cross-entropy against the teacher's argmax. The base loss always reads the class head.

    Args:
        base_criterion: the loss against the labels (mixup's soft targets or smoothed labels): ``(logits, targets)``.
        teacher: run without gradients, under the caller's autocast; None when ``kind`` is none. It is kept outside
            the module tree, so the criterion's ``train()`` or ``to()`` never touch a teacher model's mode or device.
        kind: ``none``, ``soft`` or ``hard``.
        alpha: the weight of the kd term, in [0, 1].
        tau: the soft temperature, > 0.
    """

    def __init__(self, base_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 teacher: Teacher | None = None, kind: str = "none", alpha: float = 0.5, tau: float = 1.0) -> None:
        super().__init__()
        check_settings(kind, alpha, tau)
        if (kind == "none") != (teacher is None):
            raise ValueError(f"distillation type {kind!r} with{'out' if teacher is None else ''} a teacher: "
                             "soft and hard distillation need one, none takes none")
        self.base_criterion = base_criterion
        object.__setattr__(self, "teacher", teacher)
        self.kind, self.alpha, self.tau = kind, alpha, tau

    def forward(self, samples: torch.Tensor, outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                targets: torch.Tensor) -> torch.Tensor:
        """The loss of one batch.

        Args:
            samples: the model's input [B, C, H, W], which the teacher sees too.
            outputs: the class logits [B, K], or a distilled model's (class-head, dist-head) pair.
            targets: labels [B] or soft targets [B, K], for the base criterion.
        """
        outputs_kd = None
        if not isinstance(outputs, torch.Tensor):
            outputs, outputs_kd = outputs
        base_loss = self.base_criterion(outputs, targets)
        if self.kind == "none":
            return base_loss
        if outputs_kd is None:
            outputs_kd = outputs
        with torch.no_grad():
            teacher_outputs = self.teacher(samples)
        return base_loss * (1 - self.alpha) + kd_loss(outputs_kd, teacher_outputs, self.kind, self.tau) * self.alpha

    def extra_repr(self) -> str:
        return f"kind={self.kind}, alpha={self.alpha}, tau={self.tau}"


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float = 1.0) -> torch.Tensor:
    """The kd term of logits [B, K] against teacher logits [B, K] (a pure function; DeiT's formulas)."""
    if kind == "soft":
        return F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1), reduction="sum",
                        log_target=True) * (tau * tau) / student.numel()
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    raise ValueError(f"no kd term for distillation type {kind!r}; choose soft or hard")


def check_settings(kind: str, alpha: float, tau: float) -> None:
    """Reject a type outside ``KINDS``, α outside [0, 1] or τ <= 0, naming the flag."""
    if kind not in KINDS:
        raise ValueError(f"unknown --distillation-type {kind!r}; choose from {', '.join(KINDS)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"--distillation-alpha must be in [0, 1] (the weight of the kd term), got {alpha}")
    if not tau > 0:
        raise ValueError(f"--distillation-tau must be > 0 (the soft temperature), got {tau}")


@dataclass(frozen=True)
class DistillationConfig:
    """DeiT's distillation settings, checked once where they are parsed.

    Args:
        kind: ``none``, ``soft`` or ``hard`` (``--distillation-type``).
        teacher_model: a timm model name, or None to take the model the teacher file records (``--teacher-model``).
        teacher_path: the teacher's weights or checkpoint (``--teacher-path``); never downloaded.
        alpha: the weight of the kd term (``--distillation-alpha``).
        tau: the soft temperature (``--distillation-tau``).
        teacher_topk: a directory of stored teacher outputs to distil from instead of a teacher model
            (``--teacher-topk``; training/teacher_topk.py).
        teacher_topk_k: the K those outputs must have (``--teacher-topk-k``); None: the stored K.
    """

    kind: str = "none"
    teacher_model: str | None = None
    teacher_path: str = ""
    alpha: float = 0.5
    tau: float = 1.0
    teacher_topk: str = ""
    teacher_topk_k: int | None = None

    def __post_init__(self) -> None:
        check_settings(self.kind, self.alpha, self.tau)
        if self.teacher_topk and (self.teacher_path or self.teacher_model):
            raise ValueError("--teacher-topk DIR distils from the outputs stored in DIR, which name their teacher: "
                             "drop --teacher-path and --teacher-model (or drop --teacher-topk to run the teacher live)")
        if self.teacher_topk_k is not None and not self.teacher_topk:
            raise ValueError("--teacher-topk-k is the K of stored teacher outputs: use it with --teacher-topk DIR or "
                             "--save-teacher-topk DIR")
        if self.enabled and not (self.teacher_path or self.teacher_topk):
            raise ValueError(f"--distillation-type {self.kind} needs a teacher: pass --teacher-path FILE (a timm "
                             "weights file with --teacher-model NAME, or a checkpoint of this project), or "
                             "--teacher-topk DIR (stored outputs)")
        if not self.enabled and (self.teacher_path or self.teacher_model or self.teacher_topk):
            given = " and ".join(flag for flag, value in (("--teacher-model", self.teacher_model),
                                                           ("--teacher-path", self.teacher_path),
                                                           ("--teacher-topk", self.teacher_topk)) if value)
            raise ValueError(f"{given} without --distillation-type: pass --distillation-type soft or hard to "
                             "distil, or drop the teacher flags")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DistillationConfig:
        return cls(args.distillation_type, args.teacher_model, args.teacher_path, args.distillation_alpha,
                   args.distillation_tau, args.teacher_topk, args.teacher_topk_k)


def add_distillation_args(parser: argparse.ArgumentParser) -> None:
    """DeiT's flags and dest names; the teacher model defaults to what its file records instead of regnety_160."""
    g = parser.add_argument_group("distillation (DeiT)")
    g.add_argument("--teacher-model", default=None, metavar="NAME",
                   help="the teacher: any timm model name (built without weights, then --teacher-path is loaded), or "
                        "one of --model's names; default: the model the --teacher-path checkpoint records")
    g.add_argument("--teacher-path", default="", metavar="FILE",
                   help="the teacher's weights (.pth / .safetensors, read weights_only) or any checkpoint this "
                        "project reads (e.g. a dense run's checkpoint.pth)")
    g.add_argument("--distillation-type", default="none", choices=KINDS,
                   help="soft: KL at --distillation-tau; hard: cross-entropy against the teacher's top class")
    g.add_argument("--distillation-alpha", default=0.5, type=float, help="weight of the distillation term")
    g.add_argument("--distillation-tau", default=1.0, type=float, help="temperature of soft distillation")
