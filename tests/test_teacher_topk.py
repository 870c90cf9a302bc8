"""Stored teacher outputs (TinyViT): the replayed images are bit for bit those the teacher saw, mixup and cutmix
included, also from a mid-epoch resume; the stored target is the teacher's top-K with the rest spread evenly; a
directory written for another run, or not finished, is refused with a message."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import Mixup
from safetensors.torch import save_file
from timm.data.mixup import mixup_target

import main
import models
from datasets import DataConfig
from tests.conftest import TINY_RUN
from training.assemble import MixupConfig, build_criterion, build_mixup
from training.distillation import DistillationConfig, DistillationLoss
from training.loaders import LoaderConfig, build_train_loader
from training.mixup_replay import draw, mix
from training.save_topk import save_outputs
from training.teacher_topk import ReplayedMixup, StoredTeacher, describe_run, replay
from training.topk_store import HEADER, TopKWriter, sample_record, teacher_topk, topk_log_target, topk_target

MIXUPS = {"mixup+cutmix": dict(mixup_alpha=0.8, cutmix_alpha=1.0), "mixup": dict(mixup_alpha=0.8),
          "cutmix-minmax": dict(mixup_alpha=0.0, cutmix_minmax=(0.2, 0.8)),
          "half": dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.5)}


@pytest.mark.parametrize("mode", ("batch", "pair", "elem"))
@pytest.mark.parametrize("settings", MIXUPS.values(), ids=MIXUPS.keys())
def test_a_stored_draw_mixes_as_timm_mixup_does(mode, settings):
    mixup = Mixup(mode=mode, num_classes=10, label_smoothing=0.1, **settings)
    for seed in range(8):
        x, y = torch.randn(6, 3, 12, 12), torch.randint(0, 10, (6,))
        np.random.seed(seed)
        timm_x, timm_y = mixup(x.clone(), y)
        np.random.seed(seed)
        draws = draw(mixup, tuple(x.shape))
        stored = np.frombuffer(draws.tobytes(), dtype=draws.dtype)  # as it reads back from disk
        ours = x.clone()
        lam = mix(ours, stored, mode)
        assert torch.equal(ours, timm_x) and torch.equal(mixup_target(y, 10, lam, 0.1), timm_y)


def test_the_target_is_the_top_k_with_the_rest_spread_evenly():
    logits = torch.tensor([[4.0, 1.0, 3.0, 0.0, 2.0]])
    probs, classes = teacher_topk(logits, 2)
    assert classes.tolist() == [[0, 2]]
    target = topk_target(probs, classes, 5)
    p = logits.softmax(1)[0]
    rest = (1 - p[0] - p[2]) / 3
    torch.testing.assert_close(target[0], torch.stack([p[0], rest, p[2], rest, rest]))
    assert torch.allclose(topk_log_target(probs, classes, 5).exp(), target)
    everything = topk_log_target(*teacher_topk(logits, 5), 5)  # K = C: no rest, the softmax itself
    torch.testing.assert_close(everything.softmax(1), logits.softmax(1))
    over = topk_log_target(torch.tensor([[0.75, 0.2505]]).half(), torch.tensor([[1, 0]]), 4)  # fp16 sum past 1
    assert torch.isfinite(over).all() and over.exp()[0, 2:].max() < 1e-30


def test_records_are_fixed_size():
    assert sample_record(10, 1000).itemsize == 52  # 10 x float16 + 10 x int16 + uint64 seed + int32 index
    assert sample_record(10, 40000).itemsize == 72  # int32 classes above 32,767


class RecordingTeacher(torch.nn.Module):
    """A random micro ViT that keeps every batch it is shown."""

    def __init__(self) -> None:
        super().__init__()
        self.model = models.create_model("vit_digits_micro", num_classes=10).eval()
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        return self.model(x)


# DIGITS with its default augmentation (RandAugment, random erasing, flips) and timm's mixup + cutmix: the images
# the teacher sees depend on every seeded draw.
AUGMENTED = (*TINY_RUN, "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25", "--aa", "rand-m9-mstd0.5-inc1",
             "--hflip", "0.5", "--batch-size", "64")
EPOCHS = 2


def run_configs(*extra: str):
    args = main.get_args_parser().parse_args([*AUGMENTED, "--input-size", "16", *extra])
    return DataConfig.from_args(args), LoaderConfig.from_args(args), MixupConfig.from_args(args)


def loader_and_header(epochs: int = EPOCHS, k: int | None = 3, *extra: str):
    data, loader_cfg, mixup = run_configs(*extra)
    loader, num_classes = build_train_loader(data, loader_cfg, rank=0, world=1)
    return loader, describe_run(data, loader_cfg, mixup, loader, epochs=epochs, world=1, num_classes=num_classes, k=k,
                                teacher="random vit_digits_micro"), mixup


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, RecordingTeacher]:
    directory = tmp_path_factory.mktemp("topk")
    loader, header, mixup_cfg = loader_and_header()
    teacher = RecordingTeacher()
    np.random.seed(0)
    writer = TopKWriter(directory, header, rank=0)
    save_outputs(teacher, loader, build_mixup(mixup_cfg, 10), writer, torch.device("cpu"), None)
    writer.close()
    return directory, teacher


def test_replayed_images_are_the_ones_the_teacher_saw_also_after_a_resume(saved):
    directory, teacher = saved
    loader, expected, mixup_cfg = loader_and_header(k=None)
    batches, mixup_fn, stored_teacher = replay(directory, loader, expected, 0, mixup_cfg, 10)
    steps = len(batches)
    assert len(teacher.seen) == EPOCHS * steps
    np.random.seed(12345)  # a different global stream: the replay must not draw from it
    for epoch, first_batch in ((0, 0), (1, 5)):  # epoch 1 as a resume from a checkpoint after its 5th batch
        batches.sampler.set_epoch(epoch)
        batches.sampler.skip_batches(first_batch)
        replayed = 0
        for step, (samples, targets) in enumerate(batches, start=first_batch):
            seen = teacher.seen[epoch * steps + step]
            samples, targets = mixup_fn(samples, targets)
            assert torch.equal(samples, seen), f"epoch {epoch} step {step}"
            assert targets.shape == (samples.shape[0], 10)
            expected_logits = topk_log_target(*teacher_topk(teacher.model(seen), 3), 10)
            torch.testing.assert_close(stored_teacher(samples), expected_logits, atol=2e-3, rtol=2e-3)  # float16
            replayed += 1
        assert replayed == steps - first_batch
    with pytest.raises(RuntimeError, match="no stored batch"):
        stored_teacher(samples)


def test_a_directory_for_another_run_or_unfinished_is_refused(saved, tmp_path):
    directory, _ = saved
    loader, expected, mixup_cfg = loader_and_header(k=None)

    def refused(header, match, where=directory):
        with pytest.raises(ValueError, match=match):
            replay(where, loader, header, 0, mixup_cfg, 10)

    refused(replace(expected, epochs=EPOCHS + 1), "epochs 2 → 3")
    refused(replace(expected, world_size=2), "world size 1 → 2")
    refused(replace(expected, dataset_length=1000), "dataset length 1437 → 1000")
    refused(replace(expected, k=5), "k 3 → 5")
    _, other_mixup, _ = loader_and_header(EPOCHS, None, "--cutmix", "0")
    refused(other_mixup, "mixup cutmix 1.0 → 0.0")
    _, no_erasing, _ = loader_and_header(EPOCHS, None, "--reprob", "0")
    refused(no_erasing, "augmentation reprob 0.25 → 0.0")
    replay(directory, loader, replace(expected, epochs=1), 0, mixup_cfg, 10)  # fewer epochs than stored: fine

    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    (copy / "rank0.mixup").rename(copy / "rank0.mixup.partial")
    refused(expected, "incomplete: rank0.mixup did not finish", copy)
    (copy / "rank0.mixup.partial").unlink()
    refused(expected, "incomplete: rank0.mixup is missing", copy)
    shutil.copy(directory / "rank0.mixup", copy / "rank0.mixup")
    with open(copy / "rank0.samples", "r+b") as f:
        f.truncate(1000)
    refused(expected, "damaged: rank0.samples holds 1000 bytes", copy)
    (copy / HEADER).unlink()
    refused(expected, "not a directory of stored teacher outputs", copy)
    header = json.loads((directory / HEADER).read_text())
    assert header["records"]["samples"][0] == ["prob", "<f2", [3]] and header["mixup"]["mode"] == "batch"


@pytest.mark.parametrize("kind", ("soft", "hard"))
def test_the_stored_loss_is_the_live_teachers_restricted_to_its_top_k(saved, kind):
    directory, teacher = saved
    loader, expected, mixup_cfg = loader_and_header(k=None)
    batches, mixup_fn, stored_teacher = replay(directory, loader, expected, 0, mixup_cfg, 10)
    student = models.create_model("vit_digits_micro", num_classes=10)
    base = build_criterion(mixup_cfg)
    stored = DistillationLoss(base, stored_teacher, kind, alpha=0.5, tau=2.0)
    live = DistillationLoss(base, lambda x: topk_log_target(*teacher_topk(teacher.model(x), 3), 10), kind, 0.5, 2.0)
    batches.sampler.set_epoch(1)
    for step, (samples, targets) in zip(range(3), batches):
        samples, targets = mixup_fn(samples, targets)
        outputs = student(samples)
        torch.testing.assert_close(stored(samples, outputs, targets), live(samples, outputs, targets), rtol=1e-3,
                                   atol=1e-4)
        assert stored(samples, outputs, targets) != base(outputs, targets)


def test_main_saves_the_outputs_then_trains_from_them_as_from_the_live_teacher(tmp_path):
    """With K = the 10 classes the stored target is the teacher's softmax, and the save draws mixup from the stream
    training draws from: one epoch from stored outputs trains as one epoch with the teacher in memory."""
    teacher = models.create_model("vit_digits_micro", num_classes=10)
    save_file(teacher.state_dict(), tmp_path / "teacher.safetensors")
    common = [*AUGMENTED, "--epochs", "1", "--batch-size", "32"]
    live_teacher = ["--teacher-path", str(tmp_path / "teacher.safetensors"), "--teacher-model", "vit_digits_micro"]

    def main_run(*flags: str) -> tuple[dict, list]:
        runs = []
        record = main.main(main.get_args_parser().parse_args([*common, *flags]), on_run=runs.append)
        return record, runs

    saved_record, _ = main_run(*live_teacher, "--save-teacher-topk", str(tmp_path / "topk"))
    assert saved_record["record_bytes"] == 52 and saved_record["bytes"] == 52 * 44 * 32 + 25 * 44
    stored, (run,) = main_run("--teacher-topk", str(tmp_path / "topk"), "--distillation-type", "soft",
                              "--output_dir", str(tmp_path / "stored"))
    assert isinstance(run.criterion.teacher, StoredTeacher) and isinstance(run.mixup_fn, ReplayedMixup)
    live, _ = main_run(*live_teacher, "--distillation-type", "soft", "--output_dir", str(tmp_path / "live"))
    assert stored["train_loss"] == pytest.approx(live["train_loss"], rel=1e-5)


def test_the_distillation_benchmark_times_the_three_modes_and_projects_the_disk(tmp_path):
    from benchmarks import distillation

    out = tmp_path / "micro-distillation.csv"
    table = distillation.main(["--student", "vit_digits_micro", "--teacher", "vit_digits_tiny", "--img-size", "16",
                               "--batch-size", "8", "--num-bench-iter", "1", "--repeats", "1", "--out", str(out)])
    assert [r["mode"] for r in table] == ["none", "live", "stored"] and table[0]["step_time_ratio"] == 1.0
    assert table[1]["step_time_ratio"] > 1.0  # the live teacher's forward pass costs time
    assert table[2]["record_bytes"] == 52 and out.read_text().count("\n") == 4
    assert "19,986,205,200 bytes of records" in out.with_suffix(".md").read_text()  # 1,281,167 × 300 × 52


def test_the_stored_teacher_flags_go_together():
    def config(*flags: str) -> DistillationConfig:
        return DistillationConfig.from_args(main.get_args_parser().parse_args(list(flags)))

    assert config("--teacher-topk", "d", "--distillation-type", "hard").teacher_topk == "d"
    for flags, match in ((("--teacher-topk", "d"), "--teacher-topk without --distillation-type"),
                         (("--teacher-topk", "d", "--distillation-type", "soft", "--teacher-path", "t.pth"),
                          "drop --teacher-path"),
                         (("--teacher-topk-k", "5",), "use it with --teacher-topk DIR or --save-teacher-topk"),
                         (("--distillation-type", "soft"), "or --teacher-topk DIR")):
        with pytest.raises(ValueError, match=match):
            config(*flags)
    with pytest.raises(ValueError, match="--save-teacher-topk runs a teacher: pass --teacher-path"):
        main.main(main.get_args_parser().parse_args([*TINY_RUN, "--save-teacher-topk", "d"]))
