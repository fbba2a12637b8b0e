"""Tuned checkpoints: the trainable parameters, the run's state and the experts' identities.

A pMoE run tunes prompts, dispatchers, the head and the base method's extras; the experts stay
frozen and may be gigabytes. A tuned checkpoint therefore holds only the trainable parameters
(named as in the model's ``state_dict``: ``prompts``, ``dispatchers.0.fc1.weight``, ``head.bias``,
...), plus what is needed to rebuild the model and to continue the run exactly. One
``.safetensors`` file:

| tensors | what |
| --- | --- |
| ``<name>`` | each trainable parameter |
| ``optimizer/<name>/<key>`` | the optimizer's state for that parameter (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``) |
| ``rng/torch``, ``rng/cuda/<i>``, ``rng/numpy`` | random number generator states |

| metadata key (JSON strings) | what |
| --- | --- |
| ``format`` | ``"pmoe_fast.tuned/1"`` |
| ``pmoe_fast_version`` | the library version that wrote it |
| ``config`` | the configuration the model was built from (``pmoe_fast.training.build_model``) |
| ``experts`` | per expert: name, weight file, kwargs, architecture summary, sha256 of its weights as held and rounded to bfloat16 |
| ``settings`` | what changes the model's function but owns no parameter: the dispatch pool, the MoE's top_k |
| ``state`` | epoch, step, position in the epoch, learning-rate schedule, optimizer hyper-parameters, history |
| ``rng`` | Python's ``random`` state and the scalar part of NumPy's |
| ``sha256`` | of every other metadata entry and every tensor (``_checksum``): ``load`` refuses a file whose contents changed since |

Files are written atomically (``save``): to a temporary file in the same directory, flushed to
disk, then renamed over the target, so a crash mid-write leaves the previous checkpoint intact.
``check_experts`` compares the recorded experts with the ones a model was built with and raises
``ExpertMismatchError`` listing every difference. Weights are compared rounded to bfloat16, so a
float32 expert and its copies in bfloat16 or float64 (``PMoE(expert_dtype=...)``, ``.double()``)
match; a float16 copy rounds differently and does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "pmoe_fast.tuned/1"
OPTIMIZER_PREFIX = "optimizer/"
RNG_PREFIX = "rng/"


# What check_experts adds when it could compare a recorded expert's weights only exactly.
EXACT_ONLY = (
    "; the checkpoint records only the exact fingerprint, which a copy of the same weights in another dtype "
    "does not match: if these are such a copy, load the checkpoint into the experts in the dtype it was "
    "saved from and save it again, and the new file's fingerprints match their bfloat16 and float64 copies too"
)


class ExpertMismatchError(ValueError):
    """The experts a checkpoint was tuned on differ from the ones given; the message lists how."""


@dataclass
class Checkpoint:
    """A loaded tuned checkpoint.

    Attributes:
        params: trainable parameters by ``state_dict`` name.
        optimizer: per parameter name, its optimizer state tensors by key.
        config: the configuration the model was built from ({} if none was recorded).
        experts: recorded expert identities (``expert_identities``).
        settings: the model's settings without parameters (``model_settings``; {} if none).
        state: epoch, step, schedule, optimizer hyper-parameters, history ({} if none).
        rng: RNG states to restore with ``restore_rng`` (None if none were saved).
        version: the pmoe_fast version that wrote it.
    """

    params: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    experts: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] | None = None
    version: str = ""


# -- what is trained, and what is frozen ----------------------------------------------------------


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for what a run tunes: ``model.trainable_parameters()`` when the model has
    it (pMoE), else every parameter with ``requires_grad``; names as in ``model.state_dict()``."""
    if hasattr(model, "trainable_parameters"):
        ids = {id(p) for p in model.trainable_parameters()}
        return [(n, p) for n, p in model.named_parameters() if id(p) in ids]
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _hash_tensor(digest, name: str, t: torch.Tensor) -> None:
    """Feed one state_dict entry to ``digest``: its key, dtype and shape, then its bytes."""
    t = t.cpu().contiguous()
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy())


