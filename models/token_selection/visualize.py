"""Pictures of token selection: validation images beside the same images with the dropped patches greyed out."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from models.token_selection.selector import TokenScorer
from models.wrappers import unwrap_model


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
