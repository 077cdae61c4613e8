// Bindings of the CUDA kernels: the launchers take one dict of plain ints/floats (pointers as integers,
// 0 = absent) built by latentflow_fast/ops/backend_cuda.py, plus torch's current stream handle.
// std::invalid_argument becomes ValueError, std::runtime_error (CUDA errors) RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../kernels/probed_attention.cuh"

namespace py = pybind11;

namespace {

py::handle item(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw std::invalid_argument(std::string("CUDA launch arguments: missing key '") + key + "'");
  return d[key];
}

int64_t get_int(const py::dict& d, const char* key) { return item(d, key).cast<int64_t>(); }

int get_int32(const py::dict& d, const char* key) {
  const int64_t value = get_int(d, key);
  if (value < INT32_MIN || value > INT32_MAX) throw std::invalid_argument(std::string(key) + ": does not fit in int32");
  return static_cast<int>(value);
}

template <typename P>
P get_ptr(const py::dict& d, const char* key) {
  return reinterpret_cast<P>(static_cast<uintptr_t>(item(d, key).cast<uint64_t>()));
}

template <int N>
void get_strides(const py::dict& d, const char* key, int64_t (&out)[N]) {
  const py::tuple strides = item(d, key).cast<py::tuple>();
  if (strides.size() != N) throw std::invalid_argument(std::string(key) + ": expected " + std::to_string(N) + " strides");
  for (int i = 0; i < N; ++i) out[i] = strides[i].cast<int64_t>();
}

latentflow::ProbedAttentionArgs parse_args(const py::dict& d) {
  latentflow::ProbedAttentionArgs a;
  const std::string dtype = item(d, "dtype").cast<std::string>();
  if (dtype == "float16") {
    a.dtype = latentflow::ElementType::kFloat16;
  } else if (dtype == "bfloat16") {
    a.dtype = latentflow::ElementType::kBFloat16;
  } else {
    throw std::invalid_argument("dtype: the CUDA kernels support float16 and bfloat16, got " + dtype);
  }
  a.device = get_int32(d, "device");
  a.batch = get_int32(d, "batch");
  a.heads = get_int32(d, "heads");
  a.kv_heads = get_int32(d, "kv_heads");
  a.num_queries = get_int32(d, "num_queries");
  a.num_keys = get_int32(d, "num_keys");
  a.head_dim = get_int32(d, "head_dim");
  a.value_dim = get_int32(d, "value_dim");
  a.num_segments = get_int32(d, "num_segments");
  a.scale = item(d, "scale").cast<float>();
  if (d.contains("rows_per_warp")) a.rows_per_warp = get_int32(d, "rows_per_warp");
  a.q = get_ptr<const void*>(d, "q");
  get_strides(d, "q_stride", a.q_stride);
  a.k = get_ptr<const void*>(d, "k");
  get_strides(d, "k_stride", a.k_stride);
  a.v = get_ptr<const void*>(d, "v");
  get_strides(d, "v_stride", a.v_stride);
  a.out = get_ptr<void*>(d, "out");
  a.key_padding_mask = get_ptr<const uint8_t*>(d, "key_padding_mask");
  a.segments = get_ptr<const int64_t*>(d, "segments");
  a.logit_scale = get_ptr<const float*>(d, "logit_scale");
  a.segment_bias = get_ptr<const float*>(d, "segment_bias");
  a.head_gate = get_ptr<const float*>(d, "head_gate");
  a.out_bias = get_ptr<const float*>(d, "out_bias");
  a.out_patch = get_ptr<const void*>(d, "out_patch");
  get_strides(d, "out_patch_stride", a.out_patch_stride);
  a.patch_mask = get_ptr<const uint8_t*>(d, "patch_mask");
  if (d.contains("causal")) {  // query-dependent masks (optional keys: older callers omit them)
    a.causal = item(d, "causal").cast<bool>();
    a.causal_offset = get_int32(d, "causal_offset");
    a.attn_mask_bool = get_ptr<const uint8_t*>(d, "attn_mask_bool");
    a.attn_mask_float = get_ptr<const float*>(d, "attn_mask_float");
    a.attn_mask_stride_b = get_int(d, "attn_mask_stride_b");
    a.attn_mask_stride_h = get_int(d, "attn_mask_stride_h");
  }
  a.lse = get_ptr<float*>(d, "lse");
  a.row_max = get_ptr<float*>(d, "max");
  a.entropy = get_ptr<float*>(d, "entropy");
  a.segment_mass = get_ptr<float*>(d, "segment_mass");
  a.key_mass = get_ptr<float*>(d, "key_mass");
  return a;
}

void* stream_ptr(uint64_t stream) { return reinterpret_cast<void*>(static_cast<uintptr_t>(stream)); }

py::dict build_info() {
  // "nvcc=13.0.88;archs=800,900;runtime=13000"
  py::dict info;
  const std::string text = latentflow::cuda_build_info();
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find(';', start);
    if (end == std::string::npos) end = text.size();
    const std::string field = text.substr(start, end - start);
    const size_t eq = field.find('=');
    if (eq != std::string::npos) info[py::str(field.substr(0, eq))] = field.substr(eq + 1);
    start = end + 1;
  }
  py::list archs;
  const std::string arch_text = info.contains("archs") ? info["archs"].cast<std::string>() : "";
  size_t pos = 0;
  while (pos < arch_text.size()) {
    size_t comma = arch_text.find(',', pos);
    if (comma == std::string::npos) comma = arch_text.size();
    if (comma > pos) archs.append(std::stoi(arch_text.substr(pos, comma - pos)));
    pos = comma + 1;
  }
  info["archs"] = archs;
  return info;
}

}  // namespace

void register_cuda_bindings(py::module_& m) {
  m.def(
      "cuda_probed_attention_forward",
      [](const py::dict& args, uint64_t stream) {
        latentflow::launch_probed_attention_forward(parse_args(args), stream_ptr(stream));
      },
      py::arg("args"), py::arg("stream"),
      "Launch latentflow_probed_attn_fwd_cuda on `stream` (a cudaStream_t as int). No sync, no allocation.");
  m.def(
      "cuda_probed_attention_key_mass",
      [](const py::dict& args, uint64_t stream) {
        latentflow::launch_probed_attention_key_mass(parse_args(args), stream_ptr(stream));
      },
      py::arg("args"), py::arg("stream"),
      "Launch latentflow_probed_attn_key_mass_cuda on `stream` after the forward (needs its lse).");
  m.def("cuda_build_info", &build_info,
        "dict: nvcc version, compiled CUDA archs (__CUDA_ARCH_LIST__, e.g. [800, 900]) and cudart version.");
  m.attr("cuda_kernel_names") = py::make_tuple("latentflow_probed_attn_fwd_cuda", "latentflow_probed_attn_key_mass_cuda");
}
