// Shared by the CPU kernels: 16-float vectors (GCC/Clang vector extensions, lowered to the widest registers
// -march=native offers), fp32/bf16 loads and stores, a fixed-order lane sum and exp for non-positive arguments.
// Everything lives in namespace stanceserve::{anonymous}, so each source file gets its own inline copies.

#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace stanceserve {
namespace {

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline float load_float(float x) { return x; }

inline float load_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// 16 consecutive values as fp32 (unaligned loads)
inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline f32x16 load16(const c10::BFloat16* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof(v)); }

inline void store(float* dst, float x) { *dst = x; }
inline void store(c10::BFloat16* dst, float x) { *dst = c10::BFloat16(x); }  // round to nearest even

// lanes l and l + 8 added (the first step of hsum)
inline f32x8 fold_halves(f32x16 v) {
  f32x8 lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  return lo + hi;
}

// the sum of the 16 lanes, as a tree (halves added as vectors first)
inline float hsum(f32x16 v) {
  const f32x8 s = fold_halves(v);
  return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

typedef float f32x4 __attribute__((vector_size(16)));

// hsum of four vectors at once: out[i] = hsum(s_i), the very additions of hsum in the same order (so the same bits),
// done on packed lanes: about half the instructions of four hsum calls
inline void hsum4(f32x16 s0, f32x16 s1, f32x16 s2, f32x16 s3, float* out) {
  const f32x8 h0 = fold_halves(s0), h1 = fold_halves(s1), h2 = fold_halves(s2), h3 = fold_halves(s3);
  // (l, l + 4) pairs: [h0[0]+h0[4] .. h0[3]+h0[7], h1[0]+h1[4] ..]
  const f32x8 u01 = __builtin_shufflevector(h0, h1, 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(h0, h1, 4, 5, 6, 7, 12, 13, 14, 15);
  const f32x8 u23 = __builtin_shufflevector(h2, h3, 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(h2, h3, 4, 5, 6, 7, 12, 13, 14, 15);
  // (a0 + a1), (a2 + a3) of each vector
  const f32x8 w = __builtin_shufflevector(u01, u23, 0, 2, 4, 6, 8, 10, 12, 14) +
                  __builtin_shufflevector(u01, u23, 1, 3, 5, 7, 9, 11, 13, 15);
  const f32x4 r = __builtin_shufflevector(w, w, 0, 2, 4, 6) + __builtin_shufflevector(w, w, 1, 3, 5, 7);
  std::memcpy(out, &r, sizeof(r));
}

// exp(x) for x <= 0 (scores minus their maximum) in plain arithmetic, so that the softmax loop vectorises:
// exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, exp(r) by Cephes' expf polynomial (about 2 ulp).
// Below -87 it returns exp(-87) ~ 1.6e-38, which adds nothing next to the maximum's exp(0) = 1.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// f(static_cast<T*>(nullptr)) with T float for fp32 and c10::BFloat16 otherwise (callers check the dtype first)
template <typename F>
inline void by_dtype(c10::ScalarType dtype, F&& f) {
  if (dtype == c10::kFloat)
    f(static_cast<float*>(nullptr));
  else
    f(static_cast<c10::BFloat16*>(nullptr));
}

}  // namespace
}  // namespace stanceserve
