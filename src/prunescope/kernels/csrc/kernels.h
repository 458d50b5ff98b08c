// The sparse kernels, written once over the vector type of vec.h and compiled once per
// instruction set. Everything here has internal linkage (anonymous namespace): template code
// compiled with -mavx2 must never be merged by the linker into the baseline translation unit.
//
// Layout: the batch (and, for convolutions, the output columns) is the innermost, contiguous
// dimension, so every kept weight contributes one AXPY over a contiguous run of lanes: no gathers,
// no scatters, full-width vector loads. See docs/kernels.md.
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <memory>

#include "aligned.h"
#include "table.h"
#include "vec.h"

namespace ps {
namespace {

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- gather: y = W x over the kept taps of each row ---------------------------------------------
// Rows of up to 64 lanes written transposed (y[lane * y_t + row], rows contiguous) go through a
// buffer of 64 rows and 8 x 8 register transposes: each lane's 64 outputs land as one 256-byte
// run (four whole cache lines), eight lanes at a time. Lanes 2^k bytes apart (1024 or 4096
// features) share one L1 set: with 8-row runs every line was written in two halves, likely
// evicted in between (16 rows against 8: 1.06-1.11x faster forward at 1024 -> 1024, batch
// 64-256). 64 rows against 16 (one process alternating call by call, 60 pairs, 95-98%): forward,
// one thread, 1.12-1.15x at 1024 -> 1024 batch 64, 1.06x at batch 256, 1.08x at 768 -> 3072,
// 1.06x at 4096 -> 4096, 1.03x at 3072 -> 768; forward + backward on two threads 1.01-1.10x,
// with cold caches (the dense layer's step before every call) 1.03-1.05x; other widths (1000 ->
// 1000, 784 -> 300, 300 -> 100, MiniLM's 384 -> 1536 and 1536 -> 384 at batch 512, one and two
// threads) 0.98-1.05x. 128 rows (32 KiB, a whole L1) against 64: 1.00-1.05x, within the noise.
constexpr int kBufLanes = 64;
constexpr int kBufRows = 64;

// Rows in whole blocks of 8 and lanes in blocks of 8 through register transposes, the rest scalar.
template <class V>
void store_transposed(const typename V::T* buf, int rows, int n, typename V::T* y, int64_t y_t) {
  const int rb = V::kBlockTranspose ? rows / 8 * 8 : 0, lb = rb > 0 ? n / 8 * 8 : 0;
  for (int l = 0; l < lb; l += 8)
    for (int r = 0; r < rb; r += 8)
      V::transpose8(buf + r * kBufLanes + l, kBufLanes, y + l * y_t + r, y_t);
  for (int l = 0; l < n; ++l)
    for (int r = l < lb ? rb : 0; r < rows; ++r) y[l * y_t + r] = buf[r * kBufLanes + l];
}

// One output tile (NV full vectors and an optional masked tail, n lanes) per row, accumulated in
// registers over the row's taps; U independent accumulator sets when the tile is too narrow to hide
// the FMA latency. The row loop is inside the instantiation, so a row costs no call. y_t == 1:
// lanes contiguous, row k at y + k * y_k; otherwise lane t at y + t * y_t and y_k must be 1.
// Row k's taps are [ptr[k * ps], ptr[k * ps + 1]) (ps > 1: one block of a row's columns, see
// gather). With `part`, the row's NT vectors start from part (from_part) instead of the bias,
// and end in part (to_part) instead of y: the partial sums between column blocks. `relu`: the
// stored outputs are max(0, y) (a fused ReLU; partial sums are never clipped).
// Each tap's input run is requested kPrefetchTaps taps ahead (one prefetch per cache line): the
// runs a row reads are scattered (its kept columns), beyond what the hardware prefetchers follow.
// Where the rows' taps are contiguous (no column blocks), the requests run on into the next rows'
// taps, so a row's first runs are requested before it starts, and the test stays true to the
// range's end instead of flipping near every row's end (1.01-1.05x, 95-98%, forward and forward +
// backward, one process alternating call by call).
// Measured in alternating processes on Conv-2 at 90%, batch 64: its 64 -> 64 convolution 19.7 /
// 17.3 ms against 22.1 / 18.7 ms without (one thread), its 16384 -> 256 Linear 2.8-3.0 against
// 2.9-3.7 ms; 16 taps ahead was no better than 8. Runs shorter than a cache line (batch 1: one
// lane) are not prefetched: there the prefetches cost more than they hide (LeNet-300-100 at
// batch 1 from its sparse file, 2 threads: 0.058-0.061 ms with them, 0.045 ms without). A
// Linear's gather requests them only where its input is larger than the L2 budget (ops.cpp,
// runs_beyond_l2; GatherArgs::prefetch): on the Intel Xeon of 2026-12-04 the requests for runs in
// L2 took load slots for nothing (one process alternating call by call, without against with:
// LeNet-300-100's inference at batch 64 1.24x faster, MiniLM's 1.11x, a Linear's forward 1.07-1.12x
// at 1024x1024, 768x3072 and 4096x4096, 90-95%; Conv-2, whose 16384 -> 256 layer reads beyond L2,
// 0.99x; the convolutions keep them: Conv-2 without them on its convolutions 0.95x). The Linear
// backward keeps them too (without: 1.01-1.05x on 1024x1024, 0.96-0.97x on 4096x4096).
constexpr int64_t kPrefetchTaps = 8;
template <class V, int NT>
constexpr bool kPrefetch = NT * V::W * sizeof(typename V::T) >= 64;

// Requests tap j's run of NT vectors (x + idx[j] * ld) into L1, one prefetch per cache line.
template <class V, int NT>
void request_run(const typename V::T* x, const int32_t* idx, int64_t j, int64_t ld) {
  const typename V::T* run = x + static_cast<int64_t>(idx[j]) * ld;
  for (int v = 0; v < NT * V::W; v += 64 / static_cast<int>(sizeof(typename V::T)))
    V::prefetch(run + v);
}

// A row's finished sums (NV vectors and an optional masked tail) go to the partial sums between
// column blocks (to_part: all lanes, the padded ones are never stored to y), or to y: lanes
// contiguous (y_t == 1), or transposed through buf, whose rows from `group` on are stored as
// lanes' runs once it holds kBufRows rows or row k is the range's last.
template <class V, int NV, bool TAIL>
void finish_row(typename V::R* acc, int64_t k, int64_t r1, typename V::T* pk, bool to_part,
                bool relu, typename V::T* y, int64_t y_k, int64_t y_t, typename V::T* buf,
                int64_t& group, typename V::M m, int n) {
  constexpr int W = V::W;
  constexpr int NT = NV + (TAIL ? 1 : 0);
  if (to_part) {
    for (int v = 0; v < NT; ++v) V::store(pk + v * W, acc[v]);
    return;
  }
  if (relu)
    for (int v = 0; v < NT; ++v) acc[v] = V::relu(acc[v]);
  typename V::T* yk = y_t == 1 ? y + k * y_k : buf + (k - group) * kBufLanes;
  for (int v = 0; v < NV; ++v) V::store(yk + v * W, acc[v]);
  if (TAIL) V::storem(yk + NV * W, acc[NT - 1], m);
  if (y_t != 1 && (k + 1 - group == kBufRows || k + 1 == r1)) {
    store_transposed<V>(buf, static_cast<int>(k + 1 - group), n, y + group, y_t);
    group = k + 1;
  }
}

template <class V, int NV, bool TAIL, int U>
void gather_rows(const typename V::T* __restrict x, typename V::T* __restrict y, int64_t y_k,
                 int64_t y_t, const int64_t* __restrict ptr, int64_t ps,
                 const int32_t* __restrict idx, int64_t ld, const typename V::T* __restrict vals,
                 const typename V::T* __restrict bias, int64_t r0, int64_t r1, typename V::M m,
                 int n, typename V::T* __restrict part, bool from_part, bool to_part,
                 bool relu, bool prefetch) {
  using R = typename V::R;
  using T = typename V::T;
  constexpr int W = V::W;
  constexpr int NT = NV + (TAIL ? 1 : 0);
  if constexpr (NT == 0) return;  // no lanes (never called; keeps the table total)
  alignas(64) T buf[kBufRows * kBufLanes];
  int64_t group = r0;  // first row held in buf
  for (int64_t k = r0; k < r1; ++k) {
    R acc[U][NT];
    T* pk = part ? part + (k - r0) * NT * W : nullptr;
    const R init = V::set1(bias ? bias[k] : T(0));
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < NT; ++v)
        acc[u][v] = u > 0 ? V::zero() : from_part ? V::load(pk + v * W) : init;
    int64_t j = ptr[k * ps];
    const int64_t j1 = ptr[k * ps + 1];
    const int64_t pf_end = ps == 1 ? ptr[r1] : j1;  // see kPrefetchTaps
    for (; j + U <= j1; j += U) {
      if (kPrefetch<V, NT> && prefetch)
        for (int u = 0; u < U; ++u)
          if (j + u + kPrefetchTaps < pf_end) request_run<V, NT>(x, idx, j + u + kPrefetchTaps, ld);
      for (int u = 0; u < U; ++u) {
        const T* xp = x + static_cast<int64_t>(idx[j + u]) * ld;
        const R w = V::set1(vals[j + u]);
        for (int v = 0; v < NV; ++v) acc[u][v] = V::fma(w, V::load(xp + v * W), acc[u][v]);
        if (TAIL) acc[u][NT - 1] = V::fma(w, V::loadm(xp + NV * W, m), acc[u][NT - 1]);
      }
    }
    for (; j < j1; ++j) {
      const T* xp = x + static_cast<int64_t>(idx[j]) * ld;
      const R w = V::set1(vals[j]);
      for (int v = 0; v < NV; ++v) acc[0][v] = V::fma(w, V::load(xp + v * W), acc[0][v]);
      if (TAIL) acc[0][NT - 1] = V::fma(w, V::loadm(xp + NV * W, m), acc[0][NT - 1]);
    }
    for (int u = 1; u < U; ++u)
      for (int v = 0; v < NT; ++v) acc[0][v] = V::add(acc[0][v], acc[u][v]);
    finish_row<V, NV, TAIL>(acc[0], k, r1, pk, to_part, relu, y, y_k, y_t, buf, group, m, n);
  }
}

template <class V>
using GatherRows = void (*)(const typename V::T*, typename V::T*, int64_t, int64_t,
                            const int64_t*, int64_t, const int32_t*, int64_t,
                            const typename V::T*, const typename V::T*, int64_t, int64_t,
                            typename V::M, int, typename V::T*, bool, bool, bool, bool);

// Independent accumulator streams: enough that NT * U >= 8 chains hide the FMA latency.
constexpr int streams(int nt) { return nt >= 6 ? 1 : nt >= 3 ? 2 : 4; }

template <class V, int NV, bool TAIL>
constexpr GatherRows<V> gather_entry() {
  return &gather_rows<V, NV, TAIL, streams(NV + (TAIL ? 1 : 0))>;
}

template <class V>
GatherRows<V> pick_gather(int nv, bool tail) {
  static constexpr GatherRows<V> full[9] = {
      gather_entry<V, 0, false>(), gather_entry<V, 1, false>(), gather_entry<V, 2, false>(),
      gather_entry<V, 3, false>(), gather_entry<V, 4, false>(), gather_entry<V, 5, false>(),
      gather_entry<V, 6, false>(), gather_entry<V, 7, false>(), gather_entry<V, 8, false>()};
  static constexpr GatherRows<V> with_tail[8] = {
      gather_entry<V, 0, true>(), gather_entry<V, 1, true>(), gather_entry<V, 2, true>(),
      gather_entry<V, 3, true>(), gather_entry<V, 4, true>(), gather_entry<V, 5, true>(),
      gather_entry<V, 6, true>(), gather_entry<V, 7, true>()};
  return tail ? with_tail[nv] : full[nv];
}

// A row function's passes over one range of rows: each output tile p < g.P, each run of lanes
// [t0, t0 + n) of at most `run` lanes, and without blocks each row in one pass; with blocks
// (g.bptr, g.nb > 1), block by block of the input rows (each block's share of x stays in the
// fastest caches while every output row reads it), the rows' partial sums kept between blocks
// in a buffer of the range's rows. pass(p, t0, n, ptr, ps, part, from_part, to_part).
template <class T, class Pass>
void row_passes(const GatherArgs<T>& g, int64_t rows, int64_t run, const Pass& pass) {
  const bool blocked = g.bptr != nullptr && g.nb > 1;
  const AlignedArray<T> part = aligned_array<T>(blocked ? rows * run : 0);
  for (int64_t p = 0; p < g.P; ++p)
    for (int64_t t0 = 0; t0 < g.L; t0 += run) {
      const int64_t n = min64(run, g.L - t0);
      if (!blocked) {
        pass(p, t0, n, g.ptr, int64_t(1), static_cast<T*>(nullptr), false, false);
        continue;
      }
      for (int64_t b = 0; b < g.nb; ++b)
        pass(p, t0, n, g.bptr + b, g.nb + 1, part.get(), b > 0, b + 1 < g.nb);
    }
}

template <class V>
void gather(const GatherArgs<typename V::T>& a, int64_t r0, int64_t r1) {
  using T = typename V::T;
  constexpr int W = V::W;
  constexpr int64_t TILE = 8 * W < kBufLanes ? 8 * W : kBufLanes;  // 8 vectors, or 4 of 16 lanes
  static_assert(TILE % W == 0, "a tile is whole vectors");
  row_passes<T>(a, r1 - r0, TILE, [&](int64_t p, int64_t t0, int64_t n, const int64_t* ptr,
                                      int64_t ps, T* part, bool from_part, bool to_part) {
    const int nv = static_cast<int>(n / W), tail = static_cast<int>(n % W);
    pick_gather<V>(nv, tail != 0)(a.x + p * a.x_p + t0, a.y + p * a.y_p + t0 * a.y_t, a.y_k,
                                  a.y_t, ptr, ps, a.idx, a.ld, a.vals, a.bias, r0, r1,
                                  V::mask(tail), static_cast<int>(n), part, from_part, to_part,
                                  a.relu, a.prefetch);
  });
}

// gather on vectors VW, or VN where a tile is narrower than one VW (batch 1-15 on AVX-512): masked
// 16-lane operations on a few lanes cost more than 8-lane ones (forward, 784 -> 300 at 90%, batch
// 1, one thread, one process alternating call by call: 16 lanes 0.80x the speed of 8).
template <class VW, class VN>
void gather_narrow(const GatherArgs<typename VW::T>& a, int64_t r0, int64_t r1) {
  if (a.L < VW::W)
    gather<VN>(a, r0, r1);
  else
    gather<VW>(a, r0, r1);
}

// ---- backward: a Linear's dx and dw in one pass (see BackwardArgs) --------------------------------
// Row i's dx accumulates as in gather_rows; its input lanes stay in registers, and each tap's run
// of the output gradient, loaded once, also feeds that tap's weight gradient, reduced four taps at
// a time. Two separate passes would each read every tap's run, scattered over a slab in L2.
// At most 4 vectors per call: U x NT + NT + 4 registers plus temporaries fit the 16 of AVX2.
template <class V, int NV, bool TAIL>
typename V::R lane_load(const typename V::T* p, int v, typename V::M m) {
  return TAIL && v == NV ? V::loadm(p + v * V::W, m) : V::load(p + v * V::W);
}

template <class V, int NV, bool TAIL, int U>
void backward_rows(const typename V::T* __restrict g, const typename V::T* __restrict x,
                   int64_t x_ld, typename V::T* __restrict y, int64_t y_k, int64_t y_t,
                   const int64_t* __restrict ptr, int64_t ps, const int32_t* __restrict idx,
                   int64_t ld, const typename V::T* __restrict vals, typename V::T* __restrict dw,
                   int64_t r0, int64_t r1, typename V::M m, int n, typename V::T* __restrict part,
                   bool from_part, bool to_part) {
  using R = typename V::R;
  using T = typename V::T;
  constexpr int W = V::W;
  constexpr int NT = NV + (TAIL ? 1 : 0);
  static_assert(4 % U == 0, "four taps per weight-gradient group, split over the U streams");
  if constexpr (NT == 0) return;  // no lanes (never called; keeps the table total)
  alignas(64) T buf[kBufRows * kBufLanes];
  int64_t group = r0;
  for (int64_t k = r0; k < r1; ++k) {
    R acc[U][NT], xr[NT];
    T* pk = part ? part + (k - r0) * NT * W : nullptr;
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < NT; ++v)
        acc[u][v] = u == 0 && from_part ? V::load(pk + v * W) : V::zero();
    for (int v = 0; v < NT; ++v) xr[v] = lane_load<V, NV, TAIL>(x + k * x_ld, v, m);
    int64_t j = ptr[k * ps];
    const int64_t j1 = ptr[k * ps + 1];
    const int64_t pf_end = ps == 1 ? ptr[r1] : j1;  // see kPrefetchTaps
    for (; j + 4 <= j1; j += 4) {
      if (kPrefetch<V, NT>)
        for (int t = 0; t < 4; ++t)
          if (j + t + kPrefetchTaps < pf_end) request_run<V, NT>(g, idx, j + t + kPrefetchTaps, ld);
      R d[4];
      for (int t = 0; t < 4; ++t) {
        const T* gp = g + static_cast<int64_t>(idx[j + t]) * ld;
        const R w = V::set1(vals[j + t]);
        for (int v = 0; v < NT; ++v) {
          const R a = lane_load<V, NV, TAIL>(gp, v, m);
          d[t] = v == 0 ? V::mul(xr[0], a) : V::fma(xr[v], a, d[t]);
          acc[t % U][v] = V::fma(w, a, acc[t % U][v]);
        }
      }
      V::reduce4_add(d, dw + j);
    }
    for (; j < j1; ++j) {
      const T* gp = g + static_cast<int64_t>(idx[j]) * ld;
      const R w = V::set1(vals[j]);
      R d = V::zero();
      for (int v = 0; v < NT; ++v) {
        const R a = lane_load<V, NV, TAIL>(gp, v, m);
        d = V::fma(xr[v], a, d);
        acc[0][v] = V::fma(w, a, acc[0][v]);
      }
      dw[j] += V::hsum(d);
    }
    for (int u = 1; u < U; ++u)
      for (int v = 0; v < NT; ++v) acc[0][v] = V::add(acc[0][v], acc[u][v]);
    finish_row<V, NV, TAIL>(acc[0], k, r1, pk, to_part, false, y, y_k, y_t, buf, group, m, n);
  }
}

