"""Train or evaluate a (sparse) Vision Transformer: the command-line edge of the project.

argparse lives here only. Components receive typed configs or explicit arguments; the training loop in
`engine.py` sees a `Sparsifier`, never a sparsity method's internals.

    python main.py --model vit_digits_tiny --data-set DIGITS --output_dir out      # one process
    torchrun --nproc_per_node=8 main.py --model deit_small_patch16_224 ...          # NCCL on GPUs, gloo on CPUs
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3

import datasets
import engine
import interop
import models
from interop.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
import sparselearning
from sparselearning.base import combine
from training.amp import choose_precision, device_supports_bf16, optimizer_supports_fused
from training.resume_check import check_resume, flag_names, run_settings, saved_settings
from training import recipes, summary
from training import cli, preflight, run_dir
from training.interrupts import StepHook, StopSignals
from training.resumable_loader import resumable_loader


def get_args_parser() -> argparse.ArgumentParser:
    """DeiT's and SViTE's flag names and defaults, minus the flags the original parsed and ignored."""
    parser = argparse.ArgumentParser("SViTE training and evaluation", add_help=True)
    parser.add_argument("--batch-size", default=64, type=int, help="per-process batch size")
    parser.add_argument("--epochs", default=300, type=int,
                        help="with --resume, a larger value extends the run: the lr, death-rate and tau schedules and "
                             "t_end then follow the new length from the resumed step on (docs/resume.md)")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="vit_digits_tiny", choices=models.MODEL_NAMES)
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    g.add_argument("--model-ema", action="store_true", default=True, help="keep and evaluate an EMA of the weights")
    g.add_argument("--no-model-ema", action="store_false", dest="model_ema")
    g.add_argument("--model-ema-decay", type=float, default=0.99996)
    g.add_argument("--model-ema-force-cpu", action="store_true", default=False)

    g = parser.add_argument_group("optimizer (timm create_optimizer_v2)")
    g.add_argument("--opt", default="adamw", help="timm optimizer name")
    g.add_argument("--opt-eps", default=1e-8, type=float)
    g.add_argument("--opt-betas", default=None, type=float, nargs="+")
    g.add_argument("--opt-fused", action=argparse.BooleanOptionalAction, default=None,
                   help="fused optimizer kernel (torch Adam/AdamW/SGD); default: on for CUDA, off for CPU")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the global gradient norm to this value")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.05)

    g = parser.add_argument_group("learning-rate schedule (timm create_scheduler_v2, stepped per epoch)")
    g.add_argument("--sched", default="cosine", choices=("cosine", "tanh", "step", "multistep", "poly"))
    g.add_argument("--lr", type=float, default=5e-4, help="learning rate for a global batch of 512 (scaled linearly)")
    g.add_argument("--lr-noise", type=float, nargs="+", default=None, help="epoch percentages to add lr noise")
    g.add_argument("--lr-noise-pct", type=float, default=0.67)
    g.add_argument("--lr-noise-std", type=float, default=1.0)
    g.add_argument("--warmup-lr", type=float, default=1e-6)
    g.add_argument("--min-lr", type=float, default=1e-5)
    g.add_argument("--decay-epochs", type=float, default=30, help="step/multistep schedules: epochs per decay")
    g.add_argument("--warmup-epochs", type=int, default=5)
    g.add_argument("--decay-rate", "--dr", type=float, default=0.1, help="step/multistep decay factor")

    g = parser.add_argument_group("regularisation")
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--repeated-aug", action="store_true", default=True, help="repeated-augmentation sampler (x3)")
    g.add_argument("--no-repeated-aug", action="store_false", dest="repeated_aug")
    g.add_argument("--mixup", type=float, default=0.8, help="mixup alpha; 0 disables")
    g.add_argument("--cutmix", type=float, default=1.0, help="cutmix alpha; 0 disables")
    g.add_argument("--cutmix-minmax", type=float, nargs=2, default=None)
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=("batch", "pair", "elem"))

    datasets.add_data_args(parser)
    sparselearning.add_sparse_args(parser)
    models.add_token_args(parser)

    g = parser.add_argument_group("runtime")
    g.add_argument("--output_dir", default="", help="checkpoints, log.txt and config.json go here; empty: no saving")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="native mixed precision (torch.amp); default: on for CUDA, off for CPU")
    g.add_argument("--amp-dtype", default=None, choices=("float16", "bfloat16"),
                   help="default: bfloat16 where the device supports it, else float16 (with a GradScaler, as the "
                        "original's AMP)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (after the DDP wrap) for training and evaluation; masks, EMA and "
                        "checkpoints keep the uncompiled parameter names")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--resume", default="",
                   help="checkpoint to continue from (or to evaluate with --eval); the flags that define the "
                        "experiment must equal the checkpoint's (docs/resume.md)")
    g.add_argument("--auto-resume", action="store_true",
                   help="continue from <output_dir>/checkpoint.pth if it exists, else start fresh (for job scripts); "
                        "without it or --resume, an --output_dir holding a checkpoint is refused")
    g.add_argument("--save-every-steps", type=int, default=0, metavar="N",
                   help="also write checkpoint.pth every N optimizer steps within an epoch (0: at epoch ends only)")
    g.add_argument("--start_epoch", default=0, type=int, help="overwritten by --resume")
    g.add_argument("--eval", action="store_true", help="evaluate and exit")
    g.add_argument("--compact", action="store_true",
                   help="with --eval on a structured checkpoint: write the physically pruned model as compact.pth")

    g = parser.add_argument_group("checkpoint inspection (with --resume FILE; no data needed unless --eval is given)")
    g.add_argument("--report", action="store_true",
                   help="print what the checkpoint holds: detected selector / sparsity / compact shapes, a per-layer "
                        "table of stored mask density against the zeros in the weights, and warnings")
    g.add_argument("--flops", action="store_true",
                   help="print params (dense, non-zero) and MACs per image (dense, SViTE-theoretical, executed); "
                        "without --resume, of --model with the given sparsity and token flags")
    g.add_argument("--export", default="", metavar="DIR",
                   help="write model.safetensors + config.json (timm-loadable where possible) and a compressed "
                        "sparse model.sparse.safetensors into DIR")
    g.add_argument("--dist_url", default="env://", help="torch.distributed init method; torchrun sets env://")
    g.add_argument("--print-freq", default=50, type=int, help="steps between progress lines")
    g.add_argument("--verbose", action="store_true",
                   help="print the per-layer density table at every topology update (default: one line per update; "
                        "the table at start and end)")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard scalars to <output_dir>/tensorboard")
    # The model's own resolution is the right default; DeiT's 224 would break the small models.
    parser.set_defaults(input_size=None)
    recipes.document_defaults(parser)
    return parser


def init_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device) from torchrun's or SLURM's environment; (0, 1) without one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    elif "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        rank, world, local = (int(os.environ[k]) for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    else:
        return 0, 1, torch.device(args.device)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=args.dist_url, rank=rank, world_size=world)
    return rank, world, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_loaders(args: argparse.Namespace, data_cfg: datasets.DataConfig, rank: int, world: int):
    """Train loader (repeated-augmentation or plain shuffling sampler) and a padding-free sharded val loader."""
    train_set, num_classes = datasets.build_dataset(True, data_cfg)
    if args.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        sampler: torch.utils.data.Sampler = RepeatAugSampler(train_set, num_replicas=world, rank=rank, shuffle=True)
    else:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=args.seed)
    train_loader = resumable_loader(train_set, sampler, args.batch_size, args.seed, rank,
                                    num_workers=args.num_workers, pin_memory=args.pin_mem)
    if len(train_loader) == 0:
        raise ValueError(f"each process gets {len(sampler)} training images per epoch, fewer than one batch of "
                         f"{args.batch_size}; lower --batch-size")
    val_loader, _ = build_val_loader(args, data_cfg, rank, world)
    return train_loader, val_loader, num_classes


def build_val_loader(args: argparse.Namespace, data_cfg: datasets.DataConfig, rank: int, world: int):
    """Each rank takes every world-th validation image, without padding, so every image counts exactly once."""
    val_set, num_classes = datasets.build_dataset(False, data_cfg)
    val_loader = torch.utils.data.DataLoader(
        val_set, sampler=list(range(rank, len(val_set), world)), batch_size=int(1.5 * args.batch_size),
        num_workers=args.num_workers, pin_memory=args.pin_mem, drop_last=False)
    return val_loader, num_classes


def build_criterion(args: argparse.Namespace, mixup_active: bool) -> nn.Module:
    # Soft targets whenever mixup OR cutmix is on (DeiT keyed this on mixup alone, which breaks cutmix-only runs).
    if mixup_active:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def validate_args(args: argparse.Namespace, mixup_active: bool) -> None:
    if args.batch_size < 1 or args.epochs < 1:
        raise ValueError(f"--batch-size and --epochs must be positive, got {args.batch_size} and {args.epochs}")
    if mixup_active and args.batch_size % 2:
        raise ValueError(f"mixup/cutmix mixes pairs and needs an even --batch-size, got {args.batch_size}; "
                         "change it or pass --mixup 0 --cutmix 0")
    preflight.check_device(args.device)
    preflight.check_training_flags(args)
    preflight.check_eval(args)
    if args.visualize_tokens and not args.eval and (args.report or args.flops or args.export):
        raise ValueError("--visualize-tokens draws validation images: use it when training or with --eval")
    if args.visualize_tokens and not (args.output_dir or (args.eval and args.resume)):
        raise ValueError("--visualize-tokens writes PNGs into --output_dir (with --eval --resume, next to the "
                         "checkpoint by default); pass --output_dir DIR")


def build_optimization(args: argparse.Namespace, model: nn.Module, world: int):
    """timm's AdamW (DeiT's no-decay rules) at lr x global batch / 512, and its per-epoch lr schedule."""
    lr = args.lr * args.batch_size * world / 512.0
    optimizer = create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                    momentum=args.momentum, eps=args.opt_eps,
                                    **({"fused": True} if args.opt_fused else {}),
                                    **({"betas": tuple(args.opt_betas)} if args.opt_betas else {}))
    lr_scheduler = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=[int(args.decay_epochs * k) for k in range(1, 1 + int(args.epochs // args.decay_epochs))],
        decay_rate=args.decay_rate, min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        noise=args.lr_noise, noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed)[0]
    return optimizer, lr_scheduler


@dataclasses.dataclass
class TrainingState:
    """Everything a training checkpoint saves and a resume restores, so the two cannot drift apart."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    scaler: torch.amp.GradScaler
    sparsifier: sparselearning.Sparsifier
    model_ema: ModelEmaV3 | None

    def checkpoint(self, epoch: int, step: int, best_acc1: float, rng: list[dict[str, Any]],
                   args: dict[str, Any], total_steps: int) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "model_ema": self.model_ema.module.state_dict() if self.model_ema is not None else None,
                "sparsifier": self.sparsifier.state_dict(), "epoch": epoch, "step": step, "best_acc1": best_acc1,
                "rng": rng, "args": args, "total_steps": total_steps}

    def resume(self, path: str, args: argparse.Namespace, world: int, steps_per_epoch: int,
               rank: int) -> tuple[int, int, float, dict[str, Any] | None]:
        """Restore a ``checkpoint`` file of the same experiment (``training.resume_check``, checked before anything
        is loaded); returns (first epoch to run, optimizer steps done, best top-1, position).

        A mid-epoch checkpoint holds ``position`` = {"batch": batches done in its epoch, "loss_sum": their summed
        loss}; its epoch is then the first to run, from that batch on.
        """
        ckpt = load_checkpoint(path, map_location="cpu")
        if "optimizer" not in ckpt:
            interop.load_weights(self.model, ckpt.get("model", ckpt), path, args.model)
            raise ValueError(f"{path} holds weights only (no optimizer state) and cannot be resumed; "
                             "evaluate it with --eval")
        extends = check_resume(saved_settings(ckpt), run_settings(vars(args), world, steps_per_epoch), path,
                               flag_names(get_args_parser()))
        if extends is not None and rank == 0:
            print(f"extending the run from {extends} to {args.epochs} epochs: from here on the lr schedule (and the "
                  f"death rate, t_end and tau where used) follows {args.epochs * steps_per_epoch} total steps",
                  flush=True)
        interop.load_weights(self.model, ckpt["model"], path, args.model)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if extends is None:  # else the scheduler built for the new --epochs is the extended schedule
            self.lr_scheduler.load_state_dict(ckpt["lr_scheduler"])
        if ckpt["scaler"]:  # empty when the saved run did not use fp16; --amp and --amp-dtype may change on resume
            self.scaler.load_state_dict(ckpt["scaler"])
        self.sparsifier.load_state_dict(ckpt["sparsifier"])
        if self.model_ema is not None:
            self.model_ema.module.load_state_dict(ckpt["model_ema"])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        position = ckpt.get("position")
        return ckpt["epoch"] + (position is None), ckpt["step"], ckpt.get("best_acc1", 0.0), position


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run training (or evaluation / inspection of a checkpoint) and return the last epoch's log record."""
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    validate_args(args, mixup_active)
    if args.eval or args.report or args.flops or args.export:
        return evaluate_checkpoint(args)
    if args.compact:
        raise ValueError("--compact converts a trained checkpoint: use it with --eval --resume CHECKPOINT")
    rank, world, device = init_distributed(args)
    is_main = rank == 0
    if args.output_dir:
        args.resume = run_dir.prepare(Path(args.output_dir), args.resume, args.auto_resume, is_main)
    seed_everything(args.seed + rank)
    if args.input_size is None:
        args.input_size = models.default_img_size(args.model)
    data_cfg = datasets.DataConfig.from_args(args)
    sparse_cfg = sparselearning.SparsityConfig.from_args(args)
    token_cfg = models.TokenConfig.from_args(args)
    output_dir = Path(args.output_dir) if args.output_dir else None

    train_loader, val_loader, num_classes = build_loaders(args, data_cfg, rank, world)
    precision = choose_precision(device.type, device_supports_bf16(device), optimizer_supports_fused(args.opt),
                                 args.amp, args.amp_dtype, args.opt_fused)
    vars(args).update(precision.flags())  # config.json and the checkpoint record what was chosen
    amp_dtype = precision.amp_dtype
    model = models.create_model(args.model, num_classes=num_classes, img_size=args.input_size,
                                drop_rate=args.drop, drop_path_rate=args.drop_path)
    models.apply_token_selection(model, token_cfg)  # before the optimizer, EMA and DDP see the parameters
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters())
    if is_main:
        print(f"model {args.model}: {n_parameters:,} parameters; {world} process(es) on {device}; {precision}")

    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else None)
    model_ddp: nn.Module = model
    if world > 1:
        model_ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    if args.compile:
        model_ddp = torch.compile(model_ddp)  # DDP inside: compile splits the graph at its gradient buckets

    steps_per_epoch = len(train_loader)
    optimizer, lr_scheduler = build_optimization(args, model, world)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log_fn = summary.sparsity_logger(output_dir, args.verbose) if is_main else (lambda record: None)
    total_steps = steps_per_epoch * args.epochs
    units = models.structure_units(model, scaler) if sparse_cfg.structured else None
    weight_sparsifier = sparselearning.build_sparsifier(sparse_cfg, model, optimizer, total_steps, seed=args.seed,
                                                        log_fn=log_fn, units=units)
    token_schedule = (models.TokenSchedule(model, token_cfg, total_steps) if token_cfg.enabled
                      else sparselearning.DenseSparsifier())
    sparsifier = combine(weight_sparsifier, token_schedule)
    mixup_fn = None
    if mixup_active:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=num_classes)
    criterion = build_criterion(args, mixup_active)

    state = TrainingState(model, optimizer, lr_scheduler, scaler, sparsifier, model_ema)
    start_epoch, global_step, best_acc1 = args.start_epoch, args.start_epoch * steps_per_epoch, 0.0
    position = None
    if args.resume:
        start_epoch, global_step, best_acc1, position = state.resume(args.resume, args, world, steps_per_epoch, rank)
        if is_main:
            within = f", batch {position['batch']}" if position else ""
            print(f"resumed from {args.resume} at epoch {start_epoch}{within}")
            if start_epoch >= args.epochs:
                print(f"it already completed --epochs {args.epochs}: nothing to train (raise --epochs to go on)")
    if model_ema is not None:
        sparsifier.apply_masks(model_ema.module)  # built from the dense model; an older checkpoint's EMA may be dense

    def save_mid_epoch(epoch: int, batch: int, step: int, loss_sum: float) -> Path | None:
        if output_dir is None:
            return None
        checkpoint = state.checkpoint(epoch, step, best_acc1, gather_rng_states(world), vars(args), total_steps)
        checkpoint["position"] = {"batch": batch, "loss_sum": loss_sum}
        if is_main:
            save_atomic(checkpoint, output_dir / "checkpoint.pth")
        return output_dir / "checkpoint.pth"

    signals = StopSignals()
    stop_hook = StepHook(signals, save_mid_epoch, args.save_every_steps, 1 if world == 1 else args.print_freq,
                         device, is_main)

    ctx = engine.StepContext(optimizer=optimizer, scaler=scaler, sparsifier=sparsifier, amp_dtype=amp_dtype,
                             clip_grad=args.clip_grad, mixup_fn=mixup_fn, model_ema=model_ema,
                             print_freq=args.print_freq, after_step=stop_hook)
    writer = None
    if is_main and output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(json.dumps(vars(args), indent=2, sort_keys=True))
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(output_dir / "tensorboard"))

    record: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        resumed = position is not None and epoch == start_epoch
        first_batch, loss_sum = (position["batch"], position["loss_sum"]) if resumed else (0, 0.0)
        train_loader.sampler.skip_batches(first_batch)
        lr_scheduler.step(epoch)  # before the epoch: epoch e trains at lr(e) (DeiT stepped after, repeating epoch 0)
        try:
            train_stats, global_step = engine.train_one_epoch(model_ddp, criterion, train_loader, ctx, device, epoch,
                                                              global_step, show_progress=is_main,
                                                              first_batch=first_batch, loss_sum=loss_sum)
        except engine.NonFiniteLossError as e:
            signals.restore()
            raise SystemExit(f"error: {e}; {run_dir.last_checkpoint(output_dir)}. Lower --lr, set --clip-grad, or "
                             "use --amp-dtype bfloat16.") from e
        test_stats = engine.evaluate(model_ddp, val_loader, device, amp_dtype)
        record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                  **{f"test_{k}": v for k, v in test_stats.items()}}
        if model_ema is not None:
            ema_stats = engine.evaluate(model_ema.module, val_loader, device, amp_dtype)
            record.update({f"ema_test_{k}": v for k, v in ema_stats.items()})
        record.update(sparsifier.report())
        history.append(record)
        record["n_parameters"], record["n_nonzero_parameters"] = models.count_parameters(
            model, getattr(weight_sparsifier, "masks", None))
        skipped = datasets.take_skipped_count()  # --skip-unreadable-images, this process and its workers
        if skipped:
            record["skipped_unreadable_images"] = skipped
        is_best = test_stats["acc1"] > best_acc1
        best_acc1 = max(best_acc1, test_stats["acc1"])
        if output_dir is not None:
            checkpoint = state.checkpoint(epoch, global_step, best_acc1, gather_rng_states(world), vars(args),
                                          total_steps)
            if is_main:
                save_atomic(checkpoint, output_dir / "checkpoint.pth")
                if is_best:
                    save_atomic(checkpoint, output_dir / "best.pth")
                with open(output_dir / "log.txt", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key, value in record.items():
                        if key != "epoch" and isinstance(value, (int, float)):
                            writer.add_scalar(key, value, epoch)
        if is_main:
            print(f"epoch {epoch}: train loss {train_stats['loss']:.4f}, test top-1 {test_stats['acc1']:.2f}% "
                  f"(best {best_acc1:.2f}%)", flush=True)
        if epoch + 1 < args.epochs:
            stop_hook.after_epoch(epoch, output_dir / "checkpoint.pth" if output_dir else None)
    signals.restore()
    if writer is not None:
        writer.close()
    compact = None
    if sparse_cfg.structured:  # every rank evaluates (the evaluation all-reduces), rank 0 writes
        small = models.compact_model(model, getattr(weight_sparsifier, "masks", None))
        path = None
        if is_main and output_dir is not None:
            path = interop.save_compact(small, args.model, output_dir / "compact.pth", vars(args))
            print_compaction(model, small, path)
        compact = (small, engine.evaluate(small.to(device), val_loader, device, amp_dtype), path)
    if is_main and output_dir is not None and token_cfg.visualize:
        draw_tokens(model, val_loader, token_cfg.visualize, output_dir, device)
    if is_main:
        elapsed = datetime.timedelta(seconds=int(time.time() - start_time))
        where = f"; outputs in {output_dir}" if output_dir else ""
        print(f"training time {elapsed}; final top-1 {record.get('test_acc1', float('nan')):.2f}%{where}")
        final_layers = weight_sparsifier.record("final") if hasattr(weight_sparsifier, "record") else None
        print(summary.format_summary(model, history, output_dir, final_layers, compact), flush=True)
    if is_main and output_dir is not None:
        run_dir.unlock(output_dir)
    return record


def evaluate_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    """--eval / --report / --flops / --export: load any checkpoint safely, say what is really inside it, and
    evaluate, count or export it accordingly. Only --eval touches the data (and the process group)."""
    if args.compact and not args.eval:
        raise ValueError("--compact evaluates the compacted model: use it with --eval --resume CHECKPOINT")
    if args.export and args.resume:
        run_dir.make_dir(args.export, "--export")  # before a long load, not after it
    rank, world, device = init_distributed(args) if args.eval else (0, 1, torch.device(args.device))
    say = print if rank == 0 else (lambda *a, **k: None)
    cli_tokens = models.TokenConfig.from_args(args)
    contents = None
    if args.resume:
        contents, detection, tokens, model = load_for_evaluation(args, cli_tokens, say)
        model_name = contents.architecture["model"] if contents.architecture else args.model
        if args.compact and not detection.structured:
            raise ValueError(f"--compact removes pruned heads and neurons, but {args.resume} has none "
                             "(it is not structured-sparse)")
        if args.input_size not in (None, detection.img_size):
            raise ValueError(f"{args.resume} was trained at {detection.img_size} px (its position embedding); pass "
                             f"--input-size {detection.img_size} or leave it out")
        args.input_size = detection.img_size
        reference = None
        if detection.compact:
            with torch.device("meta"):
                reference = models.create_model(model_name.removesuffix("_data"), num_classes=detection.num_classes,
                                                img_size=detection.img_size)
        macs = models.mac_report(model, reference=reference)
    else:
        if args.report or args.export or args.compact:
            raise ValueError("--report, --export and --compact read a checkpoint: pass --resume FILE")
        model_name, tokens = args.model, cli_tokens
        model, densities, reference = planned_model(args, tokens)
        macs = models.mac_report(model, densities, reference)
    if args.flops or args.report or args.eval:
        say("\n".join(macs))
    if args.export and rank == 0:
        paths = interop.export_model(model, model_name, tokens, args.export)
        say(interop.export_message(paths))
    if not args.eval:
        return {}

    data_cfg = datasets.DataConfig.from_args(args)
    val_loader, num_classes = build_val_loader(args, data_cfg, rank, world)
    if contents is not None and num_classes != detection.num_classes:
        raise ValueError(f"{args.resume} classifies {detection.num_classes} classes but --data-set {args.data_set} "
                         f"has {num_classes}; evaluate it on the dataset it was trained for")
    amp_dtype = choose_precision(device.type, device_supports_bf16(device), False, args.amp, args.amp_dtype).amp_dtype
    stats = {f"test_{k}": v for k, v in engine.evaluate(model.to(device), val_loader, device, amp_dtype).items()}
    if contents is not None and contents.ema is not None:
        ema = interop.build_model(dataclasses.replace(contents, state_dict=contents.ema), detection, model_name,
                                  tokens)
        stats.update({f"ema_test_{k}": v for k, v in engine.evaluate(ema.to(device), val_loader, device,
                                                                     amp_dtype).items()})
    say(f"Accuracy of {args.resume or args.model} on {stats['test_images']} images: top-1 "
        f"{stats['test_acc1']:.2f}% top-5 {stats['test_acc5']:.2f}% loss {stats['test_loss']:.4f}"
        + (f" (EMA top-1 {stats['ema_test_acc1']:.2f}%)" if "ema_test_acc1" in stats else ""))
    if tokens.visualize and rank == 0:
        draw_tokens(model, val_loader, tokens.visualize, Path(args.output_dir or Path(args.resume).parent), device)
    if args.compact:
        compact = models.compact_model(model, contents.masks or None)  # the zero pattern when no masks are stored
        compact_stats = engine.evaluate(compact.to(device), val_loader, device, amp_dtype)
        stats.update({f"compact_test_{k}": v for k, v in compact_stats.items()})
        if rank == 0:
            target = Path(args.output_dir or Path(args.resume).parent) / "compact.pth"
            run_args = {**contents.args, **tokens.as_flags()}  # the selection it was evaluated with
            print_compaction(model, compact, interop.save_compact(compact, model_name, target, run_args))
            print(f"compact model: top-1 {compact_stats['acc1']:.2f}% (masked model {stats['test_acc1']:.2f}%)")
    return stats


def load_for_evaluation(args: argparse.Namespace, cli_tokens: models.TokenConfig, say):
    """Read --resume, detect what it is, print the findings (and with --report the per-layer table), and build it.

    Returns (contents, detection, token config, model).
    """
    contents = interop.read_checkpoint(args.resume)
    model_name = contents.architecture["model"] if contents.architecture else args.model
    if contents.architecture is None:
        interop.check_fits(contents.state_dict, args.model)
    detection = interop.detect(contents.state_dict, model_name)
    tokens = interop.resolve_tokens(contents, detection, cli_tokens)
    model = interop.build_model(contents, detection, model_name, tokens)
    rows = interop.audit_layers(contents)
    say("\n".join(interop.describe(contents) + [f"found {line}" for line in detection.lines()]
                  + [interop.token_summary(tokens, model)]))
    if args.report:
        say(interop.format_audit(rows))
    for warning in interop.audit_warnings(contents, detection, rows):
        say(f"WARNING: {warning}")
    return contents, detection, tokens, model


def planned_model(args: argparse.Namespace, tokens: models.TokenConfig
                  ) -> tuple[nn.Module, dict[str, float] | None, nn.Module | None]:
    """--flops without a checkpoint: --model as the sparsity and token flags would make it.

    Returns (model, per-weight densities, full-size reference) for ``models.mac_report``. Unstructured flags give
    the initial layer densities (ERK, uniform, ...); structured flags give the compact model with
    int(heads * atten_density) heads and int(hidden * other_density) neurons per block.
    """
    num_classes = {"IMNET": 1000, "DIGITS": datasets.DIGITS_NUM_CLASSES,
                   **{name: n for name, (_, n) in datasets.CIFAR_CLASSES.items()}}.get(args.data_set, 1000)
    model = models.create_model(args.model, num_classes=num_classes, img_size=args.input_size)
    models.apply_token_selection(model, tokens)
    sparse = sparselearning.SparsityConfig.from_args(args)
    if sparse.structured:
        full = model
        model = models.compact_model(full, models.random_unit_masks(full, sparse.atten_density,
                                                                    sparse.other_density, args.seed))
        return model, None, full
    densities = None
    if sparse.density is not None and sparse.density < 1:
        shapes = {name: tuple(p.shape) for name, p in
                  sparselearning.select_parameters(model, sparse.sparse_include, sparse.sparse_exclude).items()}
        densities = sparselearning.layer_densities(shapes, sparse.density, sparse.sparse_init,
                                                   erk_power=sparse.erk_power)
    return model, densities, None


def print_compaction(model: nn.Module, compact: nn.Module, path: Path) -> None:
    """Params and MACs of a compacted structured model against the dense model it came from."""
    dense, small = models.mac_summary(model), models.mac_summary(compact)
    arch = models.architecture(compact)
    print(f"compact model written to {path}: heads per block {arch['block_heads']}, "
          f"MLP widths {arch['block_mlp_hidden']}\n"
          f"  params {small['params']:,.0f} vs dense {dense['params']:,.0f} ({small['params'] / dense['params']:.3f}x); "
          f"GMACs {small['gmacs_executed']:.4f} vs dense {dense['gmacs_dense']:.4f} "
          f"({small['gmacs_executed'] / dense['gmacs_dense']:.3f}x)")


def draw_tokens(model: nn.Module, val_loader, count: int, output_dir: Path, device: torch.device) -> list[Path]:
    """--visualize-tokens: the first ``count`` validation images with their dropped patches greyed out."""
    images = torch.stack([val_loader.dataset[i][0] for i in range(count)]).to(device)
    written = models.visualize_tokens(model, images, output_dir / "tokens" / "val")
    print(f"token selection pictures: {len(written)} PNGs in {output_dir / 'tokens'}")
    return written


def gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG state (ranks draw different augmentations), so a resume restores each one."""
    local = rng_state()
    if world == 1:
        return [local]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, local)
    return states


if __name__ == "__main__":
    parsed = recipes.parse_args(get_args_parser(), sys.argv[1:])
    try:
        exit_code = cli.run(main, parsed)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    raise SystemExit(exit_code)
