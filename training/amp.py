"""Mixed precision and optimizer-kernel defaults, chosen from what the device supports.

bf16 autocast needs no loss scaling, so it is the default wherever the device has bf16 kernels; fp16 with a
``GradScaler`` (as the original's apex AMP) is the fallback. On CUDA the fused optimizer kernel is the default: the
unfused path under ``GradScaler`` syncs with the host every step to check for inf gradients.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from timm.optim import get_optimizer_info

AMP_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class Precision:
    """What a run trains with: the autocast dtype (None: float32), loss scaling, and the fused optimizer kernel."""

    amp_dtype: torch.dtype | None
    grad_scaler: bool
    fused: bool

    def flags(self) -> dict[str, object]:
        """The resolved ``--amp``, ``--amp-dtype`` and ``--opt-fused`` values, for config.json and the checkpoint."""
        name = None if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.")
        return {"amp": self.amp_dtype is not None, "amp_dtype": name, "opt_fused": self.fused}

    def __str__(self) -> str:
        amp = "off (float32)" if self.amp_dtype is None else self.flags()["amp_dtype"]
        return (f"AMP {amp}, GradScaler {'on' if self.grad_scaler else 'off'}, "
                f"{'fused' if self.fused else 'unfused'} optimizer kernel")


def choose_precision(device_type: str, bf16_supported: bool, opt_supports_fused: bool, amp: bool | None = None,
                     amp_dtype: str | None = None, opt_fused: bool | None = None) -> Precision:
    """The run's precision from the device's capabilities and the flags (None: the default).

    Args:
        device_type: "cuda" or "cpu" (AMP and the fused kernel default to on for CUDA only).
        bf16_supported: the device has bf16 kernels (``torch.cuda.is_bf16_supported()`` on CUDA).
        opt_supports_fused: the optimizer class takes ``fused=True`` (torch Adam, AdamW, SGD).
        amp: ``--amp`` / ``--no-amp``.
        amp_dtype: ``--amp-dtype``; by default bfloat16 where supported, else float16.
        opt_fused: ``--opt-fused`` / ``--no-opt-fused``.

    Raises:
        ValueError: for an unknown dtype, or a fused kernel the optimizer does not have.
    """
    if amp_dtype is not None and amp_dtype not in AMP_DTYPES:
        raise ValueError(f"--amp-dtype must be one of {AMP_DTYPES}, got {amp_dtype!r}")
    if opt_fused and not opt_supports_fused:
        raise ValueError("--opt-fused needs an optimizer with a fused kernel (--opt adamw, adam, sgd or momentum); "
                         "drop --opt-fused or change --opt")
    enabled = amp if amp is not None else device_type == "cuda"
    dtype = None
    if enabled:
        dtype = getattr(torch, amp_dtype or ("bfloat16" if bf16_supported else "float16"))
    fused = opt_fused if opt_fused is not None else (device_type == "cuda" and opt_supports_fused)
    return Precision(amp_dtype=dtype, grad_scaler=dtype == torch.float16, fused=fused)


def device_supports_bf16(device: torch.device) -> bool:
    """bf16 autocast has kernels on every CPU build; on CUDA it needs compute capability 8.0 (Ampere) or newer."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def optimizer_supports_fused(opt: str) -> bool:
    """Whether timm's optimizer ``opt`` (e.g. "adamw", "lookahead_adamw") is a torch class with a fused kernel."""
    try:
        opt_class = get_optimizer_info(opt.lower().split("_")[-1]).opt_class
    except (ValueError, KeyError):
        return False  # an unknown name: create_optimizer_v2 reports it
    return isinstance(opt_class, type) and "fused" in inspect.signature(opt_class.__init__).parameters
