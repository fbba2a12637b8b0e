"""Host time of one ``Dispatcher`` call on the Triton path: everything but the kernels.

    python benchmarks/dispatch_host_time.py > benchmarks/results/dispatch_host_time_cpu.txt

At B = 1 the model's inference is launch-bound, and each prompt layer's dispatcher adds its
Python work (checks, backend choice, block sizes, allocations, autograd) to the GPU's wait. This
script measures that work without a GPU: the four Triton kernels are replaced by launches that do
nothing, and the inputs are CPU tensors (the Triton interpreter's flag lets the backend accept
them). Median of 7 repeats of 300 calls, forward (no grad) and forward+backward, at K = 6, Np = 10,
T = 197, D = 768, H = 64 and a small batch (the host's work does not depend on it).
"""

from __future__ import annotations

import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: CPU tensors pass the checks

import torch  # noqa: E402

from pmoe_fast.dispatcher import Dispatcher  # noqa: E402
from pmoe_fast.kernels import dispatch as kd  # noqa: E402

K, B, NP, T, D, H, Q = 6, 2, 10, 197, 768, 64, 1
KERNELS = ("_dispatch_fwd_kernel", "_dispatch_bwd_softmax_kernel", "_dispatch_bwd_kernel", "_dispatch_bwd_reduce_kernel")


class NoLaunch:
    """Takes a grid and arguments as a kernel does, and runs nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls: int = 300, repeats: int = 7) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    for name in KERNELS:
        setattr(kd, name, NoLaunch())
    torch.manual_seed(0)
    disp = Dispatcher(D, K, hidden=H, backend="triton")
    prompts = torch.randn(K, NP, D, requires_grad=True)
    seq = torch.randn(K, B, Q + NP + T, D)
    tokens, prompt_out = seq[:, :, Q + NP :], seq[:, :, Q : Q + NP]

    def forward():
        with torch.no_grad():
            disp(prompts, tokens, prompt_out, Q)

    def forward_backward():
        ipt, _ = disp(prompts, tokens, prompt_out, Q)
        ipt.backward(torch.ones_like(ipt))

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; K={K} B={B} Np={NP} T={T} D={D} H={H}, kernels not launched")
    print(f"forward (no grad): {per_call_us(forward):.0f} us per call")
    print(f"forward+backward:  {per_call_us(forward_backward):.0f} us per call")


if __name__ == "__main__":
    main()
