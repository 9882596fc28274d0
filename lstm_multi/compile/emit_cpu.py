"""C++ for the CPU from gate programs: a fused step and a whole-sequence loop per variant.

``cpu_source(programs, scalar)`` writes one translation unit in one scalar type
``S`` (``float`` or ``double``) exporting four functions (all arrays C-order,
``G = 4H``; the extra parameters packed as ``P (R, H)``, their rows in
``programs.param_rows`` order; ``valid`` is ``(B,)`` / ``(T, B)`` bytes, 1 where
a sequence is inside its length, or NULL when every sequence is full; ``NS``
is the number of saved values besides c_{t-1} and c_t, which the backward
reads from cs, ``len(emit_cuda.forward_stored(programs))``):

``lm_step_forward(B, H, z, zr, h_prev, c_prev, P, valid, h, c, y, saved)``
    One step's gate math on z + zr (B, G), x_t W + b and r U (zr NULL: z is
    the whole preactivation): writes h_t, c_t (the
    carried state, (B, H): the previous state where a sequence has ended),
    y_t (zero there) and, unless ``saved`` is NULL, the values the backward
    reads, saved (NS, B, H).
``lm_step_backward(B, H, dy, dr, dh, dc, c_prev, c, saved, P, valid, dz, dP)``
    Its backward: dh, dc (B, H) hold the gradients of the carried h_t, c_t
    (less the recurrent product's part dr = dz_{t+1} U^T, which is added
    first, to dh, or to dc when c is the recurrent state; dr may be NULL) and
    are overwritten with those of h_{t-1}, c_{t-1}, again without the
    recurrent product of this step; writes dz (B, G), zero where a sequence
    has ended; reads c_{t-1}, c_t from c_prev, c (B, H) where it needs them;
    adds the parameter gradients, summed over the batch, into dP (R, H).
``lm_sequence_forward(T, B, H, zx, U, hs, cs, P, valid, ys, saved)``
    The whole time loop: for each t, zx[t] += r_{t-1} U (in place, with U
    (H, G)) and the step above, with hs, cs (T + 1, B, H) holding h_0, c_0 in
    row 0 on entry and every carried state after; saved (T, NS, B, H) or NULL.
``lm_sequence_backward(T, B, H, dys, dh, dc, cs, saved, P, valid, Ut, dzs, dP)``
    The backward time loop, Ut = U^T (G, H): dh, dc enter as the gradients of
    the final state and leave as those of the initial one; writes dzs
    (T, B, G) and adds to dP. The weight and input gradients are then
    whole-sequence products, the caller's.

``lm_split_forward(T, B, H, zx, U, packed, hs, cs, P, valid, ys, saved, threads)``,
``lm_split_backward(T, B, H, dys, dh, dc, cs, saved, P, valid, U, packed, dzs, dP, threads)``
    The two sequence loops with the batch split over ``threads`` OpenMP threads,
    each running its rows through all T steps with no step-to-step barrier; a
    step's product on a thread's rows is one call of the framework's BLAS,
    bound by ``lm_blas_bind(library)`` (``packed``: U, or U^T for the
    backward, in MKL's packed format from ``lm_blas_pack``, or NULL). Only
    when compiled with ``-fopenmp``; ``lm_same_openmp_runtime(library)`` says
    whether the BLAS's library runs on their OpenMP runtime.

Two helpers: ``lm_nonlinearities(n, x, sigmoid_x, tanh_x)`` (the tests
measure their accuracy through it) and ``lm_advise_huge_pages(p, n)``.

The element loops are ``#pragma omp simd`` loops over a row's H units, so the
compiler vectorises the gate math; in ``float`` the nonlinearities are
branch-free polynomials built on a Cephes-style ``exp`` (a few ulp, the same
forms as the Triton kernels), which vectorise where libm calls would not; in
``double`` they are libm's. The products in the sequence loop are plain loops
(four batch rows share each load of U), fast enough where a step is small,
which is where the loop in C matters (the per-step call overhead of a
framework is what dominates there).
"""

from __future__ import annotations

from .derive import GATES, GatePrograms
from .emit_cuda import c_name, c_statements, forward_stored
from .trace import live_nodes

