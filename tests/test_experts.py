"""The expert adapter serves timm's ViT and ours alike, frozen, with timm's state_dict keys."""

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import ParallelScalingBlock
from helpers import IMG, OwnAttention, OwnBlock, OwnLinear, small_vit

from pmoe_fast import attention as attention_backends
from pmoe_fast import vit
from pmoe_fast.experts import Expert, attention
from pmoe_fast.reference import PMoE


def with_own_qkv():
    model = small_vit("p16")
    qkv = model.blocks[1].attn.qkv
    model.blocks[1].attn.qkv = OwnLinear(qkv.in_features, qkv.out_features)
    return model


def our_twin(timm_model, **kwargs):
    """pmoe_fast.vit's model with the same configuration and weights as a small_vit()."""
    ours = vit.VisionTransformer(img_size=IMG, embed_dim=48, depth=3, num_heads=3, **kwargs)
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    return ours.eval()


TWINS = {
    "p16": dict(),
    "p14reg": dict(patch_size=14, reg_tokens=4, no_embed_class=True, init_values=1e-5, num_classes=0),
    "clip": dict(pre_norm=True, global_pool="avg", norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-5)),
}


@pytest.mark.parametrize("kind", list(TWINS))
def test_adapter_sees_timm_and_ours_alike(kind):
    theirs = small_vit(kind)
    ours = our_twin(theirs, **TWINS[kind])
    a, b = Expert(theirs), Expert(ours)
    assert a.info == b.info
    x = torch.randn(2, 3, IMG, IMG)
    za, zb = a.embed(x), b.embed(x)
    torch.testing.assert_close(za, zb)
    for i in range(a.info.depth):
        za, zb = a.block(i, za), b.block(i, zb)
    torch.testing.assert_close(a.pool(za), b.pool(zb))


