"""Prompt fusion, the last step of pMoE's dispatcher, read top to bottom.

Every (expert k, image b, prompt token n) row mixes the K experts' prompts with its routing
weights::

    out[k, b, n, :] = sum_j weights[k, b, n, j] * prompts[j, n, :]

    weights: (K, B, Np, K)   prompts: (K, Np, D)   out: (K, B, Np, D)

1. ``prompt_fusion_reference``: the definition in plain PyTorch.
2. Fake implementations, so ``torch.compile`` can trace the C++/CUDA ops without running them.
3. Autograd for ``torch.ops.pmoe_fast.prompt_fusion``, through ``prompt_fusion_backward``.
4. ``prompt_fusion``: the functional entry point.

The kernels themselves are ``csrc/pmoe_ops.cpp`` (CPU) and ``csrc/cuda/prompt_fusion.cu``.
They accumulate in float32 (float64 when an input is float64); the output and grad_prompts
take prompts' dtype, grad_weights takes weights' dtype.
"""

from __future__ import annotations

import torch

from pmoe_fast._ext import extension_status, require_extension, run_as_written_under_autocast
from pmoe_fast.kernels import first_order_only

_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# 1. Reference ------------------------------------------------------------------------------


def prompt_fusion_reference(weights: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch prompt fusion, computed in float32 (float64 if an input is float64).

    weights: (K, B, Np, K), prompts: (K, Np, D) -> (K, B, Np, D) in prompts' dtype.
    """
    wide = torch.float64 if torch.float64 in (weights.dtype, prompts.dtype) else torch.float32
    out = torch.einsum("kbnj,jnd->kbnd", weights.to(wide), prompts.to(wide))
    return out.to(prompts.dtype)


# 2. Fake implementations -------------------------------------------------------------------
# The same checks and messages as csrc/prompt_fusion.h, so a traced program fails the way an
# eager one does. torch._check keeps them valid for symbolic (dynamic) shapes.


def _check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    torch._check(
        t.dtype in _SUPPORTED_DTYPES,
        lambda: f"{op}: {name} must be float32, float64, float16 or bfloat16, got {t.dtype}",
    )


def _check_same_device(op: str, name: str, t: torch.Tensor, prompts: torch.Tensor) -> None:
    torch._check(
        t.device == prompts.device,
        lambda: f"{op}: {name} and prompts must be on the same device, got {t.device} and {prompts.device}",
    )


def _check_inputs(op: str, weights: torch.Tensor, prompts: torch.Tensor):
    """Returns (K, B, Np, D) after checking weights (K, B, Np, K) and prompts (K, Np, D)."""
    _check_dtype(op, "weights", weights)
    _check_dtype(op, "prompts", prompts)
    _check_same_device(op, "weights", weights, prompts)
    torch._check(prompts.dim() == 3, lambda: f"{op}: prompts must be (K, Np, D), got {list(prompts.shape)}")
    K, Np, D = prompts.shape
    torch._check(
        weights.dim() == 4
        and weights.shape[0] == K
        and weights.shape[2] == Np
        and weights.shape[3] == K,
        lambda: f"{op}: weights must be (K, B, Np, K) with K = prompts.size(0) = {K} and "
        f"Np = prompts.size(1) = {Np}, got {list(weights.shape)}",
    )
    return K, weights.shape[1], Np, D


def _prompt_fusion_fake(weights: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    K, B, Np, D = _check_inputs("prompt_fusion", weights, prompts)
    return prompts.new_empty((K, B, Np, D))


def _prompt_fusion_backward_fake(
    grad_out: torch.Tensor, weights: torch.Tensor, prompts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "prompt_fusion_backward"
    K, B, Np, D = _check_inputs(op, weights, prompts)
    _check_dtype(op, "grad_out", grad_out)
    _check_same_device(op, "grad_out", grad_out, prompts)
    torch._check(
        grad_out.dim() == 4 and tuple(grad_out.shape) == (K, B, Np, D),
        lambda: f"{op}: grad_out must be (K, B, Np, D) = {[K, B, Np, D]}, got {list(grad_out.shape)}",
    )
    return weights.new_empty((K, B, Np, K)), prompts.new_empty((K, Np, D))


# 3. Autograd -------------------------------------------------------------------------------


def _prompt_fusion_setup_context(ctx, inputs, output) -> None:
    weights, prompts = inputs
    ctx.save_for_backward(weights, prompts)


@first_order_only("pmoe_fast::prompt_fusion", "use torch.einsum('kbnj,jnd->kbnd', weights, prompts)")
def _prompt_fusion_backward(ctx, grad_out: torch.Tensor):
    weights, prompts = ctx.saved_tensors
    # One op computes both gradients: they read the same grad_out, and asking for only one is
    # rare in prompt tuning (the weights come from the trained router, the prompts are trained).
    return torch.ops.pmoe_fast.prompt_fusion_backward(grad_out, weights, prompts)


def _register_python_parts() -> None:
    torch.library.register_fake("pmoe_fast::prompt_fusion", _prompt_fusion_fake)
    torch.library.register_fake("pmoe_fast::prompt_fusion_backward", _prompt_fusion_backward_fake)
    torch.library.register_autograd(
        "pmoe_fast::prompt_fusion", _prompt_fusion_backward, setup_context=_prompt_fusion_setup_context
    )
    run_as_written_under_autocast("prompt_fusion")
    run_as_written_under_autocast("prompt_fusion_backward")


# Without the extension the ops do not exist, and registering against them would fail at
# import; prompt_fusion below then raises a clear error instead.
if extension_status()["loaded"]:
    _register_python_parts()


# 4. Functional entry point -----------------------------------------------------------------


def prompt_fusion(weights: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Mix the K experts' prompts per (expert, image, prompt token) row; differentiable.

    weights: (K, B, Np, K), prompts: (K, Np, D) -> (K, B, Np, D) in prompts' dtype.
    Runs the C++ (CPU) or CUDA kernel of ``torch.ops.pmoe_fast.prompt_fusion``.
    """
    require_extension("prompt_fusion", prompts.device)
    return torch.ops.pmoe_fast.prompt_fusion(weights, prompts)
