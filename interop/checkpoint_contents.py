"""Every checkpoint layout a user may hold, read into one normalised form.

Accepted: this project's training checkpoints and compact models, the original SViTE training checkpoints
(``model``, ``mask``, ``atten_mask``, ``other_mask``, ``fired_mask``, ``args`` as an ``argparse.Namespace``, ...),
checkpoints trimmed to ``{"model": ...}`` or ``{"state_dict": ...}``, bare state_dicts and timm's weights
(``.pth`` or ``.safetensors``), and this project's exports (``model.safetensors`` and the compressed
``model.sparse.safetensors``, with the flags their ``config.json`` records). Mask keys of the original carry a
``module.`` prefix and an ``_<index>`` or ``_mask`` suffix; they are matched to parameters by name only, because the
index depends on the code version: in files written by the original code before its fix of 2021-08-14 (commit
d16756e) the indices of token-selection runs are shifted by the token scorer's two parameters
(docs/original-sviite.md).
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from interop.checkpoint import file_kind, load_checkpoint
from interop.compact_checkpoint import is_compact_checkpoint
from interop.export import export_architecture, export_args, is_sparse_file, load_sparse_masks

ORIGINAL_MASK_ENTRIES = ("mask", "atten_mask", "other_mask")
_MASK_SUFFIX = re.compile(r"_(\d+|mask)$")


@dataclass
class CheckpointContents:
    """What a checkpoint file holds, whatever its layout.

    Attributes:
        path: the file.
        layout: ``project`` (training checkpoint of this project), ``compact`` (this project's compact model),
            ``svite`` (original SViTE training checkpoint), ``sparse`` (this project's compressed sparse export),
            ``weights`` (a state_dict, bare or under ``model`` / ``state_dict``: timm's files, trimmed checkpoints,
            this project's ``model.safetensors``).
        state_dict: the model's tensors, ``module.`` prefixes removed.
        masks: parameter name -> bool mask, as stored in the file (empty when it stores none).
        args: the training flags the file records, as a plain dict (empty when none).
        ema: the EMA weights, when stored.
        architecture: a compact model's per-block shape (``models.compact_architecture``), from a ``compact.pth`` or the
            ``config.json`` beside a compact export.
        notes: facts about the file worth printing (e.g. mask-key indices that do not match the parameters).
    """

    path: Path
    layout: str
    state_dict: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, torch.Tensor] | None = None
    architecture: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    epoch: int | None = None

    @property
    def description(self) -> str:
        return {
            "project": "a training checkpoint of this project",
            "compact": "a compact (physically pruned) model of this project",
            "svite": "an original SViTE training checkpoint",
            "sparse": "a compressed sparse export of this project (non-zero bit masks and values)",
            "weights": "model weights (a state_dict: timm's files, trimmed checkpoints)",
        }[self.layout]


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Load ``path`` safely (``weights_only``) and normalise it; a file holding no model weights is an error."""
    path = Path(path)
    raw = load_checkpoint(path, map_location="cpu")
    if is_compact_checkpoint(raw):
        return CheckpointContents(path, "compact", _strip_prefix(raw["model"]), args=_plain_args(raw.get("args")),
                                  architecture=dict(raw["architecture"]))
    weights = _find_weights(raw, path)
    args = _plain_args(raw.get("args"))
    epoch = raw.get("epoch") if isinstance(raw.get("epoch"), int) else None
    ema = _strip_prefix(raw["model_ema"]) if _is_state_dict(raw.get("model_ema")) else None
    if "sparsifier" in raw and "step" in raw:
        masks = {name: mask.bool() for name, mask in _project_masks(raw["sparsifier"]).items()}
        compacted = raw.get("compacted")  # trained as its compact model (--compact-at-budget): its architecture
        return CheckpointContents(path, "project", weights, masks, args, ema, epoch=epoch,
                                  architecture=dict(compacted["architecture"]) if compacted else None)
    if any(key in raw for key in ORIGINAL_MASK_ENTRIES) or isinstance(raw.get("args"), argparse.Namespace):
        masks, notes = original_masks(raw, weights)
        return CheckpointContents(path, "svite", weights, masks, args, ema, notes=notes, epoch=epoch)
    layout = "sparse" if file_kind(path) == "safetensors" and is_sparse_file(path) else "weights"
    masks = load_sparse_masks(path) if layout == "sparse" else {}
    return CheckpointContents(path, layout, weights, masks, args=args or export_args(path), ema=ema, epoch=epoch,
                              architecture=export_architecture(path))


def mask_parameter_name(key: str) -> str:
    """The parameter an original SViTE mask key refers to: ``module.`` and ``_<index>`` / ``_mask`` removed."""
    return _MASK_SUFFIX.sub("", key.removeprefix("module."))


def original_masks(raw: Mapping[str, Any], weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                           list[str]]:
    """Masks of an original SViTE checkpoint keyed by parameter name, and notes on keys that needed care.

    The ``_<index>`` suffix is compared with the parameter's position in the state_dict (SViTE's running index over
    ``named_parameters``) only to report a mismatch, never to pick the parameter.
    """
    positions = {name: i for i, name in enumerate(weights)}
    masks: dict[str, torch.Tensor] = {}
    shifted, unknown = [], []
    for entry in ORIGINAL_MASK_ENTRIES:
        for key, mask in (raw.get(entry) or {}).items():
            name = mask_parameter_name(key)
            if name not in weights or not torch.is_tensor(mask) or mask.shape != weights[name].shape:
                unknown.append(key)
                continue
            masks[name] = mask != 0
            index = re.search(r"_(\d+)$", key)
            if index and int(index.group(1)) != positions[name]:
                shifted.append((key, positions[name]))
    notes = []
    if shifted:
        key, position = shifted[0]
        notes.append(f"{len(shifted)} mask keys carry an index that is not their parameter's position (e.g. {key} "
                     f"for parameter #{position}). The original code named masks this way in token-selection runs "
                     "until its fix of 2021-08-14 (commit d16756e), and never applied them to the transformer "
                     "weights: the mask-index bug, docs/original-sviite.md#the-mask-index-bug-before-2021-08-14. "
                     "The masks were matched to parameters by name")
    if unknown:
        notes.append(f"{len(unknown)} mask keys name no parameter of the model or have another shape, and were "
                     f"ignored (e.g. {unknown[0]})")
    return masks, notes


def _find_weights(raw: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if _is_state_dict(raw.get(key)):
            return _strip_prefix(raw[key])
    if _is_state_dict(raw):
        return _strip_prefix(raw)
    raise ValueError(f"{path} holds no model weights: expected a state_dict, or a dict with one under 'model' or "
                     f"'state_dict'; its keys are {sorted(map(str, raw))[:8]}")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _strip_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DistributedDataParallel's ``module.`` prefix, which some checkpoints keep."""
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def _plain_args(args: Any) -> dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, Mapping) else {}


def _project_masks(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weight masks inside a sparsifier state: the method's own, or a chain member's."""
    if isinstance(state.get("masks"), Mapping):
        return dict(state["masks"])
    for member in state.values():
        if isinstance(member, Mapping) and isinstance(member.get("masks"), Mapping):
            return dict(member["masks"])
    return {}
