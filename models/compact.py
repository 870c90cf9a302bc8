"""Physical compaction of a structured-sparse ViT: pruned heads and MLP neurons removed, not just zeroed.

Training keeps the dense shapes with masked rows (soft pruning). This module turns such a model into a smaller timm
model for export and timing: fewer (or narrower) heads per block, so a narrower ``qkv``/``proj``, and narrower MLPs.
The compact model computes the same function as the masked one. A pruned unit that is not silent, as in SViTE's compat
mode (unmasked qkv bias: the head outputs b_v at every token), adds a constant, and that constant is folded into the
bias of ``proj`` or ``fc2``.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from timm.models.vision_transformer import Attention
from torch import nn

from models.channel_units import clear_kept_channels, compact_channels, pruned_channels
from models.head_stats import block_units, prunable_blocks
from models.vit import architecture, create_model
from models.wrappers import unwrap_model
from sparselearning.units import (UNIT_MULTIPLE_AUTO, V_SECTION, UnitGroup, UnitSlice, expand_units, head_dim_group,
                                  kept_count, qkv_sections, resolve_multiple, select_units, units_alive)


def _masked(param: torch.Tensor | None, fqn: str, masks: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    """A parameter as the masked model sees it: a detached copy, times its mask if ``masks`` has one for ``fqn``."""
    if param is None:
        return None
    mask = None if masks is None else masks.get(fqn)
    return param.detach() * mask.to(param.device) if mask is not None else param.detach().clone()


def _alive(weight: torch.Tensor, masks: Mapping[str, torch.Tensor] | None, fqn: str) -> torch.Tensor:
    """Bool, shaped like ``weight``: its mask when ``masks`` has one, else where it is non-zero (SViTE files)."""
    mask = None if masks is None else masks.get(fqn)
    return weight.ne(0) if mask is None else mask.to(weight.device)


def _kept_and_dropped(alive: torch.Tensor, spec: UnitSlice, num_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the units of slice ``spec`` that own an ``alive`` entry, and of the others. With none alive, unit 0
    is kept: a block needs one unit, and keeping a dead unit is exact."""
    kept = units_alive(alive, spec, num_units).nonzero().flatten()
    if not kept.numel():
        kept = torch.zeros(1, dtype=torch.long, device=alive.device)
    dropped = torch.ones(num_units, dtype=torch.bool, device=kept.device)
    dropped[kept] = False
    return kept, dropped.nonzero().flatten()


