// The sparse kernels for AVX-512 (compiled with -mavx512f -mavx512dq -mavx512vl besides AVX2 and
// FMA; chosen at run time only on CPUs that report all of them): the batch-lane kernels on 16-lane
// vectors, the direct convolution's on 8-lane ones (EVEX-encoded, 32 registers). float64 uses the
// portable vector, as on AVX2.
#define PS_AVX2 1
#define PS_AVX512 1
// GCC 12's AVX-512 headers build some intrinsics (_mm512_max_ps, _mm512_castps512_ps256) on an
// undefined value (_mm512_undefined_ps) and then warn that it is used uninitialized: a false
// positive of those headers, not of this code
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "kernels.h"

extern "C" const ps::Table* ps_table_avx512() {
  static const ps::Table table = {"avx512", 16, ps::kernels_split<ps::VecF16, ps::VecF>(),
                                  ps::kernels<ps::VecGeneric<double, 4>>()};
  return &table;
}
