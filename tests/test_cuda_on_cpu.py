"""csrc/cuda/dispatch.cu's kernels and host code, run on the CPU.

tests/cuda_on_cpu builds dispatch.cu for the CPU (a fiber per CUDA thread, blocks in turn; what it
can and cannot check is in cuda_on_cpu.h), and the fixture below makes it pmoe_fast's CPU
implementation of dispatch_mlp and dispatch_mlp_backward while a test runs. The kernels then meet
the parity rule of test_cpp_dispatch.py, as on a GPU, on a machine without one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_cpp_dispatch as cpp_tests
import torch
from test_cpp_dispatch import CASES, assert_parity, forward_backward, make_case

from pmoe_fast._ext import extension_status

# A C++ build (~20 s on 2 cores), then 256 fibers a block: ~1 minute in all.
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cuda_kernels_on_cpu(tmp_path_factory):
    """pmoe_fast::dispatch_mlp and dispatch_mlp_backward on CPU tensors run dispatch.cu's kernels."""
    status = extension_status()
    if not status["loaded"]:
        pytest.skip(f"pmoe_fast._C is not available ({status['error']}): no ops to route to the kernels")
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="pmoe_fast_cuda_on_cpu",
        sources=[str(HERE / "cuda_on_cpu" / "dispatch_on_cpu.cpp")],
        extra_cflags=["-O2"],
        build_directory=str(tmp_path_factory.mktemp("cuda_on_cpu")),
        is_python_module=False,
        with_cuda=False,
    )
    calls = {"dispatch_mlp": 0, "dispatch_mlp_backward": 0}

    def route(name):
        op = getattr(torch.ops.pmoe_fast_cuda_on_cpu, name)

        def run(*args):
            calls[name] += 1
            return op(*args)

        return run

    lib = torch.library.Library("pmoe_fast", "IMPL")
    for name in calls:
        lib.impl(name, route(name), "CPU")
    yield calls
    lib._destroy()  # the C++ CPU kernels serve again


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_parity_with_dispatcher(case, cuda_kernels_on_cpu):
    assert_parity(case, "cpu", cuda_kernels=True)


@pytest.mark.parametrize("name", ["odd-separate", "H0", "multi-tile"])
def test_float64_matches_the_dispatcher_to_roundoff(name, cuda_kernels_on_cpu):
    """In float64 the kernels' error is rounding alone: a lost or doubled term would show."""
    case = CASES[name]
    torch.manual_seed(0)
    inputs = make_case(case, "cpu")
    ref = forward_backward(case, "dispatcher", *inputs, dtype=torch.float64)
    ours = forward_backward(case, "op", *inputs, dtype=torch.float64)
    for key, r in ref.items():
        if r is None:
            assert ours[key] is None, key
            continue
        torch.testing.assert_close(ours[key], r, rtol=1e-10, atol=1e-12, msg=lambda m: f"{key}: {m}")


def test_the_ops_run_the_kernels(cuda_kernels_on_cpu):
    """The fixture routes both ops to the CPU build of dispatch.cu, not to the C++ CPU kernels."""
    calls = dict(cuda_kernels_on_cpu)
    c = CASES["odd-shared"]
    forward_backward(c, "op", *make_case(c, "cpu"))
    assert cuda_kernels_on_cpu == {name: n + 1 for name, n in calls.items()}


def test_output_dtypes_match_the_torch_backend_for_every_dtype_mix(cuda_kernels_on_cpu):
    cpp_tests.test_output_dtypes_match_the_torch_backend_for_every_dtype_mix("cpu")


@pytest.mark.parametrize("H", [3, 0], ids=["H3", "H0"])
def test_gradcheck_float64(H, cuda_kernels_on_cpu):
    cpp_tests.test_gradcheck_float64(H, "cpu")
