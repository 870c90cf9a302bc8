"""End-to-end training through main.py on DIGITS: learning, --eval, exact resume after SIGKILL, DDP, bad input."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main as entry
import models
import sparselearning
from conftest import ROOT, TINY_RUN, run_main
from interop.checkpoint import load_checkpoint, same_state


def read_log(output_dir: Path) -> list[dict]:
    """The per-epoch records (sparsity records, keyed 'sparsity', are left out)."""
    lines = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]
    return [line for line in lines if "epoch" in line]



@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Three epochs of the micro model; shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("trained")
    run_main(*TINY_RUN, "--model", "vit_digits_tiny", "--epochs", "5", "--output_dir", str(out), "--model-ema-decay", "0.9")
    return out


@pytest.mark.slow
def test_training_lowers_the_loss_and_logs_deit_keys(trained: Path) -> None:
    log = read_log(trained)
    assert [r["epoch"] for r in log] == [0, 1, 2, 3, 4]
    assert log[-1]["train_loss"] < log[0]["train_loss"] - 0.1
    assert log[-1]["test_acc1"] > 20.0  # chance is 10%
    for key in ("train_loss", "train_lr", "test_loss", "test_acc1", "test_acc5", "n_parameters",
                "ema_test_acc1", "ema_test_acc5"):
        assert key in log[-1], key
    assert log[-1]["test_images"] == 360


@pytest.mark.slow
def test_checkpoint_contents_load_safely(trained: Path) -> None:
    ckpt = torch.load(trained / "checkpoint.pth", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "scaler", "model_ema", "epoch", "step", "rng", "args",
            "sparsifier"} <= set(ckpt)
    assert ckpt["epoch"] == 4 and isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "vit_digits_tiny"
    best = load_checkpoint(trained / "best.pth")
    best_epoch = max(read_log(trained), key=lambda r: r["test_acc1"])["epoch"]
    assert best["epoch"] == best_epoch
    assert not list(trained.glob(".*.tmp")), "temporary files must not be left behind"


@pytest.mark.slow
def test_eval_only_reproduces_the_logged_accuracy(trained: Path) -> None:
    proc = run_main(*TINY_RUN, "--model", "vit_digits_tiny", "--eval", "--resume", str(trained / "checkpoint.pth"))
    top1 = float(re.search(r"top-1 ([\d.]+)%", proc.stdout).group(1))
    assert top1 == pytest.approx(read_log(trained)[-1]["test_acc1"], abs=0.01)
    assert "epoch 0" not in proc.stdout, "--eval must not train"


# Sparse: updates every 20 of the 44 steps per epoch, so the resumed epoch crosses topology updates.
SPARSE = ("--density", "0.5", "--sparse_init", "fixed_ERK", "--update_frequency", "20", "--growth", "gradient")
# SViTE+: the same weight sparsity co-trained with a token selector that really drops 30% of the tokens.
SPARSE_TOKENS = (*SPARSE, "--token_selection", "--token-ratio", "0.7", "--token-mode", "drop")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), SPARSE_TOKENS], ids=["dense", "sparse+tokens"])
def test_resume_after_sigkill_is_bit_exact(tmp_path: Path, extra: tuple[str, ...]) -> None:
    flags = (*TINY_RUN, "--epochs", "3", "--model-ema-decay", "0.9", "--num_workers", "1", *extra)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_main(*flags, "--output_dir", str(straight))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *flags, "--output_dir", str(killed)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    log = killed / "log.txt"  # an epoch's line is written right after its checkpoint
    while not (log.exists() and '"epoch"' in log.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = load_checkpoint(killed / "checkpoint.pth")["epoch"]
    assert interrupted_at < 2, "the run finished before it could be killed; the test proves nothing"
    run_main(*flags, "--output_dir", str(killed), "--resume", str(killed / "checkpoint.pth"))

    a, b = load_checkpoint(straight / "checkpoint.pth"), load_checkpoint(killed / "checkpoint.pth")
    for section in ("model", "model_ema"):
        for key, value in a[section].items():
            assert torch.equal(value, b[section][key]), f"{section}.{key} differs after resume"
    assert same_state(a["sparsifier"], b["sparsifier"]), "sparsifier state (masks, step, tau) differs after resume"
    assert [r["train_loss"] for r in read_log(straight)] == [r["train_loss"] for r in read_log(killed)][-3:]


GLOBAL_COMPACTED = ("--pruning_type", "global", "--target-macs", "0.6", "--prune-every", "4", "--prune-units", "60",
                    "--compact-at-budget")  # the budget is met in epoch 0; epoch 1 trains the compact model


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), SPARSE_TOKENS, GLOBAL_COMPACTED], ids=["dense", "sparse+tokens", "global+compact"])
def test_torchrun_two_processes_keep_identical_weights(tmp_path: Path, extra: tuple[str, ...]) -> None:
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = (*TINY_RUN, "--epochs", "2", "--batch-size", "16", "--output_dir", str(tmp_path / "run"), *extra)
    proc = subprocess.run([*torchrun, *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = torch.load(tmp_path / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights_rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    if "--compact-at-budget" in extra:  # both ranks compacted at the same boundary and trained the compact model on
        dense = models.create_model("vit_digits_micro", num_classes=10).state_dict()
        assert sum(v.numel() for v in w0.values()) < 0.8 * sum(v.numel() for v in dense.values())
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pth")["model"]
    assert all(torch.equal(saved[k], w0[k]) for k in w0)  # the checkpoint holds exactly these weights
    log = read_log(tmp_path / "run")
    assert log[-1]["test_images"] == 360  # every validation image counted once across the 2 shards
    single = run_main(*TINY_RUN, *extra, "--eval", "--resume", str(tmp_path / "run" / "checkpoint.pth"))
    top1 = float(re.search(r"top-1 ([\d.]+)%", single.stdout).group(1))
    assert top1 == pytest.approx(log[-1]["test_acc1"], abs=0.01)


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    # Epoch 0 trains at the warm-up lr; epoch 1 jumps to an absurd lr and the loss diverges.
    proc = run_main(*TINY_RUN, "--epochs", "4", "--lr", "1e9", "--warmup-epochs", "1", "--warmup-lr", "1e-6", "--no-model-ema",
                    "--output_dir", str(tmp_path), check=False)
    assert proc.returncode != 0
    assert re.search(r"loss became (nan|inf)", proc.stderr), proc.stderr[-2000:]
    assert "last good checkpoint" in proc.stderr
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    assert ckpt["epoch"] == 0 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("flags, error, message", [
    (("--data-set", "IMNET"), ValueError, r"--data-path"),
    (("--data-set", "IMNET", "--data-path", "/nonexistent/imagenet"), FileNotFoundError,
     r"/nonexistent/imagenet.*does not exist"),
    (("--mixup", "0.8", "--batch-size", "63"), ValueError, r"even --batch-size"),
    (("--batch-size", "4096"), ValueError, r"fewer than one batch of 4096"),
    (("--resume", "/nonexistent/ckpt.pth"), FileNotFoundError, r"checkpoint /nonexistent/ckpt.pth does not exist"),
    (("--device", "cuda"), ValueError, r"no CUDA device"),
])
def test_bad_input_gives_a_clear_error(flags: tuple[str, ...], error: type, message: str) -> None:
    if flags == ("--device", "cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    args = entry.get_args_parser().parse_args([*TINY_RUN, "--epochs", "1", *flags])
    with pytest.raises(error, match=message):
        entry.main(args)


@pytest.mark.slow
def test_unknown_dataset_lists_the_choices_without_a_traceback() -> None:
    proc = run_main(*TINY_RUN, "--data-set", "MNIST", check=False)
    assert proc.returncode == 2
    assert re.search(r"invalid choice: 'MNIST'.*DIGITS", proc.stderr) and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_checkpoint_for_another_model_lists_the_mismatch(trained: Path) -> None:
    proc = run_main(*TINY_RUN, "--eval", "--resume", str(trained / "checkpoint.pth"),
                    check=False)
    assert proc.returncode != 0
    assert re.search(r"cls_token: checkpoint \(1, 1, 64\) vs model \(1, 1, 32\)", proc.stderr)
    assert "the weights fit --model vit_digits_tiny" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_corrupt_checkpoint_is_refused(tmp_path: Path, trained: Path) -> None:
    data = (trained / "checkpoint.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    proc = run_main(*TINY_RUN, "--eval", "--resume", str(tmp_path / "cut.pth"), check=False)
    assert proc.returncode != 0 and "not a readable PyTorch checkpoint" in proc.stderr


@pytest.mark.slow
def test_sparse_run_keeps_exact_layer_densities(tmp_path: Path) -> None:
    run_main(*TINY_RUN, "--epochs", "1", "--no-model-ema", "--output_dir", str(tmp_path), *SPARSE)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    masks = ckpt["sparsifier"]["masks"]
    assert "blocks.0.attn.qkv.weight" in masks and "head.weight" in masks and "blocks.0.attn.qkv.bias" not in masks
    for name, mask in masks.items():
        weight = ckpt["model"][name]
        assert mask.dtype == torch.bool
        assert torch.equal(weight != 0, mask), f"{name}: non-zeros do not match the mask"
    updates = [json.loads(line)["sparsity"] for line in (tmp_path / "log.txt").read_text().splitlines()
               if "sparsity" in line]
    assert [u["event"] for u in updates] == ["init", "update"]  # step 20; step 40 is past t_end * 44 = 35.2
    assert updates[0]["density"] == pytest.approx(0.5, abs=1e-3)
    assert read_log(tmp_path)[-1]["density"] == pytest.approx(0.5, abs=1e-3)
    assert (tmp_path / "layer_density.png").stat().st_size > 1000


def test_original_unstructured_flag_lines_parse_and_build_masks() -> None:
    """The flag line of SViTE's cmd/vm/0426/vm1.sh (SViTE-Small, density 0.4, ΔT 15000), unchanged."""
    line = ("--model deit_small_patch16_224 --batch-size 64 --data-path ../../imagenet --epochs 600 "
            "--output_dir small_dst_uns_0426 --dist_url tcp://127.0.0.1:23305 --sparse_init fixed_ERK "
            "--density 0.4 --update_frequency 15000 --growth gradient --death magnitude --redistribution none")
    args = entry.get_args_parser().parse_args(line.split())
    cfg = sparselearning.SparsityConfig.from_args(args)
    model = models.create_model(args.model)
    optimizer = torch.optim.AdamW(model.parameters())
    masking = sparselearning.build_sparsifier(cfg, model, optimizer, 2502 * 600, log_fn=lambda record: None)
    densities = {name: float(m.float().mean()) for name, m in masking.masks.items()}
    assert len(densities) == 50
    assert densities["blocks.3.attn.qkv.weight"] == pytest.approx(0.4029, abs=1e-4)  # ERK: docs/original-sviite.md
    assert densities["head.weight"] == pytest.approx(0.4182, abs=1e-4)


