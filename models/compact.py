"""Physical compaction of a structured-sparse ViT: pruned heads and MLP neurons removed, not just zeroed.

Training keeps the dense shapes with masked rows (soft pruning). This module turns such a model into a smaller timm
model for export and timing: fewer heads per block (and a narrower ``qkv``/``proj``), narrower MLPs. The compact
model computes the same function as the masked one. A pruned unit that is not silent, as in SViTE's compat mode
(unmasked qkv bias: the head outputs b_v at every token), adds a constant, and that constant is folded into the
bias of ``proj`` or ``fc2``.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from models.head_stats import prunable_blocks
from models.vit import architecture, create_model
from models.wrappers import unwrap_model


def _masked(param: torch.Tensor | None, fqn: str, masks: Mapping[str, torch.Tensor] | None) -> torch.Tensor | None:
    """A parameter as the masked model sees it: a detached copy, times its mask if ``masks`` has one for ``fqn``."""
    if param is None:
        return None
    mask = None if masks is None else masks.get(fqn)
    return param.detach() * mask.to(param.device) if mask is not None else param.detach().clone()


def _kept(active: torch.Tensor) -> torch.Tensor:
    """Indices of the active units, or unit 0 if none is: a block needs one unit, and keeping a dead unit is exact."""
    kept = active.nonzero().flatten()
    return kept if kept.numel() else torch.zeros(1, dtype=torch.long, device=active.device)


def _rows(units: torch.Tensor, sections: int, num_units: int, width: int) -> torch.Tensor:
    """Indices of ``units``' entries in a tensor axis made of ``sections`` blocks of ``num_units * width``."""
    base = torch.arange(sections, device=units.device)[:, None, None] * (num_units * width)
    return (base + units[None, :, None] * width + torch.arange(width, device=units.device)[None, None, :]).reshape(-1)


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

    Blocks may keep different counts. The result is the same timm ``VisionTransformer`` class with timm ``Attention``
    and ``Mlp`` modules, whose ``qkv``, ``proj``, ``fc1`` and ``fc2`` are replaced in place on a deep copy. Everything
    else (token selectors, dropout, drop path) is untouched. The input model is not modified.

    Args:
        model: the (possibly DDP-wrapped) masked timm ViT.
        masks: FQN -> bool mask of masked parameters; None to read the zero pattern of the weights.

    Returns:
        The compact model, in the training mode of the input.
    """
    compact = copy.deepcopy(unwrap_model(model))
    for name, attn, mlp in prunable_blocks(compact):
        h, d = attn.num_heads, attn.head_dim
        qkv_w = _masked(attn.qkv.weight, f"{name}.attn.qkv.weight", masks)
        qkv_b = _masked(attn.qkv.bias, f"{name}.attn.qkv.bias", masks)
        proj_w = _masked(attn.proj.weight, f"{name}.attn.proj.weight", masks)
        proj_b = _masked(attn.proj.bias, f"{name}.attn.proj.bias", masks)
        qkv_mask = None if masks is None else masks.get(f"{name}.attn.qkv.weight")
        alive = qkv_w.ne(0) if qkv_mask is None else qkv_mask.to(qkv_w.device)
        heads_active = alive.any(dim=1).reshape(3, h, d).any(dim=2).any(dim=0)
        heads = _kept(heads_active)
        pruned = torch.ones(h, dtype=torch.bool, device=heads.device)
        pruned[heads] = False
        cols, pruned_cols = _rows(heads, 1, h, d), _rows(pruned.nonzero().flatten(), 1, h, d)
        leak = torch.zeros(proj_w.shape[0], dtype=proj_w.dtype, device=proj_w.device)
        if qkv_b is not None:
            leak = proj_w[:, pruned_cols] @ qkv_b[2 * h * d + pruned_cols]
        rows = _rows(heads, 3, h, d)
        attn.qkv = _linear_like(attn.qkv, qkv_w[rows], None if qkv_b is None else qkv_b[rows])
        attn.proj = _linear_like(attn.proj, proj_w[:, cols], _fold(proj_b, leak, f"{name}.attn.proj"))
        attn.num_heads = heads.numel()
        attn.attn_dim = heads.numel() * d

        fc1_w = _masked(mlp.fc1.weight, f"{name}.mlp.fc1.weight", masks)
        fc1_b = _masked(mlp.fc1.bias, f"{name}.mlp.fc1.bias", masks)
        fc2_w = _masked(mlp.fc2.weight, f"{name}.mlp.fc2.weight", masks)
        fc2_b = _masked(mlp.fc2.bias, f"{name}.mlp.fc2.bias", masks)
        fc1_mask = None if masks is None else masks.get(f"{name}.mlp.fc1.weight")
        alive = fc1_w.ne(0) if fc1_mask is None else fc1_mask.to(fc1_w.device)
        neurons = _kept(alive.any(dim=1))
        dropped = torch.ones(fc1_w.shape[0], dtype=torch.bool, device=neurons.device)
        dropped[neurons] = False
        hidden = mlp.act(fc1_b if fc1_b is not None else torch.zeros_like(fc1_w[:, 0]))
        leak = fc2_w[:, dropped] @ hidden[dropped]
        mlp.fc1 = _linear_like(mlp.fc1, fc1_w[neurons], None if fc1_b is None else fc1_b[neurons])
        mlp.fc2 = _linear_like(mlp.fc2, fc2_w[:, neurons], _fold(fc2_b, leak, f"{name}.mlp.fc2"))
    return compact


def random_unit_masks(model: nn.Module, atten_density: float, other_density: float,
                      seed: int = 0) -> dict[str, torch.Tensor]:
    """Masks keeping ``int(H * atten_density)`` random heads and ``int(hidden * other_density)`` random neurons in
    every block (the counts of ``--pruning_type structure``), over qkv/fc1 weights and biases; for benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, attn, mlp in prunable_blocks(model):
        h, d, hidden = attn.num_heads, attn.head_dim, mlp.fc1.out_features
        heads = torch.zeros(h, dtype=torch.bool)
        heads[torch.randperm(h, generator=generator)[: max(int(h * atten_density), 1)]] = True
        neurons = torch.zeros(hidden, dtype=torch.bool)
        neurons[torch.randperm(hidden, generator=generator)[: max(int(hidden * other_density), 1)]] = True
        rows = heads.reshape(1, h, 1).expand(3, h, d).reshape(-1)
        for prefix, linear, active in ((f"{name}.attn.qkv", attn.qkv, rows), (f"{name}.mlp.fc1", mlp.fc1, neurons)):
            device = linear.weight.device
            masks[f"{prefix}.weight"] = active[:, None].expand_as(linear.weight).to(device).contiguous()
            if linear.bias is not None:
                masks[f"{prefix}.bias"] = active.to(device)
    return masks


def random_compact_model(name: str, atten_density: float = 0.7, other_density: float = 0.6, seed: int = 0,
                         num_classes: int = 1000) -> nn.Module:
    """A randomly initialised ``name`` model compacted with random unit masks (DeiT-S at 0.7/0.6: 4 of 6 heads and
    921 of 1536 neurons per block), in eval mode; for speed benchmarks."""
    model = create_model(name, num_classes=num_classes)
    return compact_model(model, random_unit_masks(model, atten_density, other_density, seed)).eval()


def compact_architecture(model: nn.Module, model_name: str) -> dict[str, Any]:
    """``models.architecture(model)`` plus the ``--model`` name it derives from: everything ``build_compact`` needs."""
    return {"model": model_name, **architecture(unwrap_model(model))}


def build_compact(arch: Mapping[str, Any]) -> nn.Module:
    """An untrained model with a compact architecture (``compact_architecture`` output), built by ``create_model``."""
    return create_model(arch["model"], num_classes=arch["num_classes"], img_size=arch["img_size"],
                        block_heads=arch["block_heads"], block_mlp_hidden=arch["block_mlp_hidden"],
                        head_dim=arch["head_dim"])
