// CUDA implementations of pmoe_fast::dispatch_mlp and dispatch_mlp_backward (schemas in
// ../dispatch_cpu.cpp; notation and formulas in ../dispatch.h).
//
// Written to be correct by construction and to be read: one tile product (tile_product) over
// shared-memory chunks, whose next chunk loads, coalesced, while this one multiplies, on tensor
// cores for float (mma.sync on bfloat16 parts of each operand, to float's accuracy; sm_80 and
// later: W1's parts are split once a call, bfloat16 tokens copied as they are) and with FMAs for
// double; every reduction in a fixed order, so results are bitwise reproducible on one GPU (the
// atomics, in the forward, launch 1 and launch 3, count arrivals; they order no sum).
// Arithmetic is in the accumulation dtype acc_t (dispatch.h: double for fp64 prompts, float
// otherwise); prompts, parameters and grad_ipt are converted to acc_t up front (small tensors),
// the tokens are read in place through their strides when at::opmath_type of their dtype is
// acc_t, and converted first otherwise (fp64 tokens in a float run, other tokens in an fp64 run:
// fp64 is for checking, not speed). prompt_out is read in the tokens' dtype (contiguous); when its
// own dtype differs, both are converted to acc_t.
//
// Launches, with bytes at K=6, B=8, Np=10, T=197, D=768, H=64 in fp32 (tokens: 29 MB). An image's
// tokens go to C = ceil(longest token range / 64) blocks, 64 at a time (C = 4 here), so that
// the token work has K * B * C blocks (192 here), where one block per image left most SMs idle.
// With float and H > 0 the forward and the backward first split each W1 into its bfloat16 parts
// (split_weights_kernel, one small launch writing 0.6 MB an MLP at H = 64, D = 768).
//  * forward, ONE launch (after zeroing K * B arrival counters), grid K + K*B + K*B*C, block
//    256: block k runs f_e on P[k], once for all of expert k's images; block (k, b) f_p on
//    Z_P[k, b] (with prompt_out); block (k, b, c) computes W1_z Z + b1_z for its 64 tokens in tiles
//    of 32 tokens x 64 units, D in chunks of 32 through shared memory (bf16 tokens: both tiles
//    from each chunk of W1's parts), writes them to z_act and the sum of their gelu to scratch.
//    The last of an image's blocks to finish, whichever it is, takes the mean over the chunks in
//    chunk order, adds the three logits, takes the softmax and mixes the prompts. Reads the tokens
//    once (29 MB) and W1 once per tile of 32 tokens, or of 64 (from L2); writes z_act (2.4 MB) and
//    the small outputs. 0.93 GFLOP.
//  * backward, THREE launches:
//    1. grid K*B*ceil(Np/8): a block takes 8 of an image's prompt rows through the mixture and
//       the softmax backward (a warp per (n, j), lanes along D); the last of an image's blocks
//       sums dL/dlogits over n and forms coef = W2_z^T dl_z / count for its tokens. (Every token
//       block of an image did this for all Np rows, C times over, when launch 2's token blocks
//       were launch 1: at Np = 50 each read all of P, 922 KB, from L2.)
//    2. grid K*B*C + K*Np: block (k, b, c) computes dA = coef * gelu'(z_act) of its 64 tokens,
//       once, into scratch (2.4 MB in all; for float also its bfloat16 parts, 3.6 MB, which the
//       tensor cores' tiles read: at H <= 64, each 32-row tile's once, for all of D's tiles),
//       and dL/dZ = dA W1_z for them; the block of the image's last chunk also does dL/dZ_P.
//       Writes dL/dZ (29 MB). Block (j, n) of the last K*Np owns dL/dP[j, n]: the mixture
//       part, sum_{k,b} weights[k, b, n, j] grad_ipt[k, b, n], and source e's part through f_e.
//    3. grid (tiles + 1, 3 sources, G row groups): a block sums one output tile, a 32 x 64 tile
//       of dL/dW1_s (its column D is dL/db1_s: a constant-1 input) or all of dL/dW2_s and
//       dL/db2_s, over one of G runs of the source's rows; the last of a tile's G blocks adds
//       their partial sums in group order. G gives every SM two of source z's tiles (2 x 13 of
//       them at H = 64, D = 768: G = 11 on 132 SMs), where one block per tile summed all 9456
//       rows. Reads the tokens ceil(H/32) times (58 MB) and dA once per 64-column tile: for
//       float, with bf16 tokens and prompt outputs, the bfloat16 parts launch 2 stored.
//
// The CPU build of this file (tests/cuda_on_cpu) runs these kernels in the test suite.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "launch.cuh"
#include "mma.cuh"
#include "warp_sum.cuh"

namespace pmoe_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// A product tile is kTileRows x kTileCols outputs, reduced kTileK at a time through shared
// memory (tile_product). Its outputs lie as in two rows of warps' tensor-core tiles: warp w owns
// rows 16 * (w / 4) + [0, 16) and columns 16 * (w % 4) + [0, 16), two 16 x 8 tiles of mma_bf16,
// whose layout gives a thread kOutputs = 8 outputs in 2 rows and 4 columns (out_row, out_col).
constexpr int kTileRows = 32;
constexpr int kTileCols = 64;
constexpr int kTileK = 32;
constexpr int kOutputs = kTileRows * kTileCols / kThreads;
// The forward's and the backward's second launch's blocks take an image's tokens this many at a time.
constexpr int kChunkTokens = 2 * kTileRows;
// The backward's first launch takes an image's prompts this many a block.
constexpr int kSoftmaxRows = 8;
// The token ranges of all experts travel in the launch arguments (no host-to-device copy).
constexpr int kMaxExperts = 64;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
// The widest hidden layer: launch 2 walks a chunk's kChunkTokens x padded(H) values of dA with a
// 32-bit index.
constexpr int64_t kMaxHidden = std::numeric_limits<int32_t>::max() / kChunkTokens / 8 * 8;

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

// ---- Device helpers ----------------------------------------------------------------------

__device__ inline float erf_(float x) { return erff(x); }
__device__ inline double erf_(double x) { return erf(x); }
__device__ inline float exp_(float x) { return expf(x); }
__device__ inline double exp_(double x) { return exp(x); }

// Exact (erf) GELU and its derivative, as torch.nn.functional.gelu(approximate="none").
template <typename acc_t>
__device__ acc_t gelu(acc_t a) {
  return acc_t(0.5) * a * (acc_t(1) + erf_(a * acc_t(0.70710678118654752)));
}

template <typename acc_t>
__device__ acc_t gelu_grad(acc_t a) {
  const acc_t cdf = acc_t(0.5) * (acc_t(1) + erf_(a * acc_t(0.70710678118654752)));
  const acc_t pdf = acc_t(0.39894228040143268) * exp_(acc_t(-0.5) * a * a);  // 1 / sqrt(2 pi)
  return cdf + a * pdf;
}

// f's hidden activation, or the identity when f has no hidden layer (H = 0).
template <typename acc_t>
__device__ acc_t activation(acc_t a, bool hidden) {
  return hidden ? gelu(a) : a;
}

__device__ inline int tile_rows(int64_t begin, int64_t end) {
  return static_cast<int>(end - begin < kTileRows ? end - begin : kTileRows);
}

// Token chunk `chunk` of the range [start, end): [first, last), empty past the range's end.
__device__ inline void token_chunk(int64_t start, int64_t end, int64_t chunk, int64_t& first, int64_t& last) {
  first = start + chunk * kChunkTokens < end ? start + chunk * kChunkTokens : end;
  last = first + kChunkTokens < end ? first + kChunkTokens : end;
}

// ---- Kernel arguments --------------------------------------------------------------------

// D and H rounded up to a multiple of 8: the rows of W1's bfloat16 parts (Mlp), whole 16-byte vectors.
__host__ __device__ inline int64_t padded(int64_t n) { return (n + 7) / 8 * 8; }

// One source's f, in acc_t, contiguous.
template <typename acc_t>
struct Mlp {
  const acc_t* w1;  // (H, D); nullptr when H = 0
  const acc_t* b1;  // (H)
  const acc_t* w2;  // (K, Hz)
  const acc_t* b2;  // (K)
  // With float acc_t and H > 0, W1 as its three bfloat16 parts (split_weights_kernel), which the
  // tensor cores' tiles copy as they are: (3, H, padded(D)) and, transposed, (3, D, padded(H)),
  // zero in the padding; nullptr otherwise.
  const uint16_t* w1_parts;
  const uint16_t* w1t_parts;
};

template <typename scalar_t, typename acc_t>
struct Inputs {
  const acc_t* prompts;     // (K, Np, D)
  const scalar_t* tokens;   // (K, B, T, D), strides below, unit stride along D
  int64_t stride_z_k, stride_z_b, stride_z_t;
  const scalar_t* prompt_out;  // (K, B, Np, D), or nullptr
  Mlp<acc_t> f[kNumSources];
  int64_t K, B, Np, T, D, H, Hz;
  int64_t tok_start[kMaxExperts], tok_end[kMaxExperts];

  __device__ const scalar_t* token_row(int64_t k, int64_t b, int64_t t) const {
    return tokens + k * stride_z_k + b * stride_z_b + t * stride_z_t;
  }
};

// Parameter gradients in acc_t, one pointer per source.
template <typename acc_t>
struct ParamGrads {
  acc_t* w1[kNumSources];  // (H, D); unused when H = 0
  acc_t* b1[kNumSources];  // (H)
  acc_t* w2[kNumSources];  // (K, Hz)
  acc_t* b2[kNumSources];  // (K)
};

// Intermediate results the three backward launches hand each other, in acc_t.
template <typename acc_t>
struct Scratch {
  acc_t* dlogits;  // (K, B, Np, K)  dL/dlogits
  acc_t* dl_z;     // (K, B, K)      its sum over n: the gradient of mean_t f_z
  acc_t* coef_z;   // (K, B, Hz)     W2_z^T dl_z / count: dL/d(features) of each token
  acc_t* da_z;     // (K, B, T, H)   coef_z * gelu'(z_act) over each token range, when H > 0
  acc_t* pre_p;    // (K, B, Np, H)  pre-activations of source p
  acc_t* da_p;     // (K, B, Np, H)  their gradient
  acc_t* dl_e;     // (K, Np, K)     sum over b of dL/dlogits: the gradient of f_e
  acc_t* pre_e;    // (K, Np, H)     pre-activations of source e
  acc_t* da_e;     // (K, Np, H)     their gradient
  // With tensor cores, the bfloat16 parts of da_z and da_p (store_parts), zero past H:
  uint16_t* da_z_parts;  // (K, B, T, 3, padded(H))
  uint16_t* da_p_parts;  // (K, B, Np, 3, padded(H))
};

// value's three bfloat16 parts (split_bf16) at out[0], out[part_stride] and out[2 * part_stride].
__device__ inline void store_parts(float value, uint16_t* out, int64_t part_stride) {
  uint16_t parts[3];
  split_bf16(value, parts);
  for (int p = 0; p < 3; ++p) out[p * part_stride] = parts[p];
}

// ---- Tiles ------------------------------------------------------------------------------

// Output i < kOutputs of this thread's part of a tile: row out_row(i), column out_col(i). With
// g = lane / 4 and t = lane % 4, outputs 4j..4j+3 are mma_bf16's d of the warp's 16 x 8 tile j:
// rows g and g + 8, columns 2t and 2t + 1.
__device__ inline int out_row(int i) { return 16 * (threadIdx.x / 128) + threadIdx.x % 32 / 4 + 8 * (i / 2 % 2); }
__device__ inline int out_col(int i) { return 16 * (threadIdx.x / 32 % 4) + 8 * (i / 4) + 2 * (threadIdx.x % 4) + i % 2; }
static_assert(kThreads == 256 && kTileRows == 32 && kTileCols == 64, "out_row, out_col: 8 warps on a 32 x 64 tile");

// Float products run on tensor cores where there are any (mma.cuh): each operand as the sum of
// its bfloat16 parts, every pair of parts whose sum of ranks is at most 2 multiplied (3 products
// for bfloat16 tokens by float weights, 6 for float by float), which leaves out terms below 2^-24
// of the product, as float's own rounding does. Double (the checking dtype) takes FMAs.
template <typename acc_t>
constexpr bool kTensorCores = kTensorCoreArch && std::is_same_v<acc_t, float>;

// n consecutive values, aligned so that a thread reads them from shared memory in one load.
template <typename T, int n>
struct alignas(n * sizeof(T)) Vec {
  T v[n];
};

template <typename acc_t, bool = kTensorCores<acc_t>>
struct Tile {
  // The operands' chunks, transposed: [reduction][row of A or column of B], for FMAs. A thread
  // reads its 2 rows of A one at a time and its columns of B in pairs (one aligned load each).
  acc_t a[kTileK][kTileRows + 4];
  alignas(2 * sizeof(acc_t)) acc_t b[kTileK][kTileCols + 2];
};

