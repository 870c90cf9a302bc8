"""Tests for datasets.py: the embedded DIGITS split, on-disk layouts built in tmp_path, and loud failures."""

import argparse
import os
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import datasets
from datasets import DATASETS, DataConfig, add_data_args, build_dataset, build_transform


def make_cfg(**overrides) -> DataConfig:
    """Parses the CLI defaults (plus `overrides`) the way main.py does, with augmentation that keeps tests quick."""
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    args = parser.parse_args([])
    for key, value in {"input_size": 16, "hflip": 0.0, **overrides}.items():
        setattr(args, key, value)
    return DataConfig.from_args(args)


def write_png(path: Path, size: int = 40, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def make_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 2) -> None:
    for split in ("train", "val"):
        for label, name in enumerate(classes):
            for i in range(per_class):
                write_png(root / split / name / f"{i}.png", value=60 * label + i)


# ---------------------------------------------------------------- CLI and config


def test_cli_defaults_and_flags():
    parser = argparse.ArgumentParser()
    add_data_args(parser)
    args = parser.parse_args([])
    # DeiT's 10 loader workers, capped at the CPUs here; pinned memory is decided by the device (None: not given)
    assert (args.data_set, args.data_path, args.input_size, args.num_workers, args.pin_mem) == (
        "DIGITS", None, 224, min(10, len(os.sched_getaffinity(0))), None)
    assert (args.aa, args.hflip, args.reprob, args.remode, args.recount) == ("rand-m9-mstd0.5-inc1", 0.5, 0.25,
                                                                            "pixel", 1)
    args = parser.parse_args(["--no-pin-mem", "--data-set", "IMNET", "--data-path", "/x", "--inat-category", "genus"])
    assert not args.pin_mem
    cfg = DataConfig.from_args(args)
    assert (cfg.data_set, cfg.data_path, cfg.inat_category) == ("IMNET", "/x", "genus")
    with pytest.raises(SystemExit):
        parser.parse_args(["--data-set", "MNIST"])


def test_unknown_data_set_lists_choices():
    with pytest.raises(ValueError, match=r"unknown --data-set 'CIFAR'.*IMNET, CIFAR10, CIFAR100, INAT18, INAT19"):
        make_cfg(data_set="CIFAR", data_path="/x")


def test_unknown_inat_category_lists_choices():
    with pytest.raises(ValueError, match=r"unknown --inat-category 'species'.*kingdom.*genus, name"):
        make_cfg(data_set="INAT18", data_path="/x", inat_category="species")


@pytest.mark.parametrize("data_set", [d for d in DATASETS if d != "DIGITS"])
def test_data_path_required(data_set):
    with pytest.raises(ValueError, match=rf"--data-set {data_set} needs --data-path; expected <data-path>/"):
        make_cfg(data_set=data_set)


def test_digits_rejects_data_path(tmp_path):
    with pytest.raises(ValueError, match="DIGITS is embedded .* takes no --data-path"):
        make_cfg(data_path=str(tmp_path))


@pytest.mark.parametrize("field, value", [("hflip", 1.5), ("reprob", -0.1), ("input_size", 0)])
def test_out_of_range_settings(field, value):
    with pytest.raises(ValueError, match=f"--{field.replace('_', '-')}"):
        make_cfg(**{field: value})


@pytest.mark.parametrize("data_set", [d for d in DATASETS if d != "DIGITS"])
def test_missing_root(tmp_path, data_set):
    cfg = make_cfg(data_set=data_set, data_path=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=r"absent does not exist.*expects <data-path>/"):
        build_dataset(True, cfg)


# ---------------------------------------------------------------- transforms


def test_small_input_train_transform_resizes_then_pad_crops():
    ops = build_transform(True, make_cfg(input_size=32)).transforms
    assert isinstance(ops[0], torchvision.transforms.Resize) and ops[0].size == 32
    assert isinstance(ops[1], torchvision.transforms.RandomCrop) and ops[1].padding == 4
    image = Image.new("RGB", (32, 32))
    assert ops[0](image) is image  # 32 px CIFAR is not resampled


