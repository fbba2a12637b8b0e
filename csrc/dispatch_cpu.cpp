// The fused dispatcher (kind "mlp"): schemas of pmoe_fast::dispatch_mlp and
// dispatch_mlp_backward, and their CPU implementations. Notation and formulas: dispatch.h. The
// CUDA implementations are in cuda/dispatch.cu; fake implementations and autograd in
// pmoe_fast/fused_dispatch.py.
//
// Where the time goes. At the target shape (K=6, B=8, Np=10, T=197, D=768, H=64) f sees
// K*B*T = 9456 token rows against K*Np + K*B*Np = 540 prompt rows, and three GEMMs over the token
// rows are nearly all the arithmetic: the pre-activations W1_z Z (forward), dL/dZ = dA W1_z and
// dL/dW1_z = dA^T Z (backward), 2*K*B*T*D*H = 0.93 GFLOP each. So:
//  * the tokens are never copied. When they are one (K*B*T, D) matrix in the accumulation dtype
//    (contiguous, as the fast model's sequential path stacks them), each GEMM is a single BLAS
//    call over all of them, threaded by BLAS; rows outside the token ranges then get zero
//    gradients for free, since dL/d(pre-activation) is zero there. Otherwise each (k, b) hands
//    its rows to BLAS as a strided view (one call per (k, b) inside at::parallel_for, where ATen
//    runs it single-threaded), and tokens in another dtype are converted one (k, b) tile at a time;
//  * f_z's second layer runs once per (k, b), on the mean of the hidden activations
//    (mean_t (W2 h_t + b2) = W2 mean_t h_t + b2), and gelu(W1_z Z + b1_z) is never stored;
//  * the forward returns the token pre-activations z_act = W1_z Z + b1_z (K*B*T*H values, H/D of
//    the tokens) and their mean features z_mean, so the backward recomputes nothing large;
//  * the small parts (f_e on K*Np rows, f_p on K*B*Np rows, softmax, the prompt mixture) are
//    whole-tensor ATen calls in the accumulation dtype: a few percent of the FLOPs.
// On 2 shared AVX2 cores at 2.45 GHz (peak 157 GFLOP/s) MKL runs these GEMMs at 100-155 GFLOP/s
// (faster as one call than as K*B), so even at peak they take 18 ms: fusing saves the passes
// around them, not the GEMMs. Fusion pays most at small, overhead-bound shapes.
// No atomics and no per-thread partial sums, so results repeat bit for bit for a given thread
// count (BLAS may split a single large GEMM's reductions by thread count). On the per-(k, b)
// path the token-sized reductions ignore the thread count: z_mean is summed per (k, b), and
// dL/dW1_z is split over column blocks of D, each summed over (k, b) in order by one task.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "dispatch.h"

namespace pmoe_fast {
namespace {

// Columns of dL/dW1_z one task owns: wide enough that each BLAS call is a real GEMM
// (H x tokens x 128), narrow enough that D = 768 gives 6 tasks to share out.
constexpr int64_t kColumnBlock = 128;

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// at::parallel_for for a body that calls ATen ops. Its worker threads start with the default
// thread-local dispatch state, so an op there would pass through autograd again (and, under
// torch.inference_mode, refuse to write into the inference tensors this op allocated); the op's own
// thread runs below autograd. Each chunk is put there too.
template <typename F>
void parallel_aten(int64_t begin, int64_t end, int64_t grain, const F& body) {
  at::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    body(chunk_begin, chunk_end);
  });
}

// One source's f in the accumulation dtype, detached: nothing inside the op is seen by autograd.
struct Mlp {
  at::Tensor w1, b1;  // (H, D), (H); undefined when H = 0
  at::Tensor w2, b2;  // (K, Hz), (K)
  bool hidden() const { return w1.defined(); }
};

// Gradients of one f, same shapes as Mlp, in the accumulation dtype.
struct MlpGrads {
  at::Tensor w1, b1, w2, b2;
};

// Ranges of tokens each expert averages over: [start[k], end[k]).
struct TokenRanges {
  at::IntArrayRef start, end;
  int64_t count(int64_t k) const { return end[k] - start[k]; }
};

at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.detach().to(acc).contiguous();
}

