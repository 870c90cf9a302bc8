"""Per-layer density allocation: the SViTE ERK oracle, exact counts, uniform/ER, redistribution."""
import math

import pytest
import torch

from sparselearning import layer_counts, layer_densities
from sparselearning.distributions import redistribute
from sparselearning.masks import exact_mask

torch.set_num_threads(1)


def deit_shapes(dim: int, depth: int = 12) -> dict[str, tuple[int, ...]]:
    """The 50 tensors SViTE masks in a DeiT of width ``dim``, in named_parameters order."""
    shapes: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (dim, 3, 16, 16)}
    for i in range(depth):
        shapes[f"blocks.{i}.attn.qkv.weight"] = (3 * dim, dim)
        shapes[f"blocks.{i}.attn.proj.weight"] = (dim, dim)
        shapes[f"blocks.{i}.mlp.fc1.weight"] = (4 * dim, dim)
        shapes[f"blocks.{i}.mlp.fc2.weight"] = (dim, 4 * dim)
    shapes["head.weight"] = (1000, dim)
    return shapes


# docs/original-sviite.md, "ERK densities": model width, density -> patch_embed, qkv, attn.proj, fc1 (= fc2), head
ERK_ORACLE = [
    (192, 0.5, 0.1136, 0.5123, 0.7684, 0.4802, 0.4580),
    (192, 0.7, 0.1605, 0.7241, 1.0, 0.6788, 0.6473),
    (384, 0.3, 0.1237, 0.3022, 0.4533, 0.2833, 0.3137),
    (384, 0.4, 0.1649, 0.4029, 0.6044, 0.3778, 0.4182),
    (384, 0.5, 0.2061, 0.5037, 0.7555, 0.4722, 0.5228),
    (384, 0.6, 0.2473, 0.6044, 0.9066, 0.5666, 0.6274),
    (384, 0.7, 0.2907, 0.7105, 1.0, 0.6661, 0.7375),
    (768, 0.3, 0.2349, 0.2996, 0.4494, 0.2808, 0.3972),
    (768, 0.4, 0.3132, 0.3994, 0.5991, 0.3745, 0.5296),
    (768, 0.5, 0.3915, 0.4993, 0.7489, 0.4681, 0.6621),
    (768, 0.6, 0.4698, 0.5991, 0.8987, 0.5617, 0.7945),
    (768, 0.7, 0.5517, 0.7035, 1.0, 0.6596, 0.9329),
]


@pytest.mark.parametrize("method", ["ERK", "fixed_ERK"])
@pytest.mark.parametrize("dim,density,patch,qkv,proj,mlp,head", ERK_ORACLE)
def test_erk_matches_sviite_table(method, dim, density, patch, qkv, proj, mlp, head):
    shapes = deit_shapes(dim)
    p = layer_densities(shapes, density, method)
    for i in range(12):
        expected = {
            f"blocks.{i}.attn.qkv.weight": qkv,
            f"blocks.{i}.attn.proj.weight": proj,
            f"blocks.{i}.mlp.fc1.weight": mlp,
            f"blocks.{i}.mlp.fc2.weight": mlp,
        }
        for name, value in expected.items():
            assert p[name] == pytest.approx(value, abs=5e-5), name
            if value == 1.0:
                assert p[name] == 1.0, f"{name} must be made exactly dense"
    assert p["patch_embed.proj.weight"] == pytest.approx(patch, abs=5e-5)
    assert p["head.weight"] == pytest.approx(head, abs=5e-5)
    # the expected overall density is exact, and so are the integer counts up to per-layer rounding
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(numel.values())
    assert sum(p[name] * numel[name] for name in shapes) == pytest.approx(density * total, rel=1e-12)
    counts = layer_counts(p, shapes)
    assert all(counts[name] == round(p[name] * numel[name]) for name in shapes)
    assert abs(sum(counts.values()) - density * total) <= len(shapes) / 2


def test_masks_get_exact_counts():
    shapes = deit_shapes(192, depth=1)
    counts = layer_counts(layer_densities(shapes, 0.5, "ERK"), shapes)
    for seed, (name, shape) in enumerate(shapes.items()):
        mask = exact_mask(torch.Size(shape), counts[name], seed=seed)
        assert mask.dtype == torch.bool and mask.shape == shape
        assert int(mask.sum()) == counts[name]


