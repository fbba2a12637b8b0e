"""The pMoE dispatcher of one prompt layer, kind "moe", fused in Triton for all K experts.

The op is kernels/dispatch.py's (SPEC.md, "The dispatcher"; notation of its table)

    logits[k, b, n] = f_e(P[k, n]) + f_p(Z_P[k, b, n]) + mean_{t in [start_k, end_k)} f_z(Z[k, b, t])
    weights[k, b, n] = softmax(logits[k, b, n])                        # over the K experts
    ipt[k, b, n, :] = sum_j weights[k, b, n, j] * P[j, n, :]

with each f_s a mixture of M MLPs behind a router (SPEC.md, dispatcher="moe"):

    g = softmax(R x + r)                                  # (M,) gates; R (M, D), r (M,)
    f(x) = sum_{m in top_k(g)} g_m MLP_m(x)               # no renormalisation; ties to the lower m
    MLP_m(x) = W2[m] gelu(W1[m] x + b1[m]) + b2[m]        # W1 (M, H, D), W2 (M, K, H); H = 0: W2[m] x + b2[m]

and the Switch load-balancing loss of the layer: per f (one when the sources share it, else one per
source that got rows), over every row it routed in the call,
M * sum_m (routed_m / (rows * top_k)) * (gate_sum_m / rows); aux_loss is the mean over the f's.
Its gradient flows through gate_sum only (the routed counts are constants).

The file reads top to bottom as the whole op: the reference in plain PyTorch, the kernels, the
launchers, the autograd Function, the operators torch.compile traces and the functional entry
point, then what the launchers can run
(``moe_not_supported_reasons``) and every variant they compile (``KERNEL_VARIANTS``). It reuses
from kernels/dispatch.py its GELU, its block sizes, the forward's last step (softmax over the K
experts and the mixture of the EPTs) and two of its kernels unchanged: the softmax
backward, which does not depend on f, and the fixed-order reduction of partial weight gradients,
which does not depend on their layout.

Design. As for kind "mlp", the tokens Z (K, B, T, D) dominate the bytes (58 MB at K=6, B=32,
T=197, D=768 in bf16). What changes is that f is no longer affine after the first layer: the
mixture weights g_m(x) depend on the token, so the mean over tokens does not commute with W2 and
every token's f must be formed in full. M is small (3 to 9 in the paper's Table 12), so all M MLPs
run densely on a tile of rows and the top-k choice masks them, as the torch backend does; an MLP
that no row of a tile chose is skipped.

* Forward, ONE Triton launch, grid (K, B). Program (k, b) streams its tokens [start_k, end_k),
  32 rows at a time, through the router and the M MLPs; each of those M + 1 passes over D
  re-reads the tile (32 x D elements) from L1/L2, so DRAM serves the tokens once. It keeps the
  sum over tokens of f (K floats), then runs the prompts P[k] (f_e) and its prompt outputs
  Z_P[k, b] (f_p) through the same code, takes the softmax over K and writes weights and ipt. It
  also writes the gates of every row it routed (M floats a row, 4.6% of the tokens' bytes at
  M=9, D=768 in bf16), so that the backward recomputes no router, and a row of routing
  statistics, (K*B, 2, 3, M) float32. Two torch ops follow: a sum over programs (and over the
  sources when they share f) and a dot product, which is the loss: the kernel scales the routed
  counts by M / (#f * rows^2 * top_k) already. Every program (k, b) evaluates the prompts of
  expert k, as for kind "mlp"; b = 0 saves and counts them.
* Backward, THREE Triton launches, no torch op:
  1. ``_dispatch_bwd_softmax_kernel`` of kernels/dispatch.py: dlogits (K, B, Np, K).
  2. grid (S_D * (M + 1), K*S_B + S_N): program (role, d-tile, group of rows), groups as for kind
     "mlp" (expert k with a group of batch rows: f_p on Z_P and f_z on Z; or a group of prompts:
     f_e on P[:, n] and the fusion gradient of P). Role m < M owns MLP m's weight gradients for
     its d-tile (dW1[m] (H x BLOCK_DW) accumulated in registers, as kind "mlp" holds dW1); role M
     owns dx for the d-tile and the router's gradients. M + 1 such accumulators in one program
     would need M times the registers, and spilling them would cost more traffic than the
     tokens; one program per MLP costs recomputation instead: role m recomputes, from all of D,
     the hidden activations of MLP m, role M those of every chosen MLP (it needs each one's
     output for dL/dg and its dh for dx). The (M + 1) * S_D programs of a row group have adjacent
     ids and run together: DRAM serves the tokens once, L2 (M + 1) * S_D times. FLOPs rather than
     bytes bound this launch: about 2 S_D times the forward's MLP work (kind "mlp": S_D times);
     were that to dominate on a GPU, the lever is saving h (rows x M*H) in the forward, as the
     torch backend's autograd does. The aux loss enters as dL/dg_m += dL/daux * coef_m on every
     routed row (coef: the scaled routed counts of the forward). The launch writes dZ, dZ_P, dP
     and one row of C floats of partial weight gradients per row group and source,
     C = M*D + M + M*H*D + M*H + M*K*H + M*K (H = 0: M*D + M + M*K*D + M*K), packed
     [R | r | W1 | b1 | W2 | b2] so that each gradient is a contiguous view of the reduced row.
  3. ``_dispatch_bwd_reduce_kernel`` of kernels/dispatch.py: the partial rows of each parameter
     group summed in a fixed order (deterministic), written in the parameters' dtype.
  A loss on aux_loss alone adds one zero-fill (of dL/d ipt).

Numerics. As kernels/dispatch.py: matrix products take their operands in the parameters' dtype
(fp32 with ``input_precision="tf32x3"``); every reduction, both softmaxes and the mixture run in
float32. Both this op and the torch backend break ties to the lower index, but the torch backend
picks the top-k from gates in the parameters' dtype and this op from float32 gates: with 16-bit
parameters the two can differ where two gates of a row are within 16-bit rounding of each other.
aux_loss is float32 whatever the dtype (float64 for float64), in both.
"""

from __future__ import annotations

import functools
import os
import types

import torch
import torch.nn.functional as F

from pmoe_fast.dispatcher import RoutingStats, mix_chosen, top_k_gates

from . import dispatch as kd
from . import TWICE_WITH_TORCH_DISPATCHER, first_order_only, import_triton

# Without Triton the kernels below are plain Python functions that nothing calls.
triton, tl, _TRITON_IMPORT_ERROR = import_triton()

# kernels/dispatch.py's device functions, called by the kernels below.
_gelu, _gelu_grad, _softmax_and_mix, _dot = kd._gelu, kd._gelu_grad, kd._softmax_and_mix, kd._dot
_grad_accumulators = kd._grad_accumulators

