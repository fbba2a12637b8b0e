"""The Triton LayerNorm of K experts (kernels/layer_norm.py) against the composite in float64:
output and the input's gradient, under the interpreter here (a GPU runs it compiled), every
variant compiled for sm_90, and the reasons it gives where it cannot serve."""

from __future__ import annotations

import pytest
import torch
from helpers import sm90_job

from pmoe_fast.kernels import has_triton

pytestmark = pytest.mark.skipif(not has_triton(), reason="needs the triton package")
if has_triton():
    from pmoe_fast.kernels import layer_norm as ln

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
def assert_within_rule(name, got, plain, truth):
    """At most twice the composite's error at the same dtype, plus one unit of the dtype's
    precision at the largest true value: the kernel rounds its result to the dtype once, and
    over a few dozen values the composite's largest error may happen to be far below that."""
    err = (got.double() - truth).abs().max().item()
    err_plain = (plain.double() - truth).abs().max().item()
    bound = 2 * err_plain + torch.finfo(got.dtype).eps * truth.abs().max().item()
    assert err <= bound, f"{name}: error {err:.3g} vs float64 exceeds 2 x {err_plain:.3g} (composite) + floor = {bound:.3g}"


def output_and_grad(fn, x, weight, bias, grad, eps=1e-6):
    x = x.detach().clone().requires_grad_()
    y = fn(x, weight, bias, eps)
    (dx,) = torch.autograd.grad(y, x, grad.to(y.dtype))
    return y, dx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", [(3, 2, 7, 100), (2, 5, 768), (1, 1, 1, 37)], ids=["odd-D", "3d-D768", "K1-one-row"])
def test_output_and_input_gradient_match_float64(shape, dtype):
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1).to(DEVICE)
    weight = torch.randn(shape[0], shape[-1], dtype=torch.float64, device=DEVICE)
    bias = torch.randn(shape[0], shape[-1], dtype=torch.float64, device=DEVICE)
    grad = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    gold = output_and_grad(ln.layer_norm_reference, x, weight, bias, grad)
    low = [t.to(dtype) for t in (x, weight, bias)]
    plain = output_and_grad(ln.layer_norm_reference, *low, grad)
    got = output_and_grad(ln.layer_norm, *low, grad)
    for name, g, p, t in zip(("output", "grad x"), got, plain, gold):
        assert g.dtype == dtype and g.shape == t.shape
        assert_within_rule(name, g, p, t)


def test_rows_take_their_own_experts_affine_and_noncontiguous_x():
    """Each expert's rows get that expert's weight and bias; x may be a strided view."""
    base = torch.randn(3, 4, 9, 64, dtype=torch.float64, device=DEVICE)
    x = base[:, :, 2:]  # (3, 4, 7, 64), not contiguous
    weight = torch.randn(3, 64, dtype=torch.float64, device=DEVICE)
    bias = torch.randn(3, 64, dtype=torch.float64, device=DEVICE)
    want = ln.layer_norm_reference(x.float(), weight.float(), bias.float(), 1e-5)
    got = ln.layer_norm(x.float(), weight.float(), bias.float(), 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_second_derivative_raises():
    """The backward is a kernel, not differentiable ops: asked for a gradient it could differentiate
    (``create_graph=True``), it must fail loudly rather than leave the LayerNorm's share out."""
    x = torch.randn(2, 3, 8, device=DEVICE, requires_grad=True)
    y = ln.layer_norm(x, torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE), 1e-5)
    with pytest.raises(RuntimeError, match="no second derivative.*layer_norm='torch'"):
        torch.autograd.grad((y**3).sum() + (x**3).sum(), x, create_graph=True)


def test_reasons_name_each_problem():
    x = torch.randn(2, 3, 8)
    w = torch.randn(2, 8)
    assert "weight and bias (K, D)" in " ".join(ln.not_supported_reasons(x, torch.randn(3, 8), torch.randn(3, 8)))
    assert "one dtype" in " ".join(ln.not_supported_reasons(x.bfloat16(), w, w))
    assert "frozen" in " ".join(ln.not_supported_reasons(x, w.requires_grad_(), torch.randn(2, 8)))
    assert "float64" in " ".join(ln.not_supported_reasons(x.double(), w.detach().double(), w.detach().double()))
    wide = torch.randn(1, 1, ln.MAX_D + 1)
    assert "is more than" in " ".join(ln.not_supported_reasons(wide, torch.randn(1, ln.MAX_D + 1), torch.randn(1, ln.MAX_D + 1)))
    assert "D=0" in " ".join(ln.not_supported_reasons(torch.randn(1, 3, 0), torch.randn(1, 0), torch.randn(1, 0)))
    with pytest.raises(ValueError, match="cannot run these inputs"):
        ln.layer_norm(x, torch.randn(3, 8), torch.randn(3, 8), 1e-6)


@pytest.fixture(scope="module")
def sm90():
    """Every variant compiled for sm_90 and assembled by ptxas (tests/sm90_compile.py, begun with
    the session), by name."""
    return dict(sm90_job("usage:layer_norm"))


@pytest.mark.slow
def test_every_variant_compiles_for_sm90(sm90):
    assert set(sm90) == {v["name"] for v in ln.KERNEL_VARIANTS} and len(sm90) == 42
    failed = {name: r for name, r in sm90.items() if not isinstance(r, dict)}
    assert not failed, f"do not compile for sm_90: {failed}"


@pytest.mark.slow
def test_model_variants_spill_nothing(sm90):
    """The variants the batched model runs (D = 768 and 1024, 16-bit and fp32 experts) keep every
    row in registers on sm_90a: a spill would be traffic beside the row itself."""
    picked = {name: usage for name, usage in sm90.items() if "BLOCK_D=1024]" in name}
    assert len(picked) == 6  # forward and backward, three dtypes
    for name, usage in picked.items():
        assert isinstance(usage, dict), f"{name}: {usage}"
        assert usage["spill_stores"] == usage["spill_loads"] == 0, f"{name} spills on sm_90a: {usage}"
