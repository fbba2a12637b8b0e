"""Benchmark the reference and the fast pMoE side by side over a named profile: table, JSON, plots, --compare.

    pmoe-fast bench --profile quick --output bench-quick        # also: python -m pmoe_fast.bench
    pmoe-fast bench --profile quick --output bench-new --compare bench-quick/benchmark.json

Runs the pytest-benchmark suite in the source checkout's ``benchmarks/`` (the dispatcher op and
the whole model, a training step and inference) in a pytest subprocess, streaming its progress,
then prints one row per case and provider with the median time, images/s, peak memory and the
ratios against the reference, and writes into the output folder:

- ``benchmark.json``: pytest-benchmark's own file; each case's ``extra_info`` holds the shapes,
  device, versions, images/s, the peak memory and its split, and the fast model's execution plan;
  the ``pmoe_fast`` key holds the profile and the skipped and failed cases with their reasons;
- ``table.txt``: the printed table;
- ``images_per_s_vs_K.png``, ``peak_memory_vs_K.png``: one line per provider, one panel per
  mode, batch size and prompt count.

``--compare OLD.json`` matches cases by name and shape, prints the change of the median time and
the peak memory, and exits with status 1 when any case got slower or took more memory by more
than ``--threshold``. ``--input RUN.json`` reports on a saved run instead of running one.

On a CPU the suite runs with glibc keeping freed memory in the process (``MALLOC_SETTINGS``): a
timing would otherwise include the page faults of memory handed back to the OS and taken again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import output_folder_problem

# glibc hands large freed blocks back to the OS, and each later allocation faults its pages in
# again. On the 2-core development VM that made a whole-model inference step up to 10x slower,
# by different amounts for different models (they allocate differently). Keeping freed memory in
# the process measures the code instead. glibc reads these at start-up, so they go into the
# environment of the pytest process (or onto the command line when running pytest by hand).
MALLOC_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}

SUITE_FILES = ("bench_model.py", "bench_dispatch.py")
JSON_NAME = "benchmark.json"
PLOT_NAMES = {"images_per_s": "images_per_s_vs_K.png", "peak_memory_bytes": "peak_memory_vs_K.png"}
DISPATCH_BACKENDS = ("torch", "triton", "cuda", "cpp")
# Whole-model providers: the reference, compiled, and the fast model with the options of each
# variant (on top of the profile's expert dtype).
MODEL_PROVIDERS: dict[str, dict[str, Any] | None] = {
    "reference": None,
    "reference-compiled": None,
    "fast": {},
    "fast-checkpoint": {"checkpoint": 1},
    "fast-batched": {"execution": "batched"},
    "fast-streams": {"execution": "streams"},
    "fast-torch-dispatcher": {"dispatcher_backend": "torch"},
    # The fast model under torch.compile (default mode), in one graph: Inductor fuses its blocks'
    # elementwise work as it does the compiled reference's; each fused dispatcher is one operator.
    "fast-compiled": {},
    # One expert's own forward, no prompts, in the profile's dtype: the latency floor for inference.
    "single-vit": None,
    # Inference under torch.compile(mode="reduce-overhead"), which replays CUDA graphs: launch-bound
    # small batches without the host's launch costs. CUDA only.
    "fast-graphed": {},
    "single-vit-graphed": None,
}
GRAPHED = ("fast-graphed", "single-vit-graphed")
COMPILED = ("reference-compiled", "fast-compiled", *GRAPHED)  # providers run under torch.compile
# The provider every other one is measured against, per benchmark.
REFERENCE_PROVIDER = {"model": "reference", "dispatch": "torch"}
MODES = {"model": ("train", "infer"), "dispatch": ("fwd", "fwd+bwd")}


@dataclass(frozen=True)
class Case:
    """One benchmarked case: which benchmark, what it runs, the shape, and who runs it."""

    bench: str  # "model" or "dispatch"
    mode: str  # model: "train" (forward, backward, AdamW step) or "infer"; dispatch: "fwd" or "fwd+bwd"
    K: int
    B: int
    Np: int
    provider: str  # a MODEL_PROVIDERS key or a dispatcher backend

    def __str__(self) -> str:
        return f"{self.mode}-K{self.K}-B{self.B}-Np{self.Np}-{self.provider}"

    @classmethod
    def of(cls, info: dict) -> Case:
        """The case a benchmark record's ``extra_info`` describes."""
        return cls(info["bench"], info["mode"], info["K"], info["B"], info["Np"], info["provider"])


CASE_KEYS = ("bench", "mode", "K", "B", "Np", "provider")
# What the report reads of each record besides its case, by benchmark.
REPORT_KEYS = {
    "model": ("arch", "depth", "img_size", "dtype", "device_name", "threads", "torch"),
    "dispatch": ("T", "D", "H", "dtype", "device_name", "threads", "torch"),
}


