"""Training, evaluation, image folders and the train/eval/plot-dispatch commands."""

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from pmoe_fast import checkpoint as ckpt_io
from pmoe_fast import data, training
from pmoe_fast.cli import main
from pmoe_fast.model import PMoE
from pmoe_fast.vit import create_model

EXPERT_ARGS = dict(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_expert(seed: int):
    torch.manual_seed(seed)
    return create_model("vit_tiny_patch16_224", num_classes=0, **EXPERT_ARGS)


def tiny_model(num_classes=2, **kwargs):
    torch.manual_seed(0)
    experts = [tiny_expert(1), tiny_expert(2)]
    torch.manual_seed(3)
    return PMoE(experts, num_classes=num_classes, num_prompts=2, **kwargs)


class Blobs(Dataset):
    """Images whose mean brightness gives the class; ``interrupt_at`` sends Ctrl-C while item i is read."""

    def __init__(self, n=12, num_classes=2, seed=0, interrupt_at=None):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_classes
        self.images = torch.randn(n, 3, 16, 16, generator=g) + self.labels.view(-1, 1, 1, 1).float()
        self.interrupt_at = interrupt_at

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if i == self.interrupt_at:
            self.interrupt_at = None
            os.kill(os.getpid(), signal.SIGINT)
        return self.images[i], int(self.labels[i])


def trainable(model):
    return {n: p.detach().clone() for n, p in ckpt_io.trainable_named_parameters(model)}


def fit(model, train, epochs, **kwargs):
    kwargs = {"batch_size": 4, "lr": 1e-2, "progress": False, **kwargs}
    return training.fit(model, train, Blobs(6, seed=9), epochs=epochs, **kwargs)


# -- fit and evaluate -----------------------------------------------------------------------------


def test_fit_reports_each_epoch_and_learns(tmp_path):
    model = tiny_model()
    before = training.evaluate(model, Blobs(seed=0))
    history = fit(model, Blobs(), 3, output_dir=tmp_path)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "images_per_s", "lr"} <= set(history[0])
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert training.evaluate(model, Blobs(seed=0))["loss"] < before["loss"]
    assert sorted(os.listdir(tmp_path)) == ["best.safetensors", "last.safetensors", "metrics.jsonl"]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    assert ckpt_io.load(tmp_path / "last.safetensors").state["epoch"] == 3


def vit_with_dropout():
    """A plain ViT whose head trains behind dropout: its resume needs the RNG state restored."""
    torch.manual_seed(0)
    vit = create_model("vit_tiny_patch16_224", num_classes=2, drop_rate=0.5, **EXPERT_ARGS)
    vit.requires_grad_(False)
    vit.head.requires_grad_(True)
    return vit


@pytest.mark.parametrize("build", [lambda: tiny_model(dispatcher="moe"), vit_with_dropout], ids=["pmoe-moe", "vit-dropout"])
def test_two_epochs_equal_one_then_resume(tmp_path, build):
    straight = build()
    fit(straight, Blobs(), 2)
    resumed = build()
    fit(resumed, Blobs(), 1, checkpoint_path=tmp_path / "last.safetensors")
    again = build()  # a fresh process would rebuild the model
    torch.manual_seed(1234)  # and its RNG would be elsewhere
    fit(again, Blobs(), 2, resume=tmp_path / "last.safetensors")
    a, b = trainable(straight), trainable(again)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_ctrl_c_mid_epoch_saves_and_resume_is_exact(tmp_path):
    straight = tiny_model()
    fit(straight, Blobs(), 2)
    stopped = tiny_model()
    path = tmp_path / "last.safetensors"
    batches = training.epoch_batches(12, 4, seed=0, epoch=0)
    with pytest.raises(training.TrainingInterrupted) as e:
        fit(stopped, Blobs(interrupt_at=batches[1][0]), 2, checkpoint_path=path)  # in epoch 1's second batch
    assert (e.value.epoch, e.value.batch) == (0, 2)
    again = tiny_model()
    fit(again, Blobs(), 2, resume=path)
    a, b = trainable(straight), trainable(again)
    assert all(torch.equal(a[n], b[n]) for n in a)


