// Paged attention on CPU over a paged KV cache, read in place: decode (one query token per row) and causal prefill.
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
// Work is split over (row, kv head) pairs with at::parallel_for. Each task walks the row's blocks: it converts
// one block of keys to fp32 (bf16 -> fp32 is a 16-bit shift; fp32 blocks are read in place), scores it against
// the G queries of its KV head, applies a max-subtracted fp32 softmax over the row's positions, then sums the
// values weighted by the probabilities, one block at a time, in fp32. Positions past positions[r] and table
// entries past the last block the row needs are never read, so whatever they hold (NaN included) cannot reach
// the output.
//
// Vectorisation: head_dim is handled as NV vectors of 16 floats (GCC/Clang vector extensions, which the
// compiler lowers to the widest registers -march=native offers: one AVX-512 register, two AVX2 ones...), NV a
// compile-time constant for head_dim 32, 64, 80, 96 and 128; the value sums keep each 16-float slice of the
// output in a register across a block's positions. A head_dim that is not a multiple of 16 takes plain loops.
// Blocks are scattered in memory, so each pass asks for the next block of its table (and each task for the
// next task's first key block) to be prefetched while it computes on the current one.
//
// prefill_attention(q, k_cache, v_cache, tables, starts, counts, cached, scale) -> out
//   q          [N, kv_heads, G, head_dim]: the packed new tokens of R rows
//   tables     [R, W] int64, each row's block table
//   starts     [R] int64: row r's new tokens are q[starts[r] .. starts[r] + counts[r])
//   counts     [R] int64
//   cached     [R] int64: row r's new token i sits at position cached[r] + i and attends keys 0 .. that position
//   out        [N, kv_heads * G * head_dim], q's dtype (tokens of no row: zeros)
//
// Not here: masks other than the causal bound, CUDA, dtypes other than fp32 and bf16, sliding windows.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace stanceserve {
namespace {

// Ask for a block's n values (the next block a task reads: its id is in the table) to be brought into cache
// while the current one is computed on; the hardware prefetchers do not cross from one block to another.
template <typename T>
inline void prefetch_block(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * static_cast<int64_t>(sizeof(T)); off += 64) __builtin_prefetch(c + off, 0, 3);
}

// While block blk of a table is computed on, prefetch the block after it (block_elems values from head, the KV
// head's first block), if there is one in range.
template <typename T>
inline void prefetch_next(const T* head, const int64_t* table, int64_t blk, int64_t nb, int64_t num_blocks,
                          int64_t block_elems) {
  if (blk + 1 < nb && table[blk + 1] >= 0 && table[blk + 1] < num_blocks)
    prefetch_block(head + table[blk + 1] * block_elems, block_elems);
}

// A block's first n16 * 16 values as fp32: fp32 blocks are read in place, bf16 ones converted into buf.
inline const float* block_as_float(const float* src, float*, int64_t) { return src; }

inline const float* block_as_float(const c10::BFloat16* src, float* __restrict__ buf, int64_t n16) {
  for (int64_t i = 0; i < n16; ++i) store16(buf + i * 16, load16(src + i * 16));
  return buf;
}

// Max-subtracted softmax of each of the G rows of scores (len positions each, rows max_len apart), in place;
// the probabilities are left unnormalised and inv[g] is 1 / their sum. The sum runs in one fixed order (16-lane
// vectors from position 0, their tree sum, then the tail in order), whatever the buffer's address or max_len: a
// row's result never depends on the other rows of the call (batch invariance).
inline void softmax_rows(float* __restrict__ scores, float* __restrict__ inv, int64_t G, int64_t len,
                         int64_t max_len) {
  for (int64_t g = 0; g < G; ++g) {
    float* __restrict__ sg = scores + g * max_len;
    // the maximum (exact in any order): 16 lanes at a time, then the lanes and the tail
    const int64_t full = len / 16 * 16;
    f32x16 m16 = {};
    m16 -= std::numeric_limits<float>::infinity();
    for (int64_t p = 0; p < full; p += 16) {
      const f32x16 x = load16(sg + p);
      m16 = x > m16 ? x : m16;
    }
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < 16; ++l) m = std::max(m, m16[l]);
    for (int64_t p = full; p < len; ++p) m = std::max(m, sg[p]);
    for (int64_t p = 0; p < len; ++p) sg[p] = exp_nonpositive(sg[p] - m);  // a map: vectorises, no reduction
    f32x16 acc16 = {};
    for (int64_t p = 0; p < full; p += 16) acc16 += load16(sg + p);
    float sum = hsum(acc16);
    for (int64_t p = full; p < len; ++p) sum += sg[p];
    inv[g] = 1.0f / sum;
  }
}