@dataclass(frozen=True)
class Profile:
    """A named sweep: the experts (``arch`` at ``img_size``, ``depth`` blocks or the architecture's
    own), K, B and Np, the dtype, the providers, and how many rounds each case is timed.

    ``points``, when given, replaces the sweep by these cases (a target profile: the shapes an
    project's targets name). ``dispatch_arch`` sizes the dispatcher op (T, D) by another
    architecture than the model's."""

    name: str
    help: str
    device: str  # "cpu" or "cuda"
    arch: str  # a pmoe_fast.vit.create_model name
    img_size: int
    depth: int | None
    Ks: tuple[int, ...]
    batches: tuple[int, ...]
    prompts: tuple[int, ...]
    dtype: str  # "float32" or "bfloat16"
    providers: tuple[str, ...]  # MODEL_PROVIDERS keys
    rounds: int
    warmup: int
    dispatch_hidden: int = 64
    points: tuple[Case, ...] = ()
    dispatch_arch: str | None = None

    def expert_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``pmoe_fast.vit.create_model(self.arch, ...)`` for one expert."""
        return {"img_size": self.img_size, "num_classes": 0, **({"depth": self.depth} if self.depth else {})}

    def expert_info(self, arch: str | None = None):
        """The shape of one expert (``pmoe_fast.experts.ExpertInfo``) of ``arch`` (default the
        profile's), built on the meta device."""
        from .experts import Expert
        from .vit import create_model

        with torch.device("meta"):
            return Expert(create_model(arch or self.arch, **self.expert_kwargs())).info

    def cases(self, bench: str) -> list[Case]:
        """Every case of one benchmark, the providers of one shape next to each other."""
        if self.points:
            return [c for c in self.points if c.bench == bench]
        providers = self.providers if bench == "model" else DISPATCH_BACKENDS
        return [
            Case(bench, mode, K, B, Np, provider)
            for mode in MODES[bench]
            for K in self.Ks
            for B in self.batches
            for Np in self.prompts
            for provider in providers
        ]


def _points(bench: str, mode: str, K: int, B: int, Np: int, providers: tuple[str, ...]) -> tuple[Case, ...]:
    """One shape of a target profile, for each provider."""
    return tuple(Case(bench, mode, K, B, Np, provider) for provider in providers)


PROFILES = {
    p.name: p
    for p in (
        Profile(
            "smoke", "seconds on a CPU: checks the machinery (the tests run it)", "cpu",
            "vit_tiny_patch16_224", img_size=32, depth=2, Ks=(1, 2), batches=(2,), prompts=(2,),
            dtype="float32", providers=("reference", "fast", "single-vit"), rounds=2, warmup=1,
        ),
        Profile(
            "quick", "a few minutes on a 2-core CPU: ViT-Ti/16 (6 blocks) at 112 px, K 1-3, reference beside fast",
            "cpu", "vit_tiny_patch16_224", img_size=112, depth=6, Ks=(1, 2, 3), batches=(1, 8), prompts=(10, 50),
            dtype="float32", providers=("reference", "fast", "fast-checkpoint"), rounds=5, warmup=1,
        ),
        Profile(
            "cpu", "the full CPU sweep (hours on 2 cores): ViT-Ti/16 at 224 px, K 1-9, every provider; the "
            "dispatcher at ViT-B/16 size (T=197, D=768)",
            "cpu", "vit_tiny_patch16_224", img_size=224, depth=None, Ks=(1, 2, 3, 6, 9), batches=(1, 8),
            prompts=(10, 50), dtype="float32",
            providers=("reference", "reference-compiled", "fast", "fast-compiled", "fast-checkpoint", "fast-batched",
                       "fast-torch-dispatcher"),
            rounds=5, warmup=1, dispatch_arch="vit_base_patch16_224",
        ),
        Profile(
            "gpu", "the full GPU sweep: ViT-B/16 at 224 px, K 1-9, B 1 and 32, Np 10 and 50, bf16, every provider",
            "cuda", "vit_base_patch16_224", img_size=224, depth=None, Ks=tuple(range(1, 10)), batches=(1, 32),
            prompts=(10, 50), dtype="bfloat16",
            providers=("reference", "reference-compiled", "fast", "fast-compiled", "fast-checkpoint", "fast-streams",
                       "fast-torch-dispatcher"),
            rounds=10, warmup=2,
        ),
        Profile(
            "targets-cpu", "the project's CPU targets, side by side (minutes on 2 cores): a training step at "
            "K=3 ViT-Ti/16, B=8 and inference at B=1; the dispatcher at ViT-B/16 size, K=6, B=8",
            "cpu", "vit_tiny_patch16_224", img_size=224, depth=None, Ks=(), batches=(), prompts=(), dtype="float32",
            providers=("reference", "fast"), rounds=11, warmup=2, dispatch_arch="vit_base_patch16_224",
            points=(
                *_points("model", "train", 3, 8, 10, ("reference", "fast")),
                *_points("model", "infer", 3, 1, 10, ("reference", "fast")),
                *_points("dispatch", "fwd+bwd", 6, 8, 10, ("torch", "cpp")),
            ),
        ),
        Profile(
            "targets-gpu", "the project's GPU targets, side by side (minutes on one GPU): ViT-B/16, bf16, "
            "training at K=6 and K=9, B=32; inference at K=2, B=1 beside one plain ViT-B/16; the dispatcher at K=6, B=32",
            "cuda", "vit_base_patch16_224", img_size=224, depth=None, Ks=(), batches=(), prompts=(), dtype="bfloat16",
            providers=("reference", "reference-compiled", "fast", "fast-checkpoint", "single-vit"), rounds=10, warmup=2,
            points=(
                *_points("model", "train", 6, 32, 10, ("reference", "reference-compiled", "fast", "fast-compiled", "fast-checkpoint")),
                *_points("model", "train", 9, 32, 10, ("reference", "fast", "fast-checkpoint")),
                *_points("model", "infer", 2, 1, 10, ("reference", "reference-compiled", "fast")),
                *_points("model", "infer", 1, 1, 10, ("reference", "single-vit")),
                *_points("model", "infer", 2, 1, 10, ("fast-graphed",)),
                *_points("model", "infer", 1, 1, 10, ("single-vit-graphed",)),
                *_points("dispatch", "fwd+bwd", 6, 32, 50, ("torch", "triton", "cuda")),
                *_points("dispatch", "fwd", 6, 32, 50, ("torch", "triton", "cuda")),
                # The op at the training step's shape (Np = 10), beside its share of the step (bench_model.py).
                *_points("dispatch", "fwd+bwd", 6, 32, 10, ("torch", "triton", "cuda")),
            ),
        ),
    )
}


def default_profile_name() -> str:
    """``gpu`` on a machine with a CUDA GPU, ``quick`` on a CPU."""
    return "gpu" if torch.cuda.is_available() else "quick"


def resolve_profile(name: str | None) -> Profile:
    """The named profile (the default one for None); a ValueError that says how to fix a name
    that is unknown or a profile this machine cannot run."""
    name = name or default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown benchmark profile {name!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[name]
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"profile {name!r} runs on a CUDA GPU and this machine has none (torch.cuda.is_available() is "
            f"False; torch {torch.__version__}): use --profile quick or --profile cpu"
        )
    return profile


# -- running the suite ----------------------------------------------------------------------


def find_suite(explicit: str | None = None) -> Path:
    """The ``benchmarks/`` folder: ``explicit`` if given, else the one beside the package (an
    editable install from a clone), else ``./benchmarks``. A FileNotFoundError says how to get one."""
    candidates = [Path(explicit)] if explicit else [Path(__file__).resolve().parents[1] / "benchmarks", Path.cwd() / "benchmarks"]
    for folder in candidates:
        if all((folder / f).is_file() for f in SUITE_FILES):
            return folder.resolve()
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"cannot find the benchmark suite ({' and '.join(SUITE_FILES)}; looked in {looked}). It lives in the "
        "source checkout, not in an installed wheel: clone the repository, install it with "
        "`pip install -e . --no-build-isolation` and run from there, or pass --suite PATH/TO/benchmarks"
    )


