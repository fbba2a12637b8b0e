// csrc/cuda/prompt_fusion.cu's host code and kernels, built for the CPU with cuda_on_cpu.h, as the
// ops pmoe_fast_cuda_on_cpu::prompt_fusion and prompt_fusion_backward (the schemas of pmoe_fast's).
#include "cuda_on_cpu.h"

#include "../../csrc/cuda/prompt_fusion.cu"

TORCH_LIBRARY_FRAGMENT(pmoe_fast_cuda_on_cpu, m) {
  m.def("prompt_fusion", &pmoe_fast::prompt_fusion_cuda);
  m.def("prompt_fusion_backward", &pmoe_fast::prompt_fusion_backward_cuda);
}
