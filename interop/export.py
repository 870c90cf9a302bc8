"""Export a model to take elsewhere: safetensors weights plus a JSON config, and a compressed sparse checkpoint.

``model.safetensors`` holds the state_dict with timm's key names. A dense or unstructured model without token
selectors and with the same head count and MLP width in every block is a plain timm ``VisionTransformer``:
``export_model`` records (in ``config.json``) and ``export_message`` prints the complete Python that rebuilds it with
timm and loads the weights strictly, with the absolute path and every architecture argument that differs from the
timm default (``img_size``, ``num_classes``, ...). A strict load matters: timm's ``pretrained=True`` route resizes a
position embedding of another resolution without a word, so a snippet missing ``img_size`` would load a different
model silently.

Every export (compact and token-selecting models too) loads with ``load_export(dir)``, which rebuilds the model
through ``models.create_model`` from ``config.json``; a masked model with pruned embedding channels gets back its
kept-channel LayerNorms from the weights' zeros (timm alone cannot express them).

``model.sparse.safetensors`` stores each mostly-zero tensor as a bit mask of its non-zero entries plus those
entries' values, so a 50%-dense model takes about 0.53x the dense size; ``load_sparse`` restores it bit for bit, and
``--resume`` accepts it like any checkpoint. Given the training masks, a masked tensor is stored under its mask (so
the masks come back with ``load_sparse_masks``), and an N:M-masked one in the N:M layout of ``interop.nm_format``
(2:4: half the values plus 4 bits of positions per group). Both files are safetensors: reading them never unpickles
anything.
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

from interop.nm_format import pack_nm, unpack_nm
from models.channel_units import pruned_channels, restore_kept_channels
from models.token_selection import TokenConfig, apply_token_selection, token_scorers
from models.vit import (DEIT_MODELS, DISTILLED_SUFFIX, SMALL_DISTILLED, SMALL_MODELS, architecture, count_parameters,
                        create_model)
from sparselearning.nm import is_nm, parse_nm

EXPORT_FORMAT = "svite.export/1"
SPARSE_FORMAT = "svite.sparse/1"
WEIGHTS, SPARSE_WEIGHTS, CONFIG = "model.safetensors", "model.sparse.safetensors", "config.json"


def export_model(model: VisionTransformer, model_name: str, tokens: TokenConfig, out_dir: str | Path,
                 masks: dict[str, torch.Tensor] | None = None, nm: str | None = None) -> dict[str, Path]:
    """Write ``model.safetensors``, ``model.sparse.safetensors`` and ``config.json`` into ``out_dir``.

    Args:
        model: the model as evaluated (masked, compact, with or without selectors).
        model_name: the ``--model`` it was built as; for compact models the name of the model it was pruned from.
        tokens: its token selection (stored so ``load_export`` reinstalls the selectors).
        out_dir: created if missing.
        masks: the training masks by parameter name, stored in the sparse file (``save_sparse``).
        nm: the run's N:M pattern (``"2:4"``), recorded in ``config.json``; its masks are stored in the N:M layout.

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
    compact = any(arch[key] != full[key] for key in ("block_heads", "block_mlp_hidden", "embed_dim", "block_head_dim"))
    channels = pruned_channels(model)  # a masked model with pruned embedding channels: kept-channel norms
    timm_loadable = (base in (*DEIT_MODELS, *SMALL_MODELS, *SMALL_DISTILLED) and not compact and channels is None
                     and not token_scorers(model))
    total, nonzero = count_parameters(model)
    config: dict[str, Any] = {
        "format": EXPORT_FORMAT, "model": base, "architecture": arch, "compact": compact,
        "token_selection": tokens.to_dict() if tokens.enabled else None,
        "embed_channels_kept": None if channels is None else channels.numel(),
        "params": total, "params_nonzero": nonzero, "weights": WEIGHTS, "sparse_weights": SPARSE_WEIGHTS,
        "timm_loadable": timm_loadable, "nm": nm,
    }
    paths = {"weights": out / WEIGHTS, "sparse": out / SPARSE_WEIGHTS, "config": out / CONFIG}
    config["load_with_timm"] = timm_snippet(base, arch, paths["weights"].resolve()) if timm_loadable else None
    config["load_with_this_project"] = project_snippet(out.resolve())
    _atomic(paths["weights"], lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    save_sparse(state, paths["sparse"], masks, nm)
    _atomic(paths["config"], lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return paths


def timm_snippet(model_name: str, arch: dict[str, Any], weights: Path) -> str:
    """Python that rebuilds ``model_name`` with timm alone and loads ``weights`` strictly, in eval mode.

    DeiT names go through ``timm.create_model`` with the resolution and class count spelled out; the DIGITS
    configurations are not registered with timm, so they are built as ``VisionTransformer`` (distilled:
    ``VisionTransformerDistilled``) with every argument of their architecture.
    """
    size = arch["img_size"]
    if model_name in DEIT_MODELS:
        imports = "import timm"
        build = f"timm.create_model({model_name!r}, num_classes={arch['num_classes']}, img_size={size})"
    else:
        distilled = model_name in SMALL_DISTILLED
        cls, module = ("VisionTransformerDistilled", "deit") if distilled else ("VisionTransformer", "vision_transformer")
        imports = f"from timm.models.{module} import {cls}"
        kwargs = {**SMALL_MODELS[model_name.removesuffix(DISTILLED_SUFFIX)], "img_size": size,
                  "num_classes": arch["num_classes"]}
        build = f"{cls}(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    return "\n".join([
        imports,
        "from safetensors.torch import load_file",
        f"model = {build}",
        f"model.load_state_dict(load_file({str(weights)!r}))",
        f"model.eval()  # input: (N, 3, {size}, {size}) images normalised with ImageNet mean/std, as in training",
    ])