template <class V>
using BackwardRows = void (*)(const typename V::T*, const typename V::T*, int64_t,
                              typename V::T*, int64_t, int64_t, const int64_t*, int64_t,
                              const int32_t*, int64_t, const typename V::T*, typename V::T*,
                              int64_t, int64_t, typename V::M, int, typename V::T*, bool, bool);

template <class V, int NV, bool TAIL>
constexpr BackwardRows<V> backward_entry() {
  constexpr int nt = NV + (TAIL ? 1 : 0);
  return &backward_rows<V, NV, TAIL, nt == 1 ? 4 : nt == 2 ? 2 : 1>;
}

template <class V>
BackwardRows<V> pick_backward(int nv, bool tail) {
  static constexpr BackwardRows<V> full[5] = {
      backward_entry<V, 0, false>(), backward_entry<V, 1, false>(),
      backward_entry<V, 2, false>(), backward_entry<V, 3, false>(),
      backward_entry<V, 4, false>()};
  static constexpr BackwardRows<V> with_tail[4] = {
      backward_entry<V, 0, true>(), backward_entry<V, 1, true>(), backward_entry<V, 2, true>(),
      backward_entry<V, 3, true>()};
  return tail ? with_tail[nv] : full[nv];
}

// Lanes in runs of 4 vectors, block by block where there are column blocks, as in gather (the
// weight gradient needs no partial sums: each tap is in one block).
template <class V>
void backward(const BackwardArgs<typename V::T>& a, int64_t r0, int64_t r1) {
  using T = typename V::T;
  constexpr int W = V::W;
  const GatherArgs<T>& g = a.g;
  row_passes<T>(g, r1 - r0, 4 * W, [&](int64_t p, int64_t t0, int64_t n, const int64_t* ptr,
                                       int64_t ps, T* part, bool from_part, bool to_part) {
    const int nv = static_cast<int>(n / W), tail = static_cast<int>(n % W);
    pick_backward<V>(nv, tail != 0)(g.x + p * g.x_p + t0, a.x + p * a.x_p + t0, a.x_ld,
                                    g.y + p * g.y_p + t0 * g.y_t, g.y_k, g.y_t, ptr, ps, g.idx,
                                    g.ld, g.vals, a.dw, r0, r1, V::mask(tail),
                                    static_cast<int>(n), part, from_part, to_part);
  });
}

