"""The one list of sparsity methods that the contract tests (tests/test_sparsifier_contract.py), the mask enforcement
tests and the DDP worker run: a new `Sparsifier` gets all of them by being added to ``CASES``.

Every case trains the same micro ViT (2 blocks, 4 heads of width 8, 16x16 inputs) through the public API only, and
chains methods the way main.py does (``sparselearning.base.combine``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import timm.optim
import torch
import torch.nn.functional as F
from torch import nn

import models
from sparselearning import SRSTE, Masking, NMMasking, Sparsifier, StructuredDST
from sparselearning.base import combine
from sparselearning.global_pruning import GlobalPruning

TOTAL_STEPS, UPDATE_FREQUENCY = 30, 3

OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, fused=True),
    "timm_adamw": lambda params: timm.optim.AdamW(params, lr=1e-3, weight_decay=0.05),
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=5e-2, momentum=0.9, weight_decay=1e-4),
}


def silent(record: dict) -> None:
    """A log_fn that drops records."""


def micro_vit(tokens: models.TokenConfig | None = None) -> nn.Module:
    """vit_digits_micro with 4 heads of width 8 per block (so head swaps happen), optionally token-selecting."""
    model = models.create_model("vit_digits_micro", num_classes=10, block_heads=[4, 4], head_dim=8)
    if tokens is not None:
        models.apply_token_selection(model, tokens)
    return model


def masking(**options: Any) -> Callable[..., Sparsifier]:
    def build(module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, seed: int,
              **schedule: Any) -> Sparsifier:
        return Masking(module, optimizer, total_steps=total_steps, seed=seed, log_fn=silent,
                       **{"density": 0.5, "update_frequency": UPDATE_FREQUENCY, **options, **schedule})
    return build


def structured(**options: Any) -> Callable[..., Sparsifier]:
    def build(module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, seed: int,
              **schedule: Any) -> Sparsifier:
        return StructuredDST(module, optimizer, models.structure_units(module), total_steps, seed=seed, log_fn=silent,
                             **{"atten_density": 0.5, "other_density": 0.5, "update_frequency": UPDATE_FREQUENCY,
                                **options, **schedule})
    return build


def global_pruning(**options: Any) -> Callable[..., Sparsifier]:
    def build(module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, seed: int,
              **schedule: Any) -> Sparsifier:
        units = models.global_units(module, prune_head_dim=options.get("prune_head_dim", False))
        return GlobalPruning(module, optimizer, units, total_steps, seed=seed, log_fn=silent,
                             **{"target_macs": 0.6, "prune_every": UPDATE_FREQUENCY, "prune_units": 12, **options})
    return build


def nm_dst(**options: Any) -> Callable[..., Sparsifier]:
    def build(module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, seed: int,
              **schedule: Any) -> Sparsifier:
        return NMMasking(module, optimizer, total_steps, seed=seed, log_fn=silent,
                         **{"update_frequency": UPDATE_FREQUENCY, **options, **schedule})
    return build


def srste(**options: Any) -> Callable[..., Sparsifier]:
    """SR-STE takes the schedule's ΔT and t_end; it has no growth criterion or death rate to override."""
    def build(module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, seed: int,
              **schedule: Any) -> Sparsifier:
        timing = {k: v for k, v in schedule.items() if k in ("update_frequency", "t_end")}
        return SRSTE(module, optimizer, total_steps, seed=seed, log_fn=silent,
                     **{"update_frequency": UPDATE_FREQUENCY, "t_end": 0.8, **options, **timing})
    return build


def token_schedule(cfg: models.TokenConfig) -> Callable[..., Sparsifier]:
    def build(module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, seed: int,
              **schedule: Any) -> Sparsifier:
        return models.TokenSchedule(module, cfg, total_steps)
    return build


def chain(*members: Callable[..., Sparsifier]) -> Callable[..., Sparsifier]:
    def build(*args: Any, **kwargs: Any) -> Sparsifier:
        return combine(*(member(*args, **kwargs) for member in members))
    return build


@dataclass(frozen=True)
class Case:
    """One sparsity method (or chain) as the trainer sees it.

    masks_weights: it zeroes weights (so ``apply_masks`` on a copy zeroes some entries).
    changes_topology: ``step`` returns True at updates (weights or units are regrown).
    local_statistics: between updates it sums per-rank statistics that an update all-reduces (head scores), so its
        state differs across DDP ranks until then.
    variant: another setting, or a chain, of a method listed before it: the costly checks (optimizer hygiene, the
        second resume point) run on that method only.
    regrows: units removed at an update can come back (the optimizer-hygiene test of regrown weights applies).
    masks_at_start: it masks weights from construction on (global pruning starts dense and masks from its first
        update).
    """

    name: str
    build: Callable[..., Sparsifier]
    tokens: models.TokenConfig | None = None
    masks_weights: bool = True
    changes_topology: bool = True
    local_statistics: bool = False
    variant: bool = False
    regrows: bool = True
    masks_at_start: bool = True

    def model(self) -> nn.Module:
        return micro_vit(self.tokens)


