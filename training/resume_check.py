"""Whether a checkpoint may be resumed with this run's flags: a resume continues the same experiment, or stops.

A resumed run loads the optimizer, lr scheduler, masks and RNG states of the run that wrote the checkpoint. A flag
that changes what is trained then either has no effect (the loaded state overrides it, while ``config.json`` records
the new value) or changes the experiment half-way; both make the run's record lie. So the flags that define the
experiment must equal the checkpoint's, and a mismatch stops the run before training with every differing flag
listed as ``old → new``. The one deliberate change is a larger ``--epochs`` (see ``compare``).

The rule, by flag:

- Must match: ``--model``, the data set (``--data-set``, ``--inat-category``, ``--input-size``), the global batch
  (``--batch-size`` × processes) and the optimizer steps per epoch (so the same data in the same batches),
  ``--finetune`` (the weights the run started from; a resume never reads that file again), the
  whole optimizer and lr schedule (``--opt``, ``--lr``, ``--sched``, ... : the loaded optimizer and scheduler states
  would silently override new values), the regularisation and augmentation recipe, ``--clip-grad``, the EMA
  (``--model-ema``, ``--model-ema-decay``), ``--seed`` (it seeds the data order and the lr noise), and ``--epochs``
  unless it grows.
- Must match where they act: the sparsity kind (``--density`` for dense or unstructured, ``--pruning_type``,
  ``--nm``) always; ``--sparse_init``, ``--erk-power``, ``--sparse-include``, ``--sparse-exclude``, ``--nm-method``,
  ``--srste-decay`` for unstructured runs (N:M runs are unstructured);
  ``--atten_density``, ``--other_density``, ``--structure-compat``, ``--unit-multiple`` for structured runs;
  ``--target-macs``, ``--prune-every``, ``--prune-units``, ``--target-latency``, ``--latency-lambda``,
  ``--latency-table``, ``--prune-head-dim``, ``--compact-at-budget`` for global pruning; the topology schedule and
  criteria (``--update_frequency``, ``--growth``, ``--death``, ``--redistribution``, ``--death-rate``,
  ``--decay-schedule``, ``--t_end``) and ``--mask-init`` for both; ``--token_selection`` always and the
  token settings (``--token_number``, ``--token-ratio``, ``--token-selector``, ``--token-mode``, ``--tau-schedule``,
  ``--eval-noise``) when it is on; the token merging (``--tome-r``, ``--tome-schedule``) always; ``--distillation-type``
  always and the teacher (``--teacher-model``, ``--teacher-path``, ``--teacher-topk``, ``--teacher-topk-k``,
  ``--distillation-alpha``, ``--distillation-tau``) when it distils: the teacher is not in the checkpoint, it is loaded
  again from these flags. A flag the run ignores (``--density`` of a structured run) may differ.
- May differ (``RUNTIME_FLAGS``): where and how the run executes and what it prints or writes, not what it computes:
  ``--output_dir``, ``--device``, ``--amp``, ``--amp-dtype``, ``--opt-fused``, ``--compile``, ``--num_workers``,
  ``--pin-mem``, ``--data-path`` (the same data moved; a different set changes the steps per epoch), ``--skip-unreadable-images``,
  ``--print-freq``, ``--verbose``, ``--tensorboard``, ``--visualize-tokens``, ``--save-every-steps``,
  ``--model-ema-force-cpu``, ``--dist_url``, ``--atten_head`` (checked against ``--model``), and the mode flags
  (``--resume``, ``--auto-resume``, ``--start_epoch``, ``--eval``, ...).

Every flag of ``main.py`` is in ``EXPERIMENT_FLAGS`` or ``RUNTIME_FLAGS`` (a test checks it); a flag in neither
must match, since refusing is the safe default. Flags that a checkpoint does not record (it predates them) are not
compared.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

RUNTIME_FLAGS = frozenset({
    "output_dir", "device", "amp", "amp_dtype", "opt_fused", "compile", "num_workers", "pin_mem", "data_path",
    "skip_unreadable_images", "print_freq", "verbose", "tensorboard", "visualize_tokens", "save_every_steps",
    "model_ema_force_cpu", "dist_url", "atten_head",
    "resume", "auto_resume", "start_epoch", "eval", "compact", "report", "flops", "export", "save_teacher_topk",
    "semi_structured",
})
"""Flags (argparse dests) that may differ between a checkpoint and its resumed run."""

EXPERIMENT_FLAGS = frozenset({
    "epochs", "batch_size", "model", "drop", "drop_path", "model_ema", "model_ema_decay",
    "opt", "opt_eps", "opt_betas", "clip_grad", "momentum", "weight_decay",
    "sched", "lr", "lr_noise", "lr_noise_pct", "lr_noise_std", "warmup_lr", "min_lr", "decay_epochs", "warmup_epochs",
    "decay_rate", "smoothing", "repeated_aug", "mixup", "cutmix", "cutmix_minmax", "mixup_prob", "mixup_switch_prob",
    "mixup_mode", "data_set", "inat_category", "input_size", "color_jitter", "aa", "train_interpolation", "hflip",
    "reprob", "remode", "recount", "seed", "finetune",
    "density", "sparse_init", "update_frequency", "growth", "death", "redistribution", "death_rate", "decay_schedule",
    "t_end", "sparse_exclude", "sparse_include", "erk_power", "pruning_type", "mask_init", "nm", "nm_method",
    "srste_decay", "atten_density", "other_density", "structure_compat", "unit_multiple", "target_macs", "prune_every",
    "prune_units", "target_latency", "latency_lambda", "latency_table", "prune_head_dim", "compact_at_budget",
    "token_selection", "token_number", "token_ratio", "token_selector", "token_mode", "tau_schedule", "eval_noise",
    "distillation_type", "teacher_model", "teacher_path", "distillation_alpha", "distillation_tau",
    "teacher_topk", "teacher_topk_k",
    "tome_r", "tome_schedule",
})
"""Flags (argparse dests) that must match; the sparsity and token ones only where they act (``compare``)."""

KIND_FLAGS = ("density", "pruning_type", "nm", "token_selection", "distillation_type")
"""Flags that choose what kind of sparsity a run has; compared whenever either run uses them."""

_SPARSE_FLAGS = frozenset({"update_frequency", "growth", "death", "redistribution", "death_rate", "decay_schedule",
                           "t_end", "mask_init"})
_UNSTRUCTURED_FLAGS = frozenset({"density", "sparse_init", "erk_power", "sparse_include", "sparse_exclude", "nm",
                                 "nm_method", "srste_decay"})
_GLOBAL_FLAGS = frozenset({"target_macs", "prune_every", "prune_units", "target_latency", "latency_lambda",
                           "latency_table", "prune_head_dim", "compact_at_budget"})
_STRUCTURED_FLAGS = frozenset({"atten_density", "other_density", "structure_compat", "unit_multiple"})
_TOKEN_FLAGS = frozenset({"token_number", "token_ratio", "token_selector", "token_mode", "tau_schedule", "eval_noise"})
_TEACHER_FLAGS = frozenset({"teacher_model", "teacher_path", "distillation_alpha", "distillation_tau", "teacher_topk",
                            "teacher_topk_k"})

GLOBAL_BATCH = "global_batch"
STEPS_PER_EPOCH = "steps_per_epoch"
_DERIVED_NAMES = {GLOBAL_BATCH: "global batch (--batch-size × processes)",
                  STEPS_PER_EPOCH: "optimizer steps per epoch (the training set's size / global batch)"}


def run_settings(args: Mapping[str, Any], world_size: int, steps_per_epoch: int) -> dict[str, Any]:
    """The settings a resume compares: the run's flags (``vars(args)``), normalised, with the per-process batch
    replaced by the global batch and the steps per epoch added.

    Normalised: ``--pruning_type structure_new`` is ``structure``, ``--sparse_init fixed_ERK`` is ``ERK`` and
    ``--density 1`` is no density (dense), since each pair trains the same model.
    """
    settings = {k: v for k, v in args.items() if k not in RUNTIME_FLAGS and k != "batch_size"}
    settings[GLOBAL_BATCH] = int(args["batch_size"]) * world_size
    settings[STEPS_PER_EPOCH] = steps_per_epoch
    if settings.get("pruning_type") == "structure_new":
        settings["pruning_type"] = "structure"
    if settings.get("sparse_init") == "fixed_ERK":
        settings["sparse_init"] = "ERK"
    if settings.get("density") is not None and settings["density"] >= 1.0:
        settings["density"] = None
    return settings


def saved_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``run_settings`` of the run that wrote a training checkpoint.

    The process count is the number of RNG states it saved (one per rank). Its steps per epoch come from its
    recorded ``total_steps``; a checkpoint written before that was recorded was written at the end of an epoch, so
    its optimizer steps divided by the epochs done give them.
    """
    lacking = [key for key in ("args", "epoch", "step", "rng") if key not in checkpoint]
    if lacking:
        raise ValueError(f"the checkpoint lacks {', '.join(lacking)}, so it was not written by this project's "
                         "training and cannot be resumed; evaluate it with --eval")
    args = checkpoint["args"]
    args = args if isinstance(args, Mapping) else vars(args)
    if "total_steps" in checkpoint:
        steps_per_epoch = int(checkpoint["total_steps"]) // int(args["epochs"])
    else:
        steps_per_epoch = int(checkpoint["step"]) // (int(checkpoint["epoch"]) + 1)
    return run_settings(args, len(checkpoint["rng"]), steps_per_epoch)