def fingerprint(module: nn.Module, dtype: torch.dtype | None = None) -> str:
    """sha256 over a module's ``state_dict``: every key, dtype, shape and the tensor bytes. With
    ``dtype``, of the floating tensors converted to ``dtype``: ``fingerprint(m, torch.bfloat16)``
    is the same for a float32 ``m`` and for its copies in bfloat16 or float64."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        _hash_tensor(digest, name, t)
    return digest.hexdigest()


def fingerprints(module: nn.Module) -> tuple[str, str]:
    """``(fingerprint(module), fingerprint(module, torch.bfloat16))`` in one walk over the
    ``state_dict``: each tensor is copied to the CPU once and converted to bfloat16 once."""
    exact, bf16 = hashlib.sha256(), hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        _hash_tensor(exact, name, t)
        _hash_tensor(bf16, name, t.to(torch.bfloat16) if t.is_floating_point() else t)
    return exact.hexdigest(), bf16.hexdigest()


def architecture(module: nn.Module) -> dict[str, Any]:
    """A short summary of an expert's shape: width, depth, patches, prefix tokens, image size,
    parameter count (what ``check_experts`` names when two experts differ in shape)."""
    from .experts import Expert

    info = Expert(module).info
    return {
        "embed_dim": info.embed_dim,
        "depth": info.depth,
        "num_heads": info.num_heads,
        "patch_size": info.patch_size,
        "num_prefix_tokens": info.num_prefix_tokens,
        "img_size": list(info.img_size),
        "num_params": sum(p.numel() for p in module.parameters()),
    }


def expert_identities(experts: list[nn.Module], specs: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One record per expert: its spec (name, weight file, kwargs; empty when not given), its
    architecture summary and its weights' fingerprints: ``sha256`` of them as held (compute it
    from the experts as built, before any dtype conversion, so that it names the weights as
    loaded) and ``sha256_bf16`` of them rounded to bfloat16, which ``check_experts`` compares."""
    specs = specs if specs is not None else [{} for _ in experts]
    if len(specs) != len(experts):
        raise ValueError(f"{len(specs)} expert specs for {len(experts)} experts")
    records = []
    for m, spec in zip(experts, specs):
        exact, bf16 = fingerprints(m)
        records.append({
            "name": spec.get("name"),
            "weights": spec.get("weights"),
            "kwargs": spec.get("kwargs", {}),
            "architecture": architecture(m),
            "sha256": exact,
            "sha256_bf16": bf16,
        })
    return records


def model_expert_identities(model: nn.Module) -> list[dict[str, Any]]:
    """The model's expert identities: ``model.expert_identities`` when the builder recorded them
    (``pmoe_fast.training.build_model`` does, before converting the experts' dtype) and they still
    name the weights the experts hold, else computed from ``model.experts``; [] for a model
    without experts.

    The record is checked again whenever an expert parameter was replaced, given new data or
    written in place since it was made or last checked (``load_state_dict``; ``_weights_stamp``
    says what is seen): weights that are no longer the recorded ones get new fingerprints, keep
    their name and kwargs, and lose the weight file, which no longer holds them. Moving or
    converting the experts (``.to``) hashes them once more and keeps the record."""
    recorded = getattr(model, "expert_identities", None)
    experts = getattr(model, "experts", None)
    if experts is None:
        return recorded or []
    experts = list(experts)
    if recorded is None:
        return expert_identities(experts)
    stamp = _weights_stamp(experts)
    if getattr(model, "_expert_identities_stamp", None) != stamp:
        if len(recorded) != len(experts):
            recorded = expert_identities(experts)
        else:
            held = expert_identities(experts, [{"name": r.get("name"), "kwargs": r.get("kwargs", {})} for r in recorded])
            recorded = [r if r.get("sha256_bf16") == h["sha256_bf16"] else h for r, h in zip(recorded, held)]
        model.expert_identities, model._expert_identities_stamp = recorded, stamp
    return recorded


def record_expert_identities(model: nn.Module, identities: list[dict[str, Any]]) -> None:
    """Record the identities of ``model.experts`` (``expert_identities`` of them as the builder
    loaded them) for ``model_expert_identities``."""
    model.expert_identities, model._expert_identities_stamp = identities, _weights_stamp(list(model.experts))


