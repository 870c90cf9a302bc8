"""What a topology update does to the optimizer state, for every granularity.

The state is kept (SViTE's handling). Masked weights receive dense gradients, so the moments of a regrown weight are
valid statistics of its gradient, and AdamW's per-tensor ``step`` matches them; zeroing them while ``step`` kept
counting left regrown weights without bias correction (2-3x the survivors' steps). SGD's momentum is kept likewise.

The one exception is an entry whose gradient was gated while its unit was pruned: a pruned head's own zero weights
leave its q and k rows without any gradient, so their second moment is zero or decayed while AdamW's ``step`` has long
ended the bias correction, and kept or zeroed such rows step about 2x more than the survivors. Those entries of a
unit that joined restart, on the first optimizer step after the update, from that step's gradient (``exp_avg`` = g,
``exp_avg_sq`` = g², so the step is Adam's bias-corrected first step, sign(g) * lr). Weights never have a gated
gradient, so unstructured sparsity restarts nothing.
"""
from __future__ import annotations

import torch

GATED_SECOND_MOMENT = 1e-3
"""An Adam second moment below this fraction of the squared gradient marks an entry whose gradient was gated while its
unit was pruned; a valid running mean of g² is practically never that far below one sample of g²."""


@torch.no_grad()
def restart_gated_entries(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """From an optimizer pre-step hook: restart the Adam state of ``param``'s entries at ``where`` (a bool mask of
    joined units' entries) whose second moment shows a gated gradient.

    Entries with a valid second moment (v rows, fc1 rows: dense gradients) keep it. Non-Adam state is left alone:
    SGD's momentum is zero where the gradient was gated, which is how torch starts a new buffer. Under GradScaler
    with a fused optimizer the gradients are still scaled here and the step may be skipped: they are unscaled with
    ``optimizer.grad_scale``, and nothing changes where ``optimizer.found_inf`` is set.
    """
    state = optimizer.state.get(param)
    if not state or param.grad is None:
        return
    scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
    if found_inf is not None:
        where = where & (found_inf.to(param.device) == 0)
    second = state.get("exp_avg_sq")
    if not isinstance(second, torch.Tensor) or second.shape != param.shape:
        return
    grad = param.grad.float() if scale is None else param.grad.float() / scale.to(param.device)
    square = grad.square()
    where = where & (second < GATED_SECOND_MOMENT * square)
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            value.copy_(torch.where(where, (grad if key == "exp_avg" else square).to(value.dtype), value))
