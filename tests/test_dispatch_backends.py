"""Dispatcher backends through the module: which one runs, why one cannot, and parity with the
torch backend computed in float64 (the dtype-tied rule of STYLE.md)."""

import pytest
import torch

from pmoe_fast._ext import extension_status
from pmoe_fast.dispatcher import Dispatcher

K, B, NP, D, T, H = 3, 2, 3, 100, 37, 24
# The fused backends that can run on this machine's CPU tensors: the C++ op, and Triton's
# interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).
CPU_BACKENDS = ["cpp", "triton"] if not torch.cuda.is_available() else ["cpp"]


def make_inputs(prefix_slots=NP, grad=True):
    """prompts, tokens as a strided view of a longer sequence (as a model holds them), prompt_out."""
    prompts = torch.randn(K, NP, D, dtype=torch.float64)
    seq = torch.randn(K, B, prefix_slots + T, D, dtype=torch.float64)
    prompt_out = torch.randn(K, B, NP, D, dtype=torch.float64)
    return prompts, seq, prompt_out


def run(disp, prompts, seq, prompt_out, dtype, use_prompt_out, prefix):
    """Forward and backward at `dtype`; returns (ipt, weights, grads of inputs and parameters)."""
    d = disp.to(dtype)
    # detach(): .to() of a tensor already at `dtype` is the tensor itself, shared between runs.
    p = prompts.detach().to(dtype).requires_grad_()
    s = seq.detach().to(dtype).requires_grad_()
    zp = prompt_out.detach().to(dtype).requires_grad_() if use_prompt_out else None
    d.zero_grad()
    ipt, w = d(p, s[:, :, NP:], zp, prefix)
    (ipt * torch.linspace(-1, 1, D, dtype=dtype)).sum().backward()
    grads = [p.grad, s.grad] + ([zp.grad] if use_prompt_out else []) + [q.grad for q in d.parameters()]
    return [ipt, w] + grads


