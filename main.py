"""Train a (sparse) Vision Transformer: the command-line edge of the project.

argparse lives at the edges only (this file, checkpoint_tool.py and training/flags.py). Components receive typed
configs or explicit arguments; the training loop in `engine.py` sees a `Sparsifier`, never a sparsity method's
internals. The checkpoint flags (--eval, --report, --flops, --export, --compact) run checkpoint_tool.py, as the
original SViTE's scripts call them here.

    python main.py --model vit_digits_tiny --data-set DIGITS --output_dir out      # one process
    torchrun --nproc_per_node=8 main.py --model deit_small_patch16_224 ...          # NCCL on GPUs, gloo on CPUs
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

import checkpoint_tool
import models
from interop.checkpoint import load_checkpoint
from training import cli, compaction, flags, loop, preflight, process, run_dir, save_topk, summary
from training.assemble import Run, RunConfig, build_run
from training.resume_check import flag_names


def get_args_parser() -> argparse.ArgumentParser:
    """Every flag: training's, and the checkpoint tool's (so that ``main.py --eval`` works as the original's)."""
    return flags.add_flags(argparse.ArgumentParser("SViTE training and evaluation", add_help=True))


def validate_args(args: argparse.Namespace, mixup_active: bool) -> None:
    """Flag checks that hold before anything is read or built, with the fix in the message."""
    if args.batch_size < 1 or args.epochs < 1:
        raise ValueError(f"--batch-size and --epochs must be positive, got {args.batch_size} and {args.epochs}")
    if mixup_active and args.batch_size % 2:
        raise ValueError(f"mixup/cutmix mixes pairs and needs an even --batch-size, got {args.batch_size}; "
                         "change it or pass --mixup 0 --cutmix 0")
    preflight.check_device(args.device)
    preflight.check_training_flags(args)
    checkpoint_tool.check_request(args)
    if args.finetune and checkpoint_tool.asked_for(args):
        raise ValueError("--finetune starts training from a file's weights; --eval, --report, --flops, --export and "
                         "--compact read the file given with --resume: pass it there")


def main(args: argparse.Namespace, on_run: Callable[[Run], Any] | None = None) -> dict[str, Any]:
    """Run training (or, given a checkpoint flag, checkpoint_tool.py) and return the last epoch's log record;
    ``on_run`` is handed the assembled run before it trains (a caller that needs its model keeps it)."""
    validate_args(args, args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None)
    if checkpoint_tool.asked_for(args):
        return checkpoint_tool.run(args)
    if args.save_teacher_topk:
        return save_topk.run(args)
    proc = process.init_distributed(args.device, args.dist_url)
    if args.output_dir:
        args.resume = run_dir.prepare(Path(args.output_dir), args.resume, args.auto_resume, proc.is_main)
    process.seed_everything(args.seed + proc.rank)
    if args.input_size is None:
        args.input_size = models.default_img_size(args.model)
    cfg = RunConfig.from_args(args)
    if args.finetune and args.resume:
        proc.say(f"--finetune {args.finetune} is not read: the run continues from {args.resume} and its weights")
    output_dir = Path(args.output_dir) if args.output_dir else None
    log_fn = summary.sparsity_logger(output_dir, args.verbose) if proc.is_main else (lambda record: None)
    run = build_run(cfg, proc, log_fn=log_fn, say=proc.say)
    if on_run is not None:
        on_run(run)
    vars(args).update(run.precision.flags())  # config.json and the checkpoint record what was chosen
    start = loop.Start(args.start_epoch, args.start_epoch * run.steps_per_epoch)
    if args.resume:
        ckpt = load_checkpoint(args.resume, map_location="cpu")
        compaction.restore(run, ckpt)  # written after --compact-at-budget compacted: the run is the compact model
        start = loop.Start(*run.state().resume(args.resume, args, proc.world, run.steps_per_epoch, proc.rank,
                                               flag_names(get_args_parser()), ckpt))
        within = f", batch {start.position['batch']}" if start.position else ""
        proc.say(f"resumed from {args.resume} at epoch {start.epoch}{within}")
        if start.epoch >= args.epochs:
            proc.say(f"it already completed --epochs {args.epochs}: nothing to train (raise --epochs to go on)")
    if run.model_ema is not None:
        run.sparsifier.apply_masks(run.model_ema.module)  # built from the dense model; an older EMA may be dense
    return loop.train(run, loop.LoopConfig(
        epochs=args.epochs, output_dir=output_dir, flags=vars(args), model_name=args.model,
        print_freq=args.print_freq, save_every_steps=args.save_every_steps, tensorboard=args.tensorboard,
        structured=cfg.sparsity.structured or cfg.sparsity.pruning_type == "global", visualize_tokens=cfg.tokens.visualize), start)


if __name__ == "__main__":
    cli.start(main, get_args_parser())