def _weights_stamp(experts: list[nn.Module]) -> list[tuple[int, int, int]]:
    """Each expert tensor, its version counter and its address: a new parameter is another tensor,
    an in-place write (``load_state_dict`` copies) bumps the version, new data (``.data = ...``,
    ``torch.nn.utils.vector_to_parameters``) moves the address. Writes through ``.data``
    (``p.data.copy_(w)``) change none of them and are not seen: write to the parameter itself,
    under ``torch.no_grad()``."""
    return [(id(t), t._version, t.data_ptr()) for m in experts for t in (*m.parameters(), *m.buffers())]


def check_experts(recorded: list[dict[str, Any]], actual: list[dict[str, Any]]) -> None:
    """Raise ``ExpertMismatchError`` listing every difference between the experts a checkpoint
    recorded and those of the model at hand (count, name, architecture, weights). Weights are
    compared by ``sha256_bf16``, so a copy converted to another dtype matches; a record without
    it (in a checkpoint written before records held it) by the exact ``sha256``."""
    problems = []
    if len(recorded) != len(actual):
        problems.append(f"the checkpoint has {len(recorded)} experts, the model {len(actual)}")
    for k, (want, got) in enumerate(zip(recorded, actual)):
        label = f"expert {k}"
        if want.get("name") and got.get("name") and want["name"] != got["name"]:
            problems.append(f"{label}: name {want['name']!r} in the checkpoint, {got['name']!r} here")
        arch_w, arch_g = want.get("architecture", {}), got.get("architecture", {})
        shape = [f"{key} {arch_w[key]} vs {arch_g[key]}" for key in arch_w if key in arch_g and arch_w[key] != arch_g[key]]
        if shape:
            problems.append(f"{label}: shape differs (checkpoint vs here: {', '.join(shape)})")
        key = "sha256_bf16" if "sha256_bf16" in want and "sha256_bf16" in got else "sha256"
        if want.get(key) != got.get(key):
            where = f" (checkpoint: weights {want.get('weights')!r}; here: {got.get('weights')!r})"
            problems.append(f"{label}: the frozen weights differ, {key} {want.get(key, '?')[:12]}... "
                            f"vs {got.get(key, '?')[:12]}...{where}" + ("" if "sha256_bf16" in want else EXACT_ONLY))
    if problems:
        raise ExpertMismatchError(
            "the checkpoint was tuned on other experts:\n  " + "\n  ".join(problems)
            + "\nBuild the model with the experts (names, weight files, kwargs) the checkpoint records."
        )


