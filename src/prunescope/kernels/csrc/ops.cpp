// Torch glue for the sparse kernels: layout packing, threading, CPU-feature dispatch and the
// operator registrations (torch.ops.prunescope_kernels.*). Compiled for the baseline ISA; the
// arithmetic lives in kern_*.cpp, one translation unit per instruction set (see table.h).
//
// The batch is always the innermost (vector) dimension, so each kept weight is an AXPY or a dot
// product over contiguous lanes. Linear: activations as [batch tiles][features][T lanes] (see
// lane_tiles). Conv2d: directly on NCHW planes (stride 1, rows that fill their vectors), else the
// batch in groups of n images, each group's input packed as [C, Hp, sw, ceil(Wp / sw), n]
// (zero-padded, columns split by stride phase, so every kept tap reads one contiguous run of
// Q * n lanes per output row), its output computed as [K, P, Q, n] and transposed to
// [n, K, P, Q]. geom = [C, K, R, S, sh, sw, pt, pb, pl, pr, dh, dw, groups]. Threads split the
// rows (output or input channels) into ranges of equal work, with no synchronisation inside a
// range, or take whole images or groups. See docs/kernels.md.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "aligned.h"
#include "table.h"

namespace {

bool has_avx2() {
  __builtin_cpu_init();  // the CPU's own report (CPUID, and XGETBV for the OS saving AVX state)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

bool has_avx512() {
  __builtin_cpu_init();  // avx512f also means the OS saves the 512-bit state
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}

const ps::Table* best_table() {
  return has_avx512() ? ps_table_avx512() : has_avx2() ? ps_table_avx2() : ps_table_generic();
}

const ps::Table*& active() {
  static const ps::Table* table = best_table();
  return table;
}

std::string variant() { return active()->name; }

std::string set_variant(const std::string& name) {
  if (name == "auto") {
    active() = best_table();
  } else if (name == "generic") {
    active() = ps_table_generic();
  } else if (name == "avx2") {
    TORCH_CHECK(has_avx2(), "this CPU has no AVX2/FMA; use 'generic' or 'auto'");
    active() = ps_table_avx2();
  } else if (name == "avx512") {
    TORCH_CHECK(has_avx512(), "this CPU has no AVX-512 F/DQ/VL; use 'avx2', 'generic' or 'auto'");
    active() = ps_table_avx512();
  } else {
    TORCH_CHECK(false, "unknown kernel variant '", name, "'; use auto, generic, avx2 or avx512");
  }
  return active()->name;
}

template <class T>
const ps::Kernels<T>& kernels();
template <>
const ps::Kernels<float>& kernels<float>() { return active()->f32; }
template <>
const ps::Kernels<double>& kernels<double>() { return active()->f64; }

// ---- threading --------------------------------------------------------------------------------------
// Split rows [0, rows) into one contiguous range per thread with equal cost, cost(row) = its taps +
// a fixed per-row share; each range runs on one thread with no synchronisation inside. Bounds are
// rounded to multiples of `align` rows (threads writing one output row apart share no cache line).
// below ~2^18 multiply-adds (~20 us on one core) a second thread costs more than it saves
constexpr int64_t kSerialWork = 1 << 18;

template <class F>
void parallel_rows(const int64_t* ptr, int64_t rows, int64_t lanes, const F& fn,
                   int64_t align = 1) {
  const int64_t threads = at::get_num_threads();
  const int64_t taps = ptr[rows] - ptr[0];
  constexpr int64_t kRowCost = 2;
  if (threads <= 1 || rows < 2 || (taps + rows) * lanes < kSerialWork) {
    fn(0, rows);
    return;
  }
  const int64_t total = taps + kRowCost * rows;
  std::vector<int64_t> bounds(threads + 1, rows);
  bounds[0] = 0;
  int64_t row = 0;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t target = total * t / threads;
    while (row < rows && (ptr[row] - ptr[0]) + kRowCost * row < target) ++row;
    bounds[t] = std::max(bounds[t - 1], std::min(rows, (row + align / 2) / align * align));
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      if (bounds[t] < bounds[t + 1]) fn(bounds[t], bounds[t + 1]);
  });
}

// dst[c * drs + r] = src[r * srs + c] for r < R, c < C, on all threads (split over the longer side).
template <class T>
void transpose2d(const T* src, int64_t srs, T* dst, int64_t drs, int64_t R, int64_t C) {
  if (R == 0 || C == 0) return;
  constexpr int64_t kGrainElements = 1 << 16;
  constexpr int64_t kBlock = 128;
  if (R >= C) {
    const int64_t blocks = (R + kBlock - 1) / kBlock;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / (kBlock * C));
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      kernels<T>().transpose(src, srs, dst, drs, b0 * kBlock, std::min(b1 * kBlock, R), C);
    });
  } else {
    const int64_t blocks = (C + kBlock - 1) / kBlock;
    const int64_t grain = std::max<int64_t>(1, kGrainElements / (kBlock * R));
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      const int64_t c0 = b0 * kBlock, c1 = std::min(b1 * kBlock, C);
      kernels<T>().transpose(src + c0, srs, dst + c0 * drs, drs, 0, R, c1 - c0);
    });
  }
}

// ---- scratch memory ----------------------------------------------------------------------------------
// A call's temporaries (the batch-innermost output before it is unpacked, the packed output
// gradient, the packed input gradient) live in buffers the calling thread keeps between calls:
// multi-megabyte blocks freed after every call go back to the system and cost page faults when
// allocated anew (a 98%-sparse 64->64 3x3 conv at 32x32, batch 32: 1430 -> 1047 minor faults
// per forward + backward). A thread keeps one buffer per slot, as large as the largest its calls
// needed (three times a layer's largest activation at most). Slots of one call never overlap.
enum Slot {
  kOutSlot = 0, kGradSlot = 1, kGradInSlot = 2, kImageSlot = 3, kGradImageSlot = 4, kTapSumSlot = 5,
  kRowSumSlot = 6, kSlots = 7
};

template <class T>
T* scratch(Slot slot, int64_t n) {
  thread_local ps::AlignedArray<T> buffers[kSlots];
  thread_local int64_t sizes[kSlots] = {};
  if (sizes[slot] < n) {
    buffers[slot].reset();  // release first: the old and new buffers are never both held
    buffers[slot] = ps::aligned_array<T>(n);
    sizes[slot] = n;
  }
  return buffers[slot].get();
}

// Permutations between the rows' order and the transposed structure's: each element is one
// random read or write, so a thread's share is worth it from a few thousand elements on.
constexpr int64_t kPermuteGrain = 1 << 14;

// Where the permuted values are larger than the slab budget (so their random side comes from L3
// or memory), each permutation requests the element kPermuteAhead places ahead into the cache:
// 4096 -> 4096 at 95%, batch 64, one thread, forward + backward, one process alternating call by
// call: 1.10x faster (quartiles of the pairs 1.06-1.14), 1.05x with cold caches, 1.04x on two
// threads and at 98%; where they fit (1024 -> 1024, 84 KB) 0.96-1.02x, so no requests there.
// 64 ahead against 32: 1.01-1.04x; 128 against 64 (200 pairs): 1.04x at batch 64 (quartiles
// 1.01-1.08), 1.03x on two threads, 1.005x at batch 256; 256 against 64: 1.00-1.02x.
// The threshold is half the slab budget: the values share L2 with the step's slabs of the input
// and the output gradient. On the Intel Xeon of 2026-12-04 (2 MiB L2, a 1.5 MiB budget), against
// the whole budget (60 pairs): 4096 -> 4096 at 98% (1.34 MB of values) 1.09x faster on one and
// two threads, 1.02x at batch 256; 1024 -> 1024 at 80% (0.84 MB) 1.03x.
constexpr int64_t kPermuteAhead = 128;
int64_t slab_bytes();

template <class T>
bool permute_ahead(const at::Tensor& values) {
  return values.numel() * static_cast<int64_t>(sizeof(T)) > slab_bytes() / 2;
}

// The weights in the transposed structure's order (input channel by input channel).
template <class T>
at::Tensor in_column_order(const at::Tensor& values, const at::Tensor& cperm) {
  at::Tensor out = at::empty({values.numel()}, values.options());
  const T* v = values.const_data_ptr<T>();
  const int32_t* perm = cperm.const_data_ptr<int32_t>();
  T* o = out.mutable_data_ptr<T>();
  const bool ahead = permute_ahead<T>(values);
  at::parallel_for(0, values.numel(), kPermuteGrain, [&](int64_t m0, int64_t m1) {
    int64_t m = m0;
    if (ahead)
      for (; m + kPermuteAhead < m1; ++m) {
        __builtin_prefetch(v + perm[m + kPermuteAhead]);
        o[m] = v[perm[m]];
      }
    for (; m < m1; ++m) o[m] = v[perm[m]];
  });
  return out;
}

// dst[cperm[m]] = src[m]: a weight gradient from the transposed structure's order back to the
// rows' (the inverse of in_column_order), in a new tensor. Its writes are random: below
// permute_ahead's threshold it is zero-filled first, a sequential pass the prefetchers follow, so
// that they land in cache instead of each fetching its line (1024 -> 1024 and 768 -> 3072 at
// batch 64, 95-98%, forward + backward after the dense layer's step, one thread, one process
// alternating call by call, 400 pairs: 1.00-1.05x faster; with warm caches 1.00); beyond it, each
// write requests the one kPermuteAhead places ahead.
template <class T>
at::Tensor from_column_order(const at::Tensor& src, const at::Tensor& cperm) {
  const bool ahead = permute_ahead<T>(src);
  at::Tensor dst = ahead ? at::empty_like(src) : at::zeros_like(src);
  const T* s = src.const_data_ptr<T>();
  const int32_t* perm = cperm.const_data_ptr<int32_t>();
  T* d = dst.mutable_data_ptr<T>();
  at::parallel_for(0, src.numel(), kPermuteGrain, [&](int64_t m0, int64_t m1) {
    int64_t m = m0;
    if (ahead)
      for (; m + kPermuteAhead < m1; ++m) {
        __builtin_prefetch(d + perm[m + kPermuteAhead], 1);  // for writing
        d[perm[m]] = s[m];
      }
    for (; m < m1; ++m) d[perm[m]] = s[m];
  });
  return dst;
}

// ---- Linear: lane tiles ------------------------------------------------------------------------------
// The batch is cut into tiles of T lanes; a [rows, batch] operand is stored as one [rows, T] slab
// per tile (the last one padded), so the rows a kernel reads for one tile are contiguous and, with
// T chosen from the number of rows it reads, fit in three quarters of the core's L2 cache
// (slab_bytes). T is 1, 2, 3, 4 or 8 vectors, at most kTileLanes lanes: the weight gradient walks
// a tile in runs of 4 vectors, and a 5-vector tile would cost it a second pass over every row's
// taps for the last vector. Each pass tiles for its own reads: the forward reads the input's `in`
// rows, the backward the output gradient's `out` rows (input gradient) and the input's (weight
// gradient), so the forward of a widening layer can take wider tiles than its backward.
// Wider tiles mean fewer passes over the weights (every tile streams all of them) against a slab
// that fills more of L2. Measured on a 1 MiB L2 (forward + backward, one process, the budgets
// alternating call by call, 95%, batch 64-256): 768 KiB against 256 KiB was 1.16-1.22x faster for
// 768 -> 3072 (one and two threads), 1.08x for 3072 -> 768 and 4096 -> 4096 at batch 256, within
// 1.0 +- 0.03 elsewhere; forward alone 1.47x for 3072 -> 768 and 1.24x for 1536 -> 384 (batch
// 8192, two threads); a whole 1 MiB slab (4096 -> 4096 at 64 lanes) was 0.93x at 98%.
struct Tiles {
  int64_t B, T, full, rem;
  int64_t count() const { return full + (rem > 0); }
  int64_t width(int64_t t) const { return t < full ? T : rem; }
};

// Three quarters of the L2 cache of one core as the C library reports it (512 KiB assumed where it
// does not), within [192 KiB, 3 MiB].
int64_t slab_bytes() {
  static const int64_t bytes = [] {
    int64_t l2 = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    if (l2 <= 0) l2 = 512 << 10;
    return std::clamp<int64_t>(l2, 256 << 10, 4 << 20) / 4 * 3;
  }();
  return bytes;
}

// The widest lane tile: one pass of the gather over a row's taps (kernels.h, kBufLanes). With
// 16-lane vectors, 128-lane tiles made the gather pass twice over the weights per tile anyway,
// from a slab twice the size (forward, 768 -> 3072 at batch 256, 90%, before the buffers were
// aligned: 0.74x of the AVX2 kernels' speed with 128-lane tiles, 0.92x with 64-lane ones).
constexpr int64_t kTileLanes = 64;

// Whether an input of `rows` rows of `lanes` lanes is larger than the L2 budget (slab_bytes), so
// that a gather's runs from it come from L3 or memory: then a Linear's gather requests each tap's
// run ahead (GatherArgs::prefetch), and column_blocks cuts it into L2-sized blocks.
template <class T>
bool runs_beyond_l2(int64_t rows, int64_t lanes) {
  return rows * lanes * static_cast<int64_t>(sizeof(T)) > slab_bytes();
}

Tiles lane_tiles(int64_t B, int64_t rows, int lanes) {
  const int64_t slab_floats = slab_bytes() / static_cast<int64_t>(sizeof(float));
  const int64_t most = kTileLanes / lanes;
  int64_t vectors =
      std::clamp<int64_t>(slab_floats / (std::max<int64_t>(rows, 1) * lanes), 1, most);
  if (vectors > 4) vectors = vectors < 8 ? 4 : 8;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(vectors * lanes, B));
  return {B, T, B / T, B % T};
}

