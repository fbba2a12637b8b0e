"""pMoE's dispatcher for one prompt layer, shared by all K experts (SPEC.md, "The dispatcher").

For expert k, with EPTs P (K, Np, D), its prompt outputs of the previous block Z_P,k (B, Np, D;
absent at layer 0) and its other tokens Z_k (B, T_k, D):

    logits_k = f(P_k) + f(Z_P,k) + mean_t f(Z_k[:, t])      # (B, Np, K)
    D_k      = softmax(logits_k, dim=-1)                     # weights over the K experts
    IPT_k[b, n, :] = sum_j D_k[b, n, j] * P[j, n, :]          # integrated prompt tokens

f is a token-wise MLP R^D -> R^K (Linear(D, H) -> GELU -> Linear(H, K), or Linear(D, K) when
H = 0), the same f for the three sources unless ``separate_mlps``; kind "moe" makes f a mixture
of M such MLPs behind a top-k router; kind "none" returns IPT_k = P_k.

This module is where the semantics live: the reference model calls it, and every fast backend
is measured against its "torch" backend, written here for reading.

Backends (kind "mlp"; kind "moe" runs on "torch" and "triton", kind "none" on "torch"):

| backend | where | code |
| --- | --- | --- |
| torch | any device | ``Dispatcher._forward_torch`` below, the ground truth |
| triton | CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``) | ``kernels/dispatch.py``; kind "moe": ``kernels/dispatch_moe.py`` |
| cuda | CUDA tensors | ``csrc/cuda/dispatch.cu`` via ``pmoe_fast.fused_dispatch`` |
| cpp | CPU tensors | ``csrc/dispatch_cpu.cpp`` via ``pmoe_fast.fused_dispatch`` |

The backend is chosen when the module is built: the ``backend`` argument, or ``PMOE_BACKEND``
when the argument is "auto". "auto" takes, on each call, the first backend of ``AUTO_ORDER`` for
the inputs' device that can serve them, quietly; an explicit backend that cannot serve raises with
every reason. ``last_backend`` says which one ran.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pmoe_fast.kernels import TWICE_WITH_TORCH_DISPATCHER, first_order_only

KINDS = ("none", "mlp", "moe")
POOLS = ("all", "patches")
BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
# What "auto" tries, by device. The Triton interpreter is for tests, so "auto" never picks Triton
# for CPU tensors. Triton leads on GPUs: its kernels use tensor cores (tl.dot).
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
SOURCES = ("e", "p", "z")  # EPTs, prompt outputs, other tokens: the names used by separate_mlps


def check_argument_types(
    ints: dict[str, object] | None = None, bools: dict[str, object] | None = None, reals: dict[str, object] | None = None
) -> None:
    """Raises a TypeError naming each argument that is not an int, or not a finite real number (a bool is
    neither here), or not True/False: a string such as "no" would otherwise pass as a true flag,
    or fail somewhere deep."""
    wrong = [f"{name} must be an int, got {value!r}" for name, value in (ints or {}).items()
             if isinstance(value, bool) or not isinstance(value, numbers.Integral)]
    wrong += [f"{name} must be a finite number, got {value!r}" for name, value in (reals or {}).items()
              if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)]
    wrong += [f"{name} must be True or False, got {value!r}" for name, value in (bools or {}).items()
              if not isinstance(value, bool)]
    if wrong:
        raise TypeError("; ".join(wrong))


class StackedMLPs(nn.Module):
    """M token-wise MLPs R^D -> R^K with their weights stacked (the MoE dispatcher's experts).

    Parameters: fc1_weight (M, H, D), fc1_bias (M, H), fc2_weight (M, K, H), fc2_bias (M, K);
    with H = 0 only fc2_weight (M, K, D) and fc2_bias (M, K).
    """

    def __init__(self, num_mlps: int, dim: int, hidden: int, out: int):
        super().__init__()
        self.hidden = hidden
        if hidden:
            self.fc1_weight = nn.Parameter(torch.empty(num_mlps, hidden, dim))
            self.fc1_bias = nn.Parameter(torch.empty(num_mlps, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(num_mlps, out, hidden or dim))
        self.fc2_bias = nn.Parameter(torch.empty(num_mlps, out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default initialisation, one MLP at a time.
        for name, param in self.named_parameters():
            fan_in = (self.fc1_weight if name.startswith("fc1") else self.fc2_weight).shape[-1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(param, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (R, D) -> (R, M, K): every MLP on every row."""
        if self.hidden:
            x = F.gelu(torch.einsum("rd,mhd->rmh", x, self.fc1_weight) + self.fc1_bias)
            return torch.einsum("rmh,mkh->rmk", x, self.fc2_weight) + self.fc2_bias
        return torch.einsum("rd,mkd->rmk", x, self.fc2_weight) + self.fc2_bias


def token_fn_modules(kind: str, dim: int, hidden: int, out: int, num_mlps: int) -> dict[str, nn.Module]:
    """The submodules of one f, named as the state_dict keys of SPEC.md: fc1/fc2 for "mlp",
    router/experts for "moe"."""
    if kind == "mlp":
        if hidden:
            return {"fc1": nn.Linear(dim, hidden), "fc2": nn.Linear(hidden, out)}
        return {"fc2": nn.Linear(dim, out)}
    return {"router": nn.Linear(dim, num_mlps), "experts": StackedMLPs(num_mlps, dim, hidden, out)}


def top_k_gates(gates: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top_k largest gates of each row of gates (R, M) and their indices, (R, top_k) each,
    largest first and ties to the lower index, as the Triton kernel picks them: torch.topk
    leaves the order of ties unspecified (on a CPU, from M = 4 it took a higher index), and tied
    gates are common (a zero-initialised router, saturated softmaxes, 16-bit gates)."""
    chosen = torch.sort(gates, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return gates.gather(-1, chosen), chosen


def mix_chosen(top_gates: torch.Tensor, chosen: torch.Tensor, outs: torch.Tensor) -> torch.Tensor:
    """sum_j top_gates[:, j] * outs[:, chosen[:, j]] -> (R, K), for the chosen MLPs' gates and
    indices (R, top_k) (``top_k_gates``) and every MLP's outputs (R, M, K). A chosen MLP whose gate
    underflowed to 0 adds nothing, not even when its output overflowed (0 x inf would be NaN), and
    gets no gradient, as in the Triton kernel."""
    picked = outs.gather(1, chosen.unsqueeze(-1).expand(-1, -1, outs.shape[-1]))  # (R, top_k, K)
    picked = torch.where(top_gates.unsqueeze(-1) > 0, picked, 0)
    return (top_gates.unsqueeze(-1) * picked).sum(1)


class RoutingStats:
    """Accumulates what the Switch load-balancing loss needs over every row one MoE f routes, in
    float32 (float64 for float64 gates) whatever the gates' dtype: 16-bit counts round from
    2049 (fp16) or 257 (bf16) rows and overflow fp16 from 65505."""

    def __init__(self):
        self.gate_sum = 0.0  # (M,) sum over rows of the router's softmax
        self.routed = 0.0  # (M,) number of (row, top-k slot) assignments to each MLP
        self.rows = 0

    def add(self, gates: torch.Tensor, chosen: torch.Tensor) -> None:
        M = gates.shape[-1]
        acc = torch.float64 if gates.dtype == torch.float64 else torch.float32
        self.gate_sum = self.gate_sum + gates.sum(0, dtype=acc)
        self.routed = self.routed + F.one_hot(chosen, M).sum((0, 1)).to(acc)
        self.rows += gates.shape[0]

    def loss(self, top_k: int) -> torch.Tensor:
        """M * sum_m fraction_routed_m * mean_gate_m; 1 when routing is uniform."""
        M = self.gate_sum.shape[0]
        fraction = self.routed / (self.rows * top_k)
        return M * (fraction * self.gate_sum / self.rows).sum()


class Dispatcher(nn.Module):
    """The dispatcher of one prompt layer.

    Args:
        dim: token width D.
        num_experts: K, the number of frozen experts (the output width of f).
        hidden: H, the hidden width of f; 0 makes f a single Linear(D, K).
        kind: "mlp" (the paper's dispatcher), "moe" (Appendix B: M MLPs behind a router) or
            "none" (IPT_k = P_k, the "EPTs without dispatcher" ablation).
        separate_mlps: three f's, one per source (state_dict keys ``e.*``, ``p.*``, ``z.*``).
        pool: "all" averages f over every non-prompt token; "patches" leaves the prefix tokens out.
        num_dispatch_experts: M, the MLPs of a "moe" dispatcher.
        top_k: how many of the M MLPs each token uses (kind "moe").
        backend: "auto", "torch", "triton", "cuda" or "cpp" (module docstring); with "auto",
            the environment variable ``PMOE_BACKEND`` picks one instead when it is set.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        hidden: int = 64,
        kind: str = "mlp",
        separate_mlps: bool = False,
        pool: str = "all",
        num_dispatch_experts: int = 3,
        top_k: int = 1,
        backend: str = "auto",
    ):
        super().__init__()
        check_argument_types(
            ints=dict(dim=dim, num_experts=num_experts, hidden=hidden, num_dispatch_experts=num_dispatch_experts, top_k=top_k),
            bools=dict(separate_mlps=separate_mlps),
        )
        if kind not in KINDS:
            raise ValueError(f"unknown dispatcher kind {kind!r}; choose one of {KINDS}")
        if pool not in POOLS:
            raise ValueError(f"unknown dispatch pool {pool!r}; choose one of {POOLS}")
        if dim < 1 or num_experts < 1:
            raise ValueError(f"dim and num_experts must be >= 1, got dim={dim}, num_experts={num_experts}")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0 (0: a single Linear(D, K)), got {hidden}")
        if kind == "moe" and num_dispatch_experts < 1:
            raise ValueError(f"num_dispatch_experts (M, the MoE's MLPs) must be >= 1, got {num_dispatch_experts}")
        if kind == "moe" and not 1 <= top_k <= num_dispatch_experts:
            raise ValueError(
                f"top_k must be in [1, num_dispatch_experts={num_dispatch_experts}], got {top_k}"
            )
        self.dim, self.num_experts, self.hidden = dim, num_experts, hidden
        self.kind, self.separate_mlps, self.pool = kind, separate_mlps, pool
        self.num_dispatch_experts, self.top_k = num_dispatch_experts, top_k
        self.set_backend(backend)
        self.last_backend: str | None = None  # the backend that ran the last forward
        # The backend chosen per input signature (devices, dtypes, shapes, strides): asking every
        # backend why it cannot serve costs more host time than a kernel launch.
        self._chosen: dict[tuple, str] = {}
        self.aux_loss: torch.Tensor | None = None  # MoE load-balancing loss of the last forward
        if kind == "none":
            return
        if separate_mlps:
            for source in SOURCES:
                fn = token_fn_modules(kind, dim, hidden, num_experts, num_dispatch_experts)
                setattr(self, source, nn.ModuleDict(fn))
        else:
            for name, module in token_fn_modules(kind, dim, hidden, num_experts, num_dispatch_experts).items():
                setattr(self, name, module)

    def set_backend(self, backend: str) -> None:
        """Choose the backend: one of BACKENDS; "auto" defers to PMOE_BACKEND when it is set."""
        self.requested_backend = backend
        if backend == "auto":
            backend = os.environ.get("PMOE_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"unknown dispatcher backend {backend!r}; choose one of {BACKENDS} (argument or PMOE_BACKEND)")
        self.backend = backend
        self._chosen = {}

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, hidden={self.hidden}, kind={self.kind!r}, "
            f"separate_mlps={self.separate_mlps}, pool={self.pool!r}, backend={self.backend!r}"
            + (f", num_dispatch_experts={self.num_dispatch_experts}, top_k={self.top_k}" if self.kind == "moe" else "")
        )

    def forward(
        self,
        prompts: torch.Tensor,
        tokens: torch.Tensor | Sequence[torch.Tensor],
        prompt_out: torch.Tensor | None = None,
        num_prefix_tokens: int | Sequence[int] = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Integrated prompt tokens and dispatch weights for all K experts.

        Args:
            prompts: P (K, Np, D), the EPTs of this layer.
            tokens: Z, the non-prompt tokens of each expert: (K, B, T, D), or a list of K tensors
                (B, T_k, D) when experts have different token counts.
            prompt_out: Z_P (K, B, Np, D), each expert's prompt outputs of the previous block, or
                None (layer 0).
            num_prefix_tokens: Q_k, the prefix tokens at the start of each expert's tokens (one
                int for all, or K ints); ``pool="patches"`` leaves them out of the mean.
        Returns:
            ipt (K, B, Np, D) in prompts' dtype, and weights (K, B, Np, K) in float32 (or float64
            for float64 prompts), each row summing to 1. Train through ipt (and ``aux_loss``):
            the fused backends return weights without a gradient, for inspection only.
        """
        B, prefix = self._check(prompts, tokens, prompt_out, num_prefix_tokens)
        K, Np, D = prompts.shape
        self.aux_loss = None
        if self.kind == "none":
            self.last_backend = "torch"
            eye = torch.eye(K, device=prompts.device, dtype=_acc_dtype(prompts))
            return prompts.unsqueeze(1).expand(K, B, Np, D), eye[:, None, None, :].expand(K, B, Np, K)
        sources = self.source_params()
        self.last_backend = self._choose_backend(prompts, tokens, prompt_out, [t for s in sources for t in s])
        if self.last_backend == "torch":
            token_list = list(tokens.unbind(0)) if isinstance(tokens, torch.Tensor) else list(tokens)
            return self._forward_torch(prompts, token_list, prompt_out, prefix)
        start = prefix if self.pool == "patches" else [0] * K
        end = [tokens.shape[2]] * K
        if self.kind == "moe":
            ipt, weights, self.aux_loss = _fused_op(self.last_backend, "moe")(
                prompts, tokens, start, end, prompt_out, *sources, self.top_k
            )
            return ipt, weights
        return _fused_op(self.last_backend)(prompts, tokens, start, end, prompt_out, *sources)

    def dispatch_into(
        self,
        prompts: torch.Tensor,
        seq: torch.Tensor,
        has_prompt_out: bool,
        num_prefix_tokens: int | Sequence[int] = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The dispatcher writing the integrated prompt tokens into the experts' prompt slots.

        Args:
            prompts: P (K, Np, D), the EPTs of this layer.
            seq: (K, B, Np + T, D), each expert's sequence prompt-first: rows [0, Np) are its
                prompt slots, which hold Z_P (the prompt outputs of the previous block) when
                ``has_prompt_out``, the rest its tokens Z.
            has_prompt_out: False at the first prompt layer, whose slots are not read.
            num_prefix_tokens: Q_k, as ``forward`` takes it (counted within the tokens Z).
        Returns:
            seq with each expert's IPT (in seq's dtype) in its prompt slots, and weights
            (K, B, Np, K) as ``forward``. The fused backends (kind "mlp": triton, cuda, cpp; kind
            "moe": triton) write the IPTs into ``seq`` itself, differentiably: the gradient of
            the Z_P they overwrite comes from the dispatcher, and nothing else may have saved
            ``seq`` for backward (without gradients to compute, they read Z_P in place and keep
            nothing). The torch backend, kind "none" and every backend under ``torch.compile``
            return a new tensor, as concatenating IPT and Z would; under ``torch.compile`` a fused
            backend's backward reads the tokens from that new tensor, so that ``seq`` is not kept
            for it (``dispatch_into_functional``, ``dispatch_into_moe_functional``). Kind "moe" leaves its
            load-balancing loss in ``aux_loss``, as ``forward`` does. Either way the result equals
            ``torch.cat([ipt.to(seq.dtype), seq[:, :, Np:]], 2)`` with ``ipt`` from
            ``forward(prompts, seq[:, :, Np:], seq[:, :, :Np] or None, num_prefix_tokens)``.
        """
        Np = prompts.shape[1] if isinstance(prompts, torch.Tensor) and prompts.dim() == 3 else 0
        if not isinstance(seq, torch.Tensor) or seq.dim() != 4 or seq.shape[2] <= Np:
            got = tuple(seq.shape) if isinstance(seq, torch.Tensor) else type(seq).__name__
            raise ValueError(f"seq must be (K, B, Np + T, D) with Np = prompts.shape[1] = {Np} slots and T >= 1 tokens, got {got}")
        if seq.is_leaf and seq.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "seq is a leaf tensor that requires grad, and dispatch_into may write into it in place; "
                "pass a tensor computed from it (e.g. seq.clone())"
            )
        tokens, slots = seq.narrow(2, Np, seq.shape[2] - Np), seq.narrow(2, 0, Np)
        prompt_out = slots if has_prompt_out else None
        if self.kind != "none":
            B, prefix = self._check(prompts, tokens, prompt_out, num_prefix_tokens)
            params = [t for source in self.source_params() for t in source]
            backend = self._choose_backend(prompts, tokens, prompt_out, params)
            if backend != "torch":
                # Each nn.Module attribute write costs microseconds; at B = 1 those add up.
                if self.last_backend != backend:
                    self.last_backend = backend
                if self.kind == "mlp" and self.aux_loss is not None:
                    self.aux_loss = None
                start = tuple(prefix if self.pool == "patches" else [0] * len(prefix))
                end = (tokens.shape[2],) * len(prefix)
                grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (seq, prompts, *params))
                if torch.compiler.is_compiling():
                    # Writing in place would break the graph at every layer: a functional op
                    # instead, which saves its own output, or without gradients forward and a
                    # concatenation below.
                    if grad and self.kind == "mlp":
                        return dispatch_into_functional(backend, seq, prompts, start, end, has_prompt_out, params)
                    if grad:
                        seq, weights, self.aux_loss = dispatch_into_moe_functional(
                            seq, prompts, start, end, has_prompt_out, params, self.top_k
                        )
                        return seq, weights
                elif self.kind == "moe":
                    if grad:
                        seq, weights, self.aux_loss = _DispatchIntoMoE.apply(
                            seq, prompts, start, end, has_prompt_out, self.top_k, *params
                        )
                        return seq, weights
                    ipt, weights, self.aux_loss, _, _ = _moe_forward(prompts, tokens, start, end, prompt_out, params, self.top_k)
                    slots.copy_(ipt)  # after the launch that read Z_P from the slots
                    return seq, weights
                else:
                    if grad:
                        return _DispatchInto.apply(backend, seq, prompts, start, end, has_prompt_out, *params)
                    # Nothing to differentiate (inference): Z_P is read where it is and
                    # overwritten by the IPTs; nothing is kept.
                    weights, _ = _fused_forward(backend, prompts, tokens, start, end, prompt_out, params, slots, False)
                    return seq, weights
        ipt, weights = self(prompts, tokens, prompt_out, num_prefix_tokens)
        return torch.cat([ipt.to(seq.dtype), tokens], dim=2), weights

    def _forward_torch(self, prompts, token_list, prompt_out, prefix):
        """The dispatcher in composite PyTorch: the definition every fused backend must match."""
        K, Np, D = prompts.shape
        B = token_list[0].shape[0]
        stats = {} if self.kind == "moe" else None
        logits = self._f("e", prompts.reshape(K * Np, D), stats).view(K, 1, Np, K)
        if prompt_out is not None:
            logits = logits + self._f("p", prompt_out.reshape(K * B * Np, D), stats).view(K, B, Np, K)
        if self.pool == "patches":
            token_list = [z[:, q:] for z, q in zip(token_list, prefix)]
        token_means = [self._f("z", z.reshape(-1, D), stats).view(B, -1, K).mean(1) for z in token_list]
        logits = logits + torch.stack(token_means).unsqueeze(2)  # (K, B, 1, K), broadcast over Np

        acc = _acc_dtype(prompts)
        weights = torch.softmax(logits.to(acc), dim=-1)
        ipt = torch.einsum("kbnj,jnd->kbnd", weights, prompts.to(acc)).to(prompts.dtype)
        self.aux_loss = self._aux_loss(stats) if stats is not None else None
        return ipt, weights

    def source_params(self) -> tuple[tuple, tuple, tuple]:
        """The parameters of f for each source (e, p, z), as the fused ops take them: the same
        tensors three times for a shared f. Kind "mlp": (W1 or None, b1 or None, W2, b2); kind
        "moe": (router weight, router bias, W1 or None, b1 or None, W2, b2), W's stacked over M."""
        def params(owner):
            if self.kind == "moe":
                ex = owner.experts
                fc1 = (ex.fc1_weight, ex.fc1_bias) if self.hidden else (None, None)
                return (owner.router.weight, owner.router.bias, *fc1, ex.fc2_weight, ex.fc2_bias)
            fc1 = getattr(owner, "fc1", None)
            return (fc1.weight if fc1 else None, fc1.bias if fc1 else None, owner.fc2.weight, owner.fc2.bias)

        if self.separate_mlps:
            return tuple(params(getattr(self, source)) for source in SOURCES)
        return (params(self),) * 3

    def not_supported_reasons(self, backend, prompts, tokens, prompt_out=None) -> list[str]:
        """Why ``backend`` cannot run this dispatcher on these inputs, one sentence each."""
        if backend == "torch" or self.kind == "none":
            return []
        if backend not in BACKENDS[1:]:
            return [f"{backend!r} is not a backend; choose one of {BACKENDS[1:]}"]
        reasons = []
        if self.kind == "moe" and backend != "triton":
            reasons.append("the 'moe' dispatcher runs on the triton backend or the torch backend only")
        if not isinstance(tokens, torch.Tensor):
            reasons.append(
                "tokens come as a list of per-expert tensors; the fused kernels take one (K, B, T, D) "
                "tensor (a strided view of the experts' sequences is read in place)"
            )
        if reasons:
            return reasons
        K, T = tokens.shape[0], tokens.shape[2]
        params = self.source_params()
        if backend == "triton" and self.kind == "moe":
            from pmoe_fast.kernels.dispatch_moe import moe_not_supported_reasons

            return moe_not_supported_reasons(prompts, tokens, prompt_out, *params)
        if backend == "triton":
            from pmoe_fast.kernels.dispatch import triton_not_supported_reasons

            return triton_not_supported_reasons(prompts, tokens, prompt_out, *params)
        from pmoe_fast import fused_dispatch

        check = fused_dispatch.cuda_not_supported_reasons if backend == "cuda" else fused_dispatch.cpp_not_supported_reasons
        return check(prompts, tokens, [0] * K, [T] * K, prompt_out, *params)

    def _choose_backend(self, prompts, tokens, prompt_out, params: list) -> str:
        """The backend for these inputs, decided once per input signature: everything the
        backends' reasons look at (each tensor's device, dtype, shape and strides, those of the
        parameters ``params``, ``source_params()`` flattened, included)."""
        # A shared MLP gives the same tensors three times: each once. (Absent ones, W1 and b1
        # without a hidden layer, are left out: Dynamo before torch 2.14 cannot trace id(None).)
        tensors = [prompts, prompt_out, *(tokens if isinstance(tokens, (list, tuple)) else [tokens])]
        tensors += {id(t): t for t in params if t is not None}.values()
        key = tuple(None if t is None else (t.device, t.dtype, t.shape, t.stride()) for t in tensors)
        if key not in self._chosen:
            _check_one_device(prompts, tokens, prompt_out, params)
            if len(self._chosen) >= 64:  # shapes that keep changing: forget the old ones
                self._chosen.clear()
            self._chosen[key] = self._decide_backend(prompts, tokens, prompt_out)
        return self._chosen[key]

    def _decide_backend(self, prompts, tokens, prompt_out) -> str:
        if self.backend == "auto":
            order = AUTO_ORDER.get(prompts.device.type, ("torch",))
            return next(b for b in order if not self.not_supported_reasons(b, prompts, tokens, prompt_out))
        reasons = self.not_supported_reasons(self.backend, prompts, tokens, prompt_out)
        if reasons:
            chosen = "" if self.requested_backend != "auto" else f" (PMOE_BACKEND={self.backend})"
            fix = "unset PMOE_BACKEND" if chosen else "use backend='auto'"
            raise RuntimeError(
                f"dispatcher backend {self.backend!r}{chosen} cannot serve these inputs: "
                + "; ".join(r.rstrip(".") for r in reasons)
                + f". {fix[0].upper()}{fix[1:]} to fall back to one that can."
            )
        return self.backend

    def _f(self, source: str, x: torch.Tensor, stats: dict[str, RoutingStats] | None) -> torch.Tensor:
        """f of one source on rows x (R, D) -> logits (R, K)."""
        owner = getattr(self, source) if self.separate_mlps else self
        param = next(owner.parameters())
        x = x.to(param.dtype)
        if self.kind == "mlp":
            if self.hidden:
                x = F.gelu(owner.fc1(x))
            return owner.fc2(x)
        gates = torch.softmax(owner.router(x), dim=-1)  # (R, M)
        top_gates, chosen = top_k_gates(gates, self.top_k)  # (R, top_k), no renormalisation
        outs = owner.experts(x)  # (R, M, K)
        stats.setdefault(source if self.separate_mlps else "shared", RoutingStats()).add(gates, chosen)
        return mix_chosen(top_gates, chosen, outs)

    def _aux_loss(self, stats: dict[str, RoutingStats]) -> torch.Tensor:
        """The layer's load-balancing loss: one per f over every row it routed, averaged over f's."""
        return torch.stack([s.loss(self.top_k) for s in stats.values()]).mean()

    def _check(self, prompts, tokens, prompt_out, num_prefix_tokens):
        K, D = self.num_experts, self.dim
        if not isinstance(prompts, torch.Tensor) or prompts.dim() != 3 or prompts.shape[0] != K or prompts.shape[2] != D:
            got = tuple(prompts.shape) if isinstance(prompts, torch.Tensor) else type(prompts).__name__
            raise ValueError(f"prompts must be (K={K}, Np, D={D}), got {got}")
        Np = prompts.shape[1]
        if Np == 0:
            raise ValueError(f"prompts must hold at least one prompt token (Np >= 1), got shape {tuple(prompts.shape)}")
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() != 4 or tokens.shape[0] != K or tokens.shape[3] != D:
                raise ValueError(f"tokens must be (K={K}, B, T, D={D}) or a list of K (B, T_k, D), got {tuple(tokens.shape)}")
            B, token_counts = tokens.shape[1], [tokens.shape[2]] * K
        else:
            token_list = list(tokens)
            if len(token_list) != K:
                raise ValueError(f"tokens must hold one tensor per expert (K={K}), got {len(token_list)}")
            B = token_list[0].shape[0]
            for k, z in enumerate(token_list):
                if z.dim() != 3 or z.shape[0] != B or z.shape[2] != D:
                    raise ValueError(f"tokens[{k}] must be (B={B}, T_k, D={D}), got {tuple(z.shape)}")
            token_counts = [z.shape[1] for z in token_list]
        if B == 0:
            raise ValueError("tokens must hold at least one image (B >= 1), got B = 0")
        named = [("prompts", prompts), ("prompt_out", prompt_out)]
        named += [("tokens", tokens)] if isinstance(tokens, torch.Tensor) else [(f"tokens[{k}]", z) for k, z in enumerate(tokens)]
        for name, t in named:
            if isinstance(t, torch.Tensor) and not t.is_floating_point():
                raise ValueError(f"{name} must be floating point, got {t.dtype}: convert it with .float()")
        if prompt_out is not None and (not isinstance(prompt_out, torch.Tensor) or tuple(prompt_out.shape) != (K, B, Np, D)):
            got = tuple(prompt_out.shape) if isinstance(prompt_out, torch.Tensor) else type(prompt_out).__name__
            raise ValueError(f"prompt_out must be None or a tensor (K={K}, B={B}, Np={Np}, D={D}), got {got}")
        prefix = [num_prefix_tokens] * K if isinstance(num_prefix_tokens, numbers.Integral) else list(num_prefix_tokens)
        if len(prefix) != K:
            raise ValueError(f"num_prefix_tokens must be one int or K={K} ints, got {len(prefix)}")
        for k, (count, q) in enumerate(zip(token_counts, prefix)):
            if isinstance(q, bool) or not isinstance(q, numbers.Integral) or q < 0:
                raise ValueError(f"expert {k}: num_prefix_tokens must be an int >= 0, got {q!r}")
            if q >= count:
                raise ValueError(f"expert {k}: num_prefix_tokens={q} leaves no tokens out of T_k={count}")
        return B, prefix