template <typename acc_t>
struct Tile<acc_t, true> {
  // The operands' chunks as bfloat16 parts: [part][row of A or column of B][reduction], the
  // layout mma_bf16's fragments take in pairs along the reduction (load_a, load_b). A row of
  // kTileK + 8 halves (20 banks apart) puts the 8 rows of each 8 x 8 matrix that ldmatrix reads on
  // 32 different banks; rows start 16-byte aligned, for ldmatrix and RawChunk's vectors.
  alignas(16) uint16_t a[3][kTileRows][kTileK + 8];
  alignas(16) uint16_t b[3][kTileCols][kTileK + 8];
};

// One operand of a tile product: element (i, r), i a row of A or a column of B and r along the
// reduction, is ptr[i * stride_i + r * stride_r] for i < extent (r < len: the product's), 0 for
// i >= extent; with ones_at >= 0 the elements of i = ones_at are 1 (a constant input, whose
// product is a bias's gradient).
template <typename T>
struct Operand {
  const T* ptr;
  int64_t stride_i, stride_r, extent;
  int64_t ones_at = -1;
};

// Which of an operand's indices is adjacent in memory: consecutive threads load along it.
enum class Along { kReduction, kIndex };

// This thread's elements of an operand's chunks of kN rows of A or columns of B by kTileK along the
// reduction: element e's index is i + e * kStepI and its reduction r + e * kStepR, so that
// consecutive threads load along the operand's adjacent index.
template <int kN, Along kAlong, typename T>
struct OperandChunk {
  static constexpr int kCount = kN * kTileK / kThreads;
  static constexpr int kParts = kBf16Parts<T>;
  template <typename acc_t>
  using Regs = acc_t[kCount];
  static constexpr int kStepI = kAlong == Along::kIndex ? 0 : kThreads / kTileK;
  static constexpr int kStepR = kAlong == Along::kIndex ? kThreads / kN : 0;
  const T* first;               // element 0 at reduction 0 (dereferenced only when in the operand)
  int64_t stride_e, stride_r;   // address steps from an element to the next and along the reduction
  int i, r;                     // element 0's
  int extent, ones_at;          // clamped to the chunk: [0, kN], and -1 when not in it

  __device__ explicit OperandChunk(const Operand<T>& op)
      : stride_e(kStepI * op.stride_i + kStepR * op.stride_r),
        stride_r(op.stride_r),
        i(kAlong == Along::kIndex ? threadIdx.x % kN : threadIdx.x / kTileK),
        r(kAlong == Along::kIndex ? threadIdx.x / kN : threadIdx.x % kTileK),
        extent(static_cast<int>(op.extent < kN ? op.extent : kN)),
        ones_at(static_cast<int>(op.ones_at >= 0 && op.ones_at < kN ? op.ones_at : -1)) {
    first = op.ptr + i * op.stride_i + r * op.stride_r;
  }

  // The chunk's elements at reductions r0 + [0, kTileK), 0 from len on.
  template <typename acc_t>
  __device__ void load(int64_t r0, int64_t len, acc_t (&v)[kCount]) const {
    const int left = static_cast<int>(len - r0 < kTileK ? len - r0 : kTileK);
    const T* p = first + r0 * stride_r;
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      const int ie = i + e * kStepI;
      const bool in = r + e * kStepR < left;
      v[e] = in && ie == ones_at ? acc_t(1) : in && ie < extent ? static_cast<acc_t>(p[e * stride_e]) : acc_t(0);
    }
  }

  template <typename acc_t, int kLd>
  __device__ void store(const acc_t (&v)[kCount], acc_t (&chunk)[kTileK][kLd]) const {
#pragma unroll
    for (int e = 0; e < kCount; ++e) chunk[r + e * kStepR][i + e * kStepI] = v[e];
  }

  // For tensor cores: the kBf16Parts<T> parts of each element (the parts past them are not read).
  template <int kLd>
  __device__ void store(const float (&v)[kCount], uint16_t (&chunk)[3][kN][kLd]) const {
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      uint16_t parts[kBf16Parts<T>];
      split_bf16(v[e], parts);
#pragma unroll
      for (int p = 0; p < kBf16Parts<T>; ++p) chunk[p][i + e * kStepI][r + e * kStepR] = parts[p];
    }
  }
};

// The largest vector, in 16-bit values, that splits kParts x kN x kTileK values evenly over the block.
template <int kN, int kParts>
constexpr int raw_vector() {
  int v = 8;
  while (v > 1 && kParts * kN * kTileK / v % kThreads != 0) v /= 2;
  return v;
}

// For tensor cores: the chunks of an operand already in bfloat16 parts (bfloat16 tokens, 1 part;
// W1's parts in Mlp, 3), copied into shared memory as they are, kVec values along the reduction at
// a time: no conversion, one load and one store a vector. Element (i, r) of part p is
// ptr[p * part_stride + i * stride_i + r]; the vectors start at multiples of kVec along the
// reduction, so ptr must be 2 * kVec bytes aligned, stride_i and part_stride multiples of kVec,
// and the memory readable up to len rounded up to kVec (zeros past len that the product must not
// see, or a len that is a multiple of kVec: raw_chunk_fits).
template <int kN, int kParts_>
struct RawChunk {
  static constexpr int kParts = kParts_;
  static constexpr int kVec = raw_vector<kN, kParts>();
  static constexpr int kRowVectors = kTileK / kVec;
  static constexpr int kCount = kParts * kN * kRowVectors / kThreads;
  static_assert(kVec >= 2 && kCount * kThreads == kParts * kN * kRowVectors && kThreads % kRowVectors == 0);
  using V = Vec<uint32_t, kVec / 2>;  // 32-bit words: what the registers hold
  template <typename>
  using Regs = V[kCount];
  const uint16_t* first[kCount];  // this thread's vectors at reduction 0
  bool in[kCount];                // whether their rows are in the operand (i < extent)
  int r;                          // their reduction offset in the chunk (the same for all)
  int64_t stride_i, extent;       // the operand's, for the chunks of other rows (load(i0, ...))

  // Vector e of this thread: part, then row i, then reduction, as consecutive threads go.
  __device__ static int part(int e) { return (threadIdx.x + e * kThreads) / (kRowVectors * kN); }
  __device__ static int row(int e) { return (threadIdx.x + e * kThreads) / kRowVectors % kN; }

  __device__ RawChunk(const uint16_t* ptr, int64_t stride_i, int64_t part_stride, int64_t extent)
      : r(threadIdx.x % kRowVectors * kVec), stride_i(stride_i), extent(extent) {
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      first[e] = ptr + part(e) * part_stride + row(e) * stride_i + r;
      in[e] = row(e) < extent;
    }
  }

  __device__ void load(int64_t r0, int64_t len, V (&v)[kCount]) const {
    const bool in_r = r0 + r < len;
#pragma unroll
    for (int e = 0; e < kCount; ++e) v[e] = in_r && in[e] ? *reinterpret_cast<const V*>(first[e] + r0) : V{};
  }

  // The same for the chunk of the operand's rows i0 + [0, kN), in 32-bit arithmetic: the caller
  // sees that extent * stride_i fits in an int. A chunk inside the operand loads without masks.
  __device__ void load(int i0, int r0, int len, V (&v)[kCount]) const {
    const int offset = i0 * static_cast<int>(stride_i) + r0, rows = static_cast<int>(extent);
    if (i0 + kN <= rows && r0 + kTileK <= len) {
#pragma unroll
      for (int e = 0; e < kCount; ++e) v[e] = *reinterpret_cast<const V*>(first[e] + offset);
      return;
    }
    const bool in_r = r0 + r < len;
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      v[e] = in_r && i0 + row(e) < rows ? *reinterpret_cast<const V*>(first[e] + offset) : V{};
    }
  }

  template <int kLd>
  __device__ void store(const V (&v)[kCount], uint16_t (&chunk)[3][kN][kLd]) const {
#pragma unroll
    for (int e = 0; e < kCount; ++e) *reinterpret_cast<V*>(&chunk[part(e)][row(e)][r]) = v[e];
  }
};

// Whether a RawChunk<kN, kParts> may read the 16-bit rows at ptr (stride_i apart) over len: aligned
// vectors, none of them past len.
template <int kN, int kParts>
__device__ bool raw_chunk_fits(const void* ptr, int64_t stride_i, int64_t len) {
  constexpr int kVec = RawChunk<kN, kParts>::kVec;
  return reinterpret_cast<uintptr_t>(ptr) % (2 * kVec) == 0 && stride_i % kVec == 0 && len % kVec == 0;
}

// For tensor cores: the chunks of bfloat16 tokens that lie along their index (B of dL/dW1 = dA^T Z:
// the reduction runs over tokens, D is contiguous), copied into shared memory as they are. A
// thread loads kVec consecutive values of the index at two consecutive reductions, one vector
// each, and stores each index's two values as one 32-bit pair, the layout mma_bf16's fragments
// take. Element (i, r) is ptr[i + r * stride_r]; the operand must fill the tile (extent >= kN),
// ptr be 2 * kVec bytes aligned and stride_r a multiple of kVec (pair_chunk_fits).
template <int kN>
struct PairChunk {
  static constexpr int kParts = 1;
  static constexpr int kVec = 4;
  static constexpr int kRowVectors = kN / kVec;
  static_assert(kRowVectors * (kTileK / 2) == kThreads, "one vector pair a thread");
  using V = Vec<uint32_t, kVec / 2>;
  template <typename>
  using Regs = V[2];
  const uint16_t* first[2];  // this thread's two vectors at reduction 0
  int64_t stride_r;
  int i, r;                  // their index and the first one's (even) reduction in the chunk

  __device__ PairChunk(const uint16_t* ptr, int64_t stride_r)
      : stride_r(stride_r), i(threadIdx.x % kRowVectors * kVec), r(threadIdx.x / kRowVectors * 2) {
    first[0] = ptr + r * stride_r + i;
    first[1] = first[0] + stride_r;
  }

  __device__ void load(int64_t r0, int64_t len, V (&v)[2]) const {
#pragma unroll
    for (int q = 0; q < 2; ++q) v[q] = r0 + r + q < len ? *reinterpret_cast<const V*>(first[q] + r0 * stride_r) : V{};
  }

  template <int kLd>
  __device__ void store(const V (&v)[2], uint16_t (&chunk)[3][kN][kLd]) const {
#pragma unroll
    for (int w = 0; w < kVec / 2; ++w) {
      const uint32_t lo = v[0].v[w], hi = v[1].v[w];  // values i + 2w (low halves) and i + 2w + 1
      *reinterpret_cast<uint32_t*>(&chunk[0][i + 2 * w][r]) = (lo & 0xffffu) | (hi << 16);
      *reinterpret_cast<uint32_t*>(&chunk[0][i + 2 * w + 1][r]) = (lo >> 16) | (hi & 0xffff0000u);
    }
  }
};

// Whether a PairChunk<kN> may read the operand at ptr: a full tile, aligned vectors.
template <int kN>
__device__ bool pair_chunk_fits(const void* ptr, int64_t stride_r, int64_t extent) {
  constexpr int kVec = PairChunk<kN>::kVec;
  return reinterpret_cast<uintptr_t>(ptr) % (2 * kVec) == 0 && stride_r % kVec == 0 && extent >= kN;
}

// For tensor cores, dL/dW1's tiles whose operands both lie along their index (dA's parts as A,
// bfloat16 inputs as B): the chunks by reduction step, [part][reduction][row of A or column of B],
// read by load_a<true> and load_b<true> (ldmatrix's .trans). Rows 80 and 144 bytes long: 16-byte
// aligned, and ldmatrix's 8 rows of a matrix on 32 different banks.
struct RowsTile {
  alignas(16) uint16_t a[3][kTileK][kTileRows + 8];
  alignas(16) uint16_t b[1][kTileK][kTileCols + 8];
};
__device__ inline RowsTile& rows_tile() {
  __shared__ RowsTile tile;
  return tile;
}

// For tensor cores: the chunks of an operand in kParts bfloat16 parts that lies along its index,
// copied into a RowsTile as they are, kVec values along the index at a time. Element (i, r) of part
// p is ptr[r * stride_r + p * part_stride + i] for i < extent, 0 past it, whole vectors at a time:
// ptr must be 2 * kVec bytes aligned, stride_r and part_stride multiples of kVec, and the memory
// readable up to extent rounded up to kVec (index_chunk_fits).
template <int kN, int kParts_>
struct IndexChunk {
  static constexpr int kParts = kParts_;
  static constexpr int kVec = raw_vector<kN, kParts>();
  static constexpr int kRowVectors = kN / kVec;
  static constexpr int kCount = kParts * kTileK * kRowVectors / kThreads;
  static_assert(kVec >= 2 && kCount * kThreads == kParts * kTileK * kRowVectors);
  using V = Vec<uint32_t, kVec / 2>;
  template <typename>
  using Regs = V[kCount];
  const uint16_t* first[kCount];  // this thread's vectors at reduction 0
  bool in[kCount];                // whether they are in the operand (index < extent)
  bool whole;                     // whether all of the chunk's indices are (extent >= kN)
  int64_t stride_r;

