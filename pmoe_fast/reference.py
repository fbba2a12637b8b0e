"""The reference pMoE: plain PyTorch, written to be read against SPEC.md and the paper.

Every fast path in pmoe_fast is checked against this model. It loops over layers and experts
one at a time and shows each equation once; the dispatcher's math lives in
``pmoe_fast.dispatcher.Dispatcher`` (backend "torch"), which this model calls.

    model = PMoE([vit_a, vit_b], num_classes=10, num_prompts=10)     # VPT-deep + pMoE
    logits = model(images)                                            # (B, 10)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, weight_decay=1e-5)
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch import nn

from .dispatcher import Dispatcher, check_argument_types
from .experts import Expert

BASES = ("vpt", "gapt")
TEMPERATURE_RANGE = (0.01, 10.0)  # GaPT clamps its attention temperatures to this range


def resolve_prompt_layers(prompt_layers: int | str | None, base: str, depth: int) -> int:
    """Lp from the constructor's ``prompt_layers``: "deep" (= depth), "shallow" (= 1), an int in
    [1, depth], or None for the base method's own choice (VPT-deep: depth; GaPT: 1)."""
    if prompt_layers is None:
        prompt_layers = "shallow" if base == "gapt" else "deep"
    if prompt_layers == "deep":
        lp = depth
    elif prompt_layers == "shallow":
        lp = 1
    elif isinstance(prompt_layers, int) and not isinstance(prompt_layers, bool):
        lp = prompt_layers
    else:
        raise ValueError(f"prompt_layers must be 'deep', 'shallow' or an int, got {prompt_layers!r}")
    if not 1 <= lp <= depth:
        raise ValueError(f"prompt_layers={lp} must be in [1, depth={depth}] (the experts have {depth} blocks)")
    if base == "gapt" and lp != 1:
        raise ValueError(f"base='gapt' uses shallow prompts (prompt_layers=1), got prompt_layers={lp}")
    return lp


def expert_list(experts) -> list[nn.Module]:
    """The experts as a list, refusing one expert module given alone (an easy slip: a ViT is not
    iterable, and its error would not say so)."""
    if isinstance(experts, nn.Module) and not isinstance(experts, (nn.ModuleList, nn.Sequential)):
        raise TypeError(f"experts must be a list of expert modules, got one {type(experts).__name__}: pass [expert]")
    return list(experts)


