"""LayerNorm of K frozen experts at once, each with its own affine parameters, fused in Triton.

    y[k, ..., :] = (x[k, ..., :] - mean) / sqrt(var + eps) * weight[k] + bias[k]   # over the last dim D

The batched block (``pmoe_fast.model``) normalises its sequences (K, B, T, D) with each expert's
LayerNorm. ``F.layer_norm`` takes one affine for all rows, so the composite normalises without
one and applies the K affines in a second elementwise pass (``torch.addcmul``), forward and
backward: each writes and reads the whole activation once more. One kernel here normalises and
applies the row's expert's affine, and one computes the input's gradient; the affine parameters
are frozen, so there is no weight gradient to reduce across rows.

The file reads top to bottom: the reference, the kernels (one row per program: a row of D
elements is one tile), the launchers, the autograd Function, the functional entry point, what
the kernels can run (``not_supported_reasons``) and the variants they compile
(``KERNEL_VARIANTS``). Statistics and arithmetic in float32; the output in x's dtype, rounded
once (the composite rounds the normalised x, then the affine's result).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from . import first_order_only, import_triton

# Without Triton the kernels below are plain Python functions that nothing calls.
triton, tl, _TRITON_IMPORT_ERROR = import_triton()

MAX_D = 8192  # one row is one tile: BLOCK_D = next power of two >= D


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The op in plain PyTorch: x (K, ..., D), weight and bias (K, D)."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return torch.addcmul(bias.view(shape), F.layer_norm(x, x.shape[-1:], eps=eps), weight.view(shape))


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _row(x_ptr, R, D, BLOCK_D: tl.constexpr):
    """This program's row of x (K * R, D): (row, its expert k, the columns, their mask, their
    offsets, the row in float32, zero past D)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row.to(tl.int64) * D + cols
    return row, row // R, cols, mask, offs, tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,  # (K * R, D) rows, contiguous
    w_ptr,  # (K, D) each expert's weight, rows stride_w apart
    b_ptr,  # (K, D) each expert's bias, rows stride_b apart
    y_ptr,  # (K * R, D) out, x's dtype, contiguous
    mean_ptr,  # (K * R,) out, float32
    rstd_ptr,  # (K * R,) out, float32: 1 / sqrt(var + eps)
    R,  # rows per expert
    D,
    stride_w,
    stride_b,
    eps,
    BLOCK_D: tl.constexpr,
):
    row, k, cols, mask, offs, x = _row(x_ptr, R, D, BLOCK_D)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    w = tl.load(w_ptr + k * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + k * stride_b + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (xc * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,  # (K * R, D) dL/dy, contiguous
    x_ptr,  # (K * R, D), contiguous
    w_ptr,  # (K, D), rows stride_w apart
    mean_ptr,  # (K * R,) float32, as the forward stored them
    rstd_ptr,  # (K * R,) float32
    dx_ptr,  # (K * R, D) out, x's dtype, contiguous
    R,
    D,
    stride_w,
    BLOCK_D: tl.constexpr,
):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w, xhat = (x - mean) * rstd."""
    row, k, cols, mask, offs, x = _row(x_ptr, R, D, BLOCK_D)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + k * stride_w + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    g = dy * w  # zero in masked columns
    dx = (g - tl.sum(g, axis=0) / D - xhat * (tl.sum(g * xhat, axis=0) / D)) * rstd
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _block_and_warps(D: int) -> tuple[int, int]:
    """BLOCK_D (D rounded up to a power of two, at least 128) and the warps that hold it: 4 up to
    1024 columns (8 elements a thread: 16-byte loads of a 16-bit row), then 8, then 16."""
    block = max(128, 1 << (D - 1).bit_length())
    return block, 4 if block <= 1024 else 8 if block <= 4096 else 16


def _launch_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
    K, D = x.shape[0], x.shape[-1]
    rows = x.numel() // D
    y = torch.empty_like(x)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block, warps = _block_and_warps(D)
        _layer_norm_fwd_kernel[(rows,)](
            x, weight, bias, y, mean, rstd, rows // K, D, weight.stride(0), bias.stride(0), eps,
            BLOCK_D=block, num_warps=warps, num_stages=1,
        )
    return y, mean, rstd


def _launch_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor):
    K, D = x.shape[0], x.shape[-1]
    rows = x.numel() // D
    dx = torch.empty_like(x)
    if rows:
        block, warps = _block_and_warps(D)
        _layer_norm_bwd_kernel[(rows,)](
            dy, x, weight, mean, rstd, dx, rows // K, D, weight.stride(0), BLOCK_D=block, num_warps=warps, num_stages=1,
        )
    return dx


# ---------------------------------------------------------------------------------------------
# Autograd and the functional entry point
# ---------------------------------------------------------------------------------------------


class _ExpertLayerNorm(torch.autograd.Function):
    """The kernels under autograd: the gradient of x only (the affine parameters are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        y, mean, rstd = _launch_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    @first_order_only("The Triton LayerNorm", "use PMoE(layer_norm='torch')")
    def backward(ctx, dy: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        return _launch_bwd(dy.contiguous(), x, weight, mean, rstd), None, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, *, check: bool = True) -> torch.Tensor:
    """Each expert's LayerNorm: x (K, ..., D) -> (K, ..., D), weight and bias (K, D) (frozen: no
    gradient flows to them). Raises ValueError with every reason when the kernels cannot run it;
    ``check=False`` skips asking, for a caller that asked once for many calls alike."""
    reasons = not_supported_reasons(x, weight, bias) if check else []
    if reasons:
        raise ValueError("the Triton LayerNorm cannot run these inputs: " + " ".join(reasons))
    return _ExpertLayerNorm.apply(x.contiguous(), weight, bias, float(eps))


# ---------------------------------------------------------------------------------------------
# What the kernels run, and what they compile
# ---------------------------------------------------------------------------------------------

_INTERPRETED = type(_layer_norm_fwd_kernel).__name__ == "InterpretedFunction"
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def not_supported_reasons(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> list[str]:
    """Why the kernels cannot run these inputs; empty when they can."""
    if _TRITON_IMPORT_ERROR is not None:
        return [f"Triton cannot be imported ({_TRITON_IMPORT_ERROR}): pip install triton (the version your torch pins)."]
    reasons = []
    if x.dim() < 2 or weight.dim() != 2 or bias.shape != weight.shape or weight.shape != (x.shape[0], x.shape[-1]):
        reasons.append(
            f"Shapes x {tuple(x.shape)}, weight {tuple(weight.shape)}, bias {tuple(bias.shape)}: "
            "expected x (K, ..., D), weight and bias (K, D)."
        )
    elif x.shape[-1] > MAX_D:
        reasons.append(f"D={x.shape[-1]} is more than {MAX_D}: a row is one tile.")
    elif x.shape[-1] == 0:
        reasons.append("D=0: rows without features have nothing to normalise.")
    elif weight.stride(-1) != 1 or bias.stride(-1) != 1:
        reasons.append("weight and bias need a contiguous last dimension.")
    if x.device.type != "cuda" and not (_INTERPRETED and x.device.type == "cpu"):
        reasons.append(
            f"x is on {x.device.type}: the kernels run on CUDA devices (or on the CPU with TRITON_INTERPRET=1 "
            "set before pmoe_fast.kernels.layer_norm is imported)."
        )
    if len({x.device, weight.device, bias.device}) > 1:
        reasons.append("x, weight and bias are on different devices.")
    if x.dtype not in _DTYPES:
        reasons.append(f"x is {x.dtype}; the kernels take float32, float16 or bfloat16.")
    if weight.dtype != x.dtype or bias.dtype != x.dtype:
        reasons.append(
            f"x is {x.dtype}, weight {weight.dtype} and bias {bias.dtype}: the kernels take one dtype, "
            "as the frozen experts hold their activations and parameters."
        )
    if weight.requires_grad or bias.requires_grad:
        reasons.append("weight or bias requires a gradient; the kernels are for frozen affine parameters.")
    return reasons


def _kernel_variants() -> list[dict]:
    """Every (kernel, BLOCK_D, warps, dtype) the launchers produce for D up to MAX_D."""
    variants = []
    blocks = sorted({_block_and_warps(D) for D in (1 << i for i in range(7, MAX_D.bit_length()))})
    for dtype in _DTYPES.values():
        for block, warps in blocks:
            fwd = {"x_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "y_ptr": dtype, "mean_ptr": "fp32", "rstd_ptr": "fp32"}
            bwd = {"dy_ptr": dtype, "x_ptr": dtype, "w_ptr": dtype, "mean_ptr": "fp32", "rstd_ptr": "fp32", "dx_ptr": dtype}
            for kernel, pointers in ((_layer_norm_fwd_kernel, fwd), (_layer_norm_bwd_kernel, bwd)):
                signature = {
                    arg: "constexpr" if arg == "BLOCK_D" else f"*{pointers[arg]}" if arg in pointers
                    else "fp32" if arg == "eps" else "i32"
                    for arg in kernel.arg_names
                }
                name = "fwd" if kernel is _layer_norm_fwd_kernel else "bwd"
                variants.append({
                    "name": f"{name}[{dtype},BLOCK_D={block}]", "kernel": kernel, "signature": signature,
                    "constexprs": {"BLOCK_D": block}, "num_warps": warps, "num_stages": 1,
                })
    return variants


KERNEL_VARIANTS = _kernel_variants() if _TRITON_IMPORT_ERROR is None else []
