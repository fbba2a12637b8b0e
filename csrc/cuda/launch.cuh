// How csrc/cuda's host code reaches the GPU: kernels start through launch(), and the device guard,
// stream and SM count come from DeviceGuard, current_stream() and multiprocessor_count(). Under
// PMOE_CUDA_ON_CPU tests/cuda_on_cpu/cuda_on_cpu.h supplies CPU versions of these names instead,
// so the test suite runs the kernels, host code included, on a machine without a GPU.
#pragma once

#ifndef PMOE_CUDA_ON_CPU
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace pmoe_fast {

using DeviceGuard = c10::cuda::CUDAGuard;

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }

inline int64_t multiprocessor_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// kernel<<<grid, threads, 0, stream>>>(args...), checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, int threads, cudaStream_t stream, Args... args) {
  kernel<<<grid, threads, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace pmoe_fast
#endif