  // Vector e of this thread: index, then part, then reduction step, as consecutive threads go.
  __device__ static int index(int e) { return (threadIdx.x + e * kThreads) % kRowVectors * kVec; }
  __device__ static int part(int e) { return (threadIdx.x + e * kThreads) / kRowVectors % kParts; }
  __device__ static int step(int e) { return (threadIdx.x + e * kThreads) / (kRowVectors * kParts); }

  __device__ IndexChunk(const uint16_t* ptr, int64_t stride_r, int64_t part_stride, int64_t extent)
      : whole(extent >= kN), stride_r(stride_r) {
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      first[e] = ptr + step(e) * stride_r + part(e) * part_stride + index(e);
      in[e] = index(e) < extent;
    }
  }

  // A chunk inside the operand loads without masks.
  __device__ void load(int64_t r0, int64_t len, V (&v)[kCount]) const {
    if (whole && r0 + kTileK <= len) {
#pragma unroll
      for (int e = 0; e < kCount; ++e) v[e] = *reinterpret_cast<const V*>(first[e] + r0 * stride_r);
      return;
    }
#pragma unroll
    for (int e = 0; e < kCount; ++e) {
      v[e] = r0 + step(e) < len && in[e] ? *reinterpret_cast<const V*>(first[e] + r0 * stride_r) : V{};
    }
  }

  template <int kP, int kLd>
  __device__ void store(const V (&v)[kCount], uint16_t (&chunk)[kP][kTileK][kLd]) const {
#pragma unroll
    for (int e = 0; e < kCount; ++e) *reinterpret_cast<V*>(&chunk[part(e)][step(e)][index(e)]) = v[e];
  }
};

// Whether an IndexChunk<kN, kParts> may read the operand at ptr: aligned vectors.
template <int kN, int kParts>
__device__ bool index_chunk_fits(const void* ptr, int64_t stride_r, int64_t part_stride) {
  constexpr int kVec = IndexChunk<kN, kParts>::kVec;
  return reinterpret_cast<uintptr_t>(ptr) % (2 * kVec) == 0 && stride_r % kVec == 0 && part_stride % kVec == 0;
}

// acc[i] += sum_{r < kTileK} A(out_row(i), r) * B(r, out_col(i)) over one chunk, r in increasing
// order: FMAs (the parts' counts are the tensor cores').
template <int kPartsA, int kPartsB, typename acc_t>
__device__ void multiply_chunk(const Tile<acc_t, false>& sm, acc_t (&acc)[kOutputs]) {
  const int row0 = out_row(0), col0 = out_col(0);  // rows row0 + {0, 8}, columns col0 + {0, 1, 8, 9}
#pragma unroll 8
  for (int r = 0; r < kTileK; ++r) {
    const acc_t a[2] = {sm.a[r][row0], sm.a[r][row0 + 8]};
    const auto b0 = *reinterpret_cast<const Vec<acc_t, 2>*>(&sm.b[r][col0]);
    const auto b1 = *reinterpret_cast<const Vec<acc_t, 2>*>(&sm.b[r][col0 + 8]);
#pragma unroll
    for (int i = 0; i < kOutputs; ++i) acc[i] += a[i / 2 % 2] * (i < 4 ? b0 : b1).v[i % 2];
  }
}

// The same on tensor cores, A and B of kPartsA and kPartsB bfloat16 parts, for kTiles tiles of A
// beside one chunk of B, whose fragments serve them all: tile q's chunk at reduction ka (a
// multiple of 16) of sm_a[q]'s rows, its products into acc[q]. For each 16 of the reduction, each
// of the warp's two 16 x 8 tiles takes the products of parts (pa, pb), pa + pb <= 2, in the order
// of pb, then pa. A warp loads each part's 16 x 16 block of A, and of B, with one ldmatrix
// (load_a, load_b). The operands lie [part][row of A or column of B][reduction] (Tile), or with
// kByReduction [part][reduction][row of A or column of B] (RowsTile).
template <int kPartsA, int kPartsB, bool kByReduction = false, int kTiles, typename SmA, typename SmB>
__device__ void multiply_parts(const SmA* const (&sm_a)[kTiles], int ka, const SmB& sm_b,
                               float* const (&acc)[kTiles]) {
  constexpr int kLdA = std::extent_v<SmA, 2>, kLdB = std::extent_v<SmB, 2>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m0 = 16 * (warp / 4), n0 = 16 * (warp % 4);
#pragma unroll
  for (int k0 = 0; k0 < kTileK; k0 += 16) {
    uint32_t a[kTiles][kPartsA][4];
#pragma unroll
    for (int q = 0; q < kTiles; ++q) {
      const SmA& t = *sm_a[q];
#pragma unroll
      for (int p = 0; p < kPartsA; ++p) {
        load_a<kByReduction>(kByReduction ? &t[p][ka + k0][m0] : &t[p][m0][ka + k0], kLdA, lane, a[q][p]);
      }
    }
#pragma unroll
    for (int pb = 0; pb < kPartsB; ++pb) {
      uint32_t b[2][2];
      load_b<kByReduction>(kByReduction ? &sm_b[pb][k0][n0] : &sm_b[pb][n0][k0], kLdB, lane, b);
#pragma unroll
      for (int q = 0; q < kTiles; ++q) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int pa = 0; pa < kPartsA && pa + pb <= 2; ++pa) mma_bf16(acc[q] + 4 * j, a[q][pa], b[j]);
        }
      }
    }
  }
}

template <int kPartsA, int kPartsB>
__device__ void multiply_chunk(const Tile<float, true>& sm, float (&acc)[kOutputs]) {
  multiply_parts<kPartsA, kPartsB>({&sm.a}, 0, sm.b, {acc});
}

template <int kPartsA, int kPartsB>
__device__ void multiply_chunk(const RowsTile& sm, float (&acc)[kOutputs]) {
  multiply_parts<kPartsA, kPartsB, true>({&sm.a}, 0, sm.b, {acc});
}

// acc[i] += sum_{r < len} A(out_row(i), r) * B(r, out_col(i)) for this thread's outputs of a tile,
// the operands' chunks loaded by a and b (OperandChunk, RawChunk, PairChunk into a Tile,
// IndexChunk into a RowsTile). The next chunk's operands are loaded into registers while this
// one's products run.
template <typename ChunkA, typename ChunkB, typename SmTile, typename acc_t>
__device__ void chunk_product(int64_t len, const ChunkA& a, const ChunkB& b, SmTile& sm, acc_t (&acc)[kOutputs]) {
  typename ChunkA::template Regs<acc_t> next_a;
  typename ChunkB::template Regs<acc_t> next_b;
  a.load(0, len, next_a);
  b.load(0, len, next_b);
  for (int64_t r0 = 0; r0 < len; r0 += kTileK) {
    a.store(next_a, sm.a);
    b.store(next_b, sm.b);
    __syncthreads();
    if (r0 + kTileK < len) {
      a.load(r0 + kTileK, len, next_a);
      b.load(r0 + kTileK, len, next_b);
    }
    multiply_chunk<ChunkA::kParts, ChunkB::kParts>(sm, acc);
    __syncthreads();
  }
}

// The same for two operands in memory; kAlongA and kAlongB say how they lie.
template <Along kAlongA, Along kAlongB, typename acc_t, typename TA, typename TB>
__device__ void tile_product(int64_t len, const Operand<TA>& a_op, const Operand<TB>& b_op, Tile<acc_t>& sm,
                             acc_t (&acc)[kOutputs]) {
  chunk_product(len, OperandChunk<kTileRows, kAlongA, TA>(a_op), OperandChunk<kTileCols, kAlongB, TB>(b_op), sm, acc);
}

// chunk_product_pair's second tile of A, laid out as Tile's a.
struct SecondRows {
  alignas(16) uint16_t a[3][kTileRows][kTileK + 8];
};
__device__ inline SecondRows& second_rows() {
  __shared__ SecondRows rows;
  return rows;
}

// chunk_product for two tiles of A rows, a0 into acc[0] and a1 into acc[1], beside one B: each
// chunk of B is loaded once for both.
template <typename ChunkA, typename ChunkB>
__device__ void chunk_product_pair(int64_t len, const ChunkA& a0, const ChunkA& a1, const ChunkB& b,
                                   Tile<float, true>& sm, float (&acc)[2][kOutputs]) {
  auto& sm_a1 = second_rows().a;
  typename ChunkA::template Regs<float> next_a0, next_a1;
  typename ChunkB::template Regs<float> next_b;
  a0.load(0, len, next_a0);
  a1.load(0, len, next_a1);
  b.load(0, len, next_b);
  for (int64_t r0 = 0; r0 < len; r0 += kTileK) {
    a0.store(next_a0, sm.a);
    a1.store(next_a1, sm_a1);
    b.store(next_b, sm.b);
    __syncthreads();
    if (r0 + kTileK < len) {
      a0.load(r0 + kTileK, len, next_a0);
      a1.load(r0 + kTileK, len, next_a1);
      b.load(r0 + kTileK, len, next_b);
    }
    multiply_parts<ChunkA::kParts, ChunkB::kParts>({&sm.a, &sm_a1}, 0, sm.b, {acc[0], acc[1]});
    __syncthreads();
  }
}

// A by one of W1's bfloat16 parts (Mlp) as B: bfloat16 rows of A that raw_chunk_fits takes copied
// as they are, others converted and split chunk by chunk.
template <typename TA>
__device__ void product_by_parts(int64_t len, const Operand<TA>& a_op, const RawChunk<kTileCols, 3>& b,
                                 Tile<float>& sm, float (&acc)[kOutputs]) {
  if constexpr (std::is_same_v<TA, c10::BFloat16>) {
    if (a_op.stride_r == 1 && raw_chunk_fits<kTileRows, 1>(a_op.ptr, a_op.stride_i, len)) {
      const RawChunk<kTileRows, 1> a(reinterpret_cast<const uint16_t*>(a_op.ptr), a_op.stride_i, 0, a_op.extent);
      chunk_product(len, a, b, sm, acc);
      return;
    }
  }
  chunk_product(len, OperandChunk<kTileRows, Along::kReduction, TA>(a_op), b, sm, acc);
}

// dL/dW1's tile product over len rows of a source's inputs, tokens or prompt outputs: A = dA^T by
// the inputs, both along their index. On tensor cores, bfloat16 inputs that fill the tile's
// columns are copied as they are: with dA's bfloat16 parts (da_parts, row r's part p at
// da_parts[r * 3 * Hp + p * Hp], zero past H; or nullptr) both operands are (IndexChunk),
// otherwise dA is split chunk by chunk beside inputs that pair_chunk_fits takes. Other inputs are
// converted.
template <typename acc_t, typename TB>
__device__ void da_rows_product(int64_t len, const Operand<acc_t>& da_op, const uint16_t* da_parts, int64_t Hp,
                                const Operand<TB>& x_op, Tile<acc_t>& sm, acc_t (&acc)[kOutputs]) {
  if constexpr (kTensorCores<acc_t> && std::is_same_v<TB, c10::BFloat16>) {
    const auto* x = reinterpret_cast<const uint16_t*>(x_op.ptr);
    if (da_parts != nullptr && x_op.extent >= kTileCols && index_chunk_fits<kTileCols, 1>(x, x_op.stride_r, 0)) {
      chunk_product(len, IndexChunk<kTileRows, 3>(da_parts, 3 * Hp, Hp, da_op.extent),
                    IndexChunk<kTileCols, 1>(x, x_op.stride_r, 0, kTileCols), rows_tile(), acc);
      return;
    }
    if (pair_chunk_fits<kTileCols>(x, x_op.stride_r, x_op.extent)) {
      const PairChunk<kTileCols> b(x, x_op.stride_r);
      chunk_product(len, OperandChunk<kTileRows, Along::kIndex, acc_t>(da_op), b, sm, acc);
      return;
    }
  }
  tile_product<Along::kIndex, Along::kIndex>(len, da_op, x_op, sm, acc);
}

// pre[i] += b1[h0 + out_col(i)] for this thread's outputs in a tile's first rows rows and H columns.
template <typename acc_t>
__device__ void add_bias(const Mlp<acc_t>& f, int64_t H, int64_t h0, int rows, acc_t (&pre)[kOutputs]) {
  for (int i = 0; i < kOutputs; ++i) {
    const int64_t h = h0 + out_col(i);
    if (out_row(i) < rows && h < H) pre[i] += f.b1[h];
  }
}