def test_large_input_train_transform_keeps_timm_pipeline():
    ops = build_transform(True, make_cfg(input_size=48, hflip=0.5)).transforms
    names = [type(op).__name__ for op in ops]
    assert names[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert names[-1] == "RandomErasing" and ops[-1].probability == 0.25


def test_aa_none_disables_auto_augment():
    names = [type(op).__name__ for op in build_transform(True, make_cfg(aa="none")).transforms]
    assert "RandAugment" not in names and "ColorJitter" in names


@pytest.mark.parametrize("input_size, resize", [(224, 256), (48, 54), (32, 32), (16, 16)])
def test_eval_transform_crop_ratio(input_size, resize):
    ops = build_transform(False, make_cfg(input_size=input_size)).transforms
    assert ops[0].size == resize and ops[1].size == (input_size, input_size)
    assert tuple(ops[3].mean) == datasets.IMAGENET_DEFAULT_MEAN


# ---------------------------------------------------------------- DIGITS


def test_digits_split_is_stratified_disjoint_and_fixed():
    cfg = make_cfg()
    train, n_train = build_dataset(True, cfg)
    val, n_val = build_dataset(False, cfg)
    assert n_train == n_val == 10
    assert len(train) + len(val) == 1797
    # Together the splits are exactly load_digits() (as a multiset of image+label rows): a partition, no leak.
    from sklearn.datasets import load_digits

    digits = load_digits()
    reference = np.rint(digits.images * (255 / 16)).astype(np.uint8)

    def rows(images, targets):
        return sorted(image.tobytes() + bytes([int(t)]) for image, t in zip(images, targets))

    assert rows(np.concatenate([train.images, val.images]), np.concatenate([train.targets, val.targets])) == rows(
        reference, digits.target)
    all_targets = np.concatenate([train.targets, val.targets])
    for digit in range(10):
        total = int((all_targets == digit).sum())
        held_out = int((val.targets == digit).sum())
        assert held_out > 0 and (train.targets == digit).any()
        assert abs(held_out - 0.2 * total) <= 1
    again, _ = build_dataset(False, cfg)
    assert np.array_equal(again.images, val.images) and np.array_equal(again.targets, val.targets)


def test_digits_are_real_digits():
    train, _ = build_dataset(True, make_cfg())
    assert train.images.dtype == np.uint8 and train.images.max() == 255 and train.images.min() == 0
    means = [train.images[train.targets == d].astype(float).mean(0) for d in range(10)]
    assert np.abs(means[0] - means[1]).mean() > 20  # a ring and a stroke differ by far more than noise
    assert means[0][3:5, 3:5].mean() < means[0][3:5, 1:3].mean()  # a zero's centre is hollow


@pytest.mark.parametrize("input_size", [16, 32])
def test_digits_train_sample_shape(input_size):
    dataset, _ = build_dataset(True, make_cfg(input_size=input_size))
    image, label = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, input_size, input_size)
    assert label == int(dataset.targets[0])


def test_digits_eval_is_deterministic():
    dataset, _ = build_dataset(False, make_cfg(input_size=16))
    first, _ = dataset[3]
    second, _ = dataset[3]
    assert first.shape == (3, 16, 16) and torch.equal(first, second)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (datasets.IMAGENET_DEFAULT_MEAN, datasets.IMAGENET_DEFAULT_STD))
    pixels = first * std + mean
    assert torch.allclose(pixels[0], pixels[1], atol=1e-6) and torch.allclose(pixels[0], pixels[2], atol=1e-6)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6 and pixels.std() > 0.1  # grey digit, ImageNet-normalised


# ---------------------------------------------------------------- IMNET (ImageFolder)


@pytest.mark.parametrize("input_size", [32, 48])
def test_image_folder_loads(tmp_path, input_size):
    make_image_folder(tmp_path)
    cfg = make_cfg(data_set="IMNET", data_path=str(tmp_path), input_size=input_size)
    for is_train in (True, False):
        dataset, num_classes = build_dataset(is_train, cfg)
        assert num_classes == 3 and len(dataset) == 6
        image, label = dataset[len(dataset) - 1]
        assert image.shape == (3, input_size, input_size) and label == 2


