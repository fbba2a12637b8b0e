"""pmoe_fast::dispatch_mlp (C++ on CPU, CUDA on a GPU) against pmoe_fast.dispatcher.Dispatcher.

Parity rule (flash-attention's): run the Dispatcher's torch backend on the same parameters in
float64 (the reference) and at the test dtype ("plain"), and the op at the test dtype; for ipt,
weights and every gradient require ``err(op) <= 2 * err(plain) + floor``.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pmoe_fast.dispatcher import Dispatcher
from pmoe_fast.fused_dispatch import cpp_not_supported_reasons, cuda_not_supported_reasons, dispatch_mlp

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def floor(dtype: torch.dtype, ref: torch.Tensor, cuda_kernels: bool) -> float:
    """Floor under the parity bound: the unit roundoff of the output dtype times the largest
    reference value. It matters only where plain PyTorch happens to be exact. The CUDA kernels'
    fp32 outputs get 1e-5 relative instead: they sum tokens, batch rows and prompt rows one after
    another in fp32, where PyTorch sums in blocks, 3-5x plain PyTorch's error (an H100, and the same
    kernels run on the CPU by tests/cuda_on_cpu), still far below a wrong index or a lost term."""
    if cuda_kernels and dtype == torch.float32:
        return 1e-5 * ref.abs().max().item()
    return torch.finfo(dtype).eps / 2 * ref.abs().max().item()


@dataclasses.dataclass
class Case:
    K: int = 3
    B: int = 2
    Np: int = 3
    T: int = 37
    D: int = 100
    H: int = 24
    separate: bool = False  # three f's (sources e, p, z) instead of one shared f
    prompt_out: bool = True
    starts: tuple | None = None  # expert k averages tokens [starts[k], ends[k]); default [0, T)
    ends: tuple | None = None
    strided: bool = False  # tokens as the view seq[:, :, Np:] of a longer sequence
    token_dtype: torch.dtype = torch.float32  # tokens and prompt_out; parameters stay float32
    logit_scale: float = 1.0  # scales every W2: 1e3 saturates the softmax

    def ranges(self):
        return list(self.starts or [0] * self.K), list(self.ends or [self.T] * self.K)


CASES = {
    "odd-shared": Case(),
    "odd-separate": Case(separate=True),
    "H0": Case(H=0),
    "H0-separate-no-prompt-out": Case(H=0, separate=True, prompt_out=False),
    "K1-B1": Case(K=1, B=1),
    "no-prompt-out-separate": Case(separate=True, prompt_out=False),
    "token-ranges": Case(starts=(1, 0, 5), ends=(37, 30, 37)),
    "large-logits": Case(logit_scale=1e3),
    "strided-tokens": Case(strided=True, starts=(1, 1, 1)),
    "bf16-tokens": Case(token_dtype=torch.bfloat16),
    "fp16-tokens-strided-separate": Case(token_dtype=torch.float16, strided=True, separate=True),
    # More than one CUDA tile along every axis: tokens and prompts (32 rows), H (64-unit forward
    # tiles, 32-row dL/dW1 tiles) and D + 1 (64 columns).
    "multi-tile": Case(K=2, B=2, Np=40, T=70, D=100, H=80),
    # The CUDA kernels take tokens 64 at a time: two chunks for expert 0, one (and an empty one) for 1.
    "long-and-short-ranges": Case(K=2, B=2, T=70, starts=(0, 40), ends=(70, 70)),
    # The CUDA backward's dL/dW1 launch splits the rows into groups, about 2 x 132 / (its 35 tiles
    # here) = 8 on an H100 (and in tests/cuda_on_cpu): groups of two images, some of two prompt rows.
    "images-per-group": Case(K=3, B=4, Np=3, T=21, D=300, H=200, separate=True),
}


def make_case(c: Case, device: str):
    """A Dispatcher with random parameters, and the inputs: prompts, seq, prompt_out, grad_ipt.
    seq holds the tokens: (K, B, Np + T, D) when c.strided (tokens = seq[:, :, Np:]), else (K, B, T, D)."""
    # The torch backend is the reference: "auto" could pick the op under test.
    disp = Dispatcher(c.D, c.K, hidden=c.H, separate_mlps=c.separate, pool="patches", backend="torch").to(device)
    with torch.no_grad():
        for name, p in disp.named_parameters():
            if "fc2.weight" in name:
                p.mul_(c.logit_scale)
    prompts = torch.randn(c.K, c.Np, c.D, device=device)
    seq = torch.randn(c.K, c.B, c.Np * c.strided + c.T, c.D, device=device).to(c.token_dtype)
    prompt_out = torch.randn(c.K, c.B, c.Np, c.D, device=device).to(c.token_dtype) if c.prompt_out else None
    grad_ipt = torch.randn(c.K, c.B, c.Np, c.D, device=device)
    return disp, prompts, seq, prompt_out, grad_ipt


def source_params(disp: Dispatcher, source: str):
    """(W1, b1, W2, b2) of one source's f, W1 and b1 None when H = 0."""
    owner = getattr(disp, source) if disp.separate_mlps else disp
    fc1 = owner.fc1 if disp.hidden else None
    return (
        fc1.weight if fc1 is not None else None,
        fc1.bias if fc1 is not None else None,
        owner.fc2.weight,
        owner.fc2.bias,
    )


