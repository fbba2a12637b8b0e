"""The fused Triton dispatcher (kernels/dispatch.py): forward and every gradient against its
reference, the Dispatcher module, what it refuses, and that every variant builds for an H100.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET
before this module imports them, and makes its products round as an H100's: bf16 operands and
tf32, tests/triton_interpreter.py); on a GPU the same tests run compiled.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import random

import pytest
import torch
from helpers import WorkLog, sm90_job

from pmoe_fast.dispatcher import Dispatcher
from pmoe_fast.kernels import dispatch as kd

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# err(kernel) <= 2 * err(plain PyTorch at the test dtype) + FLOOR * max|truth|, both errors
# measured against float64.
# On a GPU, fp32 dots run as tf32x3 on tensor cores: about fp32's accuracy, not quite. On an H100
# the logits-x20 case, whose scaled logits amplify every rounding, came out at 3.6x plain PyTorch's
# error in the prompts' gradient and 2.5x in b2_e's, hence a floor of 3e-5 there: plain tf32 dots
# (about 5e-4) still fail it.
FLOOR = {torch.float32: 3e-5 if DEVICE.type == "cuda" else 1e-6, torch.float16: 1e-5, torch.bfloat16: 1e-4}


@dataclasses.dataclass
class Case:
    K: int = 3
    B: int = 2
    Np: int = 3
    T: int = 37
    D: int = 100
    H: int = 24
    prompt_out: bool = True
    shared: bool = True
    dtype: torch.dtype = torch.float32  # prompts and every W/b
    act_dtype: torch.dtype | None = None  # tokens and prompt_out; None: dtype
    starts: tuple | None = None  # None: every token
    ends: tuple | None = None
    strided: bool = False  # tokens (and prompt_out) are views into one longer sequence
    w2_scale: float = 1.0
    blocks: str = ""  # PMOE_TRITON_BLOCKS


CASES = {
    "odd-shared": Case(),
    "odd-separate": Case(shared=False),
    "fp16-shared": Case(dtype=torch.float16),
    "fp16-separate": Case(dtype=torch.float16, shared=False),
    "fp32-params-fp16-tokens": Case(act_dtype=torch.float16, shared=False),
    "linear-separate": Case(H=0, shared=False),
    "linear-fp16": Case(H=0, dtype=torch.float16),
    "layer0": Case(prompt_out=False, shared=False),
    "K1-B1": Case(K=1, B=1, T=9),
    # The forward's tiling for small batches on a GPU (``_forward_blocks``, ``_prompt_blocks``),
    # which the interpreter's default blocks never pick: one image per finishing program, the
    # mixture's 128-wide D step past D = 100, float32 products split by _dot_fwd's rounding (fp32
    # tokens, and fp32 prompts beside bf16 tokens as in the model).
    # f_e in two pieces, 64 columns and the last 36.
    "small-batch": Case(B=1, blocks="BLOCK_T_FWD=16,BLOCK_D_FWD=64,BLOCK_D_E=64,BLOCK_D_MIX=128,B_PER_FIN=1,ROUND_FP32=1"),
    # f_p's one 16-row tile holds the rows of all three images, and counts into three groups.
    "small-batch-B3": Case(
        B=3, act_dtype=torch.bfloat16, shared=False,
        blocks="BLOCK_T_FWD=16,BLOCK_D_FWD=64,BLOCK_ZP=16,BLOCK_D_MIX=128,B_PER_FIN=1,ROUND_FP32=1",
    ),
    "logits-x20-small-batch": Case(
        w2_scale=20.0, shared=False, blocks="BLOCK_T_FWD=16,BLOCK_D_FWD=64,BLOCK_D_MIX=128,B_PER_FIN=1,ROUND_FP32=1",
    ),
    # Token chunks of 16: experts 1 and 2 have fewer chunks than expert 0, their last one empty.
    # One image per finishing program: B groups of one.
    "patches": Case(starts=(1, 5, 0), ends=(37, 37, 30), shared=False, blocks="BLOCK_T_FWD=16,B_PER_FIN=1"),
    # Logits in the thousands: the softmax saturates (its gradients underflow to zero in fp32,
    # as in PyTorch), and must stay finite.
    "large-logits": Case(w2_scale=1e3),
    "logits-x20": Case(w2_scale=20.0, shared=False),
    "strided": Case(strided=True, starts=(1, 1, 1), ends=(37, 37, 37)),
    "hidden-128": Case(H=100, K=2, T=20),
    # More prompts than a BLOCK_N tile (``_prompt_blocks``): f_e in 32-row tiles, three of them
    # at Np = 70, the last one short; the 8 warps' token chunks and f_p tiles of 128 rows, f_p's
    # first holding rows of both images of the 140 of Z_P[k], its second short; the mixture's
    # 128-wide D step past D; K = 6 takes the mixture's experts in three steps of two.
    "many-prompts-K6": Case(K=6, B=2, Np=70, T=9, D=40),
    # B = 3: a group of two images and a group of one; f_p's third 16-row tile of the 60 rows of
    # Z_P holds rows of both groups, its fourth is short; f_e in three pieces.
    "small-tiles": Case(
        Np=20, B=3, D=48, shared=False,
        blocks="BLOCK_T_FWD=16,BLOCK_D_FWD=16,BLOCK_D_E=16,BLOCK_T=16,BLOCK_N=16,BLOCK_ZP=16,BLOCK_D=16,BLOCK_DW=32,BLOCK_KB=16,"
        "BLOCK_C=64,B_PER_PROG=1,N_PER_PROG=3,B_PER_FIN=2",
    ),
    "small-tiles-linear": Case(
        H=0, Np=20, B=3, D=48,
        # f_e without a hidden layer in two pieces
        blocks="BLOCK_T_FWD=16,BLOCK_D_FWD=16,BLOCK_D_E=32,BLOCK_T=16,BLOCK_D=16,BLOCK_DW=32,BLOCK_KB=16,BLOCK_C=64,B_PER_PROG=2,"
        "N_PER_PROG=7",
    ),
    # bf16 runs in the interpreter too, rounding as an H100 does (tests/triton_interpreter.py).
    "bf16-shared": Case(dtype=torch.bfloat16),
    "fp32-params-bf16-tokens": Case(act_dtype=torch.bfloat16, shared=False),
    # The same token chunks as Z W1^T, as more prompts (8 warps) take them (``tokens_transposed``).
    "fp32-params-bf16-tokens-z-w1t": Case(act_dtype=torch.bfloat16, shared=False, blocks="TOKENS_T=0"),
    # bf16 tokens without prompt outputs: the backward's bf16 variant with its placeholders.
    "layer0-bf16-tokens": Case(prompt_out=False, act_dtype=torch.bfloat16, shared=False),
    # The GPU targets' layer at K = 2, B = 5 (about 20 s here): D = 768, H = 64, T = 197 with
    # the class token left out of the mean, fp32 dispatcher, bf16 sequences holding the prompt
    # slots, default blocks (groups of 4 images to finish, the last one partial).
    "model-shape": Case(
        K=2, B=5, Np=10, T=197, D=768, H=64, act_dtype=torch.bfloat16, shared=False, strided=True,
        starts=(1, 1), ends=(197, 197),
    ),
}


def make_params(K, D, H, dtype, w2_scale=1.0):
    """(W1, b1, W2, b2) with nn.Linear's scale, W2 scaled by w2_scale."""
    w2_in = H or D
    w1 = (torch.rand(H, D, dtype=torch.float64) * 2 - 1) / D**0.5 if H else None
    b1 = (torch.rand(H, dtype=torch.float64) * 2 - 1) / D**0.5 if H else None
    w2 = (torch.rand(K, w2_in, dtype=torch.float64) * 2 - 1) / w2_in**0.5 * 3 * w2_scale
    b2 = torch.rand(K, dtype=torch.float64) * 2 - 1
    return tuple(None if p is None else p.to(dtype) for p in (w1, b1, w2, b2))


