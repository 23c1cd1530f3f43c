// Paged decode attention on CPU: one query token per row over a paged KV cache, read in place.
//
// decode_attention(q, k_cache, v_cache, tables, positions, scale) -> out
//   q          [n, kv_heads, G, head_dim], fp32 or bf16, contiguous (G query heads share one KV head)
//   k_cache    [kv_heads, num_blocks, block_size, head_dim], q's dtype, contiguous
//   v_cache    as k_cache
//   tables     [n, W] int64: row r's position p lives at offset p % block_size of block tables[r, p / block_size]
//   positions  [n] int64: row r attends keys 0 .. positions[r] (inclusive)
//   scale      score scale (1 / sqrt(head_dim) for most models)
//   out        [n, kv_heads * G * head_dim], q's dtype
//
// Work is split over (row, kv head) pairs with at::parallel_for. Each task walks the row's blocks, converts
// one block of keys at a time to fp32 (bf16 -> fp32 is a 16-bit shift), transposed to [head_dim, block_size]
// so that the score loop runs over the block's positions with no reduction (gcc -O3 vectorises it without
// -ffast-math), keeps the G rows of scores, applies a max-subtracted fp32 softmax, then accumulates the
// weighted values in fp32. Positions past positions[r] and table entries past the last block the row needs
// are never read, so whatever they hold (NaN included) cannot reach the output.
//
// Not here: prefill (several queries per row), masks other than the causal bound, CUDA, dtypes other than
// fp32 and bf16, sliding windows.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

inline float load_float(float x) { return x; }

inline float load_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline void store(float* dst, float x) { *dst = x; }
inline void store(c10::BFloat16* dst, float x) { *dst = c10::BFloat16(x); }  // round to nearest even

// BS: positions per block known at compile time (0: read from bs_rt).
template <typename T, int BS>
void run(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc, const int64_t* __restrict__ tables,
         const int64_t* __restrict__ positions, T* __restrict__ out, int64_t n, int64_t kv_heads, int64_t groups,
         int64_t head_dim, int64_t num_blocks, int64_t bs_rt, int64_t width, int64_t max_len, float scale) {
  const int64_t bs = BS > 0 ? BS : bs_rt;
  const int64_t G = groups, D = head_dim;
  const int64_t head_stride = num_blocks * bs * D;  // elements between KV heads in a cache layer
  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    // per-chunk buffers, sized once: queries, one block of keys or values, scores, accumulators
    std::vector<float> qf(G * D), kt(D * bs), vf(bs * D), scores(G * max_len), acc(G * D), inv(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t len = positions[r] + 1;
      const int64_t nb = (len + bs - 1) / bs;
      const T* qrow = q + (r * kv_heads + h) * G * D;
      for (int64_t i = 0; i < G * D; ++i) qf[i] = load_float(qrow[i]) * scale;
      const T* kh = kc + h * head_stride;
      const T* vh = vc + h * head_stride;
      const int64_t* table = tables + r * width;

      // scores[g, p] = q_g . k_p (scaled), block by block
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t b = table[blk];
        TORCH_CHECK(b >= 0 && b < num_blocks, "decode_attention: block id ", b, " out of range [0, ", num_blocks, ")");
        const int64_t valid = std::min<int64_t>(bs, len - blk * bs);
        const T* kb = kh + b * bs * D;
        float* __restrict__ ktp = kt.data();
        for (int64_t t = 0; t < valid; ++t)
          for (int64_t d = 0; d < D; ++d) ktp[d * bs + t] = load_float(kb[t * D + d]);
        for (int64_t t = valid; t < bs; ++t)
          for (int64_t d = 0; d < D; ++d) ktp[d * bs + t] = 0.0f;
        for (int64_t g = 0; g < G; ++g) {
          float s[BS > 0 ? BS : 64];
          float* __restrict__ sp = s;
          std::vector<float> big;
          if (BS == 0 && bs > 64) {
            big.assign(bs, 0.0f);
            sp = big.data();
          }
          for (int64_t t = 0; t < bs; ++t) sp[t] = 0.0f;
          const float* __restrict__ qg = qf.data() + g * D;
          for (int64_t d = 0; d < D; ++d) {
            const float qd = qg[d];
            const float* __restrict__ kd = ktp + d * bs;
            for (int64_t t = 0; t < bs; ++t) sp[t] += qd * kd[t];
          }
          float* __restrict__ dst = scores.data() + g * max_len + blk * bs;
          for (int64_t t = 0; t < valid; ++t) dst[t] = sp[t];
        }
      }

      // max-subtracted softmax over the row's len positions, fp32; probabilities left unnormalised
      for (int64_t g = 0; g < G; ++g) {
        float* __restrict__ sg = scores.data() + g * max_len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < len; ++p) m = std::max(m, sg[p]);
        float sum = 0.0f;
        for (int64_t p = 0; p < len; ++p) {
          const float e = std::exp(sg[p] - m);
          sg[p] = e;
          sum += e;
        }
        inv[g] = 1.0f / sum;
      }

      // acc[g, :] = sum_p w[g, p] * v_p
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t b = table[blk];
        const int64_t valid = std::min<int64_t>(bs, len - blk * bs);
        const T* vb = vh + b * bs * D;
        float* __restrict__ vfp = vf.data();
        for (int64_t i = 0; i < valid * D; ++i) vfp[i] = load_float(vb[i]);
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict__ w = scores.data() + g * max_len + blk * bs;
          float* __restrict__ a = acc.data() + g * D;
          for (int64_t t = 0; t < valid; ++t) {
            const float wt = w[t];
            const float* __restrict__ vt = vfp + t * D;
            for (int64_t d = 0; d < D; ++d) a[d] += wt * vt[d];
          }
        }
      }
      T* o = out + (r * kv_heads + h) * G * D;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) store(o + g * D + d, acc[g * D + d] * inv[g]);
    }
  });
}