GLOBAL_ZERO = models.TokenConfig(enabled=True, num_keep=9)
LAYERWISE_DROP = models.TokenConfig(enabled=True, num_keep=9, selector="layerwise", mode="drop")

CASES = [
    Case("unstructured", masking()),
    Case("unstructured-random-SET-redistribution", masking(growth="random", death="SET", redistribution="magnitude"),
         variant=True),
    Case("unstructured-momentum", masking(growth="momentum"), variant=True),
    Case("structured", structured(), local_statistics=True),
    Case("structured-compat", structured(compat=True), local_statistics=True, variant=True),
    Case("structured-random", structured(growth="random", death_rate=0.5, decay_schedule="constant"),
         local_statistics=True, variant=True),
    Case("global", global_pruning(), regrows=False, masks_at_start=False),
    Case("nm-srste", srste()),
    Case("nm-dst", nm_dst(), variant=True),
    Case("global-multiple4", global_pruning(unit_multiple=4), regrows=False, masks_at_start=False, variant=True),
    Case("global-headdim", global_pruning(prune_head_dim=True, target_macs=0.2, prune_units=100), regrows=False,
         masks_at_start=False, variant=True),
    Case("tokens", token_schedule(GLOBAL_ZERO), GLOBAL_ZERO, masks_weights=False, changes_topology=False),
    Case("unstructured+tokens", chain(masking(), token_schedule(LAYERWISE_DROP)), LAYERWISE_DROP, variant=True),
]
BY_NAME = {case.name: case for case in CASES}


class Run(NamedTuple):
    model: nn.Module  # the bare model (parameter FQNs as in a checkpoint)
    module: nn.Module  # what is trained: the model or its DDP wrapper
    optimizer: torch.optim.Optimizer
    sparsifier: Sparsifier


def make(case: Case, init_seed: int = 0, seed: int = 0, optimizer: str = "adamw",
         wrap: Callable[[nn.Module], nn.Module] | None = None, total_steps: int = TOTAL_STEPS, **schedule: Any) -> Run:
    """Build ``case``: ``init_seed`` seeds the weights, ``seed`` is the method's own seed, ``schedule`` overrides the
    weight-sparsity schedule (update_frequency, t_end, growth, ...)."""
    torch.manual_seed(init_seed)
    model = case.model()
    module = wrap(model) if wrap is not None else model
    opt = OPTIMIZERS[optimizer](module.parameters())
    return Run(model, module, opt, case.build(module, opt, total_steps, seed, **schedule))


def batch(step: int, n: int = 8, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    gen = generator if generator is not None else torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 3, 16, 16, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def train(run: Run, steps: Iterable[int], after_optimizer_step: Callable[[int], None] | None = None,
          generator: torch.Generator | None = None) -> list[int]:
    """The plain loop of engine.py; returns the steps at which the topology changed."""
    changed = []
    for step in steps:
        x, y = batch(step, generator=generator)
        loss = F.cross_entropy(run.module(x), y)
        run.optimizer.zero_grad()
        loss.backward()
        run.optimizer.step()
        if after_optimizer_step is not None:
            after_optimizer_step(step)
        if run.sparsifier.step(step):
            changed.append(step)
    return changed


def masked_entries(case: Case, sparsifier: Sparsifier) -> dict[str, torch.Tensor]:
    """Where ``sparsifier`` masks weights now, seen through the protocol only: the entries that ``apply_masks``
    zeroes in an all-ones copy of the model (parameter name -> bool tensor, only tensors with a masked entry)."""
    probe = case.model()
    with torch.no_grad():
        for param in probe.parameters():
            param.fill_(1.0)
    sparsifier.apply_masks(probe)
    return {name: p.detach() == 0 for name, p in probe.named_parameters() if bool((p == 0).any())}


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    """Nested dicts/lists/tensors/numbers equal exactly (tensors by value, dtype and shape)."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def differs(a: Any, b: Any) -> bool:
    """True when ``assert_same(a, b)`` would fail."""
    try:
        assert_same(a, b)
    except AssertionError:
        return True
    return False
