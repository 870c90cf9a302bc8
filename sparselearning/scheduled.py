"""What every granularity of dynamic sparse training shares: SViTE's schedule, its prune-and-regrow loop, its state.

``Masking`` (weights) and ``StructuredDST`` (heads and neurons) differ only in what a unit is, what is accumulated
between updates and how units are scored. Both hold a ``MaskSet`` that the optimizer hook enforces, update the
topology every ΔT steps until ``t_end`` with a decaying rate by the same loop (``ScheduledMasks._update``: the
``ceil(rate * active)`` weakest active units of each layer die, as many grow, ties broken by seeded draws), check that
DDP ranks agree, and checkpoint the same schedule fields; that part lives here once. A granularity supplies:

* ``_units``/``_active_counts``: its unit masks per layer (a weight mask, or one bool per head or neuron);
* ``_read_window``: its score window at an update (``UpdateScores``), or None to skip the update;
* ``_death_rule`` and ``_tie_seeds``: its death criterion, chosen at construction, and its tie-breaking seeds;
* ``_allocate``: how many units each layer regrows (default: what it lost);
* ``_commit``: writing the new unit masks into the weight masks, the weights and the optimizer state;
* ``_own_state``/``_load_own_state``: what it checkpoints besides the masks and the schedule.

A selection rule across layers (one global ranking of all heads and neurons, say) replaces ``_select``.
"""
from __future__ import annotations

import logging
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from sparselearning.config import SparsityConfig
from sparselearning.criteria import grow_highest
from sparselearning.masks import MaskSet, unwrap_model
from sparselearning.metrics import format_table
from sparselearning.schedules import death_rate_at, is_update_step

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, Any]], None]
DeathRule = Callable[[torch.Tensor, torch.Tensor, int, int | None], torch.Tensor]
"""(scores, active, n, tie_seed) -> the ``n`` active entries that die, e.g. ``criteria.magnitude_death``."""


@dataclass(frozen=True)
class UpdateScores:
    """What a granularity's score window yields at one update, read layer by layer so that only one layer's scores
    are alive at a time.

    Args:
        death: layer name -> the scores its ``_death_rule`` reads (weights, or per-unit importance).
        growth: layer name -> growth scores (the highest inactive units grow).
        frozen: layers that neither die nor grow in this update.
    """

    death: Callable[[str], torch.Tensor]
    growth: Callable[[str], torch.Tensor]
    frozen: frozenset[str] = frozenset()


