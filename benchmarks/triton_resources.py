"""Registers, spills and shared memory of every Triton kernel variant the library launches, as
ptxas reports them for an H100 (sm_90a). No GPU is needed: each variant is compiled for the
target with ``triton.compile`` (as the tests do), then its PTX is assembled by Triton's own
ptxas with ``-v``.

    python benchmarks/triton_resources.py > benchmarks/results/triton_sm90_resources.txt
    python benchmarks/triton_resources.py --bwd-settings   # the main backward at the model's dtypes, per setting

A variant that spills keeps part of its state in local memory (L1, then L2 and DRAM): in these
memory-bound kernels that is extra traffic beside the tokens. The table says where; whether a
change of warps, stages or blocks that spills less also runs faster is for a GPU to measure.
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
    """The main backward as the model runs it (fp32 dispatcher, bf16 tokens, H = 64) with
    (BLOCK_DW, BLOCK_T, warps) in place of the defaults."""
    from pmoe_fast.kernels import dispatch

    block_dw, block_t, warps = setting
    base = next(v for v in dispatch.KERNEL_VARIANTS
                if v["name"].startswith("bwd[fp32-params,bf16-tokens,") and "BLOCK_H=64," in v["name"])
    return variant_usage(dict(base, name=f"bwd BLOCK_DW={block_dw} BLOCK_T={block_t} warps={warps}",
                              constexprs=dict(base["constexprs"], BLOCK_DW=block_dw, BLOCK_T=block_t), num_warps=warps))


def variant_usage(v: dict) -> tuple[str, dict[str, int] | str]:
    """(variant name, {registers, spill_stores, spill_loads, shared, num_warps, num_stages}) or
    (name, the error), for one variant as the kernel modules' KERNEL_VARIANTS list them."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    compiled = triton.compile(
        ASTSource(v["kernel"], v["signature"], v["constexprs"]),
        target=GPUTarget("cuda", TARGET_ARCH, 32),
        options={"num_warps": v["num_warps"], "num_stages": v["num_stages"]},
    )
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
        return v["name"], f"ptxas did not report ({run.returncode}): {report.strip()[-500:]}"
    return v["name"], {
        "registers": int(registers.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "shared": compiled.metadata.shared,
        "num_warps": v["num_warps"],
        "num_stages": v["num_stages"],
    }


def main() -> int:
    modules = kernel_modules()
    with ProcessPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        if "--bwd-settings" in sys.argv[1:]:
            settings = list(itertools.product((32, 64), (16, 32), (4, 8)))
            results = list(pool.map(bwd_setting_usage, settings)) if modules["dispatch"].KERNEL_VARIANTS else []
        else:
            jobs = [(name, i) for name, module in modules.items() for i in range(len(module.KERNEL_VARIANTS))]
            results = list(pool.map(usage, *zip(*jobs))) if jobs else []
    if not results:
        print("no Triton kernel variants: Triton is not installed", file=sys.stderr)
        return 1
    print(f"Triton kernel variants compiled for sm_{TARGET_ARCH}a, as ptxas -v reports them (bytes per thread; shared per block)")
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
    print(f"{len(results)} variants, {spilling} spill, {failed} not reported")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