class NoisyBlobs(Blobs):
    """Blobs with noise drawn as each item is read, as augmentation does."""

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return image + 0.1 * torch.randn(image.shape), label


def test_resume_mid_epoch_with_workers_draws_the_same_numbers(tmp_path, monkeypatch):
    """With workers, which worker reads a batch depends on where the loader starts: each item's
    draws are seeded by (seed, epoch, index), not by the worker's place in its stream."""
    straight = tiny_model()
    fit(straight, NoisyBlobs(), 1, num_workers=2)
    save = ckpt_io.save

    def save_and_keep_step_1(path, *args, state=None, **kwargs):
        save(path, *args, state=state, **kwargs)
        if state is not None and state["step"] == 1:
            shutil.copy(path, tmp_path / "step1.safetensors")

    monkeypatch.setattr(ckpt_io, "save", save_and_keep_step_1)
    fit(tiny_model(), NoisyBlobs(), 1, num_workers=2, save_every=1, checkpoint_path=tmp_path / "last.safetensors")
    again = tiny_model()
    fit(again, NoisyBlobs(), 1, num_workers=2, resume=tmp_path / "step1.safetensors")
    a, b = trainable(straight), trainable(again)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_refuses_other_settings(tmp_path):
    fit(tiny_model(), Blobs(), 1, checkpoint_path=tmp_path / "last.safetensors")
    with pytest.raises(ValueError, match=r"batch_size: 4 recorded, 3 given"):
        fit(tiny_model(), Blobs(), 2, batch_size=3, resume=tmp_path / "last.safetensors")


def test_fit_trains_a_plain_vit_with_a_head():
    vit = vit_with_dropout()
    frozen = vit.blocks[0].attn.qkv.weight.clone()
    head = vit.head.weight.clone()
    history = fit(vit, Blobs(), 1)
    assert "val_auc" in history[0]
    assert torch.equal(vit.blocks[0].attn.qkv.weight.cpu(), frozen) and not torch.equal(vit.head.weight.cpu(), head)


def test_evaluate_accuracy_and_auc():
    from sklearn.metrics import roc_auc_score

    model = tiny_model()
    ds = Blobs(10)
    got = training.evaluate(model, ds, batch_size=3, device="cpu")
    with torch.no_grad():
        logits = model.eval()(ds.images)
    probs = logits.softmax(-1)
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == ds.labels).float().mean().item())
    assert got["auc"] == pytest.approx(roc_auc_score(ds.labels.numpy(), probs[:, 1].numpy()))
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, ds.labels).item(), rel=1e-5)
    assert "auc" not in training.evaluate(tiny_model(num_classes=3), Blobs(6, num_classes=3))


