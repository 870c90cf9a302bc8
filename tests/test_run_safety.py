"""Runs a user can leave for a week: no silent overwrite, a lock, clean stops with exact mid-epoch resume, and
clear errors instead of tracebacks."""
from __future__ import annotations

import errno
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as entry
from conftest import ROOT, TINY_RUN, run_main
from interop.checkpoint import load_checkpoint, save_atomic
from sparselearning import layer_counts, layer_densities
from test_train import read_log
from training import run_dir
from training.interrupts import StopSignals, resume_command

# Mixup and drop path draw from the RNGs every step, so an inexact RNG restore mid-epoch changes the weights.
RANDOM_RUN = (*TINY_RUN, "--epochs", "2", "--mixup", "0.8", "--drop-path", "0.1", "--model-ema-decay", "0.9",
              "--print-freq", "5")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce bit for bit."""
    out = tmp_path_factory.mktemp("straight")
    run_main(*RANDOM_RUN, "--output_dir", str(out))
    return out


def assert_same_run(a: Path, b: Path) -> None:
    ca, cb = load_checkpoint(a / "checkpoint.pth"), load_checkpoint(b / "checkpoint.pth")
    for section in ("model", "model_ema"):
        for key, value in ca[section].items():
            assert torch.equal(value, cb[section][key]), f"{section}.{key} differs"
    assert [r["train_loss"] for r in read_log(a)] == [r["train_loss"] for r in read_log(b)]


def start(*flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "main.py"), *flags], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_line(proc: subprocess.Popen, pattern: str) -> None:
    for line in proc.stdout:
        if re.search(pattern, line):
            return
    raise AssertionError(f"the run ended before printing {pattern!r}: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_and_the_printed_command_resumes_bit_exactly(tmp_path: Path,
                                                                                straight: Path) -> None:
    signum = signal.SIGINT  # SIGTERM takes the same path: test_sigterm_is_recorded_and_a_second_sigint_aborts
    out = tmp_path / "run"
    proc = start(*RANDOM_RUN, "--output_dir", str(out))
    wait_for_line(proc, r"Epoch 0 \[10/44\]")
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr and f"received {signal.Signals(signum).name}" in stderr
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 0 and 10 <= ckpt["position"]["batch"] < 44, "stopped mid-epoch 0"
    assert ckpt["step"] == ckpt["position"]["batch"]
    command = re.search(r"resume with:\n  (.+)", stdout).group(1)
    assert command.endswith(f"--resume {out / 'checkpoint.pth'}")
    resumed = subprocess.run(shlex.split(command), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at epoch 0, batch {ckpt['position']['batch']}" in resumed.stdout
    assert_same_run(straight, out)


def test_sigterm_is_recorded_and_a_second_sigint_aborts() -> None:
    signals = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.signum == signal.SIGTERM  # recorded, the process lives on to finish its step
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the second signal gets the default behaviour
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.slow
def test_kill_9_mid_epoch_then_auto_resume_is_bit_exact_and_clears_temp_files(tmp_path: Path, straight: Path) -> None:
    """--save-every-steps writes within the epoch; samples are seeded by position, so the worker count may change."""
    out = tmp_path / "run"
    flags = (*RANDOM_RUN, "--output_dir", str(out), "--auto-resume", "--save-every-steps", "10")
    proc = start(*flags, "--num_workers", "1")
    wait_for_line(proc, r"Epoch 0 \[25/44\]")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["epoch"] == 0 and ckpt["position"]["batch"] in (20, 30), ckpt.get("position")
    stale = out / ".checkpoint.pth.k9x7abcd.tmp"  # what a kill during save_atomic leaves behind
    stale.write_bytes(b"partial")
    resumed = run_main(*flags, "--num_workers", "0")
    assert not stale.exists() and "removed 1 temporary file" in resumed.stdout
    assert_same_run(straight, out)


@pytest.mark.slow
def test_an_output_dir_holding_a_run_is_not_trained_into(tmp_path: Path) -> None:
    flags = (*TINY_RUN, "--epochs", "1", "--no-model-ema", "--output_dir", str(tmp_path))
    entry.main(entry.get_args_parser().parse_args(flags))
    before = (tmp_path / "best.pth").read_bytes()
    proc = run_main(*flags, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(r"error: --output_dir .* already holds checkpoint.pth and best.pth .* --resume "
                     rf"{tmp_path}/checkpoint.pth \(or --auto-resume\)", proc.stderr), proc.stderr
    assert (tmp_path / "best.pth").read_bytes() == before
    assert run_dir.checkpoint_to_resume(tmp_path, "other.pth", True) == str(tmp_path / "checkpoint.pth")
    assert run_dir.checkpoint_to_resume(tmp_path / "new", "other.pth", True) == "other.pth"
    assert run_dir.checkpoint_to_resume(tmp_path / "new", "", True) == ""


@pytest.mark.slow
def test_a_second_process_is_stopped_by_the_lock_until_the_holder_dies(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from training import run_dir; run_dir.lock(Path(sys.argv[1])); print('held', "
                               "flush=True); time.sleep(300)", str(tmp_path)],
                              cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=rf"in use by another run \(host \S+ pid {holder.pid} started "):
            run_dir.prepare(tmp_path, "", False, is_main=True)
    finally:
        holder.kill()
        holder.wait()
    assert run_dir.prepare(tmp_path, "", False, is_main=True) == ""  # a dead holder's lock does not block
    run_dir.unlock(tmp_path)


def test_checkpoints_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        save_atomic({"w": torch.zeros(2)}, tmp_path / "checkpoint.pth")
    finally:
        os.umask(old)
    assert (tmp_path / "checkpoint.pth").stat().st_mode & 0o777 == 0o644


def test_disk_full_keeps_the_last_checkpoint_and_removes_the_temp_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "checkpoint.pth"
    save_atomic({"w": torch.ones(3)}, path)
    good = path.read_bytes()

    def full_disk(obj, f) -> None:
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=rf"no space left to write {path} \(\d+ MiB free; the previous checkpoint.pth "
                                      r"is intact\); free space or move --output_dir"):
        save_atomic({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_resume_command_replaces_resume_and_keeps_auto_resume() -> None:
    cmd = resume_command(Path("out/checkpoint.pth"), ["main.py", "--epochs", "3", "--resume", "old.pth", "--lr=1"])
    assert cmd.endswith("main.py --epochs 3 --lr=1 --resume out/checkpoint.pth")
    assert resume_command(Path("o/checkpoint.pth"), ["main.py", "--auto-resume"]).endswith("main.py --auto-resume")


@pytest.mark.parametrize("flags, message", [
    (("--eval",), r"--eval evaluates a checkpoint: pass --resume FILE"),
    (("--sched", "step", "--decay-epochs", "0"), r"--decay-epochs must be > 0"),
    (("--device", "cuda:3"), r"--device cuda:3 (does not exist|was asked for but no CUDA)"),
    (("--device", "foo"), r"--device 'foo' is not a device"),
    (("--device", "mps"), r"--device mps needs Apple's Metal backend"),
    (("--output_dir", "/proc/version/run"), r"cannot create --output_dir /proc/version/run: Not a directory"),
    (("--flops", "--resume", "x", "--export", "/proc/version/x"), r"cannot create --export /proc/version/x"),
    (("--density", "1e-9"), r"density 1e-09 leaves \d+ layer\(s\) without a weight .* smallest density that "
                            r"keeps one weight in every layer is [\d.e-]+"),
    (("--token_selection", "--token_number", "1"), r"--token_number 1 keeps only the 1 prefix"),
    (("--save-every-steps", "5"), r"--save-every-steps works on the checkpoints in --output_dir"),
])
def test_bad_input_gives_a_clear_error(flags: tuple[str, ...], message: str) -> None:
    if "mps" in flags and torch.backends.mps.is_available():
        pytest.skip("an MPS device is present")
    if "cuda:3" in flags and torch.cuda.device_count() > 3:
        pytest.skip("a fourth CUDA device is present")
    args = entry.get_args_parser().parse_args([*TINY_RUN, "--epochs", "1", *flags])
    with pytest.raises(ValueError, match=message):
        entry.main(args)


@pytest.mark.parametrize("method", ["uniform", "ERK"])
def test_the_smallest_density_stated_keeps_a_weight_in_every_layer(method: str) -> None:
    shapes = {"a": (64, 32), "b": (10, 32), "c": (3, 4)}
    with pytest.raises(ValueError, match=r"keeps one weight in every layer is ([\d.e-]+)") as info:
        layer_densities(shapes, 1e-4, method)
    smallest = float(re.search(r"is ([\d.e-]+)$", str(info.value)).group(1))
    assert min(layer_counts(layer_densities(shapes, smallest, method), shapes).values()) >= 1
    with pytest.raises(ValueError, match="without a weight"):
        layer_densities(shapes, smallest * 0.97, method)


def test_non_finite_loss_without_a_checkpoint_says_so(tmp_path: Path) -> None:
    args = entry.get_args_parser().parse_args([*TINY_RUN, "--epochs", "1", "--lr", "1e9", "--no-model-ema",
                                               "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=rf"error: loss became (nan|inf).*; no checkpoint was written to {tmp_path} "
                                         r"yet\."):
        entry.main(args)
