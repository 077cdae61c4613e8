// The pybind11 module latentflow_fast._C: the native backends, registered by concern.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_cpu_bindings(py::module_& m);
#ifdef LATENTFLOW_HAS_CUDA
void register_cuda_bindings(py::module_& m);
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "latentflow_fast native kernels (raw pointers, shapes and strides; no libtorch)";
#ifdef LATENTFLOW_HAS_CUDA
  m.attr("has_cuda") = true;
  register_cuda_bindings(m);
#else
  m.attr("has_cuda") = false;
#endif
  register_cpu_bindings(m);
}
