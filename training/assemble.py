"""One function assembles a training run from typed configs: loaders, model, EMA, optimizer, lr schedule, AMP
scaler, the sparsifier chain, mixup and the loss (with its distillation teacher). main.py, the benchmarks and the
tests all build runs with it, so what they measure is what main.py trains.

The order of construction is the order of random draws (model init, then token selectors, then masks): changing
it changes every run's numbers and breaks the bit-exact resume of existing checkpoints. The teacher draws nothing:
a distilled run starts from the same weights and masks as the same run without a teacher.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.deit import VisionTransformerDistilled
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import datasets
import engine
import interop
import models
import sparselearning
from sparselearning.base import combine
from training import teacher_topk
from training.amp import Precision, choose_precision, device_supports_bf16, optimizer_supports_fused
from training.distillation import DistillationConfig, DistillationLoss
from training.loaders import LoaderConfig, build_train_loader, build_val_loader
from training.process import Process
from training.state import TrainingState
from training.teacher import load_teacher

if TYPE_CHECKING:
    from training.compaction import Compacted


@dataclass(frozen=True)
class ModelConfig:
    """The network and what is kept beside it (EMA) or wrapped around it (torch.compile)."""

    name: str
    num_classes: int = 1000  # a run with data takes the dataset's class count instead
    img_size: int | None = None  # None: the model's own resolution
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    ema: bool = False
    ema_decay: float = 0.99996
    ema_force_cpu: bool = False
    compile: bool = False
    finetune: str | None = None  # start from this file's model weights (interop.load_pretrained)


@dataclass(frozen=True)
class OptimizerConfig:
    """timm's ``create_optimizer_v2`` settings; ``lr`` is for a global batch of 512 and scaled linearly."""

    opt: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.05
    momentum: float = 0.9
    eps: float = 1e-8
    betas: tuple[float, ...] | None = None
    clip_grad: float | None = None


@dataclass(frozen=True)
class ScheduleConfig:
    """timm's ``create_scheduler_v2`` settings, stepped once per epoch (warm-up 0 leaves the lr as built)."""

    sched: str = "cosine"
    epochs: int = 300
    decay_epochs: float = 30
    decay_rate: float = 0.1
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_epochs: int = 5
    noise: tuple[float, ...] | None = None
    noise_pct: float = 0.67
    noise_std: float = 1.0


@dataclass(frozen=True)
class PrecisionConfig:
    """``--amp``, ``--amp-dtype`` and ``--opt-fused``; None picks the device's default (training/amp.py)."""

    amp: bool | None = None
    amp_dtype: str | None = None
    opt_fused: bool | None = None


