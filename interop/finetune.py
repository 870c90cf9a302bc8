"""Start training from pretrained weights (``--finetune FILE``, DeiT's flag): load a file's model weights, and nothing
else, into a freshly built model.

The file is read by the same reader as evaluation (``read_checkpoint``), so every layout it accepts works: timm's
DeiT ``.pth`` or ``.safetensors``, this project's checkpoints and exports, original SViTE checkpoints. Two differences
are expected when fine-tuning and are resolved here, each announced: a classifier (``head``, ``head_dist``) of
another class count, or none in the file, keeps the model's fresh timm initialisation; a position embedding of
another resolution is resampled with timm's ``resample_abs_pos_embed``. Token scorers the file lacks keep their
initialisation (they are this project's additions to a timm ViT). Anything else that does not fit stops the run.

A compact (physically pruned) file is refused: its blocks are narrower than any ``--model``, and loading its units
into chosen rows of a full-width model would be a guess about which rows they came from. A masked file whose
embedding channels are pruned keeps them pruned: its kept-channel LayerNorms are restored (``models.channel_units``).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from interop.checkpoint_contents import read_checkpoint
from interop.detect import check_fits, detect, selector_kind
from interop.restore import load_weights
from models.channel_units import restore_kept_channels

CLASSIFIER_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")
"""The classifiers of timm's ViTs (``head_dist``: DeiT's distilled models), re-initialised when their width differs."""


def load_pretrained(model: VisionTransformer, path: str | Path, model_name: str) -> list[str]:
    """Copy the model weights of ``path`` into ``model`` in place; return the lines that announce what was done.

    Call it after the model is built (token selectors included) and before the optimizer, EMA and sparsifier see
    its parameters. Optimizer state, masks, EMA weights and flags in the file are not used.

    Args:
        model: the freshly built model of ``--model``, at the run's resolution and class count.
        path: the pretrained file.
        model_name: ``--model``, for the messages that name the architecture the file fits.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds no weights of ``model_name`` (the message names the keys and the ``--model``
            that fits), is compact, or has token-selector weights the model lacks.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--finetune {path} does not exist; pass the pretrained weights file")
    contents = read_checkpoint(path)
    source = f"--finetune {path}"
    if contents.architecture is not None:
        raise _compact_error(source, model_name, contents.architecture["block_heads"],
                             contents.architecture["block_mlp_hidden"])
    state = contents.state_dict
    try:
        check_fits(state, model_name)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    detection = detect(state, model_name)
    if detection.compact:
        raise _compact_error(source, model_name, list(detection.block_heads), list(detection.block_mlp))
    own = model.state_dict()
    file_selector, model_selector = selector_kind(state), selector_kind(own)
    if file_selector is not None and file_selector != model_selector:
        raise ValueError(f"{source} holds {file_selector} token-selector weights (gumbel.*) but the model has "
                         f"{model_selector or 'none'}; pass --token_selection --token-selector {file_selector} (with "
                         "--token_number or --token-ratio) to fine-tune them too")
    lines = [f"--finetune: model weights from {path}, {contents.description}"
             + (f", epoch {contents.epoch}" if contents.epoch is not None else "")
             + (f"; {1 - detection.weight_density:.1%} of its maskable weights are zero"
                if detection.structured or detection.unstructured else "")]
    weights = dict(state)
    fresh = [key for key in CLASSIFIER_KEYS if key in own and (key not in state or state[key].shape != own[key].shape)]
    if fresh:
        had = f"{detection.num_classes} classes" if detection.num_classes else "no classifier"
        lines.append(f"--finetune: the file has {had} and the model {model.num_classes}: "
                     f"{', '.join(fresh)} start from timm's initialisation")
        weights.update({key: own[key] for key in fresh})
    if state["pos_embed"].shape != own["pos_embed"].shape:
        weights["pos_embed"], line = _resampled_pos_embed(state["pos_embed"], model)
        lines.append(line)
    scorers = [key for key in own if "gumbel" in key and key not in state]
    if scorers:
        lines.append(f"--finetune: the file has no token-selector weights; the {model_selector} scorers "
                     f"({len(scorers)} tensors) start from their initialisation")
        weights.update({key: own[key] for key in scorers})
    load_weights(model, weights, source, model_name)
    kept = restore_kept_channels(model, contents.masks or None, tensors=state)
    if kept is not None:
        lines.append(f"--finetune: {kept} of the file's {model.embed_dim} embedding channels are kept (global "
                     "pruning): the residual LayerNorms normalise over them, as the file's model did, and the pruned "
                     "channels stay silent")
    return lines


def _resampled_pos_embed(pos_embed: torch.Tensor, model: VisionTransformer) -> tuple[torch.Tensor, str]:
    """The file's position embedding on the model's patch grid (timm's bicubic resampling; the prefix tokens, cls
    and DeiT's distillation token, are kept as they are), and the line that announces it."""
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    patches = pos_embed.shape[1] - prefix
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"--finetune: the file's position embedding holds {patches} patch positions after "
                         f"{prefix} prefix token(s), not a square grid; it cannot be resampled")
    grid = list(model.patch_embed.grid_size)
    resampled = resample_abs_pos_embed(pos_embed, new_size=grid, old_size=[side, side], num_prefix_tokens=prefix)
    patch = model.patch_embed.patch_size[0]
    return resampled, (f"--finetune: position embedding resampled from {side}x{side} to {grid[0]}x{grid[1]} patches "
                       f"({side * patch} to {grid[0] * patch} px; timm's resample_abs_pos_embed, bicubic)")


def _compact_error(source: str, model_name: str, heads: list[int], hidden: list[int]) -> ValueError:
    return ValueError(f"{source} is a compact (physically pruned) model, heads per block {heads} and MLP widths "
                      f"{hidden}, and --finetune loads full-width weights of --model {model_name}: pass the masked "
                      "checkpoint it was compacted from (its checkpoint.pth), or the weights of the dense model")