def _linear_like(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    new.train(old.training)
    return new


def _fold(bias: torch.Tensor | None, leak: torch.Tensor, fqn: str) -> torch.Tensor | None:
    """``bias`` plus the constant the pruned units add; an error if there is no bias to carry a nonzero constant."""
    if bias is not None:
        return bias + leak
    if bool(leak.ne(0).any()):
        raise ValueError(f"pruned units of {fqn} add a constant output but the layer has no bias to fold it into")
    return None


def _compact_attention(name: str, attn: Attention, heads_of: UnitGroup,
                       masks: Mapping[str, torch.Tensor] | None) -> None:
    """Replace ``attn``'s ``qkv`` and ``proj`` by their kept heads and, where some head dimension of the block is
    pruned in every kept head, by its kept head dimensions (see ``compact_model``)."""
    h, qkv, proj = heads_of.num_units, heads_of.primary, heads_of.output
    qkv_w = _masked(attn.qkv.weight, qkv.param, masks)
    qkv_b = _masked(attn.qkv.bias, f"{name}.attn.qkv.bias", masks)
    proj_w = _masked(attn.proj.weight, proj.param, masks)
    proj_b = _masked(attn.proj.bias, f"{name}.attn.proj.bias", masks)
    alive = _alive(qkv_w, masks, qkv.param)
    heads, pruned = _kept_and_dropped(alive, qkv, h)
    leak = torch.zeros(proj_w.shape[0], dtype=proj_w.dtype, device=proj_w.device)
    if qkv_b is not None:  # a pruned head outputs its v bias at every token
        leak = select_units(proj_w, proj, h, pruned) @ select_units(qkv_b, qkv, h, pruned, sections=[V_SECTION])
    qkv_w, proj_w = select_units(qkv_w, qkv, h, heads), select_units(proj_w, proj, h, heads)
    qkv_b = None if qkv_b is None else select_units(qkv_b, qkv, h, heads)
    h, d = heads.numel(), attn.head_dim
    rows = head_dim_group(f"{name}.attn", h, d).primary
    dim_alive = units_alive(select_units(alive, qkv, heads_of.num_units, heads), rows, d)
    if bool(dim_alive.any()) and not bool(dim_alive.all()):  # pruned head dimensions (--prune-head-dim)
        dims, dropped = dim_alive.nonzero().flatten(), (~dim_alive).nonzero().flatten()
        cols = head_dim_group(f"{name}.attn", h, d).output
        if qkv_b is not None:  # a pruned dimension of v outputs its v bias at every token
            leak = leak + select_units(proj_w, cols, d, dropped) @ select_units(
                qkv_b, rows, d, dropped, sections=qkv_sections(rows, V_SECTION))
        qkv_w, proj_w = select_units(qkv_w, rows, d, dims), select_units(proj_w, cols, d, dims)
        qkv_b = None if qkv_b is None else select_units(qkv_b, rows, d, dims)
        # the attention scales q.k by 1/sqrt(head width); q absorbs sqrt(d'/d), so the logits stay q.k/sqrt(d)
        d_kept = dims.numel()
        factor = math.sqrt(d_kept / d)
        qkv_w[:h * d_kept] *= factor
        if qkv_b is not None:
            qkv_b[:h * d_kept] *= factor
        d = attn.head_dim = d_kept
        attn.scale = d ** -0.5
    attn.qkv = _linear_like(attn.qkv, qkv_w, qkv_b)
    attn.proj = _linear_like(attn.proj, proj_w, _fold(proj_b, leak, f"{name}.attn.proj"))
    attn.num_heads = h
    attn.attn_dim = h * d


@torch.no_grad()
def compact_model(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
    """A physically smaller copy of a structured-sparse ViT, with the same outputs as the masked model.

    A head is kept if any of its q, k or v weight rows is active, and a neuron if its fc1 row is. "Active" means the
    mask is set when ``masks`` is given (e.g. ``StructuredDST.masks``), else that the weight is nonzero, which also
    reads SViTE checkpoints. Kept heads keep their q, k and v rows and biases, in order, and the matching ``proj``
    columns. Kept neurons keep their fc1 row, fc1 bias and fc2 column. A pruned head with zero q/k/v weights outputs
    exactly its v bias at every token, because the attention weights sum to 1. A pruned neuron outputs act(fc1 bias).
    Both constants go through the dropped ``proj`` or ``fc2`` columns into that layer's bias. This is exact in every
    mode: it adds zero where the biases were masked, and it reproduces SViTE's bias leak in compat mode, so no mode
    flag is needed.

    Pruned head dimensions (global pruning's ``--prune-head-dim``: dimension j of every head of a block, inactive in
    the q, k and v rows of every kept head) are removed from every head: the block becomes a timm ``Attention`` of
    the kept head width d' (``qkv`` rows ``[3, H', d']``, ``proj`` columns ``[H', d']``). Its attention scales the
    logits by 1/sqrt(d') where the masked model scaled by 1/sqrt(d), so the q rows (weight and bias) are multiplied
    by sqrt(d'/d) and ``attn.scale`` is d'^-1/2: both the fused (SDPA) and the explicit path compute the masked
    model's logits. A pruned dimension adds q_j k_j = b_q b_k, the same for every query-key pair, which the softmax
    ignores, and outputs its v bias at every token, folded into the ``proj`` bias like a pruned head's.

    Pruned embedding channels (``models.channel_units``: global pruning) are removed from every tensor and
    LayerNorm; the masked model normalises over its kept channels, so this is exact too. Blocks may keep different
    counts. The result is the same timm ``VisionTransformer`` class with timm ``Attention``
    and ``Mlp`` modules, whose ``qkv``, ``proj``, ``fc1`` and ``fc2`` are replaced in place on a deep copy. Everything
    else (token selectors, dropout, drop path) is untouched. The input model is not modified.

    Args:
        model: the (possibly DDP-wrapped) masked timm ViT.
        masks: FQN -> bool mask of masked parameters; None to read the zero pattern of the weights.

    Returns:
        The compact model, in the training mode of the input.
    """
    compact = copy.deepcopy(unwrap_model(model))
    channels = pruned_channels(compact, masks)
    for name, attn, mlp in prunable_blocks(compact):
        heads_of, neurons_of = block_units(name, attn, mlp)
        _compact_attention(name, attn, heads_of, masks)

        fc1, fc2 = neurons_of.primary, neurons_of.output
        fc1_w = _masked(mlp.fc1.weight, fc1.param, masks)
        fc1_b = _masked(mlp.fc1.bias, f"{name}.mlp.fc1.bias", masks)
        fc2_w = _masked(mlp.fc2.weight, fc2.param, masks)
        fc2_b = _masked(mlp.fc2.bias, f"{name}.mlp.fc2.bias", masks)
        n = neurons_of.num_units
        neurons, dropped = _kept_and_dropped(_alive(fc1_w, masks, fc1.param), fc1, n)
        hidden = mlp.act(fc1_b if fc1_b is not None else torch.zeros_like(fc1_w[:, 0]))
        leak = select_units(fc2_w, fc2, n, dropped) @ select_units(hidden, fc1, n, dropped)
        mlp.fc1 = _linear_like(mlp.fc1, select_units(fc1_w, fc1, n, neurons),
                               None if fc1_b is None else select_units(fc1_b, fc1, n, neurons))
        mlp.fc2 = _linear_like(mlp.fc2, select_units(fc2_w, fc2, n, neurons), _fold(fc2_b, leak, f"{name}.mlp.fc2"))
    if channels is not None:  # pruned embedding channels (global pruning): masked entries first, then removed
        params = dict(compact.named_parameters())
        for fqn, mask in (masks or {}).items():
            if params[fqn].shape == mask.shape:
                params[fqn].mul_(mask.to(params[fqn].device))
        compact_channels(compact, channels)
    clear_kept_channels(compact)
    return compact


def random_unit_masks(model: nn.Module, atten_density: float, other_density: float, seed: int = 0,
                      unit_multiple: int | str = UNIT_MULTIPLE_AUTO) -> dict[str, torch.Tensor]:
    """Masks keeping ``int(H * atten_density)`` random heads and ``kept_count(hidden, other_density, multiple)``
    random neurons in every block (the counts of ``--pruning_type structure`` with ``--unit-multiple``), over
    qkv/fc1 weights and biases; for benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    params = dict(unwrap_model(model).named_parameters())
    for name, attn, mlp in prunable_blocks(model):
        heads, neurons = block_units(name, attn, mlp)
        for group, count in ((heads, max(int(heads.num_units * atten_density), 1)),
                             (neurons, kept_count(neurons.num_units, other_density,
                                                  resolve_multiple(unit_multiple, neurons.num_units)))):
            n = group.num_units
            active = torch.zeros(n, dtype=torch.bool)
            active[torch.randperm(n, generator=generator)[:count]] = True
            for spec in group.slices:
                if spec.role != "out":
                    param = params[spec.param]
                    masks[spec.param] = expand_units(active, spec, param.shape).to(param.device)
    return masks


def random_compact_model(name: str, atten_density: float = 0.7, other_density: float = 0.6, seed: int = 0,
                         num_classes: int = 1000, unit_multiple: int | str = UNIT_MULTIPLE_AUTO) -> nn.Module:
    """A randomly initialised ``name`` model compacted with random unit masks (DeiT-S at 0.7/0.6 with
    ``unit_multiple`` 1: 4 of 6 heads and 921 of 1536 neurons per block), in eval mode; for speed benchmarks."""
    model = create_model(name, num_classes=num_classes)
    masks = random_unit_masks(model, atten_density, other_density, seed, unit_multiple)
    return compact_model(model, masks).eval()


def compact_architecture(model: nn.Module, model_name: str) -> dict[str, Any]:
    """``models.architecture(model)`` plus the ``--model`` name it derives from: everything ``build_compact`` needs."""
    return {"model": model_name, **architecture(unwrap_model(model))}


def build_compact(arch: Mapping[str, Any], **kwargs: Any) -> nn.Module:
    """An untrained model with a compact architecture (``compact_architecture`` output), built by ``create_model``
    (``kwargs``: its training settings, e.g. ``drop_path_rate``); files written before per-block head widths were
    recorded (no ``block_head_dim``) have ``head_dim`` in every block."""
    return create_model(arch["model"], num_classes=arch["num_classes"], img_size=arch["img_size"],
                        block_heads=arch["block_heads"], block_mlp_hidden=arch["block_mlp_hidden"],
                        head_dim=arch["head_dim"], embed_dim=arch.get("embed_dim"),
                        block_head_dim=arch.get("block_head_dim"), **kwargs)
