"""Image folders for ``pmoe-fast train`` / ``eval`` / ``plot-dispatch``.

Two layouts, one class per sub-folder (file names do not matter; the sub-folder names are the
class names, sorted):

    DIR/<class>/*.png|jpg|...                  split into train and val (seeded, stratified)
    DIR/train/<class>/...  DIR/val/<class>/... the split is given

Images are read with Pillow, converted to RGB, resized to the experts' input size (bicubic, the
whole image, no crop), scaled to [0, 1] and normalised with a mean and std (``normalization``:
the experts' pretrained configuration when known, else ImageNet's). There is no augmentation.
``scan`` says exactly what is wrong with a folder that cannot serve (missing, empty, one class,
an empty class, unreadable files, layouts mixed).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_DIRS = ("train", "val")


class DataError(ValueError):
    """An image folder that cannot serve; the message names the problem and the fix."""


@dataclass
class FolderScan:
    """What ``scan`` found: (path, label) items per split, the class names, and skipped files."""

    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    classes: list[str]
    layout: str  # "split" (train/ and val/ given) or "classes" (split here)
    skipped: list[str] = field(default_factory=list)  # files without an image extension


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _class_dirs(root: str) -> tuple[dict[str, list[str]], list[str]]:
    """{class: sorted image paths} for the sub-folders of ``root`` (recursively within each class
    folder), and the non-image files skipped. Raises when ``root`` holds image files itself."""
    entries = _visible(os.listdir(root))
    loose = [e for e in entries if os.path.isfile(os.path.join(root, e)) and _is_image(e)]
    if loose:
        raise DataError(
            f"{root} holds image files directly ({', '.join(loose[:3])}{', ...' if len(loose) > 3 else ''}); "
            "put each image in a sub-folder named after its class: DIR/<class>/image.png"
        )
    classes, skipped = {}, []
    for name in entries:
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = _visible(dirnames)
            for f in _visible(filenames):
                (files if _is_image(f) else skipped).append(os.path.join(dirpath, f))
        classes[name] = sorted(files)
    return classes, skipped


def _check_classes(root: str, classes: dict[str, list[str]]) -> None:
    if not classes or not any(classes.values()):
        raise DataError(
            f"{root} holds no images: expected one sub-folder per class with image files "
            f"({', '.join(IMAGE_EXTENSIONS)}), e.g. {root}/cat/1.png and {root}/dog/1.png"
        )
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise DataError(f"class folder(s) without images in {root}: {empty}; add images or remove the folder(s)")
    if len(classes) < 2:
        raise DataError(
            f"{root} holds one class ({next(iter(classes))!r}); classification needs at least two "
            "class sub-folders"
        )


def _check_readable(items: list[tuple[str, int]]) -> None:
    from PIL import Image, UnidentifiedImageError

    bad = []
    for path, _ in items:
        try:
            with Image.open(path) as im:
                im.size
        except (OSError, UnidentifiedImageError) as e:
            bad.append(f"{path} ({type(e).__name__}: {e})")
    if bad:
        raise DataError(f"{len(bad)} file(s) cannot be read as images; fix or remove them:\n  " + "\n  ".join(bad[:10])
                        + ("\n  ..." if len(bad) > 10 else ""))


def stratified_split(items: list[tuple[str, int]], val_fraction: float, seed: int) -> tuple[list, list]:
    """Split (path, label) items into train and val per class: a seeded shuffle of each class,
    ``round(n * val_fraction)`` of it (at least 1 when the class has 2 or more) to val."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted({lab for _, lab in items}):
        members = [it for it in items if it[1] == label]
        rng.shuffle(members)
        n_val = max(1, round(len(members) * val_fraction)) if len(members) >= 2 else 0
        val += members[:n_val]
        train += members[n_val:]
    return sorted(train), sorted(val)


