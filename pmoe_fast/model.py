"""The fast pMoE: ``pmoe_fast.PMoE``, a drop-in for ``pmoe_fast.reference.PMoE``.

Same constructor arguments, parameters and ``state_dict`` as the reference (it subclasses it), so
``fast.load_state_dict(reference.state_dict(), strict=True)`` and the reverse work. What differs is
how the forward runs, chosen once when the model is built and reported by ``execution_plan()``:

- execution: "batched" runs every block once for all K experts when they share an architecture
  (same depth, width, heads, token count): their frozen weights are stacked once and each expert's
  parameters become views into the stacks (no second copy), every linear layer is one batched
  matmul and attention one call over K x B sequences. Change those parameters in place (as
  ``load_state_dict`` does); where one is replaced instead (``assign=True``, a new
  ``nn.Parameter``, ``.data = ...``), or a block module or a norm's eps, the next batched forward
  finds it and stacks them anew, or runs on streams (``"auto"``) where the blocks can no longer
  run batched (under ``torch.compile``, replace before compiling). Batched blocks are plain ones:
  LayerNorms, timm's attention and ``Mlp``, an activation without parameters
  (``batched_reasons``).
  "streams" runs each expert's block on its own CUDA stream (in sequence on a CPU), for experts
  that differ; under ``torch.compile`` in sequence too, in the compiled graph. PyTorch's
  compiled user streams are not reliable yet: Inductor has refused ``record_stream`` (torch 2.9),
  they crash with gradients or return stale data in some cases (pytorch/pytorch#187695, #197416),
  and a compiled training step on streams failed on an H100 (torch 2.11).
  "sequential" runs them one by one.
  "auto" decides by the device of each forward: on CUDA, batched when the experts can be, else
  streams; on a CPU, sequential, where kernel launches cost little and one large batched matmul
  measured slower than K plain ones (a ViT-tiny training step, K = 3, B = 8: 1.46 s against 1.22 s).
- attention: "sdpa", "xformers" or "math" (``pmoe_fast.attention``).
- layer_norm: what the batched block's LayerNorms run. "triton" normalises and applies each
  expert's affine in one kernel, forward and backward (``kernels/layer_norm.py``); "torch"
  normalises with ``F.layer_norm`` and applies the K affines in a second pass. "auto" takes
  Triton on CUDA where it can serve, from ``TRITON_LAYER_NORM_MIN_ROWS`` rows per expert (a B = 1
  forward is bound by the host). Under ``torch.compile`` every setting runs torch, whose second
  pass Inductor fuses itself. The other executions run each expert's own ``nn.LayerNorm``.
- dispatcher_backend: "torch", "triton", "cuda" or "cpp" (``pmoe_fast.dispatcher``).
- checkpoint: 0 (off), or recompute activations in backward in segments of that many layers
  (non-reentrant ``torch.utils.checkpoint``).
- expert_dtype: the frozen experts' dtype (e.g. ``torch.bfloat16``); prompts, dispatchers and
  head stay in float32, and the dispatcher accumulates in float32.

Always, whatever the options: an expert whose pooling reads only its class token (timm's
``global_pool="token"``) runs its last block for that token alone. Every token is still a key and
a value of its attention, but only the class token is a query and goes through the projection and
the MLP, whose outputs for the other tokens nothing reads: the same result for about a sixth of the
block's arithmetic (``execution_plan()["last_block"]``).

Inside, each expert's sequence is laid out [prompts, prefix tokens, patch tokens] rather than
SPEC.md's [prefix, prompts, patches]. Transformer blocks are equivariant to the order of tokens
(position embeddings are added before the first block, and attention has no mask), so the result
is the same function; the prompt-first layout makes the non-prompt tokens one strided view,
which the fused dispatcher kernels read in place, and, batched, lets them write the integrated
prompts into the prompt slots of the sequences in place (``Dispatcher.dispatch_into``) instead
of concatenating new sequences at every layer.
"""

from __future__ import annotations

import operator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from . import attention as attention_backends
from . import vit
from .experts import block_reason, is_stock
from .frozen_linear import linear, qkv_heads
from .reference import PMoE as ReferencePMoE
from .reference import expert_list

