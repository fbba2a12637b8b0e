"""Training and evaluation of pMoE (or any classifier whose trainable parameters are few).

    model = build_model(config)                       # pMoE over the configured experts
    history = fit(model, train_set, val_set, epochs=30, output_dir="runs/a")
    print(evaluate(model, val_set))                   # {'loss': ..., 'accuracy': ..., 'auc': ...}

``fit`` follows the paper's recipe (Section 4 / Appendix C: AdamW, learning rate 1e-4, weight
decay 1e-5, batch 32, 30 epochs; the paper names no learning-rate schedule, so the default keeps
the rate constant, and ``schedule="cosine"`` offers linear warm-up then cosine decay). The data
order of each epoch is a permutation seeded by (seed, epoch), so a run stopped and resumed from
its checkpoint sees the same batches and ends with bit-identical parameters (on the same device,
execution and backends, and library versions; GPU kernels may be non-deterministic). With
DataLoader workers, each item's random draws are seeded by (seed, epoch, its index).

Datasets are ``torch.utils.data.Dataset`` objects of (float image tensor (C, H, W), int label).
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import checkpoint as ckpt_io

PAPER_DEFAULTS = {"epochs": 30, "batch_size": 32, "lr": 1e-4, "weight_decay": 1e-5}
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fit``: the step in progress finished and the run's state was saved.

    Attributes:
        path: the checkpoint to resume from.
        epoch, batch: where the run stopped (completed epochs; batches done in the next one).
    """

    def __init__(self, path: str, epoch: int, batch: int):
        super().__init__(f"training stopped after epoch {epoch} + {batch} batches; resume from {path}")
        self.path, self.epoch, self.batch = path, epoch, batch


# -- pieces ---------------------------------------------------------------------------------------


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based).

    "constant": 1 after a linear warm-up of ``warmup_steps``. "cosine": the same warm-up, then
    cosine decay to 0 at ``total_steps``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of epoch ``epoch`` (0-based): a permutation of the items seeded by (seed,
    epoch) alone, so it is the same whether or not the run was resumed. The last batch may be
    short."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    order = torch.randperm(num_items, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, num_items, batch_size)]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or CUDA when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _loader(dataset: Dataset, batches: list[list[int]], device: torch.device, num_workers: int, seed: int) -> DataLoader:
    # The generator seeds the workers; without one, DataLoader would draw from the global RNG.
    return DataLoader(_SeededItems(dataset, seed) if num_workers else dataset, batch_sampler=batches,
                      num_workers=num_workers, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(seed))


class _SeededItems(Dataset):
    """``dataset`` read in DataLoader workers, each item's random draws (augmentation) seeded by
    (seed, its index). Which worker reads an item depends on where the loader started, so a run
    resumed mid-epoch would otherwise draw other numbers than the run it continues; in the main
    process (no workers) the global generators draw, and checkpoints restore them."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item_seed = int(np.random.SeedSequence([self.seed % 2**32, int(i)]).generate_state(1)[0])
        torch.manual_seed(item_seed)
        np.random.seed(item_seed)
        random.seed(item_seed)
        return self.dataset[i]


def _num_classes(model: nn.Module, logits: torch.Tensor) -> int:
    return int(getattr(model, "num_classes", logits.shape[-1]))


def _progress(iterable, *, enabled: bool, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)


# -- evaluation -----------------------------------------------------------------------------------


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve of binary ``labels`` ranked by ``scores``; None when only one
    class is present (the AUC is undefined)."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss, accuracy and, for two classes, ROC AUC of ``model`` on ``dataset``.

    Returns ``{"loss", "accuracy", "images"}`` plus ``"auc"`` for a two-class model (the score is
    the softmax probability of class 1; None when the dataset holds one class only). The model
    is moved to ``device`` and left in the train/eval mode it was in.
    """
    if len(dataset) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    device = resolve_device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    loss_sum, correct, labels_all, probs_all = 0.0, 0, [], []
    try:
        for images, labels in _progress(_loader(dataset, batches, device, num_workers, 0), enabled=progress,
                                        desc="eval", leave=False):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            labels_all.append(labels.cpu())
            probs_all.append(logits.softmax(-1).cpu())
    finally:
        model.train(was_training)
    n = len(dataset)
    result: dict[str, Any] = {"loss": loss_sum / n, "accuracy": correct / n, "images": n}
    probs = torch.cat(probs_all)
    if _num_classes(model, probs) == 2:
        result["auc"] = roc_auc(torch.cat(labels_all).numpy(), probs[:, 1].numpy())
    return result


