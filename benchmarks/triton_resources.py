"""Registers, spills and shared memory of every Triton kernel variant the library launches, as
ptxas reports them for an H100 (sm_90a). No GPU is needed: each variant is compiled for the
target with ``triton.compile`` (as the tests do), then its PTX is assembled by Triton's own
ptxas with ``-v``.

    python benchmarks/triton_resources.py > benchmarks/results/triton_sm90_resources.txt
    python benchmarks/triton_resources.py --launched       # the launches of the model's GPU configurations
    python benchmarks/triton_resources.py --bwd-settings   # the model's main backward launch, per setting

A variant that spills keeps part of its state in local memory (L1, then L2 and DRAM): in these
memory-bound kernels that is extra traffic beside the tokens. The table says where; whether a
change of warps, stages or blocks that spills less also runs faster is for a GPU to measure.

The kernel modules' KERNEL_VARIANTS are generic: compiled without the hints Triton's runtime
adds to every launch (16-byte-aligned pointers and integer arguments divisible by 16, integers
equal to 1 made constants). Those hints decide whether 16-bit tokens load as 16-byte asynchronous
copies, and so whether the software pipeliner runs at all: the generic main backward spills
several times what the launched one does. ``--launched`` reports the code a GPU runs: it records the launches of the
model's configurations (``MODEL_CASES``, called with CPU tensors laid out as on the GPU; nothing
runs) and compiles each specialized as the runtime would (``specialized_source``).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not for the interpreter

TARGET_ARCH = 90


def kernel_modules() -> dict:
    """The kernel modules whose KERNEL_VARIANTS this reports, by name."""
    from pmoe_fast.kernels import dispatch, dispatch_moe, layer_norm

    return {"dispatch": dispatch, "dispatch_moe": dispatch_moe, "layer_norm": layer_norm}


def usage(module: str, index: int) -> tuple[str, dict[str, int] | str]:
    """``variant_usage`` of ``pmoe_fast.kernels.<module>.KERNEL_VARIANTS[index]``."""
    return variant_usage(kernel_modules()[module].KERNEL_VARIANTS[index])


def bwd_setting_usage(setting: tuple[int, int, int]) -> tuple[str, dict[str, int] | str]:
    """The main backward as the model launches it on a GPU ("mlp training B=32 Np=10" of
    ``MODEL_CASES``, specialized as the runtime does) with (BLOCK_DW, BLOCK_T, warps) in place of
    the defaults."""
    from pmoe_fast.kernels import dispatch

    block_dw, block_t, warps = setting
    name = f"bwd BLOCK_DW={block_dw} BLOCK_T={block_t} warps={warps}"
    default_warps, pinned = dispatch._NUM_WARPS["bwd"], os.environ.get(dispatch.BLOCK_ENV)
    dispatch._NUM_WARPS["bwd"] = warps
    os.environ[dispatch.BLOCK_ENV] = f"BLOCK_DW={block_dw},BLOCK_T={block_t}"
    try:
        usage = launched_usage("mlp training B=32 Np=10", kernel_name="_dispatch_bwd_kernel")
    finally:
        dispatch._NUM_WARPS["bwd"] = default_warps
        if pinned is None:
            del os.environ[dispatch.BLOCK_ENV]
        else:
            os.environ[dispatch.BLOCK_ENV] = pinned
    return name, usage[0][1]


def target():
    """Triton's GPUTarget for TARGET_ARCH."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", TARGET_ARCH, 32)


def compile_variant(v: dict):
    """One variant, as the kernel modules' KERNEL_VARIANTS list them, compiled for TARGET_ARCH."""
    import triton
    from triton.compiler import ASTSource

    return triton.compile(
        ASTSource(v["kernel"], v["signature"], v["constexprs"]),
        target=target(),
        options={"num_warps": v["num_warps"], "num_stages": v["num_stages"]},
    )


def variant_usage(v: dict) -> tuple[str, dict[str, int] | str]:
    """(variant name, {registers, spill_stores, spill_loads, shared, num_warps, num_stages}) or
    (name, the error), for one variant as the kernel modules' KERNEL_VARIANTS list them."""
    return v["name"], ptxas_usage(compile_variant(v), v["num_warps"], v["num_stages"])


