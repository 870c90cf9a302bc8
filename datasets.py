"""Datasets and transforms: ImageNet, CIFAR-10/100, iNaturalist 2018/2019 and the embedded DIGITS set.

The pipeline is DeiT's: timm's training augmentation (pad-and-crop instead of random-resized-crop at 32 px or less),
a 0.875 centre crop for evaluation, and ImageNet mean/std normalisation for every dataset. DIGITS (scikit-learn's
bundled 8x8 handwritten digits) needs no download, so the trainer runs end to end offline and in CI.

Bad input fails loudly: every error names what is wrong and the on-disk layout that was expected.
"""

import argparse
import json
import os
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import datasets, transforms

DATASETS = ("IMNET", "CIFAR10", "CIFAR100", "INAT18", "INAT19", "DIGITS")
INAT_CATEGORIES = ("kingdom", "phylum", "class", "order", "supercategory", "family", "genus", "name")
INAT_YEARS = {"INAT18": 2018, "INAT19": 2019}
CIFAR_CLASSES = {"CIFAR10": (datasets.CIFAR10, 10), "CIFAR100": (datasets.CIFAR100, 100)}

DIGITS_SEED = 0
DIGITS_VAL_FRACTION = 0.2
DIGITS_NUM_CLASSES = 10

EVAL_CROP_PCT = 0.875  # DeiT: Resize(256) then CenterCrop(224).
SMALL_INPUT = 32  # DeiT's threshold: at or below it, pad-and-crop replaces random-resized-crop.
_BICUBIC = transforms.InterpolationMode.BICUBIC


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Adds the 'data' argument group (dataset choice, augmentation, loader settings) with DeiT's defaults."""
    group = parser.add_argument_group("data")
    group.add_argument("--data-set", default="DIGITS", choices=DATASETS, help="dataset to train and evaluate on")
    group.add_argument("--data-path", default=None, help="dataset root; DIGITS is embedded and takes none")
    group.add_argument("--inat-category", default="name", choices=INAT_CATEGORIES, help="iNaturalist label level")
    group.add_argument("--input-size", type=int, default=224,
                       help="square image side in pixels (default: the model's own resolution)")
    group.add_argument("--color-jitter", type=float, default=0.4, help="colour jitter factor (unused when --aa is set)")
    group.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy; 'none' disables it")
    group.add_argument("--train-interpolation", default="bicubic", help="interpolation of the training crop")
    group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    group.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    group.add_argument("--remode", default="pixel", help="random erasing mode")
    group.add_argument("--recount", type=int, default=1, help="random erasing count")
    group.add_argument("--num_workers", type=int, default=min(10, len(os.sched_getaffinity(0))),
                       help="data loader worker processes (default: DeiT's 10, at most the CPUs available here: "
                            "%(default)s)")
    group.add_argument("--pin-mem", action=argparse.BooleanOptionalAction, default=None, dest="pin_mem",
                       help="pin CPU memory in the data loader (default: on for a CUDA --device, off otherwise)")
    group.add_argument("--skip-unreadable-images", action="store_true",
                       help="replace an image file that cannot be read by the next readable one, with a warning and "
                            "a count per epoch in log.txt (default: stop with an error naming the file)")


def expected_layout(data_set: str) -> str:
    """Describes the files a dataset needs under --data-path, for error messages."""
    if data_set == "IMNET":
        return "<data-path>/train/<class>/<image> and <data-path>/val/<class>/<image>"
    if data_set in CIFAR_CLASSES:
        cls = CIFAR_CLASSES[data_set][0]
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return f"<data-path>/{cls.base_folder}/{{{','.join(names)}}} (torchvision's python-pickle release)"
    if data_set in INAT_YEARS:
        year = INAT_YEARS[data_set]
        return (f"<data-path>/{{train{year}.json,val{year}.json,categories.json}} and images at "
                f"<data-path>/<file_name part 0>/<category id>/<image>")
    return "nothing: DIGITS is scikit-learn's bundled load_digits()"


