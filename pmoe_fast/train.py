"""Train pMoE on an image folder (or the demo set): prompts, dispatchers and head; experts frozen.

    pmoe-fast train --expert vit_small_patch16_224:weights/a.safetensors \\
                    --expert vit_small_patch16_224:weights/b.safetensors \\
                    --data images/ --output runs/a
    pmoe-fast train --resume runs/a/last.safetensors          # after a stop (Ctrl-C) or a crash

Defaults are the paper's: AdamW, lr 1e-4, weight decay 1e-5, batch 32, 30 epochs, constant
learning rate. Every option can come from a YAML or JSON file (``--config FILE``; keys are the
long option names, with _ or -; ``experts`` is a list of "NAME[:PATH]" strings or of
{name, weights, kwargs}); options on the command line override the file. --output receives
last.safetensors (every epoch, and on Ctrl-C: the step in progress finishes, the state is saved,
the run stops), best.safetensors (best validation accuracy) and metrics.jsonl. A resumed run
continues exactly: same batches, optimizer, schedule and random state (bit-identical with the
same device, execution, attention and dispatcher backend).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
from typing import Any

import torch

from . import attention as attention_backends
from . import training
from .checkpoint import output_folder_problem
from .training import DEFAULT_CONFIG

# Options that may change when resuming: they do not alter the run's math. device, execution,
# attention and dispatcher_backend change its rounding: the parameters are then no longer
# bit-identical to an uninterrupted run's.
RESUMABLE = ("epochs", "device", "workers", "output", "save_every", "execution", "attention", "dispatcher_backend")
# pmoe_fast.PMoE arguments that training.build_model takes from an option of their own; --pmoe-args may not give them.
PMOE_OPTIONS = {
    "experts": "--expert", "num_classes": "--data (its classes)", "num_prompts": "--prompts",
    "prompt_layers": "--prompt-layers", "dispatcher": "--dispatcher", "dispatcher_hidden": "--dispatcher-hidden",
    "num_dispatch_experts": "--dispatch-experts", "top_k": "--top-k", "base": "--base", "execution": "--execution",
    "attention": "--attention", "dispatcher_backend": "--dispatcher-backend", "checkpoint": "--grad-checkpoint",
    "expert_dtype": "--precision",
}


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Expert and pMoE options (train; eval and plot-dispatch take the expert ones to relocate weights)."""
    g = p.add_argument_group("experts")
    g.add_argument("--expert", action="append", metavar="NAME[:PATH]",
                   help="an expert, repeated for K experts: a pmoe_fast.vit or timm architecture name, and a "
                        ".safetensors/.pth file of its weights in timm's key names")
    g.add_argument("--expert-args", type=json.loads, metavar="JSON",
                   help='keyword arguments for every expert\'s constructor, e.g. \'{"img_size": 64, "depth": 4}\'')
    g.add_argument("--pretrained", action="store_true", default=None,
                   help="let timm download pre-trained weights for experts given without a file (needs network)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULT_CONFIG
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file with any of the options below")
    p.add_argument("--resume", metavar="CKPT", help="continue the run a last.safetensors records")
    add_model_arguments(p)
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR", help="image folder (DIR/<class>/*.png, or DIR/train/<class> + DIR/val/<class>), or 'demo'")
    g.add_argument("--val-fraction", type=float, help=f"validation share of a folder without train/ and val/ (default {d['val_fraction']})")
    g.add_argument("--mean", type=_floats, metavar="R,G,B", help="input normalisation mean (default: the experts' pretrained configuration, else ImageNet's)")
    g.add_argument("--std", type=_floats, metavar="R,G,B", help="input normalisation std")
    g = p.add_argument_group("pMoE")
    g.add_argument("--prompts", type=int, help=f"prompt tokens per expert per layer, Np (default {d['prompts']})")
    g.add_argument("--prompt-layers", help="'deep', 'shallow' or a number (default: the base method's)")
    g.add_argument("--dispatcher", choices=("mlp", "moe", "none"), help=f"(default {d['dispatcher']})")
    g.add_argument("--dispatcher-hidden", type=int, help=f"hidden width of the dispatcher MLP (default {d['dispatcher_hidden']})")
    g.add_argument("--dispatch-experts", type=int, help=f"MLPs of the 'moe' dispatcher (default {d['dispatch_experts']})")
    g.add_argument("--top-k", type=int, help=f"top-k of the 'moe' dispatcher (default {d['top_k']})")
    g.add_argument("--base", choices=("vpt", "gapt"), help=f"base prompt method (default {d['base']})")
    g.add_argument("--pmoe-args", type=json.loads, metavar="JSON", help="further pmoe_fast.PMoE arguments, e.g. '{\"dispatch_pool\": \"patches\"}'")
    g = p.add_argument_group("speed and memory")
    g.add_argument("--execution", choices=("auto", "batched", "streams", "sequential"), help="(default auto)")
    g.add_argument("--attention", choices=("auto", "sdpa", "xformers", "math"), help="(default auto)")
    g.add_argument("--dispatcher-backend", choices=("auto", "torch", "triton", "cuda", "cpp"), help="(default auto)")
    g.add_argument("--grad-checkpoint", type=int, metavar="N", help="recompute activations in backward, segments of N layers (default 0: off)")
    g.add_argument("--precision", choices=training.PRECISIONS, help="bf16: the frozen experts in bfloat16; prompts, dispatchers and head stay fp32 (default fp32)")
    g.add_argument("--memory-budget", metavar="SIZE", help="e.g. 16GiB: pick --grad-checkpoint and --precision to fit (pmoe_fast.memory)")
    g.add_argument("--device", help="default: cuda when available, else cpu")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help=f"(default {d['epochs']})")
    g.add_argument("--batch-size", type=int, help=f"(default {d['batch_size']})")
    g.add_argument("--lr", type=float, help=f"(default {d['lr']})")
    g.add_argument("--weight-decay", type=float, help=f"(default {d['weight_decay']})")
    g.add_argument("--schedule", choices=training.SCHEDULES, help="learning-rate schedule (default constant)")
    g.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 0)")
    g.add_argument("--aux-weight", type=float, help=f"weight of the 'moe' dispatcher's balancing loss (default {d['aux_weight']})")
    g.add_argument("--seed", type=int, help="seeds initialisation, data split and order (default 0)")
    g.add_argument("--workers", type=int, help="data loader processes (default 0)")
    g.add_argument("--save-every", type=int, metavar="STEPS", help="also save last.safetensors every STEPS steps (default: each epoch)")
    g.add_argument("--output", metavar="DIR", help="where checkpoints and metrics.jsonl go (required unless resuming)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",")]
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected 3 comma-separated numbers (R,G,B), got {text!r}")
    return values


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON file of options -> {key: value} with keys as in ``DEFAULT_CONFIG``."""
    import yaml  # a timm dependency; YAML is a superset of JSON

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise SystemExit(f"pmoe-fast train: cannot read the config file: {e}")
    except yaml.YAMLError as e:
        raise SystemExit(f"pmoe-fast train: {path} is not valid YAML or JSON: {e}")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SystemExit(f"pmoe-fast train: {path} must hold a mapping of options, got {type(raw).__name__}")
    config = {str(k).replace("-", "_"): v for k, v in raw.items()}
    if "expert" in config:
        config["experts"] = config.pop("expert")
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise SystemExit(f"pmoe-fast train: unknown option(s) in {path}: {unknown}; known: {sorted(DEFAULT_CONFIG)}")
    for key, value in config.items():
        if isinstance(DEFAULT_CONFIG[key], float) and isinstance(value, str) and _EXPONENT_ONLY.fullmatch(value):
            config[key] = float(value)  # as YAML 1.2 and JSON read it
    wrong = [f"{key} must be {_TYPE_NAMES[type(DEFAULT_CONFIG[key])]}, got {value!r}"
             for key, value in config.items() if not _of_default_type(key, value)]
    if wrong:
        raise SystemExit(f"pmoe-fast train: {path}: {'; '.join(wrong)}")
    if "experts" in config:
        config["experts"] = [_expert_spec(e, path) for e in config["experts"]]
    return config


# A number with an exponent and no dot (lr: 1e-3): PyYAML follows YAML 1.1, which reads it as a string.
_EXPONENT_ONLY = re.compile(r"[-+]?\d+[eE][-+]?\d+")
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
               list: "a list"}


def _of_default_type(key: str, value: Any) -> bool:
    """Whether a config file's ``value`` for ``key`` has the type of its default (an integer for a
    number, not a boolean); any value where the default is None (the flag's own parser decides)."""
    default = DEFAULT_CONFIG[key]
    if default is None:
        return True
    if isinstance(value, bool) != isinstance(default, bool):
        return False
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def _expert_spec(entry: Any, where: str) -> dict[str, Any]:
    if isinstance(entry, str):
        return parse_expert(entry, "train", f"an expert in {where}")
    if isinstance(entry, dict) and "name" in entry and set(entry) <= {"name", "weights", "kwargs"}:
        return {"name": entry["name"], "weights": entry.get("weights"), "kwargs": dict(entry.get("kwargs") or {})}
    raise SystemExit(f"pmoe-fast train: an expert in {where} must be 'NAME[:PATH]' or {{name, weights, kwargs}}, got {entry!r}")


def parse_expert(text: str, command: str, where: str = "--expert") -> dict[str, Any]:
    """``training.parse_expert``, exiting with one line that names ``where`` the text came from."""
    try:
        return training.parse_expert(text)
    except ValueError as e:
        raise SystemExit(f"pmoe-fast {command}: {where}: {e}")


def resolve_config(args: argparse.Namespace, recorded: dict[str, Any] | None = None) -> tuple[dict[str, Any], set[str]]:
    """Defaults, then a resumed run's recorded configuration, then --config, then the flags given;
    also the keys --config and the flags set.

    When resuming, only ``RESUMABLE`` options and the experts' weight files may differ from the
    recorded ones."""
    config = dict(DEFAULT_CONFIG)
    if recorded:
        config.update(recorded)
    given = read_config_file(args.config) if args.config else {}
    for key in DEFAULT_CONFIG:
        value = getattr(args, key, None)
        if key == "experts" and args.expert:
            value = [parse_expert(e, "train") for e in args.expert]
        if value is not None:
            given[key] = value
    if recorded:
        changed = [f"{k} ({recorded.get(k)!r} -> {v!r})" for k, v in given.items()
                   if k not in RESUMABLE and _normalised(k, v) != recorded.get(k)
                   and not (k == "experts" and _without_files(_normalised(k, v)) == _without_files(recorded.get(k)))]
        if changed:
            raise SystemExit("pmoe-fast train: a resumed run keeps its recorded settings; these differ: "
                             + ", ".join(changed) + f". Only {', '.join(RESUMABLE)} and the experts' weight files may change.")
    config.update(given)
    return _absolute_paths(config), set(given)


def _without_files(experts: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The experts without their weight files: a resume may find the same weights elsewhere
    (``checkpoint.check_experts`` compares their fingerprints with the recorded ones)."""
    return [{**e, "weights": None} for e in experts or []]


def _normalised(key: str, value: Any) -> Any:
    return _absolute_paths({key: value})[key] if key in ("experts", "data") else value


def _absolute_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Weight files, the data folder and the output folder as absolute paths, so eval and a resume
    find them from anywhere."""
    config = dict(config)
    if "experts" in config:
        config["experts"] = [{**e, "weights": os.path.abspath(e["weights"]) if e.get("weights") else None}
                             for e in config["experts"]]
    if config.get("data") and config["data"] != "demo":
        config["data"] = os.path.abspath(config["data"])
    if config.get("output"):
        config["output"] = os.path.abspath(config["output"])
    return config


def pmoe_parameters() -> list[str]:
    """The arguments pmoe_fast.PMoE takes by name: its own and those it passes on to the reference
    model it extends (``pmoe_fast.reference.PMoE``)."""
    from .model import PMoE
    from .reference import PMoE as ReferencePMoE

    names = []
    for init in (ReferencePMoE.__init__, PMoE.__init__):
        names += [p.name for p in inspect.signature(init).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    return names


def check_model_arguments(config: dict[str, Any]) -> None:
    """Exit naming the option when --expert-args or --pmoe-args is not a JSON object, or when
    --pmoe-args gives an argument pmoe_fast.PMoE does not take or one an option of its own sets
    (``PMOE_OPTIONS``). The experts' keys are checked as they are built (``build_experts``): a timm
    architecture's arguments are known to its constructor only."""
    for option in ("expert_args", "pmoe_args"):
        if not isinstance(config[option], dict):
            raise SystemExit(f"pmoe-fast train: --{option.replace('_', '-')} must be a JSON object of keyword "
                             f"arguments, got {config[option]!r}")
    accepted = [n for n in pmoe_parameters() if n not in PMOE_OPTIONS]
    own = [f"{k} (give {PMOE_OPTIONS[k]})" for k in config["pmoe_args"] if k in PMOE_OPTIONS]
    if own:
        raise SystemExit(f"pmoe-fast train: --pmoe-args gives arguments that options of their own set: "
                         f"{', '.join(own)}")
    unknown = [k for k in config["pmoe_args"] if k not in accepted]
    if unknown:
        raise SystemExit(f"pmoe-fast train: --pmoe-args: pmoe_fast.PMoE takes no {', '.join(map(repr, unknown))}; "
                         f"it takes {', '.join(sorted(accepted))} (help(pmoe_fast.PMoE) documents them)")


def first_line(error: Exception) -> str:
    """The first line of ``error``'s message (torch's TypeErrors go on to list every overload)."""
    return str(error).partition("\n")[0]


def build_experts(config: dict[str, Any]) -> tuple[list, list[dict[str, Any]]]:
    """``training.build_experts``, exiting with one line when an expert's constructor refuses its
    arguments (a TypeError: a misspelt key or a wrong type in --expert-args or an expert's kwargs)."""
    from . import vit

    try:
        return training.build_experts(config)
    except TypeError as e:
        ours = [n for n in inspect.signature(vit.VisionTransformer).parameters if n != "num_classes"]
        raise SystemExit(f"pmoe-fast train: an expert refuses its arguments (--expert-args, or its kwargs in "
                         f"--config): {first_line(e)}. pmoe_fast.vit's architectures take "
                         f"{', '.join(sorted(ours))}; a timm architecture, those of its model class")


def build_model(config: dict[str, Any], experts: tuple[list, list[dict[str, Any]]]) -> torch.nn.Module:
    """``training.build_model``, exiting with one line when pmoe_fast.PMoE refuses its arguments (a
    TypeError or ValueError of its constructor: a value of the wrong type or out of range), naming
    --pmoe-args when it gave some."""
    try:
        return training.build_model(config, experts=experts)
    except (TypeError, ValueError) as e:
        raise model_refused(config, e)


def model_refused(config: dict[str, Any], error: Exception) -> SystemExit:
    """The one-line exit for pmoe_fast.PMoE refusing the arguments ``config`` gives it, naming
    --pmoe-args when it gave some."""
    if config["pmoe_args"]:
        return SystemExit(f"pmoe-fast train: pmoe_fast.PMoE refuses its arguments (--pmoe-args gives "
                          f"{json.dumps(config['pmoe_args'])}; help(pmoe_fast.PMoE) documents them): "
                          f"{first_line(error)}")
    return SystemExit(f"pmoe-fast train: {first_line(error)}")


def check_attention(attention: str, device: torch.device) -> None:
    """Exit naming --attention when its backend cannot run on ``device`` (xformers: CUDA tensors
    and xformers' compiled ops); the model resolves the backend only in its first forward."""
    if attention == "auto":
        return
    reasons = attention_backends.not_supported_reasons(attention, torch.empty(0, device=device))
    if reasons:
        raise SystemExit(f"pmoe-fast train: --attention {attention} cannot run on {device}: {'; '.join(reasons)}. "
                         "Choose --attention auto, sdpa or math")


# Settings of how the model runs that only CUDA devices serve: train refuses them on a CPU, eval
# and plot-dispatch run a checkpoint that records one with "auto" there.
GPU_ONLY = {"dispatcher_backend": ("cuda", "triton"), "attention": ("xformers",)}


def check_dispatcher_backend(backend: str, device: torch.device, command: str) -> None:
    """Exit with one line when --dispatcher-backend names a GPU backend and the device is a CPU."""
    if device.type == "cpu" and backend in GPU_ONLY["dispatcher_backend"]:
        raise SystemExit(f"pmoe-fast {command}: --dispatcher-backend {backend} runs on CUDA devices; "
                         "on a CPU use auto, cpp or torch")


def check_device(device: str | None, command: str) -> torch.device:
    """``training.resolve_device(device)``, exiting with one line naming --device when torch cannot
    use that device here: not a device name, CUDA without a visible GPU or past its last index, a
    backend this torch lacks."""
    try:
        resolved = training.resolve_device(device)
    except RuntimeError:
        raise SystemExit(f"pmoe-fast {command}: --device {device} is not a torch device; "
                         "use --device cpu, cuda or cuda:N")
    if resolved.type == "cpu":
        return resolved
    if resolved.type == "meta":
        raise SystemExit(f"pmoe-fast {command}: --device meta holds shapes, not values: nothing can train or be "
                         "evaluated there; use --device cpu or cuda")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"pmoe-fast {command}: --device {device}: no CUDA device is visible here "
                             "(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise SystemExit(f"pmoe-fast {command}: --device {device}: this machine shows {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}; use one of them")
        return resolved
    try:
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError, NotImplementedError):
        raise SystemExit(f"pmoe-fast {command}: --device {device}: this torch ({torch.__version__}) cannot create "
                         "tensors there; use --device cpu")
    return resolved


def apply_memory_budget(config: dict[str, Any], experts, device, fixed: set[str]) -> str:
    """Let ``pmoe_fast.memory.recommend`` choose gradient checkpointing and the experts' dtype for
    ``config["memory_budget"]`` (among the values the user did not fix: ``fixed`` names the options
    given explicitly); updates ``config`` and returns a line saying what it chose. Exits with the
    planner's advice when nothing fits."""
    from . import memory

    choices = {}
    if "precision" in fixed:
        choices["expert_dtypes"] = (torch.bfloat16 if config["precision"] == "bf16" else torch.float32,)
    if "grad_checkpoint" in fixed:
        choices["checkpoints"] = (int(config["grad_checkpoint"]),)
    try:
        budget = memory.parse_bytes(config["memory_budget"])
    except ValueError as e:
        raise SystemExit(f"pmoe-fast train: --memory-budget: {e}")
    try:
        rec = memory.recommend(
            experts, batch_size=config["batch_size"], budget_bytes=budget,
            num_prompts=config["prompts"], num_classes=config["num_classes"], prompt_layers=config["prompt_layers"],
            dispatcher=config["dispatcher"], dispatcher_hidden=config["dispatcher_hidden"],
            execution=config["execution"], device=device, attention=config["attention"],
            dispatcher_backend=config["dispatcher_backend"], num_dispatch_experts=config["dispatch_experts"],
            top_k=config["top_k"], base=config["base"], **config["pmoe_args"], **choices,
        )
    except (TypeError, ValueError) as e:  # the model it sizes refuses its arguments
        raise model_refused(config, e)
    if not rec.fits:
        raise SystemExit(f"pmoe-fast train: --memory-budget {config['memory_budget']}: {rec.message}")
    config["grad_checkpoint"] = rec.option.checkpoint
    config["precision"] = "bf16" if rec.option.expert_dtype == torch.bfloat16 else "fp32"
    return (f"memory budget {config['memory_budget']}: {rec.message} -> --grad-checkpoint {config['grad_checkpoint']} "
            f"--precision {config['precision']}")


def run(args: argparse.Namespace) -> None:
    """Build the model and data the options describe, then ``training.fit``."""
    from . import checkpoint as ckpt_io
    from .data import DataError, normalization, open_data

    saved = None
    if args.resume:
        try:
            saved = ckpt_io.load(args.resume)
        except (OSError, ValueError) as e:
            raise SystemExit(f"pmoe-fast train: {e}")
        if not saved.config.get("experts"):
            raise SystemExit(f"pmoe-fast train: {args.resume} records no configuration to resume")
    config, fixed = resolve_config(args, saved.config if saved else None)
    if saved is not None and "output" not in fixed:
        # Beside the checkpoint resumed, wherever the run (or a copy of it) now is.
        config["output"] = os.path.dirname(os.path.abspath(args.resume))
    if not config["experts"]:
        raise SystemExit("pmoe-fast train: give at least one --expert NAME[:PATH] (or 'experts' in --config)")
    if not config["data"]:
        raise SystemExit("pmoe-fast train: give --data DIR (one sub-folder per class) or --data demo")
    if not config["output"]:
        raise SystemExit("pmoe-fast train: give --output DIR for the checkpoints and metrics")
    last = os.path.join(config["output"], "last.safetensors")
    if saved is None and os.path.exists(last):
        raise SystemExit(f"pmoe-fast train: --output {config['output']} already holds a run ({last}): continue it "
                         f"with --resume {last}, or give another folder")
    check_model_arguments(config)

    torch.manual_seed(config["seed"])  # the initial prompts, dispatchers and head; experts without weight files
    try:
        experts = build_experts(config)
        names = [e["name"] for e in config["experts"]]
        if config["mean"] is None or config["std"] is None:
            mean, std, source = normalization(experts[0], names)
            config["mean"], config["std"] = config["mean"] or list(mean), config["std"] or list(std)
        else:
            source = "recorded in the checkpoint" if saved else "given"
        img_size = tuple(experts[0][0].patch_embed.img_size)
        data = open_data(config["data"], img_size=img_size, mean=config["mean"], std=config["std"],
                         val_fraction=config["val_fraction"], seed=config["seed"],
                         classes=saved.config["classes"] if saved else None)
    except (DataError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"pmoe-fast train: {e}")
    config["classes"], config["num_classes"] = data.classes, len(data.classes)
    device = check_device(config["device"], "train")
    check_attention(config["attention"], device)
    check_dispatcher_backend(config["dispatcher_backend"], device, "train")
    if config["memory_budget"] and saved is None:
        print(apply_memory_budget(config, experts[0], device, fixed))
    problem = output_folder_problem(config["output"])
    if problem:
        raise SystemExit(f"pmoe-fast train: --output: {problem}")
    model = build_model(config, experts)

    trainable = sum(p.numel() for p in model.trainable_parameters())
    frozen = sum(p.numel() for p in model.experts.parameters())
    print(f"data: {data.description}")
    if config["data"] != "demo":
        print(f"normalisation: mean {_fmt(config['mean'])}, std {_fmt(config['std'])} ({source})")
    print(f"pMoE: K={model.num_experts} experts ({', '.join(names)}), D={model.embed_dim}, L={model.depth}, "
          f"Lp={model.prompt_layers}, Np={model.num_prompts}, dispatcher={config['dispatcher']!r}, base={config['base']!r}")
    print(f"parameters: {trainable:,} trainable, {frozen:,} frozen")
    plan = model.execution_plan()
    execution = model.execution_for(device.type)
    why = plan["why"] if device.type == "cuda" else "on a CPU"
    print(f"device {device}: execution {execution}" + (f" (auto: {why})" if config["execution"] == "auto" else "")
          + f", attention {plan['attention']}, "
          f"dispatcher backend {plan['dispatcher_backend']}, checkpointing {plan['checkpoint']}, "
          f"precision {config['precision']}")
    if config["precision"] == "bf16" and device.type == "cpu":
        print("note: bf16 on a CPU is much slower than fp32 (no bf16 matrix units); use --precision fp32 there")
    try:
        training.fit(
            model, data.train, data.val, epochs=config["epochs"], batch_size=config["batch_size"], lr=config["lr"],
            weight_decay=config["weight_decay"], aux_weight=config["aux_weight"], schedule=config["schedule"],
            warmup_steps=config["warmup_steps"], device=device, seed=config["seed"], progress=not args.no_progress,
            output_dir=config["output"], resume=args.resume, config=config, num_workers=config["workers"], save_every=config["save_every"], log=None if not args.no_progress else print,
        )
    except training.TrainingInterrupted as e:
        print(f"\nstopped after epoch {e.epoch} + {e.batch} batches; the state is in {e.path}. "
              f"Continue with: pmoe-fast train --resume {e.path}", file=sys.stderr)
        raise SystemExit(130)
    except ValueError as e:
        raise SystemExit(f"pmoe-fast train: {e}")
    print(f"checkpoints: {os.path.join(config['output'], 'last.safetensors')}, "
          f"{os.path.join(config['output'], 'best.safetensors')}; metrics: {os.path.join(config['output'], 'metrics.jsonl')}")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"
