"""A plain Vision Transformer that is a drop-in twin of timm's ``VisionTransformer``.

pMoE's experts are frozen, pre-trained ViTs whose checkpoints use timm's ``state_dict`` keys
(SPEC.md, ``experts.{k}.<timm key>``). This module re-writes the part of
``timm/models/vision_transformer.py`` that pMoE needs, with timm's constructor arguments,
module names and keys, so that ``ours.load_state_dict(timm_model.state_dict())`` works
strictly and both compute the same function. timm stays an optional dependency.

The file reads top to bottom: small layers (patch embedding, attention, MLP, layer scale,
drop path), the transformer ``Block``, the ``VisionTransformer``, named factories with
``create_model``, and ``load_weights`` for checkpoint files.

Shapes: B images, C channels, H x W pixels, D = embed_dim, N patches, Q prefix tokens
(class + register tokens), T = Q + N tokens, heads h of width head_dim.
"""

import os
from collections.abc import Callable, Mapping
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SUPPORTED_GLOBAL_POOLS",
    "PatchEmbed",
    "Attention",
    "Mlp",
    "LayerScale",
    "DropPath",
    "QuickGELU",
    "Block",
    "VisionTransformer",
    "create_model",
    "load_weights",
    "vit_tiny_patch16_224",
    "vit_small_patch16_224",
    "vit_base_patch16_224",
    "vit_large_patch16_224",
    "vit_tiny_patch14_224",
    "vit_small_patch14_224",
    "vit_base_patch14_224",
    "vit_large_patch14_224",
]

SUPPORTED_GLOBAL_POOLS = ("token", "avg", "")


