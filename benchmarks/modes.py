"""Benchmark modes: each builds the model (and, for modes that train through the project, a StepContext, with
main.py's run assembly).

A mode is a `ModeBuilder` registered in `MODES` with `@register_mode`. A setup without a context is
trained by the plain hand-written loop; one with a context goes through `engine.train_one_epoch`. The
`timm` mode is the reference every other mode is measured against.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Protocol

import timm
import torch
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

import engine
import models
import sparselearning
from training.assemble import (ModelConfig, OptimizerConfig, PrecisionConfig, RunConfig, ScheduleConfig,
                               build_optimization, build_run)
from training.loaders import LoaderConfig
from training.process import Process

REFERENCE_MODE = "timm"


@dataclass
class ModeSetup:
    """A model on the device and, when the project's training step is to be measured, its StepContext."""

    model: nn.Module
    ctx: engine.StepContext | None = None


class ModeBuilder(Protocol):
    def __call__(
        self, name: str, *, img_size: int, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None
    ) -> ModeSetup: ...


MODES: dict[str, ModeBuilder] = {}


def register_mode(mode: str) -> Callable[[ModeBuilder], ModeBuilder]:
    """Add a builder to `MODES` under `mode`; a name can be taken only once."""

    def add(builder: ModeBuilder) -> ModeBuilder:
        if mode in MODES:
            raise ValueError(f"benchmark mode {mode!r} is already registered")
        MODES[mode] = builder
        return builder

    return add


def build_optimizer(model: nn.Module, batch_size: int) -> torch.optim.Optimizer:
    """main.py's default optimizer: timm AdamW with DeiT's no-weight-decay groups and linearly scaled lr."""
    return build_optimization(OptimizerConfig(), ScheduleConfig(warmup_epochs=0), model, batch_size)[0]


def _project_setup(name: str, *, img_size: int | None, batch_size: int, device: torch.device,
                   amp_dtype: torch.dtype | None, model: nn.Module | None = None,
                   sparsity: sparselearning.SparsityConfig | None = None,
                   tokens: models.TokenConfig | None = None, merge: models.MergeConfig | None = None) -> ModeSetup:
    """A run assembled as main.py assembles it (``training.assemble.build_run``) with the benchmark's settings:
    main.py's default optimizer, no EMA, mixup or lr warm-up, the unfused optimizer kernel, and batches fed by the
    caller. The topology never updates within the timed steps (benchmarks/sparse_costs.py times updates)."""
    amp = None if amp_dtype is None else str(amp_dtype).removeprefix("torch.")
    cfg = RunConfig(model=ModelConfig(name, img_size=img_size), loader=LoaderConfig(batch_size),
                    total_steps=10**9, schedule=ScheduleConfig(warmup_epochs=0),
                    precision=PrecisionConfig(amp=amp_dtype is not None, amp_dtype=amp, opt_fused=False),
                    sparsity=sparsity, tokens=tokens or models.TokenConfig(), merge=merge or models.MergeConfig())
    run = build_run(cfg, Process(0, 1, device), model=model, log_fn=lambda record: None)
    return ModeSetup(run.model, run.step_context())


@register_mode(REFERENCE_MODE)
def build_timm(
    name: str, *, img_size: int, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None
) -> ModeSetup:
    """Bare timm: `timm.create_model` for DeiT names, timm's VisionTransformer class for the small configs.

    A token-selection name (`*_data`) gets its unpatched DeiT, the baseline that the selector must beat.
    """
    torch.manual_seed(0)
    if name in models.DATA_MODELS:
        name = name.removesuffix("_data")
    if name in models.DEIT_MODELS:
        model = timm.create_model(name, pretrained=False, img_size=img_size)
    elif name in models.SMALL_MODELS:
        model = VisionTransformer(**{**models.SMALL_MODELS[name], "img_size": img_size})
    elif name in models.SMALL_DISTILLED:
        config = models.SMALL_MODELS[name.removesuffix("_distilled")]
        model = VisionTransformerDistilled(**{**config, "img_size": img_size})
    else:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(models.MODEL_NAMES)}")
    return ModeSetup(model.to(device))


@register_mode("dense")
def build_dense(
    name: str, *, img_size: int, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None
) -> ModeSetup:
    """The project's dense training: the model and StepContext that main.py's run assembly builds."""
    torch.manual_seed(0)
    return _project_setup(name, img_size=img_size, batch_size=batch_size, device=device, amp_dtype=amp_dtype)


