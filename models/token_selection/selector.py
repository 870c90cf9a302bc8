"""The selector modules and how they are patched into a stock timm ``VisionTransformer`` through its own slots.

The global scorer sits in timm's ``patch_drop`` slot; a layer-wise scorer is an ``Attention.gumbel`` attribute
driven by forward hooks. No timm class is copied or subclassed, so the model stays timm's and unpatches cleanly.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer
from torch.utils.hooks import RemovableHandle

from models.token_selection.config import MODES, TokenConfig, check_choice
from models.token_selection.gumbel import drop_tokens, gumbel_topk, sample_gumbel, zero_tokens
from models.wrappers import unwrap_model


class TokenScorer(nn.Linear):
    """SViTE's ``gumbel`` layer: Linear(D, 1), one logit per token, plus how its tokens are selected.

    Its parameters are exactly SViTE's (``weight`` [1, D], ``bias`` [1]); the temperature is a non-persistent buffer
    (a tensor, so changing it neither adds state_dict keys nor recompiles a compiled model), set by
    ``TokenSchedule``.

    Args:
        dim: token width D.
        num_tokens: N, the sequence length the model is built for (prefix included).
        num_keep: k of N. A selector that sees n tokens keeps round(k * n / N): k for the full sequence.
        num_prefix: leading tokens always kept (cls).
        mode: ``zero`` or ``drop``.
        eval_noise: add Gumbel noise in eval mode too.
    """

    def __init__(self, dim: int, num_tokens: int, num_keep: int, num_prefix: int, mode: str, eval_noise: bool) -> None:
        super().__init__(dim, 1)
        nn.init.trunc_normal_(self.weight, std=0.02)
        nn.init.zeros_(self.bias)
        self.register_buffer("tau", torch.tensor(1.0), persistent=False)
        self.configure(num_tokens, num_keep, num_prefix, mode, eval_noise)
        self.handles: list[RemovableHandle] = []
        self._scatter: tuple[torch.Tensor, int] | None = None  # layer-wise drop: kept indices, sequence length

    def configure(self, num_tokens: int, num_keep: int, num_prefix: int, mode: str, eval_noise: bool) -> None:
        """(Re)set the selection settings; the learned weights are kept."""
        check_choice("token mode", mode, MODES)
        if not max(num_prefix, 1) <= num_keep <= num_tokens:
            raise ValueError(f"num_keep must be in [{max(num_prefix, 1)}, {num_tokens}], got {num_keep}")
        self.num_tokens, self.num_keep, self.num_prefix = num_tokens, num_keep, num_prefix
        self.mode, self.eval_noise = mode, eval_noise

    def keep_count(self, n: int) -> int:
        """Tokens kept out of ``n`` arriving ones: the same fraction k / N, at least the prefix, at most n."""
        return min(n, max(self.num_prefix, 1, int(self.num_keep * n / self.num_tokens + 0.5)))

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score tokens x [B, n, D]; returns the straight-through mask [B, n] and kept indices [B, k] (sorted)."""
        logits = super().forward(x).squeeze(-1)
        noise = sample_gumbel(logits) if self.training or self.eval_noise else None
        return gumbel_topk(logits, self.keep_count(x.shape[1]), self.tau, noise=noise, num_prefix=self.num_prefix)

    def reduce(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the selection to x in this scorer's mode; returns (tokens, kept indices)."""
        mask, idx = self.select(x)
        return (zero_tokens(x, mask) if self.mode == "zero" else drop_tokens(x, mask, idx)), idx

    def before_attention(
        self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Forward pre-hook of a block's ``Attention``: select among its (normalised) input tokens."""
        x = args[0]
        tokens, idx = self.reduce(x)
        if self.mode == "drop":
            if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
                raise ValueError("layer-wise token dropping cannot be combined with an attention mask")
            self._scatter = (idx, x.shape[1])
        return (tokens, *args[1:]), kwargs

    def after_attention(
        self, attn: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor
    ) -> torch.Tensor:
        """Forward hook (drop mode): put the kept tokens' attention output back at their positions, zeros elsewhere."""
        idx, n = self._scatter
        self._scatter = None
        full = out.new_zeros(out.shape[0], n, out.shape[-1])
        return full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, keep={self.num_keep}/{self.num_tokens}, prefix={self.num_prefix}, "
                f"mode={self.mode}, eval_noise={self.eval_noise}")


class GlobalTokenSelector(nn.Module):
    """The ``patch_drop`` slot of a timm ViT: selects tokens with the model's ``gumbel`` scorer before block 0.

    The scorer is referenced, not registered, so its parameters appear once in the state_dict, as SViTE's
    ``gumbel.weight`` / ``gumbel.bias`` (a registered submodule would add ``patch_drop.*`` duplicates).
    ``deepcopy`` (EMA) and ``.to()`` keep the reference pointing at the model's own scorer.
    """

    def __init__(self, scorer: TokenScorer) -> None:
        super().__init__()
        object.__setattr__(self, "scorer", scorer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer.reduce(x)[0]


def token_scorers(model: nn.Module) -> dict[str, TokenScorer]:
    """Installed scorers by module name (``gumbel``, ``blocks.{i}.attn.gumbel``)."""
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, TokenScorer)}