@dataclass(frozen=True)
class DataConfig:
    """Dataset and augmentation settings, validated once at the CLI edge."""

    data_set: str
    data_path: str | None
    inat_category: str
    input_size: int
    color_jitter: float
    aa: str | None
    train_interpolation: str
    hflip: float
    reprob: float
    remode: str
    recount: int
    skip_unreadable_images: bool = False

    def __post_init__(self) -> None:
        if self.data_set not in DATASETS:
            raise ValueError(f"unknown --data-set {self.data_set!r}; choose one of {', '.join(DATASETS)}")
        if self.inat_category not in INAT_CATEGORIES:
            raise ValueError(f"unknown --inat-category {self.inat_category!r}; choose one of "
                             f"{', '.join(INAT_CATEGORIES)}")
        if self.data_set == "DIGITS" and self.data_path is not None:
            raise ValueError(f"--data-set DIGITS is embedded (scikit-learn's load_digits) and takes no --data-path; "
                             f"got --data-path {self.data_path!r}")
        if self.data_set != "DIGITS" and self.data_path is None:
            raise ValueError(f"--data-set {self.data_set} needs --data-path; expected {expected_layout(self.data_set)}")
        if self.input_size <= 0:
            raise ValueError(f"--input-size must be positive, got {self.input_size}")
        for name in ("hflip", "reprob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name} is a probability in [0, 1], got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "DataConfig":
        """Builds the config from the Namespace produced by a parser that went through `add_data_args`."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def build_transform(is_train: bool, cfg: DataConfig) -> Callable:
    """Returns DeiT's train (timm augmentation) or eval (resize, centre crop) transform for PIL images.

    At `input_size <= 32` the train crop is DeiT's RandomCrop with padding of 1/8 of the side (DeiT's 4 px at
    32 px; scaled so that 16 px inputs are not shifted by a quarter of their width). A bicubic Resize to
    `input_size` precedes it so that images smaller than the crop (DIGITS is 8x8) are upscaled first; on 32 px CIFAR
    it is a no-op. Eval at those sizes resizes the whole image to `input_size` and skips the 0.875 crop, which DeiT
    also skips there, so CIFAR is evaluated uncropped and DIGITS sees the same framing in train and eval.
    """
    if is_train:
        transform = create_transform(
            input_size=cfg.input_size,
            is_training=True,
            color_jitter=cfg.color_jitter,
            auto_augment=None if cfg.aa in (None, "none") else cfg.aa,
            interpolation=cfg.train_interpolation,
            re_prob=cfg.reprob,
            re_mode=cfg.remode,
            re_count=cfg.recount,
            hflip=cfg.hflip,
        )
        if cfg.input_size <= SMALL_INPUT:
            assert isinstance(transform.transforms[0], RandomResizedCropAndInterpolation), (
                f"timm's train transform no longer starts with a random-resized crop: {transform.transforms[0]}")
            transform.transforms[0:1] = [transforms.Resize(cfg.input_size, interpolation=_BICUBIC),
                                         transforms.RandomCrop(cfg.input_size, padding=max(1, cfg.input_size // 8))]
        return transform

    resize = cfg.input_size if cfg.input_size <= SMALL_INPUT else int(cfg.input_size / EVAL_CROP_PCT)
    return transforms.Compose([
        transforms.Resize(resize, interpolation=_BICUBIC),
        transforms.CenterCrop(cfg.input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def build_dataset(is_train: bool, cfg: DataConfig) -> tuple[torch.utils.data.Dataset, int]:
    """Builds the train or val split of `cfg.data_set` with its transform; returns (dataset, num_classes)."""
    transform = build_transform(is_train, cfg)
    if cfg.data_set == "DIGITS":
        return DigitsDataset(is_train, transform), DIGITS_NUM_CLASSES
    if not os.path.isdir(cfg.data_path):
        raise FileNotFoundError(f"--data-path {cfg.data_path} does not exist or is not a directory; "
                                f"--data-set {cfg.data_set} expects {expected_layout(cfg.data_set)}")
    if cfg.data_set in CIFAR_CLASSES:  # pickled arrays, no image files
        return _build_cifar(cfg.data_set, cfg.data_path, is_train, transform)
    if cfg.data_set == "IMNET":
        dataset, num_classes = _build_image_folder(cfg.data_path, is_train, transform)
    else:
        dataset = INatDataset(cfg.data_path, is_train, INAT_YEARS[cfg.data_set], cfg.inat_category, transform)
        num_classes = len(dataset.classes)
    return (SkipUnreadable(dataset) if cfg.skip_unreadable_images else dataset), num_classes


class UnreadableImageError(OSError):
    """An image file that cannot be opened or decoded (corrupt, truncated, not an image)."""


_SKIP_HINT = "; replace or delete the file, or pass --skip-unreadable-images"


def load_rgb(path: str) -> Image.Image:
    """Opens an image as RGB; a failure names the file, so one corrupt image among millions can be found."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImageError(f"cannot read image {path}: {err}{_SKIP_HINT}") from err


