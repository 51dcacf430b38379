// Registers sparsegrad's operator schemas (written in op_schemas.h) and defines the Python module
// sparsegrad._C (build information). Kernels register themselves per device in csrc/cpu and
// csrc/cuda with TORCH_LIBRARY_IMPL; autograd and fake (meta) kernels live in sparsegrad/ops.py.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "op_schemas.h"

#ifndef SPARSEGRAD_VERSION
#define SPARSEGRAD_VERSION "unknown"
#endif
#ifndef SPARSEGRAD_TORCH_VERSION
#define SPARSEGRAD_TORCH_VERSION "unknown"
#endif
#ifndef SPARSEGRAD_CUDA_ARCHS
#define SPARSEGRAD_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(sparsegrad, m) { sparsegrad::define_ops(m); }

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = SPARSEGRAD_VERSION;
  info["torch_version"] = SPARSEGRAD_TORCH_VERSION;
#if AT_PARALLEL_OPENMP
  info["parallel_backend"] = "OpenMP";
#else
  info["parallel_backend"] = "native";
#endif
  info["num_threads"] = at::get_num_threads();
#ifdef SPARSEGRAD_WITH_CUDA
  info["cuda_compiled"] = true;
#else
  info["cuda_compiled"] = false;
#endif
  info["cuda_archs"] = SPARSEGRAD_CUDA_ARCHS;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &build_info, "How this copy of sparsegrad._C was built.");
}