_FLOAT_MATH = """
// exp(x) for x <= 0 (Cephes' expf polynomial after x = n ln 2 + r); 0 below
// ln(FLT_MIN) = -87.3365, where exp(x) leaves the normal floats
static inline float lm_exp_nonpositive(float x) {
  const float xc = x < -87.3365f ? -87.3365f : x;
  // round to nearest as truncation of a non-positive value minus 1/2 (floorf would not vectorise)
  const float n = (float)(int)(xc * 1.44269504088896341f - 0.5f);
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int bits = ((int)n + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);
  const float keep = x < -87.3365f ? 0.0f : 1.0f;  // a product, not a branch: it vectorises
  return p * scale * keep;
}

// 1 / (1 + exp(-x)) as two branches on e = exp(-|x|), which cannot overflow
static inline float lm_sigmoid(float x) {
  const float e = lm_exp_nonpositive(x < 0.0f ? x : -x);
  const float r = 1.0f / (1.0f + e);
  return x >= 0.0f ? r : e * r;
}

// tanh: Cephes' odd polynomial for |x| < 0.625, (1 - e) / (1 + e), e = exp(-2|x|), above.
// Both are computed and combined by arithmetic, not chosen by a branch, so that the loop
// vectorises: the polynomial's input is 0 where it is not wanted, and large is then
// multiplied by 1, or by 0 where the polynomial is the answer (both finite).
static inline float lm_tanh(float x) {
  const float a = __builtin_fabsf(x);
  const float near_zero = a < 0.625f ? 1.0f : 0.0f;
  const float xs = a < 0.625f ? x : 0.0f;
  const float s = xs * xs;
  const float p = (((-5.70498872745e-3f * s + 2.06390887954e-2f) * s - 5.37397155531e-2f) * s
                   + 1.33314422036e-1f) * s - 3.33332819422e-1f;
  const float small = p * s * xs + xs;
  const float e = lm_exp_nonpositive(-2.0f * a);
  const float large = __builtin_copysignf((1.0f - e) / (1.0f + e), x);
  return small + large * (1.0f - near_zero);
}
"""

_DOUBLE_MATH = """
static inline double lm_sigmoid(double x) {
  const double e = __builtin_exp(-__builtin_fabs(x));
  const double r = 1.0 / (1.0 + e);
  return x >= 0.0 ? r : e * r;
}

static inline double lm_tanh(double x) { return __builtin_tanh(x); }
"""

_FUNCTIONS = {"sigmoid": "lm_sigmoid", "tanh": "lm_tanh"}

_MEMORY = """
#if defined(__linux__)
#include <sys/mman.h>
#endif

// Ask the kernel to back the 2 MiB-aligned interior of a fresh buffer with huge pages:
// one page fault per 2 MiB instead of one per 4 KiB on first touch (Linux with
// transparent huge pages on 'madvise' or 'always'; elsewhere it does nothing).
extern "C" int lm_advise_huge_pages(void* p, long n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const unsigned long huge = 2ul << 20;
  const unsigned long start = ((unsigned long)p + huge - 1) & ~(huge - 1);
  const unsigned long end = ((unsigned long)p + (unsigned long)n) & ~(huge - 1);
  if (end > start) return madvise((void*)start, end - start, MADV_HUGEPAGE);
#else
  (void)p;
  (void)n;
#endif
  return 0;
}
"""

