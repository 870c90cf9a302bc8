"""Evaluate, inspect, compact and export checkpoints: the second program beside main.py, which trains.

Any checkpoint is loaded safely (``weights_only``) and first told apart: what was trained, with which sparsity and
token selection, and whether its stored masks agree with its weights. ``main.py --eval`` (and ``--report``,
``--flops``, ``--export``, ``--compact``) runs this program, as the original SViTE's scripts call it that way.

    python checkpoint_tool.py --eval --resume out/checkpoint.pth --data-set DIGITS      # top-1, top-5, loss
    python checkpoint_tool.py --report --resume out/checkpoint.pth                       # what it holds
    python checkpoint_tool.py --flops --model deit_small_patch16_224 --density 0.4       # counts of a planned model
    python checkpoint_tool.py --export out/export --resume out/checkpoint.pth            # safetensors + config
    python checkpoint_tool.py --eval --compact --resume out/checkpoint.pth               # structured: compact.pth
    python checkpoint_tool.py --eval --resume out/checkpoint.pth --tome-r 2              # with token merging (ToMe)
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import datasets
import engine
import interop
import models
import sparselearning
from training import cli, flags, preflight, process, run_dir
from training.amp import choose_precision, device_supports_bf16
from training.artifacts import draw_tokens, print_compaction
from training.loaders import LoaderConfig, build_val_loader


def get_args_parser() -> argparse.ArgumentParser:
    """The flags that matter for a checkpoint: main.py's groups for it, without the training ones."""
    parser = argparse.ArgumentParser("SViTE checkpoint tool: evaluate, inspect, compact and export checkpoints",
                                     add_help=True, conflict_handler="resolve")
    return flags.add_flags(parser, training=False)


def asked_for(args: argparse.Namespace) -> bool:
    """Whether the command line asks for a checkpoint operation (main.py then hands over to this program)."""
    return bool(args.eval or args.report or args.flops or args.export or args.compact)


