"""Small experts and an independent re-derivation of pMoE from SPEC.md, shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

IMG = 112  # divisible by 16 (7x7 patches) and by 14 (8x8 patches)


def small_vit(kind: str = "p16", dim: int = 48, depth: int = 3, heads: int = 3, **kwargs):
    """A small timm ViT with random weights: 'p16' (class token), 'p14reg' (DINOv2 style: class
    token + 4 registers, no_embed_class, layer scale) or 'clip' (/16, pre-norm, avg pool)."""
    kwargs.setdefault("img_size", IMG)
    common = dict(pretrained=False, embed_dim=dim, depth=depth, num_heads=heads, **kwargs)
    if kind == "p16":
        model = timm.create_model("vit_base_patch16_224", **common)
    elif kind == "p14reg":
        model = timm.create_model("vit_small_patch14_reg4_dinov2", **common)
    elif kind == "clip":
        model = timm.create_model("vit_base_patch16_clip_224", global_pool="avg", **common)
    else:
        raise ValueError(kind)
    # Random, non-trivial norms and layer scales so that tests see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ls" in name or "token" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def spec_dispatch(sd: dict, prefix: str, P, Z_P, Z, pool_prefix, hidden: bool):
    """SPEC.md's dispatcher for kind "mlp" with one shared f, from state_dict tensors alone.

    P (K, Np, D); Z_P (K, B, Np, D) or None; Z list of K (B, T_k, D); pool_prefix: K ints of
    prefix tokens to leave out of the mean (zeros for pool "all"). Returns (ipt, weights)."""

    def f(x):
        if hidden:
            x = F.gelu(F.linear(x, sd[prefix + "fc1.weight"], sd[prefix + "fc1.bias"]))
        return F.linear(x, sd[prefix + "fc2.weight"], sd[prefix + "fc2.bias"])

    K, Np, _ = P.shape
    ipts, ws = [], []
    for k in range(K):
        logits = f(P[k]).unsqueeze(0)  # (1, Np, K)
        if Z_P is not None:
            logits = logits + f(Z_P[k])  # (B, Np, K)
        logits = logits + f(Z[k][:, pool_prefix[k]:]).mean(1, keepdim=True)  # (B, 1, K)
        w = torch.softmax(logits, dim=-1)
        ipts.append(torch.einsum("bnj,jnd->bnd", w, P))
        ws.append(w)
    return torch.stack(ipts), torch.stack(ws)


def spec_forward(experts, sd: dict, images, num_prompts: int, prompt_layers: int, hidden: bool, pool: str = "all"):
    """The pooled, expert-averaged features of pMoE (VPT base, kind "mlp" or "none") computed from
    timm's own modules and a PMoE state_dict, with no pmoe_fast code.

    ``sd`` without "dispatchers.*" keys means dispatcher "none" (IPT_k = P_k)."""
    K, Np = len(experts), num_prompts
    Q = [m.num_prefix_tokens for m in experts]
    P_all = sd["prompts"]
    Z = [m.norm_pre(m._pos_embed(m.patch_embed(images))) for m in experts]
    Z_P = None
    for l in range(len(experts[0].blocks)):
        if l < prompt_layers:
            if any(k.startswith(f"dispatchers.{l}.") for k in sd):
                pool_prefix = Q if pool == "patches" else [0] * K
                entering, _ = spec_dispatch(sd, f"dispatchers.{l}.", P_all[l], Z_P, Z, pool_prefix, hidden)
            else:
                B = images.shape[0]
                entering = P_all[l].unsqueeze(1).expand(K, B, Np, -1)
        else:
            entering = Z_P
        outs = []
        for k, m in enumerate(experts):
            x = m.blocks[l](torch.cat([Z[k][:, : Q[k]], entering[k], Z[k][:, Q[k]:]], 1))
            outs.append(x[:, Q[k] : Q[k] + Np])
            Z[k] = torch.cat([x[:, : Q[k]], x[:, Q[k] + Np :]], 1)
        Z_P = torch.stack(outs)
    return torch.stack([m.forward_head(m.norm(z), pre_logits=True) for m, z in zip(experts, Z)]).mean(0)


def sm90_launched_usage() -> list[tuple[str, dict | str]]:
    """Registers and spills of every launch of the model's GPU configurations, compiled for sm_90a
    as Triton's runtime specializes it (``benchmarks/triton_resources.py --launched``), in a
    subprocess without TRITON_INTERPRET: (launch name, usage dict or the error)."""
    return _triton_resources_json(
        "from triton_resources import MODEL_CASES, launched_usage; "
        "print(json.dumps([r for case in MODEL_CASES for r in launched_usage(case)]))"
    )


def sm90_usage(module: str, indices: list[int]) -> list[tuple[str, dict | str]]:
    """Registers and spills of ``pmoe_fast.kernels.<module>.KERNEL_VARIANTS[i]`` for each index, as
    ptxas reports them for sm_90a (``benchmarks/triton_resources.py``), compiled in a subprocess
    without TRITON_INTERPRET: (variant name, usage dict or the error)."""
    return _triton_resources_json(
        f"from triton_resources import usage; print(json.dumps([usage({module!r}, i) for i in {list(indices)}]))"
    )


def _triton_resources_json(code: str) -> list[tuple]:
    """Runs ``code`` after ``import json`` with benchmarks/triton_resources.py importable, in a
    subprocess without TRITON_INTERPRET (the kernels must be real JITFunctions to compile), and
    returns the JSON list it prints, each item a tuple."""
    script = "import json, sys; sys.path.insert(0, 'benchmarks'); " + code
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [tuple(item) for item in json.loads(proc.stdout)]


class WorkLog(TorchDispatchMode):
    """The torch ops that do work (beyond allocating, viewing and splitting) while it is active,
    the Triton dispatchers' operators seen through to the ops their bodies run. Zeroed
    allocations (the forward's arrival counters, a memset) count as allocations, and so does a
    GPU's copy of the token ranges (K x 2 ints) from pinned host memory (``_token_ranges``)."""

    FREE = {
        "aten.empty.memory_format", "aten.empty_like.default", "aten.view.default", "aten.slice.Tensor",
        "aten.select.int", "aten.split.Tensor", "aten.split_with_sizes.default", "aten.zeros.default",
        "aten.detach.default", "aten.new_empty.default",
    }

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from pmoe_fast.kernels import dispatch as kd

        body = kd.OPERATOR_BODIES.get(str(func))
        if body is not None:  # the package's own operators: log what they run
            with self:
                return body(*args, **(kwargs or {}))
        upload = str(func) == "aten.copy_.default" and args[1].device.type == "cpu"
        if str(func) not in self.FREE and not upload:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
