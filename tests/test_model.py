"""The fast pmoe_fast.PMoE against the reference: every execution path that runs on this machine,
after a strict state_dict load; outputs and the gradient of every trainable parameter.

Tolerance (STYLE.md): the reference computed in float64 is the truth; the fast model in float32
may be off by at most twice what the reference itself is off in float32, plus a small floor."""

import pytest
import torch
from helpers import IMG, OwnBlock, OwnLinear, small_vit

from pmoe_fast import PMoE
from pmoe_fast.reference import PMoE as Reference

CONFIG = dict(num_classes=4, num_prompts=3, dispatcher_hidden=8)
FUSED_CPU_BACKENDS = ["cpp", "triton"] if not torch.cuda.is_available() else ["cpp"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def same_arch(k=3, **kwargs):
    return [small_vit("p16", **kwargs) for _ in range(k)]


def mixed():
    """A /16 expert, a /14 DINOv2-style expert with 4 registers, a CLIP-style avg-pool expert."""
    return [small_vit("p16"), small_vit("p14reg"), small_vit("clip")]


def outputs_and_grads(model, x):
    model.zero_grad()
    logits = model(x)
    loss = (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype, device=logits.device)).sum()
    if model.last_aux_loss is not None:
        loss = loss + model.last_aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_matches_reference(experts, config=CONFIG, batch=2, device="cpu", **options):
    torch.manual_seed(1)
    experts = [e.to(device) for e in experts]
    ref = Reference(experts, **config).to(device)
    fast = PMoE(experts, **config, **options).to(device)
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(batch, 3, IMG, IMG, device=device)
    got, got_grads = outputs_and_grads(fast, x)
    plain, plain_grads = outputs_and_grads(ref, x)
    gold, gold_grads = outputs_and_grads(ref.double(), x.double())
    ref.float()
    assert set(got_grads) == set(gold_grads)
    # On a GPU the fused dispatchers sum in other orders than cuBLAS (and Triton's fp32 dots are
    # tf32x3): the floor is 1e-5 relative there, 1e-6 on a CPU.
    floor = 1e-5 if x.is_cuda else 1e-6
    for name, g, p, o in [("logits", gold, plain, got)] + [
        (n, gold_grads[n], plain_grads[n], got_grads[n]) for n in gold_grads
    ]:
        err_plain = (p.double() - g).abs().max().item()
        err = (o.double() - g).abs().max().item()
        assert err <= 2 * err_plain + floor * g.abs().max().item() + 1e-10, f"{name}: {err:.3g} vs reference fp32 {err_plain:.3g}"
    return fast


@pytest.mark.parametrize("execution", ["batched", "sequential", "streams"])
@pytest.mark.parametrize("checkpoint", [0, 1, 2], ids=["no-ckpt", "ckpt1", "ckpt2"])
def test_execution_paths_match_reference(execution, checkpoint):
    fast = assert_matches_reference(same_arch(), execution=execution, checkpoint=checkpoint)
    assert fast.execution_plan()["execution_last_run"] == execution


def test_batched_dinov2_style_experts_with_layer_scale_and_registers():
    fast = assert_matches_reference(
        [small_vit("p14reg"), small_vit("p14reg")], config=dict(CONFIG, dispatch_pool="patches"), execution="batched"
    )
    assert fast.execution_plan()["execution_last_run"] == "batched"


@pytest.mark.parametrize("backend", ["torch"] + FUSED_CPU_BACKENDS)
@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_dispatcher_backends_inside_the_model(backend, execution):
    fast = assert_matches_reference(same_arch(), execution=execution, dispatcher_backend=backend)
    assert fast.execution_plan()["dispatcher_backend_last_run"] == backend


@pytest.mark.parametrize("backend", FUSED_CPU_BACKENDS)
@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_batched_fused_dispatchers_write_into_the_sequences(backend, execution, monkeypatch):
    """Batched, a fused dispatcher writes each prompt layer's IPTs into the experts' sequences in
    place rather than concatenating new ones; per expert, the sequences are separate tensors."""
    from pmoe_fast import dispatcher

    calls = []
    apply = dispatcher._DispatchInto.apply
    monkeypatch.setattr(dispatcher._DispatchInto, "apply", lambda *args: calls.append(args[1]) or apply(*args))
    experts = same_arch()
    assert_matches_reference(experts, execution=execution, dispatcher_backend=backend)
    assert len(calls) == (len(experts[0].blocks) if execution == "batched" else 0)  # a prompt layer per block


@pytest.mark.skipif("triton" not in FUSED_CPU_BACKENDS, reason="Triton takes CPU tensors under its interpreter only")
@pytest.mark.parametrize("checkpoint", [0, 1], ids=["no-ckpt", "ckpt1"])
@pytest.mark.parametrize("kind", ["p16", "p14reg"], ids=["vit", "layer-scale-registers"])
def test_batched_triton_layer_norm_matches_reference(kind, checkpoint):
    """layer_norm="triton": the batched blocks' LayerNorms in one kernel each way (here under the
    interpreter, so two blocks: the first and one after a prompt layer), outputs and every
    gradient as the reference's; "auto" on a CPU runs torch."""
    config = dict(CONFIG, dispatch_pool="patches") if kind == "p14reg" else CONFIG
    experts = [small_vit(kind, depth=2), small_vit(kind, depth=2)]
    fast = assert_matches_reference(experts, config=config, execution="batched", layer_norm="triton", checkpoint=checkpoint)
    assert fast.execution_plan()["layer_norm_last_run"] == "triton"
    auto = PMoE(same_arch(), **CONFIG, execution="batched")
    auto(torch.randn(1, 3, IMG, IMG))
    assert auto.execution_plan()["layer_norm"] == "auto" and auto.execution_plan()["layer_norm_last_run"] == "torch"


