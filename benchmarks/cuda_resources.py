"""Registers, stack, spills and shared memory of csrc/cuda's kernels as ptxas compiles them for a GPU
architecture (sm_90 by default), on any machine with nvcc: no GPU needed.

    python benchmarks/cuda_resources.py [--arch sm_90] [sources ...]

Registers decide how many 256-thread blocks share an SM (65536 registers: 3 blocks up to 85
registers a thread, 2 up to 128); spill stores and loads go through local memory.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

from pmoe_fast._cuda_toolkit import find_cuda_home, nvidia_wheel_include

ROOT = Path(__file__).resolve().parent.parent

KERNEL = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
# ptxas names shared memory only for kernels that use some.
USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def cuda_home() -> Path:
    home = find_cuda_home(cpp_extension.CUDA_HOME)
    if home is None:
        sys.exit("cuda_resources: no CUDA toolkit with nvcc found (set CUDA_HOME to one)")
    return home


def include_flags() -> list[str]:
    """Torch's include directories and, as in setup.py, the headers a minimal toolkit lacks."""
    flags = [f"-I{path}" for path in cpp_extension.include_paths()]
    wheel_include = nvidia_wheel_include(torch.version.cuda) if torch.version.cuda else None
    return flags + (["-isystem", str(wheel_include)] if wheel_include else [])


def short_name(mangled: str) -> str:
    """dispatch_mlp_fwd_kernel<c10::BFloat16, float> from its mangled name."""
    demangled = subprocess.run(["c++filt", mangled], capture_output=True, text=True).stdout.strip() or mangled
    signature = demangled.replace("(anonymous namespace)::", "").replace("c10::", "")
    return signature.split("(")[0].removeprefix("void ").removeprefix("pmoe_fast::")


def resources(source: Path, arch: str) -> list[tuple[str, int, int, int, int, int]]:
    """(kernel, registers, stack bytes, spill stores, spill loads, shared memory bytes) per kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            str(cuda_home() / "bin" / "nvcc"), "-std=c++20", "-O3", f"-arch={arch}", "-cubin",
            "-o", str(Path(tmp) / "out.cubin"), "-DPMOE_FAST_WITH_CUDA", "--expt-relaxed-constexpr",
            "-Xptxas", "-v", *include_flags(), str(source),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"cuda_resources: nvcc failed on {source}:\n{result.stderr[-4000:]}")
    return parse(result.stderr)


def parse(ptxas_output: str) -> list[tuple[str, int, int, int, int, int]]:
    """resources()' rows from what ptxas -v printed."""
    rows, kernel, props = [], None, None
    for line in ptxas_output.splitlines():
        if match := KERNEL.search(line):
            kernel = short_name(match.group(1))
        elif (match := PROPERTIES.search(line)) and kernel:
            props = [int(v) for v in match.groups()]
        elif (match := USAGE.search(line)) and kernel and props:
            rows.append((kernel, int(match.group(1)), *props, int(match.group(2) or 0)))
            kernel, props = None, None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90", help="GPU architecture to compile for (default sm_90)")
    parser.add_argument("sources", nargs="*", type=Path, help="default: csrc/cuda/*.cu")
    args = parser.parse_args()
    sources = args.sources or sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    nvcc = subprocess.run([str(cuda_home() / "bin" / "nvcc"), "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release [\d.]+", nvcc)
    print(
        f"# python benchmarks/cuda_resources.py --arch {args.arch}: torch {torch.__version__}, nvcc "
        f"{release.group(0) if release else '(version unknown)'} in {cuda_home()}"
    )
    print(f"{'kernel':<58} {'registers':>9} {'stack':>6} {'spill st':>8} {'spill ld':>8} {'smem':>7}")
    for source in sources:
        print(f"{source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}:")
        for kernel, registers, stack, stores, loads, smem in sorted(resources(source, args.arch)):
            print(f"  {kernel:<56} {registers:>9} {stack:>6} {stores:>8} {loads:>8} {smem:>7}")


if __name__ == "__main__":
    main()
