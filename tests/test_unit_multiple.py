"""--unit-multiple: MLP neurons kept in multiples of N, from the rounding rule to training, compaction, MAC counts,
resume and the checkpoint audit."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import checkpoint_tool
import main
import models
from interop import audit
from interop.detect import Detection
from models import structure_units
from sparselearning import SparsityConfig, StructuredDST, format_table
from sparselearning.units import auto_multiple, kept_count, resolve_multiple
from conftest import train_steps

torch.set_num_threads(1)

MICRO = "vit_digits_micro"  # 2 blocks of 2 heads and 128 MLP neurons


@pytest.mark.parametrize("width,density,multiple,kept", [
    (3072, 0.6, 1, 1843),   # the paper's count: int(3072 x 0.6)
    (3072, 0.6, 16, 1840),  # 1843 = 115.2 x 16: down
    (3072, 0.6, 64, 1856),  # 1843 = 28.8 x 64: up
    (1536, 0.6, 32, 928),
    (256, 0.6, 8, 152),
    (256, 0.6, 64, 128),    # 153 = 2.39 x 64
    (100, 0.24, 16, 32),    # 24 = 1.5 x 16: a tie rounds up
    (100, 1.0, 64, 64),     # 128 would exceed the width: the largest multiple that fits
    (128, 0.5, 64, 64),
])
def test_kept_count_rounds_the_papers_count_to_the_nearest_multiple(width, density, multiple, kept):
    assert kept_count(width, density, multiple) == kept


@pytest.mark.parametrize("width,density,multiple,match", [
    (256, 0.1, 64, r"int\(256 x 0.1\) = 25 units round to 0 as a multiple of 64"),
    (256, 0.001, 1, r"= 0 units round to 0"),
    (32, 0.5, 64, "a multiple of 64 units does not fit in a layer of 32"),
    (32, 0.5, 0, "must be a positive int"),
])
def test_kept_count_never_returns_zero_or_a_multiple_wider_than_the_layer(width, density, multiple, match):
    with pytest.raises(ValueError, match=match):
        kept_count(width, density, multiple)


def test_auto_aligns_wide_layers_only():
    assert [auto_multiple(w) for w in (3072, 1536, 768, 384, 383, 256, 128)] == [8, 8, 8, 8, 1, 1, 1]
    assert resolve_multiple("auto", 3072) == 8 and resolve_multiple(16, 3072) == 16
    assert resolve_multiple("auto", 256) == 1  # vit_digits_tiny: the default keeps the paper's exact count


def test_the_flag_parses_into_the_config():
    parser = main.get_args_parser()
    assert SparsityConfig.from_args(parser.parse_args([])).unit_multiple == "auto"
    assert SparsityConfig.from_args(parser.parse_args(["--unit-multiple", "16"])).unit_multiple == 16
    for bad in ("0", "-8", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--unit-multiple", bad])
    with pytest.raises(ValueError, match="unit_multiple must be a positive int or 'auto'"):
        SparsityConfig(pruning_type="structure", unit_multiple=0)


def sparsifier(multiple, other_density=0.3, records=None, seed=0):
    torch.manual_seed(seed)
    model = models.create_model(MICRO, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    log = records.append if records is not None else (lambda record: None)
    return model, optimizer, StructuredDST(model, optimizer, structure_units(model), 40, atten_density=0.5,
                                           other_density=other_density, unit_multiple=multiple, update_frequency=2,
                                           log_fn=log)


def test_counts_stay_multiples_through_updates_and_compaction_and_macs_use_them():
    records = []
    model, optimizer, dst = sparsifier(16, records=records)  # int(128 x 0.3) = 38 -> 32
    train_steps(model, optimizer, range(1, 31), dst, batch_size=4)
    updates = [r for r in records if r["event"] == "update"]
    assert len(updates) >= 10 and sum(r["swapped_neurons"] for r in updates) > 0  # units really moved
    assert all(r["neurons_kept"] == [32, 32] and r["neuron_multiples"] == [16, 16] for r in records)
    init = records[0]
    assert init["other_density_kept"] == 0.25 and init["other_density"] == 0.3 and init["atten_density_kept"] == 0.5
    assert "MLP neurons kept 0.2500 (asked 0.3, in multiples of 16)" in format_table(init)

    compact = models.compact_model(model, dst.masks).eval()
    assert models.architecture(compact)["block_mlp_hidden"] == [32, 32]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model.eval()(x), atol=1e-5, rtol=0)
    # --flops without a checkpoint plans the same widths, and its MACs are those of the trained compact model
    args = checkpoint_tool.get_args_parser().parse_args(
        ["--model", MICRO, "--data-set", "DIGITS", "--pruning_type", "structure", "--atten_density", "0.5",
         "--other_density", "0.3", "--unit-multiple", "16"])
    planned = checkpoint_tool.planned_model(args, models.TokenConfig())[0]
    assert models.architecture(planned)["block_mlp_hidden"] == [32, 32]
    assert models.count_macs(planned).total == models.count_macs(compact).total


def test_a_multiple_wider_than_the_layer_or_leaving_no_unit_stops_with_a_message():
    with pytest.raises(ValueError, match=r"--unit-multiple 256 keeps no MLP neurons of the 128 of blocks.0.mlp.*"
                                         r"pass a --unit-multiple of at most 128"):
        sparsifier(256)
    with pytest.raises(ValueError, match=r"--other_density 0.1 with --unit-multiple 64 keeps no MLP neurons.*"
                                         r"round to 0 as a multiple of 64.*--other_density >= 0.25 or a smaller"):
        sparsifier(64, other_density=0.1)


def test_resume_needs_the_same_counts():
    _, _, trained = sparsifier(16)
    state = trained.state_dict()
    assert state["unit_multiples"]["blocks.0.mlp"] == 16 and state["config"]["unit_multiple"] == 16
    _, _, other = sparsifier(1)
    with pytest.raises(ValueError, match=r"unit_multiple: 16 → 1"):
        other.load_state_dict(state)
    # a checkpoint from before the flag recorded no multiple, and kept the exact counts
    _, _, exact = sparsifier(1)
    old = exact.state_dict()
    del old["config"]["unit_multiple"], old["unit_multiples"]
    _, _, aligned = sparsifier(16)
    with pytest.raises(ValueError, match=r"keeps 38 of the 128 units of blocks.0.mlp, this run 32 .*"
                                         r"Resume with the checkpoint's --unit-multiple \(1 for"):
        aligned.load_state_dict(old)
    _, _, again = sparsifier(1)
    again.load_state_dict(old)
    assert again.record()["neurons_kept"] == [38, 38]


def test_the_audit_expects_the_rounded_count_the_flags_recorded():
    detection = Detection(None, 224, 1000, 12, 64, 3072, (8,) * 12, (1840,) * 12, True, False, 1.0, False)
    flags = {"pruning_type": "structure", "atten_density": 0.7, "other_density": 0.6}
    assert audit._flag_claims(SimpleNamespace(args={**flags, "unit_multiple": "auto"}), detection) == []
    assert audit._flag_claims(SimpleNamespace(args={**flags, "unit_multiple": 16}), detection) == []
    claims = audit._flag_claims(SimpleNamespace(args={**flags, "unit_multiple": 64}), detection)
    assert len(claims) == 1 and "8 heads and 1856 MLP neurons" in claims[0]
    claims = audit._flag_claims(SimpleNamespace(args=flags), detection)  # recorded before the flag: exact counts
    assert len(claims) == 1 and "8 heads and 1843 MLP neurons" in claims[0]


def test_the_sweep_tabulates_every_multiple_with_its_width_and_marks_the_default(tmp_path):
    from benchmarks import unit_multiple

    csv_path = unit_multiple.main(["--models", MICRO, "--batch-size", "2", "--repeats", "1",
                                   "--min-bench-seconds", "0", "--csv", str(tmp_path / "sweep.csv")])
    text = csv_path.with_suffix(".md").read_text()
    widths = {"1 (default)": 76, "8": 80, "16": 80, "32": 64, "64": 64}  # int(128 x 0.6) = 76, 76 / 8 = 9.5 -> 10
    for label, width in widths.items():
        assert f"| {label} | {width} of 128 |" in text
    assert "the default --unit-multiple gives 1" in text and text.startswith("- command: `python benchmarks/")
    (tmp_path / "sweep.md").write_text(text.replace("| 64 | 64 of 128 |", "| stale |"))
    unit_multiple.main(["--csv", str(csv_path), "--from-csv"])
    assert csv_path.with_suffix(".md").read_text() == text
