"""Turn a checkpoint's contents into the model it describes: architecture, token selectors and weights.

The file decides what it can (compact shapes, which selector exists, the token count it was trained with); the
command line decides the rest, and where neither does, the error names the flag to pass.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from interop.checkpoint_contents import CheckpointContents
from interop.detect import Detection, check_fits
from models.channel_units import restore_kept_channels
from models.compact import build_compact
from models.token_selection import TokenConfig, apply_token_selection
from models.vit import create_model


def resolve_tokens(contents: CheckpointContents, detection: Detection, cli: TokenConfig) -> TokenConfig:
    """The token selection to evaluate with.

    ``--token_selection`` with a token count (``--token_number`` or ``--token-ratio``) on the command line overrides
    what the file records; otherwise the recorded settings are used (this project's ``args``; the original's
    ``token_number``, always in zero mode). The selector type always comes from the weights.

    Raises:
        ValueError: ``--token_selection`` for a file without scorer weights, or a selector whose token count neither
            the file nor the command line gives.
    """
    if detection.selector is None:
        if cli.enabled:
            raise ValueError(f"{contents.path} has no token-selector weights (no gumbel.*); drop --token_selection")
        return TokenConfig()
    recorded = recorded_tokens(contents)
    cli_count = cli.num_keep is not None or cli.ratio is not None
    source = cli if (cli.enabled and cli_count) or recorded is None else recorded
    if source.num_keep is None and source.ratio is None:
        raise ValueError(
            f"{contents.path} has a {detection.selector} token selector but records no token count; pass "
            "--token_selection with --token_number K (tokens kept, cls included) or --token-ratio R")
    return dataclasses.replace(source, enabled=True, selector=detection.selector, eval_noise=cli.eval_noise,
                               visualize=cli.visualize)


def recorded_tokens(contents: CheckpointContents) -> TokenConfig | None:
    """The token settings a file's ``args`` record, or None when it records none."""
    args = contents.args
    if not args.get("token_selection"):
        return None
    if contents.layout == "svite":  # the original had only an absolute k and only the zero mode
        return TokenConfig(enabled=True, num_keep=args.get("token_number"), mode="zero")
    return TokenConfig(enabled=True, num_keep=args.get("token_number"), ratio=args.get("token_ratio"),
                       mode=args.get("token_mode", "zero"), tau_schedule=args.get("tau_schedule", "linear"))


def build_model(contents: CheckpointContents, detection: Detection, model_name: str,
                tokens: TokenConfig) -> VisionTransformer:
    """The model the file describes with its weights loaded strictly, in eval mode; a masked model with pruned
    embedding channels normalises over its kept ones, as in training (``restore_kept_channels``)."""
    if contents.architecture is not None:
        model = build_compact(contents.architecture)
    elif detection.compact:
        model = create_model(model_name.removesuffix("_data"), num_classes=detection.num_classes,
                             img_size=detection.img_size, block_heads=detection.block_heads,
                             block_mlp_hidden=detection.block_mlp, head_dim=detection.head_dim)
    else:
        model = create_model(model_name.removesuffix("_data"), num_classes=detection.num_classes,
                             img_size=detection.img_size)
    apply_token_selection(model, tokens)
    load_weights(model, contents.state_dict, str(contents.path))
    restore_kept_channels(model, contents.masks or None)  # pruned embedding channels: the norms training used
    return model.eval()


def load_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                 model_name: str | None = None) -> None:
    """Strict load whose error lists the first mismatching keys with both shapes (and, given ``model_name``, the
    models that would fit)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
             for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        if model_name is not None:
            check_fits(state_dict, model_name)  # names the model that fits, when the architecture is the problem
        problems = [f"shape mismatch {w}" for w in wrong[:5]] + [f"missing key {k}" for k in missing[:5]]
        problems += [f"unexpected key {k}" for k in unexpected[:5]]
        raise ValueError(f"{source} does not fit this --model: " + "; ".join(problems))
    model.load_state_dict(state_dict)


def token_summary(tokens: TokenConfig, model: VisionTransformer) -> str:
    """One line on the selection the model evaluates with."""
    if not tokens.enabled:
        return "token selection: off"
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    noise = "with Gumbel noise (as the original evaluated)" if tokens.eval_noise else "deterministic top-k"
    return (f"token selection: {tokens.selector}, k = {tokens.keep_count(n, model.num_prefix_tokens)} of {n} tokens, "
            f"{tokens.mode} mode, {noise}")


def describe(contents: CheckpointContents) -> list[str]:
    """What the file is and what it records, before looking at the weights."""
    out = [f"{contents.path}: {contents.description}"
           + (f", epoch {contents.epoch}" if contents.epoch is not None else "")]
    recorded: dict[str, Any] = {k: contents.args[k] for k in ("model", "pruning_type", "density", "atten_density",
                                                               "other_density", "unit_multiple", "token_selection",
                                                               "token_number")
                                if k in contents.args}
    if recorded:
        out.append("recorded flags: " + ", ".join(f"{k}={v}" for k, v in recorded.items()))
    if contents.masks:
        out.append(f"masks stored for {len(contents.masks)} tensors")
    out += contents.notes
    return out
