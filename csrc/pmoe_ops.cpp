// The pmoe_fast operator library: schemas (TORCH_LIBRARY) and CPU implementations.
//
// Built into the Python extension pmoe_fast._C by setup.py, and into the plain shared library
// pmoe_fast_ops by CMakeLists.txt for C++ users; nothing here depends on Python. CUDA
// implementations live in cuda/*.cu and register under the same schemas.
//
// Notation: K experts, B batch, Np prompt tokens, D width.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "prompt_fusion.h"

namespace pmoe_fast {
namespace {

// at::parallel_for splits a range into chunks of at least `grain` items; aim for about
// GRAIN_SIZE multiply-adds per chunk so small problems stay on one thread.
int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_item));
}

// out[k, b, n, :] = sum_j weights[k, b, n, j] * prompts[j, n, :], one (k, b, n) row at a time.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void prompt_fusion_fwd_cpu(const acc_t* weights,     // (K, B, Np, K)
                           const scalar_t* prompts,  // (K, Np, D)
                           scalar_t* out,            // (K, B, Np, D)
                           const PromptFusionSizes& s) {
  const int64_t rows = s.K * s.B * s.Np;
  at::parallel_for(0, rows, grain_for(s.K * s.D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(s.D);
    for (int64_t row = begin; row < end; ++row) {  // row = (k * B + b) * Np + n
      const int64_t n = row % s.Np;
      const acc_t* w = weights + row * s.K;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t j = 0; j < s.K; ++j) {
        const scalar_t* p = prompts + (j * s.Np + n) * s.D;
        for (int64_t d = 0; d < s.D; ++d) {
          acc[d] += w[j] * static_cast<acc_t>(p[d]);
        }
      }
      scalar_t* o = out + row * s.D;
      for (int64_t d = 0; d < s.D; ++d) {
        o[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

// sum_d a[d] * b[d] with kLanes independent partial sums, added pairwise at the end. One running
// sum over D = 100 lost 3x the accuracy of BLAS in fp32 (its error grows like D); lanes cut
// that to D / kLanes and let the compiler vectorise the loop.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t D) {
  constexpr int64_t kLanes = 8;
  acc_t lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      lanes[l] += static_cast<acc_t>(a[d + l]) * static_cast<acc_t>(b[d + l]);
    }
  }
  for (; d < D; ++d) {
    lanes[0] += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) {
      lanes[l] += lanes[l + width];
    }
  }
  return lanes[0];
}

// grad_weights[k, b, n, j] = <grad_out[k, b, n, :], prompts[j, n, :]>, one row at a time.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void prompt_fusion_bwd_weights_cpu(const scalar_t* grad_out,  // (K, B, Np, D)
                                   const scalar_t* prompts,   // (K, Np, D)
                                   acc_t* grad_weights,       // (K, B, Np, K)
                                   const PromptFusionSizes& s) {
  const int64_t rows = s.K * s.B * s.Np;
  at::parallel_for(0, rows, grain_for(s.K * s.D), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row % s.Np;
      const scalar_t* g = grad_out + row * s.D;
      for (int64_t j = 0; j < s.K; ++j) {
        grad_weights[row * s.K + j] = dot<scalar_t>(g, prompts + (j * s.Np + n) * s.D, s.D);
      }
    }
  });
}

