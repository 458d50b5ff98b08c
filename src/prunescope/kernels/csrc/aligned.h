// Cache-line-aligned arrays for the kernels' own buffers, in each translation unit's own copy
// (internal linkage: nothing compiled with one ISA's flags is shared with another's).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>

namespace ps {

namespace {  // internal linkage: each translation unit keeps its own copy, built for its ISA
struct FreeAligned {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using AlignedArray = std::unique_ptr<T[], FreeAligned>;

// n elements of T on a 64-byte boundary (a cache line, a 512-bit vector: loads of whole vectors
// from a buffer of `new T[]`, 16-byte aligned, split a line in three of four 512-bit loads).
template <class T>
AlignedArray<T> aligned_array(int64_t n) {
  if (n <= 0) return AlignedArray<T>();
  const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, bytes);
  if (p == nullptr) throw std::bad_alloc();
  return AlignedArray<T>(static_cast<T*>(p));
}
}  // namespace
}  // namespace ps
