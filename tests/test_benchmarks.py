"""Benchmark harness: the timing protocol's arithmetic on a fake clock, and a tiny smoke run of every mode.

No timing assertions: benchmarks are measurements, not tests.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report, run
from benchmarks.modes import MODES, REFERENCE_MODE
from benchmarks.timing import Run, measure, median_ratio, paired_ratios
from conftest import ROOT

TINY = ("--model", "vit_digits_micro", "--batch-size", "2", "--num-warm-iter", "2", "--num-bench-iter", "2",
        "--repeats", "1", "--warm-seconds", "0", "--device", "cpu")

TIMM_COLUMNS = ("model", "infer_samples_per_sec", "infer_step_time", "infer_batch_size", "infer_img_size",
                "train_samples_per_sec", "train_step_time", "train_batch_size", "train_img_size", "param_count")
OUR_COLUMNS = ("mode", "precision", "compile", "device", "torch", "timm", "python", "threads", "date", "clock")


class FakeClock:
    """Time moves only when a fake run does work, so the protocol's arithmetic is exact and needs no sleeping."""

    def __init__(self) -> None:
        self.now = 0.0
        self.calls: list[tuple[str, int]] = []

    def __call__(self) -> float:
        return self.now

    def run(self, name: str, step_costs: list[float]) -> Run:
        """A run whose k-th call costs step_costs[k] seconds per step."""
        costs = iter(step_costs)

        def work(n: int) -> None:
            self.calls.append((name, n))
            self.now += n * next(costs)

        return work


def test_measure_reports_medians_spread_and_paired_ratios_in_rotating_order() -> None:
    clock = FakeClock()
    runs = {"a": clock.run("a", [9.0, 1.0, 0.5, 2.0]), "b": clock.run("b", [9.0, 2.0, 1.0, 1.0])}
    timings = measure(runs, batch_size=4, num_warm_iter=1, num_bench_iter=2, repeats=3, clock=clock)
    a, b = timings["a"], timings["b"]
    assert a.seconds == (2.0, 1.0, 4.0) and b.seconds == (4.0, 2.0, 2.0)  # warm-up excluded
    assert a.rates == (4.0, 8.0, 2.0)  # 4 samples x 2 steps / seconds
    assert (a.samples_per_sec, a.min_samples_per_sec, a.max_samples_per_sec) == (4.0, 2.0, 8.0)
    assert a.step_ms == 1000.0  # median 2 s over 2 steps
    assert paired_ratios(a, b) == (2.0, 2.0, 0.5)
    assert median_ratio(a, b) == 2.0  # the ratio of the medians would say 1.0
    timed = [name for name, _ in clock.calls[2:]]
    assert timed == ["a", "b", "b", "a", "a", "b"]


def test_warm_up_runs_the_iterations_then_continues_until_the_time_floor() -> None:
    clock = FakeClock()
    measure({"a": clock.run("a", [3.0] * 10)}, batch_size=1, num_warm_iter=2, num_bench_iter=1, repeats=1,
            warm_seconds=10.0, clock=clock)
    assert clock.calls == [("a", 2), ("a", 1), ("a", 1), ("a", 1)]  # 6 s, then 9 s, then 12 s >= 10 s; timed


@pytest.mark.parametrize("kwargs", [dict(repeats=0), dict(num_bench_iter=0), dict(num_warm_iter=-1)])
def test_measure_rejects_empty_protocols(kwargs: dict[str, int]) -> None:
    args = dict(batch_size=1, num_warm_iter=0, num_bench_iter=1, repeats=1) | kwargs
    with pytest.raises(ValueError):
        measure({"a": lambda n: None}, **args)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == report.COLUMNS
        return list(reader)


def assert_measured(row: dict[str, str], phase: str) -> None:
    for key in ("samples_per_sec", "samples_per_sec_min", "samples_per_sec_max", "step_time", "ratio", "ratio_min",
                "ratio_max"):
        value = float(row[f"{phase}_{key}"])
        assert math.isfinite(value) and value > 0, (phase, key, value)
    assert row[f"{phase}_batch_size"] == "2" and row[f"{phase}_img_size"] == "16"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_runs_and_writes_timm_columns(mode: str, tmp_path: Path) -> None:
    csv_path = run.main([*TINY, "--modes", mode, "--csv", str(tmp_path / "bench.csv")])
    rows = read_rows(csv_path)
    assert set(TIMM_COLUMNS + OUR_COLUMNS) <= set(rows[0])
    assert {r["mode"] for r in rows} == {REFERENCE_MODE, mode}
    for row in rows:
        assert_measured(row, "infer")
        assert_measured(row, "train")
        assert 0 < float(row["param_count"]) < 1 and row["attn"] == "fused"
        assert row["precision"] == "float32" and row["compile"] == "False" and int(row["threads"]) >= 1
    assert mode in csv_path.with_suffix(".md").read_text()


def test_entry_point_runs_from_the_repo_root_and_appends(tmp_path: Path) -> None:
    csv_path = tmp_path / "bench.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "benchmarks/run.py", *TINY, "--bench", "infer", "--threads", "1",
                    "--csv", str(csv_path)], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    run.main([*TINY, "--bench", "train", "--clock", "cpu", "--csv", str(csv_path), "--append"])
    rows = read_rows(csv_path)
    assert [r["clock"] for r in rows] == ["wall", "wall", "cpu", "cpu"]
    assert [r["infer_samples_per_sec"] != "" for r in rows] == [True, True, False, False]
    for row in rows[:2]:
        assert_measured(row, "infer")
    for row in rows[2:]:
        assert_measured(row, "train")
    table = csv_path.with_suffix(".md").read_text()
    assert table.count("| vit_digits_micro |") == 4
