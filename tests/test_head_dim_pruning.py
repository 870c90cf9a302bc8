"""Global pruning of head dimensions (``--prune-head-dim``): the unit's geometry, exact compaction to narrower timm
heads (fused and explicit attention, pruned together with heads, neurons and channels), detection from the weights,
reload and export, the MAC and latency counts at the kept width, the budget, the refusals and a run of main.py. The
contract tests (bit-exact resume, DDP agreement, mask enforcement) cover it as the ``global-headdim`` case of
tests/sparsifiers.py."""
from __future__ import annotations

import json

import pytest
import torch

import interop
import models
from interop.detect import detect
from models.compact import build_compact
from models.head_stats import block_head_dims
from sparselearning import SparsityConfig
from sparselearning.global_pruning import TYPE_SCALE, GlobalPruning, global_order, prune_to_budget
from sparselearning.latency_table import LatencyTable, save_table
from sparselearning.units import expand_units, head_dim_group, unit_positions
from conftest import train_steps
from test_global_pruning import plain_micro
from training import compact_report
from training.resume_check import compare

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
TOKENS = 17


def global_pruner(model: torch.nn.Module, target: float = 0.5, table: str | None = None, **options) -> GlobalPruning:
    return GlobalPruning(model, torch.optim.SGD(model.parameters(), lr=0.0),
                         models.global_units(model, table, prune_head_dim=True), 30, target_macs=target,
                         prune_every=1, prune_head_dim=True, latency_table=table, log_fn=lambda record: None,
                         **options)


def with_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Random nonzero biases everywhere, so a pruned unit's bias leak would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model


def prune_all_kinds(sparsifier: GlobalPruning) -> None:
    """Remove head dims in both blocks, head 1 of block 0, neurons and embedding channels."""
    new = {group: mask.clone() for group, mask in sparsifier.active.items()}
    new["blocks.0.attn.head_dim"][[0, 3, 4, 9, 15]] = False
    new["blocks.1.attn.head_dim"][2] = False
    new["blocks.0.attn"][1] = False
    new["blocks.1.mlp"][:50] = False
    new["embed"][[1, 5, 7, 20]] = False
    sparsifier._commit(new, 1)


def logits(model: torch.nn.Module, fused: bool) -> torch.Tensor:
    for block in model.blocks:
        block.attn.fused_attn = fused
    with torch.no_grad():
        return model.eval()(X)


def test_a_head_dimension_owns_row_j_of_every_heads_q_k_v_and_column_j_of_every_heads_proj_input() -> None:
    model = plain_micro()  # 2 heads of 16
    group = block_head_dims("blocks.0", model.blocks[0].attn)
    assert (group.name, group.kind, group.num_units) == ("blocks.0.attn.head_dim", "head_dim", 16)
    qkv, bias, proj = group.slices
    rows = [s * 32 + h * 16 + 3 for s in range(3) for h in range(2)]
    assert unit_positions(qkv, 16, torch.tensor([3])).tolist() == rows == unit_positions(bias, 16, torch.tensor([3])).tolist()
    assert unit_positions(proj, 16, torch.tensor([3])).tolist() == [3, 19]
    keep = torch.ones(16, dtype=torch.bool)
    keep[3] = False
    mask = expand_units(keep, qkv, (96, 32))
    assert sorted((~mask).all(dim=1).nonzero().flatten().tolist()) == rows and int((~mask).sum()) == 6 * 32
    assert not bool(expand_units(keep, proj, (32, 32))[:, [3, 19]].any())
    assert TYPE_SCALE["head_dim"] == TYPE_SCALE["head"] / 2 == 3.0  # NViT's QK (2) plus V (1)


