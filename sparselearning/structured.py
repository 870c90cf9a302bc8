"""Structured dynamic sparse training (S²ViTE): SViTE's prune-and-grow loop on whole attention heads and MLP neurons.

Only the granularity differs from ``Masking``. A unit is a set of tensor slices: a head's q, k and v rows, or a
neuron's fc1 row and fc2 column. Every group of units gets one score per unit. The rest is shared: the exact-count
selection (``drop_lowest``, ``grow_highest``), the schedule, ``MaskSet`` enforcement and the digest all-reduce.
This package never imports the model code. The model side (``models.structure_units``) describes the units as plain
dicts of FQNs and axes, and it supplies per-head scores collected by hooks.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from sparselearning.config import SparsityConfig
from sparselearning.criteria import derive_seed, drop_lowest, grow_highest, random_scores, topk_mask
from sparselearning.masks import MaskSet, unwrap_model
from sparselearning.scheduled import LogFn, ScheduledMasks, collective_device
from sparselearning.units import UnitGroup, UnitSlice, expand_units, unit_l1, unit_positions

logger = logging.getLogger(__name__)

GATED_SECOND_MOMENT = 1e-3
"""An Adam second moment below this fraction of the squared gradient marks an entry whose gradient was gated while its
unit was pruned; a valid running mean of g² is practically never that far below one sample of g²."""
REGROWTH_STD = 0.02
"""Std of the fresh init of a regrown unit's input rows: timm's ``trunc_normal_(std=.02)`` for ViT Linear layers."""


class HeadScores(Protocol):
    """Per-head sums over the committed steps since the last reset, filled by hooks on the model
    (``models.HeadStats``)."""

    def sums(self) -> dict[str, dict[str, torch.Tensor]]:
        """Group name -> ``taylor`` and ``grad_l1`` (per-head sums over samples) and ``samples`` (a 0-d count)."""

    def commit(self, found_inf: torch.Tensor | None) -> None:
        """Add the step just taken to the window unless ``found_inf`` (a device tensor) says it was skipped."""

    def remove(self) -> None:
        """Uninstall the hooks."""

    def reset(self) -> None:
        """Start a new window."""

    def state_dict(self) -> dict[str, Any]:
        """The running sums, for an exact resume."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``."""


class StructureSource(Protocol):
    """What a model adapter provides: the unit layout as plain dicts, and head-score hooks installed on demand."""

    groups: Sequence[Mapping[str, Any]]

    def attach_stats(self) -> HeadScores:
        """Install the score hooks (only structured runs call this) and return the object they fill."""


