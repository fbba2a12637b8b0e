"""The reference pMoE pinned to SPEC.md: each test recomputes one part of the contract on its own."""

import pytest
import torch
import torch.nn.functional as F
from helpers import IMG, small_vit, spec_dispatch, spec_forward

from pmoe_fast import PMoE as FastPMoE
from pmoe_fast.reference import PMoE


def images(batch=2):
    return torch.randn(batch, 3, IMG, IMG)


def mixed_experts(dim=48):
    """K = 3: a /16 expert, a /14 DINOv2-style expert with 4 registers, a CLIP-style avg-pool one."""
    return [small_vit("p16", dim=dim), small_vit("p14reg", dim=dim), small_vit("clip", dim=dim)]


@pytest.mark.parametrize(
    "hidden,pool,prompt_layers",
    [(16, "all", "deep"), (0, "patches", 2), (16, "patches", "shallow")],
    ids=["H16-all-deep", "H0-patches-Lp2", "H16-patches-shallow"],
)
def test_matches_spec_rederivation(hidden, pool, prompt_layers):
    """D = 48, Np = 3, K = 3 with a /14 expert beside /16 ones, against tests/helpers.spec_forward."""
    experts = mixed_experts()
    model = PMoE(experts, num_classes=4, num_prompts=3, prompt_layers=prompt_layers,
                 dispatcher_hidden=hidden, dispatch_pool=pool)
    x = images()
    expected = spec_forward(experts, model.state_dict(), x, 3, model.prompt_layers, hidden > 0, pool)
    torch.testing.assert_close(model.forward_features(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x), model.head(expected), rtol=1e-5, atol=1e-5)


def test_k1_without_dispatcher_is_vpt_deep():
    """K = 1, dispatcher "none": VPT-deep written out from the expert's own modules."""
    vit = small_vit("p16")
    model = PMoE([vit], num_classes=3, num_prompts=4, dispatcher="none")
    x = images()
    P = model.prompts[:, 0]  # (L, Np, D)
    z = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    for l, block in enumerate(vit.blocks):
        z = block(torch.cat([z[:, :1], P[l].expand(2, -1, -1), z[:, 1:]], 1))
        z = torch.cat([z[:, :1], z[:, 5:]], 1)  # VPT-deep discards the prompt outputs
    torch.testing.assert_close(model(x), model.head(vit.forward_head(vit.norm(z), pre_logits=True)))
    assert all(torch.equal(w, torch.ones_like(w)) for w in model.last_dispatch_weights)


def test_dispatch_weights_rows_sum_to_one_and_are_exposed():
    model = PMoE(mixed_experts(), num_classes=4, num_prompts=3, prompt_layers=2)
    model(images(3))
    assert len(model.last_dispatch_weights) == 2
    for w in model.last_dispatch_weights:
        assert w.shape == (3, 3, 3, 3) and not w.requires_grad
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 3, 3))
        assert (w > 0).all()


def test_layer0_has_no_prompt_output_term():
    """At layer 0 the dispatcher sees only P and Z: changing the p-source MLP changes nothing there."""
    model = PMoE(mixed_experts(), num_classes=4, num_prompts=3, prompt_layers=2, separate_mlps=True)
    x = images()
    model(x)
    w0, w1 = model.last_dispatch_weights
    with torch.no_grad():
        model.dispatchers[0].p.fc2.bias.add_(5.0 * torch.randn(3))
        model.dispatchers[1].p.fc2.bias.add_(5.0 * torch.randn(3))
    model(x)
    assert torch.equal(model.last_dispatch_weights[0], w0)
    assert not torch.allclose(model.last_dispatch_weights[1], w1)


def test_dispatcher_output_matches_formula_from_state_dict():
    model = PMoE(mixed_experts(), num_classes=4, num_prompts=3, prompt_layers=2, dispatcher_hidden=8)
    sd = model.state_dict()
    B, D = 2, 48
    P = sd["prompts"][1]
    Z_P = torch.randn(3, B, 3, D)
    Z = [torch.randn(B, T, D) for T in (50, 69, 50)]
    ipt, w = model.dispatchers[1](P, Z, Z_P, [1, 5, 1])
    ipt_ref, w_ref = spec_dispatch(sd, "dispatchers.1.", P, Z_P, Z, [0, 0, 0], hidden=True)
    torch.testing.assert_close(w, w_ref)
    torch.testing.assert_close(ipt, ipt_ref)


