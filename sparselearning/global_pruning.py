"""Global structural pruning toward a MAC or latency budget (after NViT, Yang et al. CVPR 2023, built from the
paper's text).

Every removable unit of the model (each block's heads and MLP neurons, the embedding channels shared by all blocks
and, with ``--prune-head-dim``, each block's head dimensions) is scored and ranked in one list. Every ``prune_every``
optimizer steps the ``prune_units`` lowest-ranked active units are removed for good, until the model's MACs reach
``target_macs`` of the dense count (or its latency by a measured table ``target_latency`` of the dense latency); then
the topology is frozen and the run fine-tunes the survivors. The units, the masks, the MAC and latency counts and the
kept-channel LayerNorms come from the model adapter (``models.global_units``), so this package needs no model code.

Unit multiples (``--unit-multiple``): a block's MLP neurons and the embedding channels are removed N at a time
(``units.resolve_multiple``: ``auto`` is 8 for layers of at least 384 units, else 1), so their kept counts stay
multiples of N, the widths matrix kernels run fast; so do head dimensions (``auto``: 1 for a 64-wide head); heads go
one at a time. A removal of N is the N lowest-scored active units of its group, scored by the sum of their scores, and
its MAC or latency saving is that of all N at once.

Latency awareness (NViT's): with λ > 0 each unit's score is lowered by λ × the milliseconds its removal saves by the
table, at the current unit counts of each pruning step, so slow units go first. Under a MAC budget only the ms saved
beyond the model's average ms per MAC count (``latency_penalty``): every way of meeting the budget removes the same
MACs, so what can make the result faster is removing the units that are slow for their MACs.

Score (NViT's): per optimizer step and unit, s = Σ w·∂L/∂w over every parameter entry the unit owns (the first-order
Taylor estimate of the loss change when it is removed), divided by a per-type constant so that heads, neurons and
channels compare in one list (NViT's 12 for an embedding channel, 6 for a head, 1 for a neuron; 3 for a head
dimension, see ``TYPE_SCALE``), squared, and averaged over the steps since the last pruning step. It is computed in
float32 from unscaled gradients, summed in float64, and all-reduced across ranks at each pruning step.

This is one more selection rule of the shared loop (``ScheduledMasks``): ``_select`` is the global ranking, and
there is no regrowth.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from sparselearning.config import SparsityConfig
from sparselearning.criteria import derive_seed
from sparselearning.masks import MaskSet, unwrap_model
from sparselearning.scheduled import LogFn, UnitGroupMasks, UpdateScores, collective_device
from sparselearning.units import UNIT_MULTIPLE_AUTO, UnitGroup, expand_units, resolve_multiple, unit_l1, unit_sum

logger = logging.getLogger(__name__)

TYPE_SCALE = {"channel": 12.0, "head": 6.0, "neuron": 1.0, "head_dim": 3.0}
"""NViT's per-type divisors of the Taylor sum, applied before squaring. NViT prunes a head's QK dims (divisor 2) and
its V dims (1) as separate units; here a head dimension is one q, k and v width (timm's ``Attention`` has one head
width), the union of a QK unit and a V unit, so its sum is divided by theirs, 3."""
BUDGET_TOLERANCE = 0.01
"""The budget is met when the MACs lie in [(1 - tolerance) * target, target] of the dense count."""


class GlobalSource(Protocol):
    """What a model adapter provides (``models.global_units``): every unit group, a MAC count of any unit counts,
    and the kept-channel LayerNorms."""

    groups: Sequence[Mapping[str, Any]]

    def macs(self, counts: Mapping[str, int]) -> float:
        """MACs per image of the model with ``counts[group]`` units kept in each group."""

    def latency(self, counts: Mapping[str, int]) -> float:
        """Milliseconds per forward pass with ``counts[group]`` units kept, by a measured table (raises without one)."""

    def set_channels(self, module: nn.Module, active: torch.Tensor) -> None:
        """Make ``module``'s residual LayerNorms normalise over the channels where ``active`` is True."""

    def active_channels(self, module: nn.Module) -> torch.Tensor:
        """Bool [D]: the channels ``module``'s residual LayerNorms already normalise over."""


