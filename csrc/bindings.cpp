// The Python face of pmoe_fast._C. The operators themselves register with the PyTorch
// dispatcher when this library loads (TORCH_LIBRARY in pmoe_ops.cpp) and are called as
// torch.ops.pmoe_fast.*; this module only reports how the library was built. It includes
// pybind11 alone, not torch/extension.h, because it needs nothing from torch and that header
// would add a minute to every build.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pmoe_fast native operators (registered as torch.ops.pmoe_fast.*)";
  m.def(
      "cuda_built",
      [] {
#ifdef PMOE_FAST_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA implementations were compiled into this library.");
}
