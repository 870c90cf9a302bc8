"""What a head and an MLP neuron are, in tensor slices: the one definition that the structured sparsifier, the model
adapter, compaction and the checkpoint detector all read.

A timm ``Attention`` computes q, k and v with one ``qkv`` Linear whose output rows are three sections (q, k, v) of
``num_heads`` blocks of ``head_dim`` rows: the ``[3, H, d]`` view of its rows. Head h owns block h of every section
(rows and bias) and the matching ``head_dim`` input columns of ``proj``. A timm ``Mlp`` neuron i owns row i of ``fc1``
(and its bias) and column i of ``fc2``. With global pruning's ``--prune-head-dim``, head dimension j of a block owns
row j of every head in each of the q, k and v sections (rows and bias) and the matching input column of every head
in ``proj``: one head width per block, shared by q, k and v, as timm's ``Attention`` has. Everything is expressed by
FQN and axis, so this module needs neither timm nor the model code.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

UNIT_KINDS = ("head", "neuron", "channel", "head_dim")
SLICE_ROLES = ("in", "bias", "out")
QKV_SECTIONS = 3
"""q, k and v: the sections of a timm ``Attention.qkv`` output."""
V_SECTION = 2
"""The section of ``qkv`` holding v, whose bias a pruned head still emits when that bias is not masked."""
UNIT_MULTIPLE_AUTO = "auto"
"""The ``--unit-multiple`` setting that picks a multiple per layer width (``auto_multiple``)."""
AUTO_MULTIPLE = 8
"""The multiple ``auto`` keeps wide layers in. On the CPU sweep (benchmarks/results/cpu-unit-multiple.md) the
compacted DeiT-S and DeiT-B realised as much of their MAC saving with MLP widths in multiples of 8 as with 16, 32 or
64, and 8 moves the kept fraction least."""
AUTO_MIN_WIDTH = 384
"""Layers narrower than this keep the paper's exact count under ``auto``. Rounding to a multiple of 8 moves a count
by at most 4 units: at most 1/96 of a layer this wide (about one point of density), 1/768 of DeiT-B's MLP."""


@dataclass(frozen=True)
class UnitSlice:
    """The part of one tensor that belongs to the units of a group.

    Along ``dim`` the tensor holds ``sections`` consecutive blocks of ``num_units * width`` entries, and unit u owns
    the ``width`` entries at offset ``u * width`` of every block. For example, a head owns one block of rows in each
    of the q, k and v sections of ``qkv.weight``: 3 sections of H heads of head_dim rows.

    Args:
        param: parameter FQN.
        dim: the axis the units split.
        sections: blocks along ``dim``.
        width: entries per unit per block.
        role: ``in`` is an input-side weight: always masked, and freshly initialised when its unit regrows.
            ``bias`` is an input-side bias, masked unless in compat mode. ``out`` is an output-side weight (``proj``
            columns, ``fc2`` columns): left unmasked, so a pruned unit still receives an informative gradient at its
            output. Only compat mode masks the fc2 columns of neurons, as SViTE did.
    """

    param: str
    dim: int
    sections: int
    width: int
    role: str


@dataclass(frozen=True)
class UnitGroup:
    """One block's heads or one block's MLP neurons.

    Args:
        name: FQN of the owning module (``blocks.3.attn``); keys scores, records and random draws.
        kind: one of ``UNIT_KINDS``.
        num_units: heads, hidden neurons, embedding channels or head dimensions.
        slices: the tensor slices that make up the units.
    """

    name: str
    kind: str
    num_units: int
    slices: tuple[UnitSlice, ...]

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> UnitGroup:
        """Parse the plain-dict form a model adapter returns (``models.structure_units(model).groups``)."""
        slices = tuple(UnitSlice(str(s["param"]), int(s["dim"]), int(s["sections"]), int(s["width"]), str(s["role"]))
                       for s in spec["slices"])
        group = cls(str(spec["name"]), str(spec["kind"]), int(spec["num_units"]), slices)
        if group.kind not in UNIT_KINDS or group.num_units < 1:
            raise ValueError(f"unit group {group.name}: kind must be one of {UNIT_KINDS} with at least one unit, "
                             f"got {group.kind!r} with {group.num_units}")
        if any(s.role not in SLICE_ROLES for s in slices) or not any(s.role == "in" for s in slices):
            raise ValueError(f"unit group {group.name}: roles must be in {SLICE_ROLES}, with at least one 'in' slice")
        return group

    def to_dict(self) -> dict[str, Any]:
        """The plain-dict form ``from_dict`` reads."""
        return dataclasses.asdict(self)

    @property
    def primary(self) -> UnitSlice:
        """The first input-side slice; its mask says which units are active."""
        return next(s for s in self.slices if s.role == "in")

    @property
    def output(self) -> UnitSlice:
        """The output-side slice (``proj`` or ``fc2`` columns), which carries a pruned unit's constant output."""
        return next(s for s in self.slices if s.role == "out")