@needs_cuda
def test_auto_layer_norm_on_cuda_takes_triton_from_its_row_threshold(monkeypatch):
    """On CUDA "auto" takes the Triton LayerNorm from TRITON_LAYER_NORM_MIN_ROWS rows per expert
    (B x tokens) and the composite below (the host-bound B = 1 forward), matching the reference
    both ways."""
    from pmoe_fast import model as fast_model

    experts = same_arch()
    tokens = experts[0].patch_embed.num_patches + 1 + CONFIG["num_prompts"]
    monkeypatch.setattr(fast_model, "TRITON_LAYER_NORM_MIN_ROWS", 2 * tokens)
    for batch, want in ((1, "torch"), (2, "triton")):
        fast = assert_matches_reference(experts, batch=batch, device="cuda", execution="batched")
        assert fast.execution_plan()["layer_norm_last_run"] == want


def test_triton_layer_norm_that_cannot_serve_says_why():
    fast = PMoE(same_arch(), **CONFIG, execution="batched", layer_norm="triton").double()
    with pytest.raises(RuntimeError, match="layer_norm='triton' cannot serve: .*x is torch.float64"):
        fast(torch.randn(1, 3, IMG, IMG, dtype=torch.float64))


@pytest.mark.skipif("triton" not in FUSED_CPU_BACKENDS, reason="Triton takes CPU tensors under its interpreter only")
def test_batched_moe_dispatcher_writes_into_the_sequences(monkeypatch):
    """Kind "moe" on Triton writes the IPTs in place too (its load-balancing loss differentiable
    beside them), and the model, checkpointed, matches the reference."""
    from pmoe_fast import dispatcher

    calls = []
    apply = dispatcher._DispatchIntoMoE.apply
    monkeypatch.setattr(dispatcher._DispatchIntoMoE, "apply", lambda *args: calls.append(args[0]) or apply(*args))
    experts = same_arch(2)
    config = dict(CONFIG, dispatcher="moe", separate_mlps=True, top_k=2)
    assert_matches_reference(experts, config=config, execution="batched", dispatcher_backend="triton", checkpoint=1)
    assert len(calls) >= len(experts[0].blocks)  # every prompt layer's forward, then the recomputed ones


@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_attention_backends(attention):
    assert_matches_reference(same_arch(), attention=attention)


@pytest.mark.parametrize("checkpoint", [0, 1])
def test_mixed_patch_sizes_and_prefix_tokens(checkpoint):
    fast = assert_matches_reference(mixed(), checkpoint=checkpoint)
    plan = fast.execution_plan()
    assert plan["execution_on_cuda"] == "streams" and "differ in architecture" in plan["why"]
    assert plan["execution_last_run"] == "sequential"


@pytest.mark.parametrize(
    "config",
    [
        dict(CONFIG, base="gapt"),
        dict(CONFIG, dispatcher="moe", separate_mlps=True, top_k=2),
        dict(CONFIG, dispatcher="none", prompt_layers=2),
        dict(CONFIG, dispatcher_hidden=0, dispatch_pool="patches", prompt_layers="shallow"),
    ],
    ids=["gapt", "moe-separate", "no-dispatcher", "H0-patches-shallow"],
)
@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_model_options(config, execution):
    assert_matches_reference(same_arch(2), config=config, execution=execution, checkpoint=1)


def test_single_expert_batch_of_one():
    fast = assert_matches_reference(same_arch(1), batch=1)
    assert fast.execution_plan()["execution_on_cuda"] == "streams" and "one expert" in fast.execution_plan()["why"]


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_last_block_runs_for_the_class_token_when_pooling_reads_only_that(execution):
    """Class-token experts run their last block for that token alone, avg-pool experts for every
    token; the results match the reference either way (and for a mix: test_mixed_patch_sizes...)."""
    fast = assert_matches_reference(same_arch(2), execution=execution)
    assert fast.execution_plan()["last_block"] == "expert 0: class token only; expert 1: class token only"
    fast = assert_matches_reference([small_vit("clip"), small_vit("clip")], execution=execution)
    assert "expert 0: every token (its pooling reads them all)" in fast.execution_plan()["last_block"]
    plan = PMoE(mixed(), **CONFIG).execution_plan()["last_block"]
    assert plan.startswith("expert 0: class token only; expert 1: class token only; expert 2: every token")


def test_auto_execution_by_device():
    plan = PMoE(same_arch(), **CONFIG).execution_plan()
    assert (plan["execution_on_cuda"], plan["execution_on_cpu"]) == ("batched", "sequential")