// Lane tile i of src [B, C] (row stride srs), columns [c0, c1), into its slab [C][T]; the lanes
// past a narrower last tile's width are zero.
template <class T>
void pack_tile(const T* src, int64_t srs, const Tiles& t, int64_t i, int64_t c0, int64_t c1,
               T* slab) {
  kernels<T>().transpose(src + i * t.T * srs + c0, srs, slab + c0 * t.T, t.T, 0, t.width(i),
                         c1 - c0);
  if (t.width(i) < t.T)
    for (int64_t c = c0; c < c1; ++c)
      std::fill(slab + c * t.T + t.width(i), slab + (c + 1) * t.T, T(0));
}

// src [B, C] (row stride srs) -> [tiles][C][T], the last tile's unused lanes zero. One parallel
// region over (tile, block of 128 columns). With `sums`, also sums[c] = the sum of src's column c
// over the B rows (a Linear's bias gradient, from the output gradient while the packing has its
// block in cache): each tile's sums in T, their total in double (the tiles' float32 sums added
// in order lost up to 17x the accuracy of torch's own sum at 200000 rows). A work item is then
// one block with all its tiles, so no two threads write the same sums.
template <class T>
void pack_tiles_into(const T* src, int64_t srs, int64_t C, const Tiles& t, T* dst,
                     T* sums = nullptr) {
  const int64_t blocks = (C + 127) / 128, per_item = sums ? t.count() : 1;
  const int64_t items = sums ? blocks : t.count() * blocks;
  const int64_t item_lanes = 128 * t.T * std::max<int64_t>(per_item, 1);
  at::parallel_for(0, items, std::max<int64_t>(1, (1 << 16) / item_lanes),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t item = b0; item < b1; ++item) {
      const int64_t block = sums ? item : item % blocks, c0 = block * 128;
      const int64_t c1 = std::min(c0 + 128, C);
      const int64_t first = sums ? 0 : item / blocks;
      double totals[128] = {};
      for (int64_t i = first; i < first + per_item; ++i) {
        pack_tile<T>(src, srs, t, i, c0, c1, dst + i * C * t.T);
        if (!sums) continue;
        const T* rows = src + i * t.T * srs;
        T tile[128] = {};  // a tile's sums in T (at most 64 rows), vectorised; the total in double
        for (int64_t r = 0; r < t.width(i); ++r)
          for (int64_t c = c0; c < c1; ++c) tile[c - c0] += rows[r * srs + c];
        for (int64_t c = c0; c < c1; ++c) totals[c - c0] += tile[c - c0];
      }
      if (sums)
        for (int64_t c = c0; c < c1; ++c) sums[c] = static_cast<T>(totals[c - c0]);
    }
  });
}

template <class T>
at::Tensor pack_tiles(const T* src, int64_t srs, int64_t C, const Tiles& t,
                      const at::TensorOptions& options) {
  at::Tensor out = at::empty({t.count() * C * t.T}, options);
  pack_tiles_into<T>(src, srs, C, t, out.mutable_data_ptr<T>());
  return out;
}

// Column blocks of a slab of `columns` rows of T lanes: each block's share of the slab (at most
// kBlockBytes) stays in the fastest caches while every output row reads it. Measured on MiniLM's
// widths (2048 rows, 80-90% sparse): 3-13% faster for 1536 input rows (4 blocks); the kernels
// read slabs of 384 rows x 32 lanes (48 KiB) as fast as slabs of 96 rows. But every block is
// one more pass over the rows' taps in short pieces, which the prefetchers cannot follow: with
// weights (values and indices) larger than an L2 cache, or fewer than kMinBlockTaps taps per row
// and block, blocks cost more than they save (4096x4096 at 95%, batch 256, one thread: forward
// 2.4x and forward + backward 3.1x slower with 6 blocks than without; 1024x1024 at 95%, batch
// 64, 8.5 taps per row and block: 1.4-1.5x slower), and the slab is read whole, unless the slab
// itself is larger than the L2 budget (slab_bytes; an inference layer of many inputs, whose lanes
// are not tiled to fit): then each row's taps would fetch their runs from L3 or memory, and blocks
// of kL2BlockBytes keep a block's share in L2 while every row reads it. Conv-2's 16384 -> 256
// layer at 90%, batch 64 (a 4 MiB slab, 3.4 MB of weights): the whole model's inference 1.17x
// faster on two threads with 512 KiB blocks, 1.12x on one, 1.09x at batch 256 (1 MiB blocks:
// 1.14x, 256 KiB: 0.89x of 512 KiB's speed; one process alternating call by call, 60 pairs).
struct Blocks {
  std::vector<int64_t> bptr;  // [rows][nb + 1]; empty for one block
  int64_t nb = 1;
};

constexpr int64_t kBlockBytes = 48 << 10;
constexpr int64_t kBlockWeightBytes = 1 << 20;
constexpr int64_t kL2BlockBytes = 512 << 10;
constexpr int64_t kMinBlockTaps = 16;

// Row k's taps split into runs by blocks of `width` columns: bptr[k * (nb + 1) + b] is its first
// tap in block b. Any split of a row's taps into consecutive runs gives the same sums (formats
// lays columns out ascending in each row, so each run is one block's).
template <class T>
Blocks column_blocks(const at::Tensor& ptr, const at::Tensor& idx, int64_t columns,
                     const Tiles& t) {
  Blocks out;
  const int64_t rows = ptr.numel() - 1, taps = idx.numel();
  const int64_t slab = columns * t.T * static_cast<int64_t>(sizeof(T));
  const int64_t weight_bytes = taps * static_cast<int64_t>(sizeof(T) + sizeof(int32_t));
  if (weight_bytes <= kBlockWeightBytes)
    out.nb = std::max<int64_t>(1, (slab + kBlockBytes - 1) / kBlockBytes);
  else if (runs_beyond_l2<T>(columns, t.T))
    out.nb = (slab + kL2BlockBytes - 1) / kL2BlockBytes;
  if (taps < kMinBlockTaps * rows * out.nb) out.nb = 1;
  if (out.nb == 1) return out;
  const int64_t width = (columns + out.nb - 1) / out.nb, nb = out.nb;
  const int64_t* p = ptr.const_data_ptr<int64_t>();
  const int32_t* c = idx.const_data_ptr<int32_t>();
  out.bptr.resize(rows * (nb + 1));
  for (int64_t k = 0; k < rows; ++k) {
    int64_t j = p[k];
    for (int64_t b = 0; b < nb; ++b) {
      out.bptr[k * (nb + 1) + b] = j;
      while (j < p[k + 1] && c[j] < (b + 1) * width) ++j;
    }
    out.bptr[k * (nb + 1) + nb] = p[k + 1];
  }
  return out;
}

// out[B, rows] = the product over the packed tiles of x: the full tiles as output rows p of one
// call, the remainder tile as a second call, each writing its lanes' output rows directly
// (transposed in registers; no unpacking pass). Threads own 16-row (64-byte) column blocks.
template <class T>
at::Tensor gather_tiles(const T* xt, int64_t in, const at::Tensor& ptr, const at::Tensor& idx,
                        const T* vals, const T* bias, const Tiles& t,
                        const at::TensorOptions& options) {
  const int64_t rows = ptr.numel() - 1;
  at::Tensor out = at::empty({t.B, rows}, options);
  if (t.B == 0) return out;
  const Blocks blocks = column_blocks<T>(ptr, idx, in, t);
  ps::GatherArgs<T> a{xt, in * t.T, out.mutable_data_ptr<T>(), 1, t.T * rows,
                      ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int32_t>(), t.T, vals,
                      bias, t.full, t.T, rows, blocks.nb > 1 ? blocks.bptr.data() : nullptr,
                      blocks.nb};
  a.prefetch = runs_beyond_l2<T>(in, t.T);
  ps::GatherArgs<T> r = a;
  r.x += t.full * a.x_p, r.y += t.full * a.y_p, r.P = 1, r.L = t.rem;
  parallel_rows(a.ptr, rows, t.B, [&](int64_t r0, int64_t r1) {
    if (a.P > 0) kernels<T>().gather(a, r0, r1);
    if (r.L > 0) kernels<T>().gather(r, r0, r1);
  }, 16);
  return out;
}

// The weight gradient, tile by tile (every tile at full width: the padded lanes are zero).
template <class T>
void sddmm_tiles(ps::SddmmArgs<T> a, const Tiles& t, int64_t rows, const Blocks& blocks) {
  a.P = t.count(), a.L = t.T, a.accumulate = false;
  a.bptr = blocks.nb > 1 ? blocks.bptr.data() : nullptr, a.nb = blocks.nb;
  parallel_rows(a.ptr, rows, t.B, [&](int64_t r0, int64_t r1) {
    kernels<T>().sddmm_short(a, r0, r1);
  });
}

// dx [B, I] and the weight gradient in the transposed structure's order (added to dwc) in one
// pass over the transposed structure (kernels.h: backward): dyt and xt are the output gradient
// and the input packed in the same tiles; threads own 16-row blocks of input features, as in
// gather_tiles.
template <class T>
at::Tensor linear_backward_fused(const T* dyt, const T* xt, int64_t I, int64_t K,
                                 const at::Tensor& cptr, const at::Tensor& crow,
                                 const at::Tensor& cvals, const Tiles& t, at::Tensor& dwc,
                                 const at::TensorOptions& options) {
  at::Tensor dx = at::empty({t.B, I}, options);
  const Blocks blocks = column_blocks<T>(cptr, crow, K, t);
  ps::BackwardArgs<T> a{{dyt, K * t.T, dx.mutable_data_ptr<T>(), 1, t.T * I,
                         cptr.const_data_ptr<int64_t>(), crow.const_data_ptr<int32_t>(), t.T,
                         cvals.const_data_ptr<T>(), nullptr, t.full, t.T, I,
                         blocks.nb > 1 ? blocks.bptr.data() : nullptr, blocks.nb},
                        xt, t.T, I * t.T, dwc.mutable_data_ptr<T>()};
  ps::BackwardArgs<T> r = a;
  r.g.x += t.full * a.g.x_p, r.g.y += t.full * a.g.y_p, r.x += t.full * a.x_p;
  r.g.P = 1, r.g.L = t.rem;
  parallel_rows(a.g.ptr, I, t.B, [&](int64_t r0, int64_t r1) {
    if (a.g.P > 0) kernels<T>().backward(a, r0, r1);
    if (r.g.L > 0) kernels<T>().backward(r, r0, r1);
  }, 16);
  return dx;
}

// Fewer lane tiles than two per thread: threads share every tile's rows instead of taking whole
// tiles.
bool tiles_shared(const Tiles& t) {
  const int64_t threads = at::get_num_threads();
  return threads > 1 && t.count() < 2 * threads;
}

// y = W x + b tile by tile: each thread takes whole lane tiles, packs each into a slab (one of its
// own, or the tile's place in `packed`, where the backward reads it later)
// and computes every output row for it while the slab is in cache, in one parallel region.
template <class T>
at::Tensor tiled_forward(const at::Tensor& xc, const at::Tensor& values, const at::Tensor& b,
                         const at::Tensor& ptr, const at::Tensor& idx, const Tiles& t,
                         T* packed) {
  const int64_t B = xc.size(0), I = xc.size(1), K = ptr.numel() - 1;
  at::Tensor y = at::empty({B, K}, xc.options());
  const Blocks blocks = column_blocks<T>(ptr, idx, I, t);
  const T* src = xc.const_data_ptr<T>();
  T* out = y.mutable_data_ptr<T>();
  ps::GatherArgs<T> a{nullptr, 0, nullptr, 1, 0, ptr.const_data_ptr<int64_t>(),
                      idx.const_data_ptr<int32_t>(), t.T, values.const_data_ptr<T>(),
                      b.defined() ? b.const_data_ptr<T>() : nullptr, 1, 0, K,
                      blocks.nb > 1 ? blocks.bptr.data() : nullptr, blocks.nb};
  a.prefetch = runs_beyond_l2<T>(I, t.T);
  at::parallel_for(0, t.count(), 1, [&](int64_t p0, int64_t p1) {
    const ps::AlignedArray<T> own = ps::aligned_array<T>(packed ? 0 : I * t.T);
    ps::GatherArgs<T> tile = a;
    for (int64_t p = p0; p < p1; ++p) {
      T* slab = packed ? packed + p * I * t.T : own.get();
      pack_tile<T>(src, I, t, p, 0, I, slab);
      tile.x = slab, tile.y = out + p * t.T * K, tile.L = t.width(p);
      kernels<T>().gather(tile, 0, K);
    }
  });
  return y;
}

// y and the input packed in lane tiles (as the backward reads it): tile by tile, each packed
// into its place and computed while in cache (tiled_forward), or, with fewer than two tiles per
// thread, packed whole and every tile's rows shared out. Tile by tile against packed whole
// (forward + backward, one process alternating call by call, 40-60 pairs, 1024 -> 1024 and
// 4096 -> 4096 at 95-98%, batch 64-256, one and two threads): median ratios 1.00-1.03.
template <class T>
std::tuple<at::Tensor, at::Tensor> linear_packed_forward(const at::Tensor& xc,
                                                         const at::Tensor& values,
                                                         const at::Tensor& b,
                                                         const at::Tensor& ptr,
                                                         const at::Tensor& idx, const Tiles& t) {
  const int64_t I = xc.size(1);
  if (!tiles_shared(t)) {
    at::Tensor xt = at::empty({t.count() * I * t.T}, xc.options());
    return {tiled_forward<T>(xc, values, b, ptr, idx, t, xt.mutable_data_ptr<T>()), xt};
  }
  at::Tensor xt = pack_tiles<T>(xc.const_data_ptr<T>(), I, I, t, xc.options());
  at::Tensor y = gather_tiles<T>(xt.const_data_ptr<T>(), I, ptr, idx, values.const_data_ptr<T>(),
                                 b.defined() ? b.const_data_ptr<T>() : nullptr, t, xc.options());
  return {y, xt};
}

