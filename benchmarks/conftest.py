"""Benchmark settings that decide whether CPU numbers measure the code or the operating system."""

import os

import torch

# glibc hands large freed blocks back to the OS, and each later allocation faults its pages in
# again. On the 2-core development VM that made a whole-model inference step up to 10x slower,
# by different amounts for different models (they allocate differently). Keeping freed memory in
# the process measures the code instead. glibc reads these at start-up, so set them on the command
# line (the README's benchmark commands do).
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}


def pytest_report_header(config):
    if torch.cuda.is_available():
        return f"pmoe_fast benchmarks on {torch.cuda.get_device_name()}"
    missing = [f"{k}={v}" for k, v in MALLOC_SETTINGS.items() if os.environ.get(k) != v]
    if missing:
        return "pmoe_fast benchmarks on CPU WITHOUT " + " ".join(missing) + ": timings include page faults"
    return f"pmoe_fast benchmarks on CPU, {torch.get_num_threads()} threads, glibc keeps freed memory"
