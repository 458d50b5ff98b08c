// SIMD vector abstraction for the sparse kernels: one kernel source (kernels.h), compiled once per
// instruction set. PS_AVX2 is defined by the translation units compiled with -mavx2 -mfma (VecF,
// 8 lanes), PS_AVX512 by the one compiled with AVX-512 F/DQ/VL as well (VecF16, 16 lanes, and
// VecF); without either, the portable baseline (plain loops the compiler vectorises for the
// baseline ISA). Compiler flags per translation unit are the only place an ISA is chosen; ops.cpp
// picks a table at run time from the CPU's features. A new instruction set is one more vector
// type and one more kern_*.cpp.
#pragma once

#include <cstdint>

#if defined(PS_AVX2) || defined(PS_AVX512)
#include <immintrin.h>
#endif

namespace ps {
namespace {  // internal linkage: each instruction set's copy stays in its own translation unit

#if defined(PS_AVX2)
// out[0..8) += horizontal sums of eight 8-lane vectors.
static inline void reduce8_add_m256(const __m256* a, float* out) {
  __m256 t0 = _mm256_hadd_ps(a[0], a[1]);
  __m256 t1 = _mm256_hadd_ps(a[2], a[3]);
  __m256 t2 = _mm256_hadd_ps(a[4], a[5]);
  __m256 t3 = _mm256_hadd_ps(a[6], a[7]);
  t0 = _mm256_hadd_ps(t0, t1);  // [s0 s1 s2 s3 | s0 s1 s2 s3] low and high halves
  t2 = _mm256_hadd_ps(t2, t3);
  __m256 lo = _mm256_permute2f128_ps(t0, t2, 0x20);
  __m256 hi = _mm256_permute2f128_ps(t0, t2, 0x31);
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_loadu_ps(out), _mm256_add_ps(lo, hi)));
}

// out[0..4) += horizontal sums of four 8-lane vectors.
static inline void reduce4_add_m256(const __m256* a, float* out) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm_loadu_ps(out), s));
}

static inline float hsum_m256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 x 8 transpose: rows src[r * srs + 0..8) -> dst[c * drs + 0..8) holds column c.
static inline void transpose8x8(const float* src, int64_t srs, float* dst, int64_t drs) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * srs), r1 = _mm256_loadu_ps(src + 1 * srs);
  __m256 r2 = _mm256_loadu_ps(src + 2 * srs), r3 = _mm256_loadu_ps(src + 3 * srs);
  __m256 r4 = _mm256_loadu_ps(src + 4 * srs), r5 = _mm256_loadu_ps(src + 5 * srs);
  __m256 r6 = _mm256_loadu_ps(src + 6 * srs), r7 = _mm256_loadu_ps(src + 7 * srs);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * drs, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * drs, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * drs, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * drs, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * drs, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * drs, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * drs, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * drs, _mm256_permute2f128_ps(u3, u7, 0x31));
}
#endif