def _check_one_device(prompts, tokens, prompt_out, params) -> None:
    """Raises a ValueError naming where each input and the parameters are when they are not all
    on one device."""
    token_list = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
    where = {"prompts": prompts.device, "tokens": {z.device for z in token_list}}
    if prompt_out is not None:
        where["prompt_out"] = prompt_out.device
    where["the dispatcher's parameters"] = {p.device for p in params if p is not None}
    devices = {d for v in where.values() for d in (v if isinstance(v, set) else {v})}
    if len(devices) > 1:
        listing = ", ".join(
            f"{name} on {', '.join(sorted(map(str, v))) if isinstance(v, set) else v}" for name, v in where.items()
        )
        raise ValueError(f"the dispatcher's inputs and parameters must be on one device, got {listing}")


def _fused_op(backend: str, kind: str = "mlp"):
    """The functional fused op of a backend; imported on first use so that importing pmoe_fast
    never needs Triton or the extension."""
    if backend == "triton" and kind == "moe":
        from pmoe_fast.kernels.dispatch_moe import fused_dispatch_moe

        return fused_dispatch_moe
    if backend == "triton":
        from pmoe_fast.kernels.dispatch import fused_dispatch

        return fused_dispatch
    from pmoe_fast.fused_dispatch import dispatch_mlp

    return dispatch_mlp


