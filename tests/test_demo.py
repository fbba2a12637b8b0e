"""The demo's data (pmoe_fast.datasets) and the ``pmoe-fast demo`` command."""

import numpy as np
import pytest
import torch

from pmoe_fast import datasets
from pmoe_fast.datasets import IMG_SIZE, SOURCE_TASKS, demo_dataset, source_dataset


def all_tasks():
    tasks = {f"target/{s}": demo_dataset(s) for s in ("train", "val")}
    tasks.update({f"{t}/{s}": source_dataset(t, s) for t in SOURCE_TASKS for s in ("train", "val")})
    return tasks


def test_demo_dataset_items_and_sizes():
    train, val = demo_dataset("train"), demo_dataset("val")
    assert (len(train), len(val)) == (100, 600)
    image, label = val[0]
    assert image.shape == (3, IMG_SIZE, IMG_SIZE) and image.dtype == torch.float32
    assert isinstance(label, int)
    assert train.classes == [str(d) for d in range(10)]
    assert train.labels.bincount().tolist() == [10] * 10
    assert val.labels.bincount().tolist() == [60] * 10
    assert -1.0 <= val.images.min() < val.images.max() <= 1.0
    assert torch.equal(image[0], image[2])  # grey, repeated to 3 channels


def test_source_tasks_hold_their_digits():
    digits = datasets._digits()[1]
    for task, wanted in SOURCE_TASKS.items():
        for split in ("train", "val"):
            data = source_dataset(task, split)
            assert sorted(set(digits[data.indices.numpy()].tolist())) == list(wanted)
            assert torch.equal(data.labels, torch.from_numpy(digits[data.indices.numpy()]) - wanted[0])
            assert data.classes == [str(d) for d in wanted]


def test_every_image_in_exactly_one_task():
    indices = np.concatenate([t.indices.numpy() for t in all_tasks().values()])
    assert len(indices) == len(datasets._digits()[1]) == 1797
    assert len(np.unique(indices)) == len(indices)


def test_images_come_from_their_rows_and_are_deterministic():
    val = demo_dataset("val")
    raw = torch.from_numpy(datasets._digits()[0]).flatten(1) / 8 - 1  # all 1797 rows, in [-1, 1]
    pooled = torch.nn.functional.avg_pool2d(val.images[:50, :1], 2).flatten(1)  # back to 8x8
    assert torch.equal(torch.cdist(pooled, raw).argmin(1), val.indices[:50])
    datasets._assignment.cache_clear()
    again = demo_dataset("val")
    assert torch.equal(again.indices, val.indices) and torch.equal(again.images, val.images)


@pytest.mark.parametrize("call", [lambda: demo_dataset("test"), lambda: source_dataset("mid", "train"), lambda: source_dataset("low", "tr")])
def test_bad_names_raise(call):
    with pytest.raises(ValueError, match="use one of"):
        call()
