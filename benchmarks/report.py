"""Result rows in timm's benchmark column scheme, written as CSV and rendered as a markdown table.

timm's names (`infer_samples_per_sec`, `infer_step_time` in ms, `param_count` in millions, ...) keep our
rows comparable with its published CSVs. The extra columns record the spread over repeats, the ratio to
the reference mode from the same interleaved run, the attention path, and the environment.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable

import torch.nn as nn

from benchmarks.timing import Timing, median_ratio, paired_ratios

PHASES = ("infer", "train")

COLUMNS = (
    "model", "mode", "precision", "compile",
    *(f"{phase}_{key}" for phase in PHASES for key in (
        "samples_per_sec", "samples_per_sec_min", "samples_per_sec_max", "step_time", "batch_size", "img_size",
        "ratio", "ratio_min", "ratio_max")),
    "repeats", "clock", "param_count", "infer_gmacs", "mac_ratio", "attn", "device", "threads", "torch", "timm", "python", "date",
)

Row = dict[str, Any]


def phase_columns(phase: str, timing: Timing, reference: Timing, img_size: int) -> Row:
    """One phase's cells; the ratios are this mode's samples/s over the reference's, paired by repeat."""
    ratios = paired_ratios(timing, reference)
    return {
        f"{phase}_samples_per_sec": round(timing.samples_per_sec, 2),
        f"{phase}_samples_per_sec_min": round(timing.min_samples_per_sec, 2),
        f"{phase}_samples_per_sec_max": round(timing.max_samples_per_sec, 2),
        f"{phase}_step_time": round(timing.step_ms, 3),
        f"{phase}_batch_size": timing.batch_size,
        f"{phase}_img_size": img_size,
        f"{phase}_ratio": round(median_ratio(timing, reference), 4),
        f"{phase}_ratio_min": round(min(ratios), 4),
        f"{phase}_ratio_max": round(max(ratios), 4),
    }


def param_count(model: nn.Module) -> float:
    """Parameters in millions, rounded as timm's benchmark rounds them."""
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def gmacs(model: nn.Module) -> float:
    """MACs per image of what the model really executes (timm's `infer_gmacs` convention: MACs, not 2×MACs)."""
    import models

    return round(models.count_macs(model, "executed").total / 1e9, 4)


def attention_path(model: nn.Module) -> str:
    """'fused' (SDPA), 'explicit' (softmax matmuls) or 'mixed': baselines and methods must use the same one."""
    flags = {bool(m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")}
    if not flags:
        return "none"
    return "mixed" if len(flags) == 2 else ("fused" if flags.pop() else "explicit")


def write_csv(rows: Iterable[Row], path: Path, append: bool = False) -> list[Row]:
    """Write (or append) rows; returns every row now in the file, as strings, for the markdown table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[Row] = []
    if append and path.exists():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != COLUMNS:
                raise ValueError(f"{path} has other columns than this harness writes; choose another --csv")
            old = list(reader)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(old)
        writer.writerows(rows)
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def markdown(rows: list[Row]) -> str:
    """A readable table (also what is printed); environments are listed once above it."""
    env_columns = ("device", "threads", "clock", "torch", "timm", "python", "date")
    envs = sorted({tuple(str(r[c]) for c in env_columns) for r in rows})
    lines = ["- " + ", ".join(f"{c} {v}" for c, v in zip(env_columns, e)) for e in envs]
    lines += ["", "samples/s: median over repeats (min-max); ms: median ms/step; ratio: samples/s over the `timm` "
              "reference measured interleaved in the same run, median (min-max) of the per-repeat ratios.", ""]
    header = ["model", "mode", "precision", "compile", "batch", "img", "params (M)", "GMACs", "MAC ratio", "attn",
              "infer samples/s", "infer ms", "infer ratio", "train samples/s", "train ms", "train ratio",
              "infer ratio / MAC ratio"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["model"], r["mode"], r["precision"], r["compile"],
                 r["infer_batch_size"] or r["train_batch_size"], r["infer_img_size"] or r["train_img_size"],
                 r["param_count"], r.get("infer_gmacs", ""), r.get("mac_ratio", ""), r["attn"]]
        for phase in PHASES:
            if r[f"{phase}_samples_per_sec"] in ("", None):
                cells += ["-", "-", "-"]
                continue
            cells += [f"{float(r[f'{phase}_samples_per_sec']):.2f} ({float(r[f'{phase}_samples_per_sec_min']):.2f}-"
                      f"{float(r[f'{phase}_samples_per_sec_max']):.2f})",
                      f"{float(r[f'{phase}_step_time']):.1f}",
                      f"{float(r[f'{phase}_ratio']):.3f} ({float(r[f'{phase}_ratio_min']):.3f}-"
                      f"{float(r[f'{phase}_ratio_max']):.3f})"]
        measured, ideal = r["infer_ratio"], r.get("mac_ratio", "")
        cells.append(f"{float(measured) / float(ideal):.3f}" if measured not in ("", None) and ideal else "-")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