// ---- sddmm: dw[j] = <dy row, x tap> for the kept taps only -----------------------------------------
// Short runs (Linear lane tiles, <= 4 vectors per call): the dy tile stays in registers and each
// tap reads one contiguous stretch of x; eight taps are reduced together.
template <class V, int NV, bool TAIL>
void sddmm_tile(const typename V::T* __restrict g, const typename V::T* __restrict x,
                const int32_t* __restrict idx, int64_t ld, int64_t j0, int64_t j1,
                typename V::T* __restrict dw, typename V::M m) {
  using R = typename V::R;
  constexpr int W = V::W;
  constexpr int NT = NV + (TAIL ? 1 : 0);
  R gv[NT];
  for (int v = 0; v < NV; ++v) gv[v] = V::load(g + v * W);
  if (TAIL) gv[NT - 1] = V::loadm(g + NV * W, m);
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8) {
    R acc[8];
    for (int t = 0; t < 8; ++t) {
      const typename V::T* xp = x + static_cast<int64_t>(idx[j + t]) * ld;
      acc[t] = V::mul(gv[0], NV > 0 ? V::load(xp) : V::loadm(xp, m));
      for (int v = 1; v < NV; ++v) acc[t] = V::fma(gv[v], V::load(xp + v * W), acc[t]);
      if (TAIL && NV > 0) acc[t] = V::fma(gv[NT - 1], V::loadm(xp + NV * W, m), acc[t]);
    }
    V::reduce8_add(acc, dw + j);
  }
  for (; j < j1; ++j) {
    const typename V::T* xp = x + static_cast<int64_t>(idx[j]) * ld;
    typename V::R acc = V::mul(gv[0], NV > 0 ? V::load(xp) : V::loadm(xp, m));
    for (int v = 1; v < NV; ++v) acc = V::fma(gv[v], V::load(xp + v * W), acc);
    if (TAIL && NV > 0) acc = V::fma(gv[NT - 1], V::loadm(xp + NV * W, m), acc);
    dw[j] += V::hsum(acc);
  }
}

