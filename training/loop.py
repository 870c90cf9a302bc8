"""The epoch loop of a training run and its end: evaluate, log, checkpoint, stop cleanly on a signal, and at the
end compact a structured model, draw the token pictures and print the summary. The step itself is engine.py's."""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import engine
import interop
import models
from interop.checkpoint import save_atomic
from sparselearning.units import UNIT_MULTIPLE_AUTO
from training import compact_report, compaction, run_dir, summary
from training.artifacts import draw_tokens, print_compaction
from training.assemble import Run
from training.interrupts import StepHook, StopSignals
from training.process import gather_rng_states


@dataclass(frozen=True)
class LoopConfig:
    """How long to train and what to write where; ``flags`` (all of main.py's) go into config.json and every
    checkpoint."""

    epochs: int
    output_dir: Path | None
    flags: dict[str, Any]
    model_name: str
    print_freq: int = 50
    save_every_steps: int = 0
    tensorboard: bool = False
    structured: bool = False
    visualize_tokens: int = 0


@dataclass(frozen=True)
class Start:
    """Where training begins: the first epoch, the optimizer steps done, the best top-1 so far, and within a
    mid-epoch checkpoint's epoch its ``position`` ({"batch", "loss_sum"})."""

    epoch: int
    step: int
    best_acc1: float = 0.0
    position: dict[str, Any] | None = None