// An output in the dtype of its input, contiguous as the fake implementations promise.
at::Tensor as_output(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }

Mlp mlp_params(int s, const OptionalTensorList& w1, const OptionalTensorList& b1,
               at::TensorList w2, at::TensorList b2, at::ScalarType acc) {
  Mlp f;
  const std::optional<at::Tensor> w = w1.get(s), b = b1.get(s);
  if (w.has_value()) {
    f.w1 = to_acc(*w, acc);
    f.b1 = to_acc(*b, acc);
  }
  f.w2 = to_acc(w2[s], acc);
  f.b2 = to_acc(b2[s], acc);
  return f;
}

// Hidden pre-activations W1 x + b1 (R, H) of rows x (R, D); undefined when f has no hidden layer.
at::Tensor pre_activations(const Mlp& f, const at::Tensor& x) {
  return f.hidden() ? at::addmm(f.b1, x, f.w1.t()) : at::Tensor();
}

// f's logits (R, K) of rows x (R, D), given their pre-activations.
at::Tensor logits_of(const Mlp& f, const at::Tensor& x, const at::Tensor& pre) {
  return at::addmm(f.b2, f.hidden() ? at::gelu(pre) : x, f.w2.t());
}

// Backward of f on rows x (R, D) given dl = dL/dlogits (R, K): fills g and returns dL/dx (R, D),
// or an undefined tensor when !need_x.
at::Tensor mlp_backward(const Mlp& f, const at::Tensor& x, const at::Tensor& pre,
                        const at::Tensor& dl, bool need_x, MlpGrads& g) {
  g.b2 = dl.sum(0);
  if (!f.hidden()) {
    g.w2 = dl.t().mm(x);
    return need_x ? dl.mm(f.w2) : at::Tensor();
  }
  g.w2 = dl.t().mm(at::gelu(pre));
  const at::Tensor da = at::gelu_backward(dl.mm(f.w2), pre);
  g.w1 = da.t().mm(x);
  g.b1 = da.sum(0);
  return need_x ? da.mm(f.w1) : at::Tensor();
}

// Z[k, b, start : start + count, d0 : d0 + width] as a (count, width) matrix: a strided view of
// the tokens when they are in the accumulation dtype, otherwise a converted copy of this tile.
at::Tensor token_tile(const at::Tensor& tokens, int64_t k, int64_t b, int64_t start, int64_t count,
                      int64_t d0, int64_t width, at::ScalarType acc) {
  const at::Tensor tile =
      tokens.select(0, k).select(0, b).narrow(0, start, count).narrow(1, d0, width);
  return tile.scalar_type() == acc ? tile : tile.to(acc);
}

// The tokens as one (K*B*T, D) matrix in the accumulation dtype, or an undefined tensor when
// they are not one (strided views of longer sequences, another dtype).
at::Tensor token_rows(const at::Tensor& tokens, const DispatchSizes& s, at::ScalarType acc) {
  if (tokens.scalar_type() != acc || !tokens.is_contiguous()) return at::Tensor();
  return tokens.view({s.K * s.B * s.T, s.D});
}

// Zeroes rows [0, start) and [end, T) of every (k, b) of x (K, B, T, W).
void zero_outside(at::Tensor& x, const TokenRanges& r, const DispatchSizes& s) {
  for (int64_t k = 0; k < s.K; ++k) {
    at::Tensor rows = x.select(0, k);
    rows.narrow(1, 0, r.start[k]).zero_();
    rows.narrow(1, r.end[k], s.T - r.end[k]).zero_();
  }
}

// Whether every token outside the ranges is finite. The one-GEMM backward multiplies those rows
// by zero gradients, and 0 * inf is NaN, where the torch backend never reads them.
bool finite_outside(const at::Tensor& tokens, const TokenRanges& r, const DispatchSizes& s) {
  for (int64_t k = 0; k < s.K; ++k) {
    const at::Tensor rows = tokens.select(0, k);
    if (!rows.narrow(1, 0, r.start[k]).isfinite().all().item<bool>() ||
        !rows.narrow(1, r.end[k], s.T - r.end[k]).isfinite().all().item<bool>()) {
      return false;
    }
  }
  return true;
}