// The forward without autograd, and with it for a widening layer (linear_train_forward_impl):
// each thread packs its own lane tiles into a slab of its own (kept in cache, never written to
// memory as a whole) and computes every output row for them (tiled_forward). Fewer tiles than
// two per thread: the packed path above.
template <class T>
at::Tensor linear_forward_impl(const at::Tensor& x, const at::Tensor& values,
                               const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                               const at::Tensor& idx) {
  const int64_t B = x.size(0), I = x.size(1);
  const Tiles t = lane_tiles(B, I, active()->lanes);
  const at::Tensor xc = x.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (tiles_shared(t)) return std::get<0>(linear_packed_forward<T>(xc, values, b, ptr, idx, t));
  return tiled_forward<T>(xc, values, b, ptr, idx, t, nullptr);
}

// The backward's tiles: its slabs are the output gradient's `out` rows and the input's `in` rows.
Tiles backward_tiles(int64_t B, int64_t in, int64_t out) {
  return lane_tiles(B, std::max(in, out), active()->lanes);
}

// The forward with autograd: y, and the input as the backward reads it. Where the backward tiles
// as the forward does (every layer whose input is at least as wide as its output), the input
// packed once at that width (1-d); otherwise (a widening layer, whose forward takes wider tiles)
// the input as it came (2-d), packed again by the backward.
template <class T>
std::tuple<at::Tensor, at::Tensor> linear_train_forward_impl(const at::Tensor& x,
                                                             const at::Tensor& values,
                                                             const std::optional<at::Tensor>& bias,
                                                             const at::Tensor& ptr,
                                                             const at::Tensor& idx) {
  const int64_t B = x.size(0), I = x.size(1), K = ptr.numel() - 1;
  const Tiles t = backward_tiles(B, I, K);
  const at::Tensor xc = x.contiguous();
  if (lane_tiles(B, I, active()->lanes).T != t.T)
    return {linear_forward_impl<T>(xc, values, bias, ptr, idx), xc};
  return linear_packed_forward<T>(xc, values,
                                  bias.has_value() ? bias->contiguous() : at::Tensor(), ptr, idx,
                                  t);
}

// Both gradients in one pass over the transposed structure (linear_backward_fused); a first layer
// (no input gradient) takes the weight gradient alone over the rows (sddmm_tiles), frozen weights
// the input gradient alone (gather_tiles). Measured against the two separate passes, alternating
// call by call in one process (the backward alone, median ratios, 95-98%): 3072 -> 768 at batch
// 256 1.39x faster, 1024 -> 1024 and 4096 -> 4096 at batch 64 to 256 1.03-1.07x, 768 -> 3072
// 1.01-1.04x (the separate weight gradient there reads the narrow input's slab, mostly from L1).
template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward_impl(
    const at::Tensor& dy, const at::Tensor& saved, int64_t I, const at::Tensor& values,
    const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& cptr,
    const at::Tensor& cperm, const at::Tensor& crow, bool need_dx, bool need_dw, bool need_db) {
  const int64_t B = dy.size(0), K = dy.size(1);
  const Tiles t = backward_tiles(B, I, K);
  const at::Tensor dyc = dy.contiguous();
  T* dyt = scratch<T>(kGradSlot, t.count() * K * t.T);
  at::Tensor dx, dw, db;
  if (need_db) db = at::empty({K}, dy.options());
  pack_tiles_into<T>(dyc.const_data_ptr<T>(), K, K, t, dyt,
                     need_db ? db.mutable_data_ptr<T>() : nullptr);
  const T* xt = saved.defined() ? saved.const_data_ptr<T>() : nullptr;  // for dw only
  if (need_dw && saved.dim() == 2) {  // the input as it came (see linear_train_forward_impl)
    T* packed = scratch<T>(kOutSlot, t.count() * I * t.T);
    pack_tiles_into<T>(xt, I, I, t, packed);
    xt = packed;
  }
  const at::Tensor cvals = need_dx ? in_column_order<T>(values, cperm) : at::Tensor();
  if (need_dw && need_dx && B > 0) {
    at::Tensor dwc = at::zeros({values.numel()}, values.options());
    dx = linear_backward_fused<T>(dyt, xt, I, K, cptr, crow, cvals, t, dwc, dy.options());
    dw = from_column_order<T>(dwc, cperm);
  } else if (need_dw) {
    dw = at::zeros({values.numel()}, values.options());  // stays zero for an empty batch
    if (B > 0)
      sddmm_tiles<T>({dyt, t.T, K * t.T, 0, xt, I * t.T,
                      0, 0, ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int32_t>(), t.T,
                      dw.mutable_data_ptr<T>(), 0, 0, false},
                     t, K, column_blocks<T>(ptr, idx, I, t));
  }
  if (need_dx && !dx.defined())
    dx = gather_tiles<T>(dyt, K, cptr, crow, cvals.const_data_ptr<T>(), nullptr, t, dy.options());
  return {dx, dw, db};
}

// ---- Conv2d: geometry and packing ------------------------------------------------------------------
struct Geom {
  int64_t N, C, H, W, K, R, S, sh, sw, pt, pb, pl, pr, dh, dw, G;
  int64_t P, Q, Hp, Wp, Wj;
  int64_t cg() const { return C / G; }
  int64_t kg() const { return K / G; }
  int64_t L() const { return Q * N; }
  int64_t plane() const { return Hp * sw * Wj * N; }  // one packed input channel
  int64_t row() const { return sw * Wj * N; }         // one packed input row
  int64_t phase() const { return Wj * N; }            // one stride phase of a row
  bool plain() const { return pt == 0 && pb == 0 && pl == 0 && pr == 0 && sw == 1; }
};

Geom make_geom(at::IntArrayRef x, at::IntArrayRef g) {
  TORCH_CHECK(g.size() == 13, "geom must have 13 entries");
  TORCH_CHECK(x.size() == 4, "a Conv2d input must be 4-d [N, C, H, W]");
  Geom o{};
  o.N = x[0], o.H = x[2], o.W = x[3];
  o.C = g[0], o.K = g[1], o.R = g[2], o.S = g[3], o.sh = g[4], o.sw = g[5];
  o.pt = g[6], o.pb = g[7], o.pl = g[8], o.pr = g[9], o.dh = g[10], o.dw = g[11], o.G = g[12];
  TORCH_CHECK(x[1] == o.C, "the input has ", x[1], " channels, the layer ", o.C);
  TORCH_CHECK(o.G >= 1 && o.C % o.G == 0 && o.K % o.G == 0, "groups must divide both channels");
  o.Hp = o.H + o.pt + o.pb;
  o.Wp = o.W + o.pl + o.pr;
  TORCH_CHECK(o.Hp - o.dh * (o.R - 1) >= 1 && o.Wp - o.dw * (o.S - 1) >= 1,
              "the input (", o.H, " x ", o.W, ") is smaller than the dilated kernel");
  o.P = (o.Hp - o.dh * (o.R - 1) - 1) / o.sh + 1;
  o.Q = (o.Wp - o.dw * (o.S - 1) - 1) / o.sw + 1;
  o.Wj = (o.Wp + o.sw - 1) / o.sw;
  TORCH_CHECK(o.C * o.plane() < std::numeric_limits<int32_t>::max() &&
                  o.K * (o.P + 2 * o.dh * o.R) * (o.Q + 2 * o.dw * o.S) * o.N <
                      std::numeric_limits<int32_t>::max(),
              "the layer's activations exceed 2^31 elements; the sparse kernels index with int32");
  return o;
}

// C planes [rows, cols] with zero margins around their H x W interior (of N lanes per element in
// the batch-innermost layout); the direct path's buffers of one image are followed by kSlack
// readable elements (its kernels read whole vectors past a row's last column).
constexpr int64_t kSlack = 16;
struct Padded {
  int64_t C, H, W, top, bottom, left, right;
  int64_t rows() const { return H + top + bottom; }
  int64_t cols() const { return W + left + right; }
  int64_t plane() const { return rows() * cols(); }
  int64_t size() const { return C * plane() + kSlack; }
};

// The output gradient's planes [K, P, Q], with zero margins wide enough for every tap of a
// stride-1 input gradient (the forward over the flipped taps) where `margins`, else none.
Padded gradient_planes(const Geom& g, bool margins) {
  if (!margins) return {g.K, g.P, g.Q, 0, 0, 0, 0};
  return {g.K, g.P, g.Q, std::max<int64_t>(0, (g.R - 1) * g.dh - g.pt),
          std::max<int64_t>(0, (g.R - 1) * g.dh - g.pb),
          std::max<int64_t>(0, (g.S - 1) * g.dw - g.pl),
          std::max<int64_t>(0, (g.S - 1) * g.dw - g.pr)};
}

// Offset of each tap of the transposed structure (input channel by input channel, taps flipped)
// in the output gradient laid out as e, with n lanes per element.
std::vector<int32_t> flipped_offsets(const at::Tensor& taps, const at::Tensor& cperm,
                                     const at::Tensor& crow, const Geom& g, const Padded& e,
                                     int64_t n) {
  const int32_t* t = taps.const_data_ptr<int32_t>();
  const int32_t* perm = cperm.const_data_ptr<int32_t>();
  const int32_t* krow = crow.const_data_ptr<int32_t>();
  std::vector<int64_t> in_plane;  // by tap index (see tap_offsets: no division per tap)
  in_plane.reserve(g.cg() * g.R * g.S);
  for (int64_t c = 0; c < g.cg(); ++c)
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t s = 0; s < g.S; ++s)
        in_plane.push_back((e.top + g.pt - r * g.dh) * e.cols() + e.left + g.pl - s * g.dw);
  std::vector<int32_t> off(taps.numel());
  for (int64_t m = 0; m < taps.numel(); ++m)
    off[m] = static_cast<int32_t>((krow[m] * e.plane() + in_plane[t[perm[m]]]) * n);
  return off;
}

// Zero the margins of one plane [H + top + bottom, W + left + right, N] around its H x W interior.
template <class T>
void zero_margins(T* plane, int64_t H, int64_t W, int64_t N, int64_t top, int64_t bottom,
                  int64_t left, int64_t right) {
  const int64_t rowlen = (W + left + right) * N, planelen = (H + top + bottom) * rowlen;
  std::fill(plane, plane + top * rowlen, T(0));
  std::fill(plane + (top + H) * rowlen, plane + planelen, T(0));
  if (left + right == 0) return;
  for (int64_t h = top; h < top + H; ++h) {
    T* row = plane + h * rowlen;
    std::fill(row, row + left * N, T(0));
    std::fill(row + (left + W) * N, row + rowlen, T(0));
  }
}

// src [N, C, H, W] -> [C, H + top + bottom, W + left + right, N] with zero margins (stride 1).
template <class T>
void pack_margins(const T* src, int64_t N, int64_t C, int64_t H, int64_t W, int64_t top,
                  int64_t bottom, int64_t left, int64_t right, T* dst) {
  const int64_t chw = C * H * W;
  if (top + bottom + left + right == 0) {
    transpose2d<T>(src, chw, dst, N, N, chw);
    return;
  }
  const int64_t rowlen = (W + left + right) * N, planelen = (H + top + bottom) * rowlen;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* plane = dst + c * planelen;
      zero_margins(plane, H, W, N, top, bottom, left, right);
      for (int64_t h = 0; h < H; ++h)
        kernels<T>().transpose(src + (c * H + h) * W, chw, plane + (top + h) * rowlen + left * N,
                               N, 0, N, W);
    }
  });
}

// The images of src [N, C, H, W] (g.N of them, the next image C * H * W elements on) packed into
// dst as [C, Hp, sw, Wj, N]: zero-padded, columns split by stride phase.
template <class T>
void pack_group(const T* src, const Geom& g, T* dst) {
  if (g.sw == 1) {
    pack_margins<T>(src, g.N, g.C, g.H, g.W, g.pt, g.pb, g.pl, g.pr, dst);
    return;
  }
  const int64_t chw = g.C * g.H * g.W;
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    std::fill(dst + c0 * g.plane(), dst + c1 * g.plane(), T(0));
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t h = 0; h < g.H; ++h)
        for (int64_t w = 0; w < g.W; ++w) {
          const int64_t col = w + g.pl;
          T* d = dst + c * g.plane() + (h + g.pt) * g.row() + (col % g.sw) * g.phase() +
                 (col / g.sw) * g.N;
          const T* s = src + (c * g.H + h) * g.W + w;
          for (int64_t n = 0; n < g.N; ++n) d[n] = s[n * chw];
        }
  });
}

// at(c, r, s) for each kept tap j of each output channel (taps = (c_in_group * R + r) * S + s,
// c the input channel): the tap's offset in a layout of the input, looked up in a table over
// every (c, r, s). Splitting each tap index by the runtime R and S took four integer divisions a
// tap: 93 us per call for the 11.8k taps of 256 -> 256 (3 x 3) at 98%, 4% of its forward.
template <class F>
std::vector<int32_t> tap_offsets(const at::Tensor& ptr, const at::Tensor& taps, const Geom& g,
                                 const F& at) {
  const int64_t* p = ptr.const_data_ptr<int64_t>();
  const int32_t* t = taps.const_data_ptr<int32_t>();
  std::vector<int64_t> table;
  table.reserve(g.C * g.R * g.S);
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t r = 0; r < g.R; ++r)
      for (int64_t s = 0; s < g.S; ++s) table.push_back(at(c, r, s));
  std::vector<int32_t> off(taps.numel());
  for (int64_t k = 0; k < g.K; ++k) {
    const int64_t* group = table.data() + (k / g.kg()) * g.cg() * g.R * g.S;
    for (int64_t j = p[k]; j < p[k + 1]; ++j) off[j] = static_cast<int32_t>(group[t[j]]);
  }
  return off;
}