def num_tokens(model: VisionTransformer) -> tuple[int, int]:
    """(N, prefix tokens) of the sequence entering the blocks, at the model's configured image size."""
    return model.patch_embed.num_patches + model.num_prefix_tokens, model.num_prefix_tokens


def apply_token_selection(model: nn.Module, cfg: TokenConfig) -> None:
    """Make the model's token selectors match ``cfg``, in place; call before building the optimizer and the EMA.

    Idempotent: existing scorers keep their learned weights and only get the new settings; a disabled ``cfg``
    removes every selector, leaving exactly the stock timm model (SViTE deleted its ``gumbel`` layers likewise).
    New scorers are initialised trunc-normal(0.02) with zero bias, on the model's device and dtype.

    Raises:
        ValueError: for a model that is not a timm ``VisionTransformer``, one using timm's own patch dropout, or a
            k outside [prefix tokens, N].
    """
    net = unwrap_model(model)
    if not isinstance(net, VisionTransformer):
        raise ValueError(f"token selection patches timm VisionTransformer models, got {type(net).__name__}")
    if not cfg.enabled:
        remove_token_selection(net)
        return
    if not isinstance(net.patch_drop, (nn.Identity, GlobalTokenSelector)):
        raise ValueError("the model already drops patches (patch_drop_rate > 0); token selection uses that slot")
    n, prefix = num_tokens(net)
    settings = dict(num_tokens=n, num_keep=cfg.keep_count(n, prefix), num_prefix=prefix, mode=cfg.mode,
                    eval_noise=cfg.eval_noise)
    ref = net.pos_embed if net.pos_embed is not None else net.patch_embed.proj.weight
    net.gumbel = _scorer(net, net.embed_dim, settings, ref)
    net.patch_drop = GlobalTokenSelector(net.gumbel)
    for blk in net.blocks:
        attn = blk.attn
        old = getattr(attn, "gumbel", None)
        if isinstance(old, TokenScorer):
            _remove_hooks(old)
        if cfg.selector != "layerwise":
            if old is not None:
                del attn.gumbel
            continue
        scorer = _scorer(attn, blk.norm1.normalized_shape[0], settings, ref)
        attn.gumbel = scorer
        scorer.handles.append(attn.register_forward_pre_hook(scorer.before_attention, with_kwargs=True))
        if cfg.mode == "drop":
            scorer.handles.append(attn.register_forward_hook(scorer.after_attention, with_kwargs=True))


def remove_token_selection(model: nn.Module) -> None:
    """Remove every selector and hook: the model is the unpatched timm model again (no-op if none is installed)."""
    net = unwrap_model(model)
    for blk in getattr(net, "blocks", ()):
        scorer = getattr(blk.attn, "gumbel", None)
        if isinstance(scorer, TokenScorer):
            _remove_hooks(scorer)
            del blk.attn.gumbel
    if isinstance(getattr(net, "gumbel", None), TokenScorer):
        del net.gumbel
    if isinstance(getattr(net, "patch_drop", None), GlobalTokenSelector):
        net.patch_drop = nn.Identity()


def _scorer(owner: nn.Module, dim: int, settings: dict[str, Any], ref: torch.Tensor) -> TokenScorer:
    """The owner's existing ``gumbel`` scorer reconfigured, or a new one on ``ref``'s device and dtype."""
    old = getattr(owner, "gumbel", None)
    if isinstance(old, TokenScorer) and old.in_features == dim:
        old.configure(**settings)
        return old
    if old is not None and not isinstance(old, TokenScorer):
        raise ValueError(f"{type(owner).__name__} already has a 'gumbel' attribute that is not a TokenScorer")
    return TokenScorer(dim, **settings).to(device=ref.device, dtype=ref.dtype)


def _remove_hooks(scorer: TokenScorer) -> None:
    for handle in scorer.handles:
        handle.remove()
    scorer.handles.clear()
