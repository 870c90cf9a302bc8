"""The mask set: boolean masks keyed by parameter FQN, enforced on the weights by an optimizer post-step hook.

Masks live here, not in the model, so the model's ``state_dict`` keys stay timm-compatible. Gradients stay dense
(growth needs them) and the weights are re-masked after every optimizer step, which also undoes weight decay and
Adam updates at masked positions.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sparselearning.criteria import derive_seed, random_scores, topk_mask


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameter names are the canonical FQNs: strips DDP/DataParallel and ``torch.compile``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_maskable(name: str, param: torch.Tensor) -> bool:
    """SViTE's default set: every 2-D or 4-D weight (Linear, Conv2d, incl. patch embedding and head).

    Biases and norms (1-D) and cls/pos tokens (3-D) are excluded by shape, token-selector parameters by the
    ``gumbel`` name.
    """
    return param.dim() in (2, 4) and "gumbel" not in name


def select_parameters(
    model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> dict[str, nn.Parameter]:
    """The parameters to mask, by FQN, in ``named_parameters`` order.

    Start from the maskable set (``is_maskable``); if ``include`` is given keep only names matching one of its
    patterns, then drop names matching an ``exclude`` pattern. Patterns are ``fnmatch`` globs on the FQN
    (case-sensitive, ``*`` also matches dots). Neither list can add a tensor outside the maskable set.

    Args:
        model: the model (DDP or compiled wrappers are unwrapped).
        include: glob patterns; empty means every maskable tensor.
        exclude: glob patterns to remove.

    Raises:
        ValueError: if a pattern matches no maskable tensor, or nothing is left to mask.
    """
    maskable = {name: p for name, p in unwrap_model(model).named_parameters() if is_maskable(name, p)}
    for flag, patterns in (("sparse_include", include), ("sparse_exclude", exclude)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in maskable):
                raise ValueError(
                    f"{flag} pattern {pattern!r} matches no maskable parameter (2-D/4-D weights without 'gumbel'); "
                    f"maskable names are e.g. {', '.join(list(maskable)[:4]) or '(none)'}"
                )
    selected = {
        name: p
        for name, p in maskable.items()
        if (not include or any(fnmatch.fnmatchcase(name, pat) for pat in include))
        and not any(fnmatch.fnmatchcase(name, pat) for pat in exclude)
    }
    if not selected:
        raise ValueError(
            f"no parameter left to mask (include={list(include)}, exclude={list(exclude)}); "
            "the model needs at least one 2-D or 4-D weight"
        )
    return selected


def exact_mask(shape: torch.Size, count: int, seed: int) -> torch.Tensor:
    """A bool mask with exactly ``count`` True entries at uniformly random positions drawn from ``seed`` (on CPU)."""
    return topk_mask(random_scores(shape, seed), count)


def momentum_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> torch.Tensor:
    """The optimizer's first moment for ``param``: Adam(W) ``exp_avg`` or SGD ``momentum_buffer``."""
    state = optimizer.state.get(param, {})
    for key in ("exp_avg", "momentum_buffer"):
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.shape == param.shape:
            return value
    raise RuntimeError(
        f"momentum growth needs an 'exp_avg' (Adam) or 'momentum_buffer' (SGD with momentum) state tensor, but "
        f"{type(optimizer).__name__} holds {sorted(state) or 'no state'} for this parameter"
    )


