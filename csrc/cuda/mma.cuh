// Tensor-core arithmetic for csrc/cuda's float tiles: bfloat16 parts of float values, the warp-wide
// ldmatrix that loads them from shared memory as fragments, and the mma.sync.m16n8k16 (bfloat16
// inputs, float accumulation, sm_80 and later) that multiplies them. Under PMOE_CUDA_ON_CPU
// tests/cuda_on_cpu/cuda_on_cpu.h supplies mma_bf16.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#ifndef PMOE_CUDA_ON_CPU
#include <cuda_bf16.h>
#endif

#include <cstdint>
#include <cstring>

namespace pmoe_fast {

// Whether this compilation has tensor cores for the float tiles: device code for sm_80 or later,
// and the CPU build of the kernels (tests/cuda_on_cpu), which emulates them.
#if defined(PMOE_CUDA_ON_CPU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
constexpr bool kTensorCoreArch = true;
#else
constexpr bool kTensorCoreArch = false;
#endif

// How many bfloat16 parts hold a value of type T: exactly for bfloat16 (1) and half (2, 8 + 8 of
// its 11 significant bits), to float's accuracy for float (3 parts, about 24 bits).
template <typename T>
constexpr int kBf16Parts = 3;
template <>
constexpr int kBf16Parts<c10::BFloat16> = 1;
template <>
constexpr int kBf16Parts<c10::Half> = 2;

// The bits of x rounded to the nearest bfloat16 (ties to even), and back.
__device__ inline uint16_t bf16_bits(float x) {
#ifdef PMOE_CUDA_ON_CPU
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#else
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
#endif
}

__device__ inline float bf16_value(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
#ifdef PMOE_CUDA_ON_CPU
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#else
  return __uint_as_float(u);
#endif
}

// x = parts[0] + parts[1] + ... : each part the bfloat16 nearest to what the ones before leave.
template <int kParts>
__device__ inline void split_bf16(float x, uint16_t (&parts)[kParts]) {
#pragma unroll
  for (int p = 0; p < kParts; ++p) {
    parts[p] = bf16_bits(x);
    x -= bf16_value(parts[p]);
  }
}

// ldmatrix.x4 for the calling warp, every lane of which must call it: lane j gives row(j), the
// 16-byte aligned address in shared memory of row j % 8 of the 8 x 8 matrix j / 8 of bfloat16
// values, and r[i] receives the pair at row lane / 4, columns 2 (lane % 4) + [0, 2) of matrix i;
// with kTrans (ldmatrix's .trans), the pair at rows 2 (lane % 4) + [0, 2), column lane / 4, the
// lower row in the low half. The CPU build reads each pair from the rows its lanes would give.
// sm_75 and later.
template <bool kTrans = false, typename Row>
__device__ void ldmatrix_x4(int lane, Row row, uint32_t (&r)[4]) {
#ifdef PMOE_CUDA_ON_CPU
  for (int i = 0; i < 4; ++i) {
    if constexpr (kTrans) {
      uint16_t pair[2];
      for (int h = 0; h < 2; ++h) std::memcpy(&pair[h], row(8 * i + 2 * (lane % 4) + h) + lane / 4, sizeof(uint16_t));
      r[i] = pair[0] | static_cast<uint32_t>(pair[1]) << 16;
    } else {
      std::memcpy(&r[i], row(8 * i + lane / 4) + 2 * (lane % 4), sizeof(uint32_t));
    }
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(row(lane)));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#else
  __trap();  // the tiles take this path only where kTensorCoreArch holds
#endif
}

// mma_bf16's a for the 16 x 16 tile of A at p in shared memory: rows ld values apart, each row's
// 16 values (along the reduction) contiguous; with kByReduction, stored by column: one 16-value
// column for each step of the reduction, ld values apart.
template <bool kByReduction = false>
__device__ inline void load_a(const uint16_t* p, int ld, int lane, uint32_t (&a)[4]) {
  if constexpr (kByReduction) {
    ldmatrix_x4<true>(lane, [=](int j) { return p + (j % 8 + 8 * (j / 16)) * ld + 8 * (j / 8 % 2); }, a);
  } else {
    ldmatrix_x4(lane, [=](int j) { return p + j % 16 * ld + 8 * (j / 16); }, a);
  }
}

// mma_bf16's b for the two 16 x 8 tiles of B at p in shared memory, stored by column: columns ld
// values apart, each column's 16 values (along the reduction) contiguous; with kByReduction,
// stored by row: one 16-value row for each step of the reduction, ld values apart. b[0] for
// columns [0, 8), b[1] for [8, 16).
template <bool kByReduction = false>
__device__ inline void load_b(const uint16_t* p, int ld, int lane, uint32_t (&b)[2][2]) {
  uint32_t r[4];
  if constexpr (kByReduction) {
    ldmatrix_x4<true>(lane, [=](int j) { return p + j % 16 * ld + 8 * (j / 16); }, r);
  } else {
    ldmatrix_x4(lane, [=](int j) { return p + (j % 8 + 8 * (j / 16)) * ld + 8 * (j / 8 % 2); }, r);
  }
  b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

#ifndef PMOE_CUDA_ON_CPU
// d += a b for the calling warp, every lane of which must call it: a the 16 x 16 tile of A, b the
// 16 x 8 tile of B, two bfloat16 a register (the lower-indexed in the low half), d the 16 x 8 floats,
// each lane holding the elements the PTX ISA's fragment layouts for mma.m16n8k16 give it: with
// g = lane / 4 and t = lane % 4, a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..),
// a[3] = A(g+8, 2t+8..); b[0] = B(2t..2t+1, g), b[1] = B(2t+8..2t+9, g); d[0..1] = D(g, 2t..2t+1),
// d[2..3] = D(g+8, 2t..2t+1).
__device__ inline void mma_bf16(float* d, const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the tiles take this path only where kTensorCoreArch holds
#endif
}
#endif

}  // namespace pmoe_fast