def test_image_folder_missing_split(tmp_path):
    make_image_folder(tmp_path)
    for path in (tmp_path / "val").rglob("*.png"):
        path.unlink()
    for folder in sorted((tmp_path / "val").iterdir()):
        folder.rmdir()
    (tmp_path / "val").rmdir()
    cfg = make_cfg(data_set="IMNET", data_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"split folder .*val is missing; expected <data-path>/train/<class>"):
        build_dataset(False, cfg)


def test_image_folder_without_class_subfolders(tmp_path):
    write_png(tmp_path / "train" / "0.png")  # flat layout, as the raw ImageNet val tarball unpacks
    cfg = make_cfg(data_set="IMNET", data_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no class subfolders .*expected .*train/<class>/<image>"):
        build_dataset(True, cfg)


def test_image_folder_val_classes_must_match_train(tmp_path):
    make_image_folder(tmp_path)
    write_png(tmp_path / "train" / "fox" / "0.png")
    cfg = make_cfg(data_set="IMNET", data_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"class folders differ .*only in train: \['fox'\]"):
        build_dataset(False, cfg)


@pytest.mark.parametrize("payload", [b"not a png at all", "truncated"])
def test_corrupt_image_names_its_path(tmp_path, payload):
    make_image_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "zz_bad.png"
    if payload == "truncated":
        write_png(bad)
        payload = bad.read_bytes()[:60]
    bad.write_bytes(payload)
    dataset, _ = build_dataset(True, make_cfg(data_set="IMNET", data_path=str(tmp_path)))
    index = [path for path, _ in dataset.samples].index(str(bad))
    with pytest.raises(OSError, match=f"cannot read image {re.escape(str(bad))}: "):
        dataset[index]


# ---------------------------------------------------------------- CIFAR


def test_cifar_missing_files_are_named(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    cfg = make_cfg(data_set="CIFAR10", data_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"missing data_batch_2, .*test_batch, batches\.meta"):
        build_dataset(True, cfg)
    cfg = make_cfg(data_set="CIFAR100", data_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"expects train, test, meta under .*cifar-100-python"):
        build_dataset(False, cfg)


def write_fake_cifar10(root: Path, per_file: int = 4) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8), "labels": list(range(per_file))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(i) for i in range(10)]}))


def test_cifar_corrupt_files_fail_md5(tmp_path):
    write_fake_cifar10(tmp_path)
    cfg = make_cfg(data_set="CIFAR10", data_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"CIFAR10 files under .*cifar-10-batches-py failed torchvision's md5"):
        build_dataset(True, cfg)


def test_cifar_loads_fake_pickles(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path)
    # The files hold random pixels, so torchvision's md5 checks are bypassed to exercise the wiring only.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    cfg = make_cfg(data_set="CIFAR10", data_path=str(tmp_path), input_size=32)
    train, num_classes = build_dataset(True, cfg)
    val, _ = build_dataset(False, cfg)
    assert num_classes == 10 and len(train) == 20 and len(val) == 4
    image, label = val[3]
    assert image.shape == (3, 32, 32) and label == 3


# ---------------------------------------------------------------- iNaturalist


def make_inat(root: Path, year: int = 2018) -> None:
    categories = [
        {"id": 0, "name": "Quercus robur", "genus": "Quercus", "kingdom": "Plantae"},
        {"id": 1, "name": "Quercus alba", "genus": "Quercus", "kingdom": "Plantae"},
        {"id": 2, "name": "Vulpes vulpes", "genus": "Vulpes", "kingdom": "Animalia"},
    ]
    files = {0: f"train_val{year}/Plantae/1/a.jpg", 1: f"train_val{year}/Plantae/0/b.jpg",
             2: f"train_val{year}/Animalia/2/c.jpg"}
    train = {"images": [{"id": i, "file_name": f} for i, f in files.items()],
             "annotations": [{"image_id": i, "category_id": int(f.split("/")[2])} for i, f in files.items()]}
    val = {"images": [{"id": 9, "file_name": f"train_val{year}/Animalia/2/d.jpg"}],
           "annotations": [{"image_id": 9, "category_id": 2}]}
    for name, content in {"categories.json": categories, f"train{year}.json": train, f"val{year}.json": val}.items():
        (root / name).write_text(json.dumps(content))
    for file_name in list(files.values()) + [val["images"][0]["file_name"]]:
        folder, _, category_id, image = file_name.split("/")
        write_png(root / folder / category_id / image)  # DeiT drops the supercategory folder


