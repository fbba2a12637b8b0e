"""Training memory of the fast pMoE: measure one step, predict it, and plan a run that fits.

    profile = measure_step(model, images, labels, optimizer)      # one step, measured
    estimate = predict(experts, batch_size=32, checkpoint=1)       # the same split, computed
    rec = recommend(experts, batch_size=32, budget_bytes=parse_bytes("24GiB"))

Both split the peak of a training step (forward, cross-entropy, backward, optimizer step) into
frozen expert weights, trainable state (prompts, dispatchers and head with their gradients and
optimizer state) and activations: the peak minus those two, i.e. what the step needs on top of
what stays resident (saved activations, gradients in flight, optimizer temporaries, the batch).

The file reads top to bottom: byte sizes and budgets, the two result types, measuring
(``LiveTensorTracker``, ``measure_step``), predicting (the activation model, ``predict``) and
planning (``recommend``).

How a step is measured. On CUDA, from the caching allocator: ``max_memory_allocated`` over the
step, so every tensor on that device counts, workspaces included, the CUDA context and cached but
unallocated blocks not. On a CPU there is no allocator counter, so ``LiveTensorTracker`` (a
``TorchDispatchMode``) follows tensor storages: it starts from the step's inputs and the model's
and optimizer's tensors, then adds each storage an ATen operator returns (backward and optimizer
included: CPU autograd runs on the calling thread, under the mode) and subtracts it when it is
freed. It does not see memory an operator allocates and frees inside itself (BLAS packing,
attention workspaces), allocator fragmentation, or memory that is not a tensor.

Both measure the steady state: when the optimizer has no state yet, one step runs first, unmeasured
(``warmup``), so that the measured step holds the optimizer state throughout, as every step after
the first does. Gradients are set to None before the step, as ``optimizer.zero_grad()`` does.

How a step is predicted: ``predict`` counts the tensors autograd keeps for backward in the fast
model's forward, per block and per dispatcher, derived from what each operator saves (and checked
against ``LiveTensorTracker`` in tests/test_memory.py). For one block of R = B x (Np + Q + N)
token rows of width D, MLP width F, h heads, in the experts' dtype (e bytes):

| tensor | kept by | bytes |
| --- | --- | --- |
| block input (the sequence, prompts in their slots) | norm1 | R D e |
| qkv | attention (q, k, v are views of it) | 3 R D e |
| attention output, log-sum-exp | attention | R D e + 4 R h |
| residual after attention | norm2 | R D e |
| fc1 output | GELU (QuickGELU keeps two) | R F e |
| means and inverse deviations of both norms | norm1, norm2 | 4 R (e on a CPU, 4 on CUDA) |

(Where timm's ``attn_head_dim`` makes heads x head_dim differ from D, that width replaces D in qkv
and the attention output.)

In a last block run for the class token alone, the input, norm1's statistics and the keys and
values (one (R, 2D) tensor, replacing qkv) cover every row, the rest the class token's rows only.
The linear layers keep nothing of their own: their weights are frozen, so autograd keeps only
what the input's gradient needs (the weight). Each dispatcher keeps the tokens it averaged
(batched, the fused kind "mlp" kernels write their IPTs into the sequence in place and keep it,
with a copy of the prompt-output rows they overwrite; other fused kernels keep views of the
previous block's output; the torch backend an fp32 copy, with f's hidden activations), its
prompt-output rows and its (K, B, Np, K) weights; the fused kernels also keep f's fp32
pre-activations (K, B, T, H) of the tokens.

The peak is the largest of four moments, each counted tensor by tensor (``_estimate``):
- the forward's last block, once its MLP has run: all that is kept so far, plus the locals of the
  forward that still hold tensors (the block's input sequences and the prompts that entered, the
  attention projection's and norm2's outputs, the activation's output and fc2's);
- backward through each block, expert group by expert group (all K at once when batched): what
  is still kept, the residual stream's gradient and two (R, F) gradients of the MLP; and through
  each dispatcher, with the gradients it returns. The last block is usually the largest, but an
  expert that pools its class token runs its last block for that token alone (``pmoe_fast.PMoE``),
  keeping little there, and then the block or dispatcher before it can be;
- with checkpointing, each segment recomputed in backward (up to its last saved tensor) on top
  of every earlier segment's input, and backward through it;
- the optimizer step: gradients and AdamW's temporaries (one the size of all trainable
  parameters in CUDA's foreach implementation, two the size of the largest on a CPU).

Where the model comes from. On a CPU each term was measured with ``LiveTensorTracker`` (the
predictions match it within 2% on the cases tried: K 1-5, mixed architectures, fp32 and bf16,
each dispatcher kind and backend, tests/test_memory.py holds some; a checkpointed "moe"
dispatcher came out up to 6% under, the temporaries of its recomputation left out). On CUDA the
same autograd graph runs with other kernels, and the model takes what they keep: attention
through SDPA (the flash kernel in 16-bit, the memory-efficient one in fp32, whose log-sum-exp is
padded to 32 rows; xformers keeps the same set) or xformers; norm statistics in fp32; a cuBLAS
workspace (``CUBLAS_WORKSPACE_BYTES``, PyTorch's default on Hopper) per cuBLAS handle and stream
that run matrix products: the forward's thread and autograd's backward thread each hold a handle;
every allocation rounded up to 512 bytes, as the caching allocator does. On an H100 with one
workspace counted, the bf16 case of tests/test_memory.py came out 15% under the measured peak,
33.5 MB of its 38.5 MB gap being one more workspace.
"""

from __future__ import annotations

import copy
import math
import re
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# -- byte sizes and budgets ---------------------------------------------------------------------

_UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
BYTES_FORMS = "a number and a unit: B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 24GiB, 24GB, 24000MiB"


