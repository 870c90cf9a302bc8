"""DIGITS recipe defaults: applied only to flags not given, printed, recorded; --help shows every default."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

import main
from conftest import run_main
from training import recipes


def parse(*argv: str) -> argparse.Namespace:
    parser = main.get_args_parser()
    args = parser.parse_args(argv)
    recipes.apply_recipe(args, recipes.given_flags(parser, argv))
    return args


def test_digits_recipe_fills_only_flags_not_given() -> None:
    args = parse("--data-set", "DIGITS", "--lr", "0.02", "--no-model-ema", "--mixup", "0.5")
    assert args.lr == 0.02 and args.mixup == 0.5 and args.model_ema is False  # given: kept
    assert (args.hflip, args.aa, args.cutmix, args.repeated_aug, args.epochs) == (0.0, "none", 0.0, False, 60)
    assert "lr" not in args.recipe_defaults and "mixup" not in args.recipe_defaults
    assert args.recipe_defaults["hflip"] == 0.0
    assert args.pin_mem is False  # resolved for the CPU device: pinning warns without an accelerator


def test_a_given_flag_equal_to_deit_default_still_counts_as_given() -> None:
    args = parse("--data-set", "DIGITS", "--hflip", "0.5", "--repeated-aug")
    assert args.hflip == 0.5 and args.repeated_aug is True


def test_other_datasets_keep_deit_defaults() -> None:
    args = parse("--data-set", "IMNET", "--data-path", "/nowhere")
    default = main.get_args_parser().parse_args([])
    assert args.recipe_defaults == {}
    assert (args.lr, args.mixup, args.hflip, args.epochs) == (default.lr, default.mixup, default.hflip, default.epochs)


def test_help_shows_every_default_and_the_digits_values() -> None:
    parser = main.get_args_parser()
    text = " ".join(parser.format_help().split())
    assert "--lr LR learning rate for a global batch of 512 (scaled linearly) (default: 0.0005; DIGITS: 0.01)" in text
    for action in parser._actions:
        if action.option_strings and action.default is not argparse.SUPPRESS and action.const is not False:
            assert "default" in (action.help or ""), action.option_strings


def test_loader_defaults_fit_this_machine() -> None:
    default = main.get_args_parser().parse_args([])
    assert 1 <= default.num_workers <= min(10, len(os.sched_getaffinity(0)))
    assert default.pin_mem is None  # resolved per device by the recipe step


@pytest.mark.slow
def test_digits_run_prints_and_records_its_recipe_without_loader_warnings(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_main("--model", "vit_digits_micro", "--data-set", "DIGITS", "--epochs", "1", "--batch-size", "32",
                    "--lr", "4e-2", "--print-freq", "1000", "--output_dir", str(out))
    line = next(x for x in proc.stdout.splitlines() if x.startswith("DIGITS recipe defaults"))
    assert "--mixup 0.0" in line and "--hflip 0.0" in line and "--no-repeated-aug" in line
    assert "--lr" not in line and "--epochs" not in line  # given on the command line
    config = json.loads((out / "config.json").read_text())
    assert config["recipe_defaults"]["aa"] == "none" and config["aa"] == "none" and config["pin_mem"] is False
    assert "warn" not in proc.stderr.lower(), proc.stderr
