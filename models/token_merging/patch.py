"""Token merging patched into a stock timm ``VisionTransformer`` through forward hooks on its own modules.

timm's ``Block.forward`` is ``x = x + drop_path1(ls1(attn(norm1(x), attn_mask)))`` then
``x = x + drop_path2(ls2(mlp(norm2(x))))``. Merging sits between the two residual branches, so that the MLP runs on
the merged tokens. No timm class is copied or subclassed; five hooks per block do it:

1. block pre-hook: proportional attention, log(size) passed as the block's additive ``attn_mask``, which timm
   hands to ``F.scaled_dot_product_attention`` (the fused kernel stays);
2. ``attn.k_norm`` hook: the keys the attention used, averaged over heads: the similarity metric;
3. ``norm2`` pre-hook: match and merge the residual stream; the MLP branch (norm2, mlp, ls2, drop_path2) runs on
   the merged tokens;
4. ``drop_path2`` hook: keeps the branch output and hands the block's residual add a zero, since the block's own
   ``x`` still has the unmerged length;
5. block hook: the block's output becomes merged tokens + branch output, what the block computes on a shorter
   sequence.

A block with r = 0 does nothing beyond step 1 (so a model with r = 0 everywhere computes exactly the unpatched model).
The sizes travel from block to block in a ``MergeState`` shared by the model's hooks and reset at block 0.
"""
from __future__ import annotations

from typing import Any

import torch
import torch._dynamo
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.hooks import RemovableHandle

from models.token_merging.config import MergeConfig, token_counts
from models.token_merging.matching import bipartite_soft_matching, merge_tokens, size_bias
from models.token_selection import GlobalTokenSelector, TokenScorer, num_tokens
from models.wrappers import unwrap_model

ATTRIBUTE = "token_merging"  # where the installed ``TokenMerging`` lives on the model


class MergeState:
    """What one forward pass carries between blocks (``size``) and between the hooks of one block."""

    def __init__(self) -> None:
        self.size: torch.Tensor | None = None  # [batch, n] patches per token; None: all 1 (nothing merged yet)
        self.metric: torch.Tensor | None = None
        self.merged: torch.Tensor | None = None
        self.branch: torch.Tensor | None = None


