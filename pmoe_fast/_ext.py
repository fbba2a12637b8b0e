"""Loads ``pmoe_fast._C``, the compiled operator library, without ever failing at import.

``_C`` registers the C++/CUDA operators with the PyTorch dispatcher (``torch.ops.pmoe_fast.*``)
when it loads. On a machine where it was not built, importing pmoe_fast still works: this module
warns once, and each op that needs the library raises through :func:`require_extension` with
the reason and the build command.

``PMOE_FAST_DISABLE_EXTENSION=1`` skips loading even when the library is built, to test (and
use) pmoe_fast as if it were not.
"""

from __future__ import annotations

import os
import warnings

import torch

BUILD_HELP = (
    "build it from the repository root with `pip install -e . --no-build-isolation` "
    "(flags: PMOE_FAST_SKIP_CUDA_BUILD=1 builds the CPU part only, PMOE_FAST_FORCE_CUDA_BUILD=1 "
    "fails instead of skipping the CUDA part, TORCH_CUDA_ARCH_LIST picks the GPU architectures, "
    "and PMOE_FAST_SKIP_CPP_BUILD must be unset)"
)


def _load():
    """Returns (module or None, why it is missing or None)."""
    if os.environ.get("PMOE_FAST_DISABLE_EXTENSION", "0") == "1":
        return None, "disabled by PMOE_FAST_DISABLE_EXTENSION=1"
    try:
        from pmoe_fast import _C
    except ImportError as e:  # also covers a library that is built but fails to link
        return None, f"{type(e).__name__}: {e}"
    return _C, None


_C, _error = _load()
# Read once: a plain bool is free to check inside torch.compile'd code, a call into _C is not.
_CUDA_BUILT = _C is not None and _C.cuda_built()
if _C is None:
    warnings.warn(
        f"pmoe_fast: the compiled extension pmoe_fast._C is not available ({_error}); "
        f"pmoe_fast's native ops (such as pmoe_fast.fusion.prompt_fusion) raise until you {BUILD_HELP}",
        stacklevel=2,
    )


def extension_status() -> dict:
    """``loaded``: pmoe_fast._C is imported; ``cuda``: its CUDA part was compiled in;
    ``error``: why it is not loaded, or None."""
    return {
        "loaded": _C is not None,
        "cuda": _CUDA_BUILT,
        "error": _error,
    }


def require_extension(op_name: str, device: torch.device | None = None) -> None:
    """Raises RuntimeError naming ``op_name`` unless the extension can run it on ``device``."""
    if _C is None:
        raise RuntimeError(
            f"pmoe_fast.{op_name} needs the compiled extension pmoe_fast._C, which is not "
            f"available ({_error}); {BUILD_HELP}"
        )
    if device is not None and torch.device(device).type == "cuda" and not _CUDA_BUILT:
        raise RuntimeError(
            f"pmoe_fast.{op_name} got CUDA tensors, but pmoe_fast._C was built without its CUDA "
            "part (torch without CUDA, nvcc not found, or PMOE_FAST_SKIP_CUDA_BUILD=1); rebuild "
            "with PMOE_FAST_FORCE_CUDA_BUILD=1 pip install -e . --no-build-isolation"
        )


# Autocast kernels of pmoe_fast's ops live here, for every op at once; the Library must stay alive.
_AUTOCAST_LIB = torch.library.Library("pmoe_fast", "IMPL") if _C is not None else None


def run_as_written_under_autocast(op_name: str) -> None:
    """Registers autocast kernels (CPU and CUDA) that run ``torch.ops.pmoe_fast.<op_name>`` with
    autocast off and its inputs as they are.

    pmoe_fast's ops take mixed input dtypes and pick their accumulation dtype themselves. Without
    these kernels autocast stays active inside the op's C++ implementation, so the torch ops it
    calls return bf16/fp16 where its backward expects the accumulation dtype.
    """
    op = getattr(torch.ops.pmoe_fast, op_name).default
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):

        def run(*args, _device_type=device_type):
            with torch.autocast(_device_type, enabled=False):
                return op(*args)

        _AUTOCAST_LIB.impl(op_name, run, key)