def scan(root: str | os.PathLike, *, val_fraction: float = 0.2, seed: int = 0, check_files: bool = True) -> FolderScan:
    """Find the images under ``root`` (either layout, module docstring) and split them.

    Args:
        val_fraction, seed: the split of a folder without train/ and val/.
        check_files: open every image's header, so an unreadable file is reported now (with
            its path) rather than mid-training.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DataError(f"image folder not found: {root}")
    subdirs = {e for e in _visible(os.listdir(root)) if os.path.isdir(os.path.join(root, e))}
    given = subdirs & set(SPLIT_DIRS)
    if given:
        if given != set(SPLIT_DIRS):
            raise DataError(f"{root} has {sorted(given)[0]}/ but not {sorted(set(SPLIT_DIRS) - given)[0]}/: "
                            "give both train/ and val/ (each with one sub-folder per class), or neither")
        others = sorted(subdirs - set(SPLIT_DIRS) - {"test"})
        if others:
            raise DataError(f"{root} mixes layouts: it has train/ and val/ and also {others}; "
                            "move those class folders into train/ and val/, or remove train/ and val/")
        train_dirs, skipped = _class_dirs(os.path.join(root, "train"))
        val_dirs, skipped_val = _class_dirs(os.path.join(root, "val"))
        _check_classes(os.path.join(root, "train"), train_dirs)
        unknown = sorted(set(val_dirs) - set(train_dirs))
        if unknown:
            raise DataError(f"{root}/val has classes that {root}/train lacks: {unknown}")
        if not any(val_dirs.values()):
            raise DataError(f"{root}/val holds no images")
        classes = sorted(train_dirs)
        index = {c: i for i, c in enumerate(classes)}
        train = [(p, index[c]) for c in classes for p in train_dirs[c]]
        val = [(p, index[c]) for c in sorted(val_dirs) for p in val_dirs[c]]
        result = FolderScan(train, val, classes, "split", skipped + skipped_val)
    else:
        dirs, skipped = _class_dirs(root)
        _check_classes(root, dirs)
        classes = sorted(dirs)
        items = [(p, i) for i, c in enumerate(classes) for p in dirs[c]]
        train, val = stratified_split(items, val_fraction, seed)
        if not val:
            raise DataError(f"{root}: no class has 2 or more images, so nothing is left for validation")
        result = FolderScan(train, val, classes, "classes", skipped)
    if check_files:
        _check_readable(result.train + result.val)
    return result


class ImageFiles(Dataset):
    """(path, label) items as (float32 (3, H, W) normalised image, int label).

    Args:
        items: (path, label) pairs.
        classes: the class names, ``classes[label]``.
        img_size: (H, W) the images are resized to.
        mean, std: per-channel normalisation of the [0, 1] pixels.
    """

    def __init__(self, items: Sequence[tuple[str, int]], classes: list[str], img_size: tuple[int, int],
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.items, self.classes, self.img_size = list(items), list(classes), tuple(img_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((self.img_size[1], self.img_size[0]), Image.Resampling.BICUBIC)
                pixels = np.asarray(im, dtype=np.float32) / 255.0
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from e
        x = torch.from_numpy(pixels).permute(2, 0, 1)
        return (x - self.mean) / self.std, label


class Resized(Dataset):
    """Another dataset's images resized (bilinear) to ``img_size``; labels and ``classes`` kept."""

    def __init__(self, dataset: Dataset, img_size: tuple[int, int]):
        self.dataset, self.img_size = dataset, tuple(img_size)
        self.classes = list(getattr(dataset, "classes", []))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.dataset[i]
        if tuple(x.shape[-2:]) != self.img_size:
            x = F.interpolate(x[None], size=self.img_size, mode="bilinear", align_corners=False)[0]
        return x, int(y)


def normalization(experts: Sequence[torch.nn.Module], names: Sequence[str | None] = ()) -> tuple[tuple, tuple, str]:
    """(mean, std, where from) for the experts' inputs: the first expert's timm
    ``pretrained_cfg``, or timm's default configuration for its architecture name, else ImageNet's.
    All experts see the same images, so a differing normalisation of another expert is reported
    in the third element."""
    found = []
    for k, model in enumerate(experts):
        cfg = getattr(model, "pretrained_cfg", None) or _timm_default_cfg(names[k] if k < len(names) else None)
        if cfg and cfg.get("mean") and cfg.get("std"):
            found.append((tuple(cfg["mean"]), tuple(cfg["std"])))
        else:
            found.append(None)
    first = found[0]
    mean, std = first if first else (IMAGENET_MEAN, IMAGENET_STD)
    source = "expert 0's pretrained configuration" if first else "ImageNet's (no pretrained configuration known)"
    differ = [k for k, f in enumerate(found) if f is not None and f != (mean, std)]
    if differ:
        source += f"; experts {differ} were pre-trained with another normalisation (set --mean/--std to choose)"
    return mean, std, source


def _timm_default_cfg(name: str | None) -> dict | None:
    if not name:
        return None
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except (ImportError, RuntimeError, ValueError):
        return None
    return cfg.to_dict() if cfg is not None else None


@dataclass
class DataSplits:
    """Train and validation datasets, the class names, and a line saying what was found."""

    train: Dataset
    val: Dataset
    classes: list[str]
    description: str


def open_data(source: str | os.PathLike, *, img_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
              val_fraction: float = 0.2, seed: int = 0, classes: list[str] | None = None) -> DataSplits:
    """The train/val datasets of an image folder (``scan``) or of ``"demo"`` (the built-in
    digits, ``pmoe_fast.datasets.demo_dataset``, already normalised to [-1, 1]; ``mean``/``std``
    do not apply to it).

    ``classes`` (e.g. a checkpoint's) fixes the label of each class name; the folder's classes
    must be among them.
    """
    if os.fspath(source) == "demo":
        from .datasets import demo_dataset

        train, val = demo_dataset("train"), demo_dataset("val")
        found = list(train.classes)
        if classes is not None and found != list(classes):
            raise DataError(f"the demo set's classes {found} are not the checkpoint's {list(classes)}")
        return DataSplits(Resized(train, img_size), Resized(val, img_size), found,
                          f"demo set (scikit-learn digits): {len(train)} train / {len(val)} val images, "
                          f"{len(found)} classes, resized to {img_size[0]}x{img_size[1]}")
    found = scan(source, val_fraction=val_fraction, seed=seed)
    names = found.classes
    train, val = found.train, found.val
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise DataError(f"{source} has classes the model was not trained on: {unknown} (it knows {list(classes)})")
        index = {c: i for i, c in enumerate(classes)}
        train = [(p, index[names[lab]]) for p, lab in train]
        val = [(p, index[names[lab]]) for p, lab in val]
        names = list(classes)
    how = "train/ and val/" if found.layout == "split" else f"split {1 - val_fraction:.0%}/{val_fraction:.0%} by seed {seed}"
    description = (f"{source}: {len(train)} train / {len(val)} val images ({how}), {len(found.classes)} classes, "
                   f"resized to {img_size[0]}x{img_size[1]}")
    if found.skipped:
        description += f"; skipped {len(found.skipped)} non-image file(s), e.g. {found.skipped[0]}"
    return DataSplits(ImageFiles(train, names, img_size, mean, std), ImageFiles(val, names, img_size, mean, std),
                      names, description)