template <class V>
using SddmmTile = void (*)(const typename V::T*, const typename V::T*, const int32_t*, int64_t,
                           int64_t, int64_t, typename V::T*, typename V::M);

template <class V>
SddmmTile<V> pick_sddmm(int nv, bool tail) {
  static constexpr SddmmTile<V> full[5] = {nullptr, &sddmm_tile<V, 1, false>,
                                           &sddmm_tile<V, 2, false>, &sddmm_tile<V, 3, false>,
                                           &sddmm_tile<V, 4, false>};
  static constexpr SddmmTile<V> with_tail[4] = {
      &sddmm_tile<V, 0, true>, &sddmm_tile<V, 1, true>, &sddmm_tile<V, 2, true>,
      &sddmm_tile<V, 3, true>};
  return tail ? with_tail[nv] : full[nv];
}

// With blocks (a.bptr, a.nb > 1), block by block of x's rows, as in gather.
template <class V>
void sddmm_short(const SddmmArgs<typename V::T>& a, int64_t r0, int64_t r1) {
  constexpr int W = V::W;
  constexpr int64_t TILE = 4 * W;
  if (!a.accumulate)
    for (int64_t j = a.ptr[r0]; j < a.ptr[r1]; ++j) a.dw[j] = 0;
  const bool blocked = a.bptr != nullptr && a.nb > 1;
  const int64_t nb = blocked ? a.nb : 1, ps = blocked ? a.nb + 1 : 1;
  const int64_t* ptr = blocked ? a.bptr : a.ptr;
  for (int64_t p = 0; p < a.P; ++p) {
    const typename V::T* xp = a.x + p * a.x_p;
    for (int64_t t0 = 0; t0 < a.L; t0 += TILE) {
      const int64_t n = min64(TILE, a.L - t0);
      const int nv = static_cast<int>(n / W), tail = static_cast<int>(n % W);
      const typename V::M m = V::mask(tail);
      SddmmTile<V> fn = pick_sddmm<V>(nv, tail != 0);
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t k = r0; k < r1; ++k) {
          const int64_t j0 = ptr[k * ps + b], j1 = ptr[k * ps + b + 1];
          if (j0 == j1) continue;
          fn(a.dy + k * a.dy_k + p * a.dy_p + t0, xp + t0, a.idx, a.ld, j0, j1, a.dw, m);
        }
      }
    }
  }
}

