// The step and sequence loops around a variant's generated gate math, in one scalar S.
//
// Included by the translation unit that lstm_multi.compile.emit_cpu writes, after what it
// generates (kernels/cpu_kernels.py compiles it with -I this folder):
//
//   typedef float S;  (or double)
//   LM_NS              the number of saved values besides c_{t-1} and c_t, which the
//                      backward reads from cs (len(emit_cuda.forward_stored(programs)))
//   LM_R               the rows of the packed parameters P (R, H)
//   LM_RECURRENT       hs or cs: the state the sequence loop multiplies by U
//   LM_RECURRENT_GRAD  dh or dc: its gradient
//   LM_G               the blocks of H a row of dz has: 4 (the gates), or 8 for split
//                      halves (dzx then dzr: x_t W and r U apart, the sequence and
//                      batch-split loops form r U in a scratch array of their own)
//   lm_forward_row<RECORD, SUM>(H, z, zr, c_prev, P, h, c, y, saved, stride)
//   lm_backward_row(H, dy, dh, dc, c_prev, c, saved, stride, P, dz, dP)
//                      one row's gate math over its H units, forward and backward
//
// and exports (all arrays C-order, G = 4H; P (R, H), its rows in programs.param_rows
// order; valid (B,) / (T, B) bytes, 1 where a sequence is inside its length, or NULL
// when every sequence is full):
//
// lm_step_forward(B, H, z, zr, h_prev, c_prev, P, valid, h, c, y, saved)
//     One step's gate math on z + zr (B, G), x_t W + b and r U (zr NULL: z is the
//     whole preactivation): writes h_t, c_t (the carried state, (B, H): the previous
//     state where a sequence has ended), y_t (zero there) and, unless saved is NULL,
//     the values the backward reads, saved (NS, B, H).
// lm_step_backward(B, H, dy, dr, dh, dc, c_prev, c, saved, P, valid, dz, dP)
//     Its backward: dh, dc (B, H) hold the gradients of the carried h_t, c_t (less the
//     recurrent product's part dr = dz_{t+1} U^T, which is added first, to dh, or to dc
//     when c is the recurrent state; dr may be NULL) and are overwritten with those of
//     h_{t-1}, c_{t-1}, again without the recurrent product of this step; writes dz
//     (B, G), zero where a sequence has ended; reads c_{t-1}, c_t from c_prev, c (B, H)
//     where it needs them; adds the parameter gradients, summed over the batch, into
//     dP (R, H).
// lm_sequence_forward(T, B, H, zx, U, hs, cs, P, valid, ys, saved)
//     The whole time loop: for each t, zx[t] += r_{t-1} U (in place, with U (H, G)) and
//     the step above, with hs, cs (T + 1, B, H) holding h_0, c_0 in row 0 on entry and
//     every carried state after; saved (T, NS, B, H) or NULL.
// lm_sequence_backward(T, B, H, dys, dh, dc, cs, saved, P, valid, Ut, dzs, dP)
//     The backward time loop, Ut = U^T (G, H): dh, dc enter as the gradients of the
//     final state and leave as those of the initial one; writes dzs (T, B, G) and adds
//     to dP. The weight and input gradients are then whole-sequence products, the
//     caller's.
// lm_nonlinearities(n, x, sigmoid_x, tanh_x)
//     lm_sigmoid and lm_tanh alone (the tests measure their accuracy through it).
//
// The element loops are '#pragma omp simd' loops over a row's H units, so the compiler
// vectorises the gate math. The products in the sequence loop are plain loops (four
// batch rows share each load of U), fast enough where a step is small, which is where
// the loop in C matters (the per-step call overhead of a framework is what dominates
// there).
#pragma once
#include <vector>

// rows b0 <= b < b1 of a step of batch B
template <bool RECORD, bool SUM>
static void lm_step_forward_rows(long b0, long b1, long B, long H, const S* z, const S* zr,
                                 const S* h_prev, const S* c_prev, const S* P,
                                 const unsigned char* valid, S* h, S* c, S* y, S* saved) {
  const long stride = B * H;
  for (long b = b0; b < b1; ++b) {
    const long o = b * H;
    if (valid && !valid[b]) {  // past the length: carry the state, output zero
#pragma omp simd
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
      for (long j = 0; j < LM_G * H; ++j) dz[LM_G * o + j] = S(0);
      continue;
    }
    lm_backward_row(H, dy + o, dh + o, dc + o, c_prev + o, c + o, saved + o, stride, P,
                    dz + LM_G * o, dP);
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
  // split halves: r U in a row of its own, never added into x_t W
  std::vector<S> recurrent(LM_G == 8 ? 4 * BH : 0);
  for (long t = 0; t < T; ++t) {
    S* z = zx + t * 4 * BH;
    S* zr = LM_G == 8 ? recurrent.data() : 0;
    if (zr) {
      for (long k = 0; k < 4 * BH; ++k) zr[k] = S(0);
      lm_add_product(B, H, LM_RECURRENT + t * BH, U, zr);
      lm_step_forward_t<RECORD, true>(B, H, z, zr, hs + t * BH, cs + t * BH, P,
                                      valid ? valid + t * B : 0, hs + (t + 1) * BH,
                                      cs + (t + 1) * BH, ys + t * BH,
                                      RECORD ? saved + t * LM_NS * BH : saved);
      continue;
    }
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
  // a row of dz: LM_G blocks of H; r U's part (all of it, or dzr) starts at R
  const long BH = B * H, G = LM_G * H, R = (LM_G - 4) * H;
  S* dr = LM_RECURRENT_GRAD;
  for (long t = T - 1; t >= 0; --t) {
    S* dz = dzs + t * LM_G * BH;
    lm_step_backward(B, H, dys + t * BH, 0, dh, dc, cs + t * BH, cs + (t + 1) * BH,
                     saved + t * LM_NS * BH, P,
                     valid ? valid + t * B : 0, dz, dP);
    for (long b = 0; b < B; ++b) {  // dr += dz U^T, as rows of Ut
      S* drb = dr + b * H;
      for (long j = 0; j < 4 * H; ++j) {
        const S a = dz[b * G + R + j];
        const S* u = Ut + j * H;
#pragma omp simd
        for (long k = 0; k < H; ++k) drb[k] += a * u[k];
      }
    }
  }
}