// Source z, fused. For every (k, b) over its token range:
//   z_act[k, b, t] = W1_z Z[k, b, t] + b1_z, written by BLAS straight into the output,
//   z_mean[k, b]   = mean_t gelu(z_act[k, b, t])   (mean_t Z[k, b, t] when H = 0).
// tokens: (K, B, T, D) strided; z_act: (K, B, T, H), zero outside the ranges; z_mean: (K, B, Hz).
void z_forward(const Mlp& f, const at::Tensor& tokens, const TokenRanges& r, at::Tensor& z_act,
               at::Tensor& z_mean, const DispatchSizes& s, at::ScalarType acc) {
  const at::Tensor rows = token_rows(tokens, s, acc);
  if (rows.defined() && f.hidden()) {  // one GEMM over every token row, then the means per (k, b)
    at::Tensor pre = z_act.view({s.K * s.B * s.T, s.H});
    at::addmm_out(pre, f.b1, rows, f.w1.t());
    zero_outside(z_act, r, s);
    const at::Tensor act = at::gelu(z_act);
    for (int64_t k = 0; k < s.K; ++k) {
      at::Tensor mean = z_mean.select(0, k);
      at::sum_out(mean, act.select(0, k).narrow(1, r.start[k], r.count(k)), {1});
      mean.div_(r.count(k));
    }
    return;
  }
  parallel_aten(0, s.K * s.B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kb = begin; kb < end; ++kb) {
      const int64_t k = kb / s.B, b = kb % s.B, count = r.count(k);
      const at::Tensor x = token_tile(tokens, k, b, r.start[k], count, 0, s.D, acc);
      at::Tensor mean = z_mean.select(0, k).select(0, b);
      if (f.hidden()) {
        at::Tensor pre = z_act.select(0, k).select(0, b).narrow(0, r.start[k], count);
        at::addmm_out(pre, f.b1, x, f.w1.t());
        at::sum_out(mean, at::gelu(pre), {0});
      } else {
        at::sum_out(mean, x, {0});
      }
      mean.div_(count);
    }
  });
  zero_outside(z_act, r, s);
}