// Long runs (Conv2d output rows): eight taps at a time share each load of dy; their eight accumulators are reduced horizontally
// once per chunk (after all S segments of up to 32 vectors), not once per vector.
template <class V, int NT>
void sddmm_chunk(const typename V::T* __restrict g, const typename V::T* __restrict x,
                 const int32_t* __restrict idx, int64_t ld, int64_t j, int64_t S, int64_t x_s,
                 int64_t dy_s, int64_t nv, int tail, typename V::M m,
                 typename V::T* __restrict dw) {
  using R = typename V::R;
  using T = typename V::T;
  constexpr int W = V::W;
  R acc[8], odd[NT];  // odd: a second chain per tap, so that a few taps still fill the pipes
  const T* xp[NT];
  for (int t = 0; t < 8; ++t) acc[t] = V::zero();
  for (int t = 0; t < NT; ++t) odd[t] = V::zero();
  for (int t = 0; t < NT; ++t) xp[t] = x + static_cast<int64_t>(idx[j + t]) * ld;
  for (int64_t s = 0; s < S; ++s) {
    const T* gs = g + s * dy_s;
    const int64_t xo = s * x_s;
    int64_t v = 0;
    if (NT <= 4) {
      for (; v + 2 <= nv; v += 2) {
        const R g0 = V::load(gs + v * W), g1 = V::load(gs + (v + 1) * W);
        for (int t = 0; t < NT; ++t) {
          acc[t] = V::fma(g0, V::load(xp[t] + xo + v * W), acc[t]);
          odd[t] = V::fma(g1, V::load(xp[t] + xo + (v + 1) * W), odd[t]);
        }
      }
    }
    for (; v < nv; ++v) {
      const R gv = V::load(gs + v * W);
      for (int t = 0; t < NT; ++t) acc[t] = V::fma(gv, V::load(xp[t] + xo + v * W), acc[t]);
    }
    if (tail) {
      const R gv = V::loadm(gs + nv * W, m);
      for (int t = 0; t < NT; ++t)
        acc[t] = V::fma(gv, V::loadm(xp[t] + xo + nv * W, m), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) acc[t] = V::add(acc[t], odd[t]);
  if (NT == 8) {
    V::reduce8_add(acc, dw + j);
  } else {
    alignas(64) T sums[8] = {};
    V::reduce8_add(acc, sums);
    for (int t = 0; t < NT; ++t) dw[j + t] += sums[t];
  }
}

template <class V>
using SddmmChunk = void (*)(const typename V::T*, const typename V::T*, const int32_t*, int64_t,
                            int64_t, int64_t, int64_t, int64_t, int64_t, int, typename V::M,
                            typename V::T*);

// Taps [j, end) of one row, eight at a time.
template <class V>
void sddmm_row(const typename V::T* g, const typename V::T* x, const int32_t* idx, int64_t ld,
               int64_t j, int64_t end, int64_t S, int64_t x_s, int64_t dy_s, int64_t nv, int tail,
               typename V::M m, typename V::T* dw) {
  static constexpr SddmmChunk<V> rest[8] = {
      nullptr, &sddmm_chunk<V, 1>, &sddmm_chunk<V, 2>, &sddmm_chunk<V, 3>,
      &sddmm_chunk<V, 4>, &sddmm_chunk<V, 5>, &sddmm_chunk<V, 6>, &sddmm_chunk<V, 7>};
  for (; j + 8 <= end; j += 8) sddmm_chunk<V, 8>(g, x, idx, ld, j, S, x_s, dy_s, nv, tail, m, dw);
  if (j < end) rest[end - j](g, x, idx, ld, j, S, x_s, dy_s, nv, tail, m, dw);
}

template <class V>
void sddmm_long(const SddmmArgs<typename V::T>& a, int64_t r0, int64_t r1) {
  constexpr int W = V::W;
  constexpr int64_t TILE = 32 * W;
  if (!a.accumulate)
    for (int64_t j = a.ptr[r0]; j < a.ptr[r1]; ++j) a.dw[j] = 0;
  for (int64_t p = 0; p < a.P; ++p) {
    for (int64_t t0 = 0; t0 < a.L; t0 += TILE) {
      const int64_t n = min64(TILE, a.L - t0);
      const int64_t nv = n / W;
      const int tail = static_cast<int>(n % W);
      const typename V::M m = V::mask(tail);
      const typename V::T* x = a.x + p * a.x_p + t0;
      for (int64_t k = r0; k < r1; ++k)
        sddmm_row<V>(a.dy + k * a.dy_k + p * a.dy_p + t0, x, a.idx, a.ld, a.ptr[k], a.ptr[k + 1],
                     a.S, a.x_s, a.dy_s, nv, tail, m, a.dw);
    }
  }
}

// ---- scatter: dx += w * dy over the taps of each input row (strided convolutions) -----------------
template <class V>
void axpy(int64_t n, typename V::T w, const typename V::T* __restrict x,
          typename V::T* __restrict y) {
  constexpr int W = V::W;
  const typename V::R wv = V::set1(w);
  int64_t t = 0;
  for (; t + W <= n; t += W) V::store(y + t, V::fma(wv, V::load(x + t), V::load(y + t)));
  if (t < n) {
    const typename V::M m = V::mask(static_cast<int>(n - t));
    V::storem(y + t, V::fma(wv, V::loadm(x + t, m), V::loadm(y + t, m)), m);
  }
}

template <class V>
void scatter(const ScatterArgs<typename V::T>& a, int64_t r0, int64_t r1) {
  for (int64_t c = r0; c < r1; ++c) {
    for (int64_t j = a.ptr[c]; j < a.ptr[c + 1]; ++j) {
      const typename V::T w = a.vals[a.perm[j]];
      const typename V::T* src = a.dy + a.src[j];
      typename V::T* dst = a.dx + a.dst[j];
      for (int64_t p = 0; p < a.P; ++p) axpy<V>(a.L, w, src + p * a.dy_p, dst + p * a.dx_p);
    }
  }
}

// ---- direct convolution: one image's NCHW planes, output columns innermost -------------------------
// A block is RB output rows x NV vectors of one column chunk of an output channel, accumulated in
// registers over the channel's taps: each tap's weight is broadcast once and multiplies RB * NV
// input vectors (register blocking over output rows). Loads are whole vectors (the lanes past Q
// read the next row or the image's slack and are never stored); the last vector of a row whose
// width is not a whole number of vectors is stored under the mask m.
// With ADD the accumulators start from the block's stored output (a later part of the input
// channels), else from init.
template <class V, int NV, int RB, bool TAIL, bool ADD>
void direct_block(const typename V::T* __restrict x, int64_t xs, typename V::T* __restrict y,
                  int64_t Q, const int32_t* __restrict off, const typename V::T* __restrict vals,
                  int64_t j0, int64_t j1, typename V::T init, typename V::M m) {
  using R = typename V::R;
  using T = typename V::T;
  constexpr int W = V::W;
  const T* rows[RB];  // one base per row: each load is base + offset + constant
  for (int r = 0; r < RB; ++r) rows[r] = x + r * xs;
  R acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) {
      const T* yv = y + r * Q + v * W;
      acc[r][v] = !ADD ? V::set1(init) : TAIL && v == NV - 1 ? V::loadm(yv, m) : V::load(yv);
    }
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t o = off[j];
    const R w = V::set1(vals[j]);
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = V::fma(w, V::load(rows[r] + o + v * W), acc[r][v]);
  }
  for (int r = 0; r < RB; ++r) {
    typename V::T* yr = y + r * Q;
    for (int v = 0; v < (TAIL ? NV - 1 : NV); ++v) V::store(yr + v * W, acc[r][v]);
    if (TAIL) V::storem(yr + (NV - 1) * W, acc[r][NV - 1], m);
  }
}

template <class V>
using DirectBlock = void (*)(const typename V::T*, int64_t, typename V::T*, int64_t,
                             const int32_t*, const typename V::T*, int64_t, int64_t,
                             typename V::T, typename V::M);

// Rows per block for NV vectors per row: 8 to 12 accumulators, enough independent chains to hide
// the FMA latency with registers to spare for the broadcast weight.
constexpr int direct_rows(int nv) { return nv == 1 ? 8 : nv == 2 ? 6 : nv == 3 ? 4 : 3; }
constexpr int kDirectChunk = 4;  // vectors per column chunk

