"""pmoe_fast::prompt_fusion (C++ on CPU, CUDA on a GPU) against an fp64 reference.

Parity rule (flash-attention's): compute the fp64 reference, the same computation in plain
PyTorch at the test dtype, and the op; require
``err(op) <= 2 * err(plain PyTorch) + floor`` for the output and both gradients.
"""

from __future__ import annotations

import pytest
import torch

from pmoe_fast.fusion import prompt_fusion, prompt_fusion_reference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]

# Absolute floor under the parity bound, about one rounding step of each output dtype at the
# values these tests produce (|out| ~ 1, |grad| ~ 10): it matters only where plain PyTorch
# happens to be exact.
FLOOR = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}

SHAPES = [  # (K, B, Np, D)
    (3, 1, 3, 100),
    (3, 2, 3, 100),
    (1, 2, 3, 100),
    (4, 3, 5, 64),
]
SHAPE_IDS = [f"K{k}-B{b}-Np{n}-D{d}" for k, b, n, d in SHAPES]

# (weights dtype, prompts dtype): pMoE keeps routing weights in fp32 next to low-precision prompts.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.bfloat16),
]
DTYPE_IDS = ["w32-p32", "w32-p16", "w32-pbf16", "wbf16-pbf16"]


def make_inputs(K, B, Np, D, w_dtype=torch.float32, p_dtype=torch.float32, device="cpu"):
    """Routing weights are a softmax over experts, as in pMoE's dispatcher."""
    weights = torch.softmax(torch.randn(K, B, Np, K, device=device), dim=-1).to(w_dtype)
    prompts = torch.randn(K, Np, D, device=device).to(p_dtype)
    return weights, prompts


def plain_torch(weights, prompts):
    """The same computation in plain PyTorch at prompts' dtype."""
    return torch.einsum("kbnj,jnd->kbnd", weights.to(prompts.dtype), prompts)


def forward_backward(fn, weights, prompts, grad_out):
    """Returns (out, grad_weights, grad_prompts) of fn, with leaf copies of the inputs."""
    weights = weights.detach().clone().requires_grad_()
    prompts = prompts.detach().clone().requires_grad_()
    out = fn(weights, prompts)
    out.backward(grad_out)
    return out, weights.grad, prompts.grad


def assert_parity(weights, prompts, grad_out):
    ref = forward_backward(prompt_fusion_reference, weights.double(), prompts.double(), grad_out.double())
    plain = forward_backward(plain_torch, weights, prompts, grad_out)
    ours = forward_backward(prompt_fusion, weights, prompts, grad_out)
    expected_dtypes = (prompts.dtype, weights.dtype, prompts.dtype)
    names = ("out", "grad_weights", "grad_prompts")
    for name, o, p, r, dtype in zip(names, ours, plain, ref, expected_dtypes):
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}, expected {dtype}"
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        err = (o.double() - r).abs().max().item()
        plain_err = (p.double() - r).abs().max().item()
        bound = 2 * plain_err + FLOOR[dtype]
        assert err <= bound, f"{name}: max error {err:.3g} > 2 * plain PyTorch's {plain_err:.3g} + floor"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype, p_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("K, B, Np, D", SHAPES, ids=SHAPE_IDS)
def test_parity(K, B, Np, D, w_dtype, p_dtype, device):
    weights, prompts = make_inputs(K, B, Np, D, w_dtype, p_dtype, device)
    grad_out = torch.randn(K, B, Np, D, device=device).to(p_dtype)
    assert_parity(weights, prompts, grad_out)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    K, B, Np, D = 3, 2, 3, 100
    weights = torch.softmax(torch.randn(K, K, Np, B, device=device), dim=1).permute(0, 3, 2, 1)
    prompts = torch.randn(Np, K, 2 * D, device=device).transpose(0, 1)[..., ::2]
    grad_out = torch.randn(K, B, D, Np, device=device).transpose(2, 3)
    assert not (weights.is_contiguous() or prompts.is_contiguous() or grad_out.is_contiguous())
    assert weights.shape == (K, B, Np, K) and prompts.shape == (K, Np, D)
    assert_parity(weights, prompts, grad_out)



@pytest.mark.parametrize("device", DEVICES)
def test_runs_as_written_under_autocast(device):
    """Autocast does not reach inside the op: same values and dtypes as without it."""
    weights, prompts = make_inputs(3, 2, 3, 100, torch.float32, torch.float32, device)
    outs = []
    for enabled in (False, True):
        w, p = weights.detach().requires_grad_(), prompts.detach().requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=enabled):
            out = prompt_fusion(w, p)
        out.sum().backward()
        outs.append((out, w.grad, p.grad))
    for plain, mixed in zip(*outs):
        assert mixed.dtype == plain.dtype
        torch.testing.assert_close(mixed, plain)

@pytest.mark.parametrize("device", DEVICES)
def test_float64_accumulates_in_float64(device):
    """fp64 weights with fp32 prompts: the sum is fp64, then rounded once to fp32."""
    weights, prompts = make_inputs(3, 2, 3, 100, torch.float64, torch.float32, device)
    out = prompt_fusion(weights, prompts)
    expected = prompt_fusion_reference(weights, prompts.double()).float()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, fast_mode=False):
    """fast_mode as in test_cpp_dispatch.test_gradcheck_float64."""
    weights, prompts = make_inputs(3, 2, 3, 5, torch.float64, torch.float64, device)
    inputs = (weights.requires_grad_(), prompts.requires_grad_())
    assert torch.autograd.gradcheck(prompt_fusion, inputs, fast_mode=fast_mode)