class TaylorWindow:
    """Per-unit squared, type-normalised Taylor sums over the optimizer steps since the last reset.

    An optimizer pre-step hook reads each step's gradients and the weights they were computed at. Under a float16
    GradScaler a non-fused optimizer is stepped only after ``unscale_`` (and not at all after an overflow); a fused
    one carries ``grad_scale`` (None once unscaled) and ``found_inf``, so the sums are divided by the scale and an
    overflowed step is masked out on the device, without a host sync. Non-finite sums leave the step out too.
    """

    def __init__(self, groups: Sequence[UnitGroup], params: Mapping[str, nn.Parameter],
                 optimizer: torch.optim.Optimizer) -> None:
        self.groups, self.params = list(groups), params
        device = params[self.groups[0].primary.param].device
        self.sums = {g.name: torch.zeros(g.num_units, dtype=torch.float64, device=device) for g in self.groups}
        self.steps = torch.zeros((), dtype=torch.float64, device=device)
        self.paused = False
        self._hook = optimizer.register_step_pre_hook(self._accumulate)

    @torch.no_grad()
    def _accumulate(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.paused:
            return
        scale = getattr(optimizer, "grad_scale", None)
        found_inf = getattr(optimizer, "found_inf", None)
        step_scores = {}
        for g in self.groups:
            parts = [unit_sum(p.detach().float() * p.grad.float(), s, g.num_units) for s in g.slices
                     if (p := self.params[s.param]).grad is not None]
            if parts:
                total = torch.stack(parts).sum(0)
                if scale is not None:
                    total = total / scale.to(total.device, torch.float32)
                step_scores[g.name] = (total.double() / TYPE_SCALE[g.kind]).square()
        if not step_scores:
            return
        device = next(iter(step_scores.values())).device
        if self.steps.device != device:  # the model moved: the window follows
            self.steps = self.steps.to(device)
            self.sums = {name: total.to(device) for name, total in self.sums.items()}
        keep = torch.isfinite(torch.cat(list(step_scores.values()))).all()
        if found_inf is not None:
            keep &= found_inf.to(device) == 0
        for name, value in step_scores.items():
            self.sums[name] += torch.where(keep, value, 0.0)
        self.steps += keep

    def read(self) -> dict[str, torch.Tensor] | None:
        """Group name -> mean score per step (float64, CPU), averaged over ranks; None without a counted step."""
        names = list(self.sums)
        flat = torch.cat([*(self.sums[n] for n in names), self.steps.reshape(1)]).detach().to("cpu", torch.float64)
        if dist.is_available() and dist.is_initialized():
            flat = flat.to(collective_device())
            dist.all_reduce(flat)
            flat = flat.cpu() / dist.get_world_size()
        *values, steps = flat.split([*(self.sums[n].numel() for n in names), 1])
        if float(steps) <= 0:
            return None
        return {name: value / steps for name, value in zip(names, values)}

    def reset(self) -> None:
        for total in self.sums.values():
            total.zero_()
        self.steps.zero_()

    def state_dict(self) -> dict[str, Any]:
        return {"taylor_sums": {n: t.detach().to("cpu", copy=True) for n, t in self.sums.items()},
                "taylor_steps": self.steps.detach().to("cpu", copy=True)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, total in self.sums.items():
            total.copy_(state["taylor_sums"][name])
        self.steps.copy_(state["taylor_steps"])

    def remove(self) -> None:
        self._hook.remove()


def global_order(scores: Mapping[str, torch.Tensor], active: Mapping[str, torch.Tensor],
                 multiples: Mapping[str, int] | None = None,
                 penalty: Mapping[str, float] | None = None) -> list[tuple[str, tuple[int, ...]]]:
    """Every removal the ranking can make, as (group, its units), lowest score first: one list across all groups.

    A group kept in multiples of N (``multiples[name]``, 1 when absent) loses N units at a time: its active units in
    ascending score form consecutive removals of N (the N lowest first), each scored by the sum of its members'
    scores, the first-order estimate of the loss change when all N go. ``penalty[name]`` is subtracted from each
    removal's score (λ × the latency it saves). Ties keep the order of the groups and then of the units (stable
    sorts), so the order is a pure function of the scores; with N = 1 every removal is one unit.
    """
    multiples, penalty = multiples or {}, penalty or {}
    names, members, values = [], [], []
    for name, mask in active.items():
        n, cut = multiples.get(name, 1), penalty.get(name, 0.0)
        units = mask.nonzero().flatten()
        score = scores[name].double().cpu()[units]
        ranked = torch.sort(score - cut, stable=True).indices
        chunks = ranked.reshape(-1, n)
        names += [name] * chunks.shape[0]
        members += [tuple(units[chunk].tolist()) for chunk in chunks]
        values.append(score[chunks].sum(dim=1) - cut)
    order = torch.sort(torch.cat(values), stable=True).indices.tolist()
    return [(names[i], members[i]) for i in order]


def prune_to_budget(order: Sequence[tuple[str, tuple[int, ...]]], active: Mapping[str, torch.Tensor],
                    macs: Callable[[Mapping[str, int]], float], budget: float, max_units: int,
                    tolerance: float = BUDGET_TOLERANCE) -> dict[str, torch.Tensor]:
    """Make removals from the front of ``order`` (``global_order``) while the MACs exceed ``budget`` and fewer than
    ``max_units`` units have gone (a removal of N units may pass ``max_units`` by N - 1).

    A removal is skipped when it would take a group's last units (a block keeps one head and one multiple of neurons,
    the residual stream one multiple of channels) or the MACs below ``(1 - tolerance) * budget``; the next one in the
    list is tried instead, so the final count lands within the tolerance. Returns the new unit masks.

    Raises:
        RuntimeError: when the MACs exceed the budget and no unit can be removed.
    """
    new = {name: mask.clone() for name, mask in active.items()}
    counts = {name: int(mask.sum()) for name, mask in active.items()}
    current, removed = macs(counts), 0
    for name, units in order:
        if removed >= max_units or current <= budget:
            break
        if counts[name] == len(units):
            continue
        counts[name] -= len(units)
        after = macs(counts)
        if after < (1.0 - tolerance) * budget:
            counts[name] += len(units)
            continue
        new[name][list(units)] = False
        current, removed = after, removed + len(units)
    if removed == 0 and current > budget:
        raise RuntimeError(f"global pruning is stuck at {current:,.0f} MACs above its budget {budget:,.0f}: every "
                           "remaining unit is the last of its block or residual stream, or overshoots the budget by "
                           f"more than {tolerance:.0%}; raise --target-macs (or --target-latency)")
    return new


def removal_savings(counts: Mapping[str, int], cost: Callable[[Mapping[str, int]], float],
                    multiples: Mapping[str, int] | None = None) -> dict[str, float]:
    """Per group, how much ``cost`` drops when its next removal (``multiples[name]`` units, 1 when absent) goes, 0 for
    a group down to its last removal: every removal of a group saves the same, so it is computed once per group at
    the current counts."""
    multiples = multiples or {}
    base = cost(counts)
    return {name: base - cost({**counts, name: n - multiples.get(name, 1)}) if n > multiples.get(name, 1) else 0.0
            for name, n in counts.items()}


def latency_penalty(ms_saved: Mapping[str, float], lam: float, macs_saved: Mapping[str, float] | None = None,
                    ms_per_mac: float = 0.0) -> dict[str, float]:
    """The latency term of a removal's ranking score, per group, for ``global_order(penalty=...)``.

    NViT's form (``macs_saved`` None, for a latency budget): ``lam`` × the ms the removal saves, so a removal that
    saves more time ranks lower and goes first.

    Under a MAC budget: ``lam`` × (ms saved − ``ms_per_mac`` × MACs saved), the time saved beyond what the model's
    average rate predicts for those MACs. Every set of removals that meets the budget removes the same MACs, so the
    summed penalty differs from NViT's by a constant and the objective (Σ score − λ Σ ms saved) is the same. The
    greedy ranking is not: NViT's form favours a removal for the MACs it takes (each MAC saves ``ms_per_mac`` on
    average), so it spends the budget on the biggest removals, whole embedding channels, and need not end faster at
    equal MACs (``benchmarks/global_pruning.py`` measured 0.89× the MAC-only architecture on DeiT-B). This form
    favours only the units that are slow for their MACs and keeps those that are fast for theirs.
    """
    if macs_saved is None:
        return {name: lam * saving for name, saving in ms_saved.items()}
    return {name: lam * (saving - ms_per_mac * macs_saved[name]) for name, saving in ms_saved.items()}


def select_removals(scores: Mapping[str, torch.Tensor], active: Mapping[str, torch.Tensor],
                    multiples: Mapping[str, int], cost: Callable[[Mapping[str, int]], float], budget: float,
                    max_units: int, latency: Callable[[Mapping[str, int]], float] | None = None,
                    latency_lambda: float = 0.0, absolute_penalty: bool = False) -> dict[str, torch.Tensor]:
    """One pruning step of the global rule: the new unit masks after up to ``max_units`` units (in removals of their
    multiple) of the one ranking go, within ``budget`` of ``cost``; with ``latency_lambda`` > 0 each removal's score
    is first penalised by the ``latency`` it saves at the current counts (``latency_penalty``): NViT's λ × ms saved
    with ``absolute_penalty`` (what a latency budget uses), else the ms saved beyond the average per unit of ``cost``
    (a MAC budget)."""
    penalty = None
    if latency_lambda:
        counts = {name: int(mask.sum()) for name, mask in active.items()}
        ms_saved = removal_savings(counts, latency, multiples)
        if absolute_penalty:
            penalty = latency_penalty(ms_saved, latency_lambda)
        else:
            penalty = latency_penalty(ms_saved, latency_lambda, removal_savings(counts, cost, multiples),
                                      latency(counts) / cost(counts))
    order = global_order(scores, active, multiples, penalty)
    return prune_to_budget(order, active, cost, budget, max_units)


def unit_masks(groups: Sequence[UnitGroup], active: Mapping[str, torch.Tensor],
               params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every owned tensor's mask when the units ``active[group]`` are kept: the AND over the groups that split it (a
    ``qkv`` entry needs its head and its input channel). ``models.compact_model(model, masks)`` reads them."""
    masks: dict[str, torch.Tensor] = {}
    for g in groups:
        for s in g.slices:
            param = params[s.param]
            unit_mask = expand_units(active[g.name].to(param.device), s, param.shape)
            masks[s.param] = masks[s.param] & unit_mask if s.param in masks else unit_mask
    return masks


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class GlobalPruning(UnitGroupMasks):
    """Global structural pruning of heads, MLP neurons and embedding channels (and, with ``prune_head_dim``, head
    dimensions) to a MAC or latency budget (``--pruning_type global``).

    It starts with every unit active (pretrained weights, ``--finetune``; the embedding channels a ``--finetune``
    of a channel-pruned file restored as pruned stay pruned) and masks every parameter entry a removed unit owns, so a removed unit is exactly silent; removed channels make the residual LayerNorms normalise over
    the kept channels (``GlobalSource.set_channels``), which is what the compact model computes. Units never come
    back, and the optimizer state is left alone.

    Args:
        model: the model (DDP or compiled wrappers are fine).
        optimizer: its optimizer; the score window and the mask enforcement hook it.
        units: the model adapter, e.g. ``models.global_units(model)``.
        total_steps: optimizer steps of the whole run.
        target_macs: the budget, a fraction of the dense model's MACs in (0, 1).
        target_latency: instead, a fraction of the dense model's latency by ``units.latency`` (a measured table).
        latency_lambda: λ: the ranking uses each unit's score minus λ × the ms its removal saves (``units.latency``;
            under a MAC budget, the ms saved beyond the model's average ms per MAC: ``latency_penalty``); 0 ranks by
            the scores alone.
        prune_every: optimizer steps between pruning steps.
        prune_units: units removed per pruning step (the last removal of N units may pass it by N - 1).
        unit_multiple: MLP neurons, embedding channels and head dimensions are removed in groups of
            ``resolve_multiple(unit_multiple, width)`` units, so their kept counts stay multiples of it; heads one at a
            time.
        prune_head_dim: each block's head dimensions are units too (``--prune-head-dim``); ``units`` must then list
            their groups (``models.global_units(model, prune_head_dim=True)``).
        seed: kept for the schedule state (the selection is deterministic).
        latency_table: the table file ``units`` measures latency with, recorded in the config.
        log_fn: receives a record at construction, after every pruning step and on resume.

    Raises:
        ValueError: when the budget is below what one head, one multiple of neurons (and of head dimensions) per
            block and one multiple of channels cost, when a group's starting count is not a multiple of its
            ``unit_multiple``, or when ``units`` lists head-dimension groups without ``prune_head_dim`` (or none with
            it).
    """

    STATE_FORMAT = "sparselearning.GlobalPruning/1"

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, units: GlobalSource, total_steps: int, *,
                 target_macs: float | None = None, target_latency: float | None = None, latency_lambda: float = 0.0,
                 prune_every: int = 100, prune_units: int = 32, unit_multiple: int | str = UNIT_MULTIPLE_AUTO,
                 seed: int = 0, latency_table: str | None = None, prune_head_dim: bool = False,
                 log_fn: LogFn | None = None) -> None:
        self.config = SparsityConfig(pruning_type="global", target_macs=target_macs, prune_every=prune_every,
                                     prune_units=prune_units, target_latency=target_latency,
                                     latency_lambda=latency_lambda, latency_table=latency_table,
                                     unit_multiple=unit_multiple, prune_head_dim=prune_head_dim)
        self._start_schedule(optimizer, total_steps, seed, log_fn)
        self.model, self.units = model, units
        self.params = dict(unwrap_model(model).named_parameters())
        self.total_parameters = sum(p.numel() for p in self.params.values())
        self.groups = [UnitGroup.from_dict(spec) for spec in units.groups]
        channels = [g for g in self.groups if g.kind == "channel"]
        if len(channels) != 1:
            raise ValueError(f"global pruning needs exactly one channel group from the model adapter, got {len(channels)}")
        self.channel_group = channels[0].name
        if any(g.kind == "head_dim" for g in self.groups) != prune_head_dim:
            raise ValueError("the model adapter's unit groups do not match prune_head_dim "
                             f"{prune_head_dim}: build it with models.global_units(model, prune_head_dim="
                             f"{prune_head_dim})")
        self.active = {g.name: torch.ones(g.num_units, dtype=torch.bool) for g in self.groups}
        self.active[self.channel_group] = units.active_channels(model).clone()  # a --finetune of a pruned file
        self.multiples = {g.name: 1 if g.kind == "head" else resolve_multiple(unit_multiple, g.num_units)
                          for g in self.groups}
        self._check_multiples(self._active_counts(), "the model",
                              "pass a --unit-multiple that divides it (1 removes one unit at a time)")
        dense = {g.name: g.num_units for g in self.groups}
        self.dense_macs = units.macs(dense)
        self.uses_latency = target_latency is not None or latency_lambda > 0
        self.dense_latency = units.latency(dense) if self.uses_latency else None
        flag, target, self.cost = (("--target-macs", target_macs, units.macs) if target_latency is None
                                   else ("--target-latency", target_latency, units.latency))
        self.dense_cost = self.cost(dense)
        self.budget = target * self.dense_cost
        floor = self.cost(self.multiples)
        if floor > self.budget:
            dims = " and of head dimensions" if prune_head_dim else ""
            raise ValueError(f"{flag} {target} is below {floor / self.dense_cost:.4g}, the cost of one head and one "
                             f"multiple of MLP neurons{dims} per block and of embedding channels (--unit-multiple "
                             f"{unit_multiple}): it would empty a block or the residual stream. Raise {flag}")
        if prune_every >= total_steps:
            warnings.warn(f"--prune-every {prune_every} >= the run's {total_steps} optimizer steps: nothing will be "
                          "pruned", stacklevel=2)
        masks = self._unit_masks()
        self.mask_set = MaskSet({name: self.params[name] for name in masks}, masks)
        self.mask_set.attach(optimizer, model)
        self.mask_set.apply_()
        self.window = TaylorWindow(self.groups, self.params, optimizer)
        self._removed = 0
        self.check_consistency()
        self.log_fn(self.record("init"))

    @classmethod
    def from_config(cls, cfg: SparsityConfig, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int,
                    units: GlobalSource, *, seed: int = 0, log_fn: LogFn | None = None) -> GlobalPruning:
        """Build from a validated ``SparsityConfig`` with ``pruning_type`` global."""
        return cls(model, optimizer, units, total_steps, target_macs=cfg.target_macs,
                   target_latency=cfg.target_latency, latency_lambda=cfg.latency_lambda, prune_every=cfg.prune_every,
                   prune_units=cfg.prune_units, unit_multiple=cfg.unit_multiple, seed=seed,
                   latency_table=cfg.latency_table, prune_head_dim=cfg.prune_head_dim, log_fn=log_fn)

    def _check_multiples(self, counts: Mapping[str, int], source: str, fix: str) -> None:
        """Removals of N keep a count a multiple of N only if it starts as one."""
        for g in self.groups:
            n = self.multiples[g.name]
            if counts[g.name] % n:
                raise ValueError(f"{source} keeps {counts[g.name]} {g.kind}s in {g.name}, not a multiple of "
                                 f"{n} (--unit-multiple {self.config.unit_multiple}), so removals of {n} cannot keep "
                                 f"its width aligned: {fix}")

    # ------------------------------------------------------------------------------------------------ masks

    def _unit_masks(self) -> dict[str, torch.Tensor]:
        return unit_masks(self.groups, self.active, self.params)

    @property
    def current_macs(self) -> float:
        return self.units.macs(self._active_counts())

    @property
    def budget_met(self) -> bool:
        return self.cost(self._active_counts()) <= self.budget

    @property
    def ready_to_compact(self) -> bool:
        """Whether the architecture is final (the budget is met, nothing more is pruned), so that the run may go on
        as the compact model of ``masks`` (``--compact-at-budget``)."""
        return self.budget_met

    # ------------------------------------------------------------------------------------------------ the loop

    def step(self, step: int) -> bool:
        """Call after every optimizer step; prunes every ``prune_every`` steps until the budget is met."""
        self._step = step
        if self.budget_met or step == self._last_update_step or step % self.config.prune_every:
            return False
        self._last_update_step = step
        return self._update(step)

    def _tie_seeds(self, name: str, step: int) -> tuple[int, int]:
        ties = derive_seed(self.seed, name, step, "ties")
        return ties, ties

    def _read_window(self, step: int) -> UpdateScores | None:
        scores = self.window.read()
        self.window.reset()
        if scores is None or not all(bool(torch.isfinite(s).all()) for s in scores.values()):
            logger.warning("global pruning: no finite scores at step %d; pruning step skipped", step)
            return None
        return UpdateScores(death=scores.__getitem__, growth=scores.__getitem__)

    def _select(self, scores: UpdateScores, rate: float, step: int) -> dict[str, torch.Tensor]:
        """The global rule: the ``prune_units`` lowest-scored active units of all groups go (neurons, channels and
        head dimensions in removals of their multiple), within the budget; with λ > 0 each removal's score is
        latency-penalised by what it saves at the current counts (beyond the average ms per MAC under a MAC
        budget)."""
        return select_removals({name: scores.death(name) for name in self.active}, self.active, self.multiples,
                               self.cost, self.budget, self.config.prune_units, self.units.latency,
                               self.config.latency_lambda, absolute_penalty=self.config.target_latency is not None)

    def _commit(self, new: dict[str, torch.Tensor], step: int) -> bool:
        self._removed = sum(int((self.active[n] & ~new[n]).sum()) for n in new)
        self.active = new
        self._write_masks()
        if self.budget_met:
            self.window.paused = True
            if _is_rank0():
                logger.info("global pruning: budget met at step %d (%.4f of the dense MACs)", step,
                            self.current_macs / self.dense_macs)
        return self._removed > 0

    @torch.no_grad()
    def _write_masks(self) -> None:
        for name, mask in self._unit_masks().items():
            self.mask_set.masks[name].copy_(mask)
        self.mask_set.apply_()
        self.units.set_channels(self.model, self.active[self.channel_group])

    @torch.no_grad()
    def apply_masks(self, module: nn.Module) -> None:
        """Zero the removed units of ``module`` (e.g. the EMA) and give it the same kept-channel LayerNorms."""
        super().apply_masks(module)
        self.units.set_channels(module, self.active[self.channel_group])

    def remove(self) -> None:
        super().remove()
        self.window.remove()

    # ------------------------------------------------------------------------------------------------ reporting

    def record(self, event: str = "report") -> dict[str, Any]:
        """Per group its kept units (``heads_kept``/``neurons_kept`` per block, as S²ViTE's record, and
        ``head_dims_kept`` with ``prune_head_dim``); ``nonzero_parameters`` is the compact model's parameter count
        (every entry a removed unit owns is masked)."""
        layers = {}
        for g in self.groups:
            kept = int(self.active[g.name].sum())
            layers[f"{g.name}.{g.kind}s"] = {"shape": [g.num_units], "nonzero": kept, "numel": g.num_units,
                                             "density": kept / g.num_units}
        masked = sum(m.numel() for m in self.mask_set.masks.values())
        active = sum(int(m.sum()) for m in self.mask_set.masks.values())
        nonzero = self.total_parameters - masked + active
        kept = {kind: [int(self.active[g.name].sum()) for g in self.groups if g.kind == kind] for kind in TYPE_SCALE}
        return {"event": event, "step": self._step, "death_rate": 0.0, "pruning_type": "global", "layers": layers,
                "density": active / masked, "density_all": nonzero / self.total_parameters, "explored_rate": 1.0,
                "nonzero_parameters": nonzero, "total_parameters": self.total_parameters,
                "macs_fraction": self.current_macs / self.dense_macs, "target_macs": self.config.target_macs,
                "removed_units": self._removed, "heads_kept": kept["head"], "neurons_kept": kept["neuron"],
                "channels_kept": sum(kept["channel"]),
                "neuron_multiples": [self.multiples[g.name] for g in self.groups if g.kind == "neuron"],
                "channel_multiple": self.multiples[self.channel_group],
                **({"head_dims_kept": kept["head_dim"],
                    "head_dim_multiples": [self.multiples[g.name] for g in self.groups if g.kind == "head_dim"]}
                   if self.config.prune_head_dim else {}),
                **({"latency_fraction": self.units.latency(self._active_counts()) / self.dense_latency,
                    "target_latency": self.config.target_latency} if self.uses_latency else {})}

    def report(self) -> dict[str, float]:
        """Scalars for the epoch log."""
        record = self.record()
        scalars = {key: record[key] for key in ("density", "density_all", "nonzero_parameters", "macs_fraction",
                                                "channels_kept", "latency_fraction") if key in record}
        return {**scalars, "heads_kept": sum(record["heads_kept"]), "neurons_kept": sum(record["neurons_kept"]),
                **({"head_dims_kept": sum(record["head_dims_kept"])} if "head_dims_kept" in record else {})}

    # ------------------------------------------------------------------------------------------------ checkpoints

    def _own_state(self) -> dict[str, Any]:
        return {**self.window.state_dict(), "removed_units": self._removed, "unit_multiples": dict(self.multiples)}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        """Masks, the units they keep (checked to be whole units in multiples of this run's), the open window."""
        self.mask_set.load_state_dict(state)
        active = {}
        for g in self.groups:
            mask = self.mask_set.masks[g.primary.param]
            active[g.name] = (unit_l1(mask, g.primary, g.num_units) > 0).cpu()
        if state["config"].get("unit_multiple", 1) == self.config.unit_multiple:  # else the settings check reports
            self._check_multiples({name: int(units.sum()) for name, units in active.items()}, "the checkpoint",
                                  "it was pruned one unit at a time, before removals kept multiples; resume it with "
                                  "that version or start a new run")
        self.active = active
        if any(not torch.equal(self.mask_set.masks[name], mask) for name, mask in self._unit_masks().items()):
            raise ValueError("the checkpoint's global-pruning masks do not cover whole heads, neurons, channels (and "
                             "head dimensions)")
        self._write_masks()
        self.window.load_state_dict(state)
        self.window.paused = self.budget_met
        self._removed = int(state["removed_units"])
