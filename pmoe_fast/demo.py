"""Adapt two small experts, pre-trained on different digits, to all ten: VPT vs EPTs vs pMoE.

The paper's Table 8 ablation in miniature, on real data that ships with scikit-learn (the
handwritten digits, ``pmoe_fast.datasets``), offline and on a CPU:

1. Two small ViTs of the same width and depth are pre-trained (whole network and a linear head)
   on different source tasks: expert A on the digits 0-4, expert B on the digits 5-9. They differ
   in their prefix tokens too: A has a class token, B four register tokens and average pooling.
   The backbones are cached (safetensors, keyed by a hash of their recipe), so a second run skips
   this step; ``--fresh`` retrains.
2. Both are frozen and adapted to the target task, all ten digits from 10 images each (images the
   experts never saw), four ways: VPT-deep on A alone, on B alone, both experts with their own
   prompts and no dispatcher ("EPTs without dispatcher"), and pMoE. VPT gets twice the prompts
   per layer of each expert in the two-expert models, so the prompts and head count the same.
3. It prints each method's accuracy on 600 held-out images, draws pMoE's dispatch weights per
   digit (``dispatch.png``) and writes ``results.json`` into ``--output``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from typing import Any, Callable

import torch

from . import datasets
from .checkpoint import output_folder_problem

CACHE_ENV = "PMOE_FAST_CACHE"  # the cache root; the demo keeps its experts in <root>/demo
# Bump when the code that pre-trains the experts changes what it computes: older caches retrain.
RECIPE_VERSION = 1

EMBED_DIM, DEPTH, HEADS = 64, 4, 4
EXPERTS = {  # name -> source task and the ViT's arguments beyond the shared ones
    "A": {"task": "low", "arch": {"patch_size": 4}},
    "B": {"task": "high", "arch": {"patch_size": 4, "reg_tokens": 4, "class_token": False, "global_pool": "avg"}},
}
PRETRAIN = {"lr": 3e-3, "weight_decay": 0.05, "batch_size": 32, "schedule": "cosine", "warmup_steps": 10}
ADAPT = {"lr": 1e-2, "weight_decay": 1e-5, "batch_size": 32, "schedule": "cosine"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="pmoe_fast_demo", metavar="DIR",
                   help="where dispatch.png and results.json go (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the experts' pre-training and every adaptation")
    p.add_argument("--epochs", type=int, default=50, help="adaptation epochs of each method (default: %(default)s)")
    p.add_argument("--pretrain-epochs", type=int, default=50,
                   help="pre-training epochs of each expert (default: %(default)s)")
    p.add_argument("--prompts", type=int, default=5,
                   help="prompts per layer of each expert in the two-expert models; VPT alone gets twice as many "
                        "(default: %(default)s)")
    p.add_argument("--dispatcher-hidden", type=int, default=0,
                   help="hidden width H of pMoE's dispatcher MLP; 0 is one Linear(D, K) (default: %(default)s)")
    p.add_argument("--fresh", action="store_true",
                   help="pre-train the experts again, ignoring (and replacing) the cache")
    p.add_argument("--cache", metavar="DIR",
                   help=f"where pre-trained experts are kept "
                        f"(default: ${CACHE_ENV}/demo, else ~/.cache/pmoe_fast/demo)")
    p.add_argument("--limit", type=int, metavar="N",
                   help="use at most N images of every dataset: a quick check of the machinery (the accuracies then "
                        "mean little)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default: %(default)s: the demo's matrices are tiny, and "
                        "threads that wait on each other on a busy CPU slow it down)")
    p.add_argument("--verbose", action="store_true", help="show every epoch's progress")


def default_cache_dir() -> str:
    """``$PMOE_FAST_CACHE/demo``, else ``~/.cache/pmoe_fast/demo``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pmoe_fast")
    return os.path.join(root, "demo")


# -- data -----------------------------------------------------------------------------------------


def limit_dataset(data: datasets.DigitsTask, limit: int | None) -> datasets.DigitsTask:
    """At most ``limit`` images of ``data``, drawn by a fixed shuffle (the same on every run)."""
    if limit is None or limit >= len(data):
        return data
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:limit].sort().values
    return datasets.DigitsTask(data.images[keep], data.labels[keep], data.indices[keep], data.classes)


