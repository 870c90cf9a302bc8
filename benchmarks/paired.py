"""Paired-seed comparisons of DIGITS accuracies: the gap between two configurations computed seed by seed.

Two configurations trained with the same seed share the initial weights of every unmasked tensor, the data order and
the augmentation draws, so most of the run-to-run noise cancels in their per-seed difference. The mean of those
differences, with a Student-t 95% interval, is what a comparison reports; an interval that contains 0 means the
difference is inside the noise.

    python benchmarks/paired.py --csv benchmarks/results/study/study.csv          # every config against dense
"""
from __future__ import annotations

import argparse
import csv
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from scipy import stats


@dataclass(frozen=True)
class PairedGap:
    """Mean of per-seed differences (a − b, in top-1 points) with its 95% Student-t interval."""

    n: int
    mean: float
    half_width: float  # nan with fewer than two seeds

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def inside_noise(self) -> bool:
        """Whether the interval contains 0 (no difference shown at 95%)."""
        return not self.low > 0 and not self.high < 0

    def text(self) -> str:
        """``-0.42 [-1.10, +0.26] (n=12)`` with ", inside the noise" when the interval contains 0."""
        if self.n < 2:
            return f"{self.mean:+.2f} (n={self.n}, no interval)"
        noise = ", inside the noise" if self.inside_noise else ""
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}] (n={self.n}{noise})"


def paired_gap(a: Mapping[int, float], b: Mapping[int, float]) -> PairedGap:
    """Per-seed a − b over the seeds both have.

    Args:
        a: seed -> top-1 of the first configuration.
        b: seed -> top-1 of the second (the baseline).

    Raises:
        ValueError: when the two share no seed, so nothing can be paired.
    """
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        raise ValueError(f"no common seed to pair: {sorted(a)} against {sorted(b)}; run both with the same --seeds")
    diffs = [a[s] - b[s] for s in seeds]
    if len(diffs) < 2:
        return PairedGap(1, diffs[0], math.nan)
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedGap(len(diffs), statistics.fmean(diffs), float(half))


def by_seed(rows: Iterable[Mapping[str, str | float]], config: str) -> dict[int, float]:
    """seed -> top-1 of ``config`` from study rows (``config``, ``seed``, ``test_acc1``)."""
    return {int(r["seed"]): float(r["test_acc1"]) for r in rows if r["config"] == config}


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", type=Path, required=True, help="a study.csv")
    parser.add_argument("--baseline", default="dense")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    base = by_seed(rows, args.baseline)
    for config in dict.fromkeys(r["config"] for r in rows):
        if config != args.baseline:
            print(f"{config} − {args.baseline}: {paired_gap(by_seed(rows, config), base).text()}")


if __name__ == "__main__":
    main()