def make_inputs(case: Case) -> dict:
    """Leaves (tensors to differentiate) and the op's arguments built from them, at test dtypes."""
    K, B, Np, T, D, H = case.K, case.B, case.Np, case.T, case.D, case.H
    act = case.act_dtype or case.dtype
    prompts = torch.randn(K, Np, D, dtype=torch.float64).to(case.dtype)
    if case.strided:
        # One sequence [prompt slots, tokens] per expert, as a fast model holds it.
        seq = torch.randn(K, B, Np + T, D, dtype=torch.float64).to(act)
        seq_leaves = [seq]
    else:
        tokens = torch.randn(K, B, T, D, dtype=torch.float64).to(act)
        prompt_out = torch.randn(K, B, Np, D, dtype=torch.float64).to(act) if case.prompt_out else None
        seq_leaves = [t for t in (tokens, prompt_out) if t is not None]
    sources = 1 if case.shared else 3
    params = [make_params(K, D, H, case.dtype, case.w2_scale) for _ in range(sources)]
    leaves = [prompts, *seq_leaves] + [p for ps in params for p in ps if p is not None]
    return {
        "leaves": leaves,
        "build": lambda ls: _build(case, ls, len(seq_leaves), sources),
        "starts": case.starts or (0,) * K,
        "ends": case.ends or (T,) * K,
    }


def _build(case: Case, leaves: list, n_seq: int, sources: int):
    """(prompts, tokens, prompt_out, params_e, params_p, params_z) from leaves, in make_inputs' order."""
    prompts, seq = leaves[0], leaves[1 : 1 + n_seq]
    if case.strided:
        tokens = seq[0][:, :, case.Np :]
        prompt_out = seq[0][:, :, : case.Np] if case.prompt_out else None
    else:
        tokens, prompt_out = seq[0], (seq[1] if case.prompt_out else None)
    rest = iter(leaves[1 + n_seq :])
    params = [tuple(next(rest) if (case.H or i >= 2) else None for i in range(4)) for _ in range(sources)]
    params_e, params_p, params_z = params * 3 if sources == 1 else params
    return prompts, tokens, prompt_out, params_e, params_p, params_z


def run(fn, inputs, leaves, grad_ipt, **kwargs):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    prompts, tokens, prompt_out, pe, pp, pz = inputs["build"](leaves)
    ipt, weights = fn(prompts, tokens, inputs["starts"], inputs["ends"], prompt_out, pe, pp, pz, **kwargs)
    # allow_unused: f_p's parameters do not take part without prompt_out.
    grads = torch.autograd.grad(ipt, leaves, grad_ipt.to(ipt.dtype), allow_unused=True)
    return ipt, weights, grads


def assert_within_rule(name, kernel, baseline, truth):
    err_kernel = (kernel.double() - truth).abs().max().item()
    err_baseline = (baseline.double() - truth).abs().max().item()
    bound = 2 * err_baseline + FLOOR[kernel.dtype] * truth.abs().max().item()
    assert err_kernel <= bound, (
        f"{name}: error {err_kernel:.3g} vs float64 exceeds 2 x {err_baseline:.3g} (PyTorch at "
        f"{baseline.dtype}) + floor = {bound:.3g}"
    )


def leaf_names(case: Case) -> list[str]:
    seq = ["seq"] if case.strided else ["tokens"] + (["prompt_out"] if case.prompt_out else [])
    param_names = ["W1", "b1", "W2", "b2"] if case.H else ["W2", "b2"]
    sources = ["shared"] if case.shared else ["e", "p", "z"]
    return ["prompts", *seq] + [f"{n}_{s}" for s in sources for n in param_names]


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_every_gradient_match_float64(name, monkeypatch):
    case = CASES[name]
    monkeypatch.setenv(kd.BLOCK_ENV, case.blocks)
    inputs = make_inputs(case)
    leaves = [t.to(DEVICE) for t in inputs["leaves"]]
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE).to(case.dtype)
    # The truth from the very same (rounded) inputs in float64, and PyTorch at the test dtype:
    # the MLPs in the parameters' dtype, as Dispatcher computes them.
    truth = run(kd.dispatch_reference, inputs, [t.double() for t in leaves], grad_ipt)
    baseline = run(kd.dispatch_reference, inputs, leaves, grad_ipt, mlp_dtype=case.dtype)
    kernel = run(kd.fused_dispatch, inputs, leaves, grad_ipt)

    assert kernel[0].dtype == case.dtype and kernel[1].dtype == torch.float32
    assert all(t.isfinite().all() for t in (*kernel[:2], *kernel[2]) if t is not None)
    assert_within_rule("ipt", kernel[0], baseline[0], truth[0])
    assert_within_rule("weights", kernel[1], baseline[1], truth[1])
    torch.testing.assert_close(kernel[1].sum(-1), torch.ones_like(kernel[1][..., 0]))
    for leaf, k, b, t in zip(leaf_names(case), kernel[2], baseline[2], truth[2]):
        if t is None:
            assert k is None and b is None, leaf
            continue
        assert k.dtype == b.dtype and k.shape == t.shape, leaf
        assert_within_rule(f"grad {leaf}", k, b, t)