// Offset of each kept tap's first lane in the packed input.
std::vector<int32_t> tap_offsets(const at::Tensor& ptr, const at::Tensor& taps, const Geom& g) {
  return tap_offsets(ptr, taps, g, [&](int64_t c, int64_t r, int64_t s) {
    return c * g.plane() + r * g.dh * g.row() + ((s * g.dw) % g.sw) * g.phase() +
           ((s * g.dw) / g.sw) * g.N;
  });
}

// [rows, N] -> [N, rows] as a tensor of `shape` (shape[0] == N).
template <class T>
at::Tensor unpack_rows(const T* t, const at::TensorOptions& options,
                       std::vector<int64_t> shape) {
  const int64_t n = shape[0];
  int64_t rows = 1;
  for (size_t d = 1; d < shape.size(); ++d) rows *= shape[d];
  at::Tensor out = at::empty(shape, options);
  transpose2d<T>(t, n, out.mutable_data_ptr<T>(), rows, rows, n);
  return out;
}

// ---- Conv2d: direct on NCHW planes (stride 1, rows that fill their vectors) ---------------------
// Such a convolution computes each image from its own planes: the image's channels are copied
// with their zero margins into a buffer of the thread's own (one image's activations, kept in the
// core's L2 cache while every output channel reads it), and an output row is a run of Q
// contiguous columns, so neither the input nor the output changes layout and threads split the
// batch. The batch-innermost path spent four passes over memory on layouts, more than the
// arithmetic of a 98%-sparse layer: 64 -> 64 channels at 32 x 32, batch 32, one thread, forward
// + backward 24.2 ms there, 7.6 ms here (SparseProp 16.5-20.1 ms). Computing it in groups of
// images (see groups_of) narrowed the gap, not closed it: forward + backward in one process,
// the two paths alternating call by call, batch 32, the grouped path took 1.4-2.0x the direct
// path's time at 64 -> 64 on 32 x 32 (90-98%) and 1.08-1.12x at 128 -> 128 on 16 x 16 (95%),
// one and two threads. Narrow rows fill their vectors poorly: at 10 x 10 and 12 x 12 (80%,
// forward + backward, before the one-pass backward) this path took 36 and 11 ms against 21 and 9
// ms batch innermost. Since the backward is one pass, rows of at least 8 columns that leave
// at most one lane in eight of their vectors unused are faster here too (batch 32, forward +
// backward after the dense layer's step, one process alternating call by call, against the
// grouped path): 256 -> 256 at 8 x 8 1.10x at 98%, 1.05x at 90% (one thread), 1.08x and 1.05x at
// 98% and 95% (two); 14 x 14, 95%: 1.10x and 1.20x; but 12 x 12 (a quarter of the lanes unused)
// 1.03x, 10 x 10 0.91x, and 512 -> 512 at 7 x 7 0.92x. Strided convolutions, whose output rows
// read every sw-th column, also keep the batch-innermost path.
constexpr int64_t kDirectMinWidth = 8;
// The widest vector of any table's direct-convolution kernels (8 float32 lanes, AVX-512's
// included: kernels.h, kernels_split): a row's lanes, and the one-pass backward's scratch holds
// one per tap.
constexpr int64_t kMaxLanes = 8;
bool direct_conv(const Geom& g) {
  const int64_t lanes = (g.Q + kMaxLanes - 1) / kMaxLanes * kMaxLanes;
  return g.sh == 1 && g.sw == 1 && g.Q >= kDirectMinWidth && 8 * g.Q >= 7 * lanes;
}

// Offset of each kept tap in one image's padded input planes d.
std::vector<int32_t> direct_offsets(const at::Tensor& ptr, const at::Tensor& taps, const Geom& g,
                                    const Padded& d) {
  return tap_offsets(ptr, taps, g, [&](int64_t c, int64_t r, int64_t s) {
    return c * d.plane() + r * g.dh * d.cols() + s * g.dw;
  });
}

template <class T>
void pad_image(const T* src, const Padded& d, T* dst) {
  kernels<T>().pad(src, d.C, d.H, d.W, d.top, d.bottom, d.left, d.right, dst);
  std::fill_n(dst + d.C * d.plane(), kSlack, T(0));
}

// fn(i0, i1) over items [0, items) on all threads, or on this one when the whole call is under
// kSerialWork multiply-adds.
template <class F>
void parallel_items(int64_t items, int64_t work, const F& fn) {
  if (work < kSerialWork || at::get_num_threads() <= 1) {
    fn(0, items);
    return;
  }
  at::parallel_for(0, items, 1, fn);
}

// The forward's parts of the input channels (DirectArgs::split): a block of output rows reads
// its input rows in every channel, and where those exceed kDirectL1Budget the channels come in
// parts that fit, as long as every output channel keeps kDirectMinPartTaps taps per part on
// average (each part stores and reloads the block's output). Ungrouped layers only (a group's
// taps lie in one part). One process alternating call by call, forward, batch 32, one thread,
// against one part: 64 -> 64 at 32 x 32 in 2 parts 1.22x faster at 80% (115 taps per output
// channel), 1.09x at 90% (58), 1.01x at 95% (29), 0.91x at 98% (12); 128 -> 128 at 16 x 16, 80%,
// 4 parts 1.16x, 2 parts 1.03x. With the rule below (64 -> 64 at 32 x 32: 2 parts at 80-90%, one
// from 95%; 128 -> 128 at 16 x 16 and 256 -> 256 at 8 x 8: 4 or 5 parts at 80-90%, 4 at 95%):
// 1.24x, 1.09x at 64 -> 64, 80% and 90%; 1.13x, 1.17x at 128 -> 128; 1.07x, 1.13x at 256 -> 256
// (one thread); two threads 1.12-1.21x; forward + backward after the dense layer's step, 80%,
// 1.08x and 1.03x.
constexpr int64_t kDirectL1Budget = 24 << 10;
constexpr int64_t kDirectMinPartTaps = 24;

struct ChannelParts {
  std::vector<int64_t> split;  // [K, parts + 1], empty for one part
  int64_t parts = 1;
};

template <class T>
ChannelParts channel_parts(const at::Tensor& ptr, const std::vector<int32_t>& off, const Geom& g,
                           const Padded& d) {
  if (g.G != 1 || g.K == 0) return {};
  // the rows of a block, as kernels.h's direct_rows: 8, 6, 4 or 3 for 1-4 vectors of columns
  const int64_t nv = std::min<int64_t>((g.Q + kMaxLanes - 1) / kMaxLanes, 4);
  const int64_t block_rows = nv == 1 ? 8 : nv == 2 ? 6 : nv == 3 ? 4 : 3;
  const int64_t columns = std::min<int64_t>(g.Q, 4 * kMaxLanes) + (g.S - 1) * g.dw;
  const int64_t bytes =
      g.C * (block_rows + (g.R - 1) * g.dh) * columns * static_cast<int64_t>(sizeof(T));
  const int64_t taps_per_row = static_cast<int64_t>(off.size()) / g.K;
  const int64_t parts = std::min({(bytes + kDirectL1Budget - 1) / kDirectL1Budget,
                                  std::max<int64_t>(1, taps_per_row / kDirectMinPartTaps), g.C});
  if (parts <= 1) return {};
  // a row's taps in channel order (as compress writes them): part h starts at its first tap at or
  // past channel C * h / parts; in any other order, one part
  ChannelParts out{std::vector<int64_t>(g.K * (parts + 1)), parts};
  const int64_t* p = ptr.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < g.K; ++k) {
    int64_t* split = out.split.data() + k * (parts + 1);
    int64_t h = 0;
    split[0] = p[k];
    for (int64_t j = p[k]; j < p[k + 1]; ++j) {
      while (h + 1 < parts && off[j] >= g.C * (h + 1) / parts * d.plane()) split[++h] = j;
      if (off[j] < g.C * h / parts * d.plane()) return {};  // an earlier part's channel
    }
    while (h < parts) split[++h] = p[k + 1];
  }
  return out;
}

template <class T>
at::Tensor direct_forward(const at::Tensor& xc, const at::Tensor& values, const at::Tensor& bias,
                          const at::Tensor& ptr, const at::Tensor& taps, const Geom& g) {
  const Padded d{g.C, g.H, g.W, g.pt, g.pb, g.pl, g.pr};
  const std::vector<int32_t> off = direct_offsets(ptr, taps, g, d);
  const ChannelParts split = channel_parts<T>(ptr, off, g, d);
  at::Tensor y = at::empty({g.N, g.K, g.P, g.Q}, xc.options());
  if (g.N == 0) return y;
  const T* x = xc.const_data_ptr<T>();
  T* out = y.mutable_data_ptr<T>();
  ps::DirectArgs<T> a{nullptr, d.cols(), nullptr, g.P, g.Q, ptr.const_data_ptr<int64_t>(),
                      off.data(), values.const_data_ptr<T>(),
                      bias.defined() ? bias.const_data_ptr<T>() : nullptr};
  if (split.parts > 1) a.split = split.split.data(), a.parts = split.parts;
  // fewer images than threads: each image's output channels in `parts` ranges
  const int64_t threads = at::get_num_threads();
  const int64_t parts = g.N >= threads ? 1 : (threads + g.N - 1) / g.N;
  const int64_t work = values.numel() * g.P * g.Q * g.N;
  parallel_items(g.N * parts, work, [&](int64_t i0, int64_t i1) {
    T* image = scratch<T>(kImageSlot, d.size());
    int64_t padded = -1;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / parts, part = i % parts;
      if (n != padded) pad_image(x + n * g.C * g.H * g.W, d, image), padded = n;
      ps::DirectArgs<T> b = a;
      b.x = image;
      b.y = out + n * g.K * g.P * g.Q;
      kernels<T>().direct(b, g.K * part / parts, g.K * (part + 1) / parts);
    }
  });
  return y;
}

// One image's weight gradient in the rows' order, as the reference sums it (stride 1): each kept
// tap (k; c, r, s) over the output positions whose input position lies inside the image, so the
// output gradient never meets the zero padding. Scalar: only for an image whose input is not
// finite, where the one pass's products would include positions the reference never multiplies.
template <class T>
void weight_gradient_in_bounds(const T* dy, const T* x, const Geom& g, const at::Tensor& ptr,
                               const at::Tensor& taps, T* dw) {
  const int64_t* p = ptr.const_data_ptr<int64_t>();
  const int32_t* t = taps.const_data_ptr<int32_t>();
  for (int64_t k = 0; k < g.K; ++k)
    for (int64_t j = p[k]; j < p[k + 1]; ++j) {
      const int64_t c = (k / g.kg()) * g.cg() + t[j] / (g.R * g.S);
      const int64_t dr = t[j] / g.S % g.R * g.dh - g.pt, ds = t[j] % g.S * g.dw - g.pl;
      const int64_t p0 = std::max<int64_t>(0, -dr), p1 = std::min(g.P, g.H - dr);
      const int64_t q0 = std::max<int64_t>(0, -ds), q1 = std::min(g.Q, g.W - ds);
      T sum = 0;
      for (int64_t pp = p0; pp < p1; ++pp) {
        const T* gy = dy + (k * g.P + pp) * g.Q;
        const T* xr = x + (c * g.H + pp + dr) * g.W + ds;
        for (int64_t q = q0; q < q1; ++q) sum += gy[q] * xr[q];
      }
      dw[j] = sum;
    }
}