@dataclass(frozen=True)
class MixupConfig:
    """timm's ``Mixup`` and the label smoothing of the loss; mixup and cutmix off by default."""

    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    smoothing: float = 0.0

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MixupConfig:
        return cls(args.mixup, args.cutmix, tuple(args.cutmix_minmax) if args.cutmix_minmax else None,
                   args.mixup_prob, args.mixup_switch_prob, args.mixup_mode, args.smoothing)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is built from. Without ``data`` no loaders are built (the caller feeds batches) and
    ``total_steps`` gives the length the sparsity and token schedules span."""

    model: ModelConfig
    loader: LoaderConfig
    data: datasets.DataConfig | None = None
    epochs: int = 1
    total_steps: int | None = None  # with data: optimizer steps per epoch x epochs
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    mixup: MixupConfig = field(default_factory=MixupConfig)
    sparsity: sparselearning.SparsityConfig | None = None
    tokens: models.TokenConfig = field(default_factory=models.TokenConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    merge: models.MergeConfig = field(default_factory=models.MergeConfig)  # token merging, after any selection
    seed: int = 0  # the mask seed and the lr noise seed, the same on every rank
    compact_at_budget: bool = False  # global pruning: train the compact model once the budget is met

    def __post_init__(self) -> None:
        if not self.compact_at_budget:
            return
        if self.sparsity is None or self.sparsity.pruning_type != "global":
            raise ValueError("--compact-at-budget compacts a global-pruning run once its budget is met; pass "
                             "--pruning_type global with a budget, or leave --compact-at-budget out")
        if self.tokens.enabled or self.merge.enabled:
            raise ValueError("--compact-at-budget does not combine with --token_selection or --tome-r (the token "
                             "modules would have to move to the compact model); leave one of them out")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunConfig:
        """main.py's flags (``--input-size`` already resolved); validates every component config.

        A resumed run (``args.resume`` set) never reads ``--finetune``: its checkpoint holds the weights it continues.
        """
        data = datasets.DataConfig.from_args(args)
        sparsity = sparselearning.SparsityConfig.from_args(args)
        tokens = models.TokenConfig.from_args(args)
        return cls(
            model=ModelConfig(args.model, img_size=args.input_size, drop_rate=args.drop,
                              drop_path_rate=args.drop_path, ema=args.model_ema, ema_decay=args.model_ema_decay,
                              ema_force_cpu=args.model_ema_force_cpu, compile=args.compile,
                              finetune=None if args.resume else args.finetune),
            loader=LoaderConfig.from_args(args), data=data, epochs=args.epochs,
            optimizer=OptimizerConfig(args.opt, args.lr, args.weight_decay, args.momentum, args.opt_eps,
                                      tuple(args.opt_betas) if args.opt_betas else None, args.clip_grad),
            schedule=ScheduleConfig(args.sched, args.epochs, args.decay_epochs, args.decay_rate, args.min_lr,
                                    args.warmup_lr, args.warmup_epochs,
                                    tuple(args.lr_noise) if args.lr_noise else None, args.lr_noise_pct,
                                    args.lr_noise_std),
            precision=PrecisionConfig(args.amp, args.amp_dtype, args.opt_fused),
            mixup=MixupConfig.from_args(args),
            sparsity=sparsity, tokens=tokens, distillation=DistillationConfig.from_args(args),
            merge=models.MergeConfig.from_args(args), seed=args.seed, compact_at_budget=args.compact_at_budget)


@dataclass
class Run:
    """An assembled run. ``model`` is the plain module (its parameter names are the checkpoint's, the masks' and
    the EMA's); ``forward_model`` is what the training step calls (the DDP and torch.compile wrappers, if any).
    ``--compact-at-budget`` replaces the model, EMA, optimizer and sparsifier between epochs (``training.compaction``),
    so the loop reads them from the run, not from copies."""

    process: Process
    precision: Precision
    model: nn.Module
    forward_model: nn.Module
    model_ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    weight_sparsifier: sparselearning.Sparsifier
    sparsifier: sparselearning.Sparsifier  # the chain: weight sparsity, then the token schedule
    criterion: DistillationLoss  # called (samples, outputs, targets); kind "none" is the plain loss
    mixup_fn: Mixup | None
    clip_grad: float | None
    total_steps: int
    train_loader: Any = None
    val_loader: Any = None
    config: RunConfig | None = None  # what it was built from (a compaction rebuilds the optimizer by it)
    compacted: Compacted | None = None  # set once the run trains its compact model (training.compaction)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def step_context(self, print_freq: int = 50,
                     after_step: Callable[[int, int, int, torch.Tensor], None] | None = None) -> engine.StepContext:
        """What ``engine.train_one_epoch`` needs besides the model and the data."""
        return engine.StepContext(optimizer=self.optimizer, scaler=self.scaler, sparsifier=self.sparsifier,
                                  amp_dtype=self.precision.amp_dtype, clip_grad=self.clip_grad,
                                  mixup_fn=self.mixup_fn, model_ema=self.model_ema, print_freq=print_freq,
                                  after_step=after_step)

    def state(self) -> TrainingState:
        """What a checkpoint saves and a resume restores."""
        return TrainingState(self.model, self.optimizer, self.lr_scheduler, self.scaler, self.sparsifier,
                             self.model_ema, None if self.compacted is None else self.compacted.to_dict())


def build_optimization(cfg: OptimizerConfig, schedule: ScheduleConfig, model: nn.Module, batch_size: int,
                       world: int = 1, fused: bool = False, noise_seed: int = 0):
    """timm's optimizer (DeiT's no-decay rules) at lr x global batch / 512, and its per-epoch lr schedule."""
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr * batch_size * world / 512.0,
                                    weight_decay=cfg.weight_decay, momentum=cfg.momentum, eps=cfg.eps,
                                    **({"fused": True} if fused else {}),
                                    **({"betas": cfg.betas} if cfg.betas else {}))
    s = schedule
    lr_scheduler = create_scheduler_v2(
        optimizer, sched=s.sched, num_epochs=s.epochs, decay_epochs=s.decay_epochs,
        decay_milestones=[int(s.decay_epochs * k) for k in range(1, 1 + int(s.epochs // s.decay_epochs))],
        decay_rate=s.decay_rate, min_lr=s.min_lr, warmup_lr=s.warmup_lr, warmup_epochs=s.warmup_epochs,
        noise=list(s.noise) if s.noise else None, noise_pct=s.noise_pct, noise_std=s.noise_std,
        noise_seed=noise_seed)[0]
    return optimizer, lr_scheduler


def wrap_model(model: nn.Module, process: Process, compile_model: bool) -> nn.Module:
    """What the training step calls: ``model`` in DDP on several processes, and torch.compile'd if asked."""
    device = process.device
    forward_model = model
    if process.world > 1:
        forward_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index]
                                                            if device.type == "cuda" else None)
    if compile_model:
        forward_model = torch.compile(forward_model)  # DDP inside: compile splits the graph at its gradient buckets
    return forward_model


