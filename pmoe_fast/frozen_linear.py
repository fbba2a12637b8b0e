"""Linear layers of frozen experts, batched over the K experts: weight^T (K, in, out), bias
(K, 1, out) or None. Gradients flow to the input only, so the backward is one product per layer.

    y = linear(x, (weight_t, bias))                # x (K, R, in) -> (K, R, out)
    q, k, v = qkv_heads(x, (weight_t, bias), heads)  # x (K, B, T, D) -> 3 x (K * B, heads, T, hd)
    k, v = qkv_heads(x, (weight_t[:, :, D:], bias[:, :, D:]), heads, parts=2)  # k and v only

Eagerly, with weights that do not train, two custom autograd Functions do what cuBLAS can fold
into a product: ``linear`` adds its 1-D bias in the product's epilogue, one ``addmm`` per expert
(``_per_expert_addmm``), and ``qkv_heads`` takes the gradients of the attention's q, k and v into
the input's gradient with one product each, accumulated into one output, where autograd of
``unbind`` stacks them into a new tensor and the ``view`` before it copies that again. Under
autocast (``out=`` is not autocast) or with trainable weights, both are the plain ``baddbmm`` and
views. Under ``torch.compile`` the product is ``bmm`` + bias, and views: Inductor fuses the bias
into the pointwise kernel after the product (GELU, the residual add), where ``baddbmm`` would be an
external call that first copies the bias into its output.
"""

from __future__ import annotations

import torch

# Rows per expert from which a biased product runs as one addmm per expert rather than one
# baddbmm for all K. Large products save the bias's copy on the device (K = 6 ViT-B/16, B = 32,
# 6624 rows: ``linear``); small ones are bound by the host, which the K addmm calls and their views
# cost more: at B = 1 (207 rows, K = 2) they raised the batched block's host time from 179 to 321
# us (benchmarks/model_host_time.py; benchmarks/results/model_host_time_cpu.txt). Between the two,
# not measured.
PER_EXPERT_MIN_ROWS = 4096


def _eager_frozen(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the custom routes serve: eager, outside autocast, and the weights frozen."""
    return not (
        torch.compiler.is_compiling()
        or (torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type))
        or weight_t.requires_grad
        or (bias is not None and bias.requires_grad)
    )


def linear(x: torch.Tensor, layer: tuple, outputs: slice | None = None) -> torch.Tensor:
    """Per-expert linear layer: x (K, R, in) @ weight^T (K, in, out) + bias (K, 1, out), for the
    output features ``outputs`` only.

    With a bias, eagerly and from ``PER_EXPERT_MIN_ROWS`` rows: one ``addmm`` per expert
    (``_per_expert_addmm``), whose 1-D bias cuBLAS adds in the product's epilogue. One ``baddbmm``
    for all K first copies the broadcast bias into the whole output and has the product read it
    back: on an H100 (K = 6 ViT-B/16, B = 32; benchmarks/results/profile_step_h100.txt) a training
    step's copy kernels went from 75 calls and 9.6 ms to 26 calls and 3.5 ms without those copies.
    """
    weight_t, bias = layer
    if outputs is not None:
        weight_t, bias = weight_t[:, :, outputs], None if bias is None else bias[:, :, outputs]
    if bias is None:
        return torch.bmm(x, weight_t)
    if torch.compiler.is_compiling():
        # Inductor fuses the bias into the pointwise kernel that consumes the product (GELU, the
        # residual add); baddbmm would be an external call that copies the bias into its output.
        return torch.bmm(x, weight_t) + bias
    if x.shape[1] < PER_EXPERT_MIN_ROWS or not _eager_frozen(x, weight_t, bias):
        return torch.baddbmm(bias, x, weight_t)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, weight_t, bias)
    return _per_expert_addmm(x, weight_t, bias)


def _per_expert_addmm(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (K, R, in) @ weight_t (K, in, out) + bias (K, 1, out) -> (K, R, out), one ``addmm`` per
    expert into its slice of one output tensor."""
    out = x.new_empty(x.shape[0], x.shape[1], weight_t.shape[2])
    for k in range(x.shape[0]):
        torch.addmm(bias[k, 0], x[k], weight_t[k], out=out[k])
    return out


class _FrozenLinear(torch.autograd.Function):
    """``_per_expert_addmm`` under autograd, for frozen weights and bias: the gradient of x only,
    grad (K, R, out) @ weight_t^T in one ``bmm``, as ``baddbmm``'s backward computes it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight_t)
        return _per_expert_addmm(x, weight_t, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight_t,) = ctx.saved_tensors
        return torch.bmm(grad, weight_t.transpose(1, 2)), None, None


def qkv_heads(x: torch.Tensor, layer: tuple, heads: int, parts: int = 3) -> tuple[torch.Tensor, ...]:
    """The attention's q, k and v (``parts`` of them) from one fused projection: x (K, B, T, D) @
    weight^T (K, D, parts D') + bias (K, 1, parts D') -> ``parts`` views (K * B, heads, T, D' /
    heads) of the projection's output, as timm's
    ``qkv(x).reshape(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)``.

    Eagerly, with frozen weights and x requiring a gradient, ``_FrozenQKV`` computes x's gradient
    from the three gradients without stacking them (module docstring)."""
    weight_t, bias = layer
    if torch.is_grad_enabled() and x.requires_grad and _eager_frozen(x, weight_t, bias):
        return _FrozenQKV.apply(x, weight_t, bias, heads, parts)
    K, B, T, D = x.shape
    return _split_heads(linear(x.reshape(K, B * T, D), layer), K * B, T, heads, parts)


def _split_heads(qkv: torch.Tensor, N: int, T: int, heads: int, parts: int) -> tuple[torch.Tensor, ...]:
    """(K, B * T, parts D') -> ``parts`` views, each (N = K * B, heads, T, D' / heads)."""
    return qkv.view(N, T, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


class _FrozenQKV(torch.autograd.Function):
    """``qkv_heads`` for frozen weights. Backward: dL/dx = sum_i g_i W_i, one product per part
    accumulated into one output, each g_i taken as (K, B * T, D'): a view where the attention's
    backward lays its gradient out token-major, else a copy of that part (CPU's SDPA lays them
    out head-major). Under a 16-bit dtype the partial sums round to it twice more than one
    product over the stacked gradients would."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, heads: int, parts: int):
        K, B, T, D = x.shape
        qkv = linear(x.reshape(K, B * T, D), (weight_t, bias))  # autograd is off in here: no Function
        ctx.save_for_backward(weight_t)
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)  # an unused q, k or v gives None: no zeros to multiply
        return _split_heads(qkv, K * B, T, heads, parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        (weight_t,) = ctx.saved_tensors
        K, B, T, D = ctx.x_shape
        width = weight_t.shape[2] // len(grads)
        grad_x = None
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.transpose(1, 2).reshape(K, B * T, width)
            w = weight_t[:, :, i * width : (i + 1) * width].transpose(1, 2)  # (K, D', D)
            grad_x = torch.bmm(g, w) if grad_x is None else grad_x.baddbmm_(g, w)
        return None if grad_x is None else grad_x.view(K, B, T, D), None, None, None, None
