"""Prompts into the experts' sequences, the two ways a batched model can: the fused dispatcher
writing its IPTs into the sequences' prompt slots in place (``Dispatcher.dispatch_into``, what
``pmoe_fast.PMoE`` runs), against the dispatcher's output concatenated with the tokens into new
sequences (what it ran before), side by side in one run, forward and forward+backward.

    python -m pytest benchmarks/bench_dispatch_into.py --benchmark-json=dispatch_into.json

K = 6 experts, Np = 10, T = 197, D = 768, H = 64 (ViT-B/16); on a GPU B = 32 and bf16 sequences,
on a CPU B = 8 and fp32; the backend "auto" picks for the device (cpp on a CPU). Both ways start
from ``seq = base * 1``, standing in for the block whose output the sequences are, so that the
in-place write has a tensor it may write into; its cost is in both.
"""

from __future__ import annotations

import os

import pytest
import torch

from pmoe_fast.dispatcher import Dispatcher

K, NP, T, D, H = 6, 10, 197, 768, 64


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("way", ["concatenate", "in-place"])
def test_dispatch_into(benchmark, environment, way, mode):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("PMOE_BACKEND") == "triton":
        pytest.skip("triton: the interpreter checks correctness, not speed")
    B, dtype = (32, torch.bfloat16) if device.type == "cuda" else (8, torch.float32)
    torch.manual_seed(0)
    disp = Dispatcher(D, K, hidden=H).to(device)
    backward = mode == "fwd+bwd"
    prompts = torch.randn(K, NP, D, device=device, requires_grad=backward)
    base = torch.randn(K, B, NP + T, D, device=device, dtype=dtype, requires_grad=backward)
    grad = torch.randn(K, B, NP + T, D, device=device, dtype=dtype)

    def step():
        seq = base * 1
        if way == "in-place":
            out, _ = disp.dispatch_into(prompts, seq, True, 1)
        else:
            ipt, _ = disp(prompts, seq[:, :, NP:], seq[:, :, :NP], 1)
            out = torch.cat([ipt.to(dtype), seq[:, :, NP:]], dim=2)
        return out

    def run():
        if backward:
            for t in (prompts, base, *disp.parameters()):
                t.grad = None
            step().backward(grad)
        else:
            with torch.no_grad():
                step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()
    assert disp.last_backend != "torch", "the fused dispatcher is what this compares"
    benchmark.pedantic(run, warmup_rounds=2, rounds=10, iterations=1)
    benchmark.extra_info.update(
        way=way, mode=mode, backend=disp.last_backend, K=K, B=B, Np=NP, T=T, D=D, H=H,
        dtype=str(dtype).removeprefix("torch."), **environment,
    )
