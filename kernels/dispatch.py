"""The pMoE dispatcher of one prompt layer (kind "mlp"), fused in Triton for all K experts.

For expert k, batch row b and prompt n (SPEC.md, "The dispatcher"; notation of its table):

    logits[k, b, n] = f_e(P[k, n]) + f_p(Z_P[k, b, n]) + mean_{t in [start_k, end_k)} f_z(Z[k, b, t])
    weights[k, b, n] = softmax(logits[k, b, n])                        # over the K experts
    ipt[k, b, n, :] = sum_j weights[k, b, n, j] * P[j, n, :]

with f_s(x) = W2_s gelu(W1_s x + b1_s) + b2_s (exact GELU), or W2_s x + b2_s when H = 0.

The file reads top to bottom as the whole op: the reference in plain PyTorch, the kernels, the
launchers that pick block sizes and grids, the autograd Function, the operators torch.compile
traces (no graph break) and the functional entry point,
then what the launchers can run (``triton_not_supported_reasons``) and every variant they compile
(``KERNEL_VARIANTS``).

Design. The tokens Z (K, B, T, D) dominate the bytes: at the GPU target (K=6, B=32, T=197,
D=768, bf16) they are 58 MB, against 0.6 MB for P and Np/T of that for Z_P. So:

* Forward, ONE launch, grid (K*S_E + K*S_P + K*B*S_T,), three roles: K*S_E programs evaluate f_e
  on the prompts P[k] (once per expert, not per image), each over D / S_E of the columns (S_E =
  ceil(D / 192)), and the last of an expert's pieces to arrive (an atomic counter per expert)
  sums their partial products in a fixed order, then applies b1, GELU and W2 and stores f_e's
  Np*K logits for every group of the expert (f_e's one program per expert was the longest of
  the launch, 24 D steps of 366 instructions where a token chunk takes 24 of 202, and as the
  last to arrive at each group of its expert it finished them one after another); K*S_P
  programs evaluate f_p (with prompt_out) on tiles of BLOCK_ZP rows of Z_P[k] (B*Np rows, S_P =
  ceil(B*Np / BLOCK_ZP) tiles: BLOCK_T_FWD rows for a large batch, BLOCK_P rows for small
  batches and H > 64, ``_prompt_blocks``); K*B*S_T programs each take a chunk of BLOCK_T tokens
  of one (k, b), 64 a warpgroup, or 128 on one warpgroup as W1 Z^T for bf16 tokens
  (``_forward_blocks``, ``_tokens_hidden_t``), and keep the sum over its tokens of
  gelu(x W1^T + b1) (H floats: the mean over tokens commutes with W2), or of f_z - b2 without a
  hidden layer (K floats). Splitting the tokens gives K*B*S_T programs (384 at the target, two
  chunks an image) where one program per (k, b) gave 192 on an H100's 132 SMs, each walking 197
  tokens.
  When a backward will follow, the programs of P and Z_P store the pre-activations x W1^T + b1
  of their rows in float32, and the token programs the GELU slopes gelu'(x W1^T + b1) (K*B*T*H
  floats, 9.7 MB at the target against 58 MB of tokens; for bf16 tokens and H <= 64 three
  bfloat16 parts of each, ``_store_split``, 14.5 MB), with which the backward needs neither the
  product over all of D nor any transcendental function per token. Then each program counts
  itself done with each group of B_PER_FIN images of expert k it served (an atomic counter per
  group; f_e's last piece counts for every group, f_p's tiles for each group their rows reach), and the
  program that completes a count, whichever it is, finishes that group: it sums the chunks' sums
  in a fixed order (the result does not depend on which program finishes; for a backward it
  stores them, H floats a (k, b)), multiplies them by W2, takes the softmax over K and writes
  weights and ipt, into a new tensor or into the prompt slots of the experts' sequences, where
  Z_P was (``Dispatcher.dispatch_into``). Mixing the EPTs reads all of P (K*Np*D): once per
  group of images, not once per image (177 MB from L2 at K=6, B=32, Np=50, fp32). Reads K*B*T*D
  (tokens) + K*B*Np*D (Z_P) + K*B*K*Np*D / B_PER_FIN (P, L2-resident); writes K*B*Np*(D+K)
  elements, and (K*B*(T+Np+1) + K*Np)*H floats for a backward.
* Backward, THREE launches:
  1. grid (Np, K*B / BLOCK_KB): dlogits = weights * (dweights - <weights, dweights>), with
     dweights[j] = <grad_ipt, P[j]>, for prompt n one product (BLOCK_KB rows (k, b) x D) @
     (D x K) per program. Reads grad_ipt once (K*B*Np*D) and P[:, n] once per BLOCK_KB rows
     (where a program per (k, b) read all of P: 177 MB from L2 at K=6, B=32, Np=50); writes
     K*B*Np*K floats. With bf16 activations and H <= 64 (``splits_bf16``) it also takes f_p's
     backward through W2 and GELU for its rows, dL/dh = (dlogits W2) gelu'(h) in bfloat16 parts
     and gelu(h), K*B*Np*H each, once a row where each of the next launch's d-tile programs took
     them again.
  2. grid (S_D, K*S_B + S_N), S_D = ceil(D / BLOCK_DW): the MLP backward of every row and the
     fusion gradient of P. Program (d-tile, k, group of batch rows) reads the saved
     pre-activations of its rows of Z_P and slopes of its rows of Z (H floats a row; the S_D
     programs of a row group have adjacent ids and share them through L2) and its d-tile of those
     rows, and writes dZ_P and dZ for its d-tile, plus its share of the weight gradients. Every
     token of a (k, b) receives the same dL/d f_z, so dL/d gelu is one row per (k, b), dh is
     that row times the slopes, and W2_z's gradient needs only the forward's sums of gelu: a token
     tile costs W1's two products (dZ and dW1), with W1's d-tile loaded once per program.
     Program (d-tile, group of prompts) does the same for the rows P[:, n] and adds the fusion
     gradient
     sum_{k,b} weights[k, b, n, :] grad_ipt[k, b, n, d-tile], a GEMM over the K*B rows. Reads
     K*B*T*D (tokens) + K*B*Np*D (Z_P) + K*B*Np*D (grad_ipt) + K*B*(T+Np)*H floats; writes as
     many elements (dZ, dZ_P, dP), and R x C floats of partial weight gradients: one row per row
     group, R = K*S_B (f_z) + K*S_B (f_p) + S_N (f_e), C = H*D + H + K*H + K. The number of groups
     trades parallelism against these bytes: at the target (H100, H=64, Np=10) S_D=12, S_B=3,
     R=46 rows of C=49606, 9 MB, against the 116 MB of tokens read and dZ written.
     With bf16 activations and H <= 64 (the model's case) no arithmetic runs on the elements of
     a token or Z_P tile: the tiles go from memory to the bfloat16 tensor cores as they are,
     beside the slopes' parts, or f_p's dL/dh parts, and W1 (``_tokens_bwd_split``,
     ``_prompt_out_bwd_split``). A float32 dh took a split into tf32 heads and rests, and the
     tokens a conversion to float32 and a transposed trip through shared memory, a tile at a
     time: in the sm_90a SASS of the launch at K=6, B=32 (Triton 3.8) a tile of 32 tokens took
     548 instructions and 18 barriers, a tile of 64 takes 589 and 3, and f_p's 16-row tile, 1215
     (GELU and its slope in every d-tile's program), became a 64-row tile over the rows of all the
     program's images, about 450 on its main path.
  3. grid (ceil(C / BLOCK_C), G): sums the partial rows of each parameter group in a fixed order
     (deterministic, where atomics would not be) and writes the gradients in the parameters'
     dtype. Reads R*C floats, writes G*C. G = 1 when the three sources share one MLP: their
     gradients are summed here rather than by autograd.
  Allocations aside (and the copy of the token ranges, with the forward's K*ceil(B/B_PER_FIN) + K
  zeroed counters, from host memory), no other torch op runs (tests check it). The gradient of
  tokens that need none (those of a first prompt layer, from a frozen embedding) is not written.

Numerics. Every reduction accumulates in float32. Matrix products take their operands in the
parameters' dtype, as ``Dispatcher`` does (``x.to(param.dtype)``): fp32 parameters with bf16
tokens multiply to fp32 accuracy on tensor cores (``_dot``): tf32x3, three tf32 products of
heads and rests (plain tf32 would give 1e-3 relative errors; a small batch's forward splits
them itself, ``_dot_fwd``, with fewer instructions), or two where one operand comes
from 16-bit tokens, which tf32 holds exactly. The one exception is the gradient of the tokens
and of Z_P when it is stored in bf16: one tf32 product errs well below bf16's rounding. The backward over bf16
activations splits its float32 operand into three bfloat16 parts instead (``_bf16x3``), whose
exact products with the bf16 tiles sum to float32's accuracy (three of nine products for dZ and
dZ_P, which are stored in bf16), and so do the forward's token chunks of bf16 tokens (W1 cut into
three bfloat16 parts, ``_bf16_cut3``: 2**-21 of W1 left out, where a tf32 head and rest leave
2**-20). Softmax subtracts the row maximum; softmax and fusion run in float32 whatever the input
dtype.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from . import TWICE_WITH_TORCH_DISPATCHER, first_order_only, import_triton

# Without Triton the kernels below are plain Python functions that nothing calls.
triton, tl, _TRITON_IMPORT_ERROR = import_triton()

Params = tuple  # (W1 (H, D) or None, b1 (H,) or None, W2 (K, H) or (K, D), b2 (K,))


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def dispatch_reference(
    prompts: torch.Tensor,
    tokens: torch.Tensor,
    tok_start,
    tok_end,
    prompt_out: torch.Tensor | None,
    params_e: Params,
    params_p: Params,
    params_z: Params,
    *,
    mlp_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The op written out in plain PyTorch; differentiable.

    The MLPs run in ``mlp_dtype``: float32 by default (float64 when the prompts are float64).
    ``mlp_dtype=torch.float16`` computes what ``Dispatcher`` does with fp16 parameters, the
    baseline the tests hold the kernels to. Softmax and fusion run in float32, or float64 for
    float64 prompts. Returns ipt (K, B, Np, D) in the prompts' dtype and weights (K, B, Np, K).
    """
    acc = torch.float64 if prompts.dtype == torch.float64 else torch.float32
    mlp_dtype = mlp_dtype or acc

    def f(x, params):
        w1, b1, w2, b2 = (None if p is None else p.to(mlp_dtype) for p in params)
        x = x.to(mlp_dtype)
        if w1 is not None:
            x = F.gelu(F.linear(x, w1, b1))
        return F.linear(x, w2, b2)

    logits = f(prompts, params_e).unsqueeze(1)  # (K, 1, Np, K)
    if prompt_out is not None:
        logits = logits + f(prompt_out, params_p)  # (K, B, Np, K)
    token_means = torch.stack(
        [f(tokens[k, :, s:e], params_z).mean(1) for k, (s, e) in enumerate(zip(tok_start, tok_end))]
    )  # (K, B, K)
    logits = logits + token_means.unsqueeze(2)
    weights = torch.softmax(logits.to(acc), dim=-1)
    ipt = torch.einsum("kbnj,jnd->kbnd", weights, prompts.to(acc)).to(prompts.dtype)
    return ipt, weights


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _gelu(h):
    # Exact GELU, as torch.nn.functional.gelu's default.
    return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))


@triton.jit
def _gelu_grad(h):
    # d/dh [h Phi(h)] = Phi(h) + h phi(h), Phi and phi the standard normal CDF and density.
    cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
    pdf = tl.exp(-0.5 * h * h) * 0.3989422804014327
    return cdf + h * pdf


@triton.jit
def _tf32_head(x):
    """float32 x cut toward zero to tf32's 11 significant bits: tensor cores take it exactly, and
    x - head, the rest, is exact in float32."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b, accumulated in float32, the products to about float32's accuracy.

    Operands of one 16-bit dtype multiply as they are; two float32 operands take tf32x3 (three
    tf32 products of heads and rests). A 16-bit operand beside a float32 one (bf16 or fp16 tokens
    against float32 parameters) is exact in tf32, so only the float32 one is split: two tf32
    products where tf32x3 takes three."""
    if a.dtype == b.dtype:
        if a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="tf32x3")
        else:
            acc = tl.dot(a, b, acc)
    elif a.dtype == tl.float32:
        b = b.to(tl.float32)
        head = _tf32_head(a)
        acc = tl.dot(head, b, acc, input_precision="tf32")
        acc = tl.dot(a - head, b, acc, input_precision="tf32")
    else:
        a = a.to(tl.float32)
        head = _tf32_head(b)
        acc = tl.dot(a, head, acc, input_precision="tf32")
        acc = tl.dot(a, b - head, acc, input_precision="tf32")
    return acc


@triton.jit
def _bf16x3(x):
    """float32 x as three bfloat16 parts: hi + mid + lo = x within 2**-24 of |x|, float32's own
    rounding (each part is the rest of the one before, which float32 holds exactly, rounded to
    bfloat16's 8 significant bits). A part times a bfloat16 operand is exact, so summing the three
    products multiplies by x to float32's accuracy on bfloat16 tensor cores."""
    hi = x.to(tl.bfloat16)
    rest = x - hi.to(tl.float32)
    mid = rest.to(tl.bfloat16)
    lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _split_dot(a_hi, a_mid, b_hi, b_mid):
    """(a_hi + a_mid) @ (b_hi + b_mid) less a_mid @ b_mid, in float32: the three largest of the
    products of two ``_bf16x3`` splits, about 2**-16 of the product short, for results stored in
    bfloat16."""
    acc = tl.dot(a_hi, b_hi)
    acc = tl.dot(a_mid, b_hi, acc)
    return tl.dot(a_hi, b_mid, acc)


@triton.jit
def _parts_t_dot(hi, mid, lo, x, acc):
    """acc + (hi + mid + lo)^T @ x, the three parts' exact products summed in float32."""
    acc = tl.dot(tl.trans(hi), x, acc)
    acc = tl.dot(tl.trans(mid), x, acc)
    return tl.dot(tl.trans(lo), x, acc)


@triton.jit
def _first_column(BLOCK_R: tl.constexpr):
    """(BLOCK_R, 16) bfloat16, ones in column 0 and zeros elsewhere: ``_parts_t_dot`` with it sums
    the rows into column 0 (tl.dot's narrowest operand is 16 wide)."""
    return tl.where((tl.arange(0, 16) == 0)[None, :], 1.0, 0.0).to(tl.bfloat16) + tl.zeros((BLOCK_R, 16), dtype=tl.bfloat16)


@triton.jit
def _tf32_nearest(x):
    """float32 x rounded to tf32's 11 significant bits, to nearest (ties away from zero): an
    integer add and a mask. NaN and infinity stay what they are; finite values within 2**-12 of
    float32's largest round to infinity."""
    return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot_fwd(a, b, acc, ROUND_FP32: tl.constexpr):
    """``_dot`` for the forward's products; with ROUND_FP32, two float32 operands are split by
    ``_tf32_nearest`` into heads and rests, each exact in tf32, and multiply as three tf32
    products (the rest terms first). That is tf32x3's split, but Triton rounds with cvt.rna.tf32,
    which sm_90a runs as several instructions an element: in the SASS of the B = 1 launch
    (Triton 3.8) f_e's D step over fp32 prompts took 650 instructions with tf32x3 and takes 544
    so (a token chunk's step, beside it, takes 343), at 208 registers where it took 255. The
    errors are tf32x3's: the dropped rest x rest term and the rests' rounding are each below
    2**-22 of the product. (Rests left for the tensor cores to truncate took 484 instructions,
    truncated heads too 359, at up to 8x the error.) The generic small-batch variants, without
    the launch's alignment hints, spilled up to 308 bytes a thread with it at 4 warps, where they
    spilled up to 212 (up to 156 at the 8 warps small batches now take;
    benchmarks/results/triton_sm90_resources.txt). Only small batches take it
    (``default_blocks``): in the large-batch launches the split took 200 registers where tf32x3
    takes 168-184, two programs an SM where three fit, for f_e's few programs among hundreds. The
    backward keeps tf32x3: a truncating split there spilled 200 bytes a thread, not 148, some of it
    inside its prompt-tile loop."""
    if ROUND_FP32 and a.dtype == tl.float32 and b.dtype == tl.float32:
        a_head = _tf32_nearest(a)
        b_head = _tf32_nearest(b)
        acc = tl.dot(a_head, _tf32_nearest(b - b_head), acc, input_precision="tf32")
        acc = tl.dot(_tf32_nearest(a - a_head), b_head, acc, input_precision="tf32")
        return tl.dot(a_head, b_head, acc, input_precision="tf32")
    return _dot(a, b, acc)


@triton.jit
def _row_products(
    x_ptrs,  # (BLOCK_R,) pointers to the first element of each row, each row D contiguous
    row_mask,  # (BLOCK_R,)
    w_ptr,  # (W, D): W1 (H, D), or W2 (K, D) without a hidden layer
    stride_w,
    d_lo,  # the columns [d_lo, d_hi) of x and w
    d_hi,
    W,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_W: tl.constexpr,
    ROUND_FP32: tl.constexpr,
):
    """x[:, d_lo:d_hi] w[:, d_lo:d_hi]^T for one tile of rows: (BLOCK_R, BLOCK_W) float32, zero
    in padded columns."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_w = tl.arange(0, BLOCK_W)
    w_mask = offs_w < W
    acc = tl.zeros((BLOCK_R, BLOCK_W), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < d_hi
        x = tl.load(x_ptrs[:, None] + d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        wt = tl.load(
            w_ptr + offs_w[None, :] * stride_w + d[:, None],
            mask=w_mask[None, :] & d_mask[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_W), w transposed
        # x in the tokens' dtype against w in the parameters': as Dispatcher's x.to(param.dtype)
        # @ w, since a 16-bit x meets float32 parameters only, which hold it exactly.
        acc = _dot_fwd(x, wt, acc, ROUND_FP32)
    return acc


@triton.jit
def _bf16_cut3(x):
    """float32 x as three bfloat16 parts, each x's rest after the parts before it cut toward zero
    to bfloat16's 8 significant bits: hi + mid + lo is x to within 2**-21 of |x| (a tf32 head and
    rest, as ``_dot`` splits, leave 2**-20). Integer masks and two subtractions an element, where
    ``_bf16x3``'s rounding conversions take several instructions each on sm_90a."""
    hi = x.to(tl.uint32, bitcast=True) & 0xFFFF0000
    rest = x - hi.to(tl.float32, bitcast=True)
    mid = rest.to(tl.uint32, bitcast=True) & 0xFFFF0000
    lo = (rest - mid.to(tl.float32, bitcast=True)).to(tl.uint32, bitcast=True)
    return (
        (hi >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True),
        (mid >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True),
        (lo >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True),
    )