// This thread's pre-activations pre[i] of feature h0 + out_col(i) for row out_row(i) of x (row
// stride stride_x): W1 x + b1, or x itself when H = 0 (f = Linear(D, K): its features are its
// inputs). Zero for rows >= rows and features >= Hz. Every thread of the block must call it.
template <typename x_t, typename acc_t>
__device__ void pre_activation_tile(const x_t* x, int64_t stride_x, int rows, const Mlp<acc_t>& f,
                                    int64_t H, int64_t D, int64_t h0, Tile<acc_t>& sm,
                                    acc_t (&pre)[kOutputs]) {
  for (int i = 0; i < kOutputs; ++i) pre[i] = acc_t(0);
  if (H == 0) {
    for (int i = 0; i < kOutputs; ++i) {
      const int row = out_row(i);
      const int64_t h = h0 + out_col(i);
      if (row < rows && h < D) pre[i] = static_cast<acc_t>(x[row * stride_x + h]);
    }
    return;
  }
  const Operand<x_t> x_op{x, stride_x, 1, rows};
  if constexpr (kTensorCores<acc_t>) {
    const int64_t Dp = padded(D);
    product_by_parts(D, x_op, RawChunk<kTileCols, 3>(f.w1_parts + h0 * Dp, Dp, H * Dp, H - h0), sm, pre);
  } else {
    tile_product<Along::kReduction, Along::kReduction>(D, x_op, Operand<acc_t>{f.w1 + h0 * D, D, 1, H - h0}, sm, pre);
  }
  add_bias(f, H, h0, rows, pre);
}

// pre_activation_tile for x's first rows0 rows into pre[0] and, where they can share W1's chunks
// (tensor cores, bfloat16 rows that raw_chunk_fits takes, rows1 > 0), for the rows1 after them
// into pre[1]: a tile at a time streams all of W1's parts through the block for each tile.
// Returns the number of tiles done, 1 or 2.
template <typename x_t, typename acc_t>
__device__ int pre_activation_tiles(const x_t* x, int64_t stride_x, int rows0, int rows1, const Mlp<acc_t>& f,
                                    int64_t H, int64_t D, int64_t h0, Tile<acc_t>& sm,
                                    acc_t (&pre)[2][kOutputs]) {
  if constexpr (kTensorCores<acc_t> && std::is_same_v<x_t, c10::BFloat16>) {
    if (H > 0 && rows1 > 0 && raw_chunk_fits<kTileRows, 1>(x, stride_x, D)) {
      const int64_t Dp = padded(D);
      const RawChunk<kTileCols, 3> w1(f.w1_parts + h0 * Dp, Dp, H * Dp, H - h0);
      const auto* rows = reinterpret_cast<const uint16_t*>(x);
      const RawChunk<kTileRows, 1> x0(rows, stride_x, 0, rows0), x1(rows + kTileRows * stride_x, stride_x, 0, rows1);
      for (int i = 0; i < kOutputs; ++i) pre[0][i] = pre[1][i] = 0.0f;
      chunk_product_pair(D, x0, x1, w1, sm, pre);
      add_bias(f, H, h0, rows0, pre[0]);
      add_bias(f, H, h0, rows1, pre[1]);
      return 2;
    }
  }
  pre_activation_tile(x, stride_x, rows0, f, H, D, h0, sm, pre[0]);
  return 1;
}

