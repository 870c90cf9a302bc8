"""Which weights die and which grow: pure functions on score tensors and counts.

Nothing here knows about layers, optimizers or granularity. A score tensor can hold one score per weight
(unstructured) or one per head or neuron (a grouped view), so the structured variant reuses the same selection.
Every selection returns exactly the requested number of entries. Entries tied at the threshold are taken in a random
order drawn from a ``tie_seed`` (derived from seed, layer name and step, so DDP ranks agree), not by index: a zeroed
gradient or bf16 weights (few distinct values) would otherwise fill the lowest rows. Without ties the selection does
not depend on the seed.
"""
from __future__ import annotations

import hashlib
import math

import torch

DEATH_MODES = ("magnitude", "SET")
GROWTH_MODES = ("gradient", "random", "momentum")
REDISTRIBUTION_MODES = ("none", "magnitude", "nonzero")

_SAMPLE_MIN_NUMEL = 1 << 16
_SAMPLE_SIZE = 8192


def _kth_best(values: torch.Tensor, within: torch.Tensor | None, n_within: int, k: int, largest: bool) -> torch.Tensor:
    """Exact k-th best (largest or smallest) value among the ``within`` entries of flat ``values``, as a 0-d tensor.

    A full ``kthvalue`` over millions of entries, or materialising a masked copy, costs far more than a few
    elementwise passes. So on large tensors a strided sample (odd stride, so it does not align with rows) brackets
    the answer, the entries inside the bracket are gathered, and ``kthvalue`` runs on that small band only. If the
    sample misjudges the bracket the full search runs instead; both paths return the same exact value.
    """
    n = values.numel()
    if n >= _SAMPLE_MIN_NUMEL:
        stride = (n // _SAMPLE_SIZE) | 1
        sample = values[::stride] if within is None else values[::stride][within[::stride]]
        m = sample.numel()
        if m >= 256:
            ordered = sample.sort(descending=largest).values
            rank = k / n_within * m
            margin = 5.0 * math.sqrt(m) + 16.0
            i_better, i_worse = int(rank - margin), int(rank + margin) + 1
            better_bound = ordered[i_better] if i_better >= 0 else None
            worse_bound = ordered[i_worse] if i_worse < m else None
            strictly_better = torch.gt if largest else torch.lt
            band = torch.ones_like(values, dtype=torch.bool) if within is None else within.clone()
            n_better = 0
            if better_bound is not None:
                better = strictly_better(values, better_bound)
                n_better = _count(better & band)
                band &= ~better
            if worse_bound is not None:
                band &= ~strictly_better(worse_bound, values)
            candidates = values[band]
            if n_better < k <= n_better + candidates.numel():
                return _kth_of(candidates, k - n_better, largest)
    return _kth_of(values if within is None else values[within], k, largest)


def _count(mask: torch.Tensor) -> int:
    """True entries of a bool tensor (``count_nonzero`` avoids the int64 copy that ``sum`` makes)."""
    return int(torch.count_nonzero(mask))


def _kth_of(values: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """The k-th largest or smallest entry of a flat tensor."""
    return torch.kthvalue(values, values.numel() - k + 1 if largest else k).values


def topk_mask(scores: torch.Tensor, k: int, largest: bool = True, within: torch.Tensor | None = None,
              tie_seed: int | None = None) -> torch.Tensor:
    """Bool mask of the ``k`` largest (or smallest) scores, optionally only among the ``within`` entries.

    Entries tied at the threshold are taken in a random order drawn from ``tie_seed`` (in flat index order when it is
    None), so the result is a pure function of the inputs and the seed; strictly better entries are always taken.
    Runs in linear time (no sort) and never materialises a masked copy of ``scores``.

    Args:
        scores: any shape; must not contain NaN.
        k: number of entries to select, between 0 and the number of eligible entries.
        largest: select the largest scores if True, the smallest otherwise.
        within: optional bool mask of eligible entries, same shape as ``scores``.
        tie_seed: seed of the order among tied entries, e.g. ``derive_seed(seed, name, step, "grow")``.

    Returns:
        Bool tensor shaped like ``scores`` with exactly ``k`` True entries, all inside ``within``.
    """
    flat = scores.reshape(-1)
    eligible = None if within is None else within.reshape(-1)
    n_eligible = flat.numel() if eligible is None else _count(eligible)
    if not 0 <= k <= n_eligible:
        raise ValueError(f"k must be in [0, {n_eligible}] (the eligible entries), got {k}")
    if k == 0 or k == n_eligible:
        full = torch.full_like(flat, k > 0, dtype=torch.bool)
        return (full if eligible is None else full & eligible).view_as(scores)
    threshold = _kth_best(flat, eligible, n_eligible, k, largest)
    at_or_better = flat >= threshold if largest else flat <= threshold
    if eligible is not None:
        at_or_better &= eligible
    if _count(at_or_better) == k:  # the usual case: no tie at the threshold
        return at_or_better.view_as(scores)
    ties = at_or_better & (flat == threshold)
    selected = at_or_better & ~ties
    need = k - _count(selected)
    if tie_seed is None:
        selected |= ties & (ties.cumsum(0) <= need)
    else:
        tied = ties.nonzero().flatten()
        keys = random_scores((tied.numel(),), tie_seed)  # a random order of the tied entries, drawn on the CPU
        selected[tied[topk_mask(keys, need).nonzero().flatten().to(tied.device)]] = True
    return selected.view_as(scores)


def drop_lowest(scores: torch.Tensor, active: torch.Tensor, n: int, tie_seed: int | None = None) -> torch.Tensor:
    """The ``n`` active entries with the lowest scores (the weights to remove).

    Args:
        scores: importance per entry, e.g. ``weight.abs()`` for magnitude death.
        active: bool mask of the currently active entries, same shape.
        n: how many to drop, at most ``active.sum()``.
        tie_seed: seed of the order among tied scores (``topk_mask``).
    """
    return topk_mask(scores, n, largest=False, within=active, tie_seed=tie_seed)


def grow_highest(scores: torch.Tensor, candidates: torch.Tensor, n: int, tie_seed: int | None = None) -> torch.Tensor:
    """The ``n`` candidate entries with the highest scores (the weights to add).

    Args:
        scores: growth signal per entry, e.g. ``grad.abs()``; finite.
        candidates: bool mask of entries allowed to grow, same shape.
        n: how many to grow, at most ``candidates.sum()``.
        tie_seed: seed of the order among tied scores (``topk_mask``).
    """
    return topk_mask(scores, n, largest=True, within=candidates, tie_seed=tie_seed)


def magnitude_death(weight: torch.Tensor, active: torch.Tensor, n: int, tie_seed: int | None = None) -> torch.Tensor:
    """Drop the ``n`` active weights of smallest magnitude (SViTE's ``magnitude`` death, with an exact count).

    Args:
        weight: the weight tensor.
        active: bool mask of active weights.
        n: number to drop.
        tie_seed: seed of the order among tied magnitudes (``topk_mask``).
    """
    return drop_lowest(weight.abs(), active, n, tie_seed)


def set_death(weight: torch.Tensor, active: torch.Tensor, n: int, tie_seed: int | None = None) -> torch.Tensor:
    """SET death: drop the smallest positive weights and the negative weights closest to zero, half each.

    The positive side gets the odd one out and exact zeros count as positive (they are the closest to zero). If one
    side has too few weights the other side makes up the difference, so exactly ``n`` die. SViTE's version (from the
    sparse-momentum code) kept only the k-1 most negative weights, i.e. dropped almost all negative weights, and
    ignored the mask; this is the intended rule.

    Args:
        weight: the weight tensor.
        active: bool mask of active weights.
        n: number to drop.
        tie_seed: seed of the order among tied weights (``topk_mask``); each side derives its own.
    """
    positive = active & (weight >= 0)
    negative = active & (weight < 0)
    n_positive, n_negative = _count(positive), _count(negative)
    if n > n_positive + n_negative:
        raise ValueError(f"cannot drop {n} of {n_positive + n_negative} active weights")
    drop_negative = min(n // 2, n_negative)
    drop_positive = min(n - drop_negative, n_positive)
    drop_negative = n - drop_positive
    seeds = (None, None) if tie_seed is None else (derive_seed(tie_seed, "+"), derive_seed(tie_seed, "-"))
    return (drop_lowest(weight, positive, drop_positive, seeds[0])
            | drop_lowest(-weight, negative, drop_negative, seeds[1]))


DEATH_RULES = {"magnitude": magnitude_death, "SET": set_death}
"""``--death`` -> the rule that picks the weights to drop from (weights, active mask, count, tie seed)."""


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed that is a pure function of ``seed`` and ``keys`` (e.g. layer name, step, purpose).

    Uses BLAKE2 rather than ``hash()``, which is salted per process, so every rank derives the same value.
    """
    text = "\x1f".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def random_scores(shape: torch.Size | tuple[int, ...], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) scores from a private generator, never the global RNG.

    Args:
        shape: output shape.
        seed: generator seed, e.g. from ``derive_seed``.
        device: where to draw; the same seed on the same device type gives the same scores on every rank.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device)
