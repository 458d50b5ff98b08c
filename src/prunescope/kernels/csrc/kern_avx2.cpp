// The sparse kernels for AVX2 + FMA (compiled with -mavx2 -mfma; chosen at run time only on CPUs
// that report both). float64 uses the portable vector here too: it exists for checking.
#define PS_AVX2 1
#include "kernels.h"

extern "C" const ps::Table* ps_table_avx2() {
  static const ps::Table table = {"avx2", 8, ps::kernels<ps::VecF>(),
                                  ps::kernels<ps::VecGeneric<double, 4>>()};
  return &table;
}