def format_metrics(metrics: dict[str, Any], prefix: str = "") -> str:
    """``loss 0.6931 acc 0.500 auc 0.512`` from an ``evaluate`` result."""
    text = f"{prefix}loss {metrics['loss']:.4f} acc {metrics['accuracy']:.3f}"
    if "auc" in metrics:
        text += " auc " + ("n/a (one class)" if metrics["auc"] is None else f"{metrics['auc']:.3f}")
    return text


# -- training -------------------------------------------------------------------------------------


class _StopOnSigint:
    """While active in the main thread, the first Ctrl-C sets ``requested`` (the loop stops at the
    next step boundary and saves); a second one interrupts at once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    @contextmanager
    def active(self):
        if not self.enabled:
            yield self
            return
        previous = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None = None,
    *,
    epochs: int,
    batch_size: int = 32,
    lr: float = 1e-4,
    weight_decay: float = 1e-5,
    aux_weight: float = 0.01,
    schedule: str = "constant",
    warmup_steps: int = 0,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    config: dict[str, Any] | None = None,
    num_workers: int = 0,
    save_every: int = 0,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model``'s trainable parameters on ``train_set``; returns one dict per epoch.

    AdamW over ``model.trainable_parameters()`` when the model has it (pMoE: prompts,
    dispatchers, head, base extras), else over the parameters with ``requires_grad`` (so a plain
    ViT with a head trains too). The loss is cross-entropy plus ``aux_weight`` times
    ``model.last_aux_loss`` when the model exposes one (the MoE dispatcher's load balancing).

    Args:
        epochs: total epochs of the run (a resumed run continues up to it).
        batch_size, lr, weight_decay: the paper's defaults.
        schedule, warmup_steps: learning-rate schedule (``lr_factor``); the paper names none.
        device: None picks CUDA when available.
        seed: seeds torch, NumPy and Python's RNGs at the start and the per-epoch data order.
        progress: tqdm bars (loss, accuracy, images/s) and a summary line per epoch.
        checkpoint_path: write the run's state there (atomically) after every epoch, every
            ``save_every`` steps, and on Ctrl-C; resume from it with ``resume=``.
        output_dir: writes ``last.safetensors`` (= checkpoint_path unless given),
            ``best.safetensors`` (best validation accuracy; with a validation set) and
            ``metrics.jsonl`` (the history, one JSON object per epoch).
        resume: a checkpoint written by ``fit``: the parameters, optimizer, schedule, position in
            the run and RNG states are restored, and training continues where it stopped. The
            run's settings (batch size, lr, seed, ...) must be the recorded ones.
        config: JSON-able description of the model, recorded in the checkpoints so that
            ``pmoe-fast eval`` can rebuild it (``build_model``).
        num_workers: DataLoader worker processes.
        save_every: also checkpoint every that many optimizer steps (0: once per epoch).
        log: where summary lines go (default: ``tqdm.write`` when ``progress``, else nowhere).

    Returns:
        Per epoch: ``epoch`` (1-based), ``train_loss``, ``train_acc``, ``images_per_s``, ``lr``,
        and with a validation set ``val_loss``, ``val_acc`` and ``val_auc`` (two classes).

    Raises:
        TrainingInterrupted: on Ctrl-C, once the current step finished and the state was saved
            (only with a checkpoint path; otherwise Ctrl-C interrupts as usual).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    finite = all(math.isfinite(v) for v in (lr, weight_decay, aux_weight))
    if not (finite and lr > 0) or weight_decay < 0 or aux_weight < 0 or warmup_steps < 0 or (save_every or 0) < 0:
        raise ValueError(
            f"lr must be > 0, weight_decay, aux_weight, warmup_steps and save_every >= 0, and all finite, got lr={lr}, "
            f"weight_decay={weight_decay}, aux_weight={aux_weight}, warmup_steps={warmup_steps}, save_every={save_every}"
        )
    if len(train_set) == 0:
        raise ValueError("the training set is empty")
    lr_factor(schedule, 0, 1, warmup_steps)  # validates the schedule
    if progress and log is None:
        from tqdm.auto import tqdm

        log = tqdm.write
    log = log or (lambda _: None)
    if output_dir is not None:
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        checkpoint_path = checkpoint_path or os.path.join(output_dir, "last.safetensors")
    best_path = os.path.join(output_dir, "best.safetensors") if output_dir is not None else None
    metrics_path = os.path.join(output_dir, "metrics.jsonl") if output_dir is not None else None

    device = resolve_device(device)
    model.to(device)
    named = ckpt_io.trainable_named_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameters")
    names = [n for n, _ in named]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_set) / batch_size)
    total_steps = epochs * steps_per_epoch
    settings = dict(batch_size=batch_size, lr=lr, weight_decay=weight_decay, aux_weight=aux_weight,
                    schedule=schedule, warmup_steps=warmup_steps, seed=seed,
                    train_items=len(train_set))
    identities = ckpt_io.model_expert_identities(model)

    history: list[dict[str, Any]] = []
    best = {"val_acc": -1.0, "epoch": 0}
    epoch, batch_in_epoch, step = 0, 0, 0
    running = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
    if resume is not None:
        saved = ckpt_io.load(resume)
        state = saved.state
        if "settings" not in state or saved.rng is None:
            raise ValueError(f"{resume} holds no run state to resume from (it is a best/final checkpoint); "
                             "resume from the run's last.safetensors")
        differ = [f"{k}: {state['settings'].get(k)!r} recorded, {v!r} given"
                  for k, v in settings.items() if state["settings"].get(k) != v]
        if schedule != "constant" and state.get("epochs") != epochs:
            differ.append(f"epochs: {state.get('epochs')} recorded, {epochs} given (the {schedule} schedule depends on it)")
        if differ:
            raise ValueError("cannot resume exactly with other run settings: " + "; ".join(differ)
                             + ". Resume with the recorded settings.")
        ckpt_io.load_into(model, saved)
        ckpt_io.load_optimizer_state(optimizer, names, saved)
        epoch, batch_in_epoch, step = state["epoch"], state["batch"], state["step"]
        running, history, best = state["running"], state["history"], state["best"]
        ckpt_io.restore_rng(saved.rng)
        log(f"resumed from {resume}: epoch {epoch} done" + (f" + {batch_in_epoch} batches" if batch_in_epoch else "")
            + ("" if epoch < epochs else f"; the run is complete ({epochs} epochs): nothing to do"))
    else:
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)

    def run_state() -> dict[str, Any]:
        return {"epoch": epoch, "batch": batch_in_epoch, "step": step, "epochs": epochs, "running": running,
                "history": history, "best": best, "settings": settings}

    def save_last() -> None:
        if checkpoint_path is not None:
            ckpt_io.save(checkpoint_path, model, optimizer=optimizer, config=config, experts=identities,
                         state=run_state(), rng=True)

    stopper = _StopOnSigint(checkpoint_path is not None)
    with stopper.active():
        while epoch < epochs:
            model.train()
            batches = epoch_batches(len(train_set), batch_size, seed, epoch)
            loader = _loader(train_set, batches[batch_in_epoch:], device, num_workers, seed + epoch)
            bar = _progress(loader, enabled=progress, desc=f"epoch {epoch + 1}/{epochs}",
                            initial=batch_in_epoch, total=len(batches), leave=False)
            start = time.perf_counter()
            for images, labels in bar:
                for group in optimizer.param_groups:
                    group["lr"] = lr * lr_factor(schedule, step, total_steps, warmup_steps)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                logits = model(images)
                loss = F.cross_entropy(logits.float(), labels)
                aux = getattr(model, "last_aux_loss", None)
                total = loss + aux_weight * aux.float() if aux is not None and aux_weight else loss
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                step += 1
                batch_in_epoch += 1
                running["loss_sum"] += loss.item() * len(labels)
                running["correct"] += (logits.argmax(-1) == labels).sum().item()
                running["seen"] += len(labels)
                now = time.perf_counter()
                running["seconds"] += now - start
                start = now
                bar.set_postfix(loss=f"{running['loss_sum'] / running['seen']:.4f}",
                                acc=f"{running['correct'] / running['seen']:.3f}",
                                img_s=f"{running['seen'] / max(running['seconds'], 1e-9):.1f}")
                if stopper.requested or (save_every and step % save_every == 0 and batch_in_epoch < len(batches)):
                    save_last()
                if stopper.requested:
                    bar.close()
                    if checkpoint_path is None:
                        raise KeyboardInterrupt
                    raise TrainingInterrupted(os.fspath(checkpoint_path), epoch, batch_in_epoch)
            bar.close()

            record = {
                "epoch": epoch + 1,
                "train_loss": running["loss_sum"] / running["seen"],
                "train_acc": running["correct"] / running["seen"],
                "images_per_s": running["seen"] / max(running["seconds"], 1e-9),
                "lr": optimizer.param_groups[0]["lr"],
            }
            line = f"epoch {epoch + 1}/{epochs}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.3f}"
            improved = False
            if val_set is not None:
                metrics = evaluate(model, val_set, batch_size=batch_size, device=device, num_workers=num_workers,
                                   progress=progress)
                record.update(val_loss=metrics["loss"], val_acc=metrics["accuracy"])
                if "auc" in metrics:
                    record["val_auc"] = metrics["auc"]
                line += " | val " + format_metrics(metrics)
                improved = metrics["accuracy"] > best["val_acc"]
                if improved:
                    best = {"val_acc": metrics["accuracy"], "epoch": epoch + 1}
            log(line + f" | {record['images_per_s']:.1f} images/s")
            history.append(record)
            epoch += 1
            batch_in_epoch = 0
            running = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
            save_last()
            if improved and best_path is not None:
                ckpt_io.save(best_path, model, config=config, experts=identities,
                             state={"epoch": epoch, "step": step, "metrics": record})
            if metrics_path is not None:
                text = "".join(json.dumps(r) + "\n" for r in history)
                ckpt_io.atomic_write(metrics_path, lambda tmp: _write_text(tmp, text))
    return history


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# -- building the model from a configuration ------------------------------------------------------

# Every key ``build_model`` and ``pmoe-fast train`` read, with its default. A configuration file
# (JSON or YAML) gives any of them; the command line overrides the file.
DEFAULT_CONFIG: dict[str, Any] = {
    "experts": [],  # [{"name": ..., "weights": path or None, "kwargs": {...}}], K >= 1
    "expert_args": {},  # kwargs for every expert (e.g. img_size, depth); an expert's own kwargs win
    "pretrained": False,  # let timm download pre-trained weights for experts without a weight file
    "data": None,  # an image folder, or "demo"
    "val_fraction": 0.2,
    "mean": None,  # input normalisation; None: the experts' pretrained configuration, else ImageNet's
    "std": None,
    "prompts": 10,  # Np
    "prompt_layers": None,  # "deep", "shallow" or an int; None: the base method's own
    "dispatcher": "mlp",
    "dispatcher_hidden": 64,
    "dispatch_experts": 3,  # M of the "moe" dispatcher
    "top_k": 1,
    "base": "vpt",
    "pmoe_args": {},  # further pmoe_fast.PMoE arguments (separate_mlps, dispatch_pool, gate_layers, ...)
    "execution": "auto",
    "attention": "auto",
    "dispatcher_backend": "auto",
    "grad_checkpoint": 0,  # PMoE(checkpoint=...): 0 off, n: recompute activations in segments of n layers
    "precision": "fp32",  # "bf16": the frozen experts in bfloat16 (PMoE expert_dtype); trainables stay fp32
    "memory_budget": None,  # e.g. "16GiB": let pmoe_fast.memory pick grad_checkpoint and precision
    "epochs": PAPER_DEFAULTS["epochs"],
    "batch_size": PAPER_DEFAULTS["batch_size"],
    "lr": PAPER_DEFAULTS["lr"],
    "weight_decay": PAPER_DEFAULTS["weight_decay"],
    "aux_weight": 0.01,
    "schedule": "constant",
    "warmup_steps": 0,
    "seed": 0,
    "workers": 0,
    "save_every": 0,
    "device": None,
    "output": None,
}


def parse_expert(text: str) -> dict[str, Any]:
    """``"NAME[:PATH]"`` -> ``{"name": NAME, "weights": PATH or None, "kwargs": {}}``. A timm
    ``hf-hub:`` name keeps its prefix (``hf-hub:timm/vit_small_patch16_224:w.safetensors``)."""
    prefix = ""
    for hub in ("hf-hub:", "hf_hub:"):
        if text.startswith(hub):
            prefix, text = hub, text[len(hub):]
    name, sep, path = text.partition(":")
    if not name or (sep and not path):
        raise ValueError(f"expert {prefix + text!r} must be NAME or NAME:PATH, e.g. vit_small_patch16_224:weights/a.safetensors")
    return {"name": prefix + name, "weights": path or None, "kwargs": {}}


def build_expert(name: str, weights: str | None = None, kwargs: dict[str, Any] | None = None,
                 pretrained: bool = False) -> nn.Module:
    """One frozen-to-be expert without a head (``num_classes=0``).

    The name resolves through ``pmoe_fast.vit.create_model`` (our ViTs), then
    ``timm.create_model``; ``pretrained`` asks timm to download its weights (only for experts
    without a weight file; needs network access). ``weights`` is a .safetensors or .pth file in
    timm's key names (``pmoe_fast.vit.load_weights``); a classifier head in it is ignored.
    """
    from . import vit

    kwargs = {**(kwargs or {}), "num_classes": 0}
    if name in vit._MODEL_ARGS and not (pretrained and weights is None):
        model = vit.create_model(name, **kwargs)
    else:
        try:
            import timm
        except ImportError as e:
            raise ValueError(f"expert {name!r} is not one of pmoe_fast.vit's models ({', '.join(vit._MODEL_ARGS)}) "
                             "and timm is not installed") from e
        download = pretrained and weights is None
        try:
            model = timm.create_model(name, pretrained=download, **kwargs)
        except RuntimeError as e:
            if "Unknown model" not in str(e):
                raise
            raise ValueError(f"unknown expert architecture {name!r}: neither pmoe_fast.vit "
                             f"({', '.join(vit._MODEL_ARGS)}) nor timm (timm.list_models()) has it") from e
        except Exception as e:  # network and hub errors come in many types
            if not download:
                raise
            raise ValueError(f"timm could not get pre-trained weights for {name!r} ({type(e).__name__}: {e}); "
                             f"without network access give a weight file: --expert {name}:PATH") from e
    if weights is not None:
        try:
            result = vit.load_weights(model, weights, strict=False)
        except RuntimeError as e:  # shape mismatches: load_state_dict lists them
            raise ValueError(f"weights {weights} do not fit expert {name} with kwargs {kwargs}: {e}. "
                             "Give the expert the arguments its weights were trained with (--expert-args).") from e
        unexpected = [k for k in result.unexpected_keys if not k.startswith("head.")]
        if result.missing_keys or unexpected:
            raise ValueError(
                f"weights {weights} do not fit expert {name} with kwargs {kwargs}: "
                f"missing {result.missing_keys[:8]}, unexpected {unexpected[:8]}. Give the expert the "
                "architecture its weights were saved from (name and --expert-args)."
            )
    return model


def build_experts(config: dict[str, Any]) -> tuple[list[nn.Module], list[dict[str, Any]]]:
    """The configured experts (``build_expert``) and their identities (spec, architecture,
    fingerprints of their weights as loaded, before any dtype conversion: ``checkpoint.expert_identities``)."""
    cfg = {**DEFAULT_CONFIG, **config}
    if not cfg["experts"]:
        raise ValueError("no experts: give at least one, e.g. --expert vit_small_patch16_224:weights/a.safetensors")
    specs = [{**spec, "kwargs": {**cfg["expert_args"], **spec.get("kwargs", {})}} for spec in cfg["experts"]]
    experts = [build_expert(s["name"], s.get("weights"), s["kwargs"], cfg["pretrained"]) for s in specs]
    return experts, ckpt_io.expert_identities(experts, specs)


def build_model(config: dict[str, Any], num_classes: int | None = None, *,
                experts: tuple[list[nn.Module], list[dict[str, Any]]] | None = None) -> nn.Module:
    """The fast ``pmoe_fast.PMoE`` a configuration describes (keys: ``DEFAULT_CONFIG``).

    ``num_classes`` defaults to ``config["num_classes"]``; ``experts`` takes what
    ``build_experts(config)`` returned, when the caller built them already. The experts'
    identities are recorded (``checkpoint.record_expert_identities``) for tuned checkpoints.
    """
    from .model import PMoE

    cfg = {**DEFAULT_CONFIG, **config}
    num_classes = num_classes if num_classes is not None else cfg.get("num_classes")
    if not num_classes:
        raise ValueError("the number of classes is unknown: give num_classes or config['num_classes']")
    if cfg["precision"] not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg['precision']!r}; choose one of {PRECISIONS}")
    modules, identities = experts if experts is not None else build_experts(cfg)
    prompt_layers = cfg["prompt_layers"]
    if isinstance(prompt_layers, str) and prompt_layers.isdigit():
        prompt_layers = int(prompt_layers)
    model = PMoE(
        modules, num_classes, num_prompts=cfg["prompts"], prompt_layers=prompt_layers, dispatcher=cfg["dispatcher"],
        dispatcher_hidden=cfg["dispatcher_hidden"], num_dispatch_experts=cfg["dispatch_experts"], top_k=cfg["top_k"],
        base=cfg["base"], **cfg["pmoe_args"],
        execution=cfg["execution"], attention=cfg["attention"], dispatcher_backend=cfg["dispatcher_backend"],
        checkpoint=int(cfg["grad_checkpoint"]), expert_dtype=torch.bfloat16 if cfg["precision"] == "bf16" else None,
    )
    ckpt_io.record_expert_identities(model, identities)
    return model


def model_from_checkpoint(path: str | os.PathLike | ckpt_io.Checkpoint, experts: list[dict[str, Any]] | None = None,
                          **overrides) -> tuple[nn.Module, ckpt_io.Checkpoint]:
    """Rebuild the model a tuned checkpoint (a path, or one ``checkpoint.load`` read) records and
    load its parameters.

    The experts come from their recorded names, kwargs and weight files (``experts`` replaces
    them, e.g. after moving the weight files); their weights must match the recorded
    fingerprints (``checkpoint.ExpertMismatchError`` lists what differs). ``overrides`` replace
    configuration keys that do not change the function (execution, attention, precision, ...).
    """
    saved, where = (path, "the checkpoint") if isinstance(path, ckpt_io.Checkpoint) else (ckpt_io.load(path), path)
    if not saved.config.get("experts"):
        raise ValueError(f"{where} records no model configuration; it was not written by pmoe-fast train")
    config = {**saved.config, **overrides}
    if experts is not None:
        if len(experts) != len(saved.experts):
            raise ValueError(f"{where} was tuned on {len(saved.experts)} experts; {len(experts)} given")
        config["experts"] = [{**old, **{k: v for k, v in new.items() if v}}
                             for old, new in zip(saved.config["experts"], experts)]
    torch.manual_seed(config.get("seed", 0))  # as pmoe-fast train did: experts without weight files are its seed's
    model = build_model(config)
    ckpt_io.load_into(model, saved)
    return model, saved