// a[0 .. NV*16) += sum over t < count of w[t] * v[t * D ..], each output float summed over t in order. With NV
// known at compile time the NV slices are updated together per position (NV independent multiply-add chains, in
// registers); otherwise one slice at a time. Either way each float's sum runs in the same order, so both give the
// same bits.
template <int NV_CT>
inline void accumulate(float* __restrict__ a, const float* __restrict__ w, const float* __restrict__ v,
                       int64_t count, int64_t NV, int64_t D) {
  if constexpr (NV_CT > 0) {
    f32x16 s[NV_CT];
    for (int j = 0; j < NV_CT; ++j) s[j] = load16(a + j * 16);
    for (int64_t t = 0; t < count; ++t) {
      const float wt = w[t];
      for (int j = 0; j < NV_CT; ++j) s[j] += wt * load16(v + t * D + j * 16);
    }
    for (int j = 0; j < NV_CT; ++j) store16(a + j * 16, s[j]);
  } else {
    for (int64_t j = 0; j < NV; ++j) {
      f32x16 s = load16(a + j * 16);
      for (int64_t t = 0; t < count; ++t) s += w[t] * load16(v + t * D + j * 16);
      store16(a + j * 16, s);
    }
  }
}

// head_dim a multiple of 16: NV vectors of 16 (NV_CT > 0: known at compile time).
template <typename T, int NV_CT>
void run_vec(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
             const int64_t* __restrict__ tables, const int64_t* __restrict__ positions, T* __restrict__ out, int64_t n,
             int64_t kv_heads, int64_t G, int64_t head_dim, int64_t num_blocks, int64_t bs, int64_t width,
             int64_t max_len, float scale) {
  const int64_t NV = NV_CT > 0 ? NV_CT : head_dim / 16;
  const int64_t D = NV * 16;
  const int64_t head_stride = num_blocks * bs * D;  // elements between KV heads in a cache layer
  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    // per-chunk buffers, sized once: queries, one block of keys or values in fp32, scores, accumulators
    std::vector<float> qf(G * D), kvf(bs * D), scores(G * max_len), acc(G * D), inv(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t len = positions[r] + 1;
      const int64_t nb = (len + bs - 1) / bs;
      const T* qrow = q + (r * kv_heads + h) * G * D;
      for (int64_t i = 0; i < G * D; ++i) qf[i] = load_float(qrow[i]) * scale;
      const T* kh = kc + h * head_stride;
      const T* vh = vc + h * head_stride;
      const int64_t* table = tables + r * width;
      float* __restrict__ buf = kvf.data();
      if (task + 1 < end) {  // the next task's first key block, fetched while this task runs
        const int64_t r2 = (task + 1) / kv_heads, h2 = (task + 1) % kv_heads, b2 = tables[r2 * width];
        if (b2 >= 0 && b2 < num_blocks) prefetch_block(kc + h2 * head_stride + b2 * bs * D, bs * D);
      }

      // scores[g, p] = q_g . k_p (scaled), block by block
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t b = table[blk];
        TORCH_CHECK(b >= 0 && b < num_blocks, "decode_attention: block id ", b, " out of range [0, ", num_blocks, ")");
        const int64_t valid = std::min<int64_t>(bs, len - blk * bs);
        prefetch_next(kh, table, blk, nb, num_blocks, bs * D);
        const float* kf = block_as_float(kh + b * bs * D, buf, valid * NV);
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict__ qg = qf.data() + g * D;
          float* __restrict__ dst = scores.data() + g * max_len + blk * bs;
          int64_t t = 0;
          for (; t + 4 <= valid; t += 4) {  // four keys' sums reduced together (the same bits as one by one)
            const float* __restrict__ kt = kf + t * D;
            f32x16 s0 = load16(qg) * load16(kt), s1 = load16(qg) * load16(kt + D);
            f32x16 s2 = load16(qg) * load16(kt + 2 * D), s3 = load16(qg) * load16(kt + 3 * D);
            for (int64_t j = 1; j < NV; ++j) {
              const f32x16 qj = load16(qg + j * 16);
              s0 += qj * load16(kt + j * 16);
              s1 += qj * load16(kt + D + j * 16);
              s2 += qj * load16(kt + 2 * D + j * 16);
              s3 += qj * load16(kt + 3 * D + j * 16);
            }
            hsum4(s0, s1, s2, s3, dst + t);
          }
          for (; t < valid; ++t) {
            const float* __restrict__ kt = kf + t * D;
            f32x16 s = load16(qg) * load16(kt);
            for (int64_t j = 1; j < NV; ++j) s += load16(qg + j * 16) * load16(kt + j * 16);
            dst[t] = hsum(s);
          }
        }
      }

      prefetch_block(vh + table[0] * bs * D, bs * D);  // the first value block, read after the softmax
      softmax_rows(scores.data(), inv.data(), G, len, max_len);

      // acc[g, :] = sum_p w[g, p] * v_p, each 16-float slice summed in a register over a block's positions
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t blk = 0; blk < nb; ++blk) {
        const int64_t b = table[blk];
        const int64_t valid = std::min<int64_t>(bs, len - blk * bs);
        prefetch_next(vh, table, blk, nb, num_blocks, bs * D);
        const float* vf = block_as_float(vh + b * bs * D, buf, valid * NV);
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict__ w = scores.data() + g * max_len + blk * bs;
          float* __restrict__ a = acc.data() + g * D;
          accumulate<NV_CT>(a, w, vf, valid, NV, D);
        }
      }
      T* o = out + (r * kv_heads + h) * G * D;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) store(o + g * D + d, acc[g * D + d] * inv[g]);
    }
  });
}