class _DispatchInto(torch.autograd.Function):
    """``Dispatcher.dispatch_into`` for the fused kind "mlp" backends: their forward and backward
    (``_fused_forward``, ``_fused_backward``) with the IPTs written into the prompt slots of ``seq``
    in place. Against concatenating IPT and Z into a new sequence, every layer saves a copy of the
    whole sequence in the forward, and in the backward the slicing and concatenation's gradients
    (full-size zero-filled tensors, added up). What it keeps: ``seq`` itself (its tokens are
    unchanged) and a copy of the Z_P rows it overwrites, (K, B, Np, D)."""

    @staticmethod
    def forward(ctx, backend, seq, prompts, tok_start, tok_end, has_prompt_out, *params):
        Np = prompts.shape[1]
        prompt_out = seq[:, :, :Np].clone() if has_prompt_out else None
        weights, saved = _fused_forward(
            backend, prompts, seq[:, :, Np:], tok_start, tok_end, prompt_out, params, seq[:, :, :Np], True
        )
        ctx.mark_dirty(seq)
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)
        ctx.backend, ctx.tok_range, ctx.num_saved = backend, (tok_start, tok_end), len(saved)
        ctx.save_for_backward(seq, prompts, prompt_out, weights, *saved, *params)
        return seq, weights

    @staticmethod
    @first_order_only("Dispatcher.dispatch_into", TWICE_WITH_TORCH_DISPATCHER)
    def backward(ctx, grad_seq, _grad_weights):
        if grad_seq is None:
            return (None,) * (6 + 12)
        seq, prompts, prompt_out, weights, *rest = ctx.saved_tensors
        saved, params = rest[: ctx.num_saved], rest[ctx.num_saved :]
        grad_prompts, grad_in, param_grads = _fused_backward(
            ctx.backend, grad_seq, prompts, seq, *ctx.tok_range, prompt_out, params, weights, saved, ctx.needs_input_grad[1]
        )
        needs = ctx.needs_input_grad[6:]
        param_grads = [g if need else None for g, need in zip(param_grads, needs)]
        return (None, grad_in, grad_prompts if ctx.needs_input_grad[2] else None, None, None, None, *param_grads)


