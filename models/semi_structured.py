"""2:4 inference on sparse tensor cores: the 2:4-masked linears of a model as torch's semi-structured sparse weights.

``torch.sparse.to_sparse_semi_structured`` runs on CUDA GPUs of compute capability 8.0 or later (Ampere, Hopper)
with float16 or bfloat16 weights (cuSPARSELt, or CUTLASS). Anywhere else the model stays dense, which computes the
same logits, and the result says why. A linear qualifies when at most 2 of every 4 consecutive input weights are
non-zero: the kernels keep 2 values per group, so a denser weight would be computed wrong and is never converted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class SemiStructured:
    """What ``to_semi_structured`` did: the converted linears, the 2:4 linears the kernels refused (name -> why),
    and, when nothing could be converted on this device or dtype, the reason."""

    converted: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    reason: str | None = None

    def summary(self) -> str:
        """One line for the console."""
        if self.reason is not None:
            return f"2:4 kernels not used, the model runs dense: {self.reason}"
        line = f"2:4 kernels: {len(self.converted)} linear layers converted to semi-structured sparse weights"
        if self.refused:
            name, why = next(iter(self.refused.items()))
            line += f"; {len(self.refused)} left dense (e.g. {name}: {why})"
        return line


def unsupported_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why 2:4 kernels cannot run on ``device`` with ``dtype`` weights, or None when they can."""
    if device.type != "cuda":
        return (f"torch.sparse.to_sparse_semi_structured runs on CUDA GPUs only, and this model is on {device}")
    if dtype not in HALF_DTYPES:
        return (f"the 2:4 kernels take float16 or bfloat16 weights, not {str(dtype).removeprefix('torch.')}; "
                "evaluate with --amp (bfloat16 or float16)")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"sparse tensor cores need compute capability 8.0 or later (Ampere, Hopper); "
                f"{torch.cuda.get_device_name(device)} has {major}.{minor}")
    return None


def two_four_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` modules whose weight has at most 2 non-zeros in every 4 consecutive inputs."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module.in_features % 4 == 0
            and bool((module.weight.detach().ne(0).reshape(-1, 4).sum(1) <= 2).all())]


@torch.no_grad()
def to_semi_structured(model: nn.Module, dtype: torch.dtype) -> SemiStructured:
    """Cast ``model`` to ``dtype`` and give every 2:4 linear a semi-structured sparse weight, in place, where the
    device supports it; otherwise leave the model untouched and return the reason. Weights become frozen
    (inference only)."""
    device = next(model.parameters()).device
    reason = unsupported_reason(device, dtype)
    if reason is not None:
        return SemiStructured(reason=reason)
    from torch.sparse import to_sparse_semi_structured

    names = two_four_linears(model)
    model.to(dtype)
    result = SemiStructured()
    for name in names:
        module = model.get_submodule(name)
        try:
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
        except RuntimeError as refused:  # e.g. a shape below the kernels' minimum tile
            result.refused[name] = str(refused).splitlines()[0]
            continue
        result.converted.append(name)
    if not names:
        result.reason = "no linear layer has at most 2 non-zeros in every 4 consecutive input weights"
    return result
