"""Predict a training step's peak memory for each checkpointing / expert dtype choice, and recommend one.

    pmoe-fast plan --expert vit_base_patch16_224 --expert vit_base_patch14_224 --img-size 224 \\
        --prompts 10 --batch 32 --budget 24GiB [--classes 100]
    pmoe-fast plan --experts vit_large_patch14_224 --num-experts 9 --batch 16 --budget 80GB

Experts are built on the meta device (no memory, no weights): by name through
``pmoe_fast.vit.create_model``, else ``timm.create_model(name, pretrained=False)``. The numbers
come from ``pmoe_fast.memory.predict`` (its docstring says what it models); nothing runs.
"""

from __future__ import annotations

import argparse

import torch

from .memory import (
    BYTES_FORMS,
    CHECKPOINT_CHOICES,
    DEFAULT_HEADROOM,
    EXPERT_DTYPE_NAMES,
    OPTIMIZERS,
    format_bytes,
    parse_bytes,
    recommend,
)


def _budget(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _prompt_layers(text: str) -> int | str:
    if text in ("deep", "shallow"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'deep', 'shallow' or a number of layers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expert", action="append", default=[], metavar="NAME",
                   help="an expert architecture; repeat for each expert")
    p.add_argument("--experts", metavar="NAME", help="one architecture for all experts (with --num-experts)")
    p.add_argument("--num-experts", type=_positive, metavar="K", help="how many --experts")
    p.add_argument("--img-size", type=_positive, default=224)
    p.add_argument("--prompts", type=_positive, default=10, help="prompt tokens per expert per layer (Np)")
    p.add_argument("--prompt-layers", type=_prompt_layers, default=None, help="'deep' (default), 'shallow' or a number")
    p.add_argument("--batch", type=_positive, required=True)
    p.add_argument("--budget", type=_budget, required=True, help=f"memory to fit in: {BYTES_FORMS}")
    p.add_argument("--classes", type=_positive, default=100)
    p.add_argument("--dispatcher", choices=("mlp", "moe", "none"), default="mlp")
    p.add_argument("--dispatcher-hidden", type=int, default=64)
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default="adamw")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where the training will run")
    p.add_argument("--execution", choices=("auto", "batched", "streams", "sequential"), default="auto")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"expert dtypes to try, of {', '.join(EXPERT_DTYPE_NAMES)}")
    p.add_argument("--checkpoints", default=None,
                   help=f"segment lengths to try, e.g. 0,1,2 (default: 0 and those of {CHECKPOINT_CHOICES[1:]} below the depth)")
    p.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM,
                   help="share of the budget kept free for the CUDA context and allocator fragmentation")


def build_expert(name: str, img_size: int) -> torch.nn.Module:
    """An expert architecture on the meta device: pmoe_fast.vit's, else timm's."""
    from . import vit

    with torch.device("meta"):
        if name in vit.MODEL_NAMES:
            return vit.create_model(name, img_size=img_size, num_classes=0)
        try:
            import timm
        except ImportError:
            raise ValueError(f"unknown expert {name!r}: not a pmoe_fast.vit model, and timm is not installed to look further") from None
        try:
            return timm.create_model(name, pretrained=False, img_size=img_size, num_classes=0)
        except RuntimeError as theirs:  # timm's "Unknown model"
            raise ValueError(f"unknown expert {name!r}: not a pmoe_fast.vit model, and timm says: {theirs}") from None
        except TypeError as theirs:  # an architecture without img_size: not a ViT
            raise ValueError(f"timm's {name!r} is not a ViT pMoE can use as an expert ({theirs})") from None
        except Exception as theirs:  # noqa: BLE001 - a hub name offline, a bad size: name the expert
            raise ValueError(f"timm cannot build expert {name!r} ({type(theirs).__name__}: {theirs})") from None


def _names(args: argparse.Namespace, error) -> list[str]:
    if args.expert and (args.experts or args.num_experts):
        error("give either --expert NAME (repeated) or --experts NAME --num-experts K, not both")
    if args.experts or args.num_experts:
        if not (args.experts and args.num_experts):
            error("--experts NAME and --num-experts K go together")
        return [args.experts] * args.num_experts
    if not args.expert:
        error("name the experts: --expert NAME (once per expert) or --experts NAME --num-experts K")
    return args.expert


def _list(text: str, convert, what: str, error) -> list:
    try:
        return [convert(item.strip()) for item in text.split(",") if item.strip()]
    except (KeyError, ValueError):
        error(f"cannot read {what} from {text!r}")


def run(args: argparse.Namespace) -> None:
    """Print every option's predicted memory and the recommendation."""

    def error(message: str) -> None:
        raise SystemExit(f"pmoe-fast plan: error: {message}")

    names = _names(args, error)
    dtypes = _list(args.dtypes, lambda n: EXPERT_DTYPE_NAMES[n], f"--dtypes (names of {tuple(EXPERT_DTYPE_NAMES)})", error)
    checkpoints = None if args.checkpoints is None else _list(args.checkpoints, int, "--checkpoints (integers >= 0)", error)
    if not dtypes or (checkpoints is not None and (not checkpoints or min(checkpoints) < 0)):
        error("--dtypes and --checkpoints need at least one value (checkpoints >= 0)")
    try:
        experts = [build_expert(name, args.img_size) for name in names]
        rec = recommend(
            experts, batch_size=args.batch, budget_bytes=args.budget, checkpoints=checkpoints, expert_dtypes=dtypes,
            headroom=args.headroom, num_prompts=args.prompts, num_classes=args.classes,
            prompt_layers=args.prompt_layers, dispatcher=args.dispatcher, dispatcher_hidden=args.dispatcher_hidden,
            optimizer=args.optimizer, execution=args.execution, device=args.device,
        )
    except (TypeError, ValueError) as e:  # experts pMoE cannot use, options the model rejects
        error(str(e))

    first = rec.options[0].estimate
    print(f"pMoE training step, predicted: {len(names)} expert{'s' * (len(names) > 1)} ({', '.join(dict.fromkeys(names))}), "
          f"images {args.img_size}x{args.img_size}, {args.prompts} prompts, batch {args.batch}, {args.classes} classes, "
          f"{args.optimizer}, on {args.device} (execution {first.execution})")
    print(f"budget {format_bytes(rec.budget_bytes)}; an option fits under {format_bytes(rec.usable_bytes)} "
          f"({args.headroom:.0%} kept for the CUDA context and allocator fragmentation)")
    header = ("checkpoint", "experts", "frozen", "trainable", "activations", "peak", "fits", "peak phase")
    rows = []
    for o in rec.options:
        e = o.estimate
        rows.append((
            str(o.checkpoint) if o.checkpoint else "off", str(o.expert_dtype).removeprefix("torch."),
            format_bytes(e.frozen_bytes), format_bytes(e.trainable_bytes), format_bytes(e.activation_bytes),
            format_bytes(e.peak_bytes), "yes" if o.fits else "no", e.phase,
        ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    print(f"recommendation: {rec.message}")
