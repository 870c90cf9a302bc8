"""How much density each layer gets: pure functions of layer shapes and counts (no tensors, no devices)."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

DISTRIBUTIONS = ("uniform", "ERK", "fixed_ERK", "ER")


def _validate_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    if not shapes:
        raise ValueError("layer_densities needs at least one tensor shape")
    numel = {}
    for name, shape in shapes.items():
        dims = tuple(shape)
        if not dims or any(int(d) != d or d <= 0 for d in dims):
            raise ValueError(f"shape of {name!r} must be a non-empty sequence of positive ints, got {tuple(shape)}")
        numel[name] = math.prod(dims)
    return numel


def layer_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    method: str = "ERK",
    dense: Iterable[str] = (),
    erk_power: float = 1.0,
) -> dict[str, float]:
    """Per-layer densities whose parameter-weighted mean is ``density``.

    Every method scales a raw per-layer score by one ε chosen so that the expected number of kept weights over all
    given tensors is ``density * sum(numel)``. A layer whose ε·score would exceed 1 is made dense and ε is solved
    again for the rest (RigL's loop as used by SViTE: all layers attaining the largest score are densified together,
    and the test is a strict ``> 1``).

    * ``uniform``: score 1, so every layer gets ``density``.
    * ``ERK`` / ``fixed_ERK``: score ``(sum(shape) / prod(shape)) ** erk_power``, all dims including a conv's kernel
      dims; with power 1 this reproduces SViTE's ``fixed_ERK`` values exactly.
    * ``ER``: the number of kept weights is ε·sum(shape) (SET's ε·(n_in + n_out), summed over all dims as SViTE
      does), i.e. score ``sum(shape) / prod(shape)``; ``erk_power`` does not apply. SViTE searched ε with a
      multiplicative loop that overshoots and never capped probabilities at 1, so its ER missed the target and
      produced probabilities > 1; here ε is solved exactly with the dense-fixing loop above. As a consequence ER
      equals ERK with ``erk_power=1``.

    Args:
        shapes: parameter name -> tensor shape, for the masked tensors only.
        density: target overall density in (0, 1].
        method: one of ``DISTRIBUTIONS``.
        dense: names that must stay dense; they count towards the budget.
        erk_power: exponent on the ERK score (1 = SViTE).

    Returns:
        name -> density in (0, 1], in the order of ``shapes``.

    Raises:
        ValueError: also when ``density`` is so low that a layer would keep no weight (its ``layer_counts`` entry
            would be 0); the message gives the smallest density that keeps one weight in every layer.
    """
    densities = _solve(shapes, density, method, dense, erk_power)
    numel = _validate_shapes(shapes)
    empty = [name for name, d in densities.items() if round(d * numel[name]) == 0]
    if empty:
        def keeps_all(d: float) -> bool:
            return all(round(v * numel[n]) >= 1 for n, v in _solve(shapes, d, method, dense, erk_power).items())

        low, high = density, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (low, mid) if keeps_all(mid) else (mid, high)
        step = 10.0 ** (math.floor(math.log10(high)) - 2)
        raise ValueError(f"density {density:g} leaves {len(empty)} layer(s) without a weight ({', '.join(empty[:3])}"
                         f"{', ...' if len(empty) > 3 else ''}); with {method} the smallest density that keeps one "
                         f"weight in every layer is {math.ceil(high / step) * step:.3g}")
    return densities


def _solve(shapes: Mapping[str, Sequence[int]], density: float, method: str, dense: Iterable[str],
           erk_power: float) -> dict[str, float]:
    """``layer_densities`` without the check that every layer keeps a weight."""
    numel = _validate_shapes(shapes)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if method not in DISTRIBUTIONS:
        raise ValueError(f"unknown density distribution {method!r}; choose from {', '.join(DISTRIBUTIONS)}")
    if not math.isfinite(erk_power) or erk_power < 0:
        raise ValueError(f"erk_power must be a finite number >= 0, got {erk_power}")
    dense_set = set(dense)
    unknown = dense_set - numel.keys()
    if unknown:
        raise ValueError(f"dense names {sorted(unknown)} are not among the given shapes")

    if method == "uniform":
        raw = {name: 1.0 for name in shapes}
    else:
        power = erk_power if method in ("ERK", "fixed_ERK") else 1.0
        raw = {name: (sum(shape) / numel[name]) ** power for name, shape in shapes.items()}

    total = sum(numel.values())
    while True:
        budget = density * total - sum(numel[name] for name in dense_set)
        free = [name for name in shapes if name not in dense_set]
        if budget < 0:
            raise ValueError(
                f"the layers forced dense hold {total * density - budget:.0f} weights, more than density {density} "
                f"of the {total} weights allows"
            )
        if not free:
            break
        epsilon = budget / sum(raw[name] * numel[name] for name in free)
        max_raw = max(raw[name] for name in free)
        if epsilon * max_raw <= 1.0:
            break
        dense_set.update(name for name in free if raw[name] == max_raw)
    return {name: 1.0 if name in dense_set else min(1.0, epsilon * raw[name]) for name in shapes}


def layer_counts(densities: Mapping[str, float], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Exact number of kept weights per layer: ``round(density * numel)`` (Python's round, half to even).

    Exact counts instead of SViTE's per-element Bernoulli draws make the realised density equal the target up to
    rounding, identically on every run and rank.

    Args:
        densities: name -> density, as returned by ``layer_densities``.
        shapes: name -> tensor shape.
    """
    numel = _validate_shapes(shapes)
    return {name: round(densities[name] * numel[name]) for name in densities}


