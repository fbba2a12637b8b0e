"""The fused Triton MoE dispatcher (kernels/dispatch_moe.py): ipt, weights, aux_loss and every
gradient against ``Dispatcher(kind="moe", backend="torch")``, its launch structure, what it
refuses, and that every variant builds for an H100.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before this module imports them, and tests/triton_interpreter.py makes its products round as an
H100's), a few seconds per case here; on a GPU the same tests run compiled. The sm_90 builds
start with the test session and run beside the tests (tests/helpers.py, SM90_JOBS).

Routing is discontinuous: were two gates of a row within rounding of each other, the float64
truth, PyTorch at the test dtype and the kernels could pick different MLPs and differ by O(1).
``make_inputs`` therefore moves every routed row, inside the span of its router's weights only,
so that its router logits sit on a random permutation of 0, 1, ..., M-1 plus up to 0.5: adjacent
logits of a row differ by at least 0.5, far above any dtype's rounding, and
``assert_routing_margin`` checks it on the rounded inputs the three implementations see.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import WorkLog, sm90_job

from pmoe_fast.dispatcher import Dispatcher
from pmoe_fast.kernels import dispatch as kd
from pmoe_fast.kernels import dispatch_moe as km

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# err(kernel) <= 2 * err(plain PyTorch at the test dtype) + FLOOR * max|truth|, both errors
# measured against float64.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}
AUX_SCALE = 3.0  # the loss differentiated: <ipt, grad_ipt> + AUX_SCALE * aux_loss
MIN_GAP = 0.25  # smallest gap between a row's top_k-th and next router logit in the test data


@dataclasses.dataclass
class Case:
    M: int = 3
    top_k: int = 1
    H: int = 24
    shared: bool = True
    prompt_out: bool = True
    prefix: int = 0  # > 0: pool "patches", tok_start = prefix
    strided: bool = False  # tokens (and prompt_out) are views into one longer sequence
    B: int = 1
    K: int = 3
    Np: int = 3
    T: int = 37
    D: int = 100
    dtype: torch.dtype = torch.float32  # prompts and every parameter
    act_dtype: torch.dtype | None = None  # tokens and prompt_out; None: dtype
    blocks: str = ""  # PMOE_TRITON_BLOCKS


# Batch 1 keeps the interpreter's time down; the batch-3 case splits the batch and the prompts
# into ragged groups of 2 and 1, so that tiles of 32 rows cross batch rows, as on a GPU.
CASES = {
    "M3-top1-H24-shared": Case(),
    "M3-top1-H24-separate": Case(shared=False),
    "M4-top2-H24-shared-patches": Case(M=4, top_k=2, prefix=2),
    "M4-top2-H24-separate-strided": Case(M=4, top_k=2, shared=False, strided=True, prefix=1),
    "M3-top2-H0-shared-strided-B3-groups": Case(top_k=2, H=0, strided=True, B=3, blocks="B_PER_PROG=2,N_PER_PROG=2"),
    "M4-top1-H0-separate-patches": Case(M=4, H=0, shared=False, prefix=3),
    "M4-top2-layer0-separate": Case(M=4, top_k=2, shared=False, prompt_out=False),
    "M3-top1-H0-layer0-shared": Case(H=0, prompt_out=False),
    "fp16-M4-top2-H24-separate": Case(M=4, top_k=2, shared=False, dtype=torch.float16),
    "fp16-M3-top1-H0-shared": Case(H=0, prefix=1, dtype=torch.float16),
    "fp32-params-fp16-tokens-M4-top2-H24-separate": Case(M=4, top_k=2, shared=False, prefix=1, act_dtype=torch.float16),
    # bf16 runs in the interpreter too, rounding as an H100 does (tests/triton_interpreter.py).
    "bf16-M4-top2-H24-shared": Case(M=4, top_k=2, dtype=torch.bfloat16, B=2),
    "fp32-params-bf16-tokens-M3-top1-H0-separate": Case(H=0, shared=False, act_dtype=torch.bfloat16),
}


def make_dispatcher(case: Case) -> Dispatcher:
    return Dispatcher(
        case.D, case.K, hidden=case.H, kind="moe", num_dispatch_experts=case.M, top_k=case.top_k,
        separate_mlps=not case.shared, pool="patches" if case.prefix else "all", backend="torch",
    )


def router(disp: Dispatcher, source: str) -> torch.nn.Linear:
    return (getattr(disp, source) if disp.separate_mlps else disp).router


def moe_params(disp: Dispatcher, source: str) -> tuple:
    """(router_w, router_b, W1 or None, b1 or None, W2, b2) of one source, as the op takes them."""
    owner = getattr(disp, source) if disp.separate_mlps else disp
    ex = owner.experts
    w1, b1 = (ex.fc1_weight, ex.fc1_bias) if disp.hidden else (None, None)
    return owner.router.weight, owner.router.bias, w1, b1, ex.fc2_weight, ex.fc2_bias


def separate_routing(x: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    """x (..., D) float64 moved within the row space of the router's weight R (M, D) so that each
    row's logits R x + r become a random permutation of 0..M-1 plus U(0, 0.5)."""
    R, r = lin.weight.detach().double().cpu(), lin.bias.detach().double().cpu()
    rows = x.reshape(-1, x.shape[-1])
    M = R.shape[0]
    target = torch.argsort(torch.rand(rows.shape[0], M), dim=1).double() + 0.5 * torch.rand(rows.shape[0], M)
    moved = rows + torch.linalg.solve(R @ R.T, (target - rows @ R.T - r).T).T @ R
    return moved.view_as(x)


