"""The token-merging settings, their command-line flags, and the per-block merge counts they give."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from models.token_merging.matching import max_merges
from models.token_selection.config import MERGE_MODE, check_choice

SCHEDULES = ("constant", "decreasing")


@dataclass(frozen=True)
class MergeConfig:
    """How many tokens each block merges (ToMe's r), parsed once from the command line.

    Args:
        r: empty: no merging. One value R: R per block (``constant``) or the ``decreasing`` schedule. Several
            values: one per block, in order.
        schedule: ``constant``, or ``decreasing``: block i of L merges round-half-up(2R (L-1-i) / (L-1)), a
            line from 2R at the first block to 0 at the last, the same R·L merges in all (L = 1: R).
    """

    r: tuple[int, ...] = ()
    schedule: str = "constant"

    def __post_init__(self) -> None:
        check_choice("merge schedule", self.schedule, SCHEDULES)
        bad = [v for v in self.r if isinstance(v, bool) or not isinstance(v, int) or v < 0]
        if bad:
            raise ValueError(f"--tome-r takes tokens merged per block, integers >= 0; got {list(self.r)}")
        if self.schedule == "decreasing" and len(self.r) != 1:
            raise ValueError("--tome-schedule decreasing spreads one --tome-r R over the blocks; give a single R, "
                             f"not {len(self.r)} values (or a per-block list with the constant schedule)")

    @property
    def enabled(self) -> bool:
        """Whether merging hooks are installed (``--tome-r 0`` installs them, merging nothing)."""
        return bool(self.r)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MergeConfig:
        """From the ``add_merge_args`` flags; ``--token-mode merge`` without ``--tome-r`` is refused."""
        r = tuple(args.tome_r or ())
        if args.token_mode == MERGE_MODE and not r:
            raise ValueError("--token-mode merge needs --tome-r R: the tokens each block merges (one R, or one per "
                             "block)")
        if args.tome_schedule != "constant" and not r:
            raise ValueError(f"--tome-schedule {args.tome_schedule} needs --tome-r R")
        return cls(r=r, schedule=args.tome_schedule)

    @classmethod
    def recorded(cls, args: dict[str, Any]) -> MergeConfig:
        """The merging a checkpoint's ``args`` record (none for files written before merging existed)."""
        return cls(r=tuple(args.get("tome_r") or ()), schedule=args.get("tome_schedule") or "constant")

    def per_block(self, depth: int) -> tuple[int, ...]:
        """r of each of ``depth`` blocks.

        Raises:
            ValueError: for a per-block list of another length.
        """
        if len(self.r) == 1:
            (r,) = self.r
            if self.schedule == "constant" or depth == 1:
                return (r,) * depth
            return tuple(int(2 * r * (depth - 1 - i) / (depth - 1) + 0.5) for i in range(depth))
        if len(self.r) != depth:
            raise ValueError(f"--tome-r gives {len(self.r)} values but the model has {depth} blocks: give one R for "
                             f"every block, or exactly {depth} values")
        return self.r


def token_counts(num_tokens: int, num_prefix: int, merges: Sequence[int]) -> list[int]:
    """Tokens entering each block and, last, leaving the final one: n_0 = ``num_tokens``, n_{i+1} = n_i - r_i.

    Raises:
        ValueError: naming the first block whose r exceeds what its sequence can merge (``max_merges``).
    """
    counts = [num_tokens]
    for i, r in enumerate(merges):
        n = counts[-1]
        limit = max_merges(n, num_prefix)
        if r > limit:
            raise ValueError(
                f"--tome-r: block {i} receives {n} tokens ({num_prefix} prefix) and can merge at most {limit} "
                f"(one per token of set A, half the non-prefix tokens), but r = {r}; per-block r: {list(merges)}. "
                "Lower R, or give a per-block list")
        counts.append(n - r)
    return counts


def add_merge_args(parser: argparse.ArgumentParser) -> None:
    """The token-merging flags as one argument group (``--token-mode merge`` is in the token-selection group)."""
    g = parser.add_argument_group("token merging (ToMe)")
    g.add_argument("--tome-r", type=int, nargs="+", default=None, metavar="R",
                   help="merge R tokens in every block (between attention and MLP), or one R per block; 0 merges "
                        "none. With --eval: merge in any checkpoint, no training needed")
    g.add_argument("--tome-schedule", default="constant", choices=SCHEDULES,
                   help="constant: R in every block; decreasing: 2R at the first block down to 0 at the last "
                        "(round-half-up(2R(L-1-i)/(L-1)) in block i of L)")
