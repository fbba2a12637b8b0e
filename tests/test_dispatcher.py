"""The Dispatcher module's contract: shapes, input forms, kinds and errors (torch backend)."""

import numpy as np
import pytest
import torch

from pmoe_fast.dispatcher import Dispatcher, top_k_gates

K, B, NP, D, T = 3, 2, 3, 20, 7


def inputs(dtype=torch.float32):
    prompts = torch.randn(K, NP, D, dtype=dtype)
    tokens = torch.randn(K, B, T, D, dtype=dtype)
    prompt_out = torch.randn(K, B, NP, D, dtype=dtype)
    return prompts, tokens, prompt_out


@pytest.mark.parametrize("kind", ["mlp", "moe"])
@pytest.mark.parametrize("separate", [False, True], ids=["shared", "separate"])
def test_stacked_tokens_list_and_strided_view_agree(kind, separate):
    disp = Dispatcher(D, K, hidden=8, kind=kind, separate_mlps=separate, pool="patches", backend="torch")
    prompts, tokens, prompt_out = inputs()
    ipt, w = disp(prompts, tokens, prompt_out, num_prefix_tokens=2)
    assert ipt.shape == (K, B, NP, D) and w.shape == (K, B, NP, K)
    ipt_list, w_list = disp(prompts, list(tokens), prompt_out, num_prefix_tokens=[2, 2, 2])
    torch.testing.assert_close(ipt_list, ipt)
    torch.testing.assert_close(w_list, w)
    # The non-prompt tokens as a strided view of a longer sequence, as a fast model holds them.
    seq = torch.cat([torch.randn(K, B, NP, D), tokens], dim=2)
    ipt_view, _ = disp(prompts, seq[:, :, NP:], prompt_out, num_prefix_tokens=2)
    torch.testing.assert_close(ipt_view, ipt)


def test_weights_are_a_distribution_and_ipt_their_mixture():
    disp = Dispatcher(D, K, hidden=0, backend="torch")
    prompts, tokens, prompt_out = inputs()
    ipt, w = disp(prompts, tokens, prompt_out)
    torch.testing.assert_close(w.sum(-1), torch.ones(K, B, NP))
    torch.testing.assert_close(ipt, torch.einsum("kbnj,jnd->kbnd", w, prompts))


def test_kind_none_returns_each_experts_prompts():
    disp = Dispatcher(D, K, kind="none", backend="torch")
    prompts, tokens, _ = inputs()
    ipt, w = disp(prompts, tokens)
    assert list(disp.parameters()) == []
    torch.testing.assert_close(ipt, prompts.unsqueeze(1).expand(K, B, NP, D))
    torch.testing.assert_close(w, torch.eye(K)[:, None, None].expand(K, B, NP, K))


def test_softmax_is_stable_for_large_logits():
    disp = Dispatcher(D, K, hidden=0, backend="torch")
    with torch.no_grad():
        disp.fc2.weight.mul_(1e4)
    prompts, tokens, prompt_out = inputs()
    ipt, w = disp(prompts, 100 * tokens, 100 * prompt_out)
    assert torch.isfinite(w).all() and torch.isfinite(ipt).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(K, B, NP))


def test_gradients_match_finite_differences_in_float64():
    disp = Dispatcher(D, K, hidden=4, backend="torch").double()
    prompts, tokens, prompt_out = (t.requires_grad_() for t in inputs(torch.float64))
    assert torch.autograd.gradcheck(lambda p, z, zp: disp(p, z, zp, 1)[0], (prompts, tokens, prompt_out))


def test_numpy_prefix_count_is_one_int_for_every_expert():
    disp = Dispatcher(D, K, hidden=4, backend="torch")
    prompts, tokens, prompt_out = inputs()
    ipt, _ = disp(prompts, tokens, prompt_out, np.int64(1))
    torch.testing.assert_close(ipt, disp(prompts, tokens, prompt_out, 1)[0], rtol=0, atol=0)


def test_top_k_gates_break_ties_to_the_lower_index():
    gates = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 0.0, 1.0], [0.3, 0.2, 0.3, 0.2]])
    top, chosen = top_k_gates(gates, 2)
    assert chosen.tolist() == [[0, 1], [3, 0], [0, 2]]
    assert torch.equal(top, gates.gather(1, chosen))


def test_moe_aux_loss_counts_in_float32_for_half_parameters():
    """70000 rows routed mostly to one MLP: the count overflowed float16 (aux_loss was inf)."""
    disp = Dispatcher(4, 1, hidden=0, kind="moe", num_dispatch_experts=2, backend="torch")
    with torch.no_grad():
        disp.router.bias.copy_(torch.tensor([4.0, -4.0]))
    prompts, tokens = torch.randn(1, 1, 4), 0.1 * torch.randn(1, 1, 70000, 4)
    disp(prompts, tokens)
    full = disp.aux_loss
    disp.half()(prompts.half(), tokens.half())
    assert disp.aux_loss.dtype == torch.float32
    torch.testing.assert_close(disp.aux_loss, full, rtol=1e-3, atol=0)


