"""Analytic multiply-accumulates (MACs) and parameter counts of timm ViTs: the one counter the project uses.

MACs are per image. Per block b, with embed dim D, n_b tokens entering the block, a_b tokens seen by the attention
(a_b = n_b unless a layer-wise selector drops tokens), h_b heads of width d_b, MLP hidden width m_b and r_b tokens
merged between attention and MLP (token merging; the next block gets n_b - r_b):

    qkv  a_b * D * 3 h_b d_b        QK^T and AV  2 * a_b^2 * h_b * d_b (always dense)
    proj a_b * h_b d_b * D          fc1 + fc2    2 * (n_b - r_b) * D * m_b
    merge similarity |A_b| * |B_b| * d_b, the cosine scores of the two token sets (only where r_b > 0)

plus the patch embedding (patches x C p^2 x D), the head (D x classes, on the pooled token; a distilled model's
``head_dist`` on its distillation token too) and the token scorers (D per scored token). The distillation token is
one more prefix token in every block. Linear layers scale with the tokens, the attention matmuls with their square. Norms,
activations, softmax and biases are not counted (as in timm's and the papers' numbers). With weight densities the
linear layers (patch embedding and head included) are scaled by their density: SViTE's theoretical count.

Three views of one model:

* ``dense``: the architecture without token selection or sparsity.
* ``theoretical``: what the paper reports: the selected token counts (as if dropped) and density-scaled linears.
* ``executed``: what the code really computes: masked weights are still dense matmuls, zero-mode token selection
  keeps the full sequence, drop mode shortens it; the scorers are included.

Dense DeiT-Tiny/Small/Base: 1.254 / 4.599 / 17.564 GMACs (timm: 1.26 / 4.61 / 17.58). SViTE's reported savings
(45.5% for DeiT-S at 50% sparsity, 38.1% for DeiT-B at 40%) are reproduced by scaling the block linears by the
global density and keeping the patch embedding and head dense (``svite_paper_densities``); the ERK densities of all
masked tensors give 46.1% and 38.5%.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer

from models.channel_units import pruned_channels
from models.compact import compact_model
from models.token_merging import block_tokens, max_merges, merge_plan, token_counts
from models.token_selection import TokenScorer, num_tokens
from models.wrappers import unwrap_model
from sparselearning.units import head_dim_group, head_group, units_alive

KINDS = ("dense", "theoretical", "executed")
# A weight that keeps at least this fraction of its entries counts as dense (a trained dense weight is never
# exactly zero anywhere; the margin only absorbs the odd exact zero).
DENSE_FRACTION = 0.99


def is_weight_tensor(name: str, tensor: torch.Tensor) -> bool:
    """SViTE's maskable set: every 2-D / 4-D weight (patch embedding and head included), token scorers excluded."""
    return tensor.dim() in (2, 4) and "gumbel" not in name


@dataclass(frozen=True)
class BlockShape:
    """One transformer block as the counter sees it.

    Args:
        num_heads: h, attention heads.
        head_dim: d, width of one head.
        mlp_hidden: m, MLP hidden width.
        tokens: n, tokens entering the block (the MLP runs on all of them).
        attn_tokens: tokens the attention runs on; None means ``tokens``.
        scorer: a layer-wise token scorer (D -> 1) runs on the block's ``tokens``.
        merged: tokens merged away between attention and MLP (the MLP runs on ``tokens - merged``).
        match_pairs: token pairs whose similarity (width ``head_dim``) the merging scores.
    """

    num_heads: int
    head_dim: int
    mlp_hidden: int
    tokens: int
    attn_tokens: int | None = None
    scorer: bool = False
    merged: int = 0
    match_pairs: int = 0


@dataclass(frozen=True)
class MacCount:
    """MACs per image by layer (``blocks.3.attn.qkv``, ``blocks.3.attn.matmul`` for QK^T + AV, ``head``, ...)."""

    layers: Mapping[str, float]

    @property
    def total(self) -> float:
        return sum(self.layers.values())

    @property
    def attention(self) -> float:
        """The activation matmuls (QK^T and AV; token merging's similarity scores), which weight sparsity does not
        reduce."""
        return sum(v for name, v in self.layers.items() if name.endswith(".matmul"))

    @property
    def linear(self) -> float:
        """Every weight-bearing layer (patch embedding, linears, scorers, head)."""
        return self.total - self.attention


