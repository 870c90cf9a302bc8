"""The cmd/ paper scripts: each one's dry run is parsed by main.py's own parser and checked against the table below,
so a script can neither go stale against main.py nor drift from the configuration docs/reproduction.md promises."""
from __future__ import annotations

import argparse
import functools
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import datasets
import main
import models
import sparselearning
from conftest import ROOT
from training import run_dir as run_dir_lib

MARKER = "/_paper_run.sh"  # every paper script sources this helper: that is how new scripts get found and tested
PAPER_SCRIPTS = sorted(p.stem for p in (ROOT / "cmd").glob("*.sh") if not p.name.startswith("_")
                       and MARKER in p.read_text())
DATA, OUT = "/imagenet-for-test", "/runs-for-test"  # never created: a dry run only prints

TINY, SMALL, BASE = "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"
BASE_DISTILLED = "deit_base_distilled_patch16_224"
# script: (model, per-GPU batch, epochs, --density, ΔT, (heads, atten, other density) | None, (k, mode) | None)
EXPECTED = {
    "deit_tiny_dense": (TINY, 128, 300, None, None, None, None),
    "deit_small_dense": (SMALL, 128, 300, None, None, None, None),
    "deit_base_dense": (BASE, 128, 300, None, None, None, None),
    "svite_tiny_sparse30": (TINY, 64, 600, 0.7, 15000, None, None),
    "svite_tiny_sparse40": (TINY, 64, 600, 0.6, 15000, None, None),
    "svite_tiny_sparse50": (TINY, 64, 600, 0.5, 15000, None, None),
    "svite_small_sparse30": (SMALL, 64, 600, 0.7, 15000, None, None),
    "svite_small_sparse40": (SMALL, 64, 600, 0.6, 15000, None, None),
    "svite_small_sparse50": (SMALL, 64, 600, 0.5, 15000, None, None),
    "svite_small_sparse60": (SMALL, 64, 600, 0.4, 15000, None, None),
    "svite_small_sparse70": (SMALL, 64, 600, 0.3, 15000, None, None),
    "svite_base_sparse30": (BASE, 128, 600, 0.7, 7000, None, None),
    "svite_base_sparse40": (BASE, 128, 600, 0.6, 7000, None, None),
    "svite_base_sparse50": (BASE, 128, 600, 0.5, 7000, None, None),
    "svite_base_sparse60": (BASE, 128, 600, 0.4, 7000, None, None),
    "svite_base_sparse70": (BASE, 128, 600, 0.3, 7000, None, None),
    "s2vite_tiny_sparse40": (TINY, 64, 600, None, 15000, (3, 0.7, 0.7), None),
    "s2vite_small_sparse40": (SMALL, 64, 600, None, 15000, (6, 0.7, 0.6), None),
    "s2vite_base_sparse40": (BASE, 128, 600, None, 7000, (12, 0.7, 0.6), None),
    "sviteplus_small_data5_sparse50_zero": (SMALL, 64, 600, 0.5, 15000, None, (187, "zero")),
    "sviteplus_small_data5_sparse50_drop": (SMALL, 64, 600, 0.5, 15000, None, (187, "drop")),
    "sviteplus_small_data10_sparse50_zero": (SMALL, 64, 600, 0.5, 15000, None, (177, "zero")),
    "sviteplus_small_data10_sparse50_drop": (SMALL, 64, 600, 0.5, 15000, None, (177, "drop")),
    "srste_small_nm24": (SMALL, 128, 300, None, 1, None, None),  # --nm 2:4: density 2/4 without --density
    "nvit_base_global": (BASE_DISTILLED, 128, 300, None, None, None, None),  # its pruning: GLOBAL below
}
# The global-pruning scripts: the budget and schedule, the fine-tuning lr and the distillation from the unpruned
# model, whose weights (DEIT_B_WEIGHTS) are also the start (--finetune); the compact model fine-tunes.
GLOBAL = {
    "nvit_base_global": dict(target_macs=0.3864, target_latency=None, prune_every=100, prune_units=64, lr=1e-4,
                             teacher_model=BASE_DISTILLED, distillation_type="soft", distillation_tau=20.0,
                             distillation_alpha=0.5, unit_multiple="auto", compact_at_budget=True),
}
# SViTE's flags common to all its runs (and the original's t_end for the structured ones).
COMMON_SPARSE = dict(sparse_init="fixed_ERK", growth="gradient", death="magnitude", redistribution="none", t_end=0.8)
# The only flags a paper script may set; everything else must stay at main.py's (DeiT) defaults.
ALLOWED = {"data_set", "data_path", "output_dir", "auto_resume", "model", "batch_size", "epochs", "density", "update_frequency",
           "pruning_type", "atten_head", "atten_density", "other_density", "unit_multiple", "token_selection",
           "token_number", "token_mode", "nm", "nm_method", *COMMON_SPARSE}
