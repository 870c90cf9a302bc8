"""The Gumbel temperature schedule: a ``Sparsifier`` that sets tau from the optimizer step, so it is checkpointed
with the run."""
from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from models.token_selection.config import TAU_SCHEDULES, TokenConfig, check_choice
from models.token_selection.selector import token_scorers

logger = logging.getLogger(__name__)

TAU_START, TAU_END = 10.0, 0.1  # SViTE's get_tau(10, 0.1, step, T)
STATE_FORMAT = "models.TokenSchedule/1"


def tau_at(step: int, total_steps: int, schedule: str, start: float = TAU_START, end: float = TAU_END) -> float:
    """Gumbel temperature after ``step`` of ``total_steps`` optimizer steps (clamped to the run).

    ``linear`` goes from ``start`` to ``end`` (SViTE after its "fix-tau" commit); ``reversed`` from ``end`` to
    ``start``, the schedule every released SViTE+ checkpoint was trained with.
    """
    check_choice("tau schedule", schedule, TAU_SCHEDULES)
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    frac = min(max(step, 0), total_steps) / total_steps
    first, last = (start, end) if schedule == "linear" else (end, start)
    return first * (1.0 - frac) + last * frac  # exact at both ends


class TokenSchedule:
    """Sets the Gumbel temperature of every installed scorer from the optimizer step (the ``Sparsifier`` protocol).

    ``step(step)`` is called after every optimizer step, so the next forward uses tau(step): the first forward runs
    at tau(0), as SViTE's ``get_tau(10, 0.1, ite_step, T)`` with ``ite_step`` counting steps already taken.

    Args:
        model: the patched model (a DDP or compiled wrapper is fine).
        cfg: the token settings (only ``tau_schedule`` is read).
        total_steps: T, optimizer steps of the whole run.
    """

    def __init__(self, model: nn.Module, cfg: TokenConfig, total_steps: int) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive int (optimizer steps of the run), got {total_steps!r}")
        self.scorers = list(token_scorers(model).values())
        if not self.scorers:
            raise ValueError("the model has no token selector; call apply_token_selection(model, cfg) first")
        self.schedule = cfg.tau_schedule
        self.total_steps = total_steps
        self._step = 0
        self._set(tau_at(0, total_steps, self.schedule))

    @property
    def tau(self) -> float:
        return tau_at(self._step, self.total_steps, self.schedule)

    def step(self, step: int) -> bool:
        """Set tau(step) on every scorer; never changes a topology, so returns False."""
        self._step = step
        self._set(self.tau)
        return False

    def apply_masks(self, module: nn.Module) -> None:
        """Token selection masks no weights: a copy of the model (e.g. the EMA) is left as it is."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "step": self._step, "tau": self.tau, "schedule": self.schedule,
                "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the step; tau is recomputed from it (with a warning if the run's schedule or length changed)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a TokenSchedule state dict (expected format {STATE_FORMAT!r})")
        saved = (state["schedule"], state["total_steps"])
        if saved != (self.schedule, self.total_steps):
            logger.warning("token selection: resuming with tau schedule %s over %d steps; the checkpoint had %s "
                           "over %d", self.schedule, self.total_steps, *saved)
        self.step(int(state["step"]))

    def report(self) -> dict[str, float]:
        return {"tau": self.tau}

    def _set(self, tau: float) -> None:
        for scorer in self.scorers:
            scorer.tau.fill_(tau)