// One query's attention in plain loops (any head_dim): the G query heads of KV head h at positions 0 .. len - 1
// of the row's table, into o [G * D]. qf, scores (G * max_len), acc and inv are the caller's buffers.
template <typename T>
void plain_query(const T* __restrict__ qrow, const T* __restrict__ kh, const T* __restrict__ vh,
                 const int64_t* __restrict__ table, int64_t len, int64_t G, int64_t D, int64_t num_blocks, int64_t bs,
                 int64_t max_len, float scale, float* qf, float* scores, float* acc, float* inv, T* o,
                 const char* what) {
  for (int64_t i = 0; i < G * D; ++i) qf[i] = load_float(qrow[i]) * scale;
  for (int64_t p = 0; p < len; ++p) {
    const int64_t b = table[p / bs];
    TORCH_CHECK(b >= 0 && b < num_blocks, what, ": block id ", b, " out of range [0, ", num_blocks, ")");
    const T* kt = kh + (b * bs + p % bs) * D;
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t d = 0; d < D; ++d) s += qf[g * D + d] * load_float(kt[d]);
      scores[g * max_len + p] = s;
    }
  }
  softmax_rows(scores, inv, G, len, max_len);
  std::fill(acc, acc + G * D, 0.0f);
  for (int64_t p = 0; p < len; ++p) {
    const T* vt = vh + (table[p / bs] * bs + p % bs) * D;
    for (int64_t g = 0; g < G; ++g) {
      const float w = scores[g * max_len + p];
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += w * load_float(vt[d]);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) store(o + g * D + d, acc[g * D + d] * inv[g]);
}

