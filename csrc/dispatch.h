// Shared by the CPU (dispatch_cpu.cpp) and CUDA (cuda/dispatch.cu) implementations of the fused
// dispatcher: input checks and the dtype plan, so both devices reject the same inputs with the
// same messages (pmoe_fast/fused_dispatch.py repeats them for the fake implementations).
//
// Notation (the same letters in every file): K experts, B batch, Np prompt tokens, T tokens per
// expert, D width, H hidden width of f (0: f is a single Linear(D, K)), Hz = H, or D when H = 0
// (the width of what the mean over tokens is taken of). Sources s = e, p, z (EPTs, prompt outputs,
// other tokens), in that order in every parameter list.
//
//   f_s(x)           = W2_s gelu(W1_s x + b1_s) + b2_s   (exact erf GELU), or W2_s x + b2_s
//   logits[k, b, n]  = f_e(P[k, n]) + f_p(Z_P[k, b, n]) + mean_{t in [start_k, end_k)} f_z(Z[k, b, t])
//   weights[k, b, n] = softmax(logits[k, b, n])          over the K experts
//   ipt[k, b, n, :]  = sum_j weights[k, b, n, j] * P[j, n, :]
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <utility>

#include "prompt_fusion.h"

namespace pmoe_fast {

constexpr int kNumSources = 3;  // e, p, z
constexpr const char* kSourceNames[kNumSources] = {"e", "p", "z"};

struct DispatchSizes {
  int64_t K, B, Np, T, D, H;
  bool has_prompt_out;
  // Width of the features f averages over tokens: its hidden layer, or its input when H = 0.
  int64_t features() const { return H > 0 ? H : D; }
};

// The accumulation dtype, the torch backend's rule (pmoe_fast/dispatcher.py, _acc_dtype): float64
// when the prompts are float64, float32 otherwise, whatever the other inputs' dtypes. The weights,
// z_act and z_mean outputs are in it, and the backward expects them back in it.
inline at::ScalarType dispatch_acc_dtype(const at::Tensor& prompts) {
  return prompts.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_sizes(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must be ", layout, " = ", expected, ", got ",
              t.sizes());
}

// One parameter tensor of source s: dtype, device and shape.
inline void check_param(const char* op, const char* list, int s, const at::Tensor& t,
                        const at::Tensor& prompts, at::IntArrayRef expected, const char* layout) {
  const std::string name = std::string(list) + "[" + std::to_string(s) + "] (source " +
                           kSourceNames[s] + ")";
  check_dtype(op, name.c_str(), t);
  check_same_device(op, name.c_str(), t, prompts);
  check_sizes(op, name.c_str(), t, expected, layout);
}

// prompts: (K, Np, D); tokens: (K, B, T, D), any strides with stride(-1) == 1; tok_start, tok_end:
// K ints with 0 <= start_k < end_k <= T; prompt_out: (K, B, Np, D) or None; w1, b1: three (H, D)
// and (H) tensors, or three Nones (H = 0); w2: three (K, H) tensors ((K, D) when H = 0); b2: three
// (K). Returns the sizes.
inline DispatchSizes check_dispatch_inputs(const char* op, const at::Tensor& prompts,
                                           const at::Tensor& tokens, at::IntArrayRef tok_start,
                                           at::IntArrayRef tok_end,
                                           const std::optional<at::Tensor>& prompt_out,
                                           const c10::List<std::optional<at::Tensor>>& w1,
                                           const c10::List<std::optional<at::Tensor>>& b1,
                                           at::TensorList w2, at::TensorList b2) {
  check_dtype(op, "prompts", prompts);
  check_dtype(op, "tokens", tokens);
  check_same_device(op, "tokens", tokens, prompts);
  TORCH_CHECK(prompts.dim() == 3, op, ": prompts must be (K, Np, D), got ", prompts.sizes());
  const int64_t K = prompts.size(0), Np = prompts.size(1), D = prompts.size(2);
  TORCH_CHECK(K >= 1 && Np >= 1 && D >= 1, op, ": prompts must be (K, Np, D) with K, Np, D >= 1, got ",
              prompts.sizes());
  TORCH_CHECK(tokens.dim() == 4 && tokens.size(0) == K && tokens.size(3) == D, op,
              ": tokens must be (K, B, T, D) with K = prompts.size(0) = ", K,
              " and D = prompts.size(2) = ", D, ", got ", tokens.sizes());
  const int64_t B = tokens.size(1), T = tokens.size(2);
  TORCH_CHECK(B >= 1, op, ": tokens must hold at least one image (B >= 1), got ", tokens.sizes());
  // The kernels walk a token row with unit stride and everything else with the given strides, so
  // a view such as seq[:, :, Np:] of a longer sequence needs no copy.
  TORCH_CHECK(tokens.stride(3) == 1 || D == 1, op,
              ": tokens must have stride(-1) == 1 (any other strides are fine), got strides ",
              tokens.strides());
  TORCH_CHECK(static_cast<int64_t>(tok_start.size()) == K &&
                  static_cast<int64_t>(tok_end.size()) == K,
              op, ": tok_start and tok_end must hold K = ", K, " ints each, got ", tok_start.size(),
              " and ", tok_end.size());
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(0 <= tok_start[k] && tok_start[k] < tok_end[k] && tok_end[k] <= T, op,
                ": expert ", k, " must average over a non-empty token range [start, end) within [0, T = ",
                T, "], got [", tok_start[k], ", ", tok_end[k], ")");
  }
  if (prompt_out.has_value()) {
    check_dtype(op, "prompt_out", *prompt_out);
    check_same_device(op, "prompt_out", *prompt_out, prompts);
    check_sizes(op, "prompt_out", *prompt_out, {K, B, Np, D}, "(K, B, Np, D)");
  }