def set_distilled_training(model: nn.Module, distillation: DistillationConfig) -> None:
    """A distilled DeiT returns (class, dist) logits in training only when the run distils."""
    if isinstance(model, VisionTransformerDistilled):
        model.set_distilled_training(distillation.enabled)


def build_criterion(cfg: MixupConfig) -> nn.Module:
    """Soft targets whenever mixup OR cutmix is on (DeiT keyed this on mixup alone, which breaks cutmix-only runs)."""
    if cfg.active:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def build_mixup(cfg: MixupConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup for ``cfg``, or None when neither mixup nor cutmix is on."""
    if not cfg.active:
        return None
    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax, prob=cfg.prob,
                 switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=cfg.smoothing, num_classes=num_classes)


def build_loss(mixup: MixupConfig, distillation: DistillationConfig, num_classes: int, img_size: int,
               device: torch.device, say: Callable[[str], None],
               stored_teacher: teacher_topk.StoredTeacher | None = None) -> DistillationLoss:
    """``build_criterion``'s loss, with the teacher when the run distils (``say`` prints what teaches): the model of
    ``--teacher-path``, or with ``--teacher-topk`` the ``stored_teacher`` of the replayed outputs."""
    d, teacher = distillation, stored_teacher
    if d.teacher_topk:
        header = stored_teacher.batches.store.header
        say(f"teacher: the top-{header.k} outputs of {header.teacher} stored in {d.teacher_topk}; {d.kind} "
            f"distillation, alpha {d.alpha}" + (f", tau {d.tau}" if d.kind == "soft" else ""))
    elif d.enabled:
        teacher = load_teacher(d.teacher_model, d.teacher_path, num_classes=num_classes, img_size=img_size,
                               device=device)
        say(f"teacher {d.teacher_path} ({d.teacher_model or 'the model it records'}): "
            f"{sum(p.numel() for p in teacher.parameters()):,} parameters; {d.kind} distillation, alpha {d.alpha}"
            + (f", tau {d.tau}" if d.kind == "soft" else ""))
    return DistillationLoss(build_criterion(mixup), teacher, d.kind, d.alpha, d.tau)


def build_run(cfg: RunConfig, process: Process, *, model: nn.Module | None = None,
              log_fn: Callable[[dict[str, Any]], None] | None = None,
              say: Callable[[str], None] = lambda line: None) -> Run:
    """Assemble ``cfg`` on ``process``'s device, drawing from the global RNG in main.py's order.

    Args:
        model: a model built elsewhere (a compacted one, in the benchmarks) instead of ``cfg.model.name``'s.
        log_fn: receives the sparsifier's density records (its default prints a table on rank 0).
        say: prints the one-line summary of the model and precision, and what ``--finetune`` loaded (main.py: rank
            0's ``print``).
    """
    device, world = process.device, process.world
    train_loader = val_loader = None
    num_classes = cfg.model.num_classes
    if cfg.data is not None:
        train_loader, num_classes = build_train_loader(cfg.data, cfg.loader, process.rank, world)
        val_loader, _ = build_val_loader(cfg.data, cfg.loader, process.rank, world)
    p = cfg.precision
    precision = choose_precision(device.type, device_supports_bf16(device), optimizer_supports_fused(cfg.optimizer.opt),
                                 p.amp, p.amp_dtype, p.opt_fused)
    if model is None:
        model = models.create_model(cfg.model.name, num_classes=num_classes, img_size=cfg.model.img_size,
                                    drop_rate=cfg.model.drop_rate, drop_path_rate=cfg.model.drop_path_rate)
    models.apply_token_selection(model, cfg.tokens)  # before the optimizer, EMA and DDP see the parameters
    if cfg.model.finetune:  # the weights, before the EMA copies them and the sparsifier chooses masks by them
        for line in interop.load_pretrained(model, cfg.model.finetune, cfg.model.name):
            say(line)
    set_distilled_training(model, cfg.distillation)
    models.apply_token_merging(model, cfg.merge)  # no parameters, no random draws; before the EMA copies the model
    model.to(device)
    say(f"model {cfg.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters; {world} process(es) "
        f"on {device}; {precision}")
    model_ema = None
    if cfg.model.ema:
        model_ema = ModelEmaV3(model, decay=cfg.model.ema_decay, device="cpu" if cfg.model.ema_force_cpu else None)
    forward_model = wrap_model(model, process, cfg.model.compile)

    optimizer, lr_scheduler = build_optimization(cfg.optimizer, cfg.schedule, model, cfg.loader.batch_size, world,
                                                 precision.fused, cfg.seed)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.grad_scaler)
    total_steps = len(train_loader) * cfg.epochs if train_loader is not None else cfg.total_steps
    if total_steps is None:
        raise ValueError("a run without data needs RunConfig.total_steps, the length its schedules span")
    structured = cfg.sparsity is not None and cfg.sparsity.structured
    units = models.structure_units(model, scaler) if structured else None
    if cfg.sparsity is not None and cfg.sparsity.pruning_type == "global":
        units = models.global_units(model, cfg.sparsity.latency_table, cfg.sparsity.prune_head_dim,
                                    cfg.sparsity.unit_multiple)
    weight_sparsifier = sparselearning.build_sparsifier(cfg.sparsity, model, optimizer, total_steps, seed=cfg.seed,
                                                        log_fn=log_fn, units=units)
    token_schedule = (models.TokenSchedule(model, cfg.tokens, total_steps) if cfg.tokens.enabled
                      else sparselearning.DenseSparsifier())
    mixup_fn, stored_teacher, d = build_mixup(cfg.mixup, num_classes), None, cfg.distillation
    if d.teacher_topk:  # stored outputs stand in for the teacher, and their stored mixup draws for fresh ones
        if train_loader is None:
            raise ValueError("--teacher-topk replays the images of the stored outputs: the run needs its data")
        expected = teacher_topk.describe_run(cfg.data, cfg.loader, cfg.mixup, train_loader, epochs=cfg.epochs,
                                             world=world, num_classes=num_classes, k=d.teacher_topk_k)
        train_loader, mixup_fn, stored_teacher = teacher_topk.replay(Path(d.teacher_topk), train_loader, expected,
                                                                     process.rank, cfg.mixup, num_classes)
    criterion = build_loss(cfg.mixup, d, num_classes, model.patch_embed.img_size[0], device, say, stored_teacher)
    return Run(process=process, precision=precision, model=model, forward_model=forward_model, model_ema=model_ema,
               optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler, weight_sparsifier=weight_sparsifier,
               sparsifier=combine(weight_sparsifier, token_schedule), criterion=criterion,
               mixup_fn=mixup_fn, clip_grad=cfg.optimizer.clip_grad, total_steps=total_steps,
               train_loader=train_loader, val_loader=val_loader, config=cfg)
