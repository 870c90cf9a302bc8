"""The end of a global-pruning run, measured (``training.compact_report``): the FLOP counter's MACs of the compact
model equal the count the budget used, the latencies are timed and the table predicts both models; the end-to-end
run's summary and log.txt carry them (tests/test_global_pruning.py)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import models
from sparselearning.global_pruning import GlobalPruning
from sparselearning.latency_table import save_table
from test_global_pruning import hand_table
from training import compact_report, summary


def pruned(name: str, table: str | None = None) -> tuple[GlobalPruning, torch.nn.Module]:
    """A micro model with embedding channels, a head and MLP neurons removed, and its compact model."""
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10)
    sparsifier = GlobalPruning(model, torch.optim.SGD(model.parameters(), lr=0.0),
                               models.global_units(model, table), 30, target_macs=0.5, prune_every=10,
                               latency_table=table, log_fn=lambda record: None)
    new = {group: mask.clone() for group, mask in sparsifier.active.items()}
    new["embed"][[1, 5, 7, 20]] = False
    new["blocks.0.attn"][1] = False
    new["blocks.1.mlp"][:50] = False
    sparsifier._commit(new, 10)
    return sparsifier, models.compact_model(model, sparsifier.masks)


@pytest.mark.parametrize("name", ["vit_digits_micro", "vit_digits_micro_distilled"])
def test_the_flop_counter_measures_the_macs_the_budget_counted(name: str) -> None:
    sparsifier, small = pruned(name)
    arch = models.architecture(small)
    assert (arch["embed_dim"], arch["block_heads"], arch["block_mlp_hidden"]) == (28, [1, 2], [128, 78])
    measured = compact_report.measured_macs(small, torch.device("cpu"))
    assert measured == sparsifier.current_macs < sparsifier.dense_macs
    # the attention matmuls (CPU's fused kernel, which torch's counter lacks) are in it: 2 x tokens^2 x 16 x 3 heads
    tokens = small.patch_embed.num_patches + small.num_prefix_tokens
    assert measured - models.count_macs(small).linear == 2 * tokens ** 2 * 16 * 3
    assert small.training, "the training flag is restored"


def test_the_measurement_times_both_models_at_the_tables_batch_and_predicts_them(tmp_path) -> None:
    table = str(save_table(hand_table(batch_size=3), tmp_path / "t.json"))
    sparsifier, small = pruned("vit_digits_micro", table)
    before = torch.random.get_rng_state()
    got = compact_report.measure_compact(small, "vit_digits_micro", sparsifier, torch.device("cpu"), 48, table)
    assert torch.equal(torch.random.get_rng_state(), before), "the dense reference draws from a forked RNG"
    assert got.batch_size == 3 and got.macs_agree and got.macs == sparsifier.current_macs
    assert all(math.isfinite(v) and v > 0 for v in (got.ms, got.dense_ms))
    units = sparsifier.units
    assert got.table_ms == pytest.approx(units.latency(sparsifier._active_counts()), rel=1e-12)
    assert got.table_dense_ms == pytest.approx(units.latency({g.name: g.num_units for g in sparsifier.groups}))
    assert got.table_ms < got.table_dense_ms
    record = got.to_record()
    assert record["speedup"] == got.dense_ms / got.ms and record["table_speedup"] > 1 and record["macs_agree"]
    lines = got.lines()
    assert len(lines) == 2 and f"budget counted {sparsifier.current_macs / 1e9:.4g} (0.7026 of the dense" in lines[0]
    assert "the latency table predicts" in lines[1] and "batch 3, float32" in lines[1]
    plain = compact_report.measure_compact(small, "vit_digits_micro", sparsifier, torch.device("cpu"), 5)
    assert plain.batch_size == 5 and plain.table_ms is None and "table" not in plain.lines()[-1]


def test_a_mac_mismatch_is_warned_and_shown_with_both_numbers() -> None:
    _, small = pruned("vit_digits_micro")
    wrong = SimpleNamespace(current_macs=300_000.0, dense_macs=479_680.0)
    assert isinstance(wrong, compact_report.MacBudget)
    with pytest.warns(UserWarning, match=r"MISMATCH: the FLOP counter measures 337,032 MACs .* counted 300,000"):
        got = compact_report.measure_compact(small, "vit_digits_micro", wrong, torch.device("cpu"), 2)
    text = summary.format_summary(small, [{"epoch": 0, "test_acc1": 50.0}], None, None,
                                  (small, {"acc1": 50.0}, None), got)
    assert "MISMATCH" in text and "GMACs per image by torch's FLOP counter" in text and not got.to_record()["macs_agree"]