def ptxas_usage(compiled, num_warps: int, num_stages: int) -> dict[str, int] | str:
    """{registers, spill_stores, spill_loads, shared, num_warps, num_stages} of a kernel compiled
    for TARGET_ARCH, as Triton's own ptxas -v reports them, or what went wrong."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        ptxas = get_ptxas(TARGET_ARCH).path
        run = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{TARGET_ARCH}a", ptx, "-o", os.devnull],
                             capture_output=True, text=True)
    report = run.stdout + run.stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if run.returncode != 0 or registers is None or spills is None:
        return f"ptxas did not report ({run.returncode}): {report.strip()[-500:]}"
    return {
        "registers": int(registers.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "shared": compiled.metadata.shared,
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


# ---- The launches of the model's GPU configurations, specialized as Triton's runtime does ----

# The shapes of the GPU targets: six ViT-B/16 experts (T = 197 tokens of D = 768), a
# dispatcher of H = 64 in float32, bf16 sequences prompt-first (K, B, Np + T, D).
K_MODEL, T_MODEL, D_MODEL, H_MODEL = 6, 197, 768, 64
H100_SMS = 132  # the launchers size their grids by the SM count
# name: (dispatcher kind or "layer_norm", B, Np, training)
MODEL_CASES = {
    "mlp training B=32 Np=10": ("mlp", 32, 10, True),
    "mlp training B=32 Np=50": ("mlp", 32, 50, True),
    "mlp inference B=1 Np=10": ("mlp", 1, 10, False),
    "moe training B=32 Np=10": ("moe", 32, 10, True),
    "layer_norm training B=32 Np=10": ("layer_norm", 32, 10, True),
}


def record_launches(call) -> list[tuple]:
    """Runs ``call()`` as on an H100, with every Triton kernel of the kernel modules replaced by a
    recorder: nothing runs (CPU tensors stand in for the GPU's, laid out alike), the Triton
    backends' device checks pass, and the launchers split the work for 132 SMs as on the GPU (on
    the CPU they size small grids for the interpreter). Returns (kernel, grid, args, kwargs) of
    each launch, in order."""
    import torch
    import triton

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, grid, args, kwargs))

    def on_gpu(default_blocks):
        return lambda *sizes_and_device: default_blocks(*sizes_and_device[:-1], torch.device("cuda"))

    modules = kernel_modules()
    dispatch, dispatch_moe = modules["dispatch"], modules["dispatch_moe"]
    replacements = [
        (module, name, Recorder(value))
        for module in modules.values()
        for name, value in vars(module).items()
        if isinstance(value, triton.runtime.JITFunction)
    ] + [
        (dispatch, "triton_not_supported_reasons", lambda *args: []),
        (dispatch_moe, "moe_not_supported_reasons", lambda *args: []),
        (dispatch, "multiprocessors", lambda device: H100_SMS),
        (dispatch, "default_blocks", on_gpu(dispatch.default_blocks)),
        (dispatch_moe, "default_moe_blocks", on_gpu(dispatch_moe.default_moe_blocks)),
    ]
    originals = [(module, name, getattr(module, name)) for module, name, _ in replacements]
    dispatch._BLOCKS.clear()
    try:
        for module, name, value in replacements:
            setattr(module, name, value)
        call()
    finally:
        for module, name, value in originals:
            setattr(module, name, value)
        dispatch._BLOCKS.clear()
    return launches


def model_launches(case: str) -> list[tuple]:
    """``record_launches`` of one prompt layer of ``MODEL_CASES[case]``: the dispatcher writing
    into the experts' sequences (``Dispatcher.dispatch_into``, as the batched model calls it) and,
    when training, its backward; or the experts' LayerNorm forward and backward."""
    import torch

    from pmoe_fast import Dispatcher
    from pmoe_fast.kernels import layer_norm

    kind, B, Np, training = MODEL_CASES[case]
    seq_leaf = torch.zeros(K_MODEL, B, Np + T_MODEL, D_MODEL, dtype=torch.bfloat16, requires_grad=training)

    def layer():
        seq = seq_leaf.clone()
        if kind == "layer_norm":
            weight = torch.ones(K_MODEL, D_MODEL, dtype=torch.bfloat16)
            out = layer_norm.layer_norm(seq.view(K_MODEL, -1, D_MODEL), weight, torch.zeros_like(weight), 1e-6, check=False)
        else:
            disp = Dispatcher(D_MODEL, K_MODEL, hidden=H_MODEL, kind=kind, backend="triton")
            prompts = torch.zeros(K_MODEL, Np, D_MODEL, requires_grad=training)
            out, _ = disp.dispatch_into(prompts, seq, True, 1)
        if training:
            out.backward(torch.zeros_like(out))

    with torch.set_grad_enabled(training):
        return record_launches(layer)