// Stores this thread's outputs of a tile at out (rows ld values apart), those in its first rows
// rows and cols columns. Outputs i and i + 1 (i even) lie side by side in one row: in a whole tile
// whose pairs out and ld leave aligned, each pair goes in one store.
template <typename out_t, typename acc_t>
__device__ void store_tile(const acc_t (&acc)[kOutputs], out_t* out, int64_t ld, int rows, int64_t cols) {
  const bool aligned = ld % 2 == 0 && reinterpret_cast<uintptr_t>(out) % (2 * sizeof(out_t)) == 0;
  if (rows == kTileRows && cols >= kTileCols && aligned) {
    // Output i's place from output 0's: 8 rows down for i / 2 odd, 8 columns on from i = 4.
    out_t* const first = out + out_row(0) * ld + out_col(0);
    const int64_t down = 8 * ld;
#pragma unroll
    for (int i = 0; i < kOutputs; i += 2) {
      *reinterpret_cast<Vec<out_t, 2>*>(first + (i / 2 % 2) * down + 8 * (i / 4)) = {
          {static_cast<out_t>(acc[i]), static_cast<out_t>(acc[i + 1])}};
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kOutputs; ++i) {
    if (out_row(i) < rows && out_col(i) < cols) out[out_row(i) * ld + out_col(i)] = static_cast<out_t>(acc[i]);
  }
}

// input_gradient's widest dA that stays in shared memory for all of D's tiles (the paper's H).
constexpr int kResidentH = 64;

// A row tile's dA parts in shared memory, rows laid out as Tile's: 16-byte aligned, no bank
// conflicts for ldmatrix. One for the block, whichever input_gradient_resident uses it.
struct ResidentParts {
  alignas(16) uint16_t a[3][kTileRows][kResidentH + 8];
};
__device__ inline ResidentParts& resident_parts() {
  __shared__ ResidentParts parts;
  return parts;
}

// input_gradient on tensor cores for H <= kResidentH, in 32-bit arithmetic (D * padded(H) fits in
// an int): a row tile's dA parts are copied into shared memory once and serve every 64-column
// tile of D, while W1's parts stream through sm.b, the next chunk (of this tile, or the next)
// loading while this one multiplies.
template <typename out_t>
__device__ void input_gradient_resident(const uint16_t* da_parts, int64_t r0, int64_t r1, const Mlp<float>& f,
                                        int H, int D, Tile<float, true>& sm, out_t* out) {
  constexpr int kRowVectors = kResidentH / 8;
  ResidentParts& da_tile = resident_parts();
  using V = Vec<uint32_t, 4>;
  const int Hp = static_cast<int>(padded(H));
  const RawChunk<kTileCols, 3> w1(f.w1t_parts, Hp, D * Hp, D);
  typename RawChunk<kTileCols, 3>::template Regs<float> next;
  w1.load(0, 0, H, next);
  for (int64_t row0 = r0; row0 < r1; row0 += kTileRows) {
    const int rows = tile_rows(row0, r1);
    // Row r's parts lie one after another (3 x Hp values): zeros past them, and in the rows past
    // the tile's.
    for (int e = threadIdx.x; e < kTileRows * 3 * kRowVectors; e += kThreads) {
      const int row = e / (3 * kRowVectors), p = e / kRowVectors % 3, c = e % kRowVectors * 8;
      const bool in = row < rows && c < Hp;
      *reinterpret_cast<V*>(&da_tile.a[p][row][c]) =
          in ? *reinterpret_cast<const V*>(da_parts + ((row0 + row) * 3 + p) * Hp + c) : V{};
    }
    for (int d0 = 0; d0 < D; d0 += kTileCols) {
      float acc[kOutputs] = {};
      for (int k0 = 0; k0 < H; k0 += kTileK) {
        w1.store(next, sm.b);
        __syncthreads();
        const bool last_k = k0 + kTileK >= H, last_d = d0 + kTileCols >= D;
        if (!last_k || !last_d || row0 + kTileRows < r1) {
          w1.load(last_k ? (last_d ? 0 : d0 + kTileCols) : d0, last_k ? 0 : k0 + kTileK, H, next);
        }
        multiply_parts<3, 3>({&da_tile.a}, k0, sm.b, {acc});
        __syncthreads();
      }
      store_tile(acc, out + row0 * D + d0, D, rows, D - d0);
    }
  }
}

// out[r] = W1^T da[r] for rows r0 <= r < r1: an MLP's input gradient (D wide) from its dA (H wide),
// row r of each at r times its width. With tensor cores the tiles copy dA's bfloat16 parts instead,
// row r's part p at da_parts[(3 r + p) * padded(H)], zero past H: for H <= kResidentH
// input_gradient_resident, which copies them once a row tile. Every thread of the block must call
// it.
template <typename out_t, typename acc_t>
__device__ void input_gradient(const acc_t* da, const uint16_t* da_parts, int64_t r0, int64_t r1, const Mlp<acc_t>& f,
                               int64_t H, int64_t D, Tile<acc_t>& sm, out_t* out) {
  if constexpr (kTensorCores<acc_t>) {
    if (H <= kResidentH && D * padded(H) <= std::numeric_limits<int>::max()) {
      input_gradient_resident(da_parts, r0, r1, f, static_cast<int>(H), static_cast<int>(D), sm, out);
      return;
    }
  }
  for (int64_t row0 = r0; row0 < r1; row0 += kTileRows) {
    const int rows = tile_rows(row0, r1);
    for (int64_t d0 = 0; d0 < D; d0 += kTileCols) {
      acc_t acc[kOutputs] = {};
      if constexpr (kTensorCores<acc_t>) {
        const int64_t Hp = padded(H);
        chunk_product(H, RawChunk<kTileRows, 3>(da_parts + row0 * 3 * Hp, 3 * Hp, Hp, rows),
                      RawChunk<kTileCols, 3>(f.w1t_parts + d0 * Hp, Hp, D * Hp, D - d0), sm, acc);
      } else {
        tile_product<Along::kReduction, Along::kIndex>(H, Operand<acc_t>{da + row0 * H, H, 1, rows},
                                                       Operand<acc_t>{f.w1 + d0, 1, D, D - d0}, sm, acc);
      }
      store_tile(acc, out + row0 * D + d0, D, rows, D - d0);
    }
  }
}

// ---- Forward -----------------------------------------------------------------------------

// A load past the SM's L1 cache, which is not coherent across SMs: for what other blocks wrote
// during this launch (after last_to_arrive), as CUDA's memory-fence example reads through volatile.
template <typename T>
__device__ T load_from_l2(const T* address) {
  return *static_cast<const volatile T*>(address);
}

// Called by every thread of a block after it wrote its share of a result that `blocks` blocks
// produce together: true in the last of them to get here, which then sees every block's writes.
// *counter must be zero at launch.
__device__ inline bool last_to_arrive(int* counter, int blocks) {
  __shared__ int last;
  __threadfence();  // this thread's writes reach the device before the block counts itself
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == blocks - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// logits[n * K + j] = b2[j] + sum_h W2[j, h] act(pre[n, h]) for the Np rows of x (row stride D):
// f on the prompts P[k] (source e) or on one image's prompt outputs Z_P[k, b] (source p). Every
// thread of the block must call it; the block's own reads of logits later see its writes.
template <typename x_t, typename acc_t>
__device__ void prompt_logits(const x_t* x, const Mlp<acc_t>& f, int64_t K, int64_t Np, int64_t D,
                              int64_t H, int64_t Hz, acc_t* logits, Tile<acc_t>& tile,
                              acc_t (&features)[kTileRows][kTileCols + 1]) {
  acc_t pre[kOutputs];
  for (int64_t idx = threadIdx.x; idx < Np * K; idx += kThreads) logits[idx] = f.b2[idx % K];
  __syncthreads();
  for (int64_t h0 = 0; h0 < Hz; h0 += kTileCols) {
    for (int64_t n0 = 0; n0 < Np; n0 += kTileRows) {
      const int rows = tile_rows(n0, Np);
      pre_activation_tile(x + n0 * D, D, rows, f, H, D, h0, tile, pre);
      for (int i = 0; i < kOutputs; ++i) features[out_row(i)][out_col(i)] = activation(pre[i], H > 0);  // 0 outside
      __syncthreads();
      for (int64_t idx = threadIdx.x; idx < rows * K; idx += kThreads) {
        const int64_t row = idx / K, j = idx % K;
        acc_t sum = 0;
        for (int c = 0; c < kTileCols && h0 + c < Hz; ++c) sum += f.w2[j * Hz + h0 + c] * features[row][c];
        logits[(n0 + row) * K + j] += sum;
      }
      __syncthreads();
    }
  }
}

// The rest of image (k, b), by the last of its blocks to arrive: mean_t gelu(.) over the token
// chunks' sums in chunk order, mean_t f_z = W2_z mean_t gelu(.) + b2_z (the second layer runs
// once, on the mean), the three sources' logits, the softmax and the mixture. Every thread of the
// block must call it.
template <typename scalar_t, typename acc_t>
__device__ void finish_image(const Inputs<scalar_t, acc_t>& in, int64_t k, int64_t b, const acc_t* logits_e,
                             acc_t* ipt_ptr, acc_t* weights_ptr, acc_t* z_mean_ptr, const acc_t* chunk_sums_ptr,
                             int64_t C) {
  __shared__ acc_t logits_z[kMaxExperts];  // mean_t f_z
  const int64_t K = in.K, Np = in.Np, D = in.D, Hz = in.Hz, kb = k * in.B + b;
  const acc_t* chunk_sums = chunk_sums_ptr + kb * C * Hz;
  acc_t* z_mean = z_mean_ptr + kb * Hz;
  for (int64_t h = threadIdx.x; h < Hz; h += kThreads) {
    acc_t total = 0;
    for (int64_t i = 0; i < C; ++i) total += load_from_l2(chunk_sums + i * Hz + h);
    z_mean[h] = total / acc_t(in.tok_end[k] - in.tok_start[k]);
  }
  __syncthreads();
  for (int j = threadIdx.x; j < K; j += kThreads) {
    acc_t s = in.f[2].b2[j];
    for (int64_t h = 0; h < Hz; ++h) s += in.f[2].w2[j * Hz + h] * z_mean[h];
    logits_z[j] = s;
  }
  __syncthreads();

  // Softmax over the K experts of f_e + f_p + mean_t f_z, one thread per row n, subtracting the
  // row max. f_p's logits are in the weights' rows, where the image's f_p block put them.
  acc_t* weights = weights_ptr + kb * Np * K;
  for (int64_t n = threadIdx.x; n < Np; n += kThreads) {
    acc_t* row = weights + n * K;
    acc_t top = 0;
    for (int64_t j = 0; j < K; ++j) {
      acc_t logit = load_from_l2(logits_e + (k * Np + n) * K + j) + logits_z[j];
      if (in.prompt_out) logit += load_from_l2(row + j);
      row[j] = logit;
      top = j == 0 || logit > top ? logit : top;
    }
    acc_t total = 0;
    for (int64_t j = 0; j < K; ++j) {
      row[j] = exp_(row[j] - top);
      total += row[j];
    }
    for (int64_t j = 0; j < K; ++j) row[j] /= total;
  }
  __syncthreads();

  // ipt[n, d] = sum_j weights[n, j] P[j, n, d]; consecutive threads on consecutive d (no 64-bit
  // division by D: a few dozen instructions an element).
  for (int64_t n = 0; n < Np; ++n) {
    for (int64_t d = threadIdx.x; d < D; d += kThreads) {
      acc_t sum = 0;
      for (int64_t j = 0; j < K; ++j) sum += weights[n * K + j] * in.prompts[(j * Np + n) * D + d];
      ipt_ptr[(kb * Np + n) * D + d] = sum;
    }
  }
}

// Grid K + K * B (with prompt_out) + K * B * C, block kThreads, C = ceil(longest token range /
// kChunkTokens). Block k < K computes f_e(P[k]) into logits_e, once for all of expert k's images.
// The next K * B blocks, with prompt_out, compute f_p(Z_P[k, b]) into the weights' rows of (k, b).
// Block (k, b, c) of the rest computes W1_z Z + b1_z for chunk c of expert k's tokens in image b,
// writes them to z_act, and their sum of gelu to chunk_sums. Each counts itself done with the
// images it served (f_e's: every image of expert k), and the last of an image's C + 2 blocks (C + 1
// without prompt_out) to arrive, whichever it is, finishes the image (finish_image).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dispatch_mlp_fwd_kernel(const Inputs<scalar_t, acc_t> in,
                            acc_t* __restrict__ ipt_ptr,         // (K, B, Np, D)
                            acc_t* __restrict__ weights_ptr,     // (K, B, Np, K): f_p's logits, then softmax
                            acc_t* __restrict__ z_act_ptr,       // (K, B, T, H)
                            acc_t* __restrict__ z_mean_ptr,      // (K, B, Hz)
                            acc_t* __restrict__ chunk_sums_ptr,  // (K, B, C, Hz)
                            acc_t* __restrict__ logits_e_ptr,    // (K, Np, K): f_e's logits
                            int* __restrict__ arrivals) {        // (K, B), zero at launch
  __shared__ Tile<acc_t> tile;
  // f_e's and f_p's activated tile, read across columns; source z's sums of each tile position
  __shared__ acc_t features[kTileRows][kTileCols + 1];

  const int64_t K = in.K, B = in.B, Np = in.Np, D = in.D, H = in.H, Hz = in.Hz;
  const int64_t p_blocks = in.prompt_out ? K * B : 0;
  const int64_t C = (gridDim.x - K - p_blocks) / (K * B);
  const int arrivals_per_image = static_cast<int>(C + 1 + (in.prompt_out ? 1 : 0));
  int64_t k, b_lo, b_hi;  // the images this block serves: expert k's [b_lo, b_hi)
  if (blockIdx.x < K + p_blocks) {
    // Source e for every image of expert k (block k), or source p for image (k, b).
    const bool e = blockIdx.x < K;
    const int64_t kb = blockIdx.x - K;
    k = e ? blockIdx.x : kb / B;
    b_lo = e ? 0 : kb % B;
    b_hi = e ? B : b_lo + 1;
    acc_t* logits = e ? logits_e_ptr + k * Np * K : weights_ptr + kb * Np * K;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {  // one call site, which takes fewer registers
      prompt_logits(e ? in.prompts + k * Np * D : in.prompt_out + kb * Np * D, in.f[e ? 0 : 1], K, Np, D, H, Hz,
                    logits, tile, features);
    } else if (e) {
      prompt_logits(in.prompts + k * Np * D, in.f[0], K, Np, D, H, Hz, logits, tile, features);
    } else {
      prompt_logits(in.prompt_out + kb * Np * D, in.f[1], K, Np, D, H, Hz, logits, tile, features);
    }
  } else {
    // Source z: chunk c of image (k, b)'s tokens. z_act outside the token range is zero (chunk 0
    // writes it).
    const int64_t block = blockIdx.x - K - p_blocks;
    const int64_t kb = block / C, chunk = block % C;
    k = kb / B;
    b_lo = kb % B;
    b_hi = b_lo + 1;
    const bool hidden = H > 0;
    acc_t pre[2][kOutputs];
    const int64_t start = in.tok_start[k], end = in.tok_end[k], count = end - start;
    acc_t* z_act = z_act_ptr + kb * in.T * H;
    if (chunk == 0) {
      for (int64_t idx = threadIdx.x; idx < (in.T - count) * H; idx += kThreads) {
        const int64_t t = idx / H;
        z_act[(t < start ? t : t + count) * H + idx % H] = acc_t(0);
      }
    }
    int64_t chunk_start, chunk_end;
    token_chunk(start, end, chunk, chunk_start, chunk_end);
    acc_t* chunk_sums = chunk_sums_ptr + kb * C * Hz;
    for (int64_t h0 = 0; h0 < Hz; h0 += kTileCols) {
      acc_t sum[kOutputs] = {};  // per tile position, over the chunk's token tiles in order
      for (int64_t t0 = chunk_start; t0 < chunk_end;) {
        const int rows[2] = {tile_rows(t0, chunk_end),
                             t0 + kTileRows < chunk_end ? tile_rows(t0 + kTileRows, chunk_end) : 0};
        const int tiles = pre_activation_tiles(in.token_row(k, b_lo, t0), in.stride_z_t, rows[0], rows[1], in.f[2],
                                               H, D, h0, tile, pre);
        for (int q = 0; q < tiles; ++q) {
          for (int i = 0; i < kOutputs; ++i) {
            const int row = out_row(i);
            const int64_t h = h0 + out_col(i);
            if (row < rows[q] && h < Hz) {
              if (hidden) z_act[(t0 + q * kTileRows + row) * H + h] = pre[q][i];
              sum[i] += activation(pre[q][i], hidden);
            }
          }
        }
        t0 += tiles * kTileRows;
      }
      for (int i = 0; i < kOutputs; ++i) features[out_row(i)][out_col(i)] = sum[i];
      __syncthreads();
      if (threadIdx.x < kTileCols && h0 + threadIdx.x < Hz) {
        acc_t total = 0;
        for (int row = 0; row < kTileRows; ++row) total += features[row][threadIdx.x];
        chunk_sums[chunk * Hz + h0 + threadIdx.x] = total;
      }
      __syncthreads();
    }
  }
  for (int64_t b = b_lo; b < b_hi; ++b) {
    if (last_to_arrive(arrivals + k * B + b, arrivals_per_image)) {
      finish_image(in, k, b, logits_e_ptr, ipt_ptr, weights_ptr, z_mean_ptr, chunk_sums_ptr, C);
    }
  }
}

// ---- Backward ----------------------------------------------------------------------------

// Launch 1. Grid K * B * S, block kThreads, S = ceil(Np / kSoftmaxRows): block (k, b, s) takes
// prompts [s * kSoftmaxRows, (s + 1) * kSoftmaxRows) of image (k, b) through the mixture and the
// softmax: dL/dweights[n, j] = <grad_ipt[n, :], P[j, n, :]> (a warp per (n, j), lanes along D),
// then dL/dlogits = w * (dL/dw - <w, dL/dw>) into scratch.dlogits. The last of an image's S blocks
// to arrive sums its dL/dlogits over n in order (source z's logits were shared by the Np rows):
// scratch.dl_z, and scratch.coef_z = W2_z^T dl_z / count, which every token of the image receives.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dispatch_mlp_bwd_softmax_kernel(const Inputs<scalar_t, acc_t> in,
                                    const acc_t* __restrict__ grad_ipt_ptr,  // (K, B, Np, D)
                                    const acc_t* __restrict__ weights_ptr,   // (K, B, Np, K)
                                    const Scratch<acc_t> scratch,
                                    int* __restrict__ arrivals) {  // (K, B), zero at launch
  __shared__ acc_t dw[kSoftmaxRows * kMaxExperts];  // dL/dweights of the block's rows
  const int64_t K = in.K, Np = in.Np, D = in.D, Hz = in.Hz;
  const int64_t tiles = (Np + kSoftmaxRows - 1) / kSoftmaxRows;
  const int64_t kb = blockIdx.x / tiles, n0 = blockIdx.x % tiles * kSoftmaxRows, k = kb / in.B;
  const int64_t rows = Np - n0 < kSoftmaxRows ? Np - n0 : kSoftmaxRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const acc_t* grad = grad_ipt_ptr + (kb * Np + n0) * D;
  const acc_t* w = weights_ptr + (kb * Np + n0) * K;
  acc_t* dl = scratch.dlogits + (kb * Np + n0) * K;

  for (int64_t nj = warp; nj < rows * K; nj += kWarps) {
    const int64_t n = nj / K, j = nj % K;
    acc_t sum = 0;
    for (int64_t d = lane; d < D; d += 32) sum += grad[n * D + d] * in.prompts[(j * Np + n0 + n) * D + d];
    sum = warp_sum(sum);
    if (lane == 0) dw[nj] = sum;
  }
  __syncthreads();
  for (int64_t n = threadIdx.x; n < rows; n += kThreads) {
    acc_t dot = 0;
    for (int64_t j = 0; j < K; ++j) dot += w[n * K + j] * dw[n * K + j];
    for (int64_t j = 0; j < K; ++j) dl[n * K + j] = w[n * K + j] * (dw[n * K + j] - dot);
  }
  if (!last_to_arrive(arrivals + kb, static_cast<int>(tiles))) return;
  __shared__ acc_t dl_z[kMaxExperts];
  const acc_t* image = scratch.dlogits + kb * Np * K;
  for (int64_t j = threadIdx.x; j < K; j += kThreads) {
    acc_t sum = 0;
    for (int64_t n = 0; n < Np; ++n) sum += load_from_l2(image + n * K + j);
    dl_z[j] = sum;
    scratch.dl_z[kb * K + j] = sum;
  }
  __syncthreads();
  const int64_t count = in.tok_end[k] - in.tok_start[k];
  for (int64_t h = threadIdx.x; h < Hz; h += kThreads) {
    acc_t sum = 0;
    for (int64_t j = 0; j < K; ++j) sum += in.f[2].w2[j * Hz + h] * dl_z[j];
    scratch.coef_z[kb * Hz + h] = sum / acc_t(count);
  }
}