# -- random number generators ---------------------------------------------------------------------


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The states of torch (CPU and every CUDA device), NumPy and Python's ``random``, as
    (tensors, JSON-able values)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    values = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, values


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the generators to the states ``rng_state`` returned (``Checkpoint.rng``)."""
    tensors, values = rng["tensors"], rng["values"]
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda/{i}"] for i in range(len(tensors)) if f"cuda/{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = values["python"]
    random.setstate((version, tuple(internal), gauss_next))


# -- saving and loading ---------------------------------------------------------------------------


def optimizer_parameter_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """The names of ``optimizer``'s parameters in the order its parameter groups hold them, each
    found by identity among ``trainable_named_parameters(model)`` (the optimizer may hold any of
    them, in any order). Raises a ValueError naming a parameter that is not one of them."""
    trainable = {id(p): n for n, p in trainable_named_parameters(model)}
    anywhere = {id(p): n for n, p in model.named_parameters()}
    names = []
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in trainable:
                what = (f"the model's parameter {anywhere[id(p)]!r}" if id(p) in anywhere
                        else f"a tensor of shape {tuple(p.shape)} that is not the model's")
                raise ValueError(
                    f"the optimizer's parameter group {g} holds, at position {i}, {what}, which is not one of "
                    "the model's trainable parameters (checkpoint.trainable_named_parameters), so its state "
                    "cannot be saved with them; build the optimizer over model.trainable_parameters() or some of them"
                )
            names.append(trainable[id(p)])
    return names


def optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's per-parameter tensors keyed ``optimizer/<name>/<key>``, and its parameter
    groups' hyper-parameters with parameter names in place of indices. ``names`` names the
    optimizer's parameters in the order its parameter groups hold them
    (``optimizer_parameter_names``)."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"{OPTIMIZER_PREFIX}{names[index]}/{key}"] = value
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str], ckpt: Checkpoint) -> None:
    """Restore ``optimizer`` from a checkpoint. ``names`` names its parameters in the order its
    parameter groups hold them. Each of its groups must hold the parameters of one saved group,
    whose hyper-parameters it takes; the order of the groups, and of the parameters in them, may
    differ from the saved optimizer's (each parameter gets the state saved under its name)."""
    groups = ckpt.state.get("optimizer_groups")
    if groups is None:
        raise ValueError("the checkpoint holds no optimizer state (it was saved without an optimizer)")
    held = sum(len(g["params"]) for g in optimizer.param_groups)
    if len(names) != held:
        raise ValueError(f"{len(names)} names for the optimizer's {held} parameters; name each of them, "
                         "in the order its parameter groups hold them")
    saved = sorted(n for g in groups for n in g["params"])
    if saved != sorted(names):
        raise ValueError(f"the checkpoint's optimizer tunes {saved}, this one {sorted(names)}")
    index = {n: i for i, n in enumerate(names)}
    saved_groups = {frozenset(g["params"]): g for g in groups}
    remaining = iter(names)
    param_groups = []
    for group in optimizer.param_groups:
        mine = [next(remaining) for _ in group["params"]]
        if frozenset(mine) not in saved_groups:
            raise ValueError(f"the optimizer has a parameter group of {mine}, which the checkpoint's optimizer "
                             f"does not have (its groups: {[g['params'] for g in groups]}); build the optimizer's "
                             "parameter groups as the checkpoint's")
        # torch matches the saved groups' parameters to the optimizer's by position: list them as it holds them.
        param_groups.append({**saved_groups[frozenset(mine)], "params": [index[n] for n in mine]})
    state = {index[n]: dict(ckpt.optimizer[n]) for n in names if n in ckpt.optimizer}
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    config: dict[str, Any] | None = None,
    experts: list[dict[str, Any]] | None = None,
    state: dict[str, Any] | None = None,
    rng: bool = False,
) -> None:
    """Write a tuned checkpoint of ``model`` to ``path`` atomically (see the module docstring).

    Args:
        optimizer: also save its state, each parameter's under its name. It may hold any of
            ``trainable_named_parameters(model)``, in any order and parameter groups; a
            parameter that is not one of them raises a ValueError.
        config: the model's configuration, JSON-able.
        experts: expert identities; None computes them (``model_expert_identities``).
        state: the run's position (epoch, step, schedule, history), JSON-able.
        rng: also save the random number generators' states.
    """
    from safetensors.torch import save_file

    from . import __version__

    named = trainable_named_parameters(model)
    tensors = {n: p.detach().cpu().contiguous() for n, p in named}
    state = dict(state or {})
    if optimizer is not None:
        opt_tensors, groups = optimizer_state(optimizer, optimizer_parameter_names(optimizer, model))
        tensors.update({k: v.detach().cpu().contiguous() for k, v in opt_tensors.items()})
        state["optimizer_groups"] = groups
    rng_values = None
    if rng:
        rng_tensors, rng_values = rng_state()
        tensors.update({RNG_PREFIX + k: v.contiguous() for k, v in rng_tensors.items()})
    metadata = {
        "format": FORMAT,
        "pmoe_fast_version": __version__,
        "config": json.dumps(config or {}),
        "experts": json.dumps(model_expert_identities(model) if experts is None else experts),
        "settings": json.dumps(model_settings(model)),
        "state": json.dumps(state),
    }
    if rng_values is not None:
        metadata["rng"] = json.dumps(rng_values)
    metadata["sha256"] = _checksum(tensors, metadata)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, flush it to disk, then rename
    it over ``path``. If anything fails the temporary file is removed and ``path`` is untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # A new name of its own (O_EXCL), and the mode open() gives, 0666 less the umask, kept through
    # writers that make the file their owner's alone (safetensors' save_file writes 0600).
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over a checkpoint's metadata entries but ``sha256`` and its tensors, by name."""
    digest = hashlib.sha256()
    for key in sorted(metadata.keys() - {"sha256"}):
        digest.update(f"{key}|{len(metadata[key])}|{metadata[key]}|".encode())
    for name in sorted(tensors):
        _hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def output_folder_problem(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into ``folder``, or None: it is created where missing, then a
    file is created in it and removed, as ``atomic_write`` would. Commands call it before their
    work, so that a folder they cannot write is named then, not after the work."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".pmoe_fast_probe.{secrets.token_hex(8)}")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.remove(probe)
    except OSError as e:
        return f"cannot write into {os.fspath(folder)}: {e.strerror or e}"
    return None


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a tuned checkpoint (CPU tensors). Raises a ValueError when the file is not one."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is a folder; give a checkpoint file in it, such as {os.path.join(path, 'last.safetensors')}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a pmoe_fast tuned checkpoint (format {metadata.get('format')!r}, expected {FORMAT!r}); "
            "to load a backbone's weights use pmoe_fast.vit.load_weights"
        )
    if "sha256" in metadata and _checksum(tensors, metadata) != metadata["sha256"]:
        raise ValueError(
            f"{path} is damaged: its contents no longer match the checksum written with them (disk or copy "
            "error, or an edit); use another copy or an earlier checkpoint of the run (a deliberate edit: write "
            "the file without its 'sha256' metadata entry)"
        )
    params, optimizer, rng_tensors = {}, {}, {}
    for key, tensor in tensors.items():
        if key.startswith(OPTIMIZER_PREFIX):
            name, _, state_key = key[len(OPTIMIZER_PREFIX):].rpartition("/")
            optimizer.setdefault(name, {})[state_key] = tensor
        elif key.startswith(RNG_PREFIX):
            rng_tensors[key[len(RNG_PREFIX):]] = tensor
        else:
            params[key] = tensor
    rng = {"tensors": rng_tensors, "values": json.loads(metadata["rng"])} if "rng" in metadata else None
    return Checkpoint(
        params=params,
        optimizer=optimizer,
        config=json.loads(metadata.get("config", "{}")),
        experts=json.loads(metadata.get("experts", "[]")),
        settings=json.loads(metadata.get("settings", "{}")),
        state=json.loads(metadata.get("state", "{}")),
        rng=rng,
        version=metadata.get("pmoe_fast_version", ""),
    )


