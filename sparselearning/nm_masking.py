"""N:M sparse training: exactly N non-zeros in every M consecutive input weights (2:4 runs on sparse tensor cores).

Two ways to learn the pattern, both granularities of the shared loop (``sparselearning.scheduled``: schedule, update,
DDP digest check, checkpoint state) and both built on ``Masking``:

* ``NMMasking`` (``--nm-method dst``): SViTE's prune-and-regrow where each dead weight is replaced within its own
  group, so every group keeps exactly N.
* ``SRSTE`` (``--nm-method srste``; Zhou et al., "Learning N:M Fine-grained Structured Sparse Neural Networks From
  Scratch", ICLR 2021): the weights stay dense under the mask; the mask is the top-N magnitudes of each group,
  recomputed every ΔT; the gradient of the masked weights reaches the dense ones (straight-through), plus λ·w on the
  pruned ones.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sparselearning.base import Sparsifier
from sparselearning.config import SparsityConfig
from sparselearning.criteria import derive_seed
from sparselearning.dst import Masking
from sparselearning.masks import MaskSet
from sparselearning.nm import group_counts, is_nm, magnitude_nm_mask, nm_parameters, random_nm_mask, top_in_groups
from sparselearning.scheduled import LogFn, UpdateScores

logger = logging.getLogger(__name__)


class NMMasking(Masking):
    """SViTE's dynamic sparse training with an N:M pattern (``--sparse_init nm --nm N:M --nm-method dst``).

    Initial masks hold N random positions in every group of M consecutive input weights. At each update the
    ``ceil(rate * active)`` weakest active weights of a layer die by the death rule (magnitude or SET), as in
    ``Masking``, and each group then regrows what it lost from its own inactive weights (just-dropped ones included)
    by the growth signal (gradient, momentum or random). Every group has exactly N after every update; masked weights
    are zero after every optimizer step, new weights start at zero and the optimizer state is kept, as in ``Masking``.

    Args:
        model: the model (DDP or compiled wrappers are fine).
        optimizer: the optimizer of the masked parameters; a post-step hook is registered on it.
        total_steps: T, optimizer steps of the whole run.
        nm: the pattern, ``"N:M"`` with 0 < N < M.
        sparse_include: fnmatch patterns of the tensors to mask; default ``nm.NM_DEFAULT_INCLUDE`` (the blocks'
            linears: not the patch embedding, not the head).
        sparse_exclude: fnmatch patterns of tensors not to mask.
        mask_init: ``random`` or ``magnitude`` (the N largest magnitudes of every group, for pretrained weights).
        update_frequency, growth, death, death_rate, decay_schedule, t_end, seed, log_fn: as for ``Masking``.
    """

    STATE_FORMAT = "sparselearning.NMMasking/1"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        nm: str = "2:4",
        update_frequency: int = 100,
        growth: str = "gradient",
        death: str = "magnitude",
        death_rate: float = 0.5,
        decay_schedule: str = "cosine",
        t_end: float = 0.8,
        sparse_exclude: Sequence[str] = (),
        sparse_include: Sequence[str] = (),
        mask_init: str = "random",
        seed: int = 0,
        log_fn: LogFn | None = None,
    ) -> None:
        self.config = SparsityConfig(
            sparse_init="nm", nm=nm, nm_method="dst", update_frequency=update_frequency, growth=growth, death=death,
            death_rate=death_rate, decay_schedule=decay_schedule, t_end=t_end, sparse_exclude=sparse_exclude,
            sparse_include=sparse_include, mask_init=mask_init,
        )
        self._build(model, optimizer, total_steps, seed, log_fn)

    @classmethod
    def from_config(cls, cfg: SparsityConfig, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                    *, seed: int = 0, log_fn: LogFn | None = None) -> NMMasking:
        """Build from a validated N:M ``SparsityConfig`` (``--nm-method dst``)."""
        return cls(model, optimizer, total_steps, nm=cfg.nm, update_frequency=cfg.update_frequency,
                   growth=cfg.growth, death=cfg.death, death_rate=cfg.death_rate, decay_schedule=cfg.decay_schedule,
                   t_end=cfg.t_end, sparse_exclude=cfg.sparse_exclude, sparse_include=cfg.sparse_include,
                   mask_init=cfg.mask_init, seed=seed, log_fn=log_fn)

    @property
    def nm(self) -> tuple[int, int]:
        """(N, M)."""
        return self.config.nm_pattern

    def _select_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        cfg = self.config
        return nm_parameters(model, self.nm[1], cfg.sparse_include, cfg.sparse_exclude)

    def _initial_masks(self, params: dict[str, nn.Parameter]) -> MaskSet:
        """N random positions in every group, drawn from (seed, name) on the CPU, so every rank draws the same; with
        ``mask_init`` magnitude the N largest magnitudes of every group (pretrained weights, ``--finetune``)."""
        n, m = self.nm
        if self.config.mask_init == "magnitude":
            return MaskSet(params, {name: magnitude_nm_mask(p, n, m) for name, p in params.items()})
        return MaskSet(params, {name: random_nm_mask(p.shape, n, m, derive_seed(self.seed, name, "init"))
                                for name, p in params.items()})

    def _grow(self, growth: torch.Tensor, kept: torch.Tensor, count: int, tie_seed: int) -> torch.Tensor:
        """Each group regrows what it lost (N minus its kept weights) from its own inactive weights: ``count``, the
        layer's deaths, in all."""
        n, m = self.nm
        return top_in_groups(growth, m, n - group_counts(kept, m), within=~kept, tie_seed=tie_seed)

    def _refresh_counts(self) -> None:
        """Active counts are N/M of each tensor by construction (no host sync); the explored count is taken when a
        record asks for it."""
        n, m = self.nm
        self._active = {name: math.prod(shape) * n // m for name, shape in self.shapes.items()}
        self._explored = None

    def record(self, event: str = "report") -> dict[str, Any]:
        if self._explored is None:
            self._explored = self.mask_set.fired_count()
        return super().record(event)

    def _load_own_state(self, state: dict[str, Any]) -> None:
        """The masks, which must be N:M (a ValueError names the first that is not)."""
        super()._load_own_state(state)
        n, m = self.nm
        for name, mask in self.mask_set.masks.items():
            if not is_nm(mask, n, m):
                raise ValueError(f"the checkpoint's mask of {name} does not hold exactly {n} of every {m} weights")


class SRSTE(NMMasking):
    """SR-STE (``--sparse_init nm --nm N:M --nm-method srste``): N:M masks learned from dense weights.

    The parameters always hold the masked weights w⊙m, so the forward pass, the EMA, evaluation, checkpoints,
    exports and compaction see exactly the N:M model; the pruned values (1−m)⊙w live beside them in this object.
    Around each optimizer step the two are joined: a pre-step hook restores the dense weights and adds
    λ·(1−m)⊙w to their gradient, the step updates every weight (the gradient of w⊙m at a pruned position is the
    straight-through estimate of its gradient; weight decay sees the dense value), and a post-step hook moves the
    pruned values aside again and zeroes them in the parameters. Every ΔT steps until ``t_end`` the mask becomes the
    N largest magnitudes of each group of the dense weights (ties: lowest index), which costs no random draws.

    With a ``GradScaler`` the decay is added to unscaled gradients (a fused optimizer that unscales inside its
    kernel gets it multiplied by the scale), and a skipped overflow step leaves weights and pruned values as they
    were.

    Args:
        model, optimizer, total_steps, nm, sparse_include, sparse_exclude, seed: as for ``NMMasking``.
        decay: λ, SR-STE's decay of the pruned weights (2e-4 in the paper).
        update_frequency: ΔT, optimizer steps between mask recomputations (the paper: 1).
        t_end: the mask is frozen after ``t_end * total_steps`` (the paper: 1.0, never frozen).
        log_fn: receives a ``density_record`` at construction, on resume and after every ``LOG_EVERY``-th update.
    """

    STATE_FORMAT = "sparselearning.SRSTE/1"
    LOG_EVERY = 100
    """Updates between two records to ``log_fn``: SR-STE updates every step, and a record per step would flood the
    log (its per-layer plot alone costs more than the step)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        nm: str = "2:4",
        decay: float = 2e-4,
        update_frequency: int = 1,
        t_end: float = 1.0,
        sparse_exclude: Sequence[str] = (),
        sparse_include: Sequence[str] = (),
        seed: int = 0,
        log_fn: LogFn | None = None,
    ) -> None:
        self.config = SparsityConfig(
            sparse_init="nm", nm=nm, nm_method="srste", srste_decay=decay, update_frequency=update_frequency,
            t_end=t_end, sparse_exclude=sparse_exclude, sparse_include=sparse_include,
        )
        self._flip_rate = 0.0
        self._updates = 0
        self._build(model, optimizer, total_steps, seed, log_fn)

    @classmethod
    def from_config(cls, cfg: SparsityConfig, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                    *, seed: int = 0, log_fn: LogFn | None = None) -> SRSTE:
        """Build from a validated N:M ``SparsityConfig`` (``--nm-method srste``)."""
        return cls(model, optimizer, total_steps, nm=cfg.nm, decay=cfg.srste_decay,
                   update_frequency=cfg.update_frequency, t_end=cfg.t_end, sparse_exclude=cfg.sparse_exclude,
                   sparse_include=cfg.sparse_include, seed=seed, log_fn=log_fn)

    def _initial_masks(self, params: dict[str, nn.Parameter]) -> MaskSet:
        """The N largest magnitudes of every group of the initial weights."""
        n, m = self.nm
        return MaskSet(params, {name: magnitude_nm_mask(p, n, m) for name, p in params.items()})

    @torch.no_grad()
    def _enforce(self, mask_set: MaskSet, what: str, model: nn.Module) -> None:
        """Move the pruned values aside, then enforce the masks as ``Masking`` does. The join hooks are registered
        first, so the post-step hook that moves the pruned values aside runs before the one that zeroes them."""
        self._pruned = {name: p.detach().clone().masked_fill_(mask_set.masks[name].to(p.device), 0.0)
                        for name, p in mask_set.params.items()}
        self._hooks = [self.optimizer.register_step_pre_hook(self._join_dense),
                       self.optimizer.register_step_post_hook(self._set_pruned_aside)]
        try:
            super()._enforce(mask_set, what, model)
        except ValueError:  # parameters outside the optimizer or the model: leave the optimizer as it was
            for hook in self._hooks:
                hook.remove()
            raise

    def _aligned(self, name: str, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask and pruned values of ``name`` on its parameter's device (they follow a ``model.to``)."""
        pruned = self._pruned[name]
        if pruned.device != param.device:
            pruned = self._pruned[name] = pruned.to(param.device)
        return self.mask_set.masks[name].to(param.device), pruned

    @torch.no_grad()
    def _join_dense(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Pre-step hook: dense weights back in the parameters, and λ·(1−m)⊙w added to their gradients."""
        scale = getattr(optimizer, "grad_scale", None)  # set by GradScaler when a fused step unscales in-kernel
        decay = self.config.srste_decay
        for name, param in self.mask_set.params.items():
            mask, pruned = self._aligned(name, param)
            if param.grad is not None and decay:
                if scale is None:
                    param.grad.add_(pruned, alpha=decay)
                else:
                    param.grad.addcmul_(pruned, scale.to(pruned.dtype), value=decay)
            torch.where(mask, param, pruned, out=param)

    @torch.no_grad()
    def _set_pruned_aside(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> None:
        """Post-step hook, before the mask set's: keep the stepped pruned values; the next hook zeroes them."""
        for name, param in self.mask_set.params.items():
            mask, pruned = self._aligned(name, param)
            pruned.copy_(param).masked_fill_(mask, 0.0)

    def dense_weights(self) -> dict[str, torch.Tensor]:
        """FQN -> the dense weight w (the parameter holds w⊙m): new tensors."""
        return {name: torch.where(self._aligned(name, p)[0], p.detach(), self._pruned[name])
                for name, p in self.mask_set.params.items()}

    def remove(self) -> None:
        """Detach every hook: the parameters keep the masked weights, the pruned values stay readable here."""
        super().remove()
        for hook in self._hooks:
            hook.remove()

    def _read_window(self, step: int) -> UpdateScores | None:
        """The dense weights' magnitudes, when all of them are finite (else None, logged). One host sync: a float64
        sum of float32 values is finite exactly when every value is."""
        dense = self.dense_weights()
        sums = torch.stack([w.sum(dtype=torch.float64) for w in dense.values()]).cpu()
        if not bool(torch.isfinite(sums).all()):
            name = list(dense)[int((~torch.isfinite(sums)).nonzero()[0])]
            logger.warning("sparsity: non-finite weights in %s at step %d; SR-STE mask update skipped", name, step)
            return None
        return UpdateScores(death=lambda name: dense[name].abs(), growth=lambda name: dense[name].abs())

    def _select(self, scores: UpdateScores, rate: float, step: int) -> dict[str, torch.Tensor]:
        """SR-STE's rule: the N largest dense magnitudes of every group, whatever the mask was."""
        n, m = self.nm
        return {name: top_in_groups(scores.death(name), m, n) for name in self.mask_set.masks}

    @torch.no_grad()
    def _commit(self, new: dict[str, torch.Tensor], step: int) -> bool:
        """Split the dense weights anew: the parameters get w⊙m', the pruned values (1−m')⊙w. The optimizer state
        is untouched: every weight has been stepped as a dense one."""
        flipped = []
        for name, param in self.mask_set.params.items():
            old, pruned = self._aligned(name, param)
            mask = new[name].to(param.device)
            dense = torch.where(old, param, pruned)
            param.copy_(dense).masked_fill_(~mask, 0.0)
            pruned.copy_(dense).masked_fill_(mask, 0.0)
            flipped.append((mask & ~old).sum())
            self.mask_set.masks[name].copy_(mask)
            self.mask_set.fired[name] |= mask.to(self.mask_set.fired[name].device)
        self._refresh_counts()
        total_flipped = int(torch.stack(flipped).sum())
        self._flip_rate = total_flipped / sum(self._active.values())
        self._updates += 1
        return total_flipped > 0

    def _logs_update(self, step: int) -> bool:
        return self._updates % self.LOG_EVERY == 0

    def death_rate(self, step: int) -> float:
        """0: SR-STE replaces no scheduled fraction; the mask is recomputed whole (``flip_rate`` says how much of it
        changed)."""
        return 0.0

    def report(self) -> dict[str, float]:
        """``Masking``'s scalars without the death rate, plus ``flip_rate``: the fraction of active weights that the
        last update made active."""
        scalars = super().report()
        del scalars["death_rate"]
        return {**scalars, "flip_rate": self._flip_rate}

    def _own_state(self) -> dict[str, Any]:
        """The pruned values, only at pruned positions (N/M of the dense size fewer), and the update counters."""
        return {"pruned_values": {name: pruned[~self.mask_set.masks[name].to(pruned.device)].cpu()
                                  for name, pruned in self._pruned.items()},
                "flip_rate": self._flip_rate, "updates": self._updates}

    @torch.no_grad()
    def _load_own_state(self, state: dict[str, Any]) -> None:
        super()._load_own_state(state)
        values = state["pruned_values"]
        if values.keys() != self._pruned.keys():
            raise ValueError(f"the checkpoint's SR-STE pruned values are for {sorted(values)[:4]}, not for the masked "
                             f"tensors {sorted(self._pruned)[:4]}")
        for name, pruned in self._pruned.items():
            where = ~self.mask_set.masks[name].to(pruned.device)
            if values[name].shape != (int(where.sum()),) or values[name].dtype != pruned.dtype:
                raise ValueError(f"the checkpoint's SR-STE pruned values of {name} do not fit its mask")
            pruned.zero_()[where] = values[name].to(pruned.device)
        self._flip_rate = float(state["flip_rate"])
        self._updates = int(state["updates"])


def nm_sparsifier(cfg: SparsityConfig, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, *,
                  seed: int = 0, log_fn: LogFn | None = None) -> Sparsifier:
    """``SRSTE`` or ``NMMasking``, as ``cfg.nm_method`` says, for a validated N:M ``SparsityConfig``."""
    method = SRSTE if cfg.nm_method == "srste" else NMMasking
    return method.from_config(cfg, model, optimizer, total_steps, seed=seed, log_fn=log_fn)


__all__ = ["NMMasking", "SRSTE", "nm_sparsifier"]