def test_tokens_without_grad_get_none():
    case = CASES["odd-separate"]
    inputs = make_inputs(case)
    leaves = [t.to(DEVICE) for t in inputs["leaves"]]
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE)
    full = run(kd.fused_dispatch, inputs, leaves, grad_ipt)[2]
    leaves = [t.clone().requires_grad_(i != 1) for i, t in enumerate(leaves)]  # leaf 1: tokens
    prompts, tokens, prompt_out, pe, pp, pz = inputs["build"](leaves)
    ipt, _ = kd.fused_dispatch(prompts, tokens, inputs["starts"], inputs["ends"], prompt_out, pe, pp, pz)
    ipt.backward(grad_ipt)
    assert tokens.grad is None
    for i, (leaf, g) in enumerate(zip(leaves, full)):
        if i != 1:
            assert torch.equal(leaf.grad, g)


def test_backward_is_deterministic():
    case = CASES["small-tiles"]
    inputs = make_inputs(case)
    leaves = [t.to(DEVICE) for t in inputs["leaves"]]
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE)
    first = run(kd.fused_dispatch, inputs, leaves, grad_ipt)[2]
    second = run(kd.fused_dispatch, inputs, leaves, grad_ipt)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not kd._INTERPRETED, reason="programs run in the hardware's order on a GPU; the interpreter's can be set")
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_any_program_may_finish_the_forward(order, monkeypatch):
    """The program that completes the count of a (k, b) finishes it. In the interpreter's order
    that is always a token chunk; reversed, the f_e programs run last and finish every (k, b) of
    their expert; shuffled, every role finishes some. Results must not change, bit for bit."""
    from triton.runtime import interpreter

    case = CASES["small-tiles"]
    monkeypatch.setenv(kd.BLOCK_ENV, case.blocks)
    inputs = make_inputs(case)
    leaves = [t.to(DEVICE) for t in inputs["leaves"]]
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE)
    natural = run(kd.fused_dispatch, inputs, leaves, grad_ipt)

    builder = interpreter.interpreter_builder
    set_grid_idx = builder.set_grid_idx

    def permuted(x, y, z):
        n = builder.grid_dim[0]
        order_x = list(range(n))[::-1] if order == "reversed" else random.Random(n).sample(range(n), n)
        set_grid_idx(order_x[x], y, z)

    monkeypatch.setattr(builder, "set_grid_idx", permuted)
    reordered = run(kd.fused_dispatch, inputs, leaves, grad_ipt)
    assert torch.equal(natural[0], reordered[0]) and torch.equal(natural[1], reordered[1])
    for a, b in zip(natural[2], reordered[2]):
        assert (a is None and b is None) or torch.equal(a, b)


def module_params(disp: Dispatcher, source: str):
    owner = getattr(disp, source) if disp.separate_mlps else disp
    fc1 = (owner.fc1.weight, owner.fc1.bias) if disp.hidden else (None, None)
    return (*fc1, owner.fc2.weight, owner.fc2.bias)


@pytest.mark.parametrize("hidden", [0, 16], ids=["linear", "hidden16"])
@pytest.mark.parametrize("separate", [False, True], ids=["shared", "separate"])
def test_matches_dispatcher_module(hidden, separate):
    K, B, Np, T, D, Q = 3, 2, 4, 11, 40, 2
    disp = Dispatcher(D, K, hidden=hidden, separate_mlps=separate, pool="patches", backend="torch").to(DEVICE)
    prompts = torch.randn(K, Np, D, device=DEVICE, requires_grad=True)
    tokens = torch.randn(K, B, T, D, device=DEVICE)
    prompt_out = torch.randn(K, B, Np, D, device=DEVICE)
    grad_ipt = torch.randn(K, B, Np, D, device=DEVICE)
    wanted = list(disp.parameters()) + [prompts]

    ipt_ref, w_ref = disp(prompts, tokens, prompt_out, num_prefix_tokens=Q)
    grads_ref = torch.autograd.grad(ipt_ref, wanted, grad_ipt)
    ipt, w = kd.fused_dispatch(
        prompts, tokens, [Q] * K, [T] * K, prompt_out, *(module_params(disp, s) for s in "epz")
    )
    grads = torch.autograd.grad(ipt, wanted, grad_ipt)

    torch.testing.assert_close(ipt, ipt_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
    for (name, _), g, g_ref in zip(list(disp.named_parameters()) + [("prompts", None)], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=name)


def operator_args(case: Case, grad: bool):
    inputs = make_inputs(case)
    leaves = [t.to(DEVICE).requires_grad_(grad) for t in inputs["leaves"]]
    prompts, tokens, prompt_out, pe, pp, pz = inputs["build"](leaves)
    w1, b1, w2, b2 = (list(group) for group in zip(pe, pp, pz))
    return prompts, tokens, list(inputs["starts"]), list(inputs["ends"]), prompt_out, w1, b1, w2, b2


@pytest.mark.parametrize(
    "case",
    [Case(K=3, B=2, Np=3, T=9, D=20, H=24, shared=False, strided=True, starts=(1, 0, 2), ends=(9, 9, 7)),
     Case(K=2, B=1, Np=2, T=5, D=16, H=0, prompt_out=False)],
    ids=["separate-H24-strided", "shared-linear-layer0"],
)
def test_opcheck(case):
    """Schemas, fake implementations, autograd registration and AOT dispatch of both operators.
    The forward is compared over whole token ranges: it leaves the slopes of tokens outside an
    expert's range unwritten (nothing reads them)."""
    whole_ranges = dataclasses.replace(case, starts=None, ends=None)
    torch.library.opcheck(kd.triton_dispatch_mlp, (*operator_args(whole_ranges, True), True))
    args = operator_args(case, False)
    _, weights, *hidden = kd.triton_dispatch_mlp(*args, True)
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE)
    # opcheck copies the inputs, so shared tensors arrive as copies: each source gets its own row.
    for need_grad_tokens in (True, False):
        torch.library.opcheck(kd.triton_dispatch_mlp_backward, (grad_ipt, *args, weights, hidden, need_grad_tokens, False))


