"""Pure tensor functions of token merging (ToMe, Bolya et al., ICLR 2023, built from the paper's description).

Bipartite soft matching: the tokens after the prefix are split alternately into sets A (positions p, p+2, ...) and
B (p+1, p+3, ...); each A token draws one edge to its most similar B token (cosine similarity of the metric, the
attention keys averaged over heads); the r most similar edges are kept, and each of those A tokens is merged into
its B partner. Several A tokens may merge into one B token. Merging is a size-weighted average, and the sizes add,
so a merged token stands for all the patches it averages. The prefix (cls, distillation) tokens are in neither set
and are never merged.

The merged sequence is [prefix, the unmerged A tokens in their order, the B tokens in their order]: order is
immaterial to attention, and keeping it makes the next block's alternating split deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def max_merges(num_tokens: int, num_prefix: int) -> int:
    """The largest r for a sequence of ``num_tokens`` (prefix included): every A token merged, |A| = ceil(rest / 2).

    Zero when fewer than two non-prefix tokens remain (B would be empty).
    """
    rest = num_tokens - num_prefix
    return (rest + 1) // 2 if rest >= 2 else 0


@dataclass(frozen=True)
class Matching:
    """Which A tokens merge where, per image; indices count within set A or set B, shapes [batch, r] / [batch, |A|-r].

    Args:
        src: the merged A tokens.
        dst: the B token each merged A token joins (aligned with ``src``).
        kept: the unmerged A tokens, ascending.
        num_prefix: leading tokens outside both sets.
    """

    src: torch.Tensor
    dst: torch.Tensor
    kept: torch.Tensor
    num_prefix: int


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int) -> Matching:
    """The r best A -> B edges of ``metric`` [batch, n, c] (prefix tokens first).

    Ties between edges of equal similarity go to the earlier A token (a stable sort), so identical inputs always
    merge alike.

    Raises:
        ValueError: for r < 0 or r above ``max_merges(n, num_prefix)``.
    """
    n = metric.shape[1]
    limit = max_merges(n, num_prefix)
    if not 0 <= r <= limit:
        raise ValueError(f"r must be in [0, {limit}] for {n} tokens ({num_prefix} prefix), got {r}")
    metric = F.normalize(metric.float(), dim=-1)
    a, b = metric[:, num_prefix::2], metric[:, num_prefix + 1::2]
    best, partner = (a @ b.transpose(-1, -2)).max(dim=-1)  # [batch, |A|]: each A token's most similar B token
    order = best.sort(dim=-1, descending=True, stable=True).indices
    src = order[:, :r]
    return Matching(src=src, dst=partner.gather(1, src), kept=order[:, r:].sort(dim=-1).values,
                    num_prefix=num_prefix)


def merge_tokens(x: torch.Tensor, size: torch.Tensor, m: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a matching to tokens x [batch, n, c] of sizes [batch, n] (patches each token stands for).

    Returns:
        (merged tokens [batch, n - r, c], their sizes [batch, n - r]); a B token that absorbed A tokens becomes
        their size-weighted average, and its size the sum.
    """
    p = m.num_prefix
    c = x.shape[-1]
    weight = size.to(x.dtype).unsqueeze(-1)
    a, b = x[:, p::2] * weight[:, p::2], x[:, p + 1::2] * weight[:, p + 1::2]
    size_a, size_b = size[:, p::2], size[:, p + 1::2]
    b_sum = b.scatter_add(1, m.dst.unsqueeze(-1).expand(-1, -1, c), a.gather(1, m.src.unsqueeze(-1).expand(-1, -1, c)))
    b_size = size_b.scatter_add(1, m.dst, size_a.gather(1, m.src))
    kept = x[:, p::2].gather(1, m.kept.unsqueeze(-1).expand(-1, -1, c))
    merged = torch.cat([x[:, :p], kept, b_sum / b_size.to(x.dtype).unsqueeze(-1)], dim=1)
    return merged, torch.cat([size[:, :p], size_a.gather(1, m.kept), b_size], dim=1)


def size_bias(size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Proportional attention: log(size) added to every query's logits, as an additive mask [batch, 1, 1, n]."""
    return size.log().to(dtype)[:, None, None, :]
