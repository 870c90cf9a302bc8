"""SViTE+ data sparsity: a learnable token selector patched into a stock timm `VisionTransformer`.

Two placements, both SViTE's:

* global: one scorer ``gumbel`` = Linear(D, 1) on the tokens after patch + position embedding, installed in timm's
  ``patch_drop`` slot (``patch_embed -> _pos_embed -> patch_drop -> norm_pre -> blocks``).
* layer-wise (the original ``deit_*_data`` models): the global scorer plus one ``blocks.{i}.attn.gumbel`` per block,
  scoring the block's normalised input right before ``qkv`` (forward hooks on timm's ``Attention``).

Selection keeps exactly k tokens per image, the prefix (cls) tokens always among them, so k = cls + (k - 1) patches
for DeiT. Training draws Gumbel top-k over the perturbed log-probabilities with a straight-through estimator;
evaluation takes the deterministic top-k of the scores (``eval_noise`` restores SViTE's noisy evaluation). Two modes:

* ``zero`` (SViTE): dropped tokens are multiplied by 0; the sequence length, and the compute, do not change.
* ``drop``: the kept tokens are gathered, so every later block really runs on a shorter sequence. Layer-wise
  selectors in drop mode run their block's attention (qkv, QK^T, AV, proj) on the kept tokens only and scatter the
  result back into the residual stream: skipped tokens pass the attention sub-layer unchanged, are neither queries
  nor keys in that block, and still go through the MLP.

The temperature only shapes the surrogate gradient (the hard top-k does not depend on it); ``TokenSchedule`` sets it
from the optimizer step, so it is checkpointed with the run instead of living in a module global.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch.utils.hooks import RemovableHandle

from models.wrappers import unwrap_model

logger = logging.getLogger(__name__)

SELECTORS = ("global", "layerwise")
MODES = ("zero", "drop")
TAU_SCHEDULES = ("linear", "reversed")
TAU_START, TAU_END = 10.0, 0.1  # SViTE's get_tau(10, 0.1, step, T)
STATE_FORMAT = "models.TokenSchedule/1"


# ---------------------------------------------------------------------------------------------------------------
# Pure tensor functions
# ---------------------------------------------------------------------------------------------------------------


def sample_gumbel(like: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise with the shape and device of ``like`` (float32), drawn from torch's default RNG.

    Sampled as -log(E), E ~ Exp(1); E is clamped away from 0 so the noise is always finite (SViTE re-drew instead).
    Under torch.distributed every rank draws its own noise, which is right: every rank sees different images.
    """
    exp = torch.empty(like.shape, device=like.device, dtype=torch.float32).exponential_()
    return -exp.clamp_min(torch.finfo(torch.float32).tiny).log()


