"""The demo's data: scikit-learn's handwritten digits, split into two source tasks and a target task.

``sklearn.datasets.load_digits()`` ships with scikit-learn (1797 grey 8x8 images of the digits
0-9, about 180 each), so the demo runs offline. Each image goes to exactly one task, chosen by a
fixed per-class shuffle:

| task | images | labels | used for |
| --- | --- | --- | --- |
| ``demo_dataset("train")`` | 10 per digit (100) | 0-9 | adapting the experts (few-shot) |
| ``demo_dataset("val")`` | 60 per digit (600) | 0-9 | the accuracies the demo reports |
| ``source_dataset("low", split)`` | the rest of digits 0-4 | 0-4 | pre-training expert A |
| ``source_dataset("high", split)`` | the rest of digits 5-9 | 0-4 (digit - 5) | pre-training expert B |

The two experts thus learn features for different digits from images the target task never
sees; the target needs both halves. Of each source task, one image in ten (by the same
shuffle) forms its ``"val"`` split, the rest ``"train"``.

Images are upsampled to ``IMG_SIZE`` x ``IMG_SIZE`` (bilinear), repeated to 3 channels and
normalised to [-1, 1] (pixel / 16 * 2 - 1): items are (float32 tensor [3, IMG_SIZE, IMG_SIZE],
int label).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["IMG_SIZE", "SOURCE_TASKS", "DigitsTask", "demo_dataset", "source_dataset"]

IMG_SIZE = 16  # the experts' input size (pixels per side)
TARGET_TRAIN_PER_CLASS = 10
TARGET_VAL_PER_CLASS = 60
SOURCE_VAL_FRACTION = 0.1
SPLIT_SEED = 0  # the fixed shuffle that assigns each image to one task
SOURCE_TASKS = {"low": (0, 1, 2, 3, 4), "high": (5, 6, 7, 8, 9)}  # task -> the digits it holds
SPLITS = ("train", "val")


class DigitsTask(Dataset):
    """One task's images and labels, held in memory.

    Attributes:
        images: float32 (N, 3, IMG_SIZE, IMG_SIZE), in [-1, 1].
        labels: int64 (N,).
        indices: int64 (N,), each image's row in ``load_digits()`` (which images a task holds).
        classes: the class names, ``classes[label]``.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, classes: list[str]):
        self.images, self.labels, self.indices, self.classes = images, labels, indices, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _assignment() -> dict[str, np.ndarray]:
    """Row indices of ``load_digits()`` for each (task, split); disjoint, sorted."""
    _, target = _digits()
    rng = np.random.RandomState(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {"target/train": [], "target/val": []}
    parts.update({f"{task}/{split}": [] for task in SOURCE_TASKS for split in SPLITS})
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(target == digit))
        n_train, n_val = TARGET_TRAIN_PER_CLASS, TARGET_VAL_PER_CLASS
        parts["target/train"].append(rows[:n_train])
        parts["target/val"].append(rows[n_train : n_train + n_val])
        rest = rows[n_train + n_val :]
        n_source_val = round(len(rest) * SOURCE_VAL_FRACTION)
        task = next(t for t, digits in SOURCE_TASKS.items() if digit in digits)
        parts[f"{task}/val"].append(rest[:n_source_val])
        parts[f"{task}/train"].append(rest[n_source_val:])
    return {name: np.sort(np.concatenate(rows)) for name, rows in parts.items()}


def _task(rows: np.ndarray, label_offset: int, classes: list[str]) -> DigitsTask:
    images, target = _digits()
    x = torch.from_numpy(images[rows]).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(IMG_SIZE, IMG_SIZE), mode="bilinear", align_corners=False)
    x = (x * 2.0 - 1.0).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(target[rows] - label_offset)
    return DigitsTask(x, labels, torch.from_numpy(rows), classes)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")


def demo_dataset(split: str) -> DigitsTask:
    """The target task: all ten digits on images the source tasks never see.

    ``split`` is ``"train"`` (10 images per digit) or ``"val"`` (60 per digit). Items are
    (float32 [3, IMG_SIZE, IMG_SIZE] in [-1, 1], int label 0-9); ``classes`` is ["0", ..., "9"].
    """
    _check_split(split)
    return _task(_assignment()[f"target/{split}"], 0, [str(d) for d in range(10)])


def source_dataset(task: str, split: str) -> DigitsTask:
    """A source task for pre-training an expert: ``"low"`` (digits 0-4) or ``"high"`` (digits 5-9).

    Labels are the digit's position in its task (0-4); ``classes`` names the digits. ``split``
    is ``"train"`` or ``"val"`` (one image in ten).
    """
    if task not in SOURCE_TASKS:
        raise ValueError(f"unknown source task {task!r}; use one of {tuple(SOURCE_TASKS)}")
    _check_split(split)
    digits = SOURCE_TASKS[task]
    return _task(_assignment()[f"{task}/{split}"], digits[0], [str(d) for d in digits])