def test_schedules_and_epoch_order():
    assert [training.lr_factor("constant", s, 10, 2) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert training.lr_factor("cosine", 2, 10, 2) == 1.0
    assert training.lr_factor("cosine", 6, 10, 2) == pytest.approx(0.5)
    assert training.lr_factor("cosine", 10, 10, 2) == pytest.approx(0.0)
    first = training.epoch_batches(10, 4, seed=0, epoch=0)
    assert sorted(i for b in first for i in b) == list(range(10)) and [len(b) for b in first] == [4, 4, 2]
    assert first == training.epoch_batches(10, 4, seed=0, epoch=0)
    assert first != training.epoch_batches(10, 4, seed=0, epoch=1)


# -- image folders --------------------------------------------------------------------------------


def write_images(root, classes=("cat", "dog"), per_class=5, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 100, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] += 120
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_folder_split_is_stratified_and_seeded(tmp_path):
    root = write_images(tmp_path / "imgs", ("a", "b", "c"), per_class=5)
    (root / "a" / "notes.txt").write_text("not an image")
    found = data.scan(root, val_fraction=0.4, seed=0)
    assert found.classes == ["a", "b", "c"] and found.layout == "classes"
    assert sorted(lab for _, lab in found.val) == [0, 0, 1, 1, 2, 2]
    assert not {p for p, _ in found.val} & {p for p, _ in found.train}
    assert found.skipped == [str(root / "a" / "notes.txt")]
    assert data.scan(root, val_fraction=0.4, seed=0).val == found.val
    assert data.scan(root, val_fraction=0.4, seed=1).val != found.val
    image, label = data.ImageFiles(found.train, found.classes, (16, 16), (0.5,) * 3, (0.5,) * 3)[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and -1.0 <= image.min() < image.max() <= 1.0


def test_folder_with_train_and_val(tmp_path):
    write_images(tmp_path / "train", ("x", "y"), per_class=3)
    write_images(tmp_path / "val", ("x", "y"), per_class=2)
    found = data.scan(tmp_path)
    assert found.layout == "split" and (len(found.train), len(found.val)) == (6, 4)


@pytest.mark.parametrize("problem, message", [
    ("missing", "image folder not found"),
    ("empty", "holds no images"),
    ("one class", "holds one class"),
    ("empty class", r"class folder\(s\) without images .*\['b'\]"),
    ("unreadable", r"(?s)cannot be read as images.*broken\.png"),
    ("mixed", r"mixes layouts: it has train/ and val/ and also \['extra'\]"),
    ("train only", "has train/ but not val/"),
    ("loose images", "holds image files directly"),
])
def test_bad_folders_say_what_is_wrong(tmp_path, problem, message):
    root = tmp_path / "imgs"
    root.mkdir()
    if problem == "one class":
        write_images(root, ("a",))
    elif problem == "empty class":
        write_images(root, ("a",))
        (root / "b").mkdir()
    elif problem == "unreadable":
        write_images(root)
        (root / "cat" / "broken.png").write_bytes(b"not a png")
    elif problem == "mixed":
        write_images(root / "train")
        write_images(root / "val")
        write_images(root, ("extra",))
    elif problem == "train only":
        write_images(root / "train")
    elif problem == "loose images":
        write_images(root)
        (root / "cat" / "0.png").rename(root / "0.png")
    with pytest.raises(data.DataError, match=message):
        data.scan(root if problem != "missing" else tmp_path / "absent")


# -- experts from names and files -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_build_expert_loads_weights(tmp_path, suffix):
    from safetensors.torch import save_file

    source = create_model("vit_tiny_patch16_224", **EXPERT_ARGS)  # with a 1000-class head: ignored
    path = str(tmp_path / f"w{suffix}")
    save_file(source.state_dict(), path) if suffix == ".safetensors" else torch.save(source.state_dict(), path)
    expert = training.build_expert("vit_tiny_patch16_224", path, EXPERT_ARGS)
    assert torch.equal(expert.pos_embed, source.pos_embed) and expert.num_classes == 0
    with pytest.raises(ValueError, match="do not fit expert vit_tiny_patch16_224"):
        training.build_expert("vit_tiny_patch16_224", path, {**EXPERT_ARGS, "depth": 3})
    with pytest.raises(ValueError, match="unknown expert architecture 'no_such_vit'"):
        training.build_expert("no_such_vit")


def test_parse_expert():
    assert training.parse_expert("vit_small_patch16_224:w/a.safetensors") == {
        "name": "vit_small_patch16_224", "weights": "w/a.safetensors", "kwargs": {}}
    assert training.parse_expert("hf-hub:timm/vit_x")["name"] == "hf-hub:timm/vit_x"
    with pytest.raises(ValueError, match="NAME or NAME:PATH"):
        training.parse_expert("vit:")


# -- the commands, as a user runs them ------------------------------------------------------------


@pytest.fixture
def weights(tmp_path):
    from safetensors.torch import save_file

    paths = []
    for seed in (1, 2):
        path = tmp_path / f"expert{seed}.safetensors"
        save_file(tiny_expert(seed).state_dict(), path)
        paths.append(f"vit_tiny_patch16_224:{path}")
    return paths


def train_args(weights, root, out, *extra):
    args = ["train", "--data", str(root), "--output", str(out), "--expert-args", json.dumps(EXPERT_ARGS),
            "--prompts", "2", "--batch-size", "4", "--lr", "1e-2", "--no-progress"]
    for w in weights:
        args += ["--expert", w]
    return args + list(extra)


def test_train_stop_resume_eval_plot(tmp_path, weights, capsys):
    root = write_images(tmp_path / "imgs", ("cat", "dog"), per_class=6)
    out = tmp_path / "run"
    main(train_args(weights, root, out, "--epochs", "1"))
    main(["train", "--resume", str(out / "last.safetensors"), "--epochs", "2", "--no-progress"])
    log = capsys.readouterr().out
    assert "resumed from" in log and "epoch 2/2: train loss" in log and "auc" in log

    straight = tmp_path / "straight"
    main(train_args(weights, root, straight, "--epochs", "2"))
    a, b = ckpt_io.load(out / "last.safetensors"), ckpt_io.load(straight / "last.safetensors")
    assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    assert a.config["classes"] == ["cat", "dog"] and a.config["mean"] == [0.5, 0.5, 0.5]

    capsys.readouterr()
    main(["eval", "--checkpoint", str(out / "best.safetensors"), "--json"])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0 and "auc" in metrics

    png = tmp_path / "dispatch.png"
    main(["plot-dispatch", "--checkpoint", str(out / "best.safetensors"), "--per-class", "--output", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(SystemExit, match="expert 0: the frozen weights differ"):
        main(["eval", "--checkpoint", str(out / "best.safetensors"), "--expert", weights[1], "--expert", weights[0]])
    with pytest.raises(SystemExit, match=r"keeps its recorded settings; these differ: lr"):
        main(["train", "--resume", str(out / "last.safetensors"), "--lr", "0.5"])


def test_resume_writes_beside_the_checkpoint_and_takes_the_recorded_data(tmp_path, weights, monkeypatch):
    """A copy of a run resumes into the copy, not into the folder it was written to; the original
    command with --resume added (its --data, a relative --output) resumes; a new run refuses a
    folder that holds a run."""
    root = write_images(tmp_path / "imgs", ("cat", "dog"), per_class=6)
    monkeypatch.chdir(tmp_path)
    main(train_args(weights, root, "run", "--epochs", "1"))
    first = (tmp_path / "run" / "last.safetensors").read_bytes()
    shutil.copytree(tmp_path / "run", tmp_path / "copy")
    main(["train", "--resume", "copy/last.safetensors", "--epochs", "2", "--no-progress"])
    assert (tmp_path / "run" / "last.safetensors").read_bytes() == first
    assert ckpt_io.load(tmp_path / "copy" / "last.safetensors").state["epoch"] == 2
    main(train_args(weights, root, "run", "--epochs", "2", "--resume", "run/last.safetensors"))
    assert ckpt_io.load(tmp_path / "run" / "last.safetensors").state["epoch"] == 2
    with pytest.raises(SystemExit, match=r"--output .*run already holds a run .*: continue it with --resume"):
        main(train_args(weights, root, "run", "--epochs", "1"))


def test_resume_finds_the_expert_weights_elsewhere(tmp_path, weights):
    """Weight files moved since the run began: --expert names them anew and the resume checks
    their fingerprints; other weights at the new path are refused."""
    root = write_images(tmp_path / "imgs", ("cat", "dog"), per_class=6)
    main(train_args(weights, root, tmp_path / "run", "--epochs", "1"))
    moved = []
    for k, spec in enumerate(weights):
        name, path = spec.split(":", 1)
        shutil.move(path, tmp_path / f"moved{k}.safetensors")
        moved.append(f"{name}:{tmp_path / f'moved{k}.safetensors'}")
    resume = ["train", "--resume", str(tmp_path / "run" / "last.safetensors"), "--no-progress"]
    main([*resume, "--epochs", "2", "--expert", moved[0], "--expert", moved[1]])
    assert ckpt_io.load(tmp_path / "run" / "last.safetensors").state["epoch"] == 2
    with pytest.raises(SystemExit, match="expert 1: the frozen weights differ"):
        main([*resume, "--epochs", "3", "--expert", moved[0], "--expert", moved[0]])


def test_a_checkpoint_tuned_with_a_gpu_backend_evaluates_on_a_cpu(tmp_path, weights, capsys):
    root = write_images(tmp_path / "imgs", ("cat", "dog"), per_class=6)
    out = tmp_path / "run"
    main(train_args(weights, root, out, "--epochs", "1"))
    model, saved = training.model_from_checkpoint(out / "last.safetensors")
    ckpt_io.save(out / "gpu.safetensors", model, config={**saved.config, "dispatcher_backend": "cuda"},
                 experts=saved.experts, state=saved.state)
    capsys.readouterr()
    main(["eval", "--checkpoint", str(out / "gpu.safetensors"), "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["images"] == 2
    assert "dispatcher_backend 'cuda' runs on CUDA devices; on this CPU 'auto'" in captured.err
    with pytest.raises(SystemExit, match="--dispatcher-backend cuda runs on CUDA devices; on a CPU use auto"):
        main(train_args(weights, root, tmp_path / "other", "--epochs", "1", "--device", "cpu",
                        "--dispatcher-backend", "cuda"))


@pytest.mark.parametrize("setting", [dict(lr=0.0), dict(save_every=-1), dict(warmup_steps=-1), dict(aux_weight=-0.5),
                                     dict(lr=float("inf")), dict(weight_decay=float("nan"))],
                         ids=["lr0", "save-every-negative", "warmup-negative", "aux-negative", "lr-inf", "decay-nan"])
def test_fit_refuses_settings_that_would_train_wrongly(setting):
    """lr = 0 trains nothing, save_every = -1 saves every step (step % -1 == 0), a NaN weight decay
    turns every parameter to NaN: refused up front."""
    with pytest.raises(ValueError, match="lr must be > 0, weight_decay, aux_weight, warmup_steps and save_every >= 0, and all finite"):
        training.fit(None, [0], None, **{"epochs": 1, "batch_size": 1, "lr": 1e-3, **setting})


def test_config_file_and_flags(tmp_path, weights, capsys):
    root = write_images(tmp_path / "imgs", ("a", "b", "c"), per_class=3)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"experts: [{weights[0]!r}, {weights[1]!r}]\nexpert-args: {json.dumps(EXPERT_ARGS)}\n"
        f"data: {root}\nepochs: 5\nbatch_size: 4\nprompts: 2\ndispatcher: moe\n"
    )
    main(["train", "--config", str(config), "--epochs", "1", "--output", str(tmp_path / "out"), "--no-progress"])
    saved = ckpt_io.load(tmp_path / "out" / "last.safetensors")
    assert saved.config["epochs"] == 1 and saved.config["dispatcher"] == "moe" and saved.state["epoch"] == 1
    assert "epoch 1/1" in capsys.readouterr().out
    config.write_text("learning_rate: 0.1\n")
    with pytest.raises(SystemExit, match=r"unknown option\(s\) in .*\['learning_rate'\]"):
        main(["train", "--config", str(config)])


@pytest.mark.parametrize("option, value, message", [
    ("--pmoe-args", '{"dispatch_pol": "patches"}',
     r"--pmoe-args: pmoe_fast\.PMoE takes no 'dispatch_pol'; it takes .*dispatch_pool.*help\(pmoe_fast\.PMoE\)"),
    ("--pmoe-args", '{"num_prompts": 3}',
     r"--pmoe-args gives arguments that options of their own set: num_prompts \(give --prompts\)"),
    ("--pmoe-args", "[1]", r"--pmoe-args must be a JSON object of keyword arguments, got \[1\]"),
    ("--expert-args", json.dumps({**EXPERT_ARGS, "img_sise": 16}),
     r"an expert refuses its arguments \(--expert-args, .*unexpected keyword argument 'img_sise'\. .* take .*img_size"),
    ("--attention", "xformers", "--attention xformers cannot run on cpu: xformers attention runs on CUDA tensors"),
], ids=["unknown PMoE argument", "PMoE argument of an option", "not an object", "unknown expert argument",
        "xformers on a CPU"])
def test_train_option_mistakes_are_one_line_errors(tmp_path, weights, option, value, message):
    root = write_images(tmp_path / "imgs", ("a", "b"), per_class=3)
    with pytest.raises(SystemExit, match=message) as e:
        main(train_args(weights, root, tmp_path / "out", "--epochs", "1", "--device", "cpu", option, value))
    assert str(e.value).startswith("pmoe-fast train: ") and "\n" not in str(e.value)


def test_pmoe_args_refuse_what_build_model_sets():
    """train.PMOE_OPTIONS names exactly the PMoE arguments build_model passes itself: each given
    again is a TypeError, and all the others may be given."""
    import inspect

    from pmoe_fast import train
    from pmoe_fast.reference import PMoE as ReferencePMoE

    defaults = {p.name: p.default for init in (ReferencePMoE.__init__, PMoE.__init__)
                for p in inspect.signature(init).parameters.values()}
    experts = ([tiny_expert(1), tiny_expert(2)], [])
    for name in train.PMOE_OPTIONS:
        with pytest.raises(TypeError, match=f"multiple values for (keyword )?argument '{name}'"):
            training.build_model({"num_classes": 2, "pmoe_args": {name: defaults[name]}}, experts=experts)
    others = {n: defaults[n] for n in train.pmoe_parameters() if n not in train.PMOE_OPTIONS}
    assert training.build_model({"num_classes": 2, "pmoe_args": others}, experts=experts).num_classes == 2


def test_train_on_the_demo_set(tmp_path, capsys):
    pytest.importorskip("pmoe_fast.datasets")
    main(["train", "--data", "demo", "--expert", "vit_tiny_patch16_224", "--expert", "vit_tiny_patch16_224",
          "--expert-args", json.dumps({**EXPERT_ARGS, "depth": 1}), "--prompts", "2", "--epochs", "1",
          "--output", str(tmp_path), "--no-progress"])
    log = capsys.readouterr().out
    assert "demo set (scikit-learn digits): 100 train / 600 val images, 10 classes" in log
    assert ckpt_io.load(tmp_path / "best.safetensors").config["classes"] == [str(d) for d in range(10)]


def test_memory_budget_picks_checkpointing_and_precision(tmp_path, weights, capsys):
    from pmoe_fast import memory

    root = write_images(tmp_path / "imgs", ("a", "b"), per_class=3)
    experts = [tiny_expert(1), tiny_expert(2)]
    plan = dict(batch_size=4, num_prompts=2, num_classes=2, device="cpu")
    roomy = memory.recommend(experts, budget_bytes=2**30, **plan)
    assert (roomy.option.checkpoint, roomy.option.expert_dtype) == (0, torch.float32)
    # A budget just below what the roomy choice needs forces checkpointing or bf16 experts.
    budget = int(roomy.option.estimate.peak_bytes / (1 - memory.DEFAULT_HEADROOM)) - 1
    tight = memory.recommend(experts, budget_bytes=budget, **plan)
    assert tight.fits and (tight.option.checkpoint, tight.option.expert_dtype) != (0, torch.float32)

    main(train_args(weights, root, tmp_path / "out", "--epochs", "1", "--memory-budget", f"{budget}B", "--device", "cpu"))
    config = ckpt_io.load(tmp_path / "out" / "last.safetensors").config
    assert config["grad_checkpoint"] == tight.option.checkpoint
    assert config["precision"] == ("bf16" if tight.option.expert_dtype == torch.bfloat16 else "fp32")
    assert f"memory budget {budget}B: " in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--memory-budget 1KiB: nothing fits"):
        main(train_args(weights, root, tmp_path / "out2", "--memory-budget", "1KiB"))
