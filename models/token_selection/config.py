"""The token-selection settings (SViTE+) and their command-line flags, checked once where they are parsed."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

SELECTORS = ("global", "layerwise")
MODES = ("zero", "drop")
# ``--token-mode merge``: token merging alone, no selector (models/token_merging); not a selector mode.
MERGE_MODE = "merge"
TAU_SCHEDULES = ("linear", "reversed")


def check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    """Reject a setting outside its choices, naming them (flags and direct construction alike)."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose from {', '.join(choices)}")


@dataclass(frozen=True)
class TokenConfig:
    """Token-selection settings (SViTE+), parsed once from the command line.

    Args:
        enabled: install selectors at all (``--token_selection``).
        num_keep: k, tokens kept over all N tokens including cls (``--token_number``, as SViTE's scripts pass it).
        ratio: fraction of the N tokens to keep, k = round-half-up(ratio * N) (``--token-ratio``).
        selector: ``global``, or ``layerwise`` (the global selector plus one per block, as SViTE's ``_data`` models).
        mode: ``zero`` (SViTE: multiply by the mask) or ``drop`` (gather the kept tokens; saves compute).
        tau_schedule: ``linear`` (10 -> 0.1) or ``reversed`` (0.1 -> 10, as the released checkpoints were trained).
        eval_noise: SViTE's stochastic evaluation (Gumbel noise at test time) instead of the deterministic top-k.
        visualize: number of validation images to draw with their dropped patches greyed out.
    """

    enabled: bool = False
    num_keep: int | None = None
    ratio: float | None = None
    selector: str = "global"
    mode: str = "zero"
    tau_schedule: str = "linear"
    eval_noise: bool = False
    visualize: int = 0

    def __post_init__(self) -> None:
        check_choice("token selector", self.selector, SELECTORS)
        check_choice("token mode", self.mode, MODES)
        check_choice("tau schedule", self.tau_schedule, TAU_SCHEDULES)
        if self.num_keep is not None and self.ratio is not None:
            raise ValueError("give either --token_number (k tokens) or --token-ratio (fraction of tokens), not both")
        k = self.num_keep
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"--token_number must be an int >= 1 (tokens kept, cls included), got {k!r}")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"--token-ratio must be in (0, 1], got {self.ratio!r}")
        if isinstance(self.visualize, bool) or not isinstance(self.visualize, int) or self.visualize < 0:
            raise ValueError(f"--visualize-tokens must be an int >= 0, got {self.visualize!r}")
        if not self.enabled:
            given = [flag for flag, on in (("--token_number", k is not None), ("--token-ratio", self.ratio is not None),
                                           ("--eval-noise", self.eval_noise), ("--visualize-tokens", self.visualize))
                     if on]
            if given:
                raise ValueError(f"{', '.join(given)} need --token_selection")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TokenConfig:
        """From ``add_token_args`` flags; a ``*_data`` ``--model`` implies the layer-wise selector, as in SViTE."""
        layerwise = str(getattr(args, "model", "")).endswith("_data")
        mode = args.token_mode
        if mode == MERGE_MODE:
            if args.token_selection:
                raise ValueError("--token-mode merge merges tokens without a selector; to select, then merge, pass "
                                 "--token_selection --token-mode drop --tome-r R")
            mode = "zero"  # no selector is installed; the merging has its own config
        return cls(
            enabled=args.token_selection, num_keep=args.token_number, ratio=args.token_ratio,
            selector="layerwise" if layerwise else args.token_selector, mode=mode,
            tau_schedule=args.tau_schedule, eval_noise=args.eval_noise, visualize=args.visualize_tokens,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for config.json and checkpoints."""
        return dataclasses.asdict(self)

    def as_flags(self) -> dict[str, Any]:
        """The ``add_token_args`` values that give this config back (how checkpoints record it in ``args``)."""
        return {"token_selection": self.enabled, "token_number": self.num_keep, "token_ratio": self.ratio,
                "token_selector": self.selector, "token_mode": self.mode, "tau_schedule": self.tau_schedule}

    def keep_count(self, num_tokens: int, num_prefix: int = 1) -> int:
        """k for a sequence of ``num_tokens`` tokens (prefix included); all tokens when neither k nor ratio is set.

        Raises:
            ValueError: if k exceeds the token count or keeps no patch token beside the prefix tokens.
        """
        if self.ratio is not None:
            return max(num_prefix, 1, int(self.ratio * num_tokens + 0.5))
        k = num_tokens if self.num_keep is None else self.num_keep
        if 1 <= k <= num_prefix < num_tokens:
            raise ValueError(f"--token_number {k} keeps only the {num_prefix} prefix (cls) token(s) and no image "
                             f"patch; keep at least {num_prefix + 1} of the {num_tokens} tokens")
        if not max(num_prefix, 1) <= k <= num_tokens:
            raise ValueError(f"--token_number {k} must be between {max(num_prefix, 1)} and the {num_tokens} tokens of "
                             f"this model ({num_tokens - num_prefix} patches + {num_prefix} prefix token(s))")
        return k


def add_token_args(parser: argparse.ArgumentParser) -> None:
    """The SViTE+ flags as one argument group (SViTE's underscore names kept where it had them)."""
    g = parser.add_argument_group("token selection (SViTE+)")
    g.add_argument("--token_selection", action="store_true", help="learn which tokens to keep (Gumbel top-k)")
    g.add_argument("--token_number", type=int, default=None,
                   help="k: tokens kept, cls included (SViTE: 187 = 5%% data sparsity at 224 px); default: all")
    g.add_argument("--token-ratio", type=float, default=None, help="fraction of tokens kept, in (0, 1]; or k")
    g.add_argument("--token-selector", default="global", choices=SELECTORS,
                   help="global: before block 0; layerwise: global plus one per block (implied by *_data models)")
    g.add_argument("--token-mode", default="zero", choices=(*MODES, MERGE_MODE),
                   help="zero: multiply dropped tokens by 0 (SViTE); drop: remove them (really saves compute); "
                        "merge: no selector, merge tokens (ToMe, with --tome-r)")
    g.add_argument("--tau-schedule", default="linear", choices=TAU_SCHEDULES,
                   help="Gumbel temperature: linear 10 -> 0.1; reversed 0.1 -> 10 (the released checkpoints)")
    g.add_argument("--eval-noise", action="store_true", help="SViTE's noisy evaluation instead of the plain top-k")
    g.add_argument("--visualize-tokens", type=int, default=0,
                   help="write PNGs of this many validation images with the dropped patches greyed out")
