// The LoRA terms of a step's tokens on CPU, each token's in a fixed order of its own (batch-invariant BGMV).
//
// lora_rows_(x, y, At, Bg, group_of_part, index_in_group, offsets, idx, weights, segments)
//   x        [N, d_in], fp32 or bf16, rows contiguous (any row stride): the step's packed tokens
//   y        [N, D_out], x's dtype, contiguous: the base output, updated in place
//   At       [S, d_in, P * R] contiguous: every part's A^T of each slot side by side (R columns per part)
//   Bg       per part group, [S, count, R, n] contiguous: the group's parts' B^T (scaling folded in)
//   group_of_part, index_in_group, offsets: per part p, its group, its index in that group and its first column
//            in y (part p's columns are offsets[p] .. + n of its group)
//   idx      [rows, K] int64 slot of each term; weights [rows, K] (x's dtype) its blend weight (0: no term)
//   segments [rows, 2] int64: row r's tokens are x[start .. end); empty: decode, token r is row r
//
// For each token of row b: y[token, part p] += sum over terms k (in order) of w_bk * sum over j < R (in order) of
// (x[token] . At[s_bk, :, p*R + j]) * Bt_p[s_bk, j, :], in fp32, rounded once into y. The A products sum over d_in
// in order, each of the P*R columns in its own lane. A row's tokens go in tiles of TILE that share each load of A
// and B; each token keeps its own sums in its own order, so a token gets the same bits whatever its tile, its step's
// other rows and the adapters they use (one for all, or one each), in prefill as in decode: the step's mix cannot
// change a row's output. Terms of weight 0 are skipped (a padding term reads nothing).
//
// Not here: CUDA.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vec.h"