class PMoE(nn.Module):
    """pMoE over K frozen ViT experts, with a classification head.

    Args:
        experts: K >= 1 ViTs (timm's VisionTransformer or pmoe_fast.vit's) with the same width
            and depth and the same input image size; patch size and prefix tokens may differ.
            They are frozen in place.
        num_classes: C, the width of the head.
        num_prompts: Np, prompt tokens per expert per prompt layer.
        prompt_layers: Lp: "deep" (every block), "shallow" (the first), or an int; None picks the
            base method's own (VPT: deep; GaPT: shallow).
        dispatcher: "mlp", "moe" or "none" (see ``Dispatcher``).
        dispatcher_hidden: H, hidden width of the dispatcher MLP (0: a single Linear(D, K)).
        separate_mlps: one dispatcher MLP per source (EPTs, prompt outputs, tokens).
        dispatch_pool: "all" or "patches": which non-prompt tokens the dispatcher averages.
        num_dispatch_experts, top_k: M and top-k of the "moe" dispatcher.
        base: "vpt" or "gapt" (gated prompts and attention temperatures, SPEC.md).
        gate_layers: GaPT gates, for blocks 0 .. gate_layers-1; None: every block but the last.
        gate_init: GaPT gate logits start at -gate_init (gates at sigmoid(-gate_init)).
    """

    def __init__(
        self,
        experts: Sequence[nn.Module],
        num_classes: int,
        num_prompts: int = 10,
        prompt_layers: int | str | None = None,
        dispatcher: str = "mlp",
        dispatcher_hidden: int = 64,
        separate_mlps: bool = False,
        dispatch_pool: str = "all",
        num_dispatch_experts: int = 3,
        top_k: int = 1,
        base: str = "vpt",
        gate_layers: int | None = None,
        gate_init: float = 5.0,
    ):
        super().__init__()
        check_argument_types(
            ints=dict(num_classes=num_classes, num_prompts=num_prompts, dispatcher_hidden=dispatcher_hidden,
                      num_dispatch_experts=num_dispatch_experts, top_k=top_k,
                      **({} if gate_layers is None else dict(gate_layers=gate_layers))),
            bools=dict(separate_mlps=separate_mlps),
            reals=dict(gate_init=gate_init),
        )
        experts = expert_list(experts)
        adapters = [Expert(m) for m in experts]
        infos = [a.info for a in adapters]
        if not adapters:
            raise ValueError("PMoE needs at least one expert (K >= 1), got none")
        if len({(i.embed_dim, i.depth) for i in infos}) != 1:
            shapes = ", ".join(f"expert {k}: D={i.embed_dim}, L={i.depth}" for k, i in enumerate(infos))
            raise ValueError(f"all experts must have the same width D and depth L ({shapes})")
        if len({(i.img_size, i.in_chans) for i in infos}) != 1:
            sizes = ", ".join(f"expert {k}: {i.in_chans}x{i.img_size}" for k, i in enumerate(infos))
            raise ValueError(f"all experts must take the same images (channels x size), got {sizes}")
        dtypes = [sorted({str(p.dtype) for p in m.parameters() if p.is_floating_point()}) for m in experts]
        if len({d for expert in dtypes for d in expert}) > 1:
            listing = ", ".join(f"expert {k}: {' and '.join(d)}" for k, d in enumerate(dtypes))
            raise ValueError(
                f"all experts must hold one floating dtype, got {listing}: convert them (expert.to(dtype)), "
                "or let pmoe_fast.PMoE(expert_dtype=...) do it"
            )
        devices = [sorted({str(p.device) for p in m.parameters()}) for m in experts]
        if len({d for expert in devices for d in expert}) > 1:
            listing = ", ".join(f"expert {k}: {' and '.join(d)}" for k, d in enumerate(devices))
            raise ValueError(f"all experts must be on one device, got {listing}: move them there (expert.to(device))")
        if base not in BASES:
            hint = " (LSPT is not in scope: SPEC.md)" if base == "lspt" else ""
            raise ValueError(f"unknown base method {base!r}; choose one of {BASES}{hint}")
        if num_prompts < 1:
            raise ValueError(f"num_prompts (Np) must be >= 1, got {num_prompts}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")

        K, D, L = len(adapters), infos[0].embed_dim, infos[0].depth
        self.num_experts, self.embed_dim, self.depth = K, D, L
        self.num_prompts, self.num_classes, self.base = num_prompts, num_classes, base
        self.prompt_layers = resolve_prompt_layers(prompt_layers, base, L)
        self.experts = nn.ModuleList(experts)  # state_dict: experts.{k}.<timm key>
        self._adapters = adapters
        # What would drop at random if an expert were put back in train mode: _check_images.
        self._random_drops = [
            (k, name, module) for k, expert in enumerate(experts) for name, module in expert.named_modules()
            if _drops_at_random(module)
        ]

        # EPTs, initialised as VPT does, each expert with its own patch size.
        self.prompts = nn.Parameter(torch.empty(self.prompt_layers, K, num_prompts, D))
        with torch.no_grad():
            for k, info in enumerate(infos):
                v = math.sqrt(6.0 / (3 * info.patch_size**2 + D))
                self.prompts[:, k].uniform_(-v, v)
        self.dispatchers = nn.ModuleList(
            Dispatcher(
                D, K, hidden=dispatcher_hidden, kind=dispatcher, separate_mlps=separate_mlps,
                pool=dispatch_pool, num_dispatch_experts=num_dispatch_experts, top_k=top_k,
                backend="torch",  # the reference is the ground truth: never a kernel
            )
            for _ in range(self.prompt_layers)
        )
        if base == "gapt":
            gate_layers = L - 1 if gate_layers is None else gate_layers
            if not 0 <= gate_layers <= L - 1:
                raise ValueError(f"gate_layers must be in [0, depth-1={L - 1}], got {gate_layers}")
            self.gates = nn.Parameter(torch.full((gate_layers,), -float(gate_init)))
            self.temperatures = nn.Parameter(torch.ones(L))
        elif gate_layers is not None:
            raise ValueError("gate_layers is a GaPT option: pass base='gapt' to use it")
        self.head = nn.Linear(D, num_classes)

        self.last_dispatch_weights: list[torch.Tensor] = []
        self.last_aux_loss: torch.Tensor | None = None

    def train(self, mode: bool = True) -> PMoE:
        """Set train mode on prompts, dispatchers and head; the frozen experts stay in eval mode."""
        super().train(mode)
        self.experts.eval()
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters pMoE tunes: prompts, dispatchers, head and the base method's extras."""
        yield from (p for name, p in self.named_parameters() if not name.startswith("experts."))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.forward_features(images))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> the experts' pooled features averaged over experts, (B, D).

        Images of any floating dtype are converted to the experts' dtype; integer images (such as
        uint8 pixels) are refused, as they are not normalised. After it returns,
        ``last_dispatch_weights`` holds one detached (K, B, Np, K) tensor per prompt layer, and
        ``last_aux_loss`` the MoE load-balancing loss (None for other dispatchers) averaged over
        prompt layers.
        """
        self._check_images(images)
        images = images.to(self._expert_dtype())
        K, L, Np = self.num_experts, self.depth, self.num_prompts
        prefix = [a.info.num_prefix_tokens for a in self._adapters]

        # Z_k^0: each expert's own embedding, (B, Q_k + N_k, D).
        tokens = [a.embed(images) for a in self._adapters]
        prompt_out = None  # Z_P^l (K, B, Np, D): prompt outputs of the previous block
        entering = None  # the prompts that entered the previous block
        weights, aux = [], []
        for l in range(L):
            entering = self._entering_prompts(l, tokens, prompt_out, entering, prefix, weights, aux)
            outs = []
            for k, adapter in enumerate(self._adapters):
                q = prefix[k]
                x = tokens[k]
                # The block sees [prefix tokens, prompts, patch tokens].
                x = torch.cat([x[:, :q], entering[k].to(x.dtype), x[:, q:]], dim=1)
                x = adapter.block(l, x, self._attn_scale(adapter, l))
                outs.append(x[:, q : q + Np])
                tokens[k] = torch.cat([x[:, :q], x[:, q + Np :]], dim=1)
            prompt_out = torch.stack(outs)

        self.last_dispatch_weights = weights
        self.last_aux_loss = torch.stack(aux).mean() if aux[0] is not None else None
        # Each expert's final norm and pooling (prompts excluded), averaged over experts, in the
        # head's dtype (the experts' may be lower).
        return torch.stack([a.pool(z) for a, z in zip(self._adapters, tokens)]).mean(0).to(self.head.weight.dtype)

    def _entering_prompts(self, l, tokens, prompt_out, entering, prefix, weights: list, aux: list) -> torch.Tensor:
        """The prompts that enter block l, (K, B, Np, D), from the tokens Z^l entering it (as the
        dispatcher takes them), the prompt outputs Z_P^l of block l-1 (None at l = 0) and the
        prompts that entered block l-1. A prompt layer's dispatch weights and MoE loss are
        appended to ``weights`` and ``aux``."""
        if l < self.prompt_layers:
            # Integrated prompt tokens: IPT_k^l from P^l, Z_P,k^l (none at l = 0) and Z_k^l.
            ipt, w = self.dispatchers[l](self.prompts[l], tokens, prompt_out, prefix)
            weights.append(w.detach())
            aux.append(self.dispatchers[l].aux_loss)
            return ipt
        if self._gates_prompts(l):
            # GaPT: g * (outputs of block l-1) + (1 - g) * (prompts that entered it).
            g = torch.sigmoid(self.gates[l - 1])
            return g * prompt_out + (1 - g) * entering
        return prompt_out  # carried, as VPT-shallow does

    def _gates_prompts(self, l: int) -> bool:
        """Whether GaPT's gate mixes the prompts entering block l (a block after a prompt layer)."""
        return self.base == "gapt" and l >= self.prompt_layers and l - 1 < self.gates.shape[0]

    def _attn_scale(self, adapter: Expert, l: int) -> torch.Tensor | None:
        """GaPT divides block l's attention logits by its temperature; VPT keeps the block's own."""
        if self.base != "gapt":
            return None
        head_dim = adapter.module.blocks[l].attn.head_dim
        return head_dim**-0.5 / self.temperatures[l].clamp(*TEMPERATURE_RANGE)

    def _expert_dtype(self) -> torch.dtype:
        """The floating dtype the experts hold (one for all, checked when the model is built)."""
        return self._adapters[0].module.patch_embed.proj.weight.dtype

    def _check_images(self, images: torch.Tensor) -> None:
        for k, adapter in enumerate(self._adapters):
            if self.experts[k] is not adapter.module:
                raise RuntimeError(
                    f"model.experts[{k}] was replaced after the model was built, which set each expert up "
                    "(frozen, wrapped, its prompts and pooling): build a new PMoE with the new experts"
                )
        for k, name, module in self._random_drops:
            if module.training:
                raise ValueError(
                    f"expert {k}'s {name} ({type(module).__name__}) is in train mode, where it drops at random: "
                    "pMoE runs its frozen experts in eval mode; call model.experts.eval() (model.train() "
                    "leaves the experts in eval mode)"
                )
        self._adapters[0].check_images(images)
        experts_on = self._adapters[0].module.patch_embed.proj.weight.device
        if experts_on != self.prompts.device:
            raise ValueError(
                f"the experts are on {experts_on} but the prompts, dispatchers and head on {self.prompts.device}: "
                f"move the whole model, model.to({str(experts_on)!r})"
            )
        if images.device != self.prompts.device:
            raise ValueError(
                f"images are on {images.device} but the model is on {self.prompts.device}: "
                f"move them with images.to({str(self.prompts.device)!r})"
            )


def _drops_at_random(module: nn.Module) -> bool:
    """Whether ``module`` draws random numbers in train mode: dropout with p > 0, or drop-path
    (timm's and pmoe_fast.vit's) with drop_prob > 0."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    return isinstance(getattr(module, "drop_prob", None), (int, float)) and module.drop_prob > 0
