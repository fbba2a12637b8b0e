"""Evaluate a tuned checkpoint: loss, accuracy and (two classes) AUC on an image folder.

    pmoe-fast eval --checkpoint runs/a/best.safetensors                 # the run's own validation split
    pmoe-fast eval --checkpoint runs/a/best.safetensors --data test/ --split all

The model is rebuilt from the checkpoint's configuration: the experts from their recorded names,
arguments and weight files, which must hold the weights the checkpoint was tuned on (their
sha256 is checked; an error lists what differs). If the weight files moved, give them again
with --expert NAME:PATH, one per expert, in order.
"""

from __future__ import annotations

import argparse
import json
import sys

from torch.utils.data import ConcatDataset, Dataset


def add_checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    """Options eval and plot-dispatch share: the checkpoint, the data, the device."""
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a .safetensors file written by pmoe-fast train")
    p.add_argument("--data", metavar="DIR", help="image folder or 'demo' (default: the data the run was trained on)")
    p.add_argument("--split", choices=("val", "train", "all"), default="val",
                   help="which images of --data: the validation split (as in training), the training split, or all (default val)")
    p.add_argument("--expert", action="append", metavar="NAME[:PATH]",
                   help="where each expert's weights are now, if they moved (one per expert, in order)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: the run's")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(p)
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON line")


def load_for_eval(args: argparse.Namespace, command: str) -> tuple:
    """(model, checkpoint, the chosen split as a Dataset, the ``DataSplits``, the data source) from
    the shared options; errors exit with a message naming the problem."""
    from . import training
    from .checkpoint import ExpertMismatchError, load
    from .data import DataError, open_data
    from .train import GPU_ONLY, check_device, first_line, parse_expert

    if args.batch_size < 1:
        raise SystemExit(f"pmoe-fast {command}: --batch-size must be >= 1, got {args.batch_size}")
    device = check_device(args.device, command)
    overrides = {"precision": args.precision} if args.precision else {}
    try:
        saved = load(args.checkpoint)
    except (OSError, ValueError) as e:
        raise SystemExit(f"pmoe-fast {command}: {e}")
    if device.type == "cpu":
        # Options that only change how the model runs: a run tuned on a GPU evaluates on a CPU.
        for key, gpu_only in GPU_ONLY.items():
            if saved.config.get(key) in gpu_only:
                overrides[key] = "auto"
                print(f"note: {key} {saved.config[key]!r} runs on CUDA devices; on this CPU 'auto'", file=sys.stderr)
    experts = [parse_expert(e, command) for e in args.expert] if args.expert else None
    try:
        model, saved = training.model_from_checkpoint(saved, experts=experts, **overrides)
    except ExpertMismatchError as e:
        raise SystemExit(f"pmoe-fast {command}: {e}")
    except (OSError, ValueError) as e:
        raise SystemExit(f"pmoe-fast {command}: {e}")
    except TypeError as e:  # a constructor refuses a recorded argument
        raise SystemExit(f"pmoe-fast {command}: {args.checkpoint} records arguments that its experts' or "
                         "pmoe_fast.PMoE's constructor refuses (was it written by another version of pmoe_fast?): "
                         f"{first_line(e)}")
    config = saved.config
    source = args.data or config["data"]
    img_size = tuple(model.experts[0].patch_embed.img_size)
    try:
        data = open_data(source, img_size=img_size, mean=config["mean"], std=config["std"],
                         val_fraction=config["val_fraction"], seed=config["seed"], classes=config["classes"])
    except (DataError, FileNotFoundError) as e:
        raise SystemExit(f"pmoe-fast {command}: {e}")
    chosen: Dataset = {"val": data.val, "train": data.train, "all": ConcatDataset([data.train, data.val])}[args.split]
    return model, saved, chosen, data, source


def run(args: argparse.Namespace) -> None:
    """Rebuild the model from the checkpoint and evaluate it on the chosen split."""
    from . import training

    model, saved, dataset, data, source = load_for_eval(args, "eval")
    metrics = training.evaluate(model, dataset, batch_size=args.batch_size, device=args.device, progress=not args.json)
    epoch = saved.state.get("epoch")
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "data": source, "split": args.split, "epoch": epoch, **metrics}))
        return
    print(f"checkpoint {args.checkpoint} (epoch {epoch}), {data.description}")
    print(f"{args.split}: {len(dataset)} images, " + training.format_metrics(metrics))