#if defined(PS_AVX2)
struct VecF {
  using T = float;
  using R = __m256;
  using M = __m256i;
  static constexpr int W = 8;
  static constexpr bool kBlockTranspose = true;
#if defined(PS_AVX512)
  static constexpr int kRegisters = 32;  // AVX-512VL: ymm16-31 as well
#else
  static constexpr int kRegisters = 16;
#endif
  static R zero() { return _mm256_setzero_ps(); }
  static R set1(T v) { return _mm256_set1_ps(v); }
  static R load(const T* p) { return _mm256_loadu_ps(p); }
  static M mask(int n) {
    alignas(32) static const int32_t table[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                  0,  0,  0,  0,  0,  0,  0,  0};
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table + 8 - n));
  }
  static R loadm(const T* p, M m) { return _mm256_maskload_ps(p, m); }
  static void store(T* p, R v) { _mm256_storeu_ps(p, v); }
  static void storem(T* p, R v, M m) { _mm256_maskstore_ps(p, m, v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static void prefetch(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
  // max(0, a); maxps returns its second operand when either is NaN, so NaN stays NaN
  static R relu(R a) { return _mm256_max_ps(_mm256_setzero_ps(), a); }
  // torch.maximum: NaN where either is NaN (maxps gives b then; a where a alone is NaN)
  static R max_nan(R a, R b) {
    return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }
  static T hsum(R v) { return hsum_m256(v); }
  static void reduce8_add(const R* a, T* out) { reduce8_add_m256(a, out); }
  static void reduce4_add(const R* a, T* out) { reduce4_add_m256(a, out); }
  static void transpose8(const T* src, int64_t srs, T* dst, int64_t drs) {
    transpose8x8(src, srs, dst, drs);
  }
};
#endif

#if defined(PS_AVX512)
// 16 lanes of float in one 512-bit register (AVX-512 F and DQ). Horizontal sums fold each vector
// to its two 256-bit halves' sum and reduce as VecF does; transposes stay 8 x 8 (a buffer's rows
// are stored as runs of 8 lanes whatever the vector width).
struct VecF16 {
  using T = float;
  using R = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static constexpr bool kBlockTranspose = true;
  static constexpr int kRegisters = 32;
  static R zero() { return _mm512_setzero_ps(); }
  static R set1(T v) { return _mm512_set1_ps(v); }
  static R load(const T* p) { return _mm512_loadu_ps(p); }
  static M mask(int n) { return static_cast<M>((1u << n) - 1u); }
  static R loadm(const T* p, M m) { return _mm512_maskz_loadu_ps(m, p); }  // no fault past m
  static void store(T* p, R v) { _mm512_storeu_ps(p, v); }
  static void storem(T* p, R v, M m) { _mm512_mask_storeu_ps(p, m, v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static void prefetch(const T* p) { _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0); }
  // max(0, a); like maxps, returns its second operand when either is NaN, so NaN stays NaN
  static R relu(R a) { return _mm512_max_ps(_mm512_setzero_ps(), a); }
  // torch.maximum: NaN where either is NaN (maxps gives b then; a where a alone is NaN)
  static R max_nan(R a, R b) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_max_ps(a, b), a);
  }
  static __m256 fold(R v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  }
  static T hsum(R v) { return hsum_m256(fold(v)); }
  static void reduce8_add(const R* a, T* out) {
    const __m256 h[8] = {fold(a[0]), fold(a[1]), fold(a[2]), fold(a[3]),
                         fold(a[4]), fold(a[5]), fold(a[6]), fold(a[7])};
    reduce8_add_m256(h, out);
  }
  static void reduce4_add(const R* a, T* out) {
    const __m256 h[4] = {fold(a[0]), fold(a[1]), fold(a[2]), fold(a[3])};
    reduce4_add_m256(h, out);
  }
  static void transpose8(const T* src, int64_t srs, T* dst, int64_t drs) {
    transpose8x8(src, srs, dst, drs);
  }
};
#endif

// The portable vector: W lanes of plain scalars. Used for float on CPUs without AVX2 and for
// float64 everywhere (float64 exists for gradcheck and checking; float32 is the fast path).
template <class Scalar, int Lanes>
struct VecGeneric {
  using T = Scalar;
  struct R {
    T v[Lanes];
  };
  using M = int;
  static constexpr int W = Lanes;
  static constexpr bool kBlockTranspose = false;
  static constexpr int kRegisters = 16;
  static R zero() { return set1(T(0)); }
  static R set1(T x) {
    R r;
    for (int i = 0; i < W; ++i) r.v[i] = x;
    return r;
  }
  static R load(const T* p) {
    R r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  static M mask(int n) { return n; }
  static R loadm(const T* p, M n) {
    R r;
    for (int i = 0; i < W; ++i) r.v[i] = i < n ? p[i] : T(0);
    return r;
  }
  static void store(T* p, R x) {
    for (int i = 0; i < W; ++i) p[i] = x.v[i];
  }
  static void storem(T* p, R x, M n) {
    for (int i = 0; i < n; ++i) p[i] = x.v[i];
  }
  static R fma(R a, R b, R c) {
    for (int i = 0; i < W; ++i) c.v[i] += a.v[i] * b.v[i];
    return c;
  }
  static R mul(R a, R b) {
    for (int i = 0; i < W; ++i) a.v[i] *= b.v[i];
    return a;
  }
  static R add(R a, R b) {
    for (int i = 0; i < W; ++i) a.v[i] += b.v[i];
    return a;
  }
  static void prefetch(const T*) {}
  static R relu(R a) {
    for (int i = 0; i < W; ++i) a.v[i] = a.v[i] < T(0) ? T(0) : a.v[i];  // NaN stays NaN
    return a;
  }
  static R max_nan(R a, R b) {  // torch.maximum: NaN where either is NaN
    for (int i = 0; i < W; ++i) a.v[i] = (a.v[i] > b.v[i] || a.v[i] != a.v[i]) ? a.v[i] : b.v[i];
    return a;
  }
  static T hsum(R x) {
    T s = 0;
    for (int i = 0; i < W; ++i) s += x.v[i];
    return s;
  }
  static void reduce8_add(const R* a, T* out) {
    for (int j = 0; j < 8; ++j) out[j] += hsum(a[j]);
  }
  static void reduce4_add(const R* a, T* out) {
    for (int j = 0; j < 4; ++j) out[j] += hsum(a[j]);
  }
  static void transpose8(const T*, int64_t, T*, int64_t) {}
};

}  // namespace
}  // namespace ps