class _DispatchIntoMoE(torch.autograd.Function):
    """``Dispatcher.dispatch_into`` for kind "moe" (Triton): as ``_DispatchInto``, the IPTs
    written into the prompt slots of ``seq`` in place, plus the layer's load-balancing loss as a
    third output, differentiable. Keeps ``seq``, a copy of the Z_P rows it overwrites and the
    router's gates."""

    @staticmethod
    def forward(ctx, seq, prompts, tok_start, tok_end, has_prompt_out, top_k, *params):
        Np = prompts.shape[1]
        prompt_out = seq[:, :, :Np].clone() if has_prompt_out else None
        ipt, weights, aux, coef, gates = _moe_forward(prompts, seq[:, :, Np:], tok_start, tok_end, prompt_out, params, top_k)
        seq[:, :, :Np].copy_(ipt)
        ctx.mark_dirty(seq)
        ctx.mark_non_differentiable(weights)
        ctx.set_materialize_grads(False)
        ctx.tok_range, ctx.top_k = (tok_start, tok_end), top_k
        ctx.save_for_backward(seq, prompts, prompt_out, weights, coef, *gates, *params)
        return seq, weights, aux

    @staticmethod
    @first_order_only("Dispatcher.dispatch_into", TWICE_WITH_TORCH_DISPATCHER)
    def backward(ctx, grad_seq, _grad_weights, grad_aux):
        if grad_seq is None and grad_aux is None:
            return (None,) * (6 + 18)
        from pmoe_fast.kernels.dispatch_moe import dispatch_moe_bwd

        seq, prompts, prompt_out, weights, coef, gates_e, gates_p, gates_z, *params = ctx.saved_tensors
        Np = prompts.shape[1]
        need_seq = ctx.needs_input_grad[0]
        if grad_seq is None:  # a loss on the load-balancing loss alone
            grad_seq = torch.zeros(seq.shape, dtype=seq.dtype, device=seq.device)
        grad_seq = grad_seq if grad_seq.stride(-1) == 1 else grad_seq.contiguous()
        grad_prompts, grad_tokens, grad_prompt_out, *grads = dispatch_moe_bwd(
            grad_seq[:, :, :Np].to(prompts.dtype), grad_aux, prompts, seq[:, :, Np:], *ctx.tok_range, prompt_out,
            weights, coef, (gates_e, gates_p, gates_z), tuple(params[0:6]), tuple(params[6:12]), tuple(params[12:18]),
            ctx.top_k, need_grad_tokens=need_seq,
        )
        grad_in = _sequence_grad(grad_seq, Np, grad_prompt_out, grad_tokens) if need_seq else None
        flat = [g for source in grads for g in (source or (None,) * 6)]
        flat = [g if need else None for g, need in zip(flat, ctx.needs_input_grad[6:])]
        return (grad_in, grad_prompts if ctx.needs_input_grad[1] else None, None, None, None, None, *flat)


