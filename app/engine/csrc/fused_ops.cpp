// Fused element-wise steps of a Llama-style block on CPU, fp32 or bf16: one pass over memory where PyTorch's
// eager ops take several (and a bf16 upcast each), with per-row sums in one fixed order.
//
// rms_norm(x, weight, eps) -> out            x [N, d] (rows contiguous), weight [d]
//   out = weight * (x / sqrt(mean(x^2) + eps)), as Hugging Face's LlamaRMSNorm (Zhang and Sennrich 2019,
//   "Root Mean Square Layer Normalization"): the mean in fp32; in bf16 the normalised value is rounded to bf16
//   before the weight multiplies it, as there.
// add_rms_norm_(h, a, weight, eps) -> out    h += a in place (rounded to h's dtype, as a PyTorch add), then
//   out = rms_norm(h): the residual add and the next norm in one pass.
// silu_mul(x) -> out                         x [N, 2F] -> out [N, F] = silu(x[:, :F]) * x[:, F:] (the gated MLP)
// rope_store(q, k, v, cos, sin, k_cache, v_cache, kv_index) -> q_rot
//   q [N, heads, D], k, v [N, kv_heads, D] (any row stride; heads and D contiguous), cos, sin [N, R] (R <= D,
//   even: Hugging Face's rotate-half layout, the first R features rotate), caches [kv_heads, blocks, block, D],
//   kv_index [N] int64 (block * block_size + offset). Rotates q and k (Su et al. 2021, arXiv:2104.09864), writes
//   the rotated k and v into the caches at kv_index and returns the rotated q [N, heads, D].
//
// Every value is computed in fp32 and rounded once to the output dtype (PyTorch's eager bf16 ops round after
// each op, so bf16 results can differ from them by an ulp). Each row's sums run in one order whatever the other
// rows, so a row's output never depends on the batch. Not here: LayerNorm (Phi), CUDA, other dtypes.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace stanceserve {
namespace {

// x rounded to T and back (identity for fp32)
inline float round_to(float x, const float*) { return x; }
inline float round_to(float x, const c10::BFloat16*) { return static_cast<float>(c10::BFloat16(x)); }

// sum of squares of n floats in one fixed order: 16 lanes from index 0, their tree sum, then the tail in order
inline float sum_squares(const float* __restrict__ x, int64_t n) {
  const int64_t full = n / 16 * 16;
  f32x16 acc = {};
  for (int64_t i = 0; i < full; i += 16) {
    const f32x16 v = load16(x + i);
    acc += v * v;
  }
  float sum = hsum(acc);
  for (int64_t i = full; i < n; ++i) sum += x[i] * x[i];
  return sum;
}

int64_t grain(int64_t per_row) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, per_row)); }

template <typename T>
void norm_rows(T* h, const T* a, const T* w, T* out, int64_t n, int64_t d, int64_t h_stride, int64_t a_stride,
               int64_t out_stride, float eps) {
  at::parallel_for(0, n, grain(d), [&](int64_t begin, int64_t end) {
    std::vector<float> xf(d), wf(d);
    for (int64_t j = 0; j < d; ++j) wf[j] = load_float(w[j]);
    for (int64_t r = begin; r < end; ++r) {
      T* hr = h + r * h_stride;
      if (a != nullptr) {
        const T* ar = a + r * a_stride;
        for (int64_t j = 0; j < d; ++j) {
          const float s = load_float(hr[j]) + load_float(ar[j]);
          store(hr + j, s);
          xf[j] = round_to(s, static_cast<const T*>(nullptr));
        }
      } else {
        for (int64_t j = 0; j < d; ++j) xf[j] = load_float(hr[j]);
      }
      const float inv = 1.0f / std::sqrt(sum_squares(xf.data(), d) / static_cast<float>(d) + eps);
      T* o = out + r * out_stride;
      for (int64_t j = 0; j < d; ++j) store(o + j, wf[j] * round_to(xf[j] * inv, static_cast<const T*>(nullptr)));
    }
  });
}

void check_rows(const at::Tensor& x, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what, ": fp32 or bf16 only, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.stride(-1) == 1, what, ": the last dimension must be contiguous");
}

at::Tensor norm_impl(const at::Tensor& h, const at::Tensor* a, const at::Tensor& weight, double eps,
                     const char* what) {
  check_rows(h, what);
  TORCH_CHECK(weight.scalar_type() == h.scalar_type() && weight.is_contiguous() && weight.dim() == 1 &&
                  weight.size(0) == h.size(-1),
              what, ": weight must be a contiguous [", h.size(-1), "] of x's dtype");
  const int64_t d = h.size(-1);
  TORCH_CHECK(h.dim() == 2 || h.is_contiguous(), what, ": x must be [N, d] or contiguous");
  const int64_t n = h.numel() / std::max<int64_t>(1, d);
  const int64_t h_stride = h.dim() == 2 ? h.stride(0) : d;
  int64_t a_stride = 0;
  if (a != nullptr) {
    TORCH_CHECK(a->scalar_type() == h.scalar_type() && a->sizes() == h.sizes() && a->stride(-1) == 1 &&
                    (a->dim() == 2 || a->is_contiguous()),
                what, ": a must match h");
    a_stride = a->dim() == 2 ? a->stride(0) : d;
  }
  at::Tensor out = at::empty(h.sizes(), h.options().memory_format(at::MemoryFormat::Contiguous));
  if (n == 0) return out;
  by_dtype(h.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    norm_rows<T>(h.data_ptr<T>(), a ? a->data_ptr<T>() : nullptr, weight.data_ptr<T>(), out.data_ptr<T>(), n, d,
                 h_stride, a_stride, d, static_cast<float>(eps));
  });
  return out;
}