def make_inputs(case: Case):
    """(test-dtype Dispatcher, float64 copy with the same (rounded) parameters, the input leaves
    at the test dtype, and build(leaves) -> (prompts, tokens, prompt_out))."""
    K, B, Np, T, D = case.K, case.B, case.Np, case.T, case.D
    disp = make_dispatcher(case).to(case.dtype).to(DEVICE)
    truth = copy.deepcopy(disp).double()
    def routed(shape, source):
        return separate_routing(torch.randn(shape, dtype=torch.float64), router(truth, source))

    prompts = routed((K, Np, D), "e")
    tokens = routed((K, B, T, D), "z")
    prompt_out = routed((K, B, Np, D), "p") if case.prompt_out else None
    if case.strided:
        # One sequence [prompt slots, tokens] per expert, as a fast model holds it.
        slots = prompt_out if case.prompt_out else torch.randn(K, B, Np, D, dtype=torch.float64)
        seq = [torch.cat([slots, tokens], 2)]
    else:
        seq = [t for t in (tokens, prompt_out) if t is not None]
    act = case.act_dtype or case.dtype
    leaves = [prompts.to(case.dtype).to(DEVICE)] + [t.to(act).to(DEVICE) for t in seq]

    def build(ls):
        if case.strided:
            return ls[0], ls[1][:, :, Np:], (ls[1][:, :, :Np] if case.prompt_out else None)
        return ls[0], ls[1], (ls[2] if case.prompt_out else None)

    assert_routing_margin(case, truth, build([t.double() for t in leaves]))
    return disp, truth, leaves, build


def assert_routing_margin(case: Case, truth: Dispatcher, inputs) -> None:
    """Every routed row's top_k-th router logit exceeds the next by MIN_GAP (module docstring)."""
    prompts, tokens, prompt_out = inputs
    routed = {"e": prompts, "z": tokens[:, :, case.prefix :]}
    if prompt_out is not None:
        routed["p"] = prompt_out
    for source, x in routed.items():
        lin = router(truth, source)
        logits = torch.nn.functional.linear(x.reshape(-1, case.D), lin.weight, lin.bias)
        top = logits.topk(case.top_k + 1 if case.top_k < case.M else case.top_k, dim=-1).values
        if case.top_k < case.M:
            gap = (top[:, case.top_k - 1] - top[:, case.top_k]).min().item()
            assert gap >= MIN_GAP, f"test data: routing of source {source} is within {gap:.3g} of a tie"


