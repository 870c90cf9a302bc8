"""What a training checkpoint saves and a resume restores, in one class so that the two cannot drift apart."""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

import interop
import sparselearning
from interop.checkpoint import load_checkpoint, set_rng_state
from models.channel_units import restore_kept_channels
from training.resume_check import check_resume, run_settings, saved_settings


@dataclasses.dataclass
class TrainingState:
    """The run's trained objects; ``checkpoint`` writes them all, ``resume`` reads them all back."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    sparsifier: sparselearning.Sparsifier
    model_ema: ModelEmaV3 | None
    compacted: dict[str, Any] | None = None  # a run compacted at its budget (training.compaction.Compacted)

    def checkpoint(self, epoch: int, step: int, best_acc1: float, rng: list[dict[str, Any]],
                   args: dict[str, Any], total_steps: int) -> dict[str, Any]:
        compacted = {} if self.compacted is None else {"compacted": self.compacted}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "model_ema": self.model_ema.module.state_dict() if self.model_ema is not None else None,
                "sparsifier": self.sparsifier.state_dict(), "epoch": epoch, "step": step, "best_acc1": best_acc1,
                "rng": rng, "args": args, "total_steps": total_steps, **compacted}

    def resume(self, path: str, args: argparse.Namespace, world: int, steps_per_epoch: int, rank: int,
               flags: dict[str, str], ckpt: Mapping[str, Any] | None = None
               ) -> tuple[int, int, float, dict[str, Any] | None]:
        """Restore a ``checkpoint`` file of the same experiment (``training.resume_check``, checked before anything
        is loaded; ``flags`` names its settings as the command line spells them; ``ckpt``: the file's contents when
        already loaded); returns (first epoch to run, optimizer steps done, best top-1, position).

        A mid-epoch checkpoint holds ``position`` = {"batch": batches done in its epoch, "loss_sum": their summed
        loss}; its epoch is then the first to run, from that batch on.
        """
        ckpt = load_checkpoint(path, map_location="cpu") if ckpt is None else ckpt
        if "optimizer" not in ckpt:
            interop.load_weights(self.model, ckpt.get("model", ckpt), path, args.model)
            raise ValueError(f"{path} holds weights only (no optimizer state) and cannot be resumed; "
                             "evaluate it with --eval, or start a run from its weights with --finetune")
        extends = check_resume(saved_settings(ckpt), run_settings(vars(args), world, steps_per_epoch), path, flags)
        if extends is not None and rank == 0:
            print(f"extending the run from {extends} to {args.epochs} epochs: from here on the lr schedule (and the "
                  f"death rate, t_end and tau where used) follows {args.epochs * steps_per_epoch} total steps",
                  flush=True)
        interop.load_weights(self.model, ckpt["model"], path, args.model)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if extends is None:  # else the scheduler built for the new --epochs is the extended schedule
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt["scaler"]:  # empty when the saved run did not use fp16; --amp and --amp-dtype may change on resume
            self.scaler.load_state_dict(ckpt["scaler"])
        restore_kept_channels(self.model)  # pruned embedding channels of a --finetune'd file (any method)
        self.sparsifier.load_state_dict(ckpt["sparsifier"])
        if self.model_ema is not None:
            self.model_ema.module.load_state_dict(ckpt["model_ema"])
            restore_kept_channels(self.model_ema.module)
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        position = ckpt.get("position")
        return ckpt["epoch"] + (position is None), ckpt["step"], ckpt.get("best_acc1", 0.0), position