@pytest.mark.slow
def test_cotrained_run_keeps_block_weights_sparse_and_selector_dense(tmp_path: Path) -> None:
    """The original's mask-index bug left SViTE+ runs dense; here the block weights must really be sparse."""
    run_main(*TINY_RUN, "--epochs", "1", "--no-model-ema", "--output_dir", str(tmp_path), *SPARSE_TOKENS)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    weights = ckpt["model"]
    assert {"gumbel.weight", "gumbel.bias"} <= set(weights)
    assert bool((weights["gumbel.weight"] != 0).all())
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.weight"):
        density = float((weights[name] != 0).float().mean())
        assert 0.4 < density < 0.55, f"{name} has density {density}"
    assert read_log(tmp_path)[-1]["tau"] == pytest.approx(0.1)  # the linear schedule ends at 0.1 after T steps


STRUCTURED = ("--pruning_type", "structure_new", "--atten_head", "2", "--atten_density", "0.5",
              "--other_density", "0.5", "--update_frequency", "20", "--density", "0.5", "--sparse_init", "fixed_ERK")


@pytest.mark.slow
def test_structured_run_writes_a_compact_model_that_evaluates_identically(tmp_path: Path) -> None:
    run_main(*TINY_RUN, "--epochs", "1", "--no-model-ema", "--output_dir", str(tmp_path), *STRUCTURED)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth")
    qkv = ckpt["model"]["blocks.0.attn.qkv.weight"].reshape(3, 2, 16, 32)  # (q/k/v, head, head_dim, D)
    assert (qkv.abs().sum(dim=(0, 2, 3)) > 0).sum() == 1, "exactly one of the two heads is active"
    assert (ckpt["model"]["blocks.0.mlp.fc1.weight"].abs().sum(1) > 0).sum() == 64
    compact = load_checkpoint(tmp_path / "compact.pth")
    assert compact["architecture"]["block_heads"] == [1, 1] and compact["architecture"]["block_mlp_hidden"] == [64, 64]
    masked = run_main(*TINY_RUN, "--eval", "--resume", str(tmp_path / "checkpoint.pth"), "--compact",
                      "--output_dir", str(tmp_path / "again"))
    small = run_main(*TINY_RUN, "--eval", "--resume", str(tmp_path / "compact.pth"))
    accuracies = [float(x) for x in re.findall(r"top-1 ([\d.]+)%", masked.stdout + small.stdout)]
    assert len(accuracies) == 3 and len(set(accuracies)) == 1, accuracies  # masked, its compaction, compact.pth
    assert (tmp_path / "again" / "compact.pth").exists() and "params" in masked.stdout