def head_group(attn: str, num_heads: int, head_dim: int, qkv_bias: bool = True) -> UnitGroup:
    """The heads of the timm ``Attention`` at FQN ``attn``: q, k and v row blocks of ``qkv`` (weight, and bias if it
    has one) and the matching ``proj`` input columns."""
    slices = [UnitSlice(f"{attn}.qkv.weight", 0, QKV_SECTIONS, head_dim, "in")]
    if qkv_bias:
        slices.append(UnitSlice(f"{attn}.qkv.bias", 0, QKV_SECTIONS, head_dim, "bias"))
    slices.append(UnitSlice(f"{attn}.proj.weight", 1, 1, head_dim, "out"))
    return UnitGroup(attn, "head", num_heads, tuple(slices))


def head_dim_group(attn: str, num_heads: int, head_dim: int, qkv_bias: bool = True) -> UnitGroup:
    """The head dimensions of the timm ``Attention`` at FQN ``attn`` (named ``{attn}.head_dim``): dimension j owns
    row j of every head in each of the q, k and v sections of ``qkv`` (the ``[3, H, d]`` view's ``[:, :, j]``: 3H
    sections of d rows, width 1; weight, and bias if it has one) and column j of every head in ``proj`` (H sections).
    Removing it narrows every head of the block at once."""
    slices = [UnitSlice(f"{attn}.qkv.weight", 0, QKV_SECTIONS * num_heads, 1, "in")]
    if qkv_bias:
        slices.append(UnitSlice(f"{attn}.qkv.bias", 0, QKV_SECTIONS * num_heads, 1, "bias"))
    slices.append(UnitSlice(f"{attn}.proj.weight", 1, num_heads, 1, "out"))
    return UnitGroup(head_dim_group_name(attn), "head_dim", head_dim, tuple(slices))


def head_dim_group_name(attn: str) -> str:
    """The name of the head-dimension group of the attention at FQN ``attn`` (keys scores, counts and records)."""
    return f"{attn}.head_dim"


def qkv_sections(spec: UnitSlice, part: int) -> range:
    """The sections of a ``qkv`` slice that hold q, k or v (``part`` 0, 1 or ``V_SECTION``): one of a head slice's
    3, or H of a head-dimension slice's 3H."""
    per = spec.sections // QKV_SECTIONS
    return range(part * per, (part + 1) * per)


def neuron_group(mlp: str, hidden: int, fc1_bias: bool = True) -> UnitGroup:
    """The hidden neurons of the timm ``Mlp`` at FQN ``mlp``: ``fc1`` rows (weight, and bias if it has one) and the
    matching ``fc2`` columns."""
    slices = [UnitSlice(f"{mlp}.fc1.weight", 0, 1, 1, "in")]
    if fc1_bias:
        slices.append(UnitSlice(f"{mlp}.fc1.bias", 0, 1, 1, "bias"))
    slices.append(UnitSlice(f"{mlp}.fc2.weight", 1, 1, 1, "out"))
    return UnitGroup(mlp, "neuron", hidden, tuple(slices))


def channel_group(name: str, num_channels: int, slices: Sequence[tuple[str, int, str]]) -> UnitGroup:
    """The embedding dimension: residual channel c owns entry c, along the given axis, of every tensor that writes the
    residual stream (patch embedding rows, cls/position tokens, ``proj`` and ``fc2`` rows and biases: role ``in`` or
    ``bias``), of every LayerNorm over it, and of every tensor that reads it (``qkv``, ``fc1`` and head columns: role
    ``out``). Removing a channel removes it from all of them at once.

    Args:
        name: the group's name (``embed``).
        num_channels: D.
        slices: (parameter FQN, axis, role) for each tensor the channels split.
    """
    return UnitGroup(name, "channel", num_channels,
                     tuple(UnitSlice(param, dim, 1, 1, role) for param, dim, role in slices))


def heads_in_qkv(rows: int, head_dim: int) -> int:
    """How many heads a ``qkv`` output of ``rows`` rows holds (compact blocks have fewer than the named model)."""
    return rows // (QKV_SECTIONS * head_dim)


def unit_positions(spec: UnitSlice, num_units: int, units: torch.Tensor,
                   sections: Sequence[int] | None = None) -> torch.Tensor:
    """Indices along ``spec.dim`` of the entries owned by ``units`` (int64 unit ids), section by section; only the
    listed ``sections`` when given (e.g. ``[V_SECTION]``)."""
    chosen = torch.arange(spec.sections) if sections is None else torch.tensor(list(sections), dtype=torch.long)
    base = chosen[:, None, None] * (num_units * spec.width)
    offsets = units.reshape(1, -1, 1).cpu() * spec.width + torch.arange(spec.width)[None, None, :]
    return (base + offsets).reshape(-1)