EXECUTIONS = ("auto", "batched", "streams", "sequential")
LAYER_NORMS = ("auto", "torch", "triton")
# Rows per expert (B x tokens) from which layer_norm="auto" takes the Triton LayerNorm on CUDA.
# Below, a forward is bound by the host, and one Triton launch through an autograd Function costs
# it more than the composite's two ops: at B = 1 it added 30 us a LayerNorm to the batched block's
# host time (benchmarks/model_host_time.py, "the same, Triton LayerNorm"), for a pass over 1 MB
# on the device. As for the linear layers' addmm (pmoe_fast/frozen_linear.py).
TRITON_LAYER_NORM_MIN_ROWS = 4096
EXPERT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Submodules of a block that the batched path replaces by its own arithmetic; each must be a
# plain (parameter-free) identity where the path assumes one.
IDENTITY_PARTS = ("attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm", "mlp.drop1", "mlp.drop2")
# The modules of a block whose parameters, activation or eps the batched path reads, by parent
# ("" the block itself): a replaced one must be found (``PMoE._stacks_tied``).
BATCHED_BLOCK_PARTS = {"": ("attn", "mlp", "norm1", "norm2", "ls1", "ls2"), "attn": ("qkv", "proj"), "mlp": ("fc1", "act", "fc2")}


class _KeepDispatcherLosses:
    """Around a checkpointed segment's recomputation in backward: it runs the segment's
    dispatchers again, and each stores a fresh MoE load-balancing loss in ``aux_loss``. Those
    losses are never used; left there, their graphs would keep what the recomputation saved
    alive until the next forward. Restores the forward's on exit. Re-entrant: a segment
    recomputes once per backward through it (``retain_graph=True``, ``create_graph=True``), in
    the same context object."""

    def __init__(self, dispatchers):
        self.dispatchers = dispatchers
        self.kept: list[list] = []

    def __enter__(self) -> None:
        self.kept.append([d.aux_loss for d in self.dispatchers])

    def __exit__(self, *exc) -> None:
        for d, aux in zip(self.dispatchers, self.kept.pop()):
            d.aux_loss = aux