template <class V, int NV, bool TAIL, bool ADD>
DirectBlock<V> direct_block_rows(int rows) {
  static constexpr DirectBlock<V> by_rows[8] = {
      &direct_block<V, NV, 1, TAIL, ADD>, &direct_block<V, NV, 2, TAIL, ADD>,
      &direct_block<V, NV, 3, TAIL, ADD>, &direct_block<V, NV, 4, TAIL, ADD>,
      &direct_block<V, NV, 5, TAIL, ADD>, &direct_block<V, NV, 6, TAIL, ADD>,
      &direct_block<V, NV, 7, TAIL, ADD>, &direct_block<V, NV, 8, TAIL, ADD>};
  return by_rows[rows - 1];
}

template <class V, bool TAIL, bool ADD>
DirectBlock<V> pick_direct_block(int nv, int rows) {
  switch (nv) {
    case 1: return direct_block_rows<V, 1, TAIL, ADD>(rows);
    case 2: return direct_block_rows<V, 2, TAIL, ADD>(rows);
    case 3: return direct_block_rows<V, 3, TAIL, ADD>(rows);
    default: return direct_block_rows<V, kDirectChunk, TAIL, ADD>(rows);
  }
}

template <class V>
DirectBlock<V> pick_direct_block(int nv, int rows, bool tail, bool add) {
  return tail ? add ? pick_direct_block<V, true, true>(nv, rows)
                    : pick_direct_block<V, true, false>(nv, rows)
              : add ? pick_direct_block<V, false, true>(nv, rows)
                    : pick_direct_block<V, false, false>(nv, rows);
}

// Column chunk by chunk, block of rows by block, every output channel of [k0, k1) in turn: the
// input rows one block reads stay in the fastest cache while all channels read them. Where they
// would not fit L1, the input channels come in parts (a.split), each part's taps for every
// output channel, the output stored and reloaded between parts.
template <class V>
void direct(const DirectArgs<typename V::T>& a, int64_t k0, int64_t k1) {
  constexpr int W = V::W;
  for (int64_t c0 = 0; c0 < a.Q; c0 += kDirectChunk * W) {
    const int64_t n = min64(kDirectChunk * W, a.Q - c0);
    const int nv = static_cast<int>((n + W - 1) / W), tail = static_cast<int>(n % W);
    const typename V::M m = V::mask(tail);
    const int rb = direct_rows(nv);
    for (int64_t p0 = 0; p0 < a.P; p0 += rb) {
      const int rows = static_cast<int>(min64(rb, a.P - p0));
      for (int64_t h = 0; h < a.parts; ++h) {
        const DirectBlock<V> fn = pick_direct_block<V>(nv, rows, tail, h > 0);
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t* taps = a.split ? a.split + k * (a.parts + 1) + h : a.ptr + k;
          fn(a.x + p0 * a.xs + c0, a.xs, a.y + (k * a.P + p0) * a.Q + c0, a.Q, a.off, a.vals,
             taps[0], taps[1], a.bias ? a.bias[k] : typename V::T(0), m);
        }
      }
    }
  }
}

// An empty statement the compiler may not move memory accesses across: it keeps a short loop of
// moves as written, where GCC would otherwise call memcpy / memset for every row (3 calls per
// row of a 32 x 32 image; copying a batch of them took about twice as long as its memory reads).
inline void keep_loop() { asm volatile("" ::: "memory"); }

// dst = the C planes of src [C, H, W] inside zero margins: [C, top + H + bottom, left + W + right],
// row by row in whole vectors.
template <class V>
void pad_planes(const typename V::T* __restrict src, int64_t C, int64_t H, int64_t W, int64_t top,
                int64_t bottom, int64_t left, int64_t right, typename V::T* __restrict dst) {
  using T = typename V::T;
  constexpr int Wv = V::W;
  const int64_t cols = left + W + right, nv = W / Wv;
  const typename V::M m = V::mask(static_cast<int>(W % Wv));
  auto zero = [&](T* p, int64_t n) {
    int64_t i = 0;
    for (; i + Wv <= n; i += Wv, keep_loop()) V::store(p + i, V::zero());
    for (; i < n; ++i, keep_loop()) p[i] = T(0);
  };
  for (int64_t c = 0; c < C; ++c) {
    T* plane = dst + c * (top + H + bottom) * cols;
    zero(plane, top * cols);
    for (int64_t h = 0; h < H; ++h) {
      const T* s = src + (c * H + h) * W;
      T* d = plane + (top + h) * cols;
      zero(d, left);
      d += left;
      for (int64_t v = 0; v < nv; ++v, keep_loop()) V::store(d + v * Wv, V::load(s + v * Wv));
      if (W % Wv) V::storem(d + nv * Wv, V::loadm(s + nv * Wv, m), m);
      zero(d + W, right);
    }
    zero(plane + (top + H) * cols, bottom * cols);
  }
}

// The sum of P rows of Q elements, ys apart: vector sums over all rows and one horizontal sum,
// not one per row (at 32 x 32, 32 fewer per output channel and image). The per-row sums were
// estimated, not measured, at about 0.3 ms of a 98%-sparse 64 -> 64 layer's 2 ms weight
// gradient (batch 32); in the layer's forward + backward the difference was within this
// machine's noise.
template <class V>
typename V::T plane_sum(const typename V::T* __restrict x, int64_t P, int64_t Q, int64_t ys) {
  constexpr int W = V::W;
  const int64_t nv = Q / W;
  const typename V::M m = V::mask(static_cast<int>(Q % W));
  typename V::R acc[2] = {V::zero(), V::zero()};
  for (int64_t p = 0; p < P; ++p) {
    const typename V::T* row = x + p * ys;
    int64_t v = 0;
    for (; v + 2 <= nv; v += 2) {
      acc[0] = V::add(acc[0], V::load(row + v * W));
      acc[1] = V::add(acc[1], V::load(row + (v + 1) * W));
    }
    if (v < nv) acc[0] = V::add(acc[0], V::load(row + v * W));
    if (Q % W) acc[1] = V::add(acc[1], V::loadm(row + nv * W, m));
  }
  return V::hsum(V::add(acc[0], acc[1]));
}

template <class V>
void plane_sums(const typename V::T* x, int64_t K, int64_t plane, int64_t P, int64_t Q, int64_t ys,
                typename V::T* sums) {
  for (int64_t k = 0; k < K; ++k) sums[k] += plane_sum<V>(x + k * plane, P, Q, ys);
}