def forward_backward(c: Case, impl: str, disp, prompts, seq, prompt_out, grad_ipt, dtype=None):
    """ipt, weights and every gradient of one implementation ("op" or "dispatcher"), by name.
    dtype, when given, converts the Dispatcher and every input to it (the reference)."""
    disp = copy.deepcopy(disp)
    if dtype is not None:
        disp = disp.to(dtype)
        prompts, seq, grad_ipt = prompts.to(dtype), seq.to(dtype), grad_ipt.to(dtype)
        prompt_out = prompt_out.to(dtype) if prompt_out is not None else None
    prompts = prompts.detach().clone().requires_grad_()
    seq = seq.detach().clone().requires_grad_()
    prompt_out = prompt_out.detach().clone().requires_grad_() if prompt_out is not None else None
    tokens = seq[:, :, c.Np :] if c.strided else seq
    starts, ends = c.ranges()
    if impl == "op":
        params = [source_params(disp, s) for s in ("e", "p", "z")]
        ipt, weights = dispatch_mlp(prompts, tokens, starts, ends, prompt_out, *params)
    else:
        token_list = [tokens[k, :, : ends[k]] for k in range(c.K)]
        ipt, weights = disp(prompts, token_list, prompt_out, num_prefix_tokens=starts)
    ipt.backward(grad_ipt.to(ipt.dtype))
    grad_tokens = seq.grad[:, :, c.Np :] if c.strided else seq.grad
    results = {
        "ipt": ipt,
        "weights": weights,
        "grad prompts": prompts.grad,
        "grad tokens": grad_tokens,
        "grad prompt_out": prompt_out.grad if prompt_out is not None else None,
    }
    results.update({f"grad {name}": p.grad for name, p in disp.named_parameters()})
    return results


def assert_parity(c: Case, device: str, cuda_kernels: bool | None = None):
    """cuda_kernels: the op runs csrc/cuda's kernels (default: on a CUDA device)."""
    cuda_kernels = device == "cuda" if cuda_kernels is None else cuda_kernels
    torch.manual_seed(0)
    inputs = make_case(c, device)
    ref = forward_backward(c, "dispatcher", *inputs, dtype=torch.float64)
    plain = forward_backward(c, "dispatcher", *inputs)
    ours = forward_backward(c, "op", *inputs)
    assert ours.keys() == ref.keys()
    for name, r in ref.items():
        o, p = ours[name], plain[name]
        if r is None:  # f_p's parameters without prompt_out: no gradient, as in the Dispatcher
            assert o is None and p is None, f"{name}: expected no gradient"
            continue
        assert o is not None, f"{name}: missing"
        assert o.dtype == p.dtype, f"{name}: dtype {o.dtype}, the Dispatcher gives {p.dtype}"
        assert o.shape == r.shape, f"{name}: shape {tuple(o.shape)}, expected {tuple(r.shape)}"
        err = (o.double() - r).abs().max().item()
        plain_err = (p.double() - r).abs().max().item()
        bound = 2 * plain_err + floor(o.dtype, r, cuda_kernels)
        assert err <= bound, f"{name}: max error {err:.3g} > 2 * the Dispatcher's {plain_err:.3g} + floor"
    rows = ours["weights"].sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_parity_with_dispatcher(case, device):
    assert_parity(case, device)