@pytest.mark.parametrize("name", ["vit_digits_micro", "vit_digits_micro_distilled"])
def test_compaction_with_pruned_head_dims_heads_neurons_and_channels_is_exact(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10)
    sparsifier = global_pruner(model)
    prune_all_kinds(sparsifier)
    small = models.compact_model(model, sparsifier.masks)
    arch = models.architecture(small)
    assert (arch["embed_dim"], arch["block_heads"], arch["block_head_dim"], arch["block_mlp_hidden"]) == \
        (28, [1, 2], [11, 15], [128, 78])
    assert [b.attn.qkv.weight.shape[0] for b in small.blocks] == [3 * 1 * 11, 3 * 2 * 15]
    assert small.blocks[0].attn.scale == 11 ** -0.5 and small.blocks[0].attn.attn_dim == 11
    for fused in (True, False):  # SDPA's default scale and the explicit path's attn.scale
        torch.testing.assert_close(logits(small, fused), logits(model, fused), rtol=0, atol=1e-5)
    assert sparsifier.record()["nonzero_parameters"] == sum(p.numel() for p in small.parameters())
    assert sparsifier.record()["head_dims_kept"] == [11, 15] and sparsifier.report()["head_dims_kept"] == 26
    # the FLOP counter, the MAC counter and the budget's count agree on the narrower heads
    assert compact_report.measured_macs(small, torch.device("cpu")) == sparsifier.current_macs \
        == models.count_macs(small).total
    # it reloads alone and exports, at its per-block head widths
    path = interop.save_compact(small, name, tmp_path / "compact.pth", {})
    assert json.loads(path.with_suffix(".json").read_text())["block_head_dim"] == [11, 15]
    torch.testing.assert_close(interop.load_compact(path)(X), logits(small, True), rtol=0, atol=0)
    paths = interop.export_model(small, name, models.TokenConfig(), tmp_path / "export")
    config = json.loads(paths["config"].read_text())
    assert config["compact"] and not config["timm_loadable"]
    torch.testing.assert_close(interop.load_export(paths["weights"].parent)(X), logits(small, True), rtol=0, atol=0)
    for file in (path, paths["weights"]):  # --eval --resume and a teacher read both files through the detector
        contents = interop.read_checkpoint(file)
        found = detect(contents.state_dict, name, contents.architecture)
        assert found.compact and found.block_head_dim == (11, 15) and found.block_heads == (1, 2)
        rebuilt = interop.build_model(contents, found, name, models.TokenConfig())
        torch.testing.assert_close(rebuilt(X), logits(small, True), rtol=0, atol=0)


def test_compaction_from_the_zero_pattern_folds_the_v_bias_of_pruned_dims_and_detects_them() -> None:
    """Without masks, a head dimension whose q, k and v weight rows are zero in every head is pruned; its unmasked
    biases add b_q·b_k to every logit (the softmax ignores it) and output b_v at every token, folded into proj."""
    model = with_biases(plain_micro())
    group = head_dim_group("blocks.1.attn", 2, 16)
    keep = torch.ones(16, dtype=torch.bool)
    keep[[1, 2, 8]] = False
    with torch.no_grad():  # peaked attention, so a wrong logit scale would show
        model.blocks[1].attn.qkv.weight.mul_(expand_units(keep, group.primary, (96, 32)) * 20.0)
    small = models.compact_model(model)
    assert models.architecture(small)["block_head_dim"] == [16, 13]
    assert float((small.blocks[1].attn.proj.bias - model.blocks[1].attn.proj.bias).detach().abs().max()) > 1e-3
    for fused in (True, False):
        torch.testing.assert_close(logits(small, fused), logits(model, fused), rtol=0, atol=1e-5)
    compact_form = models.structured_form(model)
    assert compact_form is not None and models.architecture(compact_form)["block_head_dim"] == [16, 13]
    found = detect(model.state_dict(), "vit_digits_micro")
    assert found.structured and found.block_head_dim == (16, 13) and found.block_heads == (2, 2)
    assert any("head dims [16, 13] of 16" in line for line in found.lines())
    assert models.nonzero_parameters(model) == sum(p.numel() for p in small.parameters())
    views = models.mac_views(model)  # the masked model's theoretical count is its compact form's, executed is dense
    assert views["theoretical"] == models.count_macs(small).total < views["executed"] == views["dense"]


def test_a_compact_architecture_without_per_block_head_widths_has_head_dim_in_every_block() -> None:
    model = plain_micro()
    arch = {"model": "vit_digits_micro", **models.architecture(model)}
    old = {key: value for key, value in arch.items() if key != "block_head_dim"}
    assert models.architecture(build_compact(old)) == models.architecture(model)
    narrow = build_compact({**arch, "block_heads": [2, 1], "block_head_dim": [5, 16]})
    assert [(b.attn.num_heads, b.attn.head_dim, b.attn.scale) for b in narrow.blocks] == \
        [(2, 5, 5 ** -0.5), (1, 16, 16 ** -0.5)]