class PMoE(ReferencePMoE):
    """Fast pMoE. Arguments as ``pmoe_fast.reference.PMoE``, plus (keyword only):

    Args:
        execution: "auto" (by device, module docstring), "batched", "streams" or "sequential".
        attention: "auto" (SDPA), "sdpa", "xformers" or "math".
        layer_norm: "auto", "torch" or "triton": the batched block's LayerNorms (module docstring).
        dispatcher_backend: "auto", "torch", "triton", "cuda" or "cpp"; "auto" defers to
            ``PMOE_BACKEND`` when set, then picks per device.
        checkpoint: 0 for none, n >= 1 to checkpoint every segment of n layers.
        expert_dtype: None (keep the experts' dtype), torch.float32, torch.bfloat16 or torch.float16;
            the experts given are converted in place, as ``module.to`` does.
    """

    def __init__(
        self,
        experts,
        num_classes: int,
        *args,
        execution: str = "auto",
        attention: str = "auto",
        layer_norm: str = "auto",
        dispatcher_backend: str = "auto",
        checkpoint: int = 0,
        expert_dtype: torch.dtype | None = None,
        **kwargs,
    ):
        if expert_dtype is not None and expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"expert_dtype must be None or one of {EXPERT_DTYPES}, got {expert_dtype}")
        experts = expert_list(experts)
        if expert_dtype is not None:
            for expert in experts:
                expert.to(expert_dtype)
        super().__init__(experts, num_classes, *args, **kwargs)
        if execution not in EXECUTIONS:
            raise ValueError(f"unknown execution {execution!r}; choose one of {EXECUTIONS}")
        if attention not in attention_backends.BACKENDS:
            raise ValueError(f"unknown attention backend {attention!r}; choose one of {attention_backends.BACKENDS}")
        if layer_norm not in LAYER_NORMS:
            raise ValueError(f"unknown layer_norm {layer_norm!r}; choose one of {LAYER_NORMS}")
        if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 0:
            raise ValueError(f"checkpoint must be an int >= 0 (0: off; n: segments of n layers), got {checkpoint!r}")
        for d in self.dispatchers:
            d.set_backend(dispatcher_backend)
        self.attention = attention
        self.layer_norm = layer_norm
        self.last_layer_norm: str | None = None  # what the last batched forward's LayerNorms ran
        self.checkpoint = checkpoint
        self.execution = execution
        self._batched_reasons = self.batched_reasons()
        if execution == "batched" and self._batched_reasons:
            raise ValueError("execution='batched' cannot serve these experts: " + "; ".join(self._batched_reasons))
        self.last_execution: str | None = None  # what the last forward ran
        self._stack_names: list[list[str]] = []
        self._stacked_blocks: list[_StackedBlock] = []  # per layer, what the batched block reads
        self._streams: list[torch.cuda.Stream] = []
        if execution in ("auto", "batched") and not self._batched_reasons:
            self._stack_expert_weights()
            self.register_load_state_dict_post_hook(_restack_after_assigning_load)
        self._last_rows = self._pooled_rows()

    def _pooled_rows(self) -> list[slice | None]:
        """The rows of its sequence (prompt-first) each expert's pooling reads from the last
        block's output: its class token, or None for every token."""
        return [slice(self.num_prompts, self.num_prompts + 1) if a.pool_reads_first_token else None for a in self._adapters]

    # -- the plan -------------------------------------------------------------------------------

    def execution_plan(self) -> dict[str, Any]:
        """What this model runs, and why. Dispatcher and attention backends that depend on the
        inputs' device report what ran in the last forward (None before the first)."""
        return {
            "execution": self.execution,
            "execution_on_cuda": self.execution_for("cuda"),
            "execution_on_cpu": self.execution_for("cpu"),
            "why": "; ".join(self._batched_reasons) or "the experts share one architecture",
            "execution_last_run": self.last_execution,
            "attention": self.attention,
            "layer_norm": self.layer_norm,
            "layer_norm_last_run": self.last_layer_norm,
            "dispatcher_backend": self.dispatchers[0].backend,
            "dispatcher_backend_last_run": self.dispatchers[0].last_backend,
            "checkpoint": f"every {self.checkpoint} layer(s)" if self.checkpoint else "off",
            "expert_dtype": str(self._expert_dtype()),
            "last_block": "; ".join(
                f"expert {k}: " + ("class token only" if rows else "every token (its pooling reads them all)")
                for k, rows in enumerate(self._last_rows)
            ),
        }

    def batched_reasons(self) -> list[str]:
        """Why the experts cannot run horizontally batched; empty when they can."""
        if self.num_experts == 1:
            return ["there is one expert: nothing to batch"]
        reasons = []
        first = {}
        for k, expert in enumerate(self.experts):
            j = first.setdefault(id(expert), k)
            if j != k:
                reasons.append(
                    f"expert {k} is the same module as expert {j}: each expert's weights become a row of "
                    "the stacks; pass distinct experts (copy.deepcopy)"
                )
        shapes = {self._architecture(k) for k in range(self.num_experts)}
        if len(shapes) > 1:
            reasons.append(
                "the experts differ in architecture (prefix tokens, patch count, heads, block parameters, "
                "activations, the norms' eps or layers): " + "; ".join(f"expert {k}: {self._adapters[k].info}" for k in range(self.num_experts))
            )
        for part in IDENTITY_PARTS:
            for block in self.experts[0].blocks:
                module = block.get_submodule(part) if _has_submodule(block, part) else nn.Identity()
                if not isinstance(module, (nn.Identity, nn.Dropout)):
                    reasons.append(f"block part {part} is a {type(module).__name__}; the batched path needs an identity")
                    break
        for k, expert in enumerate(self.experts):
            plain = [_plain_block_reason(block) for block in expert.blocks]
            reasons += [f"expert {k}, block {l}: {r}" for l, r in enumerate(plain) if r][:1]
        return reasons

    def execution_for(self, device_type: str) -> str:
        """The execution a forward on ``device_type`` ("cuda" or "cpu") runs."""
        if self.execution != "auto":
            return self.execution
        if device_type != "cuda":
            return "sequential"
        return "streams" if self._batched_reasons else "batched"

    def _architecture(self, k: int) -> tuple:
        """What the batched path needs equal across experts."""
        m = self.experts[k]
        info = self._adapters[k].info
        blocks = tuple(
            tuple((name, tuple(p.shape)) for name, p in b.named_parameters())
            + (repr(getattr(b.mlp, "act", None)), b.norm1.eps, b.norm2.eps, b.attn.num_heads)
            for b in m.blocks
        )
        return info.num_prefix_tokens, info.num_patches, info.embed_dim, blocks

    # -- stacked weights (batched execution) ----------------------------------------------------

    def _stack_expert_weights(self) -> None:
        """Stack each block parameter over experts into a non-persistent buffer and make every
        expert's parameter a view of its row: one copy of the weights, timm's state_dict keys."""
        for l, block in enumerate(self.experts[0].blocks):
            names = [name for name, _ in block.named_parameters()]
            for name in names:
                rows = [self.experts[k].blocks[l].get_parameter(name).detach() for k in range(self.num_experts)]
                self.register_buffer(_buffer_name(l, name), torch.stack(rows), persistent=False)
            self._stack_names.append(names)
        self._tie_experts_to_stacks()

    def _tie_experts_to_stacks(self) -> None:
        self._stacked_blocks = []
        # What _stacks_tied checks, in three parallel lists: each expert block parameter tied to
        # its stack row, where it sits (its module's parameter dict and name), and its address.
        self._tied_params: list[nn.Parameter] = []
        self._tied_slots: list[tuple[dict, str]] = []
        self._tied_addresses: list[int] = []
        self._tied_structure = self._block_structure()
        for l, names in enumerate(self._stack_names):
            stacks = {name: self.get_buffer(_buffer_name(l, name)) for name in names}
            for name, stack in stacks.items():
                owner, _, attr = name.rpartition(".")
                for k in range(self.num_experts):
                    module = self.experts[k].blocks[l].get_submodule(owner)
                    param = module.get_parameter(attr)
                    param.data = stack[k]
                    self._tied_params.append(param)
                    self._tied_slots.append((module._parameters, attr))
                    self._tied_addresses.append(param.data_ptr())
            self._stacked_blocks.append(_StackedBlock.of(self.experts[0].blocks[l], stacks))

    def _block_structure(self) -> list[tuple[dict, str, Any]]:
        """What the stacks and ``_StackedBlock`` were made from, as (dict, key, value) whose
        ``dict.get(key)`` must stay ``value``: each expert, its blocks, their modules whose
        parameters, activation and eps the batched path reads (``_modules`` entries), and the
        norms' eps (``__dict__`` entries)."""
        out = []
        for expert in self.experts:  # each expert itself: _check_images
            out.append((expert._modules, "blocks", expert.blocks))
            for l, block in enumerate(expert.blocks):
                out.append((expert.blocks._modules, str(l), block))
                for parent, names in BATCHED_BLOCK_PARTS.items():
                    owner = block._modules.get(parent) if parent else block
                    out += [(owner._modules, name, owner._modules.get(name)) for name in names if owner is not None]
                norms = [block._modules.get(name) for name in ("norm1", "norm2")]
                out += [(norm.__dict__, "eps", norm.__dict__.get("eps")) for norm in norms if norm is not None]
        return out

    def _stacks_tied(self) -> bool:
        """Whether every expert's block parameter is still the tensor tied to its row of its
        stack, in the modules the stacks were made from: a new parameter
        (``block.attn.qkv.weight = nn.Parameter(...)``), new data (``.data = ...``),
        ``load_state_dict(..., assign=True)`` or a new module (``block.mlp.act = nn.ReLU()``) or
        eps unties it. 288 identity and address checks, and 338 dictionary lookups of the
        structure, for K = 2 ViT-B/16 experts: about 85 us on a 2-core VM."""
        current = [params.get(attr) for params, attr in self._tied_slots]
        return (
            all(map(operator.is_, current, self._tied_params))
            and [p.data_ptr() for p in self._tied_params] == self._tied_addresses
            and all(d.get(key) is value for d, key, value in self._tied_structure)
        )

    def _restack_if_untied(self) -> None:
        """Stack the experts' parameters anew where any was replaced, or their blocks changed:
        the batched path reads the stacks, and would otherwise run the old weights. Blocks that
        changed are checked again (``batched_reasons``): where they can no longer run batched,
        "auto" runs them on streams from then on, and "batched" raises."""
        if self._stacks_tied():
            return
        self._batched_reasons = self.batched_reasons()
        if self._batched_reasons:
            if self.execution == "batched":
                raise ValueError(
                    "execution='batched' cannot serve these experts since their blocks changed: "
                    + "; ".join(self._batched_reasons)
                )
            return  # "auto" no longer batches: execution_for gives streams
        self._stack_names = []
        # Under torch.inference_mode the stacks would be inference tensors, which a later
        # training forward could not save for backward.
        with torch.inference_mode(False):
            self._stack_expert_weights()

    def _apply(self, fn, recurse=True):
        # .to() / .half() / .cuda() convert parameters and buffers separately: re-point the
        # experts' parameters at the converted stacks, dropping the converted copies.
        super()._apply(fn, recurse)
        if self._stack_names:
            self._tie_experts_to_stacks()
        return self

    # -- forward ------------------------------------------------------------------------------

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        dtype = self._expert_dtype()
        if self.execution_for(images.device.type) == "batched" and not torch.compiler.is_compiling():
            self._restack_if_untied()  # compiled graphs do not see parameter swaps
        self.last_execution = self.execution_for(images.device.type)
        # Each expert's sequence, prompt-first: Np prompt slots, empty until block 0's prompts
        # enter, then Z_k^0, its own embedding (B, Q_k + N_k, D). Stacked when batched.
        slots = (0, 0, self.num_prompts, 0)
        images = images.to(dtype)
        self._last_rows = self._pooled_rows()  # an expert's pooling may have changed since
        if self.last_execution == "batched" and torch.is_grad_enabled() and any(p.requires_grad for p in self._tied_params):
            self.last_execution = self._per_expert_for_trainable_blocks(images.device.type)
        if self.last_execution == "streams" and torch.compiler.is_compiling():
            self.last_execution = "sequential"  # the module docstring says why
        if self.last_execution == "batched":
            seqs = F.pad(torch.stack([a.embed(images, patches_as_matmul=True) for a in self._adapters]), slots)
            self.last_layer_norm = self._layer_norm_for(seqs)  # seqs: (K, B, Np + T, D)
        else:
            seqs = [F.pad(a.embed(images, patches_as_matmul=True), slots) for a in self._adapters]
            self.last_layer_norm = None  # each expert's own nn.LayerNorm
        weights, aux = [], []
        state = self._enter(0, seqs, None, weights, aux)  # (sequences, the prompts that entered)
        del seqs  # where _enter made new sequences, the padded ones are garbage now
        step = self.checkpoint or self.depth
        for first in range(0, self.depth, step):
            layers = range(first, min(first + step, self.depth))
            if self.checkpoint and torch.is_grad_enabled():
                # Compiled, the recomputation is part of the backward graph and runs no module's
                # forward: no loss to restore (and Dynamo takes no context_fn).
                keep = {} if torch.compiler.is_compiling() else {"context_fn": self._recompute_context}
                state, w, a = torch_checkpoint(self._layers, layers, state, use_reentrant=False, **keep)
            else:
                state, w, a = self._layers(layers, state)
            weights += w
            aux += a
        self.last_dispatch_weights = weights
        self.last_aux_loss = torch.stack(aux).mean() if aux[0] is not None else None
        tokens = state[0]
        pooled = torch.stack([a.pool(tokens[k]) for k, a in enumerate(self._adapters)])
        return pooled.mean(0).to(self.head.weight.dtype)

    def _per_expert_for_trainable_blocks(self, device_type: str) -> str:
        """The execution for experts whose block parameters require grad: the batched blocks
        read stacked copies that take no gradient, so "auto" runs the experts one by one and an
        explicit "batched" raises."""
        if self.execution == "batched":
            raise ValueError(
                "execution='batched' runs the experts' stacked block weights, which take no gradient, but some "
                "expert block parameters require grad: freeze them (model.experts.requires_grad_(False)) or use "
                "execution='auto', 'sequential' or 'streams'"
            )
        return "streams" if device_type == "cuda" else "sequential"

    def _layer_norm_for(self, seqs: torch.Tensor) -> str:
        """What the batched blocks' LayerNorms run in this forward, "triton" or "torch", decided
        once (at B = 1 the host's time is the latency). An explicit "triton" that cannot serve
        raises with every reason."""
        if self.layer_norm == "torch" or torch.compiler.is_compiling() or not self._stacked_blocks:
            return "torch"
        if self.layer_norm == "auto" and (
            seqs.device.type != "cuda" or seqs.shape[1] * seqs.shape[2] < TRITON_LAYER_NORM_MIN_ROWS
        ):
            return "torch"
        from pmoe_fast.kernels import layer_norm as triton_layer_norm

        weight, bias = self._stacked_blocks[0].norm1
        reasons = triton_layer_norm.not_supported_reasons(seqs, weight[:, 0, 0], bias[:, 0, 0])
        if reasons and self.layer_norm == "triton":
            raise RuntimeError("layer_norm='triton' cannot serve: " + " ".join(reasons))
        return "torch" if reasons else "triton"

    def _recompute_context(self):
        return nullcontext(), _KeepDispatcherLosses(self.dispatchers)

    def _layers(self, layers: range, state: tuple) -> tuple[tuple, list, list]:
        """Run the experts' blocks ``layers``, each followed by the prompts entering the next
        (``_enter``). state = (sequences whose prompt slots hold the prompts entering the first
        of ``layers``, those prompts). After the last block the sequences become the tokens
        pooling reads. A checkpointed segment starts with a block, so nothing it recomputes
        writes into its input."""
        seqs, entering = state
        Np = self.num_prompts
        weights, aux = [], []
        for l in layers:
            last = l == self.depth - 1  # its outputs go to pooling only: the rows it reads
            if isinstance(seqs, torch.Tensor):
                rows = self._last_rows[0] if last and all(self._last_rows) else None
                seqs = self._batched_block(l, seqs, self._attn_scale(self._adapters[0], l), rows)
                if last and rows is None:
                    seqs = seqs[:, :, Np:]
            elif last:
                seqs = self._expert_blocks(l, seqs, self._last_rows)
                seqs = [t if rows else t[:, Np:] for t, rows in zip(seqs, self._last_rows)]
            else:
                seqs = self._expert_blocks(l, seqs)
            if not last:
                seqs, entering = self._enter(l + 1, seqs, entering, weights, aux)
        return (seqs, entering), weights, aux

    def _enter(self, l: int, seqs, entering, weights: list, aux: list) -> tuple:
        """Put the prompts that enter block l into the prompt slots (rows [0, Np)) of every
        expert's sequence, which hold block l-1's prompt outputs Z_P (nothing yet at l = 0): a
        prompt layer's IPTs, GaPT's gated mix, or, for VPT, Z_P itself (carried: nothing to do).
        Batched, a fused dispatcher writes the IPTs in place (``Dispatcher.dispatch_into``).
        ``entering``: the prompts that entered block l-1. Returns (sequences, prompts entering
        block l, or None where no gate reads them); dispatch weights and MoE losses go to
        ``weights`` and ``aux``."""
        Np = self.num_prompts
        batched = isinstance(seqs, torch.Tensor)
        if l >= self.prompt_layers and not self._gates_prompts(l):
            return seqs, None  # Z_P carried; no later block reads the prompts entering this one
        if batched and l < self.prompt_layers:
            dispatcher = self.dispatchers[l]
            seqs, w = dispatcher.dispatch_into(self.prompts[l], seqs, l > 0, self._prefix())
            weights.append(w.detach())
            aux.append(dispatcher.aux_loss)
            return seqs, seqs[:, :, :Np] if self._gates_prompts(l + 1) else None
        prompt_out = None
        if l > 0:
            prompt_out = seqs[:, :, :Np] if batched else torch.stack([s[:, :Np] for s in seqs])
        # Per expert, at a prompt layer: the fused dispatcher kernels take the tokens as one
        # (K, B, T, D) tensor.
        tokens = _stack_if_equal([s[:, Np:] for s in seqs]) if l < self.prompt_layers else None
        prompts = self._entering_prompts(l, tokens, prompt_out, entering, self._prefix(), weights, aux)
        if batched:
            return torch.cat([prompts.to(seqs.dtype), seqs[:, :, Np:]], dim=2), prompts
        return [torch.cat([p.to(s.dtype), s[:, Np:]], dim=1) for p, s in zip(prompts, seqs)], prompts

    def _prefix(self) -> list[int]:
        return [a.info.num_prefix_tokens for a in self._adapters]

    def _expert_blocks(self, l: int, seqs: list[torch.Tensor], rows: list[slice | None] | None = None) -> list[torch.Tensor]:
        """Block l of every expert, each on its own CUDA stream under "streams" on a GPU; with
        ``rows``, expert k's block returns the outputs of seqs[k][:, rows[k]] only."""
        backend = attention_backends.resolve(self.attention, seqs[0])

        def run(k: int) -> torch.Tensor:
            adapter = self._adapters[k]
            return adapter.block(l, seqs[k], self._attn_scale(adapter, l), backend, rows[k] if rows else None)

        if self.last_execution != "streams" or seqs[0].device.type != "cuda":
            return [run(k) for k in range(self.num_experts)]
        main = torch.cuda.current_stream()
        if len(self._streams) != self.num_experts or self._streams[0].device != seqs[0].device:
            self._streams = [torch.cuda.Stream(seqs[0].device) for _ in range(self.num_experts)]
        outs = []
        for k, stream in enumerate(self._streams):
            stream.wait_stream(main)  # its input was made on the main stream
            with torch.cuda.stream(stream):
                seqs[k].record_stream(stream)
                outs.append(run(k))
        for out, stream in zip(outs, self._streams):
            main.wait_stream(stream)
            out.record_stream(main)  # freed later on the main stream's schedule
        return outs

    def _batched_block(self, l: int, x: torch.Tensor, scale: torch.Tensor | None, rows: slice | None = None) -> torch.Tensor:
        """Block l of all K experts at once. x (K, B, T, D) -> (K, B, T, D), or (K, B, R, D) for
        the rows x[:, :, rows] only (as ``Expert.block``)."""
        K, B, T, D = x.shape
        blk = self._stacked_blocks[l]
        heads, hd = blk.heads, blk.head_dim

        kernel = self.last_layer_norm == "triton"
        h = _layer_norm(x, blk.norm1, blk.eps1, kernel)
        if rows is None:
            q, k, v = qkv_heads(h, blk.qkv, heads)  # (K * B, heads, T, hd): one attention call over K x B sequences
        else:
            x = x[:, :, rows]
            R = x.shape[2]
            A = heads * hd  # the attention width, D unless the experts' attn_head_dim says otherwise
            q = linear(h[:, :, rows].reshape(K, B * R, D), blk.qkv, slice(0, A))
            q = q.view(K * B, R, heads, hd).transpose(1, 2)
            weight_t, bias = blk.qkv
            kv = (weight_t[:, :, A:], None if bias is None else bias[:, :, A:])
            k, v = qkv_heads(h, kv, heads, parts=2)
        R = x.shape[2]
        backend = attention_backends.resolve(self.attention, q)
        o = attention_backends.attention(q, k, v, hd**-0.5 if scale is None else scale, backend)
        o = linear(o.transpose(1, 2).reshape(K, B * R, heads * hd), blk.proj)
        x = x + _layer_scale(o, blk.ls1).view(K, B, R, D)

        h = _layer_norm(x, blk.norm2, blk.eps2, kernel).view(K, B * R, D)
        h = linear(blk.act(linear(h, blk.fc1)), blk.fc2)
        return x + _layer_scale(h, blk.ls2).view(K, B, R, D)


