"""The compact checkpoint file (``compact.pth``): a physically smaller model saved with its architecture beside it.

Compaction itself (``models.compact``) knows no file; this module is the file format that carries its result, so
``--eval --resume compact.pth`` and the benchmarks rebuild the model from the file alone.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from interop.checkpoint import load_checkpoint, save_atomic
from models.compact import build_compact, compact_architecture
from models.wrappers import unwrap_model

COMPACT_FORMAT = "svite.compact/1"


def save_compact(model: nn.Module, model_name: str, path: str | Path, args: Mapping[str, Any] | None = None) -> Path:
    """Save a compact model as ``path`` (``compact.pth``) plus a JSON copy of its architecture beside it.

    The checkpoint is ``{"format", "model": state_dict, "architecture", "args"}``, readable with
    ``torch.load(weights_only=True)``. The architecture holds the base model name, img_size, num_classes, head_dim and
    the per-block head counts and MLP widths.

    Args:
        model: the compact model (``compact_model`` output).
        model_name: the ``--model`` it was trained as, e.g. ``deit_small_patch16_224``.
        path: the ``.pth`` file; the config goes to the same path with suffix ``.json``.
        args: the run's flags as plain values (the token selection among them, so the file evaluates on its own).
    """
    path = Path(path)
    arch = compact_architecture(model, model_name)
    save_atomic({"format": COMPACT_FORMAT, "model": unwrap_model(model).state_dict(), "architecture": arch,
                 "args": dict(args or {})}, path)
    path.with_suffix(".json").write_text(json.dumps(arch, indent=2) + "\n")
    return path


def is_compact_checkpoint(ckpt: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint dict is a ``save_compact`` file (so ``--eval --resume`` must rebuild the model)."""
    return ckpt.get("format") == COMPACT_FORMAT and isinstance(ckpt.get("architecture"), Mapping)


def load_compact(path: str | Path) -> nn.Module:
    """Rebuild a ``save_compact`` model from its file alone (strict load, ``weights_only``), in eval mode."""
    ckpt = load_checkpoint(path)
    if not is_compact_checkpoint(ckpt):
        raise ValueError(f"{path} is not a compact checkpoint (expected format {COMPACT_FORMAT!r})")
    model = build_compact(ckpt["architecture"])
    model.load_state_dict(ckpt["model"])
    return model.eval()
