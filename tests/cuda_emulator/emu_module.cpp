// The emulated CUDA backend as a Python module: the real bindings (bindings/cuda_bindings.cpp) over the
// real kernel sources compiled for the host with cuda_emulation.h (see build.py).
#include <pybind11/pybind11.h>

void register_cuda_bindings(pybind11::module_& m);

#ifndef LATENTFLOW_EMU_MODULE
#define LATENTFLOW_EMU_MODULE latentflow_cuda_emu  // mutants (tests) get their own module name
#endif

PYBIND11_MODULE(LATENTFLOW_EMU_MODULE, m) {
  m.doc() = "kernels/probed_attention*.cu run on the host by tests/cuda_emulator/cuda_emulation.h";
  register_cuda_bindings(m);
  // the emulated runtime's per-thread current device (see cuda_emulation.h)
  m.def("_emu_current_device", [] { return latentflow_emu::current_device(); });
  m.def("_emu_set_current_device", [](int device) { latentflow_emu::current_device() = device; });
  m.def("_emu_set_device_calls", [] { return latentflow_emu::set_device_calls(); });
}
