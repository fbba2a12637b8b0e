"""The dispatcher of one prompt layer: every backend beside the torch backend, in one run.

    python -m pytest benchmarks/bench_dispatch.py --benchmark-columns=median,iqr,rounds \
        --benchmark-group-by=param:shape,param:mode --benchmark-json=dispatch.json

Shapes are the issue's grid (K in {2, 6, 9}, B in {1, 32}, Np in {10, 50}, T = 197, D = 768,
H = 64) on a GPU, in bf16; on a CPU B = 32 becomes B = 8 and the dtype fp32 (bf16 matrix products
are ~80x slower there), and the target shape K = 6, B = 8, Np = 10 is always in. Each case records
its shape, device and versions in ``extra_info``; on a GPU also the bytes the op must move and
the achieved GB/s. Backends that cannot serve a case are skipped with their reasons.
"""

from __future__ import annotations

import platform

import pytest
import torch

from pmoe_fast.dispatcher import Dispatcher

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32
T, D, H = 197, 768, 64
BACKENDS = ["torch", "triton", "cuda", "cpp"]
SHAPES = sorted(
    {(K, B if GPU else min(B, 8), Np) for K in (2, 6, 9) for B in (1, 32) for Np in (10, 50)} | {(6, 8, 10)}
)


def moved_bytes(K: int, B: int, Np: int, elt: int, backward: bool) -> int:
    """Bytes the op must move at least: read tokens, prompts, prompt outputs and parameters once,
    write the integrated prompts (and weights); backward also reads the tokens and output grads
    again and writes the token, prompt-output and prompt grads."""
    tokens, prompt_io = K * B * T * D * elt, K * B * Np * D * elt
    params = 3 * 4 * (H * D + H + K * H + K)
    fwd = tokens + 2 * prompt_io + K * Np * D * 4 + params + K * B * Np * K * 4
    bwd = 2 * tokens + 3 * prompt_io + 2 * K * Np * D * 4 + 2 * params
    return fwd + (bwd if backward else 0)


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "K{}-B{}-Np{}".format(*s))
def test_dispatch(benchmark, backend, mode, shape):
    K, B, Np = shape
    torch.manual_seed(0)
    disp = Dispatcher(D, K, hidden=H, backend=backend).to(DEVICE)
    prompts = torch.randn(K, Np, D, device=DEVICE, requires_grad=True)
    # The non-prompt tokens as a strided view of each expert's sequence, as a model holds them.
    seq = torch.randn(K, B, T + Np, D, device=DEVICE, dtype=DTYPE)
    tokens = seq[:, :, Np:].requires_grad_() if mode == "fwd+bwd" else seq[:, :, Np:]
    prompt_out = torch.randn(K, B, Np, D, device=DEVICE, dtype=DTYPE, requires_grad=mode == "fwd+bwd")
    reasons = disp.not_supported_reasons(backend, prompts, tokens, prompt_out)
    if reasons:
        pytest.skip(f"{backend}: " + " ".join(reasons))

    def run():
        if mode == "fwd":
            with torch.no_grad():
                disp(prompts, tokens, prompt_out, 1)
        else:
            ipt, _ = disp(prompts, tokens, prompt_out, 1)
            ipt.backward(torch.ones_like(ipt))
        sync()

    benchmark.extra_info.update(
        K=K, B=B, Np=Np, T=T, D=D, H=H, dtype=str(DTYPE), backend=backend,
        device=torch.cuda.get_device_name() if GPU else platform.processor() or platform.machine(),
        threads=torch.get_num_threads(), torch=torch.__version__,
    )
    benchmark.pedantic(run, warmup_rounds=2, rounds=20 if GPU else 5, iterations=1)
    if GPU:
        nbytes = moved_bytes(K, B, Np, seq.element_size(), mode == "fwd+bwd")
        benchmark.extra_info.update(bytes=nbytes, gbps=nbytes / benchmark.stats.stats.median / 1e9)
