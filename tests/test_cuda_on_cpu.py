"""csrc/cuda's kernels and host code, run on the CPU.

tests/cuda_on_cpu builds dispatch.cu and prompt_fusion.cu for the CPU (a fiber per CUDA thread,
blocks in turn; what it can and cannot check is in cuda_on_cpu.h), and the fixtures below make them
pmoe_fast's CPU implementations of their ops while a test runs. The kernels then meet the GPU's
parity tests (test_cpp_dispatch.py, test_prompt_fusion.py) on a machine without a GPU, and once
more built with AddressSanitizer and UndefinedBehaviorSanitizer, which fail any read or write out
of bounds and any undefined behaviour (a signed index overflowing, say).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import test_cpp_dispatch as cpp_tests
import test_dispatch_backends as backend_tests
import test_prompt_fusion as fusion_tests
import torch
from test_cpp_dispatch import CASES, Case, assert_parity, forward_backward, make_case, source_params

from pmoe_fast._ext import extension_status
from pmoe_fast.fused_dispatch import MAX_CUDA_HIDDEN, cuda_not_supported_reasons, dispatch_mlp

# Two C++ builds (~35 s and, with the sanitizers, ~50 s on 2 cores), then 256 fibers a block:
# ~3 minutes in all, the sanitizer build and run beside the other tests (sanitizer_run).
pytestmark = pytest.mark.slow

SOURCES = Path(__file__).resolve().parent / "cuda_on_cpu"


@pytest.fixture(scope="module")
def cuda_on_cpu_ops(tmp_path_factory):
    """Builds the CPU versions of csrc/cuda's ops: torch.ops.pmoe_fast_cuda_on_cpu."""
    status = extension_status()
    if not status["loaded"]:
        pytest.skip(f"pmoe_fast._C is not available ({status['error']}): no ops to route to the kernels")
    from torch.utils import cpp_extension

    cpp_extension.load(
        name="pmoe_fast_cuda_on_cpu",
        sources=[str(SOURCES / f"{name}_on_cpu.cpp") for name in ("dispatch", "prompt_fusion", "selftest")],
        extra_cflags=["-O2"],
        build_directory=str(tmp_path_factory.mktemp("cuda_on_cpu")),
        is_python_module=False,
        with_cuda=False,
    )
    return torch.ops.pmoe_fast_cuda_on_cpu


def route(ops, names):
    """While the returned Library lives, pmoe_fast's ops `names` on CPU tensors run the CPU build of
    their CUDA kernels; calls counts those calls."""
    calls = dict.fromkeys(names, 0)

    def kernel(name):
        op = getattr(ops, name)

        def run(*args):
            calls[name] += 1
            return op(*args)

        return run

    lib = torch.library.Library("pmoe_fast", "IMPL")
    for name in names:
        lib.impl(name, kernel(name), "CPU")
    return lib, calls


@pytest.fixture(scope="module")
def dispatch_kernels(cuda_on_cpu_ops):
    lib, calls = route(cuda_on_cpu_ops, ["dispatch_mlp", "dispatch_mlp_backward"])
    yield calls
    lib._destroy()  # the C++ CPU kernels serve again


@pytest.fixture(scope="module")
def fusion_kernels(cuda_on_cpu_ops):
    lib, calls = route(cuda_on_cpu_ops, ["prompt_fusion", "prompt_fusion_backward"])
    yield calls
    lib._destroy()


@contextlib.contextmanager
def block_order(ops, order: int):
    """Launches inside run their blocks by index (0), in reverse (1) or shuffled (2)."""
    ops.set_block_order(order)
    try:
        yield
    finally:
        ops.set_block_order(0)


# cuda_on_cpu.h itself -----------------------------------------------------------------------


def test_shared_memory_and_barrier(cuda_on_cpu_ops):
    x = torch.randn(3, 128)
    torch.testing.assert_close(cuda_on_cpu_ops.selftest_reverse(x), x.flip(1), rtol=0, atol=0)