def _moe_forward(prompts, tokens, tok_start, tok_end, prompt_out, params, top_k):
    """Kind "moe"'s Triton forward, without autograd: (ipt, weights, aux_loss, and what its
    backward takes: coef, gates). ``params``: the 18 tensors of sources e, p, z."""
    from pmoe_fast.kernels.dispatch_moe import dispatch_moe_fwd

    # Dispatcher has checked the inputs (_check, and the backend's reasons): no second time.
    return dispatch_moe_fwd(
        prompts, tokens, tok_start, tok_end, prompt_out, params[0:6], params[6:12], params[12:18], top_k, check=False
    )


def _sequence_grad(grad_seq, Np: int, grad_prompt_out, grad_tokens, added: bool = False) -> torch.Tensor:
    """The gradient of a sequence whose prompt slots a dispatcher overwrote with its IPTs, as it
    was before: dZ_P in the slots (zero without prompt_out), and in the token rows the gradient
    ``grad_seq`` brought plus the dispatcher's dZ (``added``: ``grad_tokens`` is that sum already)."""
    grad_in = torch.empty(grad_seq.shape, dtype=grad_seq.dtype, device=grad_seq.device)
    if grad_prompt_out is None:
        grad_in[:, :, :Np].zero_()
    else:
        grad_in[:, :, :Np].copy_(grad_prompt_out)
    if added:
        grad_in[:, :, Np:].copy_(grad_tokens)
    else:
        torch.add(grad_seq[:, :, Np:], grad_tokens, out=grad_in[:, :, Np:])
    return grad_in