def _kind(settings: Mapping[str, Any]) -> str:
    if settings.get("pruning_type") == "structure":
        return "structured"
    if settings.get("pruning_type") == "global":
        return "global"
    nm = settings.get("sparse_init") == "nm"  # its density is N/M, given by --nm
    return "dense" if settings.get("density") is None and not nm else "unstructured"


def _acts(flag: str, settings: Mapping[str, Any]) -> bool:
    """Whether ``flag`` changes what a run with ``settings`` trains."""
    kind = _kind(settings)
    if flag in _UNSTRUCTURED_FLAGS:
        return kind in ("unstructured", "dense") if flag == "density" else kind == "unstructured"
    if flag in _STRUCTURED_FLAGS:
        return kind == "structured" or (flag == "unit_multiple" and kind == "global")
    if flag in _GLOBAL_FLAGS:
        return kind == "global"
    if flag in _SPARSE_FLAGS:
        return kind in ("structured", "unstructured")
    if flag in _TOKEN_FLAGS:
        return bool(settings.get("token_selection"))
    if flag in _TEACHER_FLAGS:
        return settings.get("distillation_type", "none") != "none"
    return True


def compare(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[tuple[str, Any, Any]], bool]:
    """The resume rule over two ``run_settings``: (differing settings as (name, saved, current), extends).

    ``extends`` is True when ``--epochs`` grows and nothing else differs: the run then continues as if it had been
    started with the new ``--epochs``. Its lr, death-rate and Gumbel-temperature schedules and ``t_end`` all follow
    the new total steps from the resumed step on (each is a function of (step, total steps)), so the first epochs
    keep the values they had and the rest follow the longer run. A smaller ``--epochs`` is a difference.
    """
    differing = []
    for name, new in current.items():
        if name not in saved:
            continue  # the checkpoint predates this flag
        old = saved[name]
        relevant = (_acts(name, saved) or _acts(name, current)) if name in KIND_FLAGS else (
            _acts(name, saved) and _acts(name, current))
        if relevant and old != new:
            differing.append((name, old, new))
    if any(name == GLOBAL_BATCH for name, _, _ in differing):  # then the steps per epoch differ as a consequence
        differing = [d for d in differing if d[0] != STEPS_PER_EPOCH]
    epochs = [d for d in differing if d[0] == "epochs"]
    extends = bool(epochs) and epochs[0][2] > epochs[0][1]
    if extends:
        differing = [d for d in differing if d[0] != "epochs"]
    return differing, extends and not differing