def _to_2tuple(value: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    height, width = value
    return int(height), int(width)


class QuickGELU(nn.Module):
    """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x) (timm's ``quick_gelu``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACT_LAYERS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


def _resolve_act_layer(act_layer: str | Callable[[], nn.Module] | None) -> Callable[[], nn.Module]:
    if act_layer is None:
        return nn.GELU
    if isinstance(act_layer, str):
        if act_layer.lower() not in _ACT_LAYERS:
            raise ValueError(
                f"unknown act_layer {act_layer!r}; use one of {sorted(_ACT_LAYERS)} or an nn.Module class"
            )
        return _ACT_LAYERS[act_layer.lower()]
    return act_layer


class PatchEmbed(nn.Module):
    """Image to patch tokens with a strided Conv2d: (B, C, H, W) -> (B, N, D), N = (H/p) * (W/p).

    Checks its input, so every path into the model (``forward`` or the pieces called one by
    one, as pMoE's experts do) reports wrong images clearly.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
    ):
        super().__init__()
        self.img_size = _to_2tuple(img_size)
        self.patch_size = _to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if self.num_patches == 0:
            raise ValueError(f"img_size {self.img_size} is smaller than patch_size {self.patch_size}: no patch fits")
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.norm = nn.Identity()

    def check_images(self, x: torch.Tensor) -> None:
        """Raise a TypeError or ValueError naming what was expected when x is not (B, C, H, W) floats."""
        channels = self.proj.in_channels
        expected = f"(B, {channels}, {self.img_size[0]}, {self.img_size[1]})"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor of shape {expected}, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(
                f"images must be a floating-point tensor, got dtype {x.dtype}: convert them to float "
                "(e.g. images.float() / 255) and normalise them with the model's mean and std"
            )
        if x.dim() != 4 or x.shape[1] != channels or tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"images must have shape {expected}, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> patch tokens (B, N, D)."""
        self.check_images(x)
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection: (B, T, D) -> (B, T, D).

    Args:
        dim: token width D.
        num_heads: h; D must be divisible by h.
        qkv_bias: bias on the qkv projection.
        qk_norm: normalise q and k per head (``norm_layer(head_dim)``) before the product.
        attn_drop: dropout on the attention weights (training only).
        proj_drop: dropout after the output projection.
        norm_layer: builds a norm from a width.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, scale: float | torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D): softmax(q k^T * scale) v per head, then the projection.

        ``scale`` replaces the softmax scale ``head_dim ** -0.5`` (None keeps it). A tensor
        scale (a learnable temperature; a scalar, or (h, 1, 1) for one per head) is folded
        into q so that it receives a gradient: ``scaled_dot_product_attention`` takes its own
        ``scale`` only as a Python float.
        """
        B, T, _ = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, T, head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if isinstance(scale, torch.Tensor):
            q, scale = q * scale.to(q.dtype), 1.0
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0, scale=scale
        )
        x = x.transpose(1, 2).reshape(B, T, self.attn_dim)
        x = self.norm(x)
        x = self.proj(x)
        return self.proj_drop(x)


class Mlp(nn.Module):
    """Token-wise MLP fc1 -> act -> fc2 with dropout after each: (B, T, D) -> (B, T, D)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
    ):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma`` (D,), initialised to ``init_values`` (CaiT, DINOv2)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a whole sample's residual branch with probability
    ``drop_prob`` and scale the kept ones by 1 / (1 - drop_prob). x (B, ...) -> same shape."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            mask.div_(keep_prob)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Block(nn.Module):
    """Pre-norm transformer block: (B, T, D) -> (B, T, D).

    x = x + drop_path1(ls1(attn(norm1(x)))); x = x + drop_path2(ls2(mlp(norm2(x)))).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            norm_layer=norm_layer,
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2021) with timm's arguments, names and keys.

    images (B, C, H, W) -> ``forward_features`` (B, T, D) -> ``forward_head`` (B, num_classes),
    or (B, D) with ``pre_logits=True``. T = Q + N with Q = class token + register tokens.

    Args (as timm's ``VisionTransformer``):
        img_size, patch_size, in_chans: input geometry; images must match it exactly.
        num_classes: head outputs; 0 makes the head an Identity.
        global_pool: 'token' (class token), 'avg' (mean of the patch tokens) or '' (no pooling).
        embed_dim, depth, num_heads, mlp_ratio: width D, blocks L, heads, MLP hidden = D * mlp_ratio.
        qkv_bias, qk_norm: qkv projection bias; per-head q/k normalisation.
        init_values: layer scale initial value; None (or 0) disables layer scale.
        class_token: prepend a class token.
        no_embed_class: position embeddings cover the patches only (DeiT-3, DINOv2); prefix
            tokens get none.
        reg_tokens: number of register tokens, placed after the class token.
        pre_norm: norm after the embedding (CLIP); also drops the patch-embed bias, as timm does.
        fc_norm: put the final norm after pooling instead of before; None means global_pool == 'avg'.
        drop_rate, pos_drop_rate, proj_drop_rate, attn_drop_rate: dropout on the head input,
            after the position embedding, after projections, on attention weights.
        drop_path_rate: stochastic depth, rising linearly from 0 at block 0 to this at block L-1.
        act_layer: MLP activation: 'gelu', 'quick_gelu' or a module class; None means GELU.
        norm_layer: builds a norm from a width; None means LayerNorm with eps 1e-6.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        act_layer: str | Callable[[], nn.Module] | None = None,
        norm_layer: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        if global_pool not in SUPPORTED_GLOBAL_POOLS:
            raise ValueError(
                f"global_pool {global_pool!r} is not supported; use one of {SUPPORTED_GLOBAL_POOLS} "
                "('token': class token, 'avg': mean of patch tokens, '': no pooling)"
            )
        if global_pool == "token" and not class_token:
            raise ValueError(
                "global_pool='token' needs the class token; use class_token=True or global_pool='avg'"
            )
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = _resolve_act_layer(act_layer)

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.patch_drop = nn.Identity()
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()

        # timm's stochastic depth schedule, computed the same way so the rates are bit-identical;
        # on the CPU so that building under torch.device("meta") works
        drop_path_rates = [rate.item() for rate in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.Sequential(*[
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                init_values=init_values,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=drop_path_rates[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
            )
            for i in range(depth)
        ])
        self.norm = nn.Identity() if use_fc_norm else norm_layer(embed_dim)
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """timm's default scheme: truncated normal (std .02) for Linear weights and the position
        embedding, zero biases, prefix tokens near zero. Conv, norms and layer scale keep the
        initialisation their constructors gave them."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add position embeddings and prepend the prefix tokens: (B, N, D) -> (B, T, D).

        Order: [class token, register tokens, patches]. With ``no_embed_class`` the embedding
        covers the patches only (added before the concatenation), otherwise all T tokens.
        """
        prefix = []
        if self.cls_token is not None:
            prefix.append(self.cls_token.expand(x.shape[0], -1, -1))
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        if self.no_embed_class:
            x = x + self.pos_embed
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
        else:
            if prefix:
                x = torch.cat(prefix + [x], dim=1)
            x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> normalised tokens (B, T, D)."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """Tokens (B, T, D) -> (B, D) for 'token' and 'avg', unchanged (B, T, D) for ''.

        ``pool_type`` overrides ``self.global_pool`` for this call.
        """
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        if pool_type == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        if pool_type == "":
            return x
        raise ValueError(f"pool_type {pool_type!r} is not supported; use one of {SUPPORTED_GLOBAL_POOLS}")

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, T, D) -> logits (B, num_classes), or pooled features (B, D) if pre_logits."""
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
}
_MODEL_ARGS = {
    f"vit_{size}_patch{patch}_224": dict(patch_size=patch, **args)
    for patch in (16, 14)
    for size, args in _SIZES.items()
}