// Both gradients of one image in one pass over the transposed structure (stride 1): the input
// gradient as `direct` computes it (a block of RB rows x NV vectors of input channel c, over the
// flipped taps reading the output gradient with margins), and each tap's weight gradient from the
// same loads: the output gradient's vector a tap reads for input position (p, q) multiplies the
// input at (p, q) (held in registers for the block), and the block's products are added into
// the tap's own vector of partial sums. Every output gradient run is loaded once for both
// products, and the input is read in place, without margins: positions past a row's end are
// loaded under the mask m from both operands, so another row's values never enter a sum.
// Returns the sum of the block's inputs times zero: NaN where one of them is not finite. Without
// DX (a first layer: no input gradient wanted) the weight gradient alone, dx and vals unused.
template <class V, int NV, int RB, bool TAIL, bool DX>
typename V::R direct_backward_block(const typename V::T* __restrict g, int64_t gs,
                           typename V::T* __restrict dx, const typename V::T* __restrict x,
                           int64_t Q, const int32_t* __restrict off,
                           const typename V::T* __restrict vals, int64_t j0, int64_t j1,
                           typename V::T* __restrict dwv, typename V::M m) {
  using R = typename V::R;
  using T = typename V::T;
  constexpr int W = V::W;
  const T* rows[RB];
  for (int r = 0; r < RB; ++r) rows[r] = g + r * gs;
  R xv[RB][NV], acc[RB][NV];
  R check = V::zero();
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) {
      const T* xr = x + r * Q + v * W;
      xv[r][v] = TAIL && v == NV - 1 ? V::loadm(xr, m) : V::load(xr);
      check = V::add(check, V::mul(xv[r][v], V::zero()));
      acc[r][v] = V::zero();
    }
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t o = off[j];
    const R w = DX ? V::set1(vals[j]) : V::zero();
    R sum[2] = {V::zero(), V::zero()};
    for (int r = 0; r < RB; ++r)
      for (int v = 0; v < NV; ++v) {
        const T* gr = rows[r] + o + v * W;
        const R d = TAIL && v == NV - 1 ? V::loadm(gr, m) : V::load(gr);
        if (DX) acc[r][v] = V::fma(w, d, acc[r][v]);
        sum[(r * NV + v) & 1] = V::fma(d, xv[r][v], sum[(r * NV + v) & 1]);
      }
    T* s = dwv + j * W;
    V::store(s, V::add(V::load(s), V::add(sum[0], sum[1])));
  }
  if (!DX) return check;
  for (int r = 0; r < RB; ++r) {
    T* dr = dx + r * Q;
    for (int v = 0; v < (TAIL ? NV - 1 : NV); ++v) V::store(dr + v * W, acc[r][v]);
    if (TAIL) V::storem(dr + (NV - 1) * W, acc[r][NV - 1], m);
  }
  return check;
}

template <class V>
using DirectBackwardBlock = typename V::R (*)(const typename V::T*, int64_t, typename V::T*,
                                     const typename V::T*, int64_t, const int32_t*,
                                     const typename V::T*, int64_t, int64_t, typename V::T*,
                                     typename V::M);

// Rows per block of the one-pass backward: its registers hold the block's input as well as the
// input gradient's accumulators (2 x rows x nv), so blocks are half as tall as the forward's (or
// less). With AVX-512's 32 registers, rows of one vector take blocks of 8: 256 -> 256 at 8 x 8
// (a whole plane per block), batch 32, forward + backward, one process alternating call by call,
// 40 pairs: 1.03x faster at 95% and 98%, one and two threads; taller blocks for rows of two
// vectors (4 rows at 16 x 16): 0.98-0.99x, so those keep AVX2's.
template <class V>
constexpr int direct_backward_rows(int nv) {
  return nv == 1 ? (V::kRegisters >= 32 ? 8 : 4) : nv == 2 ? 2 : 1;
}

template <class V, bool TAIL, bool DX>
DirectBackwardBlock<V> pick_direct_backward_block(int nv, int rows) {
  static constexpr DirectBackwardBlock<V> by_shape[kDirectChunk][8] = {
      {&direct_backward_block<V, 1, 1, TAIL, DX>, &direct_backward_block<V, 1, 2, TAIL, DX>,
       &direct_backward_block<V, 1, 3, TAIL, DX>, &direct_backward_block<V, 1, 4, TAIL, DX>,
       &direct_backward_block<V, 1, 5, TAIL, DX>, &direct_backward_block<V, 1, 6, TAIL, DX>,
       &direct_backward_block<V, 1, 7, TAIL, DX>, &direct_backward_block<V, 1, 8, TAIL, DX>},
      {&direct_backward_block<V, 2, 1, TAIL, DX>, &direct_backward_block<V, 2, 2, TAIL, DX>},
      {&direct_backward_block<V, 3, 1, TAIL, DX>},
      {&direct_backward_block<V, kDirectChunk, 1, TAIL, DX>}};
  return by_shape[nv - 1][rows - 1];
}

template <class V>
DirectBackwardBlock<V> pick_direct_backward_block(int nv, int rows, bool tail, bool dx) {
  return tail ? dx ? pick_direct_backward_block<V, true, true>(nv, rows)
                   : pick_direct_backward_block<V, true, false>(nv, rows)
              : dx ? pick_direct_backward_block<V, false, true>(nv, rows)
                   : pick_direct_backward_block<V, false, false>(nv, rows);
}

// Channel by channel, block of rows by block (the forward's order, block of rows by block with
// every channel in turn, took 1.27x the time at 98%, 1.16x at 95%, 1.09x at 80%: 64 -> 64 at
// 32 x 32, batch 32, backward alone, one thread, one process alternating call by call, 60 pairs;
// a channel's taps, its input rows and its taps' vectors of partial sums stay in L1 while its
// rows are walked, where the other order touched every tap's partial sums for every block of
// rows). Each block's input lines are requested kDirectInputAhead blocks ahead: 98%, 1.05-1.07x
// on one and two threads, 95% and 80% 1.01-1.02x (4 ahead against 2: the same).
constexpr int64_t kDirectInputAhead = 2;