def test_state_dict_moves_both_ways():
    ref = Reference(same_arch(), **CONFIG)
    fast = PMoE(same_arch(), **CONFIG)
    fast.load_state_dict(ref.state_dict(), strict=True)
    ref2 = Reference(same_arch(), **CONFIG)
    ref2.load_state_dict(fast.state_dict(), strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(ref2(x), ref(x))
    assert fast.state_dict().keys() == ref.state_dict().keys()


def test_batched_experts_share_one_copy_of_their_weights():
    fast = PMoE(same_arch(), **CONFIG, execution="batched")
    stack = fast.get_buffer("_stacked_1_attn_qkv_weight")
    for k in range(3):
        p = fast.experts[k].blocks[1].attn.qkv.weight
        assert p.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()
        assert torch.equal(p, stack[k])
    fast.double()  # conversions keep the experts tied to the converted stacks
    stack = fast.get_buffer("_stacked_1_attn_qkv_weight")
    assert stack.dtype == torch.float64
    assert fast.experts[2].blocks[1].attn.qkv.weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()


def test_batched_experts_run_the_weights_an_assigning_load_brings():
    """load_state_dict(assign=True) puts the state dict's tensors in place of the experts'
    parameters; the batched path must run them, still from one copy."""
    ref = Reference(same_arch(), **CONFIG)
    fast = PMoE(same_arch(), **CONFIG, execution="batched")
    fast.load_state_dict(ref.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x))
    stack = fast.get_buffer("_stacked_1_attn_qkv_weight")
    assert fast.experts[2].blocks[1].attn.qkv.weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()


@pytest.mark.parametrize("how", ["new-parameter", "new-data", "new-module", "new-eps"])
def test_batched_experts_run_what_replaced_the_old(how):
    """A parameter replaced rather than changed in place, a block module replaced (by one of the
    same shape) or a norm's eps changed after the model was built: the batched path made its
    stacks and blocks from the old ones, and the next forward must find the change and run the
    new ones, still from one copy of the weights."""
    ref = Reference(same_arch(), **CONFIG)
    fast = PMoE(same_arch(), **CONFIG, execution="batched")
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        fast(x)
        for model in (ref, fast):
            torch.manual_seed(3)
            block = model.experts[1].blocks[2]
            if how == "new-parameter":
                block.mlp.fc1.weight = torch.nn.Parameter(torch.randn_like(block.mlp.fc1.weight), requires_grad=False)
            elif how == "new-data":
                block.mlp.fc1.weight.data = torch.randn_like(block.mlp.fc1.weight)
            elif how == "new-module":
                block.attn.qkv = torch.nn.Linear(block.attn.qkv.in_features, block.attn.qkv.out_features).requires_grad_(False)
            else:
                for expert in model.experts:
                    expert.blocks[1].norm2.eps = 0.25
        torch.testing.assert_close(fast(x), ref(x))
    stack = fast.get_buffer("_stacked_2_mlp_fc1_weight")
    assert fast.experts[1].blocks[2].mlp.fc1.weight.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr()


def test_blocks_changed_so_they_cannot_batch_any_more():
    """One expert's activation replaced by another kind: the blocks no longer share one
    architecture. "batched" raises and names it; "auto" runs the experts on streams from then on."""
    x = torch.randn(2, 3, IMG, IMG)
    for execution in ("batched", "auto"):
        fast = PMoE(same_arch(), **CONFIG, execution=execution)
        fast.experts[1].blocks[0].mlp.act = torch.nn.ReLU()
        if execution == "batched":
            with pytest.raises(ValueError, match="cannot serve these experts since their blocks changed"):
                fast(x)
        else:
            fast._restack_if_untied()  # what a forward on a GPU does first
            assert fast.execution_for("cuda") == "streams"
            assert "activations" in fast.execution_plan()["why"]


@pytest.mark.parametrize("part", ["block", "qkv"])
def test_a_block_that_computes_its_own_forward_swapped_in_after_building_is_refused(part):
    """Every execution runs a block part by part with its own attention kernel: a block (or
    qkv) with its own forward, put in after the model was built, was silently skipped per expert."""
    x = torch.randn(1, 3, IMG, IMG)
    for execution in ("sequential", "streams", "batched"):
        fast = PMoE(same_arch(), **CONFIG, execution=execution)
        old = fast.experts[1].blocks[1]
        if part == "block":
            new = OwnBlock(old.attn.qkv.in_features, old.attn.num_heads, qkv_bias=True).eval().requires_grad_(False)
            new.load_state_dict(old.state_dict())
            fast.experts[1].blocks[1] = new
        else:
            old.attn.qkv = OwnLinear(old.attn.qkv.in_features, old.attn.qkv.out_features).requires_grad_(False)
        match = "OwnBlock has its own forward" if part == "block" else "qkv is a OwnLinear, not a Linear"
        with pytest.raises((TypeError, ValueError), match=match):
            fast(x)


def test_a_replaced_expert_is_refused():
    """model.experts[k] = another module after the model was built: the model set the old one up
    (frozen, wrapped, pooled); both models refuse to run rather than run the old one."""
    for cls in (Reference, PMoE):
        model = cls(same_arch(2), **CONFIG)
        model.experts[1] = small_vit("p16")
        with pytest.raises(RuntimeError, match=r"model.experts\[1\] was replaced"):
            model(torch.randn(1, 3, IMG, IMG))


