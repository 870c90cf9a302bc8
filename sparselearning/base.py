"""The narrow interface between the training loop and a sparsity method.

The trainer only ever calls these methods; it never looks inside a method's masks or scores.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Sparsifier(Protocol):
    """What `engine.train_one_epoch` and `main.py` need from a sparsity method."""

    def step(self, step: int) -> bool:
        """Called once after every optimizer step with the number of optimizer steps done so far.

        Enforces the masks and, on schedule, updates the topology. Returns True when the topology changed.
        """

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