def vit_macs(
    embed_dim: int,
    blocks: Sequence[BlockShape],
    *,
    num_patches: int,
    patch_dim: int,
    num_classes: int,
    global_scorer_tokens: int = 0,
    densities: Mapping[str, float] | None = None,
    distilled: bool = False,
) -> MacCount:
    """MACs per image of a ViT from explicit numbers (a pure function).

    Args:
        embed_dim: D.
        blocks: one ``BlockShape`` per block, in order.
        num_patches: patches embedded per image (196 at 224 px, patch 16).
        patch_dim: inputs per patch, C * p * p (768 for RGB 16x16).
        num_classes: head outputs (0: no head).
        global_scorer_tokens: tokens scored by a global selector (0: none).
        densities: weight FQN (``blocks.0.attn.qkv.weight``, ``patch_embed.proj.weight``, ``head.weight``, ...)
            -> density in [0, 1]; missing names are dense.
        distilled: a second head (DeiT's ``head_dist``, D x classes) on the distillation token.

    Raises:
        ValueError: for a density outside [0, 1] or one naming no counted layer (e.g. a ``module.`` prefix).
    """
    if min(embed_dim, num_patches, patch_dim) < 1 or num_classes < 0 or global_scorer_tokens < 0:
        raise ValueError("embed_dim, num_patches and patch_dim must be positive; num_classes and tokens >= 0")
    for b in blocks:
        if (min(b.num_heads, b.head_dim, b.mlp_hidden, b.tokens) < 1 or not 1 <= (b.attn_tokens or 1) <= b.tokens
                or not 0 <= b.merged < b.tokens or b.match_pairs < 0):
            raise ValueError(f"block sizes and token counts must be positive, attn_tokens <= tokens, 0 <= merged < "
                             f"tokens; got {b}")
    dim = embed_dim
    macs: dict[str, float] = {"patch_embed.proj": num_patches * patch_dim * dim}
    if global_scorer_tokens:
        macs["gumbel"] = global_scorer_tokens * dim
    for i, b in enumerate(blocks):
        n = b.tokens
        a = n if b.attn_tokens is None else b.attn_tokens
        inner = b.num_heads * b.head_dim
        if b.scorer:
            macs[f"blocks.{i}.attn.gumbel"] = n * dim
        macs[f"blocks.{i}.attn.qkv"] = a * dim * 3 * inner
        macs[f"blocks.{i}.attn.matmul"] = 2 * a * a * inner
        macs[f"blocks.{i}.attn.proj"] = a * inner * dim
        if b.match_pairs:
            macs[f"blocks.{i}.tome.matmul"] = b.match_pairs * b.head_dim
        macs[f"blocks.{i}.mlp.fc1"] = (n - b.merged) * dim * b.mlp_hidden
        macs[f"blocks.{i}.mlp.fc2"] = (n - b.merged) * b.mlp_hidden * dim
    if num_classes:
        macs["head"] = dim * num_classes
        if distilled:
            macs["head_dist"] = dim * num_classes
    for name, density in (densities or {}).items():
        layer = name.removesuffix(".weight")
        if layer not in macs or layer.endswith(".matmul") or not name.endswith(".weight"):
            raise ValueError(f"density given for {name!r}, which is not the weight of a counted layer "
                             f"(e.g. {', '.join(list(macs)[:3])}, with '.weight')")
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density of {name!r} must be in [0, 1], got {density}")
        macs[layer] *= density
    return MacCount(macs)