def test_experts_whose_blocks_the_batched_path_cannot_run_run_per_expert():
    """Gated MLPs (timm's SwiGLU, GluMlp), activations with parameters and other norms: the fast
    model names why it cannot batch them, builds, and matches the reference per expert."""
    import timm
    from timm.layers import SwiGLU, SwiGLUPacked

    def timm_vit(**kwargs):
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, depth=2, num_classes=0, **kwargs)

    for kwargs, reason in (
        (dict(mlp_layer=SwiGLU, act_layer=torch.nn.SiLU), "mlp is a SwiGLU"),
        (dict(mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, mlp_ratio=2), "mlp is a GluMlp"),
        (dict(act_layer=torch.nn.PReLU), "has parameters"),
        (dict(norm_layer=torch.nn.RMSNorm), "norm1 is a RMSNorm"),
    ):
        torch.manual_seed(0)
        fast = assert_matches_reference([timm_vit(**kwargs) for _ in range(2)], execution="auto")
        assert reason in " ".join(fast.batched_reasons()), fast.batched_reasons()
        with pytest.raises(ValueError, match=reason):
            PMoE([timm_vit(**kwargs) for _ in range(2)], **CONFIG, execution="batched")


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_an_attention_narrower_than_the_tokens(execution):
    """timm's attn_head_dim makes heads x head_dim (24) differ from the token width (48): the
    batched last block, run for the class token alone, split qkv at D and crashed."""
    from timm.models.vision_transformer import Attention

    experts = same_arch(2)
    for expert in experts:
        for block in expert.blocks:
            block.attn = Attention(48, num_heads=3, attn_head_dim=8, qkv_bias=True).eval().requires_grad_(False)
    assert_matches_reference(experts, execution=execution)


def test_one_expert_passed_twice_does_not_run_batched():
    """Each expert's weights become a row of the stacks: one module cannot be two rows (it was
    restacked on every forward)."""
    expert = small_vit("p16")
    fast = assert_matches_reference([expert, expert], execution="auto")
    assert "expert 1 is the same module as expert 0" in " ".join(fast.batched_reasons())
    with pytest.raises(ValueError, match="expert 1 is the same module as expert 0"):
        PMoE([expert, expert], **CONFIG, execution="batched")


def test_an_expert_whose_head_reads_more_than_the_class_token_runs_its_last_block_whole():
    """timm's distilled DeiT pools its class and distillation tokens (its own forward_head): the
    last block must give every token."""
    import timm

    experts = [timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=IMG, depth=2, num_classes=0)
               for _ in range(2)]
    fast = assert_matches_reference(experts)
    assert "every token" in fast.execution_plan()["last_block"]


def test_replaced_parameters_restack_under_inference_mode_for_training_too():
    """A restack inside torch.inference_mode must not leave inference tensors as the stacks (and
    the experts' parameters): a later training forward saves them for backward."""
    fast = PMoE(same_arch(), **CONFIG, execution="batched")
    fc1 = fast.experts[1].blocks[2].mlp.fc1
    fc1.weight = torch.nn.Parameter(torch.randn_like(fc1.weight), requires_grad=False)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.inference_mode():
        expected = fast(x)
    assert not fast.get_buffer("_stacked_2_mlp_fc1_weight").is_inference()
    logits = fast(x)
    logits.sum().backward()
    torch.testing.assert_close(logits.detach(), expected, rtol=0, atol=0)


def test_expert_blocks_that_train_do_not_run_batched(monkeypatch):
    """The batched blocks read stacked copies of the experts' weights, which take no gradient:
    with expert block parameters that require grad, an explicit "batched" raises, and "auto"
    runs the experts one by one, whose parameters get the reference's gradients."""
    torch.manual_seed(1)
    ref = Reference(same_arch(2), **CONFIG)
    batched = PMoE(same_arch(2), **CONFIG, execution="batched")
    batched.experts.requires_grad_(True)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():  # nothing to differentiate: batched serves
        batched(x)
    assert batched.last_execution == "batched"
    with pytest.raises(ValueError, match="require grad"):
        batched(x)

    auto = PMoE(same_arch(2), **CONFIG)
    auto.load_state_dict(ref.state_dict(), strict=True)
    monkeypatch.setattr(auto, "execution_for", lambda device_type: "batched")  # as on CUDA
    for model in (ref, auto):
        model.experts.requires_grad_(True)
        model(x).sum().backward()
    assert auto.last_execution == "sequential"
    for (name, got), expected in zip(auto.experts.named_parameters(), ref.experts.parameters()):
        assert (got.grad is None) == (expected.grad is None), name
        if expected.grad is not None:
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_frozen_experts_bit_identical_after_a_step(device):
    fast = PMoE(same_arch(), **CONFIG, checkpoint=1).to(device)
    frozen = {k: v.clone() for k, v in fast.state_dict().items() if k.startswith("experts.")}
    stacks = {n: b.clone() for n, b in fast.named_buffers() if n.startswith("_stacked")}
    opt = torch.optim.AdamW(fast.trainable_parameters(), lr=1e-2)
    fast.train()
    fast(torch.randn(2, 3, IMG, IMG, device=device)).sum().backward()
    opt.step()
    assert fast.execution_plan()["execution_last_run"] == ("batched" if device == "cuda" else "sequential")
    assert all(p.grad is None for p in fast.experts.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in fast.state_dict().items() if k.startswith("experts."))
    assert all(torch.equal(b, stacks[n]) for n, b in fast.named_buffers() if n.startswith("_stacked"))


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_checkpoint_recomputation_leaves_the_forwards_moe_losses(execution):
    """Backward recomputes checkpointed segments, dispatchers included; the MoE losses those make
    must not replace the forward's on the dispatchers, where their graphs (never run backward)
    would keep the recomputed activations alive until the next forward."""
    torch.manual_seed(0)
    model = PMoE(same_arch(2), **{**CONFIG, "dispatcher": "moe"}, checkpoint=1, execution=execution)
    logits = model(torch.randn(2, 3, IMG, IMG))
    forward_losses = [d.aux_loss for d in model.dispatchers]
    (logits.sum() + model.last_aux_loss).backward()
    assert all(d.aux_loss is a for d, a in zip(model.dispatchers, forward_losses))

