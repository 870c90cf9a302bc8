"""The DIGITS study's SViTE rows under the old and the new optimizer-state default at topology updates, paired by seed.

    python benchmarks/optimizer_state.py --new benchmarks/results/study/study.csv \
        --old benchmarks/results/study/old-optimizer-state.csv

The old default zeroed AdamW's moments at every changed position while its per-tensor ``step`` kept counting; the new
one keeps the state (dense gradients keep it valid). The old rows are trained by ``benchmarks/study.py`` from a scratch
checkout of the same commit with ``benchmarks/results/study/old-optimizer-state.patch`` applied, so the optimizer
state is the only difference. Dense runs do not touch that code, so both are compared with the same dense runs.
Writes ``optimizer-state.md`` next to ``--old``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/optimizer_state.py` puts benchmarks/, not the root, on the path

from benchmarks.paired import by_seed, paired_gap, read_rows  # noqa: E402


def table(new_rows: list[dict[str, str]], old_rows: list[dict[str, str]]) -> list[str]:
    """One line per configuration the old rows have: both defaults' top-1 and their paired differences."""
    dense = by_seed(new_rows, "dense")
    lines = ["| configuration | seeds | new default top-1 (mean ± std) | old default top-1 (mean ± std) | "
             "new − dense [95%] | old − dense [95%] | new − old [95%] |",
             "|---|---|---|---|---|---|---|"]
    for config in dict.fromkeys(r["config"] for r in old_rows):
        new, old = by_seed(new_rows, config), by_seed(old_rows, config)
        seeds = sorted(new.keys() & old.keys() & dense.keys())
        if len(seeds) < 2:
            raise ValueError(f"{config}: fewer than two seeds trained under both defaults and dense: {seeds}")
        new, old = {s: new[s] for s in seeds}, {s: old[s] for s in seeds}

        def spread(values: dict[int, float]) -> str:
            return f"{statistics.fmean(values.values()):.2f} ± {statistics.stdev(values.values()):.2f}"

        lines.append(f"| {config} | {len(seeds)} | {spread(new)} | {spread(old)} | {paired_gap(new, dense).text()} | "
                     f"{paired_gap(old, dense).text()} | {paired_gap(new, old).text()} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new", type=Path, required=True, help="study.csv of the current code (with dense rows)")
    parser.add_argument("--old", type=Path, required=True, help="study.csv trained with the old-default patch")
    parser.add_argument("--commit", default="", help="the commit both were trained from, for the record")
    args = parser.parse_args(argv)
    lines = [f"- new: `{args.new.name}`; old: `{args.old.name}`, trained with `old-optimizer-state.patch` applied"
             + (f" to commit {args.commit}" if args.commit else ""),
             "- every difference is paired by seed (same initial weights, data order and masks at start), with a "
             "Student-t 95% interval; an interval containing 0 is inside the noise", "",
             *table(read_rows(args.new), read_rows(args.old))]
    out = args.old.parent / "optimizer-state.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