  TORCH_CHECK(w1.size() == kNumSources && b1.size() == kNumSources && w2.size() == kNumSources &&
                  b2.size() == kNumSources,
              op, ": w1, b1, w2 and b2 must each hold 3 entries (sources e, p, z), got ", w1.size(),
              ", ", b1.size(), ", ", w2.size(), " and ", b2.size());
  // All three f's have the same shape. A list that mixes tensors and Nones cannot be
  // differentiated through torch.library's autograd (it treats such a list as a constant).
  const std::optional<at::Tensor> w1_e = w1.get(0);
  const bool hidden = w1_e.has_value();
  const int64_t H = hidden && w1_e->dim() >= 1 ? w1_e->size(0) : 0;
  TORCH_CHECK(!hidden || H >= 1, op, ": w1[0] must be (H, D) with H >= 1, got ", w1_e->sizes());
  for (int s = 0; s < kNumSources; ++s) {
    const std::optional<at::Tensor> w = w1.get(s), b = b1.get(s);
    TORCH_CHECK(w.has_value() == hidden && b.has_value() == hidden, op,
                ": w1 and b1 must hold three tensors (f with a hidden layer) or three Nones (f = "
                "Linear(D, K)); source ",
                kSourceNames[s], " has w1 ", w.has_value() ? "set" : "None", " and b1 ",
                b.has_value() ? "set" : "None", " but source e has w1 ", hidden ? "set" : "None");
    if (hidden) {
      check_param(op, "w1", s, *w, prompts, {H, D}, "(H, D)");
      check_param(op, "b1", s, *b, prompts, {H}, "(H)");
      check_param(op, "w2", s, w2[s], prompts, {K, H}, "(K, H)");
    } else {
      check_param(op, "w2", s, w2[s], prompts, {K, D}, "(K, D) when there is no hidden layer");
    }
    check_param(op, "b2", s, b2[s], prompts, {K}, "(K)");
  }
  return {K, B, Np, T, D, H, prompt_out.has_value()};
}

// What dispatch_mlp_backward gets back from the forward: grad_ipt (K, B, Np, D) in any float
// dtype, and weights (K, B, Np, K), z_act (K, B, T, H), z_mean (K, B, Hz) in the accumulation dtype.
inline void check_dispatch_saved(const char* op, const DispatchSizes& s, at::ScalarType acc,
                                 const at::Tensor& grad_ipt, const at::Tensor& weights,
                                 const at::Tensor& z_act, const at::Tensor& z_mean,
                                 const at::Tensor& prompts) {
  check_dtype(op, "grad_ipt", grad_ipt);
  check_same_device(op, "grad_ipt", grad_ipt, prompts);
  check_sizes(op, "grad_ipt", grad_ipt, {s.K, s.B, s.Np, s.D}, "(K, B, Np, D)");
  const std::pair<const char*, const at::Tensor*> saved[] = {
      {"weights", &weights}, {"z_act", &z_act}, {"z_mean", &z_mean}};
  for (const auto& [name, t] : saved) {
    check_same_device(op, name, *t, prompts);
    TORCH_CHECK(t->scalar_type() == acc, op, ": ", name,
                " must be the forward's output, in the accumulation dtype ", acc, ", got ",
                t->scalar_type());
  }
  check_sizes(op, "weights", weights, {s.K, s.B, s.Np, s.K}, "(K, B, Np, K)");
  check_sizes(op, "z_act", z_act, {s.K, s.B, s.T, s.H}, "(K, B, T, H)");
  check_sizes(op, "z_mean", z_mean, {s.K, s.B, s.features()}, "(K, B, Hz)");
}

}  // namespace pmoe_fast
