"""Pure tensor functions of token selection: Gumbel top-k with a straight-through mask, and the two ways of applying
it (zero the dropped tokens, or gather the kept ones)."""
from __future__ import annotations

import torch


def sample_gumbel(like: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise with the shape and device of ``like`` (float32), drawn from torch's default RNG.

    Sampled as -log(E), E ~ Exp(1); E is clamped away from 0 so the noise is always finite (SViTE re-drew instead).
    Under torch.distributed every rank draws its own noise, which is right: every rank sees different images.
    """
    exp = torch.empty(like.shape, device=like.device, dtype=torch.float32).exponential_()
    return -exp.clamp_min(torch.finfo(torch.float32).tiny).log()


def gumbel_topk(
    logits: torch.Tensor,
    k: int,
    tau: float | torch.Tensor,
    hard: bool = True,
    noise: torch.Tensor | None = None,
    num_prefix: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep k tokens per row by (Gumbel-)top-k, the first ``num_prefix`` (cls) tokens always among them.

    The hard choice is the top-k of the perturbed log-probabilities ``log_softmax(s) + g``. SViTE took the top-k of
    the soft scores instead, which at tau = 0.1 underflow to exact zeros in float32 and break ties arbitrarily; both
    are the same choice in exact arithmetic (softmax and 1/tau are monotone), so tau never changes which tokens are
    kept, only the surrogate gradient ``y_soft = softmax((log_softmax(s) + g) / tau)``. The straight-through mask is
    ``y_hard - stopgrad(y_soft) + y_soft``, computed as ``y_hard + (y_soft - stopgrad(y_soft))`` so its forward
    values are exactly 0 and 1. Prefix entries are the constant 1 (no gradient), as SViTE's ``mask[:, 0] = 1``.

    Args:
        logits: scores s, shape [B, N], prefix tokens first.
        k: tokens kept per row, prefix included; ``num_prefix <= k <= N``.
        tau: temperature of the soft relaxation (a float or a 0-dim tensor).
        hard: return the straight-through {0, 1} mask (True) or the soft scores y_soft (False).
        noise: Gumbel(0, 1) noise of shape [B, N] (see ``sample_gumbel``); None selects deterministically.
        num_prefix: leading tokens that are always kept.

    Returns:
        (mask [B, N] float32, kept indices [B, k] int64 in ascending order, so the prefix tokens come first).
    """
    n = logits.shape[-1]
    if not max(num_prefix, 1) <= k <= n:
        raise ValueError(f"k must be in [{max(num_prefix, 1)}, {n}] (prefix tokens included), got {k}")
    log_p = torch.log_softmax(logits.float(), dim=-1)
    perturbed = log_p if noise is None else log_p + noise
    y_soft = torch.softmax(perturbed / tau, dim=-1)
    forced = torch.arange(n, device=logits.device) < num_prefix
    ranking = perturbed.detach().masked_fill(forced, float("inf"))
    idx = ranking.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    if not hard:
        return y_soft, idx
    y_hard = torch.zeros_like(y_soft).scatter_(-1, idx, 1.0)
    mask = (y_hard + (y_soft - y_soft.detach())).masked_fill(forced, 1.0)
    return mask, idx


def zero_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SViTE's semantics: multiply tokens [B, N, D] by the mask [B, N]; the sequence keeps its length."""
    return x * mask.unsqueeze(-1).to(x.dtype)


def drop_tokens(x: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather the kept tokens [B, k, D] of x [B, N, D], times their mask values (1 in the forward pass).

    The multiplication carries the straight-through gradient to the scorer, as in zero mode.
    """
    kept = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return kept * mask.gather(1, idx).unsqueeze(-1).to(x.dtype)
