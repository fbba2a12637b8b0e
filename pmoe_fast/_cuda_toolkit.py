"""Where the CUDA toolkit is, for everything that runs nvcc: setup.py's build,
benchmarks/cuda_resources.py and tests/test_build.py look in the same places.

Standard library only: setup.py loads this file by its path, before pmoe_fast is installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def find_cuda_home(torch_guess: str | None) -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME if set, else torch's guess (``cpp_extension.CUDA_HOME``)
    or /usr/local/cuda; None if none of them has both nvcc and the CUDA headers.

    torch guesses from ``which nvcc``; a wrapper script at /usr/local/bin/nvcc makes that guess
    /usr/local, which has nvcc but no CUDA headers. So a toolkit must have both.
    """
    candidates = [os.environ["CUDA_HOME"]] if os.environ.get("CUDA_HOME") else [torch_guess, "/usr/local/cuda"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file() and (Path(candidate) / "include" / "cuda_runtime.h").is_file():
            return Path(candidate)
    return None


def nvidia_wheel_include(cuda_version: str) -> Path | None:
    """``<site-packages>/nvidia/cu<major>/include`` from torch's CUDA wheels, if installed.

    A minimal toolkit can lack the cuBLAS / cuSPARSE headers that ATen's CUDA headers include;
    torch's nvidia-* wheels ship them there. Pass it with -isystem, not -I: searched after the
    toolkit's own include directory, so the toolkit's headers win where both have one.
    """
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    major = cuda_version.split(".")[0]
    for base in spec.submodule_search_locations:
        include = Path(base) / f"cu{major}" / "include"
        if include.is_dir():
            return include
    return None