def test_operators_refuse_a_wrong_shared_flag():
    """The backward sums the gradients of shared sources by its flag alone: a flag that does not
    match the tensors raises instead of mixing gradients up."""
    case = Case(K=2, B=1, Np=2, T=5, D=16, H=8, shared=False)
    args = operator_args(case, False)
    _, weights, *hidden = kd.triton_dispatch_mlp(*args, True)
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE)
    with pytest.raises(ValueError, match="shared=True, but the sources pass different parameter tensors"):
        kd.triton_dispatch_mlp_backward(grad_ipt, *args, weights, hidden, True, True)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "separate"])
def test_torch_compile_fullgraph(shared):
    """torch.compile traces fused_dispatch as one operator, forward and backward (no graph
    break), and computes what eager does."""
    case = Case(K=2, B=2, Np=3, T=7, D=16, H=8, shared=shared, strided=True, starts=(1, 0))
    inputs = make_inputs(case)
    leaves = [t.to(DEVICE) for t in inputs["leaves"]]
    grad_ipt = torch.randn(case.K, case.B, case.Np, case.D, device=DEVICE)

    def layer(prompts, tokens, prompt_out, pe, pp, pz):
        ipt, weights = kd.fused_dispatch(prompts, tokens, inputs["starts"], inputs["ends"], prompt_out, pe, pp, pz)
        return ipt * 2, weights

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager = run(lambda p, t, _s, _e, po, *params: layer(p, t, po, *params), inputs, leaves, grad_ipt)
    traced = run(lambda p, t, _s, _e, po, *params: compiled(p, t, po, *params), inputs, leaves, grad_ipt)
    for a, b in zip((*eager[:2], *eager[2]), (*traced[:2], *traced[2])):
        torch.testing.assert_close(a, b)


def test_weights_are_not_differentiable():
    case = Case(K=2, B=1, Np=2, T=5, D=16, H=0)
    inputs = make_inputs(case)
    leaves = [t.to(DEVICE).requires_grad_(True) for t in inputs["leaves"]]
    prompts, tokens, prompt_out, pe, pp, pz = inputs["build"](leaves)
    ipt, weights = kd.fused_dispatch(prompts, tokens, inputs["starts"], inputs["ends"], prompt_out, pe, pp, pz)
    assert ipt.requires_grad and not weights.requires_grad


def test_bad_arguments_raise():
    P = torch.randn(2, 3, 16, device=DEVICE)
    Z = torch.randn(2, 1, 5, 16, device=DEVICE)
    params = make_params(2, 16, 0, torch.float32)
    params = tuple(None if p is None else p.to(DEVICE) for p in params)
    with pytest.raises(ValueError, match="token range"):
        kd.fused_dispatch(P, Z, (0, 3), (5, 3), None, params, params, params)
    with pytest.raises(ValueError, match="prompt_out"):
        kd.fused_dispatch(P, Z, (0, 0), (5, 5), Z, params, params, params)
    with pytest.raises(ValueError, match=r"at least one image \(B >= 1\)"):
        kd.fused_dispatch(P, Z[:, :0], (0, 0), (5, 5), None, params, params, params)


@pytest.mark.parametrize("what", ["tokens", "weight", "bias", "K"])
def test_the_functional_entry_refuses_what_the_kernels_cannot_run(what):
    """The kernels read a contiguous last dimension and at most 16 experts; fused_dispatch ran
    such inputs anyway, with ipt and every gradient wrong (Dispatcher checked, the op did not)."""
    K = 17 if what == "K" else 2
    P = torch.randn(K, 3, 16, device=DEVICE)
    Z = torch.randn(K, 1, 5, 16, device=DEVICE)
    w1, b1, w2, b2 = (p.to(DEVICE) for p in make_params(K, 16, 4, torch.float32))
    if what == "tokens":
        Z = torch.randn(K, 1, 5, 32, device=DEVICE)[..., ::2]
    elif what == "weight":
        w1 = w1.t().contiguous().t()
    elif what == "bias":
        b2 = torch.randn(2 * K, device=DEVICE)[::2]
    params = (w1, b1, w2, b2)
    match = {"tokens": "tokens has stride 2", "weight": "params_e.0. has stride 4", "bias": r"params_e.3. has stride 2",
             "K": "K=17 experts is more than 16"}[what]
    with pytest.raises(ValueError, match="the Triton dispatcher cannot run these inputs: .*" + match):
        kd.fused_dispatch(P, Z, (0,) * K, (5,) * K, None, params, params, params)