def assert_within_the_rule(names, gold, plain, out):
    """STYLE.md's rule: each fused result off the float64 torch result by at most twice the torch
    backend's own error at the same dtypes, plus a small floor."""
    for name, g, p, o in zip(names, gold, plain, out):
        if g is None:  # a source f that got no input (the prompt-output MLP without prompt_out)
            assert p is None and (o is None or not o.abs().any()), name
            continue
        err_plain = (p.double() - g).abs().max().item()
        err = (o.double() - g).abs().max().item()
        assert err <= 2 * err_plain + 1e-6 * g.abs().max().item() + 1e-12, f"{name}: {err:.3g} vs torch {err_plain:.3g}"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "hidden,separate,pool,use_prompt_out",
    [(H, False, "all", True), (H, True, "patches", True), (0, False, "patches", False), (H, True, "all", False)],
    ids=["H24-shared-all", "H24-separate-patches", "H0-no-prompt-out", "separate-layer0"],
)
def test_fused_backend_matches_torch_in_float64(backend, hidden, separate, pool, use_prompt_out):
    torch.manual_seed(0)
    ref = Dispatcher(D, K, hidden=hidden, separate_mlps=separate, pool=pool, backend="torch")
    fused = Dispatcher(D, K, hidden=hidden, separate_mlps=separate, pool=pool, backend=backend)
    fused.load_state_dict(ref.state_dict())
    inputs = make_inputs()
    gold = run(ref, *inputs, torch.float64, use_prompt_out, 2)
    plain = run(ref, *inputs, torch.float32, use_prompt_out, 2)
    out = run(fused, *inputs, torch.float32, use_prompt_out, 2)
    assert fused.last_backend == backend
    names = ["ipt", "weights", "prompts", "tokens"] + (["prompt_out"] if use_prompt_out else []) + [
        n for n, _ in fused.named_parameters()
    ]
    assert_within_the_rule(names, gold, plain, out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("contiguous", [True, False], ids=["one-matrix", "strided"])
def test_tokens_outside_the_pool_are_never_read(backend, contiguous):
    """pool="patches" leaves the prefix tokens out, so a NaN or inf there changes no result and no
    gradient, as in the torch backend (the C++ op's one-GEMM dL/dW1_z multiplied them by zero)."""
    torch.manual_seed(0)
    ref = Dispatcher(D, K, hidden=H, separate_mlps=True, pool="patches", backend="torch")
    fused = Dispatcher(D, K, hidden=H, separate_mlps=True, pool="patches", backend=backend)
    fused.load_state_dict(ref.state_dict())
    prompts, seq, prompt_out = make_inputs(prefix_slots=0 if contiguous else NP)
    tokens = seq.float() if contiguous else seq.float()[:, :, NP:]
    tokens[:, :, 0] = float("nan")
    tokens[:, :, 1] = float("inf")
    out = []
    for disp in (ref, fused):
        disp.zero_grad()
        p = prompts.float().requires_grad_()
        z = tokens.detach().requires_grad_()
        ipt, w = disp(p, z, prompt_out.float(), 2)
        (ipt.sum() + w.sum()).backward()
        out.append([ipt, w, p.grad, z.grad[:, :, 2:]] + [q.grad for q in disp.parameters()])
    for gold, got in zip(*out):
        assert gold.isfinite().all() and got.isfinite().all()
        torch.testing.assert_close(got, gold, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_backend_runs_as_written_under_autocast(backend):
    """Autocast must not reach inside a fused op: it computes in float32 whatever autocast does
    around it, forward and backward (autocast inside its C++ kernel once made backward fail)."""
    torch.manual_seed(0)
    disp = Dispatcher(D, K, hidden=H, backend=backend)
    inputs = make_inputs()
    plain = run(disp, *inputs, torch.float32, True, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = run(disp, *inputs, torch.float32, True, 2)
    assert mixed[1].dtype == torch.float32
    for p, m in zip(plain, mixed):
        torch.testing.assert_close(m, p, rtol=1e-5, atol=1e-6)

def test_auto_picks_the_cpp_op_on_cpu_when_built():
    disp = Dispatcher(D, K, hidden=H)
    prompts, seq, prompt_out = make_inputs()
    disp.double()(prompts, seq[:, :, NP:], prompt_out, 1)
    assert disp.last_backend == ("cpp" if extension_status()["loaded"] else "torch")


def test_backend_is_chosen_once_per_input_signature(monkeypatch):
    """Asking the backends costs host time on every call otherwise; a new dtype, shape or
    layout of an input or a parameter asks again."""
    disp = Dispatcher(D, K, hidden=H).double()
    asked = []
    ask = disp.not_supported_reasons
    monkeypatch.setattr(disp, "not_supported_reasons", lambda backend, *args: asked.append(backend) or ask(backend, *args))
    prompts, seq, prompt_out = make_inputs()
    disp(prompts, seq[:, :, NP:], prompt_out, 1)
    first = len(asked)
    assert first >= 1
    disp(prompts, seq[:, :, NP:], prompt_out, 1)
    assert len(asked) == first
    for call in (
        lambda: disp(prompts, seq[:, :, NP:].contiguous(), prompt_out, 1),  # other strides
        lambda: disp(prompts, seq[:, :1, NP:], prompt_out[:, :1], 1),  # another batch size
        lambda: disp.float()(prompts.float(), seq[:, :, NP:].float(), prompt_out.float(), 1),  # other dtypes
    ):
        before = len(asked)
        call()
        assert len(asked) > before
    disp.set_backend("torch")
    disp(prompts.float(), seq[:, :, NP:].float(), prompt_out.float(), 1)
    assert disp.last_backend == "torch"


def test_auto_falls_back_to_torch_quietly():
    prompts, seq, _ = make_inputs()
    moe = Dispatcher(D, K, hidden=H, kind="moe").double()
    moe(prompts, seq[:, :, NP:])
    assert moe.last_backend == "torch"
    mlp = Dispatcher(D, K, hidden=H).double()
    mlp(prompts, [seq[k, :, NP:] for k in range(K)])  # a list of per-expert tensors
    assert mlp.last_backend == "torch"


@pytest.mark.parametrize(
    "kwargs,tokens_as_list,match",
    [
        (dict(backend="cuda"), False, "CUDA"),
        (dict(backend="cpp", kind="moe"), False, "torch backend only"),
        (dict(backend="cpp"), True, "list of per-expert tensors"),
    ],
    ids=["cuda-on-cpu", "moe-on-cpp", "list-on-cpp"],
)
def test_explicit_backend_that_cannot_serve_raises_every_reason(kwargs, tokens_as_list, match):
    disp = Dispatcher(D, K, hidden=H, **kwargs).double()
    prompts, seq, _ = make_inputs()
    tokens = [seq[k, :, NP:] for k in range(K)] if tokens_as_list else seq[:, :, NP:]
    with pytest.raises(RuntimeError, match=match) as info:
        disp(prompts, tokens)
    assert f"backend {kwargs['backend']!r} cannot serve" in str(info.value)


def test_reasons_join_into_one_sentence(monkeypatch):
    disp = Dispatcher(D, K, hidden=H, backend="cpp").double()
    monkeypatch.setattr(disp, "not_supported_reasons", lambda *args: ["the first reason.", "the second"])
    prompts, seq, _ = make_inputs()
    with pytest.raises(RuntimeError) as info:
        disp(prompts, seq[:, :, NP:])
    assert "serve these inputs: the first reason; the second. Use backend='auto'" in str(info.value)


def test_a_backend_the_environment_chose_is_named_as_such(monkeypatch):
    """backend="auto" with PMOE_BACKEND=cuda on CPU tensors: the error says where "cuda" came
    from, and that unsetting the variable, not backend='auto' (already given), falls back."""
    monkeypatch.setenv("PMOE_BACKEND", "cuda")
    disp = Dispatcher(D, K, hidden=H).double()
    prompts, seq, _ = make_inputs()
    with pytest.raises(RuntimeError, match=r"backend 'cuda' \(PMOE_BACKEND=cuda\) cannot serve .*\. Unset PMOE_BACKEND"):
        disp(prompts, seq[:, :, NP:])


def test_environment_variable_overrides_auto_only(monkeypatch):
    monkeypatch.setenv("PMOE_BACKEND", "torch")
    assert Dispatcher(D, K).backend == "torch"
    assert Dispatcher(D, K, backend="cpp").backend == "cpp"
    monkeypatch.setenv("PMOE_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PMOE_BACKEND"):
        Dispatcher(D, K)


def run_into(disp, prompts, seq, dtype, seq_dtype, has_prompt_out, prefix, weight):
    """dispatch_into at `dtype` (prompts, parameters) on a sequence of `seq_dtype`, forward and
    backward; returns (result, weights, grads of prompts, of the sequence and of parameters)."""
    d = disp.to(dtype)
    p = prompts.detach().to(dtype).requires_grad_()
    leaf = seq.detach().to(seq_dtype).requires_grad_()
    s = leaf * 1  # not a leaf: the fused backends write into it
    d.zero_grad()
    out, w = d.dispatch_into(p, s, has_prompt_out, prefix)
    assert (out is s) == (d.last_backend != "torch")  # written in place by the fused backends only
    (out.double() * weight).sum().backward()
    return [out, w, p.grad, leaf.grad] + [q.grad for q in d.parameters()]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "seq_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32-seq", "fp16-seq", "bf16-seq"]
)
@pytest.mark.parametrize(
    "hidden,separate,pool,has_prompt_out",
    [(H, False, "all", True), (H, True, "patches", True), (0, False, "patches", False), (H, False, "all", False)],
    ids=["H24-shared-all", "H24-separate-patches", "H0-first-layer", "H24-first-layer"],
)
def test_dispatch_into_matches_concatenating_in_float64(backend, seq_dtype, hidden, separate, pool, has_prompt_out):
    """The fused backends write the IPTs into the sequence's prompt slots in place; the result and
    every gradient (the sequence's: the overwritten Z_P's through the dispatcher, the tokens' both
    ways) must match concatenating IPT and tokens with the torch backend."""
    torch.manual_seed(0)
    ref = Dispatcher(D, K, hidden=hidden, separate_mlps=separate, pool=pool, backend="torch")
    fused = Dispatcher(D, K, hidden=hidden, separate_mlps=separate, pool=pool, backend=backend)
    fused.load_state_dict(ref.state_dict())
    prompts, seq, _ = make_inputs()
    seq = seq.to(seq_dtype).double()  # values the sequence's dtype holds exactly
    weight = torch.randn(K, B, NP + T, D, dtype=torch.float64)
    args = (has_prompt_out, 2, weight)
    gold = run_into(ref, prompts, seq, torch.float64, torch.float64, *args)
    plain = run_into(ref, prompts, seq, torch.float32, seq_dtype, *args)
    out = run_into(fused, prompts, seq, torch.float32, seq_dtype, *args)
    assert fused.last_backend == backend and out[0].dtype == seq_dtype
    names = ["seq", "weights", "prompts", "seq grad"] + [n for n, _ in fused.named_parameters()]
    assert_within_the_rule(names, gold, plain, out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "seq_dtype,hidden,separate,pool,has_prompt_out",
    [(torch.bfloat16, H, True, "patches", True), (torch.float32, 0, False, "all", False)],
    ids=["bf16-H24-separate-patches", "fp32-H0-first-layer"],
)
def test_compiled_dispatch_into_matches_concatenating_in_float64(backend, seq_dtype, hidden, separate, pool, has_prompt_out):
    """Under torch.compile a fused backend's dispatch_into is the functional operator
    pmoe_fast::dispatch_into_mlp, whose backward reads the tokens from the sequence it returned:
    its result and gradients must match concatenating with the torch backend, as eagerly."""
    torch.manual_seed(0)
    ref = Dispatcher(D, K, hidden=hidden, separate_mlps=separate, pool=pool, backend="torch")
    fused = Dispatcher(D, K, hidden=hidden, separate_mlps=separate, pool=pool, backend=backend)
    fused.load_state_dict(ref.state_dict())
    prompts, seq, _ = make_inputs()
    seq = seq.to(seq_dtype).double()
    weight = torch.randn(K, B, NP + T, D, dtype=torch.float64)
    gold = run_into(ref, prompts, seq, torch.float64, torch.float64, has_prompt_out, 2, weight)
    plain = run_into(ref, prompts, seq, torch.float32, seq_dtype, has_prompt_out, 2, weight)
    eager = run_into(fused, prompts, seq, torch.float32, seq_dtype, has_prompt_out, 2, weight)  # as a model's first step
    fused.zero_grad()
    p = prompts.float().requires_grad_()
    leaf = seq.to(seq_dtype).requires_grad_()
    torch._dynamo.reset()
    into = torch.compile(lambda p, s: fused.dispatch_into(p, s, has_prompt_out, 2), backend="aot_eager", fullgraph=True)
    out, w = into(p, leaf * 1)
    (out.double() * weight).sum().backward()
    assert fused.last_backend == backend and out.dtype == seq_dtype
    names = ["seq", "weights", "prompts", "seq grad"] + [n for n, _ in fused.named_parameters()]
    compiled = [out, w, p.grad, leaf.grad] + [q.grad for q in fused.parameters()]
    assert_within_the_rule(names, gold, plain, compiled)
    for name, e, c in zip(names, eager, compiled):  # the same kernels on the same values
        if e is not None:
            torch.testing.assert_close(c, e, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("hidden,has_prompt_out", [(H, True), (0, False)], ids=["H24-prompt-out", "H0-first-layer"])
def test_dispatch_into_operator_opcheck(backend, hidden, has_prompt_out):
    """pmoe_fast::dispatch_into_mlp: schema, fake implementation against the real one, autograd
    registration and AOT dispatch."""
    torch.manual_seed(0)
    disp = Dispatcher(D, K, hidden=hidden, separate_mlps=True, backend=backend)
    prompts, seq, _ = make_inputs()
    prompts, seq = prompts.float().requires_grad_(), seq.bfloat16().requires_grad_()
    w1, b1, w2, b2 = (list(group) for group in zip(*disp.source_params()))
    torch.library.opcheck(
        torch.ops.pmoe_fast.dispatch_into_mlp.default,
        (backend, seq, prompts, [0] * K, [T] * K, has_prompt_out, w1, b1, w2, b2),
    )


@pytest.mark.parametrize("has_prompt_out", [True, False], ids=["prompt-out", "first-layer"])
def test_moe_dispatch_into_operator_opcheck(has_prompt_out):
    """pmoe_fast::dispatch_into_moe: schema, fake implementation against the real one, autograd
    registration and AOT dispatch."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    d, np_, t = 16, 2, 5  # opcheck runs the op a dozen times: small, for the interpreter
    disp = Dispatcher(d, K, hidden=8, kind="moe", separate_mlps=True, num_dispatch_experts=3, top_k=2, backend="triton")
    disp = disp.to(device)
    prompts = torch.randn(K, np_, d, device=device, requires_grad=True)
    seq = torch.randn(K, 1, np_ + t, d, device=device, requires_grad=True)
    params = [list(group) for group in zip(*disp.source_params())]
    # opcheck copies the inputs, so shared tensors would arrive as copies: one f per source.
    torch.library.opcheck(
        torch.ops.pmoe_fast.dispatch_into_moe.default,
        (seq, prompts, [0] * K, [t] * K, has_prompt_out, *params, 2, False),
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("has_prompt_out", [True, False], ids=["prompt-out", "first-layer"])
def test_dispatch_into_without_gradients_writes_in_place_too(backend, has_prompt_out):
    """Inference: the slots' Z_P is read where it is and overwritten, nothing kept; the result is
    the differentiable path's, bit for bit (both run the same kernels on the same values)."""
    torch.manual_seed(0)
    disp = Dispatcher(D, K, hidden=H, backend=backend)
    prompts, seq, _ = make_inputs()
    prompts, seq = prompts.float(), seq.float()
    expected, w_expected = disp.dispatch_into(prompts.clone().requires_grad_(), seq.clone(), has_prompt_out, 1)
    with torch.no_grad():
        out, w = disp.dispatch_into(prompts, seq, has_prompt_out, 1)
    assert out is seq and disp.last_backend == backend
    torch.testing.assert_close(out, expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(w, w_expected, rtol=0, atol=0)


@pytest.mark.parametrize("has_prompt_out", [True, False], ids=["prompt-out", "first-layer"])
def test_moe_dispatch_into_writes_in_place_as_concatenating_would(has_prompt_out):
    """Kind "moe" on Triton writes the IPTs into the prompt slots too, and under torch.compile
    returns a new sequence from the functional operator pmoe_fast::dispatch_into_moe. Either way
    the result, the weights, the load-balancing loss and every gradient (through the IPTs and the
    loss, and through the loss alone) are those of concatenating the same backend's forward with
    the tokens, bit for bit (the kernels' parity with float64 is tests/test_triton_dispatch_moe.py's);
    without gradients as well."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    d, np_, t = 16, 2, 5  # five forwards and backwards, and a forward: small, for the interpreter
    disp = Dispatcher(d, K, hidden=8, kind="moe", num_dispatch_experts=3, top_k=2, backend="triton").to(device)
    prompts = torch.randn(K, np_, d, device=device)
    seq = torch.randn(K, B, np_ + t, d, device=device)
    weight = torch.randn(K, B, np_ + t, d, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(lambda p, s: disp.dispatch_into(p, s, has_prompt_out, 2), backend="aot_eager", fullgraph=True)

    def run(how, loss_on_aux_alone=False):
        p, leaf = prompts.clone().requires_grad_(), seq.clone().requires_grad_()
        s = leaf * 1
        disp.zero_grad()
        if how == "into":
            out, w = disp.dispatch_into(p, s, has_prompt_out, 2)
            assert out is s
        elif how == "compiled":
            out, w = compiled(p, s)
        else:
            ipt, w = disp(p, s[:, :, np_:], s[:, :, :np_] if has_prompt_out else None, 2)
            out = torch.cat([ipt, s[:, :, np_:]], dim=2)
        (3.0 * disp.aux_loss + (0 if loss_on_aux_alone else (out * weight).sum())).backward()
        return [out.detach(), w, disp.aux_loss.detach(), p.grad, leaf.grad] + [q.grad for q in disp.parameters()]

    names = ["seq", "weights", "aux_loss", "prompts", "seq grad"] + [n for n, _ in disp.named_parameters()]
    # Each expectation once.
    expected_for = {alone: run("concatenate", alone) for alone in (False, True)}
    for how, loss_on_aux_alone in [("into", False), ("compiled", False), ("compiled", True)]:
        expected, got = expected_for[loss_on_aux_alone], run(how, loss_on_aux_alone)
        for name, e, g in zip(names, expected, got):
            assert (e is None) == (g is None), (how, name)
            if e is not None:
                torch.testing.assert_close(g, e, rtol=0, atol=0, msg=f"{how}, loss on aux alone: {loss_on_aux_alone}, {name}")
    with torch.no_grad():
        s = seq.clone()
        out, w = disp.dispatch_into(prompts, s, has_prompt_out, 2)
    assert out is s and disp.last_backend == "triton"
    torch.testing.assert_close(out, expected_for[False][0], rtol=0, atol=0)
    torch.testing.assert_close(disp.aux_loss, expected_for[False][2], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["moe", "none"])
def test_dispatch_into_other_kinds_concatenate(kind):
    """Backends that do not write in place (here torch, for "moe" on a CPU) concatenate."""
    torch.manual_seed(0)
    disp = Dispatcher(D, K, hidden=H, kind=kind).double()
    prompts, seq, _ = make_inputs()
    out, w = disp.dispatch_into(prompts, seq, True, 1)
    ipt, w_ref = disp(prompts, seq[:, :, NP:], seq[:, :, :NP], 1)
    torch.testing.assert_close(out, torch.cat([ipt, seq[:, :, NP:]], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)


def test_dispatch_into_refuses_what_it_cannot_write_into():
    disp = Dispatcher(D, K, hidden=H).double()
    prompts, seq, _ = make_inputs()
    with pytest.raises(ValueError, match=r"seq must be \(K, B, Np \+ T, D\) with Np = prompts.shape\[1\] = 3 slots"):
        disp.dispatch_into(prompts, seq[:, :, :NP], True)
    with pytest.raises(ValueError, match=r"tokens must be \(K=3, B, T, D=100\)"):
        disp.dispatch_into(prompts, seq[:2], True)
    with pytest.raises(ValueError, match=r"seq is a leaf tensor that requires grad.*seq.clone\(\)"):
        disp.dispatch_into(prompts, seq.requires_grad_(), True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dispatch_into_takes_any_gradient_layout(backend):
    """A loss of .sum() hands backward an expanded gradient (every stride 0)."""
    torch.manual_seed(0)
    ref = Dispatcher(D, K, hidden=H, pool="patches", backend="torch")
    fused = Dispatcher(D, K, hidden=H, pool="patches", backend=backend)
    fused.load_state_dict(ref.state_dict())
    prompts, seq, _ = make_inputs()
    grads = []
    for disp in (ref, fused):
        leaf = seq.float().requires_grad_()
        out, _ = disp.dispatch_into(prompts.float(), leaf * 1, True, 2)
        out.sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every fused path: (backend, kind, device).
FUSED_PATHS = [
    pytest.param("cpp", "mlp", "cpu", id="cpp"),
    pytest.param(
        "cuda", "mlp", "cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    ),
    pytest.param("triton", "mlp", _DEVICE, id="triton"),
    pytest.param("triton", "moe", _DEVICE, id="triton-moe"),
]


@pytest.mark.parametrize("backend, kind, device", FUSED_PATHS)
@pytest.mark.parametrize("into", [False, True], ids=["forward", "dispatch_into"])
def test_fused_backends_refuse_a_second_derivative(backend, kind, device, into):
    """The fused backends' gradients come from kernels that have no derivative of their own. The
    torch backend shows that there is a second derivative to lose; asked for a gradient to
    differentiate (``create_graph=True``), a fused backend must raise rather than drop it."""

    def gradient(backend):
        torch.manual_seed(0)
        disp = Dispatcher(16, 2, hidden=8, kind=kind, backend=backend).to(device)
        prompts = torch.randn(2, 3, 16, device=device, requires_grad=True)
        leaf = torch.randn(2, 2, 3 + 5, 16, device=device, requires_grad=True)
        seq = leaf * 1
        out = disp.dispatch_into(prompts, seq, True)[0] if into else disp(prompts, seq[:, :, 3:], seq[:, :, :3])[0]
        return torch.autograd.grad(out.pow(2).sum(), prompts, create_graph=True)[0], leaf

    grad, leaf = gradient("torch")
    assert torch.autograd.grad(grad.sum(), leaf)[0].abs().max() > 0
    with pytest.raises(RuntimeError, match="no second derivative.*backend='torch'"):
        gradient(backend)
