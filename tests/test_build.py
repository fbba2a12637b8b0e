"""The native build: what setup.py installed, the CMake build for C++ users, and pmoe_fast
without any built extension."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import pmoe_fast
from pmoe_fast._cuda_toolkit import find_cuda_home
from pmoe_fast._ext import extension_status

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs code in a fresh interpreter, so libraries it loads cannot collide with ours."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def without_build_flags(environ) -> dict:
    """The environment minus setup.py's flags, so each case sets exactly the flags it tests."""
    return {k: v for k, v in environ.items() if not k.startswith("PMOE_FAST_") and k != "MAX_JOBS"}


def nvcc_available() -> bool:
    """A CUDA toolkit with nvcc and headers, where setup.py looks for one."""
    from torch.utils import cpp_extension

    return find_cuda_home(cpp_extension.CUDA_HOME) is not None


def test_extension_loaded():
    """The README's test command installs the extension first: missing means a broken build."""
    status = extension_status()
    assert status["loaded"], f"pmoe_fast._C did not load: {status['error']}"
    assert status["error"] is None
    from pmoe_fast import _C

    assert Path(_C.__file__).parent == Path(pmoe_fast.__file__).parent, "_C*.so is not inside pmoe_fast/"
    assert hasattr(torch.ops.pmoe_fast, "prompt_fusion")
    assert hasattr(torch.ops.pmoe_fast, "prompt_fusion_backward")


def test_extension_links_libstdcxx_dynamically():
    """A compiler that links libstdc++ into _C statically leaves a second copy of it beside the
    process's: a C++ check that formats an integer into its error message then crashes instead of
    raising (seen on a GPU image whose CXX was a g++ 13 in /opt/gcc: test_cpp_dispatch.py's
    bad-input tests segfaulted in std::ostream::_M_insert<long> inside _C)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("no ldd on this machine to list what _C links")
    from pmoe_fast import _C

    linked = subprocess.run([ldd, _C.__file__], capture_output=True, text=True, timeout=60).stdout
    assert "libstdc++.so" in linked, (
        f"{_C.__file__} does not link libstdc++.so dynamically (static libstdc++?); rebuild with a "
        f"compiler that does, e.g. CXX=g++ CC=gcc pip install -e . --no-build-isolation. ldd says:\n{linked}"
    )


def test_cuda_part_built_when_possible():
    """With a CUDA torch and nvcc, setup.py must compile, link and import the CUDA sources."""
    if os.environ.get("PMOE_FAST_SKIP_CUDA_BUILD", "0") == "1":
        pytest.skip("PMOE_FAST_SKIP_CUDA_BUILD=1")
    if not torch.version.cuda:
        pytest.skip(f"torch {torch.__version__} is not a CUDA build")
    if not nvcc_available():
        pytest.skip("no CUDA toolkit (nvcc) found")
    assert extension_status()["cuda"], "the CUDA part of pmoe_fast._C was not built; see setup.py's output"


@pytest.mark.parametrize(
    "env, returncode, expected",
    [
        ({"PMOE_FAST_SKIP_CPP_BUILD": "1"}, 0, "building no extension (PMOE_FAST_SKIP_CPP_BUILD=1)"),
        (
            {"PMOE_FAST_SKIP_CUDA_BUILD": "1", "MAX_JOBS": "999"},
            0,
            f"CPU part only (PMOE_FAST_SKIP_CUDA_BUILD=1; MAX_JOBS={os.cpu_count()})",
        ),
        (
            {"PMOE_FAST_FORCE_CUDA_BUILD": "1", "CUDA_HOME": "/nonexistent"},
            1,
            "PMOE_FAST_FORCE_CUDA_BUILD=1 but the CUDA part cannot be built",
        ),
        ({"PMOE_FAST_FORCE_CUDA_BUILD": "1", "PMOE_FAST_SKIP_CUDA_BUILD": "1"}, 1, "are both set"),
    ],
    ids=["skip-cpp", "skip-cuda-caps-max-jobs", "force-cuda-without-nvcc", "force-and-skip"],
)
def test_setup_flags(env, returncode, expected):
    """setup.py's environment flags choose the parts to build, or fail loudly (no compiling)."""
    result = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**without_build_flags(os.environ), **env},
    )
    output = result.stdout + result.stderr
    assert result.returncode == returncode, output
    assert expected in output, output


