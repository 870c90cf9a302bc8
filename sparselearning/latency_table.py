"""A measured lookup table of transformer-block latency, and its multilinear interpolation (NViT's latency term,
built from the paper's description).

The table holds the milliseconds one ViT block (LayerNorm, attention, LayerNorm, MLP, residuals) takes on one device
at one batch size and token count, over a grid of (embedding dim, heads, head dim, MLP hidden). Between grid points
the latency is interpolated multilinearly: exact at the grid points, linear along each axis between them. A query
outside the grid is an error, never an extrapolation: a grid for pruning spans 1 unit to the dense width on every
pruned axis. ``benchmarks/latency_table.py`` measures a table and writes it as JSON; this module reads it, so the
sparsity library needs no model or benchmark code.
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

AXES = ("embed_dim", "num_heads", "head_dim", "mlp_hidden")
"""The grid's axes, in the order of ``LatencyTable.ms``."""
TABLE_FORMAT = "svite.latency_table/1"


@dataclass(frozen=True)
class LatencyTable:
    """Block latency in ms over a grid.

    Args:
        grid: axis name (``AXES``) -> strictly increasing grid values.
        ms: latency per grid point, nested lists (or a tensor) of shape [len(grid[a]) for a in AXES].
        tokens: tokens per image the blocks ran on (197 for DeiT at 224 px).
        batch_size: images per forward pass.
        meta: how it was measured (device, versions, date, command, repeats); carried, not interpreted.
    """

    grid: Mapping[str, Sequence[int]]
    ms: Any
    tokens: int
    batch_size: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.grid) != set(AXES):
            raise ValueError(f"a latency table's grid has the axes {', '.join(AXES)}; got {sorted(self.grid)}")
        for axis in AXES:
            values = list(self.grid[axis])
            if not values or any(b <= a for a, b in zip(values, values[1:])) or values[0] < 1:
                raise ValueError(f"latency table axis {axis} must be positive and strictly increasing, got {values}")
        ms = torch.as_tensor(self.ms, dtype=torch.float64)
        shape = tuple(len(self.grid[a]) for a in AXES)
        if tuple(ms.shape) != shape or not bool(torch.isfinite(ms).all()) or bool((ms <= 0).any()):
            raise ValueError(f"latency table values must be positive and finite with shape {shape}, got "
                             f"{tuple(ms.shape)}")
        object.__setattr__(self, "ms", ms)

    def __call__(self, embed_dim: float, num_heads: float, head_dim: float, mlp_hidden: float) -> float:
        """The interpolated latency (ms) of one block of this shape.

        Raises:
            ValueError: a shape outside the grid (the message names the axis and the range to measure).
        """
        point = dict(zip(AXES, (embed_dim, num_heads, head_dim, mlp_hidden)))
        corners: list[tuple[list[int], list[float]]] = []
        for axis in AXES:
            values, x = list(self.grid[axis]), float(point[axis])
            if not values[0] <= x <= values[-1]:
                raise ValueError(f"latency table: {axis} {x:g} lies outside the measured grid [{values[0]}, "
                                 f"{values[-1]}]; measure a table whose grid covers it (python -m "
                                 "benchmarks.latency_table)")
            if len(values) == 1:
                corners.append(([0], [1.0]))
                continue
            hi = min(max(1, next(i for i, v in enumerate(values) if v >= x)), len(values) - 1)
            lo = hi - 1
            t = (x - values[lo]) / (values[hi] - values[lo])
            corners.append(([lo, hi], [1.0 - t, t]))
        total = 0.0
        for choice in itertools.product(*(range(len(c[0])) for c in corners)):
            weight = math.prod(corners[a][1][k] for a, k in enumerate(choice))
            if weight:
                total += weight * float(self.ms[tuple(corners[a][0][k] for a, k in enumerate(choice))])
        return total

    def check_covers(self, embed_dim: int, heads: Sequence[int], head_dims: Sequence[int], hidden: Sequence[int],
                     tokens: int, source: str, head_dim_floor: int | None = None) -> None:
        """Raise a ValueError unless every shape pruning can reach (1 unit to the dense width on each pruned axis)
        lies inside the grid and the table was measured at the model's token count.

        The head dims are the model's own, measured exactly, unless ``head_dim_floor`` is given (``--prune-head-dim``):
        then pruning reaches every head width from that floor (one multiple) to the model's, and the grid must span it.
        """
        if tokens != self.tokens:
            raise ValueError(f"{source} was measured at {self.tokens} tokens per image, the model runs {tokens}: "
                             "measure a table for this model and input size (python -m benchmarks.latency_table)")
        needs = {"embed_dim": (1, embed_dim), "num_heads": (1, max(heads)), "mlp_hidden": (1, max(hidden)),
                 "head_dim": (min(head_dims) if head_dim_floor is None else head_dim_floor, max(head_dims))}
        for axis, (lo, hi) in needs.items():
            values = list(self.grid[axis])
            exact = axis == "head_dim" and head_dim_floor is None
            if values[0] > lo or values[-1] < hi or (exact and set(head_dims) - set(values)):
                if axis == "head_dim" and head_dim_floor is not None:
                    raise ValueError(f"{source}: its head_dim grid {values} does not span {lo}..{hi}, the head "
                                     "widths --prune-head-dim can reach; measure a table with a head_dim grid (python "
                                     f"-m benchmarks.latency_table --model NAME --head-dim {lo} ... {hi})")
                raise ValueError(f"{source}: its {axis} grid {values} does not cover {lo}..{hi}, which pruning "
                                 "this model can reach; measure a table for this model (python -m "
                                 "benchmarks.latency_table --model NAME)")

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "grid": {a: list(self.grid[a]) for a in AXES}, "axes": list(AXES),
                "ms": self.ms.tolist(), "tokens": self.tokens, "batch_size": self.batch_size, "meta": dict(self.meta)}


def save_table(table: LatencyTable, path: str | Path) -> Path:
    """Write ``table`` as JSON (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table.to_dict(), indent=1) + "\n")
    tmp.replace(path)
    return path


def load_table(path: str | Path) -> LatencyTable:
    """Read a table ``save_table`` wrote.

    Raises:
        ValueError: a missing file or one that is not a latency table.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--latency-table {path} does not exist; measure one with python -m benchmarks.latency_table "
                         "--model NAME --out FILE")
    raw = json.loads(path.read_text())
    if not isinstance(raw, dict) or raw.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path} is not a latency table (expected format {TABLE_FORMAT!r})")
    return LatencyTable(raw["grid"], raw["ms"], int(raw["tokens"]), int(raw["batch_size"]), raw.get("meta", {}))