def run(fn, disp, leaves, build, case, grad_ipt, aux_scale=AUX_SCALE):
    """Forward and the gradients of <ipt, grad_ipt> + aux_scale * aux_loss with respect to the
    input leaves and every parameter; fn is "torch" (the Dispatcher's own forward) or the op."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    prompts, tokens, prompt_out = build(leaves)
    start = [case.prefix] * case.K
    if fn == "torch":
        ipt, weights = disp(prompts, tokens, prompt_out, num_prefix_tokens=case.prefix)
        aux = disp.aux_loss
    else:
        pe, pp, pz = (moe_params(disp, s) for s in "epz")
        ipt, weights, aux = fn(prompts, tokens, start, [case.T] * case.K, prompt_out, pe, pp, pz, case.top_k)
    params = list(disp.parameters())
    outputs, grads_out = [aux], [torch.tensor(aux_scale, dtype=aux.dtype, device=aux.device)]
    if grad_ipt is not None:
        outputs.insert(0, ipt)
        grads_out.insert(0, grad_ipt.to(ipt.dtype))
    # allow_unused: f_p's parameters do not take part without prompt_out.
    grads = torch.autograd.grad(outputs, leaves + params, grads_out, allow_unused=True)
    return ipt, weights, aux, grads


def assert_within_rule(name, kernel, baseline, truth):
    err_kernel = (kernel.double() - truth).abs().max().item()
    err_baseline = (baseline.double() - truth).abs().max().item()
    bound = 2 * err_baseline + FLOOR[kernel.dtype] * truth.abs().max().item()
    assert err_kernel <= bound, (
        f"{name}: error {err_kernel:.3g} vs float64 exceeds 2 x {err_baseline:.3g} (PyTorch at "
        f"{baseline.dtype}) + floor = {bound:.3g}"
    )


def leaf_names(case: Case, disp: Dispatcher) -> list[str]:
    seq = ["seq"] if case.strided else ["tokens"] + (["prompt_out"] if case.prompt_out else [])
    return ["prompts", *seq] + [name for name, _ in disp.named_parameters()]


def check_against_dispatcher(case: Case, grad_ipt_scale: float = 1.0, through_module: bool = False):
    """The op (or, through_module, Dispatcher(backend="triton")) against the torch backend."""
    disp, truth_disp, leaves, build = make_inputs(case)
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE) if grad_ipt_scale else None
    truth = run("torch", truth_disp, [t.double() for t in leaves], build, case, grad_ipt)
    baseline = run("torch", disp, leaves, build, case, grad_ipt)
    if through_module:
        disp.set_backend("triton")
        kernel = run("torch", disp, leaves, build, case, grad_ipt)
        assert disp.last_backend == "triton"
    else:
        kernel = run(km.fused_dispatch_moe, disp, leaves, build, case, grad_ipt)

    ipt, weights, aux, grads = kernel
    assert ipt.dtype == case.dtype and weights.dtype == torch.float32 and aux.dtype == torch.float32
    assert ipt.requires_grad and aux.requires_grad and not weights.requires_grad
    assert all(t.isfinite().all() for t in (ipt, weights, aux, *grads) if t is not None)
    assert_within_rule("ipt", ipt, baseline[0], truth[0])
    assert_within_rule("weights", weights, baseline[1], truth[1])
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))
    assert_within_rule("aux_loss", aux, baseline[2], truth[2])
    for leaf, k, b, t in zip(leaf_names(case, disp), grads, baseline[3], truth[3]):
        if t is None:
            # Parameters that did not take part: f_p's without prompt_out (the op returns None),
            # or the MLPs under a loss on aux_loss alone (the op returns zeros).
            assert b is None and (k is None or not k.any()), leaf
            continue
        assert k is not None and k.dtype == b.dtype and k.shape == t.shape, leaf
        assert_within_rule(f"grad {leaf}", k, b, t)


@pytest.mark.parametrize("name", list(CASES))
def test_forward_aux_loss_and_every_gradient_match_dispatcher(name, monkeypatch):
    monkeypatch.setenv(kd.BLOCK_ENV, CASES[name].blocks)
    check_against_dispatcher(CASES[name])


def test_gradient_of_aux_loss_alone():
    """A loss on aux_loss only: its gradient reaches the routers (and the inputs) through the
    gate sums, and nothing else."""
    check_against_dispatcher(Case(M=4, top_k=2, shared=False, T=9, D=40), grad_ipt_scale=0.0)


def test_dispatcher_backend_triton_runs_the_op():
    """Dispatcher(kind="moe", backend="triton") routes to fused_dispatch_moe and exposes its aux_loss."""
    check_against_dispatcher(Case(M=4, top_k=2, shared=False, prefix=1, T=9, D=40), through_module=True)


def test_reference_matches_dispatcher_in_float64():
    case = Case(M=4, top_k=2, shared=False, prefix=2, B=2)
    disp, truth_disp, leaves, build = make_inputs(case)
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE, dtype=torch.float64)
    leaves = [t.double() for t in leaves]
    want = run("torch", truth_disp, leaves, build, case, grad_ipt)
    got = run(km.dispatch_moe_reference, truth_disp, leaves, build, case, grad_ipt)
    for name, g, w in zip(["ipt", "weights", "aux"], got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=name)
    for name, g, w in zip(leaf_names(case, disp), got[3], want[3]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("M,top_k", [(4, 1), (8, 2)])
def test_tied_gates_pick_the_same_mlps_in_both_backends(M, top_k):
    """A zero router ties every gate of every row. torch.topk took a higher index on a CPU from
    M = 4, the kernel the lowest; both take the lowest now (ipt differed by 0.5)."""
    torch.manual_seed(0)
    ref = Dispatcher(16, 2, hidden=4, kind="moe", num_dispatch_experts=M, top_k=top_k, backend="torch").to(DEVICE)
    torch.nn.init.zeros_(ref.router.weight)
    torch.nn.init.zeros_(ref.router.bias)
    fused = copy.deepcopy(ref)
    fused.set_backend("triton")
    inputs = [torch.randn(*shape, device=DEVICE) for shape in ((2, 2, 16), (2, 1, 5, 16), (2, 1, 2, 16))]
    (ipt, _), aux = ref(*inputs), ref.aux_loss
    (got, _), got_aux = fused(*inputs), fused.aux_loss
    assert fused.last_backend == "triton"
    torch.testing.assert_close(got, ipt, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_aux, aux, rtol=1e-5, atol=0)


# The interpreter computes the NaN in NumPy, which warns of it.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_nan_or_inf_token_gives_nan_as_in_the_torch_backend(bad):
    """A NaN gate chose no MLP in the kernel, so the row added 0 and the output stayed finite
    while the torch backend's is NaN."""
    torch.manual_seed(0)
    ref = Dispatcher(8, 2, hidden=4, kind="moe", num_dispatch_experts=3, backend="torch").to(DEVICE)
    fused = copy.deepcopy(ref)
    fused.set_backend("triton")
    prompts, tokens, prompt_out = (torch.randn(*shape, device=DEVICE) for shape in ((2, 2, 8), (2, 1, 5, 8), (2, 1, 2, 8)))
    tokens[0, 0, 3, 0] = bad
    for disp in (ref, fused):
        ipt, _ = disp(prompts, tokens, prompt_out)
        assert ipt.isfinite().flatten(1).all(1).tolist() == [False, True]
        assert disp.aux_loss.isnan()