@dataclass(frozen=True)
class _StackedBlock:
    """One layer's block for all K experts as ``PMoE._batched_block`` reads it, made once (at B = 1
    every view and attribute lookup per call is host time the GPU waits for): per linear layer
    (weight^T (K, in, out), bias (K, 1, out) or None), per LayerNorm (weight, bias) as
    (K, 1, 1, D) and its eps, per LayerScale gamma (K, 1, D) or None, all views of the stacked
    weights; the heads, head width and activation of the experts' block."""

    qkv: tuple
    proj: tuple
    fc1: tuple
    fc2: tuple
    norm1: tuple
    norm2: tuple
    ls1: torch.Tensor | None
    ls2: torch.Tensor | None
    eps1: float
    eps2: float
    heads: int
    head_dim: int
    act: Callable[[torch.Tensor], torch.Tensor]

    @staticmethod
    def of(block: nn.Module, stacks: dict[str, torch.Tensor]) -> _StackedBlock:
        """From one expert's block (structure and hyper-parameters) and the layer's stacks."""

        def layer(name):
            bias = stacks.get(f"{name}.bias")
            return stacks[f"{name}.weight"].transpose(1, 2), None if bias is None else bias.unsqueeze(1)

        def gamma(name):
            g = stacks.get(f"{name}.gamma")
            return None if g is None else g.unsqueeze(1)

        def norm(name):
            return stacks[f"{name}.weight"][:, None, None], stacks[f"{name}.bias"][:, None, None]

        return _StackedBlock(
            qkv=layer("attn.qkv"), proj=layer("attn.proj"), fc1=layer("mlp.fc1"), fc2=layer("mlp.fc2"),
            norm1=norm("norm1"), norm2=norm("norm2"), ls1=gamma("ls1"), ls2=gamma("ls2"),
            eps1=block.norm1.eps, eps2=block.norm2.eps, heads=block.attn.num_heads, head_dim=block.attn.head_dim,
            act=block.mlp.act,
        )