// Backward of source z given dl = dL/d(mean_t f_z(Z[k, b, t])) (K, B, K): fills g, and writes
// dL/dZ into grad_tokens (K, B, T, D) when it is defined, zero outside the token ranges.
void z_backward(const Mlp& f, const at::Tensor& tokens, const TokenRanges& r,
                const at::Tensor& z_act, const at::Tensor& z_mean, const at::Tensor& dl,
                at::Tensor& grad_tokens, const DispatchSizes& s, at::ScalarType acc, MlpGrads& g) {
  const int64_t KB = s.K * s.B, Hz = s.features();
  g.b2 = dl.sum(at::IntArrayRef{0, 1});
  g.w2 = dl.reshape({KB, s.K}).t().mm(z_mean.reshape({KB, Hz}));
  // dL/d(features of one token) = W2_z^T dl / count: the mean hands each token an equal share.
  std::vector<double> inv_count(s.K);
  for (int64_t k = 0; k < s.K; ++k) inv_count[k] = 1.0 / static_cast<double>(r.count(k));
  const at::Tensor coef =
      dl.matmul(f.w2) * at::tensor(inv_count, z_mean.options()).view({s.K, 1, 1});  // (K, B, Hz)
  const at::Tensor rows = token_rows(tokens, s, acc);
  // One GEMM each for dL/dZ and dL/dW1_z over every token row, unless a token outside the ranges
  // would turn dL/dW1_z into NaN.
  if (rows.defined() && f.hidden() && finite_outside(tokens, r, s)) {
    at::Tensor da = at::gelu_backward(coef.unsqueeze(2).expand({s.K, s.B, s.T, s.H}), z_act);
    zero_outside(da, r, s);  // so rows outside the ranges get zero gradients
    const at::Tensor da_rows = da.view({KB * s.T, s.H});
    if (grad_tokens.defined()) {
      at::Tensor out = grad_tokens.view({KB * s.T, s.D});
      at::mm_out(out, da_rows, f.w1);
    }
    g.b1 = da_rows.sum(0);
    // dL/dW1_z summed expert by expert, in order, as autograd sums the torch backend's K calls of f.
    g.w1 = at::zeros({s.H, s.D}, z_act.options());
    const int64_t rows_per_expert = s.B * s.T;
    for (int64_t k = 0; k < s.K; ++k) {
      g.w1.addmm_(da_rows.narrow(0, k * rows_per_expert, rows_per_expert).t(),
                  rows.narrow(0, k * rows_per_expert, rows_per_expert));
    }
    return;
  }
  // dL/d(pre-activations) of every token, zero outside the ranges: (K, B, T, H).
  at::Tensor da = f.hidden() ? at::zeros_like(z_act) : at::Tensor();

  parallel_aten(0, KB, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kb = begin; kb < end; ++kb) {
      const int64_t k = kb / s.B, b = kb % s.B, start = r.start[k], count = r.count(k);
      const at::Tensor c = coef.select(0, k).select(0, b);
      at::Tensor d;
      if (f.hidden()) {
        d = da.select(0, k).select(0, b).narrow(0, start, count);
        at::gelu_backward_out(d, c.expand({count, s.H}),
                              z_act.select(0, k).select(0, b).narrow(0, start, count));
      }
      if (!grad_tokens.defined()) continue;
      at::Tensor rows = grad_tokens.select(0, k).select(0, b);
      rows.narrow(0, 0, start).zero_();
      rows.narrow(0, r.end[k], s.T - r.end[k]).zero_();
      at::Tensor target = rows.narrow(0, start, count);
      if (!f.hidden()) {
        target.copy_(c.expand({count, s.D}));
      } else if (target.scalar_type() == acc) {
        at::mm_out(target, d, f.w1);
      } else {
        target.copy_(d.mm(f.w1));
      }
    }
  });
  if (!f.hidden()) return;

  g.b1 = da.sum(at::IntArrayRef{0, 1, 2});
  // dL/dW1_z = sum over every token of dA_t Z_t^T. Each task owns a block of columns and sums the
  // (k, b) pairs in order: no partial copies, and the same bits for any thread count.
  g.w1 = at::empty({s.H, s.D}, z_act.options());
  const int64_t blocks = (s.D + kColumnBlock - 1) / kColumnBlock;
  parallel_aten(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t d0 = block * kColumnBlock, width = std::min(kColumnBlock, s.D - d0);
      at::Tensor out = g.w1.narrow(1, d0, width);
      out.zero_();
      for (int64_t kb = 0; kb < KB; ++kb) {
        const int64_t k = kb / s.B, b = kb % s.B, start = r.start[k], count = r.count(k);
        const at::Tensor d = da.select(0, k).select(0, b).narrow(0, start, count);
        out.addmm_(d.t(), token_tile(tokens, k, b, start, count, d0, width, acc));
      }
    }
  });
}

MlpGrads zero_grads(const Mlp& f) {
  MlpGrads g;
  if (f.hidden()) {
    g.w1 = at::zeros_like(f.w1);
    g.b1 = at::zeros_like(f.b1);
  }
  g.w2 = at::zeros_like(f.w2);
  g.b2 = at::zeros_like(f.b2);
  return g;
}

