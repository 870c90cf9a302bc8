"""Export a model to take elsewhere: safetensors weights plus a JSON config, and a compressed sparse checkpoint.

``model.safetensors`` holds the state_dict with timm's key names. A dense or unstructured model of a timm DeiT name
without token selectors loads straight into timm::

    timm.create_model(name, pretrained=True, num_classes=C,
                      pretrained_cfg_overlay=dict(file="model.safetensors", num_classes=C))

Every export (compact and token-selecting models too) loads with ``load_export(dir)``, which rebuilds the model
through ``models.create_model`` from ``config.json``.

``model.sparse.safetensors`` stores each mostly-zero tensor as a bit mask of its non-zero entries plus those
entries' values, so a 50%-dense model takes about 0.53x the dense size; ``load_sparse`` restores it bit for bit.
Both files are safetensors: reading them never unpickles anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from models.token_selection import TokenConfig, apply_token_selection, token_scorers
from models.vit import DEIT_MODELS, architecture, count_parameters, create_model

EXPORT_FORMAT = "svite.export/1"
SPARSE_FORMAT = "svite.sparse/1"
WEIGHTS, SPARSE_WEIGHTS, CONFIG = "model.safetensors", "model.sparse.safetensors", "config.json"


def export_model(model: VisionTransformer, model_name: str, tokens: TokenConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write ``model.safetensors``, ``model.sparse.safetensors`` and ``config.json`` into ``out_dir``.

    Args:
        model: the model as evaluated (masked, compact, with or without selectors).
        model_name: the ``--model`` it was built as; for compact models the name of the model it was pruned from.
        tokens: its token selection (stored so ``load_export`` reinstalls the selectors).
        out_dir: created if missing.

    Returns:
        The three paths, keyed ``weights``, ``sparse`` and ``config``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    arch = architecture(model)
    base = model_name.removesuffix("_data")
    with torch.device("meta"):
        full = architecture(create_model(base, num_classes=arch["num_classes"], img_size=arch["img_size"]))
    compact = arch["block_heads"] != full["block_heads"] or arch["block_mlp_hidden"] != full["block_mlp_hidden"]
    timm_loadable = base in DEIT_MODELS and not compact and not token_scorers(model)
    total, nonzero = count_parameters(model)
    config: dict[str, Any] = {
        "format": EXPORT_FORMAT, "model": base, "architecture": arch, "compact": compact,
        "token_selection": tokens.to_dict() if tokens.enabled else None,
        "params": total, "params_nonzero": nonzero, "weights": WEIGHTS, "sparse_weights": SPARSE_WEIGHTS,
        "timm_loadable": timm_loadable,
    }
    if timm_loadable:
        config["timm_usage"] = (f"timm.create_model({base!r}, pretrained=True, num_classes={arch['num_classes']}, "
                                f"img_size={arch['img_size']}, pretrained_cfg_overlay=dict(file='{WEIGHTS}', "
                                f"num_classes={arch['num_classes']}))")
    paths = {"weights": out / WEIGHTS, "sparse": out / SPARSE_WEIGHTS, "config": out / CONFIG}
    _atomic(paths["weights"], lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    save_sparse(state, paths["sparse"])
    _atomic(paths["config"], lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return paths


def load_export(out_dir: str | Path) -> VisionTransformer:
    """Rebuild an exported model from ``config.json`` and ``model.safetensors`` (strict), in eval mode."""
    out = Path(out_dir)
    config = json.loads((out / CONFIG).read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{out / CONFIG} is not an export config (expected format {EXPORT_FORMAT!r})")
    arch = config["architecture"]
    shape = dict(block_heads=arch["block_heads"], block_mlp_hidden=arch["block_mlp_hidden"],
                 head_dim=arch["head_dim"]) if config["compact"] else {}
    model = create_model(config["model"], num_classes=arch["num_classes"], img_size=arch["img_size"], **shape)
    if config["token_selection"]:
        apply_token_selection(model, TokenConfig(**config["token_selection"]))
    model.load_state_dict(load_file(out / config["weights"]))
    return model.eval()


def save_sparse(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Save a state_dict with every tensor that compresses as ``<name>::bits`` (packed non-zero bit mask) plus
    ``<name>::values``; the rest as they are. Zeros come back as +0.0 (masking leaves -0.0 for negative weights;
    storing that sign would cost the compression)."""
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        bits = tensor.element_size() * 8
        if not tensor.is_floating_point() or tensor.numel() == 0:
            tensors[name] = tensor
            continue
        keep = tensor.ne(0).flatten()
        if int(keep.sum()) * bits + tensor.numel() >= tensor.numel() * bits:  # a bit mask + values is no smaller
            tensors[name] = tensor
            continue
        tensors[f"{name}::bits"] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
        tensors[f"{name}::values"] = tensor.flatten()[keep].clone()
        sparse[name] = {"shape": list(tensor.shape)}
    metadata = {"format": SPARSE_FORMAT, "sparse": json.dumps(sparse)}
    path = Path(path)
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """The exact state_dict ``save_sparse`` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != SPARSE_FORMAT:
            raise ValueError(f"{path} is not a compressed sparse checkpoint (expected format {SPARSE_FORMAT!r})")
        raw = {key: f.get_tensor(key) for key in f.keys()}
    sparse = json.loads(metadata["sparse"])
    state: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name, _, part = key.partition("::")
        if not part:
            state[name] = tensor
        elif part == "values":
            shape = sparse[name]["shape"]
            numel = int(np.prod(shape))
            keep = torch.from_numpy(np.unpackbits(raw[f"{name}::bits"].numpy(), count=numel, bitorder="little")
                                    .astype(bool))
            dense = torch.zeros(numel, dtype=tensor.dtype)
            dense[keep] = tensor
            state[name] = dense.reshape(shape)
    return state


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
