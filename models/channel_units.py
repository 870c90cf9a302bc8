"""The embedding dimension of a timm ViT as one unit group: which tensor entries a residual channel owns, how the masked
model normalises over the kept channels, and how compaction removes channels.

A residual channel c is entry c of everything that writes the residual stream (patch embedding, cls, distillation and
position tokens, every ``proj`` and ``fc2`` output), of every LayerNorm over it, and of everything that reads it
(``qkv``, ``fc1`` and classifier inputs). Masking all of them keeps channel c of the stream at exactly zero.

LayerNorm is the one place where a zero channel is not silent: its mean and variance run over all D channels, so a
zeroed channel shifts the statistics of the kept ones, and a compact model (LayerNorm over D' channels) would compute
something else. The masked model is therefore defined to normalise over its kept channels only: once a channel is
pruned, every residual LayerNorm gets a forward hook that recomputes its output as ``F.layer_norm`` over the kept
channels (zeros elsewhere). That is exactly what the compact model's ``nn.LayerNorm(D')`` computes, so compaction is
exact. With every channel kept no hook is installed, so unpruned models compute bit-identically.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from models.wrappers import unwrap_model
from sparselearning.units import UnitGroup, channel_group, units_alive

EMBED_GROUP = "embed"
"""The name of the channel group (keys scores, masks records and the global ranking)."""
_KEPT = "_kept_channels"


def _vit(model: nn.Module) -> VisionTransformer:
    net = unwrap_model(model)
    if not isinstance(net, VisionTransformer):
        raise ValueError(f"embedding-channel pruning needs a timm VisionTransformer, got {type(net).__name__}")
    return net


def unsupported_channels(net: VisionTransformer) -> list[str]:
    """What in ``net``'s residual stream the channel units do not cover (empty when its channels can be pruned)."""
    problems = []
    if getattr(net, "reg_token", None) is not None:
        problems.append("register tokens")
    if getattr(net, "pos_embed", None) is None or getattr(net, "cls_token", None) is None:
        problems.append("no cls token or position embedding")
    if getattr(net, "attn_pool", None) is not None:
        problems.append("attention pooling")
    if not isinstance(getattr(net, "norm_pre", nn.Identity()), nn.Identity):
        problems.append("norm_pre")
    if not isinstance(getattr(net.patch_embed, "norm", nn.Identity()), nn.Identity):
        problems.append("patch_embed.norm")
    if any("gumbel" in name for name, _ in net.named_modules()):
        problems.append("token scorers")
    for i, blk in enumerate(net.blocks):
        problems += [f"blocks.{i}.{ls} (LayerScale)" for ls in ("ls1", "ls2")
                     if not isinstance(getattr(blk, ls, nn.Identity()), nn.Identity)]
    problems += [f"{name} is {type(norm).__name__}" for name, norm in _norms(net) if not isinstance(norm, nn.LayerNorm)]
    return problems


def _norms(net: VisionTransformer) -> list[tuple[str, nn.Module]]:
    norms = [(f"blocks.{i}.norm{k}", getattr(blk, f"norm{k}")) for i, blk in enumerate(net.blocks) for k in (1, 2)]
    norms.append(("norm", net.norm))
    if not isinstance(net.fc_norm, nn.Identity):
        norms.append(("fc_norm", net.fc_norm))
    return norms


def residual_norms(model: nn.Module) -> list[tuple[str, nn.LayerNorm]]:
    """(FQN, module) of every LayerNorm over the residual stream: each block's ``norm1`` and ``norm2``, the final
    ``norm`` and, with average pooling, ``fc_norm``.

    Raises:
        ValueError: for a model whose residual stream passes through something the channel units do not cover (register
            tokens, a pre-norm, LayerScale, attention pooling, a token scorer, a non-LayerNorm norm).
    """
    net = _vit(model)
    problems = unsupported_channels(net)
    if problems:
        raise ValueError(f"cannot prune the embedding dimension of this model: {', '.join(problems)}; only timm "
                         "ViTs/DeiTs with cls-token pooling, LayerNorm and no LayerScale are supported")
    return _norms(net)