def test_blocks_past_prompt_layers_carry_prompt_outputs():
    """With Lp = 1, block 1 sees block 0's prompt outputs: VPT-shallow, written out here."""
    vit = small_vit("p16", depth=2)
    model = PMoE([vit], num_classes=3, num_prompts=2, prompt_layers="shallow", dispatcher="none")
    x = images()
    z = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    z = torch.cat([z[:, :1], model.prompts[0, 0].expand(2, -1, -1), z[:, 1:]], 1)
    z = vit.blocks[1](vit.blocks[0](z))  # prompts stay in the sequence between blocks
    expected = vit.forward_head(vit.norm(torch.cat([z[:, :1], z[:, 3:]], 1)), pre_logits=True)
    torch.testing.assert_close(model.forward_features(x), expected)


def test_only_trainable_parameters_get_gradients_and_experts_stay_bit_identical():
    experts = mixed_experts()
    model = PMoE(experts, num_classes=4, num_prompts=3, dispatcher="moe", separate_mlps=True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("experts.")}
    trainable = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=1e-5)
    model.train()
    loss = model(images()).logsumexp(-1).mean() + 0.01 * model.last_aux_loss
    loss.backward()
    opt.step()
    for name, p in trainable.items():
        if name.startswith("experts."):
            assert not p.requires_grad and p.grad is None, name
        elif name.startswith("dispatchers.0.p."):
            assert p.grad is None, name  # layer 0 has no prompt outputs to route
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for k, v in model.state_dict().items():
        if k.startswith("experts."):
            assert torch.equal(v, frozen[k]), k
    assert all(not m.training for m in model.experts.modules())
    assert {n for n, _ in model.named_parameters() if not n.startswith("experts.")} == {
        n for n, p in trainable.items() if p.requires_grad
    }


def test_state_dict_names_follow_spec():
    model = PMoE(mixed_experts(), num_classes=4, num_prompts=3, prompt_layers=2, dispatcher_hidden=8)
    sd = model.state_dict()
    assert sd["prompts"].shape == (2, 3, 3, 48)
    assert sd["dispatchers.0.fc1.weight"].shape == (8, 48) and sd["dispatchers.1.fc2.weight"].shape == (3, 8)
    assert sd["head.weight"].shape == (4, 48)
    assert "experts.1.reg_token" in sd and "experts.0.blocks.2.attn.qkv.weight" in sd
    moe = PMoE(mixed_experts(), num_classes=4, num_prompts=3, prompt_layers=1, dispatcher="moe",
               num_dispatch_experts=5, dispatcher_hidden=8).state_dict()
    assert moe["dispatchers.0.router.weight"].shape == (5, 48)
    assert moe["dispatchers.0.experts.fc1_weight"].shape == (5, 8, 48)
    assert moe["dispatchers.0.experts.fc2_weight"].shape == (5, 3, 8)


def test_prompt_init_is_vpt_uniform_per_patch_size():
    model = PMoE([small_vit("p16", dim=48), small_vit("p14reg", dim=48)], num_classes=2, num_prompts=50)
    for k, patch in enumerate((16, 14)):
        v = (6.0 / (3 * patch**2 + 48)) ** 0.5
        p = model.prompts[:, k]
        assert p.abs().max() <= v and p.abs().max() > 0.9 * v


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_routing_picks_top_k_of_router(top_k):
    model = PMoE([small_vit("p16")], num_classes=2, num_prompts=3, dispatcher="moe",
                 num_dispatch_experts=4, top_k=top_k, dispatcher_hidden=8)
    disp = model.dispatchers[0]
    x = torch.randn(7, 48)
    gates = torch.softmax(F.linear(x, disp.router.weight, disp.router.bias), -1)
    outs = disp.experts(x)  # (R, M, K), every MLP
    expected = torch.zeros(7, 1)
    for r in range(7):
        for m in gates[r].argsort(descending=True)[:top_k]:
            expected[r] += gates[r, m] * outs[r, m]
    torch.testing.assert_close(disp._f("e", x, {}), expected)


