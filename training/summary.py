"""What a training run tells its user: topology events while it runs, and one summary when it ends.

A week-long run's console should say what came out without reading log.txt: the best and EMA accuracy, how sparse
the model ended up in the counts ``models.flops`` defines (the same numbers ``--eval`` and ``--flops`` print later),
the compact model of a structured run, and where the files are.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

import models
import sparselearning
from training.compact_report import CompactMeasurement


def update_line(record: Mapping[str, Any]) -> str:
    """One line for a topology update: the global numbers of ``sparselearning.format_table``'s last line."""
    line = (f"sparsity {record['event']} at step {record['step']}: masked density {record['density']:.4f}, "
            f"all parameters {record['density_all']:.4f} ({record['nonzero_parameters']:,} of "
            f"{record['total_parameters']:,}), explored {record['explored_rate']:.4f}")
    if "heads_kept" in record:
        line += f", heads kept {sum(record['heads_kept'])}, neurons kept {sum(record['neurons_kept'])}"
    return line


def sparsity_logger(output_dir: Path | None, verbose: bool = False) -> Callable[[dict[str, Any]], None]:
    """Rank 0's sink for sparsity records: a JSON line in log.txt and a per-layer density plot for every record; on
    the console the per-layer table at start (init, resume) and one line per update (the table with ``verbose``)."""

    def log(record: dict[str, Any]) -> None:
        brief = record["event"] == "update" and not verbose
        print(update_line(record) if brief else sparselearning.format_table(record), flush=True)
        if output_dir is not None:
            output_dir.mkdir(parents=True, exist_ok=True)
            with open(output_dir / "log.txt", "a") as f:
                f.write(json.dumps({"sparsity": record}) + "\n")
            sparselearning.plot_densities(record, output_dir / "layer_density.png")

    return log


def best_epoch(history: Sequence[Mapping[str, Any]], output_dir: Path | None) -> tuple[float, int | None]:
    """(best top-1, its epoch) over this run's epoch records and, after a resume, the earlier ones in log.txt."""
    records = list(history)
    log = output_dir / "log.txt" if output_dir is not None else None
    if log is not None and log.exists():
        seen = {r["epoch"] for r in records}
        for line in log.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if "test_acc1" in entry and entry.get("epoch") not in seen:
                records.append(entry)
    if not records:
        return float("nan"), None
    best = max(records, key=lambda r: r["test_acc1"])
    return best["test_acc1"], best["epoch"]


def format_summary(
    model: nn.Module,
    history: Sequence[Mapping[str, Any]],
    output_dir: Path | None,
    sparsity_record: Mapping[str, Any] | None = None,
    compact: tuple[nn.Module, Mapping[str, float], Path | None] | None = None,
    measured: CompactMeasurement | None = None,
) -> str:
    """The end-of-run summary.

    Args:
        model: the trained model (masked, token-selecting).
        history: this run's epoch records (``test_acc1``, ``ema_test_acc1``, ...), in order.
        output_dir: where the run wrote its files; None when it saved nothing.
        sparsity_record: the sparsifier's final per-layer record (``ScheduledMasks.record``), for the table.
        compact: for a structured run, (compact model, its validation stats, path it was written to or None).
        measured: for a global-pruning run, the compact model's measured MACs and latency.
    """
    last = history[-1] if history else {}
    best, epoch = best_epoch(history, output_dir)
    lines = ["", "=== run summary ==="]
    if sparsity_record is not None:
        lines += [sparselearning.format_table(sparsity_record)]
    where = f" (epoch {epoch})" if epoch is not None else ""
    top1 = f"best top-1 {best:.2f}%{where}, final top-1 {last.get('test_acc1', float('nan')):.2f}%"
    if "ema_test_acc1" in last:
        top1 += f", EMA top-1 {last['ema_test_acc1']:.2f}% (final)"
    lines.append(top1)
    if "density" in last:
        lines.append(f"final density {last['density']:.4f} of the masked weights, {last['density_all']:.4f} of all "
                     "parameters")
    lines += models.mac_report(model)
    if compact is not None:
        small, stats, path = compact
        total = sum(p.numel() for p in small.parameters())
        gmacs = models.mac_summary(small)["gmacs_executed"]
        lines.append(f"compact model{f' {path}' if path else ''}: top-1 {stats['acc1']:.2f}%, {total:,} parameters, "
                     f"{gmacs:.4g} GMACs per image executed")
    if measured is not None:
        lines += measured.lines()
    if output_dir is not None and output_dir.exists():
        written = sorted(p.name + ("/" if p.is_dir() else "") for p in output_dir.iterdir()
                         if not p.name.startswith("."))
        lines.append(f"written to {output_dir}: {', '.join(written)}")
    else:
        lines.append("nothing written (no --output_dir)")
    return "\n".join(lines)
