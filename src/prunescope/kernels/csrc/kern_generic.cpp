// The sparse kernels for the baseline instruction set (no -m flags): any x86-64 (or other) CPU.
#include "kernels.h"

extern "C" const ps::Table* ps_table_generic() {
  static const ps::Table table = {"generic", 8, ps::kernels<ps::VecGeneric<float, 8>>(),
                                  ps::kernels<ps::VecGeneric<double, 4>>()};
  return &table;
}