def specialized_source(kernel, args: tuple, kwargs: dict):
    """(ASTSource, options) of one launch for TARGET_ARCH, specialized exactly as Triton's runtime
    does before it compiles (``JITFunction.run``: its binder, then ``_pack_args``; private to the
    pinned Triton): alignment and divisibility hints, integers equal to 1 made constants."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target())
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options


def launched_usage(case: str, kernel_name: str | None = None) -> list[tuple[str, dict[str, int] | str]]:
    """(launch name, ``ptxas_usage`` or the error) of every launch of ``model_launches(case)`` (or
    only those of the kernel ``kernel_name``), each compiled as the runtime specializes it."""
    import triton

    results = []
    for kernel, grid, args, kwargs in model_launches(case):
        if kernel_name not in (None, kernel.__name__):
            continue
        name = f"{case}: {kernel.__name__}, grid {tuple(grid)}"
        try:
            source, options = specialized_source(kernel, args, kwargs)
            compiled = triton.compile(source, target=target(), options=vars(options))
        except Exception as exc:  # reported per launch, as the variants' failures are
            results.append((name, f"{type(exc).__name__}: {str(exc).strip()[-500:]}"))
            continue
        results.append((name, ptxas_usage(compiled, options.num_warps, options.num_stages)))
    return results


def main() -> int:
    modules = kernel_modules()
    with ProcessPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        if "--bwd-settings" in sys.argv[1:]:
            settings = list(itertools.product((32, 64), (16, 32), (4, 8)))
            results = list(pool.map(bwd_setting_usage, settings)) if modules["dispatch"].KERNEL_VARIANTS else []
        elif "--launched" in sys.argv[1:]:
            cases = list(MODEL_CASES) if modules["dispatch"].KERNEL_VARIANTS else []
            results = [r for found in pool.map(launched_usage, cases) for r in found]
        else:
            jobs = [(name, i) for name, module in modules.items() for i in range(len(module.KERNEL_VARIANTS))]
            results = list(pool.map(usage, *zip(*jobs))) if jobs else []
    if not results:
        print("no Triton kernel variants: Triton is not installed", file=sys.stderr)
        return 1
    launched = {"--launched", "--bwd-settings"} & set(sys.argv[1:])
    what = "launches of the model's GPU configurations, specialized as Triton's runtime does," if launched else "kernel variants"
    print(f"Triton {what} compiled for sm_{TARGET_ARCH}a, as ptxas -v reports them (bytes per thread; shared per block)")
    print(f"{'registers':>9}  {'spill st':>8}  {'spill ld':>8}  {'shared':>7}  {'warps':>5}  {'stages':>6}  variant")
    failed = 0
    for name, r in results:
        if isinstance(r, str):
            failed += 1
            print(f"{'-':>9}  {'-':>8}  {'-':>8}  {'-':>7}  {'-':>5}  {'-':>6}  {name}: {r}")
            continue
        print(
            f"{r['registers']:>9}  {r['spill_stores']:>8}  {r['spill_loads']:>8}  {r['shared']:>7}  {r['num_warps']:>5}"
            f"  {r['num_stages']:>6}  {name}"
        )
    spilling = sum(1 for _, r in results if isinstance(r, dict) and r["spill_stores"])
    print(f"{len(results)} {'launches' if launched else 'variants'}, {spilling} spill, {failed} not reported")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
