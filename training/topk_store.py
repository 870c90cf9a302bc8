"""Stored teacher outputs (TinyViT): the directory format, what a record means, its writer and its reader.

A directory holds ``header.json`` and, for each rank r, two files of fixed-size little-endian records:

- ``rank{r}.samples``: one record per image and epoch, in the rank's sampler order: the teacher's top-K
  probabilities (float16), their classes (int16, int32 above 32,767 classes), the image's augmentation seed (uint64,
  training/resumable_loader.py's ``sample_seed``) and its dataset index (int32). Record n is epoch
  ``n // (steps_per_epoch · batch_size)`` at position ``n % (steps_per_epoch · batch_size)``.
- ``rank{r}.mixup`` (when mixup or cutmix is on): one record per step: the step's mixup/cutmix draws
  (training/mixup_replay.py's ``MIX_RECORD``: λ, cutmix or not, the box; one per batch, pair or sample by mode).

Fixed sizes make the records of (epoch, position) a seek, so a resumed epoch reads from its first unfinished batch.
The header records what the outputs were computed for; a run that reads them must match it (``check_header``).
A rank writes ``.partial`` files and renames them when they are complete, so a missing file is an unfinished save.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.mixup_replay import MIX_RECORD, draws_per_step
from training.resumable_loader import sample_seed

FORMAT = 1
HEADER = "header.json"
PARTIAL = ".partial"


def sample_record(k: int, num_classes: int) -> np.dtype:
    """The record of one image-epoch: 4·K + 12 bytes below 32,768 classes (52 bytes at K = 10)."""
    classes = "<i2" if num_classes <= np.iinfo(np.int16).max else "<i4"
    return np.dtype([("prob", "<f2", (k,)), ("cls", classes, (k,)), ("seed", "<u8"), ("index", "<i4")])


def file_bytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    """The size of a complete file of records."""
    return dtype.itemsize * int(np.prod(shape))


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The K most probable classes of teacher logits [B, C]: (float32 probabilities [B, K], classes [B, K])."""
    return logits.float().softmax(dim=1).topk(k, dim=1)