# What a global-pruning script sets besides: its start and teacher, its budget and schedule, the fine-tuning lr.
GLOBAL_ALLOWED = {"finetune", "teacher_path", *GLOBAL["nvit_base_global"]}


@pytest.fixture(scope="module", autouse=True)
def deit_b_weights(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The pretrained weights cmd/nvit_base_global.sh requires (DEIT_B_WEIGHTS): a dry run only names the file."""
    path = tmp_path_factory.mktemp("weights") / f"{BASE_DISTILLED}.pth"
    path.touch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEIT_B_WEIGHTS", str(path))
        yield str(path)


def run_script(name: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "cmd" / f"{name}.sh"), *argv], capture_output=True, text=True,
                          timeout=30)


def launch(name: str, gpus: str = "8", out: str = OUT, *extra: str) -> tuple[list[str], argparse.Namespace]:
    """The dry run's torchrun options and its main.py arguments as main.py parses them."""
    proc = run_script(name, "--dry-run", DATA, gpus, out, *extra)
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    entry = next(i for i, word in enumerate(cmd) if word.endswith("main.py"))
    assert Path(cmd[entry]) == ROOT / "main.py"
    return cmd[:entry], main.get_args_parser().parse_args(cmd[entry + 1:])


@functools.cache
def parsed(name: str) -> argparse.Namespace:
    return launch(name)[1]


@functools.cache
def heads_per_block(model_name: str) -> set[int]:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        return set(models.architecture(models.create_model(model_name))["block_heads"])


def test_every_paper_script_has_a_table_row() -> None:
    assert set(PAPER_SCRIPTS) == set(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_SCRIPTS)
def test_dry_run_launches_the_configuration(name: str, deit_b_weights: str) -> None:
    torchrun, args = launch(name)
    assert torchrun == ["torchrun", "--standalone", "--nproc_per_node=8"]
    assert (args.data_set, args.data_path, args.output_dir) == ("IMNET", DATA, f"{OUT}/{name}")

    sparse_cfg = sparselearning.SparsityConfig.from_args(args)
    token_cfg = models.TokenConfig.from_args(args)
    found = (args.model, args.batch_size, args.epochs, args.density,
             args.update_frequency if sparse_cfg.enabled and sparse_cfg.pruning_type != "global" else None,
             (args.atten_head, args.atten_density, args.other_density) if sparse_cfg.structured else None,
             (args.token_number, args.token_mode) if token_cfg.enabled else None)
    assert found == EXPECTED[name]

    defaults = main.get_args_parser().parse_args([])
    changed = {key for key, value in vars(args).items() if value != getattr(defaults, key)}
    allowed = ALLOWED | (GLOBAL_ALLOWED if sparse_cfg.pruning_type == "global" else set())
    assert changed <= allowed, f"{name} sets flags outside the paper configuration: {changed - allowed}"
    if sparse_cfg.pruning_type == "global":  # prunes the pretrained model, distils from it unpruned
        assert {key: getattr(args, key) for key in GLOBAL[name]} == GLOBAL[name]
        assert args.finetune == args.teacher_path == deit_b_weights
    elif sparse_cfg.nm is not None:  # SR-STE's recipe: the mask recomputed at every step of the whole run
        assert (args.sparse_init, args.nm, args.nm_method, args.t_end) == ("nm", "2:4", "srste", 1.0)
    elif sparse_cfg.enabled:
        assert {key: getattr(args, key) for key in COMMON_SPARSE} == COMMON_SPARSE
        assert sparse_cfg.structured == (args.pruning_type == "structure_new")
        assert sparse_cfg.unit_multiple == (1 if sparse_cfg.structured else "auto"), "the paper's exact counts"


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_SCRIPTS)
def test_flags_build_a_valid_run(name: str) -> None:
    """What main.main checks before it loads data: the configs build, and the model takes the heads and tokens."""
    args = argparse.Namespace(**vars(parsed(name)))
    main.validate_args(args, mixup_active=args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None)
    args.input_size = models.default_img_size(args.model)
    datasets.DataConfig.from_args(args)
    sparse_cfg = sparselearning.SparsityConfig.from_args(args)
    token_cfg = models.TokenConfig.from_args(args)
    if sparse_cfg.atten_head is not None:
        assert heads_per_block(args.model) == {sparse_cfg.atten_head}
    if token_cfg.enabled:
        with torch.device("meta"):
            models.apply_token_selection(models.create_model(args.model), token_cfg)  # raises for k > N


