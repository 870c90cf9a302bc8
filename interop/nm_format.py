"""The compressed N:M layout of a weight: its kept values in group order plus each value's position in its group.

A group is M consecutive input weights (``sparselearning.nm``). Per group the N kept values are stored in order of
position, and each position takes ceil(log2 M) bits, packed little-endian: for 2:4 that is half the dense values plus
4 bits per group of 4, the layout of the compressed operand and metadata of sparse tensor cores. Nothing is lost: a
kept weight that happens to be zero stays kept, so the mask comes back exactly.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def index_bits(m: int) -> int:
    """Bits per stored position: ceil(log2 M), at least 1."""
    return max(1, (m - 1).bit_length())


def pack_nm(weight: torch.Tensor, mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, packed positions) of ``weight`` under an N:M ``mask`` (exactly ``n`` True in every group of ``m``).

    Returns:
        values: 1-D, ``numel * n / m`` entries of ``weight``'s dtype, group by group.
        positions: uint8, the packed ``index_bits(m)``-bit position of every value within its group.
    """
    groups = mask.reshape(-1, m)
    if not bool((groups.sum(1) == n).all()):
        raise ValueError(f"the mask does not hold exactly {n} of every {m} consecutive weights")
    values = weight.detach().cpu().reshape(-1, m)[groups.cpu()].contiguous()
    positions = groups.cpu().nonzero()[:, 1].numpy()  # row-major: ascending within each group
    bits = (positions[:, None] >> np.arange(index_bits(m))) & 1
    return values, torch.from_numpy(np.packbits(bits.astype(bool).reshape(-1), bitorder="little"))


def unpack_nm(values: torch.Tensor, positions: torch.Tensor, shape: Sequence[int], n: int, m: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense weight (zeros where masked) and its bool mask, from ``pack_nm``'s output."""
    count = values.numel()
    width = index_bits(m)
    bits = np.unpackbits(positions.numpy(), count=count * width, bitorder="little").reshape(count, width)
    where = torch.from_numpy((bits.astype(np.int64) << np.arange(width)).sum(1))
    rows = torch.arange(count // n).repeat_interleave(n)
    dense = torch.zeros(count // n, m, dtype=values.dtype)
    dense[rows, where] = values
    mask = torch.zeros(count // n, m, dtype=torch.bool)
    mask[rows, where] = True
    return dense.reshape(tuple(shape)), mask.reshape(tuple(shape))
