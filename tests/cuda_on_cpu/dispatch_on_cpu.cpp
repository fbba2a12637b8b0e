// csrc/cuda/dispatch.cu's host code and kernels, built for the CPU with cuda_on_cpu.h, as the ops
// pmoe_fast_cuda_on_cpu::dispatch_mlp and dispatch_mlp_backward (the schemas of pmoe_fast's).
#include "cuda_on_cpu.h"

#include "../../csrc/cuda/dispatch.cu"

TORCH_LIBRARY(pmoe_fast_cuda_on_cpu, m) {
  m.def("dispatch_mlp", &pmoe_fast::dispatch_mlp_cuda);
  m.def("dispatch_mlp_backward", &pmoe_fast::dispatch_mlp_backward_cuda);
}
