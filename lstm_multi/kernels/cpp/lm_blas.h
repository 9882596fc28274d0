// The framework's BLAS, called from inside the kernels (the batch-split loops, lm_split.h).
//
// The BLAS is the one the framework already loaded (found by name with dlsym, never
// linked: torch's MKL on x86). lm_blas_bind(library) finds its GEMM (sgemm_ or dgemm_
// in S) and, in float, MKL's packed GEMM (cblas_sgemm_pack_get_size, cblas_sgemm_pack,
// cblas_sgemm_compute), which packs U once for every step.
//
// Needs S; only with OpenMP (-fopenmp, see cpu_kernels.FLAGS), like the split loops.
#pragma once
#ifdef _OPENMP
#include <dlfcn.h>
#include <omp.h>

// Every BLAS integer is passed as a 64-bit long: little-endian, an LP64 BLAS (32-bit
// MKL_INT, torch's) reads its low half, the value, and an ILP64 one the whole; by
// value, a register or an 8-byte stack slot holds either.
typedef void (*lm_gemm_fn)(const char*, const char*, const long*, const long*, const long*,
                           const S*, const S*, const long*, const S*, const long*, const S*, S*,
                           const long*);
typedef unsigned long (*lm_pack_size_fn)(long, long, long, long);
typedef void (*lm_pack_fn)(long, long, long, long, long, long, float, const float*, long,
                           float*);
typedef void (*lm_compute_fn)(long, long, long, long, long, long, const float*, long,
                              const float*, long, float, float*, long);
static lm_gemm_fn lm_gemm = 0;
static lm_pack_size_fn lm_pack_size = 0;
static lm_pack_fn lm_pack = 0;
static lm_compute_fn lm_compute = 0;
enum { LM_ROW_MAJOR = 101, LM_NO_TRANS = 111, LM_TRANS = 112, LM_PACKED = 151, LM_B_MATRIX = 162 };

// find the BLAS in ``library`` (already loaded by the framework): 1 when it has a GEMM
// (its packed GEMM too, where ``lm_blas_packed_bytes`` then says so), 0 without
extern "C" int lm_blas_bind(const char* library) {
  void* handle = dlopen(library, RTLD_NOLOAD | RTLD_LAZY);
  if (!handle) return 0;
  lm_gemm = (lm_gemm_fn)dlsym(handle, sizeof(S) == 4 ? "sgemm_" : "dgemm_");
  if (sizeof(S) == 4) {
    lm_pack_size = (lm_pack_size_fn)dlsym(handle, "cblas_sgemm_pack_get_size");
    lm_pack = (lm_pack_fn)dlsym(handle, "cblas_sgemm_pack");
    lm_compute = (lm_compute_fn)dlsym(handle, "cblas_sgemm_compute");
  }
  if (!(lm_pack_size && lm_pack)) lm_compute = 0;  // packed GEMM only with all three
  return lm_gemm != 0;
}

// 1 when ``library`` (loaded) runs on the same OpenMP runtime as these kernels: then its
// BLAS, called inside their parallel region, sees it and runs single-threaded. Another
// runtime in the process (e.g. a wheel's renamed libgomp) does not matter while idle.
extern "C" int lm_same_openmp_runtime(const char* library) {
  void* handle = dlopen(library, RTLD_NOLOAD | RTLD_LAZY);
  if (!handle) return 0;
  return dlsym(handle, "omp_get_num_threads") == (void*)&omp_get_num_threads;
}

// bytes of U (H, G) packed as the right operand of r U (transposed = 0: rows x H times
// H x G) or of dz U^T (transposed = 1: rows x G times G x H); 0 where there is no
// packed GEMM (double, or a BLAS without it)
extern "C" long lm_blas_packed_bytes(long rows, long H, int transposed) {
  if (sizeof(S) != 4 || !lm_compute) return 0;
  const long G = 4 * H;
  return transposed ? (long)lm_pack_size(LM_B_MATRIX, rows, H, G)
                    : (long)lm_pack_size(LM_B_MATRIX, rows, G, H);
}

extern "C" void lm_blas_pack(long rows, long H, const S* U, int transposed, S* packed) {
  const long G = 4 * H;
  if (transposed)
    lm_pack(LM_ROW_MAJOR, LM_B_MATRIX, LM_TRANS, rows, H, G, 1.0f, (const float*)U, G,
            (float*)packed);
  else
    lm_pack(LM_ROW_MAJOR, LM_B_MATRIX, LM_NO_TRANS, rows, G, H, 1.0f, (const float*)U, G,
            (float*)packed);
}

// z (rows, G) += r (rows, H) U, U (H, G); from the packed U where there is one
static void lm_product_forward(long rows, long H, const S* r, const S* U, const S* packed,
                               S* z) {
  if (rows <= 0) return;
  const long G = 4 * H, n = rows, k = H;
  if (packed) {
    lm_compute(LM_ROW_MAJOR, LM_NO_TRANS, LM_PACKED, n, G, k, (const float*)r, k,
               (const float*)packed, G, 1.0f, (float*)z, G);
    return;
  }
  const S one = S(1);  // column-major: z^T (G, rows) += U^T (G, H) r^T (H, rows)
  lm_gemm("N", "N", &G, &n, &k, &one, U, &G, r, &k, &one, z, &G);
}

// d (rows, H) += dz (rows, G) U^T, U (H, G); from the packed U^T where there is one
static void lm_product_backward(long rows, long H, const S* dz, const S* U, const S* packed,
                                S* d) {
  if (rows <= 0) return;
  const long G = 4 * H, n = rows, k = H;
  if (packed) {
    lm_compute(LM_ROW_MAJOR, LM_NO_TRANS, LM_PACKED, n, k, G, (const float*)dz, G,
               (const float*)packed, k, 1.0f, (float*)d, k);
    return;
  }
  const S one = S(1);  // column-major: d^T (H, rows) += (U^T)^T (H, G) dz^T (G, rows)
  lm_gemm("T", "N", &k, &n, &G, &one, U, &G, dz, &G, &one, d, &k);
}
#endif
