"""Resume with other flags: a resume continues the checkpoint's experiment (or extends its --epochs), or stops first.

The rule itself is tested in-process on parsed flags; the end-to-end tests run main.py as a user would.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import main as entry
from conftest import TINY_RUN, run_main
from interop.checkpoint import load_checkpoint, save_atomic
from models.token_selection import tau_at
from sparselearning import Masking
from sparselearning.schedules import death_rate_at
from training.assemble import RunConfig, build_optimization
from training.resume_check import EXPERIMENT_FLAGS, RUNTIME_FLAGS, compare, run_settings, saved_settings

# Updates every 20 of the 44 steps per epoch, and a token selector whose temperature follows the run's length.
SPARSE = ("--density", "0.5", "--sparse_init", "fixed_ERK", "--update_frequency", "20", "--token_selection",
          "--token-ratio", "0.7", "--no-model-ema")


def settings(*flags: str, world: int = 1, steps_per_epoch: int = 44) -> dict:
    args = entry.get_args_parser().parse_args(list(flags))
    args.input_size = 8
    return run_settings(vars(args), world, steps_per_epoch)


def differing(old: tuple[str, ...], new: tuple[str, ...], **kwargs) -> list[str]:
    return [name for name, _, _ in compare(settings(*old), settings(*new, **kwargs))[0]]


# ------------------------------------------------------------------------------------------------ the rule


def test_experiment_flags_must_match_and_runtime_flags_may_differ() -> None:
    base = ("--density", "0.5")
    assert differing(base, (*base, "--output_dir", "elsewhere", "--print-freq", "7", "--num_workers", "3",
                            "--device", "meta", "--amp", "--tensorboard")) == []
    assert differing(base, ("--density", "0.3", "--model", "vit_digits_micro", "--lr", "1e-3", "--seed", "1")) == [
        "model", "lr", "density", "seed"]


def test_flags_are_compared_only_where_they_act() -> None:
    # dense: the DST flags do nothing; structured: --density does nothing; tokens off: the token flags do nothing
    assert differing((), ("--update_frequency", "7", "--sparse_init", "ERK", "--token-mode", "drop")) == []
    structured = ("--pruning_type", "structure", "--atten_density", "0.5")
    assert differing(structured, (*structured, "--density", "0.3", "--sparse_init", "ERK")) == []
    assert differing(("--density", "1.0"), ()) == []  # density 1 is dense
    assert differing(("--sparse_init", "fixed_ERK", "--density", "0.5"), ("--sparse_init", "ERK", "--density",
                                                                         "0.5")) == []  # an alias
    # a change of kind names the flag that changes it, not the other kind's defaults
    assert differing((), ("--density", "0.5", "--sparse_init", "ERK")) == ["density"]
    assert differing(("--density", "0.5"), structured) == ["density", "pruning_type"]
    assert differing((), ("--token_selection", "--token-ratio", "0.7")) == ["token_selection"]


def test_global_batch_and_steps_per_epoch_must_match() -> None:
    assert differing(("--batch-size", "64"), ("--batch-size", "32"), world=2) == []
    assert differing(("--batch-size", "64"), ("--batch-size", "32"), steps_per_epoch=88) == ["global_batch"]
    assert differing((), (), steps_per_epoch=40) == ["steps_per_epoch"]


def test_only_a_larger_epochs_extends() -> None:
    assert compare(settings("--epochs", "2"), settings("--epochs", "5")) == ([], True)
    assert compare(settings("--epochs", "2"), settings("--epochs", "2")) == ([], False)
    assert compare(settings("--epochs", "5"), settings("--epochs", "2")) == ([("epochs", 5, 2)], False)
    assert compare(settings("--epochs", "2"), settings("--epochs", "5", "--lr", "1")) == ([("lr", 5e-4, 1.0)], False)


def test_every_flag_of_main_is_classified() -> None:
    dests = set(vars(entry.get_args_parser().parse_args([])))
    unclassified = sorted(dests - RUNTIME_FLAGS - EXPERIMENT_FLAGS)
    assert not unclassified, (f"add {unclassified} to RUNTIME_FLAGS (may change on --resume) or EXPERIMENT_FLAGS "
                              "(must match) in training/resume_check.py, and to docs/resume.md")
    assert not RUNTIME_FLAGS & EXPERIMENT_FLAGS


def test_a_checkpoint_from_elsewhere_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="lacks args, step, rng, so it was not written by this project's training"):
        saved_settings({"model": {}, "optimizer": {}, "epoch": 3})


def test_masking_refuses_a_state_made_with_another_density() -> None:
    """Library users get the same guarantee: 0.5 masks never continue under a 0.3 configuration."""
    def masking(density: float, total_steps: int = 10) -> Masking:
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(model.parameters())
        return Masking(model, optimizer, density=density, total_steps=total_steps, update_frequency=2,
                       log_fn=lambda record: None)

    state = masking(0.5).state_dict()
    with pytest.raises(ValueError, match=r"density: 0\.5 → 0\.3"):
        masking(0.3).load_state_dict(state)
    longer = masking(0.5, total_steps=20)
    longer.load_state_dict(state)  # another total_steps is an extension, not another configuration
    assert longer.total_steps == 20 and longer.death_rate(10) > masking(0.5).death_rate(10)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """One- and two-epoch dense runs and a one-epoch sparse+token run of the micro model."""
    out = {}
    for name, flags in (("dense1", ("--epochs", "1")), ("dense2", ("--epochs", "2")),
                        ("sparse1", (*SPARSE, "--epochs", "1"))):
        out[name] = tmp_path_factory.mktemp(name)
        run_main(*TINY_RUN, *flags, "--output_dir", str(out[name]))
    return out


def epochs_of(output_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (output_dir / "log.txt").read_text().splitlines()) if "epoch" in r]


def updates_of(output_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line).get("sparsity") for line in (output_dir / "log.txt").read_text().splitlines()]
    return [(r["step"], r["death_rate"]) for r in records if r and r["event"] == "update"]


@pytest.mark.slow
@pytest.mark.parametrize("run,flags,listed", [
    ("sparse1", (*SPARSE, "--epochs", "1", "--density", "0.3"), ["--density: 0.5 → 0.3"]),
    ("dense2", ("--epochs", "1", "--density", "0.5", "--model", "vit_digits_tiny"),
     ["--epochs: 2 → 1", "--model: vit_digits_micro → vit_digits_tiny", "--density: not set → 0.5"]),
], ids=["density", "dense-to-sparse,model,fewer-epochs"])
def test_other_experiment_flags_stop_before_training(runs: dict[str, Path], run: str, flags: tuple[str, ...],
                                                     listed: list[str]) -> None:
    before = (runs[run] / "config.json").read_text(), (runs[run] / "checkpoint.pth").read_bytes()
    proc = run_main(*TINY_RUN, *flags, "--output_dir", str(runs[run]), "--resume", str(runs[run] / "checkpoint.pth"),
                    check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = [line.strip() for line in proc.stderr.splitlines()]
    assert [line for line in lines if "→" in line] == listed
    assert "new --output_dir" in proc.stderr and "checkpoint's values" in proc.stderr
    assert "Traceback" not in proc.stderr and "Epoch 0" not in proc.stdout
    assert ((runs[run] / "config.json").read_text(), (runs[run] / "checkpoint.pth").read_bytes()) == before


@pytest.mark.slow
def test_extending_epochs_rescales_every_schedule_to_the_longer_run(runs: dict[str, Path], tmp_path: Path) -> None:
    """1 epoch (44 steps) resumed with --epochs 3: lr, death rate, t_end and tau follow 132 steps from step 44 on.

    The resumed run also switches to fp16 AMP (a runtime flag), so its GradScaler starts where the fp32 run saved none.
    """
    proc = run_main(*TINY_RUN, *SPARSE, "--epochs", "3", "--amp", "--amp-dtype", "float16", "--output_dir",
                    str(tmp_path), "--resume", str(runs["sparse1"] / "checkpoint.pth"))
    assert "extending the run from 1 to 3 epochs" in proc.stdout
    cfg = RunConfig.from_args(entry.get_args_parser().parse_args([*TINY_RUN, *SPARSE, "--epochs", "3",
                                                                  "--input-size", "8"]))
    _, scheduler = build_optimization(cfg.optimizer, cfg.schedule, torch.nn.Linear(1, 1), cfg.loader.batch_size,
                                      noise_seed=cfg.seed)
    for record in epochs_of(tmp_path):
        step = 44 * (record["epoch"] + 1)
        scheduler.step(record["epoch"])
        assert record["train_lr"] == pytest.approx(scheduler.optimizer.param_groups[0]["lr"], rel=1e-12)
        assert record["death_rate"] == pytest.approx(death_rate_at(step, 132, 0.5, "cosine"), rel=1e-12)
        assert record["tau"] == pytest.approx(tau_at(step, 132, "linear"), rel=1e-12)
    assert [r["epoch"] for r in epochs_of(tmp_path)] == [1, 2]
    # t_end 0.8 of 132 steps: updates every 20 steps until step 105, so 60, 80 and 100 after the resume
    assert updates_of(tmp_path) == [(s, pytest.approx(death_rate_at(s, 132, 0.5, "cosine"))) for s in (60, 80, 100)]
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["total_steps"] == 132 and ckpt["args"]["epochs"] == 3


@pytest.mark.slow
def test_old_dense_checkpoint_extends_bit_exactly_with_other_runtime_flags(runs: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    """A checkpoint without total_steps (written before it was recorded) resumed with --epochs 2, another
    --output_dir and --print-freq: identical to the 2-epoch run, since epoch 0's lr does not depend on the length."""
    old = load_checkpoint(runs["dense1"] / "checkpoint.pth")
    del old["total_steps"]
    save_atomic(old, tmp_path / "old.pth")
    assert saved_settings(old) == saved_settings(load_checkpoint(runs["dense1"] / "checkpoint.pth"))
    run_main(*TINY_RUN, "--epochs", "2", "--print-freq", "5", "--output_dir", str(tmp_path / "out"),
             "--resume", str(tmp_path / "old.pth"))
    a, b = load_checkpoint(runs["dense2"] / "checkpoint.pth"), load_checkpoint(tmp_path / "out" / "checkpoint.pth")
    for section in ("model", "model_ema"):
        for key, value in a[section].items():
            assert torch.equal(value, b[section][key]), f"{section}.{key}"
    assert epochs_of(tmp_path / "out")[-1]["train_loss"] == epochs_of(runs["dense2"])[-1]["train_loss"]