def test_a_chosen_mlp_whose_gate_underflowed_adds_nothing_even_an_inf():
    """top_k = 2 of 2 MLPs, the second's gate exp(-200) = 0 in float32 and its output inf: the
    kernel skips it, and the torch backend gave NaN (0 x inf)."""
    torch.manual_seed(0)
    ref = Dispatcher(8, 2, hidden=0, kind="moe", num_dispatch_experts=2, top_k=2, backend="torch").to(DEVICE)
    with torch.no_grad():
        ref.router.weight.zero_()
        ref.router.bias.copy_(torch.tensor([100.0, -100.0]))
        ref.experts.fc2_bias[1].fill_(float("inf"))
    fused = copy.deepcopy(ref)
    fused.set_backend("triton")
    inputs = [torch.randn(*shape, device=DEVICE) for shape in ((2, 2, 8), (2, 1, 5, 8), (2, 1, 2, 8))]
    inputs[0].requires_grad_()
    for disp in (ref, fused):
        ipt, _ = disp(*inputs)
        (grad,) = torch.autograd.grad(ipt.sum(), inputs[0])
        assert ipt.isfinite().all() and grad.isfinite().all(), disp.last_backend


SMALL = Case(M=3, top_k=2, shared=False, K=2, B=1, Np=2, T=5, D=24, prefix=1)


