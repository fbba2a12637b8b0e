"""Frozen pMoE experts: one adapter over timm's ``VisionTransformer`` and ``pmoe_fast.vit``'s.

pMoE needs four things from each pre-trained ViT (SPEC.md, "One forward pass"): its own embedding
of the images (patch embed, prefix tokens, position embedding, pre-norm), each block run on a
sequence that holds prompt tokens after the prefix, its final norm and pooling with the prompts
left out, and its shape (width, depth, prefix-token count, patch size). ``Expert`` gets them by
calling the backbone's public pieces and looping over its blocks, so timm is never forked and a
timm model and ours with the same ``state_dict`` behave the same.

The adapter freezes the backbone in place: ``requires_grad=False`` on every weight and eval mode
(no dropout, no drop-path). ``PMoE.train()`` keeps experts in eval mode.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import attention as attention_backends
from .frozen_linear import qkv_heads
from .vit import Attention, Block, PatchEmbed, VisionTransformer

SUPPORTED_POOLS = ("token", "avg")


@dataclass(frozen=True)
class ExpertInfo:
    """The shape of one expert, as pMoE sees it."""

    embed_dim: int  # D
    depth: int  # L
    num_heads: int
    num_prefix_tokens: int  # Q_k: class token + register tokens
    num_patches: int  # N_k
    patch_size: int
    img_size: tuple[int, int]
    in_chans: int
    global_pool: str  # "token" or "avg"


def _missing(obj: object, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not hasattr(obj, n)]


def is_stock(module: nn.Module | None, method: str, ours: type, timm_module: str = "timm.layers") -> bool:
    """Whether ``module``'s class takes ``method`` from ``ours`` (pmoe_fast.vit's class, or
    torch's) or from timm's class of the same name: a subclass that overrides it may compute
    anything."""
    if module is None:
        return False
    stock = {getattr(ours, method)}
    timm_class = getattr(sys.modules.get(timm_module), ours.__name__, None)
    if timm_class is not None:
        stock.add(getattr(timm_class, method))
    return getattr(type(module), method, None) in stock


def block_reason(block: nn.Module) -> str | None:
    """Why ``Expert.block`` cannot run this block as the block itself would, or None. It runs the
    pre-norm block's parts (norm1, the attention's qkv, norms and proj, ls1, drop_path1, norm2,
    mlp, ls2, drop_path2) with its own attention kernel, so a block or attention class that
    computes its own forward would be silently replaced."""
    lacks = _missing(block, ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"))
    attn = getattr(block, "attn", None)
    if attn is not None:
        lacks += [f"attn.{n}" for n in _missing(attn, ("qkv", "q_norm", "k_norm", "proj", "num_heads", "head_dim"))]
    if lacks:
        return f"it lacks {lacks}"
    if getattr(attn, "gate", None) is not None:
        return "its attention is gated"
    if not is_stock(block, "forward", Block, "timm.models.vision_transformer"):
        return f"{type(block).__name__} has its own forward, not the pre-norm ViT block's"
    if not is_stock(attn, "forward", Attention, "timm.models.vision_transformer"):
        return f"its attention {type(attn).__name__} has its own forward, not timm's Attention's"
    if not is_stock(attn.qkv, "forward", nn.Linear):
        return f"its attention's qkv is a {type(attn.qkv).__name__}, not a Linear: its forward would not run"
    return None


def _check_block(model: nn.Module, index: int, block: nn.Module) -> tuple:
    """Raise a TypeError naming the problem when ``block_reason`` refuses block ``index`` of
    ``model``; else what ``Expert.block`` compares to see it replaced: the block, its attention
    and qkv."""
    reason = block_reason(block)
    if reason:
        raise TypeError(
            f"block {index} of {type(model).__name__} ({type(block).__name__}) is not a pre-norm ViT "
            f"block pMoE supports: {reason}. Use timm's or pmoe_fast.vit's Block and Attention."
        )
    return _block_parts(block)


def _block_parts(block: nn.Module) -> tuple:
    attn = block._modules.get("attn")
    return block, attn, attn._modules.get("qkv") if attn is not None else None


class Expert:
    """A frozen ViT as a pMoE expert. Holds a reference to the module; it is not a module itself,
    so the backbone's ``state_dict`` keys stay timm's own under ``experts.{k}``.

    Args:
        model: a timm ``VisionTransformer`` or a ``pmoe_fast.vit.VisionTransformer``.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"an expert must be an nn.Module (a ViT), got {type(model).__name__}")
        missing = _missing(
            model,
            ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens", "embed_dim"),
        )
        if missing:
            raise TypeError(
                f"{type(model).__name__} is not a ViT pMoE can use as an expert: it lacks {missing}. "
                "Use timm's VisionTransformer or pmoe_fast.vit.VisionTransformer."
            )
        pool = getattr(model, "global_pool", "token")
        if getattr(model, "attn_pool", None) is not None or pool not in SUPPORTED_POOLS:
            raise ValueError(
                f"expert pooling {pool!r} is not supported; pMoE pools each expert with "
                f"one of {SUPPORTED_POOLS} (create the model with global_pool='token' or 'avg')"
            )
        if getattr(model, "dynamic_img_size", False):
            raise ValueError("experts with dynamic_img_size=True are not supported; create them with a fixed img_size")
        if not is_stock(model.patch_embed, "forward", PatchEmbed):
            raise TypeError(
                f"the patch embedding of {type(model).__name__} is a {type(model.patch_embed).__name__}, not a "
                "plain PatchEmbed: hybrid (CNN-stem) ViTs and other embeddings are not supported as experts"
            )
        self._checked_blocks = [_check_block(model, i, block) for i, block in enumerate(model.blocks)]

        pe = model.patch_embed
        if int(pe.num_patches) < 1:
            raise ValueError(
                f"{type(model).__name__} has no patch token: img_size {tuple(pe.img_size)} is smaller than its patch "
                f"size {tuple(pe.patch_size)}; build it with a larger img_size"
            )
        model.requires_grad_(False)
        model.eval()
        self.module = model
        self._projected, self._projection = pe.proj, patch_projection(pe)
        self.info = ExpertInfo(
            embed_dim=int(model.embed_dim),
            depth=len(model.blocks),
            num_heads=int(model.blocks[0].attn.num_heads) if len(model.blocks) else 0,
            num_prefix_tokens=int(model.num_prefix_tokens),
            num_patches=int(pe.num_patches),
            patch_size=int(pe.patch_size[0]),
            img_size=tuple(int(s) for s in pe.img_size),
            in_chans=int(pe.proj.in_channels),
            global_pool=pool,
        )

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a ValueError naming the problem when ``images`` cannot go through this expert."""
        info = self.info
        expected = f"(B, {info.in_chans}, {info.img_size[0]}, {info.img_size[1]})"
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a 4-D tensor {expected}, got {got}")
        if not images.is_floating_point():
            raise ValueError(
                f"images must be floating point, got {images.dtype}: convert them with "
                "images.float() and normalise them as the experts expect"
            )
        if images.shape[1] != info.in_chans or tuple(images.shape[2:]) != info.img_size:
            raise ValueError(f"images must have shape {expected}, got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError(f"images hold no image: shape {tuple(images.shape)}, expected {expected} with B >= 1")

    def embed(self, images: torch.Tensor, patches_as_matmul: bool = False) -> torch.Tensor:
        """Z^0: the backbone's own embedding. images (B, C, H, W) -> (B, Q + N, D).

        ``patches_as_matmul`` (the fast model's) takes the patch projection as one matrix product
        over the images' patches where ``patch_projection`` can (the same sums as the backbone's
        convolution, whose kernel covers one patch); otherwise, and in the reference, the backbone's
        own ``patch_embed`` runs."""
        m = self.module
        proj = self.patch_projection if patches_as_matmul else None
        if proj is not None:
            x = m.patch_embed.norm(patch_tokens(images, proj))
        else:
            x = m.patch_embed(images)
        x = m._pos_embed(x)
        x = m.patch_drop(x) if hasattr(m, "patch_drop") else x
        return m.norm_pre(x) if hasattr(m, "norm_pre") else x

    @property
    def patch_projection(self) -> nn.Conv2d | None:
        """``patch_projection`` of the backbone's patch embedding, found again when its ``proj``
        was replaced since the last call."""
        current = getattr(self.module.patch_embed, "proj", None)
        if current is not self._projected:
            self._projected, self._projection = current, patch_projection(self.module.patch_embed)
        return self._projection

    def block(
        self,
        index: int,
        x: torch.Tensor,
        attn_scale: float | torch.Tensor | None = None,
        attn_backend: str | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Run block ``index`` on x (B, T, D). ``attn_scale`` replaces the softmax scale
        head_dim**-0.5 (GaPT's temperature divides it) and ``attn_backend`` picks the attention
        kernel (``pmoe_fast.attention``); with neither, the block runs its own forward.

        ``rows`` returns only the outputs of x[:, rows], (B, R, D): every token is still a key and
        a value of attention, but only those rows are queries and go through the MLP. The output
        equals ``block(x)[:, rows]``; the fast model uses it for the last block, whose pooling
        reads one token.

        A block, attention or qkv replaced since wrapping is checked as the constructor checks
        them (``block_reason``) before it runs part by part: one that computes its own forward
        raises a TypeError rather than be silently skipped."""
        block = self.module.blocks[index]
        if attn_scale is None and attn_backend is None and rows is None:
            return block(x)
        if not all(map(operator.is_, _block_parts(block), self._checked_blocks[index])):
            self._checked_blocks[index] = _check_block(self.module, index, block)
        scale = block.attn.head_dim**-0.5 if attn_scale is None else attn_scale
        h = attention(block.attn, block.norm1(x), scale, attn_backend or "sdpa", rows)
        x = x if rows is None else x[:, rows]
        x = x + block.drop_path1(block.ls1(h))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    @property
    def pool_reads_first_token(self) -> bool:
        """Whether ``pool`` reads only the first token (class-token pooling after a token-wise
        final norm, through timm's or pmoe_fast.vit's own ``forward_head``: a subclass may read
        more, as timm's distilled DeiT reads two), so the last block's other outputs are never used. Read from the module, as
        ``pool`` does: ``reset_classifier(..., global_pool=...)`` may change it after wrapping."""
        norm = self.module.norm
        timm_vit = getattr(sys.modules.get("timm.models.vision_transformer"), "VisionTransformer", None)
        stock_head = any(
            cls is not None and all(getattr(type(self.module), f, None) is getattr(cls, f, None) for f in ("forward_head", "pool"))
            for cls in (VisionTransformer, timm_vit)
        )
        return (
            stock_head and getattr(self.module, "global_pool", "token") == "token"
            and isinstance(norm, (nn.LayerNorm, nn.Identity))
        )

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and pooling of the non-prompt tokens x (B, Q + N, D) -> (B, D)."""
        return self.module.forward_head(self.module.norm(x), pre_logits=True)


def patch_projection(patch_embed: nn.Module) -> nn.Conv2d | None:
    """The patch embedding's convolution when the embedding is that convolution over
    non-overlapping patches of a fixed image size, flattened to tokens and normed
    (``pmoe_fast.vit``'s ``PatchEmbed``, and timm's as its ViTs build it), so that
    ``patch_tokens`` computes it; else None.

    At B = 1 on an H100, cuDNN took 82 us for a ViT-B/16's convolution, plus two kernels that pad
    its 3 input channels to 8 (benchmarks/results/profile_infer_h100.txt), where the blocks'
    products of the same size, 197 x 768 x 768, took 6-8 us."""
    timm_patch_embed = getattr(sys.modules.get("timm.layers"), "PatchEmbed", None)
    if type(patch_embed) is not PatchEmbed and not (
        timm_patch_embed is not None
        and type(patch_embed) is timm_patch_embed
        and patch_embed.flatten
        and not patch_embed.dynamic_img_pad
        and patch_embed.strict_img_size
    ):
        return None
    proj = getattr(patch_embed, "proj", None)
    img_size = getattr(patch_embed, "img_size", None)
    if type(proj) is not nn.Conv2d or img_size is None:
        return None
    kernel = tuple(proj.kernel_size)
    if (
        tuple(proj.stride) != kernel or tuple(proj.padding) != (0, 0) or tuple(proj.dilation) != (1, 1)
        or proj.groups != 1 or any(size % k for size, k in zip(img_size, kernel))
    ):
        return None
    return proj


def patch_tokens(images: torch.Tensor, proj: nn.Conv2d) -> torch.Tensor:
    """``proj(images).flatten(2).transpose(1, 2)`` as one matrix product: images (B, C, H, W), H
    and W multiples of the kernel (p_h, p_w) that is also the stride -> tokens (B, N, D), row-major
    over the patch grid as the convolution's output."""
    B, C, H, W = images.shape
    ph, pw = proj.kernel_size
    D = proj.out_channels
    # (B, C, H/p_h, p_h, W/p_w, p_w) -> one row per patch, its columns ordered (C, p_h, p_w) as
    # the convolution's weight (D, C, p_h, p_w) is.
    cols = images.reshape(B, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(-1, C * ph * pw)
    weight = proj.weight.reshape(D, -1).t()
    out = cols @ weight if proj.bias is None else torch.addmm(proj.bias, cols, weight)
    return out.view(B, -1, D)


def attention(
    attn: nn.Module, x: torch.Tensor, scale: float | torch.Tensor, backend: str = "sdpa", rows: slice | None = None
) -> torch.Tensor:
    """timm's Attention forward (eval mode) with the softmax scale and the attention backend
    given: x (B, T, D) -> (B, T, D), or (B, R, D) for the query rows x[:, rows] only (keys and
    values still come from every token; the query and key-value parts of qkv run separately).
    q, k and v come from ``qkv_heads``, whose backward does not stack their gradients."""
    B, T, _ = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    w, b = attn.qkv.weight, attn.qkv.bias
    if rows is None:
        q, k, v = qkv_heads(x[None], _stacked(w, b), heads)
    else:
        D = heads * hd
        q = F.linear(x[:, rows], w[:D], None if b is None else b[:D])
        q = q.reshape(B, q.shape[1], heads, hd).transpose(1, 2)
        k, v = qkv_heads(x[None], _stacked(w[D:], None if b is None else b[D:]), heads, parts=2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = attention_backends.attention(q, k, v, scale, backend)
    out = out.transpose(1, 2).reshape(B, q.shape[2], heads * hd)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    return attn.proj_drop(attn.proj(out))


def _stacked(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """An nn.Linear's weight (out, in) and bias (out,) as ``pmoe_fast.frozen_linear`` takes one
    expert's: weight^T (1, in, out), bias (1, 1, out) or None; views."""
    return weight.t()[None], None if bias is None else bias[None, None]