class RecordOps(TorchDispatchMode):
    """The ATen operators that run under it, with the shapes of what they return."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func), [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]))
        return out


def test_backward_fills_no_zero_gradients_for_outputs_without_one():
    """weights, z_act and z_mean get no gradient. Materialised, each backward would allocate and
    fill a (K, B, T, H) zero tensor for z_act before the op ran."""
    c = Case()
    disp, prompts, seq, prompt_out, grad_ipt = make_case(c, "cpu")
    params = [source_params(disp, s) for s in ("e", "p", "z")]
    ipt, _ = dispatch_mlp(prompts.requires_grad_(), seq.requires_grad_(), *c.ranges(), prompt_out, *params)
    with RecordOps() as ops:
        ipt.backward(grad_ipt)
    assert ops.calls[0][0] == "pmoe_fast.dispatch_mlp_backward.default", ops.calls
    assert not [call for call in ops.calls if "zeros" in call[0] or (c.K, c.B, c.T, c.H) in call[1]], ops.calls


@pytest.mark.parametrize("device", DEVICES)
def test_weights_are_float64_for_float64_inputs(device):
    c = Case(K=2, B=2, Np=2, T=5, D=8, H=4)
    disp, prompts, seq, prompt_out, _ = make_case(c, device)
    disp = disp.double()
    params = [source_params(disp, s) for s in ("e", "p", "z")]
    ipt, weights = dispatch_mlp(prompts.double(), seq, *c.ranges(), prompt_out, *params)
    assert ipt.dtype == torch.float64 and weights.dtype == torch.float64


DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_output_dtypes_match_the_torch_backend_for_every_dtype_mix(device, mixes=None):
    """ipt, weights and every gradient come back in the torch backend's dtypes whatever the
    prompts, tokens, prompt_out and parameters are in: weights float64 only for float64 prompts
    (float64 tokens with float32 prompts and parameters gave float64 weights). mixes: the
    (prompts, tokens, prompt_out, parameters) dtypes to try, all 256 by default."""
    K, B, Np, T, D, H = 2, 2, 2, 3, 4, 3
    backend = "cpp" if device == "cpu" else "cuda"
    base = Dispatcher(D, K, hidden=H, backend="torch").to(device)
    mismatches = []
    for p_dtype, z_dtype, zp_dtype, param_dtype in mixes or itertools.product(DTYPES, repeat=4):
        got = {}
        for name in ("torch", backend):
            disp = copy.deepcopy(base).to(param_dtype)
            disp.set_backend(name)
            prompts = torch.randn(K, Np, D, device=device, dtype=p_dtype, requires_grad=True)
            tokens = torch.randn(K, B, T, D, device=device, dtype=z_dtype, requires_grad=True)
            prompt_out = torch.randn(K, B, Np, D, device=device, dtype=zp_dtype, requires_grad=True)
            ipt, weights = disp(prompts, tokens, prompt_out)
            ipt.float().sum().backward()
            grads = [t.grad.dtype for t in (prompts, tokens, prompt_out, *disp.parameters())]
            got[name] = (ipt.dtype, weights.dtype, grads)
            assert disp.last_backend == name
        if got["torch"] != got[backend]:
            mismatches.append(((p_dtype, z_dtype, zp_dtype, param_dtype), got))
    assert not mismatches, mismatches


@pytest.mark.parametrize("device", DEVICES)
def test_fake_implementations_follow_the_ops_for_every_dtype_mix(device):
    """The fake implementations give both ops' outputs the dtypes the ops give them, for prompts,
    tokens (and prompt_out) and parameters each in any supported dtype."""
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    K, B, Np, T, D, H = 2, 2, 2, 3, 4, 3
    for p_dtype, z_dtype, param_dtype in itertools.product(dtypes, repeat=3):
        def randn(*shape, dtype=param_dtype):
            return torch.randn(*shape, device=device, dtype=dtype)

        inputs = (randn(K, Np, D, dtype=p_dtype), randn(K, B, T, D, dtype=z_dtype), [0, 1], [T, T],
                  randn(K, B, Np, D, dtype=z_dtype))
        params = ([randn(H, D)] * 3, [randn(H)] * 3, [randn(K, H)] * 3, [randn(K)] * 3)
        ipt, *saved = torch.ops.pmoe_fast.dispatch_mlp(*inputs, *params)
        torch.library.opcheck(torch.ops.pmoe_fast.dispatch_mlp.default, (*inputs, *params), test_utils="test_faketensor")
        torch.library.opcheck(
            torch.ops.pmoe_fast.dispatch_mlp_backward.default,
            (torch.randn_like(ipt), *inputs, *params, *saved, [True, True, True]),
            test_utils="test_faketensor",
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H", [3, 0], ids=["H3", "H0"])
def test_gradcheck_float64(H, device, fast_mode=False):
    """fast_mode (for the CUDA kernels built for the CPU, tests/test_cuda_on_cpu.py): one random
    projection of each input's Jacobian, a few launches where the full check takes hundreds."""
    K, B, Np, T, D = 2, 2, 2, 6, 5
    f64 = dict(dtype=torch.float64, device=device)
    prompts = torch.randn(K, Np, D, **f64)
    tokens = torch.randn(K, B, T + 2, D, **f64)[:, :, 2:]  # strided view
    prompt_out = torch.randn(K, B, Np, D, **f64)
    params = []
    for _ in range(3):  # separate f's
        w1 = torch.randn(H, D, **f64) if H else None
        b1 = torch.randn(H, **f64) if H else None
        params += [w1, b1, torch.randn(K, H or D, **f64), torch.randn(K, **f64)]
    leaves = [t.requires_grad_() for t in (prompts, tokens, prompt_out, *params) if t is not None]

    def fn(prompts, tokens, prompt_out, *flat):
        flat = iter(flat)
        groups = [(next(flat) if H else None, next(flat) if H else None, next(flat), next(flat)) for _ in range(3)]
        return dispatch_mlp(prompts, tokens, [1, 0], [6, 4], prompt_out, *groups)[0]

    assert torch.autograd.gradcheck(fn, tuple(leaves), fast_mode=fast_mode)