@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_checkpointed_backward_twice(execution):
    """With retain_graph=True a second backward recomputes each checkpointed segment again, in
    the same recomputation context."""
    torch.manual_seed(0)
    model = PMoE(same_arch(2), **CONFIG, checkpoint=1, execution=execution)
    loss = model(torch.randn(2, 3, IMG, IMG)).sum()
    loss.backward(retain_graph=True)
    first = [p.grad.clone() for p in model.trainable_parameters()]
    loss.backward()
    assert all(torch.equal(p.grad, 2 * g) for p, g in zip(model.trainable_parameters(), first))


def penalty_grads(model, x):
    """Gradients of a gradient penalty: the sum of squares of the loss's parameter gradients."""
    model.zero_grad()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(model(x).pow(2).sum(), params, create_graph=True)
    sum(g.pow(2).sum() for g in grads).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("execution", ["batched", "sequential"])
@pytest.mark.parametrize("checkpoint", [0, 1], ids=["no-ckpt", "ckpt1"])
def test_second_derivatives_with_differentiable_backends_match_reference(execution, checkpoint):
    """A gradient penalty differentiates the backward: with the torch dispatcher and LayerNorm and
    math attention (whose every op has a derivative) the fast model matches the reference in
    float64, checkpointed too."""
    torch.manual_seed(1)
    experts = same_arch(2)
    for e in experts:  # timm's fused SDPA has no second derivative on a CPU
        for block in e.blocks:
            block.attn.fused_attn = False
    ref = Reference(experts, **CONFIG).double()
    fast = PMoE(experts, **CONFIG, execution=execution, checkpoint=checkpoint, dispatcher_backend="torch",
                layer_norm="torch", attention="math").double()
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    gold, got = penalty_grads(ref, x), penalty_grads(fast, x)
    assert set(got) == set(gold)
    for name, g in gold.items():
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12 * g.abs().max().item(), msg=name)


def test_fused_dispatcher_refuses_a_second_derivative():
    torch.manual_seed(1)
    fast = PMoE(same_arch(2), **CONFIG, dispatcher_backend=FUSED_CPU_BACKENDS[0], attention="math")
    with pytest.raises(RuntimeError, match="no second derivative"):
        penalty_grads(fast, torch.randn(2, 3, IMG, IMG))


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_meta_device_forward_and_backward(execution):
    """On the meta device (shape inference, no data) the fast model runs as the reference does."""
    fast = PMoE(same_arch(2), **CONFIG, execution=execution).to("meta")
    logits = fast(torch.randn(2, 3, IMG, IMG, device="meta"))
    logits.sum().backward()
    assert logits.shape == (2, CONFIG["num_classes"]) and fast.prompts.grad.is_meta


@pytest.mark.parametrize("execution", ["batched", "sequential"])
def test_pooling_changed_after_building_is_followed(execution):
    """timm's reset_classifier(0, global_pool="avg") after the model is built: the reference pools
    every token from then on, and the fast model must stop running its last block for the class
    token alone."""
    ref = Reference(same_arch(2), **CONFIG)
    fast = PMoE(same_arch(2), **CONFIG, execution=execution)
    fast.load_state_dict(ref.state_dict(), strict=True)
    for model in (ref, fast):
        for expert in model.experts:
            expert.reset_classifier(0, global_pool="avg")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x))
    assert "class token only" not in fast.execution_plan()["last_block"]


def test_expert_dtype_converts_experts_of_mixed_dtypes():
    """Experts of mixed dtypes are refused (the reference's check), unless expert_dtype converts
    them all first: every parameter of every expert, not only the stacked block weights."""
    experts = [small_vit("p16"), small_vit("p16").bfloat16()]
    with pytest.raises(ValueError, match="expert_dtype"):
        PMoE(experts, **CONFIG)
    fast = PMoE(experts, **CONFIG, expert_dtype=torch.float32)
    assert {p.dtype for p in fast.experts.parameters()} == {torch.float32}
    assert fast(torch.randn(2, 3, IMG, IMG)).dtype == torch.float32


