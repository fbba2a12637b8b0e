"""The fused dispatcher (kind "mlp") as C++/CUDA operators, read top to bottom.

For expert k, image b and prompt token n (SPEC.md, "The dispatcher"; notation of its table)::

    logits[k, b, n]  = f_e(P[k, n]) + f_p(Z_P[k, b, n]) + mean_{t in [start_k, end_k)} f_z(Z[k, b, t])
    weights[k, b, n] = softmax(logits[k, b, n])                # over the K experts
    ipt[k, b, n, :]  = sum_j weights[k, b, n, j] * P[j, n, :]

    f_s(x) = W2_s gelu(W1_s x + b1_s) + b2_s (exact GELU), or W2_s x + b2_s when H = 0

    prompts P: (K, Np, D)   tokens Z: (K, B, T, D)   prompt_out Z_P: (K, B, Np, D) or None
    ipt: (K, B, Np, D) in prompts' dtype   weights: (K, B, Np, K)

1. What each implementation can run: ``cpp_not_supported_reasons``, ``cuda_not_supported_reasons``.
2. Fake implementations, so ``torch.compile`` can trace the ops without running them.
3. Autograd for ``torch.ops.pmoe_fast.dispatch_mlp``, through ``dispatch_mlp_backward``.
4. ``dispatch_mlp``: the functional entry point.

The semantics are those of ``pmoe_fast.dispatcher.Dispatcher`` (backend "torch"), which the tests
hold these ops to. The kernels are ``csrc/dispatch_cpu.cpp`` and ``csrc/cuda/dispatch.cu``; they
accumulate in float32, or float64 when the prompts are float64, whatever the other inputs' dtypes
(the "accumulation dtype": the torch backend's rule). Besides ipt and weights, the forward op
returns two activations for its backward, in that dtype:
``z_act`` (K, B, T, H), the pre-activations W1_z Z + b1_z of the averaged tokens (zero for the
others), and ``z_mean`` (K, B, Hz), the mean over each token range of gelu(z_act), or of Z itself
when H = 0 (Hz = H, or D when H = 0). They cost H/D of the tokens' memory and spare the backward
a GEMM over every token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pmoe_fast._ext import extension_status, require_extension, run_as_written_under_autocast
from pmoe_fast.fusion import _check_dtype, _check_same_device
from pmoe_fast.kernels import TWICE_WITH_TORCH_DISPATCHER, first_order_only

SOURCES = ("e", "p", "z")  # EPTs, prompt outputs, other tokens: the order of every parameter list
# The CUDA kernels keep the token ranges of all experts in their launch arguments, and walk a
# chunk of 64 tokens' hidden units with a 32-bit index (csrc/cuda/dispatch.cu: kMaxExperts, kMaxHidden).
MAX_CUDA_EXPERTS = 64
MAX_CUDA_HIDDEN = (2**31 - 1) // 64 // 8 * 8
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# One source's f: (W1 (H, D) or None, b1 (H) or None, W2 (K, H) or (K, D) when H = 0, b2 (K)).
Params = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]


# 1. What each implementation can run -------------------------------------------------------


def _named_tensors(prompts, tokens, prompt_out, params: Sequence[Params]) -> list[tuple[str, torch.Tensor]]:
    named = [("prompts", prompts), ("tokens", tokens)]
    if prompt_out is not None:
        named.append(("prompt_out", prompt_out))
    for source, group in zip(SOURCES, params):
        named += [(f"{name} of source {source}", t) for name, t in zip(("w1", "b1", "w2", "b2"), group) if t is not None]
    return named


def _input_reasons(prompts, tokens, prompt_out, params: Sequence[Params]) -> list[str]:
    """What both implementations need of the inputs, beyond shapes (which the ops check)."""
    reasons = [
        f"{name} is {t.dtype}; the ops take float32, float64, float16 or bfloat16"
        for name, t in _named_tensors(prompts, tokens, prompt_out, params)
        if t.dtype not in _SUPPORTED_DTYPES
    ]
    if tokens.dim() == 4 and tokens.shape[-1] > 1 and tokens.stride(-1) != 1:
        reasons.append(f"tokens have stride(-1) = {tokens.stride(-1)}; the ops need 1 (any other strides are fine)")
    hidden = [group[0] is not None for group in params]
    if any(hidden) and not all(hidden):
        reasons.append("W1 is None for some sources but not others; the three f's must have the same shape")
    return reasons


def cpp_not_supported_reasons(
    prompts, tokens, tok_start, tok_end, prompt_out, params_e: Params, params_p: Params, params_z: Params
) -> list[str]:
    """Why the C++ (CPU) op cannot run these inputs, one sentence each; empty when it can."""
    params = (params_e, params_p, params_z)
    status = extension_status()
    reasons = [] if status["loaded"] else [f"the compiled extension pmoe_fast._C is not available ({status['error']})"]
    devices = sorted({str(t.device) for _, t in _named_tensors(prompts, tokens, prompt_out, params)})
    if devices != ["cpu"]:
        reasons.append(f"the C++ op runs on CPU tensors, got tensors on {devices}")
    return reasons + _input_reasons(prompts, tokens, prompt_out, params)


def cuda_not_supported_reasons(
    prompts, tokens, tok_start, tok_end, prompt_out, params_e: Params, params_p: Params, params_z: Params
) -> list[str]:
    """Why the CUDA op cannot run these inputs, one sentence each; empty when it can."""
    params = (params_e, params_p, params_z)
    status = extension_status()
    reasons = []
    if not status["loaded"]:
        reasons.append(f"the compiled extension pmoe_fast._C is not available ({status['error']})")
    elif not status["cuda"]:
        reasons.append(
            "pmoe_fast._C was built without its CUDA part (torch without CUDA, nvcc not found, or "
            "PMOE_FAST_SKIP_CUDA_BUILD=1)"
        )
    devices = sorted({str(t.device) for _, t in _named_tensors(prompts, tokens, prompt_out, params)})
    if len(devices) != 1 or not devices[0].startswith("cuda"):
        reasons.append(f"the CUDA op needs every tensor on one CUDA device, got tensors on {devices}")
    if prompts.dim() >= 1 and prompts.shape[0] > MAX_CUDA_EXPERTS:
        reasons.append(f"K = {prompts.shape[0]} experts; the CUDA kernels take at most {MAX_CUDA_EXPERTS}")
    if params_e[0] is not None and params_e[0].dim() == 2 and params_e[0].shape[0] > MAX_CUDA_HIDDEN:
        reasons.append(f"H = {params_e[0].shape[0]} hidden units; the CUDA kernels take at most {MAX_CUDA_HIDDEN}")
    return reasons + _input_reasons(prompts, tokens, prompt_out, params)


# 2. Fake implementations -------------------------------------------------------------------
# The same checks and messages as csrc/dispatch.h, so a traced program fails the way an eager one
# does. torch._check keeps them valid for symbolic (dynamic) shapes.


def _check_sizes(op: str, name: str, t: torch.Tensor, expected: tuple, layout: str) -> None:
    torch._check(
        tuple(t.shape) == tuple(expected),
        lambda: f"{op}: {name} must be {layout} = {list(expected)}, got {list(t.shape)}",
    )


def _check_param(op, list_name, s, t, prompts, expected, layout) -> None:
    name = f"{list_name}[{s}] (source {SOURCES[s]})"
    _check_dtype(op, name, t)
    _check_same_device(op, name, t, prompts)
    _check_sizes(op, name, t, expected, layout)


def _check_inputs(op, prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2):
    """Returns (K, B, Np, T, D, H); mirrors check_dispatch_inputs in csrc/dispatch.h."""
    _check_dtype(op, "prompts", prompts)
    _check_dtype(op, "tokens", tokens)
    _check_same_device(op, "tokens", tokens, prompts)
    torch._check(prompts.dim() == 3, lambda: f"{op}: prompts must be (K, Np, D), got {list(prompts.shape)}")
    K, Np, D = prompts.shape
    torch._check(
        K >= 1 and Np >= 1 and D >= 1,
        lambda: f"{op}: prompts must be (K, Np, D) with K, Np, D >= 1, got {list(prompts.shape)}",
    )
    torch._check(
        tokens.dim() == 4 and tokens.shape[0] == K and tokens.shape[3] == D,
        lambda: f"{op}: tokens must be (K, B, T, D) with K = prompts.size(0) = {K} and "
        f"D = prompts.size(2) = {D}, got {list(tokens.shape)}",
    )
    B, T = tokens.shape[1], tokens.shape[2]
    torch._check(B >= 1, lambda: f"{op}: tokens must hold at least one image (B >= 1), got {list(tokens.shape)}")
    torch._check(
        tokens.stride(3) == 1 or D == 1,
        lambda: f"{op}: tokens must have stride(-1) == 1 (any other strides are fine), got strides {list(tokens.stride())}",
    )
    torch._check(
        len(tok_start) == K and len(tok_end) == K,
        lambda: f"{op}: tok_start and tok_end must hold K = {K} ints each, got {len(tok_start)} and {len(tok_end)}",
    )
    for k, (start, end) in enumerate(zip(tok_start, tok_end)):
        torch._check(
            0 <= start and start < end and end <= T,
            lambda: f"{op}: expert {k} must average over a non-empty token range [start, end) within "
            f"[0, T = {T}], got [{start}, {end})",
        )
    if prompt_out is not None:
        _check_dtype(op, "prompt_out", prompt_out)
        _check_same_device(op, "prompt_out", prompt_out, prompts)
        _check_sizes(op, "prompt_out", prompt_out, (K, B, Np, D), "(K, B, Np, D)")
    torch._check(
        len(w1) == 3 and len(b1) == 3 and len(w2) == 3 and len(b2) == 3,
        lambda: f"{op}: w1, b1, w2 and b2 must each hold 3 entries (sources e, p, z), got "
        f"{len(w1)}, {len(b1)}, {len(w2)} and {len(b2)}",
    )
    hidden = w1[0] is not None
    H = w1[0].shape[0] if hidden and w1[0].dim() >= 1 else 0
    torch._check(not hidden or H >= 1, lambda: f"{op}: w1[0] must be (H, D) with H >= 1, got {list(w1[0].shape)}")
    for s in range(3):
        torch._check(
            (w1[s] is not None) == hidden and (b1[s] is not None) == hidden,
            lambda: f"{op}: w1 and b1 must hold three tensors (f with a hidden layer) or three Nones "
            f"(f = Linear(D, K)); source {SOURCES[s]} has w1 {'set' if w1[s] is not None else 'None'} "
            f"and b1 {'set' if b1[s] is not None else 'None'} but source e has w1 {'set' if hidden else 'None'}",
        )
        if hidden:
            _check_param(op, "w1", s, w1[s], prompts, (H, D), "(H, D)")
            _check_param(op, "b1", s, b1[s], prompts, (H,), "(H)")
            _check_param(op, "w2", s, w2[s], prompts, (K, H), "(K, H)")
        else:
            _check_param(op, "w2", s, w2[s], prompts, (K, D), "(K, D) when there is no hidden layer")
        _check_param(op, "b2", s, b2[s], prompts, (K,), "(K)")
    return K, B, Np, T, D, H


def _acc_dtype(prompts: torch.Tensor) -> torch.dtype:
    """float64 when the prompts are float64, float32 otherwise (dispatch_acc_dtype in dispatch.h)."""
    return torch.float64 if prompts.dtype == torch.float64 else torch.float32


def _dispatch_mlp_fake(prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2):
    K, B, Np, T, D, H = _check_inputs("dispatch_mlp", prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2)
    acc = _acc_dtype(prompts)
    return (
        prompts.new_empty((K, B, Np, D)),
        prompts.new_empty((K, B, Np, K), dtype=acc),
        prompts.new_empty((K, B, T, H), dtype=acc),
        prompts.new_empty((K, B, H or D), dtype=acc),
    )


def _dispatch_mlp_backward_fake(
    grad_ipt, prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2, weights, z_act, z_mean, output_mask
):
    op = "dispatch_mlp_backward"
    K, B, Np, T, D, H = _check_inputs(op, prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2)
    acc = _acc_dtype(prompts)
    _check_dtype(op, "grad_ipt", grad_ipt)
    _check_same_device(op, "grad_ipt", grad_ipt, prompts)
    _check_sizes(op, "grad_ipt", grad_ipt, (K, B, Np, D), "(K, B, Np, D)")
    for name, t in (("weights", weights), ("z_act", z_act), ("z_mean", z_mean)):
        _check_same_device(op, name, t, prompts)
        torch._check(
            t.dtype == acc,
            lambda: f"{op}: {name} must be the forward's output, in the accumulation dtype {acc}, got {t.dtype}",
        )
    _check_sizes(op, "weights", weights, (K, B, Np, K), "(K, B, Np, K)")
    _check_sizes(op, "z_act", z_act, (K, B, T, H), "(K, B, T, H)")
    _check_sizes(op, "z_mean", z_mean, (K, B, H or D), "(K, B, Hz)")
    need_prompts, need_tokens, need_prompt_out = output_mask
    grad_prompts = prompts.new_empty((K, Np, D) if need_prompts else (0,))
    grad_tokens = tokens.new_empty((K, B, T, D) if need_tokens else (0,))
    if prompt_out is None:
        grad_prompt_out = prompts.new_empty((0,))
    else:
        grad_prompt_out = prompt_out.new_empty((K, B, Np, D) if need_prompt_out else (0,))

    def like(ts):
        return [t.new_empty(t.shape) for t in ts] if ts[0] is not None else []

    return grad_prompts, grad_tokens, grad_prompt_out, like(w1), like(b1), like(w2), like(b2)


# 3. Autograd -------------------------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2 = inputs
    _, weights, z_act, z_mean = output
    ctx.mark_non_differentiable(weights, z_act, z_mean)
    # Their gradients stay None: materialised, each backward would allocate and fill a zero
    # (K, B, T, H) tensor for z_act.
    ctx.set_materialize_grads(False)
    ctx.tok_range = (list(tok_start), list(tok_end))
    ctx.has_prompt_out = prompt_out is not None
    ctx.hidden = w1[0] is not None
    ctx.save_for_backward(prompts, tokens, prompt_out, weights, z_act, z_mean, *w1, *b1, *w2, *b2)


def _source_grads(grads, needs, has_prompt_out: bool):
    """The per-source gradients of one parameter list, None where not needed. Source p's are None
    without prompt_out: f_p saw no rows, and the torch backend leaves such a parameter's grad None."""
    return [g if need and (s != 1 or has_prompt_out) else None for s, (g, need) in enumerate(zip(grads, needs))]