def test_tokens_without_grad_get_none():
    disp, _, leaves, build = make_inputs(SMALL)
    grad_ipt = torch.randn(SMALL.K, SMALL.B, SMALL.Np, SMALL.D, device=DEVICE)
    full = run(km.fused_dispatch_moe, disp, leaves, build, SMALL, grad_ipt)[3]
    leaves = [t.clone().requires_grad_(i != 1) for i, t in enumerate(leaves)]  # leaf 1: tokens
    prompts, tokens, prompt_out = build(leaves)
    params = [moe_params(disp, s) for s in "epz"]
    ranges = ([SMALL.prefix] * SMALL.K, [SMALL.T] * SMALL.K)
    ipt, _, aux = km.fused_dispatch_moe(prompts, tokens, *ranges, prompt_out, *params, SMALL.top_k)
    wanted = [leaves[0], leaves[2], *disp.parameters()]
    grads = torch.autograd.grad([ipt, aux], wanted, [grad_ipt, torch.tensor(AUX_SCALE)], allow_unused=True)
    assert not tokens.requires_grad
    for g, want in zip(grads, [full[0], full[2], *full[3:]]):
        assert (g is None and want is None) or torch.equal(g, want)


def test_backward_is_deterministic():
    disp, _, leaves, build = make_inputs(SMALL)
    grad_ipt = torch.randn(SMALL.K, SMALL.B, SMALL.Np, SMALL.D, device=DEVICE)
    first = run(km.fused_dispatch_moe, disp, leaves, build, SMALL, grad_ipt)
    second = run(km.fused_dispatch_moe, disp, leaves, build, SMALL, grad_ipt)
    assert torch.equal(first[2], second[2])
    for a, b in zip(first[3], second[3]):
        assert (a is None and b is None) or torch.equal(a, b)


def test_bad_arguments_raise():
    disp = make_dispatcher(Case(M=3, H=0, shared=False))
    P = torch.randn(3, 3, 100)
    Z = torch.randn(3, 1, 5, 100)
    pe, pp, pz = (moe_params(disp, s) for s in "epz")
    with pytest.raises(ValueError, match="top_k"):
        km.fused_dispatch_moe(P, Z, (0,) * 3, (5,) * 3, None, pe, pp, pz, 4)
    with pytest.raises(ValueError, match="shared f"):
        km.fused_dispatch_moe(P, Z, (0,) * 3, (5,) * 3, None, pe, pe, pz, 1)
    with pytest.raises(ValueError, match="token range"):
        km.fused_dispatch_moe(P, Z, (0, 3, 0), (5, 3, 5), None, pe, pp, pz, 1)
    with pytest.raises(ValueError, match="params_p"):
        km.fused_dispatch_moe(P, Z, (0,) * 3, (5,) * 3, None, pe, pp[:4] + (pp[4][:, :2], pp[5]), pz, 1)
    # What the kernels cannot run, which the functional entry ran with wrong results.
    strided = torch.randn(3, 1, 5, 200)[..., ::2]
    with pytest.raises(ValueError, match="the Triton MoE dispatcher cannot run these inputs: tokens has stride 2"):
        km.fused_dispatch_moe(P, strided, (0,) * 3, (5,) * 3, None, pe, pp, pz, 1)


# --- what the kernels refuse ----------------------------------------------------------------


def reason_inputs(dtype=torch.float32, act_dtype=None, M=3, H=8, device="cpu", shared=True):
    disp = Dispatcher(16, 2, hidden=H, kind="moe", num_dispatch_experts=M, separate_mlps=not shared).to(dtype).to(device)
    prompts = torch.randn(2, 3, 16, dtype=dtype, device=device)
    tokens = torch.randn(2, 2, 5, 16, dtype=act_dtype or dtype, device=device)
    return prompts, tokens, None, *(moe_params(disp, s) for s in "epz")


def test_reasons_empty_when_supported():
    assert km.moe_not_supported_reasons(*reason_inputs(device=DEVICE)) == []
    assert km.moe_not_supported_reasons(*reason_inputs(act_dtype=torch.float16, shared=False, device=DEVICE)) == []


def test_reasons_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(km, "_INTERPRETED", False)
    reasons = km.moe_not_supported_reasons(*reason_inputs())
    assert len(reasons) == 1 and "CPU" in reasons[0] and "TRITON_INTERPRET=1" in reasons[0]


def test_reasons_bf16_in_interpreter(monkeypatch):
    monkeypatch.setattr(km, "_INTERPRETED", True)
    monkeypatch.setattr(kd, "interpreter_computes_bf16", lambda: False)
    reasons = km.moe_not_supported_reasons(*reason_inputs(dtype=torch.bfloat16))
    assert reasons and all("bfloat16" in r and "interpreter" in r for r in reasons)


