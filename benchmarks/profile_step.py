"""Where the fast model's training step spends its device time, by kernel group.

    python benchmarks/profile_step.py            # the targets' training step: K = 6 ViT-B/16, B = 32, Np = 10, bf16 experts
    python benchmarks/profile_step.py --small    # 2 tiny experts: runs anywhere, in seconds
    python benchmarks/profile_step.py --infer    # the latency target's case: inference, K = 2, B = 1
    python benchmarks/profile_step.py --infer --graphs   # the same under torch.compile(mode="reduce-overhead")

Runs 3 warm-up steps (forward, backward, AdamW), then profiles 3 more with ``torch.profiler`` and
prints the time per step of each group of kernels: the dispatcher's own (the targets want them
under 3% of the step), matrix products, attention, LayerNorm, copies and the rest, then the 25
costliest kernels (``pmoe_fast.profiling``: on a GPU CUDA kernels' device time; on a CPU
operators' self time, each in its outermost named caller's group). The wall time per step is that of the 3 profiled steps, profiler overhead included.

``--infer`` profiles 10 inference forwards of K = 2 experts at B = 1 instead, then 10 forwards of
one of those experts alone (a plain ViT, the latency target's baseline): the number of kernels
and their device time say whether the fast model's latency is launches or device work. With
``--graphs`` both run under ``torch.compile(mode="reduce-overhead")``, which replays CUDA graphs
on a GPU, as the latency target's second measurement does.
"""

from __future__ import annotations

import argparse

import torch

from pmoe_fast import PMoE, vit
from pmoe_fast.profiling import Timings, profile_runs


def report(title: str, prof: Timings, top: int = 25) -> None:
    """The profile's total, its time by kernel group, and the ``top`` costliest kernels."""
    total = prof.total_us
    calls = sum(e.calls for e in prof.events)
    print(f"{title}: {prof.wall_s * 1e3:.1f} ms wall (profiled); {prof.source}: {total / 1e3:.2f} ms in {calls:.0f} calls")
    print(f"{'group':20s} {'ms/step':>9s} {'share':>7s}")
    for group, us in prof.groups().items():
        print(f"{group:20s} {us / 1e3:9.2f} {us / total:7.1%}")
    print(f"\n{'ms/step':>9s} {'calls':>6s}  kernel")
    for e in sorted(prof.events, key=lambda e: -e.us)[:top]:
        print(f"{e.us / 1e3:9.3f} {e.calls:6.0f}  [{e.group}] {e.name[:110]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="2 tiny experts at 32 px, B = 2, float32")
    parser.add_argument("--checkpoint", type=int, default=0, help="PMoE(checkpoint=...)")
    parser.add_argument("--infer", action="store_true",
                        help="the latency target's case instead: inference, K = 2, B = 1, beside one plain expert's forward")
    parser.add_argument("--graphs", action="store_true", help='with --infer: both under torch.compile(mode="reduce-overhead")')
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.small:
        arch, kwargs, K, B, dtype = "vit_tiny_patch16_224", dict(img_size=32, depth=2), 2, 2, None
    else:
        arch, kwargs, K, B, dtype = "vit_base_patch16_224", dict(img_size=224), 6, 32, torch.bfloat16
    if args.infer:
        K, B = 2, 1
    torch.manual_seed(0)
    with torch.device(device):
        experts = [vit.create_model(arch, num_classes=0, **kwargs) for _ in range(K)]
        model = PMoE(experts, num_classes=100, num_prompts=10, expert_dtype=dtype, checkpoint=args.checkpoint)
    images = torch.randn(B, 3, kwargs["img_size"], kwargs["img_size"], device=device)
    labels = torch.randint(0, 100, (B,), device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{K} x {arch} ({kwargs}), B={B}, Np=10, experts {dtype or torch.float32}, checkpoint={args.checkpoint}; "
          f"{name}, torch {torch.__version__}")
    print(f"plan: {model.execution_plan()}")

    if args.infer:
        model.eval()
        plain = experts[0]  # the model's own expert module, in the experts' dtype
        run_model, run_plain = model, plain
        if args.graphs:
            run_model = torch.compile(model, mode="reduce-overhead")
            run_plain = torch.compile(plain, mode="reduce-overhead")

        @torch.no_grad()
        def forward():
            run_model(images)

        @torch.no_grad()
        def plain_forward():
            run_plain(images.to(dtype or torch.float32))

        report("one forward", profile_runs(forward, 10, device), top=40)
        print()
        report(f"one plain {arch} forward (the latency target's baseline)", profile_runs(plain_forward, 10, device), top=10)
        return

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    model.train()

    def step():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    report("one step", profile_runs(step, 3, device))


if __name__ == "__main__":
    main()