def project_snippet(out_dir: Path) -> str:
    """Python that rebuilds any export (compact, token-selecting) through this checkout's ``interop`` package."""
    return "\n".join([
        "import sys",
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})  # this checkout",
        "from interop import load_export",
        f"model = load_export({str(out_dir)!r})",
    ])


def export_message(paths: dict[str, Path]) -> str:
    """What ``--export`` prints at the end: the files written and the complete code that loads them."""
    config = json.loads(paths["config"].read_text())
    lines = [f"exported to {paths['config'].parent.resolve()}: "
             + ", ".join(f"{p.name} ({p.stat().st_size:,} bytes)" for p in paths.values())]
    if config["load_with_timm"]:
        lines += ["", "load it with timm alone (copy and paste into Python):", "", config["load_with_timm"], "",
                  "or with this checkout:", "", config["load_with_this_project"]]
    else:
        why = ("per-block head counts, head widths or MLP widths" if config["compact"] else
               "LayerNorms over the kept embedding channels of a masked model (its compact.pth has none)"
               if config.get("embed_channels_kept") else "a token selector")
        lines += ["", f"timm's VisionTransformer cannot express {why}; load it with this checkout "
                      "(copy and paste into Python):", "", config["load_with_this_project"]]
    return "\n".join(lines)


