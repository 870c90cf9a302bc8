"""What a ViT state_dict really is, read from its keys and its weights alone.

Keys tell whether a token selector was trained (``gumbel.*`` globally, ``blocks.{i}.attn.gumbel.*`` per block) and
whether blocks are physically smaller than the named model (compact). Weights tell the sparsity: whole zero heads
(the q, k and v row blocks of a head all zero), zero head dimensions (row j of every head's q, k and v all zero), or
zero ``fc1`` rows with dense survivors mean structured sparsity;
scattered zeros mean unstructured sparsity. File names, flags and masks can claim anything; these numbers cannot.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from models.channel_units import channels_alive, embedding_group, unsupported_channels
from models.flops import DENSE_FRACTION, is_weight_tensor
from models.vit import MODEL_NAMES, architecture, create_model
from sparselearning.units import head_dim_group, head_group, heads_in_qkv, neuron_group, select_units, units_alive

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclass(frozen=True)
class Detection:
    """The facts ``detect`` establishes about one state_dict, for one ``--model``.

    Attributes:
        selector: ``global``, ``layerwise`` or None (no token scorer in the file).
        img_size, num_classes: from the position embedding and the classifier.
        num_heads, head_dim, mlp_hidden: the full model's per-block sizes (heads come from ``--model``).
        block_heads, block_mlp: heads and MLP neurons each block really has: non-zero units of a masked model,
            or the physical sizes of a compact one.
        block_head_dim: the head width each block really has: its non-zero head dimensions (global pruning's
            ``--prune-head-dim``); a compact file's narrower heads are read from its recorded architecture, since
            its ``qkv`` rows (3 x heads x width) do not tell heads from width.
        compact: blocks or the embedding are physically smaller than ``--model``'s.
        structured: whole heads, neurons or embedding channels (global pruning) are zero and the surviving units
            are dense.
        weight_density: non-zero fraction over the maskable weights (2-D/4-D, scorers excluded).
        embed_dim, embed_kept: the full model's embedding width, and the channels the file really has (non-zero
            channels of a masked model, the physical width of a compact one).
        unstructured: scattered zeros (density below 0.99 without the structured pattern).
    """

    selector: str | None
    img_size: int
    num_classes: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    block_heads: tuple[int, ...]
    block_mlp: tuple[int, ...]
    compact: bool
    structured: bool
    weight_density: float
    unstructured: bool
    embed_dim: int = 0
    embed_kept: int = 0
    block_head_dim: tuple[int, ...] = ()

    def lines(self) -> list[str]:
        """Human-readable findings, one per line."""
        depth = len(self.block_heads)
        out = [{None: "token selector: none",
                "global": "token selector: global (gumbel.weight / gumbel.bias)",
                "layerwise": "token selector: layer-wise (gumbel.* and blocks.{i}.attn.gumbel.*)"}[self.selector]]
        units = (f"heads per block {list(self.block_heads)} of {self.num_heads}, "
                 f"MLP neurons {list(self.block_mlp)} of {self.mlp_hidden}")
        if any(d < self.head_dim for d in self.block_head_dim):
            units += f", head dims {list(self.block_head_dim)} of {self.head_dim}"
        if self.compact:
            out.append(f"compact shapes: {units}")
        elif self.structured:
            out.append(f"structured sparsity (zero heads / neurons, dense survivors): {units}")
        if self.embed_kept < self.embed_dim:
            out.append(f"embedding channels: {self.embed_kept} of {self.embed_dim} kept"
                       + ("" if self.compact else " (the residual LayerNorms normalise over the kept ones)"))
        if self.unstructured:
            out.append(f"unstructured sparsity: {1 - self.weight_density:.2%} of the maskable weights are zero "
                       f"(density {self.weight_density:.4f})")
        if not (self.compact or self.structured or self.unstructured):
            out.append(f"dense weights ({self.weight_density:.4f} of the maskable weights are non-zero)")
        out.append(f"{depth} blocks, {self.img_size} px input, {self.num_classes} classes")
        return out


def selector_kind(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """``layerwise``, ``global`` or None, from the scorer keys."""
    if any(re.match(r"^blocks\.\d+\.attn\.gumbel\.", key) for key in state_dict):
        return "layerwise"
    return "global" if "gumbel.weight" in state_dict else None


def check_fits(state_dict: Mapping[str, torch.Tensor], model_name: str) -> None:
    """Raise a ValueError listing the first mismatching keys (both shapes) unless ``state_dict`` is a ``model_name``
    model: the same keys and shapes, where blocks may be compact and the classifier and resolution may differ; the
    message names the models that do fit, if any."""
    problems = mismatches(state_dict, model_name)
    if not problems:
        return
    fits = [name for name in MODEL_NAMES if name != model_name and not name.endswith("_data")
            and not mismatches(state_dict, name)]
    hint = f"; the weights fit --model {' or '.join(fits)}" if fits else "; no known --model fits these weights"
    raise ValueError(f"the checkpoint does not fit --model {model_name}: " + "; ".join(problems[:6]) + hint)


def mismatches(state_dict: Mapping[str, torch.Tensor], model_name: str) -> list[str]:
    """Differences between ``state_dict`` and ``model_name`` (empty if it fits), scorer keys ignored."""
    if "patch_embed.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        return [f"not a ViT state_dict (no patch_embed.proj.weight / pos_embed; keys start {list(state_dict)[:4]})"]
    try:
        reference = _meta_model(model_name, state_dict).state_dict()
    except (ValueError, AssertionError, RuntimeError) as e:
        return [f"{model_name} cannot be built at this checkpoint's resolution: {e}"]
    problems = []
    for key, ref in reference.items():
        if "gumbel" in key:
            continue
        if key not in state_dict:
            problems.append(f"missing key {key} (model {tuple(ref.shape)})")
        elif not _shape_fits(key, tuple(state_dict[key].shape), tuple(ref.shape)):
            problems.append(f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(ref.shape)}")
    problems += [f"unexpected key {key}" for key in state_dict if key not in reference and "gumbel" not in key]
    return problems


def detect(state_dict: Mapping[str, torch.Tensor], model_name: str,
           recorded: Mapping[str, Any] | None = None) -> Detection:
    """Detect selector, compact shapes and sparsity of a state_dict that ``check_fits`` accepted for ``model_name``;
    ``recorded`` is the architecture a compact file records (``models.compact_architecture``), whose per-block head
    widths the weights alone do not tell."""
    meta = _meta_model(model_name, state_dict)
    arch = architecture(meta)
    heads, head_dim = arch["block_heads"][0], arch["head_dim"]
    hidden = arch["block_mlp_hidden"][0]
    depth = arch["depth"]
    widths = list((recorded or {}).get("block_head_dim") or [head_dim] * depth)
    block_heads, block_mlp, block_head_dim, survivors_dense, some_unit_zero = [], [], [], True, False
    width = state_dict["patch_embed.proj.weight"].shape[0]
    compact = width != arch["embed_dim"]
    channels = pruned_channels_of(meta, state_dict) if not compact else None
    some_unit_zero = channels is not None
    for i in range(depth):
        qkv, fc1 = state_dict[f"blocks.{i}.attn.qkv.weight"], state_dict[f"blocks.{i}.mlp.fc1.weight"]
        width = widths[i]
        if qkv.shape[0] % (3 * width):
            raise ValueError(f"blocks.{i}.attn.qkv.weight has {qkv.shape[0]} rows, not 3 x heads x {width}: a "
                             "compact model with narrower heads, whose widths only its recorded architecture holds; "
                             "read it from its compact.pth or export directory")
        kept_heads = heads_in_qkv(qkv.shape[0], width)
        compact |= kept_heads != heads or width != head_dim or fc1.shape[0] != hidden
        head_spec = head_group(f"blocks.{i}.attn", kept_heads, width).primary
        dim_spec = head_dim_group(f"blocks.{i}.attn", kept_heads, width).primary
        neuron_spec = neuron_group(f"blocks.{i}.mlp", fc1.shape[0]).primary
        head_alive = units_alive(qkv, head_spec, kept_heads)
        dim_alive = units_alive(qkv, dim_spec, width)
        row_alive = units_alive(fc1, neuron_spec, fc1.shape[0])
        block_heads.append(int(head_alive.sum()))
        block_head_dim.append(int(dim_alive.sum()))
        block_mlp.append(int(row_alive.sum()))
        some_unit_zero |= not bool(head_alive.all()) or not bool(dim_alive.all()) or not bool(row_alive.all())
        live_heads = select_units(qkv, head_spec, kept_heads, head_alive.nonzero().flatten())
        live_dims = head_dim_group(f"blocks.{i}.attn", int(head_alive.sum()), width).primary
        for live in (select_units(live_heads, live_dims, width, dim_alive.nonzero().flatten()),
                     select_units(fc1, neuron_spec, fc1.shape[0], row_alive.nonzero().flatten())):
            live = live if channels is None else live.index_select(1, channels)  # a pruned channel's column is zero
            if live.numel() and live.ne(0).float().mean().item() < DENSE_FRACTION:
                survivors_dense = False
    total = nonzero = 0
    for name, tensor in state_dict.items():
        if is_weight_tensor(name, tensor):
            total += tensor.numel()
            nonzero += int(tensor.count_nonzero())
    density = nonzero / max(total, 1)
    structured = some_unit_zero and survivors_dense and not compact
    return Detection(
        selector=selector_kind(state_dict), img_size=arch["img_size"], num_classes=arch["num_classes"],
        num_heads=heads, head_dim=head_dim, mlp_hidden=hidden, block_heads=tuple(block_heads),
        block_mlp=tuple(block_mlp), compact=compact, structured=structured, weight_density=density,
        unstructured=not structured and density < DENSE_FRACTION, embed_dim=arch["embed_dim"],
        embed_kept=width if channels is None else channels.numel(), block_head_dim=tuple(block_head_dim),
    )


def pruned_channels_of(meta: torch.nn.Module, state_dict: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The kept embedding channels (int64) of a full-width ``state_dict`` when some are all zero, else None (also
    for models whose embedding channels cannot be pruned); ``meta`` is the model it fits."""
    if unsupported_channels(meta):
        return None
    alive = channels_alive(embedding_group(meta), state_dict)
    return None if bool(alive.all()) else alive.nonzero().flatten()


def _meta_model(model_name: str, state_dict: Mapping[str, torch.Tensor]):
    """``model_name`` without memory, at the checkpoint's resolution and classifier width."""
    patch = state_dict["patch_embed.proj.weight"].shape[-1]
    prefix = ("cls_token" in state_dict) + ("dist_token" in state_dict)  # DeiT's distillation token is a prefix too
    side = round((state_dict["pos_embed"].shape[1] - prefix) ** 0.5)
    head = state_dict.get("head.weight")
    with torch.device("meta"):
        return create_model(model_name.removesuffix("_data"), num_classes=head.shape[0] if head is not None else 0,
                            img_size=side * patch)


def _shape_fits(key: str, have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Equal shapes, or a compact block's narrower qkv / proj / MLP (same embedding width)."""
    if have == want:
        return True
    if not _BLOCK.match(key) or len(have) != len(want):
        return False
    if key.endswith(("attn.qkv.weight", "attn.qkv.bias", "mlp.fc1.weight", "mlp.fc1.bias")):
        return have[0] <= want[0] and have[1:] == want[1:]
    if key.endswith(("attn.proj.weight", "mlp.fc2.weight")):
        return have[0] == want[0] and have[1] <= want[1]
    return False
