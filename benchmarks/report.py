"""Result rows in timm's benchmark column scheme, written as CSV and rendered as a markdown table.

timm's names (`infer_samples_per_sec`, `infer_step_time` in ms, `param_count` in millions, ...) keep our
rows comparable with its published CSVs. The extra columns record the spread over repeats, the ratio to
the reference mode from the same interleaved run, the MAC ratios a perfect kernel would turn into speed-ups (executed:
what the code computes; theoretical: the paper's count with density-scaled linears), the attention path, and the
environment.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable

import torch.nn as nn

from benchmarks.timing import Timing, median_ratio, paired_ratios

PHASES = ("infer", "train")

# One sign convention for accuracy differences in every generated table: configuration minus dense, in points, so a
# negative value is a configuration less accurate than dense (the convention of the papers we quote).
DELTA_VS_DENSE = "top-1 Δ vs dense (config − dense)"

COLUMNS = (
    "model", "mode", "precision", "compile",
    *(f"{phase}_{key}" for phase in PHASES for key in (
        "samples_per_sec", "samples_per_sec_min", "samples_per_sec_max", "step_time", "batch_size", "img_size",
        "ratio", "ratio_min", "ratio_max")),
    "reference", "repeats", "clock", "param_count", "infer_gmacs", "mac_ratio", "theoretical_gmacs",
    "theoretical_mac_ratio", "attn", "device", "threads", "torch", "timm", "python", "date",
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


def gmacs(model: nn.Module, kind: str = "executed") -> float:
    """MACs per image (timm's `infer_gmacs` convention: MACs, not 2×MACs) of what the model really executes, or the
    paper's `theoretical` count (masked weights and selected tokens counted as removed)."""
    import models

    return round(models.count_macs(model, kind).total / 1e9, 4)


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


def _num(value: Any) -> float | None:
    """A CSV cell as a float; None for an empty cell (a phase or column that was not measured)."""
    return None if value in ("", None) else float(value)


def _setting(row: Row) -> tuple[str, str, str]:
    batch = row["infer_batch_size"] or row["train_batch_size"]
    return str(batch), str(row["precision"]), str(row["compile"])


def header(rows: list[Row], command: str = "") -> list[str]:
    """The command, every environment the rows come from, and how to read the numbers."""
    env_columns = ("device", "threads", "clock", "torch", "timm", "python", "date")
    envs = sorted({tuple(str(r[c]) for c in env_columns) for r in rows})
    lines = [f"- command: `{command}`"] if command else []
    lines += ["- " + ", ".join(f"{c} {v}" for c, v in zip(env_columns, e)) for e in envs]
    references = sorted({str(r.get("reference") or "timm") for r in rows})
    return lines + ["", "samples/s: median over repeats (min-max); ms: median ms/step; speedup: samples/s over the "
                    f"`{'`/`'.join(references)}` reference measured interleaved in the same run (same batch, precision "
                    "and compile setting), median (min-max) of the per-repeat ratios. MAC ratio: reference MACs / "
                    "mode MACs, the speedup a perfect kernel would give; speedup / MAC ratio = 1 means the saving "
                    "is fully realised. float32 is strict (TF32 off); compile is torch.compile (inductor, default "
                    "mode).", ""]


def mac_table(rows: list[Row]) -> list[str]:
    """Per mode: parameters, executed and theoretical MACs, and their ratios to the reference."""
    lines = ["| mode | params (M) | GMACs executed | MAC ratio | GMACs theoretical | theoretical MAC ratio |",
             "|---|---|---|---|---|---|"]
    for mode, r in {r["mode"]: r for r in rows}.items():
        lines.append(f"| {mode} | {r['param_count']} | {r['infer_gmacs']} | {r['mac_ratio']} | "
                     f"{r.get('theoretical_gmacs') or '-'} | {r.get('theoretical_mac_ratio') or '-'} |")
    return lines


def speedup_table(rows: list[Row]) -> list[str]:
    """Inference speedup of every mode over the reference, one line per batch/precision/compile setting.

    A cell reads "speedup× (speedup / MAC ratio)". The reference column gives its samples/s and, in brackets, its
    samples/s over the float32 eager reference at the same batch: what AMP and torch.compile alone bring.
    """
    measured = [r for r in rows if _num(r["infer_samples_per_sec"]) is not None]
    if not measured:
        return []
    reference = str(measured[0].get("reference") or "timm")
    modes = [m for m in dict.fromkeys(r["mode"] for r in measured) if m != reference]
    cells: dict[tuple[str, str, str], dict[str, Row]] = {}
    for r in measured:
        cells.setdefault(_setting(r), {})[r["mode"]] = r
    lines = [f"| batch | precision | compile | {reference} samples/s (vs float32 eager) | "
             + " | ".join(f"{m} speedup (/ MAC ratio)" for m in modes) + " |", "|" + "---|" * (4 + len(modes))]
    for (batch, precision, compiled), by_mode in cells.items():
        ref = by_mode.get(reference)
        base = cells.get((batch, "float32", "False"), {}).get(reference)
        ref_cell = "-"
        if ref is not None:
            rate = float(ref["infer_samples_per_sec"])
            gain = f" ({rate / float(base['infer_samples_per_sec']):.2f}×)" if base is not None else ""
            ref_cell = f"{rate:.2f}{gain}"
        row = [batch, precision, compiled, ref_cell]
        for m in modes:
            r = by_mode.get(m)
            if r is None:
                row.append("-")
                continue
            speedup, ideal = float(r["infer_ratio"]), _num(r.get("mac_ratio"))
            row.append(f"{speedup:.2f}× ({speedup / ideal:.2f})" if ideal else f"{speedup:.2f}×")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def detail_table(rows: list[Row]) -> list[str]:
    """Every row with its spread, for both phases."""
    head = ["model", "mode", "precision", "compile", "batch", "img", "params (M)", "GMACs", "MAC ratio", "attn",
            "infer samples/s", "infer ms", "infer speedup", "train samples/s", "train ms", "train speedup",
            "infer speedup / MAC ratio"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], r["mode"], r["precision"], r["compile"],
                 r["infer_batch_size"] or r["train_batch_size"], r["infer_img_size"] or r["train_img_size"],
                 r["param_count"], r.get("infer_gmacs", ""), r.get("mac_ratio", ""), r["attn"]]
        for phase in PHASES:
            if _num(r[f"{phase}_samples_per_sec"]) is None:
                cells += ["-", "-", "-"]
                continue
            cells += [f"{float(r[f'{phase}_samples_per_sec']):.2f} ({float(r[f'{phase}_samples_per_sec_min']):.2f}-"
                      f"{float(r[f'{phase}_samples_per_sec_max']):.2f})",
                      f"{float(r[f'{phase}_step_time']):.1f}",
                      f"{float(r[f'{phase}_ratio']):.3f} ({float(r[f'{phase}_ratio_min']):.3f}-"
                      f"{float(r[f'{phase}_ratio_max']):.3f})"]
        measured, ideal = _num(r["infer_ratio"]), _num(r.get("mac_ratio"))
        cells.append(f"{measured / ideal:.3f}" if measured is not None and ideal else "-")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def markdown(rows: list[Row], command: str = "") -> str:
    """The header, the MAC table, the inference speedup table and every row in detail (also what is printed)."""
    lines = header(rows, command) + mac_table(rows) + [""]
    speedups = speedup_table(rows)
    if speedups:
        lines += speedups + [""]
    lines += detail_table(rows)
    return "\n".join(lines) + "\n"
