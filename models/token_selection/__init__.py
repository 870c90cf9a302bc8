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

Modules: ``config`` (settings and flags), ``gumbel`` (the pure tensor functions), ``selector`` (the scorer modules
and the patching), ``schedule`` (the temperature ``Sparsifier``), ``visualize`` (pictures).
"""
from models.token_selection.config import MODES, SELECTORS, TAU_SCHEDULES, TokenConfig, add_token_args
from models.token_selection.gumbel import drop_tokens, gumbel_topk, sample_gumbel, zero_tokens
from models.token_selection.schedule import STATE_FORMAT, TAU_END, TAU_START, TokenSchedule, tau_at
from models.token_selection.selector import (
    GlobalTokenSelector,
    TokenScorer,
    apply_token_selection,
    num_tokens,
    remove_token_selection,
    token_scorers,
)
from models.token_selection.visualize import visualize_tokens

__all__ = [
    "GlobalTokenSelector",
    "MODES",
    "SELECTORS",
    "STATE_FORMAT",
    "TAU_END",
    "TAU_SCHEDULES",
    "TAU_START",
    "TokenConfig",
    "TokenSchedule",
    "TokenScorer",
    "add_token_args",
    "apply_token_selection",
    "drop_tokens",
    "gumbel_topk",
    "num_tokens",
    "remove_token_selection",
    "sample_gumbel",
    "tau_at",
    "token_scorers",
    "visualize_tokens",
    "zero_tokens",
]