def test_pmoe_over_our_vits_matches_pmoe_over_timm():
    timm_experts = [small_vit("p16"), small_vit("p14reg")]
    ours = [our_twin(m, **TWINS[k]) for m, k in zip(timm_experts, ("p16", "p14reg"))]
    ref_timm = PMoE(timm_experts, num_classes=3, num_prompts=3, dispatcher_hidden=8)
    ref_ours = PMoE(ours, num_classes=3, num_prompts=3, dispatcher_hidden=8)
    ref_ours.load_state_dict(ref_timm.state_dict(), strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(ref_ours(x), ref_timm(x))


def test_attention_with_the_default_scale_is_the_blocks_own():
    m = small_vit("p14reg")
    block = m.blocks[0]
    x = torch.randn(2, 69, 48)
    torch.testing.assert_close(attention(block.attn, x, block.attn.head_dim**-0.5), block.attn(x))
    e = Expert(m)
    torch.testing.assert_close(e.block(0, x, torch.tensor(block.attn.head_dim**-0.5)), block(x))


def test_math_attention_keeps_float64():
    """The written-out softmax runs in float32 for 16-bit inputs, never below the inputs' dtype."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 9, 16, dtype=torch.float64)
    expected = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v
    torch.testing.assert_close(attention_backends.attention(q, k, v, 0.25, "math"), expected, rtol=1e-13, atol=1e-13)


def test_math_attention_scales_before_the_product_in_float16():
    """q k^T = 102400 overflows float16 (max 65504); scaled by 1/8 it does not. The written-out
    softmax gave NaN where SDPA, which the reference runs, stays finite."""
    q = torch.full((1, 1, 2, 64), 40.0, dtype=torch.float16)
    v = torch.randn(1, 1, 2, 64, dtype=torch.float16)
    expected = F.scaled_dot_product_attention(q.double(), q.double(), v.double(), scale=0.125)
    got = attention_backends.attention(q, q, v, 0.125, "math")
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-3)


def test_auto_attention_serves_anything():
    assert attention_backends.not_supported_reasons("auto", torch.zeros(1, 1, 1, 8)) == []
    assert "choose one of ('auto', 'sdpa'" in attention_backends.not_supported_reasons("flash", torch.zeros(1))[0]


@pytest.mark.parametrize("kind", list(TWINS))
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_block_for_some_rows_is_the_full_blocks_rows(kind, backend):
    """Only the chosen rows are queries and go through the MLP; every row is still a key and a
    value, so the outputs are those of the whole block: what the fast model's last block, run for
    the class token alone, relies on."""
    for model in (small_vit(kind), our_twin(small_vit(kind), **TWINS[kind])):
        e = Expert(model)
        x = torch.randn(2, 9, 48)
        for rows in (slice(3, 4), slice(0, 9), slice(2, 6)):
            full = e.block(1, x, None, backend)
            torch.testing.assert_close(e.block(1, x, None, backend, rows), full[:, rows])
    assert Expert(small_vit("p16")).pool_reads_first_token
    assert not Expert(small_vit("clip")).pool_reads_first_token  # avg pooling reads every token


@pytest.mark.parametrize("kind", list(TWINS))
def test_patches_as_one_matmul_are_the_backbones_embedding(kind):
    """The fast model's patch embedding (one product over the patches) against the backbone's
    convolution, in float64 so that only the summation order differs; timm's and ours, /14 and
    /16, with and without a bias."""
    for model in (small_vit(kind), our_twin(small_vit(kind), **TWINS[kind])):
        e = Expert(model.double())
        assert e.patch_projection is model.patch_embed.proj
        x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
        torch.testing.assert_close(e.embed(x, patches_as_matmul=True), e.embed(x), rtol=1e-12, atol=1e-12)


def test_patch_embeddings_the_product_cannot_compute_run_as_they_are():
    """Overlapping patches, a grid that leaves pixels out, and timm's dynamic padding keep the
    backbone's own patch embedding."""
    overlapping = our_twin(small_vit("p16"))
    overlapping.patch_embed.proj.stride = (8, 8)
    assert Expert(overlapping).patch_projection is None
    dynamic = small_vit("p16", dynamic_img_pad=True)
    remainder = vit.VisionTransformer(img_size=120, embed_dim=48, depth=1, num_heads=3)  # 120 = 7 * 16 + 8
    for model in (dynamic, remainder):
        e = Expert(model)
        assert e.patch_projection is None
        x = torch.randn(1, 3, *e.info.img_size)
        assert torch.equal(e.embed(x, patches_as_matmul=True), e.embed(x))


def test_a_replaced_patch_projection_is_the_one_that_runs():
    """Replacing the backbone's patch convolution after wrapping: the product runs the new one."""
    model = small_vit("p16").double()
    e = Expert(model)
    new = torch.nn.Conv2d(3, 48, 16, 16).double().requires_grad_(False)
    model.patch_embed.proj = new
    assert e.patch_projection is new
    x = torch.randn(2, 3, IMG, IMG, dtype=torch.float64)
    torch.testing.assert_close(e.embed(x, patches_as_matmul=True), e.embed(x), rtol=1e-12, atol=1e-12)


def test_adapter_freezes_in_place():
    m = small_vit("p16").train()
    Expert(m)
    assert not m.training and not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: torch.nn.Linear(4, 4), "not a ViT"),
        (lambda: vit.VisionTransformer(img_size=IMG, embed_dim=48, depth=1, num_heads=3, global_pool=""), "pooling"),
        (lambda: "vit_base_patch16_224", "nn.Module"),
        (lambda: small_vit("p16", block_fn=OwnBlock), "OwnBlock has its own forward, not the pre-norm ViT block's"),
        (lambda: small_vit("p16", attn_layer=OwnAttention), "its attention OwnAttention has its own forward"),
        (lambda: small_vit("p16", attn_layer="diff"), "its attention DiffAttention has its own forward"),
        (with_own_qkv, "block 1 .* its attention's qkv is a OwnLinear, not a Linear"),
        (lambda: small_vit("p16", block_fn=ParallelScalingBlock), r"it lacks \['norm1', 'attn', 'ls1'"),
        (lambda: timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64, depth=1, num_classes=0),
         "is a HybridEmbed, not a plain PatchEmbed"),
    ],
    ids=["linear", "no-pool", "name", "own-block", "own-attention", "diff-attention", "own-qkv", "parallel-block", "hybrid"],
)
def test_adapter_rejects_what_it_cannot_serve(make, match):
    """Blocks and attentions that compute their own forward would be silently replaced by the
    adapter's pre-norm block (it runs the parts with its own attention kernel): refused."""
    with pytest.raises((TypeError, ValueError), match=match):
        Expert(make())