// Launch 2, its token blocks: chunk `chunk` of image kb's tokens through f_z with the image's
// coef_z, and the image's last chunk also its prompt outputs through f_p. Every thread of the
// block must call it.
template <typename scalar_t, typename acc_t>
__device__ void token_chunk_backward(const Inputs<scalar_t, acc_t>& in, int64_t kb, int64_t chunk, int64_t C,
                                     const acc_t* z_act_ptr, const Scratch<acc_t>& scratch,
                                     scalar_t* grad_tokens_ptr, acc_t* grad_prompt_out_ptr, Tile<acc_t>& tile) {
  const int64_t k = kb / in.B;
  const int64_t K = in.K, Np = in.Np, T = in.T, D = in.D, H = in.H;
  const acc_t* coef = scratch.coef_z + kb * in.Hz;
  const acc_t* dl = scratch.dlogits + kb * Np * K;
  const int64_t start = in.tok_start[k], end = in.tok_end[k], count = end - start;
  int64_t chunk_start, chunk_end;
  token_chunk(start, end, chunk, chunk_start, chunk_end);
  // dA = coef * gelu'(z_act) of its tokens, once: dL/dZ below and dL/dW1_z (launch 3) read it, and
  // with tensor cores dL/dZ reads its parts.
  const acc_t* da = scratch.da_z + kb * T * H;
  const int64_t Hp = padded(H);
  const uint16_t* da_parts = kTensorCores<acc_t> ? scratch.da_z_parts + kb * T * 3 * Hp : nullptr;
  if (H > 0) {
    const acc_t* z_act = z_act_ptr + kb * T * H;
    const int width = static_cast<int>(kTensorCores<acc_t> ? Hp : H);
    const int elements = static_cast<int>(chunk_end - chunk_start) * width;
    for (int e = threadIdx.x; e < elements; e += kThreads) {  // 32-bit: H <= kMaxHidden (check_cuda_limits)
      const int64_t t = chunk_start + e / width;
      const int h = e % width;
      const acc_t value = h < H ? coef[h] * gelu_grad(z_act[t * H + h]) : acc_t(0);
      if (h < H) scratch.da_z[(kb * T + t) * H + h] = value;
      if constexpr (kTensorCores<acc_t>) store_parts(value, scratch.da_z_parts + (kb * T + t) * 3 * Hp + h, Hp);
    }
    __syncthreads();
  }

  if (grad_tokens_ptr != nullptr) {
    scalar_t* gz = grad_tokens_ptr + kb * T * D;
    if (chunk == 0) {  // zero outside the token range
      for (int64_t idx = threadIdx.x; idx < (T - count) * D; idx += kThreads) {
        const int64_t t = idx / D;
        gz[(t < start ? t : t + count) * D + idx % D] = static_cast<scalar_t>(acc_t(0));
      }
    }
    if (H == 0) {  // f_z = Linear(D, K): every token of the range gets coef
      for (int64_t idx = threadIdx.x; idx < (chunk_end - chunk_start) * D; idx += kThreads) {
        gz[chunk_start * D + idx] = static_cast<scalar_t>(coef[idx % D]);
      }
    } else {  // dL/dZ[t] = W1_z^T dA[t]
      input_gradient(da, da_parts, chunk_start, chunk_end, in.f[2], H, D, tile, gz);
    }
  }

  // Source p: one row per prompt output Z_P[k, b, n], with the gradient dl[n].
  if (in.prompt_out == nullptr || chunk != C - 1) return;
  const scalar_t* x = in.prompt_out + kb * Np * D;
  const Mlp<acc_t>& f = in.f[1];
  acc_t* gzp = grad_prompt_out_ptr != nullptr ? grad_prompt_out_ptr + kb * Np * D : nullptr;
  if (H == 0) {
    if (gzp == nullptr) return;
    for (int64_t idx = threadIdx.x; idx < Np * D; idx += kThreads) {
      const int64_t n = idx / D, d = idx % D;
      acc_t sum = 0;
      for (int64_t j = 0; j < K; ++j) sum += dl[n * K + j] * f.w2[j * D + d];
      gzp[idx] = sum;
    }
    return;
  }
  acc_t* pre_p = scratch.pre_p + kb * Np * H;
  acc_t* da_p = scratch.da_p + kb * Np * H;
  uint16_t* da_p_parts = kTensorCores<acc_t> ? scratch.da_p_parts + kb * Np * 3 * Hp : nullptr;
  acc_t pre[kOutputs];
  for (int64_t h0 = 0; h0 < H; h0 += kTileCols) {
    for (int64_t n0 = 0; n0 < Np; n0 += kTileRows) {
      const int rows = tile_rows(n0, Np);
      pre_activation_tile(x + n0 * D, D, rows, f, H, D, h0, tile, pre);
      for (int i = 0; i < kOutputs; ++i) {
        const int64_t n = n0 + out_row(i), h = h0 + out_col(i);
        if (n - n0 >= rows || h >= Hp) continue;
        acc_t value = 0;  // and the parts' padding, h >= H, zero
        if (h < H) {
          acc_t up = 0;  // (W2_p^T dl[n])[h]
          for (int64_t j = 0; j < K; ++j) up += f.w2[j * H + h] * dl[n * K + j];
          value = up * gelu_grad(pre[i]);
          pre_p[n * H + h] = pre[i];
          da_p[n * H + h] = value;
        }
        if constexpr (kTensorCores<acc_t>) store_parts(value, da_p_parts + n * 3 * Hp + h, Hp);
      }
    }
  }
  __syncthreads();
  if (gzp != nullptr) input_gradient(da_p, da_p_parts, 0, Np, f, H, D, tile, gzp);
}

// Launch 2, its prompt blocks: block (j, n) owns prompt P[j, n]: source e's backward for it, and
// its gradient (the mixture's part plus f_e's). Every thread of the block must call it.
template <typename scalar_t, typename acc_t>
__device__ void prompt_backward(const Inputs<scalar_t, acc_t>& in, int64_t jn, const acc_t* grad_ipt_ptr,
                                const acc_t* weights_ptr, const Scratch<acc_t>& scratch, acc_t* grad_prompts_ptr) {
  __shared__ acc_t dl_e[kMaxExperts];
  const int64_t j = jn / in.Np, n = jn % in.Np;
  const int64_t K = in.K, B = in.B, Np = in.Np, D = in.D, H = in.H;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Mlp<acc_t>& f = in.f[0];
  const acc_t* p = in.prompts + jn * D;

  // f_e(P[j, n]) entered the logits of every image of expert j.
  for (int64_t i = threadIdx.x; i < K; i += kThreads) {
    acc_t sum = 0;
    for (int64_t b = 0; b < B; ++b) sum += scratch.dlogits[((j * B + b) * Np + n) * K + i];
    dl_e[i] = sum;
    scratch.dl_e[jn * K + i] = sum;
  }
  __syncthreads();
  if (H > 0) {  // a warp per hidden unit h
    for (int64_t h = warp; h < H; h += kWarps) {
      acc_t sum = 0;
      for (int64_t d = lane; d < D; d += 32) sum += f.w1[h * D + d] * p[d];
      sum = warp_sum(sum);
      if (lane == 0) {
        const acc_t pre = sum + f.b1[h];
        acc_t up = 0;
        for (int64_t i = 0; i < K; ++i) up += f.w2[i * H + h] * dl_e[i];
        scratch.pre_e[jn * H + h] = pre;
        scratch.da_e[jn * H + h] = up * gelu_grad(pre);
      }
    }
    __syncthreads();
  }
  if (grad_prompts_ptr == nullptr) return;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    acc_t sum = 0;
    for (int64_t kb = 0; kb < K * B; ++kb) {  // the mixture: ipt[k, b, n] used P[j, n]
      sum += weights_ptr[(kb * Np + n) * K + j] * grad_ipt_ptr[(kb * Np + n) * D + d];
    }
    if (H > 0) {
      for (int64_t h = 0; h < H; ++h) sum += f.w1[h * D + d] * scratch.da_e[jn * H + h];
    } else {
      for (int64_t i = 0; i < K; ++i) sum += f.w2[i * D + d] * dl_e[i];
    }
    grad_prompts_ptr[jn * D + d] = sum;
  }
}

// Launch 2. Grid K * B * C + K * Np, block kThreads: the first K * B * C blocks take the images'
// token chunks, C per image as in the forward (token_chunk_backward), the other K * Np one prompt
// each (prompt_backward). Both read what launch 1 left in scratch.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dispatch_mlp_bwd_rows_kernel(const Inputs<scalar_t, acc_t> in, int64_t C,
                                 const acc_t* __restrict__ grad_ipt_ptr,  // (K, B, Np, D)
                                 const acc_t* __restrict__ weights_ptr,   // (K, B, Np, K)
                                 const acc_t* __restrict__ z_act_ptr,     // (K, B, T, H)
                                 const Scratch<acc_t> scratch,
                                 scalar_t* __restrict__ grad_tokens_ptr,      // (K, B, T, D) or null
                                 acc_t* __restrict__ grad_prompt_out_ptr,     // (K, B, Np, D) or null
                                 acc_t* __restrict__ grad_prompts_ptr) {      // (K, Np, D) or null
  __shared__ Tile<acc_t> tile;
  const int64_t token_blocks = in.K * in.B * C;
  if (blockIdx.x < token_blocks) {
    token_chunk_backward(in, blockIdx.x / C, blockIdx.x % C, C, z_act_ptr, scratch, grad_tokens_ptr,
                         grad_prompt_out_ptr, tile);
  } else {
    prompt_backward(in, blockIdx.x - token_blocks, grad_ipt_ptr, weights_ptr, scratch, grad_prompts_ptr);
  }
}

// Where launch 3's blocks leave their partial sums, with G > 1 row groups.
template <typename acc_t>
struct Split {
  acc_t* partial;  // (3 sources, w1_tiles + 1, G, slot): each block's sums, in output order
  int* arrivals;   // (3 sources, w1_tiles + 1): blocks of the output tile done, zero at launch
  int64_t slot;    // max(kTileRows * kTileCols, K * (Hz + 1)): a block's outputs
};