def test_bf16_experts_keep_fp32_trainables():
    ref = Reference(same_arch(), **CONFIG)
    fast = PMoE(same_arch(), **CONFIG, expert_dtype=torch.bfloat16)
    fast.load_state_dict(ref.state_dict(), strict=True)
    assert all(p.dtype == torch.bfloat16 for p in fast.experts.parameters())
    assert all(p.dtype == torch.float32 for p in fast.trainable_parameters())
    x = torch.randn(2, 3, IMG, IMG)
    logits = fast(x)
    logits.sum().backward()
    assert logits.dtype == torch.float32 and fast.prompts.grad.dtype == torch.float32
    # bf16 experts: about 3 significant digits per operation, a few percent after 3 blocks.
    torch.testing.assert_close(logits, ref(x), rtol=0.1, atol=0.05 * ref(x).abs().max().item())


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: PMoE(mixed(), **CONFIG, execution="batched"), "cannot serve these experts"),
        (lambda: PMoE(same_arch(), **CONFIG, execution="parallel"), "unknown execution"),
        (lambda: PMoE(same_arch(), **CONFIG, attention="flash"), "unknown attention backend"),
        (lambda: PMoE(same_arch(), **CONFIG, checkpoint=-1), "checkpoint must be"),
        (lambda: PMoE(same_arch(), **CONFIG, expert_dtype=torch.int8), "expert_dtype"),
        (lambda: PMoE(same_arch(), **CONFIG, dispatcher_backend="tpu"), "unknown dispatcher backend"),
        (lambda: PMoE(same_arch(), **CONFIG, layer_norm="apex"), "unknown layer_norm"),
    ],
    ids=["batched-mixed", "execution", "attention", "checkpoint", "dtype", "dispatcher-backend", "layer-norm"],
)
def test_bad_options_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_both_models_take_the_same_images():
    """Floating images of any dtype into float32 experts: both models convert them to float32 and
    agree; integer images (unnormalised pixels) both refuse with the same error."""
    ref = Reference([small_vit("p16", depth=1)], **CONFIG)
    fast = PMoE([small_vit("p16", depth=1)], **CONFIG)
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        torch.testing.assert_close(fast(x.to(dtype)), ref(x.to(dtype)), msg=lambda m: f"{dtype}: {m}")
    for model in (ref, fast):
        with pytest.raises(ValueError, match="images must be floating point, got torch.uint8"):
            model(torch.randint(0, 255, (2, 3, IMG, IMG), dtype=torch.uint8))


def test_xformers_says_why_it_cannot_serve_on_cpu():
    fast = PMoE(same_arch(), **CONFIG, attention="xformers")
    with pytest.raises(RuntimeError, match="attention backend 'xformers' cannot serve: xformers attention runs on CUDA tensors"):
        fast(torch.randn(1, 3, IMG, IMG))


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("execution", ["auto", "batched"])
def test_torch_compile_inference(mode, device, execution):
    """The inference path compiles (reduce-overhead captures CUDA graphs on a GPU; on a CPU it
    compiles without them) and matches eager; "auto" runs the experts one by one on a CPU. The
    compiled model runs first, as a user's would: CUDA-graph trees refuse a device tensor that
    a first call made and kept."""
    model = PMoE(same_arch(2), **CONFIG, execution=execution).to(device).eval()
    x = torch.randn(2, 3, IMG, IMG, device=device)
    with torch.no_grad():
        torch._dynamo.reset()  # as in test_torch_compile_training
        compiled = torch.compile(model, mode=mode)
        compiled(x)
        got = compiled(x).clone()  # a graph's output is overwritten by its next replay
        torch.testing.assert_close(got, model(x))


COMPILED_TRAINING_RUNS = (
    [("cpu", "batched", backend, 0, "mlp") for backend in ["torch", *FUSED_CPU_BACKENDS]]
    + [("cpu", "batched", "cpp", 1, "mlp")]
    + [("cpu", "sequential", backend, 0, "mlp") for backend in FUSED_CPU_BACKENDS]
    + [("cpu", "streams", "cpp", 0, "mlp")]
    + ([("cpu", "batched", "triton", 0, "moe")] if "triton" in FUSED_CPU_BACKENDS else [])
    + [
        pytest.param("cuda", execution, backend, 0, kind, marks=needs_cuda)
        for execution, backend, kind in [
            ("batched", "triton", "mlp"), ("batched", "cuda", "mlp"), ("batched", "triton", "moe"),
            ("streams", "triton", "mlp"),
        ]
    ]
)


