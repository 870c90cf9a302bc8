"""benchmarks/quickstart_table.py on hand-made run directories (the 4-minute quickstart itself is not run here)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import interop
import main
import models
from benchmarks import quickstart_table
from conftest import TINY_RUN

MICRO = "vit_digits_micro"


def fake_run(root: Path, name: str, *flags: str) -> Path:
    """A run directory as main.py leaves it: config.json and checkpoint.pth (and compact.pth when structured)."""
    args = main.get_args_parser().parse_args([*TINY_RUN, "--model", MICRO, *flags])
    args.input_size = models.default_img_size(MICRO)
    torch.manual_seed(0)
    model = models.create_model(MICRO, num_classes=10, img_size=args.input_size)
    models.apply_token_selection(model, models.TokenConfig.from_args(args))
    run_dir = root / name
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(vars(args)))
    if args.pruning_type == "structure":
        masks = models.random_unit_masks(model, args.atten_density, args.other_density)
        interop.save_compact(models.compact_model(model, masks), MICRO, run_dir / "compact.pth", vars(args))
    elif args.density is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(torch.rand(p.shape) < args.density)
    torch.save({"model": model.state_dict(), "args": vars(args)}, run_dir / "checkpoint.pth")
    return run_dir


def test_table_evaluates_counts_and_times_every_run(tmp_path: Path, capsys) -> None:
    runs = [fake_run(tmp_path, "dense"), fake_run(tmp_path, "svite", "--density", "0.5"),
            fake_run(tmp_path, "s2vite", "--pruning_type", "structure", "--atten_density", "0.5",
                     "--other_density", "0.5"),
            fake_run(tmp_path, "sviteplus", "--token_selection", "--token-mode", "drop", "--token-ratio", "0.5")]
    rows = quickstart_table.main([str(r) for r in runs] + ["--repeats", "1", "--min-seconds", "0"])
    out = capsys.readouterr().out
    by_run = {r["run"]: r for r in rows}
    assert list(by_run) == ["dense", "svite", "s2vite", "sviteplus"] and by_run["dense"]["speedup"] == 1.0
    assert all(0 <= r["top1"] <= 100 and r["speedup"] > 0 for r in rows)
    dense = by_run["dense"]
    assert by_run["svite"]["params_nonzero"] < 0.7 * dense["params_nonzero"]
    assert by_run["svite"]["theoretical"] < dense["theoretical"] and by_run["svite"]["executed"] == dense["executed"]
    compact = interop.load_compact(runs[2] / "compact.pth")
    assert by_run["s2vite"]["params_nonzero"] == sum(p.numel() for p in compact.parameters())
    assert by_run["s2vite"]["executed"] == by_run["s2vite"]["theoretical"] < dense["executed"]
    assert by_run["sviteplus"]["executed"] < dense["executed"]  # drop mode really shortens the sequence
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["run", "top-1"] and [line.split()[0] for line in lines[2:6]] == list(by_run)
    assert f"{by_run['s2vite']['params_nonzero']:,.0f}" in lines[4]


def test_table_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="not main.py run directories"):
        quickstart_table.main([str(tmp_path)])