@register_mode("masked50")
def build_masked(
    name: str, *, img_size: int, batch_size: int, device: torch.device, amp_dtype: torch.dtype | None
) -> ModeSetup:
    """SViTE unstructured at density 0.5 (ERK), timed between topology updates: the mask-enforcing hook only."""
    torch.manual_seed(0)
    # ΔT far beyond the timed steps: this mode measures the per-step cost; benchmarks/sparse_costs.py times updates.
    sparsity = sparselearning.SparsityConfig(density=0.5, sparse_init="ERK", update_frequency=10**8)
    return _project_setup(name, img_size=img_size, batch_size=batch_size, device=device, amp_dtype=amp_dtype,
                          sparsity=sparsity)


UNIT_MULTIPLES = (1, 8, 16, 32, 64)
"""The MLP-width multiples the ``compact_m<N>`` modes measure (``--unit-multiple N``, benchmarks/unit_multiple.py).
``compact`` keeps the paper's exact counts (``compact_m1``), as the recorded suites measured it; ``compact_aligned``
is what the default ``--unit-multiple`` trains."""


def _compact_mode(unit_multiple: int | str) -> ModeBuilder:
    def build(name: str, *, img_size: int, batch_size: int, device: torch.device,
              amp_dtype: torch.dtype | None) -> ModeSetup:
        torch.manual_seed(0)
        model = models.random_compact_model(name, 0.7, 0.6, unit_multiple=unit_multiple)
        return _project_setup(name, img_size=img_size, batch_size=batch_size, device=device, amp_dtype=amp_dtype,
                              model=model)

    build.__doc__ = ('S²ViTE at the original\'s "40%" setting (0.7 of the heads, 0.6 of the MLP neurons), physically '
                     f"compacted, MLP widths kept in multiples of --unit-multiple {unit_multiple}")
    return build


register_mode("compact")(_compact_mode(1))
register_mode("compact_aligned")(_compact_mode(sparselearning.SparsityConfig().unit_multiple))
for _multiple in UNIT_MULTIPLES:
    register_mode(f"compact_m{_multiple}")(_compact_mode(_multiple))


def _token_drop_mode(ratio: float, mode: str, compact: bool) -> ModeBuilder:
    def build(name: str, *, img_size: int, batch_size: int, device: torch.device,
              amp_dtype: torch.dtype | None) -> ModeSetup:
        torch.manual_seed(0)
        model = models.random_compact_model(name, 0.7, 0.6, unit_multiple=1) if compact else None
        return _project_setup(name, img_size=img_size, batch_size=batch_size, device=device, amp_dtype=amp_dtype,
                              model=model, tokens=models.TokenConfig(enabled=True, ratio=ratio, mode=mode))

    build.__doc__ = (f"SViTE+ global selector keeping {ratio:.0%} of the tokens, {mode} mode"
                     + (", on the compacted S²ViTE model" if compact else ""))
    return build


for _ratio in (0.5, 0.7, 0.9):
    register_mode(f"drop{int(_ratio * 100)}")(_token_drop_mode(_ratio, "drop", compact=False))
register_mode("zero70")(_token_drop_mode(0.7, "zero", compact=False))
register_mode("compact+drop70")(_token_drop_mode(0.7, "drop", compact=True))


# ToMe's headline setting: r = 13 per block of DeiT at 224 px (197 tokens).
TOME_R, TOME_TOKENS = 13, 197


def tome_r13(model: VisionTransformer) -> tuple[int, ...]:
    """ToMe's r = 13 as the same fraction of the sequence: round-half-up(13 N / 197) per block (13 for DeiT at 224)."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    return (int(TOME_R * n / TOME_TOKENS + 0.5),) * len(model.blocks)


def tome_drop70_macs(model: VisionTransformer) -> tuple[int, ...]:
    """The per-block r at drop70's executed MACs (``models.merges_for_macs``)."""
    drop70 = copy.deepcopy(model)
    models.apply_token_selection(drop70, models.TokenConfig(enabled=True, ratio=0.7, mode="drop"))
    return models.merges_for_macs(model, models.count_macs(drop70).total)


def _token_merge_mode(merges_of: Callable[[VisionTransformer], tuple[int, ...]], doc: str) -> ModeBuilder:
    def build(name: str, *, img_size: int, batch_size: int, device: torch.device,
              amp_dtype: torch.dtype | None) -> ModeSetup:
        torch.manual_seed(0)
        model = models.create_model(name, img_size=img_size)  # the dense mode's draws: the same weights
        return _project_setup(name, img_size=img_size, batch_size=batch_size, device=device, amp_dtype=amp_dtype,
                              model=model, merge=models.MergeConfig(r=merges_of(model)))

    build.__doc__ = f"Token merging (ToMe) on the dense model, {doc}"
    return build


register_mode("tome-r13")(_token_merge_mode(tome_r13, tome_r13.__doc__))
register_mode("tome-mac70")(_token_merge_mode(tome_drop70_macs, tome_drop70_macs.__doc__))