# (router weight R (M, D), router bias r (M,), W1 (M, H, D) or None, b1 (M, H) or None,
#  W2 (M, K, H) or (M, K, D), b2 (M, K)): the parameters of one MoE f, as StackedMLPs holds them.
MoEParams = tuple


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def dispatch_moe_reference(
    prompts: torch.Tensor,
    tokens: torch.Tensor,
    tok_start,
    tok_end,
    prompt_out: torch.Tensor | None,
    params_e: MoEParams,
    params_p: MoEParams,
    params_z: MoEParams,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op in plain PyTorch, differentiable, in the prompts' dtype (float64 for a float64
    truth). Returns ipt (K, B, Np, D), weights (K, B, Np, K) and aux_loss (a 0-d tensor)."""
    acc = torch.float64 if prompts.dtype == torch.float64 else torch.float32
    stats = {}  # id of the f -> its RoutingStats

    def f(x, params):
        rw, rb, w1, b1, w2, b2 = params
        x = x.reshape(-1, x.shape[-1]).to(rw.dtype)
        gates = torch.softmax(F.linear(x, rw, rb), dim=-1)  # (R, M)
        top, chosen = top_k_gates(gates, top_k)
        if w1 is not None:
            x = F.gelu(torch.einsum("rd,mhd->rmh", x, w1) + b1)
            outs = torch.einsum("rmh,mkh->rmk", x, w2) + b2
        else:
            outs = torch.einsum("rd,mkd->rmk", x, w2) + b2
        stats.setdefault(id(rw), RoutingStats()).add(gates, chosen)
        return mix_chosen(top, chosen, outs)

    K, Np, D = prompts.shape
    B = tokens.shape[1]
    logits = f(prompts, params_e).view(K, 1, Np, K)
    if prompt_out is not None:
        logits = logits + f(prompt_out, params_p).view(K, B, Np, K)
    means = [f(tokens[k, :, s:e], params_z).view(B, e - s, K).mean(1) for k, (s, e) in enumerate(zip(tok_start, tok_end))]
    logits = logits + torch.stack(means).unsqueeze(2)
    weights = torch.softmax(logits.to(acc), dim=-1)
    ipt = torch.einsum("kbnj,jnd->kbnd", weights, prompts.to(acc)).to(prompts.dtype)
    return ipt, weights, torch.stack([s.loss(top_k) for s in stats.values()]).mean()


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
#
# Every source goes through ONE call site of the MoE code in each kernel: compiling it dominates
# the build (a second and third copy tripled it). The rows of a tile come from the activations
# (tokens, prompt outputs: the tokens' dtype) or from the prompts (the parameters' dtype, fp32
# when the tokens are half): _load_x takes both pointers and loads from one.


@triton.jit
def _load_x(xa_ptrs, xp_ptrs, from_p, row_mask, cols, col_mask):
    """x[rows, cols], the rows given by pointers into the activations (xa_ptrs) and into the
    prompts (xp_ptrs); from_p (a scalar) picks the prompts. One load when both have one dtype;
    otherwise two, one of them masked off, returned in float32 (exact for either dtype)."""
    mask = row_mask[:, None] & col_mask[None, :]
    if xa_ptrs.dtype == xp_ptrs.dtype:
        return tl.load(tl.where(from_p, xp_ptrs, xa_ptrs)[:, None] + cols[None, :], mask=mask, other=0.0)
    else:
        xa = tl.load(xa_ptrs[:, None] + cols[None, :], mask=mask & (from_p == 0), other=0.0)
        xp = tl.load(xp_ptrs[:, None] + cols[None, :], mask=mask & (from_p != 0), other=0.0)
        return xa.to(tl.float32) + xp.to(tl.float32)


@triton.jit
def _preact(
    xa_ptrs,  # (BLOCK_R,) pointers to the first element of each row, each row D contiguous
    xp_ptrs,  # (BLOCK_R,) the same rows in the prompts, read instead when from_p
    from_p,
    row_mask,  # (BLOCK_R,)
    w_ptr,  # (O, D), rows of D contiguous elements
    stride_w_o,
    b_ptr,  # (O,)
    O,
    D,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    """x W^T + b on one tile of rows, (BLOCK_R, BLOCK_O) float32: the router's logits (O = M),
    an MLP's hidden pre-activations (O = H) or, without hidden layer, its output (O = K). As
    kernels/dispatch.py's _row_products, with two row pointers and a bias."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_o = tl.arange(0, BLOCK_O)
    o_mask = offs_o < O
    acc = tl.zeros((BLOCK_R, BLOCK_O), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_mask = d < D
        x = _load_x(xa_ptrs, xp_ptrs, from_p, row_mask, d, d_mask)
        wt = tl.load(w_ptr + offs_o[None, :] * stride_w_o + d[:, None], mask=o_mask[None, :] & d_mask[:, None], other=0.0)
        # x in the tokens' dtype against W in the parameters': as Dispatcher's x.to(param.dtype) @ W.
        acc = _dot(x, wt, acc)
    b = tl.load(b_ptr + offs_o, mask=o_mask, other=0.0)
    return acc + b.to(tl.float32)[None, :]


@triton.jit
def _column(x, offs_m, m):
    """Column m of a (rows, BLOCK_M) tile, as a (rows,) vector."""
    return tl.sum(tl.where(offs_m[None, :] == m, x, 0.0), axis=1)


@triton.jit
def _top_k(g, M, top_k, BLOCK_M: tl.constexpr):
    """1.0 for the top_k gates of each row of g (rows, BLOCK_M), ties to the lower index, else 0.0.
    The backward runs it on the gates the forward saved, so both see the same choice."""
    offs_m = tl.arange(0, BLOCK_M)
    # top_k rounds of argmax; a padded column (-1) never wins, a taken one (-2) never again.
    score = tl.where((offs_m < M)[None, :], g, -1.0)
    chosen = tl.zeros(g.shape, dtype=tl.float32)
    for _ in range(top_k):
        best = tl.max(score, axis=1)
        first = tl.min(tl.where(score == best[:, None], offs_m[None, :], BLOCK_M), axis=1)
        hit = offs_m[None, :] == first[:, None]
        chosen = tl.where(hit, 1.0, chosen)
        score = tl.where(hit, -2.0, score)
    return chosen


@triton.jit
def _moe_rows(
    xa_ptrs,  # (BLOCK_R,) row pointers into the activations
    xp_ptrs,  # (BLOCK_R,) row pointers into the prompts, read instead when from_p
    from_p,
    row_mask,  # (BLOCK_R,)
    rw_ptr,  # (M, D) router weight
    rb_ptr,  # (M,) router bias
    w1_ptr,  # (M, H, D); a placeholder when HAS_HIDDEN is False
    b1_ptr,  # (M, H)
    w2_ptr,  # (M, K, H), or (M, K, D) when H = 0
    b2_ptr,  # (M, K)
    stride_rw_m,
    stride_w1_m,
    stride_w1_h,
    stride_b1_m,
    stride_w2_m,
    stride_w2_k,
    stride_b2_m,
    M,
    K,
    D,
    H,
    top_k,
    HAS_HIDDEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """f(x) on one tile of rows, (BLOCK_R, BLOCK_K) float32, with the gates (BLOCK_R, BLOCK_M),
    zero in padded columns, and the choice (1.0 / 0.0)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    u = _preact(xa_ptrs, xp_ptrs, from_p, row_mask, rw_ptr, stride_rw_m, rb_ptr, M, D, BLOCK_R, BLOCK_D, BLOCK_M)
    u = tl.where((offs_m < M)[None, :], u, float("-inf"))
    g = tl.exp(u - tl.max(u, axis=1)[:, None])
    g = g / tl.sum(g, axis=1)[:, None]
    chosen = _top_k(g, M, top_k, BLOCK_M)
    # g_m where m is chosen, else 0. A chosen MLP whose gate underflowed to 0 adds nothing to f
    # nor, in the backward, to any gradient (d gate_m / d logits = 0), so "weight > 0" is the choice.
    mix = tl.where(row_mask[:, None], g * chosen, 0.0)
    f = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m in range(M):
        w_m = _column(mix, offs_m, m)
        if tl.max(w_m, axis=0) > 0:  # skip an MLP no row of the tile chose
            if HAS_HIDDEN:
                h = _preact(
                    xa_ptrs, xp_ptrs, from_p, row_mask, w1_ptr + m * stride_w1_m, stride_w1_h, b1_ptr + m * stride_b1_m,
                    H, D, BLOCK_R, BLOCK_D, BLOCK_H,
                )
                offs_h = tl.arange(0, BLOCK_H)
                w2t = tl.load(
                    w2_ptr + m * stride_w2_m + offs_k[None, :] * stride_w2_k + offs_h[:, None],
                    mask=k_mask[None, :] & (offs_h[:, None] < H),
                    other=0.0,
                )  # (BLOCK_H, BLOCK_K)
                b2 = tl.load(b2_ptr + m * stride_b2_m + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                o = tl.dot(_gelu(h).to(w2t.dtype), w2t, input_precision="tf32x3") + b2[None, :]
            else:
                o = _preact(
                    xa_ptrs, xp_ptrs, from_p, row_mask, w2_ptr + m * stride_w2_m, stride_w2_k, b2_ptr + m * stride_b2_m,
                    K, D, BLOCK_R, BLOCK_D, BLOCK_K,
                )
            f += tl.where(w_m[:, None] > 0, w_m[:, None] * o, 0.0)
    # A row with a NaN gate (a NaN or inf in x) chose nothing above: NaN, as in the torch backend.
    lost = tl.max(tl.where(g != g, 1.0, 0.0), axis=1) > 0
    return tl.where((lost & row_mask)[:, None], float("nan"), f), g, chosen


# Triton would compile an integer equal to 1 as a constant, a second variant of the whole kernel.
@triton.jit(do_not_specialize=["top_k", "has_prompt_out"])
def _dispatch_moe_fwd_kernel(
    prompts_ptr,  # (K, Np, D) P
    tokens_ptr,  # (K, B, T, D) Z, any strides with stride(-1) == 1
    prompt_out_ptr,  # (K, B, Np, D) Z_P; a placeholder when has_prompt_out is 0
    tok_range_ptr,  # (K, 2) int32: expert k averages f_z over tokens [start_k, end_k)
    rwe_ptr,  # (M, D) f_e's router; W1 and b1 are placeholders when HAS_HIDDEN is False
    rbe_ptr,  # (M,)
    w1e_ptr,  # (M, H, D)
    b1e_ptr,  # (M, H)
    w2e_ptr,  # (M, K, H), or (M, K, D) when H = 0
    b2e_ptr,  # (M, K)
    rwp_ptr,  # f_p, shapes as f_e
    rbp_ptr,
    w1p_ptr,
    b1p_ptr,
    w2p_ptr,
    b2p_ptr,
    rwz_ptr,  # f_z, shapes as f_e
    rbz_ptr,
    w1z_ptr,
    b1z_ptr,
    w2z_ptr,
    b2z_ptr,
    ipt_ptr,  # (K, B, Np, D) out, contiguous, the prompts' dtype
    weights_ptr,  # (K, B, Np, K) out, contiguous, float32
    stats_ptr,  # (K*B, 2, 3, M) out, float32: per program, [gate sums; scaled routed counts] per source
    gates_e_ptr,  # (K, Np, M) out, float32: the gates of every routed row, for the backward
    gates_p_ptr,  # (K, B, Np, M) out, float32; a placeholder when has_prompt_out is 0
    gates_z_ptr,  # (K, B, T, M) out, float32: rows [start_k, end_k) written
    f_ep_ptr,  # (2, K, B, Np, K) scratch, float32: f_e and f_p of the prompt rows, until the softmax
    stride_prompts_k,
    stride_prompts_n,
    stride_tokens_k,
    stride_tokens_b,
    stride_tokens_t,
    stride_prompt_out_k,
    stride_prompt_out_b,
    stride_prompt_out_n,
    stride_rwe_m,
    stride_w1e_m,
    stride_w1e_h,
    stride_b1e_m,
    stride_w2e_m,
    stride_w2e_k,
    stride_b2e_m,
    stride_rwp_m,
    stride_w1p_m,
    stride_w1p_h,
    stride_b1p_m,
    stride_w2p_m,
    stride_w2p_k,
    stride_b2p_m,
    stride_rwz_m,
    stride_w1z_m,
    stride_w1z_h,
    stride_b1z_m,
    stride_w2z_m,
    stride_w2z_k,
    stride_b2z_m,
    B,
    K,
    Np,
    T,
    D,
    H,
    M,
    top_k,
    has_prompt_out,  # 0 or 1, a run-time switch: one compiled variant serves both cases
    scale_e,  # M / (#f * rows^2 * top_k) of the f each source belongs to (float32)
    scale_p,
    scale_z,
    HAS_HIDDEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Program (k, b): the weights and ipt of expert k, batch row b, all Np prompts, the gates of
    its rows and their routing statistics."""
    pid_k = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_t = tl.arange(0, BLOCK_T)
    start = tl.load(tok_range_ptr + 2 * pid_k)
    end = tl.load(tok_range_ptr + 2 * pid_k + 1)
    kb = pid_k * B + pid_b
    first_b = pid_b == 0  # every program (k, b) evaluates the prompts of expert k; b = 0 saves and counts them

    # 1. Every row through the MoE, one source after the other: f_z on the tokens [start, end),
    # summed (the only pass over the tokens); f_e on the prompts P[k] and f_p on the prompt
    # outputs Z_P[k, b], kept in f_ep_ptr for step 2.
    f_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
    gate_sums = tl.zeros((4, BLOCK_M), dtype=tl.float32)  # rows: sources e, p, z (and padding)
    routed = tl.zeros((4, BLOCK_M), dtype=tl.float32)
    offs_s = tl.arange(0, 4)
    for seg in range(0, 2 + has_prompt_out):  # 0: f_z on Z[k, b], 1: f_e on P[k], 2: f_p on Z_P[k, b]
        if seg == 0:
            rows = end - start
            xa_base = tokens_ptr + pid_k * stride_tokens_k + pid_b * stride_tokens_b + start * stride_tokens_t
            stride_x = stride_tokens_t
            gates_base = gates_z_ptr + (kb * T + start) * M
            source = 2
            rw, rb, w1, b1, w2, b2 = rwz_ptr, rbz_ptr, w1z_ptr, b1z_ptr, w2z_ptr, b2z_ptr
            s_rw, s_w1m, s_w1h, s_b1 = stride_rwz_m, stride_w1z_m, stride_w1z_h, stride_b1z_m
            s_w2m, s_w2k, s_b2 = stride_w2z_m, stride_w2z_k, stride_b2z_m
        elif seg == 1:
            rows = Np
            xa_base = tokens_ptr  # not read
            stride_x = stride_prompts_n
            gates_base = gates_e_ptr + pid_k * Np * M
            source = 0
            rw, rb, w1, b1, w2, b2 = rwe_ptr, rbe_ptr, w1e_ptr, b1e_ptr, w2e_ptr, b2e_ptr
            s_rw, s_w1m, s_w1h, s_b1 = stride_rwe_m, stride_w1e_m, stride_w1e_h, stride_b1e_m
            s_w2m, s_w2k, s_b2 = stride_w2e_m, stride_w2e_k, stride_b2e_m
        else:
            rows = Np
            xa_base = prompt_out_ptr + pid_k * stride_prompt_out_k + pid_b * stride_prompt_out_b
            stride_x = stride_prompt_out_n
            gates_base = gates_p_ptr + kb * Np * M
            source = 1
            rw, rb, w1, b1, w2, b2 = rwp_ptr, rbp_ptr, w1p_ptr, b1p_ptr, w2p_ptr, b2p_ptr
            s_rw, s_w1m, s_w1h, s_b1 = stride_rwp_m, stride_w1p_m, stride_w1p_h, stride_b1p_m
            s_w2m, s_w2k, s_b2 = stride_w2p_m, stride_w2p_k, stride_b2p_m
        counts = (seg != 1) | first_b
        for r0 in range(0, rows, BLOCK_T):
            r = r0 + offs_t
            r_mask = r < rows
            f, g, chosen = _moe_rows(
                xa_base + r * stride_x, prompts_ptr + pid_k * stride_prompts_k + r * stride_x, seg == 1, r_mask,
                rw, rb, w1, b1, w2, b2, s_rw, s_w1m, s_w1h, s_b1, s_w2m, s_w2k, s_b2,
                M, K, D, H, top_k, HAS_HIDDEN, BLOCK_T, BLOCK_D, BLOCK_H, BLOCK_K, BLOCK_M,
            )
            tl.store(
                gates_base + r[:, None] * M + offs_m[None, :], g, mask=(r_mask & counts)[:, None] & m_mask[None, :]
            )
            row_w = tl.where(r_mask & counts, 1.0, 0.0)[:, None]
            at_source = (offs_s == source)[:, None]
            gate_sums += tl.where(at_source, tl.sum(row_w * g, axis=0)[None, :], 0.0)
            routed += tl.where(at_source, tl.sum(row_w * chosen, axis=0)[None, :], 0.0)
            if seg == 0:
                f_sum += tl.sum(tl.where(r_mask[:, None], f, 0.0), axis=0)
            else:
                tl.store(
                    f_ep_ptr + ((seg - 1) * K * B * Np + kb * Np + r)[:, None] * K + offs_k[None, :],
                    f,
                    mask=r_mask[:, None] & k_mask[None, :],
                )
    token_logits = f_sum / (end - start).to(tl.float32)
    # f_e and f_p were stored by other threads of this program: make them visible.
    tl.debug_barrier()

    # 2. Per tile of prompts: the logits, softmax over the K experts, the mixture of the EPTs.
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, Np, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < Np
        row = kb * Np + n  # (BLOCK_N,) row of (K, B, Np)
        mask = n_mask[:, None] & k_mask[None, :]
        logits = token_logits[None, :] + tl.load(f_ep_ptr + row[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        if has_prompt_out:
            logits += tl.load(f_ep_ptr + (K * B * Np + row)[:, None] * K + offs_k[None, :], mask=mask, other=0.0)
        _softmax_and_mix(
            logits[None, :, :], n, row[None, :], n_mask[None, :], prompts_ptr, weights_ptr, (ipt_ptr + row * D)[None, :],
            stride_prompts_k, stride_prompts_n, K, Np, D, BLOCK_D, BLOCK_K,
        )

    # 3. Routing statistics; the routed counts are scaled here so that the loss is one dot product.
    scales = tl.where(offs_s == 0, scale_e, tl.where(offs_s == 1, scale_p, scale_z))
    stats = stats_ptr + kb * 6 * M + offs_s[:, None] * M + offs_m[None, :]
    mask = (offs_s < 3)[:, None] & m_mask[None, :]
    tl.store(stats, gate_sums, mask=mask)
    tl.store(stats + 3 * M, routed * scales[:, None], mask=mask)


@triton.jit
def _moe_bwd_tile(
    role,  # 0 <= role < M: MLP `role`'s weight gradients; role == M: dx and the router's
    xa_ptrs,  # (BLOCK_R,) row pointers into the activations
    xp_ptrs,  # (BLOCK_R,) row pointers into the prompts, read instead when from_p
    from_p,
    row_mask,  # (BLOCK_R,)
    g,  # (BLOCK_R, BLOCK_M) float32 the rows' gates, saved by the forward, zero in padding
    dl,  # (BLOCK_R, BLOCK_K) float32 dL/d f(x), zero in masked rows and columns
    gamma,  # (BLOCK_M,) float32 dL/d gate_m of every routed row (the aux loss), zero in padding
    offs_dw,  # (BLOCK_DW,) the columns of x this program owns
    is_first_d_tile,  # whether offs_dw is the first d-tile: the program that sums r, b1, W2 and b2
    rw_ptr,  # (M, D)
    w1_ptr,  # (M, H, D)
    b1_ptr,  # (M, H)
    w2_ptr,  # (M, K, H), or (M, K, D) when H = 0
    b2_ptr,  # (M, K)
    stride_rw_m,
    stride_w1_m,
    stride_w1_h,
    stride_b1_m,
    stride_w2_m,
    stride_w2_k,
    stride_b2_m,
    acc_rw,  # (BLOCK_M, BLOCK_DW) float32
    acc_rb,  # (BLOCK_M,)
    acc_w1,  # (BLOCK_H, BLOCK_DW): MLP `role`'s
    acc_b1,  # (BLOCK_H,)
    acc_w2,  # (BLOCK_K, BLOCK_H), or (BLOCK_K, BLOCK_DW) when H = 0
    acc_b2,  # (BLOCK_K,)
    M,
    K,
    D,
    H,
    top_k,
    HAS_HIDDEN: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_DW: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Backward of f over one tile of rows. Role M returns dL/dx for the columns offs_dw,
    (BLOCK_R, BLOCK_DW) float32, and adds the router's gradients; role m returns zeros and adds
    MLP m's. Both recompute from all of D the hidden activations they need: role m those of MLP
    m, role M those of every MLP a row chose (for dL/dg it needs each one's output). The gradients
    of r, b1, b2 and (with a hidden layer) W2 are the same for every d-tile: only the first d-tile's
    programs, which store them (``_store_moe_partial``), sum their terms."""
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    dw_mask = offs_dw < D
    mix = tl.where(row_mask[:, None], g * _top_k(g, M, top_k, BLOCK_M), 0.0)  # as in _moe_rows
    x = _load_x(xa_ptrs, xp_ptrs, from_p, row_mask, offs_dw, dw_mask)  # (BLOCK_R, BLOCK_DW)
    dx = tl.zeros((BLOCK_R, BLOCK_DW), dtype=tl.float32)
    dg = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    is_router = role == M
    # One loop serves both roles (one copy of the code to compile): all MLPs, or MLP `role`.
    for m in range(tl.where(is_router, 0, role), tl.where(is_router, M, role + 1)):
        w_m = _column(mix, offs_m, m)
        if tl.max(w_m, axis=0) > 0:  # skip an MLP no row of the tile chose
            dl_m = w_m[:, None] * dl  # dL/d MLP_m(x)
            if HAS_HIDDEN:
                h = _preact(
                    xa_ptrs, xp_ptrs, from_p, row_mask, w1_ptr + m * stride_w1_m, stride_w1_h, b1_ptr + m * stride_b1_m,
                    H, D, BLOCK_R, BLOCK_D, BLOCK_H,
                )
                w2 = tl.load(
                    w2_ptr + m * stride_w2_m + offs_k[:, None] * stride_w2_k + offs_h[None, :],
                    mask=k_mask[:, None] & h_mask[None, :],
                    other=0.0,
                )  # (BLOCK_K, BLOCK_H)
                a = tl.where(row_mask[:, None], _gelu(h), 0.0)
                # dl W2[m], unscaled by g_m: it gives dh and, without a product for MLP_m(x)
                # itself, <dl, MLP_m(x)> = <dl W2[m], a> + <dl, b2[m]>.
                da = tl.dot(dl.to(w2.dtype), w2, input_precision="tf32x3")  # (BLOCK_R, BLOCK_H)
                dh = w_m[:, None] * da * _gelu_grad(h)  # zero in masked rows
                if is_router:
                    b2 = tl.load(b2_ptr + m * stride_b2_m + offs_k, mask=k_mask, other=0.0).to(tl.float32)
                    dot = tl.sum(da * a, axis=1) + tl.sum(dl * b2[None, :], axis=1)
                    dg += tl.where((offs_m[None, :] == m) & (w_m[:, None] > 0), dot[:, None], 0.0)
                    w1 = tl.load(
                        w1_ptr + m * stride_w1_m + offs_h[:, None] * stride_w1_h + offs_dw[None, :],
                        mask=h_mask[:, None] & dw_mask[None, :],
                        other=0.0,
                    )  # (BLOCK_H, BLOCK_DW)
                    dx = tl.dot(dh.to(w1.dtype), w1, dx, input_precision="tf32x3")
                else:
                    if is_first_d_tile:
                        acc_b2 += tl.sum(dl_m, axis=0)
                        acc_w2 = tl.dot(tl.trans(dl_m.to(w2.dtype)), a.to(w2.dtype), acc_w2, input_precision="tf32x3")
                        acc_b1 += tl.sum(dh, axis=0)
                    w1_dtype = w1_ptr.dtype.element_ty
                    acc_w1 = _dot(tl.trans(dh.to(w1_dtype)), x, acc_w1)
            else:
                w2_dtype = w2_ptr.dtype.element_ty
                dl_c = dl_m.to(w2_dtype)
                if is_router:
                    out = _preact(
                        xa_ptrs, xp_ptrs, from_p, row_mask, w2_ptr + m * stride_w2_m, stride_w2_k, b2_ptr + m * stride_b2_m,
                        K, D, BLOCK_R, BLOCK_D, BLOCK_K,
                    )
                    dot = tl.sum(dl * out, axis=1)
                    dg += tl.where((offs_m[None, :] == m) & (w_m[:, None] > 0), dot[:, None], 0.0)
                    w2 = tl.load(
                        w2_ptr + m * stride_w2_m + offs_k[:, None] * stride_w2_k + offs_dw[None, :],
                        mask=k_mask[:, None] & dw_mask[None, :],
                        other=0.0,
                    )  # (BLOCK_K, BLOCK_DW)
                    dx = tl.dot(dl_c, w2, dx, input_precision="tf32x3")
                else:
                    if is_first_d_tile:
                        acc_b2 += tl.sum(dl_m, axis=0)
                    acc_w2 = _dot(tl.trans(dl_c), x, acc_w2)
    if is_router:
        # dL/dg_m = [m chosen] <dl, MLP_m(x)> + gamma_m, through the router's softmax.
        dg = tl.where(row_mask[:, None] & m_mask[None, :], dg + gamma[None, :], 0.0)
        du = g * (dg - tl.sum(g * dg, axis=1)[:, None])
        rw = tl.load(
            rw_ptr + offs_m[:, None] * stride_rw_m + offs_dw[None, :], mask=m_mask[:, None] & dw_mask[None, :], other=0.0
        )  # (BLOCK_M, BLOCK_DW)
        du_c = du.to(rw.dtype)
        dx = tl.dot(du_c, rw, dx, input_precision="tf32x3")
        acc_rw = _dot(tl.trans(du_c), x, acc_rw)
        if is_first_d_tile:
            acc_rb += tl.sum(du, axis=0)
    return dx, acc_rw, acc_rb, acc_w1, acc_b1, acc_w2, acc_b2


@triton.jit
def _store_moe_partial(
    partial_ptr,  # (C,) float32: this program's row, packed [R (M*D) | r (M) | W1 (M*H*D) | b1 (M*H) | W2 | b2 (M*K)]
    role,
    acc_rw,
    acc_rb,
    acc_w1,
    acc_b1,
    acc_w2,
    acc_b2,
    offs_dw,
    is_first_d_tile,
    M,
    K,
    D,
    H,
    HAS_HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Writes the accumulators of one role into its columns of the row. The (M + 1) * S_D
    programs of a row group write disjoint columns that cover the row: the d-tiles of R and W1
    (or, without a hidden layer, of W2), and, from the first d-tile's programs, r, b1, W2 and b2."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    h_mask = offs_h < H
    k_mask = offs_k < K
    dw_mask = offs_dw < D
    if role == M:
        tl.store(partial_ptr + offs_m[:, None] * D + offs_dw[None, :], acc_rw, mask=m_mask[:, None] & dw_mask[None, :])
        if is_first_d_tile:
            tl.store(partial_ptr + M * D + offs_m, acc_rb, mask=m_mask)
    else:
        m = role
        off_w1 = M * D + M
        if HAS_HIDDEN:
            off_b1 = off_w1 + M * H * D
            off_w2 = off_b1 + M * H
            off_b2 = off_w2 + M * K * H
            tl.store(
                partial_ptr + off_w1 + m * H * D + offs_h[:, None] * D + offs_dw[None, :],
                acc_w1,
                mask=h_mask[:, None] & dw_mask[None, :],
            )
            if is_first_d_tile:
                tl.store(partial_ptr + off_b1 + m * H + offs_h, acc_b1, mask=h_mask)
                tl.store(
                    partial_ptr + off_w2 + m * K * H + offs_k[:, None] * H + offs_h[None, :],
                    acc_w2,
                    mask=k_mask[:, None] & h_mask[None, :],
                )
        else:
            off_w2 = off_w1
            off_b2 = off_w2 + M * K * D
            tl.store(
                partial_ptr + off_w2 + m * K * D + offs_k[:, None] * D + offs_dw[None, :],
                acc_w2,
                mask=k_mask[:, None] & dw_mask[None, :],
            )
        if is_first_d_tile:
            tl.store(partial_ptr + off_b2 + m * K + offs_k, acc_b2, mask=k_mask)


@triton.jit
def _moe_accumulators(
    HAS_HIDDEN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DW: tl.constexpr, BLOCK_M: tl.constexpr
):
    """Zeroed float32 accumulators of one program: the router's (R's d-tile, r) and one MLP's."""
    acc_w1, acc_b1, acc_w2, acc_b2 = _grad_accumulators(HAS_HIDDEN, BLOCK_H, BLOCK_K, BLOCK_DW)
    acc_rw = tl.zeros((BLOCK_M, BLOCK_DW), dtype=tl.float32)
    acc_rb = tl.zeros((BLOCK_M,), dtype=tl.float32)
    return acc_rw, acc_rb, acc_w1, acc_b1, acc_w2, acc_b2



# Triton would compile an integer equal to 1 as a constant, a second variant of the whole kernel.
@triton.jit(do_not_specialize=["top_k", "has_prompt_out", "need_grad_tokens", "has_aux_grad"])
def _dispatch_moe_bwd_kernel(
    prompts_ptr,  # (K, Np, D)
    tokens_ptr,  # (K, B, T, D), any strides with stride(-1) == 1
    prompt_out_ptr,  # (K, B, Np, D); a placeholder when has_prompt_out is 0
    tok_range_ptr,  # (K, 2) int32
    grad_ipt_ptr,  # (K, B, Np, D) dL/d ipt, any strides
    weights_ptr,  # (K, B, Np, K) float32, contiguous
    dlogits_ptr,  # (K, B, Np, K) float32, contiguous, from _dispatch_bwd_softmax_kernel
    gates_e_ptr,  # (K, Np, M) float32, saved by the forward
    gates_p_ptr,  # (K, B, Np, M) float32; a placeholder when has_prompt_out is 0
    gates_z_ptr,  # (K, B, T, M) float32
    coef_ptr,  # (3, M) float32: d aux / d gate_sum of each source (the scaled routed counts)
    grad_aux_ptr,  # () float32 dL/d aux; a placeholder when has_aux_grad is 0
    rwe_ptr,  # (M, D) f_e's router weight; W1 and b1 are placeholders when HAS_HIDDEN is False
    w1e_ptr,  # (M, H, D)
    b1e_ptr,  # (M, H)
    w2e_ptr,  # (M, K, H), or (M, K, D) when H = 0
    b2e_ptr,  # (M, K)
    rwp_ptr,  # f_p, shapes as f_e
    w1p_ptr,
    b1p_ptr,
    w2p_ptr,
    b2p_ptr,
    rwz_ptr,  # f_z, shapes as f_e
    w1z_ptr,
    b1z_ptr,
    w2z_ptr,
    b2z_ptr,
    grad_prompts_ptr,  # (K, Np, D) out, contiguous, the prompts' dtype
    grad_tokens_ptr,  # (K, B, T, D) out, contiguous, the tokens' dtype; a placeholder unless need_grad_tokens
    grad_prompt_out_ptr,  # (K, B, Np, D) out, contiguous, the tokens' dtype; a placeholder without prompt_out
    partials_ptr,  # (R, C) out, float32: one row of weight gradients per row group and source
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
    stride_coef_s,  # 0 when the sources share one f (one coef row for all)
    stride_rwe_m,
    stride_w1e_m,
    stride_w1e_h,
    stride_b1e_m,
    stride_w2e_m,
    stride_w2e_k,
    stride_b2e_m,
    stride_rwp_m,
    stride_w1p_m,
    stride_w1p_h,
    stride_b1p_m,
    stride_w2p_m,
    stride_w2p_k,
    stride_b2p_m,
    stride_rwz_m,
    stride_w1z_m,
    stride_w1z_h,
    stride_b1z_m,
    stride_w2z_m,
    stride_w2z_k,
    stride_b2z_m,
    B,
    K,
    Np,
    T,
    D,
    H,
    M,
    top_k,
    C,  # columns of a partial row (module docstring)
    B_PER_PROG,  # batch rows per expert program: K * ceil(B / B_PER_PROG) row groups per source
    N_PER_PROG,  # prompts per prompt program
    row_p0,  # first partial row of f_p (one per expert row group)
    row_z0,  # first partial row of f_z
    row_e0,  # first partial row of f_e (one per prompt group)
    has_prompt_out,  # 0 or 1, a run-time switch: one compiled variant serves both cases
    need_grad_tokens,  # 0 or 1: 0 skips writing dZ (K*B*T*D elements) when the tokens need none
    has_aux_grad,  # 0 or 1: 0 when nothing differentiates the aux loss
    HAS_HIDDEN: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_DW: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Program (role * S_D + d-tile, group). The first K * ceil(B / B_PER_PROG) groups are
    (expert k, batch rows): the backward of f_p over those rows of Z_P and of f_z over those of
    Z. The others are groups of prompts: the backward of f_e over the rows P[:, n] and the
    fusion gradient of P[:, n]. Role M writes the input gradients of the d-tile; every role
    writes its share of the weight gradients. Rows go in tiles of BLOCK_T, flattened over
    (batch row, prompt or token) or (prompt, expert), each row gathering its own dL/d f."""
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    d_tiles = tl.cdiv(D, BLOCK_DW)
    role = pid_r // d_tiles
    pid_d = pid_r % d_tiles
    offs_dw = pid_d * BLOCK_DW + tl.arange(0, BLOCK_DW)
    dw_mask = offs_dw < D
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_t = tl.arange(0, BLOCK_T)
    is_first_d_tile = pid_d == 0
    writes_dx = role == M
    grad_aux = 0.0
    if has_aux_grad:
        grad_aux = tl.load(grad_aux_ptr).to(tl.float32)
    b_groups = tl.cdiv(B, B_PER_PROG)
    is_expert = pid_g < K * b_groups
    # Expert groups: k, batch rows [b_lo, b_lo + nb), tokens [start, end). Prompt groups: prompts
    # [n_lo, n_lo + nn). Each is garbage (and unused) in the other kind of group.
    k = tl.where(is_expert, pid_g // b_groups, 0)
    b_lo = (pid_g % b_groups) * B_PER_PROG
    nb = tl.minimum(b_lo + B_PER_PROG, B) - b_lo
    start = tl.load(tok_range_ptr + 2 * k)
    end = tl.load(tok_range_ptr + 2 * k + 1)
    count = end - start
    group = pid_g - K * b_groups
    n_lo = group * N_PER_PROG
    nn = tl.minimum(n_lo + N_PER_PROG, Np) - n_lo
    seg_lo = tl.where(is_expert, 2 - has_prompt_out, 0)
    seg_hi = tl.where(is_expert, 3, 1)
    for seg in range(seg_lo, seg_hi):  # 0: f_e on P[:, n], 1: f_p on Z_P[k, b], 2: f_z on Z[k, b]
        if seg == 0:
            rows = nn * K
            rows_per_b = Np  # unused
            rw, w1, b1, w2, b2 = rwe_ptr, w1e_ptr, b1e_ptr, w2e_ptr, b2e_ptr
            s_rw, s_w1m, s_w1h, s_b1 = stride_rwe_m, stride_w1e_m, stride_w1e_h, stride_b1e_m
            s_w2m, s_w2k, s_b2 = stride_w2e_m, stride_w2e_k, stride_b2e_m
            partial_row = row_e0 + group
        elif seg == 1:
            rows = nb * Np
            rows_per_b = Np
            rw, w1, b1, w2, b2 = rwp_ptr, w1p_ptr, b1p_ptr, w2p_ptr, b2p_ptr
            s_rw, s_w1m, s_w1h, s_b1 = stride_rwp_m, stride_w1p_m, stride_w1p_h, stride_b1p_m
            s_w2m, s_w2k, s_b2 = stride_w2p_m, stride_w2p_k, stride_b2p_m
            partial_row = row_p0 + pid_g
        else:
            rows = nb * count
            rows_per_b = count
            rw, w1, b1, w2, b2 = rwz_ptr, w1z_ptr, b1z_ptr, w2z_ptr, b2z_ptr
            s_rw, s_w1m, s_w1h, s_b1 = stride_rwz_m, stride_w1z_m, stride_w1z_h, stride_b1z_m
            s_w2m, s_w2k, s_b2 = stride_w2z_m, stride_w2z_k, stride_b2z_m
            partial_row = row_z0 + pid_g
        gamma = grad_aux * tl.load(coef_ptr + seg * stride_coef_s + offs_m, mask=m_mask, other=0.0)
        acc_rw, acc_rb, acc_w1, acc_b1, acc_w2, acc_b2 = _moe_accumulators(HAS_HIDDEN, BLOCK_H, BLOCK_K, BLOCK_DW, BLOCK_M)
        for r0 in range(0, rows, BLOCK_T):
            r = r0 + offs_t
            r_mask = r < rows
            n = n_lo + r // K  # prompt rows P[j, n]
            j = r % K
            b = b_lo + r // rows_per_b  # expert rows: batch row b, prompt or token i
            i = r % rows_per_b
            if seg == 0:
                xa_ptrs = tokens_ptr + 0 * r  # not read
                xp_ptrs = prompts_ptr + j * stride_prompts_k + n * stride_prompts_n
                out_row = j * Np + n  # row of (K, Np)
                g_ptrs = gates_e_ptr + out_row * M
                # dL/d f_e(P[j, n]) = sum_b dlogits[j, b, n].
                dl = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
                for bb in range(0, B):
                    dl += tl.load(
                        dlogits_ptr + ((j * B + bb) * Np + n)[:, None] * K + offs_k[None, :],
                        mask=r_mask[:, None] & k_mask[None, :],
                        other=0.0,
                    )
            elif seg == 1:
                xa_ptrs = prompt_out_ptr + k * stride_prompt_out_k + b * stride_prompt_out_b + i * stride_prompt_out_n
                xp_ptrs = prompts_ptr + 0 * r  # not read
                out_row = (k * B + b) * Np + i  # row of (K, B, Np)
                g_ptrs = gates_p_ptr + out_row * M
                dl = tl.load(
                    dlogits_ptr + out_row[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0
                )
            else:
                xa_ptrs = tokens_ptr + k * stride_tokens_k + b * stride_tokens_b + (start + i) * stride_tokens_t
                xp_ptrs = prompts_ptr + 0 * r  # not read
                out_row = (k * B + b) * T + start + i  # row of (K, B, T)
                g_ptrs = gates_z_ptr + out_row * M
                # Every token of (k, b) in [start, end) receives dL/d f = sum_n dlogits[k, b, n] / count.
                dl = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
                for nn_ in range(0, Np):
                    dl += tl.load(
                        dlogits_ptr + ((k * B + b) * Np + nn_)[:, None] * K + offs_k[None, :],
                        mask=r_mask[:, None] & k_mask[None, :],
                        other=0.0,
                    )
                dl = dl / count.to(tl.float32)
            g = tl.load(g_ptrs[:, None] + offs_m[None, :], mask=r_mask[:, None] & m_mask[None, :], other=0.0)
            dx, acc_rw, acc_rb, acc_w1, acc_b1, acc_w2, acc_b2 = _moe_bwd_tile(
                role, xa_ptrs, xp_ptrs, seg == 0, r_mask, g, dl, gamma, offs_dw, is_first_d_tile,
                rw, w1, b1, w2, b2, s_rw, s_w1m, s_w1h, s_b1, s_w2m, s_w2k, s_b2,
                acc_rw, acc_rb, acc_w1, acc_b1, acc_w2, acc_b2,
                M, K, D, H, top_k, HAS_HIDDEN, BLOCK_T, BLOCK_D, BLOCK_H, BLOCK_DW, BLOCK_K, BLOCK_M,
            )
            if writes_dx:
                mask = r_mask[:, None] & dw_mask[None, :]
                if seg == 0:
                    # Fusion: dP[j, n, :] += sum_{k,b} weights[k, b, n, j] grad_ipt[k, b, n, :],
                    # in float32, one (k, b) at a time: each row has its own n and j.
                    for kb in range(0, K * B):
                        w = tl.load(weights_ptr + ((kb * Np + n) * K + j), mask=r_mask, other=0.0)
                        g_ipt = tl.load(
                            grad_ipt_ptr + (kb // B) * stride_grad_k + (kb % B) * stride_grad_b
                            + n[:, None] * stride_grad_n + offs_dw[None, :] * stride_grad_d,
                            mask=mask,
                            other=0.0,
                        )
                        dx += w[:, None] * g_ipt.to(tl.float32)
                    tl.store(
                        grad_prompts_ptr + out_row[:, None] * D + offs_dw[None, :], dx.to(grad_prompts_ptr.dtype.element_ty),
                        mask=mask,
                    )
                elif seg == 1:
                    tl.store(
                        grad_prompt_out_ptr + out_row[:, None] * D + offs_dw[None, :],
                        dx.to(grad_prompt_out_ptr.dtype.element_ty), mask=mask,
                    )
                elif need_grad_tokens:
                    tl.store(
                        grad_tokens_ptr + out_row[:, None] * D + offs_dw[None, :], dx.to(grad_tokens_ptr.dtype.element_ty),
                        mask=mask,
                    )
        _store_moe_partial(
            partials_ptr + partial_row.to(tl.int64) * C, role, acc_rw, acc_rb, acc_w1, acc_b1, acc_w2, acc_b2,
            offs_dw, is_first_d_tile, M, K, D, H, HAS_HIDDEN, BLOCK_H, BLOCK_K, BLOCK_M,
        )
    if is_expert & writes_dx & (need_grad_tokens != 0):
        # Tokens outside [start, end) are not routed: their gradient is zero, written here
        # rather than by zero-filling all of dZ beforehand.
        zeros = tl.zeros((BLOCK_T, BLOCK_DW), dtype=grad_tokens_ptr.dtype.element_ty)
        rest = T - count
        for r0 in range(0, nb * rest, BLOCK_T):
            r = r0 + offs_t
            i = r % rest
            t = tl.where(i < start, i, i + count)
            row = (k * B + b_lo + r // rest) * T + t
            mask = (r < nb * rest)[:, None] & dw_mask[None, :]
            tl.store(grad_tokens_ptr + row[:, None] * D + offs_dw[None, :], zeros, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

MAX_DISPATCH_EXPERTS = 16  # M: the gates tile is BLOCK_M = 16 wide, the minimum tl.dot takes
BLOCK_M = 16
_NUM_WARPS = {"fwd": 4, "bwd": 8}


def default_moe_blocks(K: int, B: int, Np: int, D: int, H: int, M: int, device: torch.device) -> dict[str, int]:
    """kernels/dispatch.py's block sizes for the same H (one MLP of the mixture is one MLP of kind
    "mlp"), with the work split of the backward recounted for its M + 1 roles."""
    blocks = kd.default_blocks(K, B, Np, D, H, device)
    # This backward recomputes the hidden layer from all of D once per d-tile: it takes wider
    # d-tiles than kind "mlp", whose backward reads the pre-activations its forward saved.
    blocks["BLOCK_DW"] = 8192 // max(blocks["BLOCK_H"], 64)
    blocks["BLOCK_T"] = 32
    d_tiles = kd.cdiv(D, blocks["BLOCK_DW"])
    if device.type == "cuda":
        # Two programs per SM, as kind "mlp"; each row group already has (M + 1) * S_D programs.
        programs = 2 * kd.multiprocessors(device)
        b_groups = max(1, min(B, programs // (K * d_tiles * (M + 1))))
        n_groups = max(1, min(Np, programs // (d_tiles * (M + 1))))
    else:
        # The interpreter: a small grid that still splits the batch and the prompts.
        b_groups, n_groups = min(B, 2), min(Np, 2)
    blocks["B_PER_PROG"] = kd.cdiv(B, b_groups)
    blocks["N_PER_PROG"] = kd.cdiv(Np, n_groups)
    return blocks


def moe_blocks(K: int, B: int, Np: int, D: int, H: int, M: int, device: torch.device) -> dict[str, int]:
    """``default_moe_blocks``, with any of them pinned by kernels/dispatch.py's environment variable
    ``PMOE_TRITON_BLOCKS="BLOCK_D=32,B_PER_PROG=1"`` (the same keys and rules as kind "mlp")."""
    blocks = default_moe_blocks(K, B, Np, D, H, M, device)
    pinned = os.environ.get(kd.BLOCK_ENV, "").strip()
    if pinned:
        for item in pinned.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in blocks or not value.strip().isdigit():
                raise ValueError(f"{kd.BLOCK_ENV}: cannot read {item!r}; expected KEY=INT with KEY one of {tuple(blocks)}")
            blocks[key] = int(value)
    return blocks


def _moe_sizes(params: MoEParams) -> tuple[int, int]:
    """(M, H) of one f."""
    return params[0].shape[0], (0 if params[2] is None else params[2].shape[1])


def _is_shared(params_e: MoEParams, params_p: MoEParams, params_z: MoEParams) -> bool:
    return kd._param_groups([("e", params_e), ("p", params_p), ("z", params_z)])["z"] == 0


def _check_args(prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z, top_k) -> tuple[int, int]:
    """Raises ValueError for arguments that do not form the op; returns (M, H)."""
    K, _, _, _, D = kd.check_shapes(prompts, tokens, tok_start, tok_end, prompt_out)
    if len(params_e) != 6:
        raise ValueError(f"params_e must be (router_w, router_b, W1, b1, W2, b2), got {len(params_e)} tensors")
    M, H = _moe_sizes(params_e)
    for name, params in (("params_e", params_e), ("params_p", params_p), ("params_z", params_z)):
        mlps = ((M, H, D), (M, H), (M, K, H)) if H else (None, None, (M, K, D))
        expected = ((M, D), (M,), *mlps, (M, K))
        got = tuple(None if p is None else tuple(p.shape) for p in params)
        if got != expected:
            raise ValueError(
                f"{name} must be (router_w, router_b, W1, b1, W2, b2) shaped {expected} "
                f"(M={M}, H={H} as params_e), got {got}"
            )
    if len(set(kd._param_groups([("e", params_e), ("p", params_p), ("z", params_z)]).values())) == 2:
        # The loss is per f; a layer has one shared f or three (Dispatcher's separate_mlps).
        raise ValueError(
            "params_e, params_p and params_z must be the very same tensors (one shared f) or three distinct f's"
        )
    if not 1 <= top_k <= M:
        raise ValueError(f"top_k must be in [1, M={M}], got {top_k}")
    kd.raise_unsupported("the Triton MoE dispatcher", moe_not_supported_reasons(prompts, tokens, prompt_out, params_e, params_p, params_z))
    return M, H


def _param_pointers(params: MoEParams):
    """The six pointers of one f (W1 and b1 replaced by the router weight, never read, when
    H = 0) and its seven strides (R by m; W1 by m and h; b1 by m; W2 by m and k; b2 by m)."""
    rw, rb, w1, b1, w2, b2 = params
    if w1 is None:
        return (rw, rb, rw, rw, w2, b2), (rw.stride(0), 0, 0, 0, w2.stride(0), w2.stride(1), b2.stride(0))
    strides = (rw.stride(0), w1.stride(0), w1.stride(1), b1.stride(0), w2.stride(0), w2.stride(1), b2.stride(0))
    return (rw, rb, w1, b1, w2, b2), strides


def _no_router_bias(pointers: tuple) -> tuple:
    """The backward's five pointers of one f: it reads the saved gates, not the router's bias."""
    return pointers[:1] + pointers[2:]


def _aux_scales(K, B, Np, tok_start, tok_end, has_prompt_out, shared, M, top_k) -> tuple[float, float, float]:
    """M / (#f * rows_f^2 * top_k) for the f of each source (e, p, z): the factor that turns its
    routed counts into d aux / d gate_sum. A source without rows gets 0."""
    rows = {"e": K * Np, "p": K * B * Np if has_prompt_out else 0, "z": B * sum(e - s for s, e in zip(tok_start, tok_end))}
    if shared:
        total = sum(rows.values())
        return (M / (total * total * top_k),) * 3
    n_f = sum(1 for r in rows.values() if r)
    return tuple(M / (n_f * r * r * top_k) if r else 0.0 for r in rows.values())


def dispatch_moe_fwd(
    prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z, top_k, shared=None, check=True
):
    """One Triton launch and two torch ops (a sum, a dot). Returns ipt (K, B, Np, D) in the prompts'
    dtype, weights (K, B, Np, K) float32, aux_loss () float32 and coef, d aux / d gate_sum: (3, M)
    float32, or (M,) when the sources share one f (then the same for all three), and the gates
    of the rows of each source, (gates_e, gates_p or None, gates_z), for the backward. ``shared``:
    whether the sources share one f; by default, whether they pass the very same tensors.
    ``check=False`` skips validating the inputs, for a caller that has validated them already
    (``Dispatcher``)."""
    if check:
        M, H = _check_args(prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z, top_k)
    else:
        M, H = _moe_sizes(params_e)
    K, Np, D = prompts.shape
    B, T = tokens.shape[1:3]
    device = prompts.device
    blocks = moe_blocks(K, B, Np, D, H, M, device)
    has_prompt_out = prompt_out is not None
    shared = _is_shared(params_e, params_p, params_z) if shared is None else shared
    ipt = torch.empty((K, B, Np, D), dtype=prompts.dtype, device=device)
    weights = torch.empty((K, B, Np, K), dtype=torch.float32, device=device)
    stats = torch.empty((K * B, 2, 3, M), dtype=torch.float32, device=device)
    # The gates of every routed row, for the backward (M floats a row, against D for the row),
    # and f_e, f_p of the prompt rows until the softmax.
    gates_e = torch.empty((K, Np, M), dtype=torch.float32, device=device)
    gates_p = torch.empty((K, B, Np, M), dtype=torch.float32, device=device) if has_prompt_out else None
    gates_z = torch.empty((K, B, T, M), dtype=torch.float32, device=device)
    f_ep = torch.empty((2, K, B, Np, K), dtype=torch.float32, device=device)
    pout = prompt_out if has_prompt_out else tokens
    ptrs_e, strides_e = _param_pointers(params_e)
    ptrs_p, strides_p = _param_pointers(params_p)
    ptrs_z, strides_z = _param_pointers(params_z)
    _dispatch_moe_fwd_kernel[(K, B)](
        prompts, tokens, pout, kd._token_ranges(tok_start, tok_end, device),
        *ptrs_e, *ptrs_p, *ptrs_z,
        ipt, weights, stats, gates_e, gates_e if gates_p is None else gates_p, gates_z, f_ep,
        *prompts.stride()[:2], *tokens.stride()[:3], *kd.outer_strides(prompt_out),
        *strides_e, *strides_p, *strides_z,
        B, K, Np, T, D, H, M, top_k, int(has_prompt_out),
        *_aux_scales(K, B, Np, tok_start, tok_end, has_prompt_out, shared, M, top_k),
        HAS_HIDDEN=H > 0, BLOCK_T=blocks["BLOCK_T"], BLOCK_N=blocks["BLOCK_N"], BLOCK_D=blocks["BLOCK_D"],
        BLOCK_H=blocks["BLOCK_H"], BLOCK_K=16, BLOCK_M=BLOCK_M, num_warps=_NUM_WARPS["fwd"],
    )
    # [gate sums; scaled routed counts]: per source, or summed over the sources of one shared f.
    # torch.sum reduces in a fixed order for a fixed shape: the loss is deterministic.
    totals = stats.sum((0, 2)) if shared else stats.sum(0)
    aux = torch.dot(totals[0].view(-1), totals[1].view(-1))  # rows of a contiguous tensor: views
    return ipt, weights, aux, totals[1], (gates_e, gates_p, gates_z)


def dispatch_moe_bwd(
    grad_ipt, grad_aux, prompts, tokens, tok_start, tok_end, prompt_out, weights, coef, gates,
    params_e, params_p, params_z, top_k, need_grad_tokens: bool = True, groups=None, packed: bool = False,
):
    """Three Triton launches, no torch op. ``grad_aux`` None: nothing differentiates the aux loss.
    Returns (dprompts, dtokens or None, dprompt_out or None, grads_e, grads_p, grads_z), each
    grads_s a (dR, dr, dW1, db1, dW2, db2) tuple (dW1, db1 None when H = 0), or None for a source
    that shares its parameters with an earlier one or that did not run (f_p without prompt_out).
    ``groups`` and ``packed`` as for kernels/dispatch.py's dispatch_bwd (``unpack_moe_param_grads``
    reads a packed row)."""
    K, Np, D = prompts.shape
    B, T = tokens.shape[1:3]
    M, H = _moe_sizes(params_e)
    grad_ipt = kd._within_32_bits(grad_ipt)
    device = prompts.device
    blocks = moe_blocks(K, B, Np, D, H, M, device)
    has_prompt_out = prompt_out is not None
    C = moe_param_grad_width(K, D, H, M)

    dlogits = kd._launch_bwd_softmax(grad_ipt, prompts, weights, blocks)

    b_groups = kd.cdiv(B, blocks["B_PER_PROG"])
    n_groups = kd.cdiv(Np, blocks["N_PER_PROG"])
    row_p0 = 0
    row_z0 = K * b_groups if has_prompt_out else 0
    row_e0 = row_z0 + K * b_groups
    partials = torch.empty((row_e0 + n_groups, C), dtype=torch.float32, device=device)
    grad_prompts = torch.empty((K, Np, D), dtype=prompts.dtype, device=device)
    placeholder = torch.empty(0, dtype=tokens.dtype, device=device)  # for outputs not written
    grad_tokens = torch.empty((K, B, T, D), dtype=tokens.dtype, device=device) if need_grad_tokens else None
    grad_prompt_out = torch.empty((K, B, Np, D), dtype=prompt_out.dtype, device=device) if has_prompt_out else None
    pout = prompt_out if has_prompt_out else tokens
    ptrs_e, strides_e = _param_pointers(params_e)
    ptrs_p, strides_p = _param_pointers(params_p)
    ptrs_z, strides_z = _param_pointers(params_z)
    gates_e, gates_p, gates_z = gates
    d_tiles = kd.cdiv(D, blocks["BLOCK_DW"])
    _dispatch_moe_bwd_kernel[(d_tiles * (M + 1), K * b_groups + n_groups)](
        prompts, tokens, pout, kd._token_ranges(tok_start, tok_end, device), grad_ipt, weights, dlogits,
        gates_e, gates_e if gates_p is None else gates_p, gates_z, coef, coef if grad_aux is None else grad_aux,
        *_no_router_bias(ptrs_e), *_no_router_bias(ptrs_p), *_no_router_bias(ptrs_z),
        grad_prompts, placeholder if grad_tokens is None else grad_tokens,
        placeholder if grad_prompt_out is None else grad_prompt_out, partials,
        *prompts.stride()[:2], *tokens.stride()[:3], *kd.outer_strides(prompt_out), *grad_ipt.stride(),
        coef.stride(0) if coef.dim() == 2 else 0,
        *strides_e, *strides_p, *strides_z,
        B, K, Np, T, D, H, M, top_k, C, blocks["B_PER_PROG"], blocks["N_PER_PROG"], row_p0, row_z0, row_e0,
        int(has_prompt_out), int(need_grad_tokens), int(grad_aux is not None), HAS_HIDDEN=H > 0,
        BLOCK_T=blocks["BLOCK_T"], BLOCK_DW=blocks["BLOCK_DW"], BLOCK_D=blocks["BLOCK_D"],
        BLOCK_H=blocks["BLOCK_H"], BLOCK_K=16, BLOCK_M=BLOCK_M, num_warps=_NUM_WARPS["bwd"],
    )

    sources = [("e", params_e)] + ([("p", params_p)] if has_prompt_out else []) + [("z", params_z)]
    groups = groups or kd._param_groups(sources)
    row_ranges = {"e": (row_e0, row_e0 + n_groups), "p": (row_p0, row_p0 + K * b_groups), "z": (row_z0, row_z0 + K * b_groups)}
    out = kd.reduce_partials(partials, C, params_e[0].dtype, groups, row_ranges, blocks)
    if packed:
        return grad_prompts, grad_tokens, grad_prompt_out, out
    grads = kd.unpack_groups(out, groups, lambda row: unpack_moe_param_grads(row, K, D, H, M))
    return grad_prompts, grad_tokens, grad_prompt_out, grads.get("e"), grads.get("p"), grads.get("z")


def moe_param_grad_width(K: int, D: int, H: int, M: int) -> int:
    """C, the floats of one f's gradients: [R (M*D) | r (M) | W1 (M*H*D) | b1 (M*H) | W2 (M*K*H,
    or M*K*D when H = 0) | b2 (M*K)]."""
    return M * D + M + (M * H * D + M * H + M * K * H + M * K if H else M * K * D + M * K)


def unpack_moe_param_grads(row: torch.Tensor, K: int, D: int, H: int, M: int) -> tuple:
    """(dR, dr, dW1, db1, dW2, db2), views of one row of C floats (``moe_param_grad_width``); dW1
    and db1 are None when H = 0."""
    sizes = [M * D, M, M * H * D, M * H, M * K * (H or D), M * K]
    shapes = [(M, D), (M,), (M, H, D), (M, H), (M, K, H or D), (M, K)]
    parts = [p.view(s) for p, s in zip(row.split(sizes), shapes)]
    if not H:
        parts[2] = parts[3] = None
    return tuple(parts)


# ---------------------------------------------------------------------------------------------
# Autograd, operators and the functional entry point
# ---------------------------------------------------------------------------------------------


class FusedDispatchMoE(torch.autograd.Function):
    """Differentiable in prompts, tokens, prompt_out and every parameter, through ipt and through
    aux_loss; ``weights`` is returned for inspection only (marked non-differentiable, as for kind
    "mlp"). The parameters come flattened (six per source) because autograd only tracks tensors
    passed directly."""

    @staticmethod
    def forward(ctx, prompts, tokens, tok_start, tok_end, prompt_out, top_k, *params):
        params_e, params_p, params_z = params[0:6], params[6:12], params[12:18]
        ipt, weights, aux, coef, gates = dispatch_moe_fwd(
            prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z, top_k
        )
        ctx.mark_non_differentiable(weights)
        # No zero-filled gradients for weights or an unused aux loss: launches nobody needs.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(prompts, tokens, prompt_out, weights, coef, *gates, *params)
        ctx.tok_range = (tuple(tok_start), tuple(tok_end))
        ctx.top_k = top_k
        return ipt, weights, aux

    @staticmethod
    @first_order_only("The Triton MoE dispatcher", TWICE_WITH_TORCH_DISPATCHER)
    def backward(ctx, grad_ipt, _grad_weights, grad_aux):
        if grad_ipt is None and grad_aux is None:
            return (None,) * (6 + 18)
        prompts, tokens, prompt_out, weights, coef, gates_e, gates_p, gates_z, *params = ctx.saved_tensors
        if grad_ipt is None:
            # A loss on aux_loss alone: one zero-fill, then the same launches.
            grad_ipt = prompts.new_zeros(weights.shape[:3] + prompts.shape[-1:])
        grad_prompts, grad_tokens, grad_prompt_out, grads_e, grads_p, grads_z = dispatch_moe_bwd(
            grad_ipt, grad_aux, prompts, tokens, *ctx.tok_range, prompt_out, weights, coef, (gates_e, gates_p, gates_z),
            tuple(params[0:6]), tuple(params[6:12]), tuple(params[12:18]), ctx.top_k,
            need_grad_tokens=ctx.needs_input_grad[1],
        )
        none = (None,) * 6
        # A source without its own gradients shares the tensors of an earlier source, whose
        # gradient already holds its contribution.
        return (
            grad_prompts, grad_tokens, None, None, grad_prompt_out, None,
            *(grads_e or none), *(grads_p or none), *(grads_z or none),
        )


# For torch.compile, the launchers as two operators, as kernels/dispatch.py does for kind "mlp"
# (its comment says why and how). Whether the sources share one f changes the loss: traced, it is
# decided once, from the tensors' identity, and passed to both operators.

_EMPTY = kd._EMPTY


def _triton_dispatch_moe(
    prompts: torch.Tensor,
    tokens: torch.Tensor,
    tok_start: list[int],
    tok_end: list[int],
    prompt_out: torch.Tensor | None,
    router_w: list[torch.Tensor],
    router_b: list[torch.Tensor],
    w1: list[torch.Tensor | None],
    b1: list[torch.Tensor | None],
    w2: list[torch.Tensor],
    b2: list[torch.Tensor],
    top_k: int,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dispatch_moe_fwd: (ipt, weights, aux_loss, coef, gates_e, gates_p, gates_z); gates_p is (0,)
    without prompt_out, and the gates of tokens outside each expert's range are not written. The
    six lists hold one entry per source e, p, z."""
    kd.check_shared(shared, router_w, router_b, w1, b1, w2, b2)
    params = zip(router_w, router_b, w1, b1, w2, b2)
    ipt, weights, aux, coef, gates = dispatch_moe_fwd(prompts, tokens, tok_start, tok_end, prompt_out, *params, top_k, shared)
    gates_e, gates_p, gates_z = gates
    # coef is a row of the loss's totals: an operator's output starts where its storage does.
    return ipt, weights, aux, coef.clone(), gates_e, *kd.empty_for_none(weights, gates_p), gates_z


triton_dispatch_moe = kd.operator("triton_dispatch_moe", _triton_dispatch_moe)


@triton_dispatch_moe.register_fake
def _(prompts, tokens, tok_start, tok_end, prompt_out, router_w, router_b, w1, b1, w2, b2, top_k, shared):
    M, _ = _check_args(prompts, tokens, tok_start, tok_end, prompt_out, *zip(router_w, router_b, w1, b1, w2, b2), top_k)
    K, Np, D = prompts.shape
    B, T = tokens.shape[1:3]
    f32 = dict(dtype=torch.float32)
    return (
        prompts.new_empty((K, B, Np, D)),
        prompts.new_empty((K, B, Np, K), **f32),
        prompts.new_empty((), **f32),
        prompts.new_empty((M,) if shared else (3, M), **f32),
        prompts.new_empty((K, Np, M), **f32),
        prompts.new_empty((K, B, Np, M) if prompt_out is not None else _EMPTY, **f32),
        prompts.new_empty((K, B, T, M), **f32),
    )


def _triton_dispatch_moe_backward(
    grad_ipt: torch.Tensor,
    grad_aux: torch.Tensor | None,
    prompts: torch.Tensor,
    tokens: torch.Tensor,
    tok_start: list[int],
    tok_end: list[int],
    prompt_out: torch.Tensor | None,
    router_w: list[torch.Tensor],
    router_b: list[torch.Tensor],
    w1: list[torch.Tensor | None],
    b1: list[torch.Tensor | None],
    w2: list[torch.Tensor],
    b2: list[torch.Tensor],
    weights: torch.Tensor,
    coef: torch.Tensor,
    gates: list[torch.Tensor],
    top_k: int,
    need_grad_tokens: bool,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dispatch_moe_bwd: (dprompts, dtokens, dprompt_out, the parameter gradients (G, C) in the
    parameters' dtype, a row per group of kernels/dispatch.py's ``_op_groups``); dtokens is (0,)
    without ``need_grad_tokens``, dprompt_out without prompt_out. ``gates``: the last three
    outputs of triton_dispatch_moe."""
    kd.check_shared(shared, router_w, router_b, w1, b1, w2, b2)
    grad_prompts, grad_tokens, grad_prompt_out, packed = dispatch_moe_bwd(
        grad_ipt, grad_aux, prompts, tokens, tok_start, tok_end, prompt_out, weights, coef,
        tuple(None if g.numel() == 0 else g for g in gates), *zip(router_w, router_b, w1, b1, w2, b2), top_k,
        need_grad_tokens=need_grad_tokens, groups=kd._op_groups(shared, prompt_out is not None), packed=True,
    )
    return grad_prompts, *kd.empty_for_none(tokens, grad_tokens, grad_prompt_out), packed


triton_dispatch_moe_backward = kd.operator("triton_dispatch_moe_backward", _triton_dispatch_moe_backward)


@triton_dispatch_moe_backward.register_fake
def _(grad_ipt, grad_aux, prompts, tokens, tok_start, tok_end, prompt_out, router_w, router_b, w1, b1, w2, b2,
      weights, coef, gates, top_k, need_grad_tokens, shared):
    K, Np, D = prompts.shape
    B, T = tokens.shape[1:3]
    M, H = _moe_sizes((router_w[0], None, w1[0]))
    groups = max(kd._op_groups(shared, prompt_out is not None).values()) + 1
    return (
        prompts.new_empty((K, Np, D)),
        tokens.new_empty((K, B, T, D) if need_grad_tokens else _EMPTY),
        tokens.new_empty(_EMPTY) if prompt_out is None else prompt_out.new_empty((K, B, Np, D)),
        prompts.new_empty((groups, moe_param_grad_width(K, D, H, M)), dtype=router_w[0].dtype),
    )


def _setup_context(ctx, inputs, output) -> None:
    prompts, tokens, tok_start, tok_end, prompt_out, *params, top_k, shared = inputs
    _, weights, _, coef, *gates = output
    ctx.mark_non_differentiable(weights, coef, *gates)
    ctx.set_materialize_grads(False)
    ctx.tok_range, ctx.top_k, ctx.shared = (list(tok_start), list(tok_end)), top_k, shared
    ctx.has_prompt_out = prompt_out is not None
    ctx.save_for_backward(prompts, tokens, prompt_out, weights, coef, *gates, *(t for group in params for t in group))


@first_order_only("The Triton MoE dispatcher", TWICE_WITH_TORCH_DISPATCHER)
def _backward(ctx, grad_ipt, _grad_weights, grad_aux, *_unused):
    needs = ctx.needs_input_grad
    if grad_ipt is None and grad_aux is None:
        return (None,) * 5 + tuple([None] * 3 if isinstance(n, list) else None for n in needs[5:11]) + (None, None)
    prompts, tokens, prompt_out, weights, coef, *saved = ctx.saved_tensors
    grad_prompts, grad_tokens, grad_prompt_out, param_grads = operator_backward(
        ctx, grad_ipt, grad_aux, prompts, tokens, prompt_out, weights, coef, saved, bool(needs[1]), needs[5:11]
    )
    return (
        grad_prompts if needs[0] else None,
        grad_tokens if needs[1] else None,
        None,
        None,
        grad_prompt_out if ctx.has_prompt_out and needs[4] else None,
        *param_grads,
        None,
        None,
    )


triton_dispatch_moe.register_autograd(_backward, setup_context=_setup_context)


def operator_backward(ctx, grad_ipt, grad_aux, prompts, tokens, prompt_out, weights, coef, saved, need_grad_tokens, needs):
    """An autograd backward through triton_dispatch_moe_backward: (dprompts, dtokens, dprompt_out,
    the six parameter lists' gradients as autograd takes them). ``saved``: the three gates, then the
    18 parameters (router_w, router_b, W1, b1, W2, b2 of sources e, p, z, list by list); ``ctx``
    holds tok_range, top_k, shared and has_prompt_out; ``needs``: the parameter lists' entries of
    needs_input_grad. A loss on aux_loss alone (``grad_ipt`` None) takes one zero-fill, then the
    same launches."""
    gates, flat = saved[:3], saved[3:]
    params = [list(flat[i : i + 3]) for i in range(0, 18, 3)]  # router_w, router_b, w1, b1, w2, b2
    if grad_ipt is None:
        grad_ipt = prompts.new_zeros(weights.shape[:3] + prompts.shape[-1:])
    grad_prompts, grad_tokens, grad_prompt_out, packed = torch.ops.pmoe_fast.triton_dispatch_moe_backward(
        grad_ipt, grad_aux, prompts, tokens, *ctx.tok_range, prompt_out, *params, weights, coef, gates, ctx.top_k,
        need_grad_tokens, ctx.shared,
    )
    K, Np, D = prompts.shape
    M, H = _moe_sizes((params[0][0], None, params[2][0]))
    unpack = functools.partial(unpack_moe_param_grads, K=K, D=D, H=H, M=M)
    return grad_prompts, grad_tokens, grad_prompt_out, kd.list_param_grads(packed, ctx.shared, ctx.has_prompt_out, unpack, needs)


def fused_dispatch_moe(prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z, top_k):
    """ipt (K, B, Np, D) in the prompts' dtype, weights (K, B, Np, K) float32 (non-differentiable)
    and aux_loss, a 0-d float32 tensor (the layer's load-balancing loss, differentiable).

    prompts P (K, Np, D); tokens Z (K, B, T, D), any strides with stride(-1) == 1; tok_start,
    tok_end: K ints, expert k averages f_z over tokens [start_k, end_k); prompt_out Z_P
    (K, B, Np, D) or None; params_s = (router_w (M, D), router_b (M,), W1 (M, H, D), b1 (M, H),
    W2 (M, K, H), b2 (M, K)), or with W1 = b1 = None and W2 (M, K, D) for H = 0; the very same
    tensors three times for one shared f. top_k: MLPs per row, 1 <= top_k <= M.

    Eagerly it runs through ``FusedDispatchMoE``, compiled through the operators (host time, as
    for kind "mlp").
    """
    if torch.compiler.is_compiling():
        shared = _is_shared(params_e, params_p, params_z)
        params = [list(group) for group in zip(params_e, params_p, params_z)]
        ipt, weights, aux, *_ = triton_dispatch_moe(
            prompts, tokens, list(tok_start), list(tok_end), prompt_out, *params, int(top_k), shared
        )
        return ipt, weights, aux
    return FusedDispatchMoE.apply(
        prompts, tokens, tuple(tok_start), tuple(tok_end), prompt_out, int(top_k), *params_e, *params_p, *params_z
    )


# ---------------------------------------------------------------------------------------------
# What the kernels can run, and what they compile to
# ---------------------------------------------------------------------------------------------

_INTERPRETED = type(_dispatch_moe_fwd_kernel).__name__ == "InterpretedFunction"


def moe_not_supported_reasons(prompts, tokens, prompt_out, params_e, params_p, params_z) -> list[str]:
    """Why the Triton MoE kernels cannot run these inputs; empty when they can."""
    sources = (params_e, params_p, params_z)
    reasons = kd.input_reasons(prompts, tokens, prompt_out, sources, _INTERPRETED, "pmoe_fast.kernels.dispatch_moe")
    if _TRITON_IMPORT_ERROR is not None:
        return reasons
    M, H = _moe_sizes(params_e)
    if M > MAX_DISPATCH_EXPERTS:
        reasons.append(
            f"M={M} dispatch MLPs is more than {MAX_DISPATCH_EXPERTS}: the gates tile is BLOCK_M=16 columns wide."
        )
    if H > kd.MAX_HIDDEN:
        reasons.append(f"The hidden width H={H} is more than {kd.MAX_HIDDEN}, the widest the kernels are built for.")
    groups = kd._param_groups([("e", params_e), ("p", params_p), ("z", params_z)])
    if len(set(groups.values())) == 2:
        reasons.append("Two sources share an f and the third does not: the kernels take one shared f or three.")
    return reasons


# The dtype of each pointer argument: "param", "act", or a fixed Triton type.
_POINTER_DTYPES = {
    "prompts_ptr": "param", "tokens_ptr": "act", "prompt_out_ptr": "act", "tok_range_ptr": "i32",
    "ipt_ptr": "param", "weights_ptr": "fp32", "stats_ptr": "fp32", "grad_ipt_ptr": "param",
    "dlogits_ptr": "fp32", "coef_ptr": "fp32", "grad_aux_ptr": "fp32", "f_ep_ptr": "fp32",
    "gates_e_ptr": "fp32", "gates_p_ptr": "fp32", "gates_z_ptr": "fp32",
    "grad_prompts_ptr": "param", "grad_tokens_ptr": "act", "grad_prompt_out_ptr": "act", "partials_ptr": "fp32",
    **{f"{w}{s}_ptr": "param" for w in ("rw", "rb", "w1", "b1", "w2", "b2") for s in "epz"},
}
_FLOAT_ARGS = {"scale_e", "scale_p", "scale_z"}


def _variant(kernel, name: str, param: str, act: str, num_warps: int, **constexprs) -> dict:
    """One compiled variant: the signature ASTSource takes (pointers typed, the scales fp32, every
    other non-constexpr argument an i32) and the constexpr values."""
    dtypes = {"param": param, "act": act}
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + dtypes.get(_POINTER_DTYPES[arg], _POINTER_DTYPES[arg])
        else:
            signature[arg] = "fp32" if arg in _FLOAT_ARGS else "i32"
    return {
        "name": f"moe_{name}[{param}-params,{act}-tokens," + ",".join(f"{k}={v}" for k, v in constexprs.items()) + "]",
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": num_warps,
        "num_stages": 3,  # Triton's default: the launches set none
    }


def _kernel_variants() -> list[dict]:
    """Every (kernel, constexprs, dtype signature) of this file's two kernels that the launchers
    produce on a GPU: BLOCK_H (and with it BLOCK_D and BLOCK_DW) takes one of three values (H = 0,
    H <= 64, H <= 128), the dtypes one of kernels/dispatch.py's DTYPE_SIGNATURES; M, top_k and
    prompt_out are run-time arguments. The backward's other two launches are kernels/dispatch.py's
    softmax backward and reduction with the block sizes of kind "mlp": their variants are in its
    KERNEL_VARIANTS. As there, these are the generic variants, without Triton's run-time
    specialisation hints."""
    variants = []
    for param, act in kd.DTYPE_SIGNATURES:
        for H in (0, 64, 128):
            b = default_moe_blocks(K=6, B=32, Np=16, D=768, H=H, M=3, device=torch.device("cpu"))
            variants.append(_variant(
                _dispatch_moe_fwd_kernel, "fwd", param, act, _NUM_WARPS["fwd"], HAS_HIDDEN=H > 0,
                BLOCK_T=b["BLOCK_T"], BLOCK_N=b["BLOCK_N"], BLOCK_D=b["BLOCK_D"], BLOCK_H=b["BLOCK_H"], BLOCK_K=16,
                BLOCK_M=BLOCK_M,
            ))
            variants.append(_variant(
                _dispatch_moe_bwd_kernel, "bwd", param, act, _NUM_WARPS["bwd"], HAS_HIDDEN=H > 0,
                BLOCK_T=b["BLOCK_T"], BLOCK_DW=b["BLOCK_DW"], BLOCK_D=b["BLOCK_D"], BLOCK_H=b["BLOCK_H"], BLOCK_K=16,
                BLOCK_M=BLOCK_M,
            ))
    return variants


KERNEL_VARIANTS = _kernel_variants() if _TRITON_IMPORT_ERROR is None else []
