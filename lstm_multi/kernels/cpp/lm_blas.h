// The framework's BLAS, called from inside the kernels (the batch-split loops, lm_split.h).
//
// The BLAS is the one the framework already loaded (found by name with dlsym, never
// linked: torch's MKL on x86). lm_blas_bind(library, integer_bytes) finds its GEMM
// (sgemm_ or dgemm_ in S) and, in float, MKL's packed GEMM (cblas_sgemm_pack_get_size,
// cblas_sgemm_pack, cblas_sgemm_compute), which packs U once for every step.
//
// Integers are passed at the width the library declares: integer_bytes is 4 for an
// LP64 BLAS (32-bit int: MKL's lp64 interface, torch's, OpenBLAS's default, the
// reference BLAS) and 8 for an ILP64 one (64-bit integers: OpenBLAS built with
// INTERFACE64, MKL's ilp64 interface), as kernels/blas.py (integer_bytes) determines
// it from the library; every call below goes through the functions' types for
// integers of that width (lm_blas_api<I>), so no value relies on the byte order to be
// read.
//
// Needs S; only with OpenMP (-fopenmp, see cpu_kernels.FLAGS), like the split loops.
#pragma once
#ifdef _OPENMP
#include <dlfcn.h>
#include <omp.h>
#include <stddef.h>

// the CBLAS enumerations (int in every CBLAS), as MKL numbers them
enum { LM_ROW_MAJOR = 101, LM_NO_TRANS = 111, LM_TRANS = 112, LM_PACKED = 151, LM_B_MATRIX = 162 };

// The functions' types for a BLAS whose integers are I (int or long long): MKL's
// declarations with MKL_INT = I.
template <typename I>
struct lm_blas_api {
  typedef void (*gemm)(const char* transa, const char* transb, const I* m, const I* n,
                       const I* k, const S* alpha, const S* a, const I* lda, const S* b,
                       const I* ldb, const S* beta, S* c, const I* ldc);
  typedef size_t (*pack_size)(int identifier, I m, I n, I k);
  typedef void (*pack)(int layout, int identifier, int trans, I m, I n, I k, float alpha,
                       const float* src, I ld, float* dest);
  typedef void (*compute)(int layout, I transa, I transb, I m, I n, I k, const float* a,
                          I lda, const float* b, I ldb, float beta, float* c, I ldc);
};

// what lm_blas_bind found: the functions (cast to lm_blas_api<I>'s types where called)
static void* lm_gemm = 0;
static void* lm_pack_size = 0;
static void* lm_pack = 0;
static void* lm_compute = 0;  // set only with the other two: the packed GEMM is all three
static int lm_blas_ilp64 = 0;  // 1: its integers are long long (ILP64); 0: int (LP64)

