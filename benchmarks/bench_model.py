"""Whole-model pMoE, every provider side by side in one run: a training step (forward, backward,
AdamW step) and inference, over the profile's sweep of K, B and Np.

    python -m pytest benchmarks/bench_model.py --bench-profile quick --benchmark-json=model.json

Providers (``pmoe_fast.bench.MODEL_PROVIDERS``): the reference (eager), ``torch.compile`` of the
reference (skipped with the error when compiling fails), the fast model with its default plan,
compiled (``fast-compiled``), and with the variants a profile lists (checkpointing, batched or
stream execution, the torch dispatcher), and for inference one plain expert's own forward
(``single-vit``: no prompts, in the profile's dtype), the latency a pMoE over K experts is
compared with; on a GPU both also under ``torch.compile(mode="reduce-overhead")``, which replays
CUDA graphs (``fast-graphed``, ``single-vit-graphed``). In a bf16 profile the fast model keeps its frozen experts in bf16 and the reference
runs under bf16 autocast. Weights are random: speed and memory do not depend on them.

Each case is timed with pytest-benchmark after a first call (compilation, kernel selection) and
the profile's warm-up rounds; on a GPU the timed callable synchronises, so a round is the step's
whole device time. Peak memory and its split (frozen weights, trainable state, activations) come
from ``pmoe_fast.memory.measure_step`` in a separate, untimed step, so tracking memory does not
slow the timed ones. Two more steps of each fast training case run under ``torch.profiler``
(``pmoe_fast.profiling``): the time of the dispatcher's kernels (GPU) or operators (CPU) per
step, which the dispatcher-share target divides by the timed median. On a CPU the compiled models' memory is not measured: the CPU tracker is
a TorchDispatchMode, and dynamo runs a compiled model eagerly under one.
"""

from __future__ import annotations

import pytest
import torch

from pmoe_fast import PMoE, vit
from pmoe_fast.bench import COMPILED, GRAPHED, Case, MODEL_PROVIDERS, REFERENCE_PROVIDER
from pmoe_fast.memory import measure_step
from pmoe_fast.profiling import profile_runs
from pmoe_fast.reference import PMoE as Reference

NUM_CLASSES = 100


def build(provider: str, K: int, Np: int, profile) -> torch.nn.Module:
    """The provider's model over K random-weight experts, built on the profile's device."""
    torch.manual_seed(0)
    with torch.device(profile.device):
        experts = [vit.create_model(profile.arch, **profile.expert_kwargs()) for _ in range(K)]
        if provider.startswith("single-vit"):
            model = experts[0].to(getattr(torch, profile.dtype)).eval().requires_grad_(False)  # frozen, as in pMoE
        elif provider.startswith("reference"):
            model = Reference(experts, num_classes=NUM_CLASSES, num_prompts=Np)
        else:
            expert_dtype = torch.bfloat16 if profile.dtype == "bfloat16" else None
            try:
                model = PMoE(experts, num_classes=NUM_CLASSES, num_prompts=Np, expert_dtype=expert_dtype, **MODEL_PROVIDERS[provider])
            except ValueError as e:  # a variant these experts cannot run, e.g. batched execution of one expert
                pytest.skip(f"{provider}: {e}")
    if provider in COMPILED:
        # Every case compiles the same forward at new shapes; past dynamo's recompile limit it
        # would quietly run eager. A fresh dynamo state per case keeps each one compiled.
        torch._dynamo.reset()
        model = torch.compile(model, mode="reduce-overhead" if provider in GRAPHED else "default")
    return model


def test_model(benchmark, model_case, profile, environment):
    case = Case(**model_case)
    device = torch.device(profile.device)
    if case.provider.startswith("single-vit") and case.mode == "train":
        pytest.skip(f"{case.provider}: a frozen expert alone has nothing to train; it is an inference provider")
    if case.provider in GRAPHED and (case.mode == "train" or device.type != "cuda"):
        pytest.skip(f"{case.provider}: CUDA graphs, for inference on a GPU")
    model = build(case.provider, case.K, case.Np, profile)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=profile.dtype == "bfloat16" and case.provider.startswith("reference"))
    images = torch.randn(case.B, 3, profile.img_size, profile.img_size, device=device)
    if case.provider.startswith("single-vit"):  # a plain ViT takes images in its weights' dtype
        images = images.to(getattr(torch, profile.dtype))
    labels = torch.randint(0, NUM_CLASSES, (case.B,), device=device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=1e-5) if case.mode == "train" else None

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()

    def infer():
        with torch.no_grad(), autocast:
            model(images)
        sync()

    step = train_step if case.mode == "train" else infer
    model.train(case.mode == "train")
    try:
        step()  # compilation for the compiled provider, kernel selection and caches for all
    except Exception as e:
        if case.provider not in COMPILED:
            raise
        message = str(e).strip()
        pytest.skip(f"torch.compile failed: {type(e).__name__}" + (f": {message.splitlines()[0]}" if message else ""))
    benchmark.pedantic(step, warmup_rounds=profile.warmup, rounds=profile.rounds, iterations=1)

    if case.provider in COMPILED and device.type == "cpu":
        # The numbers would be the eager reference's (module docstring).
        memory = dict(memory_source="not measured: on a CPU memory is tracked by a TorchDispatchMode, "
                      "under which torch.compile runs the model eagerly")
    else:
        with autocast:
            m = measure_step(model, images, labels, optimizer, mode=case.mode)
        memory = dict(peak_memory_bytes=m.peak_bytes, frozen_bytes=m.frozen_bytes, trainable_bytes=m.trainable_bytes,
                      activation_bytes=m.activation_bytes, memory_source=m.source)
    timing = {}
    if case.mode == "train" and case.provider.startswith("fast"):
        # The dispatcher's share of the step (a target), from two more steps under torch.profiler.
        prof = profile_runs(step, runs=2, device=device, warmup=0)
        timing = dict(dispatcher_time_s=prof.group_us("dispatcher") / 1e6, profiled_time_s=prof.total_us / 1e6,
                      profiled_time_source=prof.source)
    precision = profile.dtype if profile.dtype == "float32" else (
        f"{profile.dtype} autocast" if case.provider.startswith("reference") else f"{profile.dtype} experts")
    benchmark.extra_info.update(
        bench=case.bench, mode=case.mode, provider=case.provider, reference_provider=REFERENCE_PROVIDER["model"],
        K=case.K, B=case.B, Np=case.Np, arch=profile.arch, img_size=profile.img_size,
        depth=profile.expert_info().depth,
        dtype=profile.dtype, precision=precision, num_classes=NUM_CLASSES, **environment,
        images_per_s=case.B / benchmark.stats.stats.median, **memory, **timing,
        execution_plan=model.execution_plan() if case.provider.startswith("fast") else None,
    )