namespace stanceserve {
namespace {

constexpr int64_t TILE = 4;  // tokens of one row computed together (each keeps its own order of sums)

// xa[t][0 .. PR) = x_t . At[slot] (fp32) for the nt <= TILE tokens x_t = x + t * x_stride, summed over d_in in
// order. NA > 0: PR = NA * 16 columns, the tile's sums in registers, each At row loaded once for the tile.
template <int NA, typename T>
inline void a_products(const T* __restrict__ x, int64_t x_stride, int64_t nt, const T* __restrict__ at,
                       int64_t d_in, int64_t PR, float* __restrict__ xa) {
  if constexpr (NA > 0) {
    if (nt == TILE && NA <= 4) {
      f32x16 acc[TILE][NA] = {};
      for (int64_t i = 0; i < d_in; ++i) {
        const T* row = at + i * PR;
        f32x16 av[NA];
        for (int j = 0; j < NA; ++j) av[j] = load16(row + j * 16);
        for (int t = 0; t < TILE; ++t) {
          const float xi = load_float(x[t * x_stride + i]);
          for (int j = 0; j < NA; ++j) acc[t][j] += xi * av[j];
        }
      }
      for (int t = 0; t < TILE; ++t)
        for (int j = 0; j < NA; ++j) store16(xa + t * PR + j * 16, acc[t][j]);
      return;
    }
    for (int64_t t = 0; t < nt; ++t) {
      f32x16 acc[NA] = {};
      const T* xt = x + t * x_stride;
      for (int64_t i = 0; i < d_in; ++i) {
        const float xi = load_float(xt[i]);
        const T* row = at + i * PR;
        for (int j = 0; j < NA; ++j) acc[j] += xi * load16(row + j * 16);
      }
      for (int j = 0; j < NA; ++j) store16(xa + t * PR + j * 16, acc[j]);
    }
  } else {
    for (int64_t t = 0; t < nt; ++t) {
      float* out = xa + t * PR;
      const T* xt = x + t * x_stride;
      std::fill(out, out + PR, 0.0f);
      for (int64_t i = 0; i < d_in; ++i) {
        const float xi = load_float(xt[i]);
        const T* row = at + i * PR;
        for (int64_t j = 0; j < PR; ++j) out[j] += xi * load_float(row[j]);
      }
    }
  }
}

struct Tile {
  int64_t row, first, count;  // a row's tokens first .. first + count (indices into x and y)
};

template <int NA, typename T>
void run(const at::Tensor& x, at::Tensor& y, const at::Tensor& At, const std::vector<at::Tensor>& Bg,
         const std::vector<int64_t>& group_of_part, const std::vector<int64_t>& index_in_group,
         const std::vector<int64_t>& offsets, const at::Tensor& idx, const at::Tensor& weights,
         const std::vector<Tile>& tiles) {
  const int64_t d_in = x.size(1), D_out = y.size(1), K = idx.size(1);
  const int64_t PR = At.size(2), P = static_cast<int64_t>(offsets.size()), R = PR / P;
  const int64_t x_stride = x.stride(0);
  const T* xp = x.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  const T* atp = At.data_ptr<T>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const T* wp = weights.data_ptr<T>();
  std::vector<const T*> bptr(P);
  std::vector<int64_t> bn(P), bcount(P);
  for (int64_t p = 0; p < P; ++p) {
    const at::Tensor& g = Bg[group_of_part[p]];
    bcount[p] = g.size(1);
    bn[p] = g.size(3);
    bptr[p] = g.data_ptr<T>() + index_in_group[p] * R * bn[p];  // part p's rows of slot 0
  }
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xa(K * TILE * PR), acc(TILE * D_out);
    std::vector<int64_t> slot(K);
    for (int64_t ti = begin; ti < end; ++ti) {
      const Tile tile = tiles[ti];
      const int64_t b = tile.row, nt = tile.count;
      int64_t terms = 0;
      for (int64_t k = 0; k < K; ++k) {
        const float w = load_float(wp[b * K + k]);
        if (w == 0.0f) continue;
        slot[terms] = ip[b * K + k];
        float* xt = xa.data() + terms * TILE * PR;
        a_products<NA>(xp + tile.first * x_stride, x_stride, nt, atp + slot[terms] * d_in * PR, d_in, PR, xt);
        for (int64_t j = 0; j < nt * PR; ++j) xt[j] *= w;
        ++terms;
      }
      if (terms == 0) continue;
      std::fill(acc.begin(), acc.begin() + nt * D_out, 0.0f);
      for (int64_t p = 0; p < P; ++p) {
        const int64_t n = bn[p];
        for (int64_t tm = 0; tm < terms; ++tm) {
          const T* B = bptr[p] + slot[tm] * bcount[p] * R * n;  // [R, n] of this slot and part
          for (int64_t j = 0; j < R; ++j) {
            const T* brow = B + j * n;
            for (int64_t t = 0; t < nt; ++t) {
              const float aj = xa[(tm * TILE + t) * PR + p * R + j];
              float* __restrict__ out = acc.data() + t * D_out + offsets[p];
              for (int64_t c = 0; c < n; ++c) out[c] += aj * load_float(brow[c]);
            }
          }
        }
      }
      for (int64_t t = 0; t < nt; ++t) {
        T* yr = yp + (tile.first + t) * D_out;
        const float* a = acc.data() + t * D_out;
        for (int64_t c = 0; c < D_out; ++c) store(yr + c, load_float(yr[c]) + a[c]);
      }
    }
  });
}

}  // namespace

