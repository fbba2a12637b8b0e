"""The batched block's LayerNorm of K experts, each with its own affine, the two ways the fast
model can run it (``PMoE(layer_norm=...)``), side by side in one run, forward and
forward+backward:

- "torch": ``F.layer_norm`` without an affine, then the K affines in a second pass
  (``torch.addcmul``), as ``kernels/layer_norm.py``'s reference;
- "triton": one kernel each way (``kernels/layer_norm.py``).

    python -m pytest benchmarks/bench_layer_norm.py --benchmark-columns=median,iqr,min,rounds

K = 6 ViT-B/16 experts (D = 768), B = 32, T = 197 + 10, bf16. Needs a CUDA GPU (under Triton's CPU
interpreter the kernel's time says nothing). ``extra_info`` holds the bytes the op must move:
x read and y written forward, x and dL/dy read and dL/dx written backward.
"""

from __future__ import annotations

import pytest
import torch

K, B, T, D = 6, 32, 207, 768


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("way", ["torch", "triton"])
def test_layer_norm(benchmark, environment, way, mode):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: Triton's CPU interpreter checks correctness, not speed")
    from pmoe_fast.kernels import layer_norm as ln

    torch.manual_seed(0)
    dtype = torch.bfloat16
    backward = mode == "fwd+bwd"
    x = torch.randn(K, B, T, D, device="cuda", dtype=dtype, requires_grad=backward)
    weight = torch.randn(K, D, device="cuda", dtype=dtype)
    bias = torch.randn(K, D, device="cuda", dtype=dtype)
    grad = torch.randn_like(x)
    fn = ln.layer_norm if way == "triton" else ln.layer_norm_reference

    def run():
        if backward:
            x.grad = None
            fn(x, weight, bias, 1e-6).backward(grad)
        else:
            with torch.no_grad():
                fn(x, weight, bias, 1e-6)
        torch.cuda.synchronize()

    run()
    benchmark.pedantic(run, warmup_rounds=3, rounds=20, iterations=1)
    moved = x.numel() * x.element_size() * (5 if backward else 2)
    benchmark.extra_info.update(way=way, mode=mode, K=K, B=B, T=T, D=D, dtype="bf16", bytes_moved=moved,
                                GB_per_s=moved / benchmark.stats.stats.median / 1e9, **environment)