// grad_prompts[j, n, :] = sum_{k, b} weights[k, b, n, j] * grad_out[k, b, n, :]. Each (j, n)
// pair owns its output row, so threads never write the same memory.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
void prompt_fusion_bwd_prompts_cpu(const scalar_t* grad_out,  // (K, B, Np, D)
                                   const acc_t* weights,      // (K, B, Np, K)
                                   scalar_t* grad_prompts,    // (K, Np, D)
                                   const PromptFusionSizes& s) {
  at::parallel_for(0, s.K * s.Np, grain_for(s.K * s.B * s.D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(s.D);
    for (int64_t jn = begin; jn < end; ++jn) {  // jn = j * Np + n
      const int64_t j = jn / s.Np, n = jn % s.Np;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t kb = 0; kb < s.K * s.B; ++kb) {  // kb = k * B + b
        const int64_t row = kb * s.Np + n;
        const acc_t w = weights[row * s.K + j];
        const scalar_t* g = grad_out + row * s.D;
        for (int64_t d = 0; d < s.D; ++d) {
          acc[d] += w * static_cast<acc_t>(g[d]);
        }
      }
      scalar_t* gp = grad_prompts + jn * s.D;
      for (int64_t d = 0; d < s.D; ++d) {
        gp[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

// weights: (K, B, Np, K), prompts: (K, Np, D) -> out: (K, B, Np, D) in prompts' dtype.
at::Tensor prompt_fusion_cpu(const at::Tensor& weights, const at::Tensor& prompts) {
  const PromptFusionSizes s = check_prompt_fusion_inputs("prompt_fusion", weights, prompts);
  const PromptFusionDtypes dt = prompt_fusion_dtypes(weights, prompts);
  const at::Tensor w = weights.to(dt.accum).contiguous();
  const at::Tensor p = prompts.to(dt.compute).contiguous();
  at::Tensor out = at::empty({s.K, s.B, s.Np, s.D}, p.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt.compute, "prompt_fusion_cpu", [&] {
    prompt_fusion_fwd_cpu<scalar_t>(w.const_data_ptr<at::opmath_type<scalar_t>>(),
                                    p.const_data_ptr<scalar_t>(),
                                    out.mutable_data_ptr<scalar_t>(), s);
  });
  return out.to(prompts.scalar_type());
}

// grad_out: (K, B, Np, D), weights: (K, B, Np, K), prompts: (K, Np, D)
// -> (grad_weights (K, B, Np, K) in weights' dtype, grad_prompts (K, Np, D) in prompts' dtype).
std::tuple<at::Tensor, at::Tensor> prompt_fusion_backward_cpu(const at::Tensor& grad_out,
                                                              const at::Tensor& weights,
                                                              const at::Tensor& prompts) {
  const char* op = "prompt_fusion_backward";
  const PromptFusionSizes s = check_prompt_fusion_inputs(op, weights, prompts);
  check_grad_out(op, grad_out, s, prompts);
  const PromptFusionDtypes dt = prompt_fusion_dtypes(weights, prompts);
  const at::Tensor w = weights.to(dt.accum).contiguous();
  const at::Tensor p = prompts.to(dt.compute).contiguous();
  const at::Tensor g = grad_out.to(dt.compute).contiguous();
  at::Tensor grad_weights = at::empty({s.K, s.B, s.Np, s.K}, w.options());
  at::Tensor grad_prompts = at::empty({s.K, s.Np, s.D}, p.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dt.compute, "prompt_fusion_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        prompt_fusion_bwd_weights_cpu<scalar_t>(g.const_data_ptr<scalar_t>(),
                                                p.const_data_ptr<scalar_t>(),
                                                grad_weights.mutable_data_ptr<acc_t>(), s);
        prompt_fusion_bwd_prompts_cpu<scalar_t>(g.const_data_ptr<scalar_t>(),
                                                w.const_data_ptr<acc_t>(),
                                                grad_prompts.mutable_data_ptr<scalar_t>(), s);
      });
  return {grad_weights.to(weights.scalar_type()), grad_prompts.to(prompts.scalar_type())};
}

}  // namespace
}  // namespace pmoe_fast

TORCH_LIBRARY(pmoe_fast, m) {
  // The fake (meta) implementations and autograd formulas live in Python; naming the module
  // lets torch.compile tell a user who forgot to import it which import is missing.
  m.set_python_module("pmoe_fast.fusion");
  m.def("prompt_fusion(Tensor weights, Tensor prompts) -> Tensor");
  m.def(
      "prompt_fusion_backward(Tensor grad_out, Tensor weights, Tensor prompts) -> "
      "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pmoe_fast, CPU, m) {
  m.impl("prompt_fusion", &pmoe_fast::prompt_fusion_cpu);
  m.impl("prompt_fusion_backward", &pmoe_fast::prompt_fusion_backward_cpu);
}