MODEL_NAMES = tuple(_MODEL_ARGS)


def create_model(name: str, **kwargs) -> VisionTransformer:
    """Build the named architecture (randomly initialised); ``kwargs`` override its defaults."""
    if name not in _MODEL_ARGS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(_MODEL_ARGS)}")
    return VisionTransformer(**{**_MODEL_ARGS[name], **kwargs})


def vit_tiny_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-Ti/16: D=192, 12 blocks, 3 heads."""
    return create_model("vit_tiny_patch16_224", **kwargs)


def vit_small_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-S/16: D=384, 12 blocks, 6 heads."""
    return create_model("vit_small_patch16_224", **kwargs)


def vit_base_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-B/16: D=768, 12 blocks, 12 heads."""
    return create_model("vit_base_patch16_224", **kwargs)


def vit_large_patch16_224(**kwargs) -> VisionTransformer:
    """ViT-L/16: D=1024, 24 blocks, 16 heads."""
    return create_model("vit_large_patch16_224", **kwargs)


def vit_tiny_patch14_224(**kwargs) -> VisionTransformer:
    """ViT-Ti/14: D=192, 12 blocks, 3 heads."""
    return create_model("vit_tiny_patch14_224", **kwargs)


def vit_small_patch14_224(**kwargs) -> VisionTransformer:
    """ViT-S/14: D=384, 12 blocks, 6 heads."""
    return create_model("vit_small_patch14_224", **kwargs)


def vit_base_patch14_224(**kwargs) -> VisionTransformer:
    """ViT-B/14: D=768, 12 blocks, 12 heads."""
    return create_model("vit_base_patch14_224", **kwargs)


def vit_large_patch14_224(**kwargs) -> VisionTransformer:
    """ViT-L/14: D=1024, 24 blocks, 16 heads."""
    return create_model("vit_large_patch14_224", **kwargs)


_SAFETENSORS_SUFFIXES = (".safetensors",)
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True):
    """Load a checkpoint file into ``model``; returns ``model.load_state_dict``'s result
    (``missing_keys``, ``unexpected_keys``).

    ``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin`` with
    ``torch.load(weights_only=True)`` (tensors only, no pickled code). A checkpoint that wraps
    its weights as ``{'state_dict': ...}`` or ``{'model': ...}`` is unwrapped.
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SAFETENSORS_SUFFIXES + _TORCH_SUFFIXES:
        raise ValueError(
            f"cannot load weights from {path!r}: unknown extension {suffix!r}; "
            f"expected one of {_SAFETENSORS_SUFFIXES + _TORCH_SUFFIXES}"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weight file not found: {path}")
    if suffix in _SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file  # optional dependency, needed only here

        state_dict = load_file(path, device="cpu")
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get(key), Mapping):
            state_dict = state_dict[key]
            break
    return model.load_state_dict(state_dict, strict=strict)
