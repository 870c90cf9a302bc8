"""Unstructured dynamic sparse training (SViTE): distribution + criterion + schedule, composed in ``Masking``."""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparselearning.base import DenseSparsifier, Sparsifier
from sparselearning.config import SparsityConfig
from sparselearning.criteria import DEATH_RULES, derive_seed, random_scores
from sparselearning.distributions import layer_counts, layer_densities, redistribute
from sparselearning.masks import MaskSet, momentum_of, select_parameters, unwrap_model
from sparselearning.metrics import density_record
from sparselearning.scheduled import LogFn, ScheduledMasks, UpdateScores

if TYPE_CHECKING:
    from sparselearning.structured import StructureSource

logger = logging.getLogger(__name__)

GrowthSignal = Callable[[str, torch.Tensor, torch.optim.Optimizer], torch.Tensor]


def gradient_of(name: str, param: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """SViTE's ``gradient`` growth signal: the dense ``param.grad``."""
    if param.grad is None:
        raise RuntimeError(
            f"gradient growth needs {name}.grad at the update step: call masking.step(step) after "
            "optimizer.step() and before zero_grad()"
        )
    return param.grad


def first_moment_of(name: str, param: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """The ``momentum`` growth signal: the optimizer's first moment of ``param``."""
    return momentum_of(optimizer, param)


GROWTH_SIGNALS: dict[str, GrowthSignal] = {"gradient": gradient_of, "momentum": first_moment_of}
"""Growth by a signal's magnitude; ``random`` growth has none."""
LAYER_STATS: dict[str, Callable[[torch.Tensor, int], float]] = {
    # masked weights are exactly zero, so the sum runs over the active ones
    "magnitude": lambda param, active: float(param.abs().sum()) / max(active, 1),
    "nonzero": lambda param, active: active / param.numel(),
}
"""The per-layer statistic that ``redistribution`` splits the regrowth by; ``none`` keeps each layer's loss."""


class Masking(ScheduledMasks):
    """SViTE's unstructured dynamic sparse training as a drop-in for any PyTorch training loop.

    Construction picks the masked tensors, draws masks with exact per-layer counts, zeroes the masked weights and
    hooks ``optimizer.step()`` so they stay zero. ``step(step)`` after each optimizer step updates the topology on
    schedule: per layer, the ``ceil(rate * active)`` weakest active weights die and as many (or, with
    redistribution, a re-allocated number) inactive weights grow, chosen by gradient, momentum or at random. New
    weights start at zero; a weight dropped and regrown in the same update keeps its value. The optimizer state is
    never reset: masked weights receive dense gradients, so their moments (Adam's, SGD momentum) stay valid
    statistics and a regrown weight steps like the survivors. All random draws come from private generators seeded
    by (seed, layer name, step), so DDP ranks agree without broadcasts.

    Example (a plain PyTorch loop; the three added lines are marked ``# +``)::

        import torch
        from sparselearning import Masking  # +

        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        T = 200
        masking = Masking(model, optimizer, density=0.5, total_steps=T)  # +  ERK masks, hooks the optimizer
        for step in range(1, T + 1):
            x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            masking.step(step)  # +  topology update every 100 steps until 0.8 * T

    Args:
        model: the model (a DDP or compiled wrapper is fine; names are taken from the wrapped module).
        optimizer: the optimizer of the masked parameters; a post-step hook is registered on it.
        density: overall density of the masked tensors, in (0, 1].
        total_steps: T, optimizer steps of the whole run (schedules are relative to it).
        sparse_init: per-layer distribution: ERK (= fixed_ERK), uniform or ER. The library default is ERK (what
            every SViTE script used); the CLI keeps SViTE's ``uniform`` default.
        update_frequency: optimizer steps between topology updates.
        growth: ``gradient`` (dense ``weight.grad``), ``momentum`` (optimizer first moment) or ``random``.
        death: ``magnitude`` or ``SET``.
        redistribution: ``none`` (each layer regrows what it lost), ``magnitude`` or ``nonzero``.
        death_rate: initial death fraction.
        decay_schedule: ``cosine``, ``constant`` or ``linear`` decay of the death fraction to 0.005 over T.
        t_end: no updates after ``t_end * total_steps``.
        sparse_exclude: fnmatch patterns of FQNs not to mask.
        sparse_include: fnmatch patterns; only matching tensors are masked.
        erk_power: exponent of the ERK score.
        mask_init: ``random`` (SViTE) or ``magnitude``: the largest-|w| weights of each layer are the first active
            ones (for pretrained weights), at the same per-layer counts.
        seed: base seed of the masks; must be the same on every rank (not ``seed + rank``).
        log_fn: receives a ``density_record`` dict at construction, after every update and on resume; default
            prints a table on rank 0.
    """

    STATE_FORMAT = "sparselearning.Masking/1"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        density: float,
        total_steps: int,
        *,
        sparse_init: str = "ERK",
        update_frequency: int = 100,
        growth: str = "gradient",
        death: str = "magnitude",
        redistribution: str = "none",
        death_rate: float = 0.5,
        decay_schedule: str = "cosine",
        t_end: float = 0.8,
        sparse_exclude: Sequence[str] = (),
        sparse_include: Sequence[str] = (),
        erk_power: float = 1.0,
        mask_init: str = "random",
        seed: int = 0,
        log_fn: LogFn | None = None,
    ) -> None:
        if density is None:
            raise ValueError("Masking needs a density in (0, 1]; use build_sparsifier for optional sparsity")
        self.config = SparsityConfig(
            density=density, sparse_init=sparse_init, update_frequency=update_frequency, growth=growth, death=death,
            redistribution=redistribution, death_rate=death_rate, decay_schedule=decay_schedule, t_end=t_end,
            sparse_exclude=sparse_exclude, sparse_include=sparse_include, erk_power=erk_power, mask_init=mask_init,
        )
        self._build(model, optimizer, total_steps, seed, log_fn)

    def _build(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, seed: int,
               log_fn: LogFn | None) -> None:
        """Everything after ``self.config``: criteria, masked tensors, initial masks and their enforcement. A mask
        layout of its own (N:M) overrides ``_select_parameters`` and ``_initial_masks``."""
        cfg = self.config
        self._start_schedule(optimizer, total_steps, seed, log_fn)
        self._death_rule = DEATH_RULES[cfg.death]
        self._signal = GROWTH_SIGNALS.get(cfg.growth)
        self._layer_stat = LAYER_STATS.get(cfg.redistribution)
        params = self._select_parameters(model)
        self.total_parameters = sum(p.numel() for p in unwrap_model(model).parameters())
        self.shapes = {name: tuple(p.shape) for name, p in params.items()}
        self._enforce(self._initial_masks(params), "sparse training", model)
        self._refresh_counts()
        self.check_consistency()
        self.log_fn(self.record("init"))

    def _select_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The tensors to mask: every maskable weight, narrowed by ``sparse_include``/``sparse_exclude``."""
        return select_parameters(model, self.config.sparse_include, self.config.sparse_exclude)

    def _initial_masks(self, params: dict[str, nn.Parameter]) -> MaskSet:
        """Exact per-layer counts from the density distribution, at random positions drawn from (seed, name), or with
        ``mask_init`` magnitude at the largest-|w| positions."""
        cfg = self.config
        densities = layer_densities(self.shapes, cfg.density, cfg.sparse_init, erk_power=cfg.erk_power)
        first_masks = MaskSet.magnitude if cfg.mask_init == "magnitude" else MaskSet.random
        return first_masks(params, layer_counts(densities, self.shapes), self.seed)

    @classmethod
    def from_config(
        cls,
        cfg: SparsityConfig,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        seed: int = 0,
        log_fn: LogFn | None = None,
    ) -> Masking:
        """Build from a validated ``SparsityConfig`` (its ``density`` must be set)."""
        return cls(
            model, optimizer, cfg.density, total_steps, sparse_init=cfg.sparse_init,
            update_frequency=cfg.update_frequency, growth=cfg.growth, death=cfg.death,
            redistribution=cfg.redistribution, death_rate=cfg.death_rate, decay_schedule=cfg.decay_schedule,
            t_end=cfg.t_end, sparse_exclude=cfg.sparse_exclude, sparse_include=cfg.sparse_include,
            erk_power=cfg.erk_power, mask_init=cfg.mask_init, seed=seed, log_fn=log_fn,
        )

    @property
    def fired_masks(self) -> dict[str, torch.Tensor]:
        """FQN -> bool mask of weights that have ever been active (for the ITOP explored rate)."""
        return self.mask_set.fired

    def _growth_scores(self, name: str, step: int) -> torch.Tensor:
        param = self.mask_set.params[name]
        if self._signal is None:
            return random_scores(param.shape, derive_seed(self.seed, name, step, "grow"), param.device)
        return self._signal(name, param, self.optimizer).abs()

    def _read_window(self, step: int) -> UpdateScores | None:
        """Masking has no window: the weights die by the death rule and the growth signal (gradient, momentum) is
        read as it is now, when all of it is finite (else None, logged). Layers whose signal is all zero are frozen."""
        if not self._finite_inputs(step):
            return None
        return UpdateScores(death=self.mask_set.params.__getitem__, growth=lambda name: self._growth_scores(name, step),
                            frozen=self._dead_growth_signals(step))

    def _finite_inputs(self, step: int) -> bool:
        """Whether everything the update reads is finite; otherwise the update is skipped and logged.

        A float64 sum of float32 values cannot overflow, so it is finite exactly when every entry is, at a quarter
        of the cost of ``isfinite(t).all()``.
        """
        for name, param in self.mask_set.params.items():
            tensors = [param.detach()]
            if self._signal is not None:
                tensors.append(self._signal(name, param, self.optimizer))
            if not bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float64) for t in tensors])).all()):
                signal = "gradient" if self.config.growth == "gradient" else "momentum"
                logger.warning(
                    "sparsity: non-finite weight or %s of %s at step %d; topology update skipped", signal, name, step
                )
                return False
        return True

    def _dead_growth_signals(self, step: int) -> frozenset[str]:
        """Layers whose growth signal is all zero: they skip death and growth in this update, with a warning.

        Growing there would pick among equal scores only (a random block, or by index the lowest rows), and skipping
        death too keeps the layer's density exact.
        """
        if self._signal is None:
            return frozenset()
        frozen = set()
        for name, param in self.mask_set.params.items():
            if int(torch.count_nonzero(self._signal(name, param, self.optimizer))) == 0:
                frozen.add(name)
                cause = ("zero_grad() called before masking.step(step), or a frozen layer" if
                         self.config.growth == "gradient" else "a frozen layer (its optimizer moments never moved)")
                logger.warning("sparsity: the %s growth signal of %s is all zero at step %d (likely %s); death and "
                               "growth skipped for this layer, so its density stays exact", self.config.growth, name,
                               step, cause)
        return frozenset(frozen)

    def _units(self) -> dict[str, torch.Tensor]:
        return self.mask_set.masks

    def _active_counts(self) -> dict[str, int]:
        return self._active

    def _tie_seeds(self, name: str, step: int) -> tuple[int, int]:
        """Ties in the death and growth scores are broken by (seed, layer, step)."""
        return derive_seed(self.seed, name, step, "death ties"), derive_seed(self.seed, name, step, "growth ties")

    def _allocate(self, dropped: dict[str, int], frozen: frozenset[str]) -> dict[str, int]:
        """How many weights each layer regrows: what it lost (``none``), or the total lost split by mean magnitude
        or density of the layer's active weights (measured before death), capped by its free slots; a ``frozen``
        layer gets none."""
        if self._layer_stat is None:
            return dropped
        params, active = self.mask_set.params, self._active
        stats = {n: self._layer_stat(p, active[n]) for n, p in params.items()}
        free = {n: 0 if n in frozen else p.numel() - active[n] + dropped[n] for n, p in params.items()}
        return redistribute(sum(dropped.values()), stats, free)

    def _commit(self, new: dict[str, torch.Tensor], step: int) -> bool:
        """Write the new masks and weights in place: only weights active before and after keep their value
        (dropped-and-regrown ones included); the ones that died are zeroed and the new ones start at zero. The
        optimizer state is kept (``sparselearning.optimizer_state``)."""
        changed = []
        for name, param in self.mask_set.params.items():
            old = self.mask_set.masks[name]
            param.mul_(new[name] & old)
            changed.append((new[name] ^ old).any())
            old.copy_(new[name])
            self.mask_set.fired[name] |= new[name]
        self._refresh_counts()
        return any(bool(c) for c in changed)

    def _refresh_counts(self) -> None:
        self._active = self.mask_set.counts()
        self._explored = self.mask_set.fired_count()

    def record(self, event: str = "report") -> dict[str, Any]:
        """A ``density_record`` of the current topology (per-layer densities, global densities, explored rate)."""
        return density_record(
            event, self._step, self.death_rate(self._step), self.shapes, self._active, self._explored,
            self.total_parameters,
        )

    def report(self) -> dict[str, float]:
        """Scalars for the epoch log: density (masked tensors), density_all, explored_rate, nonzero_parameters,
        death_rate."""
        record = self.record()
        keys = ("density", "density_all", "explored_rate", "nonzero_parameters", "death_rate")
        return {key: record[key] for key in keys}

    def _load_own_state(self, state: dict[str, Any]) -> None:
        self.mask_set.load_state_dict(state)
        self._refresh_counts()


def build_sparsifier(
    cfg: SparsityConfig | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    *,
    seed: int = 0,
    log_fn: LogFn | None = None,
    units: StructureSource | None = None,
) -> Sparsifier:
    """The sparsifier a run asks for: ``DenseSparsifier`` (no masks, no hook, no cost) when ``cfg`` is None, or
    unstructured with density None or 1.0; ``SRSTE`` or ``NMMasking`` for ``sparse_init`` nm; ``StructuredDST`` for
    ``pruning_type`` structure; ``GlobalPruning`` for ``pruning_type`` global; otherwise ``Masking``.

    Args:
        cfg: parsed sparsity settings.
        model: the model (possibly DDP-wrapped).
        optimizer: its optimizer.
        total_steps: optimizer steps of the whole run.
        seed: base mask seed, identical on every rank.
        log_fn: record callback; default prints a table on rank 0.
        units: the model's heads and neurons (e.g. ``models.structure_units(model, scaler)``); read only for
            structured sparsity, whose score hooks are installed only then.
    """
    if cfg is None or not cfg.enabled:
        return DenseSparsifier()
    if cfg.nm is not None:
        from sparselearning.nm_masking import nm_sparsifier  # builds on this module, so imported late

        return nm_sparsifier(cfg, model, optimizer, total_steps, seed=seed, log_fn=log_fn)
    if cfg.structured:
        from sparselearning.structured import StructuredDST  # builds on this module, so imported late

        if units is None:
            raise ValueError("--pruning_type structure needs the model's head and neuron layout: pass "
                             "units=models.structure_units(model, scaler) to build_sparsifier")
        return StructuredDST.from_config(cfg, model, optimizer, total_steps, units, seed=seed, log_fn=log_fn)
    if cfg.pruning_type == "global":
        from sparselearning.global_pruning import GlobalPruning  # builds on this module, so imported late

        if units is None or not hasattr(units, "macs"):
            raise ValueError("--pruning_type global needs every unit group and the MAC count of the model: pass "
                             "units=models.global_units(model) to build_sparsifier")
        return GlobalPruning.from_config(cfg, model, optimizer, total_steps, units, seed=seed, log_fn=log_fn)
    return Masking.from_config(cfg, model, optimizer, total_steps, seed=seed, log_fn=log_fn)
