"""The end-of-run summary and the sparsity console output of a training run."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import interop
from conftest import TINY_RUN, run_main
from training import summary

TABLE_HEADER = re.compile(r"^layer\s+shape\s+density\s+nonzero\s+numel$", re.M)


@pytest.mark.slow
def test_structured_run_ends_with_a_summary_in_one_count(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_main(*TINY_RUN, "--epochs", "1", "--pruning_type", "structure", "--atten_density", "0.5",
                    "--other_density", "0.5", "--update_frequency", "20", "--output_dir", str(out))
    text = proc.stdout
    # the per-layer table at start and end only; the update between them is one line
    assert len(TABLE_HEADER.findall(text)) == 2
    assert len(re.findall(r"^sparsity update at step 20: masked density 0\.5000", text, re.M)) == 1  # t_end 0.8
    tail = text[text.index("=== run summary ==="):]
    epoch = [json.loads(line) for line in (out / "log.txt").read_text().splitlines() if '"epoch"' in line][-1]
    assert f"best top-1 {epoch['test_acc1']:.2f}% (epoch 0)" in tail
    assert f"EMA top-1 {epoch['ema_test_acc1']:.2f}%" in tail
    assert "final density 0.5000 of the masked weights" in tail
    # one count: the sparsifier's record, the log's n_nonzero_parameters, the MAC report and the compact model
    compact = interop.load_compact(out / "compact.pth")
    size = sum(p.numel() for p in compact.parameters())
    assert epoch["nonzero_parameters"] == epoch["n_nonzero_parameters"] == size
    assert f"{size:,} non-zero" in tail
    match = re.search(r"compact model \S+compact\.pth: top-1 ([\d.]+)%, ([\d,]+) parameters", tail)
    assert match and int(match[2].replace(",", "")) == size
    assert float(match[1]) == pytest.approx(epoch["test_acc1"], abs=0.3)  # the compact model computes the same
    written = re.search(r"written to \S+: (.*)", tail)[1].split(", ")
    assert {"best.pth", "checkpoint.pth", "compact.pth", "config.json", "log.txt"} <= set(written)


def record(event: str) -> dict:
    return {"event": event, "step": 7, "death_rate": 0.1, "density": 0.5, "density_all": 0.6, "explored_rate": 0.7,
            "nonzero_parameters": 60, "total_parameters": 100,
            "layers": {"blocks.0.attn.qkv.weight": {"shape": [4, 5], "nonzero": 10, "numel": 20, "density": 0.5}}}


@pytest.mark.parametrize("verbose, tables", [(False, 1), (True, 2)])
def test_updates_print_one_line_unless_verbose(tmp_path: Path, capsys, verbose: bool, tables: int) -> None:
    log = summary.sparsity_logger(tmp_path, verbose)
    log(record("init"))
    log(record("update"))
    out = capsys.readouterr().out
    assert len(TABLE_HEADER.findall(out)) == tables
    assert ("sparsity update at step 7: masked density 0.5000, all parameters 0.6000 (60 of 100)" in out) != verbose
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 2  # the log keeps every record in full


def test_best_epoch_reads_earlier_epochs_from_the_log_after_a_resume(tmp_path: Path) -> None:
    (tmp_path / "log.txt").write_text("\n".join(json.dumps(r) for r in (
        {"epoch": 0, "test_acc1": 50.0}, {"sparsity": {"event": "update"}}, {"epoch": 1, "test_acc1": 90.0})) + "\n")
    assert summary.best_epoch([{"epoch": 2, "test_acc1": 80.0}], tmp_path) == (90.0, 1)
    assert summary.best_epoch([{"epoch": 2, "test_acc1": 95.0}], tmp_path) == (95.0, 2)