// Image by image on each thread. The weight gradient comes from one pass over the transposed
// structure (kernels.h, direct_backward), which computes the input gradient too where it is
// wanted: the input gradient as the forward over the flipped taps, reading the output gradient
// with zero margins wide enough for every tap, and each tap's weight gradient from the same loads
// times the input read in place. An image whose input is not finite takes the weight gradient as
// the reference sums it instead (weight_gradient_in_bounds); frozen weights take the input
// gradient alone. Weight and bias gradients are summed into each thread's own row of partial
// sums. The one pass reads every output gradient run once for both products and the input
// without copying it into margins. Against the two passes before it (one process alternating call
// by call, batch 32): the backward alone 1.38x faster at 98%, 1.39x at 95%, 1.46x at 80% (64 -> 64
// at 32 x 32, one thread; 1.38-1.41x on two), 1.76x at 128 -> 128 on 16 x 16, 95%, 1.31x at
// 64 -> 64 on 56 x 56, 90%, batch 8; forward + backward, each call after the dense layer's step,
// 1.29x, 1.27x and 1.24x at 98%, 95% and 80% (one thread), 1.22x at 98% and 95% (two). The weight
// gradient alone (an input without gradient: a first layer, or the first trainable layer after a
// frozen part), against the sampled product over the padded input it replaced: 1.20x and 1.18x at
// 64 -> 64 on 32 x 32, 95% and 80%, 1.98x at 256 -> 256 on 8 x 8, 90%, but 0.94x for a first
// layer of 3 input channels (64 output channels, 50%), kept for one behaviour on every layer: like
// PyTorch's convolution the pass never multiplies the output gradient with the input's zero
// padding (an Inf in the output gradient gives Inf or finite where the sampled product gave NaN).
template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_backward(
    const at::Tensor& dyc, const at::Tensor& xc, const Geom& g, const at::Tensor& values,
    const at::Tensor& ptr, const at::Tensor& taps, const at::Tensor& cptr,
    const at::Tensor& cperm, const at::Tensor& crow, bool need_dx, bool need_dw, bool need_db) {
  const Padded e = gradient_planes(g, true);
  const std::vector<int32_t> flipped = need_dx || need_dw
                                           ? flipped_offsets(taps, cperm, crow, g, e, 1)
                                           : std::vector<int32_t>();
  const at::Tensor cvals = need_dx ? in_column_order<T>(values, cperm) : at::Tensor();
  const int64_t threads = at::get_num_threads();
  const int64_t work = values.numel() * g.P * g.Q * g.N * (need_dx + need_dw);
  const int64_t chunks = work < kSerialWork ? 1 : std::min(threads, g.N);
  at::Tensor dx, dw, db;
  // each chunk's own partial sums: [chunks, kept weights + output channels], the weights in the
  // transposed structure's order
  const int64_t nw = need_dw ? values.numel() : 0, nb = need_db ? g.K : 0;
  at::Tensor partial = at::zeros({chunks, nw + nb}, values.options());
  if (need_dx) dx = at::empty({g.N, g.C, g.H, g.W}, dyc.options());
  const T* x = xc.const_data_ptr<T>();
  const T* dy = dyc.const_data_ptr<T>();
  // image n's input gradient: the forward over the flipped taps, from its padded output gradient
  auto dx_args = [&](int64_t n, const T* grad) {
    return ps::DirectArgs<T>{grad, e.cols(),
                             need_dx ? dx.mutable_data_ptr<T>() + n * g.C * g.H * g.W : nullptr,
                             g.H, g.W, cptr.const_data_ptr<int64_t>(), flipped.data(),
                             need_dx ? cvals.const_data_ptr<T>() : nullptr, nullptr};
  };
  parallel_items(chunks, work, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t n = g.N * c / chunks; n < g.N * (c + 1) / chunks; ++n) {
        // the output gradient once from memory, into the thread's buffer both products read
        T* grad = scratch<T>(kGradImageSlot, e.size());
        pad_image(dy + n * g.K * g.P * g.Q, e, grad);
        T* sums = partial.mutable_data_ptr<T>() + c * (nw + nb);
        if (need_db)  // the bias gradient: the sums of the image's output gradient planes
          kernels<T>().plane_sums(grad + e.top * e.cols() + e.left, g.K, e.plane(), g.P, g.Q,
                                  e.cols(), sums + nw);
        if (!need_dw) {
          if (need_dx) kernels<T>().direct(dx_args(n, grad), 0, g.C);
          continue;
        }
        if (!kernels<T>().direct_backward({dx_args(n, grad), x + n * g.C * g.H * g.W, sums,
                                           scratch<T>(kTapSumSlot, nw * kMaxLanes)},
                                          0, g.C)) {
          // an input that is not finite: its weight gradient as the reference sums it
          T* rows = scratch<T>(kRowSumSlot, nw);
          weight_gradient_in_bounds(dy + n * g.K * g.P * g.Q, x + n * g.C * g.H * g.W, g, ptr,
                                    taps, rows);
          const int32_t* perm = cperm.const_data_ptr<int32_t>();
          for (int64_t m = 0; m < nw; ++m) sums[m] += rows[perm[m]];
        }
      }
  });
  const at::Tensor total = chunks == 1 ? partial[0] : partial.sum(0);
  if (need_dw) dw = from_column_order<T>(total.narrow(0, 0, nw), cperm);
  if (need_db) db = total.narrow(0, nw, nb);
  return {dx, dw, db};
}

// ---- Conv2d: batch innermost, in groups of images --------------------------------------------------
// The batch-innermost path computes the batch in groups of images. A group's packed input, which
// every output row's taps read, stays in the core's L2 cache, and one group's pack, gather and
// unpack (backward: pack of the output gradient, weight gradient, input gradient, unpack) run one
// after the other while their buffers are in cache: the whole batch's layouts were written to
// memory and read back, four passes over memory per layer that cost more than the arithmetic of
// a 95-98%-sparse layer. Threads take whole groups where there are at least as many groups as
// threads, else share each group's rows.
// Measured (256 -> 256 at 8 x 8, 98%, batch 32, one thread, one process, pack + gather + unpack
// for 32 images in groups of 2, 4, 8, 16 and 32): 3.5, 2.8, 1.9, 2.6 and 3.3 ms. Below a whole
// tile of 64 lanes (8 images of 8 columns) the gather's rows fill few vectors; above the L2
// cache the packed input streams from L3. The weight gradient sums a channel's P output rows as
// the segments of one chunk (SddmmArgs::S): one horizontal reduction per eight taps over all the
// group's lanes, not per output row (its weight gradient took 1.8-2.0 ms that way, 3.6-3.9 ms
// with each output row a pass). The same layer's forward + backward, alternating processes, the
// whole batch at once against groups of 8: 11.6-11.8 against 7.4-8.6 ms on one thread, 6.6-7.7
// against 4.3-4.5 ms on two; at 95% and 80%, two threads, 9.6-10.1 against 7.5-8.0 ms and
// 27.8-31.8 against 24.9-27.9 ms. Strided layers gained as much (64 -> 128, stride 2, 32 x 32,
// 95%, batch 32: 28.8-28.9 against 14.7-19.8 ms on one thread; docs/kernels.md has more).
constexpr int64_t kGroupLanes = 64;

struct Groups {
  Geom g;
  int64_t nb, count;
  int64_t first(int64_t i) const { return i * nb; }
  Geom geom(int64_t i) const {
    Geom s = g;
    s.N = std::min(nb, g.N - first(i));
    return s;
  }
  bool ragged() const { return count > 1 && g.N % nb != 0; }
  int64_t packed_image() const { return g.C * g.Hp * g.sw * g.Wj; }  // one image's packed input
};

// At least one whole tile of lanes (Q * nb >= kGroupLanes), more while the group's packed input
// fits the slab (slab_bytes), in whole vectors of 8 lanes (Q * nb a multiple of 8); the forward
// and the backward of one layer always agree (the saved input is packed group by group).
template <class T>
Groups groups_of(const Geom& g) {
  const int64_t image = g.C * g.Hp * g.sw * g.Wj * static_cast<int64_t>(sizeof(T));
  int64_t nb = std::max((kGroupLanes + g.Q - 1) / g.Q, slab_bytes() / std::max<int64_t>(image, 1));
  const int64_t step = 8 / std::gcd<int64_t>(g.Q, 8);
  nb = std::clamp<int64_t>((nb + step - 1) / step * step, 1, std::max<int64_t>(g.N, 1));
  return {g, nb, (g.N + nb - 1) / nb};
}

// Per group size (tap offsets depend on the images in a group): the groups' common size and the
// last group's where it differs.
template <class V>
struct PerSize {
  V full, last;
  bool ragged;
  const V& of(const Groups& gr, int64_t i) const {
    return ragged && i + 1 == gr.count ? last : full;
  }
};

template <class F>
auto per_size(const Groups& gr, const F& make) -> PerSize<decltype(make(gr.g))> {
  using V = decltype(make(gr.g));
  if (gr.count == 0) return {V{}, V{}, false};
  return {make(gr.geom(0)), gr.ragged() ? make(gr.geom(gr.count - 1)) : V{}, gr.ragged()};
}

// Threads over whole groups where there are at least as many groups as threads and the call is
// worth a second thread, else one chunk (each group's kernels then share out its rows).
int64_t group_chunks(const Groups& gr, int64_t work) {
  const int64_t threads = at::get_num_threads();
  return work >= kSerialWork && threads > 1 && gr.count >= threads ? threads : 1;
}

// body(group, chunk) for every group, chunk by chunk (one thread each).
template <class F>
void run_groups(const Groups& gr, int64_t chunks, const F& body) {
  const auto range = [&](int64_t c) {
    for (int64_t i = gr.count * c / chunks; i < gr.count * (c + 1) / chunks; ++i) body(i, c);
  };
  if (chunks == 1) {
    range(0);  // not through parallel_for: the group's own kernels use every thread
    return;
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) range(c);
  });
}

template <class T>
std::tuple<at::Tensor, at::Tensor> grouped_forward(const at::Tensor& x, const at::Tensor& values,
                                                   const at::Tensor& bias, const at::Tensor& ptr,
                                                   const at::Tensor& taps, const Geom& g) {
  const Groups gr = groups_of<T>(g);
  const auto off = per_size(gr, [&](const Geom& s) { return tap_offsets(ptr, taps, s); });
  const at::Tensor xc = x.contiguous();
  at::Tensor xt = at::empty({g.C * g.plane()}, x.options());
  at::Tensor y = at::empty({g.N, g.K, g.P, g.Q}, x.options());
  const int64_t kpq = g.K * g.P * g.Q, chw = g.C * g.H * g.W;
  const T* src = xc.const_data_ptr<T>();
  T* packed = xt.mutable_data_ptr<T>();
  T* out = y.mutable_data_ptr<T>();
  const int64_t work = values.numel() * g.P * g.L();
  run_groups(gr, group_chunks(gr, work), [&](int64_t i, int64_t) {
    const Geom s = gr.geom(i);
    T* xs = packed + gr.first(i) * gr.packed_image();
    pack_group<T>(src + gr.first(i) * chw, s, xs);
    T* ys = scratch<T>(kOutSlot, s.K * s.P * s.L());
    const ps::GatherArgs<T> a{xs, s.sh * s.row(), ys, s.P * s.L(), s.L(),
                              ptr.const_data_ptr<int64_t>(), off.of(gr, i).data(), 1,
                              values.const_data_ptr<T>(),
                              bias.defined() ? bias.const_data_ptr<T>() : nullptr, s.P, s.L()};
    parallel_rows(a.ptr, s.K, s.P * s.L(), [&](int64_t r0, int64_t r1) {
      kernels<T>().gather(a, r0, r1);
    });
    transpose2d<T>(ys, s.N, out + gr.first(i) * kpq, kpq, kpq, s.N);
  });
  return {y, xt};
}

template <class T>
std::tuple<at::Tensor, at::Tensor> conv_forward_impl(const at::Tensor& x, const at::Tensor& values,
                                                     const std::optional<at::Tensor>& bias,
                                                     const at::Tensor& ptr,
                                                     const at::Tensor& taps,
                                                     at::IntArrayRef geom) {
  const Geom g = make_geom(x.sizes(), geom);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  if (direct_conv(g)) {
    const at::Tensor xc = x.contiguous();
    return {direct_forward<T>(xc, values, b, ptr, taps, g), xc};
  }
  return grouped_forward<T>(x, values, b, ptr, taps, g);
}

// One group's input gradient, stride 1: the forward gather over the transposed structure (rows =
// input channels, taps flipped), reading the output gradient packed with zero margins, unpacked
// into dx (the group's first image).
template <class T>
void input_grad_gather(const T* dyb, const Geom& s, const Padded& e, const int32_t* off,
                       const T* cvals, const int64_t* cptr, T* dx) {
  const int64_t lanes = s.W * s.N, chw = s.C * s.H * s.W;
  T* dxt = scratch<T>(kGradInSlot, s.C * s.H * lanes);
  const ps::GatherArgs<T> a{dyb, e.cols() * s.N, dxt, s.H * lanes, lanes, cptr, off, 1, cvals,
                            nullptr, s.H, lanes};
  parallel_rows(cptr, s.C, s.H * lanes, [&](int64_t r0, int64_t r1) {
    kernels<T>().gather(a, r0, r1);
  });
  transpose2d<T>(dxt, s.N, dx, chw, chw, s.N);
}

// The scatter's source (output gradient) and destination (phase-split packed input) offset of
// each tap of the transposed structure, from the forward's tap offsets `fwd` for the same group.
struct ScatterOffsets {
  std::vector<int32_t> src, dst;
};

ScatterOffsets scatter_offsets(const std::vector<int32_t>& fwd, const at::Tensor& taps,
                               const at::Tensor& cperm, const at::Tensor& crow, const Geom& s) {
  const int32_t* perm = cperm.const_data_ptr<int32_t>();
  const int32_t* krow = crow.const_data_ptr<int32_t>();
  ScatterOffsets o{std::vector<int32_t>(taps.numel()), std::vector<int32_t>(taps.numel())};
  for (int64_t m = 0; m < taps.numel(); ++m) {
    o.src[m] = static_cast<int32_t>(krow[m] * s.P * s.L());
    o.dst[m] = fwd[perm[m]];
  }
  return o;
}

// One group's input gradient, strided: scatter into the phase-split packed layout, unpacked into
// dx (the group's first image).
template <class T>
void input_grad_scatter(const T* dyb, const Geom& s, const ScatterOffsets& o,
                        const at::Tensor& values, const at::Tensor& cptr,
                        const at::Tensor& cperm, T* dx) {
  T* dxp = scratch<T>(kGradInSlot, s.C * s.plane());
  std::fill(dxp, dxp + s.C * s.plane(), T(0));
  const ps::ScatterArgs<T> a{dyb, s.L(), dxp, s.sh * s.row(), cptr.const_data_ptr<int64_t>(),
                             o.src.data(), o.dst.data(), values.const_data_ptr<T>(),
                             cperm.const_data_ptr<int32_t>(), s.P, s.L()};
  parallel_rows(a.ptr, s.C, s.P * s.L(), [&](int64_t r0, int64_t r1) {
    kernels<T>().scatter(a, r0, r1);
  });
  const int64_t chw = s.C * s.H * s.W;
  at::parallel_for(0, s.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t w = 0; w < s.W; ++w) {
          const int64_t col = w + s.pl;
          const T* src = dxp + c * s.plane() + (h + s.pt) * s.row() + (col % s.sw) * s.phase() +
                         (col / s.sw) * s.N;
          T* d = dx + (c * s.H + h) * s.W + w;
          for (int64_t n = 0; n < s.N; ++n) d[n * chw] = src[n];
        }
  });
}