def test_uniform_gives_every_layer_the_density():
    shapes = deit_shapes(192, depth=2)
    p = layer_densities(shapes, 0.3, "uniform")
    assert set(p.values()) == {0.3}


def test_uniform_with_forced_dense_layer_keeps_the_budget():
    shapes = {"a": (10, 10), "b": (10, 10), "c": (20, 10)}
    p = layer_densities(shapes, 0.5, "uniform", dense=["a"])
    assert p["a"] == 1.0
    assert p["b"] == pytest.approx(p["c"]) == pytest.approx((0.5 * 400 - 100) / 300)


def test_er_counts_are_proportional_to_sum_of_dims_and_hit_the_target():
    shapes = {"conv": (16, 3, 3, 3), "fc1": (64, 432), "fc2": (10, 64), "big": (512, 512)}
    density = 0.2
    p = layer_densities(shapes, density, "ER", erk_power=3.0)  # erk_power must not affect ER
    numel = {n: math.prod(s) for n, s in shapes.items()}
    kept = {n: p[n] * numel[n] for n in shapes}
    sparse = [n for n in shapes if p[n] < 1.0]
    assert "fc2" not in sparse and p["fc2"] == 1.0, "the small layer must be made dense instead of p > 1"
    ratios = [kept[n] / sum(shapes[n]) for n in sparse]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)
    assert sum(kept.values()) == pytest.approx(density * sum(numel.values()), rel=1e-12)
    assert all(0 < v <= 1 for v in p.values())
    assert p == layer_densities(shapes, density, "ERK", erk_power=1.0)


def test_erk_power_changes_the_allocation():
    shapes = deit_shapes(192, depth=1)
    flat = layer_densities(shapes, 0.5, "ERK", erk_power=0.0)
    assert all(v == pytest.approx(0.5) for v in flat.values())
    steep = layer_densities(shapes, 0.5, "ERK", erk_power=1.0)
    assert steep["patch_embed.proj.weight"] < 0.2


def test_density_one_is_all_dense():
    shapes = deit_shapes(192, depth=1)
    for method in ("uniform", "ERK", "ER"):
        assert set(layer_densities(shapes, 1.0, method).values()) == {1.0}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"density": 0.0}, r"density must be in \(0, 1\]"),
        ({"density": 1.5}, r"density must be in \(0, 1\]"),
        ({"method": "erk"}, "unknown density distribution 'erk'; choose from uniform, ERK, fixed_ERK, ER"),
        ({"dense": ["nope"]}, r"dense names \['nope'\]"),
        ({"dense": ["a", "b"], "density": 0.3}, "forced dense"),
        ({"erk_power": -1.0}, "erk_power"),
    ],
)
def test_layer_densities_rejects_bad_input(kwargs, match):
    args = {"shapes": {"a": (4, 4), "b": (4, 4), "c": (8, 8)}, "density": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        layer_densities(**args)


@pytest.mark.parametrize("shapes", [{}, {"a": ()}, {"a": (3, 0)}])
def test_layer_densities_rejects_bad_shapes(shapes):
    with pytest.raises(ValueError):
        layer_densities(shapes, 0.5)


def test_redistribute_known_answer_with_cap():
    # b can take only 1; the other 9 split 1:2 between a and c
    assert redistribute(10, {"a": 1.0, "b": 1.0, "c": 2.0}, {"a": 100, "b": 1, "c": 100}) == {"a": 3, "b": 1, "c": 6}


def test_redistribute_rounds_to_the_exact_total():
    counts = redistribute(10, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 10, "b": 10, "c": 10})
    assert sum(counts.values()) == 10
    assert sorted(counts.values()) == [3, 3, 4]
    assert counts["a"] == 4, "leftover ties go to the earlier layer"


def test_redistribute_zero_weights_follow_capacity():
    assert redistribute(6, {"a": 0.0, "b": 0.0}, {"a": 2, "b": 4}) == {"a": 2, "b": 4}


def test_redistribute_rejects_impossible_totals():
    with pytest.raises(ValueError, match="free slots"):
        redistribute(5, {"a": 1.0}, {"a": 4})
