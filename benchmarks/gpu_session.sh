#!/usr/bin/env bash
# A session on one CUDA GPU, in two calls of a few minutes each, run from the repository root:
#
#   OUT=gpu-out bash benchmarks/gpu_session.sh check   # build, then the test suite on the GPU
#   OUT=gpu-out bash benchmarks/gpu_session.sh tune    # the Triton dispatcher's launch settings
#       (then the tuning script's options, e.g. --prompts 10)
#   OUT=gpu-out bash benchmarks/gpu_session.sh bench   # the project's GPU targets, side by side
#   OUT=gpu-out bash benchmarks/gpu_session.sh profile # the fast training step's kernels, by group
#   OUT=gpu-out bash benchmarks/gpu_session.sh ncu     # Nsight Compute on the Triton dispatcher's kernels
#
# Each installs the package (editable, with the extension built for the GPU it finds) unless it is
# installed already. `check` runs the test suite (the
# CUDA and compiled-Triton tests run instead of being skipped; the slow CMake build test is left
# out, the CUDA-graph compile test kept); `tune` runs benchmarks/tune_triton_dispatch.py, then
# benchmarks/triton_resources.py --launched (registers and spills with this machine's Triton); `bench` runs
# `pmoe_fast.bench --profile targets-gpu`, whose report ends with each target's verdict, then
# benchmarks/bench_dispatch_into.py (IPTs written in place against concatenated sequences) and
# benchmarks/bench_qkv.py (the q, k, v gradients stacked or taken one product each) and
# benchmarks/bench_layer_norm.py (the batched LayerNorm: composite against the Triton kernels);
# `profile` runs benchmarks/profile_step.py (the targets' training step, K = 6 ViT-B/16, B = 32, bf16), then
# with --infer (K = 2, B = 1 inference beside one plain ViT), eagerly and under CUDA graphs, then
# benchmarks/forward_small_batch.py (the dispatcher's forward at small batches, per tiling); `ncu` runs Nsight Compute's full set
# on one forward+backward of the Triton dispatcher (benchmarks/ncu_dispatch.py) at Np = 10 and 50,
# and its basic set (each kernel's duration) on the CUDA backend's at Np = 50.
# Every step's output goes to $OUT as well as to the terminal.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: OUT=DIR bash benchmarks/gpu_session.sh check|tune|bench|profile|ncu}
OUT=${OUT:?set OUT to a folder for the logs and results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/$stage-env.txt"
$python -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' | tee -a "$OUT/$stage-env.txt"

install() {
    echo "compilers: CXX=${CXX:-unset} CC=${CC:-unset}" | tee -a "$OUT/$stage-env.txt"
    PMOE_FAST_FORCE_CUDA_BUILD=1 MAX_JOBS=${MAX_JOBS:-16} $python -m pip install --no-index --no-deps --no-build-isolation -e . \
        >> "$OUT/build.txt" 2>&1
}
if ! $python -c 'import pmoe_fast.kernels, pmoe_fast._C' 2>/dev/null; then
    start=$SECONDS
    # One GPU image's CXX (a g++ in /opt/gcc) links libstdc++ into _C statically, and every failing
    # C++ check then crashes instead of raising (README, Building): build with the distribution's
    # compilers where there are some (CC is nvcc's host compiler too), else, or if nvcc refuses
    # them, with the image's.
    if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ] && CXX=/usr/bin/g++ CC=/usr/bin/gcc install; then
        :
    else
        install || { tail -n 40 "$OUT/build.txt"; exit 1; }
    fi
    echo "installed in $((SECONDS - start)) s" | tee -a "$OUT/build.txt"
fi
$python -m pmoe_fast info | tee -a "$OUT/$stage-env.txt"

case $stage in
check)
    OMP_NUM_THREADS=2 $python -m pytest -n 8 -m "not slow" -q -rfEs -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.txt" || true
    $python -m pytest -q -p no:cacheprovider --tb=short -W ignore tests/test_model.py -k "torch_compile and cuda" 2>&1 | tee -a "$OUT/tests.txt" || true
    ;;
tune)
    # Arguments after the stage go to the tuning script: `tune --prompts 10`, then
    # `tune --prompts 50`, keeps each call within a device command's 10 minutes.
    $python benchmarks/tune_triton_dispatch.py "${@:2}" 2>&1 | tee "$OUT/triton_tuning.txt"
    $python benchmarks/triton_resources.py --launched 2>&1 | tee "$OUT/triton_launched.txt"
    ;;
bench)
    $python -m pmoe_fast.bench --profile targets-gpu --output "$OUT/targets_gpu" 2>&1 | tee "$OUT/bench.txt"
    $python -m pytest -q -p no:cacheprovider benchmarks/bench_dispatch_into.py --benchmark-columns=median,iqr,min,rounds \
        --benchmark-sort=name 2>&1 | tee "$OUT/dispatch_into.txt"
    $python -m pytest -q -p no:cacheprovider benchmarks/bench_qkv.py --benchmark-columns=median,iqr,min,rounds \
        --benchmark-sort=name 2>&1 | tee "$OUT/qkv.txt"
    $python -m pytest -q -p no:cacheprovider benchmarks/bench_layer_norm.py --benchmark-columns=median,iqr,min,rounds \
        --benchmark-sort=name 2>&1 | tee "$OUT/layer_norm.txt"
    ;;
profile)
    $python benchmarks/profile_step.py 2>&1 | tee "$OUT/profile_step.txt"
    $python benchmarks/profile_step.py --infer 2>&1 | tee "$OUT/profile_infer.txt"
    $python benchmarks/profile_step.py --infer --graphs 2>&1 | tee "$OUT/profile_infer_graphs.txt"
    $python benchmarks/forward_small_batch.py 2>&1 | tee "$OUT/forward_small_batch.txt"
    ;;
ncu)
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1 || true)
    [ -n "$ncu" ] || { echo "no ncu (Nsight Compute) on this machine" >&2; exit 1; }
    for np in 10 50; do
        "$ncu" --profile-from-start off --set full --kernel-name regex:dispatch \
            $python benchmarks/ncu_dispatch.py --prompts $np 2>&1 | tee "$OUT/ncu_dispatch_np$np.txt"
    done
    "$ncu" --profile-from-start off --kernel-name regex:dispatch \
        $python benchmarks/ncu_dispatch.py --prompts 50 --backend cuda 2>&1 | tee "$OUT/ncu_dispatch_cuda_np50.txt"
    ;;
*)
    echo "unknown stage $stage: check, tune, bench, profile or ncu" >&2
    exit 2
    ;;
esac