void lora_rows_(const at::Tensor& x, at::Tensor& y, const at::Tensor& At, const std::vector<at::Tensor>& Bg,
                const std::vector<int64_t>& group_of_part, const std::vector<int64_t>& index_in_group,
                const std::vector<int64_t>& offsets, const at::Tensor& idx, const at::Tensor& weights,
                const at::Tensor& segments) {
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu() && At.device().is_cpu(), "lora_rows_: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "lora_rows_: fp32 or bf16 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && y.dim() == 2 && y.is_contiguous() && y.size(0) == x.size(0),
              "lora_rows_: x [rows, d_in] (rows contiguous) and a contiguous y [rows, D_out]");
  TORCH_CHECK(At.dim() == 3 && At.is_contiguous() && At.size(1) == x.size(1), "lora_rows_: At must be [S, d_in, P*R]");
  const int64_t P = static_cast<int64_t>(offsets.size());
  TORCH_CHECK(P > 0 && At.size(2) % P == 0 && static_cast<int64_t>(group_of_part.size()) == P &&
                  static_cast<int64_t>(index_in_group.size()) == P,
              "lora_rows_: one group, index and offset per part");
  const int64_t R = At.size(2) / P, S = At.size(0);
  for (int64_t p = 0; p < P; ++p) {
    TORCH_CHECK(group_of_part[p] >= 0 && group_of_part[p] < static_cast<int64_t>(Bg.size()), "lora_rows_: bad group");
    const at::Tensor& g = Bg[group_of_part[p]];
    TORCH_CHECK(g.dim() == 4 && g.is_contiguous() && g.size(0) == S && g.size(2) == R && index_in_group[p] >= 0 &&
                    index_in_group[p] < g.size(1) && offsets[p] >= 0 && offsets[p] + g.size(3) <= y.size(1),
                "lora_rows_: part ", p, "'s B group must be a contiguous [S, count, R, n] inside y");
  }
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && At.scalar_type() == x.scalar_type(),
              "lora_rows_: x, y, At and Bg must share a dtype");
  for (const at::Tensor& g : Bg)
    TORCH_CHECK(g.scalar_type() == x.scalar_type(), "lora_rows_: x, y, At and Bg must share a dtype");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.is_contiguous() &&
                  weights.scalar_type() == x.scalar_type() && weights.sizes() == idx.sizes() && weights.is_contiguous(),
              "lora_rows_: idx [rows, K] int64 and weights [rows, K] of x's dtype, contiguous");
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < idx.numel(); ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < S, "lora_rows_: slot ", ip[i], " outside the ", S, " slots");
  const int64_t rows = idx.size(0), N = x.size(0);
  std::vector<Tile> tiles;
  if (segments.numel() == 0) {  // decode: token r is row r
    TORCH_CHECK(rows == N, "lora_rows_: without segments, idx needs one row per token of x");
    for (int64_t r = 0; r < rows; ++r) tiles.push_back({r, r, 1});
  } else {
    TORCH_CHECK(segments.scalar_type() == at::kLong && segments.dim() == 2 && segments.size(0) == rows &&
                    segments.size(1) == 2 && segments.is_contiguous(),
                "lora_rows_: segments must be a contiguous [rows, 2] int64 (start, end)");
    const int64_t* sp = segments.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK(sp[2 * r] >= 0 && sp[2 * r] <= sp[2 * r + 1] && sp[2 * r + 1] <= N, "lora_rows_: row ", r,
                  " tokens [", sp[2 * r], ", ", sp[2 * r + 1], ") outside x's ", N);
      for (int64_t a = sp[2 * r]; a < sp[2 * r + 1]; a += TILE) tiles.push_back({r, a, std::min(TILE, sp[2 * r + 1] - a)});
    }
  }
  if (tiles.empty()) return;
  const int64_t PR = At.size(2);
  auto go = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    switch (PR % 16 == 0 && PR <= 128 ? PR / 16 : 0) {
      case 1: run<1, T>(x, y, At, Bg, group_of_part, index_in_group, offsets, idx, weights, tiles); break;
      case 2: run<2, T>(x, y, At, Bg, group_of_part, index_in_group, offsets, idx, weights, tiles); break;
      case 3: run<3, T>(x, y, At, Bg, group_of_part, index_in_group, offsets, idx, weights, tiles); break;
      case 4: run<4, T>(x, y, At, Bg, group_of_part, index_in_group, offsets, idx, weights, tiles); break;
      case 6: run<6, T>(x, y, At, Bg, group_of_part, index_in_group, offsets, idx, weights, tiles); break;
      case 8: run<8, T>(x, y, At, Bg, group_of_part, index_in_group, offsets, idx, weights, tiles); break;
      default: run<0, T>(x, y, At, Bg, group_of_part, index_in_group, offsets, idx, weights, tiles); break;
    }
  };
  by_dtype(x.scalar_type(), go);
}

}  // namespace stanceserve