// find the BLAS in ``library`` (already loaded by the framework), whose integers are
// ``integer_bytes`` wide (4 or 8): 1 when it has a GEMM (its packed GEMM too, where
// ``lm_blas_packed_bytes`` then says so), 0 without (or for another width)
extern "C" int lm_blas_bind(const char* library, int integer_bytes) {
  if (integer_bytes != (int)sizeof(int) && integer_bytes != (int)sizeof(long long)) return 0;
  void* handle = dlopen(library, RTLD_NOLOAD | RTLD_LAZY);
  if (!handle) return 0;
  lm_blas_ilp64 = integer_bytes == (int)sizeof(long long);
  lm_gemm = dlsym(handle, sizeof(S) == 4 ? "sgemm_" : "dgemm_");
  lm_pack_size = lm_pack = lm_compute = 0;
  if (sizeof(S) == 4) {
    lm_pack_size = dlsym(handle, "cblas_sgemm_pack_get_size");
    lm_pack = dlsym(handle, "cblas_sgemm_pack");
    lm_compute = dlsym(handle, "cblas_sgemm_compute");
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

template <typename I>
static long lm_blas_packed_bytes_t(long rows, long H, int transposed) {
  const I G = (I)(4 * H), n = (I)rows, k = (I)H;
  const typename lm_blas_api<I>::pack_size size = (typename lm_blas_api<I>::pack_size)lm_pack_size;
  return transposed ? (long)size(LM_B_MATRIX, n, k, G) : (long)size(LM_B_MATRIX, n, G, k);
}

// bytes of U (H, G) packed as the right operand of r U (transposed = 0: rows x H times
// H x G) or of dz U^T (transposed = 1: rows x G times G x H); 0 where there is no
// packed GEMM (double, or a BLAS without it)
extern "C" long lm_blas_packed_bytes(long rows, long H, int transposed) {
  if (sizeof(S) != 4 || !lm_compute) return 0;
  return lm_blas_ilp64 ? lm_blas_packed_bytes_t<long long>(rows, H, transposed)
                       : lm_blas_packed_bytes_t<int>(rows, H, transposed);
}

template <typename I>
static void lm_blas_pack_t(long rows, long H, const S* U, int transposed, S* packed) {
  const I G = (I)(4 * H), n = (I)rows, k = (I)H;
  const typename lm_blas_api<I>::pack pack = (typename lm_blas_api<I>::pack)lm_pack;
  if (transposed)
    pack(LM_ROW_MAJOR, LM_B_MATRIX, LM_TRANS, n, k, G, 1.0f, (const float*)U, G,
         (float*)packed);
  else
    pack(LM_ROW_MAJOR, LM_B_MATRIX, LM_NO_TRANS, n, G, k, 1.0f, (const float*)U, G,
         (float*)packed);
}

// U (H, G) packed for ``rows`` rows into ``packed`` (lm_blas_packed_bytes of them)
extern "C" void lm_blas_pack(long rows, long H, const S* U, int transposed, S* packed) {
  if (lm_blas_ilp64)
    lm_blas_pack_t<long long>(rows, H, U, transposed, packed);
  else
    lm_blas_pack_t<int>(rows, H, U, transposed, packed);
}

// z (rows, G) = beta z + r (rows, H) U, U (H, G); from the packed U where there is one.
// beta is 1 (add r U into x_t W + b) or 0 (r U alone, for split halves: z is not read
// then, as BLAS promises for beta = 0)
template <typename I>
static void lm_product_forward(long rows, long H, const S* r, const S* U, const S* packed,
                               S beta, S* z) {
  if (rows <= 0) return;
  const I G = (I)(4 * H), n = (I)rows, k = (I)H;
  if (packed) {
    ((typename lm_blas_api<I>::compute)lm_compute)(LM_ROW_MAJOR, LM_NO_TRANS, LM_PACKED, n, G,
                                                    k, (const float*)r, k,
                                                    (const float*)packed, G, (float)beta,
                                                    (float*)z, G);
    return;
  }
  const S one = S(1);  // column-major: z^T (G, rows) = beta z^T + U^T (G, H) r^T (H, rows)
  ((typename lm_blas_api<I>::gemm)lm_gemm)("N", "N", &G, &n, &k, &one, U, &G, r, &k, &beta, z,
                                            &G);
}

// d (rows, H) += dz (rows, G) U^T, U (H, G), a row of dz ``ldz`` apart (G, or 8H for
// split halves, whose dzr starts at dz); from the packed U^T where there is one
template <typename I>
static void lm_product_backward(long rows, long H, const S* dz, long ldz, const S* U,
                                const S* packed, S* d) {
  if (rows <= 0) return;
  const I G = (I)(4 * H), n = (I)rows, k = (I)H, ld = (I)ldz;
  if (packed) {
    ((typename lm_blas_api<I>::compute)lm_compute)(LM_ROW_MAJOR, LM_NO_TRANS, LM_PACKED, n, k,
                                                    G, (const float*)dz, ld,
                                                    (const float*)packed, k, 1.0f, (float*)d, k);
    return;
  }
  const S one = S(1);  // column-major: d^T (H, rows) += (U^T)^T (H, G) dz^T (G, rows)
  ((typename lm_blas_api<I>::gemm)lm_gemm)("T", "N", &k, &n, &G, &one, U, &G, dz, &ld, &one, d,
                                            &k);
}
#endif
