import importlib.util
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before any test
# imports a module that defines kernels. Without a GPU the interpreter is the only way to run them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    # The interpreter's tl.dot and bf16 casts, made to round as an H100's (see the module).
    from triton_interpreter import install

    install()


def pytest_collection_modifyitems(items):
    """The tests that read the background compiles for sm_90 run last, in their order: the
    compiles have the whole session."""
    from helpers import reads_sm90_job

    items.sort(key=reads_sm90_job)


@pytest.fixture(scope="session", autouse=True)
def _sm90_compiles_in_background(request):
    """The selected tests' compiles for sm_90 (``helpers.SM90_JOBS``) start with the session."""
    from helpers import start_sm90_jobs, stop_sm90_jobs

    start_sm90_jobs(request.session.items)
    yield
    stop_sm90_jobs()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield



@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny models, where OpenMP threads only contend (modules opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

def pytest_terminal_summary(terminalreporter):
    """Say which kernel paths this machine let the suite run, and which it could not."""
    from pmoe_fast._ext import extension_status

    ext = extension_status()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    on_cpu = [
        r
        for r in terminalreporter.stats.get("passed", [])
        if "test_cuda_on_cpu.py::test_dispatch" in r.nodeid or "test_cuda_on_cpu.py::test_fusion" in r.nodeid
    ]
    lines = [
        f"C++ CPU ops: {'ran' if ext['loaded'] else 'NOT AVAILABLE: ' + str(ext['error'])}",
        f"CUDA sources: {'compiled, linked and imported' if ext['cuda'] else 'not built'}; "
        f"CUDA kernels {'ran on ' + gpu if gpu and ext['cuda'] else 'not executed on a GPU (no GPU)'}",
        f"CUDA kernels (csrc/cuda) on the CPU, through tests/cuda_on_cpu: "
        f"{f'{len(on_cpu)} tests passed' if on_cpu else 'not run'}",
        f"Triton: {'interpreter (TRITON_INTERPRET=1; dots and bf16 casts rounded as on sm_90)' if os.environ.get('TRITON_INTERPRET') == '1' else 'compiled'}",
    ]
    terminalreporter.section("pmoe_fast kernel paths")
    for line in lines:
        terminalreporter.write_line(line)