class MaskSet:
    """Bool masks (True = active) for named parameters, the explored ("fired") masks, and their enforcement.

    Masks are updated in place, so the tensors captured by the optimizer hook stay valid.

    Args:
        params: FQN -> parameter to mask.
        masks: FQN -> initial bool mask (same shapes; moved to each parameter's device).
    """

    def __init__(self, params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]) -> None:
        if params.keys() != masks.keys():
            raise ValueError("params and masks must have the same names")
        self.params = dict(params)
        self.masks = {name: masks[name].to(device=p.device, dtype=torch.bool) for name, p in self.params.items()}
        for name, p in self.params.items():
            if self.masks[name].shape != p.shape:
                raise ValueError(f"mask of {name} has shape {tuple(masks[name].shape)}, parameter {tuple(p.shape)}")
        self.fired = {name: m.clone() for name, m in self.masks.items()}
        self._pairs = [(self.params[name], self.masks[name]) for name in self.params]

    @classmethod
    def random(cls, params: Mapping[str, nn.Parameter], counts: Mapping[str, int], seed: int) -> MaskSet:
        """Masks with exactly ``counts[name]`` active weights each, at positions drawn from (seed, name)."""
        masks = {name: exact_mask(p.shape, counts[name], derive_seed(seed, name, "init")) for name, p in params.items()}
        return cls(params, masks)

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked weight in place (the post-step hook: no host sync, no allocation on GPU)."""
        for param, mask in self._pairs:
            param.mul_(mask)

    @torch.no_grad()
    def mask_momentum_(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero SGD ``momentum_buffer`` at masked positions (looked up each time: loading optimizer state replaces
        the buffers)."""
        for param, mask in self._pairs:
            buffer = optimizer.state.get(param, {}).get("momentum_buffer")
            if isinstance(buffer, torch.Tensor):
                buffer.mul_(mask)

    def attach(self, optimizer: torch.optim.Optimizer, mask_momentum: bool) -> torch.utils.hooks.RemovableHandle:
        """Enforce the masks after every ``optimizer.step()``.

        Args:
            optimizer: the optimizer that updates the masked parameters.
            mask_momentum: also zero SGD ``momentum_buffer`` at masked positions every step (SViTE did this).
        """
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.params.items() if id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"masked parameters {missing[:4]} are not in the optimizer; exclude them with sparse_exclude or pass "
                "the optimizer that trains them"
            )

        def hook(opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.apply_()
            if mask_momentum:
                self.mask_momentum_(opt)

        return optimizer.register_step_post_hook(hook)

    def counts(self) -> dict[str, int]:
        """Active weights per layer (one host sync per layer; for updates and reports only)."""
        return {name: int(torch.count_nonzero(m)) for name, m in self.masks.items()}

    def fired_count(self) -> int:
        """Weights that were active at some point (the ITOP "explored" count)."""
        return sum(int(torch.count_nonzero(m)) for m in self.fired.values())

    def checksum(self) -> torch.Tensor:
        """Per layer [active count, sum of active flat indices, explored count], float64 on CPU (exact below 2**53).

        Two masks with the same checksum almost surely agree; a real difference shows up in the index sum.
        """
        rows = []
        for name, m in self.masks.items():
            flat = m.reshape(-1)
            rows.append([float(torch.count_nonzero(flat)), float(flat.nonzero().sum()),
                         float(torch.count_nonzero(self.fired[name]))])
        return torch.tensor(rows, dtype=torch.float64).reshape(-1)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Masks and explored masks as CPU bool tensors keyed by FQN."""
        return {
            "masks": {name: m.detach().to("cpu", copy=True) for name, m in self.masks.items()},
            "fired": {name: m.detach().to("cpu", copy=True) for name, m in self.fired.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Copy saved masks into place (checked names, shapes and dtype) and re-apply them to the weights."""
        for key in ("masks", "fired"):
            saved = state[key]
            if saved.keys() != self.masks.keys():
                missing = sorted(self.masks.keys() - saved.keys())
                unexpected = sorted(saved.keys() - self.masks.keys())
                raise ValueError(
                    f"checkpoint {key} do not match the masked parameters: missing {missing}, unexpected {unexpected}"
                )
            for name, target in (self.masks if key == "masks" else self.fired).items():
                value = saved[name]
                if value.dtype != torch.bool or value.shape != target.shape:
                    raise ValueError(
                        f"checkpoint {key}[{name!r}] is {value.dtype} {tuple(value.shape)}, expected bool "
                        f"{tuple(target.shape)}"
                    )
                target.copy_(value)
        self.apply_()
