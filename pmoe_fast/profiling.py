"""Where a run's time goes, by group of kernels: the dispatcher's own, matrix products, attention,
LayerNorm, copies and the rest, from ``torch.profiler``.

On a GPU it counts CUDA kernels' device time, each kernel in the group its name says (the Triton
dispatcher's kernels are ``_dispatch_*``, the MoE dispatcher's ``*moe_*``). On a CPU it counts
operators' self CPU time, each operator in the group of its outermost caller that names one: the
matrix products inside the C++ dispatcher op (``pmoe_fast::dispatch_mlp``) are the dispatcher's
time, not the matrix products', and the self times of a run add up to its operators' time once.

``benchmarks/profile_step.py`` prints these groups for the targets' training step;
``benchmarks/bench_model.py`` records the dispatcher's time of each fast training step from them,
which the "dispatcher under 3% of the step" target reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

# Kernel or operator name fragments (lower case) per group; the first group that matches wins.
GROUPS = (
    ("dispatcher", ("_dispatch_", "dispatch_mlp", "moe_", "pmoe_fast::")),
    ("attention", ("flash", "fmha", "attention", "cudnn", "scaled_dot_product")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "aten::mm", "aten::bmm", "addmm", "baddbmm", "aten::linear")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("copy / cat / fill", ("copy", "memcpy", "memset", "cat", "fill", "zero")),
)
OTHER = "other"


def named_group(name: str) -> str | None:
    """The group a kernel's or operator's name says, or None."""
    lower = name.lower()
    return next((group for group, parts in GROUPS if any(p in lower for p in parts)), None)


def group_of(name: str) -> str:
    """The group of a kernel or operator by its name alone: ``named_group``, else "other"."""
    return named_group(name) or OTHER


@dataclass(frozen=True)
class Event:
    """One kernel (GPU) or operator (CPU) name within one group, per run of the profiled callable."""

    group: str
    name: str
    us: float  # device time (GPU) or self CPU time (CPU), microseconds per run
    calls: float  # per run


@dataclass(frozen=True)
class Timings:
    """What ``profile_runs`` measured, per run of the callable."""

    events: tuple[Event, ...]
    wall_s: float  # wall time per run, profiler overhead included
    source: str  # what the events' times are

    @property
    def total_us(self) -> float:
        return sum(e.us for e in self.events)

    def groups(self) -> dict[str, float]:
        """Microseconds per run of each group, largest first."""
        out: dict[str, float] = {}
        for e in self.events:
            out[e.group] = out.get(e.group, 0.0) + e.us
        return dict(sorted(out.items(), key=lambda item: -item[1]))

    def group_us(self, group: str) -> float:
        return sum(e.us for e in self.events if e.group == group)


CUDA_TIME_SOURCE = "CUDA kernels' device time (torch.profiler)"
CPU_TIME_SOURCE = "operators' self CPU time, each in its outermost named caller's group (torch.profiler)"


def profile_runs(run: Callable[[], object], runs: int, device: torch.device, warmup: int = 3) -> Timings:
    """``run`` profiled ``runs`` times after ``warmup`` unprofiled calls (kernel compilation,
    caches), the device synchronised before and after the profiled calls."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(runs):
            run()
        sync()
        wall = (time.perf_counter() - start) / runs
    if device.type == "cuda":
        # Kernels are the device-side events; an operator's self device time is its kernels' again.
        totals = {
            (group_of(e.key), e.key): (e.self_device_time_total, e.count)
            for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA
        }
        if not totals:
            raise RuntimeError("the profiler recorded no CUDA kernels (is CUPTI available to torch.profiler?)")
        source = CUDA_TIME_SOURCE
    else:
        totals = _cpu_totals(prof.events())
        source = CPU_TIME_SOURCE
    events = tuple(
        Event(group, name, us / runs, count / runs) for (group, name), (us, count) in totals.items() if us > 0
    )
    return Timings(events, wall, source)


def _cpu_totals(events) -> dict[tuple[str, str], tuple[float, int]]:
    """(group, name) -> (self CPU time, calls) of every CPU operator, in the group of its outermost
    ancestor (itself included) whose name names one."""
    totals: dict[tuple[str, str], tuple[float, int]] = {}
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        group, node = None, e
        while node is not None:
            group = named_group(node.name) or group
            node = node.cpu_parent
        key = (group or OTHER, e.name)
        us, count = totals.get(key, (0.0, 0))
        totals[key] = (us + e.self_cpu_time_total, count + 1)
    return totals
