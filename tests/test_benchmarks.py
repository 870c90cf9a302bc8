"""Benchmark harness, suite, study and results page (docs/results.md): the timing protocol's arithmetic on a fake
clock, a tiny smoke run of every mode and of the suite, the study's tables and plot from fake runs.

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
import torch

import interop
import main
import models
from benchmarks import env, readme_results, report, run, study
from benchmarks.modes import MODES, REFERENCE_MODE
from benchmarks.timing import Run, measure, median_interval, median_ratio, paired_ratios
from conftest import ROOT

TINY = ("--model", "vit_digits_micro", "--batch-size", "2", "--num-warm-iter", "2", "--num-bench-iter", "2",
        "--repeats", "1", "--warm-seconds", "0", "--device", "cpu")

TIMM_COLUMNS = ("model", "infer_samples_per_sec", "infer_step_time", "infer_batch_size", "infer_img_size",
                "train_samples_per_sec", "train_step_time", "train_batch_size", "train_img_size", "param_count")
OUR_COLUMNS = ("mode", "precision", "compile", "reference", "mac_ratio", "theoretical_gmacs", "theoretical_mac_ratio",
               "device", "torch", "timm", "python", "threads", "date", "clock")


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


def test_the_median_interval_is_the_binomial_order_statistics() -> None:
    """95%: with 11 values the 2nd smallest and 2nd largest (P(Bin(11, 1/2) <= 1) = 12/2048 <= 0.025 <
    P(<= 2) = 67/2048); with 15 the 4th; 5 values cannot give 95% (1/32 > 0.025); order does not matter."""
    values = [1.07, 0.95, 1.01, 1.03, 0.99, 1.02, 1.05, 1.00, 0.97, 1.04, 1.06]
    assert median_interval(values) == (0.97, 1.06)
    assert median_interval(list(range(15, 0, -1))) == (4, 12)
    assert median_interval(list(range(6))) == (0, 5)
    with pytest.raises(ValueError, match="too few"):
        median_interval([1.0] * 5)


def test_warm_up_runs_the_iterations_then_continues_until_the_time_floor() -> None:
    clock = FakeClock()
    measure({"a": clock.run("a", [3.0] * 10)}, batch_size=1, num_warm_iter=2, num_bench_iter=1, repeats=1,
            warm_seconds=10.0, clock=clock)
    assert clock.calls == [("a", 2), ("a", 1), ("a", 1), ("a", 1)]  # 6 s, then 9 s, then 12 s >= 10 s; timed


def test_time_floor_sets_each_runs_iterations_from_one_calibration_step() -> None:
    clock = FakeClock()
    runs = {"slow": clock.run("slow", [2.0] * 10), "fast": clock.run("fast", [0.25] * 10)}
    timings = measure(runs, batch_size=1, num_warm_iter=1, num_bench_iter=2, repeats=2, min_bench_seconds=3.0,
                      clock=clock)
    assert timings["slow"].num_iter == 2 and timings["fast"].num_iter == 12  # max(2, ceil(3 / step))
    assert clock.calls[:4] == [("slow", 1), ("slow", 1), ("fast", 1), ("fast", 1)]  # warm-up, calibration
    assert timings["fast"].seconds == (3.0, 3.0) and timings["fast"].rates == (4.0, 4.0)


@pytest.mark.parametrize("kwargs", [dict(repeats=0), dict(num_bench_iter=0), dict(num_warm_iter=-1),
                                    dict(min_bench_seconds=-1.0)])
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
        assert row["reference"] == REFERENCE_MODE and float(row["theoretical_mac_ratio"]) >= 1
    assert mode in csv_path.with_suffix(".md").read_text()


@pytest.mark.slow
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


SUITE_TINY = ("--suite", "--model", "vit_digits_micro", "--num-warm-iter", "1", "--num-bench-iter", "1",
              "--min-bench-seconds", "0", "--repeats", "2", "--device", "cpu")


def test_suite_measures_every_kind_at_two_batches_and_tabulates_speedups_against_dense(tmp_path: Path) -> None:
    csv_path = run.main([*SUITE_TINY, "--batch-size", "1", "2", "--no-compile", "--csv", str(tmp_path / "s.csv")])
    rows = read_rows(csv_path)
    precisions = [p for p in env.PRECISIONS if env.precision_unsupported_reason(torch.device("cpu"), p) is None]
    assert {(r["infer_batch_size"], r["precision"]) for r in rows} == {(b, p) for b in ("1", "2") for p in precisions}
    for row in rows:
        assert row["reference"] == "dense" and row["clock"] == "cpu" and row["threads"] == "1"  # the CPU suite's
        assert row["train_samples_per_sec"] == ""  # inference only
        assert math.isfinite(float(row["infer_ratio"])) and float(row["mac_ratio"]) >= 1
    by_mode = {r["mode"]: r for r in rows}
    assert list(by_mode) == run.SUITE_MODES
    assert float(by_mode["dense"]["infer_ratio"]) == 1.0
    assert float(by_mode["compact+drop70"]["mac_ratio"]) > float(by_mode["compact"]["mac_ratio"]) > 1
    assert float(by_mode["masked50"]["mac_ratio"]) == 1.0 < float(by_mode["masked50"]["theoretical_mac_ratio"])
    table = csv_path.with_suffix(".md").read_text()
    assert "- command: `python benchmarks/run.py --suite --model vit_digits_micro" in table
    assert "torch " + torch.__version__ in table and "speedup (/ MAC ratio)" in table
    assert table.count("| vit_digits_micro |") == len(rows)


@pytest.mark.slow  # torch.compile's inductor runs the C++ compiler
def test_suite_compiles_where_the_device_can(tmp_path: Path) -> None:
    if env.compile_unsupported_reason(torch.device("cpu")):
        pytest.skip(env.compile_unsupported_reason(torch.device("cpu")))
    csv_path = run.main([*SUITE_TINY, "--modes", "compact+drop70", "--batch-size", "2", "--precision", "float32",
                         "--csv", str(tmp_path / "s.csv")])
    rows = read_rows(csv_path)
    assert [(r["mode"], r["compile"]) for r in rows] == [(m, c) for c in ("False", "True")
                                                         for m in ("dense", "compact+drop70")]
    for row in rows:
        assert float(row["infer_samples_per_sec"]) > 0


def test_explicit_options_override_the_suite_defaults() -> None:
    args = run.resolve(run.get_args_parser().parse_args(["--suite", "--batch-size", "8", "--no-compile"]),
                       torch.device("cpu"))
    assert args.batch_size == [8] and args.compile is False and args.modes == run.SUITE_MODES
    gpu = run.suite_defaults(torch.device("cuda"))
    assert gpu["batch_size"] == [1, 256] and gpu["num_bench_iter"] >= 50 and gpu["clock"] == "wall"


def fake_study_rows() -> list[dict[str, object]]:
    rows = []
    for config, acc, mmacs, rate in (("dense", 90.0, 3.5, 1000.0), ("sviite_d50", 88.0, 3.5, 1000.0),
                                     ("s2vite_h07_m06", 86.0, 2.0, 1500.0)):
        for seed, delta in enumerate((-1.0, 0.0, 1.0)):
            rows.append({"config": config, "seed": seed, "test_acc1": acc + delta, "density": 1.0,
                         "train_seconds": 1.0, "run_dir": f"runs/{config}_seed{seed}", "params": 200, "params_nonzero": 100,
                         "mmacs_theoretical": mmacs / 2, "mmacs_executed": mmacs, "samples_per_sec": rate + seed})
    return rows


def test_study_writes_the_table_and_the_plot(tmp_path: Path) -> None:
    study.write_outputs(fake_study_rows(), tmp_path, "python benchmarks/study.py", 90.0, "0.1/0.2/0.3")
    with open(tmp_path / "study.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and "run_dir" not in rows[0] and "mmacs_executed" in rows[0]
    table = (tmp_path / "study.md").read_text()
    assert "- command: `python benchmarks/study.py`" in table and "wall time 1.5 min for 9 runs" in table
    assert "| dense | 3 | 90.00 ± 1.00 |  |" in table
    assert "| s2vite_h07_m06 | 3 | 86.00 ± 1.00 | -4.00 [-4.00, -4.00] (n=3) | 100 / 200 | 1.000 | 2.000 | 1,501 | 1.50× (0.86) |" in table
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "study.png").unlink()
    study.main(["--from-csv", "--out", str(tmp_path)])  # re-rendered from study.csv alone: the same table and plot
    assert (tmp_path / "study.md").read_text() == table and (tmp_path / "study.png").exists()


def test_paired_gap_is_the_mean_per_seed_difference_with_a_t_interval() -> None:
    from benchmarks.paired import paired_gap

    gap = paired_gap({0: 91.0, 1: 92.0, 2: 93.0, 7: 50.0}, {0: 90.0, 1: 90.0, 2: 90.0})  # seed 7 has no pair
    assert gap.n == 3 and gap.mean == 2.0
    assert gap.half_width == pytest.approx(4.302653 / 3 ** 0.5, rel=1e-6)  # t(0.975, 2) * sd 1 / sqrt(3)
    assert gap.inside_noise and gap.text() == "+2.00 [-0.48, +4.48] (n=3, inside the noise)"
    assert not paired_gap({0: 95.0, 1: 96.0, 2: 95.5}, {0: 90.0, 1: 90.0, 2: 90.0}).inside_noise
    with pytest.raises(ValueError, match="no common seed"):
        paired_gap({0: 1.0}, {1: 1.0})


def test_optimizer_state_table_pairs_both_defaults_with_the_same_dense_seeds() -> None:
    from benchmarks import optimizer_state

    new = [{"config": c, "seed": str(s), "test_acc1": str(acc + s)} for c, acc in (("dense", 90.0), ("sviite_d30", 85.0))
           for s in range(3)]
    old = [{"config": "sviite_d30", "seed": str(s), "test_acc1": str(80.0 + 2 * s)} for s in range(4)]  # seed 3: unpaired
    lines = optimizer_state.table(new, old)
    assert len(lines) == 3 and lines[2].startswith("| sviite_d30 | 3 | 86.00 ± 1.00 | 82.00 ± 2.00 | -5.00 [-5.00, -5.00]")
    assert "| +4.00 [" in lines[2]  # new − old: per seed 5, 4, 3
    with pytest.raises(ValueError, match="fewer than two seeds"):
        optimizer_state.table(new, old[:1])


def test_study_default_configs_are_the_issue_list() -> None:
    assert list(study.CONFIGS) == ["dense", "sviite_d50", "sviite_d30", "s2vite_h07_m06", "s2vite_h07_m06_mult8",
                                   "sviteplus_keep07", "sviteplus_keep07_d50", "nm24_srste", "nm24_dst", "s2vite_h07_m06_ft",
                                   "global_macs057_ft", "tome_keep07"]


def test_study_rows_appended_without_a_throughput_show_no_speedup() -> None:
    """Rows trained and timed in another session carry no samples/s: their accuracy pairs with dense, their speed
    does not compare."""
    rows = [{"config": c, "seed": str(s), "test_acc1": str(90.0 + s + (c == "nm24_srste")), "params": "1",
             "params_nonzero": "1", "mmacs_theoretical": "1", "mmacs_executed": "1",
             "samples_per_sec": "" if c == "nm24_srste" else "100"} for c in ("dense", "nm24_srste") for s in range(2)]
    dense, nm = study.summarize(rows)
    assert dense["speedup"] == 1.0 and nm["samples_per_sec"] is None and nm["speedup"] is None
    assert nm["delta_vs_dense"].mean == 1.0
    assert "| see note |  |" in study.table([dense, nm])[-1]


def test_study_rebuilds_the_deployed_model_from_a_run_directory(tmp_path: Path) -> None:
    flags = main.get_args_parser().parse_args(["--model", "vit_digits_micro", "--token_selection", "--token-mode", "drop",
                               "--token-ratio", "0.5", "--input-size", "16"])
    model = models.create_model("vit_digits_micro", num_classes=10)
    models.apply_token_selection(model, models.TokenConfig.from_args(flags))
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    torch.save({"model": model.state_dict(), "args": vars(flags)}, tokens / "checkpoint.pth")  # as main.py saves
    rebuilt = study.deployed_model(tokens)
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), model.eval()(x))
    assert models.mac_summary(rebuilt)["gmacs_executed"] < models.mac_summary(rebuilt)["gmacs_dense"]
    compact = tmp_path / "compact"
    small = models.random_compact_model("vit_digits_micro", 0.5, 0.5, num_classes=10)
    interop.save_compact(small, "vit_digits_micro", compact / "compact.pth")
    assert study.deployed_model(compact).blocks[0].mlp.fc1.out_features < 128


def test_results_section_shows_every_suite_and_the_study_with_their_commands() -> None:
    text = readme_results.render()
    assert text.startswith(readme_results.START) and text.endswith(readme_results.END)
    assert "## What could not be measured here" in text
    for path in readme_results.suite_files():
        assert f"[{path.with_suffix('.md').name}]" in text and "- command: `python benchmarks/run.py --suite" in text
    if (readme_results.STUDY / "study.md").exists():
        assert "![DIGITS top-1 against MACs](../benchmarks/results/study/study.png)" in text  # docs/results.md
        assert "- command: `python benchmarks/study.py" in text