// any head_dim: plain loops.
template <typename T>
void run_plain(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
               const int64_t* __restrict__ tables, const int64_t* __restrict__ positions, T* __restrict__ out,
               int64_t n, int64_t kv_heads, int64_t G, int64_t D, int64_t num_blocks, int64_t bs, int64_t width,
               int64_t max_len, float scale) {
  const int64_t head_stride = num_blocks * bs * D;
  at::parallel_for(0, n * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), scores(G * max_len), acc(G * D), inv(G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      plain_query(q + (r * kv_heads + h) * G * D, kc + h * head_stride, vc + h * head_stride, tables + r * width,
                  positions[r] + 1, G, D, num_blocks, bs, max_len, scale, qf.data(), scores.data(), acc.data(),
                  inv.data(), out + (r * kv_heads + h) * G * D, "decode_attention");
    }
  });
}

// Prefill: each row's new tokens attend causally to its positions 0 .. their own, over its blocks (the row's earlier
// positions included: chunked prefill and prefix reuse start mid-sequence). Work is split into (row, kv head, tile
// of QT queries) tasks; a tile converts each key and value block to fp32 once for all its queries. With blocks of
// 16 the keys are transposed so that 16 scores are one vector (each a sum over head_dim in two chains, even and odd
// d); other block sizes take the decode kernel's dot products. Softmax and value sums are the decode kernel's.
// Every query's arithmetic is its own, in a fixed order, so a token's output is the same bits whatever the other
// tokens of its tile, row or call. Tasks are dealt to the threads longest first (each to the least loaded
// thread), since a tile's cost grows with its last position.
constexpr int64_t QT = 16;

struct PrefillTask {
  int64_t row, head, first, count, cost;
};

