"""N:M sparsity patterns: N non-zeros in every group of M consecutive input weights, as pure tensor functions.

A group is M consecutive entries along a weight's input dimension, all its dimensions but the first flattened (a
Linear's ``in_features``, a Conv2d's ``in_channels x kh x kw``): the K dimension of the GEMM, which is where
Ampere/Hopper sparse tensor cores (2:4) and cuSPARSELt expect the pattern. Every function here returns masks with
exactly the requested count in every group; ties are taken by index, or in an order drawn from a ``tie_seed``.
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from sparselearning.criteria import random_scores
from sparselearning.masks import is_maskable, select_parameters, unwrap_model

NM_DEFAULT_INCLUDE = ("blocks.*",)
"""What N:M masks unless ``sparse_include`` says otherwise: the linear layers of timm's transformer blocks (``qkv``,
``proj``, ``fc1``, ``fc2``); the patch embedding and the classifier head stay dense."""

_NM_TEXT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(text: str) -> tuple[int, int]:
    """``"2:4"`` -> (2, 4); a ValueError naming the rule for anything else (N and M positive ints, N < M)."""
    match = _NM_TEXT.match(str(text))
    n, m = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not match or not 0 < n < m:
        raise ValueError(f"--nm must be N:M with 0 < N < M (N non-zeros in every M consecutive input weights, e.g. "
                         f"2:4 for sparse tensor cores), got {text!r}")
    return n, m


def input_width(shape: Sequence[int]) -> int:
    """Entries along the input dimension: every dimension but the first (out_features, or a conv's out_channels)."""
    width = 1
    for dim in tuple(shape)[1:]:
        width *= int(dim)
    return width


def check_group_shapes(shapes: Mapping[str, Sequence[int]], m: int) -> None:
    """Raise a ValueError naming every tensor whose input width is not a multiple of ``m`` (or that is 1-D)."""
    bad = [f"{name} {tuple(shape)} ({input_width(shape)} inputs)" for name, shape in shapes.items()
           if len(tuple(shape)) < 2 or input_width(shape) % m]
    if bad:
        raise ValueError(f"N:M sparsity groups M={m} consecutive input weights, but the input width of "
                         f"{', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''} is not a multiple of {m}; leave "
                         "these tensors out with --sparse-exclude (sparse_exclude) or choose an M that divides it")


def nm_parameters(model: nn.Module, m: int, include: Sequence[str] = (), exclude: Sequence[str] = ()
                  ) -> dict[str, nn.Parameter]:
    """The parameters N:M masks: ``include`` (default ``NM_DEFAULT_INCLUDE``) minus ``exclude``, among the maskable
    2-D/4-D weights (``masks.select_parameters``), each with an input width that is a multiple of ``m``."""
    if not include:
        maskable = [name for name, p in unwrap_model(model).named_parameters() if is_maskable(name, p)]
        if not any(fnmatch.fnmatchcase(name, pattern) for name in maskable for pattern in NM_DEFAULT_INCLUDE):
            raise ValueError(f"N:M sparsity masks the transformer blocks' linear layers ({NM_DEFAULT_INCLUDE[0]}) by "
                             f"default, and this model has none (its weights are e.g. {', '.join(maskable[:4])}); "
                             "name the tensors to mask with --sparse-include (sparse_include)")
        include = NM_DEFAULT_INCLUDE
    params = select_parameters(model, include, exclude)
    check_group_shapes({name: tuple(p.shape) for name, p in params.items()}, m)
    return params


def group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Active entries per group of ``m``: int64, one per group, in row-major order."""
    return mask.reshape(-1, m).sum(1)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    """Whether ``mask`` has exactly ``n`` True entries in every group of ``m`` consecutive input entries."""
    return mask.dim() >= 2 and input_width(mask.shape) % m == 0 and bool((group_counts(mask, m) == n).all())


def top_in_groups(scores: torch.Tensor, m: int, counts: int | torch.Tensor, within: torch.Tensor | None = None,
                  tie_seed: int | None = None) -> torch.Tensor:
    """In every group of ``m`` consecutive input entries, the ``counts`` highest-scoring entries of ``within``.

    Args:
        scores: finite scores shaped like the weight (input width a multiple of ``m``).
        m: the group size.
        counts: entries to take per group: one int for all groups, or an int tensor with one count per group (row-major
            order, ``scores.numel() // m`` of them), each at most the group's ``within`` entries.
        within: optional bool mask of the eligible entries, same shape as ``scores``.
        tie_seed: seed of the order among tied scores within a group (e.g. ``derive_seed(seed, name, step)``); None
            takes tied entries lowest index first.

    Returns:
        Bool tensor shaped like ``scores``.
    """
    groups = scores.detach().reshape(-1, m).float()
    if within is not None:
        groups = groups.masked_fill(~within.reshape(-1, m), float("-inf"))
    if tie_seed is None:
        order = groups.argsort(dim=1, descending=True, stable=True)
    else:  # a random permutation of each group first, so a stable sort takes tied entries in that random order
        shuffle = random_scores(groups.shape, tie_seed).to(groups.device).argsort(dim=1)
        order = shuffle.gather(1, groups.gather(1, shuffle).argsort(dim=1, descending=True, stable=True))
    ranks = torch.arange(m, device=groups.device)
    take = ranks < (counts if isinstance(counts, int) else counts.to(groups.device).unsqueeze(1))
    chosen = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order, take.expand_as(groups))
    return chosen.view(scores.shape)


def random_nm_mask(shape: Sequence[int], n: int, m: int, seed: int) -> torch.Tensor:
    """N active entries at uniformly random positions in every group of M, drawn from ``seed`` (on the CPU)."""
    return top_in_groups(random_scores(tuple(shape), seed), m, n)


def magnitude_nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N largest-magnitude entries of every group of M (SR-STE's mask), on the weight's device."""
    return top_in_groups(weight.detach().abs(), m, n)
