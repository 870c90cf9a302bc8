"""The model side of global structural pruning (``--pruning_type global``): every unit group of a timm ViT (heads and
MLP neurons per block, embedding channels, and with ``--prune-head-dim`` each block's head dimensions), the MAC count
of any unit counts, and the kept-channel LayerNorms, for ``sparselearning.GlobalPruning``, which never imports the
model code."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.channel_units import EMBED_GROUP, embedding_group, kept_channels, set_kept_channels
from models.flops import BlockShape, block_shapes, vit_macs
from models.head_stats import block_head_dims, block_units, prunable_blocks
from models.wrappers import unwrap_model
from sparselearning.latency_table import LatencyTable, load_table
from sparselearning.units import UNIT_MULTIPLE_AUTO, head_dim_group_name, resolve_multiple


class GlobalUnits:
    """The adapter ``build_sparsifier(..., units=...)`` reads for ``--pruning_type global``.

    ``macs`` is ``models.flops.vit_macs`` of the executed block shapes with the given counts, so the count a budget
    is met at is the count of the compact model (``count_macs``).

    ``latency`` is the sum over blocks of a measured ``LatencyTable`` at the blocks' kept widths (the patch
    embedding and the classifier are not in the table: under 1% of a DeiT's time).

    With ``prune_head_dim`` each block's head dimensions are one more group (``blocks.i.attn.head_dim``), and both
    counts use each block's kept head width; the table must then span the head widths pruning can reach, from one
    multiple (``unit_multiple``, resolved per block as ``GlobalPruning`` does) to the model's.

    Args:
        model: the (possibly DDP-wrapped) timm ViT.
        table: a block-latency table measured for this model (``--latency-table``); None: no latency term.
        table_source: the table's file, for messages.
        prune_head_dim: add the head-dimension groups (``--prune-head-dim``).
        unit_multiple: ``--unit-multiple``, for the narrowest head the table must cover.
    """

    def __init__(self, model: nn.Module, table: LatencyTable | None = None, table_source: str = "the latency table",
                 prune_head_dim: bool = False, unit_multiple: int | str = UNIT_MULTIPLE_AUTO) -> None:
        net = unwrap_model(model)
        blocks = prunable_blocks(net)
        self.groups: list[dict[str, Any]] = []
        for name, attn, mlp in blocks:
            heads, neurons = block_units(name, attn, mlp)
            dims = [block_head_dims(name, attn)] if prune_head_dim else []
            self.groups += [g.to_dict() for g in (heads, *dims, neurons)]
        self.groups.append(embedding_group(net).to_dict())
        self._blocks = [name for name, _, _ in blocks]
        self._shapes = block_shapes(net, "executed")
        head = net.head
        self._fixed = dict(num_patches=net.patch_embed.num_patches,
                           patch_dim=math.prod(net.patch_embed.proj.weight.shape[1:]),
                           num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
                           distilled=isinstance(getattr(net, "head_dist", None), nn.Linear))
        self.table = table
        if table is not None:
            head_dims = [s.head_dim for s in self._shapes]
            table.check_covers(net.embed_dim, [s.num_heads for s in self._shapes], head_dims,
                               [s.mlp_hidden for s in self._shapes], self._shapes[0].tokens, table_source,
                               head_dim_floor=min(resolve_multiple(unit_multiple, d) for d in head_dims)
                               if prune_head_dim else None)

    def _kept_shapes(self, counts: Mapping[str, int]) -> list[BlockShape]:
        """Each block's shape with ``counts[group]`` units kept (its head width too, when its head dims are a
        group)."""
        return [dataclasses.replace(shape, num_heads=counts[f"{name}.attn"], mlp_hidden=counts[f"{name}.mlp"],
                                    head_dim=counts.get(head_dim_group_name(f"{name}.attn"), shape.head_dim))
                for name, shape in zip(self._blocks, self._shapes)]

    def macs(self, counts: Mapping[str, int]) -> float:
        """MACs per image with ``counts[group]`` units kept (groups ``blocks.i.attn``, ``blocks.i.mlp``, ``embed`` and
        with ``prune_head_dim`` ``blocks.i.attn.head_dim``)."""
        return vit_macs(counts[EMBED_GROUP], self._kept_shapes(counts), **self._fixed).total

    def latency(self, counts: Mapping[str, int]) -> float:
        """Milliseconds per forward pass of the blocks with ``counts[group]`` units kept, by the table.

        Raises:
            ValueError: no table was given (``--latency-table``).
        """
        if self.table is None:
            raise ValueError("--target-latency and --latency-lambda read measured block latencies: pass "
                             "--latency-table FILE (measure one with python -m benchmarks.latency_table --model NAME "
                             "--out FILE)")
        return sum(self.table(counts[EMBED_GROUP], shape.num_heads, shape.head_dim, shape.mlp_hidden)
                   for shape in self._kept_shapes(counts))

    def set_channels(self, module: nn.Module, active: torch.Tensor) -> None:
        """The kept-channel LayerNorms of ``module`` (``models.channel_units.set_kept_channels``)."""
        set_kept_channels(module, active)

    def active_channels(self, module: nn.Module) -> torch.Tensor:
        """The channels ``module`` already normalises over (fewer than all after ``--finetune`` of a pruned file)."""
        return kept_channels(module)


def global_units(model: nn.Module, latency_table: str | None = None, prune_head_dim: bool = False,
                 unit_multiple: int | str = UNIT_MULTIPLE_AUTO) -> GlobalUnits:
    """Every unit group of a timm ViT (with ``prune_head_dim``, its head dimensions too), its MAC count and, given a
    table file (``--latency-table``), its latency, for ``build_sparsifier(units=...)`` with global pruning."""
    table = None if latency_table is None else load_table(latency_table)
    return GlobalUnits(model, table, f"--latency-table {latency_table}", prune_head_dim, unit_multiple)
