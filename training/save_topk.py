"""``--save-teacher-topk DIR``: run the teacher over the training set as training will see it, and store its top-K
outputs (training/topk_store.py); no training happens. main.py hands over here.

The images are the training run's: its loader (sampler order and per-sample seeded augmentation,
training/resumable_loader.py) for ``--epochs`` epochs, and timm's mixup/cutmix, drawn from NumPy's generator seeded
as training seeds it, mixed on the device, with every step's draws stored beside the outputs. A run with
``--teacher-topk DIR`` and the same flags then replays exactly these images (training/teacher_topk.py).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
import torch.distributed as dist
from timm.data import Mixup
from torch.utils.data import DataLoader

import engine
import models
from datasets import DataConfig
from training import process, run_dir
from training.amp import choose_precision, device_supports_bf16
from training.assemble import MixupConfig, build_mixup
from training.loaders import LoaderConfig, build_train_loader
from training.mixup_replay import draw, mix
from training.teacher import load_teacher
from training.teacher_topk import DEFAULT_K, describe_run
from training.topk_store import TopKWriter, teacher_topk


def check_request(args: argparse.Namespace) -> None:
    """What --save-teacher-topk needs and refuses, before anything is read."""
    if not args.teacher_path:
        raise ValueError("--save-teacher-topk runs a teacher: pass --teacher-path FILE (and --teacher-model NAME for "
                         "a timm model)")
    for flag, given in (("--teacher-topk", args.teacher_topk), ("--resume", args.resume),
                        ("--auto-resume", args.auto_resume)):
        if given:
            raise ValueError(f"--save-teacher-topk writes stored outputs and trains nothing: drop {flag} (an "
                             "interrupted save starts again in an empty directory)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """main.py with --save-teacher-topk DIR: store the teacher's outputs for a run with these flags; returns what was
    written (this rank's bytes, the bytes of one image-epoch's record, the images per epoch and rank)."""
    check_request(args)
    proc = process.init_distributed(args.device, args.dist_url)
    process.seed_everything(args.seed + proc.rank)  # timm's mixup draws from NumPy's generator, seeded as in training
    if args.input_size is None:
        args.input_size = models.default_img_size(args.model)
    data, loader_cfg, mixup_cfg = DataConfig.from_args(args), LoaderConfig.from_args(args), MixupConfig.from_args(args)
    loader, num_classes = build_train_loader(data, loader_cfg, proc.rank, proc.world)
    k = DEFAULT_K if args.teacher_topk_k is None else args.teacher_topk_k
    if not 1 <= k <= num_classes:
        raise ValueError(f"--teacher-topk-k must be between 1 and the {num_classes} classes, got {k}")
    teacher = load_teacher(args.teacher_model, args.teacher_path, num_classes=num_classes, img_size=args.input_size,
                           device=proc.device)
    precision = choose_precision(proc.device.type, device_supports_bf16(proc.device), False, args.amp,
                                 args.amp_dtype, None)
    directory = run_dir.make_dir(args.save_teacher_topk, "--save-teacher-topk")
    header = describe_run(data, loader_cfg, mixup_cfg, loader, epochs=args.epochs, world=proc.world,
                          num_classes=num_classes, k=k, teacher=f"{args.teacher_model or 'the model'} of "
                                                                 f"{args.teacher_path}")
    writer = TopKWriter(directory, header, proc.rank)
    proc.say(f"storing the top-{k} outputs of {header.teacher} for {args.epochs} epoch(s) of {header.samples_per_epoch}"
             f" images per process in {directory}; AMP {precision.flags()['amp_dtype'] or 'off'}")
    save_outputs(teacher, loader, build_mixup(mixup_cfg, num_classes), writer, proc.device, precision.amp_dtype,
                 proc.say)
    written = writer.close()
    if proc.world > 1:
        dist.barrier()  # the directory is complete when every rank's files are
    proc.say(f"stored {written:,} bytes per process ({header.sample_dtype.itemsize} per image-epoch) in {directory}; "
             f"train with --teacher-topk {directory} and the same flags")
    return {"bytes": written, "record_bytes": header.sample_dtype.itemsize, "images": header.samples_per_epoch}


@torch.no_grad()
def save_outputs(teacher: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, mixup: Mixup | None,
                 writer: TopKWriter, device: torch.device, amp_dtype: torch.dtype | None,
                 say: Callable[[str], None] = lambda line: None) -> None:
    """Write the teacher's top-K for every step of ``writer.header.epochs`` epochs of ``loader`` (a resumable
    training loader), mixing each batch as training does; the caller closes ``writer``."""
    header = writer.header
    for epoch in range(header.epochs):
        loader.sampler.set_epoch(epoch)
        keys = list(loader.sampler)  # (epoch, position, dataset index) of every image, in the loader's order
        for step, (samples, _) in enumerate(loader):
            samples = samples.to(device, non_blocking=True)
            draws = None
            if mixup is not None:
                draws = draw(mixup, tuple(samples.shape))
                mix(samples, draws, mixup.mode)
            with engine.autocast(device, amp_dtype):
                logits = teacher(samples)
            probs, classes = teacher_topk(logits, header.k)
            writer.write(keys[step * header.batch_size:(step + 1) * header.batch_size], probs, classes, draws)
        say(f"epoch {epoch}: stored the teacher's top-{header.k} of {header.samples_per_epoch} images")