def train(run: Run, cfg: LoopConfig, start: Start) -> dict[str, Any]:
    """Train from ``start`` to ``cfg.epochs``; returns the last epoch's log record."""
    proc, output_dir = run.process, cfg.output_dir
    device, is_main, world = proc.device, proc.is_main, proc.world
    global_step, best_acc1 = start.step, start.best_acc1

    def save_mid_epoch(epoch: int, batch: int, step: int, loss_sum: float) -> Path | None:
        if output_dir is None:
            return None
        checkpoint = run.state().checkpoint(epoch, step, best_acc1, gather_rng_states(world), cfg.flags,
                                            run.total_steps)
        checkpoint["position"] = {"batch": batch, "loss_sum": loss_sum}
        if is_main:
            save_atomic(checkpoint, output_dir / "checkpoint.pth")
        return output_dir / "checkpoint.pth"

    signals = StopSignals()
    stop_hook = StepHook(signals, save_mid_epoch, cfg.save_every_steps, 1 if world == 1 else cfg.print_freq,
                         device, is_main)
    ctx = run.step_context(cfg.print_freq, stop_hook)
    writer = None
    if is_main and output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(cfg.flags, indent=2, sort_keys=True))
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(output_dir / "tensorboard"))

    amp_dtype, train_loader, val_loader = run.precision.amp_dtype, run.train_loader, run.val_loader
    record: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    start_time = time.time()
    for epoch in range(start.epoch, cfg.epochs):
        train_loader.sampler.set_epoch(epoch)
        resumed = start.position is not None and epoch == start.epoch
        first_batch, loss_sum = (start.position["batch"], start.position["loss_sum"]) if resumed else (0, 0.0)
        train_loader.sampler.skip_batches(first_batch)
        if first_batch == 0 and compaction.due(run):  # --compact-at-budget: the first epoch boundary after the budget
            compaction.compact(run, epoch)
            ctx = run.step_context(cfg.print_freq, stop_hook)
        run.lr_scheduler.step(epoch)  # before the epoch: epoch e trains at lr(e) (DeiT stepped after, repeating 0)
        try:
            train_stats, global_step = engine.train_one_epoch(run.forward_model, run.criterion, train_loader, ctx,
                                                              device, epoch, global_step, show_progress=is_main,
                                                              first_batch=first_batch, loss_sum=loss_sum)
        except engine.NonFiniteLossError as e:
            signals.restore()
            raise SystemExit(f"error: {e}; {run_dir.last_checkpoint(output_dir)}. Lower --lr, set --clip-grad, or "
                             "use --amp-dtype bfloat16.") from e
        test_stats = engine.evaluate(run.forward_model, val_loader, device, amp_dtype)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"test_{k}": v for k, v in test_stats.items()}}
        if run.model_ema is not None:
            ema_stats = engine.evaluate(run.model_ema.module, val_loader, device, amp_dtype)
            record.update({f"ema_test_{k}": v for k, v in ema_stats.items()})
        record.update(run.sparsifier.report())
        history.append(record)
        record["n_parameters"], record["n_nonzero_parameters"] = models.count_parameters(
            run.model, getattr(run.weight_sparsifier, "masks", None))
        skipped = datasets.take_skipped_count()  # --skip-unreadable-images, this process and its workers
        if skipped:
            record["skipped_unreadable_images"] = skipped
        is_best = test_stats["acc1"] > best_acc1
        best_acc1 = max(best_acc1, test_stats["acc1"])
        if output_dir is not None:
            checkpoint = run.state().checkpoint(epoch, global_step, best_acc1, gather_rng_states(world),
                                                cfg.flags, run.total_steps)
            if is_main:
                save_atomic(checkpoint, output_dir / "checkpoint.pth")
                if is_best:
                    save_atomic(checkpoint, output_dir / "best.pth")
                with open(output_dir / "log.txt", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key, value in record.items():
                        if key != "epoch" and isinstance(value, (int, float)):
                            writer.add_scalar(key, value, epoch)
        if is_main:
            print(f"epoch {epoch}: train loss {train_stats['loss']:.4f}, test top-1 {test_stats['acc1']:.2f}% "
                  f"(best {best_acc1:.2f}%)", flush=True)
        if epoch + 1 < cfg.epochs:
            stop_hook.after_epoch(epoch, output_dir / "checkpoint.pth" if output_dir else None)
    signals.restore()
    if writer is not None:
        writer.close()
    finish(run, cfg, record, history, time.time() - start_time)
    return record


def finish(run: Run, cfg: LoopConfig, record: dict[str, Any], history: list[dict[str, Any]],
           seconds: float) -> None:
    """The end of a run: the compact model of a structured run (measured, after global pruning: MACs by the FLOP
    counter, latency on the device, in the summary and log.txt), the token pictures, the summary, the unlock. A run
    compacted at its budget already trains the compact model, measured against the budget counts it kept."""
    proc, output_dir, model = run.process, cfg.output_dir, run.model
    compact = measured = None
    budget = run.compacted or run.weight_sparsifier  # a run compacted at its budget kept the budget's counts
    if cfg.structured:  # every rank evaluates (the evaluation all-reduces), rank 0 writes
        small = model if run.compacted else models.compact_model(model, getattr(run.weight_sparsifier, "masks", None))
        path = None
        if proc.is_main and output_dir is not None:
            path = interop.save_compact(small, cfg.model_name, output_dir / "compact.pth", cfg.flags)
            if run.compacted:
                print(f"compact model written to {path} (trained as such from epoch {run.compacted.epoch} on)")
            else:
                print_compaction(model, small, path)
        compact = (small, engine.evaluate(small.to(proc.device), run.val_loader, proc.device,
                                          run.precision.amp_dtype), path)
        if proc.is_main and isinstance(budget, compact_report.MacBudget):
            measured = compact_report.measure_compact(small, cfg.model_name, budget, proc.device,
                                                      run.val_loader.batch_size, cfg.flags.get("latency_table"),
                                                      bool(cfg.flags.get("prune_head_dim")),
                                                      cfg.flags.get("unit_multiple", UNIT_MULTIPLE_AUTO))
            if output_dir is not None:
                entry = {"acc1": compact[1]["acc1"], "parameters": sum(p.numel() for p in small.parameters()),
                         **measured.to_record()}
                with open(output_dir / "log.txt", "a") as f:
                    f.write(json.dumps({"compact_model": entry}) + "\n")
    if proc.is_main and output_dir is not None and cfg.visualize_tokens:
        draw_tokens(model, run.val_loader, cfg.visualize_tokens, output_dir, proc.device)
    if proc.is_main:
        elapsed = datetime.timedelta(seconds=int(seconds))
        where = f"; outputs in {output_dir}" if output_dir else ""
        print(f"training time {elapsed}; final top-1 {record.get('test_acc1', float('nan')):.2f}%{where}")
        final_layers = run.weight_sparsifier.record("final") if hasattr(run.weight_sparsifier, "record") else None
        print(summary.format_summary(model, history, output_dir, final_layers, compact, measured), flush=True)
    if proc.is_main and output_dir is not None:
        run_dir.unlock(output_dir)
