"""What a run writes besides checkpoints, shared by training (at its end) and checkpoint_tool.py: the compacted
structured model and the token-selection pictures."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

import models


def print_compaction(model: nn.Module, compact: nn.Module, path: Path) -> None:
    """Params and MACs of a compacted structured model against the dense model it came from."""
    dense, small = models.mac_summary(model), models.mac_summary(compact)
    arch = models.architecture(compact)
    print(f"compact model written to {path}: heads per block {arch['block_heads']}, "
          f"MLP widths {arch['block_mlp_hidden']}\n"
          f"  params {small['params']:,.0f} vs dense {dense['params']:,.0f} ({small['params'] / dense['params']:.3f}x); "
          f"GMACs {small['gmacs_executed']:.4f} vs dense {dense['gmacs_dense']:.4f} "
          f"({small['gmacs_executed'] / dense['gmacs_dense']:.3f}x)")


def draw_tokens(model: nn.Module, val_loader, count: int, output_dir: Path, device: torch.device) -> list[Path]:
    """--visualize-tokens: the first ``count`` validation images with their dropped patches greyed out."""
    images = torch.stack([val_loader.dataset[i][0] for i in range(count)]).to(device)
    written = models.visualize_tokens(model, images, output_dir / "tokens" / "val")
    print(f"token selection pictures: {len(written)} PNGs in {output_dir / 'tokens'}")
    return written
