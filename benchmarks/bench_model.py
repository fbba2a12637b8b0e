"""Whole-model pMoE: the reference (eager), torch.compile(reference) and the fast model, side by
side in one run: a training step (forward, backward, AdamW step) and inference.

    python -m pytest benchmarks/bench_model.py --benchmark-group-by=param:case \
        --benchmark-columns=median,iqr,rounds --benchmark-json=model.json

On a GPU: ViT-B/16 experts, K in {1, 2, 6, 9}, B in {1, 32}, Np = 10, bf16 (the fast model with
bf16 frozen experts and checkpointing, the reference under bf16 autocast), with images/s and peak
memory in ``extra_info``. On a CPU: ViT-tiny/16 experts, K = 3, B in {1, 8}, fp32. Weights are
random: speed and memory do not depend on them.
"""

from __future__ import annotations

import platform

import pytest
import torch

from pmoe_fast import PMoE, vit
from pmoe_fast.reference import PMoE as Reference

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
ARCH = vit.vit_base_patch16_224 if GPU else vit.vit_tiny_patch16_224
CASES = [(K, B) for K in (1, 2, 6, 9) for B in (1, 32)] if GPU else [(3, 1), (3, 8)]
PROVIDERS = ["reference", "reference-compiled", "fast"]


def build(provider: str, K: int) -> torch.nn.Module:
    torch.manual_seed(0)
    experts = [ARCH(num_classes=0) for _ in range(K)]
    if provider == "fast":
        model = PMoE(experts, num_classes=100, num_prompts=10, expert_dtype=torch.bfloat16 if GPU else None, checkpoint=1 if GPU else 0)
    else:
        model = Reference(experts, num_classes=100, num_prompts=10)
    model = model.to(DEVICE)
    return torch.compile(model) if provider == "reference-compiled" else model


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["train", "infer"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "K{}-B{}".format(*c))
def test_model(benchmark, provider, mode, case):
    K, B = case
    model = build(provider, K)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=GPU and provider != "fast")
    images = torch.randn(B, 3, 224, 224, device=DEVICE)
    labels = torch.randint(0, 100, (B,), device=DEVICE)
    trainable = model.trainable_parameters() if hasattr(model, "trainable_parameters") else model._orig_mod.trainable_parameters()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-5)

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

    run = train_step if mode == "train" else infer
    model.train(mode == "train")
    run()  # first call: compilation for the compiled provider, kernel selection for the others
    if GPU:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(run, warmup_rounds=1, rounds=10 if GPU else 7, iterations=1)
    benchmark.extra_info.update(
        K=K, B=B, Np=10, arch=ARCH.__name__, provider=provider, mode=mode,
        images_per_s=B / benchmark.stats.stats.median,
        device=torch.cuda.get_device_name() if GPU else platform.processor() or platform.machine(),
        threads=torch.get_num_threads(), torch=torch.__version__,
    )
    if GPU:
        benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if provider == "fast":
        benchmark.extra_info["plan"] = str(model.execution_plan())