@pytest.mark.parametrize("lane_mask", [1, 2, 4, 8, 16])
def test_warp_shuffle(lane_mask, cuda_on_cpu_ops):
    x = torch.randn(128)
    expected = x[torch.arange(128) ^ lane_mask]
    torch.testing.assert_close(cuda_on_cpu_ops.selftest_shuffle(x, lane_mask), expected, rtol=0, atol=0)


def test_mma_multiplies_the_fragments_of_the_documented_layout(cuda_on_cpu_ops):
    """mma_bf16 (csrc/cuda/mma.cuh's layouts, emulated): a lane loading its fragments as documented
    gets its part of a b + c, the products of bfloat16 values exact in float."""
    torch.manual_seed(0)
    a = torch.randn(16, 16).bfloat16().float()
    b = torch.randn(16, 8).bfloat16().float()
    c = torch.randn(16, 8)
    expected = (a.double() @ b.double() + c.double()).float()
    torch.testing.assert_close(cuda_on_cpu_ops.selftest_mma(a, b, c), expected, rtol=1e-6, atol=1e-6)
    # Every element's place matters: a transposed b is another product.
    assert not torch.allclose(cuda_on_cpu_ops.selftest_mma(a, b.flip(0), c), expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("by_reduction", [False, True], ids=["along-reduction", "by-reduction"])
def test_ldmatrix_fragments_are_the_documented_layout(by_reduction, cuda_on_cpu_ops):
    """load_a and load_b (csrc/cuda/mma.cuh): the rows each lane gives ldmatrix.x4, read as the
    PTX ISA says ldmatrix hands them out (transposed with .trans), are mma_bf16's documented
    fragments: for A the block itself, for B the block as [column][reduction], columns 0-7 in b[0]
    and 8-15 in b[1]; load_a<true> and load_b<true> take the block transposed."""
    ld, col0 = 40, 8
    torch.manual_seed(0)
    x = torch.randn(16, ld).bfloat16()
    block = x.float()[:, col0 : col0 + 16]
    got = cuda_on_cpu_ops.selftest_fragments(x, col0, by_reduction)
    if by_reduction:
        block = block.T
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    half = torch.arange(2)
    a = torch.stack([block[(g + 8 * (i % 2))[:, None], (2 * t + 8 * (i // 2))[:, None] + half] for i in range(4)], 1)
    b = torch.stack(
        [block[(8 * j + g)[:, None], (2 * t + 8 * r)[:, None] + half] for j in range(2) for r in range(2)], 1
    )
    assert torch.equal(got, torch.cat([a.reshape(32, 8), b.reshape(32, 8)], 1))


def test_bfloat16_parts_hold_each_dtype_to_its_precision(cuda_on_cpu_ops):
    """split_bf16: bfloat16 values are their first part, half values their first two, and floats
    the sum of three to float's precision (2^-24 relative, where two parts leave about 2^-17)."""
    torch.manual_seed(0)
    x = torch.randn(4096) * torch.logspace(-20, 20, 4096)
    bf16 = x.bfloat16().float()
    half = (torch.randn(4096) * torch.logspace(-8, 4, 4096)).half().float()  # subnormal to 6e4
    assert torch.equal(cuda_on_cpu_ops.selftest_split_bf16(bf16)[:, 0], bf16)
    assert not cuda_on_cpu_ops.selftest_split_bf16(bf16)[:, 1:].any()
    half_parts = cuda_on_cpu_ops.selftest_split_bf16(half)
    assert torch.equal(half_parts[:, 0].double() + half_parts[:, 1].double(), half.double())
    assert not half_parts[:, 2].any()
    parts = cuda_on_cpu_ops.selftest_split_bf16(x).double()
    rel = ((parts.sum(1) - x.double()).abs() / x.double().abs()).max().item()
    assert rel <= 2.0**-24, rel
    assert ((parts[:, :2].sum(1) - x.double()).abs() / x.double().abs()).max().item() > 2.0**-20


def test_every_block_and_thread_of_a_3d_grid_runs_once(cuda_on_cpu_ops):
    out = cuda_on_cpu_ops.selftest_indices(4, 3, 2)
    z, y, x, t = torch.meshgrid(*(torch.arange(n) for n in (2, 3, 4, 64)), indexing="ij")
    assert torch.equal(out, ((z * 10 + y) * 10 + x) * 1000 + t)


@pytest.mark.parametrize("order", [0, 1, 2], ids=["index", "reversed", "shuffled"])
def test_blocks_run_once_each_in_the_order_set(order, cuda_on_cpu_ops):
    with block_order(cuda_on_cpu_ops, order):
        ran = cuda_on_cpu_ops.selftest_order(5, 3)
    assert sorted(ran.tolist()) == list(range(15))
    if order < 2:
        assert ran.tolist() == list(range(15))[:: 1 - 2 * order]
    else:
        assert ran.tolist() not in (list(range(15)), list(range(15))[::-1])


def test_a_barrier_some_threads_never_reach_raises(cuda_on_cpu_ops):
    with pytest.raises(RuntimeError, match="stuck: 63 threads wait at a barrier"):
        cuda_on_cpu_ops.selftest_diverging_barrier()


# Every kernel under AddressSanitizer and UndefinedBehaviorSanitizer ---------------------------------

ASAN_RUN = """
import sys
import torch
from torch.utils import cpp_extension
sys.path.insert(0, {tests!r})
cpp_extension.load(
    name="pmoe_fast_cuda_on_cpu_asan",
    sources=[{sources}],
    extra_cflags=[
        "-O1", "-g1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"
    ],
    extra_ldflags=["-fsanitize=address,undefined"],
    build_directory={build!r},
    is_python_module=False,
    with_cuda=False,
)
import test_cpp_dispatch as dispatch, test_prompt_fusion as fusion, test_cuda_on_cpu as here
names = ["dispatch_mlp", "dispatch_mlp_backward", "prompt_fusion", "prompt_fusion_backward"]
lib, calls = here.route(torch.ops.pmoe_fast_cuda_on_cpu, names)
cases = [dispatch.CASES[name] for name in {cases!r}]
for case in [*cases, dispatch.Case(K=64, B=1, Np=2, T=5, D=8, H=4, separate=True)]:
    dispatch.assert_parity(case, "cpu", cuda_kernels=True)
for shape in fusion.SHAPES:
    for w_dtype, p_dtype in (fusion.DTYPES[0], fusion.DTYPES[-1]):
        fusion.test_parity(*shape, w_dtype, p_dtype, "cpu")
fusion.test_non_contiguous_inputs("cpu")
assert all(calls[name] > 0 for name in names), calls
print("checked", calls)
"""


SANITIZER_TEST = "test_kernels_under_address_and_undefined_behavior_sanitizers"


@pytest.fixture(scope="module", autouse=True)
def sanitizer_run(request, tmp_path_factory, cuda_on_cpu_ops):
    """Starts the sanitizer build and run of ``SANITIZER_TEST`` in the background once this
    module's own build is done, when that test is selected: (the process, its log), or why it
    cannot run here. It builds two files at a time, then runs in one thread, beside this module's
    other tests, mostly a single thread too: on 2 cores the module took 156 s so, 214 s with the two
    one after the other (185 s since the float tiles' products run on emulated tensor cores, the
    sanitizer build at -O1). The test, last in the module, waits for it."""
    if not any(item.module is request.module and item.name == SANITIZER_TEST for item in request.session.items):
        yield "not selected"
        return
    found = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True)
    libasan = found.stdout.strip()
    if not os.path.isabs(libasan):
        yield "g++ has no AddressSanitizer runtime (libasan.so) here"
        return
    names = ("dispatch", "prompt_fusion", "selftest")
    sources = ", ".join(repr(str(SOURCES / f"{name}_on_cpu.cpp")) for name in names)
    # Cases that between them take every path through the kernels' indexing: separate f's without
    # prompt_out, H = 0, strided fp16 tokens, several tiles, token chunks of unequal length, row
    # groups of two images, and K = 64; fp32 and bf16 for prompt fusion.
    cases = ["H0-separate-no-prompt-out", "fp16-tokens-strided-separate", "multi-tile", "long-and-short-ranges",
             "images-per-group"]
    build = tmp_path_factory.mktemp("cuda_on_cpu_asan")
    code = ASAN_RUN.format(tests=str(SOURCES.parent), sources=sources, build=str(build), cases=cases)
    env = {**os.environ, "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0", "MAX_JOBS": "2"}
    log = build / "run.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)], stdout=out, stderr=subprocess.STDOUT, text=True, env=env
        )
    yield process, log
    if process.poll() is None:  # the module ended before its test waited (a failure with -x, say)
        process.kill()
        process.wait()


# dispatch.cu ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_dispatch_parity_with_dispatcher(case, dispatch_kernels):
    assert_parity(case, "cpu", cuda_kernels=True)


@functools.cache
def kernel_results(name):
    """Case `name`'s inputs (seed 0) and what the kernels give for them, their blocks by index: run
    once for the tests below that look at them."""
    case = CASES[name]
    torch.manual_seed(0)
    inputs = make_case(case, "cpu")
    return inputs, forward_backward(case, "op", *inputs)


@pytest.mark.parametrize("order", [1, 2], ids=["reversed", "shuffled"])
@pytest.mark.parametrize("name", ["odd-shared", "H0-separate-no-prompt-out", "images-per-group", "multi-tile"])
def test_dispatch_results_do_not_depend_on_the_block_order(name, order, cuda_on_cpu_ops, dispatch_kernels):
    """On a GPU any block may be the last to arrive and finish what others started: in the forward
    an expert's f_e block (then finishing all of its images), an image's f_p block or one of its
    token chunks; in the backward an image's last block of prompt rows (several at Np = 40,
    "multi-tile") and a tile's last row group. Reversed, f_e's blocks come last; shuffled, every
    role finishes some image. The results must be the same bits whichever it is."""
    case = CASES[name]
    inputs, by_index = kernel_results(name)
    with block_order(cuda_on_cpu_ops, order):
        reordered = forward_backward(case, "op", *inputs)
    for key, value in by_index.items():
        assert (value is None and reordered[key] is None) or torch.equal(value, reordered[key]), key


@pytest.mark.parametrize("name", ["odd-shared", "multi-tile", "images-per-group"])
def test_dispatch_float32_tiles_keep_float_accuracy(name, dispatch_kernels):
    """The float tiles' products on tensor cores (mma.cuh: three bfloat16 parts of each float
    operand) err as float arithmetic does: every result within 2e-6 of its largest reference
    value, where two parts of each operand leave up to 7e-6 here, both under the parity tests'
    1e-5 floor."""
    inputs, ours = kernel_results(name)
    ref = forward_backward(CASES[name], "dispatcher", *inputs, dtype=torch.float64)
    for key, r in ref.items():
        if r is not None:
            err = (ours[key].double() - r).abs().max().item() / r.abs().max().item()
            assert err <= 2e-6, f"{key}: {err:.3g} of the largest value"


@pytest.mark.parametrize(
    "case",
    [Case(token_dtype=torch.bfloat16, D=96, H=38), Case(token_dtype=torch.bfloat16, D=98, H=38, strided=True)],
    ids=["rows-copied", "rows-converted"],
)
def test_dispatch_bf16_tokens_copied_as_they_are_or_converted(case, dispatch_kernels):
    """The float tiles copy bfloat16 token rows into shared memory as they are where they fit whole
    aligned vectors (D = 96) and convert them otherwise (D = 98, rows 196 bytes apart), beside the
    bfloat16 parts of W1 and dA, padded to whole vectors (D = 98 and H = 38 not multiples of 8; dA's
    last vector of 4, 36..39, reads the padding)."""
    assert_parity(case, "cpu", cuda_kernels=True)


def test_dispatch_bf16_rows_copied_or_converted_give_the_same_bits(dispatch_kernels):
    """The same bfloat16 tokens, their rows 192 bytes apart (whole aligned vectors: copied into the
    tiles as they are) or 196 (converted), give the same bits: a bfloat16 value is its own only
    bfloat16 part."""
    c = Case(token_dtype=torch.bfloat16, D=96, H=38)
    torch.manual_seed(0)
    disp, prompts, tokens, prompt_out, grad_ipt = make_case(c, "cpu")
    params = [cpp_tests.source_params(disp, s) for s in ("e", "p", "z")]
    parameters = [t for source in params for t in source if t is not None]
    leaves = [t.requires_grad_() for t in (prompts, prompt_out, *parameters)]
    starts, ends = c.ranges()
    results = []
    for width in (c.D, c.D + 2):
        rows = torch.zeros(c.K, c.B, c.T, width, dtype=tokens.dtype)
        rows[..., : c.D] = tokens
        rows.requires_grad_()
        ipt, weights = dispatch_mlp(prompts, rows[..., : c.D], starts, ends, prompt_out, *params)
        grads = torch.autograd.grad(ipt, [rows, *leaves], grad_ipt)
        results.append([ipt, weights, grads[0][..., : c.D], *grads[1:]])
    for copied, converted in zip(*results):
        assert torch.equal(copied, converted)


def test_dispatch_parity_at_the_most_experts_the_kernels_take(dispatch_kernels):
    """K = 64: the kernels' per-expert arrays (token ranges, logits in shared memory) are full."""
    assert_parity(Case(K=64, B=1, Np=2, T=5, D=8, H=4, separate=True), "cpu", cuda_kernels=True)


def test_dispatch_rejects_more_experts_than_the_kernels_take(dispatch_kernels):
    c = Case(K=65, B=1, Np=2, T=5, D=8, H=4)
    with pytest.raises(RuntimeError, match="the CUDA kernels take at most 64 experts, got K = 65"):
        forward_backward(c, "op", *make_case(c, "cpu"))


def test_dispatch_rejects_a_hidden_layer_wider_than_the_kernels_index(dispatch_kernels):
    """Launch 2 walks a chunk's 64 tokens x padded(H) values of dA with a 32-bit index: one unit
    past MAX_CUDA_HIDDEN is named among the reasons and refused by the op before it allocates
    anything H-sized (W1 alone is 134 MB here)."""
    for H, refused in ((MAX_CUDA_HIDDEN, False), (MAX_CUDA_HIDDEN + 1, True)):
        c = Case(K=1, B=1, Np=1, T=2, D=1, H=H)
        disp, prompts, seq, prompt_out, grad_ipt = make_case(c, "cpu")
        params = [source_params(disp, s) for s in "epz"]
        reasons = " ".join(cuda_not_supported_reasons(prompts, seq, *c.ranges(), prompt_out, *params))
        assert (f"take at most {MAX_CUDA_HIDDEN}" in reasons) == refused
    with pytest.raises(RuntimeError, match=f"take a hidden width of at most {MAX_CUDA_HIDDEN}, got H = {H}"):
        forward_backward(c, "op", disp, prompts, seq, prompt_out, grad_ipt)


@pytest.mark.parametrize("name", ["odd-separate", "H0", "multi-tile"])
def test_dispatch_float64_matches_the_dispatcher_to_roundoff(name, dispatch_kernels):
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


def test_dispatch_output_dtypes_match_the_torch_backend_across_dtype_mixes(dispatch_kernels):
    """Every mix of the prompts', tokens' and prompt_out's dtypes, which choose the kernels' paths
    (the accumulation dtype, tokens read in place or converted, prompt_out converted or not), with
    the parameters' dtype, which is only converted, meeting each dtype of each of the other three:
    64 mixes of the 256, which took 68 s in CI here."""
    dtypes = cpp_tests.DTYPES
    mixes = [
        (p, z, zp, dtypes[(i + j + m) % len(dtypes)])
        for (i, p), (j, z), (m, zp) in itertools.product(enumerate(dtypes), repeat=3)
    ]
    cpp_tests.test_output_dtypes_match_the_torch_backend_for_every_dtype_mix("cpu", mixes)


@pytest.mark.parametrize("H", [3, 0], ids=["H3", "H0"])
def test_dispatch_gradcheck_float64(H, dispatch_kernels):
    """gradcheck's fast mode: the full check took 50 s here, a launch per output and two per input."""
    cpp_tests.test_gradcheck_float64(H, "cpu", fast_mode=True)


@pytest.mark.parametrize(
    "hidden,separate,pool,use_prompt_out",
    [(24, True, "all", True), (0, False, "patches", False)],
    ids=["H24-separate-all", "H0-first-layer"],
)
def test_dispatch_through_the_dispatcher_module(hidden, separate, pool, use_prompt_out, dispatch_kernels):
    """pmoe_fast.Dispatcher's fused path (its "cpp" backend calls the op these kernels serve here)."""
    backend_tests.test_fused_backend_matches_torch_in_float64("cpp", hidden, separate, pool, use_prompt_out)


@pytest.mark.parametrize("seq_dtype", [torch.float32, torch.bfloat16], ids=["fp32-seq", "bf16-seq"])
@pytest.mark.parametrize(
    "hidden,separate,pool,has_prompt_out",
    [(24, False, "all", True), (24, True, "patches", False)],
    ids=["H24-shared-all", "H24-separate-first-layer"],
)
def test_dispatch_into_the_sequence(seq_dtype, hidden, separate, pool, has_prompt_out, dispatch_kernels):
    """Dispatcher.dispatch_into: the IPTs written into the experts' sequences in place."""
    backend_tests.test_dispatch_into_matches_concatenating_in_float64(
        "cpp", seq_dtype, hidden, separate, pool, has_prompt_out
    )


def test_dispatch_ops_run_the_kernels(dispatch_kernels):
    """The fixture routes both ops to the CPU build of dispatch.cu, not to the C++ CPU kernels."""
    before = dict(dispatch_kernels)
    c = CASES["odd-shared"]
    forward_backward(c, "op", *make_case(c, "cpu"))
    assert dispatch_kernels == {name: n + 1 for name, n in before.items()}


# prompt_fusion.cu ----------------------------------------------------------------------------


@pytest.mark.parametrize("w_dtype, p_dtype", fusion_tests.DTYPES, ids=fusion_tests.DTYPE_IDS)
@pytest.mark.parametrize("K, B, Np, D", fusion_tests.SHAPES, ids=fusion_tests.SHAPE_IDS)
def test_fusion_parity(K, B, Np, D, w_dtype, p_dtype, fusion_kernels):
    fusion_tests.test_parity(K, B, Np, D, w_dtype, p_dtype, "cpu")


def test_fusion_non_contiguous_inputs(fusion_kernels):
    fusion_tests.test_non_contiguous_inputs("cpu")


def test_fusion_float64_accumulates_in_float64(fusion_kernels):
    fusion_tests.test_float64_accumulates_in_float64("cpu")


def test_fusion_gradcheck_float64(fusion_kernels):
    """gradcheck's fast mode: the full check took 54 s here."""
    fusion_tests.test_gradcheck_float64("cpu", fast_mode=True)


def test_fusion_ops_run_the_kernels(fusion_kernels):
    before = dict(fusion_kernels)
    weights, prompts = fusion_tests.make_inputs(3, 2, 3, 100)
    fusion_tests.forward_backward(fusion_tests.prompt_fusion, weights, prompts, torch.randn(3, 2, 3, 100))
    assert fusion_kernels == {name: n + 1 for name, n in before.items()}


# Last, so that the module's other tests run while the sanitizer build and run go on (sanitizer_run).
def test_kernels_under_address_and_undefined_behavior_sanitizers(sanitizer_run):
    """Parity cases again, with the kernels built with -fsanitize=address,undefined in a fresh
    interpreter: a read or write past any tensor or shared array, or undefined behaviour such as a
    signed index overflowing, fails the run (what compute-sanitizer would say on a GPU, for these
    inputs)."""
    if isinstance(sanitizer_run, str):
        pytest.skip(sanitizer_run)
    process, log = sanitizer_run
    process.wait(timeout=900)
    report = log.read_text()
    # Both sanitizers stop the process at the first error (-fno-sanitize-recover for UBSan).
    assert process.returncode == 0 and "\nchecked {" in "\n" + report, report[-4000:]
