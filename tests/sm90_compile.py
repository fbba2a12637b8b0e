"""The suite's Triton compiles for sm_90, one job a run, its result printed as JSON:

    python tests/sm90_compile.py variants:dispatch      # {variant name: {shared, ptx} or the traceback}
    python tests/sm90_compile.py variants:dispatch_moe
    python tests/sm90_compile.py usage:layer_norm       # [[variant name, ptxas usage or the error], ...]
    python tests/sm90_compile.py launched               # [[launch name, ptxas usage or the error], ...]

Run from the repository root without TRITON_INTERPRET (the kernels must be real JITFunctions),
two compiles at a time. ``usage`` and ``launched`` come from benchmarks/triton_resources.py: the
registers and spills ptxas reports; ``variants`` checks that each KERNEL_VARIANTS entry compiles.
The tests start these jobs in the background when the session begins (tests/helpers.py)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def variant_compiles(module: str, index: int) -> tuple[str, dict[str, int] | str]:
    """(name, {shared, ptx}) of ``pmoe_fast.kernels.<module>.KERNEL_VARIANTS[index]`` compiled for
    sm_90 (``triton_resources.compile_variant``), or (name, the traceback)."""
    import triton_resources as tr

    v = tr.kernel_modules()[module].KERNEL_VARIANTS[index]
    assert type(v["kernel"]).__name__ == "JITFunction", type(v["kernel"])
    try:
        compiled = tr.compile_variant(v)
    except Exception:  # reported per variant
        return v["name"], traceback.format_exc()
    return v["name"], {"shared": compiled.metadata.shared, "ptx": len(compiled.asm["ptx"])}


def run(job: str):
    import triton_resources as tr

    kind, _, module = job.partition(":")
    with ProcessPoolExecutor(2) as pool:
        count = len(tr.kernel_modules()[module].KERNEL_VARIANTS) if module else 0
        if kind == "variants":
            return dict(pool.map(variant_compiles, [module] * count, range(count)))
        if kind == "usage":
            return list(pool.map(tr.usage, [module] * count, range(count)))
        if kind == "launched":
            return [r for found in pool.map(tr.launched_usage, list(tr.MODEL_CASES)) for r in found]
    raise SystemExit(f"unknown job {job!r}: variants:<module>, usage:<module> or launched")


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("sm90_compile.py compiles kernels: run it without TRITON_INTERPRET=1")
    json.dump(run(sys.argv[1]), sys.stdout)
