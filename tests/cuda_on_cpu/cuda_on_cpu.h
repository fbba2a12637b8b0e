// Runs CUDA C++ kernels on the CPU, so the suite executes csrc/cuda's kernels on a machine
// without a GPU instead of only compiling them.
//
// Each CUDA thread of a block is a fiber (ucontext) on the calling thread; the blocks of a launch
// run one after another, in the order block_order sets. A kernel's __shared__ variables become
// function-local statics, which every fiber of the running block sees, as shared memory.
// __syncthreads suspends a fiber until all of the block's have arrived, __shfl_xor_sync exchanges
// through memory between two such barriers over the warp's 32. The tensor cores' mma_bf16
// (csrc/cuda/mma.cuh) takes each lane's fragments as it is called and computes the warp's
// products when the warp next meets at a barrier (a __syncthreads or a shuffle), each lane's part
// in float from all 32 lanes' fragments: so a kernel must not read or write an mma's d between
// the call and the next barrier (csrc/cuda's do not), and all 32 lanes must make the same calls.
// ldmatrix (mma.cuh's ldmatrix_x4) needs no exchange: each lane reads its pairs from the rows
// the other lanes would give.
// atomicAdd and __threadfence are plain reads and writes, as nothing runs concurrently. A barrier
// that some thread never reaches (a __syncthreads under divergent control flow) raises instead of
// hanging. That is all csrc/cuda uses, and what this file supports.
//
// What it cannot check: blocks running concurrently (races between blocks), threads interleaving
// other than at barriers (races inside a block), shared memory holding garbage at a block's start
// (statics keep the previous block's values), warp-synchronous code without __syncwarp, and
// timing. Include it before a .cu file; under PMOE_CUDA_ON_CPU the .cu file takes launch(),
// DeviceGuard, current_stream() and multiprocessor_count() from here instead of
// csrc/cuda/launch.cuh.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#define PMOE_CUDA_ON_CPU 1
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
#define __shared__ static

#include "../../csrc/cuda/mma.cuh"  // its CPU parts (bf16_bits, bf16_value); mma_bf16 is below

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaStream_t = void*;

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

