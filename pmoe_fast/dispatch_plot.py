"""Draw where the dispatcher sends its weight: per prompt layer, each expert's share (PNG).

The paper's Figure 2 shows, per layer, the expert whose prompts receive the largest dispatch
weight (the "path of experts"). This draws that path and, beside it, the full picture a path
hides: a heatmap of the mean dispatch weight each expert's prompts receive, per prompt layer.
The mean runs over the target experts, images and prompt slots of
``model.last_dispatch_weights`` (per prompt layer a (K_target, B, Np, K_source) tensor whose
rows sum to 1), so each layer's K values sum to 1. ``--per-class`` draws one heatmap and one
path per class.

    pmoe-fast plot-dispatch --checkpoint runs/a/best.safetensors --data images/ --output dispatch.png
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import output_folder_problem


@dataclass
class DispatchStats:
    """Mean dispatch weight each source expert's prompts receive, per prompt layer.

    Attributes:
        weights: (Lp, K) over the whole dataset, or (C, Lp, K) per class; each row sums to 1
            (a class without images has NaN rows).
        counts: images that contributed: (1,) overall, (C,) per class.
        per_class: whether ``weights`` is per class.
    """

    weights: np.ndarray
    counts: np.ndarray
    per_class: bool

    def path(self) -> np.ndarray:
        """The most-weighted expert per layer: (Lp,) or (C, Lp) ints (-1 for a class without images)."""
        best = np.nan_to_num(self.weights, nan=-1.0).argmax(-1)
        if self.per_class:
            best[self.counts == 0] = -1
        return best


@torch.no_grad()
def collect(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    per_class: bool = False,
    num_classes: int | None = None,
) -> DispatchStats:
    """Run ``model`` over ``dataset`` (eval mode, no gradients) and average its dispatch weights.

    Args:
        per_class: average per label instead of over the whole dataset.
        num_classes: C for ``per_class`` (default: ``model.num_classes``).
    """
    from .training import resolve_device

    if len(dataset) == 0:
        raise ValueError("cannot collect dispatch weights on an empty dataset")
    device = resolve_device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    C = (num_classes or int(model.num_classes)) if per_class else 1
    sums, counts = None, np.zeros(C, dtype=np.int64)
    try:
        for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            model(images.to(device))
            layers = getattr(model, "last_dispatch_weights", None)
            if not layers:
                raise ValueError(
                    f"{type(model).__name__} exposes no dispatch weights after a forward "
                    "(it needs last_dispatch_weights: a pMoE model with a dispatcher other than 'none')"
                )
            # (Lp, K_t, B, Np, K_s) -> per image (B, Lp, K_s), in float64 for the running sums
            per_image = torch.stack([w.float() for w in layers]).mean(dim=(1, 3)).permute(1, 0, 2).double().cpu()
            if sums is None:
                sums = np.zeros((C,) + tuple(per_image.shape[1:]))
            groups = labels.numpy() if per_class else np.zeros(len(labels), dtype=np.int64)
            if per_class and (groups.min() < 0 or groups.max() >= C):
                raise ValueError(f"labels must lie in [0, {C}), got {groups.min()}..{groups.max()}")
            np.add.at(sums, groups, per_image.numpy())
            counts += np.bincount(groups, minlength=C)
    finally:
        model.train(was_training)
    with np.errstate(invalid="ignore"):
        means = sums / counts[:, None, None]
    return DispatchStats(weights=means if per_class else means[0], counts=counts, per_class=per_class)


def save_png(
    stats: DispatchStats,
    path: str,
    *,
    title: str | None = None,
    expert_names: list[str] | None = None,
    class_names: list[str] | None = None,
) -> None:
    """Draw ``stats`` to a PNG: per panel (the whole set, or each class) a heatmap of the mean
    dispatch weight (rows: prompt layers, columns: experts) with the most-weighted expert's path
    drawn over it, and one plot of the paths (per class: one line per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    weights = stats.weights if stats.per_class else stats.weights[None]
    paths = stats.path() if stats.per_class else stats.path()[None]
    C, Lp, K = weights.shape
    expert_names = list(expert_names) if expert_names else [f"expert {k}" for k in range(K)]
    if len(expert_names) != K:
        raise ValueError(f"{len(expert_names)} expert names for {K} experts")
    if stats.per_class:
        class_names = list(class_names) if class_names else [f"class {c}" for c in range(C)]
        if len(class_names) != C:
            raise ValueError(f"{len(class_names)} class names for {C} classes")
        panel_titles = [f"{name} ({n} images)" for name, n in zip(class_names, stats.counts)]
    else:
        panel_titles = [f"all images ({stats.counts[0]})"]

    ncols = min(C, 4) + 1  # heatmaps, then the path plot
    nrows = math.ceil(C / (ncols - 1))
    cell_w, cell_h = max(2.8, 0.7 * K + 1.6), max(2.6, 0.35 * Lp + 1.3)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell_w * ncols + 1.0, cell_h * nrows + 0.6),
                             squeeze=False, layout="constrained")
    layers = np.arange(Lp)
    image = None
    for c in range(C):
        ax = axes[c // (ncols - 1)][c % (ncols - 1)]
        image = ax.imshow(weights[c], vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        valid = paths[c] >= 0
        ax.plot(paths[c][valid], layers[valid], color="red", linewidth=1.0, alpha=0.7)
        for l in layers[valid]:  # outline the most-weighted expert's cell
            ax.add_patch(Rectangle((paths[c][l] - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.set_xticks(range(K), expert_names, rotation=30, ha="right")
        ax.set_yticks(layers)
        ax.set_ylabel("prompt layer")
        ax.set_title(panel_titles[c], fontsize=9)
        if K * Lp <= 64:
            for l in range(Lp):
                for k in range(K):
                    if not np.isnan(weights[c, l, k]):
                        ax.text(k, l, f"{weights[c, l, k]:.2f}", ha="center", va="center", fontsize=7,
                                color="black" if weights[c, l, k] > 0.6 else "white")
    for c in range(C, nrows * (ncols - 1)):
        axes[c // (ncols - 1)][c % (ncols - 1)].axis("off")
    for r in range(1, nrows):
        axes[r][-1].axis("off")
    ax = axes[0][-1]
    # Paths of several classes often coincide: shift each line a little to keep all visible.
    offsets = np.linspace(-0.15, 0.15, C) if C > 1 else np.zeros(1)
    for c in range(C):
        valid = paths[c] >= 0
        ax.plot(layers[valid], paths[c][valid] + offsets[c], marker="o", markersize=4,
                label=class_names[c] if stats.per_class else None)
    ax.set_yticks(range(K), expert_names)
    ax.set_ylim(-0.5, K - 0.5)
    ax.set_xticks(layers)
    ax.set_xlabel("prompt layer")
    ax.set_title("most-weighted expert per layer", fontsize=9)
    if stats.per_class and C <= 12:
        ax.legend(fontsize=7)
    fig.colorbar(image, ax=axes[:, :-1].ravel().tolist(), shrink=0.8, label="mean dispatch weight")
    fig.suptitle(title or "pMoE dispatch weights per prompt layer (red: most-weighted expert)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .evaluate import add_checkpoint_arguments

    add_checkpoint_arguments(p)
    p.add_argument("--per-class", action="store_true", help="one heatmap and path per class")
    p.add_argument("--output", required=True, metavar="PNG", help="where the figure goes")
    p.add_argument("--title", help="the figure's title")


def check_output(path: str) -> None:
    """Exit naming --output when the figure cannot go to ``path``: its folder does not exist or
    cannot be written, or its extension names no format matplotlib writes (without one,
    matplotlib would add .png)."""
    from matplotlib.backend_bases import FigureCanvasBase

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise SystemExit(f"pmoe-fast plot-dispatch: --output {path}: the folder {folder} does not exist; "
                         "create it or write the figure elsewhere")
    problem = output_folder_problem(folder)
    if problem:
        raise SystemExit(f"pmoe-fast plot-dispatch: --output {path}: {problem}")
    formats = FigureCanvasBase.get_supported_filetypes()
    if os.path.splitext(path)[1][1:].lower() not in formats:
        raise SystemExit(f"pmoe-fast plot-dispatch: --output {path}: name a file ending in .png (or another "
                         f"format matplotlib writes: {', '.join(sorted(formats))})")


def run(args: argparse.Namespace) -> None:
    """Rebuild the model from the checkpoint, collect its dispatch weights on the chosen split, draw them."""
    from .evaluate import load_for_eval

    check_output(args.output)
    model, saved, dataset, data, source = load_for_eval(args, "plot-dispatch")
    if saved.config.get("dispatcher") == "none":
        raise SystemExit("pmoe-fast plot-dispatch: this model was trained with dispatcher 'none': "
                         "each expert keeps its own prompts, there are no dispatch weights to draw")
    stats = collect(model, dataset, batch_size=args.batch_size, device=args.device, per_class=args.per_class)
    names = [e.get("name") or f"expert {k}" for k, e in enumerate(saved.config["experts"])]
    names = [f"{k}: {n}" for k, n in enumerate(names)]
    title = args.title or f"{os.path.basename(args.checkpoint)} on {os.path.basename(str(source).rstrip('/'))} ({args.split})"
    save_png(stats, args.output, title=title, expert_names=names, class_names=data.classes)
    if stats.per_class:  # the whole set: the class means weighted by their images
        weights = np.nansum(stats.weights * stats.counts[:, None, None], axis=0) / stats.counts.sum()
    else:
        weights = stats.weights
    print(f"{len(dataset)} images; mean dispatch weight per prompt layer (columns: {', '.join(names)}):")
    for l, row in enumerate(weights):
        print(f"  layer {l}: " + "  ".join(f"{v:.3f}" for v in row))
    print(f"wrote {args.output}")
