"""Tied scores and dead growth signals: seeded tie-breaking, tie-free selections unchanged, zero signals skipped."""
import logging

import pytest
import torch
from torch import nn

from sparselearning import Masking, swap_units
from sparselearning.criteria import derive_seed, topk_mask

torch.set_num_threads(1)


def silent(record: dict) -> None:
    """A log_fn that drops records."""


def index_order_topk(scores: torch.Tensor, k: int, largest: bool, within: torch.Tensor) -> torch.Tensor:
    """The selection before seeded tie-breaking: a stable full sort, ties in flat index order."""
    keyed = (-scores if largest else scores).masked_fill(~within, float("inf"))
    order = torch.sort(keyed, stable=True).indices[:k]
    return torch.zeros_like(within).index_fill_(0, order, True)


@pytest.mark.parametrize("n", [1000, 200_003])  # the small path and the sampled-bracket path
@pytest.mark.parametrize("largest", [True, False])
def test_tie_free_selection_is_bit_identical_to_index_order(n, largest):
    gen = torch.Generator().manual_seed(5)
    scores = torch.randperm(n, generator=gen).float()  # distinct values: no ties anywhere
    within = torch.rand(n, generator=gen) < 0.6
    eligible = int(within.sum())
    for k in (1, eligible // 3, eligible - 1):
        for seed in (0, 123):
            got = topk_mask(scores, k, largest=largest, within=within, tie_seed=seed)
            assert torch.equal(got, index_order_topk(scores, k, largest, within)), (k, seed)


def test_ties_at_the_threshold_are_spread_and_only_they_depend_on_the_seed():
    scores = torch.cat([torch.full((5000,), 1.0), torch.full((5000,), 2.0)])  # the 1.0 block ties at the threshold
    a = topk_mask(scores, 7000, tie_seed=1)
    assert int(a.sum()) == 7000 and bool(a[5000:].all()), "strictly better entries are always taken"
    tied = a[:5000].nonzero().flatten()
    assert tied.numel() == 2000
    assert 0.4 < float(tied.float().mean()) / 5000 < 0.6, "the tied picks are spread, not the lowest indices"
    assert torch.equal(a, topk_mask(scores, 7000, tie_seed=1)), "same seed, same choice (DDP ranks agree)"
    assert not torch.equal(a, topk_mask(scores, 7000, tie_seed=2))


def test_update_ties_follow_seed_layer_and_step():
    """The tie seed is derive_seed(seed, layer name, step, ...): identical on every rank, new at every update."""
    scores = torch.zeros(4096)
    picks = {key: topk_mask(scores, 100, tie_seed=derive_seed(0, *key)) for key in
             [("fc1.weight", 100), ("fc1.weight", 200), ("fc2.weight", 100)]}
    assert torch.equal(picks[("fc1.weight", 100)], topk_mask(scores, 100, tie_seed=derive_seed(0, "fc1.weight", 100)))
    assert len({tuple(p.nonzero().flatten().tolist()) for p in picks.values()}) == 3


class Linear(nn.Module):
    def __init__(self, rows: int = 96, cols: int = 64, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter((torch.randn(rows, cols) * 0.02).to(dtype))


def one_update(model: nn.Module, grad: torch.Tensor, grad_at_active: float | None = None,
               **kwargs) -> tuple[Masking, torch.Tensor]:
    """Masking at density 0.5 on ``model``; sets ``grad`` (``grad_at_active`` at the active weights if given) and runs
    the update at step 10; returns the old mask."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    options = {"sparse_init": "uniform", "update_frequency": 10, "death_rate": 0.5, "decay_schedule": "constant",
               "t_end": 1.0, "log_fn": silent, **kwargs}
    masking = Masking(model, optimizer, density=0.5, total_steps=100, **options)
    old = masking.masks["weight"].clone()
    if grad_at_active is not None:
        grad = grad.masked_fill(old, grad_at_active)
    model.weight.grad = grad.to(model.weight.dtype)
    masking.step(10)
    return masking, old


def test_zero_gradient_skips_death_and_growth_with_a_warning(caplog):
    """A gradient zeroed before masking.step used to grow every weight into the lowest rows; now the layer keeps
    its mask (and so its exact density) and the warning names the likely cause."""
    torch.manual_seed(0)
    model = Linear()
    with caplog.at_level(logging.WARNING, logger="sparselearning.dst"):
        masking, old = one_update(model, torch.zeros(96, 64))
    assert torch.equal(masking.masks["weight"], old)
    assert int(masking.masks["weight"].sum()) == 96 * 64 // 2
    assert any("weight" in r.message and "zero_grad" in r.message and "frozen" in r.message for r in caplog.records)


def test_zero_momentum_skips_momentum_growth_with_a_warning(caplog):
    torch.manual_seed(0)
    model = Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    masking = Masking(model, optimizer, density=0.5, total_steps=100, growth="momentum", update_frequency=10,
                      t_end=1.0, log_fn=silent)
    model.weight.grad = torch.zeros(96, 64)
    optimizer.step()  # a momentum buffer of zeros: the layer never received a gradient
    old = masking.masks["weight"].clone()
    with caplog.at_level(logging.WARNING, logger="sparselearning.dst"):
        masking.step(10)
    assert torch.equal(masking.masks["weight"], old)
    assert any("momentum growth signal of weight is all zero" in r.message for r in caplog.records)


def test_a_dead_layer_does_not_stop_the_others():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    masking = Masking(model, optimizer, density=0.5, total_steps=100, sparse_init="uniform", update_frequency=10,
                      t_end=1.0, log_fn=silent)
    old = {n: m.clone() for n, m in masking.masks.items()}
    model[0].weight.grad = torch.zeros(64, 64)
    model[1].weight.grad = torch.randn(64, 64)
    assert masking.step(10)
    assert torch.equal(masking.masks["0.weight"], old["0.weight"])
    assert not torch.equal(masking.masks["1.weight"], old["1.weight"])
    assert int(masking.masks["1.weight"].sum()) == int(old["1.weight"].sum())


def test_bf16_tied_magnitudes_die_spread_over_the_layer():
    """bf16 weights have few distinct magnitudes (the issue counted 1,300 among 75,000 active weights), so many tie
    at the death threshold. The tied ones that die are spread over the layer, not packed into the lowest rows."""
    torch.manual_seed(0)
    model = Linear(256, 128, torch.bfloat16)
    with torch.no_grad():  # 45 magnitudes: tie groups of about 360 active weights, the threshold inside one
        levels = torch.randint(1, 46, (256, 128)) * 1e-3 * (torch.randint(0, 2, (256, 128)) * 2 - 1)
        model.weight.copy_(levels.to(torch.bfloat16))
    distinct = torch.unique(model.weight.detach().abs()).numel()
    assert distinct <= 45, "non-vacuous: far fewer distinct magnitudes than weights"
    magnitudes = model.weight.detach().abs().clone()
    grad = torch.rand(256, 128) + 1  # tie-free growth that prefers every inactive weight to a just-dropped one
    masking, old = one_update(model, grad, grad_at_active=0.0)
    died = old & ~masking.masks["weight"]
    threshold = float(magnitudes[died].max())
    tied = old & (magnitudes == threshold)
    tied_died = (tied & died).nonzero()[:, 0].float()
    assert 0.1 < tied_died.numel() / int(tied.sum()) < 0.9, "non-vacuous: part of the tied group dies"
    tied_rows = tied.nonzero()[:, 0].float()
    assert abs(float(tied_died.mean()) - float(tied_rows.mean())) < 0.15 * 256, "spread like the tied group"
    assert int((old & ~died).sum() + (masking.masks["weight"] & ~old).sum()) == int(old.sum()), "exact count"


def test_structured_ties_break_by_seed_and_tie_free_scores_ignore_it():
    active = torch.tensor([True, True, False, False, False, False])
    death = torch.tensor([1.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    tied_growth = torch.zeros(6)
    picks = {tuple(swap_units(active, death, tied_growth, 1, tie_seed=seed).tolist()) for seed in range(8)}
    assert len(picks) > 1 and all(sum(p) == 2 for p in picks)
    assert torch.equal(swap_units(active, death, tied_growth, 1, tie_seed=4),
                       swap_units(active, death, tied_growth, 1, tie_seed=4))
    growth = torch.tensor([0.0, 0.5, 0.1, 0.7, 0.3, 0.2])
    expected = [False, True, False, True, False, False]  # unit 0 dies (1.0); unit 3 grows (0.7)
    for seed in (None, 0, 9):
        assert swap_units(active, death, growth, 1, tie_seed=seed).tolist() == expected