// Launch 3. Grid (H-tiles * (D+1)-tiles + 1, 3 sources, G row groups), block kThreads. Block
// (x, s, g) sums one output tile over group g of source s's rows: the rows split into G runs of
// equal length, each image with its tokens for source z, a prompt row for e and p. Tiles x below
// w1_tiles are 32 x 64 tiles of dL/dW1_s = sum_rows dA[row, h] x[row, d] (column d = D has input
// 1: dL/db1_s); tile w1_tiles is dL/dW2_s and dL/db2_s. With G > 1 each block stores its sums,
// and the last of a tile's G blocks to finish adds them in group order: the result does not
// depend on which block runs when.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dispatch_mlp_bwd_params_kernel(const Inputs<scalar_t, acc_t> in,
                                   const acc_t* __restrict__ z_mean_ptr,  // (K, B, Hz)
                                   const Scratch<acc_t> scratch, const Split<acc_t> split,
                                   const ParamGrads<acc_t> grads) {
  __shared__ Tile<acc_t> tile;
  const int s = blockIdx.y;
  const int64_t K = in.K, B = in.B, Np = in.Np, T = in.T, D = in.D, H = in.H, Hz = in.Hz;
  const bool hidden = H > 0;
  const int64_t d_tiles = (D + 1 + kTileCols - 1) / kTileCols;
  const int64_t w1_tiles = hidden ? (H + kTileRows - 1) / kTileRows * d_tiles : 0;
  const int64_t G = gridDim.z, g = blockIdx.z;
  const int64_t rows = s == 0 ? K * Np : s == 1 ? (in.prompt_out != nullptr ? K * B * Np : 0) : K * B;
  const int64_t per_group = (rows + G - 1) / G;
  const int64_t begin = g * per_group < rows ? g * per_group : rows;
  const int64_t end = begin + per_group < rows ? begin + per_group : rows;
  const int64_t tile_id = s * (w1_tiles + 1) + blockIdx.x;
  acc_t* partial = split.partial + tile_id * G * split.slot;

  if (blockIdx.x < w1_tiles) {
    const int64_t h0 = blockIdx.x / d_tiles * kTileRows, d0 = blockIdx.x % d_tiles * kTileCols;
    acc_t acc[kOutputs] = {};
    const int64_t Hp = padded(H);
    const auto parts = [&](const uint16_t* da_parts, int64_t row) -> const uint16_t* {  // from unit h0
      return kTensorCores<acc_t> && end > begin ? da_parts + row * 3 * Hp + h0 : nullptr;
    };
    if (s == 2) {  // rows (k, b, t) of each image's token range
      for (int64_t kb = begin; kb < end; ++kb) {
        const int64_t k = kb / B, b = kb % B, start = in.tok_start[k];
        const int64_t len = in.tok_end[k] - start;
        da_rows_product(len, Operand<acc_t>{scratch.da_z + (kb * T + start) * H + h0, 1, H, H - h0},
                        parts(scratch.da_z_parts, kb * T + start), Hp,
                        Operand<scalar_t>{in.token_row(k, b, start) + d0, 1, in.stride_z_t, D - d0, D - d0}, tile,
                        acc);
      }
    } else if (s == 1) {  // rows (k, b, n) of Z_P
      da_rows_product(end - begin, Operand<acc_t>{scratch.da_p + begin * H + h0, 1, H, H - h0},
                      parts(scratch.da_p_parts, begin), Hp,
                      Operand<scalar_t>{in.prompt_out + begin * D + d0, 1, D, D - d0, D - d0}, tile, acc);
    } else {  // rows (k, n) of P, whose dA launch 2 keeps in floats only
      da_rows_product(end - begin, Operand<acc_t>{scratch.da_e + begin * H + h0, 1, H, H - h0}, nullptr, Hp,
                      Operand<acc_t>{in.prompts + begin * D + d0, 1, D, D - d0, D - d0}, tile, acc);
    }
    // A block's partial sums go to its slot in thread order: output i of thread t at t + i * kThreads.
    const auto store = [&](int i, acc_t value) {
      const int64_t h = h0 + out_row(i), d = d0 + out_col(i);
      if (h < H && d < D) grads.w1[s][h * D + d] = value;
      if (h < H && d == D) grads.b1[s][h] = value;
    };
    if (G == 1) {
      for (int i = 0; i < kOutputs; ++i) store(i, acc[i]);
      return;
    }
    for (int i = 0; i < kOutputs; ++i) partial[g * split.slot + threadIdx.x + i * kThreads] = acc[i];
    if (!last_to_arrive(split.arrivals + tile_id, static_cast<int>(G))) return;
    for (int i = 0; i < kOutputs; ++i) {
      acc_t total = 0;
      for (int64_t j = 0; j < G; ++j) total += load_from_l2(partial + j * split.slot + threadIdx.x + i * kThreads);
      store(i, total);
    }
    return;
  }

  // dL/dW2_s[j, h] = sum_rows dl[row, j] * features[row, h]; column h = Hz (input 1) is dL/db2_s.
  // Features: act(pre) of e and p, or their inputs when H = 0; z_mean for z. A thread takes one
  // feature column h for kW2Experts experts at a time over one of kW2Slices interleaved runs of
  // the group's rows, computing each feature once for them (column 0's threads also sum dl for
  // the bias); the slices' sums are then added in slice order. (A thread per output, over all the
  // rows, recomputed each GELU for every expert: K * (H + 1) / kThreads outputs a thread, each a
  // chain over all the group's rows, 873 of them at K = 6, B = 32, Np = 50 for source p.)
  constexpr int kW2Cols = 64, kW2Slices = kThreads / kW2Cols, kW2Experts = 8;
  __shared__ acc_t slice_sums[kW2Slices][kW2Experts][kW2Cols + 1];  // column kW2Cols: the bias's
  const acc_t* dl = s == 0 ? scratch.dl_e : s == 1 ? scratch.dlogits : scratch.dl_z;
  const acc_t* pre = s == 0 ? scratch.pre_e : s == 1 ? scratch.pre_p : nullptr;
  const auto input = [&](int64_t r, int64_t h) {  // f's input h of row r, when H = 0
    return s == 0 ? in.prompts[r * D + h] : static_cast<acc_t>(in.prompt_out[r * D + h]);
  };
  const int64_t outputs = K * (Hz + 1);
  const auto store = [&](int64_t o, acc_t value) {
    const int64_t j = o / (Hz + 1), h = o % (Hz + 1);
    if (h < Hz) {
      grads.w2[s][j * Hz + h] = value;
    } else {
      grads.b2[s][j] = value;
    }
  };
  const int lane = threadIdx.x % kW2Cols, slice = threadIdx.x / kW2Cols;
  for (int64_t j0 = 0; j0 < K; j0 += kW2Experts) {
    for (int64_t c0 = 0; c0 < Hz; c0 += kW2Cols) {
      const int64_t h = c0 + lane;
      acc_t sum[kW2Experts] = {}, bias[kW2Experts] = {};
      for (int64_t r = begin + slice; r < end; r += kW2Slices) {
        acc_t feature = 0;
        if (h < Hz) feature = s == 2 ? z_mean_ptr[r * Hz + h] : hidden ? gelu(pre[r * H + h]) : input(r, h);
#pragma unroll
        for (int e = 0; e < kW2Experts; ++e) {
          const acc_t d = j0 + e < K ? dl[r * K + j0 + e] : acc_t(0);
          sum[e] += d * feature;
          bias[e] += d;
        }
      }
      for (int e = 0; e < kW2Experts; ++e) {
        slice_sums[slice][e][lane] = sum[e];
        if (lane == 0) slice_sums[slice][e][kW2Cols] = bias[e];
      }
      __syncthreads();
      // This step's outputs: experts j0 + e, columns c0 + c (c < kW2Cols) and, once, the bias's.
      for (int idx = threadIdx.x; idx < kW2Experts * (kW2Cols + 1); idx += kThreads) {
        const int e = idx / (kW2Cols + 1), c = idx % (kW2Cols + 1);
        const int64_t j = j0 + e, column = c < kW2Cols ? c0 + c : Hz;
        if (j >= K || (c < kW2Cols && column >= Hz) || (c == kW2Cols && c0 != 0)) continue;
        acc_t total = 0;
        for (int sl = 0; sl < kW2Slices; ++sl) total += slice_sums[sl][e][c];
        const int64_t o = j * (Hz + 1) + column;
        if (G == 1) {
          store(o, total);
        } else {
          partial[g * split.slot + o] = total;
        }
      }
      __syncthreads();
    }
  }
  if (G == 1 || !last_to_arrive(split.arrivals + tile_id, static_cast<int>(G))) return;
  for (int64_t o = threadIdx.x; o < outputs; o += kThreads) {
    acc_t total = 0;
    for (int64_t j = 0; j < G; ++j) total += load_from_l2(partial + j * split.slot + o);
    store(o, total);
  }
}

// ---- W1's bfloat16 parts -----------------------------------------------------------------

// The W1 of up to kNumSources MLPs, and where split_weights_kernel writes their parts.
struct WeightParts {
  const float* w1[kNumSources];     // (H, D)
  uint16_t* parts[kNumSources];     // (3, H, padded(D)): Mlp::w1_parts
  uint16_t* parts_t[kNumSources];   // (3, D, padded(H)): Mlp::w1t_parts
};

// Grid (ceil(n / kThreads), MLPs), n = H * padded(D) + D * padded(H), block kThreads: W1 of MLP
// blockIdx.y as its three bfloat16 parts (store_parts) in both layouts, zero in the padding.
__global__ void __launch_bounds__(kThreads) split_weights_kernel(const WeightParts wp, int64_t H, int64_t D) {
  const int m = blockIdx.y;
  const int64_t Dp = padded(D), Hp = padded(H);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= H * Dp + D * Hp) return;
  const bool transposed = idx >= H * Dp;
  const int64_t j = transposed ? idx - H * Dp : idx, plane = transposed ? D * Hp : H * Dp;
  const int64_t h = transposed ? j % Hp : j / Dp, d = transposed ? j / Hp : j % Dp;
  store_parts(h < H && d < D ? wp.w1[m][h * D + d] : 0.0f, (transposed ? wp.parts_t[m] : wp.parts[m]) + j, plane);
}

// ---- Host side ---------------------------------------------------------------------------

void check_cuda_limits(const char* op, const DispatchSizes& s) {
  TORCH_CHECK(s.K <= kMaxExperts, op, ": the CUDA kernels take at most ", kMaxExperts,
              " experts, got K = ", s.K);
  TORCH_CHECK(s.K * s.B <= kMaxGridX && s.K * s.Np <= kMaxGridX, op,
              ": problem too large for the CUDA launch grid (K * B = ", s.K * s.B, ")");
  TORCH_CHECK(s.H <= kMaxHidden, op, ": the CUDA kernels take a hidden width of at most ", kMaxHidden,
              ", got H = ", s.H, "; use the cpp or torch backend");
}

// The forward's and launch 1's token chunks per image: enough for the longest token range.
int64_t token_chunks(at::IntArrayRef tok_start, at::IntArrayRef tok_end) {
  int64_t longest = 1;
  for (size_t k = 0; k < tok_start.size(); ++k) longest = std::max(longest, tok_end[k] - tok_start[k]);
  return (longest + kChunkTokens - 1) / kChunkTokens;
}

// The inputs as the kernels read them, kept alive until the launches are queued.
struct KernelTensors {
  at::Tensor prompts, tokens, prompt_out;  // prompts: acc, contiguous; tokens: strided; prompt_out: tokens' dtype, contiguous
  at::Tensor w1[kNumSources], b1[kNumSources], w2[kNumSources], b2[kNumSources];
};

at::Tensor to_acc(const at::Tensor& t, at::ScalarType acc) { return t.to(acc).contiguous(); }

KernelTensors kernel_tensors(at::ScalarType acc, const at::Tensor& prompts, const at::Tensor& tokens,
                             const std::optional<at::Tensor>& prompt_out,
                             const OptionalTensorList& w1, const OptionalTensorList& b1,
                             at::TensorList w2, at::TensorList b2) {
  KernelTensors kt;
  kt.prompts = to_acc(prompts, acc);
  // The kernels compute in at::opmath_type of the tokens' dtype, which must be acc, and read
  // prompt_out in the tokens' dtype.
  const bool tokens_fp64 = tokens.scalar_type() == at::kDouble;
  const bool same_dtypes = !prompt_out.has_value() || prompt_out->scalar_type() == tokens.scalar_type();
  kt.tokens = tokens_fp64 == (acc == at::kDouble) && same_dtypes ? tokens : tokens.to(acc);
  if (prompt_out.has_value()) kt.prompt_out = prompt_out->to(kt.tokens.scalar_type()).contiguous();
  for (int s = 0; s < kNumSources; ++s) {
    const std::optional<at::Tensor> w = w1.get(s), b = b1.get(s);
    if (w.has_value()) {
      kt.w1[s] = to_acc(*w, acc);
      kt.b1[s] = to_acc(*b, acc);
    }
    kt.w2[s] = to_acc(w2[s], acc);
    kt.b2[s] = to_acc(b2[s], acc);
  }
  return kt;
}

template <typename acc_t>
const acc_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<acc_t>() : nullptr;
}

template <typename scalar_t, typename acc_t>
Inputs<scalar_t, acc_t> kernel_inputs(const KernelTensors& kt, const DispatchSizes& s,
                                      at::IntArrayRef tok_start, at::IntArrayRef tok_end) {
  Inputs<scalar_t, acc_t> in{};
  in.prompts = kt.prompts.const_data_ptr<acc_t>();
  in.tokens = kt.tokens.const_data_ptr<scalar_t>();
  in.stride_z_k = kt.tokens.stride(0);
  in.stride_z_b = kt.tokens.stride(1);
  in.stride_z_t = kt.tokens.stride(2);
  in.prompt_out = ptr_or_null<scalar_t>(kt.prompt_out);
  for (int i = 0; i < kNumSources; ++i) {
    in.f[i] = {ptr_or_null<acc_t>(kt.w1[i]), ptr_or_null<acc_t>(kt.b1[i]),
               kt.w2[i].const_data_ptr<acc_t>(), kt.b2[i].const_data_ptr<acc_t>(), nullptr, nullptr};
  }
  in.K = s.K, in.B = s.B, in.Np = s.Np, in.T = s.T, in.D = s.D, in.H = s.H, in.Hz = s.features();
  for (int64_t k = 0; k < s.K; ++k) {
    in.tok_start[k] = tok_start[k];
    in.tok_end[k] = tok_end[k];
  }
  return in;
}

// For float kernels with H > 0: W1's parts (Mlp::w1_parts, w1t_parts) for the tensor cores' tiles,
// in one launch, the sources that share W1 sharing them. The returned tensor holds them.
template <typename scalar_t, typename acc_t>
at::Tensor split_weights(const KernelTensors& kt, const DispatchSizes& s, cudaStream_t stream,
                         Inputs<scalar_t, acc_t>& in) {
  if (!std::is_same_v<acc_t, float> || s.H == 0) return at::Tensor();
  const int64_t plane = s.H * padded(s.D), plane_t = s.D * padded(s.H);
  const int64_t per_mlp = kBf16Parts<float> * (plane + plane_t);
  int mlp_of[kNumSources], mlps = 0;
  const float* w1[kNumSources];
  for (int i = 0; i < kNumSources; ++i) {
    const float* w = kt.w1[i].const_data_ptr<float>();
    mlp_of[i] = static_cast<int>(std::find(w1, w1 + mlps, w) - w1);
    if (mlp_of[i] == mlps) w1[mlps++] = w;
  }
  at::Tensor parts = at::empty({mlps * per_mlp}, kt.w1[0].options().dtype(at::kBFloat16));
  auto* base = reinterpret_cast<uint16_t*>(parts.mutable_data_ptr<at::BFloat16>());
  WeightParts wp{};
  for (int m = 0; m < mlps; ++m) {
    wp.w1[m] = w1[m];
    wp.parts[m] = base + m * per_mlp;
    wp.parts_t[m] = wp.parts[m] + kBf16Parts<float> * plane;
  }
  for (int i = 0; i < kNumSources; ++i) {
    in.f[i].w1_parts = wp.parts[mlp_of[i]];
    in.f[i].w1t_parts = wp.parts_t[mlp_of[i]];
  }
  launch(split_weights_kernel, dim3(static_cast<unsigned>((plane + plane_t + kThreads - 1) / kThreads), mlps),
         kThreads, stream, wp, s.H, s.D);
  return parts;
}

