"""What distillation costs per training step: none, a live teacher, or stored teacher outputs (TinyViT); and the
disk the stored outputs take.

    OMP_NUM_THREADS=1 python benchmarks/distillation.py          # CPU: DeiT-S student, DeiT-B teacher, batch 32

Every mode is the project's training step, ``engine.train_one_epoch`` with the StepContext ``build_run`` assembles,
mixup and cutmix on as DeiT trains, soft distillation (α 0.5, τ 1) where there is a teacher:

- ``none``: no teacher (the criterion is the plain soft-target loss);
- ``live``: the teacher model runs on every batch (``--teacher-path``);
- ``stored``: a ``--teacher-topk`` run: records read from a directory that ``TopKWriter`` wrote, through
  ``StoredBatches``, ``ReplayedMixup`` and ``StoredTeacher`` (no teacher in memory).

Weights are random (only time is measured) and the batch is one random batch on the device. The modes are timed
interleaved by ``benchmarks.timing.measure``; ratios are per repeat, then the median. On CPU the protocol of the
other CPU benchmarks: one thread, timed on the process CPU clock. Writes ``<device>-distillation.csv`` and ``.md``
into benchmarks/results/.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `python benchmarks/distillation.py` puts benchmarks/, not the root, on the path

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
from benchmarks import env, report  # noqa: E402
from benchmarks.steps import engine_train_run, random_batch  # noqa: E402
from benchmarks.timing import Run, Timing, measure, paired_ratios  # noqa: E402
from training.assemble import (MixupConfig, ModelConfig, PrecisionConfig, RunConfig, ScheduleConfig,  # noqa: E402
                               build_criterion, build_mixup, build_run)
from training.distillation import DistillationLoss  # noqa: E402
from training.loaders import LoaderConfig  # noqa: E402
from training.mixup_replay import draw  # noqa: E402
from training.process import Process  # noqa: E402
from training.teacher_topk import PAIRING, ReplayedMixup, StoredBatches, StoredTeacher  # noqa: E402
from training.topk_store import TopKHeader, TopKStore, TopKWriter, teacher_topk  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODES = ("none", "live", "stored")
MIXUP = MixupConfig(mixup=0.8, cutmix=1.0, smoothing=0.1)  # DeiT's recipe
IMAGENET_IMAGES, IMAGENET_CLASSES = 1_281_167, 1000
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
COLUMNS = ("student", "teacher", "mode", "batch_size", "img_size", "precision", "train_samples_per_sec",
           "train_samples_per_sec_min", "train_samples_per_sec_max", "train_step_time", "step_time_ratio",
           "step_time_ratio_min", "step_time_ratio_max", "repeats", "clock", "k", "record_bytes", "device", "threads",
           "torch", "timm", "python", "date")


class KeyedCopies:
    """Copies of one batch, seen as a training loader by ``StoredBatches``: a batch size and a sampler of the
    (epoch, position, dataset index) keys of epoch 0."""

    def __init__(self, copies: list, batch_size: int) -> None:
        self.copies, self.batch_size = copies, batch_size
        self.sampler = [(0, p, p) for p in range(len(copies) * batch_size)]

    def __iter__(self):
        return iter(self.copies)

    def __len__(self) -> int:
        return len(self.copies)


def write_store(directory: Path, steps: int, batch_size: int, img_size: int, num_classes: int, k: int) -> TopKStore:
    """Records for ``steps`` steps of epoch 0 (random teacher logits, timm's mixup draws), written and reopened as a
    ``--teacher-topk`` run reads them."""
    header = TopKHeader(k=k, num_classes=num_classes, epochs=1, world_size=1, dataset_length=steps * batch_size,
                        batch_size=batch_size, steps_per_epoch=steps, seed=0, augmentation={},
                        mixup={"mixup": MIXUP.mixup, "cutmix": MIXUP.cutmix, "mode": MIXUP.mode, "pairing": PAIRING},
                        teacher="random logits")
    writer = TopKWriter(directory, header, rank=0)
    mixup = build_mixup(MIXUP, num_classes)
    for step in range(steps):
        keys = [(0, p, p) for p in range(step * batch_size, (step + 1) * batch_size)]
        probs, classes = teacher_topk(torch.randn(batch_size, num_classes), k)
        writer.write(keys, probs, classes, draw(mixup, (batch_size, 3, img_size, img_size)))
    writer.close()
    return TopKStore(directory, header, rank=0)


def build_runs(student: str, teacher_name: str, batch_size: int, img_size: int, device: torch.device,
               store: TopKStore) -> dict[str, Run]:
    """The three modes' training steps, each on its own student (same initial weights, own optimizer)."""
    batch = random_batch(batch_size, img_size, IMAGENET_CLASSES, device)
    base = build_criterion(MIXUP)
    teacher = models.create_model(teacher_name, num_classes=IMAGENET_CLASSES, img_size=img_size)
    teacher = teacher.to(device).eval().requires_grad_(False)
    batches = StoredBatches(KeyedCopies([], batch_size), store)

    def stored_loader(copies: list) -> StoredBatches:
        batches.loader = KeyedCopies(copies, batch_size)
        return batches

    runs = {}
    for mode in MODES:
        torch.manual_seed(0)
        cfg = RunConfig(model=ModelConfig(student, num_classes=IMAGENET_CLASSES, img_size=img_size),
                        loader=LoaderConfig(batch_size), total_steps=10**9, schedule=ScheduleConfig(warmup_epochs=0),
                        precision=PrecisionConfig(amp=False, opt_fused=False), mixup=MIXUP)
        run = build_run(cfg, Process(0, 1, device), log_fn=lambda record: None)
        ctx = run.step_context()
        if mode == "none":
            runs[mode] = engine_train_run(run.forward_model, ctx, batch, device, run.criterion)
        elif mode == "live":
            criterion = DistillationLoss(base, teacher, "soft", alpha=0.5, tau=1.0)
            runs[mode] = engine_train_run(run.forward_model, ctx, batch, device, criterion)
        else:
            ctx.mixup_fn = ReplayedMixup(batches, MIXUP.mode, IMAGENET_CLASSES, MIXUP.smoothing)
            criterion = DistillationLoss(base, StoredTeacher(batches, IMAGENET_CLASSES), "soft", alpha=0.5, tau=1.0)
            runs[mode] = engine_train_run(run.forward_model, ctx, batch, device, criterion, loader=stored_loader)
    return runs


def rows(timings: dict[str, Timing], args: argparse.Namespace, device: torch.device, record_bytes: int) -> list[dict]:
    """One row per mode: samples/s and step time, and the step time over ``none``'s, paired by repeat."""
    reference = timings["none"]
    out = []
    for mode, timing in timings.items():
        train = report.phase_columns("train", timing, reference, args.img_size)
        time_ratios = paired_ratios(reference, timing)  # none's samples/s over this mode's = this step time / none's
        out.append({"student": args.student, "teacher": args.teacher if mode == "live" else
                    ("stored top-K" if mode == "stored" else "-"), "mode": mode, "batch_size": args.batch_size,
                    "img_size": args.img_size, "precision": "float32",
                    **{key: train[key] for key in ("train_samples_per_sec", "train_samples_per_sec_min",
                                                   "train_samples_per_sec_max", "train_step_time")},
                    "step_time_ratio": round(float(np.median(time_ratios)), 4),
                    "step_time_ratio_min": round(min(time_ratios), 4), "step_time_ratio_max": round(max(time_ratios), 4),
                    "repeats": args.repeats, "clock": args.clock, "k": args.k,
                    "record_bytes": record_bytes if mode == "stored" else "", **env.environment(device)})
    return out


def disk_lines(record_bytes: int, k: int, epochs: int, world: int, global_batch: int) -> list[str]:
    """Bytes per image-epoch, and the projection for ImageNet-1k (records plus the per-step mixup draws)."""
    steps_per_rank = -(-IMAGENET_IMAGES // world) // (global_batch // world)  # DistributedSampler pads, drop_last
    records = IMAGENET_IMAGES * epochs * record_bytes
    draws = world * steps_per_rank * epochs * 25  # MIX_RECORD: one 25-byte draw per step in mixup mode batch
    return [f"- one image-epoch: {record_bytes} bytes (top-{k}: {2 * k} bytes float16 probabilities, {2 * k} bytes "
            "int16 classes, 8 bytes uint64 augmentation seed, 4 bytes int32 dataset index)",
            f"- ImageNet-1k ({IMAGENET_IMAGES:,} images) × {epochs} epochs: {records:,} bytes of records "
            f"({records / 1e9:.2f} GB, {records / 2**30:.2f} GiB), plus {draws:,} bytes of mixup draws "
            f"({world} processes × {steps_per_rank:,} steps × {epochs} epochs × 25 bytes at global batch "
            f"{global_batch}); TinyViT reports 16 GB for its 44-byte records (no index, a 4-byte seed)"]


def markdown(table: list[dict], command: str, disk: list[str]) -> str:
    env_line = ", ".join(f"{c} {table[0][c]}" for c in ("device", "threads", "torch", "timm", "python", "date"))
    lines = [f"- command: `{command}`", f"- {env_line}, clock {table[0]['clock']}", "",
             f"Training step of `{table[0]['student']}` at batch {table[0]['batch_size']}, {table[0]['img_size']} px, "
             "float32, mixup + cutmix, soft distillation (α 0.5, τ 1) with a teacher; random weights. samples/s: "
             "median over repeats (min-max); step-time ratio: this mode's step time over `none`'s in the same "
             "interleaved repeat, median (min-max). Goal: stored ≤ 1.10.", "",
             "| mode | teacher | samples/s | ms/step | step time / none |", "|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['mode']} | {r['teacher']} | {r['train_samples_per_sec']} ({r['train_samples_per_sec_min']}"
                     f"-{r['train_samples_per_sec_max']}) | {float(r['train_step_time']):.0f} | "
                     f"{float(r['step_time_ratio']):.3f} ({float(r['step_time_ratio_min']):.3f}-"
                     f"{float(r['step_time_ratio_max']):.3f}) |")
    return "\n".join(lines + ["", "Disk for stored outputs:", "", *disk]) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="deit_small_patch16_224", choices=models.MODEL_NAMES)
    parser.add_argument("--teacher", default="deit_base_patch16_224", choices=models.MODEL_NAMES)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--k", type=int, default=10, help="stored probabilities per image")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (the CPU benchmarks use 1)")
    parser.add_argument("--clock", default="cpu", choices=tuple(CLOCKS),
                        help="cpu: this process's CPU time (CPU, one thread); wall: perf_counter (GPU)")
    parser.add_argument("--num-warm-iter", type=int, default=1)
    parser.add_argument("--num-bench-iter", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=300, help="epochs of the ImageNet-1k disk projection")
    parser.add_argument("--world", type=int, default=8, help="processes of the projection (DeiT: 8 GPUs)")
    parser.add_argument("--global-batch", type=int, default=1024, help="global batch of the projection (DeiT: 1024)")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default results/<device>-distillation.csv)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("--clock cpu measures one CPU thread: pass --device cpu --threads 1, or --clock wall")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp), max(args.num_warm_iter, args.num_bench_iter), args.batch_size, args.img_size,
                            IMAGENET_CLASSES, args.k)
        runs = build_runs(args.student, args.teacher, args.batch_size, args.img_size, device, store)
        timings = measure(runs, batch_size=args.batch_size, num_warm_iter=args.num_warm_iter,
                          num_bench_iter=args.num_bench_iter, repeats=args.repeats, sync=sync,
                          clock=CLOCKS[args.clock])
        record_bytes = store.header.sample_dtype.itemsize
    table = rows(timings, args, device, record_bytes)
    out = args.out or RESULTS / f"{env.device_slug(device)}-distillation.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    command = "python benchmarks/distillation.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    text = markdown(table, command.strip(), disk_lines(record_bytes, args.k, args.epochs, args.world,
                                                       args.global_batch))
    out.with_suffix(".md").write_text(text)
    print(text)
    return table


if __name__ == "__main__":
    main()
