"""--mask-init magnitude: the first masks keep the largest weights (unstructured: exact per-layer counts of
--sparse_init; structured: the heads and neurons of largest weight L1 norm), go through the sparsifier's config, and
are checked on resume; the default random init is SViTE's, unchanged."""
from __future__ import annotations

import pytest
import torch

import models
from sparselearning import Masking, SparsityConfig, StructuredDST
from sparselearning.criteria import derive_seed, random_scores, topk_mask
from sparselearning.distributions import layer_counts, layer_densities
from sparselearning.masks import MaskSet, exact_mask


def silent(record: dict) -> None:
    """A log_fn that drops records."""


def micro(seed: int = 0) -> torch.nn.Module:
    """vit_digits_micro with 4 heads of width 8 per block."""
    torch.manual_seed(seed)
    return models.create_model("vit_digits_micro", num_classes=10, block_heads=[4, 4], head_dim=8)


def masking(model: torch.nn.Module, **options) -> Masking:
    return Masking(model, torch.optim.AdamW(model.parameters()), total_steps=1000, log_fn=silent,
                   **{"density": 0.3, "sparse_init": "ERK", **options})


def test_magnitude_keeps_exactly_the_largest_weights_at_the_erk_counts() -> None:
    model = micro()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sparsifier = masking(model, mask_init="magnitude")
    shapes = {name: tuple(m.shape) for name, m in sparsifier.masks.items()}
    counts = layer_counts(layer_densities(shapes, 0.3, "ERK"), shapes)
    assert len(set(counts.values())) > 2  # ERK gives the layers different densities
    for name, mask in sparsifier.masks.items():
        magnitude = before[name].abs().flatten()
        expected = torch.zeros_like(magnitude, dtype=torch.bool)
        expected[magnitude.argsort(descending=True)[: counts[name]]] = True  # no ties among random weights
        assert torch.equal(mask.flatten(), expected), name
        weight = dict(model.named_parameters())[name].detach()
        assert torch.equal(weight, before[name] * mask), name
    assert sparsifier.config.mask_init == "magnitude" and sparsifier.state_dict()["config"]["mask_init"] == "magnitude"


def test_magnitude_ties_are_broken_by_the_seed_with_exact_counts() -> None:
    """A layer that is already sparse (zeros tie at the threshold) still gets its exact count, the same on every
    rank for one seed."""
    weight = torch.nn.Parameter(torch.cat([torch.arange(1.0, 11.0), torch.zeros(30)]).reshape(5, 8))
    picks = [MaskSet.magnitude({"w": weight}, {"w": 16}, seed).masks["w"] for seed in (0, 0, 1)]
    for mask in picks:
        assert int(mask.sum()) == 16 and bool(mask.flatten()[:10].all())  # every non-zero weight, 6 of the zeros
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])


def test_random_init_is_the_one_svite_always_had() -> None:
    model = micro()
    sparsifier = masking(model)
    counts = {name: int(m.sum()) for name, m in sparsifier.masks.items()}
    for name, mask in sparsifier.masks.items():
        assert torch.equal(mask, exact_mask(mask.shape, counts[name], derive_seed(0, name, "init"))), name
    assert sparsifier.config.mask_init == "random"


def head_l1(model: torch.nn.Module, block: int) -> torch.Tensor:
    """Per-head L1 norm of the q, k and v rows and the proj columns, from the [3, H, d] view of qkv."""
    attn = model.blocks[block].attn
    qkv = attn.qkv.weight.detach().reshape(3, 4, 8, -1).abs().sum(dim=(0, 2, 3))
    proj = attn.proj.weight.detach().reshape(-1, 4, 8).abs().sum(dim=(0, 2))
    return (qkv + proj).double()


def test_structured_magnitude_starts_from_the_units_of_largest_weight_norm() -> None:
    model = micro()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.reshape(3, 4, 8, -1)[:, [1, 3]] *= 10  # heads 1 and 3 of block 0
        model.blocks[1].mlp.fc1.weight[[5, 17, 60]] *= 10  # neurons 5, 17, 60 of block 1 (their fc1 rows)
    expected_heads = {i: topk_mask(head_l1(model, i), 2) for i in (0, 1)}
    fc1, fc2 = model.blocks[1].mlp.fc1.weight.detach(), model.blocks[1].mlp.fc2.weight.detach()
    expected_neurons = topk_mask(fc1.abs().sum(1).double() + fc2.abs().sum(0).double(), 64)
    units = models.structure_units(model)
    sparsifier = StructuredDST(model, torch.optim.AdamW(model.parameters()), units, 1000, atten_density=0.5,
                               other_density=0.5, mask_init="magnitude", log_fn=silent)
    assert sparsifier.active["blocks.0.attn"].nonzero().flatten().tolist() == [1, 3]
    assert torch.equal(sparsifier.active["blocks.1.attn"], expected_heads[1])
    assert torch.equal(sparsifier.active["blocks.1.mlp"], expected_neurons)
    assert {5, 17, 60} <= set(sparsifier.active["blocks.1.mlp"].nonzero().flatten().tolist())
    assert sparsifier.state_dict()["config"]["mask_init"] == "magnitude"


def test_structured_random_init_is_the_one_svite_always_had() -> None:
    model = micro()
    sparsifier = StructuredDST(model, torch.optim.AdamW(model.parameters()), models.structure_units(model), 1000,
                               atten_density=0.5, other_density=0.5, log_fn=silent)
    for name, active in sparsifier.active.items():
        drawn = topk_mask(random_scores((active.numel(),), derive_seed(0, name, "init")), int(active.sum()))
        assert torch.equal(active, drawn), name


def test_mask_init_is_validated_and_checked_on_resume() -> None:
    with pytest.raises(ValueError, match="unknown mask_init 'largest'"):
        SparsityConfig(density=0.5, mask_init="largest")
    with pytest.raises(ValueError, match="--mask-init magnitude chooses the first masks of a sparse run, and this "
                                         "run is dense; pass --density"):
        SparsityConfig(mask_init="magnitude")
    assert SparsityConfig(pruning_type="structure", mask_init="magnitude").enabled
    state = masking(micro()).state_dict()
    with pytest.raises(ValueError, match=r"mask_init: 'random' → 'magnitude'"):
        masking(micro(), mask_init="magnitude").load_state_dict(state)
    older = {**state, "config": {k: v for k, v in state["config"].items() if k != "mask_init"}}
    masking(micro(), mask_init="magnitude").load_state_dict(older)  # a state that predates the setting loads


def test_nm_dst_magnitude_keeps_the_n_largest_of_every_group_of_m() -> None:
    from sparselearning.nm_masking import NMMasking

    model = micro()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    sparsifier = NMMasking(model, torch.optim.AdamW(model.parameters()), total_steps=1000, nm="2:4",
                           mask_init="magnitude", log_fn=silent)
    assert sparsifier.masks and sparsifier.state_dict()["config"]["mask_init"] == "magnitude"
    for name, mask in sparsifier.masks.items():
        groups = before[name].abs().reshape(-1, 4)
        expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(2, dim=1).indices, True)
        assert torch.equal(mask.reshape(-1, 4), expected), name
    other = micro()
    random_init = NMMasking(other, torch.optim.AdamW(other.parameters()), total_steps=1000, nm="2:4", log_fn=silent)
    assert any(not torch.equal(random_init.masks[n], m) for n, m in sparsifier.masks.items())
