"""One forward+backward of the fused dispatcher at the targets' shape, for Nsight Compute: the call
is bracketed by ``torch.cuda.profiler.start()`` and ``stop()``, after warm-up calls that compile
the kernels, so that ncu sees that call's kernels alone.

    ncu --profile-from-start off --set full --kernel-name regex:dispatch \\
        python benchmarks/ncu_dispatch.py --prompts 10

Inputs as ``tune_triton_dispatch.py`` makes them (K=6, B=32, T=197, D=768, H=64; bf16 tokens as a
strided view, fp32 prompts and dispatcher). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tune_triton_dispatch import D, H, K, inputs, run  # noqa: E402

from pmoe_fast import Dispatcher  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10, help="Np (default 10, the model's)")
    parser.add_argument("--backend", default="triton", choices=("triton", "cuda"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ncu_dispatch.py needs a CUDA GPU")
    disp = Dispatcher(D, K, hidden=H, backend=args.backend).cuda()
    tensors = inputs(args.prompts)
    for _ in range(3):
        run(disp, *tensors, backward=True)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    run(disp, *tensors, backward=True)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled one forward+backward: backend {disp.last_backend}, Np={args.prompts}")


if __name__ == "__main__":
    main()