def opcheck_args(device: str, H: int):
    c = Case(K=3, B=2, Np=3, T=9, D=20, H=H, separate=True, strided=True, starts=(1, 0, 2), ends=(9, 9, 7))
    disp, prompts, seq, prompt_out, grad_ipt = make_case(c, device)
    w1, b1, w2, b2 = ([source_params(disp, s)[i] for s in ("e", "p", "z")] for i in range(4))
    detached = [[t.detach() if t is not None else None for t in group] for group in (w1, b1, w2, b2)]
    return (prompts, seq[:, :, c.Np :], *c.ranges(), prompt_out), (w1, b1, w2, b2), detached, grad_ipt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("H", [24, 0], ids=["H24", "H0"])
def test_opcheck(H, device):
    """Schemas, fake (meta) implementations, autograd registration and AOT dispatch of both ops."""
    inputs, params, detached_params, grad_ipt = opcheck_args(device, H)
    prompts, tokens, starts, ends, prompt_out = inputs
    grad_inputs = (prompts.requires_grad_(), tokens.requires_grad_(), starts, ends, prompt_out.requires_grad_())
    torch.library.opcheck(torch.ops.pmoe_fast.dispatch_mlp.default, (*grad_inputs, *params))
    plain_inputs = (prompts.detach(), tokens.detach(), starts, ends, prompt_out.detach())
    _, weights, z_act, z_mean = torch.ops.pmoe_fast.dispatch_mlp(*plain_inputs, *detached_params)
    for mask in ([True, True, True], [False, False, False]):
        torch.library.opcheck(
            torch.ops.pmoe_fast.dispatch_mlp_backward.default,
            (grad_ipt, *plain_inputs, *detached_params, weights, z_act, z_mean, mask),
        )


@pytest.mark.parametrize("strided", [False, True], ids=["one-matrix", "strided"])
def test_saved_activations_cover_the_token_ranges_and_are_zero_outside(strided):
    """z_act = W1_z Z + b1_z on each expert's token range and zero elsewhere, z_mean the mean of
    its GELU: on the one-GEMM path (contiguous tokens) and the per-(k, b) one (a strided view)."""
    c = Case(K=3, B=2, Np=2, T=9, D=12, H=8, strided=strided, starts=(1, 0, 2), ends=(9, 7, 9))
    disp, prompts, seq, prompt_out, _ = make_case(c, "cpu")
    params = [[t.detach() if t is not None else None for t in source_params(disp, s)] for s in ("e", "p", "z")]
    tokens = seq[:, :, c.Np :] if strided else seq
    assert tokens.is_contiguous() != strided
    w1, b1 = params[2][0], params[2][1]
    _, _, z_act, z_mean = torch.ops.pmoe_fast.dispatch_mlp(
        prompts, tokens, *c.ranges(), prompt_out, *(list(group) for group in zip(*params))
    )
    for k, (start, end) in enumerate(zip(*c.ranges())):
        pre = tokens[k, :, start:end] @ w1.t() + b1
        torch.testing.assert_close(z_act[k, :, start:end], pre)
        assert not z_act[k, :, :start].any() and not z_act[k, :, end:].any()
        torch.testing.assert_close(z_mean[k], torch.nn.functional.gelu(pre).mean(1))