@pytest.mark.slow
@pytest.mark.parametrize("device,execution,backend,checkpoint,kind", COMPILED_TRAINING_RUNS)
def test_torch_compile_training(device, execution, backend, checkpoint, kind):
    """A training step compiles and gives eager's logits and gradients, the load-balancing
    loss's included for kind "moe", in one graph (fullgraph: every fused dispatcher is an
    operator with a fake implementation and autograd). Experts on streams run in sequence there.
    Batched with a fused dispatcher on a CPU, it keeps no more activations for backward than
    eager does."""
    torch.manual_seed(0)
    # Two blocks (the first prompt layer and one fed prompt outputs: each kind there is) of 2 x 2
    # patches: what compiles is the same at any size, and the interpreter runs kernels for it.
    img = 32
    experts = same_arch(2, depth=2, img_size=img)
    model = PMoE(experts, **CONFIG, execution=execution, dispatcher=kind, dispatcher_backend=backend, checkpoint=checkpoint)
    model = model.to(device)
    x = torch.randn(2, 3, img, img, device=device)
    trainable = list(model.trainable_parameters())

    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def step(forward):
        model.zero_grad()
        kept = {}  # the activations saved for backward: bytes by storage

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = forward(x)
        loss = (logits * torch.linspace(-1, 1, logits.shape[-1], device=device)).sum()
        (loss if model.last_aux_loss is None else loss + model.last_aux_loss).backward()
        return [logits.detach()] + [p.grad.clone() for p in trainable], sum(kept.values())

    expected, eager_bytes = step(model)
    # Every test compiles the same forward for a new model; past Dynamo's recompile limit (8 per
    # code object in a process) fullgraph fails. A fresh Dynamo state per test.
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    step(compiled)
    got, compiled_bytes = step(compiled)
    assert model.execution_plan()["execution_last_run"] == ("sequential" if execution == "streams" else execution)
    for g, want in zip(got, expected):
        torch.testing.assert_close(g, want)
    if device == "cpu" and execution == "batched" and backend != "torch" and not checkpoint:
        # The fused dispatcher's backward reads the tokens from the sequence it returns, which the
        # next block keeps anyway (dispatch_into_functional, dispatch_into_moe_functional): the
        # old sequence is not kept too.
        # (aot_eager saves what eager does otherwise; Inductor's choices on a GPU may differ.)
        assert compiled_bytes <= eager_bytes, f"compiled keeps {compiled_bytes} bytes for backward, eager {eager_bytes}"


# -- on a CUDA GPU ------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("execution", ["batched", "streams"])
@pytest.mark.parametrize("checkpoint", [0, 1], ids=["no-ckpt", "ckpt1"])
def test_cuda_paths_match_reference(backend, execution, checkpoint):
    fast = assert_matches_reference(same_arch(), device="cuda", execution=execution, dispatcher_backend=backend,
                                    checkpoint=checkpoint)
    plan = fast.execution_plan()
    assert (plan["execution_last_run"], plan["dispatcher_backend_last_run"]) == (execution, backend)


@needs_cuda
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_cuda_mixed_experts_on_streams(attention):
    fast = assert_matches_reference(mixed(), device="cuda", attention=attention, checkpoint=1)
    assert fast.execution_plan()["execution_last_run"] == "streams"


@needs_cuda
@pytest.mark.parametrize("execution", ["batched", "streams"])
@pytest.mark.parametrize("config", [dict(CONFIG, base="gapt"), dict(CONFIG, dispatcher="moe", separate_mlps=True, top_k=2)],
                         ids=["gapt", "moe-separate"])
def test_cuda_model_options(config, execution):
    assert_matches_reference(same_arch(2), config=config, device="cuda", execution=execution)


# (device, execution, dispatcher backend): on a GPU both executions with the backend "auto" picks;
# on a CPU the batched experts with every dispatcher backend that runs here.
BF16_RUNS = (
    [("cuda", "batched", "auto"), ("cuda", "streams", "auto")]
    if torch.cuda.is_available()
    else [("cpu", "batched", backend) for backend in ["torch", *FUSED_CPU_BACKENDS]]
)


@pytest.mark.parametrize("device,execution,backend", BF16_RUNS)
def test_bf16_experts_within_four_times_the_error_of_bf16_autocast(device, execution, backend):
    """bf16 frozen experts against the float64 reference: at most four times the error of the
    fp32 reference under bf16 autocast (the plain PyTorch way to run it in bf16), plus a floor.
    The dispatcher takes bf16 tokens beside its fp32 parameters, as in the GPU targets. The
    experts' residual stream is bf16 where autocast keeps it in fp32: on an H100 (seeds 1-3,
    batched and streams, Triton and torch dispatchers alike) the worst gradient erred 3x
    autocast's beyond the floor."""
    torch.manual_seed(1)
    ref = Reference([e.to(device) for e in same_arch()], **CONFIG).to(device)
    fast = PMoE(
        [e.to(device) for e in same_arch()], **CONFIG, execution=execution, expert_dtype=torch.bfloat16,
        dispatcher_backend=backend,
    ).to(device)
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(4, 3, IMG, IMG, device=device)
    got, got_grads = outputs_and_grads(fast, x)
    if backend != "auto":
        assert fast.execution_plan()["dispatcher_backend_last_run"] == backend
    with torch.autocast(device, dtype=torch.bfloat16):
        plain, plain_grads = outputs_and_grads(ref, x)
    gold, gold_grads = outputs_and_grads(ref.double(), x.double())
    assert set(got_grads) == set(gold_grads) and got.dtype == torch.float32
    for name in ["logits", *gold_grads]:
        g, p, o = (gold, plain, got) if name == "logits" else (gold_grads[name], plain_grads[name], got_grads[name])
        err_plain = (p.double() - g).norm().item()
        err = (o.double() - g).norm().item()
        assert err <= 4 * err_plain + 1e-3 * g.norm().item(), f"{name}: {err:.3g} vs bf16 autocast {err_plain:.3g}"