def redistribute(total: int, weights: Mapping[str, float], capacity: Mapping[str, int]) -> dict[str, int]:
    """Split ``total`` regrown weights over layers in proportion to ``weights``, capped by each layer's ``capacity``.

    This is the redistribution step of Dettmers & Zettlemoyer, "Sparse Networks from Scratch" (2019): a layer whose
    share exceeds its free slots is filled, and the excess goes to the remaining layers in proportion to their
    weights, until every share fits. Fractional shares are floored and the leftover units go to the largest
    remainders (ties: earlier layer first), so the result sums to exactly ``total``. If every remaining weight is 0
    the split follows the free capacity instead.

    Args:
        total: number of weights to regrow, at most ``sum(capacity.values())``.
        weights: name -> non-negative statistic (mean magnitude, density, ...).
        capacity: name -> free slots of the layer.

    Returns:
        name -> number of weights to grow, summing to ``total``.
    """
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    if weights.keys() != capacity.keys():
        raise ValueError("weights and capacity must have the same layer names")
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or any(c < 0 for c in capacity.values()):
        raise ValueError("redistribution weights must be finite and >= 0, capacities >= 0")
    if total > sum(capacity.values()):
        raise ValueError(f"cannot regrow {total} weights into {sum(capacity.values())} free slots")

    shares: dict[str, float] = {}
    open_layers = [name for name in weights if capacity[name] > 0]
    remaining = float(total)
    while open_layers:
        norm = sum(weights[name] for name in open_layers)
        basis = weights if norm > 0 else capacity
        norm = norm if norm > 0 else sum(capacity[name] for name in open_layers)
        proposal = {name: remaining * basis[name] / norm for name in open_layers}
        full = [name for name in open_layers if proposal[name] >= capacity[name]]
        if not full:
            shares.update(proposal)
            break
        for name in full:
            shares[name] = float(capacity[name])
            remaining -= capacity[name]
        open_layers = [name for name in open_layers if name not in full]

    counts = {name: min(capacity[name], math.floor(shares.get(name, 0.0))) for name in weights}
    order = sorted(weights, key=lambda name: -(shares.get(name, 0.0) - counts[name]))
    leftover = total - sum(counts.values())
    while leftover > 0:  # one pass almost always suffices; more only when float rounding floored several shares
        for name in [name for name in order if counts[name] < capacity[name]][:leftover]:
            counts[name] += 1
            leftover -= 1
    return counts