_LOOPS = """
// rows b0 <= b < b1 of a step of batch B
template <bool RECORD, bool SUM>
static void lm_step_forward_rows(long b0, long b1, long B, long H, const S* z, const S* zr,
                                 const S* h_prev, const S* c_prev, const S* P,
                                 const unsigned char* valid, S* h, S* c, S* y, S* saved) {
  const long stride = B * H;
  for (long b = b0; b < b1; ++b) {
    const long o = b * H;
    if (valid && !valid[b]) {  // past the length: carry the state, output zero
      for (long j = 0; j < H; ++j) {
        h[o + j] = h_prev[o + j];
        c[o + j] = c_prev[o + j];
        y[o + j] = S(0);
      }
      continue;
    }
    lm_forward_row<RECORD, SUM>(H, z + 4 * o, SUM ? zr + 4 * o : zr, c_prev + o, P, h + o,
                                c + o, y + o, RECORD ? saved + o : saved, stride);
  }
}

template <bool RECORD, bool SUM>
static void lm_step_forward_t(long B, long H, const S* z, const S* zr, const S* h_prev,
                              const S* c_prev, const S* P, const unsigned char* valid, S* h,
                              S* c, S* y, S* saved) {
  lm_step_forward_rows<RECORD, SUM>(0, B, B, H, z, zr, h_prev, c_prev, P, valid, h, c, y, saved);
}

extern "C" void lm_step_forward(long B, long H, const S* z, const S* zr, const S* h_prev,
                                const S* c_prev, const S* P, const unsigned char* valid, S* h,
                                S* c, S* y, S* saved) {
  if (saved && zr)
    lm_step_forward_t<true, true>(B, H, z, zr, h_prev, c_prev, P, valid, h, c, y, saved);
  else if (saved)
    lm_step_forward_t<true, false>(B, H, z, zr, h_prev, c_prev, P, valid, h, c, y, saved);
  else if (zr)
    lm_step_forward_t<false, true>(B, H, z, zr, h_prev, c_prev, P, valid, h, c, y, saved);
  else
    lm_step_forward_t<false, false>(B, H, z, zr, h_prev, c_prev, P, valid, h, c, y, saved);
}

static void lm_step_backward_rows(long b0, long b1, long B, long H, const S* dy, const S* dr,
                                  S* dh, S* dc, const S* c_prev, const S* c, const S* saved,
                                  const S* P, const unsigned char* valid, S* dz, S* dP) {
  const long stride = B * H;
  S* dr_into = LM_RECURRENT_GRAD;
  for (long b = b0; b < b1; ++b) {
    const long o = b * H;
    if (dr) {  // the recurrent product's gradient from the step after
#pragma omp simd
      for (long j = 0; j < H; ++j) dr_into[o + j] += dr[o + j];
    }
    if (valid && !valid[b]) {  // past the length: dz is zero, dh and dc pass through
      for (long j = 0; j < 4 * H; ++j) dz[4 * o + j] = S(0);
      continue;
    }
    lm_backward_row(H, dy + o, dh + o, dc + o, c_prev + o, c + o, saved + o, stride, P,
                    dz + 4 * o, dP);
  }
}

extern "C" void lm_step_backward(long B, long H, const S* dy, const S* dr, S* dh, S* dc,
                                 const S* c_prev, const S* c, const S* saved, const S* P,
                                 const unsigned char* valid, S* dz, S* dP) {
  lm_step_backward_rows(0, B, B, H, dy, dr, dh, dc, c_prev, c, saved, P, valid, dz, dP);
}

// the nonlinearities alone, for the tests of their accuracy
extern "C" void lm_nonlinearities(long n, const S* x, S* sigmoid_x, S* tanh_x) {
#pragma omp simd
  for (long k = 0; k < n; ++k) {
    sigmoid_x[k] = lm_sigmoid(x[k]);
    tanh_x[k] = lm_tanh(x[k]);
  }
}

// z (B, G) += r (B, H) U (H, G), four rows of r per pass over U
static void lm_add_product(long B, long H, const S* r, const S* U, S* z) {
  const long G = 4 * H;
  long b = 0;
  for (; b + 4 <= B; b += 4) {
    S* z0 = z + b * G;
    S* z1 = z0 + G;
    S* z2 = z1 + G;
    S* z3 = z2 + G;
    for (long k = 0; k < H; ++k) {
      const S a0 = r[b * H + k], a1 = r[(b + 1) * H + k];
      const S a2 = r[(b + 2) * H + k], a3 = r[(b + 3) * H + k];
      const S* u = U + k * G;
#pragma omp simd
      for (long j = 0; j < G; ++j) {
        z0[j] += a0 * u[j];
        z1[j] += a1 * u[j];
        z2[j] += a2 * u[j];
        z3[j] += a3 * u[j];
      }
    }
  }
  for (; b < B; ++b) {
    S* zb = z + b * G;
    for (long k = 0; k < H; ++k) {
      const S a = r[b * H + k];
      const S* u = U + k * G;
#pragma omp simd
      for (long j = 0; j < G; ++j) zb[j] += a * u[j];
    }
  }
}

template <bool RECORD>
static void lm_sequence_forward_t(long T, long B, long H, S* zx, const S* U, S* hs, S* cs,
                                  const S* P, const unsigned char* valid, S* ys, S* saved) {
  const long BH = B * H;
  for (long t = 0; t < T; ++t) {
    S* z = zx + t * 4 * BH;
    lm_add_product(B, H, LM_RECURRENT + t * BH, U, z);
    lm_step_forward_t<RECORD, false>(B, H, z, 0, hs + t * BH, cs + t * BH, P,
                                     valid ? valid + t * B : 0, hs + (t + 1) * BH,
                                     cs + (t + 1) * BH, ys + t * BH,
                                     RECORD ? saved + t * LM_NS * BH : saved);
  }
}

extern "C" void lm_sequence_forward(long T, long B, long H, S* zx, const S* U, S* hs, S* cs,
                                    const S* P, const unsigned char* valid, S* ys, S* saved) {
  if (saved)
    lm_sequence_forward_t<true>(T, B, H, zx, U, hs, cs, P, valid, ys, saved);
  else
    lm_sequence_forward_t<false>(T, B, H, zx, U, hs, cs, P, valid, ys, saved);
}

extern "C" void lm_sequence_backward(long T, long B, long H, const S* dys, S* dh, S* dc,
                                     const S* cs, const S* saved, const S* P, const unsigned char* valid,
                                     const S* Ut, S* dzs, S* dP) {
  const long BH = B * H, G = 4 * H;
  S* dr = LM_RECURRENT_GRAD;
  for (long t = T - 1; t >= 0; --t) {
    S* dz = dzs + t * 4 * BH;
    lm_step_backward(B, H, dys + t * BH, 0, dh, dc, cs + t * BH, cs + (t + 1) * BH,
                     saved + t * LM_NS * BH, P,
                     valid ? valid + t * B : 0, dz, dP);
    for (long b = 0; b < B; ++b) {  // dr += dz U^T, as rows of Ut
      S* drb = dr + b * H;
      for (long j = 0; j < G; ++j) {
        const S a = dz[b * G + j];
        const S* u = Ut + j * H;
#pragma omp simd
        for (long k = 0; k < H; ++k) drb[k] += a * u[k];
      }
    }
  }
}
"""


