"""timm's Mixup split into its random draw and its mixing, so that a step's draw can be stored and replayed.

Stored teacher outputs (training/teacher_topk.py) describe the mixed images the teacher saw, so a run that trains on
them must mix its batches the same way. timm's ``Mixup.__call__`` draws λ, mixup-or-cutmix and the cutmix box from
NumPy's global generator and mixes in one go. ``draw`` makes exactly timm's draws, in timm's order, with timm's own
functions; ``mix`` mixes a batch with a draw exactly as timm does (the same in-place operations, the same float32
λ per element), pairing sample i with sample B-1-i. With the same NumPy state, ``mix(x, draw(mixup, x.shape))``
equals ``mixup(x, y)`` bit for bit in every mode (tests/test_teacher_topk.py), and a stored draw mixes the same
batch into the same bits in any later run.
"""
from __future__ import annotations

import numpy as np
import torch
from timm.data import Mixup
from timm.data.mixup import cutmix_bbox_and_lam

MIX_RECORD = np.dtype([("lam", "<f8"), ("cutmix", "u1"), ("box", "<i4", (4,))])
"""One draw: λ (after timm's cutmix area correction), whether it cuts, and the box (y_low, y_high, x_low, x_high)."""

MODES = ("batch", "pair", "elem")


def draws_per_step(mode: str, batch_size: int) -> int:
    """How many draws one step makes: one for the batch, one per pair (i, B-1-i), or one per sample."""
    return {"batch": 1, "pair": batch_size // 2, "elem": batch_size}[mode]


def draw(mixup: Mixup, batch_shape: tuple[int, ...]) -> np.ndarray:
    """One step's draws for a batch of ``batch_shape`` [B, C, H, W], from NumPy's global generator as timm draws them.

    Returns:
        ``MIX_RECORD`` array of ``draws_per_step(mixup.mode, B)`` entries; λ = 1 means that entry is not mixed.
    """
    if mixup.mode == "batch":
        lam, use_cutmix = mixup._params_per_batch()
        lams, cuts = np.array([lam], dtype=np.float64), np.array([use_cutmix])
        box_shape = tuple(batch_shape)
    else:
        lams, cuts = mixup._params_per_elem(draws_per_step(mixup.mode, batch_shape[0]))  # float32, as timm mixes
        box_shape = tuple(batch_shape[1:])
    out = np.zeros(len(lams), dtype=MIX_RECORD)
    for i, (lam, cut) in enumerate(zip(lams, cuts)):
        if lam != 1.0 and cut:  # timm draws a box only for a mixed entry that cuts
            box, lam = cutmix_bbox_and_lam(box_shape, lam, ratio_minmax=mixup.cutmix_minmax,
                                           correct_lam=mixup.correct_lam)
            out["box"][i], out["cutmix"][i] = box, 1
        out["lam"][i] = lam
    return out


def mix(x: torch.Tensor, draws: np.ndarray, mode: str) -> float | torch.Tensor:
    """Mix the batch ``x`` [B, C, H, W] in place with one step's ``draws``, as timm's Mixup does.

    Returns:
        λ for timm's ``mixup_target``: a float (mode batch) or a [B, 1] tensor of ``x``'s dtype.
    """
    if mode == "batch":
        lam = float(draws["lam"][0])
        if lam == 1.0:
            return 1.0
        if draws["cutmix"][0]:
            yl, yh, xl, xh = draws["box"][0].tolist()
            x[:, :, yl:yh, xl:xh] = x.flip(0)[:, :, yl:yh, xl:xh]
        else:
            x_flipped = x.flip(0).mul_(1.0 - lam)
            x.mul_(lam).add_(x_flipped)
        return lam
    lam_batch = draws["lam"].astype(np.float32)  # timm keeps per-element λ in float32 and mixes with it
    x_orig = x.clone()
    both = mode == "pair"
    for i in range(len(draws)):
        j = len(x) - i - 1
        lam = lam_batch[i]
        if lam == 1.0:
            continue
        if draws[i]["cutmix"]:
            yl, yh, xl, xh = draws[i]["box"].tolist()
            x[i][:, yl:yh, xl:xh] = x_orig[j][:, yl:yh, xl:xh]
            if both:
                x[j][:, yl:yh, xl:xh] = x_orig[i][:, yl:yh, xl:xh]
        else:
            x[i] = x[i] * lam + x_orig[j] * (1 - lam)
            if both:
                x[j] = x[j] * lam + x_orig[i] * (1 - lam)
    if both:
        lam_batch = np.concatenate((lam_batch, lam_batch[::-1]))
    return torch.tensor(lam_batch, device=x.device, dtype=x.dtype).unsqueeze(1)