// prompts (K, Np, D), tokens (K, B, T, D) strided, tok_start/tok_end K ints, prompt_out
// (K, B, Np, D) or None, w1/b1/w2/b2 three entries each (sources e, p, z; see dispatch.h)
// -> ipt (K, B, Np, D) in prompts' dtype, and in the accumulation dtype weights (K, B, Np, K),
//    z_act (K, B, T, H) and z_mean (K, B, Hz), the last two saved for the backward.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_mlp_cpu(
    const at::Tensor& prompts, const at::Tensor& tokens, at::IntArrayRef tok_start,
    at::IntArrayRef tok_end, const std::optional<at::Tensor>& prompt_out,
    const OptionalTensorList& w1, const OptionalTensorList& b1, at::TensorList w2,
    at::TensorList b2) {
  const DispatchSizes s = check_dispatch_inputs("dispatch_mlp", prompts, tokens, tok_start,
                                                tok_end, prompt_out, w1, b1, w2, b2);
  const at::ScalarType acc = dispatch_acc_dtype(prompts);
  const Mlp f_e = mlp_params(0, w1, b1, w2, b2, acc);
  const Mlp f_p = mlp_params(1, w1, b1, w2, b2, acc);
  const Mlp f_z = mlp_params(2, w1, b1, w2, b2, acc);

  const at::Tensor p = to_acc(prompts, acc).view({s.K * s.Np, s.D});
  at::Tensor logits = logits_of(f_e, p, pre_activations(f_e, p)).view({s.K, 1, s.Np, s.K});
  if (s.has_prompt_out) {
    const at::Tensor zp = to_acc(*prompt_out, acc).view({s.K * s.B * s.Np, s.D});
    logits = logits + logits_of(f_p, zp, pre_activations(f_p, zp)).view({s.K, s.B, s.Np, s.K});
  }
  at::Tensor z_act = at::empty({s.K, s.B, s.T, s.H}, p.options());  // z_forward writes every row
  at::Tensor z_mean = at::empty({s.K, s.B, s.features()}, p.options());
  z_forward(f_z, tokens.detach(), {tok_start, tok_end}, z_act, z_mean, s, acc);
  const at::Tensor logits_z =
      at::addmm(f_z.b2, z_mean.view({s.K * s.B, s.features()}), f_z.w2.t());
  logits = logits + logits_z.view({s.K, s.B, 1, s.K});  // the token term is shared by all Np

  const at::Tensor weights = at::softmax(logits, -1);  // subtracts the row max
  const at::Tensor ipt = at::einsum("kbnj,jnd->kbnd", {weights, p.view({s.K, s.Np, s.D})});
  return {as_output(ipt, prompts.scalar_type()), weights, z_act, z_mean};
}

