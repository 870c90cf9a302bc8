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
from models.checkpoint import load_checkpoint, save_atomic
from sparselearning import Masking
from training.resume_check import RUNTIME_FLAGS, compare, run_settings, saved_settings

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
    assert differing(("--batch-size", "64"), ("--batch-size", "32")) == ["global_batch"]
    assert differing((), (), steps_per_epoch=40) == ["steps_per_epoch"]


def test_only_a_larger_epochs_extends() -> None:
    assert compare(settings("--epochs", "2"), settings("--epochs", "5")) == ([], True)
    assert compare(settings("--epochs", "2"), settings("--epochs", "2")) == ([], False)
    assert compare(settings("--epochs", "5"), settings("--epochs", "2")) == ([("epochs", 5, 2)], False)
    assert compare(settings("--epochs", "2"), settings("--epochs", "5", "--lr", "1")) == ([("lr", 5e-4, 1.0)], False)


def test_runtime_flags_are_flags_of_main() -> None:
    dests = set(vars(entry.get_args_parser().parse_args([])))
    assert RUNTIME_FLAGS <= dests, RUNTIME_FLAGS - dests


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
    """One- and two-epoch dense and sparse+token runs of the micro model."""
    out = {}
    for name, flags in (("dense1", ("--epochs", "1")), ("dense2", ("--epochs", "2")),
                        ("sparse1", (*SPARSE, "--epochs", "1")), ("sparse2", (*SPARSE, "--epochs", "2"))):
        out[name] = tmp_path_factory.mktemp(name)
        run_main(*TINY_RUN, *flags, "--output_dir", str(out[name]))
    return out


def epochs_of(output_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (output_dir / "log.txt").read_text().splitlines()) if "epoch" in r]


def updates_of(output_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line).get("sparsity") for line in (output_dir / "log.txt").read_text().splitlines()]
    return [(r["step"], r["death_rate"]) for r in records if r and r["event"] == "update"]


@pytest.mark.parametrize("run,flags,listed", [
    ("sparse1", (*SPARSE, "--epochs", "1", "--density", "0.3"), "--density: 0.5 → 0.3"),
    ("dense1", ("--density", "0.5", "--epochs", "1"), "--density: not set → 0.5"),
    ("sparse1", (*SPARSE, "--epochs", "1", "--model", "vit_digits_tiny"), "--model: vit_digits_micro → vit_digits_tiny"),
    ("sparse2", (*SPARSE, "--epochs", "1"), "--epochs: 2 → 1"),
], ids=["density", "dense-to-sparse", "model", "fewer-epochs"])
def test_other_experiment_flags_stop_before_training(runs: dict[str, Path], run: str, flags: tuple[str, ...],
                                                     listed: str) -> None:
    before = (runs[run] / "config.json").read_text(), (runs[run] / "checkpoint.pth").read_bytes()
    proc = run_main(*TINY_RUN, *flags, "--output_dir", str(runs[run]), "--resume", str(runs[run] / "checkpoint.pth"),
                    check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert listed in proc.stderr and "new --output_dir" in proc.stderr and "checkpoint's values" in proc.stderr
    assert "Traceback" not in proc.stderr and "Epoch 0" not in proc.stdout
    assert ((runs[run] / "config.json").read_text(), (runs[run] / "checkpoint.pth").read_bytes()) == before


def test_extending_epochs_continues_every_schedule_of_the_longer_run(runs: dict[str, Path], tmp_path: Path) -> None:
    """1 epoch resumed with --epochs 2 then follows the 2-epoch run's lr, death rate, t_end and tau."""
    proc = run_main(*TINY_RUN, *SPARSE, "--epochs", "2", "--output_dir", str(tmp_path),
                    "--resume", str(runs["sparse1"] / "checkpoint.pth"))
    assert "extending the run from 1 to 2 epochs" in proc.stdout
    resumed, straight = epochs_of(tmp_path)[-1], epochs_of(runs["sparse2"])[-1]
    assert resumed["epoch"] == straight["epoch"] == 1
    for key in ("train_lr", "death_rate", "tau"):
        assert resumed[key] == straight[key], key
    assert resumed["train_lr"] > 1e-4  # the 1-epoch schedule had ended at --min-lr 1e-5
    after = [u for u in updates_of(runs["sparse2"]) if u[0] > 44]
    assert after and updates_of(tmp_path) == after  # same update steps (t_end of 88 steps) and death rates
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["total_steps"] == 88 and ckpt["args"]["epochs"] == 2


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
