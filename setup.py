"""Build and install pmoe_fast.

    pip install -e . --no-build-isolation

``--no-build-isolation`` is required: the extension is compiled against the torch already
installed, and build isolation would download a second torch into a temporary environment.

One extension module, ``pmoe_fast._C``, is built:

* its CPU part (``csrc/pmoe_ops.cpp``, ``csrc/bindings.cpp``, OpenMP) always;
* its CUDA part (``csrc/cuda/*.cu``) as well when torch is a CUDA build and nvcc is found.

Environment flags (spelled as flash-attention and xformers spell theirs):

``PMOE_FAST_SKIP_CUDA_BUILD=1``
    Build the CPU part only.
``PMOE_FAST_FORCE_CUDA_BUILD=1``
    Build the CUDA part; fail if torch has no CUDA or nvcc is missing instead of skipping it.
``PMOE_FAST_SKIP_CPP_BUILD=1``
    Build no extension at all: a pure-Python install (the Triton kernels and references work;
    the C++ ops raise an error saying how to build them).
``TORCH_CUDA_ARCH_LIST``
    GPU architectures to compile for, e.g. ``"9.0"`` or ``"8.0;9.0"``. When unset and no GPU is
    visible it defaults to ``"9.0"`` (H100), the target this project is tuned for.
``MAX_JOBS``
    Parallel compile jobs, capped to the number of cores (each nvcc job takes gigabytes).
``CUDA_HOME``
    The CUDA toolkit to use; unset, torch's guess, falling back to ``/usr/local/cuda``.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCH_LIST = "9.0"


def flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def read_version() -> str:
    text = (ROOT / "pmoe_fast" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def load_cuda_toolkit_module():
    """pmoe_fast/_cuda_toolkit.py, loaded by its path: pmoe_fast itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("pmoe_fast_cuda_toolkit", ROOT / "pmoe_fast" / "_cuda_toolkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cap_max_jobs() -> None:
    cores = os.cpu_count() or 1
    requested = os.environ.get("MAX_JOBS")
    jobs = min(int(requested), cores) if requested and requested.isdigit() else cores
    os.environ["MAX_JOBS"] = str(max(jobs, 1))


def extension_modules():
    """Returns (ext_modules, cmdclass) for the parts this machine should build."""
    if flag("PMOE_FAST_SKIP_CPP_BUILD"):
        print("pmoe_fast setup: building no extension (PMOE_FAST_SKIP_CPP_BUILD=1)")
        return [], {}
    if flag("PMOE_FAST_SKIP_CUDA_BUILD") and flag("PMOE_FAST_FORCE_CUDA_BUILD"):
        sys.exit("pmoe_fast setup: PMOE_FAST_SKIP_CUDA_BUILD and PMOE_FAST_FORCE_CUDA_BUILD are both set")

    import torch
    from torch.utils import cpp_extension

    toolkit = load_cuda_toolkit_module()
    cuda_home = toolkit.find_cuda_home(cpp_extension.CUDA_HOME) if torch.version.cuda else None
    if flag("PMOE_FAST_SKIP_CUDA_BUILD"):
        build_cuda, reason = False, "PMOE_FAST_SKIP_CUDA_BUILD=1"
    elif not torch.version.cuda:
        build_cuda, reason = False, f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        build_cuda, reason = False, "no CUDA toolkit with nvcc found (set CUDA_HOME to one)"
    else:
        build_cuda = True
        reason = f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc in {cuda_home}"
    if flag("PMOE_FAST_FORCE_CUDA_BUILD") and not build_cuda:
        sys.exit(f"pmoe_fast setup: PMOE_FAST_FORCE_CUDA_BUILD=1 but the CUDA part cannot be built: {reason}")

    cap_max_jobs()
    cpu_sources = ["csrc/pmoe_ops.cpp", "csrc/dispatch_cpu.cpp", "csrc/bindings.cpp"]
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]

    if not build_cuda:
        print(
            f"pmoe_fast setup: building pmoe_fast._C, CPU part only ({reason}; "
            f"MAX_JOBS={os.environ['MAX_JOBS']})"
        )
        ext = cpp_extension.CppExtension(
            "pmoe_fast._C",
            cpu_sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    else:
        # cpp_extension reads CUDA_HOME once, at import; correct it if its guess was not a toolkit.
        cpp_extension.CUDA_HOME = str(cuda_home)
        os.environ["CUDA_HOME"] = str(cuda_home)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "those of the visible GPUs")
        print(
            f"pmoe_fast setup: building pmoe_fast._C, CPU and CUDA parts ({reason}; architectures "
            f"{arch_list}; MAX_JOBS={os.environ['MAX_JOBS']})"
        )
        nvcc_flags = ["-O3", "-DPMOE_FAST_WITH_CUDA"]
        wheel_include = toolkit.nvidia_wheel_include(torch.version.cuda)
        if wheel_include:
            nvcc_flags += ["-isystem", str(wheel_include)]
        ext = cpp_extension.CUDAExtension(
            "pmoe_fast._C",
            cpu_sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx_flags + ["-DPMOE_FAST_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="pmoe_fast",
    version=read_version(),
    description="Fast kernels and models for pMoE, Mixture-of-Experts prompt tuning of frozen ViTs",
    python_requires=">=3.10",
    packages=find_packages(include=["pmoe_fast", "pmoe_fast.*"]) + ["pmoe_fast.kernels"],
    package_dir={"pmoe_fast.kernels": "kernels"},
    install_requires=["torch", "numpy", "safetensors", "matplotlib", "scikit-learn", "tqdm"],
    extras_require={"timm": ["timm"], "dev": ["pytest", "pytest-benchmark", "timm"]},
    entry_points={"console_scripts": ["pmoe-fast = pmoe_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