// Same contract as dispatch_mlp_cpu (dispatch_cpu.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_mlp_cuda(
    const at::Tensor& prompts, const at::Tensor& tokens, at::IntArrayRef tok_start,
    at::IntArrayRef tok_end, const std::optional<at::Tensor>& prompt_out,
    const OptionalTensorList& w1, const OptionalTensorList& b1, at::TensorList w2,
    at::TensorList b2) {
  const char* op = "dispatch_mlp";
  const DispatchSizes s =
      check_dispatch_inputs(op, prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2);
  check_cuda_limits(op, s);
  const DeviceGuard guard(prompts.device());
  const at::ScalarType acc = dispatch_acc_dtype(prompts);
  const KernelTensors kt = kernel_tensors(acc, prompts, tokens, prompt_out, w1, b1, w2, b2);
  const at::TensorOptions options = prompts.options().dtype(acc);
  at::Tensor ipt = at::empty({s.K, s.B, s.Np, s.D}, options);
  at::Tensor weights = at::empty({s.K, s.B, s.Np, s.K}, options);
  at::Tensor z_act = at::empty({s.K, s.B, s.T, s.H}, options);
  at::Tensor z_mean = at::empty({s.K, s.B, s.features()}, options);
  const int64_t chunks = token_chunks(tok_start, tok_end);
  const int64_t blocks = s.K + s.K * s.B * (chunks + (s.has_prompt_out ? 1 : 0));
  TORCH_CHECK(blocks <= kMaxGridX, op, ": problem too large for the CUDA launch grid (K * B = ", s.K * s.B,
              " images of ", chunks, " token chunks)");
  const at::Tensor chunk_sums = at::empty({s.K, s.B, chunks, s.features()}, options);
  const at::Tensor logits_e = at::empty({s.K, s.Np, s.K}, options);
  const at::Tensor arrivals = at::zeros({s.K, s.B}, prompts.options().dtype(at::kInt));
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kt.tokens.scalar_type(), "dispatch_mlp_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Inputs<scalar_t, acc_t> in = kernel_inputs<scalar_t, acc_t>(kt, s, tok_start, tok_end);
    const at::Tensor w1_parts = split_weights(kt, s, stream, in);
    launch(dispatch_mlp_fwd_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(blocks)), kThreads, stream, in,
           ipt.mutable_data_ptr<acc_t>(), weights.mutable_data_ptr<acc_t>(), z_act.mutable_data_ptr<acc_t>(),
           z_mean.mutable_data_ptr<acc_t>(), chunk_sums.mutable_data_ptr<acc_t>(),
           logits_e.mutable_data_ptr<acc_t>(), arrivals.mutable_data_ptr<int>());
  });
  // ipt is accumulated in acc; prompts in another dtype cost one conversion kernel here.
  return {ipt.to(prompts.scalar_type()), weights, z_act, z_mean};
}

// Same contract as dispatch_mlp_backward_cpu (dispatch_cpu.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>>
dispatch_mlp_backward_cuda(const at::Tensor& grad_ipt, const at::Tensor& prompts,
                           const at::Tensor& tokens, at::IntArrayRef tok_start,
                           at::IntArrayRef tok_end, const std::optional<at::Tensor>& prompt_out,
                           const OptionalTensorList& w1, const OptionalTensorList& b1,
                           at::TensorList w2, at::TensorList b2, const at::Tensor& weights,
                           const at::Tensor& z_act, const at::Tensor& z_mean,
                           std::array<bool, 3> output_mask) {
  const char* op = "dispatch_mlp_backward";
  const DispatchSizes s =
      check_dispatch_inputs(op, prompts, tokens, tok_start, tok_end, prompt_out, w1, b1, w2, b2);
  check_cuda_limits(op, s);
  const at::ScalarType acc = dispatch_acc_dtype(prompts);
  check_dispatch_saved(op, s, acc, grad_ipt, weights, z_act, z_mean, prompts);
  const DeviceGuard guard(prompts.device());
  const auto [need_prompts, need_tokens, need_prompt_out] = output_mask;
  const KernelTensors kt = kernel_tensors(acc, prompts, tokens, prompt_out, w1, b1, w2, b2);
  const at::Tensor grad = to_acc(grad_ipt, acc);
  const at::Tensor w = weights.contiguous(), a = z_act.contiguous(), m = z_mean.contiguous();
  const int64_t Hz = s.features();
  const at::TensorOptions options = prompts.options().dtype(acc);

  const at::Tensor dlogits = at::empty({s.K, s.B, s.Np, s.K}, options);
  const at::Tensor dl_z = at::empty({s.K, s.B, s.K}, options);
  const at::Tensor coef_z = at::empty({s.K, s.B, Hz}, options);
  const int64_t chunks = token_chunks(tok_start, tok_end);
  const int64_t softmax_blocks = s.K * s.B * ((s.Np + kSoftmaxRows - 1) / kSoftmaxRows);
  TORCH_CHECK(softmax_blocks <= kMaxGridX && s.K * s.B * chunks + s.K * s.Np <= kMaxGridX, op,
              ": problem too large for the CUDA launch grid (K * B = ", s.K * s.B, " images of ", chunks,
              " token chunks, Np = ", s.Np, ")");
  const at::Tensor image_arrivals = at::zeros({s.K, s.B}, prompts.options().dtype(at::kInt));
  const at::Tensor da_z = at::empty({s.H > 0 ? s.K * s.B * s.T * s.H : 0}, options);
  const at::Tensor pre_p = at::empty({s.K, s.B, s.Np, s.H}, options);
  const at::Tensor da_p = at::empty({s.K, s.B, s.Np, s.H}, options);
  const at::Tensor dl_e = at::empty({s.K, s.Np, s.K}, options);
  const at::Tensor pre_e = at::empty({s.K, s.Np, s.H}, options);
  const at::Tensor da_e = at::empty({s.K, s.Np, s.H}, options);
  const bool float_parts = acc == at::kFloat && s.H > 0;  // what the kernels' tensor cores read, if any
  const at::Tensor da_z_parts =
      at::empty({float_parts ? s.K * s.B * s.T * 3 * padded(s.H) : 0}, options.dtype(at::kBFloat16));
  const at::Tensor da_p_parts = at::empty({float_parts && s.has_prompt_out ? s.K * s.B * s.Np * 3 * padded(s.H) : 0},
                                          options.dtype(at::kBFloat16));
  // dL/dZ in the dtype the kernels read the tokens in; outputs are converted at the end.
  at::Tensor grad_tokens = need_tokens ? at::empty({s.K, s.B, s.T, s.D}, kt.tokens.options()) : at::Tensor();
  at::Tensor grad_prompts = need_prompts ? at::empty({s.K, s.Np, s.D}, options) : at::Tensor();
  at::Tensor grad_prompt_out =
      s.has_prompt_out && need_prompt_out ? at::empty({s.K, s.B, s.Np, s.D}, options) : at::Tensor();
  std::vector<at::Tensor> gw1, gb1, gw2, gb2;
  for (int i = 0; i < kNumSources; ++i) {
    if (s.H > 0) {
      gw1.push_back(at::empty({s.H, s.D}, options));
      gb1.push_back(at::empty({s.H}, options));
    }
    gw2.push_back(at::empty({s.K, Hz}, options));
    gb2.push_back(at::empty({s.K}, options));
  }

  const int64_t d_tiles = (s.D + 1 + kTileCols - 1) / kTileCols;
  const int64_t w1_tiles = s.H > 0 ? (s.H + kTileRows - 1) / kTileRows * d_tiles : 0;
  TORCH_CHECK(w1_tiles + 1 <= kMaxGridX, op, ": problem too large for the CUDA launch grid");
  // Launch 3's row groups: enough to give every SM two blocks of source z's dL/dW1 tiles (of
  // dL/dW2 when H = 0), at most one image each. At most 2 x SMs, within gridDim.z's 65535.
  const int64_t sms = multiprocessor_count();
  const int64_t groups = std::min(s.K * s.B, std::max<int64_t>(1, (2 * sms + std::max<int64_t>(w1_tiles, 1) - 1) /
                                                                  std::max<int64_t>(w1_tiles, 1)));
  const int64_t tiles = kNumSources * (w1_tiles + 1);
  const int64_t slot = std::max<int64_t>(kTileRows * kTileCols, s.K * (Hz + 1));
  const at::Tensor partial = at::empty({groups > 1 ? tiles * groups * slot : 0}, options);
  const at::Tensor arrivals = at::zeros({groups > 1 ? tiles : 0}, prompts.options().dtype(at::kInt));
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kt.tokens.scalar_type(), "dispatch_mlp_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Inputs<scalar_t, acc_t> in = kernel_inputs<scalar_t, acc_t>(kt, s, tok_start, tok_end);
    const at::Tensor w1_parts = split_weights(kt, s, stream, in);
    const Scratch<acc_t> scratch{
        dlogits.mutable_data_ptr<acc_t>(), dl_z.mutable_data_ptr<acc_t>(),
        coef_z.mutable_data_ptr<acc_t>(),  da_z.mutable_data_ptr<acc_t>(),
        pre_p.mutable_data_ptr<acc_t>(),   da_p.mutable_data_ptr<acc_t>(),
        dl_e.mutable_data_ptr<acc_t>(),    pre_e.mutable_data_ptr<acc_t>(),
        da_e.mutable_data_ptr<acc_t>(),    reinterpret_cast<uint16_t*>(da_z_parts.mutable_data_ptr<at::BFloat16>()),
        reinterpret_cast<uint16_t*>(da_p_parts.mutable_data_ptr<at::BFloat16>())};
    const Split<acc_t> split{partial.mutable_data_ptr<acc_t>(), arrivals.mutable_data_ptr<int>(), slot};
    ParamGrads<acc_t> param_grads{};
    for (int i = 0; i < kNumSources; ++i) {
      if (s.H > 0) {
        param_grads.w1[i] = gw1[i].mutable_data_ptr<acc_t>();
        param_grads.b1[i] = gb1[i].mutable_data_ptr<acc_t>();
      }
      param_grads.w2[i] = gw2[i].mutable_data_ptr<acc_t>();
      param_grads.b2[i] = gb2[i].mutable_data_ptr<acc_t>();
    }
    launch(dispatch_mlp_bwd_softmax_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(softmax_blocks)), kThreads,
           stream, in, grad.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), scratch,
           image_arrivals.mutable_data_ptr<int>());
    launch(dispatch_mlp_bwd_rows_kernel<scalar_t, acc_t>, dim3(static_cast<unsigned>(s.K * s.B * chunks + s.K * s.Np)),
           kThreads, stream, in, chunks, grad.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
           a.const_data_ptr<acc_t>(), scratch,
           grad_tokens.defined() ? grad_tokens.mutable_data_ptr<scalar_t>() : nullptr,
           grad_prompt_out.defined() ? grad_prompt_out.mutable_data_ptr<acc_t>() : nullptr,
           grad_prompts.defined() ? grad_prompts.mutable_data_ptr<acc_t>() : nullptr);
    launch(dispatch_mlp_bwd_params_kernel<scalar_t, acc_t>,
           dim3(static_cast<unsigned>(w1_tiles + 1), kNumSources, static_cast<unsigned>(groups)), kThreads, stream, in,
           m.const_data_ptr<acc_t>(), scratch, split, param_grads);
  });

  // Outputs in their inputs' dtypes (no-ops when those are the accumulation dtype).
  grad_prompts = need_prompts ? grad_prompts.to(prompts.scalar_type()) : at::empty({0}, prompts.options());
  grad_tokens = need_tokens ? grad_tokens.to(tokens.scalar_type()) : at::empty({0}, tokens.options());
  if (!s.has_prompt_out) {
    grad_prompt_out = at::empty({0}, prompts.options());
  } else {
    grad_prompt_out = need_prompt_out ? grad_prompt_out.to(prompt_out->scalar_type())
                                      : at::empty({0}, prompt_out->options());
  }
  for (int i = 0; i < kNumSources; ++i) {
    if (s.H > 0) {
      gw1[i] = gw1[i].to(w1.get(i)->scalar_type());
      gb1[i] = gb1[i].to(b1.get(i)->scalar_type());
    }
    gw2[i] = gw2[i].to(w2[i].scalar_type());
    gb2[i] = gb2[i].to(b2[i].scalar_type());
  }
  return {grad_prompts, grad_tokens, grad_prompt_out, gw1, gb1, gw2, gb2};
}

}  // namespace
}  // namespace pmoe_fast

#ifndef PMOE_CUDA_ON_CPU
TORCH_LIBRARY_IMPL(pmoe_fast, CUDA, m) {
  m.impl("dispatch_mlp", &pmoe_fast::dispatch_mlp_cuda);
  m.impl("dispatch_mlp_backward", &pmoe_fast::dispatch_mlp_backward_cuda);
}
#endif