_THREADED = """
#ifdef _OPENMP  // built with -fopenmp (see cpu_kernels.FLAGS); without it, no split loops
// -- the batch split over threads, with the framework's BLAS ------------------------------
//
// Each thread takes its own rows b0 <= b < b1 of the batch for the whole sequence:
// rows of different sequences never meet in a step, so the threads run T steps
// without waiting for one another. A step's product on those rows is one call of the
// BLAS the framework already loaded (found by name with dlsym, never linked: torch's
// MKL on x86), made inside this OpenMP region, where MKL runs single-threaded; in
// float, U is packed once for every step (MKL's packed GEMM). The OpenMP runtime must
// be the BLAS's own (the caller checks ``lm_same_openmp_runtime``): MKL on another
// runtime would start a team of its own inside each of these threads.

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

static inline void lm_thread_rows(long B, long* b0, long* b1) {
  const long n = omp_get_num_threads(), i = omp_get_thread_num();
  *b0 = B * i / n;
  *b1 = B * (i + 1) / n;
}

template <bool RECORD>
static void lm_split_forward_t(long T, long B, long H, S* zx, const S* U, const S* packed,
                               S* hs, S* cs, const S* P, const unsigned char* valid, S* ys,
                               S* saved, int threads) {
  const long BH = B * H, G = 4 * H;
#pragma omp parallel num_threads(threads)
  {
    long b0, b1;
    lm_thread_rows(B, &b0, &b1);
    for (long t = 0; t < T; ++t) {
      S* z = zx + t * G * B;
      lm_product_forward(b1 - b0, H, LM_RECURRENT + t * BH + b0 * H, U, packed, z + b0 * G);
      lm_step_forward_rows<RECORD, false>(b0, b1, B, H, z, 0, hs + t * BH, cs + t * BH, P,
                                          valid ? valid + t * B : 0, hs + (t + 1) * BH,
                                          cs + (t + 1) * BH, ys + t * BH,
                                          RECORD ? saved + t * LM_NS * BH : saved);
    }
  }
}

// lm_sequence_forward's contract, the batch split over ``threads`` threads
extern "C" void lm_split_forward(long T, long B, long H, S* zx, const S* U, const S* packed,
                                 S* hs, S* cs, const S* P, const unsigned char* valid, S* ys,
                                 S* saved, long threads) {
  if (saved)
    lm_split_forward_t<true>(T, B, H, zx, U, packed, hs, cs, P, valid, ys, saved, (int)threads);
  else
    lm_split_forward_t<false>(T, B, H, zx, U, packed, hs, cs, P, valid, ys, saved, (int)threads);
}

// lm_sequence_backward's contract, the batch split over ``threads`` threads: each
// thread sums its rows' parameter gradients apart, and they are added into dP in
// thread order afterwards (the same bits every run)
extern "C" void lm_split_backward(long T, long B, long H, const S* dys, S* dh, S* dc,
                                  const S* cs, const S* saved, const S* P,
                                  const unsigned char* valid, const S* U, const S* packed,
                                  S* dzs, S* dP, long threads) {
  const long BH = B * H, G = 4 * H, R = LM_R * H;
  std::vector<S> parts(threads * R, S(0));
#pragma omp parallel num_threads((int)threads)
  {
    long b0, b1;
    lm_thread_rows(B, &b0, &b1);
    S* mine = parts.data() + omp_get_thread_num() * R;
    S* d = LM_RECURRENT_GRAD;
    for (long t = T - 1; t >= 0; --t) {
      S* dz = dzs + t * G * B;
      lm_step_backward_rows(b0, b1, B, H, dys + t * BH, 0, dh, dc, cs + t * BH,
                            cs + (t + 1) * BH, saved + t * LM_NS * BH, P,
                            valid ? valid + t * B : 0, dz, mine);
      lm_product_backward(b1 - b0, H, dz + b0 * G, U, packed, d + b0 * H);
    }
  }
  for (long i = 0; i < threads; ++i)
    for (long k = 0; k < R; ++k) dP[k] += parts[i * R + k];
}
#endif
"""