def _show(value: Any) -> str:
    if value is None:
        return "not set"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], path: str,
                 flag_names: Mapping[str, str]) -> int | None:
    """Apply ``compare``; returns the checkpoint's ``--epochs`` when this run extends it, else None.

    Raises:
        ValueError: listing every differing flag as ``old → new`` and the two ways to proceed.
    """
    differing, extends = compare(saved, current)
    if differing:
        lines = [f"  {flag_names.get(name) or _DERIVED_NAMES.get(name, name)}: {_show(old)} → {_show(new)}"
                 for name, old, new in differing]
        raise ValueError(
            f"{path} belongs to a run with other settings, and resuming would mix two experiments:\n"
            + "\n".join(lines)
            + "\nTo continue that run, resume with the checkpoint's values (its 'args' record them; only a larger "
              "--epochs may differ). To train with the new values, start a new run without --resume in a new "
              "--output_dir.")
    return saved["epochs"] if extends else None


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the flag as a user types it (``batch_size`` -> ``--batch-size``; ``model_ema`` -> ``--model-ema``,
    the first of the flags that set it)."""
    names: dict[str, str] = {}
    for action in parser._actions:  # argparse has no public listing of its actions
        if action.option_strings:
            names.setdefault(action.dest, action.option_strings[0])
    return names
