"""The mask set: boolean masks keyed by parameter FQN, enforced on the weights by an optimizer post-step hook.

Masks live here, not in the model, so the model's ``state_dict`` keys stay timm-compatible. Gradients stay dense
(growth needs them) and the weights are re-masked after every optimizer step, which also undoes weight decay and
Adam updates at masked positions. Re-masking is idempotent, so it is also right on a step that GradScaler skipped.
"""
from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from sparselearning.criteria import derive_seed, random_scores, topk_mask

MASK_INITS = ("random", "magnitude")
"""How the first masks are chosen (``--mask-init``): at random (SViTE), or by weight magnitude (pretrained weights)."""


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

    Masks are updated in place by the sparsity methods. They follow their parameter: ``model.to(device)`` moves them
    at the next enforcement, and a parameter that was replaced in the model (``load_state_dict(assign=True)``) is an
    error naming it, because the optimizer and the masks still hold the old tensor.

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
        self._owners: dict[str, tuple[dict[str, Any], str]] = {}
        self._handle: torch.utils.hooks.RemovableHandle | None = None
        self._refresh_slots()

    @classmethod
    def random(cls, params: Mapping[str, nn.Parameter], counts: Mapping[str, int], seed: int) -> MaskSet:
        """Masks with exactly ``counts[name]`` active weights each, at positions drawn from (seed, name)."""
        masks = {name: exact_mask(p.shape, counts[name], derive_seed(seed, name, "init")) for name, p in params.items()}
        return cls(params, masks)

    @classmethod
    def magnitude(cls, params: Mapping[str, nn.Parameter], counts: Mapping[str, int], seed: int) -> MaskSet:
        """Masks keeping exactly ``counts[name]`` weights of largest magnitude each (magnitude pruning of pretrained
        weights); weights tied at the threshold, such as the zeros of an already sparse file, are taken in an order
        drawn from (seed, name), so every rank picks the same ones."""
        masks = {name: topk_mask(p.detach().abs(), counts[name], tie_seed=derive_seed(seed, name, "init ties"))
                 for name, p in params.items()}
        return cls(params, masks)

    def _refresh_slots(self) -> None:
        """(name, parameter, a zero on its device, the parameter dict of its owner module, attribute) per masked
        tensor: what the hot path reads."""
        self._slots = [(name, p, torch.zeros((), dtype=p.dtype, device=p.device), *self._owners.get(name, (None, "")))
                       for name, p in self.params.items()]

    def _follow(self, name: str, param: nn.Parameter) -> None:
        """Move ``name``'s masks to its parameter's new device (after ``model.to``), or raise if the model holds
        another tensor under that name now."""
        owner, attr = self._owners.get(name, (None, ""))
        if owner is not None and owner.get(attr) is not param:
            raise RuntimeError(
                f"masked parameter {name!r} was replaced in the model (e.g. by load_state_dict(assign=True) or a "
                "module swap) after the sparsifier was built; the optimizer and the masks still hold the old tensor. "
                "Load weights in place (load_state_dict without assign=True), or build the optimizer and the "
                "sparsifier after replacing parameters"
            )
        self.masks[name] = self.masks[name].to(param.device)
        self.fired[name] = self.fired[name].to(param.device)
        self._refresh_slots()

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero every masked weight in place, NaN and Inf included (the post-step hook: no host sync, no allocation).

        ``torch.where(mask, w, 0, out=w)`` writes exact zeros, where ``w.mul_(mask)`` would keep NaN * 0 = NaN, with
        the same memory traffic. The checks that the parameter is still the model's and on the mask's device are a
        few attribute reads per tensor.
        """
        masks = self.masks
        for name, param, zero, owner, attr in self._slots:
            mask = masks[name]
            if param.device != mask.device or (owner is not None and owner.get(attr) is not param):
                self._follow(name, param)
                mask, zero = masks[name], torch.zeros((), dtype=param.dtype, device=param.device)
            torch.where(mask, param, zero, out=param)

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """Enforce the masks after every ``optimizer.step()``; ``remove()`` detaches them again.

        Args:
            optimizer: the optimizer that updates the masked parameters.
            model: the model that owns the parameters (DDP or compiled wrappers are unwrapped); each step checks that
                it still holds them.
        """
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.params.items() if id(p) not in in_optimizer]
        if missing:
            raise ValueError(
                f"masked parameters {missing[:4]} are not in the optimizer; exclude them with sparse_exclude or pass "
                "the optimizer that trains them"
            )
        net = unwrap_model(model)
        for name, param in self.params.items():
            module_name, _, attr = name.rpartition(".")
            owner = net.get_submodule(module_name)._parameters
            if owner.get(attr) is not param:
                raise ValueError(f"masked parameter {name!r} is not the model's parameter of that name")
            self._owners[name] = (owner, attr)
        self._refresh_slots()

        def hook(opt: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.apply_()

        self.remove()
        self._handle = optimizer.register_step_post_hook(hook)

    def remove(self) -> None:
        """Stop enforcing the masks after optimizer steps (the masks stay readable)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def counts(self) -> dict[str, int]:
        """Active weights per layer (one host sync per layer; for updates and reports only)."""
        return {name: int(torch.count_nonzero(m)) for name, m in self.masks.items()}

    def fired_count(self) -> int:
        """Weights that were active at some point (the ITOP "explored" count)."""
        return sum(int(torch.count_nonzero(m)) for m in self.fired.values())

    def digest(self) -> torch.Tensor:
        """Per layer, a 62-bit BLAKE2b digest of the packed active mask and one of the packed explored mask (int64 on
        CPU, identical on every rank for identical masks).

        Any difference, such as active indices {0, 3} against {1, 2}, changes the digest (up to hash collisions).
        Costs one device-to-host copy of the masks, so it runs once per topology update, not per step.
        """
        values = []
        for name, mask in self.masks.items():
            for m in (mask, self.fired[name]):
                hasher = hashlib.blake2b(str(tuple(m.shape)).encode(), digest_size=8)
                hasher.update(np.packbits(m.detach().reshape(-1).cpu().numpy()).tobytes())
                values.append(int.from_bytes(hasher.digest(), "little") >> 2)  # [c, -c] must fit in int64
        return torch.tensor(values, dtype=torch.int64)

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