def check_request(args: argparse.Namespace) -> None:
    """The checks of --eval and --visualize-tokens that hold before anything is read."""
    preflight.check_eval(args)
    if args.semi_structured and (args.compact or not args.eval):
        raise ValueError("--semi-structured evaluates with 2:4 sparse kernels: use it with --eval --resume CHECKPOINT "
                         "(not with --compact, which removes whole heads and neurons)")
    if args.visualize_tokens and not args.eval and (args.report or args.flops or args.export):
        raise ValueError("--visualize-tokens draws validation images: use it when training or with --eval")
    if args.visualize_tokens and not (args.output_dir or (args.eval and args.resume)):
        raise ValueError("--visualize-tokens writes PNGs into --output_dir (with --eval --resume, next to the "
                         "checkpoint by default); pass --output_dir DIR")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """checkpoint_tool.py's flags checked, then ``run``."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive, got {args.batch_size}")
    preflight.check_device(args.device)
    check_request(args)
    return run(args)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """--eval / --report / --flops / --export: load any checkpoint safely, say what is really inside it, and
    evaluate, count or export it accordingly. Only --eval touches the data (and the process group)."""
    if not (args.eval or args.report or args.flops or args.export):
        if args.compact:
            raise ValueError("--compact converts a trained checkpoint: use it with --eval --resume CHECKPOINT")
        raise ValueError("nothing to do: pass --eval, --report, --flops or --export (with --resume CHECKPOINT)")
    if args.compact and not args.eval:
        raise ValueError("--compact evaluates the compacted model: use it with --eval --resume CHECKPOINT")
    if args.export and args.resume:
        run_dir.make_dir(args.export, "--export")  # before a long load, not after it
    proc = process.init_distributed(args.device, args.dist_url) if args.eval else process.Process(
        0, 1, torch.device(args.device))
    say = proc.say
    cli_tokens = models.TokenConfig.from_args(args)
    cli_merge = models.MergeConfig.from_args(args)
    contents = None
    if args.resume:
        contents, detection, tokens, model = load_for_evaluation(args, cli_tokens, say)
        merge = cli_merge if cli_merge.enabled else models.MergeConfig.recorded(contents.args)  # --tome-r 0: off
        models.apply_token_merging(model, merge)
        say(models.merge_summary(model))
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
        model_name, tokens, merge = args.model, cli_tokens, cli_merge
        model, densities, reference = planned_model(args, tokens)
        models.apply_token_merging(model, merge)
        macs = models.mac_report(model, densities, reference)
    if args.flops or args.report or args.eval:
        say("\n".join(macs))
    if args.export and proc.is_main:
        nm = contents.args.get("nm") if contents.args.get("sparse_init") == "nm" else None  # --export needs --resume
        paths = interop.export_model(model, model_name, tokens, args.export, masks=contents.masks, nm=nm)
        say(interop.export_message(paths))
    if not args.eval:
        return {}

    data_cfg = datasets.DataConfig.from_args(args)
    loader_cfg = LoaderConfig(args.batch_size, args.num_workers, args.pin_mem, seed=args.seed)
    val_loader, num_classes = build_val_loader(data_cfg, loader_cfg, proc.rank, proc.world)
    if contents is not None and num_classes != detection.num_classes:
        raise ValueError(f"{args.resume} classifies {detection.num_classes} classes but --data-set {args.data_set} "
                         f"has {num_classes}; evaluate it on the dataset it was trained for")
    device = proc.device
    amp_dtype = choose_precision(device.type, device_supports_bf16(device), False, args.amp, args.amp_dtype).amp_dtype
    if args.semi_structured:
        say(models.to_semi_structured(model.to(device), amp_dtype or torch.float32).summary())
    stats = {f"test_{k}": v for k, v in engine.evaluate(model.to(device), val_loader, device, amp_dtype).items()}
    if contents is not None and contents.ema is not None:
        ema = interop.build_model(dataclasses.replace(contents, state_dict=contents.ema), detection, model_name,
                                 tokens)
        models.apply_token_merging(ema, merge)
        stats.update({f"ema_test_{k}": v for k, v in engine.evaluate(ema.to(device), val_loader, device,
                                                                     amp_dtype).items()})
    say(f"Accuracy of {args.resume or args.model} on {stats['test_images']} images: top-1 "
        f"{stats['test_acc1']:.2f}% top-5 {stats['test_acc5']:.2f}% loss {stats['test_loss']:.4f}"
        + (f" (EMA top-1 {stats['ema_test_acc1']:.2f}%)" if "ema_test_acc1" in stats else ""))
    if tokens.visualize and proc.is_main:
        draw_tokens(model, val_loader, tokens.visualize, Path(args.output_dir or Path(args.resume).parent), device)
    if args.compact:
        compact = models.compact_model(model, contents.masks or None)  # the zero pattern when no masks are stored
        models.apply_token_merging(compact, merge)
        compact_stats = engine.evaluate(compact.to(device), val_loader, device, amp_dtype)
        stats.update({f"compact_test_{k}": v for k, v in compact_stats.items()})
        if proc.is_main:
            target = Path(args.output_dir or Path(args.resume).parent) / "compact.pth"
            run_args = {**contents.args, **tokens.as_flags()}  # the selection it was evaluated with
            print_compaction(model, compact, interop.save_compact(compact, model_name, target, run_args))
            print(f"compact model: top-1 {compact_stats['acc1']:.2f}% (masked model {stats['test_acc1']:.2f}%)")
    return stats


def load_for_evaluation(args: argparse.Namespace, cli_tokens: models.TokenConfig, say: Callable[..., None]):
    """Read --resume, detect what it is, print the findings (and with --report the per-layer table), and build it.

    Returns (contents, detection, token config, model).
    """
    contents = interop.read_checkpoint(args.resume)
    model_name = contents.architecture["model"] if contents.architecture else args.model
    if contents.architecture is None:
        interop.check_fits(contents.state_dict, args.model)
    detection = interop.detect(contents.state_dict, model_name, contents.architecture)
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
    the initial layer densities (ERK, uniform, ..., N/M of the N:M tensors); structured flags give the compact model
    with int(heads * atten_density) heads and int(hidden * other_density) neurons per block, rounded to a multiple of
    --unit-multiple.
    """
    num_classes = {"IMNET": 1000, "DIGITS": datasets.DIGITS_NUM_CLASSES,
                   **{name: n for name, (_, n) in datasets.CIFAR_CLASSES.items()}}.get(args.data_set, 1000)
    model = models.create_model(args.model, num_classes=num_classes, img_size=args.input_size)
    models.apply_token_selection(model, tokens)
    sparse = sparselearning.SparsityConfig.from_args(args)
    if sparse.structured:
        full = model
        model = models.compact_model(full, models.random_unit_masks(full, sparse.atten_density, sparse.other_density,
                                                                    args.seed, sparse.unit_multiple))
        return model, None, full
    densities = None
    if sparse.nm is not None:
        densities = {name: sparse.density for name in sparselearning.nm_parameters(
            model, sparse.nm_pattern[1], sparse.sparse_include, sparse.sparse_exclude)}
    elif sparse.density is not None and sparse.density < 1:
        shapes = {name: tuple(p.shape) for name, p in
                  sparselearning.select_parameters(model, sparse.sparse_include, sparse.sparse_exclude).items()}
        densities = sparselearning.layer_densities(shapes, sparse.density, sparse.sparse_init,
                                                   erk_power=sparse.erk_power)
    return model, densities, None


if __name__ == "__main__":
    cli.start(main, get_args_parser())