def swap_units(active: torch.Tensor, death_scores: torch.Tensor, growth_scores: torch.Tensor, n: int,
               tie_seed: int | None = None) -> torch.Tensor:
    """SViTE's structured update of one group: the ``n`` active units with the lowest death scores leave, then the
    ``n`` inactive units with the highest growth scores join. Units that just left count as inactive.

    Counts are exact, so the active count never changes. Tied scores are taken in an order drawn from ``tie_seed``
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


class StructuredDST(ScheduledMasks):
    """S²ViTE: dynamic sparsity of whole attention heads and MLP neurons, with a fixed count per block.

    Construction picks ``int(H * atten_density)`` heads and ``int(hidden * other_density)`` neurons per block at
    random. The draw is a pure function of (seed, block), so DDP ranks agree without a broadcast. It then masks the
    other units and hooks ``optimizer.step()`` so they stay zero. On the schedule of ``Masking`` (every
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
    hook; see ``_restart_joined_units``).

    Args:
        model: the model (DDP or compiled wrappers are fine; FQNs are those of the wrapped module).
        optimizer: optimizer of the model; post-step hooks and a pre-step hook are registered on it.
        units: the model adapter, e.g. ``models.structure_units(model, scaler)``.
        total_steps: T, optimizer steps of the whole run.
        atten_density: fraction of each block's heads kept.
        other_density: fraction of each block's MLP neurons kept.
        atten_head: expected heads per block (SViTE's ``--atten_head``); None takes them from the model.
        compat: SViTE's bias leak, fc2-column masks and zero regrowth, so original runs are reproduced exactly.
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
        )
        self._start_schedule(optimizer, total_steps, seed, log_fn)
        self._swapped = {"head": 0, "neuron": 0}

        net = unwrap_model(model)
        self.params = dict(net.named_parameters())
        self.total_parameters = sum(p.numel() for p in self.params.values())
        self.groups = [UnitGroup.from_dict(spec) for spec in units.groups]
        self._validate_groups()
        keep = {g.name: self._keep_count(g) for g in self.groups}

        self.masked = [(g, s) for g in self.groups for s in g.slices if self._is_masked(g, s)]
        active = {g.name: topk_mask(random_scores((g.num_units,), derive_seed(self.seed, g.name, "init")),
                                    keep[g.name]) for g in self.groups}
        masks = {s.param: expand_units(active[g.name], s, self.params[s.param].shape) for g, s in self.masked}
        self._enforce(MaskSet({name: self.params[name] for name in masks}, masks), "structured sparsity", model)
        self.active = active

        self.stats = units.attach_stats()
        missing = [g.name for g in self.groups if g.kind == "head" and g.name not in self.stats.sums()]
        if missing:
            raise ValueError(f"the head-score hooks cover no statistics for {missing}")
        device = self.params[self.groups[0].primary.param].device
        self._grad_sums: dict[str, torch.Tensor] = {}
        self._grad_steps = torch.zeros((), dtype=torch.float64, device=device)
        if growth == "gradient":
            for g in self.groups:
                if g.kind == "neuron":
                    self._grad_sums[g.name] = torch.zeros(g.num_units, dtype=torch.float64, device=device)
        self._window_hook = optimizer.register_step_post_hook(self._accumulate_window)
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
            atten_head=cfg.atten_head, compat=cfg.structure_compat, update_frequency=cfg.update_frequency,
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
        head = group.kind == "head"
        density = self.config.atten_density if head else self.config.other_density
        keep = int(group.num_units * density)
        if keep < 1:
            flag, what = ("--atten_density", "heads") if head else ("--other_density", "MLP neurons")
            raise ValueError(f"{flag} {density} keeps int({group.num_units} x {density}) = 0 of the {group.num_units} "
                             f"{what} of {group.name}; every block needs at least one ({flag} >= "
                             f"{1 / group.num_units:.4g})")
        return keep

    def _is_masked(self, group: UnitGroup, spec: UnitSlice) -> bool:
        if spec.role == "in":
            return True
        if self.config.structure_compat:
            return spec.role == "out" and group.kind == "neuron"
        return spec.role == "bias"

    # ------------------------------------------------------------------------------------------------ training

    @torch.no_grad()
    def _accumulate_window(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
                           kwargs: dict[str, Any]) -> None:
        """Optimizer post-step hook: add this step's head scores and per-neuron gradient L1 norms to the window.

        A step that GradScaler skipped must not count. A non-fused optimizer is then not stepped (this hook does not
        run), and a fused one runs with ``optimizer.found_inf`` set, its kernel skipping internally; the statistics
        are then masked out on the device with ``torch.where``, without a host sync. Gradients are unscaled here:
        the optimizer has run (a fused kernel writes the unscaled gradients back).
        """
        found_inf = getattr(optimizer, "found_inf", None)
        self.stats.commit(found_inf)
        if self._grad_sums:
            self._accumulate_gradients(found_inf)

    def _accumulate_gradients(self, found_inf: torch.Tensor | None) -> None:
        """Per-neuron gradient L1 norms of this step into the window; the whole step is left out if any norm is not
        finite or ``found_inf`` is set."""
        norms = {}
        for g in self.groups:
            if g.name in self._grad_sums:
                per_slice = [unit_l1(grad, s, g.num_units) for s in g.slices
                             if s.role != "bias" and (grad := self.params[s.param].grad) is not None]
                if per_slice:
                    norms[g.name] = torch.stack(per_slice).double().sum(0)
        if not norms:
            return
        device = next(iter(norms.values())).device
        if self._grad_steps.device != device:  # the model moved: the window follows
            self._grad_steps = self._grad_steps.to(device)
            self._grad_sums = {name: total.to(device) for name, total in self._grad_sums.items()}
        keep = torch.isfinite(torch.cat(list(norms.values()))).all()
        if found_inf is not None:
            keep &= found_inf.to(device) == 0
        for name, norm in norms.items():
            self._grad_sums[name] += torch.where(keep, norm, 0.0)
        self._grad_steps += keep

    def _window_scores(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """Death and growth scores per group (float64 on CPU), averaged over the window and all-reduced across ranks.

        Returns None, after logging and recording the skip, when the window holds no finite statistics.
        """
        sums = self.stats.sums()
        heads = [g for g in self.groups if g.kind == "head"]
        parts = [sums[g.name][key].reshape(-1) for g in heads for key in ("taylor", "grad_l1", "samples")]
        parts += [self._grad_sums[name] for name in self._grad_sums]
        parts.append(self._grad_steps.reshape(1))
        flat = torch.cat([p.detach().to("cpu", torch.float64) for p in parts])
        if dist.is_available() and dist.is_initialized():
            flat = flat.to(collective_device())
            dist.all_reduce(flat)
            flat = flat.cpu()
        values = iter(flat.split([p.numel() for p in parts]))
        death: dict[str, torch.Tensor] = {}
        growth: dict[str, torch.Tensor] = {}
        counts = []
        for g in heads:
            taylor, grad_l1, samples = next(values), next(values), next(values)
            death[g.name], growth[g.name] = taylor / samples, grad_l1 / samples
            counts.append(samples)
        grad_sums = {name: next(values) for name in self._grad_sums}
        grad_steps = next(values)
        for g in self.groups:
            if g.kind == "neuron":
                magnitude = sum(unit_l1(self.params[s.param], s, g.num_units) for s in g.slices if s.role != "bias")
                death[g.name] = magnitude.to("cpu", torch.float64)
                if g.name in grad_sums:
                    growth[g.name] = grad_sums[g.name] / grad_steps
                    counts.append(grad_steps)
            if self.config.growth == "random":
                growth[g.name] = random_scores((g.num_units,), derive_seed(self.seed, g.name, step, "grow")).double()
        scores = torch.cat([*death.values(), *growth.values()])
        if min((float(c) for c in counts), default=1.0) <= 0 or not bool(torch.isfinite(scores).all()):
            logger.warning("sparsity: no finite head/neuron statistics or non-finite weights at step %d; structured "
                           "update skipped", step)
            self.skipped_updates.append(step)
            return None
        return death, growth

    def _reset_window(self) -> None:
        self.stats.reset()
        for total in self._grad_sums.values():
            total.zero_()
        self._grad_steps.zero_()

    @torch.no_grad()
    def _update(self, step: int) -> bool:
        """One topology update: swap units in every group, re-mask, initialise regrown units, mark them for an
        optimizer-state restart at the next step, restart the score window, check agreement across ranks and log."""
        scores = self._window_scores(step)
        self._reset_window()
        if scores is None:
            return False
        death, growth = scores
        rate = self.death_rate(step)
        changed: dict[str, torch.Tensor] = {}
        fresh: dict[str, torch.Tensor] = {}
        self._swapped = {"head": 0, "neuron": 0}
        for g in self.groups:
            old = self.active[g.name]
            active = int(old.sum())
            new = swap_units(old, death[g.name], growth[g.name], min(active, math.ceil(rate * active)),
                             derive_seed(self.seed, g.name, step, "ties"))
            changed[g.name], fresh[g.name] = old ^ new, new & ~old
            self._swapped[g.kind] += int(fresh[g.name].sum())
            self.active[g.name] = new
        for g, s in self.masked:
            mask = self.mask_set.masks[s.param]
            mask.copy_(expand_units(self.active[g.name].to(mask.device), s, mask.shape))
            self.mask_set.fired[s.param] |= mask
        self.mask_set.apply_()
        if not self.config.structure_compat:
            self._initialise(fresh, step)
        self._joined = {name: units.cpu() for name, units in fresh.items() if bool(units.any())}
        self.check_consistency()
        self.log_fn(self.record("update"))
        return any(bool(c.any()) for c in changed.values())

    def remove(self) -> None:
        """Detach the mask enforcement, the window and restart hooks on the optimizer and the head-score hooks on the
        model."""
        super().remove()
        self._window_hook.remove()
        self._restart_hook.remove()
        self.stats.remove()

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

    @torch.no_grad()
    def _restart_joined_units(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...],
                              kwargs: dict[str, Any]) -> None:
        """Pre-step hook, on the first optimizer step after an update: Adam state entries of the units that joined
        whose gradient was gated while the unit was pruned restart from this step's gradient (``exp_avg`` = g,
        ``exp_avg_sq`` = g², so this step is Adam's bias-corrected first step, sign(g) * lr). The rest of the
        optimizer state is kept, as in ``Masking``.

        Why: a pruned unit's own zero weights gate the gradient of some of its input rows (a pruned head's q and k
        rows get none), so their second moment is zero or decayed while AdamW's per-tensor ``step`` has long ended
        the bias correction: kept or zeroed, such rows stepped about 2x more than the survivors. Entries with a valid
        second moment (v rows, fc1 rows: dense gradients) keep it. SGD's momentum is zero where the gradient was
        gated, which is how torch starts a new buffer, so it is kept too. Under GradScaler with a fused optimizer the
        gradients are still scaled here and the step may be skipped: they are unscaled with
        ``optimizer.grad_scale``, and nothing changes where ``optimizer.found_inf`` is set.
        """
        if not self._joined:
            return
        scale, found_inf = getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None)
        for g in self.groups:
            joined = self._joined.get(g.name)
            if joined is None:
                continue
            for s in g.slices:
                param = self.params[s.param]
                state = optimizer.state.get(param)
                if not self._is_masked(g, s) or not state or param.grad is None:
                    continue
                where = expand_units(joined.to(param.device), s, param.shape)
                if found_inf is not None:
                    where = where & (found_inf.to(param.device) == 0)
                second = state.get("exp_avg_sq")
                if not isinstance(second, torch.Tensor) or second.shape != param.shape:
                    continue  # not Adam-like: SGD's momentum is zero where the gradient was gated, torch's own start
                grad = param.grad.float() if scale is None else param.grad.float() / scale.to(param.device)
                square = grad.square()
                where = where & (second < GATED_SECOND_MOMENT * square)
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    value = state.get(key)
                    if isinstance(value, torch.Tensor) and value.shape == param.shape:
                        value.copy_(torch.where(where, (grad if key == "exp_avg" else square).to(value.dtype), value))
        self._joined = {}

    # ------------------------------------------------------------------------------------------------ reporting

    def _unit_counts(self, group: UnitGroup) -> tuple[int, int]:
        """(active units, units ever active) of a group."""
        fired = unit_l1(self.mask_set.fired[group.primary.param], group.primary, group.num_units) > 0
        return int(self.active[group.name].sum()), int(fired.sum())

    def record(self, event: str = "report") -> dict[str, Any]:
        """The current topology as a plain dict that ``format_table`` prints and JSON stores.

        ``layers`` has one row per block and kind (``blocks.3.attn.heads``: shape [H], nonzero = heads kept).
        ``density`` and ``explored_rate`` are weighted by parameters over all unit slices (masked or not).
        ``nonzero_parameters`` is the parameter count of the compacted model. ``explored_heads`` and
        ``explored_neurons`` are the fractions of units ever active. ``swapped_*`` counts the units that joined in
        the last update.
        """
        layers: dict[str, dict[str, Any]] = {}
        kept: dict[str, list[int]] = {"head": [], "neuron": []}
        units = {"head": [0, 0], "neuron": [0, 0]}  # total, explored
        unit_params = active_params = explored_params = 0
        for g in self.groups:
            active, explored = self._unit_counts(g)
            per_unit = sum(self.params[s.param].numel() for s in g.slices) // g.num_units
            unit_params += per_unit * g.num_units
            active_params += per_unit * active
            explored_params += per_unit * explored
            kept[g.kind].append(active)
            units[g.kind][0] += g.num_units
            units[g.kind][1] += explored
            label = f"{g.name}.{'heads' if g.kind == 'head' else 'neurons'}"
            layers[label] = {"shape": [g.num_units], "nonzero": active, "numel": g.num_units,
                             "density": active / g.num_units}
        nonzero = self.total_parameters - unit_params + active_params
        return {
            "event": event,
            "step": self._step,
            "death_rate": self.death_rate(self._step),
            "pruning_type": "structure",
            "layers": layers,
            "density": active_params / unit_params,
            "density_all": nonzero / self.total_parameters,
            "explored_rate": explored_params / unit_params,
            "nonzero_parameters": nonzero,
            "unit_parameters": unit_params,
            "total_parameters": self.total_parameters,
            "heads_kept": kept["head"],
            "neurons_kept": kept["neuron"],
            "explored_heads": units["head"][1] / max(units["head"][0], 1),
            "explored_neurons": units["neuron"][1] / max(units["neuron"][0], 1),
            "swapped_heads": self._swapped["head"],
            "swapped_neurons": self._swapped["neuron"],
        }

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

    def state_dict(self) -> dict[str, Any]:
        """Masks and explored masks (CPU bool, by FQN), the open score window, step, seed and config.

        Active heads and neurons are not stored separately; ``load_state_dict`` derives them from the masks, so the
        two can never disagree (SViTE saved the masks but not its head list). Only plain tensors, numbers, strings,
        lists and dicts, so ``torch.load(weights_only=True)`` reads it.
        """
        return {
            **self._schedule_state(),
            "head_stats": self.stats.state_dict(),
            "grad_sums": {name: t.detach().to("cpu", copy=True) for name, t in self._grad_sums.items()},
            "grad_steps": int(self._grad_steps),
            "joined_units": {name: units.clone() for name, units in self._joined.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output; load the model and optimizer first (the masks are re-applied).

        Raises:
            ValueError: for another method's state, a different compat mode, or masks that do not cover whole units.
        """
        self._check_state_format(state)
        saved_compat = bool(state["config"].get("structure_compat"))
        if saved_compat != self.config.structure_compat:
            raise ValueError(f"the checkpoint was trained with structure_compat={saved_compat}, which masks other "
                             f"tensors; pass {'--structure-compat' if saved_compat else 'no --structure-compat'}")
        self.mask_set.load_state_dict(state)
        active = {}
        for g in self.groups:
            mask = self.mask_set.masks[g.primary.param]
            counts = unit_l1(mask, g.primary, g.num_units)
            per_unit = mask.numel() // g.num_units
            if not bool(((counts == 0) | (counts == per_unit)).all()):
                raise ValueError(f"the checkpoint's mask of {g.primary.param} does not cover whole units")
            active[g.name] = (counts > 0).cpu()
            for s in g.slices:
                if self._is_masked(g, s) and not torch.equal(self.mask_set.masks[s.param],
                                                            expand_units(active[g.name].to(mask.device), s,
                                                                         self.params[s.param].shape)):
                    raise ValueError(f"the checkpoint's masks of {g.name} disagree about which units are active")
        self.active = active
        self.stats.load_state_dict(state["head_stats"])
        for name, total in self._grad_sums.items():
            total.copy_(state["grad_sums"][name])
        self._grad_steps.fill_(int(state["grad_steps"]))
        self._joined = {name: units.clone() for name, units in state.get("joined_units", {}).items()}
        self._load_schedule_state(state)
        self.check_consistency()
        self.log_fn(self.record("resume"))