@pytest.mark.parametrize("device", DEVICES)
def test_second_derivative_raises(device):
    """The mixture is bilinear, so its gradient has a derivative; the op's backward is a kernel
    without one, and must say so rather than leave that share out."""
    weights, prompts = make_inputs(3, 2, 3, 5, torch.float64, torch.float64, device)
    weights.requires_grad_()
    prompts.requires_grad_()
    expected = torch.autograd.grad(plain_torch(weights, prompts).pow(2).sum(), prompts, create_graph=True)[0]
    assert torch.autograd.grad(expected.sum(), weights)[0].abs().max() > 0
    with pytest.raises(RuntimeError, match="no second derivative.*torch.einsum"):
        torch.autograd.grad(prompt_fusion(weights, prompts).pow(2).sum(), prompts, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("w_dtype, p_dtype", [DTYPES[0], DTYPES[2]], ids=[DTYPE_IDS[0], DTYPE_IDS[2]])
def test_opcheck(w_dtype, p_dtype, device):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch."""
    weights, prompts = make_inputs(3, 2, 3, 20, w_dtype, p_dtype, device)
    torch.library.opcheck(
        torch.ops.pmoe_fast.prompt_fusion.default, (weights.requires_grad_(), prompts.requires_grad_())
    )
    grad_out = torch.randn(3, 2, 3, 20, device=device).to(p_dtype)
    torch.library.opcheck(
        torch.ops.pmoe_fast.prompt_fusion_backward.default, (grad_out, weights.detach(), prompts.detach())
    )


def test_torch_compile_fullgraph():
    """torch.compile traces through the op (fake implementation) with no graph break."""
    torch._dynamo.reset()

    def fused_prompts(weights, prompts):
        return prompt_fusion(weights.softmax(dim=-1), prompts) * 2.0

    logits, prompts = make_inputs(3, 2, 3, 100)
    compiled = torch.compile(fused_prompts, fullgraph=True)
    grad_out = torch.randn(3, 2, 3, 100)
    eager = forward_backward(fused_prompts, logits, prompts, grad_out)
    traced = forward_backward(compiled, logits, prompts, grad_out)
    for name, e, t in zip(("out", "grad_logits", "grad_prompts"), eager, traced):
        torch.testing.assert_close(t, e, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize(
    "weights_shape, prompts_shape, match",
    [
        (
            (2, 4, 3, 2),
            (3, 3, 8),
            r"weights must be \(K, B, Np, K\) with K = prompts.size\(0\) = 3 .*got \[2, 4, 3, 2\]",
        ),
        ((3, 4, 5, 3), (3, 3, 8), r"Np = prompts.size\(1\) = 3, got \[3, 4, 5, 3\]"),
        ((3, 4, 3), (3, 3, 8), r"weights must be \(K, B, Np, K\)"),
        ((3, 4, 3, 3), (3, 24), r"prompts must be \(K, Np, D\), got \[3, 24\]"),
    ],
    ids=["K-mismatch", "Np-mismatch", "weights-3d", "prompts-2d"],
)
def test_wrong_shapes_raise(weights_shape, prompts_shape, match):
    with pytest.raises(RuntimeError, match=match):
        prompt_fusion(torch.rand(weights_shape), torch.randn(prompts_shape))


def test_wrong_grad_out_shape_raises():
    weights, prompts = make_inputs(3, 2, 3, 8)
    match = r"grad_out must be \(K, B, Np, D\) = \[3, 2, 3, 8\], got \[3, 2, 3, 7\]"
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pmoe_fast.prompt_fusion_backward(torch.randn(3, 2, 3, 7), weights, prompts)


@pytest.mark.parametrize("which", ["weights", "prompts"])
def test_integer_dtype_raises(which):
    weights, prompts = make_inputs(3, 2, 3, 8)
    if which == "weights":
        weights = weights.to(torch.int32)
    else:
        prompts = prompts.to(torch.int64)
    with pytest.raises(RuntimeError, match=f"{which} must be float32, float64, float16 or bfloat16"):
        prompt_fusion(weights, prompts)


def test_different_devices_raise_in_cpu_kernel():
    """Calls the CPU kernel itself with a tensor on another device (meta: no GPU needed)."""
    weights, prompts = make_inputs(3, 2, 3, 8)
    cpu_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    match = "weights and prompts must be on the same device, got cpu and meta"
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pmoe_fast.prompt_fusion.default.redispatch(cpu_only, weights, prompts.to("meta"))


def test_different_devices_raise_in_fake_implementation():
    """A meta tensor routes the call to the fake implementation, which checks the same way."""
    weights, prompts = make_inputs(3, 2, 3, 8)
    match = "weights and prompts must be on the same device, got meta and cpu"
    with pytest.raises(RuntimeError, match=match):
        torch.ops.pmoe_fast.prompt_fusion(weights.to("meta"), prompts)


@needs_cuda
def test_different_devices_raise_in_cuda_kernel():
    weights, prompts = make_inputs(3, 2, 3, 8)
    with pytest.raises(RuntimeError, match="weights and prompts must be on the same device"):
        prompt_fusion(weights, prompts.cuda())
