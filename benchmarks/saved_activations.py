"""What a training step keeps for its backward, eager and under ``torch.compile``, reference and fast.

    python benchmarks/saved_activations.py > benchmarks/results/saved_activations_cpu.txt

Sums the storages that autograd saves during the forward (``torch.autograd.graph.saved_tensors_hooks``,
each storage once, the model's parameters and buffers left out): the activations a step holds at
its peak, whatever the allocator does around them. A CPU measures them as a GPU would, since which
tensors are saved does not depend on the device, only their dtype (fp32 here). The fast model runs
its experts batched with the C++ dispatcher (on a GPU: Triton), so that ``dispatch_into`` is the
path measured: eagerly it writes the IPTs in place; compiled, the operator
``pmoe_fast::dispatch_into_mlp`` returns a new sequence and its backward reads the tokens from it.
"""

from __future__ import annotations

import platform

import torch

from pmoe_fast import PMoE
from pmoe_fast.reference import PMoE as Reference
from pmoe_fast.vit import vit_tiny_patch16_224

K, B, NP, IMG = 3, 8, 10, 224
CONFIG = dict(num_classes=10, num_prompts=NP, dispatcher_hidden=64)


def saved_mib(model: torch.nn.Module, compile_backend: str | None, images: torch.Tensor) -> float:
    """MiB saved for backward by the second of two training steps (the first compiles)."""
    forward = model if compile_backend is None else torch.compile(model, backend=compile_backend)
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    for _ in range(2):
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = storage.nbytes()
            return t

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = forward(images)
        logits.sum().backward()
    return sum(kept.values()) / 2**20


def main() -> None:
    torch.manual_seed(0)
    experts = [vit_tiny_patch16_224() for _ in range(K)]
    images = torch.randn(B, 3, IMG, IMG)
    models = {
        "reference": lambda: Reference(experts, **CONFIG),
        "fast": lambda: PMoE(experts, **CONFIG, execution="batched", dispatcher_backend="cpp"),
    }
    print(f"# K={K} ViT-Ti/16 experts at {IMG} px, B={B}, Np={NP}, fp32; torch {torch.__version__}, {platform.machine()}")
    print("# MiB saved for backward by one training step (storages, each once; weights excluded)")
    print(f"{'model':10} {'eager':>8} {'aot_eager':>10} {'inductor':>9}")
    for name, make in models.items():
        row = []
        for backend in (None, "aot_eager", "inductor"):
            torch._dynamo.reset()
            row.append(saved_mib(make(), backend, images))
        print(f"{name:10} {row[0]:8.1f} {row[1]:10.1f} {row[2]:9.1f}", flush=True)


if __name__ == "__main__":
    main()