def test_the_global_ranking_on_a_hand_case_with_a_head_dim_group() -> None:
    """Head dims rank in the one list in removals of their multiple; the MAC count narrows every head of the
    block: removing 2 of block 0's 16 head dims saves 2 x (qkv 3·T·D·H + attention matmuls 2·T²·H + proj T·H·D)."""
    model = plain_micro()
    units = models.global_units(model, prune_head_dim=True)
    names = [g["name"] for g in units.groups]
    assert names == ["blocks.0.attn", "blocks.0.attn.head_dim", "blocks.0.mlp", "blocks.1.attn",
                     "blocks.1.attn.head_dim", "blocks.1.mlp", "embed"]
    dense = {g["name"]: g["num_units"] for g in units.groups}
    assert units.macs(dense) == models.count_macs(model).total
    saved = units.macs(dense) - units.macs({**dense, "blocks.0.attn.head_dim": 14})
    assert saved == 2 * (3 * TOKENS * 32 * 2 + 2 * TOKENS ** 2 * 2 + TOKENS * 2 * 32)
    active = {"blocks.0.attn.head_dim": torch.ones(4, dtype=torch.bool), "blocks.0.mlp": torch.ones(3, dtype=torch.bool)}
    scores = {"blocks.0.attn.head_dim": torch.tensor([0.4, 0.05, 0.3, 0.02]),
              "blocks.0.mlp": torch.tensor([0.2, 0.06, 0.5])}
    order = global_order(scores, active, {"blocks.0.attn.head_dim": 2})
    assert order == [("blocks.0.mlp", (1,)), ("blocks.0.attn.head_dim", (3, 1)), ("blocks.0.mlp", (0,)),
                     ("blocks.0.mlp", (2,)), ("blocks.0.attn.head_dim", (2, 0))]
    cost = {"blocks.0.attn.head_dim": 10.0, "blocks.0.mlp": 1.0}
    new = prune_to_budget(order, active, lambda c: sum(cost[n] * k for n, k in c.items()), budget=21.0, max_units=9)
    # 43 -> 42 (neuron 1) -> 22 (dims 3 and 1) -> 21 (neuron 0); the last two dims and the last neuron stay
    assert new["blocks.0.attn.head_dim"].tolist() == [True, False, True, False]
    assert new["blocks.0.mlp"].tolist() == [False, False, True]


def test_pruning_to_a_mac_budget_with_head_dims_lands_within_one_percent_and_compacts_to_its_count() -> None:
    model = plain_micro()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sparsifier = GlobalPruning(model, optimizer, models.global_units(model, prune_head_dim=True), 30,
                               target_macs=0.5, prune_every=1, prune_units=40, unit_multiple=2, prune_head_dim=True,
                               log_fn=lambda record: None)
    train_steps(model, optimizer, range(1, 13), sparsifier)
    fraction = sparsifier.current_macs / sparsifier.dense_macs
    assert 0.5 * 0.99 <= fraction <= 0.5 and sparsifier.budget_met
    kept = sparsifier.record()["head_dims_kept"]
    assert min(kept) < 16 and all(k % 2 == 0 for k in kept), kept  # removed two at a time
    small = models.compact_model(model, sparsifier.masks)
    assert models.architecture(small)["block_head_dim"] == kept
    assert compact_report.measured_macs(small, torch.device("cpu")) == sparsifier.current_macs
    torch.testing.assert_close(logits(small, True), logits(model, True), rtol=0, atol=1e-5)


def head_dim_table(head_dims: list[int]) -> LatencyTable:
    """A made-up latency table over vit_digits_micro's shapes with a head_dim axis."""
    grid = {"embed_dim": [1, 32], "num_heads": [1, 2], "head_dim": head_dims, "mlp_hidden": [1, 128]}
    ms = [[[[0.1 + e * h * d * 1e-3 + e * m * 1e-4 for m in grid["mlp_hidden"]] for d in grid["head_dim"]]
           for h in grid["num_heads"]] for e in grid["embed_dim"]]
    return LatencyTable(grid, ms, tokens=TOKENS, batch_size=1)


def test_latency_interpolates_at_the_kept_head_dim_and_the_table_must_span_the_reachable_widths(tmp_path) -> None:
    model = plain_micro()
    table = head_dim_table([1, 16])
    units = models.GlobalUnits(model, table, "hand", prune_head_dim=True)
    dense = {g["name"]: g["num_units"] for g in units.groups}
    narrowed = {**dense, "blocks.1.attn.head_dim": 6, "blocks.1.attn": 1}
    assert units.latency(narrowed) == pytest.approx(table(32, 2, 16, 128) + table(32, 1, 6, 128), rel=1e-12)
    assert table(32, 1, 6, 128) == pytest.approx(0.1 + 32 * 6 * 1e-3 + 32 * 128 * 1e-4)  # linear in the hand ms
    with pytest.raises(ValueError, match=r"head_dim grid \[16\] does not span 1\.\.16.*--head-dim 1 \.\.\. 16"):
        models.GlobalUnits(model, head_dim_table([16]), "hand", prune_head_dim=True)
    models.GlobalUnits(model, head_dim_table([4, 16]), "hand", prune_head_dim=True, unit_multiple=4)
    models.GlobalUnits(model, head_dim_table([16]), "hand")  # without the flag the model's own width suffices
    # the end of a run predicts the compact model at its kept widths
    path = str(save_table(table, tmp_path / "t.json"))
    sparsifier = global_pruner(plain_micro(), table=path)
    prune_all_kinds(sparsifier)
    small = models.compact_model(sparsifier.model, sparsifier.masks)
    got = compact_report.measure_compact(small, "vit_digits_micro", sparsifier, torch.device("cpu"), 2, path,
                                         prune_head_dim=True)
    assert got.macs_agree and got.table_ms == pytest.approx(sparsifier.units.latency(sparsifier._active_counts()))


