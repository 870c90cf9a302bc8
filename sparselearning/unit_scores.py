"""The score window of structured sparsity: what is accumulated between updates, and the criteria read from it.

Heads die by first-order Taylor importance |Σ G·O| at the head output and grow by the L1 norm of G, both summed per
sample by the model adapter's hooks (``HeadScores``). Neurons die by the L1 norm of their fc1 row and fc2 column, read
from the weights at the update, and grow by the L1 norm of the gradient of those weights, summed per optimizer step by
a post-step hook here. Growth may instead be ``random``. The criteria are chosen per group at construction; at an
update the window is all-reduced across ranks in one collective and averaged per sample or per step.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from sparselearning.criteria import derive_seed, random_scores
from sparselearning.scheduled import collective_device
from sparselearning.units import UnitGroup, unit_l1

Sums = dict[str, torch.Tensor]
"""One group's all-reduced window: ``grad_l1`` and ``samples`` (samples or steps), and ``taylor`` for heads."""
Criterion = Callable[["UnitScoreWindow", UnitGroup, Sums, int, int], torch.Tensor]
"""(window, group, its sums, step, seed) -> one float64 CPU score per unit."""


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


def taylor(window: UnitScoreWindow, group: UnitGroup, sums: Sums, step: int, seed: int) -> torch.Tensor:
    """Head death: the window's mean Taylor importance per sample."""
    return sums["taylor"] / sums["samples"]


def unit_magnitude(params: Mapping[str, torch.Tensor], group: UnitGroup) -> torch.Tensor:
    """L1 norm of each unit's weights (biases excluded), float64 on the CPU: a head's q, k and v rows and ``proj``
    columns, a neuron's fc1 row and fc2 column."""
    total = sum(unit_l1(params[s.param], s, group.num_units) for s in group.slices if s.role != "bias")
    return total.to("cpu", torch.float64)


def magnitude(window: UnitScoreWindow, group: UnitGroup, sums: Sums, step: int, seed: int) -> torch.Tensor:
    """Neuron death: L1 norm of the unit's weights now (biases excluded)."""
    return unit_magnitude(window.params, group)


def gradient(window: UnitScoreWindow, group: UnitGroup, sums: Sums, step: int, seed: int) -> torch.Tensor:
    """Gradient growth: the window's mean gradient L1 norm per sample (heads) or per step (neurons)."""
    return sums["grad_l1"] / sums["samples"]


def random_draw(window: UnitScoreWindow, group: UnitGroup, sums: Sums, step: int, seed: int) -> torch.Tensor:
    """Random growth, a pure function of (seed, group, step)."""
    return random_scores((group.num_units,), derive_seed(seed, group.name, step, "grow")).double()


DEATH: dict[str, Criterion] = {"head": taylor, "neuron": magnitude}
GROWTH: dict[str, dict[str, Criterion]] = {"gradient": {"head": gradient, "neuron": gradient},
                                           "random": {"head": random_draw, "neuron": random_draw}}


