"""Host time of the fast model's B = 1 inference beside one plain ViT's: the launch-bound case.

    python benchmarks/model_host_time.py > benchmarks/results/model_host_time_cpu.txt

The latency target compares ``PMoE`` with K = 2 experts at B = 1 against one plain ViT-B/16
forward. At B = 1 a GPU waits for the host: the time is the Python and dispatch work of every op,
not the arithmetic (on the H100 the ratio was 2.33x where the kernels' work is about 1x). This
script measures that host work without a GPU: both models are 12 blocks deep but only 32 wide
(5 tokens), so each op's arithmetic is negligible; the fast model runs batched with the Triton
dispatcher, whose kernels are replaced by launches that do nothing (the inputs are CPU tensors and
the Triton interpreter's flag lets the backend accept them). A GPU adds each launch's own cost on
top (Triton's launcher and CUDA's), which this does not see. One part, the batched block with the
Triton LayerNorm (its kernels not launched either), says what that path costs the host at B = 1.

Prints the median of 25 alternating rounds of 100 forwards each (no grad), their ratio, and the
per-layer parts: one batched block for both experts beside one plain block, and one prompt layer's
``dispatch_into``.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: CPU tensors pass the checks

import torch  # noqa: E402

from dispatch_host_time import KERNELS, NoLaunch  # noqa: E402  (this folder: the same stand-in kernels)

from pmoe_fast import PMoE  # noqa: E402
from pmoe_fast.kernels import dispatch as kd  # noqa: E402
from pmoe_fast.kernels import layer_norm as kln  # noqa: E402
from pmoe_fast.vit import VisionTransformer  # noqa: E402

K, DEPTH, WIDTH, HEADS, IMG, PATCH, NP = 2, 12, 32, 2, 32, 16, 10


def vit() -> VisionTransformer:
    return VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0)


def medians_us(fns: dict, calls: int = 100, rounds: int = 25) -> dict[str, float]:
    """Median time per call of each function, timed in alternating rounds so drifts in the
    machine's speed hit all of them alike."""
    for fn in fns.values():
        for _ in range(10):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    for name in KERNELS:
        setattr(kd, name, NoLaunch())
    for name in ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel"):
        setattr(kln, name, NoLaunch())
    torch.manual_seed(0)
    torch.set_num_threads(1)
    single = vit().eval()
    fast = PMoE([vit() for _ in range(K)], 10, num_prompts=NP, execution="batched", dispatcher_backend="triton").eval()
    # The Triton LayerNorm, which layer_norm="auto" leaves out at B = 1 on a GPU (pmoe_fast.model).
    fast_ln = PMoE([vit() for _ in range(K)], 10, num_prompts=NP, execution="batched", dispatcher_backend="triton",
                   layer_norm="triton").eval()
    images = torch.randn(1, 3, IMG, IMG)
    layer = DEPTH // 2
    seq = torch.randn(K, 1, NP + single.patch_embed.num_patches + 1, WIDTH)
    scale = fast._attn_scale(fast._adapters[0], layer)
    prefix = fast._prefix()
    with torch.no_grad():
        whole = medians_us({"single": lambda: single(images), "fast": lambda: fast(images)})
        fast_ln(images)  # decides its LayerNorm for the block below
        parts = medians_us({
            "plain block": lambda: single.blocks[layer](seq[0]),
            "batched block": lambda: fast._batched_block(layer, seq, scale),
            "the same, Triton LayerNorm": lambda: fast_ln._batched_block(layer, seq, scale),
            "dispatch_into": lambda: fast.dispatchers[layer].dispatch_into(fast.prompts[layer], seq, True, prefix),
        })
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread; {DEPTH} blocks, D={WIDTH}, B=1, Np={NP}; "
          "dispatcher kernels not launched")
    print(f"one plain ViT forward:       {whole['single']:7.0f} us")
    print(f"PMoE, K={K} batched, forward: {whole['fast']:7.0f} us   ({whole['fast'] / whole['single']:.2f}x)")
    print("per layer: " + ", ".join(f"{name} {t:.0f} us" for name, t in parts.items()))


if __name__ == "__main__":
    main()