@pytest.mark.slow
def test_output_dirs_are_unique() -> None:
    dirs = [parsed(name).output_dir for name in PAPER_SCRIPTS]
    assert len(set(dirs)) == len(dirs)


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_SCRIPTS)
def test_bad_arguments_print_usage(name: str) -> None:
    for argv in ((DATA, "8"), ("--dry-run", DATA, "8"), ("--dry-run", DATA, "eight", OUT), ()):
        proc = run_script(name, *argv)
        assert proc.returncode != 0 and "usage: bash" in proc.stderr and not proc.stdout, argv


@pytest.mark.slow
def test_num_gpus_sets_the_process_count_and_the_delta_t_hint() -> None:
    torchrun, _ = launch("svite_small_sparse50", "4")
    assert "--nproc_per_node=4" in torchrun
    proc = run_script("svite_small_sparse50", "--dry-run", DATA, "4", OUT)
    assert "--update_frequency 30000" in proc.stderr  # half the GPUs: twice the steps per epoch
    proc = run_script("nvit_base_global", "--dry-run", DATA, "4", OUT)
    assert "--prune-every 200" in proc.stderr


@pytest.mark.slow
def test_the_global_pruning_script_refuses_without_its_weights_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEIT_B_WEIGHTS")
    for weights in (None, "/no/such/deit_b.pth"):
        if weights is not None:
            monkeypatch.setenv("DEIT_B_WEIGHTS", weights)
        proc = run_script("nvit_base_global", "--dry-run", DATA, "8", OUT)
        assert proc.returncode == 2 and not proc.stdout, weights
        assert "error:" in proc.stderr and "DEIT_B_WEIGHTS" in proc.stderr and BASE_DISTILLED in proc.stderr


@pytest.mark.slow
def test_rerun_resumes_and_extra_flags_override(tmp_path: Path) -> None:
    run_dir = tmp_path / "s2vite_small_sparse40"
    run_dir.mkdir()
    (run_dir / "checkpoint.pth").touch()
    _, args = launch("s2vite_small_sparse40", "8", str(tmp_path), "--epochs", "10")
    assert args.auto_resume
    assert run_dir_lib.checkpoint_to_resume(Path(args.output_dir), args.resume, args.auto_resume) == str(
        run_dir / "checkpoint.pth")
    assert args.epochs == 10


def test_reproduction_page_lists_every_paper_script() -> None:
    page = (ROOT / "docs" / "reproduction.md").read_text()
    missing = [name for name in PAPER_SCRIPTS if f"`cmd/{name}.sh`" not in page]
    assert not missing, f"docs/reproduction.md's table of paper configurations lacks: {missing}"