def _restack_after_assigning_load(model: PMoE, incompatible_keys) -> None:
    """``load_state_dict(..., assign=True)`` makes the state dict's own tensors the experts'
    parameters: stack them anew now rather than at the next forward."""
    model._restack_if_untied()


def _buffer_name(layer: int, name: str) -> str:
    return f"_stacked_{layer}_{name.replace('.', '_')}"


def _plain_block_reason(block: nn.Module) -> str | None:
    """Why the batched path cannot run this block as its own arithmetic (LayerNorm, timm's
    attention, then fc1, the activation, fc2), or None: it stacks the parameters by those names,
    runs one expert's activation for all, and skips the modules' forwards. A block replaced
    since the experts were wrapped gets the adapter's checks too (``block_reason``)."""
    reason = block_reason(block)
    if reason:
        return reason
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if not is_stock(norm, "forward", nn.LayerNorm) or norm.weight is None or norm.bias is None:
            return f"{name} is a {type(norm).__name__}; the batched path needs a LayerNorm with a weight and a bias"
    mlp = block.mlp
    if not is_stock(mlp, "forward", vit.Mlp, "timm.layers"):
        return f"mlp is a {type(mlp).__name__}; the batched path runs fc1, the activation and fc2 (timm's Mlp)"
    if any(True for _ in mlp.act.parameters()):
        return f"the activation {mlp.act} has parameters; the batched path runs one expert's activation for all"
    return None


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _stack_if_equal(tokens: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """One (K, B, T, D) tensor for the fused dispatcher when every expert has T tokens."""
    return torch.stack(tokens) if len({t.shape for t in tokens}) == 1 else tokens


def _layer_norm(x: torch.Tensor, affine: tuple, eps: float, kernel: bool) -> torch.Tensor:
    """LayerNorm with each expert's own affine parameters (K, 1, 1, D): x (K, B, T, D). With
    ``kernel``, one Triton kernel each way (``PMoE._layer_norm_for`` checked that it serves)."""
    weight, bias = affine
    if kernel:
        from pmoe_fast.kernels.layer_norm import layer_norm

        return layer_norm(x, weight[:, 0, 0], bias[:, 0, 0], eps, check=False)
    return torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], eps=eps), weight)


def _layer_scale(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """timm's LayerScale (gamma (K, 1, D) per channel) when the block has one: x (K, R, D)."""
    return x if gamma is None else x * gamma