@pytest.mark.parametrize("H", [8, 0], ids=["H8", "H0"])
@pytest.mark.parametrize("strided", [False, True], ids=["one-matrix", "strided"])
def test_inference_mode_on_several_threads(H, strided):
    """The op's parallel chunks call ATen on worker threads, which must run below autograd as the
    op's own thread does: under torch.inference_mode they wrote into inference tensors from outside
    it and raised (the per-(k, b) paths: H = 0, or tokens that are a view)."""
    torch.manual_seed(0)
    disp = Dispatcher(48, 2, hidden=H, backend="cpp")
    prompts, prompt_out = torch.randn(2, 3, 48), torch.randn(2, 2, 3, 48)
    seq = torch.randn(2, 2, 3 + 50, 48)
    tokens = seq[:, :, 3:] if strided else seq[:, :, 3:].contiguous()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            expected = disp(prompts, tokens, prompt_out)
        with torch.inference_mode():
            got = disp(prompts, tokens, prompt_out)
    finally:
        torch.set_num_threads(threads)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    """torch.compile traces through the op (fake implementation, autograd) with no graph break."""
    torch._dynamo.reset()
    c = Case(K=2, B=2, Np=3, T=7, D=16, H=8)
    disp, prompts, seq, prompt_out, grad_ipt = make_case(c, "cpu")
    params = [source_params(disp, s) for s in ("e", "p", "z")]

    def layer(prompts, tokens, prompt_out):
        ipt, weights = dispatch_mlp(prompts, tokens, *c.ranges(), prompt_out, *params)
        return ipt * 2.0, weights

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (layer, compiled):
        p = prompts.detach().clone().requires_grad_()
        ipt, weights = fn(p, seq, prompt_out)
        ipt.backward(grad_ipt)
        results.append((ipt, weights, p.grad))
    for name, e, t in zip(("ipt", "weights", "grad prompts"), *results):
        torch.testing.assert_close(t, e, msg=lambda m: f"{name}: {m}")


def test_input_gradients_can_be_skipped():
    """Tokens that need no gradient (the first prompt layer) get none, and the rest is unchanged."""
    c = Case(K=2, B=2, Np=3, T=7, D=16, H=8)
    disp, prompts, seq, prompt_out, grad_ipt = make_case(c, "cpu")
    params = [source_params(disp, s) for s in ("e", "p", "z")]
    p = prompts.clone().requires_grad_()
    ipt, _ = dispatch_mlp(p, seq, *c.ranges(), prompt_out, *params)
    ipt.backward(grad_ipt)
    assert seq.grad is None and p.grad is not None
    grad_w1 = params[0][0].grad.clone()
    params[0][0].grad = None
    full = forward_backward(c, "op", disp, prompts, seq, prompt_out, grad_ipt)
    torch.testing.assert_close(full["grad fc1.weight"], grad_w1, rtol=0, atol=0)


# Errors and reasons -----------------------------------------------------------------------


def valid_args():
    c = Case(K=3, B=2, Np=3, T=9, D=8, H=4, separate=True)
    disp, prompts, seq, prompt_out, _ = make_case(c, "cpu")
    params = [list(source_params(disp, s)) for s in ("e", "p", "z")]
    return dict(prompts=prompts, tokens=seq, tok_start=[0, 0, 0], tok_end=[9, 9, 9], prompt_out=prompt_out), params


def call(args, params):
    return dispatch_mlp(**args, params_e=params[0], params_p=params[1], params_z=params[2])


