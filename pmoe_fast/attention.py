"""Attention backends for the frozen experts' blocks, each able to say why it cannot serve.

    out = attention(q, k, v, scale, backend)       # q, k, v: (N, heads, T, head_dim)

| backend | what | serves |
| --- | --- | --- |
| sdpa | ``F.scaled_dot_product_attention``: flash, memory-efficient or cuDNN kernels as PyTorch chooses | any device |
| xformers | ``xformers.ops.memory_efficient_attention`` | CUDA tensors, when xformers and its compiled ops load |
| math | softmax(q k^T * scale) v written out: materialises the T x T scores | any device |

``scale`` replaces head_dim**-0.5; GaPT's learnable temperature makes it a tensor, which is
folded into q so that it receives a gradient (the fused kernels take only a Python float).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "xformers", "math")


@functools.lru_cache(maxsize=None)
def _xformers_error() -> str | None:
    """Why xformers' attention cannot be used on this install, or None."""
    try:
        from xformers.ops import fmha
    except Exception as e:  # noqa: BLE001 - any import failure (missing, or built for another CUDA) is a reason
        return f"xformers cannot be imported ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return "xformers has no CPU attention and no CUDA device is visible"
    try:
        q = torch.zeros(1, 16, 1, 64, device="cuda", dtype=torch.float16)
        fmha.memory_efficient_attention(q, q, q)
    except Exception as e:  # noqa: BLE001 - its compiled ops may not match this CUDA/torch
        return f"xformers' compiled attention does not run here ({type(e).__name__}: {e})"
    return None


def not_supported_reasons(backend: str, q: torch.Tensor) -> list[str]:
    """Why ``backend`` cannot run attention on tensors like ``q``; empty when it can."""
    if backend not in BACKENDS:
        return [f"unknown attention backend {backend!r}; choose one of {BACKENDS}"]
    if backend != "xformers":  # "auto" takes SDPA, which serves any tensors
        return []
    reasons = []
    if q.device.type != "cuda":
        reasons.append(f"xformers attention runs on CUDA tensors, got {q.device.type}")
    error = _xformers_error()
    if error:
        reasons.append(error)
    return reasons


def resolve(backend: str, q: torch.Tensor) -> str:
    """The backend to run: "auto" takes SDPA (PyTorch's fused kernels cover what xformers does);
    an explicit backend that cannot serve raises with every reason."""
    if backend == "auto":
        return "sdpa"
    reasons = not_supported_reasons(backend, q)
    if reasons:
        raise RuntimeError(f"attention backend {backend!r} cannot serve: " + "; ".join(reasons))
    return backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | torch.Tensor, backend: str) -> torch.Tensor:
    """Multi-head attention. q, k, v: (N, heads, T, head_dim) -> (N, heads, T, head_dim)."""
    if isinstance(scale, torch.Tensor):
        q, scale = q * scale.to(q.dtype), 1.0
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "xformers":
        from xformers.ops import memory_efficient_attention

        out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    # Scaled before the product, as SDPA does: a 16-bit q k^T can overflow where the scaled one does not.
    scores = torch.matmul(q if scale == 1.0 else q * scale, k.transpose(-2, -1))
    # Softmax in float32 at least: 16-bit scores in float32, float64 ones in float64.
    probs = scores.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32))
    return torch.matmul(probs.to(q.dtype), v)
