// The interface between the torch glue (ops.cpp, compiled for the baseline ISA) and the kernel
// translation units (kern_*.cpp, one per instruction set). Plain structs and function pointers
// only, so no inline function is shared between translation units compiled with different flags.
#pragma once

#include <cstdint>

namespace ps {

// y[k * y_k + p * y_p + t * y_t] = bias[k] + sum_j vals[j] * x[idx[j] * ld + p * x_p + t] over
// the taps j of row k, for rows k in [r0, r1), output rows p < P and lanes t < L. y_t == 1: each
// row's lanes contiguous; otherwise rows must be contiguous (y_k == 1): the output is written
// transposed, [lanes, rows], as a Linear's [batch, features] output is.
template <class T>
struct GatherArgs {
  const T* x;
  int64_t x_p;
  T* y;
  int64_t y_k, y_p;
  const int64_t* ptr;
  const int32_t* idx;
  int64_t ld;
  const T* vals;
  const T* bias;  // nullable
  int64_t P, L;
  int64_t y_t = 1;
  // optional column blocks: row k's taps in block b are [bptr[k * (nb + 1) + b], ... + 1)
  const int64_t* bptr = nullptr;
  int64_t nb = 1;
  bool relu = false;  // store max(0, y) (NaN stays NaN, as torch.relu)
  bool prefetch = true;  // request each tap's run ahead (kernels.h, kPrefetchTaps)
};

// A Linear's backward in one pass over the transposed structure: the gather g (dx = W^T dy, row i
// of g an input feature, g.x the output gradient's slab, no bias) and, for each tap j of row i,
// dw[j] += sum_{p < P, t < L} g.x[g.idx[j] * g.ld + p * g.x_p + t] * x[i * x_ld + p * x_p + t]
// (the weight gradient, in the transposed structure's order): each tap's run of the output
// gradient is loaded once for both products.
template <class T>
struct BackwardArgs {
  GatherArgs<T> g;
  const T* x;
  int64_t x_ld, x_p;
  T* dw;
};

// dw[j] = sum_{p, s, t} dy[k * dy_k + p * dy_p + s * dy_s + t] * x[idx[j] * ld + p * x_p + s * x_s
// + t] for the taps j of row k, s < S segments (the sampled dense-dense product: the weight
// gradient on kept weights only).
template <class T>
struct SddmmArgs {
  const T* dy;
  int64_t dy_k, dy_p, dy_s;
  const T* x;
  int64_t x_p, x_s, S;
  const int64_t* ptr;
  const int32_t* idx;
  int64_t ld;
  T* dw;
  int64_t P, L;
  bool accumulate;  // add to dw instead of overwriting it
  const int64_t* bptr = nullptr;  // optional column blocks, as in GatherArgs
  int64_t nb = 1;
};

// dx[dst[j] + p * dx_p + t] += vals[perm[j]] * dy[src[j] + p * dy_p + t] for the taps j of row c
// (the transposed product as a scatter; each row c owns the part of dx its taps write).
template <class T>
struct ScatterArgs {
  const T* dy;
  int64_t dy_p;
  T* dx;
  int64_t dx_p;
  const int64_t* ptr;
  const int32_t* src;
  const int32_t* dst;
  const T* vals;
  const int32_t* perm;
  int64_t P, L;
};

// Direct convolution of one image on NCHW planes: y[k * P * Q + p * Q + q] = bias[k] + sum_j
// vals[j] * x[off[j] + p * xs + q] over the taps j of row k, for rows k in [k0, k1), p < P,
// q < Q. x is the image's input planes with their zero margins (a tap's offset names its channel,
// row and column); it must hold a vector's width of readable elements past the last one a tap
// reads, since each output row is computed in whole vectors (the lanes past Q are never stored).
template <class T>
struct DirectArgs {
  const T* x;
  int64_t xs;  // input elements between consecutive output rows
  T* y;
  int64_t P, Q;
  const int64_t* ptr;
  const int32_t* off;
  const T* vals;
  const T* bias;  // nullable
  // optional parts of the input channels: row k's taps in part h are [split[k * (parts + 1) + h],
  // ... + 1); each block of rows is accumulated part after part (the output stored between)
  const int64_t* split = nullptr;
  int64_t parts = 1;
};

// Both gradients of a stride-1 direct convolution for one image, in one pass over the transposed
// structure: g is the input gradient's `direct` call (rows = input channels, g.x the output
// gradient with margins, g.y the image's input gradient [C, P, Q] or null for the weight gradient
// alone, flipped taps); x is the
// image's input [C, P, Q] without margins; for each tap j of the rows,
// dw[j] += sum_{p < P, q < Q} x[c * P * Q + p * Q + q] * g.x[g.off[j] + p * g.xs + q], the weight
// gradient in the transposed structure's order. dwv: scratch of one vector (at most kMaxLanes
// elements, ops.cpp) per tap. Returns false, dw untouched, where x holds a value that is not
// finite (the products include positions the reference never multiplies: see kernels.h).
template <class T>
struct DirectBackwardArgs {
  DirectArgs<T> g;
  const T* x;
  T* dw;
  T* dwv;
};

template <class T>
struct Kernels {
  void (*gather)(const GatherArgs<T>&, int64_t r0, int64_t r1);
  void (*sddmm_short)(const SddmmArgs<T>&, int64_t r0, int64_t r1);  // runs of <= 64 lanes
  void (*backward)(const BackwardArgs<T>&, int64_t r0, int64_t r1);
  void (*sddmm_long)(const SddmmArgs<T>&, int64_t r0, int64_t r1);   // long runs
  void (*scatter)(const ScatterArgs<T>&, int64_t r0, int64_t r1);
  void (*direct)(const DirectArgs<T>&, int64_t k0, int64_t k1);
  // sums[k] += the sum of P rows of Q elements at x + k * plane, ys apart, for k < K (a
  // convolution's bias gradient from one image's output gradient planes)
  void (*plane_sums)(const T* x, int64_t K, int64_t plane, int64_t P, int64_t Q, int64_t ys,
                     T* sums);
  bool (*direct_backward)(const DirectBackwardArgs<T>&, int64_t c0, int64_t c1);
  // dst = the C planes of src [C, H, W] inside zero margins (top, bottom, left, right)
  void (*pad)(const T* src, int64_t C, int64_t H, int64_t W, int64_t top, int64_t bottom,
              int64_t left, int64_t right, T* dst);
  // dst[c * drs + r] = src[r * srs + c] for r in [r0, r1), c < C
  void (*transpose)(const T* src, int64_t srs, T* dst, int64_t drs, int64_t r0, int64_t r1,
                    int64_t C);
  // out[ow * N + n] = the maximum of top and bottom [W, N] at columns 2 ow and 2 ow + 1, lane n,
  // for ow < Wo (2 x 2 max pooling of two rows in the lanes layout; NaN as torch.maximum)
  void (*pool)(const T* top, const T* bottom, T* out, int64_t Wo, int64_t N);
};

struct Table {
  const char* name;
  int lanes;  // float32 lanes per vector of the batch-lane kernels (Linear, inference)
  Kernels<float> f32;
  Kernels<double> f64;
};

}  // namespace ps

extern "C" {
const ps::Table* ps_table_generic();
const ps::Table* ps_table_avx2();
const ps::Table* ps_table_avx512();
}
