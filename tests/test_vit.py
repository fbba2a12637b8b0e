"""pmoe_fast.vit against timm: same state_dict keys, same function, clear input errors.

Parity follows flash-attention's rule (STYLE.md): an fp64 copy of the timm model is the
reference; ours in fp32 must be within 2x timm's own fp32 error of it, plus a floor of
1e-6 x the output's magnitude (a few fp32 ulps). This adapts to each model's depth and
scale, and a real bug (wrong token order, missing norm, wrong scale) is off by O(1).
"""

import copy
import dataclasses
import functools
from collections.abc import Callable

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

from pmoe_fast import vit
from pmoe_fast.vit import Attention, VisionTransformer, create_model, load_weights


def _perturb(model: nn.Module) -> nn.Module:
    """Make every parameter matter: random weights leave biases at 0, norms at 1, layer scale
    at 1e-5 and prefix tokens at ~1e-6, where a mix-up between them would go unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim <= 1 or name in ("cls_token", "reg_token"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _assert_parity(ours: torch.Tensor, timm_fp32: torch.Tensor, ref_fp64: torch.Tensor, what: str) -> None:
    assert ours.shape == ref_fp64.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref_fp64.shape)}"
    err_ours = (ours.double() - ref_fp64).abs().max().item()
    err_timm = (timm_fp32.double() - ref_fp64).abs().max().item()
    floor = 1e-6 * ref_fp64.abs().max().item()
    assert err_ours <= 2 * err_timm + floor, f"{what}: error {err_ours:.3g} vs timm's fp32 error {err_timm:.3g}"


@dataclasses.dataclass
class Case:
    id: str
    timm_name: str
    ours: Callable[..., VisionTransformer]
    kwargs: dict = dataclasses.field(default_factory=dict)  # passed to timm.create_model and to ours
    batch: int = 2


def _small(**kwargs) -> dict:
    return dict(depth=2, num_classes=10, **kwargs)


_DINOV2_S14_REG4 = functools.partial(
    VisionTransformer, patch_size=14, embed_dim=384, depth=12, num_heads=6,
    init_values=1e-5, reg_tokens=4, no_embed_class=True,
)
_CLIP_B16 = functools.partial(
    VisionTransformer, patch_size=16, embed_dim=768, depth=12, num_heads=12,
    pre_norm=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-5),
)

ODD_CASE = Case(
    "tiny_p14_98x70_batch1", "vit_tiny_patch16_224", vit.vit_tiny_patch16_224,
    dict(depth=2, num_classes=7, patch_size=14, img_size=(98, 70)), batch=1,
)
CASES = [
    Case("vit_b16_full", "vit_base_patch16_224", vit.vit_base_patch16_224),
    Case("dinov2_s14_reg4", "vit_small_patch14_reg4_dinov2", _DINOV2_S14_REG4, _small(img_size=224)),
    Case("clip_b16_prenorm", "vit_base_patch16_clip_224", _CLIP_B16, _small()),
    Case("clip_b16_quick_gelu", "vit_base_patch16_clip_224", _CLIP_B16, _small(act_layer="quick_gelu")),
    Case("avg_fc_norm", "vit_small_patch16_224", vit.vit_small_patch16_224, _small(global_pool="avg")),
    Case("reg2_embed_class", "vit_small_patch16_224", vit.vit_small_patch16_224, _small(reg_tokens=2)),
    Case("reg2_no_embed_class", "vit_small_patch16_224", vit.vit_small_patch16_224,
         _small(reg_tokens=2, no_embed_class=True)),
    Case("no_cls_reg1_avg", "vit_small_patch16_224", vit.vit_small_patch16_224,
         _small(class_token=False, reg_tokens=1, global_pool="avg")),
    Case("layer_scale", "vit_small_patch16_224", vit.vit_small_patch16_224, _small(init_values=0.1)),
    Case("qk_norm", "vit_small_patch16_224", vit.vit_small_patch16_224, _small(qk_norm=True)),
    Case("token_fc_norm", "vit_small_patch16_224", vit.vit_small_patch16_224, _small(fc_norm=True)),
    Case("no_pool_no_head", "vit_small_patch16_224", vit.vit_small_patch16_224,
         dict(depth=2, global_pool="", num_classes=0)),
    ODD_CASE,
]
# Backward is about 3x a forward and fp64 about 2x fp32: the gradient test runs at 112 x 112
# (the odd-size case keeps its own size) to stay fast on 2 cores.
GRAD_CASES = [
    dataclasses.replace(c, kwargs={**c.kwargs, "img_size": 112})
    for c in CASES
    if c.id not in ("vit_b16_full", ODD_CASE.id)
] + [ODD_CASE]


def _pair(case: Case) -> tuple[nn.Module, VisionTransformer]:
    ref = _perturb(timm.create_model(case.timm_name, pretrained=False, **case.kwargs)).eval()
    ours = case.ours(**case.kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _images(model: VisionTransformer, batch: int) -> torch.Tensor:
    return torch.randn(batch, model.patch_embed.proj.in_channels, *model.patch_embed.img_size)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_matches_timm(case):
    ref, ours = _pair(case)
    ref64 = copy.deepcopy(ref).double()
    x = _images(ours, case.batch)
    with torch.no_grad():
        feats_ref = ref64.forward_features(x.double())
        feats_timm = ref.forward_features(x)
        feats_ours = ours.forward_features(x)
        _assert_parity(feats_ours, feats_timm, feats_ref, "forward_features")
        _assert_parity(
            ours.forward_head(feats_ours, pre_logits=True),
            ref.forward_head(feats_timm, pre_logits=True),
            ref64.forward_head(feats_ref, pre_logits=True),
            "forward_head(pre_logits=True)",
        )
        _assert_parity(ours(x), ref.forward_head(feats_timm), ref64.forward_head(feats_ref), "forward")


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_gradients_match_timm(case):
    ref, ours = _pair(case)
    ref64 = copy.deepcopy(ref).double()
    x = _images(ours, case.batch)
    out_shape = ours(x).shape
    weight = torch.randn(out_shape)
    grads = []
    for model, dtype in ((ref64, torch.float64), (ref, torch.float32), (ours, torch.float32)):
        xi = x.to(dtype).requires_grad_()
        (model(xi) * weight.to(dtype)).sum().backward()
        grads.append({"images": xi.grad, **{n: p.grad for n, p in model.named_parameters()}})
    g_ref, g_timm, g_ours = grads
    assert g_ours.keys() == g_ref.keys()
    for name in g_ref:
        _assert_parity(g_ours[name], g_timm[name], g_ref[name], f"grad of {name}")


def test_train_mode_dropout_matches_timm_with_same_seed():
    # Ours draws random numbers in timm's order (pos_drop, attention, proj, drop path, mlp, head),
    # so one seed gives one mask for both. Both are fp32 with the same ops: fp32 tolerance.
    rates = dict(drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.3)
    case = Case("dropout", "vit_small_patch16_224", vit.vit_small_patch16_224, _small(img_size=112, **rates))
    ref, ours = _pair(case)
    ref.train()
    ours.train()
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        torch.manual_seed(1)
        out_ref = ref(x)
        torch.manual_seed(1)
        out_ours = ours(x)
        torch.manual_seed(2)
        out_other_seed = ours(x)
        out_eval = ours.eval()(x)
    torch.testing.assert_close(out_ours, out_ref)
    assert (out_other_seed - out_ours).abs().max() > 1e-3
    assert (out_eval - out_ours).abs().max() > 1e-3


def test_module_names_are_timms():
    # Other code duck-types ours with timm's VisionTransformer through these names.
    kwargs = dict(img_size=224, depth=1, num_classes=10)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **kwargs)
    ours = _DINOV2_S14_REG4(**kwargs)
    model_names = [
        "patch_embed", "patch_embed.proj", "patch_embed.patch_size", "patch_embed.img_size",
        "patch_embed.grid_size", "patch_embed.num_patches", "cls_token", "reg_token", "pos_embed", "pos_drop",
        "patch_drop", "norm_pre", "blocks", "norm", "fc_norm", "head_drop", "head", "num_prefix_tokens",
        "num_reg_tokens", "has_class_token", "no_embed_class", "global_pool", "embed_dim", "num_features",
        "num_classes",
    ]
    block_names = [
        "norm1", "attn", "attn.qkv", "attn.q_norm", "attn.k_norm", "attn.attn_drop", "attn.norm", "attn.proj",
        "attn.proj_drop", "attn.num_heads", "attn.head_dim", "attn.scale", "ls1", "drop_path1", "norm2", "mlp",
        "mlp.fc1", "mlp.act", "mlp.drop1", "mlp.norm", "mlp.fc2", "mlp.drop2", "ls2", "drop_path2",
    ]

    def get(obj, dotted):
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    for root_ours, root_ref, names in ((ours, ref, model_names), (ours.blocks[0], ref.blocks[0], block_names)):
        for name in names:
            mine, theirs = get(root_ours, name), get(root_ref, name)
            if isinstance(theirs, torch.Tensor):
                assert mine.shape == theirs.shape, name
            elif isinstance(theirs, nn.Module):
                assert type(mine).__name__ == type(theirs).__name__, name
            else:
                assert mine == theirs, name
    for name in ("_pos_embed", "forward_features", "pool", "forward_head", "forward"):
        assert callable(getattr(ours, name)), name
    no_reg = vit.vit_tiny_patch16_224(depth=1)
    assert no_reg.reg_token is None and no_reg.patch_embed.proj.bias is not None
    assert vit.vit_tiny_patch16_224(depth=1, pre_norm=True).patch_embed.proj.bias is None


def test_initialisation():
    model = vit.vit_small_patch16_224(depth=2, init_values=0.25, reg_tokens=2)
    assert model.cls_token.abs().max() < 1e-4 and model.reg_token.abs().max() < 1e-4
    assert 0.015 < model.pos_embed.std() < 0.025
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert 0.015 < module.weight.std() < 0.025
            assert module.bias is None or not module.bias.any()
    assert torch.equal(model.blocks[1].ls2.gamma, torch.full((384,), 0.25))
    assert isinstance(vit.vit_small_patch16_224(depth=1).blocks[0].ls1, nn.Identity)


_ARCHS = {  # name: (embed_dim, depth, num_heads, patch)
    "vit_tiny_patch16_224": (192, 12, 3, 16),
    "vit_small_patch16_224": (384, 12, 6, 16),
    "vit_base_patch16_224": (768, 12, 12, 16),
    "vit_large_patch16_224": (1024, 24, 16, 16),
    "vit_tiny_patch14_224": (192, 12, 3, 14),
    "vit_small_patch14_224": (384, 12, 6, 14),
    "vit_base_patch14_224": (768, 12, 12, 14),
    "vit_large_patch14_224": (1024, 24, 16, 14),
}


def _shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(_ARCHS))
def test_factories(name):
    embed_dim, depth, num_heads, patch = _ARCHS[name]
    with torch.device("meta"):  # full size without allocating or initialising real weights
        model = getattr(vit, name)()
        same = create_model(name)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (embed_dim, depth, num_heads)
    assert model.patch_embed.patch_size == (patch, patch) and model.patch_embed.img_size == (224, 224)
    assert _shapes(same) == _shapes(model)
    if name in timm.list_models():  # timm has 5 of the 8
        with torch.device("meta"):
            assert _shapes(timm.create_model(name, pretrained=False)) == _shapes(model)
    override = getattr(vit, name)(depth=1, num_classes=5, img_size=112)
    assert len(override.blocks) == 1 and override.head.out_features == 5
    assert override.patch_embed.img_size == (112, 112)


def _manual_attention(attn: Attention, x: torch.Tensor, scale) -> torch.Tensor:
    """softmax((q k^T) * scale) v per head, written out."""
    B, T, D = x.shape
    q, k, v = attn.qkv(x).reshape(B, T, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1)
    return attn.proj((weights @ v).transpose(1, 2).reshape(B, T, D))


@pytest.mark.parametrize(
    "make_scale",
    [
        lambda: 0.37,
        lambda: torch.tensor(0.37, requires_grad=True),
        lambda: torch.tensor([0.2, 0.5, 1.3]).view(3, 1, 1).requires_grad_(),
    ],
    ids=["float", "tensor", "per_head_tensor"],
)
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_attention_scale_override(make_scale, qk_norm):
    # Same fp32 maths in a different order (SDPA vs. explicit softmax) on O(1) values: fp32 tolerance.
    attn = _perturb(Attention(dim=36, num_heads=3, qkv_bias=True, qk_norm=qk_norm)).eval()
    x = torch.randn(2, 7, 36)
    scale = make_scale()
    out = attn(x, scale=scale)
    expected = _manual_attention(attn, x, scale)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(attn(x), _manual_attention(attn, x, attn.head_dim**-0.5))
    assert (out - attn(x)).abs().max() > 1e-3, "the scale override did not change the output"
    if isinstance(scale, torch.Tensor):
        (grad_out,) = torch.autograd.grad(out.square().sum(), scale)
        (grad_expected,) = torch.autograd.grad(expected.square().sum(), scale)
        torch.testing.assert_close(grad_out, grad_expected)


def _tiny(**kwargs) -> VisionTransformer:
    args = dict(img_size=32, patch_size=16, embed_dim=24, depth=1, num_heads=2, num_classes=3)
    return VisionTransformer(**{**args, **kwargs})


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.randn(2, 1, 32, 32), ValueError, r"\(B, 3, 32, 32\), got \(2, 1, 32, 32\)"),
        (torch.randn(2, 3, 48, 32), ValueError, r"\(B, 3, 32, 32\), got \(2, 3, 48, 32\)"),
        (torch.randn(3, 32, 32), ValueError, r"\(B, 3, 32, 32\), got \(3, 32, 32\)"),
        (torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), ValueError, r"torch\.uint8.*float.*normalise"),
        ([[0.0]], TypeError, r"torch\.Tensor.*got list"),
    ],
    ids=["channels", "size", "3d", "uint8", "not_tensor"],
)
def test_bad_images_raise(images, error, match):
    model = _tiny()
    with pytest.raises(error, match=match):
        model(images)
    with pytest.raises(error, match=match):
        model.patch_embed(images)


@pytest.mark.parametrize("pool", ["map", "avgmax", "max", "prr", "mean"])
def test_unknown_global_pool_raises(pool):
    with pytest.raises(ValueError, match=r"global_pool '.*' is not supported.*'token', 'avg', ''"):
        _tiny(global_pool=pool)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="needs the class token"):
        _tiny(class_token=False)
    with pytest.raises(ValueError, match="act_layer 'relu6'"):
        _tiny(act_layer="relu6")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        _tiny(num_heads=5)
    with pytest.raises(ValueError, match="pool_type 'max'"):
        _tiny().pool(torch.randn(1, 5, 24), pool_type="max")


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match=r"'vit_huge_patch14_224'.*vit_tiny_patch16_224.*vit_large_patch14_224"):
        create_model("vit_huge_patch14_224")


def _assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key


@pytest.mark.parametrize(
    "filename, wrap",
    [
        ("w.safetensors", None),
        ("w.pth", None),
        ("w.pt", "state_dict"),
        ("w.bin", "model"),
        ("W.PTH", "model"),
    ],
)
def test_load_weights_round_trip(tmp_path, filename, wrap):
    source, target = _tiny(reg_tokens=2), _tiny(reg_tokens=2)
    path = tmp_path / filename
    if filename.endswith(".safetensors"):
        safetensors.torch.save_file(source.state_dict(), str(path))
    else:
        state = source.state_dict()
        torch.save({wrap: state, "epoch": 3} if wrap else state, path)
    result = load_weights(target, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    _assert_same_model(target, source)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_weights_from_timm_state_dict(tmp_path, suffix):
    kwargs = dict(img_size=112, depth=1)
    ref = _perturb(timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, **kwargs)).eval()
    path = tmp_path / f"timm{suffix}"
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path)
    ours = _DINOV2_S14_REG4(num_classes=0, **kwargs).eval()  # timm's DINOv2 has no head
    load_weights(ours, str(path))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():  # the same fp32 ops on the same weights: equal to a few ulps
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-6)


def test_load_weights_strict_and_not_strict(tmp_path):
    path = tmp_path / "headless.safetensors"
    headless = {k: v for k, v in _tiny().state_dict().items() if not k.startswith("head.")}
    safetensors.torch.save_file(headless, str(path))
    with pytest.raises(RuntimeError, match="head.weight"):
        load_weights(_tiny(), path)
    result = load_weights(_tiny(), path, strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and result.unexpected_keys == []


def test_load_weights_errors(tmp_path):
    unknown = tmp_path / "weights.npz"
    unknown.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"unknown extension '\.npz'.*\.safetensors"):
        load_weights(_tiny(), unknown)
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        load_weights(_tiny(), missing)


def test_images_smaller_than_a_patch_are_refused():
    with pytest.raises(ValueError, match=r"img_size \(8, 8\) is smaller than patch_size \(16, 16\): no patch fits"):
        VisionTransformer(img_size=8, patch_size=16, embed_dim=32, depth=1, num_heads=2)
