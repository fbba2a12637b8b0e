"""The pmoe_fast benchmark suite's profile option, cases, environment and JSON additions.

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 python -m pytest \\
        benchmarks/bench_model.py benchmarks/bench_dispatch.py --bench-profile quick \\
        --benchmark-json=benchmark.json

``--bench-profile`` names one of ``pmoe_fast.bench.PROFILES`` (default: gpu on a machine with a
CUDA GPU, quick on a CPU); its cases parametrise ``model_case`` and ``dispatch_case`` (each a
``pmoe_fast.bench.Case`` as a dict).
``pmoe-fast bench`` runs exactly this and reports on the JSON. The JSON gains a ``pmoe_fast`` key:
the profile, and the skipped and failed cases with their reasons (pytest-benchmark itself only
records the cases that ran).
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
from dataclasses import asdict

import pytest
import torch

import pmoe_fast
from pmoe_fast.bench import MALLOC_SETTINGS, PROFILES, Profile, resolve_profile

PROFILE = pytest.StashKey[Profile]()
OUTCOMES = pytest.StashKey[dict]()
ENVIRONMENT = pytest.StashKey[dict]()


def pytest_addoption(parser):
    parser.addoption("--bench-profile", choices=list(PROFILES), default=None,
                     help="the pmoe_fast benchmark sweep; default: gpu with a CUDA GPU, quick without")


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def pytest_configure(config):
    try:
        profile = resolve_profile(config.getoption("bench_profile"))
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[PROFILE] = profile
    config.stash[OUTCOMES] = {"skipped": [], "failed": []}
    config.stash[ENVIRONMENT] = {
        "profile": profile.name,
        "device": profile.device,
        "device_name": _device_name(profile.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "pmoe_fast": pmoe_fast.__version__,
        "python": platform.python_version(),
        "glibc_keeps_freed_memory": all(os.environ.get(k) == v for k, v in MALLOC_SETTINGS.items()),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "cpu_count": os.cpu_count(),
    }


def pytest_report_header(config):
    env, profile = config.stash[ENVIRONMENT], config.stash[PROFILE]
    lines = [f"pmoe_fast benchmarks, profile {profile.name!r}: {profile.help}"]
    if profile.device == "cuda":
        lines.append(f"on {env['device_name']}")
    elif env["glibc_keeps_freed_memory"]:
        lines.append(f"on CPU ({env['device_name']}), {env['threads']} threads, glibc keeps freed memory")
    else:
        missing = " ".join(f"{k}={v}" for k, v in MALLOC_SETTINGS.items())
        lines.append(f"on CPU WITHOUT {missing}: timings include page faults")
    if profile.device == "cpu" and env["load_average_at_start"] > 0.5 * env["cpu_count"]:
        lines.append(f"WARNING: other processes keep the CPU busy (load average {env['load_average_at_start']} on "
                     f"{env['cpu_count']} cores): CPU timings will be slow and noisy")
    return lines


def pytest_generate_tests(metafunc):
    profile = metafunc.config.stash[PROFILE]
    for bench in ("model", "dispatch"):
        if f"{bench}_case" in metafunc.fixturenames:
            cases = profile.cases(bench)
            # as dicts, which pytest-benchmark writes into the JSON's params as they are
            metafunc.parametrize(f"{bench}_case", [asdict(c) for c in cases], ids=[str(c) for c in cases])


@pytest.fixture(scope="session")
def profile(request) -> Profile:
    return request.config.stash[PROFILE]


@pytest.fixture(scope="session")
def environment(request) -> dict:
    """Device name, versions and threads, for each case's ``extra_info``."""
    return request.config.stash[ENVIRONMENT]


@pytest.fixture(autouse=True)
def _release_memory():
    """Each case starts from the memory the previous one left free."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _first_line(typename: str, error: BaseException) -> str:
    message = str(error).strip()
    return f"{typename}: {message.splitlines()[0]}" if message else typename


def _case(item):
    params = getattr(item, "callspec", None)
    params = params.params if params else {}
    return params.get("model_case") or params.get("dispatch_case")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    case = _case(item)
    if case is not None and (report.skipped or report.failed):
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
        elif call.excinfo is not None:
            reason = _first_line(call.excinfo.typename, call.excinfo.value)
        else:
            reason = str(report.longrepr).strip().splitlines()[-1]
        item.config.stash[OUTCOMES]["skipped" if report.skipped else "failed"].append({"case": case, "reason": reason})
        fixture = getattr(item, "funcargs", {}).get("benchmark")
        if report.failed and fixture is not None:
            fixture.has_error = True  # timed, then failed: its numbers stay out of the JSON
    return report


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["pmoe_fast"] = {
        "profile": asdict(config.stash[PROFILE]),
        "environment": config.stash[ENVIRONMENT],
        **config.stash[OUTCOMES],
    }
