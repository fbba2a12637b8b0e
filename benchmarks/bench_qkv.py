"""The attention's input projection of a batched block, the two ways its backward can run, side by
side in one run, forward+backward through attention:

- "unbind": the projection's output split into q, k and v by views and ``unbind``, as timm does;
  autograd stacks the three gradients into a new tensor and copies that again for the view,
  then one product gives the input's gradient;
- "per-part": ``pmoe_fast.frozen_linear.qkv_heads`` (what ``pmoe_fast.PMoE`` runs), one product
  per gradient accumulated into the input's gradient.

    python -m pytest benchmarks/bench_qkv.py --benchmark-columns=median,iqr,min,rounds

On a GPU K = 6 ViT-B/16 blocks' attention (D = 768, 12 heads), B = 32, bf16; on a CPU K = 3
ViT-Ti (D = 192, 3 heads), B = 8, fp32. T = 197 tokens + 10 prompts.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pmoe_fast.frozen_linear import _split_heads, linear, qkv_heads

T = 197 + 10


@pytest.mark.parametrize("way", ["unbind", "per-part"])
def test_qkv_backward(benchmark, environment, way):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    K, B, D, heads, dtype = (6, 32, 768, 12, torch.bfloat16) if device.type == "cuda" else (3, 8, 192, 3, torch.float32)
    torch.manual_seed(0)
    x = torch.randn(K, B, T, D, device=device, dtype=dtype, requires_grad=True)
    layer = (torch.randn(K, 3 * D, D, device=device, dtype=dtype).mul_(D**-0.5).transpose(1, 2),
             torch.randn(K, 1, 3 * D, device=device, dtype=dtype))
    grad = torch.randn(K * B, heads, T, D // heads, device=device, dtype=dtype)

    def run():
        x.grad = None
        if way == "unbind":
            q, k, v = _split_heads(linear(x.view(K, B * T, D), layer), K * B, T, heads, 3)
        else:
            q, k, v = qkv_heads(x, layer, heads)
        F.scaled_dot_product_attention(q, k, v).backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, warmup_rounds=2, rounds=10, iterations=1)
    benchmark.extra_info.update(way=way, K=K, B=B, T=T, D=D, heads=heads, dtype=str(dtype).removeprefix("torch."),
                                **environment)