def _param_loads(programs: GatePrograms, used):
    """Loads of the parameter rows the program uses, from the packed P (R, H)."""
    lines = []
    for r, key in enumerate(programs.param_rows):
        if programs.inputs[key] in used:
            lines.append(f"const S v_{key} = P[{r} * H + j];")
    return lines


def _forward_row(programs: GatePrograms) -> str:
    inputs = {programs.inputs[n]: n for n in programs.forward_inputs}
    stored = forward_stored(programs)
    roots = [*programs.forward_outputs.values(), *stored]
    used = set(live_nodes(programs.graph, roots, inputs))
    lines = [
        f"const S v_z_{gate} = SUM ? z[{k} * H + j] + zr[{k} * H + j] : z[{k} * H + j];"
        for k, gate in enumerate(GATES)
        if programs.inputs[f"z_{gate}"] in used
    ]
    if programs.inputs["c_prev"] in used:
        lines.append("const S v_c_prev = c_prev[j];")
    lines += _param_loads(programs, used)
    lines += c_statements(programs, roots, inputs, _FUNCTIONS)
    h = c_name(programs, programs.forward_outputs["h"], inputs)
    lines += [f"h[j] = {h};", f"y[j] = {h};"]
    lines.append(f"c[j] = {c_name(programs, programs.forward_outputs['c'], inputs)};")
    stores = [
        f"saved[{k} * stride + j] = {c_name(programs, n, inputs)};" for k, n in enumerate(stored)
    ]
    body = "\n    ".join(lines)
    record = "\n      ".join(stores)
    return f"""
template <bool RECORD, bool SUM>
static inline void lm_forward_row(long H, const S* __restrict z, const S* __restrict zr,
                                  const S* __restrict c_prev, const S* __restrict P,
                                  S* __restrict h, S* __restrict c, S* __restrict y,
                                  S* __restrict saved, long stride) {{
  (void)zr; (void)P; (void)saved; (void)stride;
#pragma omp simd
  for (long j = 0; j < H; ++j) {{
    {body}
    if (RECORD) {{
      {record}
    }}
  }}
}}
"""


