"""benchmarks/gpu_check.py without a GPU: its plan holds valid flags, and a CPU-only machine gets a clear error."""
from __future__ import annotations

import pytest
import torch

import main as entry
import models
import sparselearning
from benchmarks import gpu_check
from benchmarks import run as bench_run


def test_plan_covers_every_mode_under_both_amp_dtypes_and_nccl_only_with_two_gpus() -> None:
    one, two = gpu_check.plan(1), gpu_check.plan(2)
    names = [c.name for c in one]
    assert names == [f"train/{m}/{a}" for m in ("dense", "unstructured", "structured", "tokens",
                                                "tokens+unstructured") for a in ("bf16", "fp16")] + [
        "compile", "resume", "suite"]
    assert [c.name for c in two] == names[:-1] + ["nccl", "nccl+compile", "suite"]


@pytest.mark.parametrize("check", [c for c in gpu_check.plan(2) if c.kind != "suite"], ids=lambda c: c.name)
def test_every_training_check_is_a_valid_main_py_command_line(check: gpu_check.Check) -> None:
    args = entry.get_args_parser().parse_args(check.flags)
    assert args.model == "deit_small_patch16_224" and args.device == "cuda" and args.amp is True
    sparse = sparselearning.SparsityConfig.from_args(args)
    tokens = models.TokenConfig.from_args(args)
    mode = check.name.split("/")[1] if "/" in check.name else "unstructured"
    if check.name == "compile":
        mode = "dense"
    assert sparse.enabled == (mode != "dense" and mode != "tokens")
    assert sparse.structured == (mode == "structured")
    assert tokens.enabled == mode.startswith("tokens")
    assert args.compile == check.name.endswith("compile")


def test_suite_check_is_a_valid_quick_suite() -> None:
    suite = gpu_check.plan(1)[-1]
    args = bench_run.resolve(bench_run.get_args_parser().parse_args(suite.flags), torch.device("cuda"))
    assert args.suite and args.compile is False and args.repeats == 1 and args.tag == "gpu-check"
    full = gpu_check.plan(1, full_suite=True)[-1]
    assert full.flags == ("--suite", "--model", "deit_small_patch16_224")


def test_cpu_only_machine_gets_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--csv", str(tmp_path / "x.csv")])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "needs an NVIDIA GPU" in message and "--dry-run" in message
    assert not (tmp_path / "x.csv").exists()


def test_dry_run_prints_the_plan_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check.main(["--dry-run", "--model", "deit_tiny_patch16_224"]) is None
    out = capsys.readouterr().out
    assert out.count("deit_tiny_patch16_224") == len(gpu_check.plan(2)) and "nccl" in out


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        gpu_check.get_args_parser().parse_args(["--budget-s", "soon"])
