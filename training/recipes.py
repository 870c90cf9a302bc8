"""Per-dataset recipe defaults: DeiT's ImageNet recipe is main.py's default, and it fails on DIGITS.

DeiT's recipe on the 1,437 8x8 DIGITS training images (lr scaled to 6.25e-5, mixup/cutmix, RandAugment, horizontal
flips of digits, an EMA decay of 0.99996 over ~1,300 steps) reached 20.3% top-1 in 60 epochs. The DIGITS recipe below
reaches 95-97%. It fills only the flags the user did not give, so every flag still overrides it, and it is printed at
start and recorded in config.json (``recipe_defaults``).
"""
from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Sequence
from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "DIGITS": {
        "epochs": 60,
        "lr": 1e-2,  # for a global batch of 512: 1.25e-3 at the default batch of 64
        "warmup_epochs": 3,
        "drop_path": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "reprob": 0.0,
        "aa": "none",
        "color_jitter": 0.0,
        "hflip": 0.0,  # a flipped 2 or 7 is not a 2 or 7
        "repeated_aug": False,
        "model_ema_decay": 0.99,  # ~100-step horizon: 22 steps per epoch, 1,320 in 60 epochs
        "num_workers": 1,  # the images are tiny: one loader process overlaps with training, more only contend
    },
}


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the flags present on the command line: a second parse with every default suppressed."""
    probe = copy.deepcopy(parser)
    probe._defaults.clear()  # set_defaults() values would otherwise look given
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv)))


def apply_recipe(args: argparse.Namespace, given: set[str]) -> dict[str, Any]:
    """Fill ``args`` with its dataset's recipe for the flags not in ``given``; returns what was applied.

    Also resolves ``--pin-mem`` left unset: pinned memory helps only a CUDA device (on CPU torch warns about it).
    The applied values are stored in ``args.recipe_defaults`` so that config.json records them.
    """
    applied = {key: value for key, value in RECIPES.get(args.data_set, {}).items() if key not in given}
    for key, value in applied.items():
        setattr(args, key, value)
    if args.pin_mem is None:
        args.pin_mem = str(args.device).startswith("cuda")
    args.recipe_defaults = applied
    return applied


def flag_text(parser: argparse.ArgumentParser, dest: str, value: Any) -> str:
    """The command-line text that sets ``dest`` to ``value`` (``--lr 0.01``, ``--no-repeated-aug``)."""
    for action in parser._actions:
        if action.dest != dest or not action.option_strings:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            return action.option_strings[0 if value else 1]
        if isinstance(value, bool):
            if action.const is value:
                return action.option_strings[0]
        else:
            return f"{action.option_strings[0]} {value}"
    raise ValueError(f"no flag sets {dest} to {value!r}")


def describe(data_set: str, applied: dict[str, Any], parser: argparse.ArgumentParser) -> str:
    """One line naming the recipe values in force as the flags that would set them."""
    flags = " ".join(flag_text(parser, key, value) for key, value in applied.items())
    return f"{data_set} recipe defaults (flags not given on the command line): {flags}"


def document_defaults(parser: argparse.ArgumentParser) -> None:
    """Make --help show every default: DeiT's, and each recipe's value for the flags it changes.

    Help texts that already explain their default (e.g. one resolved per device) keep their wording.
    """
    for action in parser._actions:
        if (not action.option_strings or argparse.SUPPRESS in (action.default, action.help)
                or action.const is False):
            continue  # --help, hidden flags, and the --no-X half of a store_true/store_false pair
        notes = [] if "default" in (action.help or "") else ["default: %(default)s"]
        notes += [f"{name}: {recipe[action.dest]}" for name, recipe in RECIPES.items() if action.dest in recipe]
        if notes:
            action.help = f"{action.help or ''} ({'; '.join(notes)})".lstrip()


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with the dataset's recipe filled in and printed (by rank 0 only)."""
    args = parser.parse_args(argv)
    # A parser without a recipe's flag (checkpoint_tool.py takes no --lr) keeps it out of the recipe, as if given.
    visible = {action.dest for action in parser._actions if action.help != argparse.SUPPRESS}
    absent = {key for recipe in RECIPES.values() for key in recipe} - visible
    applied = apply_recipe(args, given_flags(parser, argv) | absent)
    if applied and os.environ.get("RANK", "0") == "0":
        print(describe(args.data_set, applied, parser), flush=True)
    return args
