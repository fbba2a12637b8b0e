// Kernels that check cuda_on_cpu.h itself, as ops pmoe_fast_cuda_on_cpu::selftest_*: shared
// memory across a block's threads, the barrier, the warp shuffle, the grid's three dimensions,
// the order of the blocks, and a barrier that some threads never reach. Also the op that sets
// that order for the launches after it: set_block_order(0 by index, 1 reversed, 2 shuffled).
#include "cuda_on_cpu.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace {

constexpr int kThreads = 128;

// out[block, t] = in[block, kThreads - 1 - t], through shared memory.
__global__ void reverse_kernel(const float* in, float* out) {
  __shared__ float buffer[kThreads];
  buffer[threadIdx.x] = in[blockIdx.x * kThreads + threadIdx.x];
  __syncthreads();
  out[blockIdx.x * kThreads + threadIdx.x] = buffer[kThreads - 1 - threadIdx.x];
}

__global__ void shuffle_kernel(const float* in, float* out, int lane_mask) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, in[threadIdx.x], lane_mask);
}

// out[z, y, x, t] = a number naming the block and the thread.
__global__ void indices_kernel(int64_t* out) {
  const int64_t block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  out[block * blockDim.x + threadIdx.x] = ((blockIdx.z * 10 + blockIdx.y) * 10 + blockIdx.x) * 1000 + threadIdx.x;
}

// out[i] = the linear index of the i-th block to run.
__global__ void order_kernel(int64_t* out, int* count) {
  if (threadIdx.x == 0) out[(*count)++] = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
}

__global__ void diverging_barrier_kernel() {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

at::Tensor reverse(const at::Tensor& x) {  // (blocks, kThreads) float
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  pmoe_fast::launch(reverse_kernel, dim3(static_cast<unsigned>(in.size(0))), kThreads, nullptr,
                    in.const_data_ptr<float>(), out.mutable_data_ptr<float>());
  return out;
}

at::Tensor shuffle(const at::Tensor& x, int64_t lane_mask) {  // (kThreads) float
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  pmoe_fast::launch(shuffle_kernel, dim3(1), kThreads, nullptr, in.const_data_ptr<float>(),
                    out.mutable_data_ptr<float>(), static_cast<int>(lane_mask));
  return out;
}

at::Tensor indices(int64_t x, int64_t y, int64_t z) {
  at::Tensor out = at::full({z, y, x, 64}, -1, at::kLong);
  pmoe_fast::launch(indices_kernel, dim3(x, y, z), 64, nullptr, out.mutable_data_ptr<int64_t>());
  return out;
}

at::Tensor order(int64_t x, int64_t y) {
  at::Tensor out = at::full({x * y}, -1, at::kLong);
  int count = 0;
  pmoe_fast::launch(order_kernel, dim3(x, y), 32, nullptr, out.mutable_data_ptr<int64_t>(), &count);
  return out;
}

void set_block_order(int64_t value) {
  TORCH_CHECK(0 <= value && value <= 2, "set_block_order: 0 (by index), 1 (reversed) or 2 (shuffled), got ", value);
  cuda_on_cpu::block_order = static_cast<cuda_on_cpu::BlockOrder>(value);
}

void diverging_barrier() { pmoe_fast::launch(diverging_barrier_kernel, dim3(1), 64, nullptr); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(pmoe_fast_cuda_on_cpu, m) {
  m.def("selftest_reverse", &reverse);
  m.def("selftest_shuffle", &shuffle);
  m.def("selftest_indices", &indices);
  m.def("selftest_order", &order);
  m.def("selftest_diverging_barrier", &diverging_barrier);
  m.def("set_block_order", &set_block_order);
}
