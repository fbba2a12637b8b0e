"""Build two small, different experts and train pMoE on them for a few steps."""

from __future__ import annotations

import argparse
import time

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--prompts", type=int, default=10)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--dispatcher", choices=("mlp", "moe", "none"), default="mlp")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> None:
    """Two small random-weight experts (a /16 ViT and a /14 ViT with 4 register tokens), pMoE over
    them, a few AdamW steps on a fixed random batch: forward, backward, optimizer, and the
    dispatcher's weights. The experts are untrained, so this shows the machinery, not accuracy."""
    from .model import PMoE
    from .vit import vit_tiny_patch14_224, vit_tiny_patch16_224

    torch.manual_seed(args.seed)
    img = 112  # 7x7 patches at /16, 8x8 at /14
    experts = [
        vit_tiny_patch16_224(img_size=img, depth=args.depth, num_classes=0),
        vit_tiny_patch14_224(img_size=img, depth=args.depth, num_classes=0, reg_tokens=4, no_embed_class=True, init_values=1e-5),
    ]
    model = PMoE(experts, num_classes=args.classes, num_prompts=args.prompts, dispatcher=args.dispatcher)
    images = torch.randn(args.batch, 3, img, img)
    labels = torch.randint(0, args.classes, (args.batch,))
    trainable = sum(p.numel() for p in model.trainable_parameters())
    frozen = sum(p.numel() for p in model.experts.parameters())
    print(f"pmoe_fast demo: K=2 experts (ViT-tiny/16 and ViT-tiny/14 + 4 registers), depth {args.depth}, "
          f"D={model.embed_dim}, Np={args.prompts}, Lp={model.prompt_layers}, dispatcher={args.dispatcher!r}")
    print(f"parameters: {trainable:,} trainable (prompts, dispatchers, head), {frozen:,} frozen (experts)")

    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3, weight_decay=1e-5)
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        if model.last_aux_loss is not None:
            loss = loss + 0.01 * model.last_aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    print(f"{args.steps} training steps at batch {args.batch}: {args.steps * args.batch / elapsed:.1f} images/s on CPU")
    plan = model.execution_plan()
    print(f"execution: {plan['execution_last_run']}, dispatcher backend: {plan['dispatcher_backend_last_run']}, "
          f"attention: {plan['attention']}")
    print("mean dispatch weight each expert's prompts receive, per prompt layer (rows: layer; cols: expert):")
    for l, w in enumerate(model.last_dispatch_weights):
        print(f"  layer {l}: " + "  ".join(f"{v:.3f}" for v in w.mean((0, 1, 2)).tolist()))
