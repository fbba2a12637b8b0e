"""The Triton dispatcher's forward at small batches, per tiling, on a GPU.

    python benchmarks/forward_small_batch.py > benchmarks/results/forward_small_batch_h100.txt

One prompt layer's dispatcher forward as inference runs it (no gradient, nothing saved for a
backward): K experts' IPTs from their prompts, prompt outputs and tokens (T=197, D=768, H=64,
Np=10; bf16 tokens as a strided view of the experts' sequences, fp32 prompts and dispatcher, as
in the model). Each setting pins some of the forward's blocks: the token chunk and D step, the
images one program finishes, the mixture's D step and the warps (``PMOE_TRITON_BLOCKS``;
"default" is what ``default_blocks`` picks for the shape) and is timed by
``triton.testing.do_bench_cudagraph``: replays of a CUDA graph of the call, so the time is the
device's, without the host's launch cost (the fast model's B = 1 inference runs under CUDA
graphs). Each setting is first checked against the default's outputs. Needs a CUDA GPU.
"""

from __future__ import annotations

import os

import torch
import triton

from pmoe_fast import Dispatcher
from pmoe_fast.kernels import dispatch as triton_dispatch

T, D, H, NP = 197, 768, 64, 10
SHAPES = ((2, 1), (6, 1), (9, 1), (6, 4), (6, 32))  # (K, B)
# The large-batch tiling; the small-batch MLP tiles with the large batch's finish (groups of 4
# images, the mixture's D step that of the MLP), the small-batch default before a program finished
# each image; then a 256-wide mixture; then other token chunks and D steps; then the small
# batch's default at 4 warps, the count it ran before the default became 8; then f_e in one
# piece (one program over all of D, as before its pieces) and in 8.
SETTINGS = ("default", "BLOCK_T_FWD=64,BLOCK_D_FWD=32,BLOCK_D_MIX=32,B_PER_FIN=4",
            "BLOCK_T_FWD=16,BLOCK_D_FWD=64,BLOCK_D_MIX=64,B_PER_FIN=4", "BLOCK_D_MIX=256,B_PER_FIN=1",
            "BLOCK_T_FWD=16,BLOCK_D_FWD=32", "BLOCK_T_FWD=32,BLOCK_D_FWD=64", "FWD_WARPS=4", "BLOCK_D_E=768",
            "BLOCK_D_E=96")


def layer(K: int, B: int):
    """The dispatcher and its inputs: prompts (K, Np, D) fp32; tokens (K, B, T, D) and prompt_out
    (K, B, Np, D), bf16 views of one sequence per expert."""
    torch.manual_seed(0)
    disp = Dispatcher(D, K, hidden=H, backend="triton").cuda()
    prompts = torch.randn(K, NP, D, device="cuda")
    seq = torch.randn(K, B, NP + T, D, device="cuda", dtype=torch.bfloat16)
    return disp, prompts, seq[:, :, NP:], seq[:, :, :NP]


def timed(setting: str, disp, prompts, tokens, prompt_out) -> tuple[float, torch.Tensor]:
    """(median us of a replayed forward, its IPTs) with the forward's tiles pinned to ``setting``."""
    os.environ[triton_dispatch.BLOCK_ENV] = "" if setting == "default" else setting

    def forward():
        return disp(prompts, tokens, prompt_out, 1)[0]

    with torch.no_grad():
        ipt = forward().float()
        ms = triton.testing.do_bench_cudagraph(forward, return_mode="median")
    return ms * 1e3, ipt


def main() -> None:
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, Triton {triton.__version__}")
    print(f"one dispatcher forward under CUDA graphs, median us (T={T}, D={D}, H={H}, Np={NP}, bf16 tokens, "
          "fp32 dispatcher); 'default' is what default_blocks picks for the shape")
    for K, B in SHAPES:
        args = layer(K, B)
        picked = triton_dispatch.default_blocks(K, B, NP, D, H, torch.device("cuda"))
        want = None
        cells = []
        for setting in SETTINGS:
            us, ipt = timed(setting, *args)
            if want is None:
                want = ipt
            err = ((ipt - want).norm() / want.norm()).item()
            cells.append(f"{setting} {us:7.1f}" + (f" (ipt off by {err:.1e})" if err > 1e-5 else ""))
        default = ",".join(
            f"{key}={picked[key]}" for key in ("BLOCK_T_FWD", "BLOCK_D_FWD", "BLOCK_D_E", "BLOCK_D_MIX", "B_PER_FIN", "FWD_WARPS")
        )
        print(f"K={K} B={B:<2} (default {default}): "
              + " | ".join(cells))
    os.environ.pop(triton_dispatch.BLOCK_ENV, None)


if __name__ == "__main__":
    main()
