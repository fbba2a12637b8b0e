"""Triton kernels of pmoe_fast, installed as ``pmoe_fast.kernels``.

Importing this package never fails: ``has_triton()`` says whether Triton can be used, and
code that needs it calls ``require_triton()`` for an error that says what is missing.
"""

from __future__ import annotations

import functools
import importlib.util
import types

import torch


def has_triton() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def require_triton() -> None:
    if not has_triton():
        raise RuntimeError(
            "pmoe_fast's Triton kernels need the 'triton' package: pip install triton "
            "(the version your torch pins)"
        )


def import_triton() -> tuple:
    """(triton, triton.language, None) for the kernel modules, or, where Triton cannot be imported,
    stand-ins under which ``@triton.jit`` leaves a function plain and annotations with
    ``tl.constexpr`` evaluate, and the import error: the modules stay importable, so that their
    ``not_supported_reasons`` can say why they cannot run."""
    try:
        import triton
        import triton.language as tl
    except ImportError as exc:
        stub = types.SimpleNamespace(jit=lambda fn=None, **options: fn or (lambda f: f))
        return stub, types.SimpleNamespace(constexpr=None), f"{type(exc).__name__}: {exc}"
    return triton, tl, None


# What ``first_order_only`` tells a user of a fused dispatcher to do instead.
TWICE_WITH_TORCH_DISPATCHER = (
    "use the dispatcher's 'torch' backend (Dispatcher(backend='torch'), PMoE(dispatcher_backend='torch'))"
)


def first_order_only(op_name: str, instead: str):
    """Decorates the backward of an op whose gradients come from kernels, not from differentiable
    torch ops (an ``autograd.Function``'s, or one given to ``torch.library.register_autograd``).

    Such a backward has no derivative of its own, so it refuses to run under ``create_graph=True``:
    a second derivative would otherwise leave the op's share out without a word.
    ``torch.autograd.function.once_differentiable`` does not suffice: its error fires only when a
    later backward walks every node, and ``torch.autograd.grad(..., inputs=...)`` skips it.
    ``instead`` says what computes the op differentiably."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"{op_name} computes its gradients in kernels and has no second derivative, but its backward "
                    f"ran with create_graph=True; to differentiate twice, {instead}"
                )
            return backward(ctx, *grads)

        return wrapper

    return decorate
