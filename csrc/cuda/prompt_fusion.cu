// CUDA implementations of pmoe_fast::prompt_fusion and prompt_fusion_backward (schemas in
// ../pmoe_ops.cpp). Simple kernels, one thread per output element or one block per reduction,
// written to be correct by construction; the inputs are small (prompts are K x Np x D with
// K, Np <= a few dozen), so the op is bound by reading and writing (K, B, Np, D) tensors once.
//
// Notation: K experts, B batch, Np prompt tokens, D width. Every kernel accumulates in
// at::opmath_type<scalar_t> (float, or double for fp64) and takes weights already converted
// to that type (see prompt_fusion_dtypes in ../prompt_fusion.h).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../prompt_fusion.h"
#include "launch.cuh"
#include "warp_sum.cuh"

namespace pmoe_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The sum of v over the block's kThreads threads, in a fixed order: a butterfly within each warp,
// then the warps' totals in warp order. Thread 0 gets the total; every thread must call it.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_totals[kThreads / 32];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) warp_totals[threadIdx.x / 32] = v;
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += warp_totals[w];
  }
  return total;
}

// Grid (K * B * Np, ceil(D / kThreads)), block kThreads: one thread per output element.
// blockIdx.x is the (k, b, n) row, so every thread of a block reads the same K weights
// (broadcast loads), and consecutive threads read consecutive d (coalesced).
template <typename scalar_t, typename acc_t>
__global__ void prompt_fusion_fwd_kernel(const acc_t* __restrict__ weights_ptr,     // (K, B, Np, K)
                                         const scalar_t* __restrict__ prompts_ptr,  // (K, Np, D)
                                         scalar_t* __restrict__ out_ptr,            // (K, B, Np, D)
                                         int64_t K, int64_t Np, int64_t D) {
  const int64_t row = blockIdx.x;  // (k * B + b) * Np + n
  const int64_t d = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (d >= D) return;
  const int64_t n = row % Np;
  const acc_t* w = weights_ptr + row * K;
  acc_t acc = 0;
  for (int64_t j = 0; j < K; ++j) {
    acc += w[j] * static_cast<acc_t>(prompts_ptr[(j * Np + n) * D + d]);
  }
  out_ptr[row * D + d] = static_cast<scalar_t>(acc);
}

// Grid (K * B * Np * K), block kThreads: one block per grad_weights element (row, j), whose
// threads stride over D and sum <grad_out[row, :], prompts[j, n, :]> with a block reduction.
template <typename scalar_t, typename acc_t>
__global__ void prompt_fusion_bwd_weights_kernel(
    const scalar_t* __restrict__ grad_out_ptr,  // (K, B, Np, D)
    const scalar_t* __restrict__ prompts_ptr,   // (K, Np, D)
    acc_t* __restrict__ grad_weights_ptr,       // (K, B, Np, K)
    int64_t K, int64_t Np, int64_t D) {
  const int64_t row = blockIdx.x / K, j = blockIdx.x % K;
  const int64_t n = row % Np;
  const scalar_t* g = grad_out_ptr + row * D;
  const scalar_t* p = prompts_ptr + (j * Np + n) * D;
  acc_t partial = 0;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    partial += static_cast<acc_t>(g[d]) * static_cast<acc_t>(p[d]);
  }
  const acc_t total = block_sum(partial);
  if (threadIdx.x == 0) grad_weights_ptr[blockIdx.x] = total;
}

// Grid (K * Np, ceil(D / kThreads)), block kThreads: one thread per grad_prompts element
// (j, n, d), looping over the K * B rows that used prompt (j, n). Each output element has one
// owner, so no atomics and the result does not depend on scheduling.
template <typename scalar_t, typename acc_t>
__global__ void prompt_fusion_bwd_prompts_kernel(
    const scalar_t* __restrict__ grad_out_ptr,  // (K, B, Np, D)
    const acc_t* __restrict__ weights_ptr,      // (K, B, Np, K)
    scalar_t* __restrict__ grad_prompts_ptr,    // (K, Np, D)
    int64_t K, int64_t B, int64_t Np, int64_t D) {
  const int64_t jn = blockIdx.x;  // j * Np + n
  const int64_t j = jn / Np, n = jn % Np;
  const int64_t d = int64_t(blockIdx.y) * kThreads + threadIdx.x;
  if (d >= D) return;
  acc_t acc = 0;
  for (int64_t kb = 0; kb < K * B; ++kb) {  // kb = k * B + b
    const int64_t row = kb * Np + n;
    acc += weights_ptr[row * K + j] * static_cast<acc_t>(grad_out_ptr[row * D + d]);
  }
  grad_prompts_ptr[jn * D + d] = static_cast<scalar_t>(acc);
}