def _fused_forward(backend, prompts, tokens, tok_start, tok_end, prompt_out, params, ipt_out, save: bool):
    """A fused kind "mlp" backend's forward, without autograd, writing the IPTs into ``ipt_out``
    (K, B, Np, D), which may be ``prompt_out`` itself (Triton writes them there in its launch).
    Returns (weights, the tensors its backward takes besides the inputs); Triton keeps those only
    with ``save``. ``params``: the 12 tensors (W1, b1, W2, b2) of sources e, p, z."""
    if backend == "triton":
        from pmoe_fast.kernels.dispatch import dispatch_fwd

        # Dispatcher has checked the inputs (_check, and the backend's reasons): no second time.
        _, weights, hidden = dispatch_fwd(
            prompts, tokens, tok_start, tok_end, prompt_out, params[0:4], params[4:8], params[8:12], ipt_out, save, check=False
        )
        return weights, hidden
    w1, b1, w2, b2 = (list(params[i::4]) for i in range(4))
    ipt, weights, z_act, z_mean = torch.ops.pmoe_fast.dispatch_mlp(
        prompts, tokens, list(tok_start), list(tok_end), prompt_out, w1, b1, w2, b2
    )
    ipt_out.copy_(ipt)
    return weights, (z_act, z_mean)


def _fused_backward(backend, grad_seq, prompts, seq, tok_start, tok_end, prompt_out, params, weights, saved, need_seq):
    """``_DispatchInto``'s backward through a fused backend: (dprompts; the gradient of the
    sequence as it was before the IPTs were written into it, None unless ``need_seq``: dZ_P in the
    slots, zero without prompt_out, and in the other rows the tokens' gradient ``grad_seq``
    brought plus dZ; the 12 parameters' gradients, None for a source that did not run or whose
    gradient an earlier source sharing its tensors holds)."""
    Np = prompts.shape[1]
    grad_seq = grad_seq if grad_seq.stride(-1) == 1 else grad_seq.contiguous()  # e.g. a .sum()'s expand
    # The IPTs' gradient in the dtype the forward returned them in (prompts'): the signatures the
    # kernels are built and tested for.
    grad_ipt = grad_seq[:, :, :Np].to(prompts.dtype)
    tokens, has_prompt_out = seq[:, :, Np:], prompt_out is not None
    if backend == "triton":
        from pmoe_fast.kernels.dispatch import dispatch_bwd

        grad_in = torch.empty(grad_seq.shape, dtype=grad_seq.dtype, device=grad_seq.device) if need_seq else None
        if need_seq and not has_prompt_out:
            grad_in[:, :, :Np].zero_()
        # The kernel writes dZ_P and dZ + grad_seq's token rows straight into grad_in.
        grad_prompts, _, _, *grads = dispatch_bwd(
            grad_ipt, prompts, tokens, tok_start, tok_end, prompt_out, weights, tuple(saved),
            params[0:4], params[4:8], params[8:12], need_grad_tokens=need_seq,
            grad_tokens=grad_in[:, :, Np:] if need_seq else None, grad_tokens_add=grad_seq[:, :, Np:],
            grad_prompt_out=grad_in[:, :, :Np] if need_seq else None,
        )
        return grad_prompts, grad_in, [g for source in grads for g in (source or (None,) * 4)]
    w1, b1, w2, b2 = (list(params[i::4]) for i in range(4))
    grad_prompts, grad_tokens, grad_prompt_out, gw1, gb1, gw2, gb2 = torch.ops.pmoe_fast.dispatch_mlp_backward(
        grad_ipt, prompts, tokens, list(tok_start), list(tok_end), prompt_out, w1, b1, w2, b2,
        weights, *saved, [True, need_seq, has_prompt_out and need_seq],
    )
    grad_in = _sequence_grad(grad_seq, Np, grad_prompt_out if has_prompt_out else None, grad_tokens) if need_seq else None
    hidden = w1[0] is not None
    grads = []
    for s in range(3):
        ran = s != 1 or has_prompt_out  # f_p sees no rows without prompt_out
        grads += (gw1[s] if hidden else None, gb1[s] if hidden else None, gw2[s], gb2[s]) if ran else (None,) * 4
    return grad_prompts, grad_in, grads