def test_small_batches_on_a_gpu_take_the_forwards_small_tiles(monkeypatch):
    """On an H100 (132 SMs) the forward of K * B <= 16 images takes chunks of 16 tokens, a
    4096-element W1 tile and a finishing program per image; a large batch, and the interpreter,
    the large-batch tiling."""
    monkeypatch.setattr(kd, "multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    small = kd.default_blocks(K=6, B=1, Np=10, D=768, H=64, device=cuda)
    assert (small["BLOCK_T_FWD"], small["BLOCK_D_FWD"]) == (16, 64)
    # each image finished by its own program, the mixture 128 wide
    assert (small["B_PER_FIN"], small["BLOCK_D_MIX"], small["BLOCK_P"], small["ROUND_FP32"]) == (1, 128, 16, 1)
    # f_p's tiles: BLOCK_P rows for a small batch, 64 (a wgmma's rows) for a large one
    assert small["BLOCK_ZP"] == 16
    many = kd.default_blocks(K=2, B=8, Np=50, D=768, H=64, device=cuda)
    assert (many["BLOCK_P"], many["BLOCK_ZP"]) == (32, 32)
    assert kd.default_blocks(K=2, B=8, Np=10, D=768, H=128, device=cuda)["BLOCK_D_FWD"] == 32
    assert kd.default_blocks(K=6, B=32, Np=10, D=768, H=128, device=cuda)["BLOCK_ZP"] == 16
    for K, B, device in ((6, 32, cuda), (4, 5, cuda), (2, 1, torch.device("cpu"))):
        large = kd.default_blocks(K=K, B=B, Np=10, D=768, H=64, device=device)
        assert (large["BLOCK_T_FWD"], large["BLOCK_D_FWD"]) == (64, 32), (K, B, device)
        assert (large["B_PER_FIN"], large["BLOCK_D_MIX"], large["ROUND_FP32"]) == (4, 32, 0), (K, B, device)
        assert (large["BLOCK_P"], large["BLOCK_ZP"]) == (16, 64), (K, B, device)
        # The backward's softmax kernel keeps the large-batch D step at every batch.
        assert large["BLOCK_D"] == small["BLOCK_D"] == 32
    # More prompts than a BLOCK_N tile take 8 warps and, with them, token chunks and f_p tiles of
    # 64 rows a warpgroup; H > 64 keeps 64 rows.
    many_prompts = kd.default_blocks(K=6, B=32, Np=50, D=768, H=64, device=cuda)
    assert (many_prompts["FWD_WARPS"], many_prompts["BLOCK_T_FWD"], many_prompts["BLOCK_ZP"]) == (8, 128, 128)
    wide = kd.default_blocks(K=6, B=32, Np=50, D=768, H=128, device=cuda)
    assert (wide["FWD_WARPS"], wide["BLOCK_T_FWD"]) == (8, 64)
    # One warpgroup takes bf16 tokens against float32 W1 as W1 Z^T, 128 tokens a chunk.
    few_prompts = kd.default_blocks(K=6, B=32, Np=10, D=768, H=64, device=cuda)
    assert few_prompts["BLOCK_T_FWD_T"] == 128
    assert kd.tokens_transposed(torch.bfloat16, torch.float32, few_prompts)
    assert not kd.tokens_transposed(torch.float16, torch.float32, few_prompts)
    assert not kd.tokens_transposed(torch.bfloat16, torch.bfloat16, few_prompts)
    assert not kd.tokens_transposed(torch.bfloat16, torch.float32, many_prompts)  # two warpgroups
    assert not kd.tokens_transposed(torch.bfloat16, torch.float32, wide)
    assert not kd.tokens_transposed(torch.bfloat16, torch.float32, {**few_prompts, "TOKENS_T": 0})


def test_pinned_blocks_are_read_and_checked(monkeypatch):
    monkeypatch.setenv(kd.BLOCK_ENV, "BLOCK_D=16, B_PER_PROG=1")
    blocks = kd.dispatch_blocks(K=3, B=4, Np=5, D=100, H=24, device=DEVICE)
    assert blocks["BLOCK_D"] == 16 and blocks["B_PER_PROG"] == 1
    monkeypatch.setenv(kd.BLOCK_ENV, "BLOCK_Q=16")
    with pytest.raises(ValueError, match="BLOCK_Q"):
        kd.dispatch_blocks(K=3, B=4, Np=5, D=100, H=24, device=DEVICE)


# --- what the kernels refuse ----------------------------------------------------------------


def reason_inputs(dtype=torch.float32, act_dtype=None, K=2, H=8, device="cpu"):
    prompts = torch.randn(K, 3, 16, dtype=dtype, device=device)
    tokens = torch.randn(K, 2, 5, 16, dtype=act_dtype or dtype, device=device)
    params = tuple(None if p is None else p.to(device) for p in make_params(K, 16, H, dtype))
    return prompts, tokens, None, params, params, params


def test_reasons_empty_when_supported():
    assert kd.triton_not_supported_reasons(*reason_inputs(device=DEVICE)) == []
    assert kd.triton_not_supported_reasons(*reason_inputs(act_dtype=torch.float16, device=DEVICE)) == []


def test_reasons_cpu_without_interpreter(monkeypatch):
    monkeypatch.setattr(kd, "_INTERPRETED", False)
    reasons = kd.triton_not_supported_reasons(*reason_inputs())
    assert len(reasons) == 1 and "CPU" in reasons[0] and "TRITON_INTERPRET=1" in reasons[0]


def test_reasons_bf16_in_interpreter(monkeypatch):
    monkeypatch.setattr(kd, "_INTERPRETED", True)
    monkeypatch.setattr(kd, "interpreter_computes_bf16", lambda: False)
    reasons = kd.triton_not_supported_reasons(*reason_inputs(dtype=torch.bfloat16))
    assert reasons and all("bfloat16" in r and "interpreter" in r for r in reasons)


def test_bf16_token_chunks_run_as_w1_zt(monkeypatch):
    """bf16 tokens against float32 W1 (the model's case) reach the forward as W1 Z^T in chunks of
    BLOCK_T_FWD_T; fp16 tokens, and TOKENS_T=0, as Z W1^T in chunks of BLOCK_T_FWD."""
    kernel, launched = kd._dispatch_fwd_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((kwargs["TOKENS_T"], kwargs["BLOCK_T"]))
                return kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kd, "_dispatch_fwd_kernel", Spy())
    disp = Dispatcher(16, 2, hidden=8, backend="triton").to(DEVICE)
    prompts = torch.randn(2, 3, 16, device=DEVICE)
    B = 9  # a large batch on an H100 too (K * B * 8 > 132 SMs): one warpgroup
    for dtype, pinned in ((torch.bfloat16, ""), (torch.float16, ""), (torch.bfloat16, "TOKENS_T=0")):
        monkeypatch.setenv(kd.BLOCK_ENV, pinned)
        disp(prompts, torch.randn(2, B, 5, 16, dtype=dtype, device=DEVICE))
    blocks = kd.dispatch_blocks(2, B, 3, 16, 8, DEVICE)
    assert launched == [(True, blocks["BLOCK_T_FWD_T"]), (False, blocks["BLOCK_T_FWD"]), (False, blocks["BLOCK_T_FWD"])]