def topk_target(probs: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """TinyViT's target [B, C] from top-K probabilities and classes [B, K]: the K stored probabilities, and the
    mass they leave spread evenly over the other classes (none left when float16 rounding sums them past 1)."""
    probs = probs.float()
    others = max(num_classes - probs.shape[1], 1)
    rest = (1.0 - probs.sum(dim=1, keepdim=True)).clamp_min(0.0) / others
    return rest.expand(-1, num_classes).scatter(1, classes.long(), probs)


def topk_log_target(probs: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``log(topk_target)``: teacher logits whose softmax is the target. A class without mass gets the smallest
    normal float, not 0, so the KL term stays finite (its weight exp(log p) is 0 to float32 precision anyway)."""
    return topk_target(probs, classes, num_classes).clamp_min(torch.finfo(torch.float32).tiny).log()


@dataclass(frozen=True)
class TopKHeader:
    """What a directory of stored outputs was written for. A run that trains from it must match every field, except
    that it may train fewer ``epochs`` and ``teacher`` is for the record.

    Args:
        k: probabilities kept per image.
        num_classes: the dataset's classes.
        epochs: epochs stored.
        world_size: processes (one file pair each; each holds its own sampler shard).
        dataset_length: training images.
        batch_size: per process; with drop_last it fixes ``steps_per_epoch`` and which images a step mixes.
        steps_per_epoch: optimizer steps (batches) per epoch and process.
        seed: ``--seed``: the sampler order and every image's augmentation seed.
        augmentation: the data settings that change a training image, and the sampler (``repeated_aug``).
        mixup: timm ``Mixup``'s settings and the pairing, or None when neither mixup nor cutmix is on.
        teacher: which teacher wrote the outputs.
    """

    k: int
    num_classes: int
    epochs: int
    world_size: int
    dataset_length: int
    batch_size: int
    steps_per_epoch: int
    seed: int
    augmentation: dict[str, Any]
    mixup: dict[str, Any] | None
    teacher: str = ""
    format: int = FORMAT

    @property
    def samples_per_epoch(self) -> int:
        """Records per epoch and rank (the images of the epoch's full batches)."""
        return self.steps_per_epoch * self.batch_size

    @property
    def sample_dtype(self) -> np.dtype:
        return sample_record(self.k, self.num_classes)

    @property
    def draws_per_step(self) -> int:
        return draws_per_step(self.mixup["mode"], self.batch_size) if self.mixup else 0

    def files(self, rank: int) -> dict[str, tuple[str, np.dtype, tuple[int, ...]]]:
        """Rank ``rank``'s files: "samples" (and "mixup") -> (file name, record dtype, array shape)."""
        files = {"samples": (f"rank{rank}.samples", self.sample_dtype, (self.epochs, self.samples_per_epoch))}
        if self.mixup:
            files["mixup"] = (f"rank{rank}.mixup", MIX_RECORD,
                              (self.epochs, self.steps_per_epoch, self.draws_per_step))
        return files

    def to_json(self) -> str:
        record = dataclasses.asdict(self)
        record["records"] = {"samples": self.sample_dtype.descr, "mixup": MIX_RECORD.descr if self.mixup else None}
        return json.dumps(record, indent=2)


def read_header(directory: Path) -> TopKHeader:
    """The header of a directory of stored outputs; an error says what is missing and how to write one."""
    path = directory / HEADER
    if not path.is_file():
        what = "does not exist" if not directory.exists() else f"has no {HEADER}"
        raise ValueError(f"--teacher-topk {directory} {what}: it is not a directory of stored teacher outputs; write "
                         "one with --save-teacher-topk DIR (and the same training flags)")
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"--teacher-topk {directory} has format {record.get('format')}, this code reads format "
                         f"{FORMAT}; write the outputs again with --save-teacher-topk")
    record.pop("records", None)
    return TopKHeader(**record)


def _plain(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so that stored and expected fields compare."""
    return json.loads(json.dumps(value))


def check_header(stored: TopKHeader, expected: TopKHeader, directory: Path) -> None:
    """Refuse stored outputs that were not computed for this run, listing every difference as stored → this run."""
    differences = []
    for field in dataclasses.fields(TopKHeader):
        name = field.name
        old, new = _plain(getattr(stored, name)), _plain(getattr(expected, name))
        if name == "teacher" or (name == "epochs" and old >= new) or (name == "k" and new is None) or old == new:
            continue  # a run that does not ask for a K (new is None) takes the stored one
        if name == "augmentation" or name == "mixup":
            old, new = old or {}, new or {}
            differences += [f"{name} {key} {old.get(key)} → {new.get(key)}" for key in sorted(old.keys() | new.keys())
                            if old.get(key) != new.get(key)]
        else:
            differences.append(f"{name.replace('_', ' ')} {old} → {new}")
    if differences:
        raise ValueError(f"--teacher-topk {directory} was written for another run (stored → this run): "
                         f"{'; '.join(differences)}. Train with the flags it was saved with (--teacher-topk-k, "
                         "--epochs at most the stored ones, the same processes, batch size, seed, data and mixup), or "
                         "save the outputs again with --save-teacher-topk")


class TopKWriter:
    """Appends one rank's records in order: every step of every epoch, then ``close`` makes the files final."""

    def __init__(self, directory: Path, header: TopKHeader, rank: int) -> None:
        self.directory, self.header, self.rank = directory, header, rank
        self.files = header.files(rank)
        for name, _, _ in self.files.values():
            for path in (directory / name, directory / (name + PARTIAL)):
                if path.exists():
                    raise ValueError(f"--save-teacher-topk {directory} already holds {path.name}; delete the directory "
                                     "or choose another one")
        if rank == 0:
            if (directory / HEADER).exists():
                raise ValueError(f"--save-teacher-topk {directory} already holds stored outputs ({HEADER}); delete "
                                 "the directory or choose another one")
            tmp = directory / (HEADER + PARTIAL)
            tmp.write_text(header.to_json())
            os.replace(tmp, directory / HEADER)
        self.handles = {kind: open(directory / (name + PARTIAL), "wb") for kind, (name, _, _) in self.files.items()}

    def write(self, keys: list[tuple[int, int, int]], probs: torch.Tensor, classes: torch.Tensor,
              draws: np.ndarray | None) -> None:
        """One step: its images' sampler keys (epoch, position, dataset index), the teacher's top-K probabilities
        and classes [B, K], and the step's mixup draws (None without mixup)."""
        records = np.zeros(len(keys), dtype=self.header.sample_dtype)
        records["prob"] = probs.detach().to("cpu", torch.float16).numpy()
        records["cls"] = classes.detach().cpu().numpy()
        records["seed"] = [sample_seed(self.header.seed, self.rank, epoch, position) for epoch, position, _ in keys]
        records["index"] = [index for _, _, index in keys]
        self.handles["samples"].write(records.tobytes())
        if "mixup" in self.handles:
            self.handles["mixup"].write(draws.astype(MIX_RECORD).tobytes())

    def close(self) -> int:
        """Check that every record was written, sync, and rename the files to their final names; returns bytes."""
        written = 0
        for kind, handle in self.handles.items():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            name, dtype, shape = self.files[kind]
            size = (self.directory / (name + PARTIAL)).stat().st_size
            if size != file_bytes(dtype, shape):
                raise RuntimeError(f"{name}: wrote {size} bytes, expected {file_bytes(dtype, shape)}")
            os.replace(self.directory / (name + PARTIAL), self.directory / name)
            written += size
        return written


@dataclass(frozen=True)
class StoredBatch:
    """The records of one step: its images' ``sample_record``s [B] and its mixup draws (None without mixup)."""

    records: np.ndarray
    draws: np.ndarray | None


class TopKStore:
    """One rank's stored outputs, checked against the run that reads them and read by (epoch, position)."""

    def __init__(self, directory: Path, expected: TopKHeader, rank: int) -> None:
        self.header = read_header(directory)
        check_header(self.header, expected, directory)
        self.rank = rank
        for other in range(self.header.world_size):  # every rank's, so that no rank starts while another cannot
            for name, dtype, shape in self.header.files(other).values():
                path = directory / name
                if not path.is_file():
                    state = "did not finish" if (directory / (name + PARTIAL)).exists() else "is missing"
                    raise ValueError(f"--teacher-topk {directory} is incomplete: {name} {state}; save the outputs "
                                     "again with --save-teacher-topk")
                size, expected_size = path.stat().st_size, file_bytes(dtype, shape)
                if size != expected_size:
                    raise ValueError(f"--teacher-topk {directory} is damaged: {name} holds {size} bytes, the header "
                                     f"asks for {expected_size}; save the outputs again with --save-teacher-topk")
        self.files = {kind: np.memmap(directory / name, dtype=dtype, mode="r", shape=shape)
                      for kind, (name, dtype, shape) in self.header.files(rank).items()}

    def batch(self, keys: list[tuple[int, int, int]]) -> StoredBatch:
        """The records of the step whose images have the sampler ``keys`` (epoch, position, dataset index), checked
        against them: the stored images must be the ones this run loads there, with the same augmentation seeds."""
        (epoch, first, _), size = keys[0], self.header.batch_size
        positions, indices = [p for _, p, _ in keys], [i for _, _, i in keys]
        if first % size or positions != list(range(first, first + size)):
            raise ValueError(f"positions {positions[0]}..{positions[-1]} of epoch {epoch} are not one batch of {size}")
        records = np.array(self.files["samples"][epoch, first:first + size])
        seeds = [sample_seed(self.header.seed, self.rank, epoch, p) for p in positions]
        if records["index"].tolist() != indices or records["seed"].tolist() != seeds:
            raise ValueError(f"the stored teacher outputs of epoch {epoch}, positions {first}..{positions[-1]} are for "
                             f"other images (stored indices {records['index'][:4].tolist()}..., this run loads "
                             f"{indices[:4]}...): the data order or seeds differ from the save's")
        draws = np.array(self.files["mixup"][epoch, first // size]) if "mixup" in self.files else None
        return StoredBatch(records, draws)