@pytest.mark.parametrize("route", ["autograd", "no-grad", "autocast", "trainable-weights", "few-rows"])
def test_batched_linear_routes_match_baddbmm(route, monkeypatch):
    """The batched block's linear layer: one addmm per expert (bias in the product's epilogue),
    under autograd or not; one baddbmm where addmm's out= cannot serve (autocast, weights that
    train) and below PER_EXPERT_MIN_ROWS rows (the host's time). Each gives baddbmm's output and
    gradients."""
    from pmoe_fast import frozen_linear
    from pmoe_fast.frozen_linear import linear

    if route != "few-rows":
        monkeypatch.setattr(frozen_linear, "PER_EXPERT_MIN_ROWS", 0)  # the test's 7 rows take every route
    torch.manual_seed(0)
    dtype = torch.float32 if route == "autocast" else torch.float64  # autocast leaves float64 alone
    x = torch.randn(3, 7, 5, dtype=dtype, requires_grad=route != "no-grad")
    weight_t = torch.randn(3, 5, 4, dtype=dtype, requires_grad=route == "trainable-weights")
    bias = torch.randn(3, 1, 4, dtype=dtype, requires_grad=route == "trainable-weights")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=route == "autocast"):
        want = torch.baddbmm(bias, x, weight_t)
        got = linear(x, (weight_t, bias), slice(1, 4))
    assert got.dtype == want.dtype
    want_fn = {"autograd": "_FrozenLinearBackward", "no-grad": None}.get(route, "BaddbmmBackward0")
    assert (got.grad_fn and type(got.grad_fn).__name__) == want_fn
    torch.testing.assert_close(got, want[:, :, 1:4], rtol=1e-12, atol=1e-12)
    if route in ("autograd", "trainable-weights", "few-rows"):
        grad = torch.randn_like(got)
        tensors = [t for t in (x, weight_t, bias) if t.requires_grad]
        got_grads = torch.autograd.grad(got, tensors, grad)
        want_grads = torch.autograd.grad(want[:, :, 1:4], tensors, grad)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_compiled_linear_adds_the_bias_to_a_bmm():
    """Under torch.compile the batched linear layer is bmm + bias, which Inductor fuses into the
    pointwise kernel after it, not baddbmm (an external call copying the bias into its output)."""
    from pmoe_fast.frozen_linear import linear

    x, weight_t, bias = torch.randn(3, 7, 5), torch.randn(3, 5, 4), torch.randn(3, 1, 4)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    got = torch.compile(lambda x: linear(x, (weight_t, bias)), backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(got, torch.baddbmm(bias, x, weight_t))
    calls = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert any("bmm" in c for c in calls) and not any("baddbmm" in c for c in calls), calls


@pytest.mark.parametrize("min_rows", [0, None], ids=["addmm-per-expert", "baddbmm"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("parts", [3, 2])
@pytest.mark.parametrize("route", ["autograd", "no-grad", "autocast", "trainable-weights"])
def test_qkv_heads_routes_match_unbind(route, parts, bias, min_rows, monkeypatch):
    """q, k, v (or k, v) of one fused projection, as timm splits them: with frozen weights and a
    gradient to x, a custom Function whose backward sums one product per part (the second part
    gets no gradient here, so that None gradients are covered too); elsewhere plain views. Each
    gives the split's outputs and gradients."""
    from pmoe_fast import frozen_linear
    from pmoe_fast.frozen_linear import qkv_heads

    if min_rows is not None:
        monkeypatch.setattr(frozen_linear, "PER_EXPERT_MIN_ROWS", min_rows)
    torch.manual_seed(0)
    dtype = torch.float32 if route == "autocast" else torch.float64
    K, B, T, D, heads = 3, 2, 7, 8, 2
    x = torch.randn(K, B, T, D, dtype=dtype, requires_grad=route != "no-grad")
    weight_t = torch.randn(K, D, parts * D, dtype=dtype, requires_grad=route == "trainable-weights")
    b = torch.randn(K, 1, parts * D, dtype=dtype, requires_grad=route == "trainable-weights") if bias else None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=route == "autocast"):
        qkv = torch.bmm(x.reshape(K, B * T, D), weight_t) if b is None else torch.baddbmm(b, x.reshape(K, B * T, D), weight_t)
        want = qkv.reshape(K * B, T, parts, heads, D // heads).permute(2, 0, 3, 1, 4).unbind(0)
        got = qkv_heads(x, (weight_t, b), heads, parts)
    assert len(got) == parts
    assert (type(got[0].grad_fn).__name__ == "_FrozenQKVBackward") == (route == "autograd")
    for g, w in zip(got, want):
        assert g.shape == w.shape == (K * B, heads, T, D // heads) and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    if route in ("autograd", "trainable-weights"):
        grads = [torch.randn_like(t) for t in got]
        used = [i for i in range(parts) if i != parts - 2]  # k gets no gradient: q and v, or v alone
        tensors = [t for t in (x, weight_t, b) if t is not None and t.requires_grad]
        got_grads = torch.autograd.grad([got[i] for i in used], tensors, [grads[i] for i in used])
        want_grads = torch.autograd.grad([want[i] for i in used], tensors, [grads[i] for i in used])
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