namespace cuda_on_cpu {

struct Barrier {
  int count;
  int arrived = 0;
  uint64_t generation = 0;
};

// A lane's mma_bf16 call: its fragments a[4], b[2], and its d.
struct Mma {
  std::array<uint32_t, 6> fragments;
  float* d;
};

// The fibers of the running block and what they wait for.
struct Block {
  explicit Block(int threads)
      : sync{threads}, warps(threads / 32, Barrier{32}), lanes(threads), mmas(threads), contexts(threads),
        waiting_on(threads), waiting_for(threads), done(threads) {
    for (int t = 0; t < threads; ++t) stacks.emplace_back(new char[kStackBytes]);
  }
  static constexpr size_t kStackBytes = 64 * 1024;
  Barrier sync;
  std::vector<Barrier> warps;
  std::vector<uint64_t> lanes;  // __shfl_xor_sync's exchange slots, one per thread
  std::vector<std::vector<Mma>> mmas;  // each thread's mma_bf16 calls since its warp last met
  std::vector<ucontext_t> contexts;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<Barrier*> waiting_on;     // the barrier a suspended fiber waits at, or nullptr
  std::vector<uint64_t> waiting_for;    // the generation it waits to end
  std::vector<char> done;
  ucontext_t scheduler;
  ucontext_t fresh;  // what each fiber starts from: one getcontext a launch (each costs a system call)
  std::function<void()> body;  // the kernel with its arguments
  int running = 0;
};

inline thread_local Block* current_block = nullptr;

// The order launch() runs a grid's blocks in. A GPU runs them in any order, many at once; where a
// kernel's last block to arrive finishes the work of others, any block may be that one.
enum class BlockOrder : int64_t { kIndex = 0, kReversed = 1, kShuffled = 2 };
inline BlockOrder block_order = BlockOrder::kIndex;

// The grid's linear block indices (x fastest) in block_order; the shuffle is the same every launch.
inline std::vector<int64_t> block_sequence(int64_t blocks) {
  std::vector<int64_t> sequence(blocks);
  std::iota(sequence.begin(), sequence.end(), 0);
  if (block_order == BlockOrder::kReversed) std::reverse(sequence.begin(), sequence.end());
  if (block_order == BlockOrder::kShuffled) std::shuffle(sequence.begin(), sequence.end(), std::mt19937_64(0));
  return sequence;
}

// The mma_bf16 calls of warp w's lanes since it last met, in order: d += a b for each lane's part
// (the fragment layouts of csrc/cuda/mma.cuh), the 16 products in order, in float (a product of
// two bfloat16 values is exact in float).
inline void run_mmas(Block& block, int w) {
  std::array<const Mma*, 32> lanes{};
  const size_t calls = block.mmas[w * 32].size();
  for (int lane = 0; lane < 32; ++lane) {
    TORCH_CHECK(block.mmas[w * 32 + lane].size() == calls, "cuda_on_cpu: lane ", lane, " of warp ", w, " called mma_bf16 ",
                block.mmas[w * 32 + lane].size(), " times where lane 0 called it ", calls, " times");
    lanes[lane] = block.mmas[w * 32 + lane].data();
  }
  const auto value = [](uint32_t reg, int half) {  // bfloat16 `half` of a register, as a float
    return pmoe_fast::bf16_value(static_cast<uint16_t>(reg >> (16 * half)));
  };
  for (size_t c = 0; c < calls; ++c) {
    float a[16][16], b[16][8];
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      const std::array<uint32_t, 6>& f = lanes[lane][c].fragments;
      for (int half = 0; half < 2; ++half) {
        for (int reg = 0; reg < 4; ++reg) a[g + 8 * (reg % 2)][2 * t + half + 8 * (reg / 2)] = value(f[reg], half);
        for (int reg = 0; reg < 2; ++reg) b[2 * t + half + 8 * reg][g] = value(f[4 + reg], half);
      }
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      float* d = lanes[lane][c].d;
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float sum = d[i];
        for (int k = 0; k < 16; ++k) sum += a[row][k] * b[k][col];
        d[i] = sum;
      }
    }
  }
  for (int lane = 0; lane < 32; ++lane) block.mmas[w * 32 + lane].clear();
}

// Whether fiber t waits at a barrier that has not released it yet.
inline bool blocked(const Block& block, int t) {
  const Barrier* barrier = block.waiting_on[t];
  return barrier != nullptr && barrier->generation == block.waiting_for[t];
}

// Switches from the context `from` (the scheduler's or a waiting fiber's) to fiber t, which has
// not returned and is not blocked.
inline void resume(Block& block, int t, ucontext_t* from) {
  block.waiting_on[t] = nullptr;
  block.running = t;
  threadIdx = {static_cast<unsigned>(t), 0, 0};
  swapcontext(from, &block.contexts[t]);
}

inline void wait(Barrier& barrier) {
  Block& block = *current_block;
  if (++barrier.arrived == barrier.count) {  // the last to arrive runs the warps' products, releases the others
    const bool whole_block = &barrier == &block.sync;
    const int first = whole_block ? 0 : static_cast<int>(&barrier - block.warps.data());
    const int last = whole_block ? static_cast<int>(block.warps.size()) : first + 1;
    for (int w = first; w < last; ++w) run_mmas(block, w);
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  const int me = block.running;
  block.waiting_on[me] = &barrier;
  block.waiting_for[me] = barrier.generation;
  // Straight to the next fiber that can run, as the scheduler would take it (a swapcontext costs a
  // system call, and through the scheduler it takes two); to the scheduler when none can.
  const int threads = static_cast<int>(block.contexts.size());
  for (int i = 1; i < threads; ++i) {
    const int t = (me + i) % threads;
    if (block.done[t] || blocked(block, t)) continue;
    resume(block, t, &block.contexts[me]);
    return;
  }
  swapcontext(&block.contexts[me], &block.scheduler);
}

inline void fiber_entry() {
  Block& block = *current_block;
  block.body();
  block.done[block.running] = 1;  // returning resumes the scheduler (uc_link)
}

}  // namespace cuda_on_cpu

