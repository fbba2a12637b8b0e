"""Triton kernels of pmoe_fast, installed as ``pmoe_fast.kernels``.

Importing this package never fails: ``has_triton()`` says whether Triton can be used, and
code that needs it calls ``require_triton()`` for an error that says what is missing.
"""

from __future__ import annotations

import importlib.util
import types


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