// Group by group (as the forward packed the saved input): the output gradient packed (with zero
// margins where the input gradient gathers), the weight gradient's sampled products and the bias
// gradient's plane sums added into the chunk's own partial sums, the input gradient unpacked into
// dx.
template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_backward(
    const at::Tensor& dyc, const at::Tensor& xt, const Geom& g, const at::Tensor& values,
    const at::Tensor& ptr, const at::Tensor& taps, const at::Tensor& cptr,
    const at::Tensor& cperm, const at::Tensor& crow, bool need_dx, bool need_dw, bool need_db) {
  const Groups gr = groups_of<T>(g);
  const bool gather_dx = need_dx && g.sh == 1 && g.sw == 1;
  const Padded e = gradient_planes(g, gather_dx);
  const bool scatter_dx = need_dx && !gather_dx;
  const auto fwd_off = per_size(gr, [&](const Geom& s) {  // the weight gradient's and the scatter's
    return need_dw || scatter_dx ? tap_offsets(ptr, taps, s) : std::vector<int32_t>();
  });
  const auto flipped = per_size(gr, [&](const Geom& s) {
    return gather_dx ? flipped_offsets(taps, cperm, crow, s, e, s.N) : std::vector<int32_t>();
  });
  const auto scattered = per_size(gr, [&](const Geom& s) {  // s: a whole group or the last one
    return scatter_dx ? scatter_offsets(fwd_off.of(gr, s.N == gr.nb ? 0 : gr.count - 1), taps,
                                        cperm, crow, s)
                      : ScatterOffsets{};
  });
  const at::Tensor cvals = gather_dx ? in_column_order<T>(values, cperm) : at::Tensor();
  const int64_t work = values.numel() * g.P * g.L() * (need_dx + need_dw);
  const int64_t chunks = group_chunks(gr, work);
  const int64_t nw = need_dw ? values.numel() : 0, nbias = need_db ? g.K : 0;
  at::Tensor partial = at::zeros({chunks, nw + nbias}, values.options());  // per chunk: dw, db
  at::Tensor dx = need_dx ? at::empty({g.N, g.C, g.H, g.W}, dyc.options()) : at::Tensor();
  const int64_t kpq = g.K * g.P * g.Q, chw = g.C * g.H * g.W;
  const T* dy = dyc.const_data_ptr<T>();
  run_groups(gr, chunks, [&](int64_t i, int64_t c) {
    const Geom s = gr.geom(i);
    const int64_t Qb = e.cols();
    T* dyb = scratch<T>(kGradSlot, s.K * e.plane() * s.N);
    pack_margins<T>(dy + gr.first(i) * kpq, s.N, s.K, s.P, s.Q, e.top, e.bottom, e.left,
                    e.right, dyb);
    T* sums = partial.mutable_data_ptr<T>() + c * (nw + nbias);
    if (need_dw) {
      const ps::SddmmArgs<T> a{dyb + (e.top * Qb + e.left) * s.N, e.plane() * s.N, 0, Qb * s.N,
                               xt.const_data_ptr<T>() + gr.first(i) * gr.packed_image(), 0,
                               s.sh * s.row(), s.P, ptr.const_data_ptr<int64_t>(),
                               fwd_off.of(gr, i).data(), 1, sums, 1, s.L(), true};
      parallel_rows(a.ptr, s.K, s.P * s.L(), [&](int64_t r0, int64_t r1) {
        kernels<T>().sddmm_long(a, r0, r1);
      });
    }
    if (need_db) {  // the packed gradient's margins are zero: a channel's sum is one plane's
      const at::Tensor planes = at::sum(at::from_blob(dyb, {s.K, e.plane() * s.N}, dyc.options()),
                                        {1});
      const T* p = planes.const_data_ptr<T>();
      for (int64_t k = 0; k < s.K; ++k) sums[nw + k] += p[k];
    }
    if (gather_dx)
      input_grad_gather<T>(dyb, s, e, flipped.of(gr, i).data(), cvals.const_data_ptr<T>(),
                           cptr.const_data_ptr<int64_t>(),
                           dx.mutable_data_ptr<T>() + gr.first(i) * chw);
    else if (scatter_dx)
      input_grad_scatter<T>(dyb, s, scattered.of(gr, i), values, cptr, cperm,
                            dx.mutable_data_ptr<T>() + gr.first(i) * chw);
  });
  const at::Tensor total = chunks == 1 ? partial[0] : partial.sum(0);
  at::Tensor dw, db;
  if (need_dw) dw = total.narrow(0, 0, nw);
  if (need_db) db = total.narrow(0, nw, nbias);
  return {dx, dw, db};
}

template <class T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward_impl(
    const at::Tensor& dy, const at::Tensor& xt, at::IntArrayRef x_shape,
    const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& taps,
    const at::Tensor& cptr, const at::Tensor& cperm, const at::Tensor& crow,
    at::IntArrayRef geom, bool need_dx, bool need_dw, bool need_db) {
  const Geom g = make_geom(x_shape, geom);
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == g.N && dy.size(1) == g.K && dy.size(2) == g.P &&
                  dy.size(3) == g.Q,
              "the output gradient has the wrong shape");
  if (direct_conv(g)) {
    TORCH_CHECK(xt.numel() == g.N * g.C * g.H * g.W, "the saved input does not fit the geometry");
    return direct_backward<T>(dy.contiguous(), xt, g, values, ptr, taps, cptr, cperm, crow,
                              need_dx, need_dw, need_db);
  }
  TORCH_CHECK(xt.numel() == g.C * g.plane(), "the saved input does not fit the geometry");
  return grouped_backward<T>(dy.contiguous(), xt, g, values, ptr, taps, cptr, cperm, crow,
                             need_dx, need_dw, need_db);
}

// The sparse kernels' dtypes.
void check_float(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "the sparse kernels support float32 and float64, not ", x.scalar_type());
}

// ---- inference in the lanes layout ------------------------------------------------------------
// A chain of sparse layers at inference keeps its activations in the layout the kernels compute
// in, batch innermost ("lanes": [features, N] between Linear layers, [C, H, W, N] between Conv2d
// layers), so only the chain's input and output change layout: no pack and unpack per layer. A
// Conv2d's [K, P, Q, N] output is then its gather's own output, a Linear's [K, N] the same, and
// flattening [C, H, W, N] to [C * H * W, N] is a view in PyTorch's flatten order.

// [N, rest...] -> [rest..., N]
at::Tensor to_lanes(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "to_lanes needs a batch dimension");
  check_float(x);
  std::vector<int64_t> shape(x.sizes().begin() + 1, x.sizes().end());
  const int64_t n = x.size(0), rest = c10::multiply_integers(shape);
  shape.push_back(n);
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(shape, x.options());
  if (x.scalar_type() == at::kDouble)
    transpose2d<double>(xc.const_data_ptr<double>(), rest, out.mutable_data_ptr<double>(), n, n,
                        rest);
  else
    transpose2d<float>(xc.const_data_ptr<float>(), rest, out.mutable_data_ptr<float>(), n, n,
                       rest);
  return out;
}

// [rest..., N] -> [N, rest...]
at::Tensor from_lanes(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "from_lanes needs a batch dimension");
  check_float(x);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.insert(shape.begin(), x.size(-1));
  const at::Tensor xc = x.contiguous();
  if (x.scalar_type() == at::kDouble)
    return unpack_rows<double>(xc.const_data_ptr<double>(), x.options(), shape);
  return unpack_rows<float>(xc.const_data_ptr<float>(), x.options(), shape);
}

// y = W x (+ bias, ReLU) for x [I, N] (lanes) or, with from_std, [N, I]; y is [K, N] (lanes) or,
// with to_std, [N, K]: the first and the last Linear of a chain change layout inside their call.
// With at least two vectors of lanes per thread and weights that stay in a core's cache, each
// thread owns one range of lanes (whole vectors) for every row: it transposes its own rows of a
// standard input into a slab of its own (in cache, never written to memory as a whole), the lanes
// it writes in one layer are the lanes it reads in the next, and no two threads write one cache
// line. Otherwise (small batches, or weights every thread would stream from memory whole: Conv-2's
// 16384 -> 256 layer at 90%, 3.4 MB of weights, took 2.0-2.6 ms with the lanes split against
// 1.8-2.1 ms with the rows split, batch 64, 2 threads) threads own ranges of output rows, each
// over all lanes.
constexpr int64_t kLaneSplitWeightBytes = 512 << 10;

// Whether N lanes give every thread at least two vectors, and the weights of `taps` kept values
// stay in a core's cache: the conditions for splitting lanes between threads.
template <class T>
bool lanes_split_fits(int64_t N, int64_t taps) {
  const int64_t threads = at::get_num_threads();
  return threads > 1 && N >= 2 * active()->lanes * threads &&
         taps * static_cast<int64_t>(sizeof(T) + sizeof(int32_t)) <= kLaneSplitWeightBytes;
}

// Lanes [0, N) cut into one range of whole vectors per thread; fn(n0, n) runs for each non-empty
// range, all in one parallel region.
template <class F>
void parallel_lanes(int64_t N, const F& fn) {
  const int64_t threads = at::get_num_threads(), W = active()->lanes;
  const int64_t vectors = (N + W - 1) / W;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t th = t0; th < t1; ++th) {
      const int64_t n0 = vectors * th / threads * W;
      const int64_t n = std::min(N, vectors * (th + 1) / threads * W) - n0;
      if (n > 0) fn(n0, n);
    }
  });
}

template <class T>
at::Tensor linear_lanes_impl(const at::Tensor& x, const at::Tensor& values,
                             const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                             const at::Tensor& idx, bool relu, bool from_std, bool to_std) {
  const int64_t N = x.size(from_std ? 0 : 1), I = x.size(from_std ? 1 : 0);
  const int64_t K = ptr.numel() - 1;
  at::Tensor y = to_std ? at::empty({N, K}, x.options()) : at::empty({K, N}, x.options());
  if (N == 0) return y;
  const at::Tensor xc = x.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const Tiles t{N, std::min<int64_t>(N, kTileLanes), 0, 0};
  const Blocks blocks = column_blocks<T>(ptr, idx, I, t);
  ps::GatherArgs<T> a{xc.const_data_ptr<T>(), 0, y.mutable_data_ptr<T>(), to_std ? 1 : N, 0,
                      ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int32_t>(), N,
                      values.const_data_ptr<T>(), b.defined() ? b.const_data_ptr<T>() : nullptr,
                      1, N, to_std ? K : 1, blocks.nb > 1 ? blocks.bptr.data() : nullptr,
                      blocks.nb, relu, runs_beyond_l2<T>(I, N)};
  if (lanes_split_fits<T>(N, idx.numel()) && (idx.numel() + K) * N >= kSerialWork) {
    parallel_lanes(N, [&](int64_t n0, int64_t n) {
      ps::GatherArgs<T> mine = a;
      if (from_std) {
        T* slab = scratch<T>(kOutSlot, I * n);
        kernels<T>().transpose(a.x + n0 * I, I, slab, n, 0, n, I);
        mine.x = slab, mine.ld = n;
      } else {
        mine.x += n0;
      }
      mine.y += to_std ? n0 * K : n0, mine.L = n, mine.prefetch = runs_beyond_l2<T>(I, n);
      kernels<T>().gather(mine, 0, K);
    });
    return y;
  }
  at::Tensor packed;
  if (from_std) {
    packed = at::empty({I, N}, x.options());
    transpose2d<T>(a.x, I, packed.mutable_data_ptr<T>(), N, N, I);
    a.x = packed.const_data_ptr<T>();
  }
  parallel_rows(a.ptr, K, N, [&](int64_t r0, int64_t r1) { kernels<T>().gather(a, r0, r1); },
                to_std ? 16 : 1);
  return y;
}

// A chain of sparse Linear layers in one call: x [N, I] (standard; with from_std false, [I, N]
// lanes) -> y [N, K] standard, each layer's output fed to the next in the lanes layout. `layers`
// holds four tensors per layer: values, bias (empty: none), ptr, idx. Where every layer allows the
// lanes split (see linear_lanes_impl), the whole chain runs in one parallel region: each thread
// takes its lanes through every layer in two slabs of its own (in cache) and writes its rows of y;
// no thread waits for another between layers. Otherwise the layers run one after another as
// linear_lanes does. Either way one call replaces one per layer: at batch 1 the calls' own cost
// is most of a small model's time.
template <class T>
at::Tensor linear_chain_impl(const at::Tensor& x, at::TensorList layers, at::IntArrayRef relu,
                             bool from_std) {
  const int64_t depth = static_cast<int64_t>(relu.size());
  const auto layer = [&](int64_t l, int64_t i) -> const at::Tensor& { return layers[4 * l + i]; };
  const auto bias = [&](int64_t l) -> std::optional<at::Tensor> {
    return layer(l, 1).numel() ? std::optional<at::Tensor>(layer(l, 1)) : std::nullopt;
  };
  const int64_t N = x.size(from_std ? 0 : 1);
  bool split = true;
  int64_t rows = x.size(from_std ? 1 : 0), work = 0;
  for (int64_t l = 0; l < depth; ++l) {
    const int64_t taps = layer(l, 3).numel(), K = layer(l, 2).numel() - 1;
    split = split && lanes_split_fits<T>(N, taps);
    rows = std::max(rows, K), work += (taps + K) * N;
  }
  if (!split || work < kSerialWork) {
    at::Tensor h = x;
    for (int64_t l = 0; l < depth; ++l)
      h = linear_lanes_impl<T>(h, layer(l, 0), bias(l), layer(l, 2), layer(l, 3), relu[l] != 0,
                               from_std && l == 0, l + 1 == depth);
    return h;
  }
  const int64_t I = x.size(from_std ? 1 : 0), K_out = layer(depth - 1, 2).numel() - 1;
  at::Tensor y = at::empty({N, K_out}, x.options());
  const at::Tensor xc = x.contiguous();
  std::vector<at::Tensor> biases(depth);
  for (int64_t l = 0; l < depth; ++l)
    if (layer(l, 1).numel()) biases[l] = layer(l, 1).contiguous();
  parallel_lanes(N, [&](int64_t n0, int64_t n) {
    T* slabs[2] = {scratch<T>(kOutSlot, rows * n), scratch<T>(kGradSlot, rows * n)};
    const T* in = xc.const_data_ptr<T>() + n0;
    int64_t ld = N, width = I;
    if (from_std) {
      kernels<T>().transpose(xc.const_data_ptr<T>() + n0 * I, I, slabs[1], n, 0, n, I);
      in = slabs[1], ld = n;
    }
    for (int64_t l = 0; l < depth; ++l) {
      const at::Tensor &values = layers[4 * l], &ptr = layers[4 * l + 2];
      const at::Tensor& idx = layers[4 * l + 3];
      const int64_t K = ptr.numel() - 1;
      const bool last = l + 1 == depth;
      T* out = last ? y.mutable_data_ptr<T>() + n0 * K : slabs[l % 2];
      ps::GatherArgs<T> a{in, 0, out, last ? 1 : n, 0, ptr.const_data_ptr<int64_t>(),
                          idx.const_data_ptr<int32_t>(), ld, values.const_data_ptr<T>(),
                          biases[l].defined() ? biases[l].const_data_ptr<T>() : nullptr, 1, n,
                          last ? K : 1};
      a.relu = relu[l] != 0, a.prefetch = runs_beyond_l2<T>(width, n);
      kernels<T>().gather(a, 0, K);
      in = out, ld = n, width = K;
    }
  });
  return y;
}

