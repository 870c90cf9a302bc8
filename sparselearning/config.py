"""Sparsity configuration: SViTE's command-line flags, parsed once into a validated frozen dataclass."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from sparselearning.criteria import DEATH_MODES, GROWTH_MODES, REDISTRIBUTION_MODES
from sparselearning.distributions import DISTRIBUTIONS
from sparselearning.masks import MASK_INITS
from sparselearning.nm import parse_nm
from sparselearning.schedules import DECAY_SCHEDULES
from sparselearning.units import AUTO_MIN_WIDTH, AUTO_MULTIPLE, UNIT_MULTIPLE_AUTO

PRUNING_TYPES = ("unstructure", "structure", "structure_new", "global")
"""SViTE's ``--pruning_type`` values; ``structure_new`` (the original scripts' spelling) aliases ``structure``;
``global`` is global structural pruning to a MAC budget (``sparselearning.global_pruning``)."""
SPARSE_INITS = (*DISTRIBUTIONS, "nm")
"""``--sparse_init`` values: a per-layer density distribution, or ``nm`` (N of every M input weights, ``--nm``)."""
NM_METHODS = ("srste", "dst")
"""How N:M masks are learned: SR-STE (recomputed from magnitudes, straight-through gradients) or SViTE's
prune-and-regrow restricted to each group."""


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {field} {value!r}; choose from {', '.join(choices)}")


@dataclass(frozen=True)
class SparsityConfig:
    """Dynamic sparse training settings (SViTE's flags, same names and meanings), unstructured or structured.

    ``density=None`` (the default) or ``1.0`` means dense training: ``build_sparsifier`` then returns a no-op and no
    mask exists. SViTE defaulted to ``--density 0.05``, which silently made every run 95% sparse; here sparsity is
    opt-in. ``sparse_init`` defaults to ``uniform`` as in SViTE (its scripts all passed ``fixed_ERK``).

    Args:
        density: overall density of the masked tensors in (0, 1], or None for dense. With ``sparse_init="nm"`` it is
            N/M (None is set to N/M; another value is an error).
        sparse_init: per-layer density distribution: uniform, ERK (= fixed_ERK) or ER; or ``nm``: exactly N non-zeros
            in every group of M consecutive input weights (``nm``), by default in the transformer blocks' linears.
        update_frequency: ΔT, optimizer steps between topology updates.
        growth: gradient (RigL/SViTE), random or momentum.
        death: magnitude or SET.
        redistribution: none (SViTE), magnitude or nonzero (Dettmers & Zettlemoyer).
        death_rate: initial fraction of each layer's active weights that dies per update, in [0, 1].
        decay_schedule: cosine (SViTE), constant or linear decay of the death rate to 0.005 over the run.
        t_end: fraction of the run after which the topology is frozen, in (0, 1].
        sparse_exclude: fnmatch patterns of parameter FQNs not to mask.
        sparse_include: fnmatch patterns; if given, only matching parameters are masked.
        erk_power: exponent of the ERK score.
        pruning_type: ``unstructure`` (weights, ``Masking``) or ``structure`` (attention heads and MLP neurons,
            ``StructuredDST``); ``structure_new`` is stored as ``structure``. Structured runs ignore ``density``,
            ``sparse_init`` and ``erk_power``, as SViTE did: the two kinds of masks are never combined.
        atten_head: heads per block the run expects (SViTE's ``--atten_head``); None takes them from the model, a
            number must match it.
        atten_density: fraction of each block's heads kept: ``int(heads * atten_density)``.
        other_density: fraction of each block's MLP neurons kept: ``int(hidden * other_density)``, rounded to a
            multiple of ``unit_multiple``.
        unit_multiple: MLP neurons are kept in multiples of this many (``units.kept_count``: nearest multiple,
            ties up; global pruning removes neurons and embedding channels this many at a time), so that the
            compacted widths suit matrix kernels; 1 keeps the paper's exact count, ``auto``
            8 for MLPs of at least 384 neurons and 1 below (``units.auto_multiple``). Heads stay whole heads.
        structure_compat: reproduce SViTE's structured quirks: biases of pruned heads and neurons are not masked
            (a pruned head leaks a constant through ``proj``), regrown units start from zero weights, and the fc2
            columns of pruned neurons are masked too.
        mask_init: the first masks: ``random`` (SViTE) or ``magnitude``, the largest-|w| weights of each layer at its
            ``sparse_init`` density, or for structured sparsity the heads and neurons of largest weight L1 norm
            (for starting from pretrained weights, ``--finetune``).
        target_macs: ``pruning_type`` global: the MAC budget, a fraction of the dense model's in (0, 1).
        prune_every: ``pruning_type`` global: optimizer steps between pruning steps.
        prune_units: ``pruning_type`` global: units (heads, neurons, channels) removed per pruning step.
        target_latency: ``pruning_type`` global: the budget as a fraction of the dense model's block latency by the
            table (``latency_table``), instead of ``target_macs``.
        latency_lambda: ``pruning_type`` global: λ, the ranking score of a unit minus λ × the ms its removal saves
            (under ``target_macs``, the ms saved beyond the model's average ms per MAC).
        latency_table: ``pruning_type`` global: the measured block-latency table (JSON) for the two above.
        prune_head_dim: ``pruning_type`` global: each block's head dimensions (q, k and v width, shared by its
            heads) are units of the ranking too, removed in multiples of ``unit_multiple``.
        nm: the N:M pattern as ``"N:M"`` (0 < N < M), with ``sparse_init="nm"`` only.
        nm_method: ``srste`` (SR-STE: the mask is recomputed from the dense weights' magnitudes every ΔT, gradients
            pass straight through to the pruned weights) or ``dst`` (SViTE's prune-and-regrow within each group).
        srste_decay: SR-STE's λ: the gradient of every pruned weight w gets λ·w added (2e-4 in the paper).
    """

    density: float | None = None
    sparse_init: str = "uniform"
    update_frequency: int = 100
    growth: str = "gradient"
    death: str = "magnitude"
    redistribution: str = "none"
    death_rate: float = 0.5
    decay_schedule: str = "cosine"
    t_end: float = 0.8
    sparse_exclude: tuple[str, ...] = ()
    sparse_include: tuple[str, ...] = ()
    erk_power: float = 1.0
    pruning_type: str = "unstructure"
    atten_head: int | None = None
    atten_density: float = 0.2
    other_density: float = 0.2
    structure_compat: bool = False
    mask_init: str = "random"
    target_macs: float | None = None
    prune_every: int = 100
    prune_units: int = 32
    target_latency: float | None = None
    latency_lambda: float = 0.0
    latency_table: str | None = None
    prune_head_dim: bool = False
    unit_multiple: int | str = UNIT_MULTIPLE_AUTO
    nm: str | None = None
    nm_method: str = "srste"
    srste_decay: float = 2e-4

    def __post_init__(self) -> None:
        valid_number = isinstance(self.density, (int, float)) and not isinstance(self.density, bool)
        if self.density is not None and not (valid_number and 0.0 < self.density <= 1.0):
            raise ValueError(f"density must be in (0, 1] (or None for dense training), got {self.density!r}")
        _check_choice("sparse_init", self.sparse_init, SPARSE_INITS)
        _check_choice("growth mode", self.growth, GROWTH_MODES)
        _check_choice("death mode", self.death, DEATH_MODES)
        _check_choice("redistribution mode", self.redistribution, REDISTRIBUTION_MODES)
        _check_choice("decay schedule", self.decay_schedule, DECAY_SCHEDULES)
        _check_choice("mask_init", self.mask_init, MASK_INITS)
        frequency = self.update_frequency
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency <= 0:
            raise ValueError(f"update_frequency must be a positive int (optimizer steps), got {frequency!r}")
        if not 0.0 < self.t_end <= 1.0:
            raise ValueError(f"t_end must be in (0, 1], got {self.t_end!r}")
        if not 0.0 <= self.death_rate <= 1.0:
            raise ValueError(f"death-rate must be in [0, 1], got {self.death_rate!r}")
        if not math.isfinite(self.erk_power) or self.erk_power < 0:
            raise ValueError(f"erk-power must be a finite number >= 0, got {self.erk_power!r}")
        for flag, patterns in (("sparse_exclude", self.sparse_exclude), ("sparse_include", self.sparse_include)):
            if isinstance(patterns, str) or any(not isinstance(p, str) or not p for p in patterns):
                raise ValueError(f"{flag} must be a sequence of non-empty pattern strings, got {patterns!r}")
            object.__setattr__(self, flag, tuple(patterns))
        self._check_structure()
        self._check_global()
        self._check_nm()
        if self.mask_init != "random" and not self.enabled:
            raise ValueError(f"--mask-init {self.mask_init} chooses the first masks of a sparse run, and this run is "
                             "dense; pass --density D below 1 or --pruning_type structure, or leave --mask-init out")

    def _check_structure(self) -> None:
        _check_choice("pruning_type", self.pruning_type, PRUNING_TYPES)
        if self.pruning_type == "structure_new":
            object.__setattr__(self, "pruning_type", "structure")
        for flag, value in (("atten_density", self.atten_density), ("other_density", self.other_density)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise ValueError(f"{flag} must be in (0, 1], got {value!r}")
        multiple = self.unit_multiple
        if multiple != UNIT_MULTIPLE_AUTO and (isinstance(multiple, bool) or not isinstance(multiple, int)
                                               or multiple < 1):
            raise ValueError(f"unit_multiple must be a positive int or {UNIT_MULTIPLE_AUTO!r}, got {multiple!r}")
        head = self.atten_head
        if head is not None and (isinstance(head, bool) or not isinstance(head, int) or head <= 0):
            raise ValueError(f"atten_head must be a positive int (heads per block) or None, got {head!r}")
        if not self.structured:
            if self.structure_compat:
                raise ValueError("--structure-compat needs --pruning_type structure (it changes structured masks only)")
            return
        # Structured updates swap whole heads and neurons with a fixed count per block, by SViTE's unit scores.
        if self.death != "magnitude":
            raise ValueError(f"--death {self.death} selects single weights; structured sparsity scores heads by "
                             "first-order Taylor and neurons by magnitude (--death magnitude)")
        if self.growth == "momentum":
            raise ValueError("--growth momentum is not defined for heads (their growth signal is the gradient at the "
                             "head output); use gradient or random with --pruning_type structure")
        if self.redistribution != "none":
            raise ValueError(f"--redistribution {self.redistribution} moves weights between layers; structured "
                             "sparsity keeps each block's head and neuron counts fixed (--redistribution none)")
        if self.sparse_include or self.sparse_exclude:
            raise ValueError("--sparse-include/--sparse-exclude choose tensors for unstructured masks; structured "
                             "sparsity always covers the heads and MLP neurons of every block")

    def _check_global(self) -> None:
        for flag, value in (("prune_every", self.prune_every), ("prune_units", self.prune_units)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{flag} must be a positive int, got {value!r}")
        if not isinstance(self.prune_head_dim, bool):
            raise ValueError(f"prune_head_dim must be a bool, got {self.prune_head_dim!r}")
        lam = self.latency_lambda
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"--latency-lambda must be a finite number >= 0, got {lam!r}")
        if self.pruning_type != "global":
            for flag, value in (("--target-macs", self.target_macs), ("--target-latency", self.target_latency),
                                ("--latency-table", self.latency_table), ("--latency-lambda", lam or None),
                                ("--prune-head-dim", self.prune_head_dim or None)):
                if value is not None:
                    raise ValueError(f"{flag} belongs to --pruning_type global; pass that too or leave it out")
            return
        if (self.target_macs is None) == (self.target_latency is None):
            raise ValueError("--pruning_type global needs one budget: --target-macs F (a fraction of the dense MACs) "
                             "or --target-latency F (a fraction of the dense latency by --latency-table)")
        flag, target = (("--target-macs", self.target_macs) if self.target_latency is None
                        else ("--target-latency", self.target_latency))
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target < 1.0:
            raise ValueError(f"--pruning_type global needs {flag} F, a fraction of dense in (0, 1), got {target!r}")
        if self.density is not None or self.sparse_include or self.sparse_exclude:
            raise ValueError("--density/--sparse-include/--sparse-exclude choose weight masks; global pruning "
                             "removes whole heads, neurons and channels (leave them out)")
        if self.mask_init != "random":
            raise ValueError("--mask-init chooses the first masks of a DST run; global pruning starts from every "
                             "unit of the (pretrained, --finetune) model: leave --mask-init out")

    def _check_nm(self) -> None:
        if (self.sparse_init == "nm") != (self.nm is not None):
            raise ValueError("N:M sparsity takes both --sparse_init nm and --nm N:M (e.g. --sparse_init nm --nm 2:4)")
        _check_choice("nm method", self.nm_method, NM_METHODS)
        if not (isinstance(self.srste_decay, (int, float)) and not isinstance(self.srste_decay, bool)
                and math.isfinite(self.srste_decay) and self.srste_decay >= 0):
            raise ValueError(f"--srste-decay must be a finite number >= 0, got {self.srste_decay!r}")
        if self.nm is None:
            return
        n, m = parse_nm(self.nm)
        object.__setattr__(self, "nm", f"{n}:{m}")
        if self.structured or self.pruning_type == "global":
            raise ValueError(f"--sparse_init nm masks single weights; it does not combine with --pruning_type "
                             f"{self.pruning_type}")
        if self.density is not None and not math.isclose(self.density, n / m, rel_tol=1e-9):
            raise ValueError(f"--nm {n}:{m} keeps a density of exactly {n}/{m}; drop --density {self.density:g} (or "
                             f"pass {n / m:g})")
        object.__setattr__(self, "density", n / m)
        if self.redistribution != "none":
            raise ValueError(f"--redistribution {self.redistribution} moves weights between layers, but N:M keeps "
                             "exactly N in every group of M; use --redistribution none")
        if self.nm_method == "srste" and (self.growth, self.death) != ("gradient", "magnitude"):
            raise ValueError(f"--nm-method srste recomputes the mask from the weights' magnitudes, so --growth "
                             f"{self.growth} / --death {self.death} have no effect; drop them or use --nm-method dst")

    @property
    def nm_pattern(self) -> tuple[int, int] | None:
        """(N, M) of an N:M run, else None."""
        return None if self.nm is None else parse_nm(self.nm)

    @property
    def structured(self) -> bool:
        """Whether heads and MLP neurons are pruned (``--pruning_type structure``)."""
        return self.pruning_type == "structure"

    @property
    def enabled(self) -> bool:
        """Whether anything is masked: structured sparsity, or a density given and below 1."""
        return self.structured or self.pruning_type == "global" or (self.density is not None and self.density < 1.0)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SparsityConfig:
        """Build from a Namespace parsed with ``add_sparse_args`` (validation happens in ``__post_init__``)."""
        return cls(
            density=args.density,
            sparse_init=args.sparse_init,
            update_frequency=args.update_frequency,
            growth=args.growth,
            death=args.death,
            redistribution=args.redistribution,
            death_rate=args.death_rate,
            decay_schedule=args.decay_schedule,
            t_end=args.t_end,
            sparse_exclude=tuple(args.sparse_exclude or ()),
            sparse_include=tuple(args.sparse_include or ()),
            erk_power=args.erk_power,
            pruning_type=args.pruning_type,
            atten_head=args.atten_head,
            atten_density=args.atten_density,
            other_density=args.other_density,
            structure_compat=args.structure_compat,
            mask_init=args.mask_init,
            target_macs=args.target_macs,
            prune_every=args.prune_every,
            prune_units=args.prune_units,
            target_latency=args.target_latency,
            latency_lambda=args.latency_lambda,
            latency_table=args.latency_table,
            prune_head_dim=args.prune_head_dim,
            unit_multiple=args.unit_multiple,
            nm=args.nm,
            nm_method=args.nm_method,
            srste_decay=args.srste_decay,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON- and ``weights_only``-safe dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _unit_multiple(text: str) -> int | str:
    """``--unit-multiple``: ``auto`` or a positive int."""
    if text == UNIT_MULTIPLE_AUTO:
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or {UNIT_MULTIPLE_AUTO!r}, got {text!r}")
    return value


def add_sparse_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add SViTE's unstructured-sparsity flags (original names and meanings) as an argument group, and its
    structured-sparsity flags as a second group; returns the unstructured group.

    Differences from SViTE: ``--density`` defaults to None (dense), choices are checked, ``--decay-schedule linear``
    and ``--growth momentum`` work, ``--redistribution`` is implemented, and the never-read flags
    (``--final_density``, ``--sparse``, ``--snip``, ``--fix``, ``--reset``) are gone.
    """
    group = parser.add_argument_group("unstructured sparsity (SViTE)")
    group.add_argument("--density", type=float, default=None,
                       help="overall density of the masked weights in (0, 1]; default: dense training, no masks")
    group.add_argument("--sparse_init", default="uniform", choices=SPARSE_INITS,
                       help="per-layer density distribution (fixed_ERK is an alias of ERK; default: uniform, as SViTE), "
                            "or nm: N of every M consecutive input weights (--nm)")
    group.add_argument("--mask-init", dest="mask_init", default="random", choices=MASK_INITS,
                       help="the first masks: random (SViTE) or magnitude: the largest-|w| weights of each layer at "
                            "the --sparse_init densities, or with --pruning_type structure the heads and neurons of "
                            "largest weight L1 norm (for --finetune)")
    group.add_argument("--update_frequency", type=int, default=100, metavar="N",
                       help="optimizer steps between topology updates (ΔT)")
    group.add_argument("--growth", default="gradient", choices=GROWTH_MODES, help="growth criterion")
    group.add_argument("--death", default="magnitude", choices=DEATH_MODES, help="death (pruning) criterion")
    group.add_argument("--redistribution", default="none", choices=REDISTRIBUTION_MODES,
                       help="move regrowth between layers (none keeps every layer's density fixed, as SViTE)")
    group.add_argument("--death-rate", dest="death_rate", type=float, default=0.5,
                       help="initial fraction of active weights replaced per update")
    group.add_argument("--decay-schedule", dest="decay_schedule", default="cosine", choices=DECAY_SCHEDULES,
                       help="decay of the death rate to 0.005 over the whole run")
    group.add_argument("--t_end", type=float, default=0.8,
                       help="fraction of the run after which the topology is frozen")
    group.add_argument("--sparse-exclude", dest="sparse_exclude", nargs="+", default=[], metavar="PATTERN",
                       help="fnmatch patterns of parameter names not to mask (e.g. 'head.weight')")
    group.add_argument("--sparse-include", dest="sparse_include", nargs="+", default=[], metavar="PATTERN",
                       help="fnmatch patterns; only matching 2-D/4-D weights are masked (default: all of them; with "
                            "--sparse_init nm: 'blocks.*', the blocks' linears)")
    group.add_argument("--erk-power", dest="erk_power", type=float, default=1.0, help="exponent of the ERK score")
    group.add_argument("--nm", default=None, metavar="N:M",
                       help="with --sparse_init nm: exactly N non-zeros in every M consecutive input weights (2:4 is "
                            "what sparse tensor cores run)")
    group.add_argument("--nm-method", dest="nm_method", default="srste", choices=NM_METHODS,
                       help="how N:M masks are learned: srste (recomputed from |w| every --update_frequency steps, "
                            "straight-through gradients) or dst (SViTE's prune-and-regrow within each group)")
    group.add_argument("--srste-decay", dest="srste_decay", type=float, default=2e-4, metavar="LAMBDA",
                       help="SR-STE: λ·w added to the gradient of every pruned weight w")

    structure = parser.add_argument_group("structured sparsity (S²ViTE: attention heads and MLP neurons)")
    structure.add_argument("--pruning_type", default="unstructure", choices=PRUNING_TYPES,
                           help="unstructure: weight masks (--density); structure (alias structure_new): whole heads "
                                "and MLP neurons, --density and --sparse_init are then ignored")
    structure.add_argument("--atten_head", type=int, default=None, metavar="H",
                           help="heads per block, checked against the model (default: taken from the model)")
    structure.add_argument("--atten_density", type=float, default=0.2,
                           help="fraction of heads kept per block: int(H * atten_density)")
    structure.add_argument("--other_density", type=float, default=0.2,
                           help="fraction of MLP neurons kept per block: int(hidden * other_density), rounded to a "
                                "multiple of --unit-multiple")
    structure.add_argument("--unit-multiple", dest="unit_multiple", type=_unit_multiple, default=UNIT_MULTIPLE_AUTO,
                           metavar="N",
                           help="keep MLP neurons in multiples of N (nearest multiple of int(hidden * other_density), "
                                "ties up; --pruning_type global removes neurons and embedding channels N at a time) so "
                                "compacted widths suit matrix kernels; 1: the paper's exact counts; auto (default): "
                                f"{AUTO_MULTIPLE} for layers of at least {AUTO_MIN_WIDTH} units, else 1")
    structure.add_argument("--structure-compat", dest="structure_compat", action="store_true",
                           help="SViTE's quirks: unmasked biases of pruned units (pruned heads leak a constant), "
                                "zero-initialised regrown units")

    glob = parser.add_argument_group("global structural pruning (--pruning_type global: heads, neurons, embedding "
                                     "channels ranked in one list)")
    glob.add_argument("--target-macs", dest="target_macs", type=float, default=None, metavar="F",
                      help="MAC budget as a fraction of the dense model's, in (0, 1); pruning stops within 1%% of it")
    glob.add_argument("--prune-every", dest="prune_every", type=int, default=100, metavar="N",
                      help="optimizer steps between pruning steps")
    glob.add_argument("--prune-units", dest="prune_units", type=int, default=32, metavar="K",
                      help="units removed per pruning step, lowest global score first")
    glob.add_argument("--target-latency", dest="target_latency", type=float, default=None, metavar="F",
                      help="latency budget instead of --target-macs: a fraction of the dense blocks' latency by "
                           "--latency-table, in (0, 1); pruning stops within 1%% of it")
    glob.add_argument("--latency-lambda", dest="latency_lambda", type=float, default=0.0, metavar="L",
                      help="latency-aware ranking: a unit's score minus L x the ms its removal saves by "
                           "--latency-table (NViT: 5e-4); under --target-macs, the ms saved beyond the model's "
                           "average ms per MAC; 0: scores alone")
    glob.add_argument("--latency-table", dest="latency_table", default=None, metavar="FILE",
                      help="block-latency table (JSON) measured on the target device by python -m "
                           "benchmarks.latency_table")
    glob.add_argument("--prune-head-dim", dest="prune_head_dim", action="store_true",
                      help="each block's head dimensions (the q, k and v width its heads share) are units too, "
                           "removed --unit-multiple at a time; the compact blocks get narrower heads")
    glob.add_argument("--compact-at-budget", dest="compact_at_budget", action="store_true",
                      help="once the budget is met, go on (from the next epoch) as the compact model with a fresh "
                           "optimizer instead of the masked full-size one: same function, less compute")
    return group