template <typename T, int NV_CT>
void prefill_vec(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                 const int64_t* __restrict__ tables, const int64_t* __restrict__ starts,
                 const int64_t* __restrict__ cached, const std::vector<PrefillTask>& tasks,
                 const std::vector<std::vector<int64_t>>& buckets, T* __restrict__ out, int64_t kv_heads, int64_t G,
                 int64_t head_dim, int64_t num_blocks, int64_t bs, int64_t width, int64_t max_len, float scale) {
  const int64_t NV = NV_CT > 0 ? NV_CT : head_dim / 16;
  const int64_t D = NV * 16;
  const int64_t head_stride = num_blocks * bs * D;
  const int64_t stride = (max_len + 15) / 16 * 16;  // between a query's scores and the next's
  const bool transposed = bs == 16;
  at::parallel_for(0, static_cast<int64_t>(buckets.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(QT * G * D), kvf(bs * D), kt(16 * D), scores(QT * G * stride), acc(QT * G * D),
        inv(QT * G);
    for (int64_t bk = begin; bk < end; ++bk) {
      for (const int64_t ti : buckets[bk]) {
        const PrefillTask& task = tasks[ti];
        const int64_t r = task.row, h = task.head, nq = task.count;
        const int64_t first_pos = cached[r] + task.first;  // the tile's first query position
        const int64_t len = first_pos + nq;                  // keys the tile's last query reads
        const int64_t nb = (len + bs - 1) / bs;
        for (int64_t i = 0; i < nq; ++i) {
          const T* qrow = q + ((starts[r] + task.first + i) * kv_heads + h) * G * D;
          for (int64_t j = 0; j < G * D; ++j) qf[i * G * D + j] = load_float(qrow[j]) * scale;
        }
        const T* kh = kc + h * head_stride;
        const T* vh = vc + h * head_stride;
        const int64_t* table = tables + r * width;
        float* __restrict__ buf = kvf.data();

        // scores[i, g, p] = q_ig . k_p (scaled), block by block, for the keys each query sees
        for (int64_t blk = 0; blk < nb; ++blk) {
          const int64_t b = table[blk];
          TORCH_CHECK(b >= 0 && b < num_blocks, "prefill_attention: block id ", b, " out of range [0, ", num_blocks, ")");
          const int64_t valid = std::min<int64_t>(bs, len - blk * bs);
          prefetch_next(kh, table, blk, nb, num_blocks, bs * D);
          const int64_t i_lo = std::max<int64_t>(0, blk * bs - first_pos);  // earlier queries see none of it
          if (transposed) {
            // the block's keys as fp32 columns, kt[d * 16 + t] (zeros past the valid ones), so 16 keys' scores are
            // one vector: D multiply-adds of a broadcast query value, four query vectors at a time
            const T* src = kh + b * bs * D;
            for (int64_t t = 0; t < 16; ++t)
              for (int64_t d = 0; d < D; ++d) kt[d * 16 + t] = t < valid ? load_float(src[t * D + d]) : 0.0f;
            const float* __restrict__ kp = kt.data();
            const int64_t v0 = i_lo * G, v1 = nq * G;
            int64_t v = v0;
            for (; v + 4 <= v1; v += 4) {
              const float *q0 = qf.data() + v * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
              // two partial sums per query (even and odd d), added at the end: half the rounding of one chain
              f32x16 s0 = {}, s1 = {}, s2 = {}, s3 = {}, e0 = {}, e1 = {}, e2 = {}, e3 = {};
              for (int64_t d = 0; d < D; d += 2) {
                const f32x16 kd = load16(kp + d * 16), ke = load16(kp + (d + 1) * 16);
                s0 += q0[d] * kd;
                s1 += q1[d] * kd;
                s2 += q2[d] * kd;
                s3 += q3[d] * kd;
                e0 += q0[d + 1] * ke;
                e1 += q1[d + 1] * ke;
                e2 += q2[d + 1] * ke;
                e3 += q3[d + 1] * ke;
              }
              s0 += e0;
              s1 += e1;
              s2 += e2;
              s3 += e3;
              float* dst = scores.data() + v * stride + blk * 16;
              store16(dst, s0);
              store16(dst + stride, s1);
              store16(dst + 2 * stride, s2);
              store16(dst + 3 * stride, s3);
            }
            for (; v < v1; ++v) {
              const float* q0 = qf.data() + v * D;
              f32x16 s0 = {}, e0 = {};
              for (int64_t d = 0; d < D; d += 2) {
                s0 += q0[d] * load16(kp + d * 16);
                e0 += q0[d + 1] * load16(kp + (d + 1) * 16);
              }
              s0 += e0;
              store16(scores.data() + v * stride + blk * 16, s0);
            }
            continue;
          }
          const float* kf = block_as_float(kh + b * bs * D, buf, valid * NV);
          for (int64_t i = i_lo; i < nq; ++i) {
            const int64_t own = std::min<int64_t>(valid, first_pos + i + 1 - blk * bs);  // keys this query sees
            for (int64_t g = 0; g < G; ++g) {
              const float* __restrict__ qg = qf.data() + (i * G + g) * D;
              float* __restrict__ dst = scores.data() + (i * G + g) * stride + blk * bs;
              for (int64_t t = 0; t < own; ++t) {
                const float* __restrict__ kt_ = kf + t * D;
                f32x16 s = load16(qg) * load16(kt_);
                for (int64_t j = 1; j < NV; ++j) s += load16(qg + j * 16) * load16(kt_ + j * 16);
                dst[t] = hsum(s);
              }
            }
          }
        }

        prefetch_block(vh + table[0] * bs * D, bs * D);
        for (int64_t i = 0; i < nq; ++i)
          softmax_rows(scores.data() + i * G * stride, inv.data() + i * G, G, first_pos + i + 1, stride);

        // acc[i, g, :] = sum_p w[i, g, p] * v_p, block by block
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t blk = 0; blk < nb; ++blk) {
          const int64_t b = table[blk];
          const int64_t valid = std::min<int64_t>(bs, len - blk * bs);
          prefetch_next(vh, table, blk, nb, num_blocks, bs * D);
          const float* vf = block_as_float(vh + b * bs * D, buf, valid * NV);
          for (int64_t i = std::max<int64_t>(0, blk * bs - first_pos); i < nq; ++i) {
            const int64_t own = std::min<int64_t>(valid, first_pos + i + 1 - blk * bs);
            for (int64_t g = 0; g < G; ++g) {
              const float* __restrict__ w = scores.data() + (i * G + g) * stride + blk * bs;
              float* __restrict__ a = acc.data() + (i * G + g) * D;
              accumulate<NV_CT>(a, w, vf, own, NV, D);
            }
          }
        }
        for (int64_t i = 0; i < nq; ++i) {
          T* o = out + ((starts[r] + task.first + i) * kv_heads + h) * G * D;
          for (int64_t g = 0; g < G; ++g)
            for (int64_t d = 0; d < D; ++d) store(o + g * D + d, acc[(i * G + g) * D + d] * inv[i * G + g]);
        }
      }
    }
  });
}