@first_order_only("pmoe_fast::dispatch_mlp (cpp, cuda)", TWICE_WITH_TORCH_DISPATCHER)
def _backward(ctx, grad_ipt, _grad_weights, _grad_z_act, _grad_z_mean):
    if grad_ipt is None:  # the integrated prompts were not used
        nothing = [None] * 3  # one per source
        return (None,) * 5 + ((nothing, nothing) if ctx.hidden else (None, None)) + (nothing, nothing)
    prompts, tokens, prompt_out, weights, z_act, z_mean, *params = ctx.saved_tensors
    w1, b1 = (params[0:3], params[3:6]) if ctx.hidden else ([None] * 3, [None] * 3)
    w2, b2 = params[-6:-3], params[-3:]
    # needs_input_grad has the structure of the inputs: a bool per tensor, one bool for a list
    # holding anything but tensors (tok_start, tok_end, and w1 / b1 when they are Nones).
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(needs[1]), ctx.has_prompt_out and bool(needs[4])]
    grad_prompts, grad_tokens, grad_prompt_out, gw1, gb1, gw2, gb2 = torch.ops.pmoe_fast.dispatch_mlp_backward(
        grad_ipt, prompts, tokens, *ctx.tok_range, prompt_out, list(w1), list(b1), list(w2), list(b2),
        weights, z_act, z_mean, mask,
    )
    has_p = ctx.has_prompt_out
    return (
        grad_prompts if mask[0] else None,
        grad_tokens if mask[1] else None,
        None,
        None,
        grad_prompt_out if mask[2] else None,
        _source_grads(gw1, needs[5], has_p) if ctx.hidden else None,
        _source_grads(gb1, needs[6], has_p) if ctx.hidden else None,
        _source_grads(gw2, needs[7], has_p),
        _source_grads(gb2, needs[8], has_p),
    )