def test_reasons_sizes_dtypes_and_sharing():
    assert "M=17" in " ".join(km.moe_not_supported_reasons(*reason_inputs(M=17, device=DEVICE)))
    assert "H=129" in " ".join(km.moe_not_supported_reasons(*reason_inputs(H=129, device=DEVICE)))
    reasons = km.moe_not_supported_reasons(*reason_inputs(dtype=torch.float16, act_dtype=torch.float32, device=DEVICE))
    assert reasons == [
        "tokens are torch.float32 but the parameters torch.float16: mixed precision needs float32 parameters."
    ]
    prompts, tokens, _, pe, pp, pz = reason_inputs(shared=False, device=DEVICE)
    reasons = km.moe_not_supported_reasons(prompts, tokens, None, pe, pe, pz)
    assert reasons == ["Two sources share an f and the third does not: the kernels take one shared f or three."]
    tokens = tokens.transpose(-1, -2).contiguous().transpose(-1, -2)
    reasons = km.moe_not_supported_reasons(prompts, tokens, None, pe, pp, pz)
    assert len(reasons) == 1 and reasons[0].startswith("tokens has stride 5 in its last dimension")


# --- launches, torch ops, the variants the launchers produce, and that each builds for sm_90 --


def _call_signature(kernel, args, kwargs):
    """(kernel name, signature, constexprs, num_warps, num_stages) of one launch, in KERNEL_VARIANTS'
    terms (Triton's default num_stages, 3, where a launch sets none)."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}
    signature = {}
    for arg, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature[arg] = "*" + names[value.dtype]
        else:
            signature[arg] = "fp32" if isinstance(value, float) else "i32"
    constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    signature.update({k: "constexpr" for k in constexprs})
    return kernel.__name__, signature, constexprs, kwargs["num_warps"], kwargs.get("num_stages", 3)


def via_operators(prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z, top_k):
    """fused_dispatch_moe as torch.compile runs it: the operator, with its registered autograd."""
    params = [list(group) for group in zip(params_e, params_p, params_z)]
    shared = km._is_shared(params_e, params_p, params_z)
    ipt, weights, aux, *_ = km.triton_dispatch_moe(
        prompts, tokens, list(tok_start), list(tok_end), prompt_out, *params, top_k, shared
    )
    return ipt, weights, aux


@pytest.mark.parametrize("name", ["M4-top2-H24-separate-strided", "M3-top1-H0-layer0-shared"])
def test_opcheck(name):
    """Schemas, fake implementations, autograd registration and AOT dispatch of both operators.
    The forward is compared over whole token ranges: it leaves the gates of tokens outside an
    expert's range unwritten (nothing reads them)."""
    case = dataclasses.replace(CASES[name], prefix=0, K=2, Np=2, T=6, D=24)
    disp, _, leaves, build = make_inputs(case)
    prompts, tokens, prompt_out = build([t.requires_grad_() for t in leaves])
    params = [list(group) for group in zip(*(moe_params(disp, s) for s in "epz"))]
    ranges = ([0] * case.K, [case.T] * case.K)
    # opcheck copies the inputs, so shared tensors arrive as copies: one f per source (shared=False).
    torch.library.opcheck(km.triton_dispatch_moe, (prompts, tokens, *ranges, prompt_out, *params, case.top_k, False))
    detached = [[None if t is None else t.detach() for t in group] for group in params]
    inputs = [None if t is None else t.detach() for t in (prompts, tokens)] + [None if prompt_out is None else prompt_out.detach()]
    _, weights, _, coef, *gates = km.triton_dispatch_moe(*inputs[:2], *ranges, inputs[2], *detached, case.top_k, False)
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE)
    for grad_aux, need_grad_tokens in ((torch.tensor(2.0, device=DEVICE), True), (None, False)):
        torch.library.opcheck(km.triton_dispatch_moe_backward, (
            grad_ipt, grad_aux, *inputs[:2], *ranges, inputs[2], *detached, weights, coef, gates, case.top_k,
            need_grad_tokens, False,
        ))