def _dispatch_into_mlp(
    backend: str,
    seq: torch.Tensor,
    prompts: torch.Tensor,
    tok_start: list[int],
    tok_end: list[int],
    has_prompt_out: bool,
    w1: list[torch.Tensor | None],
    b1: list[torch.Tensor | None],
    w2: list[torch.Tensor],
    b2: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``dispatch_into`` as a functional operator, for ``torch.compile``: (the new sequence, a copy
    of ``seq`` with the IPTs in its prompt slots; weights; a copy of Z_P (K, B, Np, D), or (0,)
    without prompt_out; what the backend's backward takes, each (0,) where it keeps nothing).
    w1, b1, w2, b2: one entry per source e, p, z."""
    Np = prompts.shape[1]
    out = seq.clone()
    prompt_out = seq[:, :, :Np].clone() if has_prompt_out else seq.new_empty((0,))
    params = [t for source in zip(w1, b1, w2, b2) for t in source]
    weights, saved = _fused_forward(
        backend, prompts, out[:, :, Np:], tok_start, tok_end, prompt_out if has_prompt_out else None, params,
        out[:, :, :Np], True,
    )
    return out, weights, prompt_out, [weights.new_empty((0,)) if t is None else t for t in saved]


_dispatch_into_op = torch.library.custom_op("pmoe_fast::dispatch_into_mlp", _dispatch_into_mlp, mutates_args=())


@_dispatch_into_op.register_fake
def _(backend, seq, prompts, tok_start, tok_end, has_prompt_out, w1, b1, w2, b2):
    Np = prompts.shape[1]
    prompt_out = seq[:, :, :Np] if has_prompt_out else None
    # The backend's own forward operator, faked: its weights and saved tensors.
    _, weights, *saved = _functional_forward_op(backend)(
        prompts, seq[:, :, Np:], tok_start, tok_end, prompt_out, w1, b1, w2, b2
    )
    return seq.clone(), weights, seq.new_empty((0,)) if prompt_out is None else prompt_out.clone(), saved


def _functional_forward_op(backend: str):
    """The forward operator of a fused kind "mlp" backend, saving what its backward takes."""
    if backend == "triton":
        from pmoe_fast.kernels.dispatch import triton_dispatch_mlp

        return functools.partial(triton_dispatch_mlp, save_hidden=True)
    return torch.ops.pmoe_fast.dispatch_mlp


def _dispatch_into_setup_context(ctx, inputs, output) -> None:
    backend, _, prompts, tok_start, tok_end, has_prompt_out, w1, b1, w2, b2 = inputs
    out, weights, prompt_out, saved = output
    ctx.mark_non_differentiable(weights, prompt_out, *saved)
    ctx.set_materialize_grads(False)
    ctx.backend, ctx.tok_range, ctx.has_prompt_out = backend, (list(tok_start), list(tok_end)), has_prompt_out
    ctx.num_saved = len(saved)
    ctx.shared = all(a is b for params in (w1, b1, w2, b2) for a, b in zip(params, params[1:]))
    # The new sequence, not ``seq``: its token rows are the same, and the next block keeps it anyway.
    ctx.save_for_backward(out, prompts, prompt_out if has_prompt_out else None, weights, *saved, *w1, *b1, *w2, *b2)


@first_order_only("Dispatcher.dispatch_into", TWICE_WITH_TORCH_DISPATCHER)
def _dispatch_into_backward(ctx, grad_out, _grad_weights, _grad_prompt_out, _grad_saved):
    needs = ctx.needs_input_grad
    nothing = [None] * 3  # one per source
    if grad_out is None:
        return (None,) * 6 + tuple(nothing if isinstance(n, list) else None for n in needs[6:])
    out, prompts, prompt_out, weights, *rest = ctx.saved_tensors
    saved, params = rest[: ctx.num_saved], rest[ctx.num_saved :]
    w1, b1, w2, b2 = (list(params[i : i + 3]) for i in range(0, 12, 3))
    Np, has_p, need_seq = prompts.shape[1], ctx.has_prompt_out, bool(needs[1])
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_ipt, tokens = grad_out[:, :, :Np].to(prompts.dtype), out[:, :, Np:]
    if ctx.backend == "triton":
        from pmoe_fast.kernels.dispatch import list_param_grads, triton_dispatch_mlp_backward, unpack_param_grads

        # The kernel adds grad_out's token rows to dZ before rounding it, as the eager path does.
        grad_prompts, grad_tokens, grad_prompt_out, packed = triton_dispatch_mlp_backward(
            grad_ipt, prompts, tokens, *ctx.tok_range, prompt_out, w1, b1, w2, b2, weights, saved, need_seq, ctx.shared,
            grad_out[:, :, Np:] if need_seq else None,
        )
        K, _, D = prompts.shape
        unpack = functools.partial(unpack_param_grads, K=K, D=D, H=0 if w1[0] is None else w1[0].shape[0])
        param_grads = list_param_grads(packed, ctx.shared, has_p, unpack, needs[6:])
    else:
        from pmoe_fast.fused_dispatch import _source_grads

        mask = [bool(needs[2]), need_seq, has_p and need_seq]
        grad_prompts, grad_tokens, grad_prompt_out, *grads = torch.ops.pmoe_fast.dispatch_mlp_backward(
            grad_ipt, prompts, tokens, *ctx.tok_range, prompt_out, w1, b1, w2, b2, weights, *saved, mask
        )
        param_grads = [
            _source_grads(g, n, has_p) if isinstance(n, list) else None for g, n in zip(grads, needs[6:])
        ]
    grad_seq = None
    if need_seq:
        grad_seq = _sequence_grad(grad_out, Np, grad_prompt_out if has_p else None, grad_tokens, ctx.backend == "triton")
    return (None, grad_seq, grad_prompts if needs[2] else None, None, None, None, *param_grads)


_dispatch_into_op.register_autograd(_dispatch_into_backward, setup_context=_dispatch_into_setup_context)


def dispatch_into_functional(backend, seq, prompts, tok_start, tok_end, has_prompt_out, params):
    """``Dispatcher.dispatch_into`` for a fused kind "mlp" backend under ``torch.compile``, with
    gradients: returns (the new sequence, weights). Against the dispatcher's forward and a
    concatenation, which would keep the old sequence (the forward's saved tokens are a view of it)
    beside the new one that the next block keeps, its backward reads the tokens from the new
    sequence: one sequence kept per prompt layer, as eagerly. ``params``: the 12 tensors (W1, b1,
    W2, b2) of sources e, p, z."""
    w1, b1, w2, b2 = (list(params[i::4]) for i in range(4))
    out, weights, _, _ = _dispatch_into_op(backend, seq, prompts, list(tok_start), list(tok_end), has_prompt_out, w1, b1, w2, b2)
    return out, weights


def _dispatch_into_moe(
    seq: torch.Tensor,
    prompts: torch.Tensor,
    tok_start: list[int],
    tok_end: list[int],
    has_prompt_out: bool,
    router_w: list[torch.Tensor],
    router_b: list[torch.Tensor],
    w1: list[torch.Tensor | None],
    b1: list[torch.Tensor | None],
    w2: list[torch.Tensor],
    b2: list[torch.Tensor],
    top_k: int,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``dispatch_into`` for kind "moe" (Triton) as a functional operator, for ``torch.compile``:
    (the new sequence, a copy of ``seq`` with the IPTs in its prompt slots; weights; the
    load-balancing loss; a copy of Z_P (K, B, Np, D), or (0,) without prompt_out; coef and a
    list of the three gates, what its backward takes). The six lists hold one entry per source e, p, z."""
    from pmoe_fast.kernels.dispatch_moe import triton_dispatch_moe

    Np = prompts.shape[1]
    out = seq.clone()
    prompt_out = seq[:, :, :Np].clone() if has_prompt_out else seq.new_empty((0,))
    ipt, weights, aux, coef, *gates = triton_dispatch_moe(
        prompts, out[:, :, Np:], tok_start, tok_end, prompt_out if has_prompt_out else None,
        router_w, router_b, w1, b1, w2, b2, top_k, shared,
    )
    out[:, :, :Np].copy_(ipt)
    return out, weights, aux, prompt_out, coef, gates


_dispatch_into_moe_op = torch.library.custom_op("pmoe_fast::dispatch_into_moe", _dispatch_into_moe, mutates_args=())


@_dispatch_into_moe_op.register_fake
def _(seq, prompts, tok_start, tok_end, has_prompt_out, router_w, router_b, w1, b1, w2, b2, top_k, shared):
    from pmoe_fast.kernels.dispatch_moe import triton_dispatch_moe

    Np = prompts.shape[1]
    prompt_out = seq[:, :, :Np] if has_prompt_out else None
    _, weights, aux, coef, *gates = triton_dispatch_moe(
        prompts, seq[:, :, Np:], tok_start, tok_end, prompt_out, router_w, router_b, w1, b1, w2, b2, top_k, shared
    )
    return seq.clone(), weights, aux, seq.new_empty((0,)) if prompt_out is None else prompt_out.clone(), coef, gates


def _dispatch_into_moe_setup_context(ctx, inputs, output) -> None:
    _, prompts, tok_start, tok_end, has_prompt_out, *params, top_k, shared = inputs
    out, weights, _, prompt_out, coef, gates = output
    ctx.mark_non_differentiable(weights, prompt_out, coef, *gates)
    ctx.set_materialize_grads(False)
    ctx.tok_range, ctx.top_k, ctx.shared, ctx.has_prompt_out = (list(tok_start), list(tok_end)), top_k, shared, has_prompt_out
    # The new sequence, not ``seq``, as for kind "mlp" (_dispatch_into_setup_context).
    ctx.save_for_backward(
        out, prompts, prompt_out if has_prompt_out else None, weights, coef, *gates, *(t for group in params for t in group)
    )


@first_order_only("Dispatcher.dispatch_into", TWICE_WITH_TORCH_DISPATCHER)
def _dispatch_into_moe_backward(ctx, grad_out, _grad_weights, grad_aux, _grad_prompt_out, _grad_coef, _grad_gates):
    from pmoe_fast.kernels.dispatch_moe import operator_backward

    needs = ctx.needs_input_grad
    if grad_out is None and grad_aux is None:
        return (None,) * 5 + tuple([None] * 3 if isinstance(n, list) else None for n in needs[5:11]) + (None, None)
    out, prompts, prompt_out, weights, coef, *saved = ctx.saved_tensors
    Np, need_seq = prompts.shape[1], bool(needs[0])
    if grad_out is not None:
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    grad_ipt = None if grad_out is None else grad_out[:, :, :Np].to(prompts.dtype)
    grad_prompts, grad_tokens, grad_prompt_out, param_grads = operator_backward(
        ctx, grad_ipt, grad_aux, prompts, out[:, :, Np:], prompt_out, weights, coef, saved, need_seq, needs[5:11]
    )
    grad_seq = None
    if need_seq:
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out  # a loss on the load-balancing loss alone
        grad_seq = _sequence_grad(grad_out, Np, grad_prompt_out if ctx.has_prompt_out else None, grad_tokens)
    return (grad_seq, grad_prompts if needs[1] else None, None, None, None, *param_grads, None, None)


_dispatch_into_moe_op.register_autograd(_dispatch_into_moe_backward, setup_context=_dispatch_into_moe_setup_context)


def dispatch_into_moe_functional(seq, prompts, tok_start, tok_end, has_prompt_out, params, top_k):
    """``Dispatcher.dispatch_into`` for kind "moe" (Triton) under ``torch.compile``, with
    gradients: returns (the new sequence, weights, the load-balancing loss), differentiable in the
    sequence and the loss. As ``dispatch_into_functional`` for kind "mlp", its backward reads the
    tokens from the new sequence: one sequence kept per prompt layer. ``params``: the 18 tensors
    (router_w, router_b, W1, b1, W2, b2) of sources e, p, z."""
    from pmoe_fast.kernels.dispatch_moe import _is_shared

    params_e, params_p, params_z = params[0:6], params[6:12], params[12:18]
    lists = [list(group) for group in zip(params_e, params_p, params_z)]
    out, weights, aux, *_ = _dispatch_into_moe_op(
        seq, prompts, list(tok_start), list(tok_end), has_prompt_out, *lists, int(top_k), _is_shared(params_e, params_p, params_z)
    )
    return out, weights, aux


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Softmax and fusion accumulate in float32, or float64 when the prompts (``t``) are float64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
