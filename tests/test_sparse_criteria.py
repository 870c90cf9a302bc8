"""Selection primitives on hand-made tensors: exact counts, known answers, deterministic ties."""
import pytest
import torch

from sparselearning.criteria import (
    derive_seed,
    drop_lowest,
    grow_highest,
    magnitude_death,
    random_scores,
    set_death,
    topk_mask,
)

torch.set_num_threads(1)


def where(mask: torch.Tensor) -> list[int]:
    return mask.reshape(-1).nonzero().flatten().tolist()


def test_topk_mask_known_answer_and_shape():
    scores = torch.tensor([[0.5, 3.0, -1.0], [2.0, 0.1, 7.0]])
    top = topk_mask(scores, 2)
    assert top.shape == scores.shape and top.dtype == torch.bool
    assert where(top) == [1, 5]
    assert where(topk_mask(scores, 2, largest=False)) == [2, 4]
    assert not topk_mask(scores, 0).any() and topk_mask(scores, 6).all()


def test_topk_mask_breaks_ties_by_index_order():
    scores = torch.tensor([1.0, 5.0, 1.0, 1.0, 0.0, 1.0])
    assert where(topk_mask(scores, 3)) == [0, 1, 2]
    assert where(topk_mask(scores, 3, largest=False)) == [0, 2, 4]
    assert where(topk_mask(torch.zeros(10), 4)) == [0, 1, 2, 3]


def test_topk_mask_exact_count_on_large_tensor_with_many_ties():
    scores = torch.randint(0, 5, (100_000,), generator=torch.Generator().manual_seed(0)).float()
    for k in (1, 777, 50_000, 99_999):
        assert int(topk_mask(scores, k).sum()) == k


def reference_topk(scores: torch.Tensor, k: int, largest: bool, within: torch.Tensor) -> torch.Tensor:
    """Stable full sort: the k best eligible entries, ties in index order."""
    keyed = (-scores if largest else scores).masked_fill(~within, float("inf"))
    order = torch.sort(keyed, stable=True).indices[:k]
    return torch.zeros_like(within).index_fill_(0, order, True)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("case", ["random", "ties", "misleading_sample", "sparse_within"])
def test_topk_mask_large_tensors_match_a_stable_sort(case, largest):
    # large enough for the sampled bracket; "misleading_sample" defeats it so the exact fallback runs
    gen = torch.Generator().manual_seed(3)
    n = 200_003
    scores = torch.randn(n, generator=gen)
    within = torch.rand(n, generator=gen) < 0.6
    if case == "ties":
        scores = torch.randint(0, 50, (n,), generator=gen).float()
    elif case == "misleading_sample":
        stride = (n // 8192) | 1
        scores[::stride] = 100.0 if largest else -100.0
    elif case == "sparse_within":
        within = torch.rand(n, generator=gen) < 0.001
    eligible = int(within.sum())
    for k in (1, eligible // 7, eligible // 2, eligible - 1):
        got = topk_mask(scores, k, largest=largest, within=within)
        assert int(got.sum()) == k and not (got & ~within).any()
        assert torch.equal(got, reference_topk(scores, k, largest, within)), (case, k)


def test_topk_mask_rejects_bad_k():
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
        topk_mask(torch.zeros(3), 4)
    with pytest.raises(ValueError, match=r"k must be in \[0, 1\] \(the eligible entries\)"):
        topk_mask(torch.zeros(3), 2, within=torch.tensor([True, False, False]))


def test_magnitude_death_drops_smallest_active_only():
    weight = torch.tensor([0.1, -0.5, 0.0, 2.0, -0.05, 0.3])
    active = torch.tensor([True, True, False, True, True, True])
    dropped = magnitude_death(weight, active, 2)
    assert where(dropped) == [0, 4]  # |-0.05| and |0.1|; the inactive 0.0 is never "dropped"


def test_drop_lowest_and_grow_highest_respect_the_candidates():
    scores = torch.tensor([9.0, 1.0, 8.0, 2.0])
    candidates = torch.tensor([False, True, True, True])
    assert where(grow_highest(scores, candidates, 2)) == [2, 3]
    assert where(drop_lowest(scores, candidates, 1)) == [1]


def test_set_death_drops_half_positive_half_negative_closest_to_zero():
    weight = torch.tensor([-3.0, -0.1, -0.2, 0.5, 0.05, 2.0, 0.0, -1.0])
    dropped = set_death(weight, torch.ones(8, dtype=torch.bool), 4)
    # negatives closest to zero: -0.1, -0.2; smallest non-negatives: 0.0, 0.05
    assert where(dropped) == [1, 2, 4, 6]
    # odd count: the extra one is positive
    assert where(set_death(weight, torch.ones(8, dtype=torch.bool), 3)) == [1, 4, 6]


def test_set_death_makes_up_for_a_short_side():
    weight = torch.tensor([-1.0, 0.2, 0.3, 0.4, 0.5])
    dropped = set_death(weight, torch.ones(5, dtype=torch.bool), 4)
    assert int(dropped.sum()) == 4 and where(dropped) == [0, 1, 2, 3]


def test_set_death_ignores_inactive_weights():
    weight = torch.tensor([-0.01, -0.5, 0.01, 0.7])
    active = torch.tensor([False, True, False, True])
    assert where(set_death(weight, active, 2)) == [1, 3]


def test_seeded_scores_are_pure_functions_of_the_keys():
    a = random_scores((5, 7), derive_seed(0, "blocks.0.attn.qkv.weight", 100, "grow"))
    torch.manual_seed(12345)  # the global RNG must not matter
    b = random_scores((5, 7), derive_seed(0, "blocks.0.attn.qkv.weight", 100, "grow"))
    c = random_scores((5, 7), derive_seed(0, "blocks.0.attn.qkv.weight", 200, "grow"))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert derive_seed(0, "x", 1) != derive_seed(1, "x", 1) != derive_seed(0, "y", 1)
    assert 0 <= derive_seed(7, "x") < 2**63
