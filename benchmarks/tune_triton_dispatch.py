"""The Triton dispatcher's launch settings on a GPU, timed beside the torch and CUDA backends.

    python benchmarks/tune_triton_dispatch.py > benchmarks/results/triton_tuning_h100.txt

At the targets' shape (K=6, B=32, Np 50 and 10, T=197, D=768, H=64; bf16 tokens as a strided view
of the experts' sequences, fp32 prompts and dispatcher, as in the model), for each setting: the
number of warps of the forward and of the main backward kernel; then, at the default warps, the
forward's token chunk, D step or images per finishing program, the backward's token tile or
d-tile, or its batch split (``PMOE_TRITON_BLOCKS``). Every setting is first checked against the torch backend (outputs and
gradients), then timed with ``triton.testing.do_bench`` (median; L2 flushed before each call),
forward alone and forward+backward, with the achieved GB/s for the bytes the op must move
(``bench_dispatch.moved_bytes``); the error column names the output or gradient farthest from
the torch backend's. A setting Triton fails to compile is reported and skipped. Last, at the
default settings, the torch and Triton backends with the prompts and the dispatcher in bf16
(split column "bf16 params"): their products take bf16 operands (one tensor-core product per
tile, where fp32 parameters take two or three tf32 ones), the error column says how far that is
from the fp32 torch backend. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dispatch import moved_bytes  # noqa: E402

from pmoe_fast import Dispatcher  # noqa: E402
from pmoe_fast.kernels import dispatch as triton_dispatch  # noqa: E402

K, B, T, D, H, Q = 6, 32, 197, 768, 64, 1
WARPS = (4, 8)
# Each split runs with the default warps; the warps are swept at the default split (every
# distinct setting is one more compilation of the large kernels, which dominates the run).
# The backward's tile of bf16 rows (BLOCK_T_SPLIT, tokens and prompt outputs) and d-tile set its
# register use: as launched on sm_90a (Triton 3.8) the defaults (64 rows, 64 columns) spill 240
# bytes a thread, 32 rows 140, 32 columns 72; 128 rows or 128 columns spill well over a kilobyte.
# (BLOCK_T is the token tile of fp32 and fp16 tokens only.) At Np = 50, BLOCK_P=16 and
# BLOCK_D_MIX=32 are the forward's prompt tiling before ``_prompt_blocks`` took 32 rows and a
# 128-wide mixture step. BLOCK_ZP=16 is near f_p's tiling before its 64-row tiles across images (one
# program an image, 16 rows a tile). With those tiles f_p no longer needs 8 warps at Np = 50:
# FWD_WARPS=4 with 16-row f_e tiles and a 64-wide mixture step compiles to 168 registers without
# spills (three programs an SM, where the 8-warp default's 170 fit one), and a token chunk's D step
# takes 4 warps x 208 instructions where 8 take 8 x 181 (sm_90a, Triton 3.8), but the mixture of a
# group's 4 x 50 prompts then waits on 4 x 12 steps of loads of P, not 4 x 6; with 32 prompts a
# mixture tile, 2 x 12 steps, it takes 176 registers (two programs an SM), and f_e in pieces of 96
# columns stays shorter than a token chunk. BLOCK_D_E=768 runs f_e as one program an expert, as
# before its pieces. At Np = 10 BLOCK_D_MIX=64 halves the steps of a group's mixture, each waiting
# on its loads of P: as launched 168 registers without spills, the default 32 168 (sm_90a, Triton
# 3.8), but its 14 generic 4-warp variants all spill, up to 60 bytes a thread, where the default's
# spill nothing. The forward's token chunks and f_p tiles are 64 rows a warpgroup (128 at 8 warps,
# ``_forward_blocks``), and with one warpgroup bf16 tokens go as W1 Z^T in chunks of BLOCK_T_FWD_T
# = 128 (``tokens_transposed``). Pinning FWD_WARPS keeps the default's rows, so the 4-warp splits
# pin BLOCK_ZP=64 (their token chunks W1 Z^T); "BLOCK_T_FWD=64,BLOCK_ZP=64" is the 8-warp tiling
# before, the warpgroups splitting each tile's columns; "TOKENS_T=0" at Np = 10 is the token chunks
# before, Z W1^T on 64 tokens, and "TOKENS_T=0,BLOCK_T_FWD=128" Z W1^T on 128.
SPLITS = ("TOKENS_T=0", "TOKENS_T=0,BLOCK_T_FWD=128", "BLOCK_T_FWD_T=64", "BLOCK_T_FWD=32", "BLOCK_T_FWD=128",
          "BLOCK_T_FWD=64,BLOCK_ZP=64", "BLOCK_D_FWD=64", "B_PER_FIN=1",
          "BLOCK_T_SPLIT=32", "BLOCK_DW=32", "BLOCK_T_SPLIT=32,BLOCK_DW=32", "B_PER_PROG=1", "B_PER_PROG=4", "BLOCK_P=16",
          "BLOCK_D_MIX=32", "BLOCK_P=16,BLOCK_D_MIX=32", "BLOCK_ZP=16",
          "FWD_WARPS=4,BLOCK_T_FWD=64,BLOCK_ZP=64,BLOCK_P=16,BLOCK_D_MIX=64",
          "FWD_WARPS=4,BLOCK_T_FWD=64,BLOCK_ZP=64,BLOCK_P=16,BLOCK_N=32,BLOCK_D_MIX=64,BLOCK_D_E=96", "BLOCK_D_E=768",
          "BLOCK_D_MIX=64")
BF16_PARAMS = "bf16 params"


def inputs(Np: int):
    torch.manual_seed(0)
    prompts = torch.randn(K, Np, D, device="cuda", requires_grad=True)
    seq = torch.randn(K, B, Np + T, D, device="cuda", dtype=torch.bfloat16)
    tokens = seq[:, :, Np:].requires_grad_()
    prompt_out = torch.randn(K, B, Np, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return prompts, tokens, prompt_out


def run(disp, prompts, tokens, prompt_out, backward: bool):
    if not backward:
        with torch.no_grad():
            return disp(prompts, tokens, prompt_out, Q)
    ipt, weights = disp(prompts, tokens, prompt_out, Q)
    ipt.backward(torch.ones_like(ipt))
    return ipt, weights


def outputs(disp, args) -> dict[str, torch.Tensor]:
    """The outputs and every gradient, by name, in float32."""
    for t in (*args, *disp.parameters()):
        t.grad = None
    ipt, weights = run(disp, *args, backward=True)
    named = {"ipt": ipt, "weights": weights, "grad prompts": args[0].grad, "grad tokens": args[1].grad,
             "grad prompt_out": args[2].grad}
    named.update((f"grad {name}", p.grad) for name, p in disp.named_parameters())
    return {name: t.float() for name, t in named.items()}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def timed(disp, args, backward: bool) -> float:
    grads = [*args, *disp.parameters()] if backward else None
    return triton.testing.do_bench(lambda: run(disp, *args, backward), warmup=25, rep=200,
                                   grad_to_none=grads, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[10, 50], help="the Np to sweep (default: 10 50)")
    parser.add_argument("--splits", nargs="*", default=list(SPLITS),
                        help="PMOE_TRITON_BLOCKS settings tried at the default warps (default: %(default)s)")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_triton_dispatch.py needs a CUDA GPU")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"K={K} B={B} T={T} D={D} H={H}; bf16 tokens (strided view), fp32 prompts and dispatcher (bf16 in the \"bf16 params\" rows); "
          "do_bench median in us; GB/s for the bytes the op must move")
    print(f"{'Np':>3} {'backend':8} {'fwd warps':>9} {'bwd warps':>9} {'split':22} {'max rel err':>24} "
          f"{'fwd us':>8} {'fwd GB/s':>8} {'f+b us':>8} {'f+b GB/s':>8}")
    default_warps = dict(triton_dispatch._NUM_WARPS)
    for Np in opts.prompts:
        args = inputs(Np)
        reference = Dispatcher(D, K, hidden=H, backend="torch").cuda()
        gold = outputs(reference, args)
        bytes_fwd = moved_bytes(K, B, Np, T, D, H, 2, backward=False)
        bytes_both = moved_bytes(K, B, Np, T, D, H, 2, backward=True)
        settings = [("torch", None, None, ""), ("cuda", None, None, "")]
        settings += [("triton", fw, bw, "") for fw, bw in itertools.product(WARPS, WARPS)]
        triton_dispatch._NUM_WARPS.update(default_warps)  # the last Np's settings may have changed them
        triton_dispatch._BLOCKS.clear()
        fwd_default = triton_dispatch.dispatch_blocks(K, B, Np, D, H, args[1].device)["FWD_WARPS"]
        settings += [("triton", fwd_default, default_warps["bwd"], split) for split in opts.splits]
        settings += [("torch", None, None, BF16_PARAMS), ("triton", fwd_default, default_warps["bwd"], BF16_PARAMS)]
        bf16_args = (args[0].detach().bfloat16().requires_grad_(), *args[1:])
        for backend, fwd_warps, bwd_warps, split in settings:
            triton_dispatch._NUM_WARPS.update(default_warps)
            if backend == "triton":
                triton_dispatch._NUM_WARPS.update(fwd=fwd_warps, fwd_many_prompts=fwd_warps, bwd=bwd_warps)
            triton_dispatch._BLOCKS.clear()  # the forward's warps are among the blocks it caches per shape
            bf16 = split == BF16_PARAMS
            os.environ[triton_dispatch.BLOCK_ENV] = "" if bf16 else split
            disp = Dispatcher(D, K, hidden=H, backend=backend).cuda()
            disp.load_state_dict(reference.state_dict())
            setting_args = bf16_args if bf16 else args
            if bf16:
                disp.bfloat16()
            setting = f"{Np:3d} {backend:8} {fwd_warps or '-':>9} {bwd_warps or '-':>9} {split or 'default':22}"
            try:
                got = outputs(disp, setting_args)
                # Before timing: do_bench's warm-up calls accumulate into these same gradients.
                err, worst = max((relative_error(got[name], want), name) for name, want in gold.items())
                fwd, both = timed(disp, setting_args, False), timed(disp, setting_args, True)
            except Exception as e:  # a setting Triton cannot compile: say so, try the next
                print(f"{setting} failed: {type(e).__name__}: {str(e).strip().splitlines()[-1][:100]}", flush=True)
                continue
            print(f"{setting} {err:8.2e} {worst:>15} "
                  f"{1e3 * fwd:8.1f} {bytes_fwd / fwd / 1e6:8.0f} {1e3 * both:8.1f} {bytes_both / both / 1e6:8.0f}", flush=True)
    os.environ.pop(triton_dispatch.BLOCK_ENV, None)
    triton_dispatch._NUM_WARPS.update(default_warps)


if __name__ == "__main__":
    main()