// dim3 holds 32-bit sizes: check before converting, so a huge problem fails loudly instead of
// launching a truncated grid.
void check_grid(const char* op, int64_t x, int64_t y) {
  TORCH_CHECK(x <= kMaxGridX && y <= kMaxGridY, op,
              ": problem too large for the CUDA launch grid (", x, " x ", y, " blocks)");
}

// weights: (K, B, Np, K), prompts: (K, Np, D) -> out: (K, B, Np, D) in prompts' dtype.
at::Tensor prompt_fusion_cuda(const at::Tensor& weights, const at::Tensor& prompts) {
  const PromptFusionSizes s = check_prompt_fusion_inputs("prompt_fusion", weights, prompts);
  const DeviceGuard guard(prompts.device());
  const PromptFusionDtypes dt = prompt_fusion_dtypes(weights, prompts);
  const at::Tensor w = weights.to(dt.accum).contiguous();
  const at::Tensor p = prompts.to(dt.compute).contiguous();
  at::Tensor out = at::empty({s.K, s.B, s.Np, s.D}, p.options());
  if (out.numel() > 0) {
    const int64_t rows = s.K * s.B * s.Np, d_blocks = ceil_div(s.D, kThreads);
    check_grid("prompt_fusion", rows, d_blocks);
    const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(d_blocks));
    const cudaStream_t stream = current_stream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt.compute, "prompt_fusion_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      launch(prompt_fusion_fwd_kernel<scalar_t, acc_t>, grid, kThreads, stream, w.const_data_ptr<acc_t>(),
             p.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), s.K, s.Np, s.D);
    });
  }
  return out.to(prompts.scalar_type());
}

// grad_out: (K, B, Np, D), weights: (K, B, Np, K), prompts: (K, Np, D)
// -> (grad_weights (K, B, Np, K) in weights' dtype, grad_prompts (K, Np, D) in prompts' dtype).
std::tuple<at::Tensor, at::Tensor> prompt_fusion_backward_cuda(const at::Tensor& grad_out,
                                                               const at::Tensor& weights,
                                                               const at::Tensor& prompts) {
  const char* op = "prompt_fusion_backward";
  const PromptFusionSizes s = check_prompt_fusion_inputs(op, weights, prompts);
  check_grad_out(op, grad_out, s, prompts);
  const DeviceGuard guard(prompts.device());
  const PromptFusionDtypes dt = prompt_fusion_dtypes(weights, prompts);
  const at::Tensor w = weights.to(dt.accum).contiguous();
  const at::Tensor p = prompts.to(dt.compute).contiguous();
  const at::Tensor g = grad_out.to(dt.compute).contiguous();
  // Zero-filled so that empty reductions (D = 0 or B = 0) need no launch to be right.
  at::Tensor grad_weights = at::zeros({s.K, s.B, s.Np, s.K}, w.options());
  at::Tensor grad_prompts = at::zeros({s.K, s.Np, s.D}, p.options());
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dt.compute, "prompt_fusion_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (grad_weights.numel() > 0 && s.D > 0) {
          const int64_t blocks = grad_weights.numel();
          check_grid(op, blocks, 1);
          const dim3 grid(static_cast<unsigned>(blocks));
          launch(prompt_fusion_bwd_weights_kernel<scalar_t, acc_t>, grid, kThreads, stream,
                 g.const_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(),
                 grad_weights.mutable_data_ptr<acc_t>(), s.K, s.Np, s.D);
        }
        if (grad_prompts.numel() > 0 && s.B > 0) {
          const int64_t pairs = s.K * s.Np, d_blocks = ceil_div(s.D, kThreads);
          check_grid(op, pairs, d_blocks);
          const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(d_blocks));
          launch(prompt_fusion_bwd_prompts_kernel<scalar_t, acc_t>, grid, kThreads, stream,
                 g.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(),
                 grad_prompts.mutable_data_ptr<scalar_t>(), s.K, s.B, s.Np, s.D);
        }
      });
  return {grad_weights.to(weights.scalar_type()), grad_prompts.to(prompts.scalar_type())};
}

}  // namespace
}  // namespace pmoe_fast

#ifndef PMOE_CUDA_ON_CPU
TORCH_LIBRARY_IMPL(pmoe_fast, CUDA, m) {
  m.impl("prompt_fusion", &pmoe_fast::prompt_fusion_cuda);
  m.impl("prompt_fusion_backward", &pmoe_fast::prompt_fusion_backward_cuda);
}
#endif