// Input channels [c0, c1) of one image: a.g is the input gradient's `direct` call (a.g.x the
// output gradient with margins, a.g.y the image's input gradient or null for the weight gradient
// alone, a.g.P x a.g.Q its planes), a.x the image's input planes, a.dw the taps' weight gradient
// in the transposed structure's order (added to), a.dwv one vector per tap of these rows. Where
// the input holds a value that is not finite, the weight gradient is left untouched and false
// returned, for the caller to compute it the other way: the products here include the input's
// positions that the reference never multiplies (those whose tap falls in the output gradient's
// zero margin), and an Inf there would give NaN where the reference's sum is finite.
template <class V>
bool direct_backward(const DirectBackwardArgs<typename V::T>& a, int64_t c0, int64_t c1) {
  using T = typename V::T;
  constexpr int W = V::W;
  const DirectArgs<T>& d = a.g;
  const int64_t j0 = d.ptr[c0], j1 = d.ptr[c1], plane = d.P * d.Q;
  std::fill(a.dwv + j0 * W, a.dwv + j1 * W, T(0));
  typename V::R check = V::zero();
  for (int64_t q0 = 0; q0 < d.Q; q0 += kDirectChunk * W) {
    const int64_t n = min64(kDirectChunk * W, d.Q - q0);
    const int nv = static_cast<int>((n + W - 1) / W), tail = static_cast<int>(n % W);
    const typename V::M m = V::mask(tail);
    const int rb = direct_backward_rows<V>(nv);
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t p0 = 0; p0 < d.P; p0 += rb) {
        const int rows = static_cast<int>(min64(rb, d.P - p0));
        const DirectBackwardBlock<V> fn =
            pick_direct_backward_block<V>(nv, rows, tail, d.y != nullptr);
        const int64_t at = c * plane + p0 * d.Q + q0;
        for (int r = 0; r < rows; ++r) {
          const int64_t ahead = at + (kDirectInputAhead * rb + r) * d.Q;  // maybe the next plane
          for (int64_t i = 0; i < n && ahead + i < c1 * plane; i += 64 / int64_t{sizeof(T)})
            V::prefetch(a.x + ahead + i);
        }
        check = V::add(check, fn(d.x + p0 * d.xs + q0, d.xs, d.y ? d.y + at : nullptr, a.x + at,
                                 d.Q, d.off, d.vals, d.ptr[c], d.ptr[c + 1], a.dwv, m));
      }
  }
  if (V::hsum(check) != T(0)) return false;
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8) {
    typename V::R s[8];
    for (int i = 0; i < 8; ++i) s[i] = V::load(a.dwv + (j + i) * W);
    V::reduce8_add(s, a.dw + j);
  }
  for (; j < j1; ++j) a.dw[j] += V::hsum(V::load(a.dwv + j * W));
  return true;
}

// ---- 2 x 2 max pooling in the lanes layout -------------------------------------------------------
template <class V>
void pool_pairs(const typename V::T* top, const typename V::T* bottom, typename V::T* out,
                int64_t Wo, int64_t N) {
  constexpr int W = V::W;
  const int64_t nv = N / W;
  const typename V::M m = V::mask(static_cast<int>(N % W));
  for (int64_t ow = 0; ow < Wo; ++ow) {
    const typename V::T *a = top + 2 * ow * N, *b = bottom + 2 * ow * N;
    typename V::T* o = out + ow * N;
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t i = v * W;
      V::store(o + i, V::max_nan(V::max_nan(V::load(a + i), V::load(a + N + i)),
                                 V::max_nan(V::load(b + i), V::load(b + N + i))));
    }
    if (N % W) {
      const int64_t i = nv * W;
      V::storem(o + i, V::max_nan(V::max_nan(V::loadm(a + i, m), V::loadm(a + N + i, m)),
                                  V::max_nan(V::loadm(b + i, m), V::loadm(b + N + i, m))), m);
    }
  }
}

// ---- transpose: dst[c * drs + r] = src[r * srs + c] ------------------------------------------------
// 8 x 8 register transposes, in blocks of up to 128 source rows swept 8 columns at a time: each
// destination row then receives long contiguous runs while only 8 of them are written at once (the
// destination rows of an NCHW tensor are often 2^k bytes apart and share one L1 set). Where 16
// destination rows lie within 4 KiB (no two share an L1 set: a Linear's lane tiles), the sweep
// takes whole 64-byte lines of every source row at a time: source rows 2^k bytes apart (a
// [batch, 1024] input) share one set too, and with 8 columns each line was read twice from L2
// (16 columns against 8, packing 1024 features x 64 lanes, forward at 98%, batch 64-256:
// 1.04-1.09x faster). It takes 64 columns (four lines of each source row in one run) while there
// are as many left, then 16: 64 against 16, one process alternating call by call, 60-80 pairs,
// Linear forward and forward + backward at 95-98% on one and two threads, warm and cold caches:
// 1.00-1.05x; the convolutions' packing 1.00-1.01x. Scalar at the ragged edges.
template <class V>
void transpose(const typename V::T* src, int64_t srs, typename V::T* dst, int64_t drs, int64_t r0,
               int64_t r1, int64_t C) {
  constexpr int64_t BLOCK = 128;
  const int64_t rfull = V::kBlockTranspose ? r0 + (r1 - r0) / 8 * 8 : r0;
  const int64_t cfull = V::kBlockTranspose ? C / 8 * 8 : 0;
  const bool whole_lines = 16 * drs * static_cast<int64_t>(sizeof(typename V::T)) <= 4096;
  for (int64_t rb = r0; rb < rfull; rb += BLOCK) {
    const int64_t re = min64(rb + BLOCK, rfull);
    int64_t c = 0;
    if (whole_lines)
      for (const int64_t step : {64, 16})
        for (; c + step <= cfull; c += step)
          for (int64_t r = rb; r < re; r += 8)
            for (int64_t cc = 0; cc < step; cc += 8)
              V::transpose8(src + r * srs + c + cc, srs, dst + (c + cc) * drs + r, drs);
    for (; c < cfull; c += 8)
      for (int64_t r = rb; r < re; r += 8)
        V::transpose8(src + r * srs + c, srs, dst + c * drs + r, drs);
  }
  // ragged edges: columns past cfull for the blocked rows, then all columns of the other rows
  for (int64_t r = r0; r < rfull; ++r)
    for (int64_t c = cfull; c < C; ++c) dst[c * drs + r] = src[r * srs + c];
  for (int64_t rb = rfull; rb < r1; rb += 8) {
    const int64_t re = min64(rb + 8, r1);
    for (int64_t cb = 0; cb < C; cb += 64) {
      const int64_t ce = min64(cb + 64, C);
      for (int64_t c = cb; c < ce; ++c)
        for (int64_t r = rb; r < re; ++r) dst[c * drs + r] = src[r * srs + c];
    }
  }
}

// A table whose batch-lane kernels (Linear, the batch-innermost convolution, inference, pooling)
// take vectors VL (the gather VR on tiles narrower than one VL) and whose kernels along NCHW rows
// (the direct convolution, padding, transposes) vectors VR: a direct convolution's vector is a
// row's run of output columns, and rows of 8 to 32 columns fill 8-lane vectors better than 16-lane
// ones (see ops.cpp, kMaxLanes).
template <class VL, class VR>
Kernels<typename VL::T> kernels_split() {
  static_assert(sizeof(typename VL::T) == sizeof(typename VR::T), "one scalar type");
  return {&gather_narrow<VL, VR>, &sddmm_short<VL>, &backward<VL>,       &sddmm_long<VL>,
          &scatter<VL>,           &direct<VR>,      &plane_sums<VR>,     &direct_backward<VR>,
          &pad_planes<VR>,        &transpose<VR>,   &pool_pairs<VL>};
}

template <class V>
Kernels<typename V::T> kernels() {
  return kernels_split<V, V>();
}

}  // namespace
}  // namespace ps