def load_export(out_dir: str | Path) -> VisionTransformer:
    """Rebuild an exported model from ``config.json`` and ``model.safetensors`` (strict), in eval mode."""
    out = Path(out_dir)
    config = json.loads((out / CONFIG).read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{out / CONFIG} is not an export config (expected format {EXPORT_FORMAT!r})")
    arch = config["architecture"]
    shape = dict(block_heads=arch["block_heads"], block_mlp_hidden=arch["block_mlp_hidden"],
                 head_dim=arch["head_dim"], embed_dim=arch["embed_dim"],
                 block_head_dim=arch.get("block_head_dim")) if config["compact"] else {}
    model = create_model(config["model"], num_classes=arch["num_classes"], img_size=arch["img_size"], **shape)
    if config["token_selection"]:
        apply_token_selection(model, TokenConfig(**config["token_selection"]))
    model.load_state_dict(load_file(out / config["weights"]))
    restore_kept_channels(model)
    return model.eval()


def is_sparse_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file that ``save_sparse`` wrote (its metadata says so)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == SPARSE_FORMAT
    except (SafetensorError, OSError, ValueError):
        return False  # not readable as safetensors: the checkpoint reader names the problem


def export_args(path: str | Path) -> dict[str, Any]:
    """The flags recorded for an exported weights file by the ``config.json`` beside it (``model`` and the token
    selection), so that ``--resume`` on an export needs no flags the export already knows; {} for any other file."""
    path = Path(path)
    try:
        config = json.loads((path.parent / CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT \
            or path.name not in (config.get("weights"), config.get("sparse_weights")):
        return {}
    tokens = config.get("token_selection")
    return {"model": config["model"], **(TokenConfig(**tokens).as_flags() if tokens else {})}


def export_architecture(path: str | Path) -> dict[str, Any] | None:
    """The architecture (``models.compact_architecture`` form) the ``config.json`` beside an exported weights file
    records when the export is a compact model, else None: its per-block head widths are not in the weights."""
    path = Path(path)
    try:
        config = json.loads((path.parent / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT or not config.get("compact") \
            or path.name not in (config.get("weights"), config.get("sparse_weights")):
        return None
    return {"model": config["model"], **config["architecture"]}


def save_sparse(state_dict: dict[str, torch.Tensor], path: str | Path,
                masks: dict[str, torch.Tensor] | None = None, nm: str | None = None) -> Path:
    """Save a state_dict with every tensor that compresses as ``<name>::bits`` (packed non-zero bit mask) plus
    ``<name>::values``; the rest as they are. Zeros come back as +0.0 (masking leaves -0.0 for negative weights;
    storing that sign would cost the compression).

    A tensor with an entry in ``masks`` whose weights are zero outside it is stored under that mask (recorded, so
    ``load_sparse_masks`` returns it): as ``<name>::nm_values`` plus ``<name>::nm_positions`` when the mask is ``nm``
    (``"N:M"``), else as bits and values. Weights that do not follow their mask are stored by their non-zeros: the
    weights are what runs."""
    pattern = parse_nm(nm) if nm else None
    tensors: dict[str, torch.Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        bits = tensor.element_size() * 8
        if not tensor.is_floating_point() or tensor.numel() == 0:
            tensors[name] = tensor
            continue
        mask = (masks or {}).get(name)
        mask = None if mask is None or bool((tensor.ne(0) & ~mask.cpu()).any()) else mask.cpu()
        if mask is not None and pattern is not None and is_nm(mask, *pattern):
            tensors[f"{name}::nm_values"], tensors[f"{name}::nm_positions"] = pack_nm(tensor, mask, *pattern)
            sparse[name] = {"shape": list(tensor.shape), "nm": list(pattern), "mask": True}
            continue
        keep = tensor.ne(0).flatten() if mask is None else mask.flatten()
        if int(keep.sum()) * bits + tensor.numel() >= tensor.numel() * bits:  # a bit mask + values is no smaller
            tensors[name] = tensor
            continue
        tensors[f"{name}::bits"] = torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
        tensors[f"{name}::values"] = tensor.flatten()[keep].clone()
        sparse[name] = {"shape": list(tensor.shape), "mask": mask is not None}
    metadata = {"format": SPARSE_FORMAT, "sparse": json.dumps(sparse)}
    path = Path(path)
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def load_sparse(path: str | Path) -> dict[str, torch.Tensor]:
    """The exact state_dict ``save_sparse`` wrote."""
    return _read_sparse(path)[0]


def load_sparse_masks(path: str | Path) -> dict[str, torch.Tensor]:
    """The training masks ``save_sparse`` stored (name -> bool tensor); {} for a file written without masks."""
    return _read_sparse(path)[1]


def _read_sparse(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != SPARSE_FORMAT:
            raise ValueError(f"{path} is not a compressed sparse checkpoint (expected format {SPARSE_FORMAT!r})")
        raw = {key: f.get_tensor(key) for key in f.keys()}
    sparse = json.loads(metadata["sparse"])
    state: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        name, _, part = key.partition("::")
        if not part:
            state[name] = tensor
        elif part == "nm_values":
            state[name], masks[name] = unpack_nm(tensor, raw[f"{name}::nm_positions"], sparse[name]["shape"],
                                                 *sparse[name]["nm"])
        elif part == "values":
            shape = sparse[name]["shape"]
            numel = int(np.prod(shape))
            keep = torch.from_numpy(np.unpackbits(raw[f"{name}::bits"].numpy(), count=numel, bitorder="little")
                                    .astype(bool))
            dense = torch.zeros(numel, dtype=tensor.dtype)
            dense[keep] = tensor
            state[name] = dense.reshape(shape)
            if sparse[name].get("mask"):
                masks[name] = keep.reshape(shape)
    return state, masks


def _atomic(path: Path, write) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