def embedding_group(model: nn.Module) -> UnitGroup:
    """The residual channels of a timm ViT as one ``UnitGroup`` (kind ``channel``, named ``embed``)."""
    net = _vit(model)
    params = dict(net.named_parameters())
    slices: list[tuple[str, int, str]] = [("patch_embed.proj.weight", 0, "in")]
    if "patch_embed.proj.bias" in params:
        slices.append(("patch_embed.proj.bias", 0, "bias"))
    slices += [(token, 2, "in") for token in ("cls_token", "dist_token", "pos_embed") if token in params]
    for name, _ in residual_norms(net):
        slices += [(f"{name}.{p}", 0, role) for p, role in (("weight", "in"), ("bias", "bias"))
                   if f"{name}.{p}" in params]
    for i in range(len(net.blocks)):
        for writer in (f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc2"):
            slices.append((f"{writer}.weight", 0, "in"))
            if f"{writer}.bias" in params:
                slices.append((f"{writer}.bias", 0, "bias"))
        slices += [(f"blocks.{i}.attn.qkv.weight", 1, "out"), (f"blocks.{i}.mlp.fc1.weight", 1, "out")]
    slices += [(f"{head}.weight", 1, "out") for head in ("head", "head_dist")
               if isinstance(getattr(net, head, None), nn.Linear)]
    return channel_group(EMBED_GROUP, net.embed_dim, slices)


# ------------------------------------------------------------------------------------------------ kept-channel norms


def _kept_channel_norm(module: nn.LayerNorm, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the LayerNorm over the kept channels only, zeros at the pruned ones (see the module docstring)."""
    kept = getattr(module, _KEPT)
    x = args[0]
    if kept.device != x.device:  # the model moved: the index follows
        kept = kept.to(x.device)
        setattr(module, _KEPT, kept)
    weight = None if module.weight is None else module.weight.index_select(0, kept)
    bias = None if module.bias is None else module.bias.index_select(0, kept)
    normed = F.layer_norm(x.index_select(-1, kept), (kept.numel(),), weight, bias, module.eps)
    return output.new_zeros(output.shape).index_copy(-1, kept, normed.to(output.dtype))


def set_kept_channels(model: nn.Module, active: torch.Tensor) -> None:
    """Make every residual LayerNorm of ``model`` normalise over the channels where ``active`` (bool [D]) is True:
    hooks are installed where some channel is pruned, removed where none is."""
    kept = active.nonzero().flatten().cpu()
    if kept.numel() == 0:
        raise ValueError("every embedding channel is pruned: the residual stream would be empty")
    pruned = kept.numel() < active.numel()
    for _, norm in residual_norms(model):
        hooks = [key for key, hook in norm._forward_hooks.items() if hook is _kept_channel_norm]
        if pruned:
            setattr(norm, _KEPT, kept.to(norm.weight.device if norm.weight is not None else "cpu"))
            if not hooks:
                norm.register_forward_hook(_kept_channel_norm)
        else:
            for key in hooks:
                del norm._forward_hooks[key]
            if hasattr(norm, _KEPT):
                delattr(norm, _KEPT)


def restore_kept_channels(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None,
                          tensors: Mapping[str, torch.Tensor] | None = None) -> int | None:
    """Give a model restored from a file the kept-channel LayerNorms its training computed with; returns the kept
    channel count when some channel is pruned, else None (nothing is installed: unpruned models run unhooked).

    The hooks are not in any state_dict, so every reader that rebuilds a masked model (evaluation, export, the EMA, a
    teacher, ``--finetune``, a resume) calls this after loading the weights. The kept channels come from the saved
    ``masks`` where the file stores them, else from the weights' zero pattern: every entry a pruned channel owns is
    masked to zero during training, while a kept channel owns nonzero LayerNorm and patch-embedding entries.
    ``tensors`` reads that pattern from a file's state_dict instead of the model (``--finetune`` re-initialises
    a classifier of another width)."""
    net = unwrap_model(model)
    if not isinstance(net, VisionTransformer) or unsupported_channels(net):
        return None
    alive = channels_alive(embedding_group(net), dict(net.named_parameters()) if tensors is None else tensors, masks)
    if bool(alive.all()):
        return None
    set_kept_channels(net, alive)
    return int(alive.sum())


def kept_channels(model: nn.Module) -> torch.Tensor:
    """Bool [D]: the channels the residual LayerNorms of ``model`` normalise over (all, when no hook is installed)."""
    net = _vit(model)
    active = torch.ones(net.embed_dim, dtype=torch.bool)
    kept = getattr(net.norm, _KEPT, None)
    if kept is not None:
        active[:] = False
        active[kept.cpu()] = True
    return active


# ------------------------------------------------------------------------------------------------ compaction


def channels_alive(group: UnitGroup, tensors: Mapping[str, torch.Tensor],
                   masks: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Bool [D]: whether each channel of ``group`` owns an active entry anywhere: a set mask where ``masks`` has the
    tensor, else a nonzero entry of ``tensors`` (a model's parameters or a state_dict)."""
    alive = torch.zeros(group.num_units, dtype=torch.bool)
    for spec in group.slices:
        mask = None if masks is None else masks.get(spec.param)
        if mask is None and spec.param not in tensors:  # e.g. a file without a classifier
            continue
        entries = mask if mask is not None else tensors[spec.param].detach().ne(0)
        alive |= units_alive(entries, spec, group.num_units).cpu()
    return alive


def pruned_channels(model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor | None:
    """The kept channel indices (int64) when some embedding channel of ``model`` is pruned, else None (also for
    models whose embedding cannot be pruned). A channel is kept if it owns an active entry anywhere: a set mask when
    ``masks`` has the tensor, else a nonzero entry."""
    net = unwrap_model(model)
    if not isinstance(net, VisionTransformer) or unsupported_channels(net):
        return None
    alive = channels_alive(embedding_group(net), dict(net.named_parameters()), masks)
    if bool(alive.all()):
        return None
    if not bool(alive.any()):
        raise ValueError("every embedding channel of the model is pruned: the residual stream is empty")
    return alive.nonzero().flatten()


@torch.no_grad()
def compact_channels(model: nn.Module, kept: torch.Tensor) -> None:
    """Remove every embedding channel not in ``kept`` (int64 indices) from ``model``, in place: each tensor a channel
    owns keeps the kept entries, in order, and the residual LayerNorms become ``nn.LayerNorm`` over the kept channels
    (no hook), so the result computes what the kept-channel norms computed. Masked entries must already be zero."""
    net = _vit(model)
    modules = dict(net.named_modules())
    for spec in embedding_group(net).slices:
        owner_name, _, attr = spec.param.rpartition(".")
        owner = modules[owner_name] if owner_name else net
        param = getattr(owner, attr)
        kept_entries = param.detach().index_select(spec.dim, kept.to(param.device)).clone()
        setattr(owner, attr, nn.Parameter(kept_entries, requires_grad=param.requires_grad))
    width = kept.numel()
    for _, norm in residual_norms(net):
        norm.normalized_shape = (width,)
    clear_kept_channels(net)
    for linear in [m for m in net.modules() if isinstance(m, nn.Linear)]:
        linear.out_features, linear.in_features = linear.weight.shape
    net.patch_embed.proj.out_channels = width
    net.embed_dim = net.num_features = width
    if hasattr(net, "head_hidden_size"):
        net.head_hidden_size = width


def clear_kept_channels(model: nn.Module) -> None:
    """Remove the kept-channel hooks of every LayerNorm of ``model`` (a compact copy normalises over all it has)."""
    for norm in unwrap_model(model).modules():
        if isinstance(norm, nn.LayerNorm):
            for key in [k for k, hook in norm._forward_hooks.items() if hook is _kept_channel_norm]:
                del norm._forward_hooks[key]
            if hasattr(norm, _KEPT):
                delattr(norm, _KEPT)