@triton.jit
def _tokens_hidden_t(
    x_ptrs,  # (BLOCK_T,) pointers to the first element of each token row (bfloat16), D contiguous
    t_mask,  # (BLOCK_T,)
    w_ptr,  # (H, D) float32 W1
    stride_w,
    D,
    H,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """W1 Z^T for one chunk of bfloat16 tokens against float32 W1: (BLOCK_H, BLOCK_T) float32,
    zero in padded rows. ``_row_products`` computes Z W1^T, the tokens as the product's first
    operand: a tf32 product wants them as float32 in registers, converted element by element, a
    tile at a time. Here W1's tile is the first operand, cut into three bfloat16 parts in registers
    (``_bf16_cut3``; a part times a bf16 token is exact), and the tokens, the second, go from
    shared memory to the tensor cores as they were loaded: one wgmma of 64 hidden units by
    128 tokens a part and 16 columns. In the sm_90a SASS of the model's launch at K = 6, B = 32,
    Np = 10 (Triton 3.8) a D step of 128 tokens takes 193 instructions a warp and 2 barriers,
    where Z W1^T took 208 and 4 for 64 tokens (and 292 for 128), at 203 registers where it took
    168 (two programs an SM, not three). Wants one warpgroup (4 warps) and BLOCK_H = 64: two
    would split the tokens and exchange W1's parts through shared memory every step (271
    instructions and 33 barriers a step in a test kernel). Untimed on a GPU."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    acc = tl.zeros((BLOCK_H, BLOCK_T), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        x_t = tl.load(x_ptrs[None, :] + d[:, None], mask=t_mask[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_T)
        w = tl.load(w_ptr + offs_h[:, None] * stride_w + d[None, :], mask=h_mask[:, None] & d_mask[None, :], other=0.0)
        hi, mid, lo = _bf16_cut3(w)
        acc = tl.dot(lo, x_t, acc)
        acc = tl.dot(mid, x_t, acc)
        acc = tl.dot(hi, x_t, acc)
    return acc


@triton.jit
def _tokens_epilogue_t(
    h,  # (BLOCK_H, n) float32: W1 Z^T + b1 of n tokens of a chunk, the tokens along the columns
    t,  # (n,) the tokens
    end,  # the expert's token range ends at end
    offs_h,  # (BLOCK_H,)
    h_mask,  # (BLOCK_H,)
    slopes_ptr,  # the saved GELU slopes (``_store_split``)
    row0,  # the slopes' row of token 0 of the image
    save_hidden,
    H,
):
    """Stores the tokens' GELU slopes (with ``save_hidden``) and returns their sum of gelu,
    (BLOCK_H,). The forward's transposed token chunks (``_tokens_hidden_t``) call it on two halves
    of a chunk: on all 128 tokens at once the launch at K = 6, B = 32, Np = 10 took 255 registers
    and spilled (sm_90a, Triton 3.8), on halves 203 and none."""
    t_mask = t < end
    if save_hidden:
        _store_split(slopes_ptr, (row0 + t)[None, :], offs_h[:, None], h_mask[:, None] & t_mask[None, :], _gelu_grad(h), H)
    return tl.sum(tl.where(t_mask[None, :], _gelu(h), 0.0), axis=1)


@triton.jit
def _plus_bias(acc, b_ptr, W, BLOCK_W: tl.constexpr):
    """acc (BLOCK_R, BLOCK_W) + b (W,) in float32."""
    offs_w = tl.arange(0, BLOCK_W)
    return acc + tl.load(b_ptr + offs_w, mask=offs_w < W, other=0.0).to(tl.float32)[None, :]


@triton.jit
def _sum_parts(
    row_ptrs,  # (BLOCK_R,) pointers to each row's first part, W contiguous float32
    row_mask,  # (BLOCK_R,)
    parts,  # parts a row: part c of a row starts stride_part elements after part c - 1
    stride_part,
    W,
    BLOCK_W: tl.constexpr,
):
    """The sum of each row's parts in the order of c, so the result does not depend on which
    program sums them: (BLOCK_R, BLOCK_W) float32, zero in masked rows and padded columns. The
    parts are what other programs of the launch stored: read from L2 (.cg), past this SM's L1."""
    offs_w = tl.arange(0, BLOCK_W)
    mask = row_mask[:, None] & (offs_w < W)[None, :]
    acc = tl.zeros((row_ptrs.shape[0], BLOCK_W), dtype=tl.float32)
    for c in range(0, parts):
        acc += tl.load(row_ptrs[:, None] + c * stride_part + offs_w[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _mlp_rows(
    x_ptrs,  # (BLOCK_R,) pointers to the first element of each row, each row D contiguous
    row_mask,  # (BLOCK_R,)
    h_ptrs,  # (BLOCK_R,) pointers to each row's H pre-activations (out, float32); unused when H = 0
    save_hidden,  # 0 or 1: whether to store the pre-activations (1 when a backward will read them)
    w1_ptr,  # (H, D)
    stride_w1_h,
    b1_ptr,  # (H,)
    w2_ptr,  # (K, H), or (K, D) when H = 0
    stride_w2_k,
    K,
    D,
    H,
    HAS_HIDDEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROUND_FP32: tl.constexpr,
):
    """f(x) - b2 for one tile of rows: (BLOCK_R, BLOCK_K) float32, zero in masked rows. With a
    hidden layer and ``save_hidden`` it also stores the pre-activations x W1^T + b1, which the
    backward reads instead of recomputing them from all of D."""
    if HAS_HIDDEN:
        h = _row_products(x_ptrs, row_mask, w1_ptr, stride_w1_h, 0, D, H, BLOCK_R, BLOCK_D, BLOCK_H, ROUND_FP32)
        h = _plus_bias(h, b1_ptr, H, BLOCK_H)
        return _mlp_out(h, row_mask, h_ptrs, save_hidden, w2_ptr, stride_w2_k, K, H, BLOCK_H, BLOCK_K, ROUND_FP32)
    return _row_products(x_ptrs, row_mask, w2_ptr, stride_w2_k, 0, D, K, BLOCK_R, BLOCK_D, BLOCK_K, ROUND_FP32)


@triton.jit
def _mlp_out(
    h,  # (BLOCK_R, BLOCK_H) float32: the pre-activations x W1^T + b1 of a tile of rows
    row_mask,  # (BLOCK_R,)
    h_ptrs,  # (BLOCK_R,) pointers to each row's H pre-activations (out, float32)
    save_hidden,  # 0 or 1: whether to store h
    w2_ptr,  # (K, H)
    stride_w2_k,
    K,
    H,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROUND_FP32: tl.constexpr,
):
    """W2 gelu(h) for one tile of rows: (BLOCK_R, BLOCK_K) float32, zero in masked rows; stores
    h first with ``save_hidden``."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    if save_hidden:
        tl.store(h_ptrs[:, None] + offs_h[None, :], h, mask=row_mask[:, None] & h_mask[None, :])
    a = tl.where(row_mask[:, None], _gelu(h), 0.0)
    w2t = tl.load(
        w2_ptr + offs_k[None, :] * stride_w2_k + offs_h[:, None],
        mask=(offs_k < K)[None, :] & h_mask[:, None],
        other=0.0,
    )  # (BLOCK_H, BLOCK_K)
    return _dot_fwd(a.to(w2t.dtype), w2t, tl.zeros((h.shape[0], BLOCK_K), dtype=tl.float32), ROUND_FP32)


@triton.jit
def _softmax_and_mix(
    logits,  # (G, BLOCK_N, BLOCK_K) float32: the logits of prompts n of G images of one expert
    n,  # (BLOCK_N,) the prompts
    rows,  # (G, BLOCK_N) their rows of (K, B, Np)
    row_mask,  # (G, BLOCK_N)
    prompts_ptr,  # (K, Np, D)
    weights_ptr,  # (K, B, Np, K) out, float32, contiguous
    ipt_rows,  # (G, BLOCK_N) out: pointers to the first element of each prompt's IPT row, D contiguous
    stride_prompts_k,
    stride_prompts_n,
    K,
    Np,
    D,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """weights = softmax(logits) over the K experts, and ipt = sum_j weights[..., j] P[j, n], in
    float32. Each tile of P is read once for the G images.

    The mixture reads expert j's weights back from ``weights_ptr`` (L1, after a barrier) as a
    (G, BLOCK_N, 1) tile, and P[j] as a (1, BLOCK_N, BLOCK_D) tile, both in the accumulator's
    3-d layout. Taking column j out of the softmax's registers instead (a masked sum over K) cost
    shuffles and adds for every expert in every D step, and P's 2-d tiles a trip through shared
    memory behind barriers. In the sm_90a SASS (Triton 3.8) of the launch at K = 6, B = 32,
    Np = 10 a step of four experts took 408 instructions, 128 shuffles and 8 barriers among them,
    for 64 multiply-adds; a step of two takes 67, with no shuffle or barrier, and K = 6 takes three
    where it took two steps of four, two experts of them empty: 201 instructions a D step, not 816.
    At B = 1 (4 warps) 299 a step of four with 16 barriers, now 92 a step of two; at Np = 50 365,
    now 126. The generic large-batch 8-warp variants (many prompts; no alignment hints) spill 8-56
    bytes a thread, where they spilled none (steps of four experts: up to 172); the launches as
    specialized for the model do not. Untimed on a GPU."""
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    logits = tl.where(k_mask[None, None, :], logits, float("-inf"))
    w = tl.exp(logits - tl.max(logits, axis=2)[:, :, None])
    w = w / tl.sum(w, axis=2)[:, :, None]
    w_rows = weights_ptr + rows[:, :, None] * K  # (G, BLOCK_N, 1)
    w_mask = row_mask[:, :, None]
    tl.store(w_rows + offs_k[None, None, :], w, mask=w_mask & k_mask[None, None, :])
    # Every thread's weights, visible to every thread of the program (bar.sync orders global memory
    # within the block).
    tl.debug_barrier()
    p_rows = prompts_ptr + n[None, :, None] * stride_prompts_n  # (1, BLOCK_N, 1)
    n_mask = (n < Np)[None, :, None]
    offs_d = tl.arange(0, BLOCK_D)[None, None, :]
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        acc = tl.zeros((w.shape[0], w.shape[1], BLOCK_D), dtype=tl.float32)
        # Two experts a step, unrolled: their loads are independent, so they are in flight
        # together (with one expert a step each load of P waited for the last, K round trips to L2
        # per D step on the path every image's IPT waits for). An expert j >= K loads nothing and
        # weighs 0.
        for j0 in range(0, K, 2):
            for dj in tl.static_range(2):
                j = j0 + dj
                w_j = tl.load(w_rows + j, mask=w_mask & (j < K), other=0.0)  # (G, BLOCK_N, 1)
                p_j = tl.load(p_rows + j * stride_prompts_k + d, mask=(j < K) & n_mask & d_mask, other=0.0)
                acc += w_j * p_j.to(tl.float32)
        tl.store(ipt_rows[:, :, None] + d, acc.to(ipt_rows.dtype.element_ty), mask=w_mask & d_mask)


@triton.jit
def _store_split(
    out_ptr,  # (rows, H) float32, or (rows, 3, H) bfloat16
    rows,  # (BLOCK_R, 1), or (1, BLOCK_R) for a tile of values transposed
    offs_h,  # (1, BLOCK_H), or (BLOCK_H, 1)
    mask,  # as the values
    values,  # (BLOCK_R, BLOCK_H) float32, or (BLOCK_H, BLOCK_R)
    H,
):
    """Stores float32 rows as they are, or into a bfloat16 buffer as the three parts of
    ``_bf16x3`` (6 bytes a value where float32 takes 4): the tokens' GELU slopes, which the
    backward multiplies by bf16 tokens on bfloat16 tensor cores (``_tokens_bwd_split``), and f_p's
    dL/dh, by bf16 prompt outputs (``_prompt_out_bwd_split``). Each part is stored as soon as it
    is computed: with the three computed first, the forward launch at K = 6, B = 32, Np = 10 took
    220 registers, not 166 (sm_90a, Triton 3.8), two programs an SM where three fit."""
    if out_ptr.dtype.element_ty == tl.bfloat16:
        ptrs = out_ptr + rows * 3 * H + offs_h
        hi = values.to(tl.bfloat16)
        tl.store(ptrs, hi, mask=mask)
        rest = values - hi.to(tl.float32)
        mid = rest.to(tl.bfloat16)
        tl.store(ptrs + H, mid, mask=mask)
        tl.store(ptrs + 2 * H, (rest - mid.to(tl.float32)).to(tl.bfloat16), mask=mask)
    else:
        tl.store(out_ptr + rows * H + offs_h, values, mask=mask)


# Triton would compile a flag equal to 1 as a constant, a second variant of the whole kernel.
@triton.jit(do_not_specialize=["has_prompt_out", "save_hidden"])
def _dispatch_fwd_kernel(
    prompts_ptr,  # (K, Np, D) P
    tokens_ptr,  # (K, B, T, D) Z, any strides with stride(-1) == 1
    prompt_out_ptr,  # (K, B, Np, D) Z_P; a placeholder when has_prompt_out is 0
    tok_range_ptr,  # (K, 2) int32: expert k averages f_z over tokens [start_k, end_k)
    w1e_ptr,  # (H, D) f_e; W1 and b1 are placeholders when HAS_HIDDEN is False
    b1e_ptr,  # (H,)
    w2e_ptr,  # (K, H), or (K, D) when H = 0
    b2e_ptr,  # (K,)
    w1p_ptr,  # (H, D) f_p, shapes as f_e
    b1p_ptr,  # (H,)
    w2p_ptr,  # (K, H) or (K, D)
    b2p_ptr,  # (K,)
    w1z_ptr,  # (H, D) f_z, shapes as f_e
    b1z_ptr,  # (H,)
    w2z_ptr,  # (K, H) or (K, D)
    b2z_ptr,  # (K,)
    ipt_ptr,  # (K, B, Np, D) out, any strides with stride(-1) == 1: the prompts' dtype, or the
    #           tokens' when it is the prompt slots of their sequences (and may be prompt_out itself)
    weights_ptr,  # (K, B, Np, K) out, contiguous, float32; f_p's logits until a (k, b) finishes
    hidden_e_ptr,  # (K, Np, H) out, float32: f_e's pre-activations; the three are placeholders
    hidden_p_ptr,  # (K, B, Np, H) out: f_p's     when save_hidden is 0 or HAS_HIDDEN is False,
    slopes_z_ptr,  # (K, B, T, H) out: f_z's GELU slopes gelu'(x W1^T + b1)   and hidden_p when
    #                has_prompt_out is 0; float32, or (K, B, T, 3, H) bfloat16 parts where
    #                ``splits_bf16`` (``_store_split``)
    act_sums_z_ptr,  # (K, B, H) out, float32: each (k, b)'s sum over its tokens of gelu(x W1^T + b1);
    #                  a placeholder, as the three above
    scratch_ptr,  # float32: at 0 each token chunk's sums over its tokens: of gelu(x W1^T + b1)
    #               (K * B, S_T, H), or of f_z - b2_z (K * B, S_T, K) when HAS_HIDDEN is False;
    #               then at the next multiple of 4 elements f_e's pieces, (K * S_E, Np, H) parts
    #               of P W1^T, or of P W2^T (K * S_E, Np, K), and at the next f_e's logits (K, Np, K)
    arrivals_ptr,  # (K * ceil(B / B_PER_FIN) + K,) int32, zero on entry: how many programs are
    #                done with each group of B_PER_FIN images of an expert, then how many of f_e's
    #                pieces with each expert
    stride_prompts_k,
    stride_prompts_n,
    stride_tokens_k,
    stride_tokens_b,
    stride_tokens_t,
    stride_prompt_out_k,
    stride_prompt_out_b,
    stride_prompt_out_n,
    stride_ipt_k,
    stride_ipt_b,
    stride_ipt_n,
    stride_w1e_h,
    stride_w2e_k,
    stride_w1p_h,
    stride_w2p_k,
    stride_w1z_h,
    stride_w2z_k,
    B,
    K,
    Np,
    T,
    D,
    H,
    S_T,  # token chunks of BLOCK_T rows per (k, b): ceil(max_k (end_k - start_k) / BLOCK_T)
    S_P,  # f_p tiles per expert: ceil(B * Np / BLOCK_ZP)
    S_E,  # f_e pieces per expert: ceil(D / D_E)
    D_E,  # the columns of P one f_e piece multiplies
    has_prompt_out,  # 0 or 1, a run-time switch: one compiled variant serves both cases
    save_hidden,  # 0 or 1, a run-time switch: store the pre-activations (hidden_*) for a backward
    HAS_HIDDEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,  # prompts per tile where a group of images is finished
    BLOCK_P: tl.constexpr,  # rows of P per tile of f_e
    BLOCK_ZP: tl.constexpr,  # rows of Z_P per tile of f_p, across images
    BLOCK_D: tl.constexpr,
    BLOCK_D_MIX: tl.constexpr,  # the D step of the prompt mixture
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    B_PER_FIN: tl.constexpr,
    ROUND_FP32: tl.constexpr,  # float32 x float32 products split by _dot_fwd's rounding, not tf32x3
    TOKENS_T: tl.constexpr,  # the token chunks' W1 Z^T with W1 first (``_tokens_hidden_t``)
):
    """Three roles by program id: [0, K * S_E) f_e's pieces (k, e), each the product of P[k] by
    W1 (W2 without a hidden layer) over D_E of the columns; the next K * S_P (with
    prompt_out) f_p over tiles of BLOCK_ZP rows of Z_P[k]; then K * B * S_T token chunks
    (k, b, s), each f_z over BLOCK_T tokens. Each stores its logits (or its tokens' sums), then
    counts itself done with each group of B_PER_FIN images of expert k it served (f_e's pieces
    count with their expert first, and the last to arrive finishes f_e and counts in every group;
    an f_p tile counts in those of its rows' images). The program that completes the
    count of a group, whichever it is, finishes it: softmax over the K experts and the mixture of
    the EPTs. Only the finishing program of a group writes its IPT rows, after f_p has read Z_P
    of each of its images: the IPT may overwrite Z_P in place."""
    pid = tl.program_id(0)
    if HAS_HIDDEN:
        sums_width = H
    else:
        sums_width = K
    partials_ptr = scratch_ptr
    parts_e_ptr = scratch_ptr + (K * B * S_T * sums_width + 3) // 4 * 4
    logits_e_ptr = parts_e_ptr + (K * S_E * Np * sums_width + 3) // 4 * 4
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    offs_n = tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    e_programs = K * S_E
    p_programs = K * S_P * has_prompt_out
    if pid < e_programs:
        # Piece (k, e) of f_e: the product of P[k] by W1 (W2 without a hidden layer) over the
        # columns [e * D_E, (e + 1) * D_E).
        k = pid // S_E
        e = pid - k * S_E
        d_lo = e * D_E
        d_hi = tl.minimum(d_lo + D_E, D)
        for n0 in range(0, Np, BLOCK_P):
            n = n0 + offs_p
            n_mask = n < Np
            x_ptrs = prompts_ptr + k * stride_prompts_k + n * stride_prompts_n
            if HAS_HIDDEN:
                part = _row_products(
                    x_ptrs, n_mask, w1e_ptr, stride_w1e_h, d_lo, d_hi, H, BLOCK_P, BLOCK_D, BLOCK_H, ROUND_FP32,
                )
            else:
                part = _row_products(
                    x_ptrs, n_mask, w2e_ptr, stride_w2e_k, d_lo, d_hi, K, BLOCK_P, BLOCK_D, BLOCK_K, ROUND_FP32,
                )
            offs_w = tl.arange(0, part.shape[1])
            tl.store(
                parts_e_ptr + (pid * Np + n)[:, None] * sums_width + offs_w[None, :], part,
                mask=n_mask[:, None] & (offs_w < sums_width)[None, :],
            )
        # The last of expert k's pieces to arrive sums them in a fixed order, finishes f_e (b1,
        # GELU and W2, with the pre-activations stored for a backward) and stores its logits for
        # every group's finishing program: f_e counts once in each group of its expert.
        tl.debug_barrier()
        pieces_before = tl.atomic_add(arrivals_ptr + K * tl.cdiv(B, B_PER_FIN) + k, 1, sem="acq_rel")
        g_lo = pid * 0
        g_hi = g_lo
        if pieces_before == S_E - 1:
            for n0 in range(0, Np, BLOCK_P):
                n = n0 + offs_p
                n_mask = n < Np
                piece_rows = parts_e_ptr + (k * S_E * Np + n) * sums_width  # (K * S_E, Np, H or K)
                if HAS_HIDDEN:
                    h_e = _sum_parts(piece_rows, n_mask, S_E, Np * H, H, BLOCK_H)
                    f_e = _mlp_out(
                        _plus_bias(h_e, b1e_ptr, H, BLOCK_H), n_mask, hidden_e_ptr + (k * Np + n) * H, save_hidden,
                        w2e_ptr, stride_w2e_k, K, H, BLOCK_H, BLOCK_K, ROUND_FP32,
                    )
                else:
                    f_e = _sum_parts(piece_rows, n_mask, S_E, Np * K, K, BLOCK_K)
                tl.store(
                    logits_e_ptr + (k * Np + n)[:, None] * K + offs_k[None, :], _plus_bias(f_e, b2e_ptr, K, BLOCK_K),
                    mask=n_mask[:, None] & k_mask[None, :],
                )
            g_hi = g_lo + tl.cdiv(B, B_PER_FIN)
    elif pid < e_programs + p_programs:
        # Tile (k, s): rows [s * BLOCK_ZP, (s + 1) * BLOCK_ZP) of Z_P[k] as one (B * Np, D)
        # matrix, the rows of several images when Np < BLOCK_ZP.
        k = (pid - e_programs) // S_P
        first = (pid - e_programs - k * S_P) * BLOCK_ZP
        r = first + tl.arange(0, BLOCK_ZP)
        r_mask = r < B * Np
        b_r = r // Np
        n_r = r - b_r * Np
        logits = _mlp_rows(
            prompt_out_ptr + k * stride_prompt_out_k + b_r * stride_prompt_out_b + n_r * stride_prompt_out_n,
            r_mask, hidden_p_ptr + (k * B * Np + r) * H, save_hidden,
            w1p_ptr, stride_w1p_h, b1p_ptr, w2p_ptr, stride_w2p_k,
            K, D, H, HAS_HIDDEN, BLOCK_ZP, BLOCK_D, BLOCK_H, BLOCK_K, ROUND_FP32,
        )
        logits = _plus_bias(logits, b2p_ptr, K, BLOCK_K)
        tl.store(weights_ptr + (k * B * Np + r)[:, None] * K + offs_k[None, :], logits, mask=r_mask[:, None] & k_mask[None, :])
        # The groups of its first and last images.
        g_lo = first // Np // B_PER_FIN
        g_hi = (tl.minimum(first + BLOCK_ZP, B * Np) - 1) // Np // B_PER_FIN + 1
    else:
        chunk = pid - e_programs - p_programs
        s = chunk % S_T
        kb = chunk // S_T
        k = kb // B
        b_lo = kb % B
        g_lo = b_lo // B_PER_FIN
        g_hi = g_lo + 1
        end = tl.load(tok_range_ptr + 2 * k + 1)
        t = tl.load(tok_range_ptr + 2 * k) + s * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < end
        x_ptrs = tokens_ptr + k * stride_tokens_k + b_lo * stride_tokens_b + t * stride_tokens_t
        if HAS_HIDDEN:
            # The mean over tokens commutes with W2: the chunk keeps its sum of gelu (H floats),
            # and the finishing program multiplies by W2 once. For a backward it stores the GELU
            # slopes, which is all the backward needs per token (every token of (k, b) receives
            # the same dL/d f_z).
            offs_h = tl.arange(0, BLOCK_H)
            h_mask = offs_h < H
            if TOKENS_T:
                # (BLOCK_H, BLOCK_T): the chunk's tokens along the columns, to the end.
                h = _tokens_hidden_t(x_ptrs, t_mask, w1z_ptr, stride_w1z_h, D, H, BLOCK_T, BLOCK_D, BLOCK_H)
                h += tl.load(b1z_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)[:, None]
                # Two halves, even and odd tokens (``_tokens_epilogue_t``).
                h0, h1 = tl.split(tl.reshape(h, (BLOCK_H, BLOCK_T // 2, 2)))
                t0, t1 = tl.split(tl.reshape(t, (BLOCK_T // 2, 2)))
                token_sums = _tokens_epilogue_t(h0, t0, end, offs_h, h_mask, slopes_z_ptr, kb * T, save_hidden, H)
                token_sums += _tokens_epilogue_t(h1, t1, end, offs_h, h_mask, slopes_z_ptr, kb * T, save_hidden, H)
            else:
                h = _plus_bias(
                    _row_products(x_ptrs, t_mask, w1z_ptr, stride_w1z_h, 0, D, H, BLOCK_T, BLOCK_D, BLOCK_H, ROUND_FP32),
                    b1z_ptr, H, BLOCK_H,
                )
                if save_hidden:
                    _store_split(slopes_z_ptr, (kb * T + t)[:, None], offs_h[None, :], t_mask[:, None] & h_mask[None, :],
                                 _gelu_grad(h), H)
                token_sums = tl.sum(tl.where(t_mask[:, None], _gelu(h), 0.0), axis=0)
            tl.store(partials_ptr + (kb * S_T + s) * H + offs_h, token_sums, mask=h_mask)
        else:
            out = _mlp_rows(
                x_ptrs, t_mask, x_ptrs, 0, w1z_ptr, stride_w1z_h, b1z_ptr, w2z_ptr, stride_w2z_k,
                K, D, H, HAS_HIDDEN, BLOCK_T, BLOCK_D, BLOCK_H, BLOCK_K, ROUND_FP32,
            )
            tl.store(partials_ptr + (kb * S_T + s) * K + offs_k, tl.sum(out, axis=0), mask=k_mask)

    # Count in. The barrier orders every thread's stores above before the release of the count;
    # the finishing program reads what the others stored with .cg loads (from L2, past its SM's L1).
    tl.debug_barrier()
    for g in range(g_lo, g_hi):
        b = g * B_PER_FIN + tl.arange(0, B_PER_FIN)  # the group's images
        b_mask = b < B
        kb = k * B + b
        images = tl.minimum(B - g * B_PER_FIN, B_PER_FIN)
        done_before = tl.atomic_add(arrivals_ptr + k * tl.cdiv(B, B_PER_FIN) + g, 1, sem="acq_rel")
        # The others: f_e's last piece, the token chunks and the f_p tiles with rows in the group.
        rows_lo = g * B_PER_FIN * Np
        zp_tiles = ((rows_lo + images * Np - 1) // BLOCK_ZP - rows_lo // BLOCK_ZP + 1) * has_prompt_out
        if done_before == images * S_T + zp_tiles:
            start = tl.load(tok_range_ptr + 2 * k)
            end = tl.load(tok_range_ptr + 2 * k + 1)
            # The chunks' sums, in a fixed order, so the logits are reproducible.
            if HAS_HIDDEN:
                offs_h = tl.arange(0, BLOCK_H)
                h_mask = offs_h < H
                a_sum = _sum_parts(partials_ptr + kb * S_T * H, b_mask, S_T, H, H, BLOCK_H)
                w2 = tl.load(
                    w2z_ptr + offs_k[:, None] * stride_w2z_k + offs_h[None, :],
                    mask=k_mask[:, None] & h_mask[None, :],
                    other=0.0,
                )  # (BLOCK_K, BLOCK_H)
                token_sum = tl.sum(w2.to(tl.float32)[None, :, :] * a_sum[:, None, :], axis=2)  # (B_PER_FIN, BLOCK_K)
                if save_hidden:
                    tl.store(act_sums_z_ptr + kb[:, None] * H + offs_h[None, :], a_sum, mask=b_mask[:, None] & h_mask[None, :])
            else:
                token_sum = _sum_parts(partials_ptr + kb * S_T * K, b_mask, S_T, K, K, BLOCK_K)
            token_logits = token_sum / (end - start).to(tl.float32)
            token_logits += tl.load(b2z_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            for n0 in range(0, Np, BLOCK_N):
                n = n0 + offs_n
                n_mask = n < Np
                f_e = tl.load(
                    logits_e_ptr + (k * Np + n)[:, None] * K + offs_k[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0, cache_modifier=".cg",
                )
                logits = token_logits[:, None, :] + f_e[None, :, :]
                rows = kb[:, None] * Np + n[None, :]  # (B_PER_FIN, BLOCK_N) rows of (K, B, Np)
                row_mask = b_mask[:, None] & n_mask[None, :]
                if has_prompt_out:
                    logits += tl.load(
                        weights_ptr + rows[:, :, None] * K + offs_k[None, None, :],
                        mask=row_mask[:, :, None] & k_mask[None, None, :], other=0.0, cache_modifier=".cg",
                    )
                ipt_rows = ipt_ptr + k * stride_ipt_k + b[:, None] * stride_ipt_b + n[None, :] * stride_ipt_n
                _softmax_and_mix(
                    logits, n, rows, row_mask, prompts_ptr, weights_ptr, ipt_rows, stride_prompts_k, stride_prompts_n,
                    K, Np, D, BLOCK_D_MIX, BLOCK_K,
                )


@triton.jit
def _dispatch_bwd_softmax_kernel(
    grad_ipt_ptr,  # (K, B, Np, D) dL/d ipt, any strides
    prompts_ptr,  # (K, Np, D)
    weights_ptr,  # (K, B, Np, K) float32, contiguous, saved by the forward
    dlogits_ptr,  # (K, B, Np, K) out, float32, contiguous: dL/d logits
    stride_grad_k,
    stride_grad_b,
    stride_grad_n,
    stride_grad_d,  # autograd may hand over any strides: .sum()'s gradient is an expand, stride 0
    stride_prompts_k,
    stride_prompts_n,
    w2p_ptr,  # (K, H) f_p's W2, read with bf16 prompt outputs only (below); else a placeholder
    stride_w2p_k,
    hidden_p_ptr,  # (K, B, Np, H) float32, f_p's pre-activations as the forward stored them
    dh_p_ptr,  # (K, B, Np, 3, H) bfloat16 out: f_p's dL/dh as _store_split's parts, or a float32
    #            placeholder: then this kernel computes dlogits only
    act_p_ptr,  # (K, B, Np, H) float32 out: gelu of f_p's pre-activations
    B,
    K,
    Np,
    D,
    H,
    BLOCK_KB: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Program (prompt n, block of BLOCK_KB rows (k, b)): dlogits = w * (dw - <w, dw>) with
    dw[j] = <grad_ipt[k, b, n], P[j, n]>, one product over D for the block's rows, so each program
    reads P[:, n] once for BLOCK_KB rows.

    With bf16 prompt outputs (``dh_p_ptr`` bfloat16) it also takes f_p's backward through W2 and
    GELU for the rows: dL/dh = (dlogits W2) * gelu'(h), stored in bf16 parts, and gelu(h), for W2's
    gradient. The main backward then multiplies them by Z_P and W1 on bfloat16 tensor cores
    (``_prompt_out_bwd_split``), where each of its d-tiles' programs took GELU and its slope of every
    row again."""
    n = tl.program_id(0)
    kb = tl.program_id(1) * BLOCK_KB + tl.arange(0, BLOCK_KB)
    kb_mask = kb < K * B
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    g_rows = grad_ipt_ptr + (kb // B) * stride_grad_k + (kb % B) * stride_grad_b + n * stride_grad_n
    dw = tl.zeros((BLOCK_KB, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        g = tl.load(g_rows[:, None] + d[None, :] * stride_grad_d, mask=kb_mask[:, None] & d_mask[None, :], other=0.0)
        p_t = tl.load(
            prompts_ptr + offs_k[None, :] * stride_prompts_k + n * stride_prompts_n + d[:, None],
            mask=k_mask[None, :] & d_mask[:, None],
            other=0.0,
        )  # (BLOCK_D, BLOCK_K): P[:, n] transposed
        dw = _dot(g, p_t, dw)
    row = kb * Np + n  # (BLOCK_KB,) rows of (K, B, Np)
    mask = kb_mask[:, None] & k_mask[None, :]
    w = tl.load(weights_ptr + row[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
    dl = w * (dw - tl.sum(w * dw, axis=1)[:, None])
    tl.store(dlogits_ptr + row[:, None] * K + offs_k[None, :], dl, mask=mask)
    if dh_p_ptr.dtype.element_ty == tl.bfloat16:
        if H > 0:  # 0: no prompt outputs
            offs_h = tl.arange(0, BLOCK_H)
            h_mask = offs_h < H
            w2 = tl.load(
                w2p_ptr + offs_k[:, None] * stride_w2p_k + offs_h[None, :], mask=k_mask[:, None] & h_mask[None, :],
                other=0.0,
            )  # (BLOCK_K, BLOCK_H)
            da = _dot(dl.to(w2.dtype), w2, tl.zeros((BLOCK_KB, BLOCK_H), dtype=tl.float32))
            mask_h = kb_mask[:, None] & h_mask[None, :]
            h = tl.load(hidden_p_ptr + row[:, None] * H + offs_h[None, :], mask=mask_h, other=0.0)
            _store_split(dh_p_ptr, row[:, None], offs_h[None, :], mask_h, da * _gelu_grad(h), H)
            tl.store(act_p_ptr + row[:, None] * H + offs_h[None, :], _gelu(h), mask=mask_h)


def _launch_bwd_softmax(grad_ipt, prompts, weights, blocks, prompt_out_bwd=None) -> torch.Tensor:
    """dL/d logits (K, B, Np, K) float32 from the IPTs' gradient: one launch, grid (Np, K*B / BLOCK_KB).
    ``prompt_out_bwd``: (W2_p, hidden_p, dh_p, act_p, H) to fill dh_p (K, B, Np, 3, H) bfloat16 and
    act_p (K, B, Np, H) float32 as well (bf16 prompt outputs), or None. With H = 0 the kernel fills
    nothing but is the variant that fills them (bf16 activations without prompt outputs: the
    tensors are placeholders, dh_p one of bfloat16)."""
    K, B, Np, D = grad_ipt.shape
    dlogits = torch.empty((K, B, Np, K), dtype=torch.float32, device=grad_ipt.device)
    if prompt_out_bwd is None:  # placeholders the kernel does not touch, of the dtypes it is compiled for
        prompt_out_bwd = (prompts, dlogits, dlogits, dlogits, 0)
    w2p, hidden_p, dh_p, act_p, H = prompt_out_bwd
    split = dh_p.dtype == torch.bfloat16
    _dispatch_bwd_softmax_kernel[(Np, cdiv(K * B, blocks["BLOCK_KB"]))](
        grad_ipt, prompts, weights, dlogits,
        *grad_ipt.stride(), *prompts.stride()[:2], w2p, w2p.stride(0), hidden_p, dh_p, act_p,
        B, K, Np, D, H,
        BLOCK_KB=blocks["BLOCK_KB"], BLOCK_D=blocks["BLOCK_D"], BLOCK_K=16, BLOCK_H=blocks["BLOCK_H"] if split else 16,
        num_warps=_NUM_WARPS["bwd_softmax"], num_stages=_NUM_STAGES["bwd_softmax"],
    )
    return dlogits


@triton.jit
def _grad_accumulators(
    HAS_HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DW: tl.constexpr
):
    """Zeroed float32 accumulators of one program's share of (dW1, db1, dW2, db2)."""
    acc_w1 = tl.zeros((BLOCK_H, BLOCK_DW), dtype=tl.float32)  # columns of the program's d-tile
    acc_b1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if HAS_HIDDEN:
        acc_w2 = tl.zeros((BLOCK_K, BLOCK_H), dtype=tl.float32)
    else:
        acc_w2 = tl.zeros((BLOCK_K, BLOCK_DW), dtype=tl.float32)  # W2 is (K, D): the d-tile
    acc_b2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    return acc_w1, acc_b1, acc_w2, acc_b2


@triton.jit
def _mlp_bwd_tile(
    x_ptrs,  # (BLOCK_R,) pointers to the first element of each row
    h_ptrs,  # (BLOCK_R,) pointers to each row's H pre-activations, as the forward stored them
    row_mask,  # (BLOCK_R,)
    dl,  # (BLOCK_R, BLOCK_K) float32 dL/d f(x), zero in masked rows and columns
    offs_dw,  # (BLOCK_DW,) the columns of x this program owns
    is_first_d_tile,  # whether offs_dw is the first d-tile: the program that sums b1, W2 and b2
    w1,  # (BLOCK_H, BLOCK_DW) W1[:, offs_dw], loaded once per program; unused when H = 0
    w2_ptr,  # (K, H), or (K, D) when H = 0
    stride_w2_k,
    acc_w1,  # (BLOCK_H, BLOCK_DW) float32
    acc_b1,  # (BLOCK_H,)
    acc_w2,  # (BLOCK_K, BLOCK_H), or (BLOCK_K, BLOCK_DW) when H = 0
    acc_b2,  # (BLOCK_K,)
    K,
    D,
    H,
    HAS_HIDDEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Backward of f over one tile of rows: dL/dx for the columns offs_dw, (BLOCK_R, BLOCK_DW)
    float32, and the accumulators plus this tile's weight gradients.

    The gradients of b1, b2 and (with a hidden layer) W2 are the same for every d-tile, and only
    the first d-tile's program stores them (``_store_partial``): the others skip their terms, with a
    hidden layer the product dl^T gelu(h) (three tf32 products) and GELU itself."""
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    dw_mask = offs_dw < D
    x = tl.load(x_ptrs[:, None] + offs_dw[None, :], mask=row_mask[:, None] & dw_mask[None, :], other=0.0)
    if is_first_d_tile:
        acc_b2 += tl.sum(dl, axis=0)
    if HAS_HIDDEN:
        offs_h = tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        h = tl.load(h_ptrs[:, None] + offs_h[None, :], mask=row_mask[:, None] & h_mask[None, :], other=0.0)
        w2 = tl.load(
            w2_ptr + offs_k[:, None] * stride_w2_k + offs_h[None, :], mask=k_mask[:, None] & h_mask[None, :], other=0.0
        )  # (BLOCK_K, BLOCK_H)
        dl_c = dl.to(w2.dtype)
        da = _dot(dl_c, w2, tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32))
        dh = tl.where(row_mask[:, None], da * _gelu_grad(h), 0.0)
        if is_first_d_tile:
            a = tl.where(row_mask[:, None], _gelu(h), 0.0)
            acc_w2 = _dot(tl.trans(dl_c), a.to(w2.dtype), acc_w2)
            acc_b1 += tl.sum(dh, axis=0)
        dx, acc_w1 = _hidden_bwd(x, dh, w1, acc_w1)
    else:
        w2 = tl.load(
            w2_ptr + offs_k[:, None] * stride_w2_k + offs_dw[None, :], mask=k_mask[:, None] & dw_mask[None, :], other=0.0
        )  # (BLOCK_K, BLOCK_DW)
        dl_c = dl.to(w2.dtype)
        dx = _dot(dl_c, w2, tl.zeros((BLOCK_R, offs_dw.shape[0]), dtype=tl.float32))
        acc_w2 = _dot(tl.trans(dl_c), x, acc_w2)
    return dx, acc_w1, acc_b1, acc_w2, acc_b2


@triton.jit
def _load_w1_tile(w1_ptr, stride_w1_h, offs_dw, D, H, BLOCK_H: tl.constexpr):
    """W1[:, offs_dw] (H, D): (BLOCK_H, BLOCK_DW), zero in padded rows and columns (all zeros,
    reading nothing, when H = 0). A program loads its d-tile once and holds it for all its rows:
    reloading it per tile of rows read several times their bytes again from L1/L2."""
    offs_h = tl.arange(0, BLOCK_H)
    return tl.load(
        w1_ptr + offs_h[:, None] * stride_w1_h + offs_dw[None, :],
        mask=(offs_h < H)[:, None] & (offs_dw < D)[None, :],
        other=0.0,
    )


@triton.jit
def _hidden_bwd(
    x,  # (BLOCK_R, BLOCK_DW) the rows' columns offs_dw, in their own dtype
    dh,  # (BLOCK_R, BLOCK_H) float32 dL/d(x W1^T + b1), zero in masked rows
    w1,  # (BLOCK_H, BLOCK_DW) W1's columns offs_dw, zero in padded rows and columns
    acc_w1,  # (BLOCK_H, BLOCK_DW) float32
):
    """The first layer's backward on one tile: dL/dx = dh W1 for the tile's columns, (BLOCK_R,
    BLOCK_DW) float32, and acc_w1 + dh^T x."""
    dh_c = dh.to(w1.dtype)
    dx = tl.zeros((dh.shape[0], w1.shape[1]), dtype=tl.float32)
    if x.dtype == tl.bfloat16 and w1.dtype == tl.float32:
        # dL/dx is stored in bf16, 8 significant bits: one tf32 product (11-bit operands) errs
        # well below that rounding, where tf32x3 would take three.
        dx = tl.dot(dh_c, w1, dx, input_precision="tf32")
    else:
        dx = _dot(dh_c, w1, dx)
    acc_w1 = _dot(tl.trans(dh_c), x, acc_w1)
    return dx, acc_w1


@triton.jit
def _token_tile_bwd(
    x_ptrs,  # (BLOCK_T,) pointers to the first element of each token row
    slope_ptrs,  # (BLOCK_T,) pointers to each token's H GELU slopes, as the forward stored them
    t_mask,  # (BLOCK_T,)
    da,  # (BLOCK_H,) float32 dL/d gelu, the same for every token; (BLOCK_DW,) dL/dx when H = 0
    offs_dw,  # (BLOCK_DW,) the columns of x this program owns
    is_first_d_tile,  # whether offs_dw is the first d-tile: the program that sums b1
    w1,  # (BLOCK_H, BLOCK_DW) W1[:, offs_dw], loaded once per program; unused when H = 0
    acc_w1,  # (BLOCK_H, BLOCK_DW) float32
    acc_b1,  # (BLOCK_H,)
    a_sum,  # (BLOCK_DW,) float32 when H = 0: the sum of x over the tokens so far; unused otherwise
    D,
    H,
    HAS_HIDDEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Backward of f_z over one tile of tokens of a (k, b), which all receive the same dL/d f:
    dL/dx for the columns offs_dw, (BLOCK_T, BLOCK_DW) float32, and acc_w1, acc_b1 and a_sum plus
    this tile's share. With the forward's GELU slopes, no transcendental function runs here. Only the
    first d-tile's program, which stores b1's gradient, sums dh over the tokens."""
    x = tl.load(x_ptrs[:, None] + offs_dw[None, :], mask=t_mask[:, None] & (offs_dw < D)[None, :], other=0.0)
    if HAS_HIDDEN:
        offs_h = tl.arange(0, BLOCK_H)
        slopes = tl.load(slope_ptrs[:, None] + offs_h[None, :], mask=t_mask[:, None] & (offs_h < H)[None, :], other=0.0)
        dh = da[None, :] * slopes  # zero in masked rows
        if is_first_d_tile:
            acc_b1 += tl.sum(dh, axis=0)
        dx, acc_w1 = _hidden_bwd(x, dh, w1, acc_w1)
    else:
        a_sum += tl.sum(x.to(tl.float32), axis=0)
        dx = tl.zeros((BLOCK_T, 1), dtype=tl.float32) + da[None, :]
    return dx, acc_w1, acc_b1, a_sum


@triton.jit
def _tokens_bwd_split(
    x_base,  # tokens[k, b] (T, D) bfloat16: token t's row at x_base + t * stride_t, D contiguous
    stride_t,
    slopes_base,  # slopes[k, b] (T, 3, H) bfloat16: the forward's _bf16x3 parts of the GELU slopes
    start,  # the tokens [start, end) of expert k
    end,
    da,  # (BLOCK_H,) float32 dL/d gelu, the same for every token of (k, b)
    w1,  # (BLOCK_H, BLOCK_DW) float32 W1[:, offs_dw], zero in padded rows and columns
    offs_dw,  # (BLOCK_DW,) the columns of the tokens this program owns
    is_first_d_tile,  # whether offs_dw is the first d-tile: the program that sums b1
    acc_w1,  # (BLOCK_H, BLOCK_DW) float32
    acc_b1,  # (BLOCK_H,)
    grad_base,  # dZ[k, b] out, bfloat16
    add_base,  # grad_add[k, b]
    stride_grad_t,
    stride_add_t,
    need_grad_tokens,
    add_grad,
    D,
    H,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Backward of f_z over the bfloat16 tokens of one (k, b): writes dZ for the columns offs_dw
    and returns acc_w1 and acc_b1 plus this image's share.

    Every token's dh = slopes * da with the image's one da, so dZ = slopes (da W1) and
    dW1 = da * (slopes^T Z): W1's d-tile is scaled by da once an image, and the token tiles
    multiply as they are loaded, the tokens and the slopes' bfloat16 parts straight from shared
    memory into the tensor cores, with no arithmetic on them (a float32 dh took a split into tf32
    heads and rests, and the tokens a conversion to float32, a tile at a time). slopes^T Z sums the
    three parts' products: float32's accuracy. dZ, stored in bfloat16, takes the three largest of
    the nine products of the parts of slopes and of da W1 (about 2**-16 of dZ dropped)."""
    offs_h = tl.arange(0, BLOCK_H)
    s_cols = offs_h < H
    dw_mask = offs_dw < D
    offs_t = tl.arange(0, BLOCK_T)
    w_hi, w_mid, _ = _bf16x3(da[:, None] * w1)
    p = tl.zeros((BLOCK_H, offs_dw.shape[0]), dtype=tl.float32)  # slopes^T Z of the image
    # The slopes' sums over the tokens (b1's gradient), in the first d-tile's programs only.
    s_sum = tl.zeros((BLOCK_H, 16), dtype=tl.float32)
    ones = _first_column(BLOCK_T)
    for t0 in range(start, end, BLOCK_T):
        t = t0 + offs_t
        t_mask = t < end
        x = tl.load(x_base + t[:, None] * stride_t + offs_dw[None, :], mask=t_mask[:, None] & dw_mask[None, :], other=0.0)
        s_rows = slopes_base + (t * 3 * H)[:, None] + offs_h[None, :]
        s_mask = t_mask[:, None] & s_cols[None, :]
        s_hi = tl.load(s_rows, mask=s_mask, other=0.0)
        s_mid = tl.load(s_rows + H, mask=s_mask, other=0.0)
        s_lo = tl.load(s_rows + 2 * H, mask=s_mask, other=0.0)
        if need_grad_tokens:
            dz = _split_dot(s_hi, s_mid, w_hi, w_mid)
            _store_grad_tokens(dz, grad_base, add_base, t, t_mask, offs_dw, dw_mask, stride_grad_t, stride_add_t, add_grad)
        p = _parts_t_dot(s_hi, s_mid, s_lo, x, p)
        if is_first_d_tile:
            s_sum = _parts_t_dot(s_hi, s_mid, s_lo, ones, s_sum)
    acc_w1 += da[:, None] * p
    acc_b1 += da * tl.sum(s_sum, axis=1)
    return acc_w1, acc_b1


@triton.jit
def _prompt_out_bwd_split(
    zp_base,  # prompt_out[k] (B, Np, D) bfloat16: row (b, n) at zp_base + b * stride_b + n * stride_n
    stride_b,
    stride_n,
    grad_base,  # dZ_P[k] out, bfloat16, strides as stride_grad_b and stride_grad_n
    stride_grad_b,
    stride_grad_n,
    dh_ptr,  # (K * B * Np, 3, H) bfloat16: f_p's dL/dh, _store_split's parts (_dispatch_bwd_softmax_kernel)
    act_ptr,  # (K * B * Np, H) float32: gelu of f_p's pre-activations
    dlogits_ptr,  # (K * B * Np, K) float32
    row0,  # the row (k, b_lo, 0) of (K * B * Np)
    b_lo,  # the images [b_lo, b_hi) of this program
    b_hi,
    w1,  # (BLOCK_H, BLOCK_DW) W1[:, offs_dw] in the parameters' dtype, zero in padded rows and columns
    offs_dw,  # (BLOCK_DW,) the columns of Z_P this program owns
    is_first_d_tile,  # whether offs_dw is the first d-tile: the program that sums b1, W2 and b2
    acc_w1,  # (BLOCK_H, BLOCK_DW) float32
    acc_b1,  # (BLOCK_H,)
    acc_w2,  # (BLOCK_K, BLOCK_H)
    acc_b2,  # (BLOCK_K,)
    K,
    Np,
    D,
    H,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Backward of f_p over the bfloat16 prompt outputs of images [b_lo, b_hi) of expert k: writes
    dZ_P for the columns offs_dw and returns the accumulators plus their share.

    dL/dh of every row comes from the softmax's backward in bfloat16 parts, so the rows of all the
    images run as one matrix, BLOCK_R rows a tile (a tile of 16 prompts an image took GELU and its
    slope of every row in every d-tile's program, and a split into tf32 heads and rests, for 16
    rows): dZ_P = dh W1 takes the three largest of the products of the parts of dh and of W1 (it is
    stored in bfloat16), dW1 = dh^T Z_P sums the three parts' products (float32's accuracy)."""
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    dw_mask = offs_dw < D
    w_hi, w_mid, _ = _bf16x3(w1.to(tl.float32))
    s_sum = tl.zeros((BLOCK_H, 16), dtype=tl.float32)  # b1's gradient, as in _tokens_bwd_split
    ones = _first_column(BLOCK_R)
    rows = (b_hi - b_lo) * Np
    # Not software-pipelined: with its loads in flight across iterations, ptxas serialized every
    # wgmma of the kernel (C7515: "non wgmma instructions defining accumulator registers").
    for r0 in tl.range(0, rows, BLOCK_R, num_stages=1):
        r = r0 + tl.arange(0, BLOCK_R)
        r_mask = r < rows
        b = b_lo + r // Np
        n = r % Np
        x_mask = r_mask[:, None] & dw_mask[None, :]
        x = tl.load(zp_base + (b * stride_b + n * stride_n)[:, None] + offs_dw[None, :], mask=x_mask, other=0.0)
        h_rows = (row0 + r)[:, None] * H + offs_h[None, :]
        mask_h = r_mask[:, None] & h_mask[None, :]
        dh_rows = dh_ptr + 2 * (row0 + r)[:, None] * H + h_rows  # (row0 + r) * 3 * H + offs_h
        d_hi = tl.load(dh_rows, mask=mask_h, other=0.0)
        d_mid = tl.load(dh_rows + H, mask=mask_h, other=0.0)
        d_lo = tl.load(dh_rows + 2 * H, mask=mask_h, other=0.0)
        tl.store(
            grad_base + (b * stride_grad_b + n * stride_grad_n)[:, None] + offs_dw[None, :],
            _split_dot(d_hi, d_mid, w_hi, w_mid).to(grad_base.dtype.element_ty), mask=x_mask,
        )
        acc_w1 = _parts_t_dot(d_hi, d_mid, d_lo, x, acc_w1)
        if is_first_d_tile:
            s_sum = _parts_t_dot(d_hi, d_mid, d_lo, ones, s_sum)
            dl = tl.load(dlogits_ptr + (row0 + r)[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            a = tl.load(act_ptr + h_rows, mask=mask_h, other=0.0)
            acc_w2 = _dot(tl.trans(dl.to(w1.dtype)), a.to(w1.dtype), acc_w2)
            acc_b2 += tl.sum(dl, axis=0)
    acc_b1 += tl.sum(s_sum, axis=1)
    return acc_w1, acc_b1, acc_w2, acc_b2


@triton.jit
def _store_partial(
    partial_ptr,  # (C,) float32: this program's row of the partial-gradient buffer
    acc_w1,
    acc_b1,
    acc_w2,
    acc_b2,
    offs_dw,
    is_first_d_tile,
    K,
    D,
    H,
    HAS_HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Writes the accumulators into the packed row [W1 (H*D) | b1 (H) | W2 (K*H or K*D) | b2 (K)].

    The gradients of b1, b2 and (with a hidden layer) W2 do not depend on the d-tile: the program
    owning the first d-tile writes them, so every column is written once, and only it sums their
    per-tile terms (the other programs' accumulators of them are incomplete and never stored)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    h_mask = offs_h < H
    k_mask = offs_k < K
    dw_mask = offs_dw < D
    off_w2 = H * D + H
    if HAS_HIDDEN:
        off_b2 = off_w2 + K * H
        tl.store(partial_ptr + offs_h[:, None] * D + offs_dw[None, :], acc_w1, mask=h_mask[:, None] & dw_mask[None, :])
        if is_first_d_tile:
            tl.store(partial_ptr + H * D + offs_h, acc_b1, mask=h_mask)
            tl.store(
                partial_ptr + off_w2 + offs_k[:, None] * H + offs_h[None, :],
                acc_w2,
                mask=k_mask[:, None] & h_mask[None, :],
            )
    else:
        off_b2 = off_w2 + K * D
        tl.store(
            partial_ptr + off_w2 + offs_k[:, None] * D + offs_dw[None, :], acc_w2, mask=k_mask[:, None] & dw_mask[None, :]
        )
    if is_first_d_tile:
        tl.store(partial_ptr + off_b2 + offs_k, acc_b2, mask=k_mask)


@triton.jit
def _store_grad_tokens(
    dx,  # (BLOCK_T, BLOCK_DW) float32: dZ of tokens t, columns offs_dw
    grad_base,  # dZ[k, b] out
    add_base,  # grad_add[k, b]
    t,
    t_mask,
    offs_dw,
    dw_mask,
    stride_grad_tokens_t,
    stride_grad_add_t,
    add_grad,
):
    """Store dZ, or dZ + grad_add when add_grad, for tokens t of one (k, b)."""
    mask = t_mask[:, None] & dw_mask[None, :]
    if add_grad:
        dx += tl.load(add_base + t[:, None] * stride_grad_add_t + offs_dw[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_base + t[:, None] * stride_grad_tokens_t + offs_dw[None, :], dx.to(grad_base.dtype.element_ty), mask=mask)


# Triton would compile a flag equal to 1 as a constant, a second variant of the whole kernel.
@triton.jit(do_not_specialize=["has_prompt_out", "need_grad_tokens", "add_grad"])
def _dispatch_bwd_kernel(
    prompts_ptr,  # (K, Np, D)
    tokens_ptr,  # (K, B, T, D), any strides with stride(-1) == 1
    prompt_out_ptr,  # (K, B, Np, D); a placeholder when has_prompt_out is 0
    tok_range_ptr,  # (K, 2) int32
    grad_ipt_ptr,  # (K, B, Np, D) dL/d ipt, any strides
    weights_ptr,  # (K, B, Np, K) float32, contiguous
    dlogits_ptr,  # (K, B, Np, K) float32, contiguous, from _dispatch_bwd_softmax_kernel
    hidden_e_ptr,  # (K, Np, H) float32, as the forward stored them: pre-activations of P,
    hidden_p_ptr,  # (K, B, Np, H)    of Z_P,
    slopes_z_ptr,  # (K, B, T, H)     the tokens' GELU slopes (``slopes_shape``),
    act_sums_z_ptr,  # (K, B, H)      and each (k, b)'s sum over its tokens of gelu; the four are
    #                  placeholders when HAS_HIDDEN is False, and hidden_p when has_prompt_out is 0
    dh_p_ptr,  # (K, B, Np, 3, H) bfloat16: f_p's dL/dh from _dispatch_bwd_softmax_kernel (bf16
    #            prompt outputs), else a float32 placeholder; a bfloat16 one without prompt_out
    act_p_ptr,  # (K, B, Np, H) float32: gelu of f_p's pre-activations, beside dh_p; else a placeholder
    w1e_ptr,  # (H, D) f_e; W1 is a placeholder when HAS_HIDDEN is False
    w2e_ptr,  # (K, H), or (K, D) when H = 0
    w1p_ptr,  # (H, D) f_p
    w2p_ptr,  # (K, H) or (K, D)
    w1z_ptr,  # (H, D) f_z
    w2z_ptr,  # (K, H) or (K, D)
    grad_prompts_ptr,  # (K, Np, D) out, contiguous, the prompts' dtype
    grad_tokens_ptr,  # (K, B, T, D) out, the tokens' dtype, stride(-1) == 1; a placeholder unless need_grad_tokens
    grad_prompt_out_ptr,  # (K, B, Np, D) out, the tokens' dtype, stride(-1) == 1; a placeholder without prompt_out
    grad_add_ptr,  # (K, B, T, D) the tokens' dtype, stride(-1) == 1: added to dZ when add_grad; else a placeholder
    partials_ptr,  # (R, C) out, float32: one row of weight gradients per row group
    stride_prompts_k,
    stride_prompts_n,
    stride_tokens_k,
    stride_tokens_b,
    stride_tokens_t,
    stride_prompt_out_k,
    stride_prompt_out_b,
    stride_prompt_out_n,
    stride_grad_k,
    stride_grad_b,
    stride_grad_n,
    stride_grad_d,  # autograd may hand over any strides: .sum()'s gradient is an expand, stride 0
    stride_grad_tokens_k,
    stride_grad_tokens_b,
    stride_grad_tokens_t,
    stride_grad_prompt_out_k,
    stride_grad_prompt_out_b,
    stride_grad_prompt_out_n,
    stride_grad_add_k,
    stride_grad_add_b,
    stride_grad_add_t,
    stride_w1e_h,
    stride_w2e_k,
    stride_w1p_h,
    stride_w2p_k,
    stride_w1z_h,
    stride_w2z_k,
    B,
    K,
    Np,
    T,
    D,
    H,
    C,  # columns of a partial row: H*D + H + K*H + K, or K*D + K when H = 0
    B_PER_PROG,  # batch rows per expert program: K * ceil(B / B_PER_PROG) row groups per source
    N_PER_PROG,  # prompts per prompt program
    row_p0,  # first partial row of f_p (one per expert row group)
    row_z0,  # first partial row of f_z
    row_e0,  # first partial row of f_e (one per prompt group)
    has_prompt_out,  # 0 or 1, a run-time switch: one compiled variant serves both cases
    need_grad_tokens,  # 0 or 1: 0 skips writing dZ (K*B*T*D elements) when the tokens need none
    add_grad,  # 0 or 1: 1 writes dZ + grad_add, the tokens' whole gradient, and saves a pass over it
    HAS_HIDDEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DW: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_KB: tl.constexpr,
):
    """Program (d-tile, group). The first K * ceil(B / B_PER_PROG) groups are (expert k, batch
    rows): the backward of f_p over Z_P and of f_z over Z. The others are groups of prompts:
    the backward of f_e over P[:, n] and the fusion gradient of P[:, n]."""
    pid_d = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_dw = pid_d * BLOCK_DW + tl.arange(0, BLOCK_DW)
    dw_mask = offs_dw < D
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    is_first_d_tile = pid_d == 0
    b_groups = tl.cdiv(B, B_PER_PROG)
    if pid_g < K * b_groups:
        k = pid_g // b_groups
        b_lo = (pid_g % b_groups) * B_PER_PROG
        b_hi = tl.minimum(b_lo + B_PER_PROG, B)
        offs_n = tl.arange(0, BLOCK_N)
        if has_prompt_out:
            acc_w1, acc_b1, acc_w2, acc_b2 = _grad_accumulators(HAS_HIDDEN, BLOCK_H, BLOCK_K, BLOCK_DW)
            w1 = _load_w1_tile(w1p_ptr, stride_w1p_h, offs_dw, D, H, BLOCK_H)
            if dh_p_ptr.dtype.element_ty == tl.bfloat16:  # bf16 prompt outputs: dL/dh from the softmax's backward
                acc_w1, acc_b1, acc_w2, acc_b2 = _prompt_out_bwd_split(
                    prompt_out_ptr + k * stride_prompt_out_k, stride_prompt_out_b, stride_prompt_out_n,
                    grad_prompt_out_ptr + k * stride_grad_prompt_out_k, stride_grad_prompt_out_b, stride_grad_prompt_out_n,
                    dh_p_ptr, act_p_ptr, dlogits_ptr, (k * B + b_lo) * Np, b_lo, b_hi, w1, offs_dw, is_first_d_tile,
                    acc_w1, acc_b1, acc_w2, acc_b2, K, Np, D, H, BLOCK_T, BLOCK_H, BLOCK_K,
                )
            else:
                for b in range(b_lo, b_hi):
                    for n0 in range(0, Np, BLOCK_N):
                        n = n0 + offs_n
                        n_mask = n < Np
                        row = (k * B + b) * Np + n
                        dl = tl.load(
                            dlogits_ptr + row[:, None] * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                            other=0.0,
                        )
                        dx, acc_w1, acc_b1, acc_w2, acc_b2 = _mlp_bwd_tile(
                            prompt_out_ptr + k * stride_prompt_out_k + b * stride_prompt_out_b + n * stride_prompt_out_n,
                            hidden_p_ptr + row * H, n_mask, dl, offs_dw, is_first_d_tile, w1, w2p_ptr, stride_w2p_k,
                            acc_w1, acc_b1, acc_w2, acc_b2,
                            K, D, H, HAS_HIDDEN, BLOCK_N, BLOCK_H, BLOCK_K,
                        )
                        tl.store(
                            grad_prompt_out_ptr + k * stride_grad_prompt_out_k + b * stride_grad_prompt_out_b
                            + n[:, None] * stride_grad_prompt_out_n + offs_dw[None, :],
                            dx.to(grad_prompt_out_ptr.dtype.element_ty),
                            mask=n_mask[:, None] & dw_mask[None, :],
                        )
            _store_partial(
                partials_ptr + (row_p0 + pid_g).to(tl.int64) * C, acc_w1, acc_b1, acc_w2, acc_b2, offs_dw, is_first_d_tile,
                K, D, H, HAS_HIDDEN, BLOCK_H, BLOCK_K,
            )

        # f_z: every token of (k, b) in [start, end) receives the same dL/d f = sum_n dlogits / count,
        # so dL/d(gelu) = dL/df W2 is one row for all of them (without a hidden layer, dL/dx
        # itself), and W2's gradient is dL/df times the sum over the tokens of gelu (or of x):
        # only W1's two products run per token tile.
        start = tl.load(tok_range_ptr + 2 * k)
        end = tl.load(tok_range_ptr + 2 * k + 1)
        count = (end - start).to(tl.float32)
        offs_t = tl.arange(0, BLOCK_T)
        acc_w1, acc_b1, acc_w2, acc_b2 = _grad_accumulators(HAS_HIDDEN, BLOCK_H, BLOCK_K, BLOCK_DW)
        if HAS_HIDDEN:
            offs_w2 = tl.arange(0, BLOCK_H)
            w2_cols = H
        else:
            offs_w2 = offs_dw
            w2_cols = D
        w2 = tl.load(
            w2z_ptr + offs_k[:, None] * stride_w2z_k + offs_w2[None, :],
            mask=k_mask[:, None] & (offs_w2 < w2_cols)[None, :],
            other=0.0,
        ).to(tl.float32)  # (BLOCK_K, BLOCK_H), or (BLOCK_K, BLOCK_DW) when H = 0
        # Split slopes load W1's d-tile again for each image (below, from L1/L2): held across the
        # images beside the split path's accumulators, it took the launch from 112 bytes of
        # spills a thread to 304 (sm_90a, Triton 3.8, before the prompt outputs' split path).
        if slopes_z_ptr.dtype.element_ty != tl.bfloat16:
            w1 = _load_w1_tile(w1z_ptr, stride_w1z_h, offs_dw, D, H, BLOCK_H)
        for b in range(b_lo, b_hi):
            dl_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for n0 in range(0, Np, BLOCK_N):
                n = n0 + offs_n
                row = (k * B + b) * Np + n
                dl = tl.load(
                    dlogits_ptr + row[:, None] * K + offs_k[None, :], mask=(n < Np)[:, None] & k_mask[None, :], other=0.0
                )
                dl_sum += tl.sum(dl, axis=0)
            dl_token = dl_sum / count
            acc_b2 += dl_sum
            da = tl.sum(dl_token[:, None] * w2, axis=0)
            # The tokens' sum of gelu (the forward's), or of x (the tiles below).
            if HAS_HIDDEN:
                a_sum = tl.load(act_sums_z_ptr + (k * B + b) * H + offs_w2, mask=offs_w2 < H, other=0.0)
            else:
                a_sum = tl.zeros(da.shape, dtype=tl.float32)
            tok_base = tokens_ptr + k * stride_tokens_k + b * stride_tokens_b
            grad_base = grad_tokens_ptr + k * stride_grad_tokens_k + b * stride_grad_tokens_b
            add_base = grad_add_ptr + k * stride_grad_add_k + b * stride_grad_add_b
            if slopes_z_ptr.dtype.element_ty == tl.bfloat16:  # bf16 tokens: the forward split the slopes
                acc_w1, acc_b1 = _tokens_bwd_split(
                    tok_base, stride_tokens_t, slopes_z_ptr + (k * B + b) * T * 3 * H, start, end, da,
                    _load_w1_tile(w1z_ptr, stride_w1z_h, offs_dw, D, H, BLOCK_H), offs_dw,
                    is_first_d_tile, acc_w1, acc_b1, grad_base, add_base, stride_grad_tokens_t, stride_grad_add_t,
                    need_grad_tokens, add_grad, D, H, BLOCK_T, BLOCK_H,
                )
            else:
                for t0 in range(start, end, BLOCK_T):
                    t = t0 + offs_t
                    t_mask = t < end
                    dx, acc_w1, acc_b1, a_sum = _token_tile_bwd(
                        tok_base + t * stride_tokens_t, slopes_z_ptr + ((k * B + b) * T + t) * H, t_mask, da, offs_dw,
                        is_first_d_tile, w1, acc_w1, acc_b1, a_sum, D, H, HAS_HIDDEN, BLOCK_T, BLOCK_H,
                    )
                    if need_grad_tokens:
                        _store_grad_tokens(
                            dx, grad_base, add_base, t, t_mask, offs_dw, dw_mask,
                            stride_grad_tokens_t, stride_grad_add_t, add_grad,
                        )
            acc_w2 += dl_token[:, None] * a_sum[None, :]
            if need_grad_tokens:
                # Tokens outside [start, end) do not enter the mean: dZ is zero there. Writing it
                # here saves zero-filling all of dZ beforehand.
                for t0 in range(0, start, BLOCK_T):
                    t = t0 + offs_t
                    _store_grad_tokens(
                        tl.zeros((BLOCK_T, BLOCK_DW), dtype=tl.float32), grad_base, add_base, t, t < start,
                        offs_dw, dw_mask, stride_grad_tokens_t, stride_grad_add_t, add_grad,
                    )
                for t0 in range(end, T, BLOCK_T):
                    t = t0 + offs_t
                    _store_grad_tokens(
                        tl.zeros((BLOCK_T, BLOCK_DW), dtype=tl.float32), grad_base, add_base, t, t < T,
                        offs_dw, dw_mask, stride_grad_tokens_t, stride_grad_add_t, add_grad,
                    )
        _store_partial(
            partials_ptr + (row_z0 + pid_g).to(tl.int64) * C, acc_w1, acc_b1, acc_w2, acc_b2, offs_dw, is_first_d_tile,
            K, D, H, HAS_HIDDEN, BLOCK_H, BLOCK_K,
        )
    else:
        group = pid_g - K * b_groups
        n_lo = group * N_PER_PROG
        n_hi = tl.minimum(n_lo + N_PER_PROG, Np)
        offs_kb = tl.arange(0, BLOCK_KB)
        acc_w1, acc_b1, acc_w2, acc_b2 = _grad_accumulators(HAS_HIDDEN, BLOCK_H, BLOCK_K, BLOCK_DW)
        w1 = _load_w1_tile(w1e_ptr, stride_w1e_h, offs_dw, D, H, BLOCK_H)
        for n in range(n_lo, n_hi):
            # f_e on the K rows P[:, n] (padded to BLOCK_K >= 16 rows for tl.dot): its dL/d f is
            # the sum over the batch of dlogits[k, b, n].
            dl = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
            for b in range(0, B):
                row = (offs_k * B + b) * Np + n
                dl += tl.load(
                    dlogits_ptr + row[:, None] * K + offs_k[None, :], mask=k_mask[:, None] & k_mask[None, :], other=0.0
                )
            dx, acc_w1, acc_b1, acc_w2, acc_b2 = _mlp_bwd_tile(
                prompts_ptr + offs_k * stride_prompts_k + n * stride_prompts_n, hidden_e_ptr + (offs_k * Np + n) * H,
                k_mask, dl, offs_dw, is_first_d_tile, w1, w2e_ptr, stride_w2e_k,
                acc_w1, acc_b1, acc_w2, acc_b2,
                K, D, H, HAS_HIDDEN, BLOCK_K, BLOCK_H, BLOCK_K,
            )
            # Fusion: dP[j, n, :] += sum_{k,b} weights[k, b, n, j] grad_ipt[k, b, n, :], a GEMM
            # (BLOCK_K x K*B) @ (K*B x BLOCK_DW) over the rows of prompt n. In float32, as the
            # reference mixes in float32.
            for kb0 in range(0, K * B, BLOCK_KB):
                kb = kb0 + offs_kb
                kb_mask = kb < K * B
                w_t = tl.load(
                    weights_ptr + (kb[None, :] * Np + n) * K + offs_k[:, None],
                    mask=kb_mask[None, :] & k_mask[:, None],
                    other=0.0,
                )  # (BLOCK_K, BLOCK_KB)
                g = tl.load(
                    grad_ipt_ptr + (kb // B)[:, None] * stride_grad_k + (kb % B)[:, None] * stride_grad_b
                    + n * stride_grad_n + offs_dw[None, :] * stride_grad_d,
                    mask=kb_mask[:, None] & dw_mask[None, :],
                    other=0.0,
                )  # (BLOCK_KB, BLOCK_DW)
                dx = tl.dot(w_t, g.to(tl.float32), dx, input_precision="tf32x3")
            tl.store(
                grad_prompts_ptr + (offs_k[:, None] * Np + n) * D + offs_dw[None, :],
                dx.to(grad_prompts_ptr.dtype.element_ty),
                mask=k_mask[:, None] & dw_mask[None, :],
            )
        _store_partial(
            partials_ptr + (row_e0 + group).to(tl.int64) * C, acc_w1, acc_b1, acc_w2, acc_b2, offs_dw, is_first_d_tile,
            K, D, H, HAS_HIDDEN, BLOCK_H, BLOCK_K,
        )


@triton.jit
def _dispatch_bwd_reduce_kernel(
    partials_ptr,  # (R, C) float32
    out_ptr,  # (G, C) out, the parameters' dtype: packed [W1 | b1 | W2 | b2] gradients per group
    C,
    row_e0,  # f_e's partial rows are [row_e0, row_e1), f_p's [row_p0, row_p1), f_z's [row_z0, row_z1)
    row_e1,
    row_p0,
    row_p1,
    row_z0,
    row_z1,
    group_e,  # the output row each source's gradients add into (the same row for shared MLPs)
    group_p,
    group_z,
    BLOCK_C: tl.constexpr,
):
    """Program (column block, group): sums the partial rows of every source in the group, in a
    fixed order, so the weight gradients are bitwise reproducible."""
    pid_c = tl.program_id(0)
    group = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if group_e == group:
        for r in range(row_e0, row_e1):
            acc += tl.load(partials_ptr + tl.cast(r, tl.int64) * C + cols, mask=mask, other=0.0)
    if group_p == group:
        for r in range(row_p0, row_p1):
            acc += tl.load(partials_ptr + tl.cast(r, tl.int64) * C + cols, mask=mask, other=0.0)
    if group_z == group:
        for r in range(row_z0, row_z1):
            acc += tl.load(partials_ptr + tl.cast(r, tl.int64) * C + cols, mask=mask, other=0.0)
    tl.store(out_ptr + group.to(tl.int64) * C + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

MAX_EXPERTS = 16  # K: the logits tile is BLOCK_K = 16 wide, the minimum tl.dot takes
MAX_HIDDEN = 128  # H: BLOCK_H is 64 or 128; each wider one is one more variant per dtype to build
BLOCK_ENV = "PMOE_TRITON_BLOCKS"
# Warps per program, timed on an H100 (benchmarks/results/triton_tuning_h100.txt: K=6, B=32, T=197,
# D=768, H=64, bf16 tokens, fp32 prompts and dispatcher). The forward's best count depends on the
# prompts: at Np=10 it took 144 us with 4 warps against 391 with 8, at Np=50 1508 us with 4 against
# 458 with 8 (``_forward_warps``). The main backward with 4 warps: forward+backward at Np=10 took
# 821 us with 4 and 4 warps against 1283 with 4 and 8. Its 4 warps spill more registers than 8 do
# and still ran faster (then 128 bytes a thread against 28 as the model launches it). Those timings
# predate the backward's bfloat16 tiles over bf16 activations (``_tokens_bwd_split``), which spill
# 240 bytes at 4 warps and 112 at 8 (untimed). A small batch's forward takes 8 (``_forward_warps``).
_NUM_WARPS = {"fwd": 4, "fwd_many_prompts": 8, "fwd_small_batch": 8, "bwd_softmax": 4, "bwd": 4, "bwd_reduce": 4}
_NUM_STAGES = {"fwd": 3, "bwd_softmax": 3, "bwd": 2, "bwd_reduce": 3}


def _forward_warps(Np: int, block_n: int, small_batch: bool) -> int:
    """The forward's warps (the key FWD_WARPS of ``default_blocks``): for a large batch
    ``_NUM_WARPS["fwd"]`` while the prompts fit one BLOCK_N tile, else
    ``_NUM_WARPS["fwd_many_prompts"]`` (timed at Np = 10 and 50 only; see ``_NUM_WARPS``).

    A small batch takes ``_NUM_WARPS["fwd_small_batch"]``, 8: its grid is about a program an SM (108
    programs at K = 6, B = 1, Np = 10), each a chain of dependent D steps, and the forward's latency is the
    longest chain (a token chunk's or f_p's since f_e runs in pieces, then the mixture of the group
    it completes). 8 warps split each step's tiles over twice the threads; in the sm_90a SASS of the
    B = 1 launch (K = 6, Np = 10, Triton 3.8) a warp's D step takes 368 instructions in f_e's
    program, not 544, 241 in a token chunk's, not 343, and 52 in the mixture's step of two experts,
    not 92, at 210 registers, no spills and the same 60 KB of shared memory: one program an SM,
    where 4 warps at 208 registers fit two. The generic small-batch variants (no alignment hints)
    spill up to 156 bytes a thread, where with 4 warps they spilled up to 308
    (benchmarks/triton_resources.py). Untimed on a GPU (``benchmarks/forward_small_batch.py`` times
    FWD_WARPS=4 beside it)."""
    if small_batch:
        return _NUM_WARPS["fwd_small_batch"]
    return _NUM_WARPS["fwd"] if Np <= block_n else _NUM_WARPS["fwd_many_prompts"]


def _prompt_blocks(
    Np: int, block_n: int, block_h: int, block_t_fwd: int, block_d_fwd: int, small_batch: bool
) -> tuple[int, int, int, int]:
    """(BLOCK_P, BLOCK_ZP, BLOCK_D_MIX, B_PER_FIN): the rows of f_e's tiles and of f_p's, the D
    step of the prompt mixture, and the images one program finishes. While the prompts fit one
    BLOCK_N tile, BLOCK_N rows and, for a large batch, the forward's own D step.

    f_p's tiles take the rows of Z_P[k] as one (B * Np, D) matrix, several images a tile. For a
    large batch they are a token chunk's tile (BLOCK_T_FWD rows, ``_forward_blocks``): 64 rows a
    warpgroup's wgmma (at Np = 10 a program per image padded its 10 rows to 16 on mma.sync). In
    the sm_90a SASS (Triton 3.8) of the launch at K = 6, B = 32, Np = 10, f_p's D step took 208
    instructions a warp for 16 rows, 192 programs of one tile; it takes 204 for 64 rows, 30
    programs (167 registers, was 166, no spills). At Np = 50, 192 programs of two 32-row tiles
    (8 warps, 208 instructions a step) became 150 of one 64-row tile (181), 178 registers where
    the launch took 182, and with 8 warps' two warpgroups 78 of one 128-row tile (164
    instructions a step, 4 barriers where 64 rows took 16; ``_forward_blocks``). A small batch
    keeps BLOCK_P rows: B = 1 takes f_p's one tile an expert as before; so does H > 64, whose
    generic 4-warp variants spilled up to 120 bytes a thread with 64 rows against none.

    More prompts take the forward's 8-warp variant (``_forward_warps``), and with it f_e's tiles
    of 32 rows, 2 walks over D at Np = 50 where 16-row tiles took 4. (64 rows, one walk, took
    all 255 registers and 57 KB of shared memory as launched, and spilled up to 1.2 KB a thread
    in the generic variants.) The mixture steps through D 128 at a time: each step waits on its loads of P
    (``_softmax_and_mix``), and a group of images at Np = 50 takes 4 prompt tiles x 6 steps where
    the forward's 32-wide step took 4 x 24. On sm_90a (Triton 3.8) the launch at K = 6, B = 32,
    Np = 50 took 184 registers against 178, no spills, the same 36 KB of shared memory
    (benchmarks/triton_resources.py --launched); the generic small-batch variants for many prompts
    with fp32 parameters and H = 64 spill 28-40 bytes a thread, where they spilled none. Untimed on
    a GPU.

    A large batch finishes its images in groups of 4: each tile of P a program mixes serves them all
    (a program per image read all of P, K*Np*D, from L2 for every image). A small batch
    (``_forward_blocks``) has few images, and the mixture is on the path every IPT waits for: each
    image is its own group (a group of 4 at B = 1 mixed three empty images, its accumulator 4x the
    tile), so its finish can start as soon as its own programs are done (the last of f_e's pieces
    serves every group of its expert and may still finish several in turn), and steps through D
    128 at a time, 6 steps where the forward's 64 took 12, each waiting on its loads of P from L2.
    In the sm_90a SASS of the B = 1 launch (K = 6, Np = 10, Triton 3.8) the mixture's D loop ran
    12 steps of 617 instructions, then 6 of 378, at the same 255 registers, no spills and 60 KB of
    shared memory (each step's loop over experts, four a step in 299 instructions with 16 barriers, takes two a
    step in 92, none, since ``_softmax_and_mix`` reads the weights back from memory). The generic
    4-warp small-batch variants, without the launch's alignment hints, spilled more: up to 212 bytes
    a thread where they spilled 136 (benchmarks/triton_resources.py). (Steps of 256 took 3 of 619,
    but the generic 4-warp variants then spilled up to 288 bytes a thread, four loads of a 16 x 256
    tile of P taking 128 registers.) Untimed on a GPU."""
    block_p = block_n if Np <= block_n else 32
    if small_batch:
        return block_p, block_p, 128, 1
    return block_p, (block_t_fwd if block_h <= 64 else block_p), (block_d_fwd if Np <= block_n else 128), 4


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers: ``triton.cdiv`` called from Python is a jit function, whose
    call costs microseconds of host time."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The SM count of a CUDA device, asked once (the launchers size their grids by it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _hidden_blocks(H: int) -> int:
    """BLOCK_H: 64 or 128 (H <= 64 pads to 64: one compiled variant serves every small H,
    and the dot over a padded hidden tile costs little in these memory-bound kernels); 16, unused,
    without a hidden layer."""
    return 16 if H == 0 else max(64, 1 << (H - 1).bit_length())


def _forward_blocks(block_h: int, small_batch: bool, warps: int) -> tuple[int, int, int]:
    """(BLOCK_T_FWD, BLOCK_T_FWD_T, BLOCK_D_FWD): the forward's token chunk, its token chunk when
    the chunks compute W1 Z^T (``tokens_transposed``), and its D step, for ``warps`` warps.

    A large batch's token chunk is 64 tokens a warpgroup (H <= 64): each warpgroup's wgmma takes
    64 tokens by all of BLOCK_H. With 64 tokens at 8 warps the two warpgroups split BLOCK_H instead
    and passed the accumulator through shared memory in every D step: in the sm_90a SASS of the
    launch at K = 6, B = 32, Np = 50 (Triton 3.8; Triton 3.6 alike) a step took 181 instructions a
    warp with 16 barriers for 64 tokens, and takes 164 with 4 for 128, under half the instructions
    a token, at 215 registers where it took 170 (one program an SM either way; no spills). A
    BLOCK_H of 128 keeps 64 tokens: its generic 8-warp variants spilled up to 164 bytes a thread
    with 128, where they spill up to 40. W1 Z^T takes 128 tokens on one warpgroup (a wgmma of 64
    hidden units by 128 tokens, ``_tokens_hidden_t``); Z W1^T on 128 tokens at 4 warps, two wgmmas
    of 64 tokens, took 292 instructions a step, 250 registers as launched, and its generic
    variants spilled up to 516 bytes a thread (benchmarks/triton_resources.py). Untimed on a GPU.

    The W1 tile (BLOCK_D_FWD x BLOCK_H) of the forward's D loop is pipelined through shared memory,
    three stages deep: 2048 elements a stage keep every large-batch forward variant within 24
    bytes of spills a thread on sm_90, and the model's launches at 168-215 registers without
    spills (4096, BLOCK_D=64 at H=64 with chunks of 64 tokens, takes all 255 and 80 KB of shared
    memory as launched; benchmarks/triton_resources.py, --launched).

    A small batch (B = 1 at inference; ``default_blocks`` says when) leaves most SMs idle: the
    forward's latency is the chain of dependent D steps each program walks. Chunks of 16 tokens
    share the tokens among 4x the programs (13 an image at T = 197, beside an expert's f_p tile
    and 4 f_e pieces: 108 programs at K = 6, under one wave at two programs an SM), and with their smaller token tiles a W1 tile of
    4096 elements, half the steps, fits: the model's B = 1 launch takes 255 registers without
    spills and 60 KB of shared memory (the generic variants spill up to 136 bytes). CUDA-graph
    replays of one forward on an H100 (T=197, D=768, H=64, Np=10, bf16 tokens;
    benchmarks/results/forward_small_batch_h100.txt): at B = 1 these blocks took 36.3 us at K = 2
    and 50.9 at K = 6, against 46.1 and 80.9 with the large-batch ones; at K = 6, B = 32 chunks of
    16 tokens took 418 us and the wider D step 202, against 148. (8192 elements, BLOCK_D=128 at
    H=64, took 46.7 us at K = 6, B = 1, but spills and needs 120 KB of shared memory on sm_90a
    with Triton 3.8.)"""
    if small_batch:
        return 16, 16, 4096 // max(block_h, 64)
    return (64 * max(1, warps // 4) if block_h <= 64 else 64), 128, 2048 // max(block_h, 64)


def default_blocks(K: int, B: int, Np: int, D: int, H: int, device: torch.device) -> dict[str, int]:
    """Block sizes and work split for one shape, without autotuning."""
    block_h = _hidden_blocks(H)
    # Registers of the backward: dW1's accumulator (BLOCK_H x BLOCK_DW) and the W1 tile at 4096
    # floats each, 32 a thread at the backward's 4 warps, beside the hidden tiles (BLOCK_T x BLOCK_H) and the
    # heads and rests of their split products; BLOCK_H = 128 takes a narrower d-tile and half the rows.
    block_dw = 4096 // max(block_h, 64)
    block_t = 32 if block_h <= 64 else 16
    # The backward's softmax kernel steps through D as the large-batch forward does.
    block_d = _forward_blocks(block_h, small_batch=False, warps=_NUM_WARPS["fwd"])[2]
    small_batch = device.type == "cuda" and K * B * 8 <= multiprocessors(device)
    block_n = 16
    fwd_warps = _forward_warps(Np, block_n, small_batch)
    block_t_fwd, block_t_fwd_t, block_d_fwd = _forward_blocks(block_h, small_batch, fwd_warps)
    block_p, block_zp, block_d_mix, b_per_fin = _prompt_blocks(Np, block_n, block_h, block_t_fwd, block_d_fwd, small_batch)
    d_tiles = cdiv(D, block_dw)
    if device.type == "cuda":
        # Two programs per SM: enough to hide memory latency, few enough that the partial weight
        # gradients (one C-float row per row group) stay small next to the tokens.
        programs = 2 * multiprocessors(device)
        b_groups = max(1, min(B, programs // (K * d_tiles)))
        n_groups = max(1, min(Np, programs // d_tiles))
    else:
        # The interpreter: a small grid that still splits the batch and the prompts, so the
        # tests cover the partial-gradient reduction.
        b_groups, n_groups = min(B, 2), min(Np, 2)
    return {
        "BLOCK_T_FWD": block_t_fwd,
        "BLOCK_T_FWD_T": block_t_fwd_t,
        "BLOCK_D_FWD": block_d_fwd,
        "BLOCK_T": block_t,
        # The backward's tile of bf16 rows (tokens and prompt outputs, ``_tokens_bwd_split``): 64,
        # the rows of one warpgroup's wgmma; 128 spills over a kilobyte a thread at 4 warps.
        "BLOCK_T_SPLIT": 64,
        "BLOCK_N": block_n,
        "BLOCK_P": block_p,
        "BLOCK_ZP": block_zp,
        # The columns of P each of f_e's pieces multiplies: 4 pieces at D = 768, each 6 of a
        # large batch's D steps (3 of a small batch's), a third of a token chunk's walk or less.
        "BLOCK_D_E": 192,
        "BLOCK_D": block_d,
        "BLOCK_D_MIX": block_d_mix,
        "BLOCK_DW": block_dw,
        "BLOCK_H": block_h,
        "BLOCK_KB": 32,
        "BLOCK_C": 512,
        "B_PER_FIN": b_per_fin,
        "FWD_WARPS": fwd_warps,
        # The forward's token chunks as W1 Z^T where they can (``tokens_transposed``).
        "TOKENS_T": 1,
        # The forward's float32 products: _dot_fwd's split for a small batch, tf32x3 for a large.
        "ROUND_FP32": int(small_batch),
        "B_PER_PROG": cdiv(B, b_groups),
        "N_PER_PROG": cdiv(Np, n_groups),
    }


def dispatch_blocks(K: int, B: int, Np: int, D: int, H: int, device: torch.device) -> Mapping[str, int]:
    """The block sizes the launchers use (read-only): ``default_blocks``, with any of them pinned by
    ``PMOE_TRITON_BLOCKS="BLOCK_D=32,B_PER_PROG=1"`` for debugging (tl.dot needs every row,
    column and step key >= 16 on a GPU: BLOCK_T, BLOCK_T_FWD, BLOCK_T_FWD_T, BLOCK_T_SPLIT, BLOCK_N,
    BLOCK_P, BLOCK_ZP, BLOCK_D, BLOCK_D_FWD, BLOCK_DW, BLOCK_H and BLOCK_KB)."""
    key = (K, B, Np, D, H, device, os.environ.get(BLOCK_ENV, "").strip())
    if key not in _BLOCKS:
        if len(_BLOCKS) >= 256:  # shapes that keep changing: forget the old ones
            _BLOCKS.clear()
        _BLOCKS[key] = _pinned_blocks(*key)
    return _BLOCKS[key]


# dispatch_blocks' answers, once per shape and pinning: at B = 1 the host's time is the launch's.
# (A plain dict: torch.compile traces through it, where it would warn about functools' caches.)
_BLOCKS: dict = {}


def _pinned_blocks(K: int, B: int, Np: int, D: int, H: int, device: torch.device, pinned: str) -> Mapping[str, int]:
    blocks = default_blocks(K, B, Np, D, H, device)
    if pinned:
        for item in pinned.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in blocks or not value.strip().isdigit():
                raise ValueError(f"{BLOCK_ENV}: cannot read {item!r}; expected KEY=INT with KEY one of {tuple(blocks)}")
            if key.startswith("BLOCK_") and int(value) < 1:
                raise ValueError(f"{BLOCK_ENV}: {key} must be at least 1, got {item!r}")
            blocks[key] = int(value)
    return types.MappingProxyType(blocks)


def _hidden_width(params: Params) -> int:
    w1 = params[0]
    return 0 if w1 is None else w1.shape[0]


def check_shapes(prompts, tokens, tok_start, tok_end, prompt_out) -> tuple[int, int, int, int, int]:
    """Raises ValueError unless prompts (K, Np, D), tokens (K, B, T, D), prompt_out (K, B, Np, D) or
    None and the K token ranges fit together; returns (K, B, Np, T, D)."""
    if prompts.dim() != 3 or tokens.dim() != 4:
        raise ValueError(
            f"prompts must be (K, Np, D) and tokens (K, B, T, D), got {tuple(prompts.shape)} and {tuple(tokens.shape)}"
        )
    K, Np, D = prompts.shape
    _, B, T, _ = tokens.shape
    if tokens.shape[0] != K or tokens.shape[3] != D:
        raise ValueError(f"tokens must be (K={K}, B, T, D={D}), got {tuple(tokens.shape)}")
    if Np < 1:
        raise ValueError(f"prompts must hold at least one prompt token (Np >= 1), got shape {tuple(prompts.shape)}")
    if B < 1:
        raise ValueError(f"tokens must hold at least one image (B >= 1), got shape {tuple(tokens.shape)}")
    if prompt_out is not None and tuple(prompt_out.shape) != (K, B, Np, D):
        raise ValueError(f"prompt_out must be (K={K}, B={B}, Np={Np}, D={D}), got {tuple(prompt_out.shape)}")
    if len(tok_start) != K or len(tok_end) != K:
        raise ValueError(f"tok_start and tok_end must hold K={K} ints, got {len(tok_start)} and {len(tok_end)}")
    for k, (s, e) in enumerate(zip(tok_start, tok_end)):
        if not 0 <= s < e <= T:
            raise ValueError(f"expert {k}: the token range [{s}, {e}) must satisfy 0 <= start < end <= T={T}")
    return K, B, Np, T, D


def _check_args(prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z) -> int:
    """Raises ValueError for arguments that do not form the op or that the kernels cannot run
    (``triton_not_supported_reasons``: strides, dtypes, K, sizes); returns H."""
    K, _, _, _, D = check_shapes(prompts, tokens, tok_start, tok_end, prompt_out)
    H = _hidden_width(params_e)
    for name, params in (("params_e", params_e), ("params_p", params_p), ("params_z", params_z)):
        expected = ((H, D), (H,), (K, H), (K,)) if H else (None, None, (K, D), (K,))
        got = tuple(None if p is None else tuple(p.shape) for p in params)
        if got != expected:
            raise ValueError(f"{name} must be (W1, b1, W2, b2) shaped {expected} (H={H} as params_e), got {got}")
    raise_unsupported("the Triton dispatcher", triton_not_supported_reasons(prompts, tokens, prompt_out, params_e, params_p, params_z))
    return H


def raise_unsupported(what: str, reasons: list[str]) -> None:
    """Raise a ValueError listing ``reasons`` when there are any."""
    if reasons:
        raise ValueError(
            f"{what} cannot run these inputs: " + " ".join(reasons)
            + " pmoe_fast.dispatcher.Dispatcher (backend='auto') picks a backend that can."
        )


_TOKEN_RANGES: dict = {}
_LAUNCH_STATE: dict = {}


def _host_ranges(tok_start, tok_end) -> torch.Tensor:
    """(K, 2) int32 [start, end) per expert in host memory, pinned with a GPU, made once per
    distinct ranges (a model has one or two) and kept for the process: a recorded CUDA graph reads
    its copy's source again on every replay."""
    key = (tuple(tok_start), tuple(tok_end))
    if key not in _TOKEN_RANGES:
        ranges = torch.tensor([[s, e] for s, e in zip(tok_start, tok_end)], dtype=torch.int32)
        _TOKEN_RANGES[key] = ranges.pin_memory() if torch.cuda.is_available() else ranges
    return _TOKEN_RANGES[key]


def _token_ranges(tok_start, tok_end, device: torch.device) -> torch.Tensor:
    """(K, 2) int32 [start, end) per expert on the device. A GPU gets a new tensor each call,
    copied without blocking from ``_host_ranges``: a device tensor kept across calls would be
    allocated in the memory pool of the CUDA graph being recorded when the first call is one
    (torch.compile(mode="reduce-overhead") before any eager call), where CUDA-graph trees refuse it
    as a live allocation no graph returns."""
    ranges = _host_ranges(tok_start, tok_end)
    if device.type == "cpu":
        return ranges
    return torch.empty(ranges.shape, dtype=ranges.dtype, device=device).copy_(ranges, non_blocking=True)


def _ranges_and_counters(tok_start, tok_end, counters: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's token ranges, (K, 2) int32 as ``_token_ranges``, and its ``counters`` arrival
    counters, int32 zeros, on the device in one copy from host memory (pinned with a GPU, made
    once per distinct ranges and count and kept, as ``_host_ranges``): on a GPU the zeros take no
    fill kernel of their own, a graph node less a prompt layer under CUDA graphs. The ranges take
    the buffer's first 2K ints rounded up to 4, so that the counters start 16 bytes aligned, as an
    allocation of their own would, and the launch specializes alike."""
    key = (tuple(tok_start), tuple(tok_end), counters)
    if key not in _LAUNCH_STATE:
        ranges = _host_ranges(tok_start, tok_end)  # the backward's, made here with the forward's
        head = (ranges.numel() + 3) // 4 * 4
        host = torch.zeros(head + counters, dtype=torch.int32)
        host[: ranges.numel()] = ranges.flatten()
        _LAUNCH_STATE[key] = (host.pin_memory() if torch.cuda.is_available() else host, head)
    host, head = _LAUNCH_STATE[key]
    state = torch.empty(host.shape, dtype=torch.int32, device=device).copy_(host, non_blocking=True)
    return state[: 2 * len(tok_start)].view(-1, 2), state[head:]


def splits_bf16(tokens_dtype: torch.dtype, H: int) -> bool:
    """Whether the backward takes bf16 tiles to the tensor cores as they are (``_tokens_bwd_split``):
    bf16 tokens and 0 < H <= 64. Wider hidden layers keep the float32 slopes: at H = 128 the
    model's launch spilled 1296 bytes a thread that way, against 296 (sm_90a, Triton 3.8)."""
    return tokens_dtype == torch.bfloat16 and 0 < H <= 64


def tokens_transposed(tokens_dtype: torch.dtype, w1_dtype: torch.dtype | None, blocks: Mapping[str, int]) -> bool:
    """Whether the forward's token chunks compute W1 Z^T (``_tokens_hidden_t``, the kernel's
    TOKENS_T): bf16 tokens against float32 W1 (the model's case), BLOCK_H = 64, one warpgroup,
    and the block key TOKENS_T (1; 0 for Z W1^T, to compare)."""
    return (
        tokens_dtype == torch.bfloat16 and w1_dtype == torch.float32 and blocks["BLOCK_H"] == 64
        and blocks["FWD_WARPS"] == 4 and bool(blocks["TOKENS_T"])
    )


def slopes_shape(K: int, B: int, T: int, H: int, tokens_dtype: torch.dtype) -> tuple[tuple[int, ...], torch.dtype]:
    """The shape and dtype of the tokens' saved GELU slopes: (K, B, T, H) float32, or where
    ``splits_bf16`` (K, B, T, 3, H) bfloat16, each slope as the three parts of ``_bf16x3``
    (``_store_split``)."""
    if splits_bf16(tokens_dtype, H):
        return (K, B, T, 3, H), torch.bfloat16
    return (K, B, T, H), torch.float32


def _param_pointers(params: Params):
    """(W1, b1, W2) and the row strides of W1 and W2; without a hidden layer W1 and b1 are
    placeholders the kernels never read."""
    w1, b1, w2, _ = params
    if w1 is None:
        return (w2, w2, w2), (0, w2.stride(0))
    return (w1, b1, w2), (w1.stride(0), w2.stride(0))


def dispatch_fwd(
    prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z, ipt_out=None, save_hidden=True,
    check=True,
):
    """One launch. Returns ipt (K, B, Np, D) in the prompts' dtype (or ``ipt_out``), weights
    (K, B, Np, K) float32, and what the backward needs of the hidden layer, float32: (hidden_e
    (K, Np, H) and hidden_p (K, B, Np, H), the pre-activations x W1^T + b1 of P and Z_P; slopes_z
    (K, B, T, H), the GELU slopes gelu'(x W1^T + b1) of the tokens (for bf16 tokens and H <= 64
    (K, B, T, 3, H) bf16, ``slopes_shape``), rows outside each expert's token range not written; act_sums_z (K, B, H),
    each (k, b)'s sum over its tokens of gelu(x W1^T + b1)), each None without a
    hidden layer (hidden_p also without prompt_out) or without ``save_hidden`` (nothing will
    differentiate this call).

    ``ipt_out`` (K, B, Np, D), of the prompts' or the tokens' dtype with stride(-1) == 1, receives
    the IPTs instead of a new tensor: the prompt slots of the experts' sequences, say. It may be
    ``prompt_out`` itself: each Z_P row is read before its IPT overwrites it.

    ``check=False`` skips validating the inputs, for a caller that has validated them already
    (``Dispatcher``): at B = 1 the host's time is the launch's time."""
    if check:
        H = _check_args(prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z)
    else:
        H = _hidden_width(params_e)
    K, Np, D = prompts.shape
    B, T = tokens.shape[1:3]
    device = prompts.device
    blocks = dispatch_blocks(K, B, Np, D, H, device)
    has_prompt_out = prompt_out is not None
    save_hidden = bool(save_hidden and H)
    tokens_t = tokens_transposed(tokens.dtype, params_z[0].dtype if H else None, blocks)
    block_t = blocks["BLOCK_T_FWD_T" if tokens_t else "BLOCK_T_FWD"]
    chunks = cdiv(max(e - s for s, e in zip(tok_start, tok_end)), block_t)
    if ipt_out is None:
        ipt_out = torch.empty((K, B, Np, D), dtype=prompts.dtype, device=device)
    elif (
        ipt_out.shape != (K, B, Np, D) or ipt_out.stride(-1) != 1 or ipt_out.dtype not in (prompts.dtype, tokens.dtype)
        or span(ipt_out) >= 2**31
    ):
        raise ValueError(
            f"ipt_out must be (K={K}, B={B}, Np={Np}, D={D}) with stride(-1) == 1 in the prompts' or the tokens' "
            f"dtype, spanning less than 2**31 elements, got {tuple(ipt_out.shape)}, strides {ipt_out.stride()}, "
            f"{ipt_out.dtype}"
        )
    weights = torch.empty((K, B, Np, K), dtype=torch.float32, device=device)
    # Scratch, one allocation: the token chunks' sums (K * B, chunks, H or K), then (each from a
    # 16-byte boundary) f_e's pieces (K * e_pieces, Np, H or K) and f_e's logits (K, Np, K), where
    # the kernel expects them. A backward keeps none of it.
    e_pieces = cdiv(D, blocks["BLOCK_D_E"])
    sums = K * B * chunks * (H or K)
    parts = K * e_pieces * Np * (H or K)
    scratch = torch.empty(
        (sums + 3) // 4 * 4 + (parts + 3) // 4 * 4 + K * Np * K, dtype=torch.float32, device=device
    )
    hidden = (None, None, None, None)
    if save_hidden:
        hidden_p = torch.empty((K, B, Np, H), dtype=torch.float32, device=device) if has_prompt_out else None
        slopes_size, slopes_dtype = slopes_shape(K, B, T, H, tokens.dtype)
        hidden = (
            torch.empty((K, Np, H), dtype=torch.float32, device=device),
            hidden_p,
            torch.empty(slopes_size, dtype=slopes_dtype, device=device),
            torch.empty((K, B, H), dtype=torch.float32, device=device),
        )
    # A counter for each group of images, then one for each expert's f_e pieces.
    tok_ranges, arrivals = _ranges_and_counters(tok_start, tok_end, K * cdiv(B, blocks["B_PER_FIN"]) + K, device)
    pout = prompt_out if has_prompt_out else tokens
    ptrs_e, strides_e = _param_pointers(params_e)
    ptrs_p, strides_p = _param_pointers(params_p)
    ptrs_z, strides_z = _param_pointers(params_z)
    hidden_ptrs = _hidden_pointers(hidden, weights)
    if not save_hidden and splits_bf16(tokens.dtype, H):
        # A placeholder of the slopes' dtype (``slopes_shape``): inference and training run one
        # compiled variant.
        hidden_ptrs[2] = tokens
    zp_tiles = cdiv(B * Np, blocks["BLOCK_ZP"])
    grid = (K * e_pieces + K * zp_tiles * int(has_prompt_out) + K * B * chunks,)
    _dispatch_fwd_kernel[grid](
        prompts, tokens, pout, tok_ranges,
        *ptrs_e, params_e[3], *ptrs_p, params_p[3], *ptrs_z, params_z[3],
        ipt_out, weights, *hidden_ptrs,
        scratch, arrivals,
        *prompts.stride()[:2], *tokens.stride()[:3], *outer_strides(prompt_out), *ipt_out.stride()[:3],
        *strides_e, *strides_p, *strides_z,
        B, K, Np, T, D, H, chunks, zp_tiles, e_pieces, blocks["BLOCK_D_E"],
        int(has_prompt_out), int(save_hidden), HAS_HIDDEN=H > 0,
        BLOCK_T=block_t, BLOCK_N=blocks["BLOCK_N"], BLOCK_P=blocks["BLOCK_P"], BLOCK_ZP=blocks["BLOCK_ZP"],
        BLOCK_D=blocks["BLOCK_D_FWD"], BLOCK_D_MIX=blocks["BLOCK_D_MIX"], BLOCK_H=blocks["BLOCK_H"], BLOCK_K=16,
        B_PER_FIN=blocks["B_PER_FIN"], ROUND_FP32=bool(blocks["ROUND_FP32"]),
        TOKENS_T=tokens_t,
        num_warps=blocks["FWD_WARPS"], num_stages=_NUM_STAGES["fwd"],
    )
    return ipt_out, weights, hidden


def span(t: torch.Tensor) -> int:
    """How many elements past its first a tensor's last lies, through its strides: what the
    kernels' 32-bit offsets must hold."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))


def outer_strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    """The strides of a (K, B, rows, D) kernel argument's first three dimensions (its last has
    stride 1), or zeros for one the kernel does not read (None)."""
    return (0, 0, 0) if t is None else tuple(t.stride()[:3])


def _hidden_pointers(hidden: tuple, placeholder: torch.Tensor) -> list:
    """Saved hidden-layer tensors as kernel arguments, ``placeholder`` (any float32 tensor of the
    call: the kernels never touch it) for each that is None."""
    return [placeholder if h is None else h for h in hidden]


def _param_groups(sources: list[tuple[str, Params]]) -> dict[str, int]:
    """Output row of each source's gradients: sources passing the very same tensors share one."""
    groups: dict[str, int] = {}
    firsts: list[Params] = []
    for name, params in sources:
        same = [g for g, first in enumerate(firsts) if all(a is b for a, b in zip(first, params))]
        groups[name] = same[0] if same else len(firsts)
        if not same:
            firsts.append(params)
    return groups


def dispatch_bwd(
    grad_ipt, prompts, tokens, tok_start, tok_end, prompt_out, weights, hidden, params_e, params_p, params_z,
    need_grad_tokens: bool = True, grad_tokens=None, grad_tokens_add=None, grad_prompt_out=None, groups=None,
    packed: bool = False,
):
    """Three launches; ``weights`` and ``hidden`` as dispatch_fwd returned them. Returns (dprompts,
    dtokens or None, dprompt_out or None, grads_e, grads_p, grads_z), each grads_s a
    (dW1, db1, dW2, db2) tuple, or None for a source that shares its
    parameters with an earlier one (its gradient is in the earlier one's) or that did not run
    (f_p without prompt_out). ``need_grad_tokens=False`` skips dZ, the largest write: the tokens
    of a first prompt layer come from a frozen embedding and need no gradient.

    ``grad_tokens`` (K, B, T, D) and ``grad_prompt_out`` (K, B, Np, D), tensors of the tokens'
    dtype with stride(-1) == 1 (views into one larger gradient, say), receive dZ and dZ_P instead
    of new tensors; with ``grad_tokens_add`` (K, B, T, D, same rules), dZ + grad_tokens_add is
    written: the tokens' gradient from elsewhere added in the same pass.

    ``groups`` maps each source that ran ("e", "z", and "p" with prompt_out) to its row of the
    parameter gradients; sources sharing a row get their gradients summed there. By default
    sources passing the very same tensors share one. With ``packed``, the last three results are
    replaced by those rows, (G, C) in the parameters' dtype (``unpack_param_grads`` reads one)."""
    K, Np, D = prompts.shape
    B, T = tokens.shape[1:3]
    H = _hidden_width(params_e)
    grad_ipt = _within_32_bits(grad_ipt)
    if H and hidden[0] is None:
        raise ValueError("dispatch_bwd needs the pre-activations the forward keeps: run dispatch_fwd with save_hidden=True")
    if prompt_out is not None and prompt_out.dtype != tokens.dtype:
        raise ValueError(f"dispatch_bwd: prompt_out is {prompt_out.dtype} but tokens are {tokens.dtype}: they must share one dtype")
    if H and (tuple(hidden[2].shape), hidden[2].dtype) != slopes_shape(K, B, T, H, tokens.dtype):
        raise ValueError(
            f"dispatch_bwd: the slopes {tuple(hidden[2].shape)} {hidden[2].dtype} are not those dispatch_fwd keeps for "
            f"{tokens.dtype} tokens {tuple(tokens.shape)}, {slopes_shape(K, B, T, H, tokens.dtype)}: pass the tokens the "
            "forward had"
        )
    device = prompts.device
    blocks = dispatch_blocks(K, B, Np, D, H, device)
    has_prompt_out = prompt_out is not None
    C = param_grad_width(K, D, H)

    # bf16 activations, H <= 64 (``splits_bf16``): the softmax's backward also takes f_p's through
    # W2 and GELU (dh_p, act_p), and the slopes are in bf16 parts (``slopes_shape``); the main
    # backward multiplies both on bfloat16 tensor cores in tiles of BLOCK_T_SPLIT rows.
    split = splits_bf16(tokens.dtype, H)
    dh_p = act_p = weights  # placeholders
    prompt_out_bwd = None
    if split and has_prompt_out:
        dh_p = torch.empty((K, B, Np, 3, H), dtype=torch.bfloat16, device=device)
        act_p = torch.empty((K, B, Np, H), dtype=torch.float32, device=device)
        prompt_out_bwd = (params_p[2], hidden[1], dh_p, act_p, H)
    elif split:
        # Placeholders, dh_p's of its dtype: with and without prompt_out one compiled variant.
        dh_p = tokens
        prompt_out_bwd = (prompts, weights, dh_p, act_p, 0)
    dlogits = _launch_bwd_softmax(grad_ipt, prompts, weights, blocks, prompt_out_bwd)

    b_groups = cdiv(B, blocks["B_PER_PROG"])
    n_groups = cdiv(Np, blocks["N_PER_PROG"])
    row_p0 = 0
    row_z0 = K * b_groups if has_prompt_out else 0
    row_e0 = row_z0 + K * b_groups
    partials = torch.empty((row_e0 + n_groups, C), dtype=torch.float32, device=device)
    grad_prompts = torch.empty((K, Np, D), dtype=prompts.dtype, device=device)
    placeholder = torch.empty(0, dtype=tokens.dtype, device=device)  # for outputs not written
    if need_grad_tokens and grad_tokens is None:
        grad_tokens = torch.empty((K, B, T, D), dtype=tokens.dtype, device=device)
    if has_prompt_out and grad_prompt_out is None:
        grad_prompt_out = torch.empty((K, B, Np, D), dtype=prompt_out.dtype, device=device)
    grad_tokens = grad_tokens if need_grad_tokens else None
    grad_prompt_out = grad_prompt_out if has_prompt_out else None
    grad_tokens_add = grad_tokens_add if need_grad_tokens else None
    pout = prompt_out if has_prompt_out else tokens
    (w1e, _, w2e), strides_e = _param_pointers(params_e)
    (w1p, _, w2p), strides_p = _param_pointers(params_p)
    (w1z, _, w2z), strides_z = _param_pointers(params_z)
    grid = (cdiv(D, blocks["BLOCK_DW"]), K * b_groups + n_groups)
    _dispatch_bwd_kernel[grid](
        prompts, tokens, pout, _token_ranges(tok_start, tok_end, device), grad_ipt, weights, dlogits, *_hidden_pointers(hidden, weights),
        dh_p, act_p, w1e, w2e, w1p, w2p, w1z, w2z,
        grad_prompts, *(placeholder if t is None else t for t in (grad_tokens, grad_prompt_out, grad_tokens_add)), partials,
        *prompts.stride()[:2], *tokens.stride()[:3], *outer_strides(prompt_out), *grad_ipt.stride(),
        *outer_strides(grad_tokens), *outer_strides(grad_prompt_out), *outer_strides(grad_tokens_add),
        *strides_e, *strides_p, *strides_z,
        B, K, Np, T, D, H, C, blocks["B_PER_PROG"], blocks["N_PER_PROG"],
        row_p0, row_z0, row_e0,
        int(has_prompt_out), int(need_grad_tokens), int(grad_tokens_add is not None), HAS_HIDDEN=H > 0,
        BLOCK_T=blocks["BLOCK_T_SPLIT" if split else "BLOCK_T"], BLOCK_N=blocks["BLOCK_N"],
        BLOCK_DW=blocks["BLOCK_DW"], BLOCK_H=blocks["BLOCK_H"], BLOCK_K=16, BLOCK_KB=blocks["BLOCK_KB"],
        num_warps=_NUM_WARPS["bwd"], num_stages=_NUM_STAGES["bwd"],
    )

    sources = [("e", params_e)] + ([("p", params_p)] if has_prompt_out else []) + [("z", params_z)]
    groups = groups or _param_groups(sources)
    row_ranges = {"e": (row_e0, row_e0 + n_groups), "p": (row_p0, row_p0 + K * b_groups), "z": (row_z0, row_z0 + K * b_groups)}
    out = reduce_partials(partials, C, params_e[2].dtype, groups, row_ranges, blocks)
    if packed:
        return grad_prompts, grad_tokens, grad_prompt_out, out
    grads = unpack_groups(out, groups, lambda row: unpack_param_grads(row, K, D, H))
    return grad_prompts, grad_tokens, grad_prompt_out, grads.get("e"), grads.get("p"), grads.get("z")


def param_grad_width(K: int, D: int, H: int) -> int:
    """C, the floats of one f's gradients, laid out [dW1 (H*D) | db1 (H) | dW2 (K*H) | db2 (K)],
    or [dW2 (K*D) | db2 (K)] without a hidden layer."""
    return H * D + H + K * H + K if H else K * D + K


def unpack_param_grads(row: torch.Tensor, K: int, D: int, H: int) -> tuple:
    """(dW1, db1, dW2, db2), views of one row of C floats (``param_grad_width``); dW1 and db1 are
    None without a hidden layer."""
    if not H:
        return None, None, row[: K * D].view(K, D), row[K * D :]
    C = param_grad_width(K, D, H)
    return row[: H * D].view(H, D), row[H * D : H * D + H], row[H * D + H : C - K].view(K, H), row[C - K :]


def reduce_partials(partials, C: int, dtype, groups: Mapping[str, int], row_ranges, blocks) -> torch.Tensor:
    """The third backward launch of every dispatcher kernel family: sums each parameter group's
    partial rows (partials (R, C) float32) in a fixed order into (G, C) in ``dtype``. ``groups``
    maps each source that got input to its group; ``row_ranges`` each source to the [first, last)
    partial rows it wrote."""
    num_groups = max(groups.values()) + 1
    out = torch.empty((num_groups, C), dtype=dtype, device=partials.device)
    rows = [row_ranges[name] if name in groups else (0, 0) for name in ("e", "p", "z")]
    _dispatch_bwd_reduce_kernel[(cdiv(C, blocks["BLOCK_C"]), num_groups)](
        partials, out, C, *rows[0], *rows[1], *rows[2],
        groups["e"], groups.get("p", -1), groups["z"],
        BLOCK_C=blocks["BLOCK_C"], num_warps=_NUM_WARPS["bwd_reduce"], num_stages=_NUM_STAGES["bwd_reduce"],
    )
    return out


def unpack_groups(out: torch.Tensor, groups: Mapping[str, int], unpack) -> dict:
    """Each group's gradients, ``unpack(out[group])``, reported once, under the group's first
    source, as autograd adds up the gradients of a tensor passed more than once."""
    grads, seen = {}, set()
    for name, group in groups.items():
        if group not in seen:
            seen.add(group)
            grads[name] = unpack(out[group])
    return grads


# ---------------------------------------------------------------------------------------------
# Operators, autograd and the functional entry point
# ---------------------------------------------------------------------------------------------
# For torch.compile, the launchers as two operators (torch.library.custom_op), with autograd
# registered on the forward: Dynamo sees each as one opaque call with a fake implementation, and
# keeps a model's prompt layers in one graph, where tracing into the launchers would break it.
# Their inputs follow the C++ ops' (csrc/dispatch_cpu.cpp); their outputs differ. An operator may not return
# None or tensors that alias each other: an output dispatch_fwd leaves None is an empty tensor,
# and the parameter gradients come packed, one row of C floats per group. Eagerly the
# autograd Function FusedDispatch calls the launchers itself, for less host time.

_EMPTY = (0,)
# The Python bodies of the operators of kernels/, by overload name (the tests look inside them).
OPERATOR_BODIES: dict = {}


def operator(name: str, body):
    """``body`` as the operator pmoe_fast::``name``, which mutates none of its inputs."""
    OPERATOR_BODIES[f"pmoe_fast.{name}.default"] = body
    return torch.library.custom_op(f"pmoe_fast::{name}", body, mutates_args=())


def same_tensors(*param_lists) -> bool:
    """Whether each list (one entry per source e, p, z) holds the very same tensor (or None) thrice."""
    return all(a is b for params in param_lists for a, b in zip(params, params[1:]))


def check_shared(shared: bool, *param_lists) -> None:
    """Raises when ``shared`` is set but the sources pass different tensors: the operators sum the
    gradients of shared sources in one row by this flag alone. (Unset with the very same tensors,
    each source gets its own row and autograd sums them.)"""
    if shared and not same_tensors(*param_lists):
        raise ValueError("shared=True, but the sources pass different parameter tensors")


def empty_for_none(like: torch.Tensor, *tensors) -> tuple:
    """The tensors, each None replaced by an empty tensor like ``like`` (an operator returns no None)."""
    return tuple(like.new_empty(_EMPTY) if t is None else t for t in tensors)


def _triton_dispatch_mlp(
    prompts: torch.Tensor,
    tokens: torch.Tensor,
    tok_start: list[int],
    tok_end: list[int],
    prompt_out: torch.Tensor | None,
    w1: list[torch.Tensor | None],
    b1: list[torch.Tensor | None],
    w2: list[torch.Tensor],
    b2: list[torch.Tensor],
    save_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dispatch_fwd: (ipt, weights, hidden_e, hidden_p, slopes_z, act_sums_z), each of the last
    four (0,) where dispatch_fwd leaves it None; slopes_z is not written outside each expert's
    token range. w1, b1, w2, b2: one entry per source e, p, z."""
    ipt, weights, hidden = dispatch_fwd(
        prompts, tokens, tok_start, tok_end, prompt_out, *zip(w1, b1, w2, b2), save_hidden=save_hidden
    )
    return ipt, weights, *empty_for_none(weights, *hidden)


triton_dispatch_mlp = operator("triton_dispatch_mlp", _triton_dispatch_mlp)


@triton_dispatch_mlp.register_fake
def _(prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2, save_hidden):
    H = _check_args(prompts, tokens, tok_start, tok_end, prompt_out, *zip(w1, b1, w2, b2))
    K, Np, D = prompts.shape
    B, T = tokens.shape[1:3]
    f32 = dict(dtype=torch.float32)
    save = save_hidden and H > 0
    slopes_size, slopes_dtype = slopes_shape(K, B, T, H, tokens.dtype)
    return (
        prompts.new_empty((K, B, Np, D)),
        prompts.new_empty((K, B, Np, K), **f32),
        prompts.new_empty((K, Np, H) if save else _EMPTY, **f32),
        prompts.new_empty((K, B, Np, H) if save and prompt_out is not None else _EMPTY, **f32),
        prompts.new_empty(slopes_size, dtype=slopes_dtype) if save else prompts.new_empty(_EMPTY, **f32),
        prompts.new_empty((K, B, H) if save else _EMPTY, **f32),
    )


def _op_groups(shared: bool, has_prompt_out: bool) -> dict[str, int]:
    """The parameter-gradient rows of the operators' backward: one for all sources when they share
    one f, else one per source that ran, in the order e, p, z."""
    names = ("e", "p", "z") if has_prompt_out else ("e", "z")
    return {name: 0 if shared else i for i, name in enumerate(names)}


def _triton_dispatch_mlp_backward(
    grad_ipt: torch.Tensor,
    prompts: torch.Tensor,
    tokens: torch.Tensor,
    tok_start: list[int],
    tok_end: list[int],
    prompt_out: torch.Tensor | None,
    w1: list[torch.Tensor | None],
    b1: list[torch.Tensor | None],
    w2: list[torch.Tensor],
    b2: list[torch.Tensor],
    weights: torch.Tensor,
    hidden: list[torch.Tensor],
    need_grad_tokens: bool,
    shared: bool,
    grad_tokens_add: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dispatch_bwd: (dprompts, dtokens, dprompt_out, the parameter gradients (G, C) in the
    parameters' dtype, a row per group of ``_op_groups(shared, prompt_out is not None)``); dtokens
    is (0,) without ``need_grad_tokens``, dprompt_out without prompt_out. ``hidden``: the last four
    outputs of triton_dispatch_mlp. ``shared``: the three sources pass the very same tensors.
    ``grad_tokens_add`` (K, B, T, D): added to dtokens in the kernel, in float32 before dtokens is
    rounded to the tokens' dtype, as ``Dispatcher.dispatch_into`` does eagerly."""
    check_shared(shared, w1, b1, w2, b2)
    grad_prompts, grad_tokens, grad_prompt_out, packed = dispatch_bwd(
        grad_ipt, prompts, tokens, tok_start, tok_end, prompt_out, weights,
        tuple(None if h.numel() == 0 else h for h in hidden), *zip(w1, b1, w2, b2),
        need_grad_tokens=need_grad_tokens, grad_tokens_add=grad_tokens_add,
        groups=_op_groups(shared, prompt_out is not None), packed=True,
    )
    return grad_prompts, *empty_for_none(tokens, grad_tokens, grad_prompt_out), packed


triton_dispatch_mlp_backward = operator("triton_dispatch_mlp_backward", _triton_dispatch_mlp_backward)


@triton_dispatch_mlp_backward.register_fake
def _(grad_ipt, prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2, weights, hidden, need_grad_tokens, shared,
      grad_tokens_add=None):
    K, Np, D = prompts.shape
    B, T = tokens.shape[1:3]
    H = _hidden_width((w1[0],))
    groups = max(_op_groups(shared, prompt_out is not None).values()) + 1
    return (
        prompts.new_empty((K, Np, D)),
        tokens.new_empty((K, B, T, D) if need_grad_tokens else _EMPTY),
        tokens.new_empty(_EMPTY) if prompt_out is None else prompt_out.new_empty((K, B, Np, D)),
        prompts.new_empty((groups, param_grad_width(K, D, H)), dtype=w2[0].dtype),
    )


def list_param_grads(packed: torch.Tensor, shared: bool, has_prompt_out: bool, unpack, needs) -> list:
    """An operator backward's parameter gradients as autograd takes them for the parameter lists
    (one entry per source): per list, a gradient or None per source (None where the source shares
    an earlier one's row, did not run, or needs none), or None for a list of Nones. ``packed``: its
    (G, C) rows, one per group of ``_op_groups``; ``unpack`` turns a row into one gradient per
    list; ``needs``: the lists' entries of needs_input_grad (a bool per tensor, or one bool)."""
    per_source = [(None,) * len(needs)] * 3
    for name, grads in unpack_groups(packed, _op_groups(shared, has_prompt_out), unpack).items():
        per_source["epz".index(name)] = grads
    return [
        [g if need else None for g, need in zip(grads, n)] if isinstance(n, list) else None
        for grads, n in zip(zip(*per_source), needs)
    ]


def _setup_context(ctx, inputs, output) -> None:
    prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2, _ = inputs
    _, weights, *hidden = output
    ctx.mark_non_differentiable(weights, *hidden)
    # No zero-filled gradients for the outputs that are not differentiated: launches, and unused.
    ctx.set_materialize_grads(False)
    ctx.tok_range = (list(tok_start), list(tok_end))
    ctx.has_prompt_out = prompt_out is not None
    # One f for all sources: the kernels sum its gradients in one row, not autograd in three.
    ctx.shared = same_tensors(w1, b1, w2, b2)
    ctx.save_for_backward(prompts, tokens, prompt_out, weights, *hidden, *w1, *b1, *w2, *b2)


@first_order_only("The Triton dispatcher", TWICE_WITH_TORCH_DISPATCHER)
def _backward(ctx, grad_ipt, *_unused):
    prompts, tokens, prompt_out, weights, *saved = ctx.saved_tensors
    hidden, params = saved[:4], saved[4:]
    w1, b1, w2, b2 = (list(params[i : i + 3]) for i in range(0, 12, 3))
    needs = ctx.needs_input_grad
    if grad_ipt is None:  # the integrated prompts were not used
        return (None,) * 5 + tuple([None] * 3 if isinstance(n, list) else None for n in needs[5:9]) + (None,)
    grad_prompts, grad_tokens, grad_prompt_out, packed = torch.ops.pmoe_fast.triton_dispatch_mlp_backward(
        grad_ipt, prompts, tokens, *ctx.tok_range, prompt_out, w1, b1, w2, b2, weights, hidden, bool(needs[1]), ctx.shared
    )
    K, Np, D = prompts.shape
    H = _hidden_width((w1[0],))
    unpack = functools.partial(unpack_param_grads, K=K, D=D, H=H)
    param_grads = list_param_grads(packed, ctx.shared, ctx.has_prompt_out, unpack, needs[5:9])
    return (
        grad_prompts if needs[0] else None,
        grad_tokens if needs[1] else None,
        None,
        None,
        grad_prompt_out if ctx.has_prompt_out and needs[4] else None,
        *param_grads,
        None,
    )


triton_dispatch_mlp.register_autograd(_backward, setup_context=_setup_context)


class FusedDispatch(torch.autograd.Function):
    """Differentiable in prompts, tokens, prompt_out and every W/b; ``weights`` is marked
    non-differentiable: it is returned for inspection (SPEC.md: exposed after a forward for
    visualisation), and a loss on it would need its own backward term, which the kernels do not
    compute. The parameters come flattened (four per source) because autograd only tracks
    tensors passed directly."""

    @staticmethod
    def forward(ctx, prompts, tokens, tok_start, tok_end, prompt_out, save_hidden, *params):
        params_e, params_p, params_z = params[0:4], params[4:8], params[8:12]
        ipt, weights, hidden = dispatch_fwd(
            prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z, save_hidden=save_hidden
        )
        ctx.mark_non_differentiable(weights)
        # No zero-filled gradient for weights: it would be one more launch, and unused.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(prompts, tokens, prompt_out, weights, *hidden, *params)
        ctx.tok_range, ctx.num_hidden = (tuple(tok_start), tuple(tok_end)), len(hidden)
        return ipt, weights

    @staticmethod
    @first_order_only("The Triton dispatcher", TWICE_WITH_TORCH_DISPATCHER)
    def backward(ctx, grad_ipt, _grad_weights):
        if grad_ipt is None:
            return (None,) * (6 + 12)
        prompts, tokens, prompt_out, weights, *saved = ctx.saved_tensors
        hidden, params = saved[: ctx.num_hidden], saved[ctx.num_hidden :]
        grad_prompts, grad_tokens, grad_prompt_out, grads_e, grads_p, grads_z = dispatch_bwd(
            grad_ipt, prompts, tokens, *ctx.tok_range, prompt_out, weights, tuple(hidden),
            tuple(params[0:4]), tuple(params[4:8]), tuple(params[8:12]), need_grad_tokens=ctx.needs_input_grad[1],
        )
        none = (None,) * 4
        # A source without its own gradients shares the tensors of an earlier source, whose
        # gradient already holds its contribution; None adds nothing to those tensors.
        return (
            grad_prompts, grad_tokens, None, None, grad_prompt_out, None,
            *(grads_e or none), *(grads_p or none), *(grads_z or none),
        )


def fused_dispatch(prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z):
    """ipt (K, B, Np, D) in the prompts' dtype and weights (K, B, Np, K) float32, non-differentiable.

    prompts P (K, Np, D); tokens Z (K, B, T, D), any strides with stride(-1) == 1 (a view into a
    longer sequence is read in place); tok_start, tok_end: K ints, expert k averages f_z over
    tokens [start_k, end_k); prompt_out Z_P (K, B, Np, D) or None; params_s = (W1 (H, D), b1 (H,),
    W2 (K, H), b2 (K,)), or (None, None, W2 (K, D), b2 (K,)) for H = 0. The three tuples may
    hold the very same tensors (one shared MLP).

    Eagerly it runs through ``FusedDispatch``, compiled through the operators: calling an
    operator costs host time that ``FusedDispatch`` does not (benchmarks/dispatch_host_time.py,
    2-core CPU: a forward+backward's 380 us became 750 us through them).
    """
    sources = (params_e, params_p, params_z)
    # The pre-activations are kept for a backward only: not in inference.
    differentiable = (prompts, tokens, prompt_out, *(t for params in sources for t in params))
    save_hidden = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)
    if torch.compiler.is_compiling():
        w1, b1, w2, b2 = (list(group) for group in zip(*sources))
        ipt, weights, *_ = triton_dispatch_mlp(
            prompts, tokens, list(tok_start), list(tok_end), prompt_out, w1, b1, w2, b2, save_hidden
        )
        return ipt, weights
    params = (*params_e, *params_p, *params_z)
    return FusedDispatch.apply(prompts, tokens, tuple(tok_start), tuple(tok_end), prompt_out, save_hidden, *params)


# ---------------------------------------------------------------------------------------------
# What the kernels can run, and what they compile to
# ---------------------------------------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)
_INTERPRETED = type(_dispatch_fwd_kernel).__name__ == "InterpretedFunction"


@triton.jit
def _bf16_dot_probe_kernel(a_ptr, out_ptr):  # a: (16, 16) bfloat16; out: (16, 16) float32
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    tl.store(out_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, a))


@functools.cache
def interpreter_computes_bf16() -> bool:
    """Whether Triton's interpreter multiplies bfloat16 right. Triton 3.8's multiplies the bits as
    integers (triton-lang/triton#11584); tests/triton_interpreter.py mends that for the tests.
    Asked only when the kernels are interpreted: one 16 x 16 product on the CPU."""
    a = torch.eye(16, dtype=torch.bfloat16) * 2
    out = torch.empty(16, 16)
    _bf16_dot_probe_kernel[(1,)](a, out)
    return torch.equal(out, torch.eye(16) * 4)


def input_reasons(prompts, tokens, prompt_out, sources, interpreted: bool, module: str) -> list[str]:
    """What every dispatcher kernel of this package needs of its inputs, as sentences: Triton,
    one device (CUDA, or the CPU under the interpreter), float32/float16/bfloat16 (bfloat16 in
    the interpreter only where it multiplies bfloat16 right), a contiguous last dimension, 32-bit
    offsets, and two dtypes at most: one for the prompts and every parameter, one for the
    activations (tokens and prompt_out). ``sources``
    holds the parameter tuples of f_e, f_p and f_z; ``module`` names the kernels' module."""
    if _TRITON_IMPORT_ERROR is not None:
        return [f"Triton cannot be imported ({_TRITON_IMPORT_ERROR})."]
    reasons = []
    named = [("prompts", prompts), ("tokens", tokens), ("prompt_out", prompt_out)]
    for source, params in zip(("e", "p", "z"), sources):
        named += [(f"params_{source}[{i}]", p) for i, p in enumerate(params)]
    tensors = [(name, t) for name, t in named if t is not None]
    devices = {t.device for _, t in tensors}
    if len(devices) > 1:
        reasons.append(f"The inputs are on several devices ({sorted(map(str, devices))}); the kernels need one.")
    for device in devices:
        if device.type == "cpu" and not interpreted:
            reasons.append(
                "The inputs are on the CPU and Triton's interpreter is off: set TRITON_INTERPRET=1 "
                f"before {module} is imported, or move the inputs to a CUDA device."
            )
        elif device.type not in ("cpu", "cuda"):
            reasons.append(f"The inputs are on {device.type}; the kernels run on CUDA devices (or the CPU interpreter).")
    for name, t in tensors:
        if t.dtype not in (torch.float32, *_HALF):
            reasons.append(f"{name} is {t.dtype}; the kernels take float32, float16 or bfloat16.")
        elif t.dtype == torch.bfloat16 and interpreted and not interpreter_computes_bf16():
            reasons.append(f"{name} is bfloat16, which Triton's interpreter computes wrongly (it reads bits as integers).")
        if t.dim() and t.stride(-1) != 1:
            reasons.append(f"{name} has stride {t.stride(-1)} in its last dimension; the kernels need 1 (a contiguous D).")
        if t.numel() and span(t) >= 2**31:
            reasons.append(f"{name} spans 2**31 elements or more; the kernels index with 32-bit offsets.")
    param_dtype = prompts.dtype
    for name, t in tensors:
        if name.startswith("params") and t.dtype != param_dtype:
            reasons.append(f"{name} is {t.dtype} but prompts are {param_dtype}: prompts and every parameter must share one dtype.")
    if prompt_out is not None and prompt_out.dtype != tokens.dtype:
        reasons.append(f"prompt_out is {prompt_out.dtype} but tokens are {tokens.dtype}: they must share one dtype.")
    if tokens.dtype != param_dtype and param_dtype != torch.float32:
        reasons.append(
            f"tokens are {tokens.dtype} but the parameters {param_dtype}: mixed precision needs float32 parameters."
        )
    if prompts.shape[0] > MAX_EXPERTS:
        reasons.append(f"K={prompts.shape[0]} experts is more than {MAX_EXPERTS}: the logits tile is BLOCK_K=16 columns wide.")
    if prompts.dim() == 3 and tokens.dim() == 4 and prompts.shape[0] * tokens.shape[1] * prompts.shape[1] * prompts.shape[2] >= 2**31:
        reasons.append(
            "The IPTs (K, B, Np, D) and their gradient would span 2**31 elements or more; the kernels index with "
            "32-bit offsets: split the batch."
        )
    return reasons


def _within_32_bits(grad_ipt: torch.Tensor) -> torch.Tensor:
    """grad_ipt, or a contiguous copy where its strides (a view into a larger gradient, say) span
    2**31 elements or more: the kernels index it with 32-bit offsets, and ``input_reasons`` bounds
    the contiguous (K, B, Np, D)."""
    if span(grad_ipt) >= 2**31:
        return grad_ipt.contiguous()
    return grad_ipt


def triton_not_supported_reasons(prompts, tokens, prompt_out, params_e, params_p, params_z) -> list[str]:
    """Why the Triton kernels cannot run these inputs; empty when they can."""
    sources = (params_e, params_p, params_z)
    reasons = input_reasons(prompts, tokens, prompt_out, sources, _INTERPRETED, "pmoe_fast.kernels.dispatch")
    if _TRITON_IMPORT_ERROR is not None:
        return reasons
    H = _hidden_width(params_e)
    if H > MAX_HIDDEN:
        reasons.append(f"The hidden width H={H} is more than {MAX_HIDDEN}, the widest the kernels are built for.")
    if tokens.dim() == 4:
        parts = 3 if splits_bf16(tokens.dtype, H) else 1
        if tokens.shape[:3].numel() * parts * H >= 2**31:
            reasons.append(
                f"The tokens' GELU slopes (K, B, T, {'3, ' if parts == 3 else ''}H={H}) the forward keeps for a "
                "backward would span 2**31 elements or more; the kernels index with 32-bit offsets: split the batch."
            )
        if prompt_out is not None and prompt_out.dim() == 4 and prompt_out.shape[:3].numel() * parts * H >= 2**31:
            reasons.append(
                f"f_p's saved rows (K, B, Np, {'3, ' if parts == 3 else ''}H={H}) would span 2**31 elements or more; "
                "the kernels index with 32-bit offsets: split the batch."
            )
    return reasons


_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (parameter dtype: prompts and every W/b, activation dtype: tokens and prompt_out), as
# triton_not_supported_reasons allows them.
DTYPE_SIGNATURES = [("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp16"), ("fp32", "bf16")]
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# The dtype of each pointer argument: "param", "act", or a fixed Triton type.
_POINTER_DTYPES = {
    "prompts_ptr": "param", "tokens_ptr": "act", "prompt_out_ptr": "act", "tok_range_ptr": "i32",
    "w1e_ptr": "param", "b1e_ptr": "param", "w2e_ptr": "param", "b2e_ptr": "param",
    "w1p_ptr": "param", "b1p_ptr": "param", "w2p_ptr": "param", "b2p_ptr": "param",
    "w1z_ptr": "param", "b1z_ptr": "param", "w2z_ptr": "param", "b2z_ptr": "param",
    "ipt_ptr": "param", "weights_ptr": "fp32", "grad_ipt_ptr": "param", "dlogits_ptr": "fp32",
    "grad_prompts_ptr": "param", "grad_tokens_ptr": "act", "grad_prompt_out_ptr": "act", "grad_add_ptr": "act",
    "partials_ptr": "fp32", "out_ptr": "param", "hidden_e_ptr": "fp32", "hidden_p_ptr": "fp32",
    "slopes_z_ptr": "fp32", "act_sums_z_ptr": "fp32", "scratch_ptr": "fp32", "arrivals_ptr": "i32",
    "dh_p_ptr": "fp32", "act_p_ptr": "fp32",
}


def _variant(
    kernel, name: str, param: str, act: str, num_warps: int, num_stages: int, pointers: dict | None = None, **constexprs
) -> dict:
    """One compiled variant: the signature ASTSource takes (pointers typed, every other
    non-constexpr argument an i32) and the constexpr values. ``pointers`` overrides the dtype
    ("param", "act" or a Triton type) of some pointer arguments."""
    dtypes = {"param": param, "act": act}
    pointer_dtypes = {**_POINTER_DTYPES, **(pointers or {})}
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + dtypes.get(pointer_dtypes[arg], pointer_dtypes[arg])
        else:
            signature[arg] = "i32"
    overrides = "".join(f"{arg.removesuffix('_ptr')}={kind}," for arg, kind in (pointers or {}).items())
    return {
        "name": f"{name}[{param}-params,{act}-tokens,{overrides}" + ",".join(f"{k}={v}" for k, v in constexprs.items()) + "]",
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


def _kernel_variants() -> list[dict]:
    """Every (kernel, constexprs, dtype signature) the launchers produce on a GPU with the default
    block sizes: BLOCK_H (and with it BLOCK_T, BLOCK_D and BLOCK_DW) takes one of three values (H = 0,
    H <= 64, H <= 128), the forward's token chunk and D step follow from the batch (small or
    not), the warps (more prompts than BLOCK_N take 8) and ``tokens_transposed`` (``_forward_blocks``),
    the dtypes one of DTYPE_SIGNATURES; BLOCK_K, BLOCK_N, BLOCK_KB and BLOCK_C are fixed, and
    prompt_out is a run-time switch. Triton specialises
    integer arguments further at run time (a value of 1 becomes a constant, multiples of 16 an
    alignment hint); these variants are the generic ones, the same code without those hints."""
    variants = {}
    for param, act in DTYPE_SIGNATURES:
        for H in (0, 64, 128):
            # K, B and D do not change the constexprs (BLOCK_K is always 16), nor Np beyond
            # whether the prompts fit one BLOCK_N tile.
            b = default_blocks(K=6, B=32, Np=16, D=768, H=H, device=torch.device("cpu"))
            # The IPTs go to a tensor of the prompts' dtype (fused_dispatch) or into the prompt
            # slots of the tokens' sequences (Dispatcher.dispatch_into).
            # The forward for few and many prompts (``_forward_warps``, ``_prompt_blocks``) and
            # either tiling (``_forward_blocks``), named by its warps and tiling.
            # bf16 activations, H <= 64 (``splits_bf16``): the slopes in bf16 parts, f_p's dL/dh
            # from the softmax's backward, and the main backward's tiles of BLOCK_T_SPLIT rows.
            split = splits_bf16(_TORCH_DTYPES[act], H)
            slopes = {"slopes_z_ptr": "bf16"} if split else {}
            dh_p = {"dh_p_ptr": "bf16"} if split else {}
            found = [
                _variant(
                    _dispatch_fwd_kernel,
                    f"fwd{'-small-batch' if small else ''}{'' if warps == _NUM_WARPS['fwd'] else f'-{warps}warps'}",
                    param, act, warps, _NUM_STAGES["fwd"], {"ipt_ptr": ipt, **slopes},
                    HAS_HIDDEN=H > 0, BLOCK_T=block_t_t if tokens_t else block_t, BLOCK_N=b["BLOCK_N"], BLOCK_P=block_p,
                    BLOCK_ZP=block_zp, BLOCK_D=block_d, BLOCK_D_MIX=block_d_mix, BLOCK_H=b["BLOCK_H"], BLOCK_K=16,
                    B_PER_FIN=b_per_fin, ROUND_FP32=small, TOKENS_T=tokens_t,
                )
                for ipt in (("param",) if param == act else ("param", "act"))
                for Np in (b["BLOCK_N"], b["BLOCK_N"] + 1)
                for small in (False, True)
                for warps in [_forward_warps(Np, b["BLOCK_N"], small)]
                for block_t, block_t_t, block_d in [_forward_blocks(b["BLOCK_H"], small, warps)]
                for block_p, block_zp, block_d_mix, b_per_fin in [
                    _prompt_blocks(Np, b["BLOCK_N"], b["BLOCK_H"], block_t, block_d, small)
                ]
                for tokens_t in [
                    tokens_transposed(_TORCH_DTYPES[act], _TORCH_DTYPES[param] if H else None, {**b, "FWD_WARPS": warps})
                ]
            ] + [
                _variant(
                    _dispatch_bwd_kernel, "bwd", param, act, _NUM_WARPS["bwd"], _NUM_STAGES["bwd"], {**slopes, **dh_p},
                    HAS_HIDDEN=H > 0,
                    BLOCK_T=b["BLOCK_T_SPLIT" if split else "BLOCK_T"], BLOCK_N=b["BLOCK_N"], BLOCK_DW=b["BLOCK_DW"], BLOCK_H=b["BLOCK_H"], BLOCK_K=16,
                    BLOCK_KB=b["BLOCK_KB"],
                ),
            ]
            # These two see no activations (the softmax's backward only f_p's dL/dh in bf16 parts
            # for bf16 ones): the fp32-parameter signatures share one variant otherwise.
            found.append(_variant(
                _dispatch_bwd_softmax_kernel, "bwd_softmax", param, act if split else param, _NUM_WARPS["bwd_softmax"],
                _NUM_STAGES["bwd_softmax"], dh_p, BLOCK_KB=b["BLOCK_KB"], BLOCK_D=b["BLOCK_D"], BLOCK_K=16,
                BLOCK_H=b["BLOCK_H"] if split else 16,
            ))
            found.append(_variant(
                _dispatch_bwd_reduce_kernel, "bwd_reduce", param, param, _NUM_WARPS["bwd_reduce"], _NUM_STAGES["bwd_reduce"],
                BLOCK_C=b["BLOCK_C"]
            ))
            variants.update((v["name"], v) for v in found)
    return list(variants.values())


KERNEL_VARIANTS = _kernel_variants() if _TRITON_IMPORT_ERROR is None else []