class BlockMerge:
    """The hooks of one block, merging ``r`` tokens between its attention and its MLP."""

    def __init__(self, index: int, r: int, num_prefix: int, state: MergeState) -> None:
        self.index, self.r, self.num_prefix, self.state = index, r, num_prefix, state

    def before_block(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.index == 0:
            self.state.size = None  # a new forward pass: every token is one patch
        size = self.state.size
        if size is None:
            return args, kwargs
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise ValueError("token merging adds its own attention mask (proportional attention); the block was "
                             "called with another")
        return args, {**kwargs, "attn_mask": size_bias(size, args[0].dtype)}

    def keys(self, k_norm: nn.Module, args: tuple[Any, ...], keys: torch.Tensor) -> None:
        if self.r:
            self.state.metric = keys.mean(dim=1)  # [batch, heads, n, head_dim] -> [batch, n, head_dim]

    def before_mlp(self, norm2: nn.Module, args: tuple[Any, ...]) -> tuple[torch.Tensor] | None:
        if not self.r:
            return None
        state, x = self.state, args[0]
        matching = bipartite_soft_matching(state.metric, self.r, self.num_prefix)
        size = state.size if state.size is not None else x.new_ones(x.shape[:2], dtype=torch.float32)
        state.merged, state.size = merge_tokens(x, size, matching)
        state.metric = None
        return (state.merged,)

    def after_mlp(self, drop_path2: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if not self.r:
            return None
        self.state.branch = out
        return out.new_zeros(())

    def after_block(self, block: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if not self.r:
            return None
        state = self.state
        merged = state.merged + state.branch
        state.merged = state.branch = None
        return merged


class TokenMerging:
    """The installed merging of one model: per-block r, the hooks, and the state they share.

    A plain object on the model (attribute ``token_merging``), not a module: it adds no state_dict keys, and
    ``deepcopy`` (the EMA) copies it with the model, its hooks then acting on the copy.
    """

    def __init__(self, merges: tuple[int, ...], num_prefix: int) -> None:
        self.state = MergeState()
        self.blocks = [BlockMerge(i, r, num_prefix, self.state) for i, r in enumerate(merges)]
        self.handles: list[RemovableHandle] = []

    @property
    def r(self) -> tuple[int, ...]:
        return tuple(b.r for b in self.blocks)

    def install(self, net: VisionTransformer) -> None:
        for blk, hooks in zip(net.blocks, self.blocks):
            self.handles += [
                blk.register_forward_pre_hook(hooks.before_block, with_kwargs=True),
                blk.attn.k_norm.register_forward_hook(hooks.keys),
                blk.norm2.register_forward_pre_hook(hooks.before_mlp),
                blk.drop_path2.register_forward_hook(hooks.after_mlp),
                blk.register_forward_hook(hooks.after_block),
            ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def merge_plan(model: nn.Module) -> tuple[int, ...] | None:
    """The installed per-block r, or None without merging."""
    merging = getattr(unwrap_model(model), ATTRIBUTE, None)
    return merging.r if isinstance(merging, TokenMerging) else None


def block_tokens(net: VisionTransformer) -> int:
    """Tokens entering block 0: all of them, or those a global selector in drop mode keeps."""
    n, _ = num_tokens(net)
    glob = getattr(net, "gumbel", None)
    return glob.keep_count(n) if isinstance(glob, TokenScorer) and glob.mode == "drop" else n


def apply_token_merging(model: nn.Module, cfg: MergeConfig) -> None:
    """Make the model merge tokens as ``cfg`` says, in place; a disabled ``cfg`` leaves the stock timm model.

    Idempotent: existing merging is replaced. Call after ``apply_token_selection`` (the merge counts are checked
    against the tokens its selector keeps); merging has no parameters, so the order against the optimizer does not
    matter, but the EMA copies the hooks only if they exist when it is made.

    Raises:
        ValueError: for a model merging cannot act on (not a timm ``VisionTransformer`` of timm ``Block``s, pooling
            other than the cls token, random patch dropout, a layer-wise or zero-mode token selector) or an r
            larger than a block's sequence can merge.
    """
    net = unwrap_model(model)
    if not isinstance(net, VisionTransformer):
        raise ValueError(f"token merging patches timm VisionTransformer models, got {type(net).__name__}")
    remove_token_merging(net)
    if not cfg.enabled:
        return
    _check_mergeable(net)
    merges = cfg.per_block(len(net.blocks))
    token_counts(block_tokens(net), net.num_prefix_tokens, merges)  # raises for an r too large
    merging = TokenMerging(merges, net.num_prefix_tokens)
    merging.install(net)
    setattr(net, ATTRIBUTE, merging)
    _guard_hooks_under_compile()


def _guard_hooks_under_compile() -> None:
    """Make torch.compile guard on module hooks, process-wide: merging lives only in hooks.

    By default dynamo skips hook guards (``skip_nnmodule_hook_guards``), and since parameters are graph inputs it
    reuses one compiled graph for every model of the same class. A merging model compiled after a plain one of the
    same architecture then silently ran the plain graph: the benchmark suite's compiled DeiT-S at r = 13 ran at the
    dense speed, and a compiled vit_digits_tiny gave the unmerged logits. The guards cost a few dict checks per call.
    """
    torch._dynamo.config.skip_nnmodule_hook_guards = False


def remove_token_merging(model: nn.Module) -> None:
    """Remove the merging hooks: the model is the unpatched timm model again (no-op if none are installed)."""
    net = unwrap_model(model)
    merging = getattr(net, ATTRIBUTE, None)
    if isinstance(merging, TokenMerging):
        merging.remove()
        delattr(net, ATTRIBUTE)


def _check_mergeable(net: VisionTransformer) -> None:
    if net.global_pool != "token":
        raise ValueError(f"token merging needs cls-token pooling: '{net.global_pool}' pooling would weigh a merged "
                         "token as one patch")
    if not isinstance(net.patch_drop, (nn.Identity, GlobalTokenSelector)):
        raise ValueError("the model drops random patches (patch_drop_rate > 0), so the token count per block is "
                         "not fixed; token merging needs patch_drop_rate 0")
    glob = getattr(net, "gumbel", None)
    if isinstance(glob, TokenScorer) and glob.mode != "drop":
        raise ValueError("merging after zero-mode token selection would merge the zeroed tokens like image tokens; "
                         "select, then merge, with --token_selection --token-mode drop --tome-r R")
    for i, blk in enumerate(net.blocks):
        if type(blk) is not Block or not isinstance(getattr(blk.attn, "k_norm", None), nn.Module):
            raise ValueError(f"token merging hooks timm's Block and Attention; block {i} is a "
                             f"{type(blk).__name__} with {type(blk.attn).__name__}")
        if isinstance(getattr(blk.attn, "gumbel", None), TokenScorer):
            raise ValueError("token merging combines with the global token selector only (--token-selector global, "
                             "--token-mode drop); layer-wise selectors (and the *_data models) run attention on a "
                             "subset of the tokens, which the merge metric needs whole")


def merge_summary(model: nn.Module) -> str:
    """One line on the merging a model evaluates with: r and the tokens entering each block."""
    net = unwrap_model(model)
    merges = merge_plan(net)
    if merges is None:
        return "token merging: off"
    counts = token_counts(block_tokens(net), net.num_prefix_tokens, merges)
    return (f"token merging (ToMe, proportional attention): r per block {list(merges)}; tokens per block "
            f"{' -> '.join(map(str, counts))}")