// x [C, H, W, N] -> [C, Hp, sw, Wj, N], the conv kernels' packed input (zero margins, columns
// split by stride phase): copies of contiguous runs, no transpose.
template <class T>
at::Tensor pack_lanes(const T* src, const Geom& g, const at::TensorOptions& options) {
  at::Tensor out = at::empty({g.C * g.plane()}, options);
  T* dst = out.mutable_data_ptr<T>();
  at::parallel_for(0, g.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* plane = dst + c * g.plane();
      if (g.sw == 1) {
        zero_margins(plane, g.H, g.W, g.N, g.pt, g.pb, g.pl, g.pr);
      } else {
        std::fill(plane, plane + g.plane(), T(0));
      }
      for (int64_t h = 0; h < g.H; ++h) {
        const T* s = src + (c * g.H + h) * g.W * g.N;
        T* row = plane + (h + g.pt) * g.row();
        if (g.sw == 1) {
          std::copy(s, s + g.W * g.N, row + g.pl * g.N);
          continue;
        }
        for (int64_t w = 0; w < g.W; ++w) {
          const int64_t col = w + g.pl;
          std::copy(s + w * g.N, s + (w + 1) * g.N,
                    row + (col % g.sw) * g.phase() + (col / g.sw) * g.N);
        }
      }
    }
  });
  return out;
}

// 2 x 2 max pooling (stride 2, floor mode) in the lanes layout: each output is the maximum of four
// runs of N lanes (Kernels::pool, vectorised: the scalar loop was 3.8% of Conv-2's inference at
// batch 64); NaN propagates as in torch.maximum.
template <class T>
void max_pool_lanes_impl(const T* x, T* y, int64_t C, int64_t H, int64_t W, int64_t N) {
  const int64_t Ho = H / 2, Wo = W / 2;
  at::parallel_for(0, C * Ho, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* top = x + ((r / Ho) * H + 2 * (r % Ho)) * W * N;
      kernels<T>().pool(top, top + W * N, y + r * Wo * N, Wo, N);
    }
  });
}

// The forward gather of a convolution over a lanes input x (contiguous): the packed input (x
// itself where it needs no packing), the taps' offsets into it, and the gather's arguments over
// g.P output rows of g.L() lanes, the output (y, y_k, y_p) left for the caller to place. a.idx
// points into off: the struct is returned by move and kept while a (or a copy of it) is used.
template <class T>
struct ConvGather {
  at::Tensor packed, bias;
  std::vector<int32_t> off;
  ps::GatherArgs<T> a;
};

template <class T>
ConvGather<T> conv_gather(const at::Tensor& xc, const at::Tensor& values,
                          const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                          const at::Tensor& taps, const Geom& g, bool relu) {
  const at::Tensor packed =
      g.plain() ? xc : pack_lanes<T>(xc.const_data_ptr<T>(), g, xc.options());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  ConvGather<T> c{packed, b, tap_offsets(ptr, taps, g), {}};
  c.a = {packed.const_data_ptr<T>(), g.sh * g.row(), nullptr, 0, 0,
         ptr.const_data_ptr<int64_t>(), c.off.data(), 1, values.const_data_ptr<T>(),
         b.defined() ? b.const_data_ptr<T>() : nullptr, g.P, g.L()};
  c.a.relu = relu;
  return c;
}

// conv_lanes with pool (see there).
template <class T>
at::Tensor conv_pool_lanes(const at::Tensor& x, const at::Tensor& values,
                           const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                           const at::Tensor& taps, const Geom& g, bool relu) {
  const int64_t Po = g.P / 2, Qo = g.Q / 2, L = g.L();
  at::Tensor y = at::empty({g.K, Po, Qo, g.N}, x.options());
  if (L == 0 || Po == 0 || Qo == 0) return y;
  const ConvGather<T> c = conv_gather<T>(x.contiguous(), values, bias, ptr, taps, g, relu);
  ps::GatherArgs<T> a = c.a;
  a.y_k = 2 * L, a.y_p = L, a.P = 2;  // two output rows at a time, into a buffer
  T* out = y.mutable_data_ptr<T>();
  parallel_rows(a.ptr, g.K, g.P * L, [&](int64_t r0, int64_t r1) {
    T* rows = scratch<T>(kOutSlot, r1 * 2 * L);  // channel k's two rows at rows + k * 2L
    ps::GatherArgs<T> pair = a;
    pair.y = rows;
    for (int64_t op = 0; op < Po; ++op) {
      pair.x = a.x + 2 * op * a.x_p;
      kernels<T>().gather(pair, r0, r1);
      for (int64_t k = r0; k < r1; ++k)
        kernels<T>().pool(rows + k * 2 * L, rows + k * 2 * L + L,
                          out + (k * Po + op) * Qo * g.N, Qo, g.N);
    }
  });
  return y;
}

// y [K, P, Q, N] = conv(x [C, H, W, N]) (+ bias, ReLU): the forward gather, whose output rows are
// already this layout; an unpadded stride-1 input is read in place. out_pad (top, bottom, left,
// right) writes y inside zero margins, [K, P + top + bottom, Q + left + right, N]: the padded input
// of a next stride-1 convolution, which then runs with padding 0 and reads it in place. pool: y is
// the 2 x 2 max pooling of the output, [K, P / 2, Q / 2, N] (no margins): each thread computes two
// output rows of its channels at a time into a buffer of its own and pools them from there, so the
// unpooled output is never written to memory.
template <class T>
at::Tensor conv_lanes_impl(const at::Tensor& x, const at::Tensor& values,
                           const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                           const at::Tensor& taps, at::IntArrayRef geom, bool relu,
                           at::IntArrayRef out_pad, bool pool) {
  TORCH_CHECK(x.dim() == 4, "a Conv2d input in the lanes layout must be 4-d [C, H, W, N]");
  TORCH_CHECK(out_pad.empty() || (out_pad.size() == 4 && *std::min_element(out_pad.begin(),
                                                                          out_pad.end()) >= 0),
              "out_pad must be empty or 4 non-negative margins");
  TORCH_CHECK(!pool || out_pad.empty(), "a pooled convolution writes no margins");
  const Geom g = make_geom({x.size(3), x.size(0), x.size(1), x.size(2)}, geom);
  if (pool) return conv_pool_lanes<T>(x, values, bias, ptr, taps, g, relu);
  const int64_t mt = out_pad.empty() ? 0 : out_pad[0], mb = out_pad.empty() ? 0 : out_pad[1];
  const int64_t ml = out_pad.empty() ? 0 : out_pad[2], mr = out_pad.empty() ? 0 : out_pad[3];
  const int64_t Pp = g.P + mt + mb, Qp = g.Q + ml + mr;
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({g.K, Pp, Qp, g.N}, x.options());
  T* out = y.mutable_data_ptr<T>();
  if (mt + mb + ml + mr > 0)
    at::parallel_for(0, g.K, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        zero_margins(out + k * Pp * Qp * g.N, g.P, g.Q, g.N, mt, mb, ml, mr);
    });
  if (g.L() == 0 || g.P == 0) return y;
  const ConvGather<T> c = conv_gather<T>(xc, values, bias, ptr, taps, g, relu);
  ps::GatherArgs<T> a = c.a;
  a.y = out + (mt * Qp + ml) * g.N, a.y_k = Pp * Qp * g.N, a.y_p = Qp * g.N;
  parallel_rows(a.ptr, g.K, g.P * g.L(), [&](int64_t r0, int64_t r1) {
    kernels<T>().gather(a, r0, r1);
  });
  return y;
}

// ---- operators ---------------------------------------------------------------------------------------
void check_tensors(const at::Tensor& x, const at::Tensor& values, const at::Tensor& ptr,
                   const at::Tensor& taps, int64_t rows) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu(), "the sparse kernels are CPU-only");
  TORCH_CHECK(x.scalar_type() == values.scalar_type(), "input dtype ", x.scalar_type(),
              " differs from the weights' ", values.scalar_type());
  check_float(x);
  TORCH_CHECK(values.is_contiguous() && values.dim() == 1, "values must be contiguous and 1-d");
  TORCH_CHECK(ptr.scalar_type() == at::kLong && ptr.is_contiguous() && ptr.numel() == rows + 1,
              "row pointers must be a contiguous int64 tensor of rows + 1 entries");
  TORCH_CHECK(taps.scalar_type() == at::kInt && taps.is_contiguous() &&
                  taps.numel() == values.numel(),
              "indices must be a contiguous int32 tensor with one entry per value");
}

void check_transpose(const at::Tensor& cptr, const at::Tensor& cperm, const at::Tensor& crow,
                     int64_t rows, int64_t nnz) {
  TORCH_CHECK(cptr.scalar_type() == at::kLong && cptr.is_contiguous() && cptr.numel() == rows + 1,
              "column pointers must be a contiguous int64 tensor of columns + 1 entries");
  TORCH_CHECK(cperm.scalar_type() == at::kInt && crow.scalar_type() == at::kInt &&
                  cperm.is_contiguous() && crow.is_contiguous() && cperm.numel() == nnz &&
                  crow.numel() == nnz,
              "the transposed structure must be contiguous int32 tensors of nnz entries");
}

at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& values,
                          const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                          const at::Tensor& idx) {
  TORCH_CHECK(x.dim() == 2, "a Linear input must be 2-d here");
  check_tensors(x, values, ptr, idx, ptr.numel() - 1);
  if (x.scalar_type() == at::kDouble)
    return linear_forward_impl<double>(x, values, bias, ptr, idx);
  return linear_forward_impl<float>(x, values, bias, ptr, idx);
}

std::tuple<at::Tensor, at::Tensor> linear_train_forward(const at::Tensor& x,
                                                        const at::Tensor& values,
                                                        const std::optional<at::Tensor>& bias,
                                                        const at::Tensor& ptr,
                                                        const at::Tensor& idx) {
  TORCH_CHECK(x.dim() == 2, "a Linear input must be 2-d here");
  check_tensors(x, values, ptr, idx, ptr.numel() - 1);
  if (x.scalar_type() == at::kDouble)
    return linear_train_forward_impl<double>(x, values, bias, ptr, idx);
  return linear_train_forward_impl<float>(x, values, bias, ptr, idx);
}

// saved: what linear_train_forward returned with y (undefined, without the weight gradient, where
// the forward kept none).
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(
    const at::Tensor& dy, const at::Tensor& saved, int64_t in_features, const at::Tensor& values,
    const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& cptr,
    const at::Tensor& cperm, const at::Tensor& crow, bool need_dx, bool need_dw, bool need_db) {
  TORCH_CHECK(dy.dim() == 2 && dy.size(1) == ptr.numel() - 1, "bad output gradient shape");
  const Tiles t = backward_tiles(dy.size(0), in_features, dy.size(1));
  TORCH_CHECK((!saved.defined() && !need_dw) ||
                  (saved.defined() && saved.is_contiguous() &&
                   saved.scalar_type() == dy.scalar_type() &&
                   (saved.dim() == 2 ? saved.size(0) == dy.size(0) &&
                                           saved.size(1) == in_features
                                     : saved.numel() == t.count() * in_features * t.T)),
              "the saved input does not fit the output gradient");
  check_tensors(dy, values, ptr, idx, ptr.numel() - 1);
  check_transpose(cptr, cperm, crow, in_features, values.numel());
  if (dy.scalar_type() == at::kDouble)
    return linear_backward_impl<double>(dy, saved, in_features, values, ptr, idx, cptr, cperm,
                                        crow, need_dx, need_dw, need_db);
  return linear_backward_impl<float>(dy, saved, in_features, values, ptr, idx, cptr, cperm, crow,
                                     need_dx, need_dw, need_db);
}