// grad_ipt (K, B, Np, D); the forward's inputs; its saved outputs weights, z_act, z_mean;
// output_mask: which of (prompts, tokens, prompt_out) need a gradient.
// -> grad_prompts (K, Np, D), grad_tokens (K, B, T, D) (contiguous, zero outside the token
//    ranges), grad_prompt_out (K, B, Np, D), each in its input's dtype, or an empty tensor when
//    masked out or (prompt_out) None; then grad_w1, grad_b1 (three each, or none when H = 0),
//    grad_w2, grad_b2 (three each), in the parameters' dtypes. Source p's gradients are zero
//    when prompt_out is None.
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>>
dispatch_mlp_backward_cpu(const at::Tensor& grad_ipt, const at::Tensor& prompts,
                          const at::Tensor& tokens, at::IntArrayRef tok_start,
                          at::IntArrayRef tok_end, const std::optional<at::Tensor>& prompt_out,
                          const OptionalTensorList& w1, const OptionalTensorList& b1,
                          at::TensorList w2, at::TensorList b2, const at::Tensor& weights,
                          const at::Tensor& z_act, const at::Tensor& z_mean,
                          std::array<bool, 3> output_mask) {
  const char* op = "dispatch_mlp_backward";
  const DispatchSizes s =
      check_dispatch_inputs(op, prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2);
  const at::ScalarType acc = dispatch_acc_dtype(prompts);
  check_dispatch_saved(op, s, acc, grad_ipt, weights, z_act, z_mean, prompts);
  const auto [need_prompts, need_tokens, need_prompt_out] = output_mask;
  const Mlp f[kNumSources] = {mlp_params(0, w1, b1, w2, b2, acc), mlp_params(1, w1, b1, w2, b2, acc),
                              mlp_params(2, w1, b1, w2, b2, acc)};
  MlpGrads g[kNumSources];

  // Through the mixture and the softmax: dL/dweights, then dL/dlogits (K, B, Np, K).
  const at::Tensor p = to_acc(prompts, acc).view({s.K, s.Np, s.D});
  const at::Tensor grad = to_acc(grad_ipt, acc);
  const at::Tensor w = weights.detach();
  const at::Tensor dw = at::einsum("kbnd,jnd->kbnj", {grad, p});
  const at::Tensor dl = w * (dw - (w * dw).sum(-1, /*keepdim=*/true));

  // Source e: f_e(P[k, n]) enters the logits of every image b.
  const at::Tensor p_rows = p.view({s.K * s.Np, s.D});
  const at::Tensor dx_e = mlp_backward(f[0], p_rows, pre_activations(f[0], p_rows),
                                       dl.sum(1).reshape({s.K * s.Np, s.K}), need_prompts, g[0]);
  at::Tensor grad_prompts = at::empty({0}, prompts.options());
  if (need_prompts) {
    const at::Tensor mixture = at::einsum("kbnj,kbnd->jnd", {w, grad});
    grad_prompts = as_output(mixture + dx_e.view({s.K, s.Np, s.D}), prompts.scalar_type());
  }

  // Source p: one row per (k, b, n).
  at::Tensor grad_prompt_out = at::empty({0}, prompts.options());
  if (s.has_prompt_out) {
    const at::Tensor zp = to_acc(*prompt_out, acc).view({s.K * s.B * s.Np, s.D});
    const at::Tensor dx_p = mlp_backward(f[1], zp, pre_activations(f[1], zp),
                                         dl.reshape({s.K * s.B * s.Np, s.K}), need_prompt_out, g[1]);
    grad_prompt_out = need_prompt_out
                          ? as_output(dx_p.view({s.K, s.B, s.Np, s.D}), prompt_out->scalar_type())
                          : at::empty({0}, prompt_out->options());
  } else {
    g[1] = zero_grads(f[1]);
  }

  // Source z: its mean enters the logits of every prompt n.
  at::Tensor grad_tokens = need_tokens ? at::empty({s.K, s.B, s.T, s.D}, tokens.options()) : at::Tensor();
  z_backward(f[2], tokens.detach(), {tok_start, tok_end}, z_act, z_mean, dl.sum(2), grad_tokens, s,
             acc, g[2]);
  if (!need_tokens) grad_tokens = at::empty({0}, tokens.options());

  std::vector<at::Tensor> grad_w1, grad_b1, grad_w2, grad_b2;
  for (int i = 0; i < kNumSources; ++i) {
    if (s.H > 0) {
      grad_w1.push_back(as_output(g[i].w1, w1.get(i)->scalar_type()));
      grad_b1.push_back(as_output(g[i].b1, b1.get(i)->scalar_type()));
    }
    grad_w2.push_back(as_output(g[i].w2, w2[i].scalar_type()));
    grad_b2.push_back(as_output(g[i].b2, b2[i].scalar_type()));
  }
  return {grad_prompts, grad_tokens, grad_prompt_out, grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace
}  // namespace pmoe_fast

// pmoe_ops.cpp opens the library (TORCH_LIBRARY); these ops join it as a fragment.
TORCH_LIBRARY_FRAGMENT(pmoe_fast, m) {
  m.set_python_module("pmoe_fast.fused_dispatch");
  // z_act and z_mean are saved activations for the backward (see the top of this file);
  // weights is not differentiable.
  m.def(
      "dispatch_mlp(Tensor prompts, Tensor tokens, int[] tok_start, int[] tok_end, "
      "Tensor? prompt_out, Tensor?[] w1, Tensor?[] b1, Tensor[] w2, Tensor[] b2) -> "
      "(Tensor ipt, Tensor weights, Tensor z_act, Tensor z_mean)");
  // output_mask: gradients wanted for (prompts, tokens, prompt_out); a masked-out one, and
  // grad_prompt_out when prompt_out is None, come back as empty tensors (a schema cannot return
  // an optional). grad_w1 and grad_b1 are empty lists when H = 0.
  m.def(
      "dispatch_mlp_backward(Tensor grad_ipt, Tensor prompts, Tensor tokens, int[] tok_start, "
      "int[] tok_end, Tensor? prompt_out, Tensor?[] w1, Tensor?[] b1, Tensor[] w2, Tensor[] b2, "
      "Tensor weights, Tensor z_act, Tensor z_mean, bool[3] output_mask) -> "
      "(Tensor grad_prompts, Tensor grad_tokens, Tensor grad_prompt_out, Tensor[] grad_w1, "
      "Tensor[] grad_b1, Tensor[] grad_w2, Tensor[] grad_b2)");
}

TORCH_LIBRARY_IMPL(pmoe_fast, CPU, m) {
  m.impl("dispatch_mlp", &pmoe_fast::dispatch_mlp_cpu);
  m.impl("dispatch_mlp_backward", &pmoe_fast::dispatch_mlp_backward_cpu);
}
