"""Triton's interpreter, made to multiply as an H100 does.

The dispatcher kernels' tests run in Triton's interpreter on machines without a GPU. Its
arithmetic differs from sm_90's in three ways that matter to them (Triton 3.8):

* bfloat16 operands: the interpreter holds bfloat16 as its bits in uint16 and multiplies those
  bits as integers (triton-lang/triton#11584, "not supported yet"). Here they are widened to
  float32 first, which is exact.
* ``input_precision="tf32"`` on float32 operands: the interpreter multiplies in full float32.
  On sm_90 Triton feeds the float32 registers to ``wgmma ... tf32`` without a rounding
  conversion, and the tensor cores read only tf32's 10 mantissa bits: the low 13 bits are
  dropped. Here they are dropped the same way, so a kernel that relies on tf32 where it needs
  float32 fails its tests here too.
* float32 to bfloat16 casts (``x.to(tl.bfloat16)``, a store into bfloat16): the interpreter
  truncates; sm_90 rounds to nearest even (``cvt.rn.bf16.f32``), as PyTorch does. Here they
  round to nearest even.

``tf32x3`` stays a float32 product: its error (about 2**-21 relative) is below the tests'
float32 floor.

One change is for speed alone: on every call of a ``@triton.jit`` helper inside a kernel the
interpreter patches ``triton.language`` again, and each time it lists every member of four
modules and classes (``inspect.getmembers``) to find the builtins not patched yet. Under
cProfile that listing was a third of the MoE dispatcher tests' time. Here the builtins of the
modules and classes it patches are listed once, at ``install()``, while nothing is patched, and
each call patches those of them still unpatched. That is what the interpreter's own scan finds:
builtins are made at import only, and a patched builtin is no longer one. (Listed lazily instead,
a module first seen inside a kernel would miss ``reduce`` and ``associative_scan``, which the
interpreter replaces in tl.core before it scans tl.core.)

``install()`` patches the interpreter in this process (the patched functions keep the
interpreter's own as ``.original``); conftest.py calls it when ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import inspect

import numpy as np


def _tf32(x: np.ndarray) -> np.ndarray:
    """float32 x with its low 13 mantissa bits cleared, as sm_90's tensor cores read it."""
    return (x.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def _bf16(x: np.ndarray) -> np.ndarray:
    """float32 x rounded to nearest even bfloat16, as bits in uint16 (the interpreter's storage)."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)


def patched_by_the_interpreter() -> tuple:
    """What the interpreter's ``_patch_lang`` patches the builtins of: tl and tl.core, their
    tensor class, tl.math, and tensor_descriptor_base."""
    import triton.language as tl

    return (tl, tl.core, tl.tensor, tl.math, tl.core.tensor_descriptor_base)


def install() -> None:
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if hasattr(builder_cls.create_dot, "original"):
        return
    original_dot, original_cast = builder_cls.create_dot, builder_cls.cast_impl

    def operand(handle, input_precision):
        if handle.dtype.scalar == tl.bfloat16:
            widened = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(widened, tl.float32)
        if handle.dtype.scalar == tl.float32 and input_precision == ir.INPUT_PRECISION.TF32:
            return interpreter.TensorHandle(_tf32(handle.data), tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = operand(a, input_precision), operand(b, input_precision)
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_bf16(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    create_dot.original, cast_impl.original = original_dot, original_cast
    builder_cls.create_dot = create_dot
    builder_cls.cast_impl = cast_impl

    # Anything else keeps the interpreter's own scan.
    builtin_names = {
        pkg: [name for name, member in inspect.getmembers(pkg) if tl.core.is_builtin(member)]
        for pkg in patched_by_the_interpreter()
    }
    original_patch_builtin = interpreter._patch_builtin

    def patch_builtin(pkg, builder, scope):
        if pkg not in builtin_names:
            return original_patch_builtin(pkg, builder, scope)
        for name in builtin_names[pkg]:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):
                interpreter._patch_attr(pkg, name, member, builder, scope)

    patch_builtin.original = original_patch_builtin
    interpreter._patch_builtin = patch_builtin