@pytest.mark.parametrize("name", ["M3-top1-H24-shared", "M4-top2-H24-separate-strided"])
def test_torch_compile_fullgraph(name):
    """torch.compile traces fused_dispatch_moe as one operator, forward and backward (no graph
    break), and computes what eager does, the aux loss and its gradients included."""
    case = dataclasses.replace(CASES[name], K=2, Np=2, T=6, D=24)
    disp, _, leaves, build = make_inputs(case)
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE)
    compiled = torch.compile(km.fused_dispatch_moe, fullgraph=True, backend="aot_eager")
    eager = run(km.fused_dispatch_moe, disp, leaves, build, case, grad_ipt)
    traced = run(compiled, disp, leaves, build, case, grad_ipt)
    for a, b in zip((*eager[:3], *eager[3]), (*traced[:3], *traced[3])):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize(
    "case",
    [
        Case(H=0, prompt_out=False, top_k=2),
        Case(M=4, shared=False),
        Case(H=100, M=5, shared=False, prefix=1),
        Case(dtype=torch.float16, M=9, top_k=3),
    ],
    ids=["linear-layer0-shared", "hidden24-separate", "hidden100-separate", "fp16-M9"],
)
@pytest.mark.parametrize("path", ["eager", "operators"])
def test_one_launch_forward_three_backward_all_listed_variants(case, path, monkeypatch):
    """Records the launches instead of running them (only their count and signatures matter),
    and every torch op beyond allocation and views: the forward's sum and dot (the aux loss),
    nothing else; through the operators torch.compile calls, a copy of the loss's coefficients
    too (an operator's output may not be a view into another tensor)."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(_call_signature(self.kernel, args, kwargs))

    for module, name in [
        (km, "_dispatch_moe_fwd_kernel"), (kd, "_dispatch_bwd_softmax_kernel"),
        (km, "_dispatch_moe_bwd_kernel"), (kd, "_dispatch_bwd_reduce_kernel"),
    ]:
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    case = dataclasses.replace(case, K=2, B=2, Np=2, T=5, D=16)
    disp = make_dispatcher(case).to(case.dtype).to(DEVICE)
    leaves = [
        torch.randn(case.K, case.Np, case.D, device=DEVICE, dtype=case.dtype, requires_grad=True),
        torch.randn(case.K, case.B, case.T, case.D, device=DEVICE, dtype=case.dtype, requires_grad=True),
    ]
    prompt_out = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE, dtype=case.dtype) if case.prompt_out else None
    ranges = ([case.prefix] * case.K, [case.T] * case.K)
    args = (leaves[0], leaves[1], *ranges, prompt_out, *(moe_params(disp, s) for s in "epz"), case.top_k)
    dispatch = km.fused_dispatch_moe if path == "eager" else via_operators
    dispatch(*args)  # compiles the kernels (and pins the token ranges) once
    launches.clear()
    grad_aux = torch.tensor(1.0, device=DEVICE)
    with WorkLog() as forward:
        ipt, _, aux = dispatch(*args)
    grad_ipt = torch.empty_like(ipt)
    with WorkLog() as backward:
        torch.autograd.grad([ipt, aux], leaves + list(disp.parameters()), [grad_ipt, grad_aux], allow_unused=True)
    assert forward.ops == ["aten.sum.dim_IntList", "aten.dot.default"] + (["aten.clone.default"] if path == "operators" else [])
    assert backward.ops == []
    assert [launch[0] for launch in launches] == [
        "_dispatch_moe_fwd_kernel", "_dispatch_bwd_softmax_kernel", "_dispatch_moe_bwd_kernel", "_dispatch_bwd_reduce_kernel"
    ]
    listed = [
        (v["kernel"].__name__, v["signature"], v["constexprs"], v["num_warps"], v["num_stages"])
        for v in km.KERNEL_VARIANTS + kd.KERNEL_VARIANTS
    ]
    for launch in launches:
        assert launch in listed, f"{launch[0]} launched with a variant no KERNEL_VARIANTS lists: {launch[2]}"


@pytest.fixture(scope="module")
def compiled_variants():
    """Every variant compiled for sm_90 (tests/sm90_compile.py, begun with the session)."""
    return sm90_job("variants:dispatch_moe")


@pytest.mark.slow
@pytest.mark.parametrize("name", [v["name"] for v in km.KERNEL_VARIANTS], ids=[v["name"] for v in km.KERNEL_VARIANTS])
def test_variant_compiles_for_sm90(name, compiled_variants):
    result = compiled_variants[name]
    assert isinstance(result, dict), f"{name} does not compile for sm_90:\n{result}"
    # The H100 gives a block at most 227 KB of shared memory; two programs an SM want half.
    assert result["shared"] <= 114 * 1024, f"{name} needs {result['shared']} bytes of shared memory"
    assert result["ptx"] > 0