def _backward_row(programs: GatePrograms) -> str:
    inputs = {programs.inputs[n]: n for n in programs.backward_inputs}
    saved_names = [programs.saved_name(n) for n in programs.saved]
    inputs.update(zip(programs.saved, saved_names, strict=True))
    outputs = programs.backward_outputs
    used = set(live_nodes(programs.graph, outputs.values(), inputs))
    # only what the program reads: an unused variable fails the build under -Werror (a
    # variant whose h or c is a constant, or whose gradients do not depend on them)
    lines = []
    if programs.inputs["dh"] in used:
        lines.append("const S v_dh = dh[j] + dy[j];")
    if programs.inputs["dc"] in used:
        lines.append("const S v_dc = dc[j];")
    # c_{t-1} and c_t are read from the carried states, the rest from the tape
    tape = {programs.inputs["c_prev"]: "c_prev[j]", programs.forward_outputs["c"]: "c[j]"}
    tape.update((n, f"saved[{k} * stride + j]") for k, n in enumerate(forward_stored(programs)))
    lines += [
        f"const S v_{name} = {tape[node]};"
        for node, name in zip(programs.saved, saved_names, strict=True)
        if node in used
    ]
    lines += _param_loads(programs, used)
    lines += c_statements(programs, outputs.values(), inputs, _FUNCTIONS)
    lines += [
        f"dz[{k} * H + j] = {c_name(programs, outputs[f'dz_{gate}'], inputs)};"
        for k, gate in enumerate(GATES)
    ]
    lines += [f"dc[j] = {c_name(programs, outputs['dc_prev'], inputs)};", "dh[j] = S(0);"]
    lines += [
        f"dP[{r} * H + j] += {c_name(programs, outputs[f'd{key}'], inputs)};"
        for r, key in enumerate(programs.param_rows)
    ]
    body = "\n    ".join(lines)
    return f"""
static inline void lm_backward_row(long H, const S* __restrict dy, S* __restrict dh,
                                   S* __restrict dc, const S* __restrict c_prev,
                                   const S* __restrict c, const S* __restrict saved, long stride,
                                   const S* __restrict P, S* __restrict dz, S* __restrict dP) {{
  (void)dy; (void)c_prev; (void)c; (void)P; (void)dP; (void)saved; (void)stride;
#pragma omp simd
  for (long j = 0; j < H; ++j) {{
    {body}
  }}
}}
"""


def cpu_source(programs: GatePrograms, scalar: str, recurrent_state: str = "h") -> str:
    """The translation unit described in the module doc, in ``scalar`` ("float" or "double").

    ``recurrent_state`` ("h" or "c") is the state the sequence loop multiplies by U.
    """
    if scalar not in ("float", "double"):
        raise ValueError(f"scalar: expected 'float' or 'double', got {scalar!r}")
    if recurrent_state not in ("h", "c"):
        raise ValueError(f"recurrent_state: expected 'h' or 'c', got {recurrent_state!r}")
    head = [
        "// generated by lstm_multi.compile.emit_cpu; do not edit",
        f"typedef {scalar} S;",
        f"#define LM_NS {len(forward_stored(programs))}",
        f"#define LM_RECURRENT {recurrent_state}s",
        f"#define LM_RECURRENT_GRAD d{recurrent_state}",
        f"#define LM_R {len(programs.param_rows)}",
        "#ifdef _OPENMP\n#include <dlfcn.h>\n#include <omp.h>\n#include <vector>\n#endif",
        _FLOAT_MATH if scalar == "float" else _DOUBLE_MATH,
        _MEMORY,
    ]
    body = _forward_row(programs) + _backward_row(programs) + _LOOPS + _THREADED
    return "\n".join(head) + body
