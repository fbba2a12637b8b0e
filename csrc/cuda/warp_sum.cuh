// A warp reduction shared by csrc/cuda's kernels.
#pragma once

namespace pmoe_fast {

// Sum over the 32 lanes of a warp, every lane getting the total; a fixed butterfly order.
template <typename acc_t>
__device__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace pmoe_fast
