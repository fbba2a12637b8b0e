"""The demo's data (pmoe_fast.datasets) and the ``pmoe-fast demo`` command."""

import json
import os
import re

import numpy as np
import pytest
import torch

from pmoe_fast import cli, datasets, demo, training
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


@pytest.mark.parametrize("call", [lambda: demo_dataset("test"), lambda: source_dataset("mid", "train"),
                                  lambda: source_dataset("low", "tr")], ids=["split", "task", "source-split"])
def test_bad_names_raise(call):
    with pytest.raises(ValueError, match="use one of"):
        call()


# -- the experts' cache ---------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """As the demo runs: its tiny matrices gain nothing from more threads, which slow down on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_recipe(**changes):
    return {**demo.expert_recipe("A", epochs=1, seed=0, limit=16), **changes}


def test_recipe_key_follows_every_field():
    recipe = tiny_recipe()
    assert demo.recipe_key(recipe) == demo.recipe_key(tiny_recipe())
    assert demo.recipe_key(recipe) != demo.recipe_key(demo.expert_recipe("A", epochs=2, seed=0, limit=16))
    assert demo.recipe_key(recipe) != demo.recipe_key(demo.expert_recipe("A", epochs=1, seed=1, limit=16))
    assert demo.recipe_key(recipe) != demo.recipe_key(tiny_recipe(arch={**recipe["arch"], "depth": 2}))


def test_cache_is_reused_and_a_changed_recipe_retrains(tmp_path, monkeypatch, one_thread):
    calls = []
    real_fit = training.fit
    monkeypatch.setattr(training, "fit", lambda *a, **k: calls.append(1) or real_fit(*a, **k))
    said = []
    first, info = demo.pretrained_expert(tiny_recipe(), str(tmp_path), log=said.append)
    assert not info["cached"] and len(calls) == 1
    assert os.listdir(tmp_path) == [os.path.basename(info["path"])]  # no temporary file left

    again, info2 = demo.pretrained_expert(tiny_recipe(), str(tmp_path), log=pytest.fail)
    assert info2["cached"] and info2["path"] == info["path"] and len(calls) == 1
    assert info2["source_val_acc"] == info["source_val_acc"]
    for (name, a), b in zip(first.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(k.startswith("head.") for k in again.state_dict()) and again.num_classes == 0

    changed = demo.expert_recipe("A", epochs=2, seed=0, limit=16)
    _, info3 = demo.pretrained_expert(changed, str(tmp_path), log=said.append)
    assert not info3["cached"] and info3["path"] != info["path"] and len(calls) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(i["path"]) for i in (info, info3))

    _, info4 = demo.pretrained_expert(tiny_recipe(), str(tmp_path), fresh=True, log=said.append)
    assert not info4["cached"] and len(calls) == 3
    assert said == ["  A: pre-training on 16 images of the digits 0-4 (epochs: 1)...",
                    "  A: pre-training on 16 images of the digits 0-4 (epochs: 2)...",
                    "  A: pre-training on 16 images of the digits 0-4 (epochs: 1)..."]


def test_cache_file_of_another_recipe_is_not_trusted(tmp_path, one_thread):
    _, info = demo.pretrained_expert(tiny_recipe(), str(tmp_path))
    other = tiny_recipe(train={**tiny_recipe()["train"], "lr": 1e-3})
    os.replace(info["path"], os.path.join(tmp_path, os.path.basename(info["path"]).replace(
        demo.recipe_key(tiny_recipe())[:16], demo.recipe_key(other)[:16])))
    said = []
    _, info2 = demo.pretrained_expert(other, str(tmp_path), log=said.append)
    assert not info2["cached"] and "another recipe" in said[0]


def test_limit_dataset_is_a_fixed_subset():
    val = demo_dataset("val")
    a, b = demo.limit_dataset(val, 25), demo.limit_dataset(val, 25)
    assert len(a) == 25 and torch.equal(a.indices, b.indices)
    assert set(a.indices.tolist()) <= set(val.indices.tolist())
    assert demo.limit_dataset(val, 10_000) is val
    with pytest.raises(ValueError, match="--limit"):
        demo.limit_dataset(val, 0)


# -- the command ----------------------------------------------------------------------------------

TABLE_ROW = re.compile(r"^(VPT on expert A|VPT on expert B|EPTs, no dispatcher|pMoE)\s{2,}(A|B|A \+ B)\s+"
                       r"(\d+(?: \+ \d+)?)\s+([\d,]+)\s+(\d\.\d{3})$", re.M)


def run_demo(capsys, *args):
    cli.main(["demo", *args])
    return capsys.readouterr().out


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    args = ["--output", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"), "--epochs", "1",
            "--pretrain-epochs", "1", "--limit", "40", "--prompts", "3"]
    out = run_demo(capsys, *args)
    rows = TABLE_ROW.findall(out)
    assert [r[0] for r in rows] == ["VPT on expert A", "VPT on expert B", "EPTs, no dispatcher", "pMoE"]
    assert [r[1] for r in rows] == ["A", "B", "A + B", "A + B"]
    assert [r[2] for r in rows] == ["6", "6", "3 + 3", "3 + 3"]
    params = [int(r[3].replace(",", "")) for r in rows]
    D, L, C = demo.EMBED_DIM, demo.DEPTH, 10
    assert params[:3] == [L * 6 * D + D * C + C] * 3  # same prompts and head
    assert params[3] == params[2] + L * (D * 2 + 2)  # plus one Linear(D, 2) per prompt layer
    assert out.count("pre-trained in") == 2 and "from the cache" not in out
    png = tmp_path / "out" / "dispatch.png"
    assert f"dispatch plot: {png}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [f"{r['val_accuracy']:.3f}" for r in saved["results"]] == [r[4] for r in rows]

    again = run_demo(capsys, *args)  # the experts come from the cache; the numbers repeat
    assert again.count("from the cache") == 2 and "pre-trained in" not in again
    assert TABLE_ROW.findall(again) == rows


@pytest.mark.parametrize("option", ["--epochs", "--pretrain-epochs", "--prompts", "--threads", "--limit"])
def test_demo_rejects_bad_counts(option, tmp_path):
    with pytest.raises(SystemExit, match=f"{option} must be >= 1"):
        cli.main(["demo", option, "0", "--output", str(tmp_path)])