_skip_counters: list = []  # every SkipUnreadable's shared counter, for take_skipped_count


class SkipUnreadable(torch.utils.data.Dataset):
    """``--skip-unreadable-images``: serves the next readable image in place of an unreadable one, and counts it.

    Files are checked as they are loaded rather than in an upfront scan (1.28M opens on ImageNet). The substitute
    keeps every batch full (mixup needs even batches); the count lives in shared memory, so skips in DataLoader
    worker processes are counted too.
    """

    def __init__(self, dataset: torch.utils.data.Dataset) -> None:
        import multiprocessing

        self.dataset = dataset
        self.skipped = multiprocessing.Value("q", 0)
        _skip_counters.append(self.skipped)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for offset in range(len(self.dataset)):
            try:
                return self.dataset[(index + offset) % len(self.dataset)]
            except UnreadableImageError as err:
                with self.skipped.get_lock():
                    self.skipped.value += 1
                print(f"warning: {str(err).removesuffix(_SKIP_HINT)}; using the next readable image instead",
                      flush=True)
        raise UnreadableImageError(f"none of the {len(self.dataset)} images can be read; check --data-path")


def take_skipped_count() -> int:
    """Unreadable images skipped by this process and its loader workers since the last call."""
    total = 0
    for counter in _skip_counters:
        with counter.get_lock():
            total, counter.value = total + counter.value, 0
    return total


def _build_image_folder(data_path: str, is_train: bool, transform: Callable) -> tuple[datasets.ImageFolder, int]:
    """ImageFolder split; num_classes is the number of class folders (1000 on ImageNet)."""
    split = "train" if is_train else "val"
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"IMNET split folder {root} is missing; expected {expected_layout('IMNET')}")
    try:
        dataset = datasets.ImageFolder(root, transform=transform, loader=load_rgb)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"IMNET split folder {root} holds no class subfolders with images ({err}); "
                                f"expected {root}/<class>/<image>") from err
    train_root = os.path.join(data_path, "train")
    if not is_train and os.path.isdir(train_root):
        # ImageFolder numbers classes by sorted folder name, so a class missing from val would shift every label.
        train_classes, _ = dataset.find_classes(train_root)
        if train_classes != dataset.classes:
            only_train = sorted(set(train_classes) - set(dataset.classes))
            only_val = sorted(set(dataset.classes) - set(train_classes))
            raise ValueError(f"IMNET class folders differ between {train_root} and {root} (only in train: "
                             f"{only_train[:5]}, only in val: {only_val[:5]}); both splits need the same "
                             f"<class> subfolders so that label indices agree")
    return dataset, len(dataset.classes)