template <typename T>
void silu_mul_rows(const T* x, T* out, int64_t n, int64_t f, int64_t x_stride) {
  at::parallel_for(0, n, grain(2 * f), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = x + r * x_stride;
      const T* u = g + f;
      T* o = out + r * f;
      for (int64_t j = 0; j < f; ++j) {
        const float v = load_float(g[j]);
        const float e = exp_nonpositive(-std::fabs(v));  // sigmoid from exp(-|v|): never overflows
        const float sig = v >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
        store(o + j, v * sig * load_float(u[j]));
      }
    }
  });
}

template <typename T>
void rope_rows(const T* q, const T* k, const T* v, const T* cos, const T* sin, T* kc, T* vc, const int64_t* idx,
               T* qo, int64_t n, int64_t nh, int64_t kvh, int64_t D, int64_t R, int64_t q_stride, int64_t k_stride,
               int64_t v_stride, int64_t cs_stride, int64_t slots) {
  const int64_t half = R / 2;
  auto rotate = [&](const T* x, T* o, const T* c, const T* s) {
    for (int64_t j = 0; j < half; ++j) {
      const float x1 = load_float(x[j]), x2 = load_float(x[j + half]);
      store(o + j, x1 * load_float(c[j]) - x2 * load_float(s[j]));
      store(o + j + half, x2 * load_float(c[j + half]) + x1 * load_float(s[j + half]));
    }
    for (int64_t j = R; j < D; ++j) o[j] = x[j];
  };
  at::parallel_for(0, n, grain((nh + 2 * kvh) * D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cos + r * cs_stride;
      const T* s = sin + r * cs_stride;
      for (int64_t h = 0; h < nh; ++h) rotate(q + r * q_stride + h * D, qo + (r * nh + h) * D, c, s);
      const int64_t slot = idx[r];
      for (int64_t h = 0; h < kvh; ++h) {
        rotate(k + r * k_stride + h * D, kc + (h * slots + slot) * D, c, s);
        std::memcpy(vc + (h * slots + slot) * D, v + r * v_stride + h * D, D * sizeof(T));
      }
    }
  });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return norm_impl(x, nullptr, weight, eps, "rms_norm");
}

at::Tensor add_rms_norm_(at::Tensor& h, const at::Tensor& a, const at::Tensor& weight, double eps) {
  return norm_impl(h, &a, weight, eps, "add_rms_norm_");
}

at::Tensor silu_mul(const at::Tensor& x) {
  check_rows(x, "silu_mul");
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_mul: x must be [N, 2F], got ", x.sizes());
  const int64_t n = x.size(0), f = x.size(1) / 2;
  at::Tensor out = at::empty({n, f}, x.options());
  if (n == 0) return out;
  by_dtype(x.scalar_type(), [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    silu_mul_rows<T>(x.data_ptr<T>(), out.data_ptr<T>(), n, f, x.stride(0));
  });
  return out;
}

at::Tensor rope_store(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                      const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& kv_index) {
  const at::Tensor* all[] = {&q, &k, &v, &cos, &sin, &k_cache, &v_cache};
  for (const at::Tensor* t : all) check_rows(*t, "rope_store");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2),
              "rope_store: q must be [N, heads, D], k and v [N, kv_heads, D]");
  const int64_t n = q.size(0), nh = q.size(1), kvh = k.size(1), D = q.size(2);
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->stride(2) == 1 && t->stride(1) == D, "rope_store: heads and head_dim must be contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == n && cos.size(1) <= D &&
                  cos.size(1) % 2 == 0 && cos.stride(0) == sin.stride(0),
              "rope_store: cos and sin must be [N, R], R even and at most D");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(0) == kvh &&
                  k_cache.size(3) == D && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "rope_store: caches must be contiguous [kv_heads, blocks, block_size, D]");
  for (const at::Tensor* t : all)
    TORCH_CHECK(t->scalar_type() == k_cache.scalar_type(), "rope_store: every tensor must share one dtype");
  TORCH_CHECK(kv_index.scalar_type() == at::kLong && kv_index.dim() == 1 && kv_index.size(0) == n &&
                  kv_index.is_contiguous(),
              "rope_store: kv_index must be a contiguous [N] int64");
  const int64_t slots = k_cache.size(1) * k_cache.size(2);
  const int64_t* idx = kv_index.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(idx[r] >= 0 && idx[r] < slots, "rope_store: kv_index ", idx[r], " outside the cache's ", slots);
  at::Tensor out = at::empty({n, nh, D}, q.options());
  if (n == 0) return out;
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    rope_rows<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), cos.data_ptr<T>(), sin.data_ptr<T>(),
                 k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), idx, out.data_ptr<T>(), n, nh, kvh, D, cos.size(1),
                 q.stride(0), k.stride(0), v.stride(0), cos.stride(0), slots);
  };
  by_dtype(q.scalar_type(), run);
  return out;
}

}  // namespace stanceserve
