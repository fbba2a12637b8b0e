// Shared by the CPU (pmoe_ops.cpp) and CUDA (cuda/prompt_fusion.cu) implementations of
// prompt fusion: input checks and the dtype plan, so both devices reject the same inputs with
// the same messages and round the same way.
//
// Notation (the same letters in every file): K experts, B batch, Np prompt tokens, D width.
//   out[k, b, n, :] = sum_j weights[k, b, n, j] * prompts[j, n, :]
#pragma once

#include <ATen/ATen.h>

namespace pmoe_fast {

struct PromptFusionSizes {
  int64_t K, B, Np, D;
};

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& prompts) {
  TORCH_CHECK(t.device() == prompts.device(), op, ": ", name,
              " and prompts must be on the same device, got ", t.device(), " and ",
              prompts.device());
}

// weights: (K, B, Np, K), prompts: (K, Np, D). Returns the four sizes.
inline PromptFusionSizes check_prompt_fusion_inputs(const char* op, const at::Tensor& weights,
                                                    const at::Tensor& prompts) {
  check_dtype(op, "weights", weights);
  check_dtype(op, "prompts", prompts);
  check_same_device(op, "weights", weights, prompts);
  TORCH_CHECK(prompts.dim() == 3, op, ": prompts must be (K, Np, D), got ", prompts.sizes());
  const int64_t K = prompts.size(0), Np = prompts.size(1), D = prompts.size(2);
  TORCH_CHECK(weights.dim() == 4 && weights.size(0) == K && weights.size(2) == Np &&
                  weights.size(3) == K,
              op, ": weights must be (K, B, Np, K) with K = prompts.size(0) = ", K,
              " and Np = prompts.size(1) = ", Np, ", got ", weights.sizes());
  return {K, weights.size(1), Np, D};
}

// grad_out: (K, B, Np, D), the gradient of prompt_fusion's output.
inline void check_grad_out(const char* op, const at::Tensor& grad_out,
                           const PromptFusionSizes& s, const at::Tensor& prompts) {
  check_dtype(op, "grad_out", grad_out);
  check_same_device(op, "grad_out", grad_out, prompts);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.K && grad_out.size(1) == s.B &&
                  grad_out.size(2) == s.Np && grad_out.size(3) == s.D,
              op, ": grad_out must be (K, B, Np, D) = [", s.K, ", ", s.B, ", ", s.Np, ", ", s.D,
              "], got ", grad_out.sizes());
}

// The dtype plan. Kernels read prompts (and grad_out) in their storage type `scalar_t` and
// accumulate in at::opmath_type<scalar_t>: float for fp16/bf16/fp32, double for fp64. Weights
// are converted to that accumulation type up front: they are D / K times smaller than the
// output, so the copy is cheap, and it spares a 4 x 4 dispatch over (weights, prompts) dtypes.
// When only the weights are fp64, prompts are promoted too, so fp64 inputs always accumulate in
// fp64.
struct PromptFusionDtypes {
  at::ScalarType compute;  // dtype the kernels read prompts and grad_out in
  at::ScalarType accum;    // at::opmath_type of `compute`; weights are converted to it
};

inline PromptFusionDtypes prompt_fusion_dtypes(const at::Tensor& weights,
                                               const at::Tensor& prompts) {
  if (weights.scalar_type() == at::kDouble || prompts.scalar_type() == at::kDouble) {
    return {at::kDouble, at::kDouble};
  }
  return {prompts.scalar_type(), at::kFloat};
}

}  // namespace pmoe_fast
