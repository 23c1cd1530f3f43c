// The Python module of the CPU kernels: paged attention (paged_attention.cpp), fused element-wise steps
// (fused_ops.cpp) and a step's LoRA terms (lora_rows.cpp). Each function's contract is in its source file.

#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>
#include <pybind11/stl.h>

#include <vector>

namespace stanceserve {
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& tables, const at::Tensor& positions, double scale);
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& tables, const at::Tensor& starts, const at::Tensor& counts,
                             const at::Tensor& cached, double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(at::Tensor& h, const at::Tensor& a, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& x);
void lora_rows_(const at::Tensor& x, at::Tensor& y, const at::Tensor& At, const std::vector<at::Tensor>& Bg,
                const std::vector<int64_t>& group_of_part, const std::vector<int64_t>& index_in_group,
                const std::vector<int64_t>& offsets, const at::Tensor& idx, const at::Tensor& weights,
                const at::Tensor& segments);
at::Tensor rope_store(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                      const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& kv_index);
}  // namespace stanceserve

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace stanceserve;
  m.def("decode_attention", &decode_attention, "paged decode attention on CPU (paged_attention.cpp)", py::arg("q"),
        py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("positions"), py::arg("scale"));
  m.def("prefill_attention", &prefill_attention, "paged causal prefill attention on CPU (paged_attention.cpp)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("tables"), py::arg("starts"),
        py::arg("counts"), py::arg("cached"), py::arg("scale"));
  m.def("rms_norm", &rms_norm, "RMSNorm (fused_ops.cpp)", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm_", &add_rms_norm_, "h += a in place, then RMSNorm of h (fused_ops.cpp)", py::arg("h"),
        py::arg("a"), py::arg("weight"), py::arg("eps"));
  m.def("silu_mul", &silu_mul, "silu(x[:, :F]) * x[:, F:] (fused_ops.cpp)", py::arg("x"));
  m.def("rope_store", &rope_store, "rotary embedding of q and k, k and v stored in the cache (fused_ops.cpp)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("kv_index"));
  m.def("lora_rows_", &lora_rows_, "a step's LoRA terms, token by token, into y (lora_rows.cpp)", py::arg("x"),
        py::arg("y"), py::arg("At"), py::arg("Bg"), py::arg("group_of_part"), py::arg("index_in_group"),
        py::arg("offsets"), py::arg("idx"), py::arg("weights"), py::arg("segments"));
}