@pytest.mark.slow
def test_cmake_build_cpu(tmp_path):
    """CMakeLists.txt builds libpmoe_fast_ops against libtorch; its op matches the reference."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert configure.returncode == 0, f"cmake configure failed:\n{configure.stdout}\n{configure.stderr}"
    compile_ = subprocess.run(
        ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert compile_.returncode == 0, f"cmake build failed:\n{compile_.stdout}\n{compile_.stderr}"
    library = build / "libpmoe_fast_ops.so"
    assert library.is_file(), f"no {library.name} in {sorted(p.name for p in build.iterdir())}"

    # pmoe_fast._C registers the same operators, so keep it out of that interpreter.
    check = run_python(
        f"""
        import torch
        torch.ops.load_library({str(library)!r})
        from pmoe_fast.fusion import prompt_fusion_reference

        weights = torch.softmax(torch.randn(3, 2, 3, 3), dim=-1)
        prompts = torch.randn(3, 3, 100)
        out = torch.ops.pmoe_fast.prompt_fusion(weights, prompts)
        torch.testing.assert_close(out, prompt_fusion_reference(weights, prompts), rtol=1e-5, atol=1e-5)
        print("prompt_fusion ok")
        """,
        env={"PMOE_FAST_DISABLE_EXTENSION": "1"},
    )
    assert check.returncode == 0 and "prompt_fusion ok" in check.stdout, check.stdout + check.stderr


def test_import_without_extension():
    """import pmoe_fast works with no extension: one warning, a clear error from the ops."""
    result = run_python(
        """
        import json, warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import pmoe_fast
            from pmoe_fast import fusion
            from pmoe_fast._ext import extension_status, require_extension
        ours = [str(w.message) for w in caught if "pmoe_fast._C" in str(w.message)]
        weights, prompts = torch.softmax(torch.randn(3, 2, 3, 3), -1), torch.randn(3, 3, 8)
        try:
            fusion.prompt_fusion(weights, prompts)
            error = None
        except RuntimeError as e:
            error = str(e)
        reference_shape = list(fusion.prompt_fusion_reference(weights, prompts).shape)
        print(json.dumps({"warnings": ours, "status": extension_status(), "error": error,
                          "reference_shape": reference_shape}))
        """,
        env={"PMOE_FAST_DISABLE_EXTENSION": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["warnings"]) == 1, report["warnings"]
    assert "PMOE_FAST_DISABLE_EXTENSION=1" in report["warnings"][0]
    assert "pip install -e . --no-build-isolation" in report["warnings"][0]
    disabled = "disabled by PMOE_FAST_DISABLE_EXTENSION=1"
    assert report["status"] == {"loaded": False, "cuda": False, "error": disabled}
    error = report["error"]
    assert error is not None, "prompt_fusion ran without the extension"
    needles = (
        "pmoe_fast.prompt_fusion",
        disabled,
        "pip install -e . --no-build-isolation",
        "PMOE_FAST_SKIP_CUDA_BUILD",
        "PMOE_FAST_FORCE_CUDA_BUILD",
    )
    for needle in needles:
        assert needle in error, f"{needle!r} missing from: {error}"
    assert report["reference_shape"] == [3, 2, 3, 8]


def test_cuda_resources_lists_kernels_with_and_without_shared_memory(monkeypatch):
    """benchmarks/cuda_resources.py's rows from ptxas -v, which names shared memory only for the
    kernels that use some: a kernel without any is listed with 0 bytes, not left out."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import cuda_resources

    ptxas = textwrap.dedent(
        """\
        ptxas info    : Compiling entry function '_Z4copyPf' for 'sm_90'
        ptxas info    : Function properties for _Z4copyPf
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 19 registers, used 0 barriers
        ptxas info    : Compiling entry function '_Z6reducePf' for 'sm_90'
        ptxas info    : Function properties for _Z6reducePf
            8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 31 registers, used 1 barriers, 32 bytes smem
        """
    )
    monkeypatch.setattr(cuda_resources, "short_name", lambda mangled: mangled)
    assert cuda_resources.parse(ptxas) == [("_Z4copyPf", 19, 0, 0, 0, 0), ("_Z6reducePf", 31, 8, 4, 12, 32)]
