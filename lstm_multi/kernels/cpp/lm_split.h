// The batch split over threads: lm_sequence_forward/backward's contracts (lm_loops.h)
// with the batch split over ``threads`` OpenMP threads, the step products on the
// framework's BLAS (lm_blas.h).
//
// lm_split_forward(T, B, H, zx, U, packed, hs, cs, P, valid, ys, saved, threads)
// lm_split_backward(T, B, H, dys, dh, dc, cs, saved, P, valid, U, packed, dzs, dP, threads)
//     packed: U, or U^T for the backward, in MKL's packed format from lm_blas_pack, or
//     NULL; the BLAS bound first by lm_blas_bind.
//
// Each thread takes its own rows b0 <= b < b1 of the batch for the whole sequence:
// rows of different sequences never meet in a step, so the threads run T steps without
// waiting for one another. A step's product on those rows is one call of the BLAS, made
// inside this OpenMP region, where MKL runs single-threaded. Split halves (LM_G 8): the
// product r U goes into a (B, G) scratch array of its own (each thread its rows, beta 0)
// instead of into x_t W, and the backward's product reads dz's second half, dzr. The OpenMP runtime must be
// the BLAS's own (the caller checks lm_same_openmp_runtime): MKL on another runtime
// would start a team of its own inside each of these threads.
//
// Needs lm_loops.h and lm_blas.h before it; only with OpenMP (-fopenmp, see
// cpu_kernels.FLAGS): without it, no split loops.
#pragma once
#ifdef _OPENMP
#include <omp.h>
#include <vector>

static inline void lm_thread_rows(long B, long* b0, long* b1) {
  const long n = omp_get_num_threads(), i = omp_get_thread_num();
  *b0 = B * i / n;
  *b1 = B * (i + 1) / n;
}

// the BLAS's integers are I
template <bool RECORD, typename I>
static void lm_split_forward_t(long T, long B, long H, S* zx, const S* U, const S* packed,
                               S* hs, S* cs, const S* P, const unsigned char* valid, S* ys,
                               S* saved, int threads) {
  const long BH = B * H, G = 4 * H;
  // split halves: r U in rows of its own, never added into x_t W (every row written by
  // its thread's product before it is read)
  std::vector<S> recurrent(LM_G == 8 ? G * B : 0);
  S* zr = LM_G == 8 ? recurrent.data() : 0;
#pragma omp parallel num_threads(threads)
  {
    long b0, b1;
    lm_thread_rows(B, &b0, &b1);
    for (long t = 0; t < T; ++t) {
      S* z = zx + t * G * B;
      const S* r = LM_RECURRENT + t * BH + b0 * H;
      if (zr) {
        lm_product_forward<I>(b1 - b0, H, r, U, packed, S(0), zr + b0 * G);
        lm_step_forward_rows<RECORD, true>(b0, b1, B, H, z, zr, hs + t * BH, cs + t * BH, P,
                                           valid ? valid + t * B : 0, hs + (t + 1) * BH,
                                           cs + (t + 1) * BH, ys + t * BH,
                                           RECORD ? saved + t * LM_NS * BH : saved);
        continue;
      }
      lm_product_forward<I>(b1 - b0, H, r, U, packed, S(1), z + b0 * G);
      lm_step_forward_rows<RECORD, false>(b0, b1, B, H, z, 0, hs + t * BH, cs + t * BH, P,
                                          valid ? valid + t * B : 0, hs + (t + 1) * BH,
                                          cs + (t + 1) * BH, ys + t * BH,
                                          RECORD ? saved + t * LM_NS * BH : saved);
    }
  }
}

template <typename I>
static void lm_split_forward_i(long T, long B, long H, S* zx, const S* U, const S* packed,
                               S* hs, S* cs, const S* P, const unsigned char* valid, S* ys,
                               S* saved, int threads) {
  if (saved)
    lm_split_forward_t<true, I>(T, B, H, zx, U, packed, hs, cs, P, valid, ys, saved, threads);
  else
    lm_split_forward_t<false, I>(T, B, H, zx, U, packed, hs, cs, P, valid, ys, saved, threads);
}

// lm_sequence_forward's contract, the batch split over ``threads`` threads
extern "C" void lm_split_forward(long T, long B, long H, S* zx, const S* U, const S* packed,
                                 S* hs, S* cs, const S* P, const unsigned char* valid, S* ys,
                                 S* saved, long threads) {
  if (lm_blas_ilp64)
    lm_split_forward_i<long long>(T, B, H, zx, U, packed, hs, cs, P, valid, ys, saved,
                                  (int)threads);
  else
    lm_split_forward_i<int>(T, B, H, zx, U, packed, hs, cs, P, valid, ys, saved, (int)threads);
}

// the BLAS's integers are I
template <typename I>
static void lm_split_backward_t(long T, long B, long H, const S* dys, S* dh, S* dc,
                                const S* cs, const S* saved, const S* P,
                                const unsigned char* valid, const S* U, const S* packed,
                                S* dzs, S* dP, long threads) {
  // a row of dz: LM_G blocks of H; r U's part (all of it, or dzr) starts at Z
  const long BH = B * H, G = LM_G * H, Z = (LM_G - 4) * H, R = LM_R * H;
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
      lm_product_backward<I>(b1 - b0, H, dz + b0 * G + Z, G, U, packed, d + b0 * H);
    }
  }
  for (long i = 0; i < threads; ++i)
#pragma omp simd
    for (long k = 0; k < R; ++k) dP[k] += parts[i * R + k];
}

// lm_sequence_backward's contract, the batch split over ``threads`` threads: each
// thread sums its rows' parameter gradients apart, and they are added into dP in
// thread order afterwards (the same bits every run)
extern "C" void lm_split_backward(long T, long B, long H, const S* dys, S* dh, S* dc,
                                  const S* cs, const S* saved, const S* P,
                                  const unsigned char* valid, const S* U, const S* packed,
                                  S* dzs, S* dP, long threads) {
  if (lm_blas_ilp64)
    lm_split_backward_t<long long>(T, B, H, dys, dh, dc, cs, saved, P, valid, U, packed, dzs,
                                   dP, threads);
  else
    lm_split_backward_t<int>(T, B, H, dys, dh, dc, cs, saved, P, valid, U, packed, dzs, dP,
                             threads);
}
#endif
