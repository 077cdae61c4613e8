// Bindings of the fused CPU kernel: `_C.probed_attention_cpu(**fields)` takes raw pointers (Python ints
// from tensor.data_ptr(), 0 = absent), shapes and strides in elements, and runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <functional>
#include <map>
#include <string>

#include "cpu_parallel.h"
#include "dit_fused_cpu.h"
#include "probed_attention_cpu.h"

namespace py = pybind11;
using latentflow::ProbedAttentionCpuArgs;

namespace {

template <typename T>
T* from_address(uint64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

template <typename T>
T* as_pointer(const py::handle& value) {
  return from_address<T>(value.cast<uint64_t>());
}

std::array<int64_t, 4> as_strides(const py::handle& value, const char* name) {
  auto list = value.cast<std::vector<int64_t>>();
  if (list.size() != 4) throw py::value_error(std::string(name) + " must hold 4 strides");
  return {list[0], list[1], list[2], list[3]};
}

using Setter = std::function<void(ProbedAttentionCpuArgs&, const py::handle&)>;

const std::map<std::string, Setter>& setters() {
  static const std::map<std::string, Setter> table = {
      {"dtype", [](auto& a, auto v) { a.dtype = static_cast<latentflow::ScalarType>(v.template cast<int>()); }},
      {"batch", [](auto& a, auto v) { a.batch = v.template cast<int64_t>(); }},
      {"heads", [](auto& a, auto v) { a.heads = v.template cast<int64_t>(); }},
      {"kv_heads", [](auto& a, auto v) { a.kv_heads = v.template cast<int64_t>(); }},
      {"num_queries", [](auto& a, auto v) { a.num_queries = v.template cast<int64_t>(); }},
      {"num_keys", [](auto& a, auto v) { a.num_keys = v.template cast<int64_t>(); }},
      {"head_dim", [](auto& a, auto v) { a.head_dim = v.template cast<int64_t>(); }},
      {"value_dim", [](auto& a, auto v) { a.value_dim = v.template cast<int64_t>(); }},
      {"num_segments", [](auto& a, auto v) { a.num_segments = v.template cast<int64_t>(); }},
      {"q", [](auto& a, auto v) { a.q = as_pointer<const void>(v); }},
      {"q_strides", [](auto& a, auto v) { a.q_strides = as_strides(v, "q_strides"); }},
      {"k", [](auto& a, auto v) { a.k = as_pointer<const void>(v); }},
      {"k_strides", [](auto& a, auto v) { a.k_strides = as_strides(v, "k_strides"); }},
      {"v", [](auto& a, auto v) { a.v = as_pointer<const void>(v); }},
      {"v_strides", [](auto& a, auto v) { a.v_strides = as_strides(v, "v_strides"); }},
      {"scale", [](auto& a, auto v) { a.scale = v.template cast<float>(); }},
      {"key_padding_mask", [](auto& a, auto v) { a.key_padding_mask = as_pointer<const bool>(v); }},
      {"segments", [](auto& a, auto v) { a.segments = as_pointer<const int64_t>(v); }},
      {"logit_scale", [](auto& a, auto v) { a.logit_scale = as_pointer<const float>(v); }},
      {"segment_bias", [](auto& a, auto v) { a.segment_bias = as_pointer<const float>(v); }},
      {"head_gate", [](auto& a, auto v) { a.head_gate = as_pointer<const float>(v); }},
      {"out_bias", [](auto& a, auto v) { a.out_bias = as_pointer<const float>(v); }},
      {"out_patch", [](auto& a, auto v) { a.out_patch = as_pointer<const void>(v); }},
      {"out_patch_strides", [](auto& a, auto v) { a.out_patch_strides = as_strides(v, "out_patch_strides"); }},
      {"patch_mask", [](auto& a, auto v) { a.patch_mask = as_pointer<const bool>(v); }},
      {"causal", [](auto& a, auto v) { a.causal = v.template cast<bool>(); }},
      {"causal_offset", [](auto& a, auto v) { a.causal_offset = v.template cast<int64_t>(); }},
      {"attn_mask_bool", [](auto& a, auto v) { a.attn_mask_bool = as_pointer<const bool>(v); }},
      {"attn_mask_float", [](auto& a, auto v) { a.attn_mask_float = as_pointer<const float>(v); }},
      {"attn_mask_batch_stride", [](auto& a, auto v) { a.attn_mask_batch_stride = v.template cast<int64_t>(); }},
      {"attn_mask_head_stride", [](auto& a, auto v) { a.attn_mask_head_stride = v.template cast<int64_t>(); }},
      {"out", [](auto& a, auto v) { a.out = as_pointer<void>(v); }},
      {"lse", [](auto& a, auto v) { a.lse = as_pointer<float>(v); }},
      {"max", [](auto& a, auto v) { a.max = as_pointer<float>(v); }},
      {"entropy", [](auto& a, auto v) { a.entropy = as_pointer<float>(v); }},
      {"segment_mass", [](auto& a, auto v) { a.segment_mass = as_pointer<float>(v); }},
      {"key_mass", [](auto& a, auto v) { a.key_mass = as_pointer<float>(v); }},
      {"num_threads", [](auto& a, auto v) { a.num_threads = v.template cast<int>(); }},
      {"isa", [](auto& a, auto v) { a.isa = static_cast<latentflow::CpuIsa>(v.template cast<int>()); }},
  };
  return table;
}

void probed_attention_cpu_py(const py::kwargs& fields) {
  ProbedAttentionCpuArgs args;
  for (auto item : fields) {
    const auto name = item.first.cast<std::string>();
    auto it = setters().find(name);
    if (it == setters().end()) throw py::value_error("probed_attention_cpu: unknown field " + name);
    it->second(args, item.second);
  }
  py::gil_scoped_release release;  // the kernel touches no Python object
  latentflow::probed_attention_cpu(args);
}

// The DiT's fused element-wise passes take positional arguments: they run ~30 times per network
// evaluation, so the keyword parsing of probed_attention_cpu would be a visible part of their cost.
void head_norm_rope_cpu_py(uint64_t x, int64_t x_batch_stride, int64_t x_frame_stride, int64_t batch,
                           int64_t frames, int64_t heads, int64_t head_dim, uint64_t weight, float eps,
                           uint64_t cos, uint64_t sin, uint64_t out, int num_threads) {
  latentflow::HeadNormRopeArgs a;
  a.x = from_address<const float>(x);
  a.x_batch_stride = x_batch_stride;
  a.x_frame_stride = x_frame_stride;
  a.batch = batch;
  a.frames = frames;
  a.heads = heads;
  a.head_dim = head_dim;
  a.weight = from_address<const float>(weight);
  a.eps = eps;
  a.cos = from_address<const float>(cos);
  a.sin = from_address<const float>(sin);
  a.out = from_address<float>(out);
  a.num_threads = num_threads;
  py::gil_scoped_release release;
  latentflow::head_norm_rope_cpu(a);
}

void norm_modulate_cpu_py(uint64_t x, int64_t batch, int64_t frames, int64_t dim, uint64_t weight, float eps,
                          uint64_t shift, uint64_t scale, int64_t modulation_batch_stride, uint64_t out,
                          int num_threads) {
  latentflow::NormModulateArgs a;
  a.x = from_address<const float>(x);
  a.batch = batch;
  a.frames = frames;
  a.dim = dim;
  a.weight = from_address<const float>(weight);
  a.eps = eps;
  a.shift = from_address<const float>(shift);
  a.scale = from_address<const float>(scale);
  a.modulation_batch_stride = modulation_batch_stride;
  a.out = from_address<float>(out);
  a.num_threads = num_threads;
  py::gil_scoped_release release;
  latentflow::norm_modulate_cpu(a);
}

}  // namespace

void register_cpu_bindings(py::module_& m) {
  latentflow::watch_for_fork();
  m.def("probed_attention_cpu", &probed_attention_cpu_py,
        "Fused CPU probed attention on raw pointers (see latentflow_fast/ops/backend_cpu.py).");
  m.def("head_norm_rope_cpu", &head_norm_rope_cpu_py,
        "DiT q/k pass: strided head split + RMSNorm + RoPE (see latentflow_fast/ops/dit_cpu.py).");
  m.def("norm_modulate_cpu", &norm_modulate_cpu_py,
        "DiT adaLN pass: RMSNorm + modulate (see latentflow_fast/ops/dit_cpu.py).");
  m.def("cpu_parallel_runtime", &latentflow::parallel_runtime,
        "Where the kernels' threads come from in this process: 'openmp' (torch's pool) or 'threads'.");
  m.def("cpu_has_avx512", &latentflow::cpu_has_avx512, "True when the AVX-512 micro-kernels can run here.");
  m.def("cpu_has_avx2", &latentflow::cpu_has_avx2, "True when the AVX2 + FMA micro-kernels can run here.");
  m.def(
      "cpu_resolve_isa",
      [](int isa) {  // std::invalid_argument (unknown code, path missing on this CPU) becomes ValueError
        return std::string(latentflow::isa_name(latentflow::resolve_isa(static_cast<latentflow::CpuIsa>(isa))));
      },
      "Name of the micro-kernel path that isa code (0 auto, 1 avx512, 2 generic, 3 avx2) runs on this CPU.");
}