def test_the_latency_table_command_measures_a_head_dim_grid(tmp_path) -> None:
    from benchmarks import latency_table

    out = tmp_path / "t.json"
    table = latency_table.main(["--model", "vit_digits_micro", "--out", str(out), "--points", "2", "--batch-size",
                                "1", "--iters", "1", "--repeats", "1", "--warm", "0", "--head-dim", "16", "1"])
    assert list(table.grid["head_dim"]) == [1, 16] and table.ms.shape == (2, 2, 2, 2)
    models.global_units(plain_micro(), str(out), prune_head_dim=True)  # it covers what pruning can reach


def test_head_dim_pruning_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="--prune-head-dim belongs to --pruning_type global"):
        SparsityConfig(pruning_type="structure", prune_head_dim=True)
    with pytest.raises(ValueError, match="--prune-head-dim belongs to --pruning_type global"):
        SparsityConfig(density=0.5, prune_head_dim=True)
    assert SparsityConfig(pruning_type="global", target_macs=0.5, prune_head_dim=True).prune_head_dim
    model = plain_micro()
    with pytest.raises(ValueError, match=r"do not match prune_head_dim True: .*global_units\(model, prune_head_dim=True"):
        GlobalPruning(model, torch.optim.SGD(model.parameters(), lr=0.1), models.global_units(model), 30,
                      target_macs=0.5, prune_head_dim=True)
    with pytest.raises(ValueError, match="of head dimensions per block"):
        global_pruner(model, target=0.001)
    with pytest.raises(ValueError, match=r"16 head_dims in blocks.0.attn.head_dim, not a multiple of 32"):
        global_pruner(model, unit_multiple=32)
    qk_norm = models.create_model("vit_digits_micro", num_classes=10)
    qk_norm.blocks[0].attn.q_norm = torch.nn.LayerNorm(16)
    with pytest.raises(ValueError, match="normalises q or k over the head width"):
        models.global_units(qk_norm, prune_head_dim=True)
    with pytest.raises(ValueError, match="not 3 x heads x 16: a compact model with narrower heads"):
        small = models.create_model("vit_digits_micro", num_classes=10, block_heads=[2, 2], block_head_dim=[5, 16])
        detect(small.state_dict(), "vit_digits_micro")
    # a resume must keep the setting
    saved = {"pruning_type": "global", "prune_head_dim": False}
    assert compare(saved, {**saved, "prune_head_dim": True})[0] == [("prune_head_dim", False, True)]


@pytest.mark.slow
def test_main_prunes_head_dims_and_the_checkpoint_tool_reads_both_files(tmp_path, capsys) -> None:
    """main.py end to end: the compact model has narrower heads and the budget's MACs by the FLOP counter; the
    checkpoint tool detects the pruned head dims of the masked checkpoint from its weights, compacts it to the same
    top-1, and evaluates the compact file."""
    import main
    from conftest import TINY_RUN, run_main

    out = tmp_path / "global"
    proc = run_main(*TINY_RUN, "--epochs", "1", "--output_dir", str(out), "--pruning_type", "global",
                    "--target-macs", "0.5", "--prune-every", "4", "--prune-units", "60", "--prune-head-dim")
    small = interop.load_compact(out / "compact.pth")
    widths = models.architecture(small)["block_head_dim"]
    assert min(widths) < 16, proc.stdout[-2000:]
    measured = json.loads((out / "log.txt").read_text().splitlines()[-1])["compact_model"]
    assert measured["macs"] == measured["budget_macs"] == models.count_macs(small).total and measured["macs_agree"]
    assert json.loads((out / "config.json").read_text())["prune_head_dim"] is True

    def evaluate(*flags: str) -> tuple[dict, str]:
        stats = main.main(main.get_args_parser().parse_args([*TINY_RUN, *flags]))
        return stats, capsys.readouterr().out

    stats, text = evaluate("--eval", "--compact", "--resume", str(out / "checkpoint.pth"), "--output_dir",
                           str(tmp_path / "tool"))
    assert f"head dims {widths} of 16" in text and stats["compact_test_acc1"] == pytest.approx(stats["test_acc1"])
    again, text = evaluate("--eval", "--resume", str(out / "compact.pth"))
    assert f"head dims {widths} of 16" in text and again["test_acc1"] == pytest.approx(stats["test_acc1"])
