"""Structured dynamic sparse training (S²ViTE): SViTE's prune-and-grow loop on whole attention heads and MLP neurons.

Only the granularity differs from ``Masking``: a unit is a set of tensor slices (``sparselearning.units``: a head's q,
k and v rows, a neuron's fc1 row and fc2 column), every group of units gets one score per unit from the score window
(``sparselearning.unit_scores``), and regrown units get fresh input rows and a restart of their gated optimizer state
(``sparselearning.optimizer_state``). The update loop, the schedule, ``MaskSet`` enforcement and the digest all-reduce
are the shared ones (``sparselearning.scheduled``). This package never imports the model code. The model side
(``models.structure_units``) describes the units as plain dicts of FQNs and axes, and it supplies per-head scores
collected by hooks.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from sparselearning.config import SparsityConfig
from sparselearning.criteria import derive_seed, drop_lowest, grow_highest, random_scores, topk_mask
from sparselearning.masks import MaskSet, unwrap_model
from sparselearning.metrics import UnitCount, unit_record
from sparselearning.optimizer_state import restart_gated_entries
from sparselearning.scheduled import LogFn, UnitGroupMasks, UpdateScores
from sparselearning.unit_scores import HeadScores, UnitScoreWindow, unit_magnitude
from sparselearning.units import (UNIT_MULTIPLE_AUTO, UnitGroup, UnitSlice, expand_units, kept_count,
                                  resolve_multiple, unit_l1, unit_positions)

__all__ = ["HeadScores", "StructureSource", "StructuredDST", "UnitGroup", "UnitSlice", "expand_units", "swap_units",
           "unit_l1", "unit_positions"]

logger = logging.getLogger(__name__)

REGROWTH_STD = 0.02
"""Std of the fresh init of a regrown unit's input rows: timm's ``trunc_normal_(std=.02)`` for ViT Linear layers."""


class StructureSource(Protocol):
    """What a model adapter provides: the unit layout as plain dicts, and head-score hooks installed on demand."""

    groups: Sequence[Mapping[str, Any]]

    def attach_stats(self) -> HeadScores:
        """Install the score hooks (only structured runs call this) and return the object they fill."""


def swap_units(active: torch.Tensor, death_scores: torch.Tensor, growth_scores: torch.Tensor, n: int,
               tie_seed: int | None = None) -> torch.Tensor:
    """SViTE's structured update of one group: the ``n`` active units with the lowest death scores leave, then the
    ``n`` inactive units with the highest growth scores join. Units that just left count as inactive.

    It is what the shared loop (``ScheduledMasks._select``) does to each group of a ``StructuredDST``, as one pure
    function. Counts are exact, so the active count never changes. Tied scores are taken in an order drawn from ``tie_seed``
    (by unit index when None), so the result is a pure function of the inputs and the seed. The original code grew
    every unit whose score reached the n-th best score. When fewer than n units had a nonzero score, that threshold
    was 0, and the whole layer became dense.

    Args:
        active: bool [num_units].
        death_scores: importance of each unit (float, finite).
        growth_scores: growth signal of each unit (float, finite).
        n: units to swap, at most the active count.
        tie_seed: seed of the order among tied scores, e.g. ``derive_seed(seed, group, step, "ties")``.
    """
    seeds = (None, None) if tie_seed is None else (derive_seed(tie_seed, "death"), derive_seed(tie_seed, "growth"))
    kept = active & ~drop_lowest(death_scores, active, n, seeds[0])
    return kept | grow_highest(growth_scores, ~kept, n, seeds[1])


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class StructuredDST(UnitGroupMasks):
    """S²ViTE: dynamic sparsity of whole attention heads and MLP neurons, with a fixed count per block.

    Construction picks ``int(H * atten_density)`` heads and ``int(hidden * other_density)`` neurons per block at
    random (or, with ``mask_init="magnitude"``, those of largest weight L1 norm), the neuron count rounded to the nearest multiple of ``unit_multiple`` (``units.kept_count``) so that
    the compacted widths suit matrix kernels; the densities this keeps are in every record. The draw is a pure
    function of (seed, block), so DDP ranks agree without a broadcast. It then masks the other units and hooks
    ``optimizer.step()`` so they stay zero. On the schedule of ``Masking`` (every
    ``update_frequency`` steps until ``t_end``, cosine-decayed rate), ``step(step)`` swaps ``ceil(rate * active)``
    units per block:

    * Heads die by first-order Taylor importance |Σ G·O| at the head output. They grow by the L1 norm of G, the
      gradient at the head output, which is informative for pruned heads because ``proj`` stays dense.
    * Neurons die by L1(fc1 row) + L1(fc2 column). They grow by the L1 norm of the gradient of their fc1 row and fc2
      column. By default the fc2 column of a pruned neuron stays unmasked, so that gradient is informative.
    * The head scores and the neuron gradient norms are averaged over the window since the last update (per sample
      and per step), computed in float32 on unscaled gradients, and all-reduced across ranks at the update. The
      neuron magnitudes are read from the current weights.

    By default a pruned unit is silent: the biases of its input rows are masked too. A unit that regrows after being
    inactive gets fresh trunc-normal(0.02) input rows and zero bias, because zero q/k rows would never receive a
    gradient. ``compat=True`` keeps SViTE's quirks: unmasked biases, fc2 columns masked, and zero-initialised
    regrowth. The optimizer state is kept through updates, except that Adam entries of a joined unit whose gradient
    was gated while it was pruned (its q and k rows) restart from their first gradient at the next step (a pre-step
    hook; see ``sparselearning.optimizer_state``).

    Args:
        model: the model (DDP or compiled wrappers are fine; FQNs are those of the wrapped module).
        optimizer: optimizer of the model; post-step hooks and a pre-step hook are registered on it.
        units: the model adapter, e.g. ``models.structure_units(model, scaler)``.
        total_steps: T, optimizer steps of the whole run.
        atten_density: fraction of each block's heads kept.
        other_density: fraction of each block's MLP neurons kept.
        atten_head: expected heads per block (SViTE's ``--atten_head``); None takes them from the model.
        compat: SViTE's bias leak, fc2-column masks and zero regrowth, so original runs are reproduced exactly.
        mask_init: ``random`` (SViTE) or ``magnitude``: each block starts with its heads and neurons of largest
            weight L1 norm (for pretrained weights).
        unit_multiple: MLP neurons are kept in multiples of this many; 1 is the paper's exact count, ``auto`` 8
            for MLPs of at least 384 neurons and 1 below (``units.auto_multiple``).
        update_frequency: optimizer steps between topology updates.
        growth: ``gradient`` (SViTE) or ``random`` (seeded by seed, block, step).
        death_rate: initial fraction of each block's active units swapped per update.
        decay_schedule: ``cosine``, ``constant`` or ``linear`` decay of the rate.
        t_end: no updates after ``t_end * total_steps``.
        seed: base seed of the random draws; the same on every rank.
        log_fn: receives a record dict at construction, after every update and on resume; by default rank 0 prints
            it with ``format_table``.
    """

    STATE_FORMAT = "sparselearning.StructuredDST/1"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        units: StructureSource,
        total_steps: int,
        *,
        atten_density: float = 0.2,
        other_density: float = 0.2,
        atten_head: int | None = None,
        compat: bool = False,
        mask_init: str = "random",
        unit_multiple: int | str = UNIT_MULTIPLE_AUTO,
        update_frequency: int = 100,
        growth: str = "gradient",
        death_rate: float = 0.5,
        decay_schedule: str = "cosine",
        t_end: float = 0.8,
        seed: int = 0,
        log_fn: LogFn | None = None,
    ) -> None:
        self.config = SparsityConfig(
            pruning_type="structure", update_frequency=update_frequency, growth=growth, death_rate=death_rate,
            decay_schedule=decay_schedule, t_end=t_end,
            atten_head=atten_head, atten_density=atten_density, other_density=other_density, structure_compat=compat,
            mask_init=mask_init,
            unit_multiple=unit_multiple,
        )
        self._start_schedule(optimizer, total_steps, seed, log_fn)
        self._death_rule = drop_lowest
        self._swapped = {"head": 0, "neuron": 0}

        net = unwrap_model(model)
        self.params = dict(net.named_parameters())
        self.total_parameters = sum(p.numel() for p in self.params.values())
        self.groups = [UnitGroup.from_dict(spec) for spec in units.groups]
        self._validate_groups()
        self.multiples = {g.name: 1 if g.kind == "head" else resolve_multiple(unit_multiple, g.num_units)
                          for g in self.groups}
        keep = {g.name: self._keep_count(g) for g in self.groups}
        self.kept_counts = keep

        self.masked = [(g, s) for g in self.groups for s in g.slices if self._is_masked(g, s)]
        active = {g.name: self._first_units(g, keep[g.name]) for g in self.groups}
        masks = {s.param: expand_units(active[g.name], s, self.params[s.param].shape) for g, s in self.masked}
        self._enforce(MaskSet({name: self.params[name] for name in masks}, masks), "structured sparsity", model)
        self.active = active

        self.window = UnitScoreWindow(self.groups, self.params, units.attach_stats(), optimizer, growth)
        self.stats = self.window.stats
        self._joined: dict[str, torch.Tensor] = {}
        self._restart_hook = optimizer.register_step_pre_hook(self._restart_joined_units)
        self.check_consistency()
        self.log_fn(self.record("init"))

    @classmethod
    def from_config(
        cls,
        cfg: SparsityConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        units: StructureSource,
        *,
        seed: int = 0,
        log_fn: LogFn | None = None,
    ) -> StructuredDST:
        """Build from a validated structured ``SparsityConfig``; a ``density`` in it is ignored with a note."""
        if cfg.density is not None and _is_rank0():
            logger.warning(
                "sparsity: --density %s (and --sparse_init %s) is ignored with --pruning_type structure, as in SViTE: "
                "the heads and neurons kept come from --atten_density/--other_density, and weight masks are not "
                "combined with structured ones", cfg.density, cfg.sparse_init,
            )
        return cls(
            model, optimizer, units, total_steps, atten_density=cfg.atten_density, other_density=cfg.other_density,
            atten_head=cfg.atten_head, compat=cfg.structure_compat, mask_init=cfg.mask_init,
            unit_multiple=cfg.unit_multiple,
            update_frequency=cfg.update_frequency,
            growth=cfg.growth, death_rate=cfg.death_rate, decay_schedule=cfg.decay_schedule, t_end=cfg.t_end,
            seed=seed, log_fn=log_fn,
        )

    # ------------------------------------------------------------------------------------------------ construction

    def _validate_groups(self) -> None:
        if not self.groups:
            raise ValueError("the model adapter reported no heads or neurons to prune")
        seen: set[str] = set()
        for g in self.groups:
            for s in g.slices:
                if s.param not in self.params:
                    raise ValueError(f"unit group {g.name} names {s.param!r}, which is not a parameter of the model")
                if s.param in seen:
                    raise ValueError(f"{s.param} belongs to more than one unit group")
                seen.add(s.param)
                shape = self.params[s.param].shape
                if shape[s.dim] != s.sections * g.num_units * s.width:
                    raise ValueError(f"{s.param} has {shape[s.dim]} entries along dim {s.dim}, not "
                                     f"{s.sections} x {g.num_units} x {s.width} as unit group {g.name} says")
        expected = self.config.atten_head
        if expected is not None:
            for g in self.groups:
                if g.kind == "head" and g.num_units != expected:
                    raise ValueError(f"--atten_head {expected} does not match the model: {g.name} has {g.num_units} "
                                     f"heads. Pass --atten_head {g.num_units} or leave it out (the model's count is "
                                     "used); SViTE silently sliced the wrong rows here")

    def _keep_count(self, group: UnitGroup) -> int:
        """Units of ``group`` kept for the whole run: ``int(H * atten_density)`` heads, ``kept_count`` neurons."""
        head = group.kind == "head"
        density = self.config.atten_density if head else self.config.other_density
        flag, what = ("--atten_density", "heads") if head else ("--other_density", "MLP neurons")
        keep = int(group.num_units * density)
        if head and keep < 1:
            raise ValueError(f"{flag} {density} keeps int({group.num_units} x {density}) = 0 of the {group.num_units} "
                             f"{what} of {group.name}; every block needs at least one ({flag} >= "
                             f"{1 / group.num_units:.4g})")
        if head:
            return keep
        multiple = self.multiples[group.name]
        try:
            return kept_count(group.num_units, density, multiple)
        except ValueError as err:
            fix = (f"pass a --unit-multiple of at most {group.num_units}" if multiple > group.num_units else
                   f"every block needs at least one ({flag} >= {(multiple + 1) // 2 / group.num_units:.4g}"
                   + ("" if multiple == 1 else " or a smaller --unit-multiple") + ")")
            raise ValueError(f"{flag} {density} with --unit-multiple {self.config.unit_multiple} keeps no "
                             f"{what} of the {group.num_units} of {group.name}: {err}; {fix}") from None

    def _first_units(self, group: UnitGroup, keep: int) -> torch.Tensor:
        """The ``keep`` units a group starts with: drawn from (seed, block), or with ``mask_init`` magnitude those of
        largest weight L1 norm (``unit_magnitude``, the neuron death score), ties in an order drawn from (seed,
        block)."""
        if self.config.mask_init == "magnitude":
            return topk_mask(unit_magnitude(self.params, group), keep,
                             tie_seed=derive_seed(self.seed, group.name, "init ties"))
        return topk_mask(random_scores((group.num_units,), derive_seed(self.seed, group.name, "init")), keep)

    def _is_masked(self, group: UnitGroup, spec: UnitSlice) -> bool:
        if spec.role == "in":
            return True
        if self.config.structure_compat:
            return spec.role == "out" and group.kind == "neuron"
        return spec.role == "bias"

    # ------------------------------------------------------------------------------------------------ training

    def _tie_seeds(self, name: str, step: int) -> tuple[int, int]:
        """The seeds ``swap_units`` derives from ``derive_seed(seed, group, step, "ties")``."""
        ties = derive_seed(self.seed, name, step, "ties")
        return derive_seed(ties, "death"), derive_seed(ties, "growth")

    def _read_window(self, step: int) -> UpdateScores | None:
        """The window's scores; the window restarts whether they are used or not."""
        scores = self.window.read(step, self.seed)
        self.window.reset()
        if scores is None:
            logger.warning("sparsity: no finite head/neuron statistics or non-finite weights at step %d; structured "
                           "update skipped", step)
            return None
        death, growth = scores
        return UpdateScores(death=death.__getitem__, growth=growth.__getitem__)

    def _commit(self, new: dict[str, torch.Tensor], step: int) -> bool:
        """Re-mask the unit slices, initialise regrown units and mark them for an optimizer-state restart at the
        next step."""
        changed, fresh = {}, {}
        self._swapped = {"head": 0, "neuron": 0}
        for g in self.groups:
            old = self.active[g.name]
            changed[g.name], fresh[g.name] = old ^ new[g.name], new[g.name] & ~old
            self._swapped[g.kind] += int(fresh[g.name].sum())
            self.active[g.name] = new[g.name]
        for g, s in self.masked:
            mask = self.mask_set.masks[s.param]
            mask.copy_(expand_units(self.active[g.name].to(mask.device), s, mask.shape))
            self.mask_set.fired[s.param] |= mask
        self.mask_set.apply_()
        if not self.config.structure_compat:
            self._initialise(fresh, step)
        self._joined = {name: units.cpu() for name, units in fresh.items() if bool(units.any())}
        return any(bool(c.any()) for c in changed.values())

    def remove(self) -> None:
        """Detach the mask enforcement, the window and restart hooks on the optimizer and the head-score hooks on the
        model."""
        super().remove()
        self.window.remove()
        self._restart_hook.remove()

    def _initialise(self, fresh: dict[str, torch.Tensor], step: int) -> None:
        """Give units that were inactive before this update fresh input rows, as a new timm Linear would get them.

        Zero rows would leave a regrown head's q and k rows without any gradient (uniform attention). Its masked
        biases are already zero. The draw is a pure function of (seed, block, step), so ranks agree.
        """
        for g in self.groups:
            units = fresh[g.name].nonzero().flatten()
            if units.numel() == 0:
                continue
            generator = torch.Generator().manual_seed(derive_seed(self.seed, g.name, step, "regrow"))
            for s in g.slices:
                if s.role != "in":
                    continue
                param = self.params[s.param]
                index = unit_positions(s, g.num_units, units)
                shape = list(param.shape)
                shape[s.dim] = index.numel()
                values = nn.init.trunc_normal_(torch.empty(shape), std=REGROWTH_STD, generator=generator)
                param.index_copy_(s.dim, index.to(param.device), values.to(param.device, param.dtype))

    def _restart_joined_units(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
                              kwargs: dict[str, Any]) -> None:
        """Pre-step hook, on the first optimizer step after an update: the masked slices of the units that joined
        restart their gated Adam entries from this step's gradient (``optimizer_state.restart_gated_entries``)."""
        if not self._joined:
            return
        for g, s in self.masked:
            joined = self._joined.get(g.name)
            if joined is not None:
                param = self.params[s.param]
                restart_gated_entries(optimizer, param, expand_units(joined.to(param.device), s, param.shape))
        self._joined = {}

    # ------------------------------------------------------------------------------------------------ reporting

    def record(self, event: str = "report") -> dict[str, Any]:
        """The current topology as a ``unit_record`` (per block and kind, plus totals), with the multiple of every
        block's neuron count (``neuron_multiples``) and the head and neuron densities asked for and kept
        (``atten_density``, ``atten_density_kept``, ``other_density``, ``other_density_kept``)."""
        groups = []
        for g in self.groups:
            fired = unit_l1(self.mask_set.fired[g.primary.param], g.primary, g.num_units) > 0
            size = sum(self.params[s.param].numel() for s in g.slices) // g.num_units
            active = int(self.active[g.name].sum())
            groups.append(UnitCount(g.name, g.kind, g.num_units, size, active, int(fired.sum())))
        record = unit_record(event, self._step, self.death_rate(self._step), groups, self.total_parameters,
                             self._swapped)
        record["neuron_multiples"] = [self.multiples[g.name] for g in self.groups if g.kind == "neuron"]
        for kind, key in (("head", "atten_density"), ("neuron", "other_density")):
            kept = [c for c in groups if c.kind == kind]
            record[f"{key}_kept"] = sum(c.active for c in kept) / sum(c.num_units for c in kept)
            record[key] = getattr(self.config, key)
        return record

    def report(self) -> dict[str, float]:
        """Scalars for the epoch log: density, density_all, explored_rate, nonzero_parameters, death_rate, heads_kept
        and neurons_kept (totals over blocks), explored_heads, explored_neurons."""
        record = self.record()
        scalars = {key: record[key] for key in ("density", "density_all", "explored_rate", "nonzero_parameters",
                                                "death_rate", "explored_heads", "explored_neurons")}
        scalars["heads_kept"] = sum(record["heads_kept"])
        scalars["neurons_kept"] = sum(record["neurons_kept"])
        return scalars

    # ------------------------------------------------------------------------------------------------ checkpoints

    def _own_state(self) -> dict[str, Any]:
        """The open score window, the units awaiting an optimizer-state restart and each block's unit multiple (a
        record; loading checks the counts). Active heads and neurons are not stored separately: loading derives them
        from the masks, so the two can never disagree (SViTE saved the masks but not its head list)."""
        return {**self.window.state_dict(),
                "joined_units": {name: units.clone() for name, units in self._joined.items()},
                "unit_multiples": dict(self.multiples)}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        """Masks, active units, window and pending restart; a ValueError for a different compat mode, masks that
        do not cover whole units, or unit counts other than this run keeps."""
        saved_compat = bool(state["config"].get("structure_compat"))
        if saved_compat != self.config.structure_compat:
            raise ValueError(f"the checkpoint was trained with structure_compat={saved_compat}, which masks other "
                             f"tensors; pass {'--structure-compat' if saved_compat else 'no --structure-compat'}")
        self.mask_set.load_state_dict(state)
        # Other densities or multiples are reported by the settings check that follows; a checkpoint from before
        # --unit-multiple has the exact counts, which this run's multiple may round otherwise.
        same_counts_asked = all(state["config"][key] == getattr(self.config, key) for key in
                                ("atten_density", "other_density", "unit_multiple") if key in state["config"])
        active = {}
        for g in self.groups:
            mask = self.mask_set.masks[g.primary.param]
            counts = unit_l1(mask, g.primary, g.num_units)
            per_unit = mask.numel() // g.num_units
            if not bool(((counts == 0) | (counts == per_unit)).all()):
                raise ValueError(f"the checkpoint's mask of {g.primary.param} does not cover whole units")
            active[g.name] = (counts > 0).cpu()
            kept = int(active[g.name].sum())
            if kept != self.kept_counts[g.name] and same_counts_asked:
                raise ValueError(f"the checkpoint keeps {kept} of the {g.num_units} units of {g.name}, this run "
                                 f"{self.kept_counts[g.name]} (unit multiple {self.multiples[g.name]}, the "
                                 f"checkpoint's {state.get('unit_multiples', {}).get(g.name, 1)}). Resume with the "
                                 "checkpoint's --unit-multiple (1 for a checkpoint from before that flag)")
            for s in g.slices:
                if self._is_masked(g, s) and not torch.equal(self.mask_set.masks[s.param],
                                                            expand_units(active[g.name].to(mask.device), s,
                                                                         self.params[s.param].shape)):
                    raise ValueError(f"the checkpoint's masks of {g.name} disagree about which units are active")
        self.active = active
        self.window.load_state_dict(state)
        self._joined = {name: units.clone() for name, units in state.get("joined_units", {}).items()}