// any head_dim: each query through the plain decode loops, one (row, head, tile) task at a time.
template <typename T>
void prefill_plain(const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
                   const int64_t* __restrict__ tables, const int64_t* __restrict__ starts,
                   const int64_t* __restrict__ cached, const std::vector<PrefillTask>& tasks,
                   const std::vector<std::vector<int64_t>>& buckets, T* __restrict__ out, int64_t kv_heads, int64_t G,
                   int64_t D, int64_t num_blocks, int64_t bs, int64_t width, int64_t max_len, float scale) {
  const int64_t head_stride = num_blocks * bs * D;
  at::parallel_for(0, static_cast<int64_t>(buckets.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), scores(G * max_len), acc(G * D), inv(G);
    for (int64_t bk = begin; bk < end; ++bk) {
      for (const int64_t ti : buckets[bk]) {
        const PrefillTask& task = tasks[ti];
        for (int64_t i = 0; i < task.count; ++i) {
          const int64_t tok = starts[task.row] + task.first + i;
          const int64_t pos = cached[task.row] + task.first + i;
          plain_query(q + (tok * kv_heads + task.head) * G * D, kc + task.head * head_stride,
                      vc + task.head * head_stride, tables + task.row * width, pos + 1, G, D, num_blocks, bs, max_len,
                      scale, qf.data(), scores.data(), acc.data(), inv.data(), out + (tok * kv_heads + task.head) * G * D,
                      "prefill_attention");
        }
      }
    }
  });
}

template <typename T>
void dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
              const at::Tensor& positions, at::Tensor& out, int64_t max_len, double scale) {
  const int64_t n = q.size(0), kvh = q.size(1), G = q.size(2), D = q.size(3);
  const int64_t nblocks = k.size(1), bs = k.size(2), width = tables.size(1);
  auto args = [&](auto fn) {
    fn(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), tables.data_ptr<int64_t>(), positions.data_ptr<int64_t>(),
       out.data_ptr<T>(), n, kvh, G, D, nblocks, bs, width, max_len, static_cast<float>(scale));
  };
  switch (D % 16 == 0 ? D : 0) {
    case 32: args([](auto... a) { run_vec<T, 2>(a...); }); break;
    case 64: args([](auto... a) { run_vec<T, 4>(a...); }); break;
    case 80: args([](auto... a) { run_vec<T, 5>(a...); }); break;
    case 96: args([](auto... a) { run_vec<T, 6>(a...); }); break;
    case 128: args([](auto... a) { run_vec<T, 8>(a...); }); break;
    case 0: args([](auto... a) { run_plain<T>(a...); }); break;
    default: args([](auto... a) { run_vec<T, 0>(a...); }); break;
  }
}

// The checks decode_attention and prefill_attention share: q [*, kv_heads, G, head_dim] and the two caches,
// CPU, one dtype (fp32 or bf16), contiguous, their shapes agreeing.
void check_q_and_caches(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const char* what) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), what,
              ": CPU tensors only");
  TORCH_CHECK(q.dim() == 4, what, ": q must be [n, kv_heads, G, head_dim], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), what,
              ": caches must both be [kv_heads, num_blocks, block_size, head_dim]");
  TORCH_CHECK(k_cache.size(0) == q.size(1) && k_cache.size(3) == q.size(3), what, ": q ", q.sizes(),
              " does not match the cache ", k_cache.sizes());
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), what,
              ": q and the caches must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, what, ": fp32 or bf16 only, got ",
              q.scalar_type());
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), what,
              ": q and the caches must be contiguous");
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& tables, const at::Tensor& positions, double scale) {
  check_q_and_caches(q, k_cache, v_cache, "decode_attention");
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
  by_dtype(q.scalar_type(), [&](auto* tag) {
    dispatch<std::remove_pointer_t<decltype(tag)>>(q, k_cache, v_cache, tables, positions, out, max_len, scale);
  });
  return out;
}


