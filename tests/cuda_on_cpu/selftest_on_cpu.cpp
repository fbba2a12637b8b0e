// Kernels that check cuda_on_cpu.h itself, as ops pmoe_fast_cuda_on_cpu::selftest_*: shared
// memory across a block's threads, the barrier, the warp shuffle, the tensor cores' mma_bf16 with
// csrc/cuda/mma.cuh's bfloat16 parts and its ldmatrix fragments (load_a, load_b), the grid's three
// dimensions, the order of the blocks, and a barrier that some threads never reach. Also the op
// that sets that order for the launches after it: set_block_order(0 by index, 1 reversed, 2 shuffled).
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

// d = a b + c on one warp's mma_bf16, each lane loading its fragments as mma.cuh documents them:
// a (16, 16) and b (16, 8) of bfloat16 values, c and d (16, 8), all float and row-major.
__global__ void mma_kernel(const float* a, const float* b, const float* c, float* d) {
  const int g = threadIdx.x / 4, t = threadIdx.x % 4;
  const auto pair = [](float lo, float hi) {
    return uint32_t{pmoe_fast::bf16_bits(lo)} | uint32_t{pmoe_fast::bf16_bits(hi)} << 16;
  };
  const auto a_pair = [&](int row, int col) { return pair(a[row * 16 + col], a[row * 16 + col + 1]); };
  const auto b_pair = [&](int row, int col) { return pair(b[row * 8 + col], b[(row + 1) * 8 + col]); };
  const uint32_t af[4] = {a_pair(g, 2 * t), a_pair(g + 8, 2 * t), a_pair(g, 2 * t + 8), a_pair(g + 8, 2 * t + 8)};
  const uint32_t bf[2] = {b_pair(2 * t, g), b_pair(2 * t + 8, g)};
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  pmoe_fast::mma_bf16(acc, af, bf);
  __syncthreads();  // cuda_on_cpu.h computes the products when the warp meets
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
}

// out[lane] = the values of this lane's load_a and load_b fragments (csrc/cuda/mma.cuh) of the
// 16 x 16 block at x + col0, x's rows ld values apart (with by_reduction, load_a<true> and
// load_b<true>: the block holds A by column and B by row): a[0..3], then b[0][0..1], b[1][0..1],
// each register's low half first.
__global__ void fragments_kernel(const uint16_t* x, int ld, int col0, bool by_reduction, float* out) {
  const int lane = threadIdx.x;
  uint32_t a[4], b[2][2];
  if (by_reduction) {
    pmoe_fast::load_a<true>(x + col0, ld, lane, a);
    pmoe_fast::load_b<true>(x + col0, ld, lane, b);
  } else {
    pmoe_fast::load_a(x + col0, ld, lane, a);
    pmoe_fast::load_b(x + col0, ld, lane, b);
  }
  const uint32_t regs[8] = {a[0], a[1], a[2], a[3], b[0][0], b[0][1], b[1][0], b[1][1]};
  for (int i = 0; i < 16; ++i) {
    out[lane * 16 + i] = pmoe_fast::bf16_value(static_cast<uint16_t>(regs[i / 2] >> (16 * (i % 2))));
  }
}

// out[i, p] = part p of x[i] (split_bf16 into 3 parts), as a float.
__global__ void split_kernel(const float* x, float* out, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    uint16_t parts[3];
    pmoe_fast::split_bf16(x[i], parts);
    for (int p = 0; p < 3; ++p) out[i * 3 + p] = pmoe_fast::bf16_value(parts[p]);
  }
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

at::Tensor mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {  // float (16, 16), (16, 8), (16, 8)
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 8}) &&
                  c.sizes() == at::IntArrayRef({16, 8}),
              "selftest_mma: a (16, 16), b (16, 8), c (16, 8)");
  const at::Tensor a_ = a.contiguous(), b_ = b.contiguous(), c_ = c.contiguous();
  at::Tensor d = at::empty_like(c_);
  pmoe_fast::launch(mma_kernel, dim3(1), 32, nullptr, a_.const_data_ptr<float>(), b_.const_data_ptr<float>(),
                    c_.const_data_ptr<float>(), d.mutable_data_ptr<float>());
  return d;
}

at::Tensor fragments(const at::Tensor& x, int64_t col0, bool by_reduction) {  // bfloat16 (16, ld), col0 + 16 <= ld
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(0) == 16 && 0 <= col0 &&
                  col0 + 16 <= x.size(1),
              "selftest_fragments: x bfloat16 (16, ld) and 0 <= col0 <= ld - 16");
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty({32, 16}, in.options().dtype(at::kFloat));
  pmoe_fast::launch(fragments_kernel, dim3(1), 32, nullptr, reinterpret_cast<const uint16_t*>(in.const_data_ptr()),
                    static_cast<int>(in.size(1)), static_cast<int>(col0), by_reduction, out.mutable_data_ptr<float>());
  return out;
}

at::Tensor split(const at::Tensor& x) {  // (n) float
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty({in.numel(), 3}, in.options());
  pmoe_fast::launch(split_kernel, dim3(1), 64, nullptr, in.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                    in.numel());
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
  m.def("selftest_mma", &mma);
  m.def("selftest_fragments", &fragments);
  m.def("selftest_split_bf16", &split);
  m.def("selftest_indices", &indices);
  m.def("selftest_order", &order);
  m.def("selftest_diverging_barrier", &diverging_barrier);
  m.def("set_block_order", &set_block_order);
}