@pytest.mark.skipif(not kd._INTERPRETED, reason="probes Triton's interpreter")
def test_bf16_probe_sees_the_interpreters_own_dot(monkeypatch):
    """Triton 3.8's interpreter multiplies bfloat16 bits as integers: the probe must say so, and
    must pass the mended dot of tests/triton_interpreter.py that the bf16 cases above run on."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    assert kd.interpreter_computes_bf16.__wrapped__()
    monkeypatch.setattr(builder, "create_dot", builder.create_dot.original)
    assert not kd.interpreter_computes_bf16.__wrapped__()


@pytest.mark.skipif(not kd._INTERPRETED, reason="probes Triton's interpreter")
def test_builtins_listed_once_are_what_the_interpreters_own_scan_patches():
    """tests/triton_interpreter.py lists each module's builtins once: it must patch what the
    interpreter's scan patches, and nothing on a second call while those are patched; also after
    a kernel ran (inside one, tl.core is scanned with reduce and associative_scan replaced)."""
    from triton.runtime import interpreter
    from triton_interpreter import patched_by_the_interpreter

    Dispatcher(8, 2, hidden=4, backend="triton")(torch.randn(2, 2, 8), torch.randn(2, 1, 3, 8))
    ours = interpreter._patch_builtin
    for pkg in patched_by_the_interpreter():
        patched = []
        for patch in (ours.original, ours):
            scope, again = interpreter._LangPatchScope(), interpreter._LangPatchScope()
            patch(pkg, interpreter.interpreter_builder, scope)
            patch(pkg, interpreter.interpreter_builder, again)
            patched.append([name for _, name, _ in scope._changes])
            assert not again._changes, (pkg, patch)
            scope.restore()
        assert patched[0] and patched[0] == patched[1], pkg


def test_reasons_last_stride(monkeypatch):
    prompts, tokens, _, *params = reason_inputs(device=DEVICE)
    tokens = tokens.transpose(-1, -2).contiguous().transpose(-1, -2)
    reasons = kd.triton_not_supported_reasons(prompts, tokens, None, *params)
    assert len(reasons) == 1 and reasons[0].startswith("tokens has stride 5 in its last dimension")


def test_reasons_dtypes_and_sizes():
    reasons = kd.triton_not_supported_reasons(*reason_inputs(dtype=torch.float64, device=DEVICE))
    assert any("prompts is torch.float64" in r for r in reasons)
    reasons = kd.triton_not_supported_reasons(*reason_inputs(dtype=torch.float16, act_dtype=torch.float32, device=DEVICE))
    assert reasons == [
        "tokens are torch.float32 but the parameters torch.float16: mixed precision needs float32 parameters."
    ]
    assert "K=17 experts" in " ".join(kd.triton_not_supported_reasons(*reason_inputs(K=17, device=DEVICE)))
    assert "H=129" in " ".join(kd.triton_not_supported_reasons(*reason_inputs(H=129, device=DEVICE)))
    # The GELU slopes of 2**25 token rows at H = 64 (expanded tokens: nothing is allocated), and of
    # 2**24 rows of bf16 tokens, which keep three bf16 parts a slope: 3 * 2**30 elements.
    prompts, _, _, *params = reason_inputs(H=64, device=DEVICE)
    for dtype, rows, refused in ((torch.float32, 2**16, True), (torch.float32, 2**15, False), (torch.bfloat16, 2**15, True)):
        tokens = torch.zeros(1, 1, 1, 16, dtype=dtype, device=DEVICE).expand(2, rows, 2**8, 16)
        reasons = kd.triton_not_supported_reasons(prompts, tokens, None, *params)
        assert ["GELU slopes" in r for r in reasons] == ([True] if refused else []), (dtype, rows, reasons)
    # The IPTs (K, B, Np, D) and f_p's saved rows (K, B, Np, H) of 2**31 elements, though the tokens
    # (expanded) span none.
    for B, Np, refused in ((2**16, 2**14, ["IPTs", "f_p's saved rows"]), (2**10, 2**14, ["f_p's saved rows"]), (2**9, 2**14, [])):
        prompts = torch.zeros(1, 1, 16, device=DEVICE).expand(2, Np, 16)
        tokens = torch.zeros(1, 1, 1, 16, device=DEVICE).expand(2, B, 1, 16)
        prompt_out = torch.zeros(1, 1, 1, 16, device=DEVICE).expand(2, B, Np, 16)
        reasons = kd.triton_not_supported_reasons(prompts, tokens, prompt_out, *params)
        assert [r.split(" (")[0].removeprefix("The ") for r in reasons] == refused, (B, Np, reasons)


def test_a_gradient_spanning_2_31_elements_is_copied_for_32_bit_offsets():
    wide = torch.empty(2, 2**31, device="meta")[:, :3]  # a view into a larger gradient
    assert kd._within_32_bits(wide).stride() == (3, 1)
    narrow = torch.empty(2, 3)
    assert kd._within_32_bits(narrow) is narrow


# --- the variants the launchers produce, and that each builds for sm_90 ---------------------


def _call_signature(kernel, args, kwargs):
    """(kernel name, signature, constexprs, num_warps, num_stages) of one launch, in KERNEL_VARIANTS'
    terms (Triton's default num_stages, 3, where a launch sets none)."""
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32"}
    signature = {}
    for arg, value in zip(kernel.arg_names, args):
        signature[arg] = "*" + names[value.dtype] if isinstance(value, torch.Tensor) else "i32"
    constexprs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    signature.update({k: "constexpr" for k in constexprs})
    return kernel.__name__, signature, constexprs, kwargs["num_warps"], kwargs.get("num_stages", 3)


KERNELS = ("_dispatch_fwd_kernel", "_dispatch_bwd_softmax_kernel", "_dispatch_bwd_kernel", "_dispatch_bwd_reduce_kernel")


def record_launches(monkeypatch) -> list:
    """Replaces the four kernels by recorders: the returned list receives each launch's
    ``_call_signature`` plus its run-time arguments by name, instead of running it."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                values = dict(zip(self.kernel.arg_names, args))
                launches.append((*_call_signature(self.kernel, args, kwargs), values))

            return launch

    for name in KERNELS:
        monkeypatch.setattr(kd, name, Recorder(getattr(kd, name)))
    return launches


def assert_listed(launches: list) -> None:
    listed = [
        (v["kernel"].__name__, v["signature"], v["constexprs"], v["num_warps"], v["num_stages"]) for v in kd.KERNEL_VARIANTS
    ]
    for launch in launches:
        assert launch[:5] in listed, f"{launch[0]} launched with a variant KERNEL_VARIANTS does not list: {launch[2]}"


def via_operators(prompts, tokens, tok_start, tok_end, prompt_out, params_e, params_p, params_z):
    """fused_dispatch as torch.compile runs it: the operator, with its registered autograd."""
    w1, b1, w2, b2 = (list(group) for group in zip(params_e, params_p, params_z))
    ipt, weights, *_ = kd.triton_dispatch_mlp(prompts, tokens, list(tok_start), list(tok_end), prompt_out, w1, b1, w2, b2, True)
    return ipt, weights


@pytest.mark.parametrize("K", [1, 3, 6])
def test_ranges_and_counters_come_in_one_copy(K):
    """The forward's token ranges and zeroed arrival counters: one buffer copied from host memory,
    the counters 16 bytes into it or more (aligned as an allocation of their own), zero on every
    call though the kernel counts in them."""
    starts, ends = list(range(K)), [10 + k for k in range(K)]
    for _ in range(2):
        ranges, counters = kd._ranges_and_counters(starts, ends, 7, DEVICE)
        assert ranges.tolist() == [[s, e] for s, e in zip(starts, ends)] and ranges.dtype == torch.int32
        assert counters.tolist() == [0] * 7 and counters.dtype == torch.int32
        assert counters.untyped_storage().data_ptr() == ranges.untyped_storage().data_ptr()
        assert counters.storage_offset() * 4 % 16 == 0 and counters.storage_offset() >= 2 * K
        counters += 1  # as the kernel's arrivals


@pytest.mark.parametrize(
    "case",
    [Case(H=0, prompt_out=False), Case(H=24), Case(H=100, act_dtype=torch.float16, shared=False), Case(dtype=torch.float16)],
    ids=["linear-layer0", "hidden24", "hidden100-mixed", "fp16"],
)
@pytest.mark.parametrize("path", ["eager", "operators"])
def test_one_launch_forward_three_backward_all_listed_variants(case, path, monkeypatch):
    """Records the launches instead of running them (only their count and signatures matter),
    and every torch op beyond allocation and views: there must be none. Eagerly (fused_dispatch)
    and through the operators torch.compile calls."""
    launches = record_launches(monkeypatch)
    inputs = make_inputs(dataclasses.replace(case, K=2, B=1, Np=2, T=5, D=16))
    leaves = [t.to(DEVICE).requires_grad_(True) for t in inputs["leaves"]]
    prompts, tokens, prompt_out, pe, pp, pz = inputs["build"](leaves)
    args = (prompts, tokens, inputs["starts"], inputs["ends"], prompt_out, pe, pp, pz)
    dispatch = kd.fused_dispatch if path == "eager" else via_operators
    dispatch(*args)  # compiles the kernels (and pins the token ranges) once
    launches.clear()
    with WorkLog() as work:
        ipt, _ = dispatch(*args)
        torch.autograd.grad(ipt, leaves, torch.empty_like(ipt), allow_unused=True)
    assert work.ops == []
    assert [launch[0] for launch in launches] == list(KERNELS)
    assert_listed(launches)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_dispatch_into_writes_the_ipts_in_its_launch(grad, monkeypatch):
    """Dispatcher.dispatch_into with fp32 parameters and fp16 sequences (the model's mixed case;
    bf16 compiles alike): the forward kernel writes the IPTs into the prompt slots in the tokens'
    dtype, a variant KERNEL_VARIANTS lists, so inference runs no torch op but allocations and views,
    and keeps no pre-activations (save_hidden = 0); training keeps them for its backward."""
    launches = record_launches(monkeypatch)
    K, B, Np, T, D = 2, 1, 2, 5, 16
    disp = Dispatcher(D, K, hidden=24, backend="triton").to(DEVICE)
    prompts = torch.randn(K, Np, D, device=DEVICE, requires_grad=grad)
    seq = torch.randn(K, B, Np + T, D, device=DEVICE, dtype=torch.float16)
    with torch.set_grad_enabled(grad):
        disp.dispatch_into(prompts, seq.clone(), True, 1)  # the backend choice and token ranges, once
        launches.clear()
        seq_in = seq.clone() if grad else seq
        with WorkLog() as work:
            out, _ = disp.dispatch_into(prompts, seq_in, True, 1)
        if grad:
            out.backward(torch.ones_like(out))
    assert_listed(launches)
    forward = launches[0]
    assert forward[0] == "_dispatch_fwd_kernel" and forward[1]["ipt_ptr"] == "*fp16"
    assert forward[5]["save_hidden"] == int(grad)
    if grad:
        assert [launch[0] for launch in launches] == list(KERNELS)
        assert work.ops == ["aten.clone.default"]  # the Z_P rows the IPTs overwrite, kept for backward
    else:
        assert len(launches) == 1 and work.ops == [] and out is seq


def test_the_forward_writes_the_ipts_into_a_given_tensor():
    """ipt_out: a strided view in the tokens' dtype (fp32 parameters, fp16 tokens) receives the IPTs
    the forward would return, rounded once; nothing around it is touched; what it cannot take is
    refused by name."""
    K, B, Np, T, D = 2, 3, 3, 5, 16
    inputs = make_inputs(Case(K=K, B=B, Np=Np, T=T, D=D, H=24, act_dtype=torch.float16))
    prompts, tokens, prompt_out, pe, pp, pz = inputs["build"]([t.to(DEVICE) for t in inputs["leaves"]])
    args = (prompts, tokens, inputs["starts"], inputs["ends"], prompt_out, pe, pp, pz)
    ipt, weights, _ = kd.dispatch_fwd(*args)
    seq = torch.zeros(K, B, 1 + Np + 2, D, dtype=torch.float16, device=DEVICE)
    slots = seq[:, :, 1 : 1 + Np]
    out, weights_into, _ = kd.dispatch_fwd(*args, ipt_out=slots)
    assert out is slots
    torch.testing.assert_close(slots, ipt.to(torch.float16), rtol=0, atol=0)
    torch.testing.assert_close(weights_into, weights, rtol=0, atol=0)
    assert not seq[:, :, 0].any() and not seq[:, :, 1 + Np :].any()
    wrong_dtype = torch.empty(K, B, Np, D, dtype=torch.float64, device=DEVICE)
    wrong_stride = torch.empty(K, B, D, Np, dtype=torch.float16, device=DEVICE).transpose(2, 3)
    for bad in (wrong_dtype, slots[:, :, :-1], wrong_stride):
        with pytest.raises(ValueError, match="ipt_out must be"):
            kd.dispatch_fwd(*args, ipt_out=bad)


def test_a_forward_without_saved_pre_activations_has_no_backward():
    """save_hidden=False (inference): the same IPTs and weights, bit for bit, nothing kept, and
    dispatch_bwd refuses to run from it."""
    inputs = make_inputs(Case(K=2, B=2, Np=2, T=5, D=16, H=24))
    prompts, tokens, prompt_out, pe, pp, pz = inputs["build"]([t.to(DEVICE) for t in inputs["leaves"]])
    args = (prompts, tokens, inputs["starts"], inputs["ends"], prompt_out, pe, pp, pz)
    ipt, weights, hidden = kd.dispatch_fwd(*args)
    ipt_bare, weights_bare, nothing = kd.dispatch_fwd(*args, save_hidden=False)
    assert all(h is not None for h in hidden) and nothing == (None, None, None, None)
    torch.testing.assert_close(ipt_bare, ipt, rtol=0, atol=0)
    torch.testing.assert_close(weights_bare, weights, rtol=0, atol=0)
    with pytest.raises(ValueError, match="save_hidden=True"):
        kd.dispatch_bwd(torch.ones_like(ipt), prompts, tokens, *args[2:5], weights, nothing, pe, pp, pz)


@pytest.fixture(scope="module")
def compiled_variants():
    """Every variant compiled for sm_90 (tests/sm90_compile.py, begun with the session)."""
    return sm90_job("variants:dispatch")


@pytest.mark.slow
@pytest.mark.parametrize("name", [v["name"] for v in kd.KERNEL_VARIANTS])
def test_variant_compiles_for_sm90(name, compiled_variants):
    result = compiled_variants[name]
    assert isinstance(result, dict), f"{name} does not compile for sm_90:\n{result}"
    # The H100 gives a block at most 227 KB of shared memory; two programs an SM want half.
    assert result["shared"] <= 114 * 1024, f"{name} needs {result['shared']} bytes of shared memory"
    assert result["ptx"] > 0


# Spill budgets in bytes a thread, per kernel, of what the model launches on a GPU (every case of
# benchmarks/triton_resources.py's MODEL_CASES: fp32 dispatchers, bf16 sequences, H = 64), as
# ptxas reports them for sm_90a once Triton specializes the launch (``--launched`` lists them).
# The main backward's budget is what its 4 warps spill now: on an H100 they ran it faster than 8
# warps that spilled less (kernels/dispatch.py, _NUM_WARPS). In the SASS with Triton 3.8 none of it
# is in the token loop (589 instructions a tile of 64 bf16 tokens); the Z_P loop reloads 7 spilled
# values a tile of 64 rows (about 450 instructions), the rest is in the per-image and per-program
# code around them. It was 148 bytes before the bf16 tiles went to the tensor cores as they are
# (kernels/dispatch.py, _tokens_bwd_split and _prompt_out_bwd_split), when a tile of 32 tokens took
# 548 instructions and a tile of 16 prompt outputs 1215.
# Kind "moe"'s two kernels, likewise. Register allocation moves between Triton releases (Triton
# 3.6 spilled 140 bytes in the main backward where 3.8 spilled 112): the budgets are for the Triton
# requirements.txt pins.
BUDGETS_TRITON = "3.8"
LAUNCHED_SPILL_BUDGETS = {
    "_dispatch_fwd_kernel": 0, "_dispatch_bwd_softmax_kernel": 0, "_dispatch_bwd_kernel": 240,
    "_dispatch_bwd_reduce_kernel": 0, "_dispatch_moe_fwd_kernel": 136, "_dispatch_moe_bwd_kernel": 844,
    "_layer_norm_fwd_kernel": 0, "_layer_norm_bwd_kernel": 0,
}


@pytest.mark.slow
def test_model_launches_compile_for_sm90_within_spill_budgets():
    """The launches of the model's GPU configurations (recorded on the CPU, nothing runs), each
    compiled for sm_90a as Triton's runtime specializes it: with the alignment hints that turn
    the tokens' loads into 16-byte asynchronous copies and start the software pipeliner, code
    the generic KERNEL_VARIANTS above do not reach. Every one compiles, fits two programs an SM,
    and, with the pinned Triton, spills within its budget: a change that spills more fails here,
    without a GPU. Another Triton skips the budgets, saying so."""
    launched = sm90_job("launched")
    kernels = [name.split(": ")[1].split(",")[0] for name, _ in launched]  # "case: kernel, grid (...)"
    # Each training case: a forward and three backward launches (kind "moe": its own two, then the
    # same softmax and reduction); inference: a forward; LayerNorm: forward and backward.
    assert len(launched) == 4 + 4 + 1 + 4 + 2 and set(kernels) == set(LAUNCHED_SPILL_BUDGETS), kernels
    for name, usage in launched:
        assert isinstance(usage, dict), f"{name} does not compile for sm_90a as launched:\n{usage}"
        assert usage["shared"] <= 114 * 1024, f"{name} needs {usage['shared']} bytes of shared memory"
    version = importlib.metadata.version("triton")
    if version.rsplit(".", 1)[0] != BUDGETS_TRITON:
        pytest.skip(f"every launch compiles and fits; the spill budgets are for Triton {BUDGETS_TRITON}, this is {version}")
    for kernel, (name, usage) in zip(kernels, launched):
        spilled = max(usage["spill_stores"], usage["spill_loads"])
        budget = LAUNCHED_SPILL_BUDGETS[kernel]
        assert spilled <= budget, f"{name} spills {spilled} bytes a thread on sm_90a, over its budget of {budget}"