def gumbel_topk(
    logits: torch.Tensor,
    k: int,
    tau: float | torch.Tensor,
    hard: bool = True,
    noise: torch.Tensor | None = None,
    num_prefix: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep k tokens per row by (Gumbel-)top-k, the first ``num_prefix`` (cls) tokens always among them.

    The hard choice is the top-k of the perturbed log-probabilities ``log_softmax(s) + g``. SViTE took the top-k of
    the soft scores instead, which at tau = 0.1 underflow to exact zeros in float32 and break ties arbitrarily; both
    are the same choice in exact arithmetic (softmax and 1/tau are monotone), so tau never changes which tokens are
    kept, only the surrogate gradient ``y_soft = softmax((log_softmax(s) + g) / tau)``. The straight-through mask is
    ``y_hard - stopgrad(y_soft) + y_soft``, computed as ``y_hard + (y_soft - stopgrad(y_soft))`` so its forward
    values are exactly 0 and 1. Prefix entries are the constant 1 (no gradient), as SViTE's ``mask[:, 0] = 1``.

    Args:
        logits: scores s, shape [B, N], prefix tokens first.
        k: tokens kept per row, prefix included; ``num_prefix <= k <= N``.
        tau: temperature of the soft relaxation (a float or a 0-dim tensor).
        hard: return the straight-through {0, 1} mask (True) or the soft scores y_soft (False).
        noise: Gumbel(0, 1) noise of shape [B, N] (see ``sample_gumbel``); None selects deterministically.
        num_prefix: leading tokens that are always kept.

    Returns:
        (mask [B, N] float32, kept indices [B, k] int64 in ascending order, so the prefix tokens come first).
    """
    n = logits.shape[-1]
    if not max(num_prefix, 1) <= k <= n:
        raise ValueError(f"k must be in [{max(num_prefix, 1)}, {n}] (prefix tokens included), got {k}")
    log_p = torch.log_softmax(logits.float(), dim=-1)
    perturbed = log_p if noise is None else log_p + noise
    y_soft = torch.softmax(perturbed / tau, dim=-1)
    forced = torch.arange(n, device=logits.device) < num_prefix
    ranking = perturbed.detach().masked_fill(forced, float("inf"))
    idx = ranking.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    if not hard:
        return y_soft, idx
    y_hard = torch.zeros_like(y_soft).scatter_(-1, idx, 1.0)
    mask = (y_hard + (y_soft - y_soft.detach())).masked_fill(forced, 1.0)
    return mask, idx


def zero_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SViTE's semantics: multiply tokens [B, N, D] by the mask [B, N]; the sequence keeps its length."""
    return x * mask.unsqueeze(-1).to(x.dtype)


def drop_tokens(x: torch.Tensor, mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather the kept tokens [B, k, D] of x [B, N, D], times their mask values (1 in the forward pass).

    The multiplication carries the straight-through gradient to the scorer, as in zero mode.
    """
    kept = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return kept * mask.gather(1, idx).unsqueeze(-1).to(x.dtype)


def tau_at(step: int, total_steps: int, schedule: str, start: float = TAU_START, end: float = TAU_END) -> float:
    """Gumbel temperature after ``step`` of ``total_steps`` optimizer steps (clamped to the run).

    ``linear`` goes from ``start`` to ``end`` (SViTE after its "fix-tau" commit); ``reversed`` from ``end`` to
    ``start``, the schedule every released SViTE+ checkpoint was trained with.
    """
    _check_choice("tau schedule", schedule, TAU_SCHEDULES)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    frac = min(max(step, 0), total_steps) / total_steps
    first, last = (start, end) if schedule == "linear" else (end, start)
    return first * (1.0 - frac) + last * frac  # exact at both ends


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenConfig:
    """Token-selection settings (SViTE+), parsed once from the command line.

    Args:
        enabled: install selectors at all (``--token_selection``).
        num_keep: k, tokens kept over all N tokens including cls (``--token_number``, as SViTE's scripts pass it).
        ratio: fraction of the N tokens to keep, k = round-half-up(ratio * N) (``--token-ratio``).
        selector: ``global``, or ``layerwise`` (the global selector plus one per block, as SViTE's ``_data`` models).
        mode: ``zero`` (SViTE: multiply by the mask) or ``drop`` (gather the kept tokens; saves compute).
        tau_schedule: ``linear`` (10 -> 0.1) or ``reversed`` (0.1 -> 10, as the released checkpoints were trained).
        eval_noise: SViTE's stochastic evaluation (Gumbel noise at test time) instead of the deterministic top-k.
        visualize: number of validation images to draw with their dropped patches greyed out.
    """

    enabled: bool = False
    num_keep: int | None = None
    ratio: float | None = None
    selector: str = "global"
    mode: str = "zero"
    tau_schedule: str = "linear"
    eval_noise: bool = False
    visualize: int = 0

    def __post_init__(self) -> None:
        _check_choice("token selector", self.selector, SELECTORS)
        _check_choice("token mode", self.mode, MODES)
        _check_choice("tau schedule", self.tau_schedule, TAU_SCHEDULES)
        if self.num_keep is not None and self.ratio is not None:
            raise ValueError("give either --token_number (k tokens) or --token-ratio (fraction of tokens), not both")
        k = self.num_keep
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"--token_number must be an int >= 1 (tokens kept, cls included), got {k!r}")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"--token-ratio must be in (0, 1], got {self.ratio!r}")
        if isinstance(self.visualize, bool) or not isinstance(self.visualize, int) or self.visualize < 0:
            raise ValueError(f"--visualize-tokens must be an int >= 0, got {self.visualize!r}")
        if not self.enabled:
            given = [flag for flag, on in (("--token_number", k is not None), ("--token-ratio", self.ratio is not None),
                                           ("--eval-noise", self.eval_noise), ("--visualize-tokens", self.visualize))
                     if on]
            if given:
                raise ValueError(f"{', '.join(given)} need --token_selection")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TokenConfig:
        """From ``add_token_args`` flags; a ``*_data`` ``--model`` implies the layer-wise selector, as in SViTE."""
        layerwise = str(getattr(args, "model", "")).endswith("_data")
        return cls(
            enabled=args.token_selection, num_keep=args.token_number, ratio=args.token_ratio,
            selector="layerwise" if layerwise else args.token_selector, mode=args.token_mode,
            tau_schedule=args.tau_schedule, eval_noise=args.eval_noise, visualize=args.visualize_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for config.json and checkpoints."""
        return dataclasses.asdict(self)

    def as_flags(self) -> dict[str, Any]:
        """The ``add_token_args`` values that give this config back (how checkpoints record it in ``args``)."""
        return {"token_selection": self.enabled, "token_number": self.num_keep, "token_ratio": self.ratio,
                "token_selector": self.selector, "token_mode": self.mode, "tau_schedule": self.tau_schedule}

    def keep_count(self, num_tokens: int, num_prefix: int = 1) -> int:
        """k for a sequence of ``num_tokens`` tokens (prefix included); all tokens when neither k nor ratio is set.

        Raises:
            ValueError: if k exceeds the token count or keeps no patch token beside the prefix tokens.
        """
        if self.ratio is not None:
            return max(num_prefix, 1, int(self.ratio * num_tokens + 0.5))
        k = num_tokens if self.num_keep is None else self.num_keep
        if 1 <= k <= num_prefix < num_tokens:
            raise ValueError(f"--token_number {k} keeps only the {num_prefix} prefix (cls) token(s) and no image "
                             f"patch; keep at least {num_prefix + 1} of the {num_tokens} tokens")
        if not max(num_prefix, 1) <= k <= num_tokens:
            raise ValueError(f"--token_number {k} must be between {max(num_prefix, 1)} and the {num_tokens} tokens of "
                             f"this model ({num_tokens - num_prefix} patches + {num_prefix} prefix token(s))")
        return k


def add_token_args(parser: argparse.ArgumentParser) -> None:
    """The SViTE+ flags as one argument group (SViTE's underscore names kept where it had them)."""
    g = parser.add_argument_group("token selection (SViTE+)")
    g.add_argument("--token_selection", action="store_true", help="learn which tokens to keep (Gumbel top-k)")
    g.add_argument("--token_number", type=int, default=None,
                   help="k: tokens kept, cls included (SViTE: 187 = 5%% data sparsity at 224 px); default: all")
    g.add_argument("--token-ratio", type=float, default=None, help="fraction of tokens kept, in (0, 1]; or k")
    g.add_argument("--token-selector", default="global", choices=SELECTORS,
                   help="global: before block 0; layerwise: global plus one per block (implied by *_data models)")
    g.add_argument("--token-mode", default="zero", choices=MODES,
                   help="zero: multiply dropped tokens by 0 (SViTE); drop: remove them (really saves compute)")
    g.add_argument("--tau-schedule", default="linear", choices=TAU_SCHEDULES,
                   help="Gumbel temperature: linear 10 -> 0.1; reversed 0.1 -> 10 (the released checkpoints)")
    g.add_argument("--eval-noise", action="store_true", help="SViTE's noisy evaluation instead of the plain top-k")
    g.add_argument("--visualize-tokens", type=int, default=0,
                   help="write PNGs of this many validation images with the dropped patches greyed out")


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


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
        _check_choice("token mode", mode, MODES)
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


# ---------------------------------------------------------------------------------------------------------------
# Patching
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# Temperature schedule (a Sparsifier)
# ---------------------------------------------------------------------------------------------------------------


class TokenSchedule:
    """Sets the Gumbel temperature of every installed scorer from the optimizer step (the ``Sparsifier`` protocol).

    ``step(step)`` is called after every optimizer step, so the next forward uses tau(step): the first forward runs
    at tau(0), as SViTE's ``get_tau(10, 0.1, ite_step, T)`` with ``ite_step`` counting steps already taken.

    Args:
        model: the patched model (a DDP or compiled wrapper is fine).
        cfg: the token settings (only ``tau_schedule`` is read).
        total_steps: T, optimizer steps of the whole run.
    """

    def __init__(self, model: nn.Module, cfg: TokenConfig, total_steps: int) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int (optimizer steps of the run), got {total_steps!r}")
        self.scorers = list(token_scorers(model).values())
        if not self.scorers:
            raise ValueError("the model has no token selector; call apply_token_selection(model, cfg) first")
        self.schedule = cfg.tau_schedule
        self.total_steps = total_steps
        self._step = 0
        self._set(tau_at(0, total_steps, self.schedule))

    @property
    def tau(self) -> float:
        return tau_at(self._step, self.total_steps, self.schedule)

    def step(self, step: int) -> bool:
        """Set tau(step) on every scorer; never changes a topology, so returns False."""
        self._step = step
        self._set(self.tau)
        return False

    def apply_masks(self, module: nn.Module) -> None:
        """Token selection masks no weights: a copy of the model (e.g. the EMA) is left as it is."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "step": self._step, "tau": self.tau, "schedule": self.schedule,
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step; tau is recomputed from it (with a warning if the run's schedule or length changed)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a TokenSchedule state dict (expected format {STATE_FORMAT!r})")
        saved = (state["schedule"], state["total_steps"])
        if saved != (self.schedule, self.total_steps):
            logger.warning("token selection: resuming with tau schedule %s over %d steps; the checkpoint had %s "
                           "over %d", self.schedule, self.total_steps, *saved)
        self.step(int(state["step"]))

    def report(self) -> dict[str, float]:
        return {"tau": self.tau}

    def _set(self, tau: float) -> None:
        for scorer in self.scorers:
            scorer.tau.fill_(tau)


# ---------------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------------


def visualize_tokens(
    model: nn.Module,
    images: torch.Tensor,
    path_prefix: str | Path,
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN,
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD,
) -> list[Path]:
    """Write one PNG per image: the image, and beside it the same image with the dropped patches greyed out.

    Uses the global selector in eval mode: the deterministic top-k, or one noisy draw with ``eval_noise``. Small
    images are upscaled (nearest) to at least 224 px so patches stay visible.

    Args:
        model: a model with a global selector (``apply_token_selection``).
        images: normalised validation images [B, 3, H, W] at the model's resolution.
        path_prefix: files are ``{path_prefix}_{i:03d}.png``; missing parent folders are created.
        mean: the normalisation mean, to undo it for display.
        std: the normalisation std.

    Returns:
        The written paths.
    """
    import numpy as np
    from PIL import Image

    net = unwrap_model(model)
    scorer = getattr(net, "gumbel", None)
    if not isinstance(scorer, TokenScorer):
        raise ValueError("visualize_tokens needs a model with a global token selector (apply_token_selection)")
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            device = scorer.weight.device
            tokens = net._pos_embed(net.patch_embed(images.to(device=device, dtype=scorer.weight.dtype)))
            mask, _ = scorer.select(tokens)
    finally:
        net.train(was_training)
    gh, gw = net.patch_embed.grid_size
    keep = mask[:, scorer.num_prefix:].reshape(-1, gh, gw).cpu()
    ph, pw = images.shape[-2] // gh, images.shape[-1] // gw
    keep = keep.repeat_interleave(ph, 1).repeat_interleave(pw, 2).unsqueeze(1) > 0.5
    pixels = images.detach().float().cpu() * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    pixels = pixels.clamp(0, 1)
    greyed = torch.where(keep, pixels, 0.25 * pixels + 0.75 * 0.5)
    scale = max(1, -(-224 // min(images.shape[-2:])))
    prefix = Path(path_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (raw, sel) in enumerate(zip(pixels, greyed)):
        pair = torch.cat([raw, torch.ones(3, raw.shape[1], max(2, raw.shape[2] // 16)), sel], dim=2)
        array = (pair.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        picture = Image.fromarray(array)
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
        path = prefix.parent / f"{prefix.name}_{i:03d}.png"
        picture.save(path)
        paths.append(path)
    return paths
