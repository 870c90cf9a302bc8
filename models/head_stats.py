"""The model side of structured sparsity: which tensor slices make up each head and neuron, and per-head scores.

``structure_units(model, scaler)`` describes a timm ViT's units as plain dicts (FQNs, axes, widths), built from the
one definition of a head and a neuron in ``sparselearning.units``. So ``sparselearning`` can prune heads and neurons
without importing this package. Head scores come from hooks that leave the attention math untouched. A forward
pre-hook on ``attn.proj`` passes the merged head outputs O, exactly the input of ``proj``, through an identity
autograd function whose backward sees G = dLoss/dO. Nothing is installed until the structured sparsifier asks for it
(``StructureUnits.attach_stats``), so dense and unstructured runs pay nothing.
"""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Attention
from torch import nn

from models.wrappers import unwrap_model
from sparselearning.units import UnitGroup, head_dim_group, head_group, neuron_group


def prunable_blocks(model: nn.Module) -> list[tuple[str, Attention, Mlp]]:
    """(block FQN, its timm Attention, its timm Mlp) for every transformer block, checked to be prunable by unit.

    Raises:
        ValueError: for a block whose attention normalises or gates the merged heads, or whose MLP normalises the
            hidden layer or has an activation with act(0) != 0. Removing a unit would then change the others, or a
            pruned unit would not be silent.
    """
    net = unwrap_model(model)
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise ValueError(f"structured sparsity needs a timm VisionTransformer with .blocks, got {type(net).__name__}")
    found = []
    for i, blk in enumerate(blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if not isinstance(attn, Attention) or not isinstance(mlp, Mlp):
            raise ValueError(f"blocks.{i} must hold timm Attention and Mlp modules, got "
                             f"{type(attn).__name__} and {type(mlp).__name__}")
        if not isinstance(attn.norm, nn.Identity) or getattr(attn, "gate", None) is not None:
            raise ValueError(f"blocks.{i}.attn normalises or gates the merged heads, so heads cannot be scored or "
                             "removed one by one")
        if not isinstance(mlp.norm, nn.Identity) or float(mlp.act(torch.zeros(1))) != 0.0:
            raise ValueError(f"blocks.{i}.mlp normalises its hidden layer or has act(0) != 0, so pruned neurons "
                             "would not be silent")
        found.append((f"blocks.{i}", attn, mlp))
    return found


def block_units(name: str, attn: Attention, mlp: Mlp) -> tuple[UnitGroup, UnitGroup]:
    """The heads and the MLP neurons of block ``name``, as ``sparselearning.units`` defines them."""
    return (head_group(f"{name}.attn", attn.num_heads, attn.head_dim, qkv_bias=attn.qkv.bias is not None),
            neuron_group(f"{name}.mlp", mlp.fc1.out_features, fc1_bias=mlp.fc1.bias is not None))


def block_head_dims(name: str, attn: Attention) -> UnitGroup:
    """The head dimensions of block ``name`` (``--prune-head-dim``), as ``sparselearning.units`` defines them.

    Raises:
        ValueError: for an attention that normalises q or k over the head width (a removed dimension would change
            the others).
    """
    if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
        raise ValueError(f"{name}.attn normalises q or k over the head width, so its head dimensions cannot be "
                         "removed one by one; leave --prune-head-dim out")
    return head_dim_group(f"{name}.attn", attn.num_heads, attn.head_dim, qkv_bias=attn.qkv.bias is not None)


def unit_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Per block, its heads and its MLP neurons as plain dicts (the ``UnitGroup.from_dict`` format).

    A head h owns rows [h*d, (h+1)*d) of each of the q, k and v sections of ``qkv`` (weight and bias) and the same
    columns of ``proj``. Neuron i owns row i of ``fc1`` (weight and bias) and column i of ``fc2``. The roles say what
    is masked: ``in`` rows and ``bias`` by default, never the ``out`` columns.
    """
    return [group.to_dict() for name, attn, mlp in prunable_blocks(model) for group in block_units(name, attn, mlp)]


class _HeadScoreTap(torch.autograd.Function):
    """Identity on O whose backward also returns the batch's per-head sums as the gradient of a probe tensor.

    The sums then accumulate in ``probe.grad`` like any gradient: no tensor hook is registered during forward and no
    Python state is mutated during backward, so ``torch.compile`` traces a hooked model in one graph.
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, probe: torch.Tensor, num_heads: int) -> torch.Tensor:
        ctx.save_for_backward(out)  # proj saves the same tensor for its weight gradient: no extra memory
        ctx.num_heads = num_heads
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        with torch.autocast(grad.device.type, enabled=False):
            b, n, width = grad.shape
            g = grad.float().reshape(b, n, ctx.num_heads, width // ctx.num_heads)
            o = out.float().reshape(b, n, ctx.num_heads, width // ctx.num_heads)
            taylor = torch.einsum("bnhd,bnhd->bh", g, o).abs().sum(0)
            grad_l1 = g.abs().sum(dim=(0, 1, 3))
            return grad, torch.stack([taylor, grad_l1, torch.full_like(taylor, b)]), None


class HeadStats:
    """Per-head importance sums over the training samples of the optimizer steps since the last ``reset``.

    For each block and sample b, with O the merged head outputs (B x N x H*d) and G = dLoss/dO:
    ``taylor[h]`` adds |Σ_{n,l} G[b,n,h,l] * O[b,n,h,l]|, SViTE's first-order Taylor death score. ``grad_l1[h]`` adds
    Σ_{n,l} |G[b,n,h,l]|, its growth score. ``samples`` counts b. Both are computed in float32 and summed in float64
    on the model's device, without a host sync. Dividing by ``samples`` gives SViTE's per-sample batch mean,
    averaged over the whole window.

    A step's sums first collect in per-block probes and reach the window only through ``commit``, which the
    sparsifier calls from its optimizer post-step hook. So a step that the optimizer skipped never counts: a fused
    optimizer under GradScaler is stepped with ``found_inf`` set (``commit`` then adds nothing, decided on the
    device), and a non-fused one is not stepped at all (the next training forward discards the probes). Under a
    float16 ``GradScaler`` the captured G is scaled; ``commit`` divides by the scale of that step's loss, read as a
    device tensor before ``scaler.update()``. Non-finite sums are left out too. Passes without gradient (evaluation,
    EMA) are not counted. One training forward per optimizer step is assumed (no gradient accumulation).

    Args:
        model: the (possibly DDP-wrapped) timm ViT.
        scaler: the run's GradScaler, if any.
    """

    def __init__(self, model: nn.Module, scaler: torch.amp.GradScaler | None = None) -> None:
        self.scaler = scaler
        self.sums_: dict[str, dict[str, torch.Tensor]] = {}
        self.probes: dict[str, torch.Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for name, attn, _ in prunable_blocks(model):
            device = attn.proj.weight.device
            self.sums_[f"{name}.attn"] = {
                "taylor": torch.zeros(attn.num_heads, dtype=torch.float64, device=device),
                "grad_l1": torch.zeros(attn.num_heads, dtype=torch.float64, device=device),
                "samples": torch.zeros((), dtype=torch.float64, device=device),
            }
            self.probes[f"{name}.attn"] = self._new_probe(attn.num_heads, device)
            self.handles.append(attn.proj.register_forward_pre_hook(self._tap(f"{name}.attn", attn.num_heads)))
        self.handles.append(unwrap_model(model).register_forward_pre_hook(self._discard_pending))

    @staticmethod
    def _new_probe(num_heads: int, device: torch.device) -> torch.Tensor:
        """Rows taylor, grad_l1 and samples of the step being computed, filled as the probe's gradient."""
        return torch.zeros(3, num_heads, device=device, requires_grad=True)

    def _tap(self, name: str, num_heads: int):
        """The forward pre-hook of one ``proj``: routes O through ``_HeadScoreTap`` when a gradient will follow."""

        def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
            x = args[0]
            if not (torch.is_grad_enabled() and x.requires_grad):
                return None
            probe = self.probes[name]
            if probe.device != x.device:  # the model moved: the probe follows
                probe = self.probes[name] = self._new_probe(num_heads, x.device)
            return (_HeadScoreTap.apply(x, probe, num_heads), *args[1:])

        return pre_hook

    def _discard_pending(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of the model: a new training step starts, so sums of an uncommitted (skipped) step go."""
        if torch.is_grad_enabled():
            for probe in self.probes.values():
                probe.grad = None

    @torch.no_grad()
    def commit(self, found_inf: torch.Tensor | None = None) -> None:
        """Add the sums of the step just taken to the window, unless ``found_inf`` (GradScaler's flag, on the
        device) is nonzero or the sums are not finite. Call after the optimizer step, before ``scaler.update()``."""
        scale = self.scaler._get_scale_async() if self.scaler is not None and self.scaler.is_enabled() else None
        for name, probe in self.probes.items():
            pending = probe.grad
            if pending is None:
                continue
            probe.grad = None
            window = self.sums_[name]
            if window["taylor"].device != pending.device:
                window.update({key: value.to(pending.device) for key, value in window.items()})
            values = pending.double()
            if scale is not None:
                values[:2] /= scale.to(values.device, torch.float64)
            keep = torch.isfinite(values).all()
            if found_inf is not None:
                keep &= found_inf.to(values.device) == 0
            values = torch.where(keep, values, 0.0)
            window["taylor"] += values[0]
            window["grad_l1"] += values[1]
            window["samples"] += values[2, 0]

    def sums(self) -> dict[str, dict[str, torch.Tensor]]:
        """Attention FQN (``blocks.3.attn``) -> ``taylor`` [H], ``grad_l1`` [H], ``samples`` (0-d); live tensors."""
        return self.sums_

    def reset(self) -> None:
        """Start a new window (the sparsifier calls this after each topology update)."""
        for sums in self.sums_.values():
            for value in sums.values():
                value.zero_()

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The running sums as CPU tensors (an open window survives a checkpoint, so resume is exact)."""
        return {name: {key: value.detach().to("cpu", copy=True) for key, value in sums.items()}
                for name, sums in self.sums_.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore ``state_dict()`` output into the live tensors (names and shapes checked)."""
        if state.keys() != self.sums_.keys():
            raise ValueError(f"head statistics are for {sorted(state)}, this model has {sorted(self.sums_)}")
        for name, sums in self.sums_.items():
            for key, value in sums.items():
                if state[name][key].shape != value.shape:
                    raise ValueError(f"head statistics {name}.{key} have shape {tuple(state[name][key].shape)}, "
                                     f"expected {tuple(value.shape)}")
                value.copy_(state[name][key])

    def remove(self) -> None:
        """Uninstall the hooks (the window sums stay readable)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class StructureUnits:
    """The adapter ``sparselearning.build_sparsifier(..., units=...)`` reads for ``--pruning_type structure``.

    ``groups`` is computed eagerly: it is cheap, and a model that cannot be pruned by unit fails early. The score hooks
    are installed only by ``attach_stats``.

    Args:
        model: the (possibly DDP-wrapped) timm ViT.
        scaler: the run's GradScaler, so that head scores are unscaled.
    """

    def __init__(self, model: nn.Module, scaler: torch.amp.GradScaler | None = None) -> None:
        self.model = model
        self.scaler = scaler
        self.groups = unit_groups(model)

    def attach_stats(self) -> HeadStats:
        """Install the head-score hooks and return the object they fill."""
        return HeadStats(self.model, self.scaler)


def structure_units(model: nn.Module, scaler: torch.amp.GradScaler | None = None) -> StructureUnits:
    """The head and neuron layout of a timm ViT, plus on-demand score hooks, for ``build_sparsifier(units=...)``."""
    return StructureUnits(model, scaler)