def test_moe_aux_loss_is_switch_form():
    model = PMoE([small_vit("p16"), small_vit("p16")], num_classes=2, num_prompts=3, prompt_layers=2,
                 dispatcher="moe", num_dispatch_experts=3)
    model(images())
    assert model.last_aux_loss.shape == () and model.last_aux_loss.requires_grad
    assert model.last_aux_loss >= 1.0 - 1e-6  # M * sum f_m p_m is minimised (1) by uniform routing
    with torch.no_grad():
        for d in model.dispatchers:
            d.router.bias.copy_(torch.tensor([50.0, 0.0, 0.0]))  # everything to MLP 0
    model(images())
    torch.testing.assert_close(model.last_aux_loss, torch.tensor(3.0), rtol=1e-4, atol=1e-4)


def test_gapt_gates_and_temperatures():
    vit = small_vit("p16", depth=3)
    model = PMoE([vit], num_classes=3, num_prompts=2, base="gapt", dispatcher="none")
    assert model.prompt_layers == 1 and model.gates.shape == (2,) and model.temperatures.shape == (3,)
    torch.testing.assert_close(torch.sigmoid(model.gates), torch.full((2,), torch.sigmoid(torch.tensor(-5.0)).item()))
    with torch.no_grad():
        model.gates.copy_(torch.tensor([0.3, -1.0]))
        model.temperatures.copy_(torch.tensor([0.5, 2.0, 20.0]))  # 20 clamps to 10
    x = images()
    z = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    entering = model.prompts[0, 0].expand(2, -1, -1)
    for l, block in enumerate(vit.blocks):
        tau = min(model.temperatures[l].item(), 10.0)
        seq = torch.cat([z[:, :1], entering, z[:, 1:]], 1)
        q, k, v = block.attn.qkv(block.norm1(seq)).reshape(2, -1, 3, 3, 16).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * 16**-0.5 / tau, -1)  # logits / temperature
        h = seq + block.attn.proj((attn @ v).transpose(1, 2).reshape(2, -1, 48))
        h = h + block.mlp(block.norm2(h))
        if l < 2:
            g = torch.sigmoid(model.gates[l])
            entering = g * h[:, 1:3] + (1 - g) * entering
        z = torch.cat([h[:, :1], h[:, 3:]], 1)
    torch.testing.assert_close(model.forward_features(x), vit.forward_head(vit.norm(z), pre_logits=True))


def test_experts_stay_in_eval_mode():
    model = PMoE([small_vit("p16", drop_rate=0.5, attn_drop_rate=0.5)], num_classes=2, num_prompts=2)
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.experts.modules())
    x = images()
    torch.testing.assert_close(model(x), model(x))  # no dropout in the frozen experts