def block_shapes(model: nn.Module, kind: str = "executed", merges: Sequence[int] | None = None) -> list[BlockShape]:
    """Per-block shapes and token counts of a live timm ViT, read from its modules and installed selectors.

    Args:
        model: a timm ``VisionTransformer`` (wrappers are unwrapped), possibly with token selectors and merging.
        kind: ``dense`` (full sequence, no scorers, no merging), ``theoretical`` (selected tokens as if dropped) or
            ``executed`` (what runs: zero mode keeps the full sequence, drop mode shortens it). Token merging
            shortens the sequence in both of the latter.
        merges: per-block r to count instead of the installed merging (to plan a schedule); checked like
            ``apply_token_merging`` checks it.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown MAC count kind {kind!r}; choose from {', '.join(KINDS)}")
    net = _vit(model)
    n, _ = num_tokens(net)
    selecting = kind != "dense"
    glob = getattr(net, "gumbel", None)
    if selecting and isinstance(glob, TokenScorer) and (kind == "theoretical" or glob.mode == "drop"):
        n = glob.keep_count(n)
    prefix = net.num_prefix_tokens
    if merges is not None:
        if len(merges) != len(net.blocks):
            raise ValueError(f"merges needs one r per block ({len(net.blocks)}), got {list(merges)}")
        token_counts(block_tokens(net), prefix, merges)  # raises for an r the sequence cannot merge
    merges = (merges if merges is not None else merge_plan(net) if selecting else None) or (0,) * len(net.blocks)
    shapes = []
    for blk, r in zip(net.blocks, merges):
        attn = blk.attn
        scorer = getattr(attn, "gumbel", None) if selecting else None
        scorer = scorer if isinstance(scorer, TokenScorer) else None
        a = n
        if scorer is not None and (kind == "theoretical" or scorer.mode == "drop"):
            a = scorer.keep_count(n)
        rest = n - prefix  # merging splits the non-prefix tokens alternately into sets A and B
        pairs = (rest + 1) // 2 * (rest // 2) if r else 0
        shapes.append(BlockShape(attn.num_heads, attn.head_dim, blk.mlp.fc1.out_features, n, a, scorer is not None,
                                 merged=r, match_pairs=pairs))
        n -= r
    return shapes


def count_macs(model: nn.Module, kind: str = "executed", densities: Mapping[str, float] | None = None,
               merges: Sequence[int] | None = None) -> MacCount:
    """MACs per image of a live timm ViT.

    Args:
        model: a timm ``VisionTransformer`` (wrappers are unwrapped), possibly with token selectors and merging.
        kind: ``dense``, ``theoretical`` or ``executed`` (see the module docstring).
        densities: ``theoretical`` only: weight FQN -> density; default: the measured non-zero fraction of every
            weight (``weight_densities``), which is the mask density of a masked model and 1 for a dense one.
        merges: per-block r to count instead of the installed merging (see ``block_shapes``).
    """
    shapes = block_shapes(model, kind, merges)
    if densities is not None and kind != "theoretical":
        raise ValueError(f"densities only apply to theoretical MACs; {kind} MACs count dense matmuls")
    net = _vit(model)
    if kind == "theoretical" and densities is None:
        densities = weight_densities(net)
    glob = getattr(net, "gumbel", None)
    head = net.head
    return vit_macs(
        net.embed_dim, shapes, num_patches=net.patch_embed.num_patches,
        patch_dim=math.prod(net.patch_embed.proj.weight.shape[1:]),
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0,
        global_scorer_tokens=num_tokens(net)[0] if kind != "dense" and isinstance(glob, TokenScorer) else 0,
        densities=densities, distilled=isinstance(getattr(net, "head_dist", None), nn.Linear),
    )


def merges_for_macs(model: nn.Module, target: float) -> tuple[int, ...]:
    """The per-block r whose executed MACs come closest to ``target`` MACs per image (e.g. another mode's).

    The candidates, in order of growing merges: R in every block, with one more in the first j blocks (j = 0 ...
    depth - 1; front-loaded, as merging early saves the most). Their MACs fall with every step, so the search walks
    them until it passes ``target`` and keeps the closer neighbour (the one with fewer merges on a tie).

    Args:
        model: the timm ViT to merge in (with its token selector, if any, and without merging installed).
        target: MACs per image to hit.
    """
    net = _vit(model)
    depth = len(net.blocks)
    best, best_gap = (0,) * depth, abs(count_macs(net, merges=(0,) * depth).total - target)
    for total in range(1, depth * max_merges(block_tokens(net), net.num_prefix_tokens) + 1):
        r, j = divmod(total, depth)
        merges = (r + 1,) * j + (r,) * (depth - j)
        try:
            macs = count_macs(net, merges=merges).total
        except ValueError:  # the sequence cannot merge this many
            break
        if abs(macs - target) < best_gap:
            best, best_gap = merges, abs(macs - target)
        if macs < target:
            break
    return best


def mac_summary(model: nn.Module, densities: Mapping[str, float] | None = None) -> dict[str, float]:
    """The numbers an evaluation summary prints: GMACs per image (dense / theoretical / executed) and parameters.

    Args:
        model: the evaluated model.
        densities: for the theoretical count; default: measured from the weights' zeros (see ``mac_views``).

    Returns:
        ``gmacs_dense``, ``gmacs_theoretical``, ``gmacs_executed``, ``params`` and ``params_nonzero``: the
        ``mac_views`` numbers, so every summary counts alike.
    """
    v = mac_views(model, densities)
    return {"gmacs_dense": v["dense"] / 1e9, "gmacs_theoretical": v["theoretical"] / 1e9,
            "gmacs_executed": v["executed"] / 1e9, "params": v["params"], "params_nonzero": v["params_nonzero"]}


def structured_form(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> nn.Module | None:
    """The compact model of a structured-sparse ViT, or None when it is not one.

    Structured means whole heads, head dimensions, MLP neurons or embedding channels are removed (their q/k/v or fc1
    rows, or every entry a channel owns, are zero, or masked off when ``masks`` is given) and the surviving units are
    dense: the pattern S²ViTE and global pruning train. A model with scattered zeros
    that happen to empty a row is unstructured, and its count stays per weight.
    """
    net = unwrap_model(model)
    if not isinstance(net, VisionTransformer) or not _has_removed_unit(net, masks or {}):
        return None
    compact = compact_model(net, masks)
    survivors = [w for blk in compact.blocks for w in (blk.attn.qkv.weight, blk.mlp.fc1.weight)]
    live = sum(int(w.count_nonzero()) for w in survivors) / sum(w.numel() for w in survivors)
    return compact if live >= DENSE_FRACTION else None


def nonzero_parameters(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> int:
    """The project's one count of non-zero parameters: what remains once sparsity's removals are dropped.

    Every parameter counts except weight entries that are zero (or masked off, when ``masks`` is given: a weight
    regrown at zero is active); for a structured-sparse model, the parameters of its compact form, so a removed
    head's or neuron's biases and its ``proj``/``fc2`` columns do not count either. The sparsifiers' records
    (``nonzero_parameters`` in log.txt) count the same, from their masks.
    """
    net = unwrap_model(model)
    compact = structured_form(net, masks)
    if compact is not None:
        return sum(p.numel() for p in compact.parameters())
    masks = masks or {}
    return sum(int(masks[name].sum()) if name in masks else int(p.count_nonzero()) if is_weight_tensor(name, p)
               else p.numel() for name, p in net.named_parameters())


def _has_removed_unit(net: VisionTransformer, masks: Mapping[str, torch.Tensor]) -> bool:
    """Whether some block has a head whose q, k and v rows are all inactive, or a head dimension that is in every
    head, or an fc1 row that is, or some embedding channel is inactive everywhere (global pruning)."""
    if pruned_channels(net, masks or None) is not None:
        return True
    for i, blk in enumerate(net.blocks):
        qkv, fc1 = blk.attn.qkv.weight, blk.mlp.fc1.weight
        qkv_alive = masks.get(f"blocks.{i}.attn.qkv.weight", qkv.ne(0))
        fc1_alive = masks.get(f"blocks.{i}.mlp.fc1.weight", fc1.ne(0))
        attn = blk.attn
        heads = units_alive(qkv_alive, head_group(f"blocks.{i}.attn", attn.num_heads, attn.head_dim).primary,
                            attn.num_heads)
        dims = units_alive(qkv_alive, head_dim_group(f"blocks.{i}.attn", attn.num_heads, attn.head_dim).primary,
                           attn.head_dim)
        if not bool(heads.all()) or not bool(dims.all()) or not bool(fc1_alive.any(dim=1).all()):
            return True
    return False


def weight_densities(model: nn.Module) -> dict[str, float]:
    """Measured non-zero fraction of every 2-D / 4-D weight except the token scorers (the maskable set)."""
    return {name: p.count_nonzero().item() / p.numel() for name, p in unwrap_model(model).named_parameters()
            if is_weight_tensor(name, p)}


def mac_views(model: nn.Module, densities: Mapping[str, float] | None = None,
              reference: nn.Module | None = None) -> dict[str, float]:
    """Params and MACs per image of a model as evaluated, in every view an evaluation summary reports.

    Args:
        model: the model as it runs (masked, compact, token-selecting).
        densities: per-weight densities (e.g. a planned ERK distribution) for the theoretical count and the non-zero
            params; default: measured from the weights' zeros (``nonzero_parameters``).
        reference: the full dense architecture to measure savings against (for a compact ``model``); default:
            ``model`` itself.

    Returns:
        ``params_dense`` (of the reference), ``params``, ``params_nonzero``, ``global_density`` (the
        parameter-weighted density of the maskable weights, SViTE's ``--density``) and MACs: ``dense`` (the
        reference without selection), ``theoretical`` (SViTE: density-scaled linears, dense attention matmuls,
        selected token count; a structured model's removed heads and neurons count as its compact form drops them),
        ``paper`` (only the block linears scaled, by the global density: how SViTE's reported
        savings come out, 45.5% for DeiT-S at 50%) and ``executed`` (masked weights and zeroed tokens at the dense
        price; compact blocks and dropped tokens really save).
    """
    net = _vit(model)
    measured: VisionTransformer = net
    if densities is None:
        total, nonzero = sum(p.numel() for p in net.parameters()), nonzero_parameters(net)
        measured = structured_form(net) or net  # removed heads and neurons cost nothing, as in the compact model
        densities = weight_densities(measured)
    else:
        total, nonzero = expected_parameters(net, densities)
    maskable = sum(p.numel() for name, p in net.named_parameters() if is_weight_tensor(name, p))
    density = sum(densities.get(name, 1.0) * p.numel() for name, p in measured.named_parameters()
                  if is_weight_tensor(name, p)) / max(maskable, 1)
    full = _vit(reference) if reference is not None else net
    return {
        "params_dense": float(sum(p.numel() for p in full.parameters())),
        "params": float(total),
        "params_nonzero": float(nonzero),
        "global_density": density,
        "dense": count_macs(full, "dense").total,
        "theoretical": count_macs(measured, "theoretical", densities).total,
        "paper": count_macs(net, "theoretical", svite_paper_densities(len(net.blocks), density)).total,
        "executed": count_macs(net, "executed").total,
    }


def mac_report(model: nn.Module, densities: Mapping[str, float] | None = None,
               reference: nn.Module | None = None) -> list[str]:
    """``mac_views`` as the lines of an evaluation summary."""
    v = mac_views(model, densities, reference)
    labels = (("theoretical", "theoretical (SViTE: per-layer densities, dense attention matmuls, selected tokens)"),
              ("paper", f"paper convention (block linears at the global density {v['global_density']:.4f})"),
              ("executed", "executed (what runs: masked weights and zeroed tokens cost the dense price)"))
    lines = [f"params: {v['params_dense']:,.0f} dense, {v['params']:,.0f} in this model, {v['params_nonzero']:,.0f} "
             f"non-zero ({v['params_nonzero'] / v['params_dense']:.4f} of dense)",
             f"GMACs per image: dense {v['dense'] / 1e9:.4g}"]
    lines += [f"  {label}: {v[key] / 1e9:.4g} (saving {1 - v[key] / v['dense']:.2%})" for key, label in labels]
    return lines


def mask_densities(masks: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """FQN -> density of boolean masks (e.g. ``Masking.masks``)."""
    return {name: mask.float().mean().item() for name, mask in masks.items()}


def svite_paper_densities(depth: int, density: float) -> dict[str, float]:
    """The convention behind SViTE's reported savings: block linears at the global density, the rest dense."""
    return {f"blocks.{i}.{layer}.weight": density for i in range(depth)
            for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


def expected_parameters(model: nn.Module, densities: Mapping[str, float]) -> tuple[int, int]:
    """(all parameters, non-zero parameters if each named tensor had round(density * numel) non-zeros)."""
    params = dict(unwrap_model(model).named_parameters())
    unknown = set(densities) - params.keys()
    if unknown:
        raise ValueError(f"densities name parameters the model does not have: {sorted(unknown)[:5]}")
    total = sum(p.numel() for p in params.values())
    nonzero = sum(round(densities[name] * p.numel()) if name in densities else p.numel() for name, p in params.items())
    return total, nonzero


def _vit(model: nn.Module) -> VisionTransformer:
    net = unwrap_model(model)
    if not isinstance(net, VisionTransformer):
        raise ValueError(f"the MAC counter reads timm VisionTransformer models, got {type(net).__name__}")
    return net