def pytest_command(profile: Profile, suite: Path, json_path: Path, select: str | None = None) -> list[str]:
    """The pytest command line that runs ``profile`` and writes pytest-benchmark's JSON."""
    cmd = [sys.executable, "-m", "pytest", *(str(suite / f) for f in SUITE_FILES), f"--bench-profile={profile.name}",
           f"--benchmark-json={json_path}", "--benchmark-quiet", "-v", "-p", "no:cacheprovider"]
    return cmd + (["-k", select] if select else [])


def suite_environment() -> dict[str, str]:
    """The environment of the pytest process: glibc keeps freed memory; Triton compiles (its
    CPU interpreter, which the test suite turns on, is for correctness, not timings); no
    ``PMOE_BACKEND``, which would make the "fast" provider's "auto" dispatcher another backend
    (each backend has its own provider)."""
    env = {**os.environ, **MALLOC_SETTINGS}
    env.pop("TRITON_INTERPRET", None)
    env.pop("PMOE_BACKEND", None)
    return env


def run_suite(profile: Profile, suite: Path, json_path: Path, select: str | None = None) -> int:
    """Run the suite in a subprocess whose output streams to ours; returns pytest's exit status."""
    cmd = pytest_command(profile, suite, json_path, select)
    print(f"pmoe-fast bench: profile {profile.name!r} ({profile.help})", flush=True)
    print("running: " + " ".join(f"{k}={v}" for k, v in MALLOC_SETTINGS.items()) + " python " + shlex.join(cmd[1:]), flush=True)
    return subprocess.run(cmd, cwd=suite.parent, env=suite_environment()).returncode


# -- reading a run --------------------------------------------------------------------------


