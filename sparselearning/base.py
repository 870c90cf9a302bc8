"""The narrow interface between the training loop and a sparsity method.

The trainer only ever calls these methods; it never looks inside a method's masks or scores.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class Sparsifier(Protocol):
    """What `engine.train_one_epoch` and `main.py` need from a sparsity method."""

    def step(self, step: int) -> bool:
        """Called once after every optimizer step with the number of optimizer steps done so far.

        Enforces the masks and, on schedule, updates the topology. Returns True when the topology changed.
        """

    def apply_masks(self, module: nn.Module) -> None:
        """Zero in ``module``, a copy of the trained model with the same parameter FQNs (e.g. its EMA), every entry
        that is masked in the trained model now, so the copy has exactly the model's sparsity. Cheap (no host sync):
        called after every EMA update."""

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly (plain tensors, numbers, strings)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def report(self) -> dict[str, float]:
        """Scalars for the per-epoch JSON log line (e.g. global density); empty when there is nothing to say."""


class DenseSparsifier:
    """No sparsity: every call is a no-op, so dense training pays nothing for the protocol."""

    def step(self, step: int) -> bool:
        return False

    def apply_masks(self, module: nn.Module) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(
                "the checkpoint holds sparsity state but this run is dense; pass the sparsity flags the "
                "checkpoint was trained with (see its 'args')"
            )

    def report(self) -> dict[str, float]:
        return {}


class SparsifierChain:
    """Several methods behind one `Sparsifier`, e.g. weight sparsity plus a token-selection schedule.

    Each member keeps its own state under its position, so a checkpoint records which method owns what.
    """

    def __init__(self, *members: Sparsifier) -> None:
        self.members = list(members)

    def step(self, step: int) -> bool:
        changed = False
        for member in self.members:
            changed |= member.step(step)
        return changed

    def apply_masks(self, module: nn.Module) -> None:
        for member in self.members:
            member.apply_masks(module)

    def state_dict(self) -> dict[str, Any]:
        return {f"{i}:{type(m).__name__}": m.state_dict() for i, m in enumerate(self.members)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = [f"{i}:{type(m).__name__}" for i, m in enumerate(self.members)]
        if sorted(state) != sorted(expected):
            raise ValueError(
                f"the checkpoint's sparsity state holds {sorted(state) or 'nothing'} but this run has {expected}; "
                "pass the sparsity and token-selection flags the checkpoint was trained with (see its 'args')"
            )
        for key, member in zip(expected, self.members):
            member.load_state_dict(state[key])

    def report(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for member in self.members:
            merged.update(member.report())
        return merged


def combine(*members: Sparsifier) -> Sparsifier:
    """One `Sparsifier` for the active methods: the no-op when none is active, the method itself when one is."""
    active = [m for m in members if not isinstance(m, DenseSparsifier)]
    if not active:
        return DenseSparsifier()
    return active[0] if len(active) == 1 else SparsifierChain(*active)
