"""Small experts and an independent re-derivation of pMoE from SPEC.md, shared by the tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention as TimmAttention
from timm.models.vision_transformer import Block as TimmBlock
from torch.utils._python_dispatch import TorchDispatchMode

IMG = 112  # divisible by 16 (7x7 patches) and by 14 (8x8 patches)


class OwnBlock(TimmBlock):
    """A ViT block whose forward computes something else than its parts (what an adapter running
    the parts would silently skip)."""

    def forward(self, x, attn_mask=None, is_causal=False):
        return 0.5 * super().forward(x)


class OwnAttention(TimmAttention):
    def forward(self, x, attn_mask=None, is_causal=False):
        return 2.0 * super().forward(x, attn_mask, is_causal)


class OwnLinear(torch.nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x)


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


# The suite's compiles for sm_90 (tests/sm90_compile.py), each a subprocess without
# TRITON_INTERPRET. conftest.py starts those whose tests are selected when the session begins, at
# low priority, so that a cold Triton cache compiles beside the interpreted tests (mostly one
# thread on CI's two cores) instead of before the tests that read them; those run last
# (conftest.py) and wait here for what is left.
SM90_JOBS = {
    # job: the tests that read it, as (test file, test function)
    "variants:dispatch": {("test_triton_dispatch.py", "test_variant_compiles_for_sm90")},
    "launched": {("test_triton_dispatch.py", "test_model_launches_compile_for_sm90_within_spill_budgets")},
    "variants:dispatch_moe": {("test_triton_dispatch_moe.py", "test_variant_compiles_for_sm90")},
    "usage:layer_norm": {
        ("test_triton_layer_norm.py", "test_every_variant_compiles_for_sm90"),
        ("test_triton_layer_norm.py", "test_model_variants_spill_nothing"),
    },
}
_SM90_RUNNING: dict[str, subprocess.Popen] = {}
_SM90_RESULTS: dict = {}


def _reader(item) -> tuple[str, str]:
    """A pytest item as SM90_JOBS names its readers: (test file, test function)."""
    return os.path.basename(str(item.path)), item.originalname


def reads_sm90_job(item) -> bool:
    """Whether the pytest ``item`` is one of SM90_JOBS' readers."""
    return any(_reader(item) in readers for readers in SM90_JOBS.values())


def start_sm90_jobs(items) -> None:
    """Starts, in the background, every job of SM90_JOBS that one of the pytest ``items`` reads."""
    selected = {_reader(item) for item in items}
    for job, readers in SM90_JOBS.items():
        if readers & selected:
            _start_sm90(job)


def stop_sm90_jobs() -> None:
    """Kills the jobs still running (a session that ends early, or deselected readers)."""
    for proc in _SM90_RUNNING.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    _SM90_RUNNING.clear()


def _start_sm90(job: str) -> None:
    if job in _SM90_RUNNING or job in _SM90_RESULTS:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []  # not preexec_fn: threads may be running
    _SM90_RUNNING[job] = subprocess.Popen(
        [*nice, sys.executable, os.path.join(root, "tests", "sm90_compile.py"), job], cwd=root, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def sm90_job(job: str):
    """The JSON result of one job of tests/sm90_compile.py, waiting for it (starting it first if
    the session did not): lists of pairs come back as lists of tuples."""
    if job not in _SM90_RESULTS:
        _start_sm90(job)
        proc = _SM90_RUNNING.pop(job)
        stdout, stderr = proc.communicate(timeout=1800)
        assert proc.returncode == 0, f"tests/sm90_compile.py {job} failed:\n{stderr[-4000:]}"
        result = json.loads(stdout)
        _SM90_RESULTS[job] = [tuple(item) for item in result] if isinstance(result, list) else result
    return _SM90_RESULTS[job]


class WorkLog(TorchDispatchMode):
    """The torch ops that do work (beyond allocating, viewing and splitting) while it is active,
    the Triton dispatchers' operators seen through to the ops their bodies run. Zeroed
    allocations (a memset) count as allocations, and so does a copy from host memory: the token
    ranges (K x 2 ints; ``_token_ranges``), with the forward's zeroed arrival counters
    (``_ranges_and_counters``)."""

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