# -- experts --------------------------------------------------------------------------------------


def expert_recipe(name: str, *, epochs: int, seed: int, limit: int | None = None) -> dict[str, Any]:
    """Everything that decides expert ``name``'s pre-trained weights (JSON-able): the cache key."""
    spec = EXPERTS[name]
    return {
        "version": RECIPE_VERSION,
        "expert": name,
        "task": spec["task"],
        "digits": list(datasets.SOURCE_TASKS[spec["task"]]),
        "data": {"img_size": datasets.IMG_SIZE, "split_seed": datasets.SPLIT_SEED,
                 "target_train_per_class": datasets.TARGET_TRAIN_PER_CLASS,
                 "target_val_per_class": datasets.TARGET_VAL_PER_CLASS,
                 "source_val_fraction": datasets.SOURCE_VAL_FRACTION, "limit": limit},
        "arch": {"img_size": datasets.IMG_SIZE, "embed_dim": EMBED_DIM, "depth": DEPTH, "num_heads": HEADS,
                 **spec["arch"]},
        "train": {**PRETRAIN, "epochs": epochs, "seed": seed},
    }


def recipe_key(recipe: dict[str, Any]) -> str:
    """sha256 of the recipe's canonical JSON."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def build_backbone(recipe: dict[str, Any], num_classes: int = 0):
    """The recipe's ViT, randomly initialised (``num_classes=0``: no head)."""
    from .vit import VisionTransformer

    return VisionTransformer(num_classes=num_classes, **recipe["arch"])


def pretrained_expert(recipe: dict[str, Any], cache_dir: str, *, fresh: bool = False, verbose: bool = False,
                      log: Callable[[str], None] = print) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The recipe's expert without its head, from the cache or pre-trained now (then cached).

    Returns the backbone and ``{"path", "cached", "seconds", "source_val_acc"}``. The cache
    file ``expert_<name>_<key>.safetensors`` holds the backbone and, as metadata, the recipe
    and its source validation accuracy; it is written atomically, so an interrupted run leaves
    no partial file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from .checkpoint import atomic_write
    from .training import evaluate, fit

    key = recipe_key(recipe)
    path = os.path.join(cache_dir, f"expert_{recipe['expert']}_{key[:16]}.safetensors")
    backbone = build_backbone(recipe)
    if os.path.isfile(path) and not fresh:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("recipe_key") == key:
            backbone.load_state_dict(load_file(path))
            return backbone, {"path": path, "cached": True, "seconds": 0.0,
                              "source_val_acc": float(meta["source_val_acc"])}
        log(f"  {recipe['expert']}: {path} was written for another recipe: pre-training again")

    train_set = limit_dataset(datasets.source_dataset(recipe["task"], "train"), recipe["data"]["limit"])
    val_set = limit_dataset(datasets.source_dataset(recipe["task"], "val"), recipe["data"]["limit"])
    settings = recipe["train"]
    log(f"  {recipe['expert']}: pre-training on {len(train_set)} images of the digits {_digits(recipe['digits'])} "
        f"(epochs: {settings['epochs']})...")
    torch.manual_seed(settings["seed"])
    model = build_backbone(recipe, num_classes=len(datasets.SOURCE_TASKS[recipe["task"]]))
    start = time.perf_counter()
    fit(model, train_set, epochs=settings["epochs"], batch_size=settings["batch_size"], lr=settings["lr"],
        weight_decay=settings["weight_decay"], schedule=settings["schedule"], warmup_steps=settings["warmup_steps"],
        seed=settings["seed"], device="cpu", progress=verbose)
    accuracy = evaluate(model, val_set, device="cpu")["accuracy"]
    seconds = time.perf_counter() - start
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    metadata = {"recipe": json.dumps(recipe, sort_keys=True), "recipe_key": key, "source_val_acc": repr(accuracy)}
    atomic_write(path, lambda tmp: save_file(weights, tmp, metadata=metadata))
    backbone.load_state_dict(weights)
    return backbone, {"path": path, "cached": False, "seconds": seconds, "source_val_acc": accuracy}