def model_settings(model: nn.Module) -> dict[str, Any]:
    """What computes the model's function but owns no parameter, so that a checkpoint's
    parameters cannot be compared by name and shape alone: the dispatchers' pool (where a
    dispatcher runs) and the MoE's top_k. {} for a model without dispatchers."""
    dispatchers = list(getattr(model, "dispatchers", []))
    if not dispatchers or dispatchers[0].kind == "none":
        return {}
    first = dispatchers[0]
    return {"dispatch_pool": first.pool, **({"top_k": first.top_k} if first.kind == "moe" else {})}


def load_into(model: nn.Module, ckpt: Checkpoint, *, check: bool = True) -> None:
    """Copy a checkpoint's trainable parameters into ``model``. With ``check`` (the default) the
    recorded experts must match the model's (``check_experts``). The parameter names and shapes
    must match the model's trainable parameters exactly, and the settings the checkpoint recorded
    the model's (``model_settings``); the error lists what differs."""
    if check and ckpt.experts:
        check_experts(ckpt.experts, model_expert_identities(model))
    mine = model_settings(model)
    differ = [f"{key} {value!r} in the checkpoint, {mine.get(key)!r} here"
              for key, value in ckpt.settings.items() if mine.get(key) != value]
    if differ:
        raise ValueError("the checkpoint was tuned with other settings, which own no parameter: " + "; ".join(differ)
                         + ". Build the model with the checkpoint's settings.")
    named = dict(trainable_named_parameters(model))
    missing = sorted(set(named) - set(ckpt.params))
    unexpected = sorted(set(ckpt.params) - set(named))
    shapes = [f"{n}: {tuple(ckpt.params[n].shape)} in the checkpoint, {tuple(p.shape)} here"
              for n, p in named.items() if n in ckpt.params and ckpt.params[n].shape != p.shape]
    if missing or unexpected or shapes:
        parts = ([f"missing from the checkpoint: {missing}"] if missing else []) + (
            [f"not in the model: {unexpected}"] if unexpected else []) + shapes
        raise ValueError("the checkpoint does not fit this model's trainable parameters: " + "; ".join(parts)
                         + ". Build the model with the configuration the checkpoint records (Checkpoint.config).")
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(ckpt.params[n])