std::tuple<at::Tensor, at::Tensor> conv_forward(const at::Tensor& x, const at::Tensor& values,
                                                const std::optional<at::Tensor>& bias,
                                                const at::Tensor& ptr, const at::Tensor& taps,
                                                at::IntArrayRef geom) {
  check_tensors(x, values, ptr, taps, geom.size() > 1 ? geom[1] : -1);
  if (x.scalar_type() == at::kDouble)
    return conv_forward_impl<double>(x, values, bias, ptr, taps, geom);
  return conv_forward_impl<float>(x, values, bias, ptr, taps, geom);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_backward(
    const at::Tensor& dy, const at::Tensor& xt, at::IntArrayRef x_shape,
    const at::Tensor& values, const at::Tensor& ptr, const at::Tensor& taps,
    const at::Tensor& cptr, const at::Tensor& cperm, const at::Tensor& crow,
    at::IntArrayRef geom, bool need_dx, bool need_dw, bool need_db) {
  check_tensors(dy, values, ptr, taps, geom.size() > 1 ? geom[1] : -1);
  check_transpose(cptr, cperm, crow, geom.size() > 0 ? geom[0] : -1, values.numel());
  if (dy.scalar_type() == at::kDouble)
    return conv_backward_impl<double>(dy, xt, x_shape, values, ptr, taps, cptr, cperm, crow,
                                      geom, need_dx, need_dw, need_db);
  return conv_backward_impl<float>(dy, xt, x_shape, values, ptr, taps, cptr, cperm, crow, geom,
                                   need_dx, need_dw, need_db);
}

// The lanes operators keep nothing for a backward pass.
void refuse_autograd(const at::Tensor& x, const at::Tensor& values) {
  TORCH_CHECK(!at::GradMode::is_enabled() || !(x.requires_grad() || values.requires_grad()),
              "the lanes-layout operators are for inference only (no autograd)");
}

at::Tensor linear_lanes(const at::Tensor& x, const at::Tensor& values,
                        const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                        const at::Tensor& idx, int64_t in_features, bool relu, bool from_std,
                        bool to_std) {
  TORCH_CHECK(x.dim() == 2, "a Linear input must be 2-d here ([features, N] in the lanes layout)");
  TORCH_CHECK(x.size(from_std ? 1 : 0) == in_features, "the input has ",
              x.size(from_std ? 1 : 0), " features, the layer takes ", in_features);
  check_tensors(x, values, ptr, idx, ptr.numel() - 1);
  refuse_autograd(x, values);
  if (x.scalar_type() == at::kDouble)
    return linear_lanes_impl<double>(x, values, bias, ptr, idx, relu, from_std, to_std);
  return linear_lanes_impl<float>(x, values, bias, ptr, idx, relu, from_std, to_std);
}

at::Tensor conv_lanes(const at::Tensor& x, const at::Tensor& values,
                      const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                      const at::Tensor& taps, at::IntArrayRef geom, bool relu,
                      at::IntArrayRef out_pad, bool pool) {
  check_tensors(x, values, ptr, taps, geom.size() > 1 ? geom[1] : -1);
  refuse_autograd(x, values);
  if (x.scalar_type() == at::kDouble)
    return conv_lanes_impl<double>(x, values, bias, ptr, taps, geom, relu, out_pad, pool);
  return conv_lanes_impl<float>(x, values, bias, ptr, taps, geom, relu, out_pad, pool);
}

at::Tensor max_pool_lanes(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "max_pool_lanes takes a lanes tensor [C, H, W, N]");
  check_float(x);
  const at::Tensor xc = x.contiguous();
  const int64_t C = x.size(0), H = x.size(1), W = x.size(2), N = x.size(3);
  at::Tensor y = at::empty({C, H / 2, W / 2, N}, x.options());
  if (x.scalar_type() == at::kDouble)
    max_pool_lanes_impl<double>(xc.const_data_ptr<double>(), y.mutable_data_ptr<double>(), C, H,
                                W, N);
  else
    max_pool_lanes_impl<float>(xc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), C, H, W,
                               N);
  return y;
}

at::Tensor linear_chain(const at::Tensor& x, at::TensorList layers, at::IntArrayRef in_features,
                        at::IntArrayRef relu, bool from_std) {
  const int64_t depth = static_cast<int64_t>(relu.size());
  TORCH_CHECK(depth >= 1 && static_cast<int64_t>(layers.size()) == 4 * depth &&
                  static_cast<int64_t>(in_features.size()) == depth,
              "linear_chain takes four tensors (values, bias, ptr, idx), one width and one relu "
              "flag per layer");
  TORCH_CHECK(x.dim() == 2, "a Linear input must be 2-d here ([features, N] in the lanes layout)");
  TORCH_CHECK(x.size(from_std ? 1 : 0) == in_features[0], "the input has ",
              x.size(from_std ? 1 : 0), " features, the layer takes ", in_features[0]);
  for (int64_t l = 0; l < depth; ++l) {
    const at::Tensor& values = layers[4 * l];
    const at::Tensor& bias = layers[4 * l + 1];
    const at::Tensor& ptr = layers[4 * l + 2];
    const int64_t K = ptr.numel() - 1;
    check_tensors(x, values, ptr, layers[4 * l + 3], K);
    TORCH_CHECK(bias.numel() == 0 || (bias.numel() == K && bias.scalar_type() == x.scalar_type()),
                "layer ", l, ": the bias must be empty or hold one ", x.scalar_type(),
                " per output");
    TORCH_CHECK(l + 1 == depth || in_features[l + 1] == K, "layer ", l + 1, " takes ",
                in_features[l + 1], " features, layer ", l, " gives ", K);
    refuse_autograd(x, values);
  }
  if (x.scalar_type() == at::kDouble)
    return linear_chain_impl<double>(x, layers, relu, from_std);
  return linear_chain_impl<float>(x, layers, relu, from_std);
}

// ---- autograd: the layers' single entry points ---------------------------------------------------
// One operator per layer kind whose autograd node is C++: no Python runs per call beyond the
// operator call itself. The weight gradient is on kept weights only; double backward is refused.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// autograd::Function inputs must be defined tensors: no bias is an empty one, flagged
std::optional<at::Tensor> maybe(const at::Tensor& t, bool has) {
  return has ? std::optional<at::Tensor>(t) : std::nullopt;
}

at::Tensor or_empty(const std::optional<at::Tensor>& bias, const at::Tensor& like) {
  return bias.has_value() ? *bias : at::empty({0}, like.options());
}

void refuse_double_backward() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "the sparse kernels have no double backward; run with PRUNESCOPE_KERNELS=reference");
}

// What both autograd nodes keep for the backward pass: the weights, the input as the weight
// gradient reads it (packed, or as it came; undefined where the backward needs none), and the
// index structure (ptr, idx, cptr, cperm, crow). The input goes through save_for_backward, as the
// values do: where the kernels keep the input itself (a widening Linear, the direct
// convolution), changing it in place before the backward raises autograd's error instead of
// giving the changed input's gradients (a packed copy is the kernels' own and never changes).
void save_for_kernels(AutogradContext* ctx, const at::Tensor& values, const at::Tensor& xt,
                      std::vector<at::Tensor> structure) {
  ctx->save_for_backward({values, xt});
  ctx->saved_data["structure"] = std::move(structure);
}

struct SavedForKernels {
  at::Tensor values, xt;
  std::vector<at::Tensor> s;  // ptr, idx, cptr, cperm, crow
};

SavedForKernels saved_for_kernels(AutogradContext* ctx) {
  refuse_double_backward();
  const variable_list saved = ctx->get_saved_variables();
  return {saved[0], saved[1], ctx->saved_data["structure"].toTensorVector()};
}

// Gradients for x, values and bias, then none for the `rest` non-differentiable inputs.
variable_list input_grads(at::Tensor dx, at::Tensor dw, at::Tensor db, size_t rest) {
  variable_list grads{std::move(dx), std::move(dw), std::move(db)};
  grads.resize(3 + rest);
  return grads;
}

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& bias, const at::Tensor& ptr, const at::Tensor& idx,
                            const at::Tensor& cptr, const at::Tensor& cperm,
                            const at::Tensor& crow, bool has_bias) {
    // The input is kept for the weight gradient only, as nn.Linear keeps it: with frozen weights
    // the forward runs as it does without autograd and keeps none.
    at::Tensor y, saved;
    if (ctx->needs_input_grad(1))
      std::tie(y, saved) = linear_train_forward(x, values, maybe(bias, has_bias), ptr, idx);
    else
      y = linear_forward(x, values, maybe(bias, has_bias), ptr, idx);
    save_for_kernels(ctx, values, saved, {ptr, idx, cptr, cperm, crow});
    ctx->saved_data["in"] = x.size(1);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const SavedForKernels k = saved_for_kernels(ctx);
    auto [dx, dw, db] = linear_backward(
        grads[0].contiguous(), k.xt, ctx->saved_data["in"].toInt(), k.values, k.s[0], k.s[1],
        k.s[2], k.s[3], k.s[4], ctx->needs_input_grad(0), ctx->needs_input_grad(1),
        ctx->needs_input_grad(2));
    return input_grads(dx, dw, db, 6);  // ptr, idx, cptr, cperm, crow, has_bias
  }
};

struct ConvFunction : public torch::autograd::Function<ConvFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const at::Tensor& bias, const at::Tensor& ptr, const at::Tensor& idx,
                            const at::Tensor& cptr, const at::Tensor& cperm,
                            const at::Tensor& crow, std::vector<int64_t> geom, bool has_bias) {
    auto [y, xt] = conv_forward(x, values, maybe(bias, has_bias), ptr, idx, geom);
    save_for_kernels(ctx, values, xt, {ptr, idx, cptr, cperm, crow});
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["geom"] = geom;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const SavedForKernels k = saved_for_kernels(ctx);
    auto [dx, dw, db] = conv_backward(
        grads[0].contiguous(), k.xt, ctx->saved_data["x_shape"].toIntVector(), k.values, k.s[0],
        k.s[1], k.s[2], k.s[3], k.s[4], ctx->saved_data["geom"].toIntVector(),
        ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2));
    return input_grads(dx, dw, db, 7);  // ptr, idx, cptr, cperm, crow, geom, has_bias
  }
};

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& values,
                         const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                         const at::Tensor& idx, const at::Tensor& cptr, const at::Tensor& cperm,
                         const at::Tensor& crow) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cptr.numel() - 1, "the input has shape ", x.sizes(),
              "; the layer takes [N, ", cptr.numel() - 1, "]");
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || values.requires_grad() ||
                     (bias.has_value() && bias->requires_grad()));
  if (!grad) return linear_forward(x, values, bias, ptr, idx);
  return LinearFunction::apply(x, values, or_empty(bias, values), ptr, idx, cptr, cperm, crow,
                               bias.has_value());
}

at::Tensor sparse_conv2d(const at::Tensor& x, const at::Tensor& values,
                         const std::optional<at::Tensor>& bias, const at::Tensor& ptr,
                         const at::Tensor& idx, const at::Tensor& cptr, const at::Tensor& cperm,
                         const at::Tensor& crow, at::IntArrayRef geom) {
  return ConvFunction::apply(x, values, or_empty(bias, values), ptr, idx, cptr, cperm, crow,
                             geom.vec(), bias.has_value());
}

}  // namespace

TORCH_LIBRARY(prunescope_kernels, m) {
  m.def("sparse_linear(Tensor x, Tensor values, Tensor? bias, Tensor ptr, Tensor idx,"
        " Tensor cptr, Tensor cperm, Tensor crow) -> Tensor",
        &sparse_linear);
  m.def("sparse_conv2d(Tensor x, Tensor values, Tensor? bias, Tensor ptr, Tensor idx,"
        " Tensor cptr, Tensor cperm, Tensor crow, int[] geom) -> Tensor",
        &sparse_conv2d);
  m.def("to_lanes(Tensor x) -> Tensor", &to_lanes);
  m.def("from_lanes(Tensor x) -> Tensor", &from_lanes);
  m.def("linear_lanes(Tensor x, Tensor values, Tensor? bias, Tensor ptr, Tensor idx,"
        " int in_features, bool relu, bool from_std=False, bool to_std=False) -> Tensor",
        &linear_lanes);
  m.def("conv_lanes(Tensor x, Tensor values, Tensor? bias, Tensor ptr, Tensor taps, int[] geom,"
        " bool relu, int[] out_pad=[], bool pool=False) -> Tensor",
        &conv_lanes);
  m.def("max_pool_lanes(Tensor x) -> Tensor", &max_pool_lanes);
  m.def("linear_chain(Tensor x, Tensor[] layers, int[] in_features, int[] relu, bool from_std)"
        " -> Tensor",
        &linear_chain);
  m.def("variant() -> str", &variant);
  m.def("set_variant(str name) -> str", &set_variant);
  m.def("linear_forward(Tensor x, Tensor values, Tensor? bias, Tensor ptr, Tensor idx) -> Tensor",
        &linear_forward);
  m.def("linear_train_forward(Tensor x, Tensor values, Tensor? bias, Tensor ptr, Tensor idx)"
        " -> (Tensor, Tensor)",
        &linear_train_forward);
  m.def("linear_backward(Tensor dy, Tensor saved, int in_features, Tensor values, Tensor ptr,"
        " Tensor idx, Tensor cptr, Tensor cperm, Tensor crow, bool need_dx, bool need_dw,"
        " bool need_db) -> (Tensor, Tensor, Tensor)",
        &linear_backward);
  m.def("conv_forward(Tensor x, Tensor values, Tensor? bias, Tensor ptr, Tensor taps, int[] geom)"
        " -> (Tensor, Tensor)",
        &conv_forward);
  m.def("conv_backward(Tensor dy, Tensor xt, int[] x_shape, Tensor values, Tensor ptr,"
        " Tensor taps, Tensor cptr, Tensor cperm, Tensor crow, int[] geom, bool need_dx,"
        " bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)",
        &conv_backward);
}
