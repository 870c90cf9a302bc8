"""Two programs behind one door: main.py trains, checkpoint_tool.py reads checkpoints, and ``main.py --eval`` (and
the other checkpoint flags) is the same program; one run assembly (``training.assemble.build_run``) behind main.py,
the benchmarks and the distributed test worker (tests/test_train.py runs it)."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint_tool
import engine
import main
import models
import sparselearning
from benchmarks.modes import MODES
from conftest import ROOT, TINY_RUN
from training import flags, process
from training.assemble import ModelConfig, PrecisionConfig, RunConfig, ScheduleConfig, build_run
from training.distillation import DistillationLoss
from training.loaders import LoaderConfig

MICRO = "vit_digits_micro"


def micro_checkpoint(path: Path) -> Path:
    """A weights-only checkpoint of a randomly initialised micro model with half its block weights zeroed."""
    torch.manual_seed(3)
    model = models.create_model(MICRO, num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("blocks.") and p.dim() == 2:
                p[:, ::2] = 0
    torch.save({"model": model.state_dict()}, path)
    return path


def run_program(script: str, *flags_: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / script), *flags_], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_main_eval_runs_the_checkpoint_tool(tmp_path: Path) -> None:
    """The original's ``main.py --eval`` and ``checkpoint_tool.py --eval``: same findings, same accuracy, exit 0."""
    path = micro_checkpoint(tmp_path / "w.pth")
    flags_ = ("--model", MICRO, "--data-set", "DIGITS", "--batch-size", "32", "--num_workers", "0", "--eval",
              "--resume", str(path))
    through_main, tool = run_program("main.py", *flags_), run_program("checkpoint_tool.py", *flags_)
    assert through_main.returncode == tool.returncode == 0, through_main.stderr + tool.stderr
    accuracy = re.compile(r"Accuracy of .* on 360 images: top-1 [\d.]+% top-5 [\d.]+% loss [\d.]+")
    assert accuracy.search(through_main.stdout).group(0) == accuracy.search(tool.stdout).group(0)
    findings = [line for line in through_main.stdout.splitlines() if "recipe defaults" not in line]
    assert findings == [line for line in tool.stdout.splitlines() if "recipe defaults" not in line]
    assert any(line.startswith("found ") for line in findings)


def test_checkpoint_errors_are_the_same_through_both_programs(tmp_path: Path) -> None:
    path = micro_checkpoint(tmp_path / "w.pth")
    argv = ["--model", MICRO, "--num_workers", "0", "--eval", "--compact", "--resume", str(path)]
    messages = []
    for program in (main, checkpoint_tool):
        with pytest.raises(ValueError) as err:
            program.main(program.get_args_parser().parse_args(argv))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "it is not structured-sparse" in messages[0]
    for program in (main, checkpoint_tool):  # --compact alone names the flag it needs
        with pytest.raises(ValueError, match="--compact converts a trained checkpoint"):
            program.main(program.get_args_parser().parse_args(["--compact"]))


def test_checkpoint_tool_takes_only_the_flags_that_matter_for_a_checkpoint(capsys) -> None:
    parser = checkpoint_tool.get_args_parser()
    text = parser.format_help()
    for flag in ("--eval", "--report", "--flops", "--export", "--compact", "--resume", "--model", "--data-set",
                 "--density", "--token_selection", "--visualize-tokens", "--batch-size", "--device", "--amp"):
        assert f"{flag} " in text or f"{flag}\n" in text, flag
    for flag in ("--epochs", "--lr", "--opt", "--mixup", "--model-ema", "--compile", "--auto-resume", "--hflip",
                 "--update_frequency", "--tau-schedule", "--print-freq"):
        assert f"{flag} " not in text and f"{flag}\n" not in text, flag
    main_dests = {a.dest for a in main.get_args_parser()._actions}
    assert set(flags.TRAINING_ONLY) <= main_dests  # a renamed training flag would otherwise show up here
    assert {a.dest for a in parser._actions} <= main_dests  # the same groups, no flag of its own
    for argv in (["--flops", "--hflip", "0"], ["--flops", "--lr", "1"]):
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(argv)
        assert stop.value.code == 2
    assert "--hflip is a training flag" in capsys.readouterr().err


def parse(*extra: str) -> argparse.Namespace:
    args = main.get_args_parser().parse_args([*TINY_RUN, "--epochs", "1", "--no-model-ema", *extra])
    args.pin_mem = False
    return args


def test_main_trains_the_run_that_build_run_assembles() -> None:
    """main.main's first epoch equals one epoch of ``build_run``'s run from the same flags and seed, bit for bit."""
    extra = ("--density", "0.5", "--update_frequency", "20", "--token_selection", "--token-ratio", "0.7")
    record = main.main(parse(*extra))
    args = parse(*extra)
    args.input_size = models.default_img_size(args.model)
    proc = process.Process(0, 1, torch.device("cpu"))
    process.seed_everything(args.seed)
    run = build_run(RunConfig.from_args(args), proc, log_fn=lambda record: None)
    run.train_loader.sampler.set_epoch(0)
    run.lr_scheduler.step(0)
    stats, step = engine.train_one_epoch(run.forward_model, run.criterion, run.train_loader, run.step_context(),
                                         proc.device, 0, 0, show_progress=False)
    assert step == run.steps_per_epoch and record["train_loss"] == stats["loss"]
    assert record["density"] == run.sparsifier.report()["density"]


@pytest.mark.parametrize("mode", ["dense", "masked50", "drop70"])
def test_benchmark_modes_train_the_run_that_build_run_assembles(mode: str) -> None:
    """A benchmark mode's first training step equals that of ``build_run`` with the benchmark's settings."""
    setup = MODES[mode](MICRO, img_size=16, batch_size=8, device=torch.device("cpu"), amp_dtype=None)
    sparsity = sparselearning.SparsityConfig(density=0.5, sparse_init="ERK", update_frequency=10**8)
    tokens = models.TokenConfig(enabled=True, ratio=0.7, mode="drop")
    torch.manual_seed(0)
    run = build_run(RunConfig(model=ModelConfig(MICRO, img_size=16), loader=LoaderConfig(8), total_steps=10**9,
                              schedule=ScheduleConfig(warmup_epochs=0),
                              precision=PrecisionConfig(amp=False, opt_fused=False),
                              sparsity=sparsity if mode == "masked50" else None,
                              tokens=tokens if mode == "drop70" else models.TokenConfig()),
                    process.Process(0, 1, torch.device("cpu")), log_fn=lambda record: None)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 1000, (8,), generator=g))
    losses, plain = [], DistillationLoss(torch.nn.functional.cross_entropy)
    for model, ctx in ((setup.model, setup.ctx), (run.model, run.step_context())):
        torch.manual_seed(0)
        stats, _ = engine.train_one_epoch(model, plain, [batch, batch], ctx,
                                          torch.device("cpu"), 0, 0, show_progress=False)
        losses.append(stats["loss"])
    assert losses[0] == losses[1]
    assert ctx.optimizer.param_groups[0]["lr"] == setup.ctx.optimizer.param_groups[0]["lr"] == 5e-4 * 8 / 512
    assert all(torch.equal(a, b) for a, b in zip(setup.model.state_dict().values(), run.model.state_dict().values()))