def parse_bytes(text: str) -> int:
    """'24GiB', '24 GB', '24000MiB', '1.5TiB' -> bytes. Raises ValueError naming the accepted forms."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]+)\s*", str(text))
    unit = match and match.group(2).upper()
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write {BYTES_FORMS}")
    value = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is too large to be a memory size; write {BYTES_FORMS}")
    if value < 1:
        raise ValueError(f"a memory size must be positive, got {text!r}; write {BYTES_FORMS}")
    return int(value)


def format_bytes(n: int) -> str:
    """Bytes in binary units, three significant figures: 1536 -> '1.50 KiB', 2**30 - 1024 ->
    '1.00 GiB' (the unit chosen after rounding)."""
    if abs(n) < 1024:
        return f"{n} B"
    for unit, size in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40)):
        value = n / size
        text = f"{value:.{2 if abs(value) < 9.995 else 1 if abs(value) < 99.95 else 0}f}"
        if abs(float(text)) < 1024 or unit == "TiB":
            return f"{text} {unit}"


# -- results ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryProfile:
    """A measured step. ``peak_bytes = frozen_bytes + trainable_bytes + activation_bytes``.

    frozen_bytes: expert weights and buffers (every storage once).
    trainable_bytes: trainable parameters, their gradients and the optimizer state after the step
        (0 gradients and state for mode "infer").
    activation_bytes: peak minus the two above: what the step needed on top of them.
    peak_bytes: the step's peak.
    source: how it was measured.
    """

    frozen_bytes: int
    trainable_bytes: int
    activation_bytes: int
    peak_bytes: int
    source: str


@dataclass(frozen=True)
class MemoryEstimate:
    """A predicted training step of the fast ``pmoe_fast.PMoE``; fields as ``MemoryProfile``.

    phase: where the peak falls: "forward", "backward", "recomputation" (of a checkpointed
        segment, in backward) or "optimizer step".
    breakdown: named parts of activation_bytes, in bytes: what the forward keeps for backward,
        the batch, cuBLAS workspaces.
    The remaining fields record the configuration it is for.
    """

    frozen_bytes: int
    trainable_bytes: int
    activation_bytes: int
    peak_bytes: int
    phase: str
    batch_size: int
    num_experts: int
    checkpoint: int
    expert_dtype: torch.dtype
    execution: str
    device: str
    breakdown: tuple[tuple[str, int], ...] = field(default=(), compare=False)


# -- measuring ----------------------------------------------------------------------------------

TRACKER_SOURCE = (
    "live tensor storages (LiveTensorTracker, a TorchDispatchMode): the step's inputs, the model's "
    "parameters and buffers, gradients, optimizer state and every storage an ATen operator returned "
    "during the step, each once, until freed; not memory an operator uses and frees inside itself "
    "(BLAS or attention workspaces), allocator fragmentation, or non-tensor memory"
)
CUDA_SOURCE = (
    "CUDA caching allocator (max_memory_allocated): every tensor allocated on the device during the "
    "step, workspaces included; not the CUDA context or cached, unallocated blocks"
)


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (t.device.type, st.data_ptr() or st._cdata)


class LiveTensorTracker(TorchDispatchMode):
    """Bytes of live tensor storage, and their peak, while the mode is active.

    ``track(tensor)`` adds a storage that exists already (parameters, the batch); inside the mode
    every storage an operator returns is added on its own. A storage counts once however many
    views share it, and is subtracted when freed. ``current`` and ``peak`` are in bytes.
    """

    def __init__(self):
        super().__init__()
        self._live: dict[tuple[str, int], tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = _storage_key(tensor)
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = (weakref.ref(storage, lambda _, key=key: self._free(key)), size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def _free(self, key) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry[1]

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else model.parameters()
    return [p for p in params if p.requires_grad]


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def _loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(images), labels)
    aux = getattr(model, "last_aux_loss", None)
    return loss if aux is None else loss + 0.01 * aux


def measure_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    mode: str = "train",
    warmup: bool = True,
) -> MemoryProfile:
    """Run one step and measure its memory (module docstring: how, on CUDA and on a CPU). On
    CUDA the peak is the allocator's, which counts every tensor on the device: hold nothing else
    there.

    Args:
        model: a pMoE model (or any module whose frozen part is its parameters without
            ``requires_grad`` and its buffers; ``trainable_parameters()`` is used when present).
        images, labels: one batch, on the model's device.
        optimizer: what ``optimizer.step()`` runs; None makes an AdamW over the trainable
            parameters (lr 1e-4, weight decay 1e-5).
        mode: "train" (forward, cross-entropy + 0.01 x ``model.last_aux_loss`` when not None,
            backward, optimizer step) or "infer" (forward under ``torch.no_grad``); the model
            is left in train or eval mode accordingly.
        warmup: in "train" mode, when the optimizer holds no state for any trainable parameter,
            run one unmeasured step first, so the measured one is a steady-state step (a
            parameter that never gets a gradient, such as layer 0's f for prompt outputs with
            separate MLPs, never gets state either).

    Gradients are set to None first, in "infer" mode too: on CUDA they would count as activations.
    """
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer', got {mode!r}")
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError("images and labels must be tensors (one batch on the model's device)")
    trainable = _trainable(model)
    if mode == "train":
        if not trainable:
            raise ValueError("the model has no trainable parameters: nothing to train (use mode='infer')")
        if optimizer is None:
            optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-5)
        model.train()
        if warmup and not any(p in optimizer.state for p in trainable):
            _step(model, images, labels, optimizer)
    else:
        model.eval()
    for p in model.parameters():
        p.grad = None

    def run():
        if mode == "train":
            _step(model, images, labels, optimizer)
        else:
            with torch.no_grad():
                model(images)

    device = images.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        peak, source = torch.cuda.max_memory_allocated(device), CUDA_SOURCE
    else:
        tracker = LiveTensorTracker()
        state = _optimizer_tensors(optimizer) if mode == "train" else []
        for t in [*model.parameters(), *model.buffers(), *state, images, labels]:
            tracker.track(t)
        tracker.reset_peak()
        with tracker:
            run()
        peak, source = tracker.peak, TRACKER_SOURCE

    trainable_ids = {id(p) for p in trainable}
    frozen = _unique_bytes([p for p in model.parameters() if id(p) not in trainable_ids] + list(model.buffers()))
    resident = list(trainable)
    if mode == "train":
        resident += [p.grad for p in trainable if p.grad is not None] + _optimizer_tensors(optimizer)
    trainable_bytes = _unique_bytes(resident)
    return MemoryProfile(frozen, trainable_bytes, peak - frozen - trainable_bytes, peak, source)


def _step(model, images, labels, optimizer) -> None:
    optimizer.zero_grad(set_to_none=True)
    _loss(model, images, labels).backward()
    optimizer.step()


# -- predicting ---------------------------------------------------------------------------------

# PyTorch's cuBLAS workspace per (handle, stream) on Hopper GPUs (CUBLAS_WORKSPACE_CONFIG=:4096:8), allocated
# through the caching allocator the first time a stream runs a matrix product, and kept.
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
CUDA_ALLOCATION_ROUND = 512  # the caching allocator rounds every block up to this
# Optimizer -> state tensors per parameter (the temporaries of its step: _optimizer_temporaries).
OPTIMIZERS = {"adamw": 2, "adam": 2, "sgd": 1}
EXPERT_DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class _Description:
    """What the activation model needs to know of a pMoE over some experts, batch size aside."""

    num_experts: int  # K
    dim: int  # D
    depth: int  # L
    mlp_hidden: tuple[int, ...]  # F of each expert
    heads: tuple[int, ...]  # h of each expert
    attn_dim: tuple[int, ...]  # heads x head_dim of each expert: D, unless timm's attn_head_dim says otherwise
    tokens: tuple[int, ...]  # T_k = Q_k + N_k
    prefix: tuple[int, ...]  # Q_k
    image_numel: int  # C x H x W of one image
    act_keeps: tuple[int, ...]  # tensors of width F each expert's MLP activation keeps for backward
    final_keeps: tuple[bool, ...]  # the expert's final norm keeps its last block output
    first_token_pool: tuple[bool, ...]  # the expert's pooling reads its class token only
    layer_scale: tuple[bool, ...]  # the expert's blocks scale the MLP's output (LayerScale ls2)
    trainable: tuple[int, ...]  # numel of each trainable parameter (fp32), prompts first, head last
    learning: tuple[bool, ...]  # whether it gets a gradient (and so optimizer state)
    dispatcher_layer: tuple[int, ...]  # the prompt layer of a dispatcher parameter, else -1
    frozen: tuple[tuple[int, int, bool], ...]  # (numel, itemsize, floating) of each expert tensor, stacks merged
    own_dtypes: tuple[torch.dtype, ...]  # the experts' floating dtypes, for expert_dtype=None
    batchable: bool  # the experts can run batched (PMoE.batched_reasons() is empty)
    num_prompts: int  # Np
    prompt_layers: int  # Lp
    kind: str  # dispatcher kind
    hidden: int  # H
    num_dispatch_experts: int  # M
    top_k: int
    pool_patches: bool  # dispatch_pool == "patches"
    separate_mlps: bool  # one f per source (else one f shared by the three)
    backend: str  # the dispatcher backend requested ("auto" resolves per device)
    num_classes: int


def _meta_copies(modules: Sequence[nn.Module]) -> list[nn.Module]:
    """Copies of ``modules`` whose parameters and buffers are meta tensors: no memory, no side
    effects on the originals (building a PMoE freezes its experts in place). What the originals
    share (one module passed twice, a tied tensor), the copies share."""
    memo = {}
    for module in modules:
        for p in module.parameters():
            memo.setdefault(id(p), nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
        for b in module.buffers():
            memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    return [copy.deepcopy(module, memo) for module in modules]


def _describe(experts: Sequence[nn.Module], num_prompts, num_classes, prompt_layers, dispatcher, dispatcher_hidden,
              dispatcher_backend, model_kwargs) -> _Description:
    from .model import PMoE

    if not isinstance(experts, (list, tuple)) or not experts:
        raise ValueError("experts must be a non-empty list of ViT modules (meta-device modules are fine)")
    if model_kwargs.get("base", "vpt") != "vpt":
        raise ValueError("the memory model covers base='vpt' (VPT-deep/shallow + pMoE); GaPT is not modelled")
    copies = _meta_copies(experts)
    with torch.device("meta"):
        model = PMoE(
            copies, num_classes, num_prompts, prompt_layers, dispatcher, dispatcher_hidden,
            execution="sequential", dispatcher_backend=dispatcher_backend, **model_kwargs,
        )
    infos = [a.info for a in model._adapters]
    trainable = [(name, p) for name, p in model.named_parameters() if not name.startswith("experts.")]
    for m in copies:
        for b in m.blocks:
            if not isinstance(b.mlp.act, nn.GELU) and type(b.mlp.act).__name__ != "QuickGELU":
                raise ValueError(f"the memory model covers GELU and QuickGELU MLPs, got {type(b.mlp.act).__name__}")
            if not isinstance(b.attn.q_norm, nn.Identity):
                raise ValueError("the memory model covers blocks without qk_norm")
    frozen: dict[tuple, tuple[int, int, bool]] = {}
    batchable = not model.batched_reasons()
    seen = set()  # a module passed as two experts holds its weights once
    for k, m in enumerate(copies):
        for name, t in [*m.named_parameters(), *m.named_buffers()]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            # Batched execution stacks block l's tensor `name` of every expert into one buffer.
            key = ("stack", name) if batchable and name.startswith("blocks.") else (k, name)
            numel = frozen.get(key, (0,))[0]
            frozen[key] = (numel + t.numel(), t.element_size(), t.is_floating_point())
    return _Description(
        num_experts=len(copies),
        dim=infos[0].embed_dim,
        depth=infos[0].depth,
        mlp_hidden=tuple(m.blocks[0].mlp.fc1.out_features for m in copies),
        heads=tuple(i.num_heads for i in infos),
        attn_dim=tuple(m.blocks[0].attn.num_heads * m.blocks[0].attn.head_dim for m in copies),
        tokens=tuple(i.num_prefix_tokens + i.num_patches for i in infos),
        prefix=tuple(i.num_prefix_tokens for i in infos),
        image_numel=infos[0].in_chans * infos[0].img_size[0] * infos[0].img_size[1],
        act_keeps=tuple(1 if isinstance(m.blocks[0].mlp.act, nn.GELU) else 2 for m in copies),
        final_keeps=tuple(isinstance(m.norm, nn.LayerNorm) for m in copies),
        first_token_pool=tuple(a.pool_reads_first_token for a in model._adapters),
        layer_scale=tuple(not isinstance(m.blocks[-1].ls2, nn.Identity) for m in copies),
        trainable=tuple(p.numel() for _, p in trainable),
        # With separate MLPs, layer 0's f for prompt outputs sees no rows (there are none yet).
        learning=tuple(not name.startswith("dispatchers.0.p.") for name, _ in trainable),
        dispatcher_layer=tuple(int(name.split(".")[1]) if name.startswith("dispatchers.") else -1 for name, _ in trainable),
        frozen=tuple(frozen.values()),
        own_dtypes=tuple({p.dtype: None for m in experts for p in m.parameters() if p.is_floating_point()}),
        batchable=batchable,
        num_prompts=num_prompts,
        prompt_layers=model.prompt_layers,
        kind=dispatcher,
        hidden=dispatcher_hidden,
        num_dispatch_experts=model_kwargs.get("num_dispatch_experts", 3),
        top_k=model_kwargs.get("top_k", 1),
        pool_patches=model_kwargs.get("dispatch_pool", "all") == "patches",
        separate_mlps=bool(model_kwargs.get("separate_mlps", False)),
        backend=model.dispatchers[0].backend,
        num_classes=num_classes,
    )


@dataclass(frozen=True)
class _Setup:
    """One configuration to estimate: a description plus the per-step choices, resolved."""

    d: _Description
    batch: int
    itemsize: int  # e: bytes per element of the experts' activations
    device: str  # "cpu" or "cuda"
    execution: str  # "batched", "sequential" or "streams"
    backend: str  # "torch", "cpp", "cuda", "triton" or "none"
    dtype: torch.dtype = torch.float32  # the experts' activations

    def size(self, numel: int, itemsize: int) -> int:
        """Bytes of one tensor, as the device's allocator counts them."""
        n = numel * itemsize
        if self.device == "cuda" and n:
            return -(-n // CUDA_ALLOCATION_ROUND) * CUDA_ALLOCATION_ROUND
        return n

    def lse_rows(self, tokens: int, head_dim: int) -> int:
        """Rows of log-sum-exp the attention kernel keeps for a sequence of ``tokens``: one per
        token (CPU flash, CUDA flash in 16-bit), or padded to 32 (CUDA memory-efficient)."""
        flash = self.device == "cpu" or (self.itemsize == 2 and head_dim % 8 == 0 and head_dim <= 256)
        return tokens if flash else -(-tokens // 32) * 32

    @property
    def stats_itemsize(self) -> int:
        """Norm means and inverse deviations: float32 on CUDA, the input's dtype on a CPU."""
        return 4 if self.device == "cuda" else self.itemsize

    @property
    def per_expert(self) -> bool:
        return self.execution != "batched"

    def groups(self) -> list[tuple[object, list[int]]]:
        """The expert groups one tensor covers: each expert alone, or all K at once (batched)."""
        K = self.d.num_experts
        return [(k, [k]) for k in range(K)] if self.per_expert else [("all", list(range(K)))]


def _resolve_backend(d: _Description, device: str, execution: str) -> str:
    """The dispatcher backend the model would run (``Dispatcher._choose_backend``'s rules, with
    this install's kernels: Triton and the extension as found here)."""
    from ._ext import extension_status
    from .kernels import has_triton

    if d.kind == "none":
        return "none"
    stacked = execution == "batched" or len(set(d.tokens)) == 1  # fused kernels take one (K, B, T, D)
    ext = extension_status()

    def reasons(backend: str) -> list[str]:
        why = []
        if backend != "torch" and not stacked:
            why.append("the experts' token counts differ, so the tokens come as a list")
        if backend == "triton" and (device != "cuda" or not has_triton()):
            why.append("triton runs on CUDA with the triton package installed")
        if backend in ("cuda", "cpp") and d.kind != "mlp":
            why.append(f"the {backend} backend serves kind 'mlp' only")
        if backend == "cuda" and (device != "cuda" or not ext["cuda"]):
            why.append("the cuda backend runs on CUDA with pmoe_fast._C's CUDA part built")
        if backend == "cpp" and (device != "cpu" or not ext["loaded"]):
            why.append("the cpp backend runs on a CPU with pmoe_fast._C built")
        return why

    if d.backend == "auto":
        order = ("triton", "cuda", "torch") if device == "cuda" else ("cpp", "torch")
        return next(b for b in order if not reasons(b))
    why = reasons(d.backend)
    if why:
        raise ValueError(f"dispatcher backend {d.backend!r} cannot serve this setup: " + "; ".join(why))
    return d.backend


def _in_place(s: _Setup, layer: int) -> bool:
    """Whether the prompts entering block ``layer`` go into block ``layer - 1``'s output itself,
    which then is block ``layer``'s input: VPT carries Z_P there, and the fused dispatchers (kind
    "mlp" on triton, cuda and cpp; "moe" on triton) write their IPTs into it when batched
    (``Dispatcher.dispatch_into``). Otherwise block ``layer``'s input is a new, concatenated
    sequence."""
    batched_fused = not s.per_expert and s.d.kind in ("mlp", "moe") and s.backend in ("triton", "cuda", "cpp")
    return layer >= s.d.prompt_layers or batched_fused


def _padded(s: _Setup) -> dict:
    """Each expert's sequence before block 0: Np empty prompt slots, then Z^0 (stacked when batched)."""
    return {("z0", g): s.size(_rows(s, ks, 0) * s.d.dim, s.itemsize) for g, ks in s.groups()}


def _class_token_only(s: _Setup, k: int, layer: int) -> bool:
    """Whether expert k runs block ``layer`` for its class token alone: the last block of an
    expert whose pooling reads only that token, all experts alike when batched (``PMoE._last_rows``)."""
    d = s.d
    return layer == d.depth - 1 and d.first_token_pool[k] and (s.per_expert or all(d.first_token_pool))


def _seq_rows(s: _Setup, k: int, layer: int, *, queries: bool = True) -> int:
    """Token rows per image of expert k in block ``layer``: the whole sequence (prompts included),
    or with ``queries`` those that are queries and go through the MLP, its outputs."""
    if queries and _class_token_only(s, k, layer):
        return 1
    return s.d.num_prompts + s.d.tokens[k]


def _rows(s: _Setup, ks: list[int], layer: int, *, queries: bool = True) -> int:
    """``_seq_rows`` summed over the batch and the experts ``ks``."""
    return sum(s.batch * _seq_rows(s, k, layer, queries=queries) for k in ks)


def _block_output(s: _Setup, layer: int) -> dict:
    """The output of block ``layer`` (prompt rows included), one storage per group: the next
    block's input itself where the prompts go into it in place (``_in_place``)."""
    name = ("input", layer + 1) if layer + 1 < s.d.depth and _in_place(s, layer + 1) else ("out", layer)
    return {(*name, g): s.size(_rows(s, ks, layer) * s.d.dim, s.itemsize) for g, ks in s.groups()}


def _block_input(s: _Setup, layer: int) -> dict:
    """The sequences entering block ``layer``, prompts in their slots (norm1 keeps them)."""
    return {("input", layer, g): s.size(_rows(s, ks, layer, queries=False) * s.d.dim, s.itemsize) for g, ks in s.groups()}


def _prompt_out(s: _Setup, layer: int) -> dict:
    """Z_P after block ``layer``: a view of its output when batched, else a stacked copy."""
    d = s.d
    if not s.per_expert:
        return _block_output(s, layer)
    return {("prompt_out", layer): s.size(d.num_experts * s.batch * d.num_prompts * d.dim, s.itemsize)}


def _mlp_rows(s: _Setup, experts: list[int], layer: int) -> int:
    """Elements of one (R, F) MLP activation of block ``layer`` over the rows of these experts."""
    return sum(s.batch * _seq_rows(s, k, layer) * s.d.mlp_hidden[k] for k in experts)


def _block_saved(s: _Setup, layer: int) -> dict:
    """What one block keeps for backward (table in the module docstring). A block run for the
    class token alone keeps its input, norm1's statistics and the keys and values (one (R, 2D)
    tensor) over every row, the rest over the class token's."""
    d, e = s.d, s.itemsize
    saved = _block_input(s, layer)
    for g, ks in s.groups():
        rows, queries = _rows(s, ks, layer, queries=False), _rows(s, ks, layer)
        A = d.attn_dim[ks[0]]  # one architecture in a group
        lse = sum(s.batch * d.heads[k] * s.lse_rows(_seq_rows(s, k, layer), A // d.heads[k]) for k in ks)
        if rows == queries:
            width = {"qkv": (rows, 3 * A)}
        else:
            width = {"q": (queries, A), "kv": (rows, 2 * A)}
        width.update(attn_out=(queries, A), residual=(queries, d.dim))
        for name, (r, w) in width.items():
            saved[(name, layer, g)] = s.size(r * w, e)
        saved[("lse", layer, g)] = s.size(lse, 4)
        for i in range(d.act_keeps[ks[0]]):
            saved[("fc1", layer, g, i)] = s.size(_mlp_rows(s, ks, layer), e)
        for i, r in enumerate((rows, rows, queries, queries)):  # mean and rstd of norm1 and norm2
            saved[("norm_stats", layer, g, i)] = s.size(r, s.stats_itemsize)
    return saved


def _f_rows(s: _Setup, key: tuple, rows: int) -> dict:
    """What the torch backend's f keeps per row beyond its input: hidden activations (MLP), or
    the router's gates, top-k picks and every MLP's outputs (MoE)."""
    d = s.d
    H, M, K, top = d.hidden, d.num_dispatch_experts, d.num_experts, d.top_k
    if d.kind == "mlp":
        return {(*key, "hidden", i): s.size(rows * H, 4) for i in range(2 if H else 0)}
    # The top-k indices are a view of the (rows, M) int64 sort indices (dispatcher.top_k_gates).
    parts = {"gates": (M, 4), "outs": (M * K, 4), "top_gates": (top, 4), "top_index": (M, 8), "picked": (top * K, 4)}
    if H:
        parts.update(hidden_pre=(M * H, 4), hidden_act=(M * H, 4))
    return {(*key, name): s.size(rows * w, size) for name, (w, size) in parts.items()}


def _dispatch_saved(s: _Setup, layer: int) -> dict:
    """What the dispatcher of prompt layer ``layer`` keeps for backward."""
    d, B, e = s.d, s.batch, s.itemsize
    K, Np, D = d.num_experts, d.num_prompts, d.dim
    if s.backend == "none":
        return {}
    saved = {("weights", layer): s.size(K * B * Np * K, 4)}
    stacked_tokens = {("stack", layer): s.size(K * B * d.tokens[0] * D, e)}  # _stack_if_equal
    if s.backend != "torch":
        if s.per_expert:
            saved.update(stacked_tokens)
        elif _in_place(s, layer):  # the sequence it writes into, and a copy of the Z_P it overwrites
            saved.update(_block_input(s, layer))
            if layer > 0:
                saved[("prompt_out_copy", layer)] = s.size(K * B * Np * D, e)
        else:  # a view of the tokens in the sequence before
            saved.update(_padded(s) if layer == 0 else _block_output(s, layer - 1))
        if layer > 0 and not _in_place(s, layer):
            saved.update(_prompt_out(s, layer - 1))
        rows = K * B * d.tokens[0]
        if s.backend in ("cpp", "cuda"):  # z_act (K, B, T, H) and z_mean (K, B, H or D)
            saved[("z_act", layer)] = s.size(rows * d.hidden, 4)
            saved[("z_mean", layer)] = s.size(K * B * (d.hidden or D), 4)
        if s.backend == "triton" and d.kind == "mlp" and d.hidden:  # f's pre-activations or GELU slopes of every row
            from pmoe_fast.kernels.dispatch import splits_bf16

            # float32, or three bfloat16 parts each (kernels/dispatch.py, slopes_shape)
            saved[("slopes_z", layer)] = s.size(rows * d.hidden, 6 if splits_bf16(s.dtype, d.hidden) else 4)
            saved[("act_sums_z", layer)] = s.size(K * B * d.hidden, 4)  # each (k, b)'s sum of gelu
            saved[("hidden_e", layer)] = s.size(K * Np * d.hidden, 4)
            if layer > 0:
                saved[("hidden_p", layer)] = s.size(K * B * Np * d.hidden, 4)
        if s.backend == "triton" and d.kind == "moe":  # router gates of every row
            M = d.num_dispatch_experts
            saved[("gates_z", layer)] = s.size(rows * M, 4)
            if layer > 0:
                saved[("gates_p", layer)] = s.size(K * B * Np * M, 4)
        return saved

    # torch backend: f's input rows (fp32: a view where they are contiguous fp32 already, else a
    # copy), then f's own activations; for the prompts P, the prompt outputs Z_P and the tokens Z.
    saved.update(_f_rows(s, ("f_prompts", layer), K * Np))
    if layer > 0:
        rows = K * B * Np
        if s.per_expert and e == 4:
            saved.update(_prompt_out(s, layer - 1))
        else:
            saved[("f_in_prompt_out", layer)] = s.size(rows * D, 4)
        saved.update(_f_rows(s, ("f_prompt_out", layer), rows))
    equal = len(set(d.tokens)) == 1
    for k in range(K):
        rows = B * (d.tokens[k] - (d.prefix[k] if d.pool_patches else 0))
        contiguous = s.per_expert and equal and not (d.pool_patches and d.prefix[k])  # the stacked copy
        if contiguous and e == 4:
            saved.update(stacked_tokens)
        else:
            saved[("f_in_tokens", layer, k)] = s.size(rows * D, 4)
        saved.update(_f_rows(s, ("f_tokens", layer, k), rows))
    return saved


def _next_dispatch_saved(s: _Setup, layer: int) -> dict:
    """What the dispatcher that runs after block ``layer`` (for block ``layer + 1``) keeps."""
    return _dispatch_saved(s, layer + 1) if layer + 1 < s.d.prompt_layers else {}


def _entering(s: _Setup, layer: int) -> dict:
    """The prompts that entered block ``layer`` as the layer loop holds them beside the
    sequences: the IPT in the prompts' dtype, unless it was written in place (then a view) or
    the dispatcher is "none" (a view of the EPTs); nothing after the prompt layers."""
    d = s.d
    if layer >= d.prompt_layers or _in_place(s, layer) or s.backend == "none":
        return {}
    return {("ipt", layer): s.size(d.num_experts * s.batch * d.num_prompts * d.dim, 4)}


def _segment_input(s: _Setup, first: int) -> dict:
    """What a checkpointed segment starting at layer ``first`` keeps as its input: the
    sequences entering block ``first`` and the prompts in their slots."""
    return {**_block_input(s, first), **_entering(s, first)}


def _final(s: _Setup) -> dict:
    """What pooling keeps: the last block's output and norm statistics where the expert's final
    norm is a LayerNorm over its tokens, else the pooled (B, D) features through fc_norm."""
    d, B = s.d, s.batch
    kept = {}
    for k in range(d.num_experts):
        if d.final_keeps[k]:
            kept.update({key: v for key, v in _block_output(s, d.depth - 1).items() if key[2] in (k, "all")})
            tokens = 1 if _class_token_only(s, k, d.depth - 1) else d.tokens[k]
            for i in range(2):
                kept[("final_stats", k, i)] = s.size(B * tokens, s.stats_itemsize)
        else:
            kept[("fc_norm_in", k)] = s.size(B * d.dim, s.itemsize)
            for i in range(2):
                kept[("final_stats", k, i)] = s.size(B, s.stats_itemsize)
    kept[("head_in",)] = s.size(B * d.dim, 4)
    kept[("log_softmax",)] = s.size(B * d.num_classes, 4)
    return kept


def _block_forward(s: _Setup, layer: int, kept: dict, *, last_fc2: bool = True) -> int:
    """Peak in the forward (or the recomputation) of block ``layer``, whose saved tensors ``kept``
    holds with everything kept before: the largest over expert groups of the bytes live once the
    group's MLP activation has run and fc2 has (for the last group, only with ``last_fc2``).
    Live besides what is kept: the sequences entering the block and the prompts in their slots
    (locals of the layer loop), the earlier groups' outputs of this block, and in the block the
    attention projection's output and norm2's output (a local and a call argument until the
    block returns), the activation's output and fc2's. The later groups' tensors of this block
    do not exist yet."""
    d, e = s.d, s.itemsize
    live = {**kept, **_block_input(s, layer), **_entering(s, layer)}
    block, outputs, groups = _block_saved(s, layer), _block_output(s, layer), s.groups()
    peak = 0
    for i, (g, ks) in enumerate(groups):
        later = {h for h, _ in groups[i + 1:]}
        now = {key: v for key, v in live.items() if not (key in block and key[2] in later)}
        now.update({key: v for key, v in outputs.items() if key[2] in {h for h, _ in groups[:i]}})
        rows = _rows(s, ks, layer)
        fc2 = last_fc2 or i < len(groups) - 1
        peak = max(peak, sum(now.values()) + s.size(_mlp_rows(s, ks, layer), e) + (3 if fc2 else 2) * s.size(rows * d.dim, e))
    return peak


def _grad_residual(s: _Setup) -> int:
    """The gradient of every expert's residual stream, in flight through backward."""
    d, B = s.d, s.batch
    return sum(s.size(sum(B * (d.num_prompts + d.tokens[k]) for k in ks) * d.dim, s.itemsize) for _, ks in s.groups())


def _backward(s: _Setup, live: dict, layer: int) -> int:
    """Peak while backward goes through block ``layer``, the last of those ``live`` holds the saved
    tensors of: its expert groups in the reverse of the forward's order, each adding two (R, F)
    gradients of its MLP (three with QuickGELU, whose backward is a product) to what is still
    kept, the groups done having freed their block's tensors; plus the residual gradients."""
    live, peak = dict(live), 0
    for g, ks in reversed(s.groups()):
        mlp_grads = 2 if s.d.act_keeps[ks[0]] == 1 else 3
        peak = max(peak, sum(live.values()) + mlp_grads * s.size(_mlp_rows(s, ks, layer), s.itemsize))
        for key in _block_saved(s, layer):
            if key[2] == g:
                live.pop(key, None)
    return peak + _grad_residual(s)


def _estimate(d: _Description, *, batch_size: int, checkpoint: int, expert_dtype: torch.dtype, optimizer: str,
              execution: str, device: str) -> MemoryEstimate:
    """The arithmetic of ``predict`` for one configuration (arguments checked there)."""
    K, L = d.num_experts, d.depth
    if execution == "auto":
        execution = ("batched" if d.batchable else "streams") if device == "cuda" else "sequential"
    if execution == "batched" and not d.batchable:
        raise ValueError("execution='batched' needs two experts or more, distinct and of one architecture (use 'auto')")
    s = _Setup(d, batch_size, expert_dtype.itemsize, device, execution, _resolve_backend(d, device, execution), expert_dtype)

    frozen = sum(s.size(n, expert_dtype.itemsize if floating else size) for n, size, floating in d.frozen)
    states, steps = OPTIMIZERS[optimizer], optimizer in ("adam", "adamw") and device == "cpu"  # CUDA's steps: CPU
    params = sum(s.size(n, 4) for n in d.trainable)
    grads = sum(s.size(n, 4) for n, learns in zip(d.trainable, d.learning) if learns)
    state = grads * states + (4 * sum(d.learning) if steps else 0)
    resident = frozen + params + state  # all but the gradients
    batch = s.size(batch_size * d.image_numel, 4) + s.size(batch_size, 8)
    # One cuBLAS handle on the forward's thread and one on autograd's backward thread, each with
    # a workspace per stream it runs products on.
    workspaces = 2 * CUBLAS_WORKSPACE_BYTES * (K + 1 if execution == "streams" else 1) if device == "cuda" else 0

    # Gradients present from the first block backward reaches: the head's (its weight and bias are
    # the last trainable parameters); then those of ``_grads_after``.
    head_grads = sum(s.size(n, 4) for n in d.trainable[-2:])
    peaks = {"optimizer step": grads + _optimizer_temporaries(s, optimizer)}
    if checkpoint:
        # Forward keeps each segment's input and last_dispatch_weights. Backward recomputes one
        # segment at a time, up to its last saved tensor: the last MLP activation's input, or
        # with LayerScale, its weight, after fc2 has run.
        # The first prompt layer's dispatcher runs before the first segment: what it keeps stays.
        kept = {("weights_kept", l): s.size(K * batch_size * d.num_prompts * K, 4)
                for l in range(d.prompt_layers) if s.backend != "none"}
        peaks["optimizer step"] += sum(kept.values())
        kept.update(_dispatch_saved(s, 0))
        fc2 = any(d.layer_scale[k] for k in s.groups()[-1][1])
        segments = [range(f, min(f + checkpoint, L)) for f in range(0, L, checkpoint)]
        peaks["backward"] = peaks["recomputation"] = 0
        for i, seg in enumerate(segments):
            # A segment runs its blocks, each followed by the dispatcher of the next layer; that
            # last dispatcher's backward runs (and frees what it keeps) before the last block's.
            kept.update(_segment_input(s, seg.start))
            live = dict(kept)
            for l in seg:
                live.update(_block_saved(s, l))
                if l != seg[-1]:
                    live.update(_next_dispatch_saved(s, l))
            param_grads = head_grads + _grads_after(s, seg[-1])
            peaks["backward"] = max(peaks["backward"], _backward(s, live, seg[-1]) + param_grads)
            recompute = _block_forward(s, seg[-1], live, last_fc2=fc2)
            if seg[-1] + 1 < d.prompt_layers:  # the recomputation ends with the next layer's dispatcher
                recompute = max(recompute, sum({**live, **_block_output(s, seg[-1]), **_next_dispatch_saved(s, seg[-1])}.values()))
            recompute += _grad_residual(s) + param_grads
            peaks["recomputation"] = max(peaks["recomputation"], recompute)
        forward = kept
    else:
        # Backward through block l holds what the layers up to l keep. The last block is usually
        # the largest moment, but one run for the class token alone keeps little, and then the
        # block before it can be.
        forward = _dispatch_saved(s, 0)
        peaks["backward"] = _dispatch_backward(s, forward, 0) + head_grads + _grads_after(s, 0)
        for l in range(L):
            forward.update(_block_saved(s, l))
            made = head_grads + _grads_after(s, l)
            peaks["backward"] = max(peaks["backward"], _backward(s, forward, l) + made)
            if l + 1 < d.prompt_layers:
                forward.update(_dispatch_saved(s, l + 1))
                made = head_grads + _grads_after(s, l + 1)
                peaks["backward"] = max(peaks["backward"], _dispatch_backward(s, forward, l + 1) + made)
    # The batch cast to the experts' dtype (PMoE.forward_features) lives until the forward returns.
    cast = s.size(batch_size * d.image_numel, s.itemsize) if expert_dtype != torch.float32 else 0
    peaks["forward"] = max(sum({**forward, **_final(s)}.values()), _block_forward(s, L - 1, forward)) + cast
    phase = max(peaks, key=peaks.get)
    peak = resident + batch + workspaces + peaks[phase]
    trainable = params + grads + state
    return MemoryEstimate(
        frozen_bytes=frozen,
        trainable_bytes=trainable,
        activation_bytes=peak - frozen - trainable,
        peak_bytes=peak,
        phase=phase,
        batch_size=batch_size,
        num_experts=K,
        checkpoint=checkpoint,
        expert_dtype=expert_dtype,
        execution=execution,
        device=device,
        breakdown=(
            ("kept for backward at the end of forward", sum(forward.values())),
            ("batch", batch),
            ("cuBLAS workspaces", workspaces),
        ),
    )


def _dispatch_backward(s: _Setup, live: dict, layer: int) -> int:
    """Peak when the dispatcher of prompt layer ``layer`` has run its backward: what ``live``
    holds (the saved tensors of the layers before and its own), the residual gradients, and the
    gradients it returns: of the tokens and prompt outputs in the experts' dtype, of the prompts
    and its own parameters in fp32. The C++ and CUDA ops return f's gradients per source, three
    of each when the sources share one f, which autograd then sums."""
    d, B, e = s.d, s.batch, s.itemsize
    if s.backend == "none":
        return 0
    K, Np, D = d.num_experts, d.num_prompts, d.dim
    returned = s.size(sum(B * t for t in d.tokens) * D, e) + s.size(K * Np * D, 4)
    if layer > 0:
        returned += s.size(K * B * Np * D, e)
    own = [n for n, l in zip(d.trainable, d.dispatcher_layer) if l == layer]
    copies = 3 if s.backend in ("cpp", "cuda") and not d.separate_mlps else 1
    return sum(live.values()) + _grad_residual(s) + returned + copies * sum(s.size(n, 4) for n in own)


def _grads_after(s: _Setup, layer: int) -> int:
    """Gradients backward has made by the time it reaches block ``layer``, besides the head's:
    those of the dispatchers of later layers, and the prompts' once one of them is passed."""
    d = s.d
    later = [n for n, learns, l in zip(d.trainable, d.learning, d.dispatcher_layer) if learns and l > layer]
    prompts = s.size(d.trainable[0], 4) if layer + 1 < d.prompt_layers else 0
    return prompts + sum(s.size(n, 4) for n in later)


def _optimizer_temporaries(s: _Setup, optimizer: str) -> int:
    """Bytes the optimizer step allocates and frees. Adam(W): exp_avg_sq.sqrt() and its quotient
    per parameter on a CPU (single-tensor implementation: two of the largest at a time); one
    sqrt per parameter, all at once, with CUDA's foreach implementation. SGD: none."""
    if optimizer == "sgd":
        return 0
    sizes = [s.size(n, 4) for n, learns in zip(s.d.trainable, s.d.learning) if learns]
    return sum(sizes) if s.device == "cuda" else 2 * max(sizes)


EXECUTIONS = ("auto", "batched", "streams", "sequential")


def predict(
    experts: Sequence[nn.Module],
    *,
    batch_size: int,
    num_prompts: int = 10,
    num_classes: int = 100,
    prompt_layers: int | str | None = None,
    dispatcher: str = "mlp",
    dispatcher_hidden: int = 64,
    checkpoint: int = 0,
    expert_dtype: torch.dtype | None = None,
    optimizer: str = "adamw",
    execution: str = "auto",
    device: str | torch.device = "cuda",
    attention: str = "auto",
    dispatcher_backend: str = "auto",
    **model_kwargs,
) -> MemoryEstimate:
    """Predict the peak memory of one training step of ``pmoe_fast.PMoE(experts, ...)``.

    Nothing runs and nothing is allocated: ``experts`` may live on the meta device
    (``with torch.device("meta"): vit.create_model(...)``) and are not modified. The step is
    ``measure_step``'s, in its steady state (optimizer state present); the model is the module
    docstring's.

    Args:
        experts: the K expert ViTs (timm's or ``pmoe_fast.vit``'s), on any device.
        batch_size: B.
        num_prompts, num_classes, prompt_layers, dispatcher, dispatcher_hidden: as ``PMoE``.
        checkpoint: as ``PMoE``: 0, or segments of that many layers recomputed in backward.
        expert_dtype: as ``PMoE``; None keeps the experts' dtype.
        optimizer: "adamw" or "adam" (two state tensors per parameter), or "sgd" (SGD with
            momentum: one).
        execution, attention, dispatcher_backend: as ``PMoE``, resolved for ``device`` as the
            model resolves them ("auto": batched on CUDA when the experts share an architecture,
            else streams; sequential on a CPU). Attention "math" is not modelled.
        device: "cuda" (the GPU the step will run on) or "cpu".
        **model_kwargs: further ``PMoE`` options (separate_mlps, dispatch_pool,
            num_dispatch_experts, top_k); base="gapt" is not modelled.
    """
    d = _describe(experts, num_prompts, num_classes, prompt_layers, dispatcher, dispatcher_hidden,
                  dispatcher_backend, model_kwargs)
    return _estimate(d, **_check_step(d, batch_size, checkpoint, expert_dtype, optimizer, execution, device, attention))


def _check_step(d: _Description, batch_size, checkpoint, expert_dtype, optimizer, execution, device, attention) -> dict:
    """predict's per-step arguments, checked, as ``_estimate`` takes them."""
    from .model import EXPERT_DTYPES

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 0:
        raise ValueError(f"checkpoint must be an int >= 0 (0: off; n: segments of n layers), got {checkpoint!r}")
    if expert_dtype is None:
        if len(d.own_dtypes) != 1:
            raise ValueError(f"the experts hold several dtypes {d.own_dtypes}: pass expert_dtype")
        expert_dtype = d.own_dtypes[0]
    elif expert_dtype not in EXPERT_DTYPES:
        raise ValueError(f"expert_dtype must be None or one of {EXPERT_DTYPES}, got {expert_dtype}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; the model knows {tuple(OPTIMIZERS)}")
    if execution not in EXECUTIONS:
        raise ValueError(f"unknown execution {execution!r}; choose one of {EXECUTIONS}")
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if attention == "math":
        raise ValueError("attention='math' keeps the (T x T) attention scores, which the memory model does not "
                         "cover; predict the default attention ('auto' = SDPA) or 'xformers'")
    if attention not in ("auto", "sdpa", "xformers"):
        raise ValueError(f"unknown attention {attention!r}; the memory model covers 'auto', 'sdpa' and 'xformers'")
    if attention == "xformers" and device_type != "cuda":
        raise ValueError("attention='xformers' runs on CUDA only")
    return dict(batch_size=batch_size, checkpoint=checkpoint, expert_dtype=expert_dtype, optimizer=optimizer,
                execution=execution, device=device_type)


# -- planning -----------------------------------------------------------------------------------

DEFAULT_HEADROOM = 0.1
CHECKPOINT_CHOICES = (0, 1, 2, 3, 4, 6)


@dataclass(frozen=True)
class PlanOption:
    """One checkpointing / expert dtype choice, its estimate, and whether it fits the budget."""

    checkpoint: int
    expert_dtype: torch.dtype
    estimate: MemoryEstimate
    fits: bool


@dataclass(frozen=True)
class Recommendation:
    """What ``recommend`` found.

    fits: ``option`` fits the requested batch size and experts.
    option: the cheapest option that fits at ``batch_size`` and ``num_experts``, or None when
        nothing fits even one image with one expert.
    batch_size, num_experts: the requested ones when they fit; else the largest batch that fits
        (all experts), or when not even one image fits, the most experts that fit the batch.
    options: every option at the requested batch size and experts, cheapest first.
    usable_bytes: the budget less the headroom: what a predicted peak must stay under.
    message: the recommendation in a sentence.
    """

    fits: bool
    option: PlanOption | None
    batch_size: int
    num_experts: int
    options: tuple[PlanOption, ...]
    budget_bytes: int
    usable_bytes: int
    message: str


def _cost(option: PlanOption) -> tuple:
    """Fastest first: no recomputation before recomputation (every checkpointed choice recomputes
    the forward once), then higher precision, then the lower peak."""
    return (option.checkpoint > 0, -option.expert_dtype.itemsize, option.estimate.peak_bytes)


def _describe_option(option: PlanOption) -> str:
    ckpt = f"checkpoint={option.checkpoint}" if option.checkpoint else "no checkpointing"
    return f"{ckpt}, experts in {str(option.expert_dtype).removeprefix('torch.')}"


def recommend(
    experts: Sequence[nn.Module],
    *,
    batch_size: int,
    budget_bytes: int,
    checkpoints: Sequence[int] | None = None,
    expert_dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    headroom: float = DEFAULT_HEADROOM,
    num_prompts: int = 10,
    num_classes: int = 100,
    prompt_layers: int | str | None = None,
    dispatcher: str = "mlp",
    dispatcher_hidden: int = 64,
    optimizer: str = "adamw",
    execution: str = "auto",
    device: str | torch.device = "cuda",
    attention: str = "auto",
    dispatcher_backend: str = "auto",
    **model_kwargs,
) -> Recommendation:
    """The cheapest checkpointing / expert dtype choice whose predicted peak fits the budget.

    Every (checkpoint, expert dtype) pair is estimated with ``predict``; an option fits when its
    peak is at most ``budget_bytes * (1 - headroom)``: the headroom stands for what the
    prediction leaves out on a GPU (the CUDA context, a few hundred MiB, and the caching
    allocator's fragmentation). The cheapest that fits wins (``_cost``: no recomputation first,
    then higher precision). When none fits, the largest batch size that fits with some option
    is found (its cheapest option recommended), and when not even one image fits, the most
    experts (the first ones of ``experts``) that fit ``batch_size``.

    Args:
        experts, batch_size, and the keyword arguments from num_prompts on: as ``predict``.
        budget_bytes: the memory to fit in (``parse_bytes("24GiB")``).
        checkpoints: the segment lengths to try; None: 0 and those of (1, 2, 3, 4, 6) below
            the experts' depth.
        expert_dtypes: the expert dtypes to try.
        headroom: the share of the budget kept free, in [0, 1).
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
        raise ValueError(f"budget_bytes must be a positive int (parse_bytes('24GiB') reads a size), got {budget_bytes!r}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be in [0, 1), got {headroom}")
    if not expert_dtypes:
        raise ValueError("expert_dtypes must name at least one dtype")
    if checkpoints is not None and not checkpoints:
        raise ValueError("checkpoints must name at least one segment length (0: no checkpointing), or be None")
    def describe(chosen: Sequence[nn.Module]) -> _Description:
        return _describe(chosen, num_prompts, num_classes, prompt_layers, dispatcher, dispatcher_hidden,
                         dispatcher_backend, model_kwargs)

    d = describe(experts)
    if checkpoints is None:
        checkpoints = [c for c in CHECKPOINT_CHOICES if c < d.depth]
    usable = int(budget_bytes * (1 - headroom))

    def options(desc: _Description, batch: int) -> list[PlanOption]:
        out = []
        for dtype in expert_dtypes:
            for ckpt in checkpoints:
                args = _check_step(desc, batch, ckpt, dtype, optimizer, execution, device, attention)
                est = _estimate(desc, **args)
                out.append(PlanOption(ckpt, dtype, est, est.peak_bytes <= usable))
        return sorted(out, key=_cost)

    every = options(d, batch_size)
    fitting = [o for o in every if o.fits]
    K = d.num_experts
    if fitting:
        best = fitting[0]
        message = (f"{_describe_option(best)}: predicted peak {format_bytes(best.estimate.peak_bytes)} "
                   f"fits {format_bytes(usable)} ({format_bytes(budget_bytes)} less {headroom:.0%} headroom)")
        return Recommendation(True, best, batch_size, K, tuple(every), budget_bytes, usable, message)

    best, batch = None, 0
    for option in every:  # the largest batch each option fits, by bisection (peaks grow with B)
        lo, hi = 0, batch_size - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            est = _estimate(d, **_check_step(d, mid, option.checkpoint, option.expert_dtype, optimizer, execution, device, attention))
            lo, hi = (mid, hi) if est.peak_bytes <= usable else (lo, mid - 1)
        if lo > batch:
            best, batch = option, lo
    if best is not None:
        fit = next(o for o in options(d, batch) if o.fits)
        message = (f"nothing fits batch {batch_size} in {format_bytes(usable)}; the largest batch that fits is "
                   f"{batch}, with {_describe_option(fit)} (predicted peak {format_bytes(fit.estimate.peak_bytes)})")
        return Recommendation(False, fit, batch, K, tuple(every), budget_bytes, usable, message)

    # The most experts that fit, by bisection (peaks grow with K): each count describes a model.
    # "batched" runs two experts or more.
    none = 1 if execution == "batched" else 0
    lo, hi, first_fit = none, K - 1, None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        fitting = [o for o in options(describe(list(experts)[:mid]), batch_size) if o.fits]
        lo, hi, first_fit = (mid, hi, fitting[0]) if fitting else (lo, mid - 1, first_fit)
    if lo > none:
        k = lo
        message = (f"not even one image fits {format_bytes(usable)} with {K} experts; the first {k} experts fit "
                   f"batch {batch_size} with {_describe_option(first_fit)} "
                   f"(predicted peak {format_bytes(first_fit.estimate.peak_bytes)})")
        return Recommendation(False, first_fit, batch_size, k, tuple(every), budget_bytes, usable, message)
    smallest = min(every, key=lambda o: o.estimate.peak_bytes)
    message = (f"nothing fits {format_bytes(usable)}: the smallest predicted peak, one expert or not, is above it "
               f"({_describe_option(smallest)} needs {format_bytes(smallest.estimate.peak_bytes)} for batch "
               f"{batch_size} with {K} experts, {format_bytes(smallest.estimate.frozen_bytes)} of it frozen weights)")
    return Recommendation(False, None, batch_size, K, tuple(every), budget_bytes, usable, message)