def test_float32_dispatch_of_half_tokens_keeps_prompt_dtype():
    disp = Dispatcher(D, K, hidden=4, backend="torch")
    prompts, tokens, prompt_out = inputs()
    ipt, w = disp(prompts.half(), tokens.half(), prompt_out.half())
    assert ipt.dtype == torch.float16 and w.dtype == torch.float32


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda d, p, z, zp: d(p[:2], z, zp), r"prompts must be \(K=3, Np, D=20\)"),
        (lambda d, p, z, zp: d(p, z[..., :5], zp), r"tokens must be \(K=3, B, T, D=20\)"),
        (lambda d, p, z, zp: d(p, list(z)[:2], zp), "one tensor per expert"),
        (lambda d, p, z, zp: d(p, [z[0], z[1][:1], z[2]], zp), r"tokens\[1\] must be \(B=2"),
        (lambda d, p, z, zp: d(p, z, zp[:, :, :2]), r"prompt_out must be None or a tensor \(K=3, B=2, Np=3, D=20\)"),
        (lambda d, p, z, zp: d(p, z, list(zp)), r"prompt_out must be None or a tensor .*, got list"),
        # meta stands in for a second device
        (lambda d, p, z, zp: d(p, z.to("meta"), zp), "one device, got prompts on cpu, tokens on meta"),
        (lambda d, p, z, zp: d(p, [z[0], z[1].to("meta"), z[2]], zp), "one device, got prompts on cpu, tokens on cpu, meta"),
        (lambda d, p, z, zp: d(p, z, zp.to("meta")), "prompt_out on meta"),
        (lambda d, p, z, zp: d.to("meta")(p, z, zp), "the dispatcher's parameters on meta"),
        (lambda d, p, z, zp: d(p, z, zp, [1, 1]), "one int or K=3 ints"),
        (lambda d, p, z, zp: d(p, z, zp, T), "leaves no tokens"),
        (lambda d, p, z, zp: d(p, z, zp, -1), "num_prefix_tokens must be an int >= 0, got -1"),
        (lambda d, p, z, zp: d(p, z, zp, True), "num_prefix_tokens must be an int >= 0, got True"),
        (lambda d, p, z, zp: d(p[:, :0], z, None), r"at least one prompt token \(Np >= 1\)"),
        (lambda d, p, z, zp: d(p, z[:, :0], None), r"at least one image \(B >= 1\)"),
        (lambda d, p, z, zp: d(p, z.long(), zp), "tokens must be floating point, got torch.int64"),
        (lambda d, p, z, zp: d(p, [z[0], z[1].int(), z[2]], zp), r"tokens\[1\] must be floating point"),
        (lambda d, p, z, zp: d(p.long(), z, zp), "prompts must be floating point"),
    ],
    ids=["prompts", "tokens-width", "tokens-count", "tokens-batch", "prompt-out", "prompt-out-list", "tokens-device",
         "token-list-device", "prompt-out-device", "parameters-device", "prefix-count", "prefix-too-long",
         "prefix-negative", "prefix-bool", "no-prompts", "no-images", "tokens-dtype", "token-list-dtype", "prompts-dtype"],
)
def test_bad_inputs_raise_clear_errors(call, match):
    disp = Dispatcher(D, K, hidden=4, backend="torch")
    with pytest.raises(ValueError, match=match):
        call(disp, *inputs())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kind="attention"), "unknown dispatcher kind"),
        (dict(pool="cls"), "unknown dispatch pool"),
        (dict(backend="cudnn"), "unknown dispatcher backend"),
        (dict(hidden=-1), "hidden must be >= 0"),
        (dict(kind="moe", num_dispatch_experts=2, top_k=3), "top_k"),
        (dict(kind="moe", num_dispatch_experts=0), r"num_dispatch_experts \(M, the MoE's MLPs\) must be >= 1, got 0"),
    ],
    ids=["kind", "pool", "backend", "hidden", "top-k", "no-mlps"],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Dispatcher(D, K, **kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(separate_mlps="no"), "separate_mlps must be True or False, got 'no'"),
        (dict(hidden=64.0), "hidden must be an int, got 64.0"),
        (dict(top_k=True), "top_k must be an int, got True"),
    ],
    ids=["separate-str", "hidden-float", "top-k-bool"],
)
def test_arguments_of_the_wrong_type_raise(kwargs, match):
    """A string flag such as "no" would pass as true; a float width would fail deep in nn.Linear."""
    with pytest.raises(TypeError, match=match):
        Dispatcher(D, K, **kwargs)
