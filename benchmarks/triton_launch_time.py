"""Host time of Triton's own launch path for the dispatcher's kernels, without a GPU.

    python benchmarks/triton_launch_time.py > benchmarks/results/triton_launch_time_cpu.txt

``dispatch_host_time.py`` replaces the kernels by launches that do nothing, so it leaves out what
Triton's ``JITFunction.run`` does before each launch: bind the arguments, specialize each (a
native call per argument), look the compiled kernel up and gather its launch metadata. This
script times that part. It records the launches of one prompt layer of the model's training
configuration (``triton_resources.model_launches``: K=6 ViT-B/16 experts, B=32, fp32 dispatcher,
H=64, on CPU tensors laid out as on the GPU), compiles each for sm_90a, and calls each kernel as
the launchers do, with Triton's active driver replaced by one whose launcher does nothing: the C
launcher's packing of the arguments and CUDA's launch come on top. The stand-in driver uses
Triton's private driver interface, as the pinned Triton (requirements.txt) has it. Median of 5
repeats of 300 launches.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton_resources  # noqa: E402

CASE = "mlp training B=32 Np=10"


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 0, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": triton_resources.H100_SMS}


class NoLaunchDriver:
    """Triton's CUDA driver as ``JITFunction.run`` uses it, for an sm_90 device, launching nothing."""

    utils = _Utils()

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", triton_resources.TARGET_ARCH, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    @property
    def launcher_cls(self):
        return lambda src, metadata: (lambda *args: None)


def per_launch_us(kernel, grid, args, kwargs, calls: int = 300, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            kernel[grid](*args, **kwargs)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    launches = triton_resources.model_launches(CASE)
    driver.set_active(NoLaunchDriver())  # for the rest of this process
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)  # compiles for sm_90a, once
    print(f"triton {triton.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs; {CASE}: "
          "Triton's launch path per launch, the launch itself not run")
    total = 0.0
    for kernel, grid, args, kwargs in launches:
        us = per_launch_us(kernel, grid, args, kwargs)
        total += us
        print(f"{kernel.__name__:30} {len(args) + len(kwargs):3d} arguments  {us:6.1f} us")
    print(f"{'all four (forward + backward)':30} {'':13}  {total:6.1f} us")


if __name__ == "__main__":
    main()
