// lm_row_scratch(n): n values of S for the row functions, the calling thread's own.
//
// A row function with row reductions runs its H units in several loops; a value one loop
// computes at a cost (a nonlinearity) and a later loop reads again is stored here by the
// first and loaded by the later ones (emit_cpu._row_loops). The buffer is per thread (the
// batch-split loops run rows on several threads at once), grows to the largest row asked
// for and is kept for the thread's life: no allocation per row.
#pragma once
#include <vector>

static inline S* lm_row_scratch(long n) {
  static thread_local std::vector<S> buffer;
  if ((long)buffer.size() < n) buffer.resize(n);
  return buffer.data();
}
