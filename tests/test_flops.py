"""The analytic MAC and parameter counter against timm's and SViTE's published numbers and torch's own counter."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import models
import sparselearning
from sparselearning.masks import select_parameters

DEIT = {  # name: (analytic GMACs, timm's GMACs, parameters in M)
    "deit_tiny_patch16_224": (1.254, 1.26, 5.72),
    "deit_small_patch16_224": (4.599, 4.61, 22.05),
    "deit_base_patch16_224": (17.564, 17.58, 86.57),
}


@pytest.fixture(scope="module")
def deit() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: models.create_model(name) for name in DEIT}


def saving(model: torch.nn.Module, densities: dict[str, float]) -> float:
    """Theoretical MAC saving in percent against the dense model."""
    dense = models.count_macs(model, "dense").total
    return 100 * (1 - models.count_macs(model, "theoretical", densities).total / dense)


def erk(model: torch.nn.Module, density: float) -> dict[str, float]:
    shapes = {name: tuple(p.shape) for name, p in select_parameters(model).items()}
    return sparselearning.layer_densities(shapes, density, "ERK")


@pytest.mark.parametrize("name", DEIT)
def test_dense_deit_macs_and_parameters(deit: dict, name: str) -> None:
    ours, timm_gmacs, params_m = DEIT[name]
    model = deit[name]
    gmacs = models.count_macs(model, "dense").total / 1e9
    assert gmacs == pytest.approx(ours, abs=5e-4) and abs(gmacs / timm_gmacs - 1) < 0.01
    summary = models.mac_summary(model)
    assert summary["gmacs_dense"] == summary["gmacs_executed"] == pytest.approx(gmacs)
    assert summary["gmacs_theoretical"] == pytest.approx(gmacs, rel=1e-6)  # trunc-normal draws a rare exact 0
    assert summary["params"] / 1e6 == pytest.approx(params_m, abs=5e-3)
    dim = model.embed_dim
    pure = models.vit_macs(dim, [models.BlockShape(dim // 64, 64, 4 * dim, 197)] * 12, num_patches=196,
                           patch_dim=768, num_classes=1000)
    assert pure.total == models.count_macs(model, "dense").total
    assert pure.linear == pytest.approx(12 * 12 * 197 * dim**2 + 196 * 768 * dim + dim * 1000)
    assert pure.attention == 12 * 2 * 197**2 * dim


@pytest.mark.parametrize("name, density, paper, erk_saving", [
    ("deit_small_patch16_224", 0.5, 45.5, 46.1),
    ("deit_base_patch16_224", 0.6, 38.1, 38.5),
])
def test_svite_unstructured_savings(deit: dict, name: str, density: float, paper: float, erk_saving: float) -> None:
    """SViTE's reported savings scale the block linears by the density, patch embedding and head dense; the real
    ERK densities of every masked tensor (patch embedding and head included) save slightly more."""
    model = deit[name]
    assert saving(model, models.svite_paper_densities(12, density)) == pytest.approx(paper, abs=0.05)
    assert saving(model, erk(model, density)) == pytest.approx(erk_saving, abs=0.05)
    uniform_all = {n: density for n in select_parameters(model)}
    assert saving(model, uniform_all) == pytest.approx(erk_saving, abs=0.2)


def test_svite_plus_saving() -> None:
    """SViTE+ on DeiT-S, 5% tokens dropped (k = 187 of 197) and 50% weights: 48.6% computed, 49.32% reported."""
    model = models.create_model("deit_small_patch16_224")
    models.apply_token_selection(model, models.TokenConfig(enabled=True, num_keep=187))
    paper = saving(model, models.svite_paper_densities(12, 0.5))
    assert 48.6 <= round(paper, 1) <= 49.3 and paper == pytest.approx(48.56, abs=0.01)
    assert 48.6 <= saving(model, erk(model, 0.5)) <= 49.3
    assert [b.tokens for b in models.block_shapes(model, "theoretical")] == [187] * 12
    assert [b.tokens for b in models.block_shapes(model, "executed")] == [197] * 12  # zero mode: nothing removed


def test_parameter_counts_of_sparse_models(deit: dict) -> None:
    for name, density, expected in (("deit_small_patch16_224", 0.5, 11.1), ("deit_base_patch16_224", 0.6, 52.1)):
        model = deit[name]
        total, nonzero = models.expected_parameters(model, {n: density for n in select_parameters(model)})
        assert total == models.count_parameters(model)[0] and nonzero / 1e6 == pytest.approx(expected, abs=0.05)
    with pytest.raises(ValueError, match="does not have"):
        models.expected_parameters(deit["deit_tiny_patch16_224"], {"module.head.weight": 0.5})


def test_tokens_scale_linears_linearly_and_attention_quadratically() -> None:
    def count(n: int) -> models.MacCount:
        return models.vit_macs(32, [models.BlockShape(2, 16, 128, n)] * 2, num_patches=16, patch_dim=48,
                               num_classes=10)

    full, half = count(20), count(10)
    fixed = full.layers["patch_embed.proj"] + full.layers["head"]
    assert half.linear - fixed == pytest.approx((full.linear - fixed) / 2)
    assert half.attention == pytest.approx(full.attention / 4)
    split = models.vit_macs(32, [models.BlockShape(2, 16, 128, 20, attn_tokens=10)], num_patches=16, patch_dim=48,
                            num_classes=10)
    assert split.layers["blocks.0.attn.qkv"] == full.layers["blocks.0.attn.qkv"] / 2
    assert split.layers["blocks.0.attn.matmul"] == full.layers["blocks.0.attn.matmul"] / 4
    assert split.layers["blocks.0.mlp.fc1"] == full.layers["blocks.0.mlp.fc1"]


@pytest.mark.parametrize("selector", ["global", "layerwise"])
@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_executed_count_equals_torch_flop_counter(selector: str, mode: str) -> None:
    """What the code really runs: torch counts every matmul when attention is unfused (it skips fused SDPA on CPU)."""
    model = models.create_model("vit_digits_micro", num_classes=10).eval()
    for blk in model.blocks:
        blk.attn.fused_attn = False
    models.apply_token_selection(model, models.TokenConfig(enabled=True, num_keep=9, selector=selector, mode=mode))
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 16, 16))
    assert models.count_macs(model, "executed").total == counter.get_total_flops() / 2 / 2  # FLOPs = 2 MACs, 2 images
    tokens = [(b.tokens, b.attn_tokens) for b in models.block_shapes(model, "executed")]
    if mode == "zero":
        assert tokens == [(17, 17)] * 2
    else:
        assert tokens == ([(9, 5)] * 2 if selector == "layerwise" else [(9, 9)] * 2)
    assert models.block_shapes(model, "theoretical") == models.block_shapes(
        _with_mode(model, selector, "drop"), "executed")


def _with_mode(model: torch.nn.Module, selector: str, mode: str) -> torch.nn.Module:
    models.apply_token_selection(model, models.TokenConfig(enabled=True, num_keep=9, selector=selector, mode=mode))
    return model


def test_theoretical_count_reads_masks() -> None:
    model = models.create_model("vit_digits_micro", num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters())
    masking = sparselearning.Masking(model, optimizer, density=0.3, total_steps=10, update_frequency=2,
                                     log_fn=lambda record: None)
    measured = models.count_macs(model, "theoretical")
    from_masks = models.count_macs(model, "theoretical", models.mask_densities(masking.masks))
    assert measured.total == pytest.approx(from_masks.total)
    assert measured.total < 0.5 * models.count_macs(model, "dense").total
    assert models.count_macs(model, "executed").total == models.count_macs(model, "dense").total  # masked = dense
    summary = models.mac_summary(model)
    assert summary["params_nonzero"] < 0.5 * summary["params"]


def test_bad_counter_input() -> None:
    model = models.create_model("vit_digits_micro", num_classes=10)
    with pytest.raises(ValueError, match="not the weight of a counted layer"):
        models.count_macs(model, "theoretical", {"module.blocks.0.attn.qkv.weight": 0.5})
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        models.count_macs(model, "theoretical", {"head.weight": 1.5})
    with pytest.raises(ValueError, match="densities only apply to theoretical"):
        models.count_macs(model, "executed", {"head.weight": 0.5})
    with pytest.raises(ValueError, match="unknown MAC count kind 'paper'; choose from dense, theoretical, executed"):
        models.count_macs(model, "paper")
    with pytest.raises(ValueError, match="attn_tokens <= tokens"):
        models.vit_macs(32, [models.BlockShape(2, 16, 128, 10, attn_tokens=11)], num_patches=16, patch_dim=48,
                        num_classes=10)
    with pytest.raises(ValueError, match="timm VisionTransformer"):
        models.count_macs(torch.nn.Linear(3, 3))