inline void __syncthreads() { cuda_on_cpu::wait(cuda_on_cpu::current_block->sync); }

// The fibers of a block share one thread, and its blocks run in turn: ordinary memory is coherent.
inline void __threadfence() {}

inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address += value;
  return old;
}

// Every lane of the warp must call it, as on a GPU with a full mask.
template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "__shfl_xor_sync: at most 8 bytes");
  cuda_on_cpu::Block& block = *cuda_on_cpu::current_block;
  const unsigned me = threadIdx.x, warp = me / 32;
  std::memcpy(&block.lanes[me], &value, sizeof(T));
  cuda_on_cpu::wait(block.warps[warp]);
  T other;
  std::memcpy(&other, &block.lanes[warp * 32 + ((me % 32) ^ static_cast<unsigned>(lane_mask))], sizeof(T));
  cuda_on_cpu::wait(block.warps[warp]);
  return other;
}

namespace pmoe_fast {

// mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 for the calling warp, as csrc/cuda/mma.cuh declares it:
// d is updated when the warp next meets (cuda_on_cpu::run_mmas).
inline void mma_bf16(float* d, const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  cuda_on_cpu::current_block->mmas[threadIdx.x].push_back({{a[0], a[1], a[2], a[3], b[0], b[1]}, d});
}

// The .cu file's device guard and stream: nothing to select on the CPU.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
// An H100's, so that the kernels split their work as they would on one.
inline int64_t multiprocessor_count() { return 132; }

// kernel<<<grid, threads>>>(args...), run to completion before it returns.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, int threads, cudaStream_t, Args... args) {
  TORCH_CHECK(threads > 0 && threads % 32 == 0, "cuda_on_cpu: blocks of whole warps only, got ", threads,
              " threads");
  cuda_on_cpu::Block block(threads);
  block.body = [&] { kernel(args...); };
  cuda_on_cpu::current_block = &block;
  blockDim = dim3(threads);
  gridDim = grid;
  getcontext(&block.fresh);
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  for (const int64_t linear : cuda_on_cpu::block_sequence(blocks)) {
    const unsigned x = linear % grid.x, y = linear / grid.x % grid.y, z = linear / grid.x / grid.y;
    blockIdx = {x, y, z};
    for (int t = 0; t < threads; ++t) {
      ucontext_t& context = block.contexts[t];
      context = block.fresh;
      context.uc_stack.ss_sp = block.stacks[t].get();
      context.uc_stack.ss_size = cuda_on_cpu::Block::kStackBytes;
      context.uc_link = &block.scheduler;
      makecontext(&context, cuda_on_cpu::fiber_entry, 0);
      block.waiting_on[t] = nullptr;
      block.done[t] = 0;
    }
    // Round robin over the fibers that can run, until all have returned.
    for (int finished = 0; finished < threads;) {
      bool progress = false;
      finished = 0;
      for (int t = 0; t < threads; ++t) {
        if (block.done[t]) {
          ++finished;
          continue;
        }
        if (cuda_on_cpu::blocked(block, t)) continue;
        cuda_on_cpu::resume(block, t, &block.scheduler);
        progress = true;
      }
      TORCH_CHECK(progress || finished == threads, "cuda_on_cpu: block (", x, ", ", y, ", ", z,
                  ") is stuck: ", threads - finished,
                  " threads wait at a barrier that the others returned without reaching");
    }
    for (int t = 0; t < threads; ++t) {
      TORCH_CHECK(block.mmas[t].empty(), "cuda_on_cpu: block (", x, ", ", y, ", ", z, ") ended with thread ", t,
                  "'s mma_bf16 calls after its last barrier: their results here come at a barrier");
    }
  }
  cuda_on_cpu::current_block = nullptr;
}

}  // namespace pmoe_fast
