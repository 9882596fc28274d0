// A stand-in BLAS for tests/test_blas_binding.py: plain loops behind the names and the
// declarations the kernels bind (sgemm_, dgemm_ and MKL's packed sgemm), with integers
// of type lm_fake_int, which the test defines (int: LP64, long long: ILP64) before this
// text, and LM_FAKE_CONFIG where it has an openblas_get_config (what that says).
//
// Every integer it receives is checked against what the kernels can pass (dimensions
// in 1..1<<20, the CBLAS codes they use); lm_fake_bad counts the calls that broke that,
// lm_fake_calls all of them. Built with -fopenmp: it runs on the kernels' libgomp.
#include <omp.h>
#include <stddef.h>

typedef lm_fake_int I;
static long lm_fake_calls_ = 0, lm_fake_bad_ = 0;

static void lm_count(bool ok) {
  __atomic_fetch_add(&lm_fake_calls_, 1, __ATOMIC_RELAXED);
  if (!ok) __atomic_fetch_add(&lm_fake_bad_, 1, __ATOMIC_RELAXED);
}

static bool lm_size(I n) { return n >= 1 && n <= (I(1) << 20); }

extern "C" long lm_fake_calls() { return lm_fake_calls_; }
extern "C" long lm_fake_bad() { return lm_fake_bad_; }
extern "C" int lm_fake_threads() { return omp_get_num_threads(); }  // links libgomp

#ifdef LM_FAKE_CONFIG
extern "C" const char* openblas_get_config() { return LM_FAKE_CONFIG; }
#endif

// C (m, n) = alpha op(A) op(B) + beta C, column-major, op(X) = X or X^T
template <typename T>
static void lm_gemm(const char* ta, const char* tb, const I* m, const I* n, const I* k,
                    const T* alpha, const T* a, const I* lda, const T* b, const I* ldb,
                    const T* beta, T* c, const I* ldc) {
  const bool ok = lm_size(*m) && lm_size(*n) && lm_size(*k) && lm_size(*lda) &&
                  lm_size(*ldb) && lm_size(*ldc) && (*ta == 'N' || *ta == 'T') &&
                  (*tb == 'N' || *tb == 'T');
  lm_count(ok);
  if (!ok) return;
  for (I j = 0; j < *n; ++j)
    for (I i = 0; i < *m; ++i) {
      T sum = T(0);
      for (I p = 0; p < *k; ++p) {
        const T x = *ta == 'N' ? a[i + p * *lda] : a[p + i * *lda];
        const T y = *tb == 'N' ? b[p + j * *ldb] : b[j + p * *ldb];
        sum += x * y;
      }
      c[i + j * *ldc] = *alpha * sum + *beta * c[i + j * *ldc];
    }
}

extern "C" void sgemm_(const char* ta, const char* tb, const I* m, const I* n, const I* k,
                       const float* alpha, const float* a, const I* lda, const float* b,
                       const I* ldb, const float* beta, float* c, const I* ldc) {
  lm_gemm<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

extern "C" void dgemm_(const char* ta, const char* tb, const I* m, const I* n, const I* k,
                       const double* alpha, const double* a, const I* lda, const double* b,
                       const I* ldb, const double* beta, double* c, const I* ldc) {
  lm_gemm<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// the packed right operand (CblasBMatrix = 162): op(B) (k, n) row-major, times alpha
extern "C" size_t cblas_sgemm_pack_get_size(int identifier, I m, I n, I k) {
  const bool ok = identifier == 162 && lm_size(m) && lm_size(n) && lm_size(k);
  lm_count(ok);
  return ok ? (size_t)(n * k) * sizeof(float) : 0;
}

extern "C" void cblas_sgemm_pack(int layout, int identifier, int trans, I m, I n, I k,
                                 float alpha, const float* src, I ld, float* dest) {
  const bool ok = layout == 101 && identifier == 162 && (trans == 111 || trans == 112) &&
                  lm_size(m) && lm_size(n) && lm_size(k) && lm_size(ld);
  lm_count(ok);
  if (!ok) return;
  for (I p = 0; p < k; ++p)
    for (I q = 0; q < n; ++q)
      dest[p * n + q] = alpha * (trans == 111 ? src[p * ld + q] : src[q * ld + p]);
}

// C (m, n) = A (m, k) B + beta C, row-major, B packed by cblas_sgemm_pack (CblasPacked = 151)
extern "C" void cblas_sgemm_compute(int layout, I transa, I transb, I m, I n, I k,
                                    const float* a, I lda, const float* b, I ldb, float beta,
                                    float* c, I ldc) {
  const bool ok = layout == 101 && transa == 111 && transb == 151 && lm_size(m) &&
                  lm_size(n) && lm_size(k) && lm_size(lda) && lm_size(ldb) && lm_size(ldc);
  lm_count(ok);
  if (!ok) return;
  for (I i = 0; i < m; ++i)
    for (I q = 0; q < n; ++q) {
      float sum = 0.0f;
      for (I p = 0; p < k; ++p) sum += a[i * lda + p] * b[p * n + q];
      c[i * ldc + q] = sum + beta * c[i * ldc + q];
    }
}