@pytest.mark.parametrize("category, classes, val_label", [
    ("name", ["Quercus alba", "Quercus robur", "Vulpes vulpes"], 2),
    ("genus", ["Quercus", "Vulpes"], 1),
])
def test_inat_classes_follow_train_order(tmp_path, category, classes, val_label):
    make_inat(tmp_path)
    cfg = make_cfg(data_set="INAT18", data_path=str(tmp_path), inat_category=category, input_size=32)
    train, num_classes = build_dataset(True, cfg)
    assert num_classes == len(classes) and train.classes == classes
    val, val_classes = build_dataset(False, cfg)
    assert val_classes == num_classes
    image, label = val[0]
    assert image.shape == (3, 32, 32) and label == val_label
    assert val.samples[0][0] == str(tmp_path / "train_val2018" / "2" / "d.jpg")


def test_inat19_reads_2019_files(tmp_path):
    make_inat(tmp_path, year=2019)
    dataset, num_classes = build_dataset(True, make_cfg(data_set="INAT19", data_path=str(tmp_path),
                                                        inat_category="kingdom"))
    assert num_classes == 2 and dataset.classes == ["Plantae", "Animalia"] and len(dataset) == 3


@pytest.mark.parametrize("missing", ["categories.json", "val2018.json", "train2018.json"])
def test_inat_missing_json_is_named(tmp_path, missing):
    make_inat(tmp_path)
    (tmp_path / missing).unlink()
    cfg = make_cfg(data_set="INAT18", data_path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=rf"iNaturalist file .*{missing} is missing; expected train2018"):
        build_dataset(False, cfg)


def test_inat_bad_file_name(tmp_path):
    make_inat(tmp_path)
    (tmp_path / "val2018.json").write_text(json.dumps({"images": [{"id": 9, "file_name": "d.jpg"}]}))
    cfg = make_cfg(data_set="INAT18", data_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"file_name 'd.jpg' is not '<folder>/<supercategory>/<category id>"):
        build_dataset(False, cfg)


# ---------------------------------------------------------------- unreadable image files


def test_skip_unreadable_images_serves_the_next_image_and_counts(tmp_path):
    make_image_folder(tmp_path)
    bad = tmp_path / "train" / "cat" / "1_bad.png"
    bad.write_bytes(b"not a png at all")
    dataset, _ = build_dataset(True, make_cfg(data_set="IMNET", data_path=str(tmp_path), skip_unreadable_images=True))
    plain, _ = build_dataset(True, make_cfg(data_set="IMNET", data_path=str(tmp_path)))
    index = [path for path, _ in plain.samples].index(str(bad))
    datasets.take_skipped_count()
    image, label = dataset[index]
    assert label == plain.samples[index + 1][1] and image.shape == (3, 16, 16)
    assert datasets.take_skipped_count() == 1 and datasets.take_skipped_count() == 0


@pytest.mark.slow
def test_unreadable_image_through_main_names_the_file_or_is_skipped_and_logged(tmp_path):
    import main as entry
    from conftest import TINY_RUN, run_main

    make_image_folder(tmp_path / "data", per_class=2)
    for split in ("train", "val"):
        (tmp_path / "data" / split / "dog" / "9_bad.png").write_bytes(b"GIF89a but not really")
    flags = (*TINY_RUN, "--data-set", "IMNET", "--data-path", str(tmp_path / "data"), "--batch-size", "1",
             "--epochs", "1", "--no-model-ema")
    proc = run_main(*flags, "--num_workers", "1", check=False)  # the error crosses a DataLoader worker
    bad = tmp_path / "data" / "train" / "dog" / "9_bad.png"
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.search(rf"^error: cannot read image {re.escape(str(bad))}: .*--skip-unreadable-images$",
                     proc.stderr.strip(), re.M), proc.stderr[-2000:]

    datasets.take_skipped_count()
    record = entry.main(entry.get_args_parser().parse_args([*flags, "--skip-unreadable-images",
                                                            "--output_dir", str(tmp_path / "out")]))
    assert record["skipped_unreadable_images"] == 2  # one train and one val file, each read once per epoch
    assert record["test_images"] == 7
    logged = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert logged[-1]["skipped_unreadable_images"] == 2