def _register_python_parts() -> None:
    torch.library.register_fake("pmoe_fast::dispatch_mlp", _dispatch_mlp_fake)
    torch.library.register_fake("pmoe_fast::dispatch_mlp_backward", _dispatch_mlp_backward_fake)
    torch.library.register_autograd("pmoe_fast::dispatch_mlp", _backward, setup_context=_setup_context)
    run_as_written_under_autocast("dispatch_mlp")
    run_as_written_under_autocast("dispatch_mlp_backward")


# Without the extension the ops do not exist, and registering against them would fail at
# import; dispatch_mlp below then raises a clear error instead.
if extension_status()["loaded"]:
    _register_python_parts()


# 4. Functional entry point -----------------------------------------------------------------


def dispatch_mlp(
    prompts: torch.Tensor,
    tokens: torch.Tensor,
    tok_start: Sequence[int],
    tok_end: Sequence[int],
    prompt_out: torch.Tensor | None,
    params_e: Params,
    params_p: Params,
    params_z: Params,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dispatcher of one prompt layer for all K experts; differentiable in every tensor.

    Args:
        prompts: P (K, Np, D), the EPTs.
        tokens: Z (K, B, T, D), any strides with stride(-1) == 1 (a view such as ``seq[:, :, Np:]``
            is read in place).
        tok_start, tok_end: K ints; expert k averages f_z over its tokens [tok_start[k], tok_end[k]).
        prompt_out: Z_P (K, B, Np, D), or None (first prompt layer).
        params_e, params_p, params_z: (W1 (H, D) or None, b1 (H) or None, W2 (K, H) or (K, D),
            b2 (K)) of each source's f; pass the same tensors three times for a shared f.
    Returns:
        ipt (K, B, Np, D) in prompts' dtype, and weights (K, B, Np, K) in float32 (float64 when
        the prompts are float64), each row summing to 1; weights is not differentiable.
    """
    require_extension("dispatch_mlp", prompts.device)
    params = (params_e, params_p, params_z)
    w1, b1, w2, b2 = ([group[i] for group in params] for i in range(4))
    ipt, weights, _, _ = torch.ops.pmoe_fast.dispatch_mlp(
        prompts, tokens, [int(s) for s in tok_start], [int(e) for e in tok_end], prompt_out, w1, b1, w2, b2
    )
    return ipt, weights