def select_units(tensor: torch.Tensor, spec: UnitSlice, num_units: int, units: torch.Tensor,
                 sections: Sequence[int] | None = None) -> torch.Tensor:
    """The entries of ``tensor`` that ``units`` own in slice ``spec``, in unit order within each section."""
    index = unit_positions(spec, num_units, units, sections).to(tensor.device)
    return tensor.index_select(spec.dim, index)


def expand_units(unit_mask: torch.Tensor, spec: UnitSlice, shape: Sequence[int]) -> torch.Tensor:
    """The full-tensor bool mask of a slice whose units are on where ``unit_mask`` (shape [num_units]) is True."""
    moved = [shape[spec.dim], *(size for i, size in enumerate(shape) if i != spec.dim)]
    rest = math.prod(moved[1:])
    full = unit_mask.reshape(1, -1, 1, 1).expand(spec.sections, unit_mask.numel(), spec.width, rest)
    return full.reshape(moved).movedim(0, spec.dim).contiguous()


def units_alive(tensor: torch.Tensor, spec: UnitSlice, num_units: int) -> torch.Tensor:
    """Bool [num_units]: whether a unit owns any nonzero (or True) entry of ``tensor`` in slice ``spec``."""
    moved = tensor.movedim(spec.dim, 0).reshape(spec.sections, num_units, spec.width, -1)
    return moved.ne(0).any(dim=3).any(dim=2).any(dim=0)


def unit_l1(tensor: torch.Tensor, spec: UnitSlice, num_units: int) -> torch.Tensor:
    """Per-unit L1 norm, in float32 (float64 for a float64 tensor), of the entries a slice owns in ``tensor`` (shape
    [num_units]); a bool mask gives its active entries per unit."""
    if not tensor.is_floating_point():
        tensor = tensor.float()
    other = [i for i in range(tensor.dim()) if i != spec.dim]
    if other:
        per_entry = torch.linalg.vector_norm(tensor, ord=1, dim=other,
                                             dtype=torch.promote_types(tensor.dtype, torch.float32))
    else:
        per_entry = tensor.abs().float()
    return per_entry.reshape(spec.sections, num_units, spec.width).sum(dim=(0, 2))


def unit_sum(tensor: torch.Tensor, spec: UnitSlice, num_units: int) -> torch.Tensor:
    """Per-unit signed sum, in float32 (float64 for a float64 tensor), of the entries a slice owns in ``tensor`` (shape
    [num_units]): e.g. of w * dL/dw, the first-order Taylor estimate of the loss change when the unit is removed."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    moved = tensor.movedim(spec.dim, 0).to(dtype).reshape(spec.sections, num_units, spec.width, -1)
    return moved.sum(dim=(0, 2, 3))

def kept_count(width: int, density: float, multiple: int = 1) -> int:
    """How many of a layer's ``width`` units are kept at ``density``, as a multiple of ``multiple``.

    The count is the paper's ``int(width * density)`` rounded to the nearest multiple of ``multiple`` (a tie
    rounds up), and at most the largest multiple that fits in ``width``; ``multiple`` 1 is the paper's count. A
    matrix kernel runs a width such as 1,856 (29 x 64) at a higher fraction of its peak than 1,843, so the
    compacted model realises more of its MAC saving.

    Raises:
        ValueError: ``multiple`` is below 1 or above ``width``, or the count is 0 (a layer keeps at least one
            multiple).
    """
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"the unit multiple must be a positive int, got {multiple!r}")
    if multiple > width:
        raise ValueError(f"a multiple of {multiple} units does not fit in a layer of {width}")
    exact = int(width * density)
    whole, rest = divmod(exact, multiple)
    count = min(whole + (2 * rest >= multiple), width // multiple) * multiple
    if count < 1:
        raise ValueError(f"int({width} x {density}) = {exact} units round to 0 as a multiple of {multiple}")
    return count


def auto_multiple(width: int) -> int:
    """The multiple ``--unit-multiple auto`` gives a layer of ``width`` units: ``AUTO_MULTIPLE`` from
    ``AUTO_MIN_WIDTH`` units up (every DeiT MLP), else 1, the paper's exact count.

    A narrow layer gains little from aligned widths and a rounded count is a larger share of it (4 of DIGITS' 256
    neurons are 1.6 points of density), so the small models' experiments stay exactly the paper's.
    """
    return AUTO_MULTIPLE if width >= AUTO_MIN_WIDTH else 1


def resolve_multiple(setting: int | str, width: int) -> int:
    """The multiple a layer of ``width`` units is kept in: ``auto_multiple(width)`` for ``"auto"``, else
    ``setting``."""
    return auto_multiple(width) if setting == UNIT_MULTIPLE_AUTO else int(setting)