@pytest.mark.parametrize("model_class", [PMoE, FastPMoE], ids=["reference", "fast"])
def test_experts_put_back_in_train_mode_are_refused(model_class):
    """The fast model's blocks skip dropout and drop-path (the batched ones all of it), where the
    reference's would draw them: an expert put back in train mode is refused by both."""
    model = model_class([small_vit("p16", drop_path_rate=0.5), small_vit("p16")], num_classes=2, num_prompts=2)
    model.experts[0].blocks[1].train()
    with pytest.raises(ValueError, match=r"expert 0's blocks\.1\.drop_path1 \(DropPath\) is in train mode"):
        model(images())
    model.experts.eval()
    model(images())


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: PMoE([], num_classes=2), "at least one expert"),
        (lambda: PMoE([small_vit("p16", dim=48), small_vit("p16", dim=96)], num_classes=2), "same width"),
        (lambda: PMoE([small_vit("p16", depth=2), small_vit("p16", depth=3)], num_classes=2), "same width D and depth"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, num_prompts=0), "num_prompts"),
        (lambda: PMoE([small_vit("p16", depth=3)], num_classes=2, prompt_layers=4), r"prompt_layers=4 must be in \[1, depth=3\]"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, prompt_layers=0), "prompt_layers=0"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, dispatcher="softmax"), "unknown dispatcher kind"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, dispatch_pool="cls"), "unknown dispatch pool"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, base="lspt"), "LSPT"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, base="gapt", prompt_layers="deep"), "shallow"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, gate_layers=2), "GaPT option"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, dispatcher="moe", num_dispatch_experts=2, top_k=3), "top_k"),
        (lambda: PMoE([torch.nn.Linear(3, 3)], num_classes=2), "not a ViT"),
        (lambda: PMoE([small_vit("p16"), small_vit("p16", img_size=64)], num_classes=2), "same images"),
        (lambda: PMoE([small_vit("p16"), small_vit("p16").bfloat16()], num_classes=2),
         "one floating dtype, got expert 0: torch.float32, expert 1: torch.bfloat16"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, separate_mlps="no"), "separate_mlps must be True or False"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, num_prompts=2.5), "num_prompts must be an int, got 2.5"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, dispatcher_hidden="64"), "dispatcher_hidden must be an int"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, base="gapt", gate_init="five"), "gate_init must be a finite number"),
        (lambda: PMoE([small_vit("p16")], num_classes=2, base="gapt", gate_init=float("nan")), "gate_init must be a finite number, got nan"),
        (lambda: PMoE(small_vit("p16"), num_classes=2), r"got one VisionTransformer: pass \[expert\]"),
        (lambda: PMoE([small_vit("p16"), small_vit("p16").to("meta")], num_classes=2),
         "all experts must be on one device, got expert 0: cpu, expert 1: meta"),
    ],
    ids=["K0", "width", "depth", "Np0", "Lp-too-deep", "Lp0", "dispatcher-name", "pool-name", "lspt",
         "gapt-deep", "gate-without-gapt", "top-k", "not-a-vit", "image-size", "expert-dtypes",
         "separate-str", "Np-float", "hidden-str", "gate-init-str", "gate-init-nan", "one-expert-not-a-list", "expert-devices"],
)
def test_bad_configs_raise_clear_errors(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(2, 3, 96, 96), r"shape \(B, 3, 112, 112\)"),
        (torch.randn(2, 1, IMG, IMG), r"shape \(B, 3, 112, 112\)"),
        (torch.randint(0, 255, (2, 3, IMG, IMG), dtype=torch.uint8), "floating point"),
        (torch.randn(3, IMG, IMG), "4-D"),
        (torch.randn(0, 3, IMG, IMG), "no image"),
    ],
    ids=["size", "channels", "integer", "3d", "empty"],
)
def test_bad_images_raise_clear_errors(x, match):
    model = PMoE([small_vit("p16"), small_vit("p14reg")], num_classes=2, num_prompts=2)
    with pytest.raises(ValueError, match=match):
        model(x)


def test_experts_on_another_device_than_the_model_are_named():
    """Experts moved to a device after (or before) the model was built, the prompts left behind:
    the error names both devices and model.to, not a move of the images."""
    model = PMoE([small_vit("p16", depth=1)], num_classes=2, num_prompts=2)
    model.experts.to("meta")
    with pytest.raises(ValueError, match=r"the experts are on meta but the prompts, dispatchers and head on cpu: .*model.to\('meta'\)"):
        model(images())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=["fp64", "fp16", "bf16"])
def test_images_of_any_floating_dtype_enter_in_the_experts_dtype(dtype):
    """Floating images are converted to the experts' dtype where they enter, as the fast model
    does: the result is that of the converted images, and float64 experts take float32 images."""
    model = PMoE([small_vit("p16", depth=1)], num_classes=2, num_prompts=2, dispatcher_hidden=4)
    x = images().to(dtype)
    assert model(x).dtype == torch.float32
    torch.testing.assert_close(model(x), model(x.float()), rtol=0, atol=0)
    model.double()
    torch.testing.assert_close(model(x.float()), model(x.double()), rtol=0, atol=0)


def test_bfloat16_experts_feed_a_float32_head():
    """Experts converted to bfloat16 (prompts, dispatchers and head stay float32): the pooled
    features enter the head in its dtype, and the logits stay near the float32 model's."""
    torch.manual_seed(0)
    experts = [small_vit("p16", depth=2) for _ in range(2)]
    model = PMoE(experts, num_classes=3, num_prompts=2, dispatcher_hidden=4)
    x = images()
    expected = model(x)
    for expert in model.experts:
        expert.to(torch.bfloat16)
    got = model(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