class UnitScoreWindow:
    """The per-unit statistics since the last update, and the death and growth criteria of every group.

    Args:
        groups: the unit groups.
        params: FQN -> parameter of the model.
        stats: the head-score hooks' sums (one entry per head group).
        optimizer: a post-step hook commits each step's statistics.
        growth: ``gradient`` or ``random``; neuron gradients are summed only for ``gradient``.
    """

    def __init__(self, groups: Sequence[UnitGroup], params: Mapping[str, nn.Parameter], stats: HeadScores,
                 optimizer: torch.optim.Optimizer, growth: str) -> None:
        self.groups, self.params, self.stats = list(groups), params, stats
        missing = [g.name for g in self.groups if g.kind == "head" and g.name not in stats.sums()]
        if missing:
            raise ValueError(f"the head-score hooks cover no statistics for {missing}")
        self.criteria = {g.name: (DEATH[g.kind], GROWTH[growth][g.kind]) for g in self.groups}
        device = params[self.groups[0].primary.param].device
        self.grad_sums: dict[str, torch.Tensor] = {}
        self.grad_steps = torch.zeros((), dtype=torch.float64, device=device)
        if growth == "gradient":
            for g in self.groups:
                if g.kind == "neuron":
                    self.grad_sums[g.name] = torch.zeros(g.num_units, dtype=torch.float64, device=device)
        self._hook = optimizer.register_step_post_hook(self._accumulate)

    @torch.no_grad()
    def _accumulate(self, optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Optimizer post-step hook: add this step's head scores and per-neuron gradient L1 norms to the window.

        A step that GradScaler skipped must not count. A non-fused optimizer is then not stepped (this hook does not
        run), and a fused one runs with ``optimizer.found_inf`` set, its kernel skipping internally; the statistics
        are then masked out on the device with ``torch.where``, without a host sync. Gradients are unscaled here:
        the optimizer has run (a fused kernel writes the unscaled gradients back).
        """
        found_inf = getattr(optimizer, "found_inf", None)
        self.stats.commit(found_inf)
        if self.grad_sums:
            self._accumulate_gradients(found_inf)

    def _accumulate_gradients(self, found_inf: torch.Tensor | None) -> None:
        """Per-neuron gradient L1 norms of this step into the window; the whole step is left out if any norm is not
        finite or ``found_inf`` is set."""
        norms = {}
        for g in self.groups:
            if g.name in self.grad_sums:
                per_slice = [unit_l1(grad, s, g.num_units) for s in g.slices
                             if s.role != "bias" and (grad := self.params[s.param].grad) is not None]
                if per_slice:
                    norms[g.name] = torch.stack(per_slice).double().sum(0)
        if not norms:
            return
        device = next(iter(norms.values())).device
        if self.grad_steps.device != device:  # the model moved: the window follows
            self.grad_steps = self.grad_steps.to(device)
            self.grad_sums = {name: total.to(device) for name, total in self.grad_sums.items()}
        keep = torch.isfinite(torch.cat(list(norms.values()))).all()
        if found_inf is not None:
            keep &= found_inf.to(device) == 0
        for name, norm in norms.items():
            self.grad_sums[name] += torch.where(keep, norm, 0.0)
        self.grad_steps += keep

    def _reduced(self) -> dict[str, Sums]:
        """Every group's sums, as float64 on the CPU, summed over ranks in one all-reduce."""
        sums = self.stats.sums()
        heads = [g.name for g in self.groups if g.kind == "head"]
        parts = [sums[name][key].reshape(-1) for name in heads for key in ("taylor", "grad_l1", "samples")]
        parts += [*self.grad_sums.values(), self.grad_steps.reshape(1)]
        flat = torch.cat([p.detach().to("cpu", torch.float64) for p in parts])
        if dist.is_available() and dist.is_initialized():
            flat = flat.to(collective_device())
            dist.all_reduce(flat)
            flat = flat.cpu()
        values = iter(flat.split([p.numel() for p in parts]))
        reduced: dict[str, Sums] = {name: {key: next(values) for key in ("taylor", "grad_l1", "samples")}
                                    for name in heads}
        grad_sums = {name: next(values) for name in self.grad_sums}
        steps = next(values)
        reduced.update({name: {"grad_l1": total, "samples": steps} for name, total in grad_sums.items()})
        return reduced

    def read(self, step: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
        """Death and growth scores per group (float64 on CPU), averaged over the window and all-reduced across ranks.

        None when the window holds no finite statistics (no sample, no step, or non-finite weights).
        """
        reduced = self._reduced()
        death, growth = {}, {}
        for g in self.groups:
            sums = reduced.get(g.name, {})
            death_of, growth_of = self.criteria[g.name]
            death[g.name] = death_of(self, g, sums, step, seed)
            growth[g.name] = growth_of(self, g, sums, step, seed)
        counts = [float(sums["samples"]) for sums in reduced.values()]
        scores = torch.cat([*death.values(), *growth.values()])
        if min(counts, default=1.0) <= 0 or not bool(torch.isfinite(scores).all()):
            return None
        return death, growth

    def reset(self) -> None:
        """Start a new window (after every update, whether it was used or skipped)."""
        self.stats.reset()
        for total in self.grad_sums.values():
            total.zero_()
        self.grad_steps.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The open window (CPU tensors and numbers), so a resume continues it exactly."""
        return {
            "head_stats": self.stats.state_dict(),
            "grad_sums": {name: t.detach().to("cpu", copy=True) for name, t in self.grad_sums.items()},
            "grad_steps": int(self.grad_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the ``state_dict()`` keys of a structured sparsifier's state."""
        self.stats.load_state_dict(state["head_stats"])
        for name, total in self.grad_sums.items():
            total.copy_(state["grad_sums"][name])
        self.grad_steps.fill_(int(state["grad_steps"]))

    def remove(self) -> None:
        """Uninstall the post-step hook and the head-score hooks."""
        self._hook.remove()
        self.stats.remove()