# -- adaptation -----------------------------------------------------------------------------------


def methods(prompts: int) -> list[dict[str, Any]]:
    """The four rows of the ablation: name, experts, prompts per layer per expert, dispatcher."""
    return [
        {"method": "VPT on expert A", "experts": ["A"], "prompts": 2 * prompts, "dispatcher": "none"},
        {"method": "VPT on expert B", "experts": ["B"], "prompts": 2 * prompts, "dispatcher": "none"},
        {"method": "EPTs, no dispatcher", "experts": ["A", "B"], "prompts": prompts, "dispatcher": "none"},
        {"method": "pMoE", "experts": ["A", "B"], "prompts": prompts, "dispatcher": "mlp"},
    ]


def tuned_parameter_split(model) -> dict[str, int]:
    """Tuned parameters of a pMoE model by kind: prompts, dispatchers, head."""
    split = {"prompts": 0, "dispatchers": 0, "head": 0}
    ids = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        if id(p) in ids:
            kind = name.split(".")[0]
            split[kind] = split.get(kind, 0) + p.numel()
    return split


def _digits(digits: list[int]) -> str:
    return f"{digits[0]}-{digits[-1]}"


def _table(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    """Pre-train (or load) the experts, adapt them four ways, print the table, draw the dispatch plot."""
    for option in ("epochs", "pretrain_epochs", "prompts", "threads", "limit"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise SystemExit(f"pmoe-fast demo: --{option.replace('_', '-')} must be >= 1, got {value}")
    if args.dispatcher_hidden < 0:
        raise SystemExit(f"pmoe-fast demo: --dispatcher-hidden must be >= 0, got {args.dispatcher_hidden}")
    for flag, folder in (("--output", args.output), ("--cache", args.cache or default_cache_dir())):
        problem = output_folder_problem(folder)
        if problem:
            raise SystemExit(f"pmoe-fast demo: {flag}: {problem}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> None:
    from .dispatch_plot import collect, save_png
    from .model import PMoE
    from .training import evaluate, fit

    start = time.perf_counter()
    cache_dir = args.cache or default_cache_dir()
    train_set = limit_dataset(datasets.demo_dataset("train"), args.limit)
    val_set = limit_dataset(datasets.demo_dataset("val"), args.limit)
    rows = methods(args.prompts)
    Np, Lp, D, C = args.prompts, DEPTH, EMBED_DIM, len(train_set.classes)
    dispatcher = (f"one Linear({D}, 2)" if args.dispatcher_hidden == 0
                  else f"MLP {D} -> {args.dispatcher_hidden} -> 2")
    print("pmoe-fast demo: the paper's Table 8 ablation in miniature, on scikit-learn's handwritten digits")
    print(f"  experts: ViTs, D={D}, {DEPTH} blocks, {HEADS} heads, {datasets.IMG_SIZE}x{datasets.IMG_SIZE} images, "
          "patch 4; A has a class token, B 4 register tokens and average pooling")
    print(f"  pre-training: A on the digits 0-4, B on the digits 5-9 ({args.pretrain_epochs} epochs each, whole "
          "network + linear head), then frozen")
    print(f"  target: all 10 digits, {len(train_set)} training images ({args.epochs} epochs per method), "
          f"{len(val_set)} validation images, none seen by the experts")
    print(f"  tuned parameters: VPT {2 * Np} prompts x {Lp} layers on one expert; the two-expert models {Np} per "
          f"expert x {Lp} layers; each a head Linear({D}, {C}); pMoE adds its dispatchers ({dispatcher} per layer)")

    print(f"experts (cache: {cache_dir}):")
    experts: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(EXPERTS):
        recipe = expert_recipe(name, epochs=args.pretrain_epochs, seed=args.seed + k, limit=args.limit)
        backbone, info = pretrained_expert(recipe, cache_dir, fresh=args.fresh, verbose=args.verbose)
        how = "from the cache" if info["cached"] else f"pre-trained in {info['seconds']:.1f} s"
        print(f"  {name}: {how}; accuracy on held-out images of the digits {_digits(recipe['digits'])}: "
              f"{info['source_val_acc']:.3f}")
        experts[name] = {"recipe": recipe, "state": backbone.state_dict(), **info}

    results, pmoe_model = [], None
    for i, row in enumerate(rows, 1):
        backbones = []
        for name in row["experts"]:
            backbone = build_backbone(experts[name]["recipe"])
            backbone.load_state_dict(experts[name]["state"])
            backbones.append(backbone)
        torch.manual_seed(args.seed)
        model = PMoE(backbones, num_classes=C, num_prompts=row["prompts"], dispatcher=row["dispatcher"],
                     dispatcher_hidden=args.dispatcher_hidden)
        split = tuned_parameter_split(model)
        print(f"[{i}/{len(rows)}] {row['method']}: adapting...", end="\n" if args.verbose else " ", flush=True)
        t0 = time.perf_counter()
        history = fit(model, train_set, epochs=args.epochs, seed=args.seed, device="cpu", progress=args.verbose,
                      **ADAPT)
        accuracy = evaluate(model, val_set, device="cpu")["accuracy"]
        seconds = time.perf_counter() - t0
        print(f"train accuracy {history[-1]['train_acc']:.3f}, "
              f"validation accuracy {accuracy:.3f} ({seconds:.1f} s)")
        results.append({**row, "tuned_params": sum(split.values()), "tuned_split": split,
                        "val_accuracy": accuracy, "train_accuracy": history[-1]["train_acc"], "seconds": seconds})
        if row["dispatcher"] != "none":
            pmoe_model = model

    table = [["method", "experts", "prompts/layer", "tuned params", "val accuracy"]]
    for r in results:
        table.append([r["method"], " + ".join(r["experts"]), " + ".join([str(r["prompts"])] * len(r["experts"])),
                      f"{r['tuned_params']:,}", f"{r['val_accuracy']:.3f}"])
    print()
    print(_table(table, right={3, 4}))
    split = results[-1]["tuned_split"]
    print(f"tuned params = prompts {split['prompts']:,} + head {split['head']:,}"
          f" (+ pMoE's dispatchers {split['dispatchers']:,})")
    best = max(results, key=lambda r: r["val_accuracy"])
    p = best["val_accuracy"]
    print(f"best: {best['method']} ({p:.3f}); with {len(val_set)} validation images one standard error of an "
          f"accuracy near it is {math.sqrt(p * (1 - p) / len(val_set)):.3f}")

    stats = collect(pmoe_model, val_set, per_class=True, num_classes=C)
    names = [f"{name} (digits {_digits(experts[name]['recipe']['digits'])})" for name in EXPERTS]
    png = os.path.join(args.output, "dispatch.png")
    save_png(stats, png, expert_names=names, class_names=[f"digit {c}" for c in val_set.classes],
             title="pMoE on the digits: mean dispatch weight per prompt layer, per digit (red: most-weighted expert)")
    share_a = stats.weights[..., 0].mean(-1)  # (C,): mean weight on expert A's prompts over layers
    shares = []
    for task in ("low", "high"):
        seen = [c for c in datasets.SOURCE_TASKS[task] if stats.counts[c]]
        mean = f"{share_a[seen].mean():.3f}" if seen else "n/a (no images)"
        shares.append(f"{mean} on the digits {_digits(datasets.SOURCE_TASKS[task])}")
    print(f"pMoE's dispatchers give expert A's prompts a mean weight of {shares[0]} and {shares[1]} "
          "(B's get the rest), averaged over prompt layers and images")
    print(f"dispatch plot: {png}")
    elapsed = time.perf_counter() - start
    summary = {"results": results, "experts": {n: {k: e[k] for k in ("recipe", "path", "cached", "source_val_acc")}
                                               for n, e in experts.items()},
               "dispatch_weight_on_A_per_class": share_a.tolist(), "seconds": elapsed,
               "threads": args.threads, "seed": args.seed}
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"results: {os.path.join(args.output, 'results.json')}")
    print(f"time: {elapsed:.1f} s on {args.threads} CPU thread(s)")
