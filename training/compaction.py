"""``--compact-at-budget``: once global pruning has met its budget, the run goes on as the compact model.

Until the budget is met the run trains the masked full-size model; after it, the masked model computes exactly what
the compact model computes (``models.compact_model`` is exact) at the dense model's cost. So at the first epoch
boundary after the budget is met the run replaces its model and EMA by their compact models, drops the sparsifier
(nothing is pruned any more) and fine-tunes the compact model for the remaining epochs. The optimizer is rebuilt
over the compact parameters with the same settings, so the fine-tuning starts with fresh moments; the lr schedule
and the AMP scaler go on as before.

Checkpoints written after the compaction carry ``Compacted`` (the architecture and the budget's MAC counts); a resume
of one rebuilds the compact model before loading its state (``restore``). The compaction happens at an epoch's start,
so a checkpoint written before it resumes into the same compaction at the same boundary.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import nn

import models
import sparselearning
from models.compact import build_compact, compact_architecture
from training.assemble import Run, build_optimization, set_distilled_training, wrap_model


@dataclasses.dataclass(frozen=True)
class Compacted:
    """A run compacted at its budget: the compact architecture (``models.compact_architecture``), the epoch it was
    compacted before, and the budget's MAC counts (``GlobalPruning.current_macs``/``dense_macs``), which the end of
    the run compares the compact model's measured MACs with (``training.compact_report.MacBudget``)."""

    architecture: dict[str, Any]
    epoch: int
    current_macs: float
    dense_macs: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Compacted:
        return cls(dict(state["architecture"]), int(state["epoch"]), float(state["current_macs"]),
                   float(state["dense_macs"]))


def due(run: Run) -> bool:
    """Whether ``run`` compacts now: ``--compact-at-budget``, not yet compacted, and its sparsifier's architecture is
    final."""
    return (run.config is not None and run.config.compact_at_budget and run.compacted is None
            and bool(getattr(run.weight_sparsifier, "ready_to_compact", False)))


def compact(run: Run, epoch: int) -> None:
    """Replace ``run``'s model and EMA by their compact models under the sparsifier's masks, before ``epoch``."""
    sparsifier = run.weight_sparsifier
    masks = sparsifier.masks
    model = models.compact_model(run.model, masks)
    ema = None if run.model_ema is None else models.compact_model(run.model_ema.module, masks)
    compacted = Compacted(compact_architecture(model, run.config.model.name), epoch,
                          float(sparsifier.current_macs), float(sparsifier.dense_macs))
    _switch(run, model, ema, compacted)
    run.process.say(f"budget met: from epoch {epoch} on the run trains the compact model (heads per block "
                    f"{compacted.architecture['block_heads']}, MLP widths {compacted.architecture['block_mlp_hidden']}"
                    f", {sum(p.numel() for p in model.parameters()):,} parameters) with a fresh optimizer")


def restore(run: Run, checkpoint: Mapping[str, Any]) -> None:
    """Before a resume loads ``checkpoint``: if it was written after the compaction, turn ``run`` (built full-size)
    into its compact model, EMA and optimizer, whose state the resume then loads."""
    if "compacted" not in checkpoint or run.config is None or not run.config.compact_at_budget:
        return  # not compacted yet, or a run with other flags: the resume's settings check says so
    compacted = Compacted.from_dict(checkpoint["compacted"])
    cfg = run.config.model

    def build() -> nn.Module:
        return build_compact(compacted.architecture, drop_rate=cfg.drop_rate,
                             drop_path_rate=cfg.drop_path_rate).to(run.process.device)

    _switch(run, build(), None if run.model_ema is None else build().eval(), compacted)


def _switch(run: Run, model: nn.Module, ema: nn.Module | None, compacted: Compacted) -> None:
    """The run from here on: the compact model (wrapped again for DDP/compile), its EMA, a fresh optimizer of the
    same settings whose lr schedule continues, and no weight sparsifier."""
    cfg, process = run.config, run.process
    run.weight_sparsifier.remove()
    set_distilled_training(model, cfg.distillation)
    model.train(run.model.training)
    if ema is not None:
        ema_device = next(run.model_ema.module.parameters()).device
        run.model_ema.module = ema.to(ema_device)
    optimizer, lr_scheduler = build_optimization(cfg.optimizer, cfg.schedule, model, cfg.loader.batch_size,
                                                 process.world, run.precision.fused, cfg.seed)
    lr_scheduler.load_state_dict(run.lr_scheduler.state_dict())
    run.model, run.forward_model = model, wrap_model(model, process, cfg.model.compile)
    run.optimizer, run.lr_scheduler = optimizer, lr_scheduler
    run.weight_sparsifier = run.sparsifier = sparselearning.DenseSparsifier()  # token modules are refused with it
    run.compacted = compacted
