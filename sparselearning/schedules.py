"""When the topology changes and by how much: pure functions of the optimizer step.

The trainer counts optimizer steps and passes them in; nothing here keeps state, so resuming only needs the step.
"""
from __future__ import annotations

import math

DECAY_SCHEDULES = ("cosine", "constant", "linear")

FINAL_DEATH_RATE = 0.005
"""SViTE's floor for the death fraction (the ``eta_min`` of its ``CosineDecay``)."""


def is_update_step(step: int, update_frequency: int, total_steps: int, t_end: float) -> bool:
    """Whether the topology is updated after optimizer step ``step``.

    SViTE semantics: updates at ``step = k * update_frequency`` for k = 1, 2, ... (never at step 0), and only while
    ``step < t_end * total_steps``.

    Args:
        step: number of optimizer steps done so far (1 after the first step).
        update_frequency: ΔT, optimizer steps between updates.
        total_steps: T, optimizer steps of the whole run.
        t_end: fraction of the run after which the topology is frozen.
    """
    return step > 0 and step % update_frequency == 0 and step < t_end * total_steps


def death_rate_at(
    step: int,
    total_steps: int,
    death_rate: float,
    schedule: str = "cosine",
    final_rate: float = FINAL_DEATH_RATE,
) -> float:
    """Fraction of each layer's active weights that dies at an update after ``step`` optimizer steps.

    ``cosine`` is SViTE's closed form ``final + (death_rate - final) * (1 + cos(pi * t / T)) / 2``; it decays over the
    whole run T, not over ``t_end * T``, so the last update still uses about 0.05. ``linear`` goes straight from
    ``death_rate`` to ``final_rate`` over T (SViTE advertised but never implemented it); ``constant`` keeps
    ``death_rate``. Steps outside [0, T] are clamped.

    Args:
        step: number of optimizer steps done so far.
        total_steps: T, optimizer steps of the whole run.
        death_rate: the rate at step 0.
        schedule: one of ``DECAY_SCHEDULES``.
        final_rate: the rate at step T.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    progress = min(max(step, 0), total_steps) / total_steps
    if schedule == "cosine":
        return final_rate + (death_rate - final_rate) * (1.0 + math.cos(math.pi * progress)) / 2.0
    if schedule == "linear":
        return death_rate + (final_rate - death_rate) * progress
    if schedule == "constant":
        return death_rate
    raise ValueError(f"unknown decay schedule {schedule!r}; choose from {', '.join(DECAY_SCHEDULES)}")