BAD_INPUTS = {
    "prompts-2d": (lambda a, p: a.update(prompts=a["prompts"][0]), r"prompts must be \(K, Np, D\), got \[3, 8\]"),
    "tokens-K": (
        lambda a, p: a.update(tokens=a["tokens"][:2]),
        r"tokens must be \(K, B, T, D\) with K = prompts.size\(0\) = 3 and D = prompts.size\(2\) = 8, got \[2, 2, 9, 8\]",
    ),
    "tokens-stride": (
        lambda a, p: a.update(tokens=a["tokens"].transpose(2, 3).contiguous().transpose(2, 3)),
        r"tokens must have stride\(-1\) == 1",
    ),
    "range-past-T": (
        lambda a, p: a.update(tok_end=[9, 10, 9]),
        r"expert 1 must average over a non-empty token range \[start, end\) within \[0, T = 9\], got \[0, 10\)",
    ),
    "range-empty": (lambda a, p: a.update(tok_start=[0, 0, 9]), r"expert 2 .* got \[9, 9\)"),
    "range-count": (lambda a, p: a.update(tok_start=[0, 0]), r"tok_start and tok_end must hold K = 3 ints each, got 2 and 3"),
    "prompt_out-shape": (
        lambda a, p: a.update(prompt_out=a["prompt_out"][:, :1]),
        r"prompt_out must be \(K, B, Np, D\) = \[3, 2, 3, 8\], got \[3, 1, 3, 8\]",
    ),
    "w1-mixed-None": (
        lambda a, p: p[1].__setitem__(0, None),
        r"w1 and b1 must hold three tensors .* source p has w1 None and b1 set",
    ),
    "w2-shape": (
        lambda a, p: p[2].__setitem__(2, p[2][2][:, :3]),
        r"w2\[2\] \(source z\) must be \(K, H\) = \[3, 4\], got \[3, 3\]",
    ),
    "b1-dtype": (
        lambda a, p: p[0].__setitem__(1, p[0][1].to(torch.int32)),
        r"b1\[0\] \(source e\) must be float32, float64, float16 or bfloat16, got (Int|torch.int32)",
    ),
    "tokens-dtype": (lambda a, p: a.update(tokens=a["tokens"].to(torch.int64)), r"tokens must be float32, float64"),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("mutate, match", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise(mutate, match, device):
    """The C++ checks (cpu) and the fake implementation (meta) reject the same inputs alike."""
    args, params = valid_args()
    mutate(args, params)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    params = [[t.to(device) if t is not None else None for t in group] for group in params]
    with pytest.raises(RuntimeError, match=match):
        call(args, params)


def test_backward_rejects_foreign_saved_tensors():
    args, params = valid_args()
    plain = [args[k] for k in ("prompts", "tokens", "tok_start", "tok_end", "prompt_out")]
    lists = [[group[i].detach() if group[i] is not None else None for group in params] for i in range(4)]
    _, weights, z_act, z_mean = torch.ops.pmoe_fast.dispatch_mlp(*plain, *lists)
    grad = torch.randn(3, 2, 3, 8)
    with pytest.raises(RuntimeError, match="z_act must be the forward's output, in the accumulation dtype Float, got Half"):
        torch.ops.pmoe_fast.dispatch_mlp_backward(grad, *plain, *lists, weights, z_act.half(), z_mean, [True] * 3)
    with pytest.raises(RuntimeError, match=r"z_mean must be \(K, B, Hz\) = \[3, 2, 4\], got \[3, 2, 5\]"):
        torch.ops.pmoe_fast.dispatch_mlp_backward(
            grad, *plain, *lists, weights, z_act, torch.zeros(3, 2, 5), [True] * 3
        )


@needs_cuda
def test_cuda_rejects_too_many_experts():
    c = Case(K=65, B=1, Np=1, T=2, D=4, H=2)
    disp, prompts, seq, prompt_out, _ = make_case(c, "cuda")
    params = [source_params(disp, s) for s in ("e", "p", "z")]
    assert "at most 64" in " ".join(cuda_not_supported_reasons(prompts, seq, *c.ranges(), prompt_out, *params))
    with pytest.raises(RuntimeError, match="the CUDA kernels take at most 64 experts, got K = 65"):
        dispatch_mlp(prompts, seq, *c.ranges(), prompt_out, *params)


def test_not_supported_reasons():
    args, params = valid_args()
    positional = [args[k] for k in ("prompts", "tokens", "tok_start", "tok_end", "prompt_out")]
    assert cpp_not_supported_reasons(*positional, *params) == []
    cuda_reasons = " ".join(cuda_not_supported_reasons(*positional, *params))
    assert "every tensor on one CUDA device, got tensors on ['cpu']" in cuda_reasons
    bad_tokens = args["tokens"].transpose(2, 3).contiguous().transpose(2, 3)
    positional[1] = bad_tokens.half().to(torch.int16)
    reasons = " ".join(cpp_not_supported_reasons(*positional, *params))
    assert "tokens is torch.int16" in reasons and "stride(-1) = 9" in reasons
    assert "on ['cpu', 'meta']" in " ".join(cpp_not_supported_reasons(*positional[:4], positional[4].to("meta"), *params))