def _build_cifar(name: str, data_path: str, is_train: bool, transform: Callable) -> tuple[datasets.VisionDataset, int]:
    """torchvision CIFAR without download: the extracted python-pickle files must already be under data_path."""
    cls, num_classes = CIFAR_CLASSES[name]
    folder = os.path.join(data_path, cls.base_folder)
    expected = [file for file, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [file for file in expected if not os.path.isfile(os.path.join(folder, file))]
    if missing:
        raise FileNotFoundError(f"{name}: torchvision expects {', '.join(expected)} under {folder}; missing "
                                f"{', '.join(missing)} (download is off: extract the python-pickle archive there)")
    try:
        dataset = cls(data_path, train=is_train, transform=transform, download=False)
    except RuntimeError as err:
        raise ValueError(f"{name} files under {folder} failed torchvision's md5 check ({err}); expected the "
                         f"original python-pickle release") from err
    return dataset, num_classes


class INatDataset(torch.utils.data.Dataset):
    """iNaturalist 2018/2019 read the way DeiT reads it, so label indices match DeiT checkpoints.

    Classes are the distinct values of `category` (e.g. 'genus') in order of first appearance in the *train*
    annotations, so train and val agree. An image's category id is part 2 of its `file_name`
    ('train_val2018/Plantae/7477/x.jpg'), and its path is <root>/<part 0>/<part 2>/<part 3>. As in DeiT,
    categories.json is indexed by position: entry i describes category id i.

    Attributes:
        classes: category-level values, indexed by label.
        samples: (image path, label) pairs.
    """

    def __init__(self, root: str, is_train: bool, year: int, category: str, transform: Callable | None = None):
        self.transform = transform
        split_file = f"{'train' if is_train else 'val'}{year}.json"
        split = self._read_json(root, split_file, year)
        categories = self._read_json(root, "categories.json", year)
        train = split if is_train else self._read_json(root, f"train{year}.json", year)

        def level(category_id: int, source: str) -> str:
            if not 0 <= category_id < len(categories):
                raise ValueError(f"category id {category_id} from {source} is not a position in "
                                 f"{os.path.join(root, 'categories.json')} ({len(categories)} entries)")
            return categories[category_id][category]

        self.classes = list(dict.fromkeys(level(int(a["category_id"]), f"train{year}.json annotations")
                                          for a in train["annotations"]))
        label_of = {value: label for label, value in enumerate(self.classes)}
        self.samples = []
        for image in split["images"]:
            parts = image["file_name"].split("/")
            if len(parts) != 4:
                raise ValueError(f"{split_file}: file_name {image['file_name']!r} is not "
                                 f"'<folder>/<supercategory>/<category id>/<image>'")
            value = level(int(parts[2]), f"{split_file} file_name {image['file_name']!r}")
            if value not in label_of:
                raise ValueError(f"{split_file}: {category} {value!r} of {image['file_name']!r} never occurs in "
                                 f"train{year}.json annotations, so it has no label")
            self.samples.append((os.path.join(root, parts[0], parts[2], parts[3]), label_of[value]))

    @staticmethod
    def _read_json(root: str, name: str, year: int) -> dict | list:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"iNaturalist file {path} is missing; expected train{year}.json, val{year}.json "
                                    f"and categories.json in {root}, images at {root}/<folder>/<category id>/<image>")
        with open(path) as f:
            return json.load(f)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        path, label = self.samples[index]
        image = load_rgb(path)
        return (self.transform(image) if self.transform is not None else image), label


@lru_cache(maxsize=1)
def _digits_splits() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Loads scikit-learn's digits once per process as uint8 0..255 and splits them (stratified, seeded).

    Returns ((train_images, train_labels), (val_images, val_labels)); arrays are read-only because they are shared.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    x_train, x_val, y_train, y_val = train_test_split(images, digits.target.astype(np.int64),
                                                      test_size=DIGITS_VAL_FRACTION, random_state=DIGITS_SEED,
                                                      stratify=digits.target)
    for array in (x_train, x_val, y_train, y_val):
        array.setflags(write=False)
    return (x_train, y_train), (x_val, y_val)


class DigitsDataset(torch.utils.data.Dataset):
    """The embedded default: 1,797 real 8x8 handwritten digits served as RGB PIL images.

    A fixed stratified split holds out 20% for val, so runs are comparable without any file on disk.

    Attributes:
        images: uint8 array [N, 8, 8] in 0..255.
        targets: int64 array [N] of labels 0..9.
    """

    classes = tuple(str(digit) for digit in range(DIGITS_NUM_CLASSES))

    def __init__(self, is_train: bool, transform: Callable | None = None):
        self.images, self.targets = _digits_splits()[0 if is_train else 1]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = Image.fromarray(self.images[index]).convert("RGB")
        return (self.transform(image) if self.transform is not None else image), int(self.targets[index])
