"""Triton kernels of pmoe_fast, installed as ``pmoe_fast.kernels``.

Importing this package never fails: ``has_triton()`` says whether Triton can be used, and
code that needs it calls ``require_triton()`` for an error that says what is missing.
"""

from __future__ import annotations

import importlib.util


def has_triton() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def require_triton() -> None:
    if not has_triton():
        raise RuntimeError(
            "pmoe_fast's Triton kernels need the 'triton' package: pip install triton "
            "(the version your torch pins)"
        )