template <typename T>
void dispatch_block(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
                    const at::Tensor& positions, at::Tensor& out, int64_t max_len, double scale) {
  const int64_t n = q.size(0), kvh = q.size(1), G = q.size(2), D = q.size(3);
  const int64_t nblocks = k.size(1), bs = k.size(2), width = tables.size(1);
  auto args = [&](auto fn) {
    fn(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), tables.data_ptr<int64_t>(), positions.data_ptr<int64_t>(),
       out.data_ptr<T>(), n, kvh, G, D, nblocks, bs, width, max_len, static_cast<float>(scale));
  };
  if (bs == 16)
    args([](auto... a) { run<T, 16>(a...); });
  else if (bs == 32)
    args([](auto... a) { run<T, 32>(a...); });
  else
    args([](auto... a) { run<T, 0>(a...); });
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& tables, const at::Tensor& positions, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "decode_attention: CPU tensors only");
  TORCH_CHECK(q.dim() == 4, "decode_attention: q must be [n, kv_heads, G, head_dim], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_attention: caches must both be [kv_heads, num_blocks, block_size, head_dim]");
  TORCH_CHECK(k_cache.size(0) == q.size(1) && k_cache.size(3) == q.size(3),
              "decode_attention: q ", q.sizes(), " does not match the cache ", k_cache.sizes());
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "decode_attention: q and the caches must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "decode_attention: fp32 or bf16 only, got ", q.scalar_type());
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "decode_attention: q and the caches must be contiguous");
  TORCH_CHECK(tables.scalar_type() == at::kLong && positions.scalar_type() == at::kLong,
              "decode_attention: tables and positions must be int64");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == q.size(0) && tables.is_contiguous(),
              "decode_attention: tables must be a contiguous [n, W]");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == q.size(0) && positions.is_contiguous(),
              "decode_attention: positions must be a contiguous [n]");
  const int64_t n = q.size(0), bs = k_cache.size(2), width = tables.size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  int64_t max_len = 1;
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK(pos[r] >= 0 && pos[r] < width * bs, "decode_attention: row ", r, " position ", pos[r],
                " is outside its table of ", width, " blocks of ", bs);
    max_len = std::max(max_len, pos[r] + 1);
  }
  at::Tensor out = at::empty({n, q.size(1) * q.size(2) * q.size(3)}, q.options());
  if (n == 0) return out;
  if (q.scalar_type() == at::kFloat)
    dispatch_block<float>(q, k_cache, v_cache, tables, positions, out, max_len, scale);
  else
    dispatch_block<c10::BFloat16>(q, k_cache, v_cache, tables, positions, out, max_len, scale);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "paged decode attention on CPU (see paged_attention.cpp)",
        pybind11::arg("q"), pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("tables"),
        pybind11::arg("positions"), pybind11::arg("scale"));
}
