"""The dispatcher of one prompt layer, for all K experts: every backend beside the torch backend
in one run, forward and forward+backward, over the profile's sweep of K, B and Np.

    python -m pytest benchmarks/bench_dispatch.py --bench-profile quick --benchmark-json=dispatch.json

The token count T and width D are those of the profile's experts, or of its ``dispatch_arch``
(ViT-B/16 at 224 px: T = 197, D = 768), H = 64; tokens in the profile's dtype, prompts and dispatcher in fp32, as in the model.
Backends that cannot serve a case (Triton and CUDA without a GPU, C++ on a GPU) are skipped with
their reasons. Each case records its shape, device and versions in ``extra_info``, and the peak
memory of one separate, untimed call, inputs included (on a GPU from the CUDA allocator, on a CPU
from ``pmoe_fast.memory.LiveTensorTracker``); on a GPU also the bytes the op must move, the
achieved GB/s, and the device time of its kernels in three profiled calls (``kernel_time_s``; the
timed median adds the host's work where the device waits for it).
"""

from __future__ import annotations

import os

import pytest
import torch

from pmoe_fast.bench import Case, REFERENCE_PROVIDER
from pmoe_fast.dispatcher import Dispatcher
from pmoe_fast.memory import CUDA_SOURCE, TRACKER_SOURCE, LiveTensorTracker
from pmoe_fast.profiling import profile_runs


def moved_bytes(K: int, B: int, Np: int, T: int, D: int, H: int, elt: int, backward: bool) -> int:
    """Bytes the op must move at least: read tokens, prompts, prompt outputs and parameters once,
    write the integrated prompts (and weights); backward also reads the tokens, the prompt
    outputs and the IPTs' gradient, and writes the token, prompt-output and prompt grads. Tokens
    and prompt outputs have ``elt`` bytes an element; the prompts, their IPTs (in the prompts'
    dtype) and the parameters are float32."""
    tokens, prompt_out, ipt = K * B * T * D * elt, K * B * Np * D * elt, K * B * Np * D * 4
    params = 3 * 4 * (H * D + H + K * H + K)
    fwd = tokens + prompt_out + ipt + K * Np * D * 4 + params + K * B * Np * K * 4
    bwd = 2 * tokens + 2 * prompt_out + ipt + 2 * K * Np * D * 4 + 2 * params
    return fwd + (bwd if backward else 0)


def test_dispatch(benchmark, dispatch_case, profile, environment):
    case = Case(**dispatch_case)
    K, B, Np, backend = case.K, case.B, case.Np, case.provider
    info = profile.expert_info(profile.dispatch_arch)
    T, D, H, Q = info.num_prefix_tokens + info.num_patches, info.embed_dim, profile.dispatch_hidden, info.num_prefix_tokens
    device = torch.device(profile.device)
    dtype = getattr(torch, profile.dtype)
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("triton: TRITON_INTERPRET=1 runs the kernels in Triton's CPU interpreter, which checks correctness, not speed")
    torch.manual_seed(0)
    disp = Dispatcher(D, K, hidden=H, backend=backend).to(device)
    backward = case.mode == "fwd+bwd"
    prompts = torch.randn(K, Np, D, device=device, requires_grad=True)
    # The non-prompt tokens as a strided view of each expert's sequence, as the fast model holds them.
    seq = torch.randn(K, B, Np + T, D, device=device, dtype=dtype)
    tokens = seq[:, :, Np:].requires_grad_() if backward else seq[:, :, Np:]
    prompt_out = torch.randn(K, B, Np, D, device=device, dtype=dtype, requires_grad=backward)
    reasons = disp.not_supported_reasons(backend, prompts, tokens, prompt_out)
    if reasons:
        pytest.skip(f"{backend}: " + " ".join(reasons))

    def run():
        if backward:
            for t in (prompts, tokens, prompt_out, *disp.parameters()):
                t.grad = None  # as a training step's zero_grad(set_to_none=True)
            ipt, _ = disp(prompts, tokens, prompt_out, Q)
            ipt.backward(torch.ones_like(ipt))
        else:
            with torch.no_grad():
                disp(prompts, tokens, prompt_out, Q)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # kernel compilation and autotuning
    benchmark.pedantic(run, warmup_rounds=profile.warmup, rounds=max(profile.rounds, 5), iterations=1)
    median = benchmark.stats.stats.median
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        run()
        nbytes = moved_bytes(K, B, Np, T, D, H, seq.element_size(), backward)
        extra = dict(peak_memory_bytes=torch.cuda.max_memory_allocated(), memory_source=CUDA_SOURCE,
                     bytes=nbytes, gbps=nbytes / median / 1e9,
                     kernel_time_s=profile_runs(run, runs=3, device=device, warmup=0).total_us / 1e6)
    else:
        tracker = LiveTensorTracker()
        for t in (prompts, seq, prompt_out, *disp.parameters(), *disp.buffers()):
            tracker.track(t)
        tracker.reset_peak()
        with tracker:
            run()
        extra = dict(peak_memory_bytes=tracker.peak, memory_source=TRACKER_SOURCE)
    benchmark.extra_info.update(
        bench=case.bench, mode=case.mode, provider=backend, reference_provider=REFERENCE_PROVIDER["dispatch"],
        K=K, B=B, Np=Np, T=T, D=D, H=H, dtype=profile.dtype, arch=profile.dispatch_arch or profile.arch, img_size=profile.img_size,
        **environment, images_per_s=B / median, **extra,
    )