def print_table(record: dict[str, Any]) -> None:
    """Default ``log_fn``: print the per-layer table, on rank 0 only under torch.distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        print(format_table(record), flush=True)


def collective_device() -> torch.device:
    """Where tensors must live for a torch.distributed collective: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_masks_agree(mask_set: MaskSet, step: int) -> None:
    """Raise RuntimeError unless every torch.distributed rank holds the same masks (no-op when not distributed).

    One small all-reduce of per-layer int64 digests of the packed masks and explored masks: the element-wise MAX over
    ranks of [d, -d] gives the maximum and minimum at once, and they must agree.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    local = mask_set.digest()
    both = torch.cat([local, -local]).to(collective_device())
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[: local.numel()].cpu(), -both[local.numel():].cpu()
    if not torch.equal(high, low):
        names = list(mask_set.masks)
        differing = sorted({names[int(i) // 2] for i in (high != low).nonzero().flatten()})
        raise RuntimeError(
            f"sparsity masks differ across ranks at step {step} in {differing}. Masks are functions of "
            "(seed, layer name, step) and of the all-reduced gradients, so every rank must pass the same seed "
            "(not seed + rank) and train the same replicated model"
        )


class ScheduledMasks(ABC):
    """Base of the dynamic sparse training methods: the schedule, the update loop, mask enforcement and the
    schedule's state.

    A granularity calls ``_start_schedule`` first in its constructor, sets ``_death_rule`` and ``_enforce``s its
    masks, and implements the hooks named in the module docstring and ``record``.
    """

    STATE_FORMAT = ""
    config: SparsityConfig
    mask_set: MaskSet
    _death_rule: DeathRule

    def _start_schedule(self, optimizer: torch.optim.Optimizer, total_steps: int, seed: int,
                        log_fn: LogFn | None) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int (optimizer steps of the run), got {total_steps!r}")
        self.optimizer = optimizer
        self.total_steps = total_steps
        self.seed = int(seed)
        self.log_fn: LogFn = log_fn if log_fn is not None else print_table
        self.skipped_updates: list[int] = []
        self._step = 0
        self._last_update_step = 0

    def _enforce(self, mask_set: MaskSet, what: str, model: nn.Module) -> None:
        """Hook the optimizer so masked entries of ``model`` stay zero and zero them now; warn when the schedule leaves
        no room for a single update of ``what``.

        The optimizer state of masked entries is left alone: their gradients are dense, so their moments (SGD
        momentum included) keep tracking what those weights would see, which growth by momentum and regrown weights
        rely on.
        """
        cfg = self.config
        self.mask_set = mask_set
        mask_set.attach(self.optimizer, model)  # validates first
        mask_set.apply_()
        if cfg.update_frequency >= cfg.t_end * self.total_steps:
            warnings.warn(
                f"update_frequency={cfg.update_frequency} >= t_end * total_steps = {cfg.t_end * self.total_steps:g}: "
                f"the topology will never be updated (static {what})",
                stacklevel=3,
            )

    def remove(self) -> None:
        """Detach every hook this method installed (for library users): masks are no longer enforced after optimizer
        steps. The masks and the schedule state stay readable."""
        self.mask_set.remove()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """FQN -> live bool mask (True = active) of every masked tensor. Do not modify; use ``load_state_dict``."""
        return self.mask_set.masks

    @torch.no_grad()
    def apply_masks(self, module: nn.Module) -> None:
        """Zero the masked entries of ``module`` (e.g. the EMA) with the live masks; structured masks are unit masks
        expanded to the weights, so a structured copy stays compactable. ``masked_fill_`` also clears NaN/Inf."""
        params = dict(unwrap_model(module).named_parameters())
        missing = [name for name in self.mask_set.masks if name not in params]
        if missing:
            raise ValueError(f"cannot mask {type(module).__name__}: it has no parameters {missing[:4]}; pass a copy "
                             "of the trained model (same parameter names)")
        for name, mask in self.mask_set.masks.items():
            target = params[name]
            target.masked_fill_(~mask.to(target.device), 0)

    def death_rate(self, step: int) -> float:
        """The fraction of active units (weights, heads, neurons) that the schedule replaces at ``step``."""
        cfg = self.config
        return death_rate_at(step, self.total_steps, cfg.death_rate, cfg.decay_schedule)

    def step(self, step: int) -> bool:
        """Call after every optimizer step with the number of optimizer steps done so far.

        Masks are already enforced by the optimizer hook, so between updates this is a cheap schedule check.
        Returns True when the topology changed.
        """
        self._step = step
        cfg = self.config
        if step == self._last_update_step or not is_update_step(step, cfg.update_frequency, self.total_steps,
                                                                cfg.t_end):
            return False
        self._last_update_step = step
        return self._update(step)

    @torch.no_grad()
    def _update(self, step: int) -> bool:
        """One topology update at ``step``: read the window, select the new units, commit them, check that ranks
        agree and log. True when the topology changed."""
        scores = self._read_window(step)
        if scores is None:
            self.skipped_updates.append(step)
            return False
        changed = self._commit(self._select(scores, self.death_rate(step), step), step)
        self.check_consistency()
        if self._logs_update(step):
            self.log_fn(self.record("update"))
        return changed

    def _logs_update(self, step: int) -> bool:
        """Whether the update at ``step`` goes to ``log_fn``: every one, unless a method updates too often for that."""
        return True

    def _select(self, scores: UpdateScores, rate: float, step: int) -> dict[str, torch.Tensor]:
        """SViTE's per-layer rule: ``ceil(rate * active)`` active units die by the death rule (none in a frozen
        layer), then each layer grows its ``_allocate``d count among its inactive units (just-dropped ones included)
        by the growth scores. Returns the new unit masks."""
        units, active = self._units(), self._active_counts()
        kept, dropped = {}, {}
        for name, mask in units.items():
            count = 0 if name in scores.frozen else active[name]
            dropped[name] = min(count, math.ceil(rate * count))
            death = self._death_rule(scores.death(name), mask, dropped[name], self._tie_seeds(name, step)[0])
            kept[name] = mask & ~death
        counts = self._allocate(dropped, scores.frozen)
        for name, mask in kept.items():
            mask |= self._grow(scores.growth(name), mask, counts[name], self._tie_seeds(name, step)[1])
        return kept

    def _grow(self, growth: torch.Tensor, kept: torch.Tensor, count: int, tie_seed: int) -> torch.Tensor:
        """The ``count`` inactive units (``~kept``) with the highest growth scores; a granularity with a pattern to
        keep (N:M) chooses them within its groups."""
        return grow_highest(growth, ~kept, count, tie_seed)

    @abstractmethod
    def _units(self) -> Mapping[str, torch.Tensor]:
        """Layer name -> its live bool unit mask (True = active)."""

    @abstractmethod
    def _active_counts(self) -> Mapping[str, int]:
        """Layer name -> active units now."""

    @abstractmethod
    def _read_window(self, step: int) -> UpdateScores | None:
        """The scores of this update, or None (after logging why) when they are not usable and the update is
        skipped."""

    @abstractmethod
    def _tie_seeds(self, name: str, step: int) -> tuple[int, int]:
        """Seeds of the order among tied death and growth scores of layer ``name`` at ``step``."""

    def _allocate(self, dropped: dict[str, int], frozen: frozenset[str]) -> dict[str, int]:
        """How many units each layer grows: by default exactly what it lost, so every layer keeps its count."""
        return dropped

    @abstractmethod
    def _commit(self, new: dict[str, torch.Tensor], step: int) -> bool:
        """Make ``new`` (layer name -> unit mask) the topology: masks, explored masks, weights, optimizer state.
        True when some unit changed."""

    @abstractmethod
    def record(self, event: str = "report") -> dict[str, Any]:
        """The method's per-unit density record (for ``log_fn`` and ``report``)."""

    def check_consistency(self) -> None:
        """Raise RuntimeError unless every torch.distributed rank holds the same masks (no-op when not distributed)."""
        check_masks_agree(self.mask_set, self._step)

    def state_dict(self) -> dict[str, Any]:
        """Masks and explored masks (CPU bool tensors keyed by FQN), step, death-rate state, seed, config and what
        the granularity adds (``_own_state``).

        Only plain tensors, numbers, strings, lists and dicts, so ``torch.load(weights_only=True)`` reads it.
        """
        return {**self._schedule_state(), **self._own_state()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output. Load the model and optimizer first: the masks are re-applied to the
        loaded weights.

        Raises:
            ValueError: for another method's state, or one made with other settings or for other tensors.
        """
        self._check_state_format(state)
        self._load_own_state(state)
        self._load_schedule_state(state)
        self.check_consistency()
        self.log_fn(self.record("resume"))

    def _own_state(self) -> dict[str, Any]:
        """What the granularity saves besides the masks and the schedule; nothing by default."""
        return {}

    @abstractmethod
    def _load_own_state(self, state: dict[str, Any]) -> None:
        """Load the masks (``mask_set.load_state_dict``) and what ``_own_state`` saved, checking they fit."""

    def _schedule_state(self) -> dict[str, Any]:
        """Masks, explored masks, step, death-rate state, seed and config: plain values ``weights_only`` reads."""
        return {
            "format": self.STATE_FORMAT,
            **self.mask_set.state_dict(),
            "step": self._step,
            "last_update_step": self._last_update_step,
            "death_rate": self.death_rate(self._step),
            "seed": self.seed,
            "skipped_updates": list(self.skipped_updates),
            "config": self.config.to_dict(),
        }

    def _check_state_format(self, state: Any) -> None:
        if not isinstance(state, dict) or state.get("format") != self.STATE_FORMAT:
            raise ValueError(f"not a {type(self).__name__} state dict (expected format {self.STATE_FORMAT!r})")

    def _load_schedule_state(self, state: dict[str, Any]) -> None:
        """Restore the schedule fields; the checkpoint's seed replaces the constructor's so random draws continue
        the saved run.

        The saved masks were made with the saved settings, so loading them into a sparsifier configured otherwise
        would train one configuration while reporting another: any setting that acts on this kind of sparsity and
        differs raises. Ignored: settings the saved config predates, ``atten_head`` (checked against the model),
        and the settings of the other kind (``density`` of a structured run). ``total_steps`` is the constructor's,
        so a longer run rescales the death-rate decay and ``t_end``.
        """
        def canonical(value: Any) -> Any:
            return {"fixed_ERK": "ERK", "structure_new": "structure"}.get(value, value) if isinstance(value, str) \
                else value

        ignored = {"atten_head"} | ({"density", "sparse_init", "erk_power"} if self.config.structured
                                    else {"atten_density", "other_density"}
                                    | ({"unit_multiple"} if self.config.pruning_type != "global" else set()))
        saved = state["config"]
        differing = [f"{k}: {saved[k]!r} → {v!r}" for k, v in self.config.to_dict().items()
                     if k in saved and k not in ignored and canonical(saved[k]) != canonical(v)]
        if differing:
            raise ValueError(f"the checkpoint's {type(self).__name__} state was made with other settings "
                             f"(saved → now): {'; '.join(differing)}. Build it with the settings of the "
                             "checkpoint's 'config' to resume, or start a new run")
        self._step = int(state["step"])
        self._last_update_step = int(state["last_update_step"])
        self.seed = int(state["seed"])
        self.skipped_updates = [int(s) for s in state["skipped_updates"]]


class UnitGroupMasks(ScheduledMasks):
    """A granularity whose units are whole slices of tensors (heads, neurons, embedding channels), one bool per unit
    in ``active`` (group name -> [num_units]); its weight masks are those units expanded. ``StructuredDST`` and
    ``GlobalPruning`` share this bookkeeping and differ in how units are scored and selected."""

    active: dict[str, torch.Tensor]

    def _units(self) -> dict[str, torch.Tensor]:
        return self.active

    def _active_counts(self) -> dict[str, int]:
        return {name: int(active.sum()) for name, active in self.active.items()}