at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& tables, const at::Tensor& starts, const at::Tensor& counts,
                             const at::Tensor& cached, double scale) {
  check_q_and_caches(q, k_cache, v_cache, "prefill_attention");
  for (const at::Tensor* t : {&tables, &starts, &counts, &cached})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(),
                "prefill_attention: tables, starts, counts and cached must be contiguous int64");
  const int64_t R = tables.size(0);
  TORCH_CHECK(tables.dim() == 2 && starts.dim() == 1 && starts.size(0) == R && counts.dim() == 1 &&
                  counts.size(0) == R && cached.dim() == 1 && cached.size(0) == R,
              "prefill_attention: tables [R, W], starts, counts and cached [R]");
  const int64_t N = q.size(0), kvh = q.size(1), G = q.size(2), D = q.size(3);
  const int64_t nblocks = k_cache.size(1), bs = k_cache.size(2), width = tables.size(1);
  const int64_t *st = starts.data_ptr<int64_t>(), *ct = counts.data_ptr<int64_t>(), *ca = cached.data_ptr<int64_t>();
  std::vector<PrefillTask> tasks;
  int64_t max_len = 1;
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(ct[r] >= 0 && st[r] >= 0 && st[r] + ct[r] <= N && ca[r] >= 0,
                "prefill_attention: row ", r, " tokens [", st[r], ", ", st[r] + ct[r], ") are outside q's ", N);
    TORCH_CHECK(ca[r] + ct[r] <= width * bs, "prefill_attention: row ", r, " position ", ca[r] + ct[r] - 1,
                " is outside its table of ", width, " blocks of ", bs);
    max_len = std::max(max_len, ca[r] + ct[r]);
    for (int64_t first = 0; first < ct[r]; first += QT)
      for (int64_t h = 0; h < kvh; ++h) {
        const int64_t count = std::min<int64_t>(QT, ct[r] - first);
        tasks.push_back({r, h, first, count, count * (ca[r] + first + count)});
      }
  }
  at::Tensor out = at::zeros({N, kvh * G * D}, q.options());
  if (tasks.empty()) return out;
  // longest first, each to the least loaded thread (LPT): the threads' shares of the work come out even
  std::vector<int64_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<int64_t>(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return tasks[a].cost > tasks[b].cost; });
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size())));
  std::vector<std::vector<int64_t>> buckets(nt);
  std::vector<int64_t> load(nt, 0);
  for (const int64_t i : order) {
    const int64_t k = std::min_element(load.begin(), load.end()) - load.begin();
    buckets[k].push_back(i);
    load[k] += tasks[i].cost + 1;
  }
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto args = [&](auto fn) {
      fn(q.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(), tables.data_ptr<int64_t>(), st, ca, tasks,
         buckets, out.data_ptr<T>(), kvh, G, D, nblocks, bs, width, max_len, static_cast<float>(scale));
    };
    switch (D % 16 == 0 ? D : 0) {
      case 32: args([](auto&&... a) { prefill_vec<T, 2>(a...); }); break;
      case 64: args([](auto&&... a) { prefill_vec<T, 4>(a...); }); break;
      case 80: args([](auto&&... a) { prefill_vec<T, 5>(a...); }); break;
      case 96: args([](auto&&... a) { prefill_vec<T, 6>(a...); }); break;
      case 128: args([](auto&&... a) { prefill_vec<T, 8>(a...); }); break;
      case 0: args([](auto&&... a) { prefill_plain<T>(a...); }); break;
      default: args([](auto&&... a) { prefill_vec<T, 0>(a...); }); break;
    }
  };
  by_dtype(q.scalar_type(), run);
  return out;
}

}  // namespace stanceserve