@dataclass
class Row:
    """One benchmarked case of a run, with its ratios against the reference of the same shape."""

    name: str
    case: Case
    median_s: float
    images_per_s: float | None
    peak_bytes: float | None
    split: tuple[float | None, float | None, float | None] = (None, None, None)  # frozen, trainable, activation bytes
    speedup: float | None = None  # reference median / this median
    memory_ratio: float | None = None  # this peak / reference peak


def load_run(path: str | Path) -> dict:
    """A pytest-benchmark JSON file written by this suite; a ValueError names what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the run's file in it, {path / JSON_NAME}")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no benchmark file at {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path} ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); pass a file written by pmoe-fast bench") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path} is not a pytest-benchmark file (no 'benchmarks' list); pass a file written by pmoe-fast bench")
    for entry in data["benchmarks"]:
        info = entry.get("extra_info") if isinstance(entry, dict) else None
        if not isinstance(info, dict) or "bench" not in info:
            name = entry.get("name") if isinstance(entry, dict) else entry
            raise ValueError(f"{path}: benchmark {name!r} was not written by the pmoe_fast suite (no extra_info['bench'])")
        if info["bench"] not in REPORT_KEYS:
            raise ValueError(f"{path}: benchmark {entry.get('name')!r} is of an unknown kind {info['bench']!r}")
        missing = [f"extra_info[{key!r}]" for key in (*CASE_KEYS, *REPORT_KEYS[info["bench"]]) if key not in info]
        if not isinstance(entry.get("stats"), dict) or not isinstance(entry["stats"].get("median"), (int, float)):
            missing.append("stats['median']")
        if missing:
            raise ValueError(f"{path}: benchmark {entry.get('name')!r} lacks {', '.join(missing)}; pass a file written by pmoe-fast bench")
    return data


def rows(run: dict) -> list[Row]:
    """The run's cases in the suite's order, with ratios against the reference provider."""
    out = []
    for entry in run["benchmarks"]:
        info = entry["extra_info"]
        case = Case.of(info)
        split = (info.get("frozen_bytes"), info.get("trainable_bytes"), info.get("activation_bytes"))
        out.append(Row(entry["name"], case, entry["stats"]["median"], info.get("images_per_s"), info.get("peak_memory_bytes"), split))
    by_case = {r.case: r for r in out}
    for r in out:
        ref = by_case.get(Case(**{**asdict(r.case), "provider": REFERENCE_PROVIDER[r.case.bench]}))
        if ref is not None:
            r.speedup = ref.median_s / r.median_s
            if ref.peak_bytes and r.peak_bytes is not None:
                r.memory_ratio = r.peak_bytes / ref.peak_bytes
    return out


def format_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _first_info(run: dict, bench: str) -> dict | None:
    return next((e["extra_info"] for e in run["benchmarks"] if e["extra_info"]["bench"] == bench), None)


def _text_table(header: list[str], body: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell: the case and provider to the left, numbers to the right."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i >= 5 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(header), *(line(r) for r in body)]


# -- the project's targets ---------------------------------------------------------------------

# Peak HBM bandwidth by GPU name (NVIDIA's datasheets), for the dispatcher's bandwidth target; the
# first name contained in the device's name wins.
HBM_BYTES_PER_S = (("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12))


@dataclass(frozen=True)
class Target:
    """One of the project's targets, checked on a run of its target profile: ``measure`` maps the
    run's cases ({Case: extra_info plus "median"}) to (value, how it was measured), or to
    (None, why not); met when the value is at least ``bound`` (``at_least``) or at most it, or
    with ``strict`` above or below it."""

    text: str
    measure: Any  # Callable[[dict[Case, dict]], tuple[float | None, str]]
    bound: float
    at_least: bool
    unit: str  # "x" for ratios, "%" or " GB"
    strict: bool = False

    def met(self, value: float) -> bool:
        if self.strict:
            return value > self.bound if self.at_least else value < self.bound
        return value >= self.bound if self.at_least else value <= self.bound

    def bound_text(self) -> str:
        sign = (">" if self.at_least else "<") + ("" if self.strict else "=")
        return f"{sign} {self.bound:.3g}{self.unit}"


def _entries(run: dict) -> dict[Case, dict]:
    out = {}
    for e in run["benchmarks"]:
        out[Case.of(e["extra_info"])] = {**e["extra_info"], "median": e["stats"]["median"]}
    return out


def _quotient(num: Case, den: Case, key: str):
    """num's ``key`` (a time in seconds: "median", "kernel_time_s"; or "peak_memory_bytes") over den's."""

    def measure(cases):
        missing = [c for c in (num, den) if c not in cases]
        if missing:
            return None, f"no result for {missing[0]} (skipped or failed)"
        if cases[num].get(key) is None or cases[den].get(key) is None:
            return None, f"no {key} for {num} or {den}"
        show = format_bytes if key.endswith("bytes") else format_time
        return cases[num][key] / cases[den][key], f"{num.provider} {show(cases[num][key])}, {den.provider} {show(cases[den][key])}"

    return measure


def _speedup(slow: Case, fast: Case):
    """slow's median over fast's: how many times faster ``fast`` runs."""
    return _quotient(slow, fast, "median")


def _lowest_peak(candidates: tuple[Case, ...]):
    """The lowest peak memory, in GB (10^9 bytes, as the target names it), of the candidates that ran."""

    def measure(cases):
        ran = [(cases[c]["peak_memory_bytes"], c.provider) for c in candidates if cases.get(c, {}).get("peak_memory_bytes")]
        if not ran:
            return None, "none of " + ", ".join(str(c) for c in candidates) + " ran"
        peak, provider = min(ran)
        return peak / 1e9, provider

    return measure


def _dispatcher_share(step: Case):
    """The dispatcher's percentage of ``step``'s median time: the time its kernels (GPU) or
    operators (CPU) took per step in two profiled steps (benchmarks/bench_model.py,
    ``pmoe_fast.profiling``). The torch backend's kernels are the model's own kinds (matrix
    products, GELU, softmax) and are not told apart, so a step that ran it has no share."""

    def measure(cases):
        info = cases.get(step)
        if info is None:
            return None, f"no result for {step}"
        backend = (info.get("execution_plan") or {}).get("dispatcher_backend_last_run")
        if backend == "torch":
            return None, "the fast model ran the torch dispatcher, whose kernels the profile does not tell apart"
        if info.get("dispatcher_time_s") is None:
            return None, f"{step} was not profiled"
        took = info["dispatcher_time_s"]
        return 100 * took / info["median"], f"{backend} {format_time(took)} of {format_time(info['median'])}, profiled"

    return measure


def _bandwidth_share(case: Case):
    """The op's achieved bandwidth for the bytes it must move, as a percentage of the GPU's peak."""

    def measure(cases):
        info = cases.get(case)
        if info is None or info.get("gbps") is None:
            return None, f"no bandwidth for {case}"
        peak = next((bw for name, bw in HBM_BYTES_PER_S if name in info["device_name"]), None)
        if peak is None:
            return None, f"{info['gbps']:.0f} GB/s; no peak bandwidth known for {info['device_name']}"
        return 100 * info["gbps"] * 1e9 / peak, f"{info['gbps']:.0f} GB/s of {peak / 1e9:.0f}"

    return measure


def _cpu_targets() -> tuple[Target, ...]:
    train = (Case("model", "train", 3, 8, 10, "reference"), Case("model", "train", 3, 8, 10, "fast"))
    infer = (Case("model", "infer", 3, 1, 10, "reference"), Case("model", "infer", 3, 1, 10, "fast"))
    disp = (Case("dispatch", "fwd+bwd", 6, 8, 10, "torch"), Case("dispatch", "fwd+bwd", 6, 8, 10, "cpp"))
    return (
        Target("dispatcher: cpp forward+backward vs torch, K=6 B=8 Np=10 fp32", _speedup(*disp), 3.0, True, "x"),
        Target("model: fast training step no slower than the reference, K=3 ViT-Ti B=8", _speedup(*train), 1.0, True, "x"),
        Target("model: fast inference faster than the reference, K=3 ViT-Ti B=1", _speedup(*infer), 1.0, True, "x", strict=True),
    )


def _gpu_targets() -> tuple[Target, ...]:
    def train(K, provider):
        return Case("model", "train", K, 32, 10, provider)

    def disp(mode, Np, backend):
        return Case("dispatch", mode, 6, 32, Np, backend)

    out = [
        Target(f"dispatcher: {b} forward+backward vs torch, K=6 B=32 Np=50 bf16", _speedup(disp("fwd+bwd", 50, "torch"), disp("fwd+bwd", 50, b)), 10.0, True, "x")
        for b in ("triton", "cuda")
    ]
    # Wall time includes the host's work; where a backend's wall time is its host's, the kernels' own
    # device time (benchmarks/bench_dispatch.py, profiled) says how far the kernels are from the target.
    out += [
        Target(f"dispatcher (kernels' device time alone, not the target's wall time): {b} forward+backward vs torch, K=6 B=32 Np=50",
               _quotient(disp("fwd+bwd", 50, "torch"), disp("fwd+bwd", 50, b), "kernel_time_s"), 10.0, True, "x")
        for b in ("triton", "cuda")
    ]
    out += [
        Target(f"dispatcher: {b} {mode} share of peak HBM bandwidth, K=6 B=32 Np=50", _bandwidth_share(disp(mode, 50, b)), 60.0, True, "%")
        for b in ("triton", "cuda") for mode in ("fwd", "fwd+bwd")
    ]
    out += [
        Target("model: fast training step vs reference eager, K=6 ViT-B/16 B=32 bf16", _speedup(train(6, "reference"), train(6, "fast")), 1.5, True, "x"),
        Target("model: fast training step vs torch.compile(reference), K=6 B=32", _speedup(train(6, "reference-compiled"), train(6, "fast")), 1.15, True, "x"),
        Target("model: the same, both under torch.compile", _speedup(train(6, "reference-compiled"), train(6, "fast-compiled")), 1.15, True, "x"),
        Target("model: dispatcher share of the fast training step, K=6 B=32", _dispatcher_share(train(6, "fast")), 3.0, False, "%", strict=True),
        Target("model: peak memory with checkpointing / reference's, K=6 B=32", _quotient(train(6, "fast-checkpoint"), train(6, "reference"), "peak_memory_bytes"), 0.35, False, "x"),
        Target("model: K=9 ViT-B/16 at B=32 trains in under 16 GB (lowest fast peak)", _lowest_peak((train(9, "fast"), train(9, "fast-checkpoint"))), 16.0, False, " GB", strict=True),
        Target("model: inference latency K=2 B=1 / one plain ViT-B/16", _quotient(Case("model", "infer", 2, 1, 10, "fast"), Case("model", "infer", 1, 1, 10, "single-vit"), "median"), 1.3, False, "x"),
        Target("model: the same, both under CUDA graphs (torch.compile reduce-overhead)", _quotient(Case("model", "infer", 2, 1, 10, "fast-graphed"), Case("model", "infer", 1, 1, 10, "single-vit-graphed"), "median"), 1.3, False, "x"),
    ]
    return tuple(out)


TARGETS = {"targets-cpu": _cpu_targets(), "targets-gpu": _gpu_targets()}


def format_targets(run: dict) -> str:
    """The verdict on every target of the run's profile ("" for a profile without targets): one
    line each, met / missed / no data, with the value, the bound and what it was measured from."""
    name = run.get("pmoe_fast", {}).get("profile", {}).get("name")
    if name not in TARGETS:
        return ""
    cases, lines = _entries(run), [f"targets ({name}):"]
    for t in TARGETS[name]:
        value, how = t.measure(cases)
        if value is None:
            lines.append(f"  no data  {t.text}: target {t.bound_text()}; {how}")
            continue
        lines.append(f"  {'met' if t.met(value) else 'missed':7s}  {t.text}: {value:.3g}{t.unit} (target {t.bound_text()}; {how})")
    return "\n".join(lines) + "\n"


def format_table(run: dict) -> str:
    """The readable report of a run: per benchmark a header saying what ran where, then one row
    per case and provider (for the whole model with the peak memory's split into frozen weights,
    trainable state and activations); then the skipped and failed cases with their reasons."""
    lines = []
    table = rows(run)
    for bench, title in (("model", "whole model"), ("dispatch", "dispatcher op (one prompt layer, all K experts)")):
        info = _first_info(run, bench)
        if info is None:
            continue
        if bench == "dispatch":
            shape = f"T={info['T']}, D={info['D']}, H={info['H']}, {info['dtype']}"
        else:
            shape = f"{info['arch']} ({info['depth']} blocks) at {info['img_size']} px, {info['dtype']}"
        lines.append(f"{title}: {shape}; on {info['device_name']} ({info['threads']} threads), torch {info['torch']}")
        if bench == "model" and info["dtype"] != "float32":
            lines.append(f"{info['dtype']}: the reference under autocast, the fast model with {info['dtype']} frozen experts")
        lines.append(f"speedup = {REFERENCE_PROVIDER[bench]} median / median; memory = peak / {REFERENCE_PROVIDER[bench]} peak")
        sources: dict[str, list[str]] = {}
        for e in run["benchmarks"]:
            if e["extra_info"]["bench"] == bench:
                providers = sources.setdefault(e["extra_info"].get("memory_source") or "not measured", [])
                providers += [e["extra_info"]["provider"]] if e["extra_info"]["provider"] not in providers else []
        for source, providers in sources.items():
            short = source if source.startswith("not measured") else source.split(":")[0]
            lines.append(f"peak memory of {', '.join(providers)}: {short}")
        body, last = [], None
        for r in (r for r in table if r.case.bench == bench):
            key = (r.case.mode, r.case.K, r.case.B, r.case.Np)
            head = [r.case.mode, str(r.case.K), str(r.case.B), str(r.case.Np)] if key != last else ["", "", "", ""]
            last = key
            ips = "-" if r.images_per_s is None else f"{r.images_per_s:.1f}"
            body.append([*head, r.case.provider, format_time(r.median_s), ips, format_bytes(r.peak_bytes), _ratio(r.speedup),
                         _ratio(r.memory_ratio), *([format_bytes(b) for b in r.split] if bench == "model" else [])])
        header = ["mode", "K", "B", "Np", "provider", "median", "images/s", "peak memory", "speedup", "memory"]
        header += ["frozen", "trainable", "activations"] if bench == "model" else []
        lines += _text_table(header, body) + [""]
    extra = run.get("pmoe_fast", {})
    for kind in ("skipped", "failed"):
        groups: dict[tuple, list[Case]] = {}
        for item in extra.get(kind, []):
            case = Case(**item["case"])
            groups.setdefault((case.bench, case.provider, item["reason"]), []).append(case)
        if groups:
            lines.append(f"{kind}:")
            for (bench, provider, reason), cases in groups.items():
                lines.append(f"  {bench} {provider}, {len(cases)} case(s) ({', '.join(str(c) for c in cases[:3])}"
                             f"{', ...' if len(cases) > 3 else ''}): {reason}")
    if not table:
        lines.append("no case ran")
    targets = format_targets(run)
    if targets:
        lines += ["", targets]
    return "\n".join(lines).rstrip() + "\n"


# -- plots ------------------------------------------------------------------------------------


def series(run: dict, metric: str) -> dict[tuple[str, int, int], dict[str, list[tuple[int, float]]]]:
    """The whole-model points of one metric ("images_per_s" or "peak_memory_bytes"), as plotted:
    {(mode, B, Np): {provider: [(K, value), ...] sorted by K}}; cases without the value left out."""
    out: dict[tuple[str, int, int], dict[str, list[tuple[int, float]]]] = {}
    for r in rows(run):
        value = r.images_per_s if metric == "images_per_s" else r.peak_bytes
        if r.case.bench == "model" and value is not None:
            out.setdefault((r.case.mode, r.case.B, r.case.Np), {}).setdefault(r.case.provider, []).append((r.case.K, value))
    for panel in out.values():
        for points in panel.values():
            points.sort()
    return out


def plot(run: dict, out_dir: str | Path) -> list[Path]:
    """Write images/s and peak memory against K for the whole-model cases, one line per provider
    (the same colour in every panel) and one panel per (mode, B, Np). Returns the files written
    (none without model cases; the memory plot is left out when no case measured memory)."""
    from matplotlib.figure import Figure  # Agg canvas, no global pyplot state

    info = _first_info(run, "model")
    providers = list(dict.fromkeys(r.case.provider for r in rows(run) if r.case.bench == "model"))
    written = []
    for metric, filename in PLOT_NAMES.items():
        panels = series(run, metric)
        if not panels:
            continue
        modes = [m for m in MODES["model"] if any(key[0] == m for key in panels)]
        shapes = sorted({key[1:] for key in panels})
        scale, label = (1, "images/s") if metric == "images_per_s" else (2**-20, "peak memory (MiB)")
        fig = Figure(figsize=(max(4 * len(shapes), 6), 3.2 * len(modes) + 1), layout="constrained")
        axes = fig.subplots(len(modes), len(shapes), squeeze=False)
        for i, mode in enumerate(modes):
            for j, (B, Np) in enumerate(shapes):
                ax = axes[i][j]
                for provider, points in panels.get((mode, B, Np), {}).items():
                    ax.plot([k for k, _ in points], [v * scale for _, v in points], marker="o", label=provider,
                            color=f"C{providers.index(provider) % 10}")
                ax.set_title(f"{mode}, B={B}, Np={Np}")
                ax.set_xlabel("K (experts)")
                ax.set_ylabel(label)
                ax.xaxis.get_major_locator().set_params(integer=True)
                ax.grid(alpha=0.3)
        handles = {h.get_label(): h for ax in axes.flat for h in ax.get_lines()}
        fig.legend([handles[p] for p in providers if p in handles], [p for p in providers if p in handles],
                   loc="outside lower center", ncols=min(len(handles), 4))
        fig.suptitle(f"{label} against K\n{info['arch']} ({info['depth']} blocks) at {info['img_size']} px, "
                     f"{info['dtype']}, {info['device_name']}", fontsize="medium")
        path = Path(out_dir) / filename
        fig.savefig(path, dpi=100)
        written.append(path)
    return written


# -- comparing two runs ------------------------------------------------------------------------


def _shape_key(run: dict) -> dict[tuple, Row]:
    keyed = {}
    for entry, row in zip(run["benchmarks"], rows(run)):
        info = entry["extra_info"]
        keyed[(row.name, info.get("arch"), info.get("img_size"), info.get("depth"), info.get("dtype"), info.get("T"), info.get("D"))] = row
    return keyed


def _change(old: float | None, new: float | None) -> float | None:
    return None if old is None or new is None or old == 0 else new / old - 1


def compare(old: dict, new: dict, threshold: float = 0.10) -> tuple[str, list[str]]:
    """Match the cases of two runs by name and shape and report the change of the median time
    and of the peak memory. Returns (report, regressions): one line per case that got slower or
    took more memory than ``old`` by more than ``threshold`` (0.10: 10%)."""
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0 (a fraction: 0.10 is 10%), got {threshold}")
    old_rows, new_rows = _shape_key(old), _shape_key(new)
    matched = [k for k in new_rows if k in old_rows]
    lines = []
    old_dev, new_dev = (_first_info(r, "model") or _first_info(r, "dispatch") or {} for r in (old, new))
    if old_dev.get("device_name") != new_dev.get("device_name") or old_dev.get("threads") != new_dev.get("threads"):
        lines.append(f"note: the runs come from different machines ({old_dev.get('device_name')}, {old_dev.get('threads')} threads "
                     f"-> {new_dev.get('device_name')}, {new_dev.get('threads')} threads): the changes measure the machines too")
    body, regressions = [], []
    for key in matched:
        o, n = old_rows[key], new_rows[key]
        dt, dm = _change(o.median_s, n.median_s), _change(o.peak_bytes, n.peak_bytes)
        case = f"{n.case.bench} {n.case}"
        flags = []
        if dt is not None and dt > threshold:
            flags.append(f"{dt:+.0%} time")
        if dm is not None and dm > threshold:
            flags.append(f"{dm:+.0%} peak memory")
        if flags:
            regressions.append(f"{case}: " + ", ".join(flags))
        body.append([case, format_time(o.median_s), format_time(n.median_s), "-" if dt is None else f"{dt:+.1%}",
                     format_bytes(o.peak_bytes), format_bytes(n.peak_bytes), "-" if dm is None else f"{dm:+.1%}",
                     "REGRESSION" if flags else ""])
    header = ["case", "old median", "new median", "change", "old peak", "new peak", "change", ""]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in [header, *body]]
    unmatched_new = len(new_rows) - len(matched)
    unmatched_old = len(old_rows) - len(matched)
    if unmatched_new or unmatched_old:
        lines.append(f"not compared: {unmatched_new} case(s) only in the new run, {unmatched_old} only in the old one "
                     "(cases match by name and shape)")
    if not matched:
        lines.append("no case of the new run is in the old one: nothing compared")
    return "\n".join(lines) + "\n", regressions


# -- the command ---------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", choices=list(PROFILES), default=None,
                   help="the sweep to run; default: gpu on a machine with a CUDA GPU, quick on a CPU. "
                        + "; ".join(f"{n}: {pr.help}" for n, pr in PROFILES.items()))
    p.add_argument("--output", default="bench-results", help="folder for benchmark.json, table.txt and the plots (default: %(default)s)")
    p.add_argument("--compare", metavar="OLD.json", help="a saved benchmark.json to compare with; exit status 1 on a regression")
    p.add_argument("--threshold", type=float, default=0.10,
                   help="with --compare: the allowed increase of median time and peak memory, a fraction (default: %(default)s)")
    p.add_argument("--input", metavar="RUN.json", help="report on this saved run instead of running the suite")
    p.add_argument("--suite", help="the benchmarks/ folder of a source checkout (default: found beside the package)")
    p.add_argument("-k", dest="select", metavar="EXPR", help="run only the cases that match this pytest -k expression, e.g. 'train and K2'")


def _fail(message: str) -> None:
    raise SystemExit(f"pmoe-fast bench: {message}")


def _status_message(status: int, select: str | None) -> str:
    if status == 5:
        return f"no benchmark case matched -k {select!r}" if select else "the suite collected no case"
    if status == 0:
        return "every case it ran was skipped; their reasons are in pytest's output above"
    return f"pytest exited with status {status}; see its output above"


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if not args.threshold >= 0:
        _fail(f"--threshold must be a fraction >= 0 (0.10 allows 10%), got {args.threshold}")
    if args.input and (args.profile or args.select or args.suite):
        _fail("--input reports on a saved run; --profile, -k and --suite only apply when running the suite")
    old = None
    try:
        if args.compare:
            old = load_run(args.compare)
        out_dir = Path(args.output)
        problem = output_folder_problem(out_dir)
        if problem:
            _fail(f"--output: {problem}")
        for name in ("table.txt", *PLOT_NAMES.values()):  # an earlier run's: this one may not write them all
            (out_dir / name).unlink(missing_ok=True)
        status = 0
        if args.input:
            new = load_run(args.input)
        else:
            profile = resolve_profile(args.profile)
            suite = find_suite(args.suite)
            json_path = (out_dir / JSON_NAME).resolve()
            json_path.unlink(missing_ok=True)
            try:
                status = run_suite(profile, suite, json_path, args.select)
            except KeyboardInterrupt:
                _fail("interrupted")
            if not json_path.exists():
                _fail(f"the suite wrote no results: {_status_message(status, args.select)}")
            new = load_run(json_path)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    table = format_table(new)
    print("\n" + table, end="")
    (out_dir / "table.txt").write_text(table)
    for path in plot(new, out_dir):
        print(f"wrote {path}")
    if not args.input:
        print(f"wrote {out_dir / JSON_NAME}; {time.perf_counter() - start:.0f} s in all")
    if old is not None:
        report, regressions = compare(old, new, args.threshold)
        print(f"\nchange against {args.compare} (threshold {args.threshold:.0%}):\n" + report, end="")
        if regressions:
            _fail(f"{len(regressions)} case(s) regressed by more than {args.threshold:.0%}:\n  " + "\n  ".join(regressions))
    failed = len(new.get("pmoe_fast", {}).get("failed", []))
    if failed:
        _fail(f"{failed} benchmark case(s) failed (reasons above)")
    if status != 0:
        _fail(_status_message(status, args.select))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pmoe_fast.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
