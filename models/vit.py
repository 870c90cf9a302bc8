"""Vision Transformers built from timm's own classes, so state_dict keys and shapes are exactly timm's.

DeiT names go straight to `timm.create_model`. Small configurations for the embedded dataset are plain
`timm.models.vision_transformer.VisionTransformer` instances and are not registered, so importing this
project never changes timm's registry. Distilled models (DeiT's distillation token and ``head_dist``) are timm's
`VisionTransformerDistilled`: the DeiT names through `timm.create_model`, the small ones from its class. Blocks may carry their own head count and MLP width (compacted
structured models); they are still timm `Attention` and `Mlp` modules.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import timm
import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Attention, VisionTransformer

from models.token_selection import TokenConfig, apply_token_selection

# The names SViTE's scripts pass to --model; built by timm itself.
DEIT_MODELS = (
    "deit_tiny_patch16_224",
    "deit_small_patch16_224",
    "deit_base_patch16_224",
    "deit_base_patch16_384",
    "deit_tiny_distilled_patch16_224",
    "deit_small_distilled_patch16_224",
    "deit_base_distilled_patch16_224",
)

# Configurations sized for the embedded DIGITS set (8x8 digits served at 16 px). DeiT-style: qkv bias,
# LayerNorm eps 1e-6 (timm's VisionTransformer defaults), cls-token pooling.
SMALL_MODELS: dict[str, dict[str, Any]] = {
    "vit_digits_tiny": dict(img_size=16, patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0),
    "vit_digits_micro": dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0),
}
# Their distilled versions: `VisionTransformerDistilled` with the same configuration (a distillation token beside cls,
# and `head_dist`).
DISTILLED_SUFFIX = "_distilled"
SMALL_DISTILLED = tuple(f"{name}{DISTILLED_SUFFIX}" for name in SMALL_MODELS)

# SViTE's layer-wise token-selection models: the DeiT model plus a global and a per-block `gumbel` scorer (keeping all
# tokens until `apply_token_selection` sets k). Not registered with timm; only `create_model` knows them.
DATA_MODELS = tuple(f"{name}_data" for name in DEIT_MODELS[:3])

MODEL_NAMES = DEIT_MODELS + tuple(SMALL_MODELS) + SMALL_DISTILLED + DATA_MODELS


def default_img_size(name: str) -> int:
    """The input resolution a named model is built for."""
    if name in DATA_MODELS:
        name = name.removesuffix("_data")
    if name in SMALL_DISTILLED:
        name = name.removesuffix(DISTILLED_SUFFIX)
    if name in SMALL_MODELS:
        return SMALL_MODELS[name]["img_size"]
    if name in DEIT_MODELS:
        return int(name.rsplit("_", 1)[1])
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")


DEIT_WIDTHS = {"tiny": 192, "small": 384, "base": 768}


def config_embed_dim(name: str) -> int:
    """The residual width a named model is built with."""
    base = name.removesuffix("_data").removesuffix(DISTILLED_SUFFIX)
    if base in SMALL_MODELS:
        return SMALL_MODELS[base]["embed_dim"]
    if base in DEIT_MODELS or name in DEIT_MODELS:
        return DEIT_WIDTHS[base.split("_")[1]]
    raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    img_size: int | None = None,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    block_heads: Sequence[int] | None = None,
    block_mlp_hidden: Sequence[int] | None = None,
    head_dim: int | None = None,
    embed_dim: int | None = None,
    block_head_dim: Sequence[int] | None = None,
) -> VisionTransformer:
    """Build a randomly initialised ViT (never downloads weights).

    Args:
        name: one of `MODEL_NAMES`.
        num_classes: classifier width.
        img_size: input resolution; the position embedding is sized for it. Defaults to the config's.
        drop_rate: dropout after the position embedding and inside MLP/proj.
        drop_path_rate: stochastic depth, linear from 0 over the blocks.
        block_heads: heads kept in each block (compact models); defaults to the config's head count.
        block_mlp_hidden: MLP hidden width of each block; defaults to mlp_ratio * embed_dim.
        head_dim: width of one head when `block_heads` is given; defaults to embed_dim // num_heads.
        embed_dim: residual width, when it differs from the config's (compact models with pruned embedding
            channels); needs `block_heads` and `head_dim` (or `block_head_dim`), since the config's head count need
            not divide it.
        block_head_dim: width of one head in each block (compact models with pruned head dimensions); overrides
            `head_dim`.
    """
    if name in DATA_MODELS:
        model = create_model(name.removesuffix("_data"), num_classes=num_classes, img_size=img_size,
                             drop_rate=drop_rate, drop_path_rate=drop_path_rate, block_heads=block_heads,
                             block_mlp_hidden=block_mlp_hidden, head_dim=head_dim, embed_dim=embed_dim,
                             block_head_dim=block_head_dim)
        apply_token_selection(model, TokenConfig(enabled=True, selector="layerwise"))
        return model
    kwargs: dict[str, Any] = dict(num_classes=num_classes, drop_rate=drop_rate, drop_path_rate=drop_path_rate)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if embed_dim is not None and embed_dim != config_embed_dim(name):
        if block_heads is None or (head_dim is None and block_head_dim is None):
            raise ValueError("embed_dim needs block_heads and head_dim or block_head_dim (the blocks are rebuilt at "
                             "that width)")
        kwargs.update(embed_dim=embed_dim, num_heads=1)  # resize_blocks sets the real heads below
    if name in DEIT_MODELS:
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif name in SMALL_MODELS:
        model = VisionTransformer(**{**SMALL_MODELS[name], **kwargs})
    elif name in SMALL_DISTILLED:
        model = VisionTransformerDistilled(**{**SMALL_MODELS[name.removesuffix(DISTILLED_SUFFIX)], **kwargs})
    else:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    if block_heads is not None or block_mlp_hidden is not None or block_head_dim is not None:
        resize_blocks(model, block_heads, block_mlp_hidden, head_dim, block_head_dim)
    return model


def resize_blocks(
    model: VisionTransformer,
    block_heads: Sequence[int] | None,
    block_mlp_hidden: Sequence[int] | None,
    head_dim: int | None = None,
    block_head_dim: Sequence[int] | None = None,
) -> None:
    """Give each block its own head count, head width and MLP width, in place, with fresh timm modules.

    The attention keeps its head width unless ``head_dim`` or ``block_head_dim`` (per block) sets it, so a block
    with fewer or narrower heads has a narrower qkv and proj input; dropout settings are carried over from the
    replaced modules.
    """
    depth = len(model.blocks)
    for label, values in (("block_heads", block_heads), ("block_mlp_hidden", block_mlp_hidden),
                          ("block_head_dim", block_head_dim)):
        if values is not None and (len(values) != depth or min(values) < 1):
            raise ValueError(f"{label} needs {depth} positive entries (one per block), got {list(values)}")
    for i, blk in enumerate(model.blocks):
        dim = blk.norm1.normalized_shape[0]
        if block_heads is not None or block_head_dim is not None:
            old: Attention = blk.attn
            blk.attn = Attention(
                dim,
                num_heads=old.num_heads if block_heads is None else block_heads[i],
                attn_head_dim=block_head_dim[i] if block_head_dim is not None else head_dim or old.head_dim,
                qkv_bias=old.qkv.bias is not None,
                attn_drop=old.attn_drop.p,
                proj_drop=old.proj_drop.p,
            )
        if block_mlp_hidden is not None:
            old_mlp: Mlp = blk.mlp
            blk.mlp = Mlp(dim, hidden_features=block_mlp_hidden[i], drop=old_mlp.drop1.p)


def architecture(model: VisionTransformer) -> dict[str, Any]:
    """The per-block shape of a model: enough to rebuild it with `create_model` (saved with compact models)."""
    return {
        "img_size": model.patch_embed.img_size[0],
        "num_classes": model.num_classes,
        "embed_dim": model.embed_dim,
        "depth": len(model.blocks),
        "block_heads": [blk.attn.num_heads for blk in model.blocks],
        "head_dim": model.blocks[0].attn.head_dim,
        "block_head_dim": [blk.attn.head_dim for blk in model.blocks],
        "block_mlp_hidden": [blk.mlp.fc1.out_features for blk in model.blocks],
    }


def count_parameters(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> tuple[int, int]:
    """(all parameters, non-zero parameters as ``models.flops.nonzero_parameters`` counts them, from ``masks`` when
    given)."""
    from models.flops import nonzero_parameters  # models.flops builds on this module

    return sum(p.numel() for p in model.parameters()), nonzero_parameters(model, masks)
